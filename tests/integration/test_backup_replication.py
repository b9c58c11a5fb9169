"""Gossip backups between real nodes: a hub and three users in one process, on the
embedded chain (devnet.local), with the default backup settings.

After a deposit and a thread with payments, every other node (the hub and the users,
whether or not they share a thread with the payer) holds the payer's latest backup: its
newest announcement, the blocks pinned, and content that only the payer's key opens and
that holds the payer's latest thread state; so do a payment after a quiet interval, the
last payment of a burst and a thread close. At the end, every announcement any node
published was heard by every other node: none was dropped at the rate nodes announce.
The replication lag is measured by `weft bench-backup` (devnet/bench_backup.py).
"""

from __future__ import annotations

from pathlib import Path

import trio

from devnet.bench_backup import (
    backups,
    has_thread_at,
    lacks_thread,
    sealed_from,
    slot_key,
    wait_replicated,
)
from node.api import Node
from node.backup import BACKUP_FILE
from protocols.backup import (
    Announcement,
    DecryptionFailed,
    Priority,
    backup_key,
    open_backup,
    parse_root,
)
from protocols.types import Assets, ThreadKey
from tests.integration.network import ETHER, eventually, local_network


async def pinned_backup(node: Node, announcement: Announcement) -> bytes:
    """The sealed backup of `announcement` from `node`'s pinned blocks, asserting that they
    are all there and, at a replica, that nothing else of the owner is pinned."""
    sealed = await sealed_from(node, announcement)
    assert sealed is not None, f"{node.address}: blocks of {announcement.sequence} not pinned"
    if node.address != announcement.owner:
        root = await backups(node).store.get(announcement.root_cid)
        assert root is not None
        blocks = {announcement.root_cid, *parse_root(announcement.root_cid, root).children}
        assert await backups(node).store.pinned(announcement.owner) == blocks
    return sealed


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
                sealed = await pinned_backup(node, announcement)
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

            # One payment after a quiet interval, the last of a burst (debounced), a close
            # (urgent): each reaches every node. `weft bench-backup` measures how fast.
            await trio.sleep(interval + 0.2)
            await a.pay(key, Assets(1000, 10))
            await wait_replicated(net, a, others, has_thread_at(a, key))
            await trio.sleep(interval + 0.2)
            for _ in range(20):
                await a.pay(key, Assets(1000, 10))
            await wait_replicated(net, a, others, has_thread_at(a, key))
            await trio.sleep(0.2)
            await a.close_thread(key)
            await wait_replicated(net, a, others, lacks_thread(a, key))

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


async def test_a_node_that_lost_its_backup_record_announces_above_its_old_backups(
    tmp_path: Path,
) -> None:
    """A's backups.sqlite is deleted while it is down (its store stays): its backups start
    again above the sequences it used, so the others keep them (not as replays)."""
    with trio.fail_after(120):
        async with local_network(tmp_path, users=2) as net:
            a, b = net.users
            hub = net.hub
            await a.deposit(Assets(ETHER, 10**18))
            await hub.collateralize(b.address, Assets(ETHER, 10**18))
            key = await a.open_thread(b.address, Assets(ETHER // 10, 10**17))
            await a.pay(key, Assets(1000, 10))
            before, _ = await wait_replicated(net, a, [hub, b], has_thread_at(a, key))
            slot = next(s for s in net.user_slots if s.node is a)
            await net.stop(slot)
            last = backups(a).agent.own
            assert last is not None and last.sequence >= before.sequence
            for path in (tmp_path / slot.name).glob(f"{BACKUP_FILE}*"):  # -wal, -shm too
                path.unlink()
            # Past gossipsub's message cache (5 heartbeats of 1 s): no peer can hand A its
            # last announcement back when it reconnects.
            await trio.sleep(6)
            a = await net.start(slot)
            # At once, without a change of state: above every sequence A used.
            after, _ = await wait_replicated(net, a, [hub, b], has_thread_at(a, key))
            assert after.sequence > last.sequence
            await a.pay(key, Assets(1000, 10))
            newer, _ = await wait_replicated(net, a, [hub, b], has_thread_at(a, key))
            assert newer.sequence > after.sequence
            for node in (hub, b):
                assert backups(node).keeper.rejected == 0
