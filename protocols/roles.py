"""A whole node as one pure machine: its channels, its threads, and its role's coordination.

`node_step(state, input, signer)` routes the input to the channel and thread machines and
runs the coordination that spans them, until nothing is left to do:

- the **hub** locks a thread in the receiver's channel, then in the sender's, and refunds the
  first at the initial state if the second fails; settles a closed thread in both channels;
  collateralizes channels between a floor and a ceiling when a thread open or a routed
  payment lacks collateral; passes hub-routed payments on; confirms the pending updates it
  submitted once the contract executed them, and invalidates timed-out ones;
- a **user** deposits and withdraws in two phases, opens threads (agree with the peer, then
  ask the hub to lock), confirms a thread once its own channel locks it, hands a final
  thread state to the hub and forgets the thread once its channel settled it.

The result is the new state, the effects to perform (`Send`, `ContractSendAuthorizedUpdate`,
events for the API), and which channels and threads changed, so the node persists only
those. Nothing here does I/O; SPEC.md, "Node roles", describes the rules.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from protocols import channel as ch
from protocols import thread as th
from protocols.effects import Receive, Send, Transition
from protocols.eip712 import Domain, channel_state_digest, thread_state_digest
from protocols.messages import (
    ChannelCountersign,
    ChannelProposal,
    ChannelReject,
    ChannelResume,
    ChannelSync,
    ChannelUpdate,
    CollateralNeeded,
    CollateralRequest,
    ErrorNotice,
    Message,
    RejectReason,
    SignedThreadState,
    ThreadCloseNotice,
    ThreadCloseRequest,
    ThreadCountersign,
    ThreadOpenProposal,
    ThreadOpenRefused,
    ThreadOpenRequest,
    ThreadProposal,
    ThreadReject,
    ThreadResume,
    ThreadSync,
    UpdateCloseThread,
    UpdateConfirmPending,
    UpdateInvalidatePending,
    UpdateOpenThread,
    UpdatePayment,
    UpdatePending,
)
from protocols.signing import Signer, is_signed_by
from protocols.types import (
    NO_ASSETS,
    ZERO_ADDRESS,
    Address,
    Assets,
    ChannelState,
    Party,
    ThreadKey,
    ThreadState,
)

DEFAULT_PENDING_TIMEOUT = 900  # seconds from `now` a pending update stays executable
DEFAULT_MAX_CHANNELS = 10_000
UNLIMITED = Assets(2**255, 2**255)  # a policy bound that never binds
MAX_UNLOCKED_THREADS_PER_PEER = 16  # agreed threads a peer may leave unlocked with me
# Nonces (and thread ids) a node restored from a backup counts as possibly used above what the
# backup shows: the backup may be older than the last state it signed (SPEC, Recovery).
RECOVERY_NONCE_GAP = 2**32


# ---------------------------------------------------------------- configuration and state


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """What a node is and the policies it applies.

    `max_lock`: the most of mine a peer's thread open may lock (user). `collateral_floor` /
    `collateral_ceiling`: when the hub collateralizes a channel it tops its balance up to at
    least the floor and never above the ceiling (per asset).
    """

    domain: Domain
    role: Party
    me: Address
    hub: Address
    max_lock: Assets = UNLIMITED
    collateral_floor: Assets = NO_ASSETS
    collateral_ceiling: Assets = UNLIMITED
    pending_timeout: int = DEFAULT_PENDING_TIMEOUT
    max_channels: int = DEFAULT_MAX_CHANNELS
    window: int = th.DEFAULT_WINDOW


class OpKind(Enum):
    DEPOSIT = "deposit"
    WITHDRAW = "withdraw"
    OPEN_THREAD = "open_thread"
    CLOSE_THREAD = "close_thread"
    PAY_VIA_HUB = "pay_via_hub"


@dataclass(frozen=True, slots=True)
class Op:
    """A local request that completes later (`EventOpDone` / `EventOpFailed`)."""

    op_id: int
    kind: OpKind
    update: ChannelUpdate | None = None  # the channel update it proposed, if any
    key: ThreadKey | None = None  # the thread it is about, if any
    tx_count_onchain: int = 0  # the pending update it waits to see executed, once signed


class OpenStage(Enum):
    LOCK_RECEIVER = "lock_receiver"  # UpdateOpenThread proposed in the receiver's channel
    LOCK_SENDER = "lock_sender"  # ... then in the sender's
    REFUND_RECEIVER = "refund_receiver"  # sender's lock failed: close at initial in receiver's


@dataclass(frozen=True, slots=True)
class ThreadOpening:
    """Hub: a thread open in progress."""

    initial: SignedThreadState
    stage: OpenStage
    final: SignedThreadState | None = None  # a close asked for meanwhile: settle once open


@dataclass(frozen=True, slots=True)
class ThreadClosing:
    """Hub: a thread being settled, one channel after the other, at one state.

    `order`: the channels still to settle, the first one's proposal in flight (or refused,
    `waiting` for a later final). The channel of the party that did not ask for the close
    goes first: it refuses a state older than one it holds. Once a channel settled,
    `final` is `fixed`: the other channel settles at the same state, so the hub's total
    over both is what it was.
    """

    final: SignedThreadState
    order: tuple[Address, ...]
    fixed: bool = False
    waiting: bool = False


@dataclass(frozen=True, slots=True)
class Forward:
    """Hub: a routed payment received from `source`, to pay on to `to`."""

    source: Address
    to: Address
    amount: Assets


@dataclass(frozen=True, slots=True)
class Coordination:
    """What spans channels and threads: the role's work in progress."""

    ops: tuple[Op, ...] = ()  # user
    openings: tuple[ThreadOpening, ...] = ()  # hub
    closings: tuple[ThreadClosing, ...] = ()  # hub
    forwards: tuple[Forward, ...] = ()  # hub: waiting for collateral
    # hub: routed payments (and refunds of them) proposed, not yet signed by the payee
    paying: tuple[Forward, ...] = ()
    collateral: tuple[tuple[Address, Assets], ...] = ()  # hub: deposits in flight
    invalidating: frozenset[tuple[Address, int]] = frozenset()  # pending updates undone
    now: int = 0  # the latest block timestamp
    # Confirmations the peer refused because its view of the chain lagged mine: proposed
    # again at the next tick.
    confirm_retry: frozenset[tuple[Address, int]] = frozenset()
    last_thread_id: int = 0  # user: the highest thread id I used as sender
    # Restored from a backup: a channel or thread I learn of may hold states I signed and
    # lost, so it starts awaiting its peer's sync, its nonces `recovery_gap` above.
    recovered: bool = False
    recovery_gap: int = RECOVERY_NONCE_GAP

    def opening(self, key: ThreadKey) -> ThreadOpening | None:
        return next((o for o in self.openings if o.initial.state.key == key), None)

    def closing(self, key: ThreadKey) -> ThreadClosing | None:
        return next((c for c in self.closings if c.final.state.key == key), None)

    def collateral_for(self, user: Address) -> Assets | None:
        return next((a for u, a in self.collateral if u == user), None)


@dataclass(frozen=True, slots=True)
class NodeState:
    """Everything a node knows. Treat the mappings as read-only: steps copy on change."""

    config: NodeConfig
    channels: Mapping[Address, ch.ChannelSide]
    threads: Mapping[ThreadKey, th.ThreadSide]
    coordination: Coordination = field(default_factory=Coordination)

    @property
    def now(self) -> int:
        return self.coordination.now


def new_node(config: NodeConfig) -> NodeState:
    """A node as it starts with nothing signed: a user has its genesis channel, a hub none."""
    channels: dict[Address, ch.ChannelSide] = {}
    if config.role is Party.USER:
        channels[config.me] = ch.new_channel(config.domain, Party.USER, config.hub, config.me)
    return NodeState(config, channels, {})


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class ActionDeposit:
    """User: deposit `amount` into my channel (two-phase; I submit the transaction)."""

    op_id: int
    amount: Assets


@dataclass(frozen=True, slots=True)
class ActionWithdraw:
    """User: withdraw `amount` of my balance to `recipient` (the hub submits)."""

    op_id: int
    amount: Assets
    recipient: Address


@dataclass(frozen=True, slots=True)
class ActionOpenThread:
    """User: open a thread to `peer`, locking `lock_mine` of mine and `lock_peer` of theirs."""

    op_id: int
    peer: Address
    lock_mine: Assets
    lock_peer: Assets


@dataclass(frozen=True, slots=True)
class ActionPayThread:
    """User: pay `amount` over thread `key`; `payment_id` names it in the events."""

    key: ThreadKey
    payment_id: int
    amount: Assets


@dataclass(frozen=True, slots=True)
class ActionCloseThread:
    """User: close thread `key` (`force`: without the peer, at my latest double-signed state)."""

    op_id: int
    key: ThreadKey
    force: bool = False


@dataclass(frozen=True, slots=True)
class ActionPayViaHub:
    """User: pay `amount` to user `to` through the hub (two channel payments)."""

    op_id: int
    to: Address
    amount: Assets


@dataclass(frozen=True, slots=True)
class ActionRequestCollateral:
    """User: ask the hub for collateral of at least `amount` in my channel."""

    op_id: int
    amount: Assets


@dataclass(frozen=True, slots=True)
class ActionCollateralize:
    """Hub: collateralize `user`'s channel so the hub's balance covers `amount` more."""

    user: Address
    amount: Assets


@dataclass(frozen=True, slots=True)
class ActionReclaimCollateral:
    """Hub: move `amount` of my balance in `user`'s channel back to my reserve."""

    user: Address
    amount: Assets


@dataclass(frozen=True, slots=True)
class ActionPeerReconnected:
    """A new stream to `peer` is up: resync every channel and thread shared with it."""

    peer: Address


@dataclass(frozen=True, slots=True)
class ActionPeerUnreachable:
    """`peer` could not be reached: fail the requests that wait for it alone."""

    peer: Address


@dataclass(frozen=True, slots=True)
class ActionTick:
    """Time passed (a node-local timer): retry what waited for a peer to catch up."""


@dataclass(frozen=True, slots=True)
class ContractReceiveTxFailed:
    """The authorized update of `user`'s channel at `tx_count_onchain` was not mined."""

    user: Address
    tx_count_onchain: int
    reason: str


NodeInput = (
    Receive
    | ActionDeposit
    | ActionWithdraw
    | ActionOpenThread
    | ActionPayThread
    | ActionCloseThread
    | ActionPayViaHub
    | ActionRequestCollateral
    | ActionCollateralize
    | ActionReclaimCollateral
    | ActionPeerReconnected
    | ActionPeerUnreachable
    | ch.ContractReceiveChannelUpdated
    | ch.ContractReceiveBlock
    | ContractReceiveTxFailed
    | ActionTick
)


# ---------------------------------------------------------------- events for the API


@dataclass(frozen=True, slots=True)
class EventOpDone:
    op_id: int
    key: ThreadKey | None = None


@dataclass(frozen=True, slots=True)
class EventOpFailed:
    """`missing`: the hub collateral that was lacking (INSUFFICIENT_COLLATERAL), else zero."""

    op_id: int
    reason: RejectReason
    detail: str
    missing: Assets = NO_ASSETS


@dataclass(frozen=True, slots=True)
class EventDepositConfirmed:
    user: Address
    amount: Assets


@dataclass(frozen=True, slots=True)
class EventWithdrawalConfirmed:
    user: Address
    amount: Assets
    recipient: Address


@dataclass(frozen=True, slots=True)
class EventCollateralAdded:
    user: Address
    amount: Assets


@dataclass(frozen=True, slots=True)
class EventCollateralNeeded:
    """The hub lacked `missing` in `user`'s channel for a payment (it is collateralizing)."""

    user: Address
    missing: Assets


@dataclass(frozen=True, slots=True)
class EventThreadOpened:
    initial: SignedThreadState


@dataclass(frozen=True, slots=True)
class EventThreadClosed:
    final: SignedThreadState


@dataclass(frozen=True, slots=True)
class EventHubPaymentReceived:
    """User: the hub paid me `amount` in my channel (a routed payment)."""

    amount: Assets


@dataclass(frozen=True, slots=True)
class EventRejected:
    """Input from `sender` was refused (a peer's bad message, or a local request)."""

    sender: Address
    reason: RejectReason
    detail: str


@dataclass(frozen=True, slots=True)
class NodeTransition:
    """The result of `node_step`: new state, effects in order, what to persist."""

    state: NodeState
    effects: tuple[object, ...]
    changed_channels: frozenset[Address]
    changed_threads: frozenset[ThreadKey]
    removed_threads: frozenset[ThreadKey]
    coordination_changed: bool


# ---------------------------------------------------------------- internal work items


@dataclass(frozen=True, slots=True)
class _ToChannel:
    user: Address
    input: ch.ChannelInput


@dataclass(frozen=True, slots=True)
class _ToThread:
    key: ThreadKey
    input: th.ThreadInput


@dataclass(frozen=True, slots=True)
class _ChannelEffect:
    """An effect of the channel of `user`, for the coordinator."""

    user: Address
    effect: object


_CHANNEL_BY_STATE = (ChannelProposal, ChannelSync)
_CHANNEL_BY_USER = (ChannelCountersign, ChannelReject, ChannelResume)
_THREAD_BY_KEY = (ThreadCountersign, ThreadReject, ThreadResume, ThreadCloseNotice)


# ---------------------------------------------------------------- the step


def node_step(state: NodeState, event: NodeInput, signer: Signer) -> NodeTransition:
    """Apply one input to the node; `signer` is the node's key (`config.me`)."""
    run = _Run(state, signer)
    run.work.append(event)
    run.drain()
    return run.result()


def node_steps(state: NodeState, events: list[NodeInput], signer: Signer) -> NodeTransition:
    """Apply several inputs in order, as one transition (one commit for all of them)."""
    run = _Run(state, signer)
    for event in events:
        run.work.append(event)
        run.drain()
    return run.result()


class _Run:
    """One transition in the making: copies mappings on first change, collects effects."""

    def __init__(self, state: NodeState, signer: Signer) -> None:
        self.config = state.config
        self.signer = signer
        self.start = state
        self.channels: Mapping[Address, ch.ChannelSide] = state.channels
        self.threads: Mapping[ThreadKey, th.ThreadSide] = state.threads
        self.coord = state.coordination
        self._channels_copied = False
        self._threads_copied = False
        self.changed_channels: set[Address] = set()
        self.changed_threads: set[ThreadKey] = set()
        self.removed_threads: set[ThreadKey] = set()
        self.effects: list[object] = []
        self.work: deque[object] = deque()

    # -- state access

    def put_channel(self, user: Address, side: ch.ChannelSide) -> None:
        if not self._channels_copied:
            self.channels = dict(self.channels)
            self._channels_copied = True
        self.channels[user] = side  # type: ignore[index]
        self.changed_channels.add(user)

    def put_thread(self, key: ThreadKey, side: th.ThreadSide) -> None:
        if not self._threads_copied:
            self.threads = dict(self.threads)
            self._threads_copied = True
        self.threads[key] = side  # type: ignore[index]
        self.changed_threads.add(key)
        self.removed_threads.discard(key)

    def forget_thread(self, key: ThreadKey) -> None:
        if key not in self.threads:
            return
        if not self._threads_copied:
            self.threads = dict(self.threads)
            self._threads_copied = True
        del self.threads[key]  # type: ignore[attr-defined]
        self.changed_threads.discard(key)
        self.removed_threads.add(key)

    def set_coord(self, coord: Coordination) -> None:
        self.coord = coord

    @property
    def is_hub(self) -> bool:
        return self.config.role is Party.HUB

    @property
    def me(self) -> Address:
        return self.config.me

    def now(self) -> int:
        return self.coord.now

    def result(self) -> NodeTransition:
        state = NodeState(self.config, self.channels, self.threads, self.coord)
        return NodeTransition(
            state=state,
            effects=tuple(self.effects),
            changed_channels=frozenset(self.changed_channels),
            changed_threads=frozenset(self.changed_threads),
            removed_threads=frozenset(self.removed_threads),
            coordination_changed=self.coord is not self.start.coordination,
        )

    def emit(self, effect: object) -> None:
        self.effects.append(effect)

    def send(self, to: Address, message: Message) -> None:
        self.effects.append(Send(to, message))

    # -- the work loop

    def drain(self) -> None:
        while self.work:
            item = self.work.popleft()
            if isinstance(item, _ToChannel):
                self.step_channel(item.user, item.input)
            elif isinstance(item, _ToThread):
                self.step_thread(item.key, item.input)
            elif isinstance(item, _ChannelEffect):
                self.on_channel_effect(item.user, item.effect)
            else:
                self.on_input(item)

    def step_channel(self, user: Address, event: ch.ChannelInput) -> None:
        stored = self.channels.get(user)
        if stored is None:
            return
        # The channel's clock is the node's (kept once, in the coordination): a changed
        # channel is stored with it, an unchanged one is not rewritten for it.
        side = stored if stored.now == self.coord.now else replace(stored, now=self.coord.now)
        nonces: dict[ThreadKey, int] | None = None
        if not self.is_hub and isinstance(event, Receive):
            nonces = {
                key: t.latest.state.tx_count
                for key, t in self.threads.items()
                if t.latest is not None
            }
        result = ch.step(side, event, self.signer, nonces)
        if result.state is not side:
            self.put_channel(user, result.state)
        if result.rejection is not None and isinstance(event, Receive):
            self.emit(EventRejected(event.sender, *_rejection(result)))
        elif result.rejection is not None and isinstance(event, ch.ActionProposeUpdate):
            self.work.append(
                _ChannelEffect(
                    user,
                    ch.EventUpdateFailed(
                        event.update, result.rejection.reason, result.rejection.detail
                    ),
                )
            )
        for effect in result.effects:
            if isinstance(effect, Send):
                self.emit(effect)
            else:
                self.work.append(_ChannelEffect(user, effect))
        if (
            not self.is_hub
            and isinstance(event, Receive)
            and result.rejection is not None
            and result.rejection.reason is RejectReason.STALE_THREAD_STATE
        ):
            self.user_refused_settle(event.message)

    def step_thread(self, key: ThreadKey, event: th.ThreadInput) -> None:
        side = self.threads.get(key)
        if side is None:
            if isinstance(event, th.ActionPay):
                self.emit(th.EventPaymentFailed(key, event.payment_id, RejectReason.UNKNOWN_THREAD))
            return
        result = th.step(side, event, self.signer)
        if result.state is not side:
            self.put_thread(key, result.state)
        if result.rejection is not None:
            if isinstance(event, Receive):
                self.emit(EventRejected(event.sender, *_rejection(result)))
            elif isinstance(event, th.ActionPay):
                self.emit(th.EventPaymentFailed(key, event.payment_id, result.rejection.reason))
        for effect in result.effects:
            self.on_thread_effect(key, effect)

    # -- inputs

    def on_input(self, event: object) -> None:
        if isinstance(event, Receive):
            self.on_receive(event)
        elif isinstance(event, ActionPayThread):
            self.step_thread(event.key, th.ActionPay(event.payment_id, event.amount))
        elif isinstance(event, ch.ContractReceiveBlock):
            if event.timestamp > self.coord.now:
                self.set_coord(replace(self.coord, now=event.timestamp))
            self.invalidate_timed_out()
        elif isinstance(event, ch.ContractReceiveChannelUpdated):
            self.step_channel(event.user, event)
            self.on_executed(event.user, event.tx_count_onchain)
        elif isinstance(event, ContractReceiveTxFailed):
            self.on_tx_failed(event)
        elif isinstance(event, ActionTick):
            self.on_tick()
        elif isinstance(event, ActionPeerReconnected):
            self.on_reconnected(event.peer)
        elif isinstance(event, ActionPeerUnreachable):
            self.on_unreachable(event.peer)
        elif isinstance(event, ActionCollateralize):
            # The operator's own request: it may be for a user not heard from yet.
            if self.is_hub and self.ensure_channel(event.user):
                self.collateralize(event.user, event.amount)
            elif self.is_hub:
                self.emit(EventRejected(event.user, RejectReason.POLICY, "no more channels"))
        elif isinstance(event, ActionReclaimCollateral):
            if self.is_hub:
                self.reclaim(event.user, event.amount)
        elif not self.is_hub:
            self.on_user_action(event)

    def on_receive(self, event: Receive) -> None:
        sender, message = event.sender, event.message
        if isinstance(message, _CHANNEL_BY_STATE):
            self.on_channel_message(event, message.state.user)
        elif isinstance(message, _CHANNEL_BY_USER):
            self.on_channel_message(event, message.user)
        elif isinstance(message, ThreadProposal):
            key = message.state.key
            if key in self.threads:
                self.step_thread(key, event)
            else:
                reject = ThreadReject(
                    key, message.state.tx_count, RejectReason.UNKNOWN_THREAD, 0, "no such thread"
                )
                self.send(sender, reject)
                self.emit(EventRejected(sender, RejectReason.UNKNOWN_THREAD, "no such thread"))
        elif isinstance(message, _THREAD_BY_KEY):
            if message.key in self.threads:
                self.step_thread(message.key, event)
        elif isinstance(message, ThreadSync):
            key = message.latest.state.key
            if key in self.threads:
                self.step_thread(key, event)
        elif isinstance(message, ErrorNotice):
            self.emit(EventRejected(sender, message.reason, f"peer says: {message.detail}"))
        elif self.is_hub:
            self.on_hub_request(sender, message)
        elif sender == self.config.hub:
            self.on_hub_notice(message)
        elif isinstance(message, ThreadOpenProposal):
            self.on_thread_open_proposal(sender, message)
        else:
            self.emit(EventRejected(sender, RejectReason.POLICY, type(message).__name__))

    def on_channel_message(self, event: Receive, user: Address) -> None:
        sender = event.sender
        if self.is_hub:
            if user != sender:
                self.emit(EventRejected(sender, RejectReason.NOT_A_PARTY, "another's channel"))
                return
            if user not in self.channels:
                if not _signed_by_user(self.config.domain, event.message, user):
                    # A channel is held for a user once it signs something for it.
                    self.emit(EventRejected(sender, RejectReason.UNKNOWN_CHANNEL, "no channel"))
                    return
                if not self.ensure_channel(user):
                    notice = ErrorNotice(RejectReason.POLICY, "hub takes no more channels")
                    self.send(sender, notice)
                    return
        elif user != self.me or sender != self.config.hub:
            self.emit(EventRejected(sender, RejectReason.UNKNOWN_CHANNEL, "not my channel"))
            return
        self.step_channel(user, event)

    def ensure_channel(self, user: Address) -> bool:
        """Hub: make sure I hold `user`'s channel (every channel exists on-chain from
        deployment on, at its genesis state); False if I take no more channels."""
        if user in self.channels:
            return True
        if len(self.channels) >= self.config.max_channels or user == self.me:
            return False
        side = ch.new_channel(self.config.domain, Party.HUB, self.me, user)
        if self.coord.recovered:
            # I may have lost states of this channel: wait for the user's own.
            side = replace(side, max_signed=self.coord.recovery_gap, awaiting_sync=True)
        self.put_channel(user, replace(side, now=self.now()))
        return True

    def on_reconnected(self, peer: Address) -> None:
        if self.is_hub:
            if peer in self.channels:
                self.step_channel(peer, ch.ActionReconnected())
            else:
                # I hold nothing of its channel: say so (a restored user waits for it).
                self.send(peer, ChannelResume(peer, 0))
            return
        if peer == self.config.hub:
            self.step_channel(self.me, ch.ActionReconnected())
            self.resend_hub_requests()
        for key, side in list(self.threads.items()):
            if side.peer == peer:
                self.step_thread(key, th.ActionReconnected())

    def user_refused_settle(self, message: Message) -> None:
        """The hub proposed to settle a thread of mine at a state older than one I hold
        (the peer closed at an old state): hand it my latest, to settle at that."""
        if not isinstance(message, ChannelProposal):
            return
        update = message.update
        if not isinstance(update, UpdateCloseThread):
            return
        side = self.threads.get(update.final.key)
        if side is not None and side.latest is not None:
            self.send(self.config.hub, ThreadCloseRequest(side.latest))

    def resend_hub_requests(self) -> None:
        """After the hub came back: ask again for the thread opens and closes it may have
        lost (it ignores what it already has under way)."""
        channel = self.my_channel()
        for key, side in self.threads.items():
            if side.latest is None:
                continue
            if side.phase is th.ThreadPhase.AGREED and side.me == key.sender:
                if channel.open_thread(key) is None:
                    self.send(self.config.hub, ThreadOpenRequest(side.latest))
            elif side.phase is th.ThreadPhase.FINAL and channel.open_thread(key) is not None:
                self.send(self.config.hub, ThreadCloseRequest(side.latest))

    def on_unreachable(self, peer: Address) -> None:
        if self.is_hub:
            return
        for op in self.coord.ops:
            if op.kind is OpKind.OPEN_THREAD and op.key is not None and peer == op.key.receiver:
                side = self.threads.get(op.key)
                if side is not None and side.phase is th.ThreadPhase.PROPOSED:
                    self.forget_thread(op.key)
                    self.fail_op(op, RejectReason.POLICY, "peer is unreachable")

    # -- effects of the machines

    def on_channel_effect(self, user: Address, effect: object) -> None:
        if isinstance(effect, ch.ContractSendAuthorizedUpdate):
            self.emit(effect)
        elif isinstance(effect, ch.EventChannelUpdated):
            if self.is_hub:
                self.hub_channel_updated(user, effect)
            else:
                self.user_channel_updated(effect)
        elif isinstance(effect, ch.EventUpdateFailed):
            if self.is_hub:
                self.hub_update_failed(user, effect)
            else:
                self.user_update_failed(effect)
        elif isinstance(effect, ch.EventChannelSynced):
            if not self.is_hub:
                self.user_channel_synced()
            self.emit(effect)

    def on_thread_effect(self, key: ThreadKey, effect: object) -> None:
        if isinstance(effect, Send):
            self.emit(effect)
        elif isinstance(effect, th.EventThreadAgreed):
            if effect.initial.state.sender == self.me:
                self.send(self.config.hub, ThreadOpenRequest(effect.initial))
        elif isinstance(effect, th.EventThreadOpenRefused):
            self.forget_thread(key)
            detail = f"peer refused the thread: {effect.detail}"
            self.fail_thread_ops(OpKind.OPEN_THREAD, key, effect.reason, detail)
        elif isinstance(effect, th.EventThreadFinal):
            self.send(self.config.hub, ThreadCloseRequest(effect.final))
            self.emit(effect)
        else:
            self.emit(effect)

    # ---------------------------------------------------------------- user

    def on_user_action(self, event: object) -> None:
        if isinstance(event, ActionDeposit):
            pending = UpdatePending(
                deposit_hub=NO_ASSETS,
                deposit_user=event.amount,
                withdrawal_hub=NO_ASSETS,
                withdrawal_user=NO_ASSETS,
                recipient=self.my_channel().latest.state.recipient,
                timeout=self.now() + self.config.pending_timeout,
            )
            self.propose_for_op(Op(event.op_id, OpKind.DEPOSIT, pending))
        elif isinstance(event, ActionWithdraw):
            pending = UpdatePending(
                deposit_hub=NO_ASSETS,
                deposit_user=NO_ASSETS,
                withdrawal_hub=NO_ASSETS,
                withdrawal_user=event.amount,
                recipient=event.recipient,
                timeout=self.now() + self.config.pending_timeout,
            )
            self.propose_for_op(Op(event.op_id, OpKind.WITHDRAW, pending))
        elif isinstance(event, ActionPayViaHub):
            payment = UpdatePayment(Party.USER, event.amount, event.to)
            if event.to in (self.me, self.config.hub, ZERO_ADDRESS):
                self.emit(EventOpFailed(event.op_id, RejectReason.POLICY, "not a user to pay"))
                return
            self.propose_for_op(Op(event.op_id, OpKind.PAY_VIA_HUB, payment))
        elif isinstance(event, ActionRequestCollateral):
            self.send(self.config.hub, CollateralRequest(event.amount))
            self.emit(EventOpDone(event.op_id))
        elif isinstance(event, ActionOpenThread):
            self.open_thread(event)
        elif isinstance(event, ActionCloseThread):
            self.close_thread(event)

    def my_channel(self) -> ch.ChannelSide:
        return self.channels[self.me]

    def propose_for_op(self, op: Op) -> None:
        assert op.update is not None
        self.add_op(op)
        self.work.append(_ToChannel(self.me, ch.ActionProposeUpdate(op.update)))

    def add_op(self, op: Op) -> None:
        self.set_coord(replace(self.coord, ops=(*self.coord.ops, op)))

    def replace_op(self, old: Op, new: Op | None) -> None:
        ops: list[Op] = []
        for o in self.coord.ops:
            if o is not old:
                ops.append(o)
            elif new is not None:
                ops.append(new)
        self.set_coord(replace(self.coord, ops=tuple(ops)))

    def finish_op(self, op: Op, key: ThreadKey | None = None) -> None:
        self.replace_op(op, None)
        self.emit(EventOpDone(op.op_id, key))

    def fail_op(
        self, op: Op, reason: RejectReason, detail: str, missing: Assets = NO_ASSETS
    ) -> None:
        self.replace_op(op, None)
        self.emit(EventOpFailed(op.op_id, reason, detail, missing))

    def op_for_update(self, update: ChannelUpdate) -> Op | None:
        """The first op still waiting for `update` to be signed (a signed pending update
        has its tx_count_onchain set: an equal update proposed later is another op's)."""
        return next(
            (o for o in self.coord.ops if o.update == update and o.tx_count_onchain == 0), None
        )

    def op_for_thread(self, kind: OpKind, key: ThreadKey) -> Op | None:
        return next((o for o in self.coord.ops if o.kind is kind and o.key == key), None)

    def finish_thread_ops(self, kind: OpKind, key: ThreadKey) -> None:
        """Every request of `kind` about thread `key` is done (a retried close, say)."""
        for op in [o for o in self.coord.ops if o.kind is kind and o.key == key]:
            self.finish_op(op, key)

    def fail_thread_ops(
        self,
        kind: OpKind,
        key: ThreadKey,
        reason: RejectReason,
        detail: str,
        missing: Assets = NO_ASSETS,
    ) -> None:
        for op in [o for o in self.coord.ops if o.kind is kind and o.key == key]:
            self.fail_op(op, reason, detail, missing)

    def op_for_pending(self, tx_count_onchain: int) -> Op | None:
        return next(
            (
                o
                for o in self.coord.ops
                if o.kind in (OpKind.DEPOSIT, OpKind.WITHDRAW)
                and o.tx_count_onchain == tx_count_onchain
            ),
            None,
        )

    def open_thread(self, event: ActionOpenThread) -> None:
        peer = event.peer
        if peer in (self.me, self.config.hub, ZERO_ADDRESS):
            self.emit(EventOpFailed(event.op_id, RejectReason.NOT_A_PARTY, "not a user peer"))
            return
        if event.lock_mine.is_zero() and event.lock_peer.is_zero():
            self.emit(EventOpFailed(event.op_id, RejectReason.EMPTY_PAYMENT, "locks nothing"))
            return
        balance = self.my_channel().latest.state.balance_user
        if not balance.covers(event.lock_mine):
            missing = balance.shortfall(event.lock_mine)
            detail = f"channel balance short by {missing.eth} wei and {missing.token} token units"
            self.emit(EventOpFailed(event.op_id, RejectReason.INSUFFICIENT_BALANCE, detail))
            return
        thread_id = self.next_thread_id()
        self.set_coord(replace(self.coord, last_thread_id=thread_id))
        initial = ThreadState(thread_id, self.me, peer, event.lock_mine, event.lock_peer, 0)
        result = th.propose_thread(self.config.domain, self.signer, initial, self.config.window)
        self.put_thread(initial.key, result.state)
        self.add_op(Op(event.op_id, OpKind.OPEN_THREAD, key=initial.key))
        for effect in result.effects:
            self.on_thread_effect(initial.key, effect)

    def next_thread_id(self) -> int:
        """One above every id I ever used as a thread's sender (a thread key is used once)."""
        return self.coord.last_thread_id + 1

    def close_thread(self, event: ActionCloseThread) -> None:
        side = self.threads.get(event.key)
        if side is None:
            self.emit(EventOpFailed(event.op_id, RejectReason.UNKNOWN_THREAD, "no such thread"))
            return
        if self.op_for_thread(OpKind.CLOSE_THREAD, event.key) is not None and not event.force:
            self.emit(EventOpFailed(event.op_id, RejectReason.THREAD_CLOSING, "already closing"))
            return
        self.add_op(Op(event.op_id, OpKind.CLOSE_THREAD, key=event.key))
        if self.my_channel().open_thread(event.key) is None and side.phase in (
            th.ThreadPhase.AGREED,
            th.ThreadPhase.FINAL,
        ):
            # My channel never locked it (an open that failed or was abandoned): nothing is
            # locked in it. Forget it, and tell the hub: if it is still locking the thread,
            # it settles it at this (initial) state once locked.
            if side.latest is not None:
                self.send(self.config.hub, ThreadCloseRequest(side.latest))
            self.forget_thread(event.key)
            self.fail_thread_ops(
                OpKind.OPEN_THREAD, event.key, RejectReason.THREAD_CLOSED, "closed before locked"
            )
            self.finish_thread_ops(OpKind.CLOSE_THREAD, event.key)
            return
        if side.phase is th.ThreadPhase.FINAL and side.latest is not None:
            # Already final (e.g. the peer closed first): hand the hub the final state again.
            self.send(self.config.hub, ThreadCloseRequest(side.latest))
            return
        result = th.step(side, th.ActionCloseThread(force=event.force), self.signer)
        if result.rejection is not None:
            op = self.op_for_thread(OpKind.CLOSE_THREAD, event.key)
            assert op is not None
            self.fail_op(op, result.rejection.reason, result.rejection.detail)
            return
        self.put_thread(event.key, result.state)
        for effect in result.effects:
            self.on_thread_effect(event.key, effect)

    def on_thread_open_proposal(self, sender: Address, message: ThreadOpenProposal) -> None:
        key = message.initial.key
        side = self.threads.get(key)
        if side is not None:
            if side.initial == message.initial and side.me == message.initial.receiver:
                # A's retransmission after a reconnect: countersign the same state again
                # (signatures are deterministic, so this is the signature already given).
                signature = self.signer.sign_digest(
                    thread_state_digest(self.config.domain, message.initial)
                )
                self.send(sender, ThreadCountersign(key, 0, signature))
            return
        if key in self.my_channel().closed_threads:
            reply = ThreadReject(key, 0, RejectReason.THREAD_ALREADY_OPEN, 0, "key used before")
            self.send(sender, reply)
            return
        unlocked = sum(
            1
            for t in self.threads.values()
            if t.peer == sender and t.phase is th.ThreadPhase.AGREED
        )
        if unlocked >= MAX_UNLOCKED_THREADS_PER_PEER:
            reply = ThreadReject(key, 0, RejectReason.POLICY, 0, "too many unlocked threads")
            self.send(sender, reply)
            self.emit(EventRejected(sender, RejectReason.POLICY, "too many unlocked threads"))
            return
        result = th.accept_thread(
            self.config.domain,
            self.signer,
            sender,
            message,
            self.config.max_lock,
            self.config.window,
        )
        if result.state is not None:
            self.put_thread(key, result.state)
        else:
            assert result.rejection is not None
            self.emit(EventRejected(sender, result.rejection.reason, result.rejection.detail))
        for effect in result.effects:
            self.on_thread_effect(key, effect)

    def on_hub_notice(self, message: Message) -> None:
        if isinstance(message, ThreadOpenRefused):
            side = self.threads.get(message.key)
            locked = self.my_channel().open_thread(message.key) is not None
            if side is not None and not locked and side.phase is th.ThreadPhase.AGREED:
                self.forget_thread(message.key)
            self.fail_thread_ops(
                OpKind.OPEN_THREAD, message.key, message.reason, message.detail, message.missing
            )
        elif isinstance(message, CollateralNeeded):
            self.emit(EventCollateralNeeded(message.user, message.missing))
        else:
            self.emit(EventRejected(self.config.hub, RejectReason.POLICY, type(message).__name__))

    def user_channel_updated(self, event: ch.EventChannelUpdated) -> None:
        update = event.update
        state = event.latest.state
        if isinstance(update, UpdatePending):
            op = self.op_for_update(update)
            if op is not None:
                self.replace_op(op, replace(op, tx_count_onchain=state.tx_count_onchain))
        elif isinstance(update, UpdateConfirmPending):
            op = self.op_for_pending(update.tx_count_onchain)
            previous = op.update if op is not None else None
            if isinstance(previous, UpdatePending) and op is not None:
                if op.kind is OpKind.DEPOSIT:
                    self.emit(EventDepositConfirmed(self.me, previous.deposit_user))
                else:
                    self.emit(
                        EventWithdrawalConfirmed(
                            self.me, previous.withdrawal_user, previous.recipient
                        )
                    )
                self.finish_op(op)
        elif isinstance(update, UpdateInvalidatePending):
            op = self.op_for_pending(update.tx_count_onchain)
            if op is not None:
                self.fail_op(op, RejectReason.NOT_EXECUTED_ONCHAIN, "timed out unexecuted")
        elif isinstance(update, UpdatePayment):
            if event.proposed_by is Party.HUB:
                self.emit(EventHubPaymentReceived(update.amount))
            else:
                op = self.op_for_update(update)
                if op is not None:
                    self.finish_op(op)
        elif isinstance(update, UpdateOpenThread):
            key = update.initial.key
            self.work.append(_ToThread(key, th.ActionConfirmLock()))
            signed = SignedThreadState(update.initial, update.sig_sender, update.sig_receiver)
            self.emit(EventThreadOpened(signed))
            self.finish_thread_ops(OpKind.OPEN_THREAD, key)
        elif isinstance(update, UpdateCloseThread):
            key = update.final.key
            final = SignedThreadState(update.final, update.sig_sender, update.sig_receiver)
            self.emit(EventThreadClosed(final))
            self.forget_thread(key)
            self.finish_thread_ops(OpKind.CLOSE_THREAD, key)

    def user_channel_synced(self) -> None:
        """My channel adopted a newer state from the hub: only a restored user (its backup
        older than the channel) finds threads locked or settled meanwhile. Rebuild the
        threads I lost from their initial states (awaiting their peer's sync), and forget the
        threads the channel settled."""
        channel = self.my_channel()
        locked = {t.state.key: t for t in channel.threads}
        for key, initial in sorted(locked.items()):
            side = self.threads.get(key)
            if side is None:
                rebuilt = th.restored_thread(
                    self.config.domain,
                    self.me,
                    initial.state,
                    initial,
                    self.coord.recovery_gap,
                    self.config.window,
                )
                self.put_thread(key, rebuilt)
                # Ask the peer for its latest: it answers a sync older than its own.
                self.work.append(_ToThread(key, th.ActionReconnected()))
                if key.sender == self.me and key.thread_id > self.coord.last_thread_id:
                    self.set_coord(replace(self.coord, last_thread_id=key.thread_id))
        for key in list(self.threads):
            if key in channel.closed_threads and key not in locked:
                self.forget_thread(key)
                self.finish_thread_ops(OpKind.CLOSE_THREAD, key)

    def user_update_failed(self, event: ch.EventUpdateFailed) -> None:
        if self.confirm_refused(self.me, event):
            return
        op = self.op_for_update(event.update)
        if op is None:
            return
        missing = NO_ASSETS
        if event.reason is RejectReason.INSUFFICIENT_COLLATERAL:
            missing = _missing_from(self.my_channel().latest.state, event.update)
        self.fail_op(op, event.reason, event.detail, missing)

    # ---------------------------------------------------------------- chain (both roles)

    def on_executed(self, user: Address, tx_count_onchain: int) -> None:
        """The contract executed `user`'s pending update: its submitter confirms it."""
        side = self.channels.get(user)
        if side is None:
            return
        state = side.latest.state
        if not state.has_pending() or state.tx_count_onchain != tx_count_onchain:
            return
        user_submits = not state.pending_deposit_user.is_zero()
        if user_submits == self.is_hub:
            return
        confirm = UpdateConfirmPending(tx_count_onchain)
        if side.outgoing is not None and side.outgoing.update == confirm:
            return
        if confirm in side.queued:
            return
        self.work.append(_ToChannel(user, ch.ActionProposeUpdate(confirm)))

    def on_tick(self) -> None:
        retry = self.coord.confirm_retry
        if retry:
            self.set_coord(replace(self.coord, confirm_retry=frozenset()))
            for user, n in sorted(retry, key=lambda r: (r[0].raw, r[1])):
                self.on_executed(user, n)
        self.invalidate_timed_out()

    def confirm_refused(self, user: Address, event: ch.EventUpdateFailed) -> bool:
        """A confirmation or invalidation the peer refused only because its view of the
        chain lags mine: try again at the next tick. True if that was the case."""
        update = event.update
        if isinstance(update, UpdateConfirmPending) and (
            event.reason is RejectReason.NOT_EXECUTED_ONCHAIN
        ):
            retry = self.coord.confirm_retry | {(user, update.tx_count_onchain)}
            self.set_coord(replace(self.coord, confirm_retry=retry))
            return True
        if isinstance(update, UpdateInvalidatePending) and (
            event.reason is RejectReason.TIMEOUT_NOT_PASSED
        ):
            marker = (user, update.tx_count_onchain)
            self.set_coord(replace(self.coord, invalidating=self.coord.invalidating - {marker}))
            return True
        return False

    def on_tx_failed(self, event: ContractReceiveTxFailed) -> None:
        if self.is_hub:
            amount = self.coord.collateral_for(event.user)
            if amount is not None:
                self.drop_collateral(event.user)
                self.refund_forwards(event.user, f"collateral failed: {event.reason}")
            return
        op = self.op_for_pending(event.tx_count_onchain)
        if op is not None:
            self.fail_op(op, RejectReason.NOT_EXECUTED_ONCHAIN, event.reason)

    def invalidate_timed_out(self) -> None:
        """Undo pending updates whose timeout passed unexecuted (each once)."""
        still = frozenset(
            (u, n)
            for u, n in self.coord.invalidating
            if u in self.channels
            and self.channels[u].latest.state.has_pending()
            and self.channels[u].latest.state.tx_count_onchain == n
        )
        if still != self.coord.invalidating:
            self.set_coord(replace(self.coord, invalidating=still))
        for user, side in list(self.channels.items()):
            state = side.latest.state
            if not state.has_pending() or self.now() < state.timeout:
                continue
            if side.onchain_executed >= state.tx_count_onchain:
                continue
            marker = (user, state.tx_count_onchain)
            if marker in self.coord.invalidating:
                continue
            invalidating = self.coord.invalidating | {marker}
            self.set_coord(replace(self.coord, invalidating=invalidating))
            undo = UpdateInvalidatePending(state.tx_count_onchain)
            self.work.append(_ToChannel(user, ch.ActionProposeUpdate(undo)))

    # ---------------------------------------------------------------- hub

    def on_hub_request(self, sender: Address, message: Message) -> None:
        if sender not in self.channels:
            self.send(sender, ErrorNotice(RejectReason.UNKNOWN_CHANNEL, "open a channel first"))
            return
        if isinstance(message, ThreadOpenRequest):
            self.hub_open_request(sender, message.initial)
        elif isinstance(message, ThreadCloseRequest):
            self.hub_close_request(sender, message.final)
        elif isinstance(message, CollateralRequest):
            self.collateralize(sender, message.amount)
        else:
            self.emit(EventRejected(sender, RejectReason.POLICY, type(message).__name__))

    def refuse_open(
        self,
        to: Address,
        key: ThreadKey,
        reason: RejectReason,
        detail: str,
        missing: Assets = NO_ASSETS,
        tell_receiver: bool = False,
    ) -> None:
        self.send(to, ThreadOpenRefused(key, reason, missing, detail))
        if tell_receiver and key.receiver != to:
            # The receiver agreed the initial state: it forgets the thread if not locked.
            self.send(key.receiver, ThreadOpenRefused(key, reason, NO_ASSETS, detail))
        self.emit(EventRejected(to, reason, detail))

    def hub_open_request(self, sender: Address, initial: SignedThreadState) -> None:
        state = initial.state
        key = state.key
        if state.sender != sender:
            self.refuse_open(sender, key, RejectReason.NOT_A_PARTY, "only the sender opens")
            return
        if self.coord.opening(key) is not None or self.coord.closing(key) is not None:
            return  # a retransmission: the open is under way
        if state.tx_count != 0:
            self.refuse_open(sender, key, RejectReason.INVALID_TRANSITION, "not an initial state")
            return
        if state.receiver == self.me or not self.ensure_channel(state.receiver):
            self.refuse_open(sender, key, RejectReason.UNKNOWN_CHANNEL, "receiver has no channel")
            return
        receiver = self.channels[state.receiver]
        if receiver.open_thread(key) is not None or key in receiver.closed_threads:
            self.refuse_open(sender, key, RejectReason.THREAD_ALREADY_OPEN, "thread key used")
            return
        if not _double_signed(self.config.domain, initial):
            self.refuse_open(sender, key, RejectReason.BAD_SIGNATURE, "not double-signed")
            return
        for user, needed in (
            (state.receiver, state.balance_sender),
            (sender, state.balance_receiver),
        ):
            have = self.channels[user].latest.state.balance_hub
            if not have.covers(needed):
                missing = have.shortfall(needed)
                self.collateralize(user, missing)
                detail = (
                    f"hub collateral in {user}'s channel short by {missing.eth} wei and "
                    f"{missing.token} token units (collateral requested)"
                )
                self.refuse_open(
                    sender,
                    key,
                    RejectReason.INSUFFICIENT_COLLATERAL,
                    detail,
                    missing,
                    tell_receiver=True,
                )
                return
        opening = ThreadOpening(initial, OpenStage.LOCK_RECEIVER)
        self.set_coord(replace(self.coord, openings=(*self.coord.openings, opening)))
        self.propose_lock(state.receiver, initial)

    def propose_lock(self, user: Address, initial: SignedThreadState) -> None:
        update = UpdateOpenThread(initial.state, initial.sig_sender, initial.sig_receiver)
        self.work.append(_ToChannel(user, ch.ActionProposeUpdate(update)))

    def propose_settle(self, user: Address, final: SignedThreadState) -> None:
        update = UpdateCloseThread(final.state, final.sig_sender, final.sig_receiver)
        self.work.append(_ToChannel(user, ch.ActionProposeUpdate(update)))

    def set_opening(self, old: ThreadOpening, new: ThreadOpening | None) -> None:
        openings = tuple(o for o in self.coord.openings if o is not old)
        if new is not None:
            openings = (*openings, new)
        self.set_coord(replace(self.coord, openings=openings))

    def set_closing(self, old: ThreadClosing | None, new: ThreadClosing | None) -> None:
        closings = tuple(c for c in self.coord.closings if c is not old)
        if new is not None:
            closings = (*closings, new)
        self.set_coord(replace(self.coord, closings=closings))

    def hub_close_request(self, sender: Address, final: SignedThreadState) -> None:
        state = final.state
        key = state.key
        if sender not in (state.sender, state.receiver):
            self.send(sender, ErrorNotice(RejectReason.NOT_A_PARTY, "not a party of the thread"))
            return
        if not _double_signed(self.config.domain, final):
            self.send(sender, ErrorNotice(RejectReason.BAD_SIGNATURE, "not double-signed"))
            self.emit(EventRejected(sender, RejectReason.BAD_SIGNATURE, "close not double-signed"))
            return
        closing = self.coord.closing(key)
        if closing is not None:
            if not closing.fixed and state.tx_count > closing.final.state.tx_count:
                # A later state: used from the first channel's next proposal on (now, if
                # the first refused the earlier one as stale).
                self.set_closing(closing, replace(closing, final=final, waiting=False))
                if closing.waiting:
                    self.propose_settle(closing.order[0], final)
            return
        opening = self.coord.opening(key)
        if opening is not None:
            # A lock is in flight: settle once the open ends (a failed open refunds anyway).
            if opening.final is None or state.tx_count > opening.final.state.tx_count:
                self.set_opening(opening, replace(opening, final=final))
            return
        other = state.receiver if sender == state.sender else state.sender
        order = tuple(
            u
            for u in (other, sender)
            if u in self.channels and self.channels[u].open_thread(key) is not None
        )
        if not order:
            return
        self.set_closing(None, ThreadClosing(final, order))
        self.propose_settle(order[0], final)

    def hub_channel_updated(self, user: Address, event: ch.EventChannelUpdated) -> None:
        update = event.update
        if isinstance(update, UpdateOpenThread):
            opening = self.coord.opening(update.initial.key)
            if opening is None:
                return
            if opening.stage is OpenStage.LOCK_RECEIVER and user == update.initial.receiver:
                self.set_opening(opening, replace(opening, stage=OpenStage.LOCK_SENDER))
                self.propose_lock(update.initial.sender, opening.initial)
            elif opening.stage is OpenStage.LOCK_SENDER and user == update.initial.sender:
                self.set_opening(opening, None)
                self.emit(EventThreadOpened(opening.initial))
                if opening.final is not None:
                    self.hub_close_request(opening.final.state.sender, opening.final)
        elif isinstance(update, UpdateCloseThread):
            key = update.final.key
            opening = self.coord.opening(key)
            if opening is not None and opening.stage is OpenStage.REFUND_RECEIVER:
                self.set_opening(opening, None)
                return
            closing = self.coord.closing(key)
            if closing is None or closing.order[0] != user:
                return
            self.settled_one(
                closing, SignedThreadState(update.final, update.sig_sender, update.sig_receiver)
            )
        elif isinstance(update, UpdatePayment):
            if event.proposed_by is Party.USER and update.forward_to != ZERO_ADDRESS:
                self.forward(Forward(user, update.forward_to, update.amount))
            elif event.proposed_by is Party.HUB:
                self.take_paying(user, update.amount)
        elif isinstance(update, UpdateConfirmPending):
            amount = self.coord.collateral_for(user)
            if amount is not None:
                self.drop_collateral(user)
                self.emit(EventCollateralAdded(user, amount))
                self.retry_forwards(user)
        elif (
            isinstance(update, UpdateInvalidatePending)
            and self.coord.collateral_for(user) is not None
        ):
            self.drop_collateral(user)
            self.refund_forwards(user, "collateral timed out")

    def settled_one(self, closing: ThreadClosing, final: SignedThreadState) -> None:
        """The first channel of `closing` settled at `final`: settle the next one there."""
        rest = closing.order[1:]
        if rest:
            self.set_closing(closing, ThreadClosing(final, rest, fixed=True))
            self.propose_settle(rest[0], final)
        else:
            self.set_closing(closing, None)
            self.emit(EventThreadClosed(final))

    def hub_update_failed(self, user: Address, event: ch.EventUpdateFailed) -> None:
        if self.confirm_refused(user, event):
            return
        update = event.update
        if isinstance(update, UpdateOpenThread):
            key = update.initial.key
            opening = self.coord.opening(key)
            if opening is None:
                return
            sender = update.initial.sender
            missing = NO_ASSETS
            if event.reason is RejectReason.INSUFFICIENT_COLLATERAL:
                missing = _missing_from(self.channels[user].latest.state, update)
                self.collateralize(user, missing)
            if opening.stage is OpenStage.LOCK_RECEIVER:
                self.set_opening(opening, None)
            elif opening.stage is OpenStage.LOCK_SENDER:
                self.set_opening(opening, replace(opening, stage=OpenStage.REFUND_RECEIVER))
                self.propose_settle(update.initial.receiver, opening.initial)
            else:
                return
            self.refuse_open(sender, key, event.reason, event.detail, missing, tell_receiver=True)
        elif isinstance(update, UpdatePending):
            if not update.deposit_hub.is_zero() and self.coord.collateral_for(user) is not None:
                self.drop_collateral(user)
                self.refund_forwards(user, f"collateral refused: {event.detail}")
        elif isinstance(update, UpdatePayment) and update.payer is Party.HUB:
            forward = self.take_paying(user, update.amount)
            detail = f"hub payment failed: {event.detail}"
            if forward is None or forward.source == ZERO_ADDRESS:
                # Not a routed payment, or its refund failed: it stays with the hub.
                self.emit(EventRejected(user, event.reason, detail))
            elif event.reason is RejectReason.INSUFFICIENT_COLLATERAL:
                self.forward(forward)  # waits for collateral, or is refunded
            else:
                self.refund(forward, detail)
        elif isinstance(update, UpdateCloseThread):
            closing = self.coord.closing(update.final.key)
            if closing is None or closing.order[0] != user:
                self.emit(EventRejected(user, event.reason, f"settle failed: {event.detail}"))
            elif event.reason is RejectReason.THREAD_NOT_OPEN:
                # This channel no longer holds the thread: nothing to settle there.
                self.settled_one(closing, closing.final)
            elif event.reason is RejectReason.STALE_THREAD_STATE and not closing.fixed:
                # The party holds a later state and sends it (`user_refused_settle`): settle
                # at it now if it came first, else once it comes.
                self.emit(EventRejected(user, event.reason, f"settle refused: {event.detail}"))
                if closing.final.state.tx_count > update.final.tx_count:
                    self.propose_settle(user, closing.final)
                else:
                    self.set_closing(closing, replace(closing, waiting=True))
            else:
                self.emit(EventRejected(user, event.reason, f"settle failed: {event.detail}"))

    def collateralize(self, user: Address, missing: Assets) -> None:
        """Top the hub's balance in `user`'s channel up to cover `missing` more (once at a time)."""
        side = self.channels.get(user)
        if side is None:
            self.emit(EventRejected(user, RejectReason.UNKNOWN_CHANNEL, "no channel"))
            return
        if self.coord.collateral_for(user) is not None:
            return
        state = side.latest.state
        if state.has_pending() or side.outgoing is not None or side.queued:
            detail = "the channel is busy with another update: collateral later"
            self.emit(EventRejected(user, RejectReason.PENDING_OUTSTANDING, detail))
            return
        have = state.balance_hub
        floor, ceiling = self.config.collateral_floor, self.config.collateral_ceiling
        target = Assets(
            min(ceiling.eth, max(have.eth + missing.eth, floor.eth)),
            min(ceiling.token, max(have.token + missing.token, floor.token)),
        )
        deposit = Assets(max(0, target.eth - have.eth), max(0, target.token - have.token))
        if deposit.is_zero():
            self.emit(EventRejected(user, RejectReason.POLICY, "collateral ceiling reached"))
            return
        pending = UpdatePending(
            deposit_hub=deposit,
            deposit_user=NO_ASSETS,
            withdrawal_hub=NO_ASSETS,
            withdrawal_user=NO_ASSETS,
            recipient=state.recipient,
            timeout=self.now() + self.config.pending_timeout,
        )
        collateral = (*self.coord.collateral, (user, deposit))
        self.set_coord(replace(self.coord, collateral=collateral))
        self.work.append(_ToChannel(user, ch.ActionProposeUpdate(pending)))

    def reclaim(self, user: Address, amount: Assets) -> None:
        side = self.channels.get(user)
        if side is None or amount.is_zero():
            return
        pending = UpdatePending(
            deposit_hub=NO_ASSETS,
            deposit_user=NO_ASSETS,
            withdrawal_hub=amount,
            withdrawal_user=NO_ASSETS,
            recipient=side.latest.state.recipient,
            timeout=self.now() + self.config.pending_timeout,
        )
        self.work.append(_ToChannel(user, ch.ActionProposeUpdate(pending)))

    def drop_collateral(self, user: Address) -> None:
        collateral = tuple((u, a) for u, a in self.coord.collateral if u != user)
        self.set_coord(replace(self.coord, collateral=collateral))

    def forward(self, forward: Forward) -> None:
        target = self.channels.get(forward.to)
        # Only a user that ever signed its channel can be paid on (a stranger never answers).
        if target is None or target.latest.sig_user is None or forward.to == forward.source:
            self.refund(forward, "no channel to pay on to")
            return
        have = target.latest.state.balance_hub
        if have.covers(forward.amount):
            self.pay_on(forward, forward.to)
            return
        missing = have.shortfall(forward.amount)
        self.send(forward.source, CollateralNeeded(forward.to, missing))
        self.set_coord(replace(self.coord, forwards=(*self.coord.forwards, forward)))
        self.collateralize(forward.to, missing)
        if self.coord.collateral_for(forward.to) is None:
            self.refund_forwards(forward.to, "cannot collateralize the recipient")

    def retry_forwards(self, user: Address) -> None:
        waiting = tuple(f for f in self.coord.forwards if f.to == user)
        if not waiting:
            return
        rest = tuple(f for f in self.coord.forwards if f.to != user)
        self.set_coord(replace(self.coord, forwards=rest))
        for f in waiting:
            self.forward(f)

    def refund_forwards(self, user: Address, why: str) -> None:
        waiting = tuple(f for f in self.coord.forwards if f.to == user)
        rest = tuple(f for f in self.coord.forwards if f.to != user)
        self.set_coord(replace(self.coord, forwards=rest))
        for f in waiting:
            self.refund(f, why)

    def refund(self, forward: Forward, why: str) -> None:
        self.pay_on(replace(forward, to=forward.source, source=ZERO_ADDRESS), forward.source)
        self.emit(EventRejected(forward.source, RejectReason.POLICY, f"routed payment: {why}"))

    def pay_on(self, forward: Forward, user: Address) -> None:
        """Propose the hub's payment of `forward` in `user`'s channel, and keep it until
        signed (a refund is a Forward from the zero address)."""
        self.set_coord(replace(self.coord, paying=(*self.coord.paying, forward)))
        payment = UpdatePayment(Party.HUB, forward.amount, ZERO_ADDRESS)
        self.work.append(_ToChannel(user, ch.ActionProposeUpdate(payment)))

    def take_paying(self, user: Address, amount: Assets) -> Forward | None:
        """The first routed payment in flight to `user` of `amount`, now settled or failed."""
        for forward in self.coord.paying:
            if forward.to == user and forward.amount == amount:
                rest = list(self.coord.paying)
                rest.remove(forward)
                self.set_coord(replace(self.coord, paying=tuple(rest)))
                return forward
        return None


# ---------------------------------------------------------------- helpers


def _rejection(result: Transition[Any]) -> tuple[RejectReason, str]:
    assert result.rejection is not None
    return result.rejection.reason, result.rejection.detail


def _signed_by_user(domain: Domain, message: Message, user: Address) -> bool:
    """Whether `message` carries a channel state of `user` signed by `user`."""
    if isinstance(message, ChannelProposal):
        signature = message.signature
    elif isinstance(message, ChannelSync):
        signature = message.sig_user
    else:
        return False
    digest = channel_state_digest(domain, message.state)
    return message.state.user == user and is_signed_by(digest, signature, user)


def _double_signed(domain: Domain, signed: SignedThreadState) -> bool:
    digest = thread_state_digest(domain, signed.state)
    return is_signed_by(digest, signed.sig_sender, signed.state.sender) and is_signed_by(
        digest, signed.sig_receiver, signed.state.receiver
    )


def _missing_from(state: ChannelState, update: ChannelUpdate) -> Assets:
    """What the hub lacks in the channel at `state` for `update`."""
    if isinstance(update, UpdateOpenThread):
        initial = update.initial
        needed = (
            initial.balance_sender if state.user == initial.receiver else (initial.balance_receiver)
        )
    elif isinstance(update, UpdatePayment):
        needed = update.amount
    else:
        return NO_ASSETS
    return state.balance_hub.shortfall(needed)
