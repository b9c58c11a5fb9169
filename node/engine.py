"""The engine: the one task that owns a node's state.

Every input (a local request, a batch of peer messages, chain progress) goes through
`protocols.roles.node_steps`; the changed channels and threads, the coordination and the
on-chain effects are committed to the store in one transaction, and only then are the
effects performed (DESIGN.md, durability rule): messages handed to the peer manager,
transactions queued for the chain task, events passed to the API.

Inputs that arrive together are stepped together and committed once (group commit): a
burst of 100 payment proposals costs one fsync and leaves in one write.

Store layout (values are `node.state_codec` encodings):

    identity                 (address, domain, role): a store serves one node only
    channel/<user hex>       ChannelSide
    thread/<sender>/<receiver>/<id>  ThreadSide
    coordination             Coordination
    chain/cursor             next block to read
    record/<user hex>        the contract's ChannelRecord of that channel
and, in the outbox table, the ContractSendAuthorizedUpdate effects not yet performed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from node import state_codec
from node.store import AsyncStore, Batch, Snapshot
from protocols import channel as ch
from protocols import roles
from protocols import thread as th
from protocols.effects import Send
from protocols.messages import Message
from protocols.onchain import ChannelRecord
from protocols.signing import Signer
from protocols.types import Address, ThreadKey

if TYPE_CHECKING:
    # The trio stubs that libp2p brings in (trio-typing) keep TaskStatus there.
    from trio_typing import TaskStatus

log = logging.getLogger("weft.engine")

MAX_BATCH = 1024  # inputs stepped and committed together
INBOX_SIZE = 4096
INLINE_COMMIT_MAX = 2  # inputs in a batch committed without a worker thread (light load)

IDENTITY_KEY = "identity"
COORDINATION_KEY = "coordination"
CURSOR_KEY = "chain/cursor"


class EngineError(Exception):
    """The store does not belong to this node, or holds what this node cannot read."""


def channel_key(user: Address) -> str:
    return f"channel/{user.raw.hex()}"


def thread_key(key: ThreadKey) -> str:
    return f"thread/{key.sender.raw.hex()}/{key.receiver.raw.hex()}/{key.thread_id}"


def record_key(user: Address) -> str:
    return f"record/{user.raw.hex()}"


@dataclass(frozen=True, slots=True)
class Loaded:
    """What a node finds in its store when it starts."""

    state: roles.NodeState
    cursor: int | None
    records: dict[Address, ChannelRecord]
    outbox: tuple[tuple[int, ch.ContractSendAuthorizedUpdate], ...]
    fresh: bool


def load(snapshot: Snapshot, config: roles.NodeConfig) -> Loaded:
    """The node state in `snapshot`, or a new node's if the store is empty.

    Raises `EngineError` if the store belongs to another key, contract or role, or holds a
    value that does not decode.
    """
    identity = (config.me, config.domain, config.role)
    states = snapshot.states

    def decoded(key: str, raw: bytes) -> object:
        try:
            return state_codec.decode(raw)
        except state_codec.CodecError as exc:
            raise EngineError(f"store entry {key!r} is unreadable: {exc}") from exc

    if IDENTITY_KEY not in states:
        if states or snapshot.outbox:
            raise EngineError("store has state but no identity")
        return Loaded(roles.new_node(config), None, {}, (), True)
    stored = decoded(IDENTITY_KEY, states[IDENTITY_KEY])
    if stored != identity:
        raise EngineError("store belongs to another node (address, contract, chain or role differ)")
    new = roles.new_node(config)
    channels = dict(new.channels)
    threads = {}
    records: dict[Address, ChannelRecord] = {}
    coordination = roles.Coordination()
    cursor: int | None = None
    for key, raw in states.items():
        value = decoded(key, raw)
        if key.startswith("channel/") and isinstance(value, ch.ChannelSide):
            channels[value.user] = value
        elif key.startswith("thread/") and isinstance(value, th.ThreadSide):
            threads[value.key] = value
        elif key.startswith("record/") and isinstance(value, tuple) and len(value) == 2:
            user, record = value
            if isinstance(user, Address) and isinstance(record, ChannelRecord):
                records[user] = record
        elif key == COORDINATION_KEY and isinstance(value, roles.Coordination):
            coordination = value
        elif key == CURSOR_KEY and type(value) is int:
            cursor = value
        elif key != IDENTITY_KEY:
            raise EngineError(f"store entry {key!r} holds an unexpected {type(value).__name__}")
    outbox = []
    for seq, raw in snapshot.outbox:
        effect = decoded(f"outbox {seq}", raw)
        if not isinstance(effect, ch.ContractSendAuthorizedUpdate):
            raise EngineError(f"outbox entry {seq} holds an unexpected {type(effect).__name__}")
        outbox.append((seq, effect))
    state = roles.NodeState(config, channels, threads, coordination)
    return Loaded(state, cursor, records, tuple(outbox), False)


# ---------------------------------------------------------------- inbox items


@dataclass(frozen=True, slots=True)
class ChainProgress:
    """Chain inputs to step, and the watcher's position to persist with them."""

    inputs: tuple[roles.NodeInput, ...]
    cursor: int
    records: tuple[tuple[Address, ChannelRecord], ...]
    committed: trio.Event = field(compare=False)


@dataclass(frozen=True, slots=True)
class OutboxDone:
    """The on-chain effect stored under `seq` was performed (mined, or failed for good)."""

    seq: int


InboxItem = roles.NodeInput | tuple[roles.NodeInput, ...] | ChainProgress | OutboxDone


class Engine:
    """Owns the node state; `submit` feeds it, `run` steps, commits and performs."""

    def __init__(
        self,
        signer: Signer,
        loaded: Loaded,
        store: AsyncStore,
        send: Callable[[Address, Message], None],
        submit_onchain: Callable[[int, ch.ContractSendAuthorizedUpdate], None],
        on_event: Callable[[object], None],
        *,
        relaxed_commits: bool = False,
    ) -> None:
        self.signer = signer
        self.state = loaded.state
        self.store = store
        self._send = send
        self._submit_onchain = submit_onchain
        self._on_event = on_event
        self._inbox_send, self._inbox = trio.open_memory_channel[InboxItem](INBOX_SIZE)
        self._identity_written = not loaded.fresh
        self.relaxed_commits = relaxed_commits
        # Called with every transition once it is committed and its effects performed (the
        # backup agent's hook: it must be quick and must not raise).
        self.on_commit: Callable[[roles.NodeTransition], None] | None = None
        self.steps = 0
        self.commits = 0

    # -- feeding

    async def submit(self, item: InboxItem) -> None:
        """Queue an input (waits while the inbox is full: backpressure)."""
        await self._inbox_send.send(item)

    def submit_nowait(self, item: InboxItem) -> None:
        """Queue an input now; raises trio.WouldBlock if the inbox is full."""
        self._inbox_send.send_nowait(item)

    # -- the loop

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            items = [await self._inbox.receive()]
            while len(items) < MAX_BATCH:
                try:
                    items.append(self._inbox.receive_nowait())
                except trio.WouldBlock:
                    break
            await self._apply(items)

    async def _apply(self, items: list[InboxItem]) -> None:
        inputs: list[roles.NodeInput] = []
        progress: list[ChainProgress] = []
        done: set[int] = set()
        for item in items:
            if isinstance(item, tuple):
                inputs.extend(item)
            elif isinstance(item, ChainProgress):
                inputs.extend(item.inputs)
                progress.append(item)
            elif isinstance(item, OutboxDone):
                done.add(item.seq)
            else:
                inputs.append(item)
        transition = self._step(inputs)
        puts: dict[str, bytes] = {}
        if not self._identity_written:
            config = self.state.config
            puts[IDENTITY_KEY] = state_codec.encode((config.me, config.domain, config.role))
        new = transition.state
        for user in transition.changed_channels:
            puts[channel_key(user)] = state_codec.encode(new.channels[user])
        for key in transition.changed_threads:
            puts[thread_key(key)] = state_codec.encode(new.threads[key])
        if transition.coordination_changed:
            puts[COORDINATION_KEY] = state_codec.encode(new.coordination)
        for p in progress:
            puts[CURSOR_KEY] = state_codec.encode(p.cursor)
            for user, record in p.records:
                puts[record_key(user)] = state_codec.encode((user, record))
        onchain = [e for e in transition.effects if isinstance(e, ch.ContractSendAuthorizedUpdate)]
        batch = Batch(
            puts=puts,
            deletes=frozenset(thread_key(k) for k in transition.removed_threads),
            outbox_add=tuple(state_codec.encode(e) for e in onchain),
            outbox_done=frozenset(done),
        )
        if puts or batch.deletes or batch.outbox_add or batch.outbox_done:
            # Durable (fsynced) before anything leaves the node. With relaxed commits, one
            # that only records what peers already hold (e.g. a countersignature received)
            # does not wait for the disk: after a power loss the peer's resync brings it back.
            durable = (
                not self.relaxed_commits
                or bool(batch.outbox_add or batch.outbox_done)
                or any(isinstance(e, Send) for e in transition.effects)
            )
            inbox_idle = self._inbox.statistics().current_buffer_used == 0
            if len(inputs) <= INLINE_COMMIT_MAX and inbox_idle:
                seqs = self._commit(batch, durable)
            else:
                seqs = await self.store.commit(batch, durable=durable)
            self.commits += 1
        else:
            seqs = ()
        self._identity_written = True
        self.state = new
        self.steps += len(inputs)
        self._perform(transition, seqs, progress)
        if self.on_commit is not None:
            try:
                self.on_commit(transition)
            except Exception:
                log.exception("the commit hook failed")

    def _commit(self, batch: Batch, durable: bool) -> tuple[int, ...]:
        """Commit `batch` in this thread. Under light load (a lone input, nothing queued)
        the engine waits for the fsync anyway, and a worker thread would add ~0.2 ms of
        handoff to each of a payment's three commits. Under load the worker thread wins:
        peer streams keep being read while one batch is fsynced, so the next is bigger."""
        return self.store.sync.commit(batch, durable=durable)

    def _perform(
        self,
        transition: roles.NodeTransition,
        seqs: tuple[int, ...],
        progress: list[ChainProgress],
    ) -> None:
        """Perform the effects of a committed transition (never before the commit)."""
        seq_of = iter(seqs)
        for effect in transition.effects:
            if isinstance(effect, Send):
                self._send(effect.to, effect.message)
            elif isinstance(effect, ch.ContractSendAuthorizedUpdate):
                self._submit_onchain(next(seq_of), effect)
            else:
                self._on_event(effect)
        for p in progress:
            p.committed.set()

    def _step(self, inputs: list[roles.NodeInput]) -> roles.NodeTransition:
        """Step all `inputs`; an input that makes a machine raise is dropped and reported."""
        try:
            return roles.node_steps(self.state, inputs, self.signer)
        except Exception:
            log.exception("a batch of %d inputs failed; stepping them one by one", len(inputs))
        state = self.state
        effects: list[object] = []
        channels: set[Address] = set()
        threads: set[ThreadKey] = set()
        removed: set[ThreadKey] = set()
        coordination = False
        for event in inputs:
            try:
                t = roles.node_step(state, event, self.signer)
            except Exception as exc:
                log.exception("input %s failed and was dropped", type(event).__name__)
                effects.append(EngineInputDropped(type(event).__name__, repr(exc)))
                continue
            state = t.state
            effects.extend(t.effects)
            channels |= t.changed_channels
            threads = (threads | t.changed_threads) - t.removed_threads
            removed = (removed | t.removed_threads) - t.changed_threads
            coordination = coordination or t.coordination_changed
        return roles.NodeTransition(
            state,
            tuple(effects),
            frozenset(channels),
            frozenset(threads),
            frozenset(removed),
            coordination,
        )


@dataclass(frozen=True, slots=True)
class EngineInputDropped:
    """An input made the protocol code raise (a bug); it was dropped, the node goes on."""

    input_type: str
    error: str


def chain_inputs(
    executed: Iterable[tuple[Address, int]], timestamp: int
) -> tuple[roles.NodeInput, ...]:
    """The machine inputs of a chain update: executions first, then the block (SPEC)."""
    inputs: list[roles.NodeInput] = [
        ch.ContractReceiveChannelUpdated(user, n) for user, n in executed
    ]
    inputs.append(ch.ContractReceiveBlock(timestamp))
    return tuple(inputs)
