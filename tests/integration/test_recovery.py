"""Recovery from the key alone between real nodes (issue 6): a hub and users in one process
on the embedded chain (devnet.local).

A user's data directory is deleted mid-thread; it rebuilds its store from the newest backup
the others hold (`node.recover`), resyncs with the hub and its thread peer, pays on and
closes the thread at the latest state: every payment counted once. The same while the hub
is offline (the backup found, fetched and opened from a user; the resync once the hub is
back). Hostile peers (a forged announcement, a replayed older one, blocks that do not match
their CIDs) are refused; no reachable backup, or only an older one than seen, is a typed
error that writes nothing. The recovery time is measured and printed.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from devnet.bench_backup import backups, has_thread_at, wait_replicated
from node.api import STORE_FILE, Node, PeerRef, WeftError
from node.backup import BACKUP_FILE, backup_topic
from node.gossip import MemoryBlockStore, open_block_service, serve_backup_requests
from node.host import HUB_PROTOCOL, HostError, open_host
from node.recover import (
    NoBackupReachable,
    OnlyStaleBackups,
    RecoveryOptions,
    StoreNotEmpty,
    recover_node,
    store_is_empty,
)
from protocols.backup import (
    Announcement,
    announcement_digest,
    encode_announcement,
)
from protocols.signing import Signer
from protocols.types import Address, Assets, ThreadKey
from tests.integration.network import ETHER, Network, Slot, eventually, local_network, new_key

DEPOSIT = Assets(ETHER, 10**18)
LOCK = Assets(ETHER // 10, 10**17)
LISTEN = 0.5  # seconds on the backup topic: the peers are asked directly meanwhile


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions in `exc`, exception groups flattened."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def slot_of(net: Network, node: Node) -> Slot:
    for slot in (net.hub_slot, *net.user_slots):
        if slot.node is node:
            return slot
    raise AssertionError("not a node of the network")


def wipe(net: Network, slot: Slot) -> Path:
    """Delete the data directory of the (stopped) node of `slot`: only its key is left."""
    data_dir = net.root / slot.name
    shutil.rmtree(data_dir)
    assert not data_dir.exists()
    return data_dir


def flip(data: bytes) -> bytes:
    """`data` with its last bit flipped."""
    return data[:-1] + bytes([data[-1] ^ 1])


def nothing_written(data_dir: Path) -> bool:
    return not (data_dir / STORE_FILE).exists() and not (data_dir / BACKUP_FILE).exists()


async def pay_all(node: Node, key: ThreadKey, amounts: list[Assets]) -> None:
    for amount in amounts:
        await node.pay(key, amount)


def total(amounts: list[Assets]) -> Assets:
    eth = sum(a.eth for a in amounts)
    token = sum(a.token for a in amounts)
    return Assets(eth, token)


async def check_closed(
    net: Network, a: Node, b: Node, key: ThreadKey, paid: list[Assets], channel_before: Assets
) -> None:
    """Close thread `key` from A; its final state and A's channel (at A and at the hub) hold
    every payment exactly once."""
    final = await a.close_thread(key)
    sent = total(paid)
    assert final.state.balance_of(a.address) == Assets(LOCK.eth - sent.eth, LOCK.token - sent.token)
    assert final.state.balance_of(b.address) == sent
    # The lock comes back to A's channel less what A paid B.
    expected = Assets(
        channel_before.eth + LOCK.eth - sent.eth, channel_before.token + LOCK.token - sent.token
    )
    await eventually(lambda: a.balance().user == expected, "A's channel settled at A")
    await eventually(
        lambda: net.hub.balance(a.address).user == expected, "A's channel settled at the hub"
    )
    await eventually(lambda: a.balance().open_threads == 0, "no thread left in A's channel")


async def held_everywhere(owner: Node, others: list[Node]) -> Announcement:
    """`owner`'s last announcement (it may have stopped), once every node of `others`
    holds it."""
    last = backups(owner).agent.own
    assert last is not None

    def everywhere() -> bool:
        for node in others:
            replica = backups(node).keeper.table.get(owner.address)
            if replica is None or replica.announcement != last:
                return False
        return True

    await eventually(everywhere, "the owner's last backup held by every other node")
    return last


async def hub_knows(net: Network, a: Node, *users: Node) -> None:
    """Wait until the (restarted) hub has `a` back and can tell `a` where each of `users`
    is (they reconnect to it on their own schedule)."""
    await eventually(
        lambda: net.hub.peers.is_connected(a.address, HUB_PROTOCOL), "A back with the hub", 30
    )
    for user in users:
        with trio.fail_after(30):
            while True:
                try:
                    await a.peers.resolve(user.address)
                    break
                except HostError:
                    await trio.sleep(0.1)


async def first_payment(node: Node, key: ThreadKey, amount: Assets) -> None:
    """The first payment after a recovery: the thread waits for its peer's sync first."""
    with trio.fail_after(60):
        await node.pay(key, amount)


# ---------------------------------------------------------------- the scenarios


@pytest.mark.parametrize("users", [5])
async def test_recover_mid_thread_and_close_at_latest(tmp_path: Path, users: int) -> None:
    with trio.fail_after(300):
        async with local_network(tmp_path, users=users) as net:
            hub = net.hub
            a, b = net.users[0], net.users[1]
            others = [hub, *net.users[1:]]
            await a.deposit(DEPOSIT)
            await hub.collateralize(b.address, DEPOSIT)
            key = await a.open_thread(b.address, LOCK)
            channel_before = a.balance().user
            paid = [Assets(1000 + i, 10 + i) for i in range(5)]
            await pay_all(a, key, paid)
            announced, _ = await wait_replicated(net, a, others, has_thread_at(a, key))
            for node in others:
                replica = backups(node).keeper.table.get(a.address)
                assert replica is not None and replica.announcement == announced

            # A goes away and loses everything but its key, mid-thread.
            a_slot = slot_of(net, a)
            await net.stop(a_slot)
            last = await held_everywhere(a, others)
            newest = last.sequence
            data_dir = wipe(net, a_slot)

            peers = tuple(n.peer_ref for n in others[1:])
            started = trio.current_time()
            report = await recover_node(net.settings(a_slot), peers, listen=LISTEN)
            rebuilt = trio.current_time()
            assert report.address == a_slot.address
            assert report.sequence == newest >= announced.sequence
            assert report.newest_seen == newest and not report.stale
            assert report.channels == 1 and report.threads == 1
            assert report.peers_asked == users and report.peers_answered == users
            assert report.next_sequence == newest
            assert not await store_is_empty(data_dir)
            with pytest.raises(StoreNotEmpty):
                await recover_node(net.settings(a_slot), peers, listen=LISTEN)
            # A recovery cut after writing backups.sqlite but before the store: the node
            # refuses to start afresh (it would sign over its backed-up states), and a
            # second recovery completes.
            for path in data_dir.glob(f"{STORE_FILE}*"):
                path.unlink()
            with pytest.raises(BaseException) as refused:  # a group or not
                await net.start(a_slot)
            (error,) = leaves(refused.value)
            assert isinstance(error, WeftError) and f"published backup {newest}" in str(error)
            report = await recover_node(net.settings(a_slot), peers, listen=LISTEN)
            assert report.sequence == newest and not report.stale

            a = await net.start(a_slot)
            assert a.state.coordination.recovered
            more = [Assets(2000 + i, 20 + i) for i in range(5)]
            await first_payment(a, key, more[0])
            resumed = trio.current_time()
            await pay_all(a, key, more[1:])
            # B paid nothing; the thread holds exactly what A paid before and after.
            await check_closed(net, a, b, key, paid + more, channel_before)
            # The next backup of A goes above the one it recovered from.
            await eventually(
                lambda: backups(a).agent.own is not None and backups(a).agent.own.sequence > newest,  # type: ignore[union-attr]
                "a newer backup announced after the recovery",
            )
            print(
                f"recovery time ({users} users): store rebuilt after "
                f"{(rebuilt - started) * 1000:.0f} ms, first payment after the resync "
                f"{(resumed - started) * 1000:.0f} ms from the start of the recovery; "
                f"{report.describe()}; phases: "
                + ", ".join(f"{step} {at * 1000:.0f} ms" for step, at in report.phases)
            )


async def test_recover_while_the_hub_is_offline(tmp_path: Path) -> None:
    with trio.fail_after(300):
        async with local_network(tmp_path, users=3) as net:
            hub = net.hub
            a, b, c = net.users
            await a.deposit(DEPOSIT)
            await hub.collateralize(b.address, DEPOSIT)
            key = await a.open_thread(b.address, LOCK)
            channel_before = a.balance().user
            paid = [Assets(500 + i, 5 + i) for i in range(4)]
            await pay_all(a, key, paid)
            await wait_replicated(net, a, [hub, b, c], has_thread_at(a, key))

            a_slot = slot_of(net, a)
            await net.stop(net.hub_slot)
            await net.stop(a_slot)
            data_dir = wipe(net, a_slot)

            # Only C, which shares no thread with A, by its multiaddr: the hub is down.
            started = trio.current_time()
            options = RecoveryOptions((c.peer_ref,), listen=LISTEN)
            a = await net.start(a_slot, recovery=options)
            rebuilt = trio.current_time()
            report = a.recovery
            assert report is not None and report.source == c.peer_ref.peer_id
            assert report.threads == 1 and report.peers_asked == 2
            assert report.peers_answered == 1
            assert any("hub" in note or str(hub.address) in note for note in report.rejected)
            assert not await store_is_empty(data_dir)
            print(f"recovery with the hub offline: store rebuilt after {rebuilt - started:.2f} s")

            # The hub comes back: A resyncs with it and with B, pays on and closes.
            await net.start(net.hub_slot)
            await hub_knows(net, a, b)
            more = [Assets(700, 7), Assets(800, 8)]
            await first_payment(a, key, more[0])
            await pay_all(a, key, more[1:])
            await check_closed(net, a, b, key, paid + more, channel_before)
            # A restart on the recovered store does not recover again.
            a = await net.restart(a_slot, recovery=options)
            assert a.recovery is None


# ---------------------------------------------------------------- hostile peers


@asynccontextmanager
async def fake_peer(
    announcement: Announcement | None, blocks: dict[bytes, bytes] | None = None
) -> AsyncIterator[PeerRef]:
    """A bare libp2p host that answers every /weft/backup/1 request with `announcement`
    and serves `blocks` (whatever bytes they hold) over bitswap."""
    store = MemoryBlockStore()
    for cid, data in (blocks or {}).items():
        await store.put(cid, data)

    async def latest(owner: Address) -> bytes | None:
        return None if announcement is None else encode_announcement(announcement)

    async with (
        open_host(new_key(), 0) as host,
        serve_backup_requests(host, latest),
        open_block_service(host, store),
    ):
        yield PeerRef.of_host(host)


async def blocks_of(node: Node, announcement: Announcement) -> dict[bytes, bytes]:
    """The pinned blocks of `announcement` at `node`."""
    store = backups(node).store
    from protocols.backup import parse_root

    root = await store.get(announcement.root_cid)
    assert root is not None
    found = {announcement.root_cid: root}
    for cid in parse_root(announcement.root_cid, root).children:
        data = await store.get(cid)
        assert data is not None
        found[cid] = data
    return found


async def test_hostile_peers_and_unreachable_backups(tmp_path: Path) -> None:
    with trio.fail_after(300):
        async with local_network(tmp_path, users=2) as net:
            hub = net.hub
            a, b = net.users
            domain = a.state.config.domain
            await a.deposit(DEPOSIT)
            await hub.collateralize(b.address, DEPOSIT)
            key = await a.open_thread(b.address, LOCK)
            await pay_all(a, key, [Assets(100, 1)] * 2)
            older, _ = await wait_replicated(net, a, [hub, b], has_thread_at(a, key))
            older_blocks = await blocks_of(b, older)
            await pay_all(a, key, [Assets(100, 1)] * 3)
            await trio.sleep(backups(a).settings.interval + 0.2)
            await pay_all(a, key, [Assets(100, 1)])
            latest, _ = await wait_replicated(net, a, [hub, b], has_thread_at(a, key))
            assert latest.sequence > older.sequence
            latest_blocks = await blocks_of(b, latest)
            tampered = {
                cid: data[:-1] + bytes([data[-1] ^ 1]) for cid, data in latest_blocks.items()
            }

            # A forged announcement of A (signed by another key) at a high sequence.
            thief = Signer(new_key())
            forged_seq = latest.sequence + 1000
            digest = announcement_digest(
                domain, a.address, forged_seq, latest.root_cid, latest.size
            )
            forged = Announcement(
                a.address, forged_seq, latest.root_cid, latest.size, thief.sign_digest(digest)
            )

            a_slot = slot_of(net, a)
            await net.stop(a_slot)
            final = await held_everywhere(a, [hub, b])
            await net.stop(net.hub_slot)
            data_dir = wipe(net, a_slot)
            settings = net.settings(a_slot)

            async with (
                fake_peer(forged) as forger,
                fake_peer(older, older_blocks) as replayer,
                fake_peer(final, tampered) as tamperer,
            ):
                # Only a forgery: no backup of A at all.
                with pytest.raises(NoBackupReachable) as caught:
                    await recover_node(settings, (forger,), listen=LISTEN)
                message = str(caught.value)
                assert f"no backup of {a.address} reachable from 2 peers" in message
                assert nothing_written(data_dir)

                # The newest seen is only served with blocks that do not match their CIDs;
                # an older one is there: refused (never older than seen), unless allowed.
                with pytest.raises(OnlyStaleBackups) as stale:
                    await recover_node(settings, (forger, replayer, tamperer), listen=LISTEN)
                assert stale.value.newest == final.sequence  # not the forgery
                assert stale.value.available == older.sequence
                assert nothing_written(data_dir)

                # With B (honest) among them: the newest, from B; the rest refused.
                report = await recover_node(
                    settings, (forger, replayer, tamperer, b.peer_ref), listen=LISTEN
                )
                assert report.sequence == final.sequence
                assert report.source == b.peer_ref.peer_id
                assert not report.stale
                assert any("refused" in r for r in report.rejected)  # the forgery
                print("recovery refused: " + " | ".join(report.rejected))

            # The recovered A runs once the hub is back, and pays on.
            await net.start(net.hub_slot)
            a = await net.start(a_slot)
            await hub_knows(net, a, b)
            await first_payment(a, key, Assets(100, 1))
            assert a.thread(key).mine == Assets(LOCK.eth - 700, LOCK.token - 7)
            assert backup_topic(domain)  # the same topic, the same contract
