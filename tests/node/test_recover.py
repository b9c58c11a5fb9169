"""node.recover with fakes: which backup is adopted, what is refused, what is written.

The network and the chain are left out: `_adopt` takes the gathered announcements and a
block service stand-in (blocks by source peer); `tests/integration/test_recovery.py` runs
the whole recovery between real nodes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from libp2p.peer.id import ID

from node import api, recover
from node import engine as eng
from node.backup import BACKUP_FILE
from node.backup_store import BackupStore, published_sequence
from node.gossip import BlockUnavailable, Verdict
from node.host import address_of_peer, peer_identity
from node.peers import PeerRef
from node.recover import (
    NoBackupReachable,
    OnlyStaleBackups,
    _adopt,
    _Seen,
    parse_peer_multiaddr,
    store_is_empty,
)
from node.store import Batch, Store
from protocols import roles
from protocols.backup import (
    Announcement,
    announcement_digest,
    backup_key,
    encode_announcement,
    pack_backup,
)
from protocols.recovery import RECOVERY_NONCE_GAP
from protocols.signing import Signer
from protocols.types import Address, Party
from tests.node.test_backup_service import DOMAIN, HUB, Versions, _key


class FakeHost:
    def __init__(self) -> None:
        self.peer_id = peer_identity(_key()).peer_id

    def is_connected(self, peer_id: object) -> bool:
        return True


class FakeBlocks:
    """Blocks by source (None: any peer), as `BlockService.fetch` gives them."""

    def __init__(self) -> None:
        self.by_source: dict[ID | None, dict[bytes, bytes]] = {None: {}}

    def give(self, source: ID | None, blocks: dict[bytes, bytes]) -> None:
        self.by_source.setdefault(source, {}).update(blocks)

    async def fetch(
        self, cids: Sequence[bytes], source: ID | None = None, **_: object
    ) -> dict[bytes, bytes]:
        held = self.by_source.get(source, {})
        missing = [c for c in cids if c not in held]
        if missing:
            raise BlockUnavailable(f"{len(missing)} missing", missing)
        return {c: held[c] for c in cids}


def peer() -> ID:
    return peer_identity(_key()).peer_id


def settings_of(versions: Versions, data_dir: Path) -> api.NodeSettings:
    return api.NodeSettings(
        private_key=versions.key,
        data_dir=data_dir,
        role=Party.USER,
        chain="http://127.0.0.1:1",
        manager=DOMAIN.verifying_contract,
        hub=PeerRef(HUB, "unused", ()),
    )


def config_of(versions: Versions) -> roles.NodeConfig:
    return roles.NodeConfig(DOMAIN, Party.USER, versions.address, HUB)


async def adopt(
    versions: Versions,
    data_dir: Path,
    seen: _Seen,
    blocks: FakeBlocks,
    *,
    allow_older: bool = False,
):  # type: ignore[no-untyped-def]
    data_dir.mkdir(exist_ok=True)
    return await _adopt(
        settings_of(versions, data_dir),
        config_of(versions),
        FakeHost(),  # type: ignore[arg-type]
        blocks,  # type: ignore[arg-type]
        seen,
        3,
        allow_older,
    )


def nothing_written(data_dir: Path) -> bool:
    return not (data_dir / api.STORE_FILE).exists() and not (data_dir / BACKUP_FILE).exists()


def forged(owner: Address, sequence: int, like: Announcement) -> Announcement:
    thief = Signer(_key())
    digest = announcement_digest(DOMAIN, owner, sequence, like.root_cid, like.size)
    return Announcement(owner, sequence, like.root_cid, like.size, thief.sign_digest(digest))


# ---------------------------------------------------------------- tests


def test_peer_multiaddrs() -> None:
    identity = peer_identity(_key())
    text = identity.peer_id.to_base58()
    ref = parse_peer_multiaddr(f"/ip4/127.0.0.1/tcp/4001/p2p/{text}")
    assert ref == PeerRef(address_of_peer(identity.peer_id), text, ("/ip4/127.0.0.1/tcp/4001",))
    for bad in ("/ip4/127.0.0.1/tcp/4001", f"ip4/1/p2p/{text}", "/ip4/127.0.0.1/tcp/1/p2p/xyz"):
        with pytest.raises(ValueError):
            parse_peer_multiaddr(bad)


async def test_store_is_empty(tmp_path: Path) -> None:
    assert await store_is_empty(tmp_path)
    with Store(tmp_path / api.STORE_FILE):
        pass
    assert await store_is_empty(tmp_path)
    with Store(tmp_path / api.STORE_FILE) as store:
        store.commit(Batch(puts={"coordination": b"x"}))
    assert not await store_is_empty(tmp_path)


async def test_the_newest_is_adopted_and_written(tmp_path: Path) -> None:
    v = Versions()
    v.version = 3
    old, old_blocks = v.pack(3)
    v.version = 7
    new, new_blocks = v.pack(7)
    src_old, src_new, liar = peer(), peer(), peer()
    seen = _Seen()
    seen.add(old, src_old)
    seen.add(forged(v.address, 99, new), liar)  # a forgery does not count as newer
    seen.add(new, liar)  # the liar also offers the newest, with broken blocks
    seen.add(new, src_new)
    blocks = FakeBlocks()
    blocks.give(src_old, old_blocks)
    blocks.give(liar, {cid: data[::-1] for cid, data in new_blocks.items()})
    blocks.give(src_new, new_blocks)
    report = await adopt(v, tmp_path, seen, blocks)
    assert report.sequence == 7 and report.source == src_new.to_base58()
    assert report.newest_seen == 7 and report.next_sequence == 7 and not report.stale
    assert report.channels == 1 and report.threads == 0
    assert any("1 announcement(s) refused" in r for r in report.rejected)
    assert any("backup 7 from" in r for r in report.rejected)  # the liar's blocks

    with Store(tmp_path / api.STORE_FILE) as store:
        loaded = eng.load(store.load(), config_of(v))
    assert loaded.cursor is None and not loaded.fresh  # the watcher replays the chain
    assert loaded.state.coordination.recovered
    side = loaded.state.channels[v.address]
    assert side.latest.state.tx_count_global == 7 and side.awaiting_sync
    backups = BackupStore(tmp_path / BACKUP_FILE, v.address, DOMAIN)
    try:
        snapshot = backups.load()
        assert snapshot.sequence == 7 and snapshot.own == new
        assert backups.pinned(v.address) == set(new_blocks)
    finally:
        backups.close()
    # What open_node reads to refuse starting afresh on a lost store.
    assert published_sequence(tmp_path / BACKUP_FILE) == 7
    assert published_sequence(tmp_path / "missing.sqlite") == 0


async def test_never_older_than_seen_unless_allowed(tmp_path: Path) -> None:
    v = Versions()
    old, old_blocks = v.pack(3)
    v.version = 2
    new, _ = v.pack(7)  # seen, but nobody has its blocks
    src = peer()
    seen = _Seen()
    seen.add(old, src)
    seen.add(new, src)
    blocks = FakeBlocks()
    blocks.give(src, old_blocks)
    with pytest.raises(OnlyStaleBackups) as caught:
        await adopt(v, tmp_path, seen, blocks)
    assert caught.value.newest == 7 and caught.value.available == 3
    assert nothing_written(tmp_path)

    report = await adopt(v, tmp_path, seen, blocks, allow_older=True)
    assert report.stale and report.sequence == 3 and report.newest_seen == 7
    assert report.next_sequence == 8  # sealed again above the newest seen
    assert "OLDER than backup 7" in report.describe()
    backups = BackupStore(tmp_path / BACKUP_FILE, v.address, DOMAIN)
    try:
        snapshot = backups.load()
        assert snapshot.sequence == 8 and snapshot.fingerprint == b""
    finally:
        backups.close()


async def test_nothing_reachable_writes_nothing(tmp_path: Path) -> None:
    v = Versions()
    announcement, _ = v.pack(4)
    seen = _Seen()
    seen.notes.append("0xhub: cannot connect")
    with pytest.raises(NoBackupReachable, match=f"no backup of {v.address} reachable from 3"):
        await adopt(v, tmp_path, _Seen(), FakeBlocks())
    seen.add(forged(v.address, 5, announcement), peer())
    seen.add(announcement, peer())  # announced, blocks nowhere
    with pytest.raises(NoBackupReachable, match="cannot connect"):
        await adopt(v, tmp_path, seen, FakeBlocks())
    assert nothing_written(tmp_path)


async def test_a_backup_for_another_hub_is_refused(tmp_path: Path) -> None:
    v = Versions()
    v.hub = Signer(_key())  # signs as the hub of the content: it opens, but is not mine
    content = replace(v(None, 5), hub=v.hub.address)
    announcement, blocks = pack_backup(backup_key(v.key), os.urandom(12), content, v.user)
    src = peer()
    seen = _Seen()
    seen.add(announcement, src)
    fake = FakeBlocks()
    fake.give(src, blocks)
    with pytest.raises(NoBackupReachable, match="is for hub"):
        await adopt(v, tmp_path, seen, fake)
    assert nothing_written(tmp_path)


def test_recover_command_failures_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.cli import main

    assert main(["recover", "--config", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("weft: error: config file not found") and err.count("\n") == 1

    key_file = tmp_path / "key"
    key_file.write_text(_key().hex())
    config = tmp_path / "node.json"
    config.write_text(
        '{"key_file": "key", "data_dir": "data", "role": "user", '
        '"chain_url": "http://127.0.0.1:1", "manager": "0x' + "c0" * 20 + '", '
        '"hub": {"address": "0x' + "11" * 20 + '", "peer_id": "x", '
        '"multiaddrs": ["/ip4/127.0.0.1/tcp/1"]}}'
    )
    assert main(["recover", "--config", str(config), "--peer", "/ip4/127.0.0.1/tcp/1"]) == 2
    err = capsys.readouterr().err
    assert "a peer is MULTIADDR/p2p/PEER_ID" in err and err.count("\n") == 1
    assert main(["recover", "--config", str(config), "--timeout", "0"]) == 2
    assert "--timeout" in capsys.readouterr().err

    # A store that holds a state is refused before anything else.
    (tmp_path / "data").mkdir()
    with Store(tmp_path / "data" / api.STORE_FILE) as store:
        store.commit(Batch(puts={"coordination": b"x"}))
    assert main(["recover", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and err.count("\n") == 1


def test_each_recovery_draws_its_own_gap() -> None:
    gaps = {recover.recovery_gap() for _ in range(50)}
    assert len(gaps) > 1
    for gap in gaps:
        assert gap % RECOVERY_NONCE_GAP == 0
        assert RECOVERY_NONCE_GAP <= gap <= RECOVERY_NONCE_GAP * recover.GAP_MULTIPLES


def offered(v: Versions, sequence: int) -> tuple[_Seen, FakeBlocks]:
    """`v`'s backup `sequence`, announced by one peer that holds its blocks."""
    announcement, blocks = v.pack(sequence)
    src = peer()
    seen = _Seen()
    seen.add(announcement, src)
    fake = FakeBlocks()
    fake.give(src, blocks)
    return seen, fake


async def test_a_backups_file_of_another_node_is_a_recovery_failure(tmp_path: Path) -> None:
    v = Versions()
    seen, fake = offered(v, 4)
    BackupStore(tmp_path / BACKUP_FILE, Versions().address, DOMAIN).close()  # someone else's
    with pytest.raises(recover.RecoveryFailed, match=f"cannot write {BACKUP_FILE}"):
        await adopt(v, tmp_path, seen, fake)
    assert not (tmp_path / api.STORE_FILE).exists()


async def test_a_cancellation_while_writing_leaves_whole_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = Versions()
    seen, fake = offered(v, 4)
    writing = trio.Event()
    write_store = recover._write_store

    async def slow_write_store(path: Path, state: roles.NodeState) -> None:
        writing.set()
        await trio.sleep(0.2)  # the cancellation arrives now
        await write_store(path, state)

    monkeypatch.setattr(recover, "_write_store", slow_write_store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(adopt, v, tmp_path, seen, fake)
        await writing.wait()
        nursery.cancel_scope.cancel()
    assert not await store_is_empty(tmp_path)
    assert published_sequence(tmp_path / BACKUP_FILE) == 4


def test_the_topic_listener_keeps_only_my_signed_announcements() -> None:
    v = Versions()
    mine, _ = v.pack(4)
    other, _ = Versions().pack(9)
    seen = _Seen()
    listen = recover._listener(v.address, DOMAIN, seen)
    assert listen(encode_announcement(mine)) is Verdict.IGNORE  # kept, not forwarded
    assert listen(encode_announcement(forged(v.address, 99, mine))) is Verdict.REJECT
    assert listen(encode_announcement(other)) is Verdict.IGNORE
    assert listen(b"\x93\x01garbage") is Verdict.REJECT
    assert seen.announcements == [mine] and seen.sources[mine] == []


def test_what_is_seen_is_bounded_and_keeps_the_newest() -> None:
    v = Versions()
    template, _ = v.pack(1)
    seen = _Seen()
    digests = [
        announcement_digest(DOMAIN, v.address, n, template.root_cid, template.size)
        for n in range(1, recover.MAX_SEEN + 11)
    ]
    for n, digest in enumerate(digests, 1):
        signed = v.user.sign_digest(digest)
        seen.add(replace(template, sequence=n, signature=signed), peer())
    assert len(seen.announcements) == len(seen.sources) == recover.MAX_SEEN
    assert min(a.sequence for a in seen.announcements) == 11
