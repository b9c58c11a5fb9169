"""Backups in a node (node.backup, node.backup_store): the agent's debounce and sequence,
the keeper's decisions, persistence across restarts, the settings in node.run's config.

The agent's timing is tested against a fake gossip layer that records what is published,
under the autojump clock. Waits there are on events, not polls: while a worker thread packs
or commits, a pending deadline would let the clock jump and skew the virtual times. Where a
test polls (`until`), its time limit is in real seconds for that reason.

Keeper tests run real hosts on 127.0.0.1: an "announcer" (plain gossip and a block service
that publishes whatever the test wants and serves any bytes under any CID, tampered ones
included) and a node's full backup service (`open_backups`). Every network test is bounded.

Hostile peers (a security review): a peer counts once among those that fetched the last
backup however often it reads (test_a_peer_counts_once_however_often_it_reads); fake
announcements whose blocks exist nowhere neither crowd out a thread peer's backup
(test_thread_peer_is_kept_while_fakes_fill_the_pending_table) nor hold a fetch until the
deadline when every peer says it lacks the blocks (test_backup_nobody_has_is_given_up_early);
a backup of the maximum size is still kept (test_a_backup_of_the_maximum_size_is_kept).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.peer.id import ID
from trio.testing import MockClock, wait_all_tasks_blocked

from node.backup import (
    BACKUP_FILE,
    MAX_PENDING_OWNERS,
    URGENT_GAP,
    BackupAgent,
    BackupService,
    BackupSettings,
    ContentOf,
    ServedBlocks,
    backup_topic,
    fit_table,
    open_backups,
    thread_peers,
)
from node.backup_store import (
    AsyncBackupStore,
    BackupStore,
    BackupStoreError,
    open_backup_store,
)
from node.gossip import (
    BlockService,
    GossipConfig,
    GossipService,
    MemoryBlockStore,
    Verdict,
    open_block_service,
    open_gossip,
    request_latest_announcement,
)
from node.host import Host, open_host
from node.run import ConfigError, RunConfig, load_config
from protocols import roles
from protocols import thread as th
from protocols.backup import (
    MAX_SEALED_BYTES,
    Announcement,
    BackupContent,
    BlockMissing,
    DecryptionFailed,
    Priority,
    Replica,
    announcement_digest,
    backup_key,
    cid_of,
    decode_announcement,
    encode_announcement,
    from_blocks,
    make_announcement,
    open_backup,
    pack_backup,
    parse_root,
    stored_bytes,
    to_blocks,
)
from protocols.channel import SignedChannelState, genesis_state
from protocols.eip712 import Domain
from protocols.errors import InvalidValue
from protocols.signing import Signer
from protocols.types import Address, Assets, Party, ThreadKey, ThreadState

DOMAIN = Domain(1337, Address(bytes([0xC0]) * 20))
TOPIC = backup_topic(DOMAIN)
STEP = 10.0  # seconds a network step may take before the test fails


def _key() -> bytes:
    while True:
        key = os.urandom(32)
        try:
            Signer(key)
        except InvalidValue:
            continue
        return key


HUB_KEY = _key()
HUB = Signer(HUB_KEY).address


class Versions:
    """A content builder standing in for `protocols.recovery.backup_content`: one channel of
    the owner, double-signed, whose balance is `version`."""

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key or _key()
        self.user = Signer(self.key)
        self.hub = Signer(HUB_KEY)
        self.address = self.user.address
        self.version = 1

    def __call__(self, state: object, sequence: int) -> BackupContent:
        channel = replace(
            genesis_state(self.address),
            balance_user=Assets(self.version, 0),
            tx_count_global=self.version,
        )
        signed = SignedChannelState(
            channel,
            self.hub.sign_channel_state(DOMAIN, channel),
            self.user.sign_channel_state(DOMAIN, channel),
        )
        return BackupContent(self.address, DOMAIN, HUB, sequence, (signed,), ())

    def pack(self, sequence: int) -> tuple[Announcement, dict[bytes, bytes]]:
        """The announcement and blocks of this content as backup `sequence`."""
        return pack_backup(backup_key(self.key), os.urandom(12), self(None, sequence), self.user)


def nothing(key: bytes) -> ContentOf:
    """A content builder of a node with nothing to back up."""
    me = Signer(key).address

    def content(state: object, sequence: int) -> BackupContent:
        return BackupContent(me, DOMAIN, HUB, sequence, (), ())

    return content


def user_state(me: Address) -> roles.NodeState:
    return roles.new_node(roles.NodeConfig(DOMAIN, Party.USER, me, HUB))


async def read_backup(get: Callable[[bytes], Any], announcement: Announcement) -> bytes:
    """The sealed backup of `announcement`, from a block store's `get`."""
    blocks: dict[bytes, bytes | None] = {announcement.root_cid: await get(announcement.root_cid)}
    data = blocks[announcement.root_cid]
    assert data is not None, "root block missing"
    for cid in parse_root(announcement.root_cid, data).children:
        blocks[cid] = await get(cid)
    return from_blocks(announcement.root_cid, blocks.get, announcement.size)


async def cids_of(get: Callable[[bytes], Any], announcement: Announcement) -> set[bytes]:
    root = parse_root(announcement.root_cid, await get(announcement.root_cid))
    return {announcement.root_cid, *root.children}


async def until(check: Callable[[], bool], what: str, timeout: float = STEP) -> None:
    """Poll `check` until it holds; fail after `timeout` seconds of real time. (Under the
    autojump clock, virtual time races through the polls while a worker thread packs or
    commits: a virtual timeout would fire after a few milliseconds of a slow fsync.)"""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {timeout} s: {what}")
        await trio.sleep(0.01)


# ---------------------------------------------------------------- the agent (fake gossip)


@dataclass
class Sent:
    at: float
    announcement: Announcement


class FakeGossip:
    """The agent's gossip layer: records every publish with its (virtual) time."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.mesh: frozenset[Any] = frozenset({"a peer"})
        self._grew = trio.Event()

    async def publish(self, topic: str, data: bytes) -> None:
        assert topic == TOPIC
        self.sent.append(Sent(trio.current_time(), decode_announcement(data)))
        self._grew.set()
        self._grew = trio.Event()

    def mesh_peers(self, topic: str) -> frozenset[ID]:
        return self.mesh

    def subscribers(self, topic: str) -> frozenset[ID]:
        return frozenset()

    async def wait_for(self, count: int) -> None:
        while len(self.sent) < count:
            await self._grew.wait()

    @property
    def sequences(self) -> list[int]:
        return [s.announcement.sequence for s in self.sent]


@asynccontextmanager
async def running_agent(
    path: Path, key: bytes, content: ContentOf, gossip: FakeGossip, interval: float = 2.0
) -> AsyncIterator[tuple[BackupAgent, AsyncBackupStore]]:
    me = Signer(key).address
    state = user_state(me)
    path.mkdir(parents=True, exist_ok=True)
    async with open_backup_store(path / BACKUP_FILE, me, DOMAIN) as store:
        agent = BackupAgent(
            private_key=key,
            domain=DOMAIN,
            store=store,
            served=ServedBlocks(store),
            gossip=gossip,
            topic=TOPIC,
            state=lambda: state,
            snapshot=await store.load(),
            interval=interval,
            content=content,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            yield agent, store
            nursery.cancel_scope.cancel()


def balance_in(key: bytes, sealed: bytes, announcement: Announcement) -> int:
    content = open_backup(backup_key(key), sealed, announcement, DOMAIN)
    return content.channels[0].state.balance_user.eth


async def test_changes_within_the_interval_make_one_announcement(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    content = Versions()
    gossip = FakeGossip()
    async with running_agent(tmp_path, content.key, content, gossip) as (agent, store):
        await gossip.wait_for(1)  # on start: nothing was announced yet
        first = gossip.sent[0]
        assert first.announcement.sequence == 1
        for version in range(2, 7):
            content.version = version
            agent.mark_changed()
            await trio.sleep(0.2)
        await gossip.wait_for(2)
        await trio.sleep(30)
        assert gossip.sequences == [1, 2]
        second = gossip.sent[1]
        assert 2.0 <= second.at - first.at < 2.0 + URGENT_GAP
        sealed = await read_backup(store.get, second.announcement)
        assert balance_in(content.key, sealed, second.announcement) == 6


async def test_urgent_change_is_announced_at_once(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    content = Versions()
    gossip = FakeGossip()
    async with running_agent(tmp_path, content.key, content, gossip) as (agent, _):
        await gossip.wait_for(1)
        await trio.sleep(0.3)
        content.version = 2
        agent.mark_changed(urgent=True)
        marked = trio.current_time()
        await gossip.wait_for(2)
        assert gossip.sent[1].at - marked <= URGENT_GAP
        assert gossip.sent[1].at - gossip.sent[0].at < 2.0


async def test_urgent_changes_in_a_row_are_spaced_by_the_urgent_gap(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    content = Versions()
    gossip = FakeGossip()
    async with running_agent(tmp_path, content.key, content, gossip) as (agent, store):
        await gossip.wait_for(1)
        for version in range(2, 22):  # 20 urgent changes over 2 s
            content.version = version
            agent.mark_changed(urgent=True)
            await trio.sleep(0.1)
        deadline = time.monotonic() + STEP  # real time: see `until`
        while True:  # until the last change is out
            last = gossip.sent[-1].announcement
            try:
                if balance_in(content.key, await read_backup(store.get, last), last) == 21:
                    break
            except (AssertionError, BlockMissing):  # replaced while read: blocks unpinned
                pass
            assert time.monotonic() < deadline, "the last change never announced"
            await trio.sleep(0.01)
        times = [sent.at for sent in gossip.sent]
        assert all(later - earlier >= URGENT_GAP for earlier, later in pairwise(times))
        assert len(times) <= 1 + 2.0 / URGENT_GAP + 1


def _transition(
    state: roles.NodeState,
    *,
    channels: Iterable[Address] = (),
    threads: Iterable[ThreadKey] = (),
    removed: Iterable[ThreadKey] = (),
) -> roles.NodeTransition:
    return roles.NodeTransition(
        state, (), frozenset(channels), frozenset(threads), frozenset(removed), False
    )


async def test_commit_hook_tells_urgent_changes(tmp_path: Path, autojump_clock: MockClock) -> None:
    content = Versions()
    me = content.address
    gossip = FakeGossip()
    state = user_state(me)
    side = state.channels[me]
    pending = SignedChannelState(
        replace(side.latest.state, pending_deposit_user=Assets(5, 0)), None, None
    )
    with_pending = replace(state, channels={me: replace(side, latest=pending)})
    thread = ThreadKey(me, Signer(_key()).address, 7)
    async with running_agent(tmp_path, content.key, content, gossip) as (agent, _):
        await gossip.wait_for(1)
        await trio.sleep(0.5)
        # A commit that changed no channel or thread is not even looked at.
        content.version = 2
        agent.notify(_transition(state))
        assert not agent.dirty
        await trio.sleep(30)
        assert gossip.sequences == [1]
        # The interval is over: a plain change goes out at once, the next one waits.
        agent.notify(_transition(state, threads=[thread]))
        assert agent.dirty and not agent.urgent
        await gossip.wait_for(2)
        await trio.sleep(0.2)
        content.version = 3
        agent.notify(_transition(state, threads=[thread]))
        await gossip.wait_for(3)
        assert gossip.sent[2].at - gossip.sent[1].at >= 2.0
        # A channel state with a pending deposit is urgent ...
        await trio.sleep(0.2)
        content.version = 4
        agent.notify(_transition(with_pending, channels=[me]))
        assert agent.urgent
        marked = trio.current_time()
        await gossip.wait_for(4)
        assert gossip.sent[3].at - marked <= URGENT_GAP
        # ... once: the same latest state again is a plain change.
        await trio.sleep(0.2)
        agent.notify(_transition(with_pending, channels=[me]))
        assert agent.dirty and not agent.urgent
        # A thread closing is urgent.
        content.version = 5
        agent.notify(_transition(state, removed=[thread]))
        assert agent.urgent
        marked = trio.current_time()
        await gossip.wait_for(5)
        assert gossip.sent[4].at - marked <= URGENT_GAP
        # A channel state with fewer threads than the one before (how a hub sees a close).
        with_one, with_none = (
            replace(
                state,
                channels={
                    me: replace(
                        side,
                        latest=SignedChannelState(
                            replace(side.latest.state, thread_count=n, tx_count_global=9 - n),
                            None,
                            None,
                        ),
                    )
                },
            )
            for n in (1, 0)
        )
        await trio.sleep(0.2)
        agent.notify(_transition(with_one, channels=[me]))
        assert agent.dirty and not agent.urgent
        content.version = 6
        agent.notify(_transition(with_none, channels=[me]))
        assert agent.urgent
        marked = trio.current_time()
        await gossip.wait_for(6)
        assert gossip.sent[5].at - marked <= URGENT_GAP
        assert gossip.sequences == [1, 2, 3, 4, 5, 6]


async def test_nothing_new_is_not_announced(tmp_path: Path, autojump_clock: MockClock) -> None:
    content = Versions()
    gossip = FakeGossip()
    async with running_agent(tmp_path, content.key, content, gossip) as (agent, _):
        await gossip.wait_for(1)
        agent.mark_changed(urgent=True)  # but the content is the same
        await until(lambda: agent.skipped == 1, "the agent looked")
        await trio.sleep(30)
        assert gossip.sequences == [1]
    key = _key()
    empty = FakeGossip()
    async with running_agent(tmp_path / "empty", key, nothing(key), empty) as (agent, _):
        await until(lambda: agent.skipped == 1, "the agent looked")
        await trio.sleep(30)
        assert empty.sent == [] and agent.sequence == 0


async def test_final_announces_what_is_left(tmp_path: Path) -> None:
    content = Versions()
    gossip = FakeGossip()
    with trio.fail_after(STEP):
        async with running_agent(tmp_path, content.key, content, gossip, interval=60) as (
            agent,
            _,
        ):
            await gossip.wait_for(1)
            content.version = 2
            agent.mark_changed()
            await trio.sleep(0.1)
            assert gossip.sequences == [1]  # waiting out the interval
            start = trio.current_time()
            await agent.final(timeout=3.0)
            assert gossip.sequences == [1, 2]
            assert trio.current_time() - start < 1.0
            await agent.final(timeout=3.0)  # nothing changed since
            assert gossip.sequences == [1, 2]


async def test_sequence_survives_a_restart_and_only_increases(tmp_path: Path) -> None:
    content = Versions()
    me = content.address
    gossip = FakeGossip()
    with trio.fail_after(STEP):
        async with running_agent(tmp_path, content.key, content, gossip) as (agent, store):
            await gossip.wait_for(1)
            for version in (2, 3):
                content.version = version
                agent.mark_changed(urgent=True)
                await gossip.wait_for(version)
            assert gossip.sequences == [1, 2, 3]
            last = gossip.sent[-1].announcement
            # Only the last backup's blocks stay pinned.
            assert await store.pinned(me) == await cids_of(store.get, last)
            assert await store.block_count() == len(await store.pinned(me))

        again = FakeGossip()
        async with running_agent(tmp_path, content.key, content, again) as (agent, store):
            assert agent.sequence == 3 and agent.own == last
            await until(lambda: agent.skipped == 1, "the agent looked")
            assert again.sent == []  # the stored backup is the current state
            content.version = 4
            agent.mark_changed(urgent=True)
            await again.wait_for(1)
            assert again.sequences == [4]
            with pytest.raises(BackupStoreError, match="not above"):
                await store.commit_own(last, bytes(32), {})
            # One of ours with a higher sequence was seen (made before a data loss): the next
            # goes above it, though the content did not change.
            agent.observe_sequence(9)
            await again.wait_for(2)
            assert again.sequences == [4, 10]
            newest = again.sent[-1].announcement
            assert balance_in(content.key, await read_backup(store.get, newest), newest) == 4
            assert await store.get(last.root_cid) is None  # unpinned


def test_thread_peers_and_fitting_the_table() -> None:
    me, peer, other = (Signer(_key()).address for _ in range(3))
    state = user_state(me)
    initial = ThreadState(3, me, peer, Assets(10, 0), Assets(0, 0), 0)
    side = th.ThreadSide(DOMAIN, me, initial, th.ThreadPhase.OPEN, None, None, -1, -1)
    state = replace(state, threads={initial.key: side})
    assert thread_peers(state) == {peer}

    def replica(owner: Address, priority: Priority, tick: int) -> Replica:
        announcement = make_announcement(
            Signer(HUB_KEY), DOMAIN, 1, cid_of(owner.raw), 1000
        )  # the owner field is all the table looks at
        announcement = replace(announcement, owner=owner)
        return Replica(announcement, priority, tick, stored_bytes(1000))

    kept = (
        replica(peer, Priority.THREAD_PEER, 1),
        replica(other, Priority.OTHER, 3),
        replica(HUB, Priority.OTHER, 2),
    )
    table, dropped = fit_table(me, 2, 10**6, kept, 3)
    assert dropped == (HUB,)  # lowest rank: OTHER, least recent
    assert {r.owner for r in table.replicas} == {peer, other}
    table, dropped = fit_table(me, 5, stored_bytes(1000), kept, 3)
    assert set(dropped) == {other, HUB}


async def test_a_peer_counts_once_however_often_it_reads() -> None:
    """The block service tells `ServedBlocks` which peer it sent a block to: B fetching the
    watched block again and again counts once, C once more; other blocks do not count."""
    served = ServedBlocks(MemoryBlockStore())
    with trio.fail_after(30):
        async with (
            open_host(_key()) as a,
            open_host(_key()) as b,
            open_host(_key()) as c,
            open_block_service(a, served) as server,
            open_block_service(b) as bs,
            open_block_service(c) as cs,
        ):
            watched = await server.pin(b"the last block of a backup")
            other = await server.pin(b"another block")
            served.watch(watched)
            await b.connect(a.peer_id, a.listen_addrs)
            await c.connect(a.peer_id, a.listen_addrs)
            for _ in range(3):
                assert await bs.fetch([watched, other], a.peer_id, timeout=STEP)
            await until(lambda: served.served(watched) >= 1, "B counted")
            await cs.fetch_one(watched, a.peer_id, timeout=STEP)
            with trio.fail_after(STEP):
                await served.wait_served(watched, lambda n: n >= 2)
            await wait_all_tasks_blocked()
            assert served.served(watched) == 2
            assert served.served(other) == 0
            served.watch(other)  # a new watch counts afresh
            assert served.served(other) == 0 and served.served(watched) == 0
            await cs.fetch_one(other, a.peer_id, timeout=STEP)
            await until(lambda: served.served(other) == 1, "C counted for the new block")


# ---------------------------------------------------------------- the keeper (real hosts)


class CountingStore(MemoryBlockStore):
    """The announcer's blocks, with a count of reads by CID (each read serves the block)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[bytes] = Counter()

    async def get(self, cid: bytes) -> bytes | None:
        self.reads[cid] += 1
        return await super().get(cid)


@dataclass
class Announcer:
    host: Host
    gossip: GossipService
    blocks: BlockService
    store: CountingStore

    async def offer(self, announcement: Announcement | bytes, blocks: dict[bytes, bytes]) -> None:
        for cid, data in blocks.items():
            await self.store.put(cid, data)
        data = (
            announcement if isinstance(announcement, bytes) else encode_announcement(announcement)
        )
        await self.gossip.publish(TOPIC, data)


class HangingStore(CountingStore):
    """Serves the blocks pinned; asked for any other, never answers (a hostile peer)."""

    async def get(self, cid: bytes) -> bytes | None:
        data = await super().get(cid)
        if data is None:
            await trio.sleep_forever()
        return data


FAST_GOSSIP = GossipConfig(max_messages_per_topic_per_second=10_000)
"""No spam limit in the way of a test publishing hundreds of announcements."""


@asynccontextmanager
async def announcer(
    store: CountingStore | None = None, config: GossipConfig | None = None
) -> AsyncIterator[Announcer]:
    store = store if store is not None else CountingStore()
    async with (
        open_host(_key()) as host,
        open_gossip(host, config) as gossip,
        open_block_service(host, store) as blocks,
    ):
        await gossip.subscribe(TOPIC, lambda data: Verdict.ACCEPT)
        yield Announcer(host, gossip, blocks, store)


@asynccontextmanager
async def backup_node(
    path: Path,
    key: bytes | None = None,
    settings: BackupSettings | None = None,
    content: ContentOf | None = None,
    state: roles.NodeState | None = None,
) -> AsyncIterator[tuple[Host, BackupService]]:
    key = key or _key()
    me = Signer(key).address
    node_state = state or user_state(me)
    async with (
        open_host(key) as host,
        open_backups(
            host,
            key,
            DOMAIN,
            path,
            lambda: node_state,
            settings,
            content=content or nothing(key),
        ) as service,
    ):
        yield host, service


async def link(a: Host, ga: GossipService, b: Host, gb: GossipService) -> None:
    """Connect `b` to `a` and wait until each is in the other's mesh."""
    await b.connect(a.peer_id, a.listen_addrs)
    await ga.wait_for_mesh(TOPIC, b.peer_id, STEP)
    await gb.wait_for_mesh(TOPIC, a.peer_id, STEP)


def held(service: BackupService, owner: Address) -> Announcement | None:
    replica = service.keeper.table.get(owner)
    return None if replica is None else replica.announcement


def held_sequence(service: BackupService, owner: Address) -> int | None:
    announcement = held(service, owner)
    return None if announcement is None else announcement.sequence


async def test_keeper_keeps_valid_backups_and_refuses_the_rest(tmp_path: Path) -> None:
    owner = Versions()
    settings = BackupSettings(max_bytes=64 * 1024, fetch_deadline=2.0)
    with trio.fail_after(60):
        async with announcer() as an, backup_node(tmp_path, settings=settings) as (host, node):
            await link(an.host, an.gossip, host, node.gossip)
            ann2, blocks2 = owner.pack(2)
            await an.offer(ann2, blocks2)
            await until(lambda: held(node, owner.address) == ann2, "backup 2 kept")
            assert await node.store.pinned(owner.address) == set(blocks2)
            replica = node.keeper.table.get(owner.address)
            assert replica is not None and replica.priority is Priority.OTHER

            ann1, blocks1 = owner.pack(1)  # an older one, replayed
            owner.version = 9
            ann2b, blocks2b = owner.pack(2)  # the same sequence, other blocks
            ann3, _ = owner.pack(3)
            forger = Signer(_key())
            forged = replace(
                ann3,
                signature=forger.sign_digest(
                    announcement_digest(DOMAIN, owner.address, 3, ann3.root_cid, ann3.size)
                ),
            )
            oversized = make_announcement(
                owner.user, DOMAIN, 4, ann3.root_cid, MAX_SEALED_BYTES + 1
            )
            other = Versions()
            no_room = make_announcement(other.user, DOMAIN, 1, cid_of(b"big"), 100_000)
            await an.offer(ann1, blocks1)
            await an.offer(ann2b, blocks2b)
            await an.offer(forged, {})
            await an.offer(oversized, {})
            await an.offer(no_room, {})
            await an.offer(b"\x93\x01\x03 not an announcement", {})
            ann5, blocks5 = owner.pack(5)
            await an.offer(ann5, blocks5)

            await until(lambda: held(node, owner.address) == ann5, "backup 5 kept")
            await until(
                lambda: (node.keeper.rejected, node.keeper.ignored) == (3, 3),
                "every announcement judged",
            )
            # Nothing of the refused ones was fetched, and backup 2's blocks were dropped.
            for cid in (*blocks1, *blocks2b, *blocks2, no_room.root_cid, ann3.root_cid):
                assert an.store.reads[cid] == 0 or cid in blocks2
                assert await node.store.get(cid) is None
            assert await node.store.pinned(owner.address) == set(blocks5)
            assert node.keeper.failed == 0 and held(node, other.address) is None
            sealed = await read_backup(node.store.get, ann5)
            assert balance_in(owner.key, sealed, ann5) == 9
            with pytest.raises(DecryptionFailed):  # only the owner can read it
                open_backup(backup_key(_key()), sealed, ann5, DOMAIN)


async def test_tampered_block_is_not_pinned(tmp_path: Path) -> None:
    owner = Versions()
    settings = BackupSettings(fetch_deadline=1.0)
    with trio.fail_after(60):
        async with announcer() as an, backup_node(tmp_path, settings=settings) as (host, node):
            await link(an.host, an.gossip, host, node.gossip)
            announcement, blocks = owner.pack(1)
            (child,) = (cid for cid in blocks if cid != announcement.root_cid)
            tampered = dict(blocks)
            tampered[child] = bytes([blocks[child][0] ^ 1]) + blocks[child][1:]
            await an.offer(announcement, tampered)  # the wrong bytes under the child's CID
            await until(lambda: node.keeper.failed == 1, "the fetch given up")
            assert an.store.reads[child] >= 1
            assert held(node, owner.address) is None
            for cid in blocks:
                assert await node.store.get(cid) is None
            assert await node.store.block_count() == 0


async def test_replicas_survive_a_restart(tmp_path: Path) -> None:
    owner = Versions()
    key = _key()
    with trio.fail_after(60):
        async with announcer() as an:
            async with backup_node(tmp_path, key) as (host, node):
                await link(an.host, an.gossip, host, node.gossip)
                announcement, blocks = owner.pack(4)
                await an.offer(announcement, blocks)
                await until(lambda: held(node, owner.address) == announcement, "backup kept")

            async with backup_node(tmp_path, key) as (host, node):
                assert held(node, owner.address) == announcement
                await host.connect(an.host.peer_id, an.host.listen_addrs)
                for cid in blocks:
                    await an.store.delete(cid)
                assert await an.blocks.fetch(list(blocks), host.peer_id) == blocks
                answer = await request_latest_announcement(an.host, host.peer_id, owner.address)
                assert answer is not None and decode_announcement(answer) == announcement
                nobody = Signer(_key()).address
                assert await request_latest_announcement(an.host, host.peer_id, nobody) is None
                # An older sequence still loses after the restart.
                older, older_blocks = owner.pack(3)
                await an.gossip.wait_for_mesh(TOPIC, host.peer_id, STEP)
                await an.offer(older, older_blocks)
                await until(lambda: node.keeper.ignored == 1, "the replay judged")
                assert held(node, owner.address) == announcement


async def test_announcements_reach_peers_that_come_later_and_the_last_before_stopping(
    tmp_path: Path,
) -> None:
    content = Versions()
    slow = BackupSettings(interval=60.0)
    with trio.fail_after(60):
        async with backup_node(tmp_path / "keeper") as (kh, keeper):
            async with backup_node(tmp_path / "owner", content.key, slow, content) as (oh, owner):
                # Announced before any peer was there: announced again once one is.
                await until(lambda: owner.agent.published >= 1, "first announcement")
                await link(kh, keeper.gossip, oh, owner.gossip)
                await until(lambda: held_sequence(keeper, content.address) == 1, "backup 1 kept")
                content.version = 2
                owner.agent.mark_changed()  # not urgent: waits out the 60 s
                await trio.sleep(0.3)
                assert held_sequence(keeper, content.address) == 1
                with trio.fail_after(owner.settings.final_timeout + 1):
                    await owner.final()
                # The owner waited until its peer read the last block.
                answer = await request_latest_announcement(kh, oh.peer_id, content.address)
                assert answer is not None and decode_announcement(answer).sequence == 2
            await until(
                lambda: held_sequence(keeper, content.address) == 2, "backup 2 kept", timeout=2.0
            )
            kept = held(keeper, content.address)
            assert kept is not None
            sealed = await read_backup(keeper.store.get, kept)
            assert balance_in(content.key, sealed, kept) == 2


async def test_thread_peers_rank_first(tmp_path: Path) -> None:
    owner = Versions()
    stranger = Versions()
    key = _key()
    me = Signer(key).address
    initial = ThreadState(1, me, owner.address, Assets(10, 0), Assets(0, 0), 0)
    side = th.ThreadSide(DOMAIN, me, initial, th.ThreadPhase.OPEN, None, None, -1, -1)
    state = replace(user_state(me), threads={initial.key: side})
    settings = BackupSettings(max_owners=1)
    with trio.fail_after(60):
        async with (
            announcer() as an,
            backup_node(tmp_path, key, settings, state=state) as (
                host,
                node,
            ),
        ):
            await link(an.host, an.gossip, host, node.gossip)
            first, blocks = stranger.pack(1)
            await an.offer(first, blocks)
            await until(lambda: held(node, stranger.address) == first, "the stranger's kept")
            mine, blocks = owner.pack(1)
            await an.offer(mine, blocks)
            await until(lambda: held(node, owner.address) == mine, "the thread peer's kept")
            assert held(node, stranger.address) is None  # evicted: one owner only
            replica = node.keeper.table.get(owner.address)
            assert replica is not None and replica.priority is Priority.THREAD_PEER
            later, blocks = stranger.pack(2)  # an OTHER cannot evict a thread peer
            await an.offer(later, blocks)
            await until(lambda: node.keeper.ignored == 1, "the stranger's ignored")
            assert held(node, owner.address) == mine


def thread_peer_state(me: Address, peer: Address) -> roles.NodeState:
    """A user's state with one open thread to `peer`."""
    initial = ThreadState(1, me, peer, Assets(10, 0), Assets(0, 0), 0)
    side = th.ThreadSide(DOMAIN, me, initial, th.ThreadPhase.OPEN, None, None, -1, -1)
    return replace(user_state(me), threads={initial.key: side})


def fake_announcement() -> Announcement:
    """A correctly signed announcement, from a fresh key, of blocks that exist nowhere."""
    return make_announcement(Signer(_key()), DOMAIN, 1, cid_of(os.urandom(16)), 1000)


async def test_thread_peer_is_kept_while_fakes_fill_the_pending_table(tmp_path: Path) -> None:
    """A peer announces more fakes than `MAX_PENDING_OWNERS` and never answers for their
    blocks: the others' fetch slots are all taken and the pending table is full. A thread
    peer's backup still displaces a pending fake and is kept at once (its fetch does not
    wait behind the fakes'); more fakes are dropped, not queued."""
    owner = Versions()
    key = _key()
    extra = 8
    settings = BackupSettings(fetch_deadline=300.0, gossip=FAST_GOSSIP)
    state = thread_peer_state(Signer(key).address, owner.address)
    with trio.fail_after(120):
        async with (
            announcer(HangingStore(), FAST_GOSSIP) as an,
            backup_node(tmp_path, key, settings, state=state) as (host, node),
        ):
            await link(an.host, an.gossip, host, node.gossip)
            keeper = node.keeper
            fakes = [fake_announcement() for _ in range(MAX_PENDING_OWNERS + extra)]
            for start in range(0, len(fakes), 100):
                for fake in fakes[start : start + 100]:
                    await an.offer(fake, {})
                sent = min(start + 100, len(fakes))
                await until(lambda sent=sent: sum(keeper.heard.values()) >= sent, f"{sent} heard")
            await until(lambda: keeper.dropped == extra, "the fakes past the table dropped")
            assert len(keeper.pending) == MAX_PENDING_OWNERS
            assert keeper.kept == keeper.failed == 0

            mine, blocks = owner.pack(1)
            await an.offer(mine, blocks)
            await until(lambda: held(node, owner.address) == mine, "the thread peer's kept")
            replica = keeper.table.get(owner.address)
            assert replica is not None and replica.priority is Priority.THREAD_PEER
            assert keeper.dropped == extra + 1  # one fake displaced
            assert len(keeper.pending) == MAX_PENDING_OWNERS - 1
            assert owner.address not in keeper.pending
            assert keeper.failed == 0

            for _ in range(2):  # the first takes the free place; an OTHER displaces nobody
                await an.offer(fake_announcement(), {})
            await until(lambda: keeper.dropped == extra + 2, "a late fake dropped")
            assert len(keeper.pending) == MAX_PENDING_OWNERS


async def test_backup_nobody_has_is_given_up_early(tmp_path: Path) -> None:
    """Blocks every peer says (DontHave) it lacks: the fetch is given up long before its
    deadline (`denied`), and the backup is no longer pending. Blocks that turn up within
    `DENIED_GRACE` of the first DontHave (a relay still fetching them) are still fetched."""
    owner, late = Versions(), Versions()
    settings = BackupSettings(fetch_deadline=300.0)
    with trio.fail_after(60):
        async with announcer() as an, backup_node(tmp_path, settings=settings) as (host, node):
            await link(an.host, an.gossip, host, node.gossip)
            keeper = node.keeper
            announcement, _ = owner.pack(1)
            await an.offer(announcement, {})
            await until(lambda: keeper.failed == 1, "the fetch given up", timeout=2 * STEP)
            assert keeper.denied == 1
            assert an.store.reads[announcement.root_cid] >= 4  # asked again meanwhile
            assert owner.address not in keeper.pending
            assert held(node, owner.address) is None

            announcement, blocks = late.pack(1)
            await an.offer(announcement, {})
            # two rounds of DontHave (each asks the announcer twice), then the blocks
            await until(lambda: an.store.reads[announcement.root_cid] >= 4, "DontHaves")
            for cid, data in blocks.items():
                await an.store.put(cid, data)
            await until(lambda: held(node, late.address) == announcement, "the late one kept")
            assert (keeper.failed, keeper.denied) == (1, 1)


async def test_a_backup_of_the_maximum_size_is_kept(tmp_path: Path) -> None:
    """A backup of MAX_SEALED_BYTES (65 children of up to 256 KiB) is fetched whole and
    kept, within the serving peer's cap on one answer."""
    owner = Versions()
    root_cid, blocks = to_blocks(os.urandom(MAX_SEALED_BYTES))
    announcement = make_announcement(owner.user, DOMAIN, 1, root_cid, MAX_SEALED_BYTES)
    with trio.fail_after(90):
        async with announcer() as an, backup_node(tmp_path) as (host, node):
            await link(an.host, an.gossip, host, node.gossip)
            await an.offer(announcement, blocks)
            await until(lambda: held(node, owner.address) == announcement, "kept", timeout=4 * STEP)
            assert await node.store.pinned(owner.address) == set(blocks)
            assert node.keeper.failed == 0


# ---------------------------------------------------------------- settings


def test_backup_settings_in_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(_key().hex())
    base = {
        "key_file": "key",
        "data_dir": "data",
        "role": "hub",
        "chain_url": "http://127.0.0.1:8545",
        "manager": "0x" + "c0" * 20,
    }

    def load(**extra: object) -> RunConfig:
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**base, **extra}))
        return load_config(path)

    defaults = load().settings
    assert (defaults.backups, defaults.backup_interval) == (True, 2.0)
    assert (defaults.replica_max_owners, defaults.replica_max_bytes) == (64, 64 * 1024 * 1024)
    settings = load(
        backups=False, backup_interval=0.5, replica_max_owners=3, replica_max_bytes=10**6
    ).settings
    assert (settings.backups, settings.backup_interval) == (False, 0.5)
    assert (settings.replica_max_owners, settings.replica_max_bytes) == (3, 10**6)
    for bad in (
        {"backups": "yes"},
        {"backup_interval": 0},
        {"backup_interval": "2"},
        {"replica_max_owners": -1},
        {"replica_max_bytes": 1.5},
    ):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            load(**bad)


def test_backup_store_pins_blocks_per_owner_and_belongs_to_one_node(tmp_path: Path) -> None:
    me, x, y = Versions(), Versions(), Versions()
    path = tmp_path / BACKUP_FILE
    store = BackupStore(path, me.address, DOMAIN)
    try:
        ann_x, blocks = x.pack(1)
        # Anyone may announce any root: y's backup is the very blocks of x's.
        ann_y = make_announcement(y.user, DOMAIN, 1, ann_x.root_cid, ann_x.size)
        for tick, announcement in enumerate((ann_x, ann_y), 1):
            replica = Replica(announcement, Priority.OTHER, tick, stored_bytes(announcement.size))
            store.commit_replica(replica, blocks, (), tick)
        store.drop_replicas([x.address])
        assert store.get_block(ann_x.root_cid) == blocks[ann_x.root_cid]  # y still pins it
        assert [r.owner for r in store.load().replicas] == [y.address]
        store.drop_replicas([y.address])
        assert store.block_count() == 0
        snapshot = store.load()
        assert (snapshot.replicas, snapshot.tick, snapshot.sequence) == ((), 2, 0)
    finally:
        store.close()
    with pytest.raises(BackupStoreError, match="another node"):
        BackupStore(path, x.address, DOMAIN)
    with pytest.raises(BackupStoreError, match="another node"):
        BackupStore(path, me.address, Domain(1, DOMAIN.verifying_contract))
