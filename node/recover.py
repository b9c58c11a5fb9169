"""Recovery from the key alone (issue 6): rebuild an empty store from the newest backup.

    report = await recover_node(settings, peers, timeout=30.0)
    async with open_node(settings) as node:  # resyncs with the hub and thread peers
        ...

or, the same inside `open_node`, `NodeSettings(recovery=RecoveryOptions(peers))`; on the
command line `weft recover --config FILE [--peer MULTIADDR/p2p/ID ...] [--devnet DIR]`,
then `weft node run --config FILE`.

`recover_node`, on a data directory whose store holds nothing (`StoreNotEmpty` otherwise):

1. starts a libp2p host with the node's key (any free port: the node's own host is started
   afterwards), gossip on the backup topic and a block service over memory;
2. connects to the hub (a user's `settings.hub`, if reachable) and every given peer, asks
   each over `/weft/backup/1` for the latest announcement it holds for the node's address,
   and listens on the backup topic meanwhile (at least `listen` seconds);
3. ranks the announcements (`protocols.backup.rank_backups`: forged ones, and those over the
   size cap, drop out) and tries them newest first: fetch the blocks (from the peers that
   announced it first, then any connected peer; a peer that sends blocks not matching their
   CIDs is skipped: `from_blocks` checks CIDs and sizes), open them with the node's key
   (`open_backup`: decrypt, check every signature), `check_not_stale` against every
   correctly signed announcement seen, `protocols.recovery.restore_state`;
4. writes the restored state to the node's store (identity, channels, threads,
   coordination; no chain cursor, so the node's watcher replays the ChannelManager's logs
   from `settings.deployed_block` and feeds the current block and the channels' on-chain
   updates first), and the adopted backup to `backups.sqlite` as the node's own (pinned,
   served), so that its next announcement goes above every sequence seen.

The node then runs normally (`open_node`): every restored side awaits its peer's sync, and
the machines do the rest (SPEC.md, "Recovery: restoring the machines").

**Never older than seen.** If the newest announcements seen cannot be had (blocks missing,
not matching their CIDs, not opening, not restoring), an older one is adopted only with
`allow_older=True`; otherwise `OnlyStaleBackups` names the newest sequence seen and why it
could not be had, and nothing is written. Then the sequence written to `backups.sqlite` is
above the newest seen (the adopted content sealed again under it).

Errors (all `RecoveryFailed`, a `node.api.WeftError`): `StoreNotEmpty`, `NoBackupReachable`
("no backup of 0x.. reachable from N peers", with what was tried), `OnlyStaleBackups`, and
`RecoveryFailed` itself when the data directory, the stores or the recovery's host fail.
Nothing is written unless a backup is adopted. Cancellation stops the recovery, but not
the writing of an adopted backup: that runs to its end (one transaction per store,
`backups.sqlite` first, so a recovery cut between the two by a crash is simply run again),
and a timeout that comes after it does not fail the recovery. Announcements heard on the
topic that are not signed by the node's key are rejected there (counted against the peer
that forwarded them).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

import trio
from libp2p.peer.id import ID

from node import api, state_codec
from node import engine as eng
from node.backup import BACKUP_FILE, backup_topic, content_fingerprint
from node.backup_store import BackupStoreError, open_backup_store
from node.chain import ChainService
from node.gossip import (
    BackupProtocolError,
    BlockError,
    BlockService,
    GossipConfig,
    GossipError,
    MemoryBlockStore,
    Verdict,
    open_block_service,
    open_gossip,
    request_latest_announcement,
)
from node.host import Host, HostError, address_of_peer, open_host, parse_peer_id
from node.peers import PeerRef
from node.store import Batch, StoreError, open_store
from protocols import roles
from protocols.backup import (
    MAX_SEALED_BYTES,
    Announcement,
    BackupContent,
    BackupError,
    backup_key,
    decode_announcement,
    encode_content,
    from_blocks,
    newest_sequence,
    open_backup,
    pack_backup,
    parse_root,
    rank_backups,
)
from protocols.eip712 import Domain
from protocols.errors import InvalidValue
from protocols.recovery import RECOVERY_NONCE_GAP, RecoveryError, restore_state
from protocols.signing import Signer
from protocols.types import Address

__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_TIMEOUT",
    "NoBackupReachable",
    "OnlyStaleBackups",
    "RecoveryFailed",
    "RecoveryOptions",
    "RecoveryReport",
    "StoreNotEmpty",
    "parse_peer_multiaddr",
    "peers_of_devnet",
    "recover_node",
    "store_is_empty",
]

log = logging.getLogger("weft.recover")

DEFAULT_TIMEOUT: Final = 30.0
"""Seconds a whole recovery may take (connecting, asking, fetching, writing)."""
DEFAULT_LISTEN: Final = 1.0
"""Seconds to listen on the backup topic (while the peers are asked)."""
CONNECT_TIMEOUT: Final = 5.0
REQUEST_TIMEOUT: Final = 5.0
PEER_FETCH_TIMEOUT: Final = 5.0
MAX_CHILDREN_PER_FETCH: Final = 1024
MAX_SEEN: Final = 64
"""Announcements of my address kept while recovering (the newest: one per peer asked, and
those heard on the topic, each checked to be signed by my key)."""


# ---------------------------------------------------------------- errors and results


class RecoveryFailed(api.WeftError):
    """The store could not be recovered; nothing was written."""


class StoreNotEmpty(RecoveryFailed):
    """The node's store already holds a state: recovery is for an empty store only."""


class NoBackupReachable(RecoveryFailed):
    """No backup of this node could be found, fetched and opened from the peers asked."""


class OnlyStaleBackups(RecoveryFailed):
    """A newer backup than any that could be had was seen; adopting an older one needs
    `allow_older`. `newest` is the newest sequence seen, `available` the best one had."""

    def __init__(self, detail: str, newest: int, available: int) -> None:
        super().__init__(detail)
        self.newest = newest
        self.available = available


@dataclass(frozen=True, slots=True)
class RecoveryOptions:
    """How to recover (`recover_node`, or `NodeSettings.recovery` for `open_node`).

    `peers`: whom to ask besides the hub. `timeout`: seconds for the whole recovery.
    `listen`: seconds to listen on the backup topic at least. `allow_older`: adopt an older
    backup when the newer ones seen cannot be had (reported in `RecoveryReport.stale`).
    """

    peers: tuple[PeerRef, ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    listen: float = DEFAULT_LISTEN
    allow_older: bool = False


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What a recovery adopted, and what it saw."""

    address: Address
    sequence: int  # of the adopted backup
    root_cid: bytes
    source: str  # base58 peer id of the peer whose blocks were adopted
    channels: int
    threads: int
    newest_seen: int  # highest correctly signed sequence seen (>= sequence)
    next_sequence: int  # the node's next announcement goes at least here
    peers_asked: int
    peers_answered: int  # peers that answered with an announcement
    rejected: tuple[str, ...] = ()  # why other announcements or sources were refused
    stale: bool = False  # adopted although a newer one was seen (allow_older)
    elapsed: float = 0.0  # seconds
    phases: tuple[tuple[str, float], ...] = ()  # (step, seconds since the start), in order

    def describe(self) -> str:
        """One line for people."""
        source = f"from peer {self.source}"
        line = (
            f"recovered {self.address}: backup {self.sequence} {source}, "
            f"{self.channels} channel(s), {self.threads} thread(s); "
            f"{self.peers_answered} of {self.peers_asked} peer(s) held a backup; "
            f"{self.elapsed:.2f} s"
        )
        if self.stale:
            line += f"; OLDER than backup {self.newest_seen}, which was seen but unreachable"
        return line


@dataclass
class _Seen:
    """Announcements gathered for our address, and who offered each."""

    announcements: list[Announcement] = field(default_factory=list)
    sources: dict[Announcement, list[ID]] = field(default_factory=dict)
    answered: set[ID] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    def add(self, announcement: Announcement, source: ID | None) -> None:
        """Note `announcement`, offered by `source` (None: heard on the topic). Beyond
        `MAX_SEEN` announcements, the one with the lowest sequence is forgotten."""
        if announcement not in self.sources:
            self.announcements.append(announcement)
            self.sources[announcement] = []
            if len(self.announcements) > MAX_SEEN:
                oldest = min(self.announcements, key=lambda a: a.sequence)
                self.announcements.remove(oldest)
                del self.sources[oldest]
                if oldest is announcement:
                    return
        if source is not None and source not in self.sources[announcement]:
            self.sources[announcement].append(source)


# ---------------------------------------------------------------- helpers


GAP_MULTIPLES: Final = 2**24
"""A recovery skips `RECOVERY_NONCE_GAP` times a random 1..2**24 nonces (SPEC.md)."""


def recovery_gap() -> int:
    """The nonces this recovery skips: a random multiple of `RECOVERY_NONCE_GAP`, so that
    two recoveries from one backup (nothing newer published in between) sign at different
    nonces except with probability 2**-24."""
    return RECOVERY_NONCE_GAP * (1 + secrets.randbelow(GAP_MULTIPLES))


def parse_peer_multiaddr(text: str) -> PeerRef:
    """A `--peer` argument, `/ip4/…/tcp/…/p2p/<peer id>`, as a `PeerRef` (its address is
    the one the peer id proves). Raises `ValueError` with a reason."""
    parts = text.rstrip("/").split("/")
    if len(parts) < 3 or parts[-2] != "p2p" or not text.startswith("/"):
        raise ValueError(f"a peer is MULTIADDR/p2p/PEER_ID, not {text!r}")
    peer_id = parts[-1]
    try:
        address = address_of_peer(parse_peer_id(peer_id))
    except (HostError, ValueError) as exc:
        raise ValueError(f"bad peer id in {text!r}: {exc}") from None
    base = "/".join(parts[:-2])
    return PeerRef(address, peer_id, (base,) if base else ())


async def store_is_empty(data_dir: Path) -> bool:
    """True if the node's store in `data_dir` holds no state (or does not exist)."""
    path = data_dir / api.STORE_FILE
    if not path.exists():
        return True
    async with open_store(path) as store:
        snapshot = await store.load()
    return not snapshot.states and not snapshot.outbox


def _strip_p2p(multiaddr: str) -> str:
    parts = multiaddr.split("/")
    return "/".join(parts[: parts.index("p2p")]) if "p2p" in parts else multiaddr


# ---------------------------------------------------------------- the recovery


async def recover_node(
    settings: api.NodeSettings,
    peers: Sequence[PeerRef] = (),
    *,
    timeout: float = DEFAULT_TIMEOUT,
    listen: float = DEFAULT_LISTEN,
    allow_older: bool = False,
) -> RecoveryReport:
    """Rebuild the empty store of `settings.data_dir` from the newest backup of the node's
    address held by the hub or `peers` (see the module docstring); return what it adopted.

    Raises `StoreNotEmpty`, `NoBackupReachable`, `OnlyStaleBackups` (nothing written),
    `RequestTimeout` after `timeout` seconds (nothing written), `RecoveryFailed` if the
    data directory, a store or the recovery's host fails, `WeftError` if the chain or the
    ChannelManager cannot be read. Cancellation leaves nothing or whole stores.
    """
    started = trio.current_time()
    phases: list[tuple[str, float]] = []
    signer = Signer(settings.private_key)
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        empty = await store_is_empty(settings.data_dir)
    except (OSError, StoreError) as exc:
        raise RecoveryFailed(f"cannot read the store in {settings.data_dir}: {exc}") from exc
    if not empty:
        raise StoreNotEmpty(
            f"the store in {settings.data_dir} is not empty: recovery rebuilds an empty one"
        )
    own_chain = isinstance(settings.chain, str)
    chain = (
        ChainService.from_url(settings.chain) if isinstance(settings.chain, str) else settings.chain
    )
    try:
        manager = chain.manager(settings.manager, deployed_block=settings.deployed_block)
        config = await api.node_config(settings, signer, manager)
        phases.append(("chain read", trio.current_time() - started))
    finally:
        if own_chain:
            chain.close()
    targets: list[PeerRef] = []
    if settings.hub is not None:
        targets.append(settings.hub)
    for ref in peers:
        if ref.address != signer.address and all(t.peer_id != ref.peer_id for t in targets):
            targets.append(ref)
    written: list[RecoveryReport] = []  # the report, once the stores are written
    with trio.move_on_after(timeout):
        await _recover(
            settings,
            config,
            targets,
            listen,
            allow_older,
            lambda step: phases.append((step, trio.current_time() - started)),
            written,
        )
    if not written:
        raise api.RequestTimeout(f"recovery of {signer.address} not done within {timeout} s")
    elapsed = trio.current_time() - started
    return replace(written[0], elapsed=elapsed, phases=(*phases, ("host closed", elapsed)))


async def _recover(
    settings: api.NodeSettings,
    config: roles.NodeConfig,
    targets: list[PeerRef],
    listen: float,
    allow_older: bool,
    phase: Callable[[str], None],
    written: list[RecoveryReport],
) -> None:
    """Find, fetch, check and write the newest backup; its report goes to `written` as
    soon as the stores are written (the host is closed after that)."""
    me, domain = config.me, config.domain
    seen = _Seen()
    async with AsyncExitStack() as stack:
        try:
            host = await stack.enter_async_context(open_host(settings.private_key, 0))
            phase("host up")
            gossip = await stack.enter_async_context(open_gossip(host, GossipConfig()))
            blocks = await stack.enter_async_context(open_block_service(host, MemoryBlockStore()))
        except (HostError, GossipError, BlockError) as exc:
            raise RecoveryFailed(f"cannot start the recovery's libp2p host: {exc}") from exc

        subscription = await gossip.subscribe(backup_topic(domain), _listener(me, domain, seen))
        stack.push_async_callback(subscription.aclose)
        async with trio.open_nursery() as nursery:
            for ref in targets:
                nursery.start_soon(_ask, host, ref, me, seen)
            nursery.start_soon(trio.sleep, listen)
        phase("peers asked")
        report = await _adopt(
            settings, config, host, blocks, seen, len(targets), allow_older, phase
        )
        written.append(report)


def _listener(me: Address, domain: Domain, seen: _Seen) -> Callable[[bytes], Verdict]:
    """The validator of the backup topic while recovering: my announcements, signed by my
    key, go to `seen`; malformed ones and forgeries are rejected; the rest is ignored (this
    host keeps no replicas, and forwards nothing)."""

    def validate(data: bytes) -> Verdict:
        try:
            announcement = decode_announcement(data)
        except BackupError:
            return Verdict.REJECT
        if announcement.owner != me:
            return Verdict.IGNORE
        if newest_sequence((announcement,), me, domain) is None:
            return Verdict.REJECT  # not signed by my key
        seen.add(announcement, None)
        return Verdict.IGNORE

    return validate


async def _ask(host: Host, ref: PeerRef, me: Address, seen: _Seen) -> None:
    """Connect to `ref` and ask it for my latest announcement; note what went wrong."""
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            await host.connect(ref.peer_id, [_strip_p2p(m) for m in ref.multiaddrs])
        raw = await request_latest_announcement(host, ref.peer_id, me, timeout=REQUEST_TIMEOUT)
    except (HostError, BackupProtocolError, trio.TooSlowError) as exc:
        seen.notes.append(f"{ref.address}: {exc or 'no answer in time'}")
        log.info("peer %s not asked: %s", ref.address, exc)
        return
    if raw is None:
        seen.notes.append(f"{ref.address}: holds no backup of {me}")
        return
    try:
        announcement = decode_announcement(raw)
    except BackupError as exc:
        seen.notes.append(f"{ref.address}: malformed announcement ({exc})")
        return
    if announcement.owner != me:
        seen.notes.append(f"{ref.address}: answered with {announcement.owner}'s backup")
        return
    seen.answered.add(parse_peer_id(ref.peer_id))
    seen.add(announcement, parse_peer_id(ref.peer_id))


async def _fetch(
    host: Host, blocks: BlockService, announcement: Announcement, source: ID | None
) -> dict[bytes, bytes]:
    """Every block of `announcement`'s backup from `source` (None: any connected peer),
    checked (CIDs, sizes). Raises `BackupError`, `BlockError`, `HostError`."""
    root_cid = announcement.root_cid
    got = await blocks.fetch(
        [root_cid], source, timeout=PEER_FETCH_TIMEOUT * 2, peer_timeout=PEER_FETCH_TIMEOUT
    )
    found = {root_cid: got[root_cid]}
    root = parse_root(root_cid, got[root_cid])
    children = list(root.children)
    for start in range(0, len(children), MAX_CHILDREN_PER_FETCH):
        part = children[start : start + MAX_CHILDREN_PER_FETCH]
        found.update(
            await blocks.fetch(
                part, source, timeout=PEER_FETCH_TIMEOUT * 2, peer_timeout=PEER_FETCH_TIMEOUT
            )
        )
    from_blocks(root_cid, found.get, announcement.size)
    return found


async def _adopt(
    settings: api.NodeSettings,
    config: roles.NodeConfig,
    host: Host,
    blocks: BlockService,
    seen: _Seen,
    asked: int,
    allow_older: bool,
    phase: Callable[[str], None] = lambda step: None,
) -> RecoveryReport:
    me, domain = config.me, config.domain
    key = backup_key(settings.private_key)
    ranked = rank_backups(seen.announcements, me, domain, MAX_SEALED_BYTES)
    forged = len(set(seen.announcements)) - len(ranked)
    rejected = list(seen.notes)
    if forged:
        rejected.append(f"{forged} announcement(s) refused (bad signature or too large)")
    newest = newest_sequence(seen.announcements, me, domain)
    for announcement in ranked:
        sources: list[ID | None] = [*seen.sources.get(announcement, [])]
        sources.append(None)  # then any connected peer
        for source in sources:
            if source == host.peer_id:
                continue
            where = "any peer" if source is None else str(address_of_peer(source))
            try:
                found = await _fetch(host, blocks, announcement, source)
                sealed = from_blocks(announcement.root_cid, found.get, announcement.size)
                content = open_backup(key, sealed, announcement, domain)
                state = restore_state(config, content, recovery_gap())
            except (BackupError, BlockError, HostError, RecoveryError, InvalidValue) as exc:
                rejected.append(f"backup {announcement.sequence} from {where}: {exc}")
                log.info("backup %d from %s refused: %s", announcement.sequence, where, exc)
                continue
            stale = newest is not None and newest > content.sequence
            if stale and not allow_older:
                raise OnlyStaleBackups(
                    f"backup {newest} of {me} was seen but could not be had; the newest "
                    f"reachable is {content.sequence} (allow_older adopts it): "
                    + "; ".join(rejected),
                    newest or 0,
                    content.sequence,
                )
            phase("fetched and opened")
            peer = source.to_base58() if source is not None else _any_connected(host, seen)
            with trio.CancelScope(shield=True):  # whole, even past the timeout
                next_sequence = await _write(
                    settings, config, state, content, announcement, found, newest or 0
                )
            phase("written")
            return RecoveryReport(
                address=me,
                sequence=content.sequence,
                root_cid=announcement.root_cid,
                source=peer,
                channels=sum(1 for c in content.channels),
                threads=len(state.threads),
                newest_seen=max(newest or 0, content.sequence),
                next_sequence=next_sequence,
                peers_asked=asked,
                peers_answered=len(seen.answered),
                rejected=tuple(rejected),
                stale=stale,
            )
    detail = "; ".join(rejected) if rejected else "no peer answered"
    raise NoBackupReachable(f"no backup of {me} reachable from {asked} peers ({detail})")


def _any_connected(host: Host, seen: _Seen) -> str:
    for peers in seen.sources.values():
        for peer in peers:
            if peer != host.peer_id and host.is_connected(peer):
                return peer.to_base58()
    return "a connected peer"


async def _write(
    settings: api.NodeSettings,
    config: roles.NodeConfig,
    state: roles.NodeState,
    content: BackupContent,
    announcement: Announcement,
    found: dict[bytes, bytes],
    newest: int,
) -> int:
    """Write `backups.sqlite` (the adopted backup as my own, above every sequence seen),
    then the node's store; return the sequence recorded as last used."""
    me, domain = config.me, config.domain
    fingerprint = content_fingerprint(encode_content(replace(content, sequence=0)))
    try:
        async with open_backup_store(settings.data_dir / BACKUP_FILE, me, domain) as backups:
            last = (await backups.load()).sequence
            if announcement.sequence > last and announcement.sequence >= newest:
                own, pinned = announcement, found
            else:
                # An older backup adopted (or a store that used higher sequences): seal it
                # again above everything seen; fingerprint b"" makes the node announce at once.
                sequence = max(last, newest, announcement.sequence) + 1
                own, pinned = await trio.to_thread.run_sync(
                    pack_backup,
                    backup_key(settings.private_key),
                    os.urandom(12),
                    replace(content, sequence=sequence),
                    Signer(settings.private_key),
                )
                fingerprint = b""
            await backups.commit_own(own, fingerprint, pinned)
    except BackupStoreError as exc:
        raise RecoveryFailed(f"cannot write {BACKUP_FILE}: {exc}") from exc
    await _write_store(settings.data_dir / api.STORE_FILE, state)
    return own.sequence


async def _write_store(path: Path, state: roles.NodeState) -> None:
    config = state.config
    puts: dict[str, bytes] = {
        eng.IDENTITY_KEY: state_codec.encode((config.me, config.domain, config.role)),
        eng.COORDINATION_KEY: state_codec.encode(state.coordination),
    }
    for user, side in state.channels.items():
        puts[eng.channel_key(user)] = state_codec.encode(side)
    for key, thread in state.threads.items():
        puts[eng.thread_key(key)] = state_codec.encode(thread)
    try:
        async with open_store(path) as store:
            snapshot = await store.load()
            if snapshot.states or snapshot.outbox:
                raise StoreNotEmpty(f"the store {path} was written meanwhile")
            await store.commit(Batch(puts=puts))
    except StoreError as exc:
        raise RecoveryFailed(f"cannot write the store {path}: {exc}") from exc


def peers_of_devnet(directory: Path, me: Address) -> tuple[PeerRef, ...]:
    """Every ready node of the devnet recorded in `directory` but `me`, as `PeerRef`s.
    Raises `RecoveryFailed` if there is no devnet there or its record is unreadable."""
    from devnet.devnet import DevnetError, read_devnet

    try:
        net = read_devnet(directory)
    except DevnetError as exc:
        raise RecoveryFailed(str(exc)) from None
    if net is None:
        raise RecoveryFailed(f"no devnet in {directory}")
    refs = []
    for n in net.nodes:
        if not n.peer_id or not n.multiaddrs:
            continue
        address = Address.from_hex(n.address)
        if address == me:
            continue
        refs.append(PeerRef(address, n.peer_id, tuple(_strip_p2p(m) for m in n.multiaddrs)))
    return tuple(refs)
