"""Gossip backups in a running node (issue 6): the backup agent and the replica keeper.

`open_backups(...)` runs, on the node's libp2p host, everything a node does for backups and
yields a `BackupService`:

- the **backup agent** (`BackupAgent`): after commits that change the node's channels or
  threads it builds `protocols.recovery.backup_content(state, sequence)`, seals it
  (`protocols.backup.pack_backup` with `backup_key(private key)` and a fresh random nonce),
  pins the blocks (and unpins the previous backup's in the same transaction), persists the
  sequence and only then publishes the signed announcement on the topic
  `/weft/backup/1/<chain id>/<manager, 0x lower hex>` (`backup_topic`). Announcements are
  debounced: at most one per `interval` seconds, except that a thread closing, or a
  channel state with pending deposits or withdrawals, is announced at once (at most one
  per `URGENT_GAP`). Content equal to the last announced (`fingerprint`) is not announced
  again, nor is an empty one. `final()` makes the last announcement of a clean stop and
  waits, bounded, until the directly connected subscribers have fetched it: as many
  distinct peers as there were subscribers were sent its last block (`ServedBlocks`
  counts a peer once, however often it asks).
- the **replica keeper** (`ReplicaKeeper`): validates announcements on the topic (REJECT:
  malformed, bad signature, over `MAX_SEALED_BYTES`; IGNORE: our own, not newer than the
  kept one, or no room, per `protocols.backup.offer`), fetches the accepted backups' blocks
  (from the announcing peer if connected, else from any connected peer, retrying with
  back-off for `fetch_deadline` seconds since a relay may not hold them yet), checks
  them (CIDs, sizes: `from_blocks`), pins them and evicts per the replica policy. Owners we
  share a thread with rank `THREAD_PEER`, others `OTHER`. Announcements cost nothing to
  make, so fake ones (blocks that exist nowhere) must not crowd out thread peers': a
  fetch is given up once every peer asked has said (DontHave) for `DENIED_GRACE` (5 s)
  that it lacks the blocks; thread peers' fetches have slots of their own
  (`MAX_THREAD_PEER_FETCHES`, 2, besides the `MAX_FETCHES`, 4, of the others); and with
  `MAX_PENDING_OWNERS` (256) owners pending, a thread peer's announcement displaces the
  oldest pending OTHER one, while an OTHER one is dropped (`ReplicaKeeper.dropped`).
- the block service (bitswap, `node.gossip`) serves every pinned block, and
  `/weft/backup/1` answers with the latest announcement held for an owner (ours included).

Everything is kept in `backups.sqlite` (`node.backup_store`). Nothing here runs on the
engine task: the engine's commit hook (`BackupService.notify`) only sets flags; building,
sealing and hashing run in a worker thread. A failure in backups is logged and never stops
the node.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

import trio
from libp2p.peer.id import ID

from node.backup_store import (
    AsyncBackupStore,
    BackupSnapshot,
    BackupStoreError,
    open_backup_store,
)
from node.gossip import (
    BlockError,
    BlockMismatch,
    BlockService,
    BlockStore,
    BlockUnavailable,
    GossipConfig,
    GossipError,
    GossipService,
    GossipSubscription,
    Verdict,
    open_block_service,
    open_gossip,
    serve_backup_requests,
)
from node.host import Host, HostError
from protocols import roles
from protocols.backup import (
    MAX_SEALED_BYTES,
    Announcement,
    BackupContent,
    BackupError,
    BlockMissing,
    OfferOutcome,
    Priority,
    Replica,
    ReplicaTable,
    SizeMismatch,
    backup_key,
    check_announcement,
    decode_announcement,
    decode_root,
    encode_announcement,
    encode_content,
    from_blocks,
    offer,
    pack_backup,
    parse_root,
)
from protocols.channel import SignedChannelState
from protocols.eip712 import Domain
from protocols.recovery import backup_content
from protocols.signing import Signer
from protocols.types import Address

if TYPE_CHECKING:
    from trio_typing import TaskStatus

__all__ = [
    "BACKUP_FILE",
    "DEFAULT_INTERVAL",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_OWNERS",
    "BackupAgent",
    "BackupService",
    "BackupSettings",
    "ReplicaKeeper",
    "ServedBlocks",
    "backup_topic",
    "content_fingerprint",
    "fit_table",
    "open_backups",
    "thread_peers",
]

log = logging.getLogger("weft.backup")

BACKUP_FILE: Final = "backups.sqlite"
TOPIC_PREFIX: Final = "/weft/backup/1"
DEFAULT_INTERVAL: Final = 2.0
DEFAULT_MAX_OWNERS: Final = 64
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
URGENT_GAP: Final = 0.5
"""Seconds between two announcements at least, urgent ones included (a burst of thread
closes on a hub makes one announcement, not one each)."""
FINAL_TIMEOUT: Final = 3.0
"""Seconds the last announcement of a clean stop may take, peers fetching it included."""
FETCH_DEADLINE: Final = 30.0
"""Seconds the keeper keeps trying to get an accepted backup's blocks."""
FETCH_RETRY_MIN: Final = 0.05
FETCH_RETRY_MAX: Final = 2.0
PEER_TIMEOUT: Final = 5.0
"""Seconds one peer may take to answer a block request."""
MAX_FETCHES: Final = 4
"""Backups of different OTHER owners fetched at the same time."""
MAX_THREAD_PEER_FETCHES: Final = 2
"""Backups of different thread peers fetched at the same time, in slots of their own: they
never wait behind fetches of others' backups."""
MAX_PENDING_OWNERS: Final = 256
"""Owners whose accepted announcements wait for their blocks; beyond it newcomers are
dropped until some finish, except that a thread peer's displaces the oldest pending
OTHER one."""
DENIED_GRACE: Final = 5.0
"""Seconds a backup's blocks may be denied by every peer asked (all answer DontHave; a relay
may still be fetching them) before the keeper gives up on it, deadline or not."""
MAX_COUNTED_READERS: Final = 1024
"""Peers counted as having read the watched block (`ServedBlocks`); more count as many."""
MAX_HEARD_OWNERS: Final = 4096
REPUBLISH_POLL: Final = 0.1
"""Seconds between checks for a mesh when an announcement went out to no peer."""
VERIFY_IN_THREAD_BYTES: Final = 1024 * 1024
"""Backups above this size are verified in a worker thread."""


def backup_topic(domain: Domain) -> str:
    """The gossipsub topic of the backups of one ChannelManager on one chain."""
    return f"{TOPIC_PREFIX}/{domain.chain_id}/0x{domain.verifying_contract.raw.hex()}"


def content_fingerprint(content_bytes: bytes) -> bytes:
    """sha256 of a content's encoding with sequence 0: equal for equal states."""
    return hashlib.sha256(content_bytes).digest()


def thread_peers(state: roles.NodeState) -> frozenset[Address]:
    """Everyone this node shares a thread with: its thread peers, and (a hub) the parties
    of the threads open in its channels."""
    peers = {side.peer for side in state.threads.values()}
    for channel in state.channels.values():
        for signed in channel.threads:
            peers.add(signed.state.sender)
            peers.add(signed.state.receiver)
    peers.discard(state.config.me)
    return frozenset(peers)


def fit_table(
    me: Address, max_owners: int, max_bytes: int, replicas: tuple[Replica, ...], tick: int
) -> tuple[ReplicaTable, tuple[Address, ...]]:
    """The replica table of `replicas` within the bounds, and the owners dropped to fit
    (lowest rank first), e.g. after the bounds were lowered."""
    kept: list[Replica] = []
    total = 0
    dropped: list[Address] = []
    for replica in sorted(replicas, key=lambda r: r.rank, reverse=True):
        if replica.owner == me or len(kept) >= max_owners or total + replica.stored > max_bytes:
            dropped.append(replica.owner)
            continue
        kept.append(replica)
        total += replica.stored
    kept.sort(key=lambda r: r.owner)
    return ReplicaTable(me, max_owners, max_bytes, tuple(kept), tick), tuple(dropped)


@dataclass(frozen=True, slots=True)
class BackupSettings:
    """How a node backs up and keeps backups (see node.api.NodeSettings)."""

    interval: float = DEFAULT_INTERVAL
    max_owners: int = DEFAULT_MAX_OWNERS
    max_bytes: int = DEFAULT_MAX_BYTES
    fetch_deadline: float = FETCH_DEADLINE
    final_timeout: float = FINAL_TIMEOUT
    gossip: GossipConfig = field(default_factory=GossipConfig)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.interval) and self.interval > 0):
            raise ValueError("backup interval must be a positive number of seconds")
        if self.max_owners < 0 or self.max_bytes < 0:
            raise ValueError("replica bounds must not be negative")
        if self.fetch_deadline <= 0 or self.final_timeout < 0:
            raise ValueError("fetch_deadline must be positive, final_timeout not negative")


# ---------------------------------------------------------------- serving


class ServedBlocks:
    """The node's `BlockStore`: the backup store, with the latest own backup held in
    memory too, counting the peers a watched block was sent to (a `ServeWatcher`: the
    block service reports each block it sent, and to whom), so that a stopping node can
    wait until its last backup was fetched. A peer counts once, however often it reads."""

    def __init__(self, store: BlockStore) -> None:
        self._store = store
        self._watched: bytes | None = None
        self._readers: set[Address] = set()
        self._changed = trio.Event()
        self._held: dict[bytes, bytes] = {}

    def hold(self, blocks: dict[bytes, bytes]) -> None:
        """Keep `blocks` (the latest own backup, just pinned in the store) in memory too:
        every peer fetches them right after the announcement."""
        self._held = blocks

    def watch(self, cid: bytes) -> None:
        """Count the peers sent `cid` from now on (and stop counting every other block)."""
        self._watched = cid
        self._readers = set()

    @property
    def watched(self) -> bytes | None:
        """The block being counted, if any."""
        return self._watched

    def served(self, cid: bytes) -> int:
        """How many peers were sent `cid` since it was watched (0 if it is not)."""
        return len(self._readers) if cid == self._watched else 0

    async def wait_served(self, cid: bytes, enough: Callable[[int], bool]) -> None:
        """Wait until `enough(peers sent cid)` holds (re-checked on every new one)."""
        while not enough(self.served(cid)):
            await self._changed.wait()

    def poke(self) -> None:
        """Wake `wait_served` to check again (e.g. a peer left)."""
        self._changed.set()
        self._changed = trio.Event()

    def block_served(self, cid: bytes, peer: Address) -> None:
        """The block service sent `cid` to `peer` (`node.gossip.ServeWatcher`)."""
        if cid != self._watched or peer in self._readers:
            return
        if len(self._readers) >= MAX_COUNTED_READERS:
            return
        self._readers.add(peer)
        self.poke()

    async def get(self, cid: bytes) -> bytes | None:
        data = self._held.get(cid)
        if data is None:
            data = await self._store.get(cid)
        return data

    async def put(self, cid: bytes, data: bytes) -> None:
        await self._store.put(cid, data)

    async def delete(self, cid: bytes) -> None:
        await self._store.delete(cid)


ContentOf = Callable[[roles.NodeState, int], BackupContent]
"""What to back up of a state, as backup number `sequence` (`protocols.recovery`)."""


class Gossip(Protocol):
    """What the agent needs of `node.gossip.GossipService` (tests give a fake)."""

    async def publish(self, topic: str, data: bytes) -> None: ...

    def mesh_peers(self, topic: str) -> frozenset[ID]: ...

    def subscribers(self, topic: str) -> frozenset[ID]: ...


# ---------------------------------------------------------------- the agent


@dataclass(frozen=True, slots=True)
class _Packed:
    announcement: Announcement
    fingerprint: bytes
    blocks: dict[bytes, bytes]
    last_cid: bytes  # the last child: read last when a peer fetches the backup


class BackupAgent:
    """Backs up the node's state after it changes; see the module docstring.

    `state()` gives the engine's current state. `notify` (the engine's commit hook) and
    `mark_changed` say what changed; `run` announces; `final` announces what is left.
    """

    def __init__(
        self,
        *,
        private_key: bytes,
        domain: Domain,
        store: AsyncBackupStore,
        served: ServedBlocks,
        gossip: Gossip,
        topic: str,
        state: Callable[[], roles.NodeState],
        snapshot: BackupSnapshot,
        interval: float = DEFAULT_INTERVAL,
        content: ContentOf = backup_content,
    ) -> None:
        self._content = content
        self._signer = Signer(private_key)  # its own: used in worker threads
        self._key = backup_key(private_key)
        self.domain = domain
        self.address = self._signer.address
        self._store = store
        self._served = served
        self._gossip = gossip
        self.topic = topic
        self._state = state
        self.interval = interval
        self.sequence = snapshot.sequence
        """The last sequence used (published, or at least persisted)."""
        self.own = snapshot.own
        """The announcement of the last own backup."""
        self._fingerprint = snapshot.fingerprint
        self._floor = snapshot.sequence  # highest own sequence known, seen on gossip too
        self._force = False
        self._dirty = True  # on start: announce unless the stored backup is current
        self._urgent = False
        self._unheard = False  # the last announcement reached no peer: send it again
        self._wake = trio.Event()
        self._lock = trio.Lock()
        self._last_latest: dict[Address, SignedChannelState] = {}
        self.published = 0
        """Announcements handed to gossip (republications included)."""
        self.skipped = 0
        """Times the state was looked at but nothing new was there to announce."""
        self.last_published_at: float | None = None
        self._watch_target = 0  # subscribers when the last backup was announced

    @property
    def dirty(self) -> bool:
        """A change waits to be looked at."""
        return self._dirty

    @property
    def urgent(self) -> bool:
        """The waiting change is to be announced without waiting the interval."""
        return self._urgent

    # -- what changed (called on the engine task: flags only)

    def notify(self, transition: roles.NodeTransition) -> None:
        """The engine committed `transition`: note whether the backup content may have
        changed, and whether it is urgent (a thread closed, or a channel state with
        pending deposits or withdrawals was signed). Quick: flags only."""
        if not (
            transition.changed_channels or transition.changed_threads or transition.removed_threads
        ):
            return
        urgent = bool(transition.removed_threads) or any(
            isinstance(e, roles.EventThreadClosed) for e in transition.effects
        )
        channels = transition.state.channels
        for user in transition.changed_channels:
            side = channels.get(user)
            if side is None:
                continue
            latest = side.latest
            previous = self._last_latest.get(user)
            if previous is latest:
                continue
            self._last_latest[user] = latest
            s = latest.state
            pending = not (
                s.pending_deposit_user.is_zero()
                and s.pending_deposit_hub.is_zero()
                and s.pending_withdrawal_user.is_zero()
                and s.pending_withdrawal_hub.is_zero()
            )
            # A hub sees a thread close as a channel state with fewer threads.
            closed = previous is not None and s.thread_count < previous.state.thread_count
            urgent = urgent or pending or closed
        self.mark_changed(urgent=urgent)

    def mark_changed(self, *, urgent: bool = False) -> None:
        """The state may have changed; `urgent`: announce without waiting the interval."""
        self._dirty = True
        self._urgent = self._urgent or urgent
        self._wake.set()

    def observe_sequence(self, sequence: int) -> None:
        """An announcement of ours with `sequence` was seen (e.g. made before a data loss):
        the next one goes above it, even if our content did not change."""
        if sequence >= self._floor:
            self._floor = sequence
            if sequence >= self.sequence:
                self._force = True
                self.mark_changed(urgent=True)

    async def _changed(self) -> None:
        await self._wake.wait()
        self._wake = trio.Event()

    # -- the loop

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Announce as the state changes until cancelled (see the module docstring)."""
        task_status.started()
        last = -math.inf
        while True:
            while not self._dirty:
                if self._unheard:
                    with trio.move_on_after(REPUBLISH_POLL):
                        await self._changed()
                    await self._republish_if_heard()
                else:
                    await self._changed()
            while True:
                due = last + (URGENT_GAP if self._urgent else self.interval)
                if trio.current_time() >= due:
                    break
                with trio.move_on_at(due):
                    await self._changed()
            self._dirty = self._urgent = False
            try:
                if await self.announce():
                    last = trio.current_time()
            except Exception:
                log.exception("backup failed; trying again in %s s", self.interval)
                self._dirty = True
                last = trio.current_time()

    async def announce(self) -> bool:
        """Back up the current state now if it differs from the last backup; return True if
        an announcement was published. Raises `BackupStoreError` if it cannot be stored."""
        async with self._lock:
            state = self._state()
            sequence = max(self.sequence, self._floor) + 1
            fingerprint = None if self._force else self._fingerprint
            packed = await trio.to_thread.run_sync(self._pack, state, sequence, fingerprint)
            if packed is None:
                self.skipped += 1
                return False
            await self._store.commit_own(packed.announcement, packed.fingerprint, packed.blocks)
            self.sequence = sequence
            self.own = packed.announcement
            self._fingerprint = packed.fingerprint
            self._force = False
            self._served.hold(packed.blocks)
            self._served.watch(packed.last_cid)
            self._watch_target = len(self._gossip.subscribers(self.topic))
            await self._publish(packed.announcement)
            return True

    def _pack(
        self, state: roles.NodeState, sequence: int, previous: bytes | None
    ) -> _Packed | None:
        """In a worker thread: the sealed backup of `state`, or None if it is empty or its
        content is the one last announced."""
        content = self._content(state, sequence)
        if not content.channels and not content.threads:
            return None
        fingerprint = content_fingerprint(encode_content(replace(content, sequence=0)))
        if fingerprint == previous:
            return None
        announcement, blocks = pack_backup(self._key, os.urandom(12), content, self._signer)
        last_cid = decode_root(blocks[announcement.root_cid]).children[-1]
        return _Packed(announcement, fingerprint, blocks, last_cid)

    async def _publish(self, announcement: Announcement) -> None:
        heard = bool(self._gossip.mesh_peers(self.topic))
        try:
            await self._gossip.publish(self.topic, encode_announcement(announcement))
        except GossipError as exc:
            log.warning("backup %d not announced: %s", announcement.sequence, exc)
            heard = False
        else:
            self.published += 1
            self.last_published_at = trio.current_time()
        self._unheard = not heard
        if heard:
            log.debug("backup %d announced", announcement.sequence)

    async def _republish_if_heard(self) -> None:
        if self.own is None or not self._gossip.mesh_peers(self.topic):
            return
        async with self._lock:
            if self._unheard and self.own is not None:
                log.info("announcing backup %d again: a peer is there now", self.own.sequence)
                self._watch_target = len(self._gossip.subscribers(self.topic))
                await self._publish(self.own)

    async def final(self, timeout: float = FINAL_TIMEOUT) -> None:
        """Before a clean stop: announce what changed since the last announcement, then
        wait until the subscribers connected at that time (still connected) fetched the
        last backup; all within `timeout` seconds, shielded from cancellation. Errors are
        logged."""
        with trio.CancelScope(shield=True), trio.move_on_after(timeout) as scope:
            try:
                if self._dirty or self._force:
                    self._dirty = False
                    await self.announce()
                if self._unheard and self.own is not None:
                    while not self._gossip.mesh_peers(self.topic):
                        await trio.sleep(REPUBLISH_POLL)
                    await self._republish_if_heard()
                await self._wait_fetched()
            except Exception:
                log.exception("the last backup before stopping failed")
        if scope.cancelled_caught:
            log.info("stopping before every peer fetched the last backup")

    async def _wait_fetched(self) -> None:
        own = self.own
        if own is None:
            return
        served = self._served
        cid = served.watched
        if cid is None or self._watch_target == 0:
            return

        def enough(count: int) -> bool:
            connected = len(self._gossip.subscribers(self.topic))
            return count >= min(self._watch_target, connected)

        async with trio.open_nursery() as nursery:

            async def poke() -> None:  # subscribers leave without a read
                while True:
                    await trio.sleep(REPUBLISH_POLL)
                    served.poke()

            nursery.start_soon(poke)
            await served.wait_served(cid, enough)
            await trio.sleep(0.05)  # the read happens just before the write
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- the keeper


class _FetchFailed(Exception):
    """An accepted backup could not be had (or was superseded); nothing was pinned.
    `denied`: given up early, every peer asked having said it lacks the blocks."""

    def __init__(self, message: str, *, denied: bool = False) -> None:
        super().__init__(message)
        self.denied = denied


class ReplicaKeeper:
    """Keeps the latest backups of other owners; see the module docstring."""

    def __init__(
        self,
        *,
        host: Host,
        domain: Domain,
        store: AsyncBackupStore,
        blocks: BlockService,
        table: ReplicaTable,
        state: Callable[[], roles.NodeState],
        own: Callable[[], Announcement | None],
        observe_own: Callable[[int], None] = lambda sequence: None,
        fetch_deadline: float = FETCH_DEADLINE,
    ) -> None:
        self._host = host
        self.domain = domain
        self.me = table.me
        self._store = store
        self._blocks = blocks
        self.table = table
        self._state = state
        self._own = own
        self._observe_own = observe_own
        self.fetch_deadline = fetch_deadline
        self._wanted: dict[Address, tuple[Announcement, ID]] = {}
        self._workers: dict[Address, trio.CancelScope] = {}
        self._fetch_slots = trio.Semaphore(MAX_FETCHES)
        self._thread_peer_slots = trio.Semaphore(MAX_THREAD_PEER_FETCHES)
        self._commit_lock = trio.Lock()
        self._peers_of: tuple[object, frozenset[Address]] = (None, frozenset())
        self.heard: dict[Address, int] = {}
        """Valid announcements validated, by owner (before the replica policy)."""
        self.rejected = 0
        self.ignored = 0
        self.kept = 0
        self.failed = 0
        """Accepted backups not kept: blocks not had (or bad) by the deadline, or denied."""
        self.denied = 0
        """Of `failed`: given up before the deadline, every peer asked lacking the blocks
        for `DENIED_GRACE` seconds."""
        self.dropped = 0
        """Accepted announcements not fetched: `MAX_PENDING_OWNERS` owners were pending
        (an OTHER one, or a thread peer's with no OTHER to displace), or displaced."""
        self.kept_at: dict[Address, float] = {}
        """When each owner's current replica was pinned (trio time)."""

    # -- policy

    def priority(self, owner: Address) -> Priority:
        state = self._state()
        cached_state, peers = self._peers_of
        if cached_state is not state:
            peers = thread_peers(state)
            self._peers_of = (state, peers)
        return Priority.THREAD_PEER if owner in peers else Priority.OTHER

    def validate(self, data: bytes) -> Verdict:
        """The gossip validator of the backup topic (synchronous, quick)."""
        try:
            announcement = decode_announcement(data)
            check_announcement(announcement, self.domain, MAX_SEALED_BYTES)
        except BackupError as exc:
            log.info("rejecting a backup announcement: %s", exc)
            self.rejected += 1
            return Verdict.REJECT
        owner = announcement.owner
        if owner in self.heard or len(self.heard) < MAX_HEARD_OWNERS:
            self.heard[owner] = self.heard.get(owner, 0) + 1
        if owner == self.me:
            self._observe_own(announcement.sequence)
            self.ignored += 1
            return Verdict.IGNORE
        pending = self._wanted.get(owner)
        if pending is not None and pending[0].sequence >= announcement.sequence:
            self.ignored += 1
            return Verdict.IGNORE
        outcome = offer(self.table, announcement, self.priority(owner)).outcome
        if outcome in (OfferOutcome.ADMITTED, OfferOutcome.REPLACED):
            return Verdict.ACCEPT
        self.ignored += 1
        return Verdict.IGNORE

    async def latest(self, owner: Address) -> bytes | None:
        """The latest announcement held for `owner` (ours included), for /weft/backup/1."""
        if owner == self.me:
            own = self._own()
            return None if own is None else encode_announcement(own)
        replica = self.table.get(owner)
        return None if replica is None else encode_announcement(replica.announcement)

    # -- the loop

    async def run(
        self,
        subscription: GossipSubscription,
        *,
        task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Take accepted announcements from `subscription` and keep their backups, until
        cancelled or the subscription ends."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for message in subscription:
                try:
                    announcement = decode_announcement(message.data)
                except BackupError:  # validated already; kept for totality
                    continue
                self.want(announcement, message.origin, nursery)

    @property
    def pending(self) -> frozenset[Address]:
        """The owners whose accepted announcements wait for their blocks."""
        return frozenset(self._wanted)

    def want(self, announcement: Announcement, origin: ID, nursery: trio.Nursery) -> None:
        """Get and keep `announcement`'s backup (asking `origin` first), unless a newer
        one of its owner is already wanted. With `MAX_PENDING_OWNERS` owners pending, a
        newcomer is dropped, unless it is a thread peer and an OTHER owner is pending: the
        oldest such is then dropped instead (its fetch cancelled)."""
        owner = announcement.owner
        pending = self._wanted.get(owner)
        if pending is not None and pending[0].sequence >= announcement.sequence:
            return
        if pending is None and len(self._wanted) >= MAX_PENDING_OWNERS:
            self.dropped += 1
            victim = None
            if self.priority(owner) is Priority.THREAD_PEER:
                victim = next((o for o in self._wanted if self.priority(o) is Priority.OTHER), None)
            if victim is None:
                log.info("too many backups being fetched; dropping %s's", owner)
                return
            log.info("too many backups being fetched; dropping %s's for %s's", victim, owner)
            del self._wanted[victim]
            scope = self._workers.pop(victim, None)
            if scope is not None:
                scope.cancel()
        self._wanted[owner] = (announcement, origin)
        if owner not in self._workers:
            scope = trio.CancelScope()
            self._workers[owner] = scope
            nursery.start_soon(self._keep_owner, owner, scope)

    async def _keep_owner(self, owner: Address, scope: trio.CancelScope) -> None:
        """Keep the backups wanted of `owner` in turn, until none is left; `scope` is
        cancelled when the owner is displaced from the pending table."""
        try:
            with scope:
                while True:
                    pending = self._wanted.get(owner)
                    if pending is None:
                        return
                    announcement, origin = pending
                    if self.priority(owner) is Priority.THREAD_PEER:
                        slots = self._thread_peer_slots
                    else:
                        slots = self._fetch_slots
                    async with slots:
                        try:
                            await self._keep(announcement, origin)
                        except Exception:
                            log.exception("keeping the backup of %s failed", owner)
                            self.failed += 1
                    if self._wanted.get(owner, (None,))[0] is announcement:
                        del self._wanted[owner]
                        return
        finally:
            if self._workers.get(owner) is scope:
                del self._workers[owner]

    def _superseded(self, announcement: Announcement) -> bool:
        pending = self._wanted.get(announcement.owner)
        return pending is not None and pending[0] is not announcement

    async def _keep(self, announcement: Announcement, origin: ID) -> None:
        owner = announcement.owner
        if offer(self.table, announcement, self.priority(owner)).outcome not in (
            OfferOutcome.ADMITTED,
            OfferOutcome.REPLACED,
        ):
            return
        try:
            blocks = await self._fetch(announcement, origin)
        except _FetchFailed as exc:
            if not self._superseded(announcement):
                log.info("backup %d of %s not kept: %s", announcement.sequence, owner, exc)
                self.failed += 1
                if exc.denied:
                    self.denied += 1
            return
        # Shielded: a worker displaced (cancelled) mid-commit must leave the table and the
        # store in step.
        with trio.CancelScope(shield=True):
            async with self._commit_lock:
                update = offer(self.table, announcement, self.priority(owner))
                if update.outcome not in (OfferOutcome.ADMITTED, OfferOutcome.REPLACED):
                    return
                kept = update.table.get(owner)
                assert kept is not None
                evicted = tuple(a.owner for a in update.evict)
                await self._store.commit_replica(kept, blocks, evicted, update.table.tick)
                self.table = update.table
        self.kept += 1
        self.kept_at[owner] = trio.current_time()
        for gone in evicted:
            if gone != owner:
                self.kept_at.pop(gone, None)
        log.debug("keeping backup %d of %s", announcement.sequence, owner)

    async def _fetch(self, announcement: Announcement, origin: ID) -> dict[bytes, bytes]:
        """Every block of `announcement`'s backup, checked. Retries transient failures
        with back-off until `fetch_deadline`, or until every peer asked has kept saying
        it lacks the blocks for `DENIED_GRACE` seconds; raises `_FetchFailed`."""
        now = trio.current_time()
        deadline = now + self.fetch_deadline
        denied_since: float | None = None  # every attempt since then: all peers lacked
        delay = FETCH_RETRY_MIN
        bad: set[ID] = set()
        while True:
            try:
                return await self._fetch_once(announcement, origin, bad)
            except BlockUnavailable as exc:
                problem: Exception = exc
                denied = exc.every_peer_lacks
            except (BlockError, HostError, BlockMissing) as exc:
                problem, denied = exc, False
            except BackupError as exc:  # the owner announced something broken
                raise _FetchFailed(str(exc)) from exc
            if self._superseded(announcement):
                raise _FetchFailed("a newer backup was announced")
            now = trio.current_time()
            if not denied:
                denied_since = None
            elif denied_since is None:
                denied_since = now
            elif now - denied_since >= DENIED_GRACE:
                raise _FetchFailed(
                    f"every peer lacks the blocks, for {DENIED_GRACE} s: {problem}", denied=True
                )
            if now + delay > deadline:
                raise _FetchFailed(f"gave up after {self.fetch_deadline} s: {problem}")
            log.debug("blocks of %s not there yet (%s); again in %s s", origin, problem, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, FETCH_RETRY_MAX)

    async def _fetch_once(
        self, announcement: Announcement, origin: ID, bad: set[ID]
    ) -> dict[bytes, bytes]:
        root_cid = announcement.root_cid
        got = await self._get([root_cid], origin, bad)
        root = parse_root(root_cid, got[root_cid])
        if root.total_size != announcement.size:
            raise SizeMismatch(f"root says {root.total_size} bytes, announced {announcement.size}")
        blocks = {root_cid: got[root_cid]}
        blocks.update(await self._get(list(root.children), origin, bad))

        def verify() -> None:
            from_blocks(root_cid, blocks.get, announcement.size)

        if announcement.size > VERIFY_IN_THREAD_BYTES:
            await trio.to_thread.run_sync(verify)
        else:
            verify()
        return blocks

    async def _get(self, cids: list[bytes], origin: ID, bad: set[ID]) -> dict[bytes, bytes]:
        found: dict[bytes, bytes] = {}
        if origin not in bad and origin != self._host.peer_id and self._host.is_connected(origin):
            try:
                found = await self._blocks.fetch(cids, origin, timeout=PEER_TIMEOUT)
            except BlockMismatch as exc:
                log.info("%s sent blocks that do not match: %s", origin, exc)
                bad.add(origin)
            except (BlockError, HostError) as exc:
                log.debug("%s did not give the blocks: %s", origin, exc)
        missing = [c for c in cids if c not in found]
        if missing:
            found.update(
                await self._blocks.fetch(
                    missing, None, timeout=PEER_TIMEOUT * 2, peer_timeout=PEER_TIMEOUT
                )
            )
        return found


# ---------------------------------------------------------------- the service


class BackupService:
    """The backups of a running node; obtain one from `open_backups`."""

    def __init__(
        self,
        agent: BackupAgent,
        keeper: ReplicaKeeper,
        gossip: GossipService,
        blocks: BlockService,
        store: AsyncBackupStore,
        subscription: GossipSubscription,
        settings: BackupSettings,
    ) -> None:
        self.agent = agent
        self.keeper = keeper
        self.gossip = gossip
        self.blocks = blocks
        self.store = store
        self.subscription = subscription
        self.settings = settings
        self.topic = agent.topic

    def notify(self, transition: roles.NodeTransition) -> None:
        """The engine's commit hook: cheap, never blocks."""
        self.agent.notify(transition)

    async def final(self) -> None:
        """The last announcement of a clean stop (bounded by `settings.final_timeout`)."""
        await self.agent.final(self.settings.final_timeout)

    def replicas(self) -> Mapping[Address, Announcement]:
        """The backups kept for other owners, by owner."""
        return {r.owner: r.announcement for r in self.keeper.table.replicas}


@asynccontextmanager
async def open_backups(
    host: Host,
    private_key: bytes,
    domain: Domain,
    data_dir: Path,
    state: Callable[[], roles.NodeState],
    settings: BackupSettings | None = None,
    content: ContentOf = backup_content,
    *,
    floor: int = 0,
) -> AsyncIterator[BackupService]:
    """Run the backup agent, the replica keeper and their network services on `host` (a
    running host whose key is `private_key`) until the block exits; see the module
    docstring. `state()` gives the node's current state, `content` what of it to back up.
    `floor`: a sequence the node's backups may have reached without `backups.sqlite`
    knowing (it was lost); if it is above the last recorded one, the state is announced at
    once, above it.

    Raises `BackupStoreError` if `data_dir/backups.sqlite` cannot be used, `GossipError` if
    gossip cannot start. On exit the tasks stop, the protocols refuse new streams and the
    store is closed; nothing is announced (call `BackupService.final` first for that).
    """
    settings = settings or BackupSettings()
    me = host.address
    topic = backup_topic(domain)
    data_dir.mkdir(parents=True, exist_ok=True)
    async with open_backup_store(data_dir / BACKUP_FILE, me, domain) as store:
        snapshot = await store.load()
        table, dropped = fit_table(
            me, settings.max_owners, settings.max_bytes, snapshot.replicas, snapshot.tick
        )
        if dropped:
            log.info("dropping %d replicas over the configured bounds", len(dropped))
            await store.drop_replicas(dropped)
        served = ServedBlocks(store)
        async with (
            open_gossip(host, settings.gossip) as gossip,
            open_block_service(host, served) as blocks,
        ):
            agent = BackupAgent(
                private_key=private_key,
                domain=domain,
                store=store,
                served=served,
                gossip=gossip,
                topic=topic,
                state=state,
                snapshot=snapshot,
                interval=settings.interval,
                content=content,
            )
            if floor > snapshot.sequence:
                log.info("no record of my backups: announcing above sequence %d", floor)
                agent.observe_sequence(floor)
            keeper = ReplicaKeeper(
                host=host,
                domain=domain,
                store=store,
                blocks=blocks,
                table=table,
                state=state,
                own=lambda: agent.own,
                observe_own=agent.observe_sequence,
                fetch_deadline=settings.fetch_deadline,
            )
            async with serve_backup_requests(host, keeper.latest):
                subscription = await gossip.subscribe(topic, keeper.validate)
                service = BackupService(
                    agent, keeper, gossip, blocks, store, subscription, settings
                )
                async with trio.open_nursery() as nursery:
                    await nursery.start(_guarded, "backup agent", agent.run)
                    await nursery.start(_guarded, "replica keeper", keeper.run, subscription)
                    try:
                        yield service
                    finally:
                        nursery.cancel_scope.cancel()


async def _guarded(
    what: str,
    run: Callable[..., object],
    *args: object,
    task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a backup task; if it fails, log it and let the node go on without it."""
    try:
        await run(*args, task_status=task_status)  # type: ignore[misc]
    except (BackupStoreError, GossipError, Exception):
        log.exception("the %s stopped", what)
