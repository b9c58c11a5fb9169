"""Gossip backups between real nodes: a hub and three users in one process, on the
embedded chain (devnet.local), with the default backup settings.

After a deposit and a thread with payments, every other node (the hub and the users,
whether or not they share a thread with the payer) holds the payer's latest backup: its
newest announcement, the blocks pinned, and content that only the payer's key opens and
that holds the payer's latest thread state. The replication lag (a state change to k
nodes holding the backup) is measured and printed. At the end, every announcement any node
published was heard by every other node: none was dropped at the rate nodes announce.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import trio

from node.api import Node
from node.backup import BackupService
from protocols.backup import (
    Announcement,
    BackupContent,
    DecryptionFailed,
    Priority,
    backup_key,
    from_blocks,
    open_backup,
    parse_root,
)
from protocols.types import Assets, ThreadKey
from tests.integration.network import ETHER, Network, eventually, local_network


def backups(node: Node) -> BackupService:
    assert node.backups is not None
    return node.backups


async def sealed_from(node: Node, announcement: Announcement) -> bytes:
    """The sealed backup of `announcement` from `node`'s pinned blocks (asserting they are)."""
    store = backups(node).store
    root_data = await store.get(announcement.root_cid)
    assert root_data is not None, f"{node.address}: root block not pinned"
    blocks = {announcement.root_cid: root_data}
    for cid in parse_root(announcement.root_cid, root_data).children:
        data = await store.get(cid)
        assert data is not None, f"{node.address}: child block not pinned"
        blocks[cid] = data
    pinned = await store.pinned(announcement.owner)
    if node.address != announcement.owner:
        assert pinned == set(blocks)
    return from_blocks(announcement.root_cid, blocks.get, announcement.size)


async def wait_replicated(
    net: Network,
    owner: Node,
    others: list[Node],
    wanted: Callable[[BackupContent], bool],
    timeout: float = 20.0,
) -> tuple[Announcement, list[float]]:
    """Wait until `owner`'s last backup has content that satisfies `wanted` and every node of
    `others` holds it; return it and the times (trio clock) each of them pinned it."""
    key = slot_key(net, owner)
    domain = owner.state.config.domain
    checked: Announcement | None = None
    good = False
    with trio.move_on_after(timeout):
        while True:
            own = backups(owner).agent.own
            if own is not None and own != checked:
                try:
                    sealed = await sealed_from(owner, own)
                except AssertionError:  # replaced (and unpinned) while we read it
                    continue
                checked = own
                good = wanted(open_backup(backup_key(key), sealed, own, domain))
            if good and checked is not None and all(held(n, owner) == checked for n in others):
                return checked, [backups(n).keeper.kept_at[owner.address] for n in others]
            await trio.sleep(0.002)
    raise AssertionError(f"{owner.address}'s latest backup not everywhere after {timeout} s")


def held(node: Node, owner: Node) -> Announcement | None:
    replica = backups(node).keeper.table.get(owner.address)
    return None if replica is None else replica.announcement


def slot_key(net: Network, node: Node) -> bytes:
    for slot in (net.hub_slot, *net.user_slots):
        if slot.node is node:
            return slot.key
    raise AssertionError("not a node of the network")


def has_thread_at(node: Node, key: ThreadKey) -> Callable[[BackupContent], bool]:
    """The content holds `node`'s latest double-signed state of thread `key` (as it is now)."""
    side = node.state.threads[key]
    latest = side.latest
    channel = node.state.channels[node.address].latest

    def check(content: BackupContent) -> bool:
        entries = [t for t in content.threads if t.key == key]
        return bool(entries) and entries[0].latest == latest and content.channels == (channel,)

    return check


def report(what: str, owner: Node, changed_at: float, times: list[float]) -> list[float]:
    """Print the lag from `changed_at` to the announcement and to k nodes holding it."""
    lags = sorted(t - changed_at for t in times)
    published = backups(owner).agent.last_published_at
    assert published is not None
    print(
        f"replication lag, {what}: announced after {(published - changed_at) * 1000:.0f} ms; "
        + ", ".join(f"k={k} {lag * 1000:.0f} ms" for k, lag in enumerate(lags, 1))
    )
    return lags


async def test_backups_replicate_to_every_node(tmp_path: Path) -> None:
    with trio.fail_after(240):
        async with local_network(tmp_path, users=3) as net:
            a, b, c = net.users
            hub = net.hub
            nodes = [hub, a, b, c]
            others = [hub, b, c]
            interval = backups(a).settings.interval
            await a.deposit(Assets(ETHER, 10**18))
            await hub.collateralize(b.address, Assets(ETHER, 10**18))
            key = await a.open_thread(b.address, Assets(ETHER // 10, 10**17))
            for _ in range(5):
                await a.pay(key, Assets(1000, 10))
            assert a.thread(key).tx_count == 5
            announcement, _ = await wait_replicated(net, a, others, has_thread_at(a, key))

            # Gossip and blocks ride on the connections the nodes have: C shares no thread
            # with A and is not connected to it; it heard and fetched through the hub.
            assert not c.peers.host.is_connected(a.peers.host.peer_id)

            # Every holder has the blocks, and only A's key opens them.
            domain = a.state.config.domain
            a_key, b_key = slot_key(net, a), slot_key(net, b)
            for node in others:
                sealed = await sealed_from(node, announcement)
                content = open_backup(backup_key(a_key), sealed, announcement, domain)
                assert content.threads[0].latest == a.state.threads[key].latest
                try:
                    open_backup(backup_key(b_key), sealed, announcement, domain)
                except DecryptionFailed:
                    pass
                else:
                    raise AssertionError("B's key opened A's backup")
            # The hub and B share a thread with A: A's backup ranks first there; not at C.
            for node, priority in ((hub, Priority.THREAD_PEER), (b, Priority.THREAD_PEER)):
                replica = backups(node).keeper.table.get(a.address)
                assert replica is not None and replica.priority is priority
            replica = backups(c).keeper.table.get(a.address)
            assert replica is not None and replica.priority is Priority.OTHER

            # Lag of an isolated payment (the last announcement is an interval old: this
            # one goes out at once).
            await trio.sleep(interval + 0.2)
            await a.pay(key, Assets(1000, 10))
            changed = trio.current_time()
            _, times = await wait_replicated(net, a, others, has_thread_at(a, key))
            isolated = report("one payment after a quiet interval", a, changed, times)
            assert isolated[-1] < interval

            # Lag of the last payment of a burst (announced when the interval is over).
            await trio.sleep(interval + 0.2)
            for _ in range(20):
                await a.pay(key, Assets(1000, 10))
            changed = trio.current_time()
            _, times = await wait_replicated(net, a, others, has_thread_at(a, key))
            burst = report("last payment of a burst of 20", a, changed, times)
            assert burst[-1] < interval + 1.0

            # Closing the thread is announced at once.
            await trio.sleep(0.2)
            await a.close_thread(key)
            changed = trio.current_time()
            _, times = await wait_replicated(net, a, others, lambda content: not content.threads)
            closed = report("thread close (urgent)", a, changed, times)
            assert closed[-1] < interval

            # The node's rate, raised: every node announces up to 20 times a second while A
            # and C pay B through a new thread each... and nothing is dropped.
            await c.deposit(Assets(ETHER, 10**18))
            k2 = await a.open_thread(b.address, Assets(ETHER // 10, 10**17))
            k3 = await c.open_thread(b.address, Assets(ETHER // 10, 10**17))
            for node in nodes:
                backups(node).agent.interval = 0.05
            start = {n.address: backups(n).agent.published for n in nodes}
            async with trio.open_nursery() as nursery:
                for payer, thread in ((a, k2), (c, k3)):

                    async def pay(payer: Node = payer, thread: ThreadKey = thread) -> None:
                        for _ in range(60):
                            await payer.pay(thread, Assets(1000, 10))

                    nursery.start_soon(pay)
            sent = {n.address: backups(n).agent.published - start[n.address] for n in nodes}
            print(f"announcements during the burst, by node: {sorted(sent.values())}")
            assert sent[a.address] >= 5 and sent[c.address] >= 5

            for owner in nodes:
                if backups(owner).agent.own is None:
                    continue
                await wait_replicated(
                    net, owner, [n for n in nodes if n is not owner], lambda content: True
                )

            def all_heard() -> bool:
                return all(
                    backups(listener).keeper.heard.get(owner.address, 0)
                    == backups(owner).agent.published
                    for owner in nodes
                    for listener in nodes
                    if listener is not owner
                )

            await eventually(all_heard, "every announcement heard by every node", timeout=10)
            published = {n.address: backups(n).agent.published for n in nodes}
            print(f"announcements published by node: {sorted(published.values())}")
            for node in nodes:
                assert backups(node).subscription.dropped == 0
                assert backups(node).keeper.rejected == 0
                assert backups(node).keeper.failed == 0
            lags = isolated + burst + closed
            print(f"replication lag: median {statistics.median(lags) * 1000:.0f} ms")
