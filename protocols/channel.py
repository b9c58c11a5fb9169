"""One party's view of a hub-user channel, and the sans-I/O steps that advance it.

Every channel update is a typed `ChannelUpdate` applied to the latest double-signed state by
`apply_update`; the proposer signs the result, the receiver recomputes it, checks it is
identical and acceptable, countersigns. One proposal is in flight at a time. Conflicts
(both signed the same txCount) void both proposals; the hub has priority (SPEC.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from protocols.effects import Receive, Rejection, Send, Transition, rejected
from protocols.eip712 import Domain, channel_state_digest, thread_state_digest
from protocols.errors import InvalidValue, LocalProtocolError
from protocols.messages import (
    ChannelCountersign,
    ChannelProposal,
    ChannelReject,
    ChannelResume,
    ChannelSync,
    ChannelUpdate,
    ErrorNotice,
    RejectReason,
    SignedThreadState,
    UpdateCloseThread,
    UpdateConfirmPending,
    UpdateInvalidatePending,
    UpdateOpenThread,
    UpdatePayment,
    UpdatePending,
)
from protocols.ordering import RETRYABLE, after_refusal, next_nonce, order_refusal
from protocols.signing import Signer, is_signed_by
from protocols.thread_root import EMPTY_THREAD_ROOT, thread_root
from protocols.types import (
    NO_ASSETS,
    Address,
    Assets,
    ChannelState,
    Party,
    Signature,
    ThreadKey,
    ThreadState,
)

DEFAULT_MAX_THREADS = 64
DEFAULT_PENDING_WINDOW = 3600  # seconds: the longest timeout a pending update may carry


@dataclass(frozen=True, slots=True)
class SignedChannelState:
    """A channel state with both signatures (none for the genesis state, which needs none)."""

    state: ChannelState
    sig_hub: Signature | None
    sig_user: Signature | None


def genesis_state(user: Address) -> ChannelState:
    """The state every channel has on-chain from deployment on: all zero, txCount (0, 0)."""
    return ChannelState(
        user=user,
        recipient=user,
        balance_hub=NO_ASSETS,
        balance_user=NO_ASSETS,
        pending_deposit_hub=NO_ASSETS,
        pending_deposit_user=NO_ASSETS,
        pending_withdrawal_hub=NO_ASSETS,
        pending_withdrawal_user=NO_ASSETS,
        tx_count_global=0,
        tx_count_onchain=0,
        thread_root=EMPTY_THREAD_ROOT,
        thread_count=0,
        timeout=0,
    )


@dataclass(frozen=True, slots=True)
class OutgoingUpdate:
    """My proposal in flight."""

    update: ChannelUpdate
    state: ChannelState
    prev_tx_count: int  # the state it builds on
    signature: Signature
    threads: tuple[SignedThreadState, ...]  # the open threads once it is countersigned


@dataclass(frozen=True, slots=True)
class ChannelSide:
    """What one party of a channel knows and has promised."""

    domain: Domain
    role: Party
    hub: Address
    user: Address
    latest: SignedChannelState
    threads: tuple[SignedThreadState, ...]  # initial states of the open threads
    max_signed: int
    floor: int
    outgoing: OutgoingUpdate | None = None
    queued: tuple[ChannelUpdate, ...] = ()
    in_conflict: bool = False
    holding: bool = False
    onchain_executed: int = 0  # highest tx_count_onchain the contract has executed
    now: int = 0  # latest block timestamp seen
    max_threads: int = DEFAULT_MAX_THREADS
    pending_window: int = DEFAULT_PENDING_WINDOW
    # Keys of threads this channel has closed: a thread key is used once (SPEC, Channel
    # updates), because the contract cannot tell two threads with one initial state apart.
    closed_threads: frozenset[ThreadKey] = frozenset()
    # Restored from a backup that may be older than what I signed: propose nothing until the
    # peer shows its latest state (a sync, a proposal built on my latest, the hub's resume).
    awaiting_sync: bool = False

    @property
    def me(self) -> Address:
        return self.hub if self.role is Party.HUB else self.user

    @property
    def peer(self) -> Address:
        return self.user if self.role is Party.HUB else self.hub

    def open_thread(self, key: ThreadKey) -> SignedThreadState | None:
        return next((t for t in self.threads if t.state.key == key), None)


def new_channel(
    domain: Domain,
    role: Party,
    hub: Address,
    user: Address,
    max_threads: int = DEFAULT_MAX_THREADS,
    pending_window: int = DEFAULT_PENDING_WINDOW,
) -> ChannelSide:
    """A channel as it stands at deployment: the genesis state, nothing signed."""
    if hub == user:
        raise LocalProtocolError("the hub has no channel with itself")
    return ChannelSide(
        domain=domain,
        role=role,
        hub=hub,
        user=user,
        latest=SignedChannelState(genesis_state(user), None, None),
        threads=(),
        max_signed=0,
        floor=0,
        max_threads=max_threads,
        pending_window=pending_window,
    )


def restored_channel(
    domain: Domain,
    role: Party,
    hub: Address,
    user: Address,
    latest: SignedChannelState,
    threads: tuple[SignedThreadState, ...],
    nonce_gap: int,
    max_threads: int = DEFAULT_MAX_THREADS,
    pending_window: int = DEFAULT_PENDING_WINDOW,
) -> ChannelSide:
    """A channel rebuilt from a backup at `latest` with the open `threads`, awaiting sync.

    I may have signed up to `nonce_gap` nonces above `latest` that the backup does not show,
    so `max_signed` counts them as signed. `onchain_executed` is what `latest` proves: all
    but its pending update, if it has one (the chain tells the rest). The caller checked
    the signatures and that `threads` match the state's root and count.
    """
    if hub == user:
        raise LocalProtocolError("the hub has no channel with itself")
    if latest.state.user != user:
        raise LocalProtocolError("the state is of another channel")
    state = latest.state
    executed = state.tx_count_onchain - 1 if state.has_pending() else state.tx_count_onchain
    return ChannelSide(
        domain=domain,
        role=role,
        hub=hub,
        user=user,
        latest=latest,
        threads=tuple(sorted(threads, key=lambda t: t.state.key)),
        max_signed=state.tx_count_global + nonce_gap,
        floor=0,
        onchain_executed=max(0, executed),
        max_threads=max_threads,
        pending_window=pending_window,
        awaiting_sync=True,
    )


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class ActionProposeUpdate:
    """Propose `update` to the peer (queued while another proposal is in flight)."""

    update: ChannelUpdate


@dataclass(frozen=True, slots=True)
class ActionReconnected:
    """A new stream to the peer is up: send my latest state and retransmit my proposal."""


@dataclass(frozen=True, slots=True)
class ContractReceiveChannelUpdated:
    """The contract executed an authorized update of this channel at `tx_count_onchain`."""

    user: Address
    tx_count_onchain: int


@dataclass(frozen=True, slots=True)
class ContractReceiveBlock:
    """A new block with this timestamp (all its events were fed in before it)."""

    timestamp: int


ChannelInput = (
    ActionProposeUpdate
    | ActionReconnected
    | ContractReceiveChannelUpdated
    | ContractReceiveBlock
    | Receive
)


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class EventChannelUpdated:
    """`update` is now double-signed as `latest`."""

    update: ChannelUpdate
    latest: SignedChannelState
    proposed_by: Party


@dataclass(frozen=True, slots=True)
class EventChannelSynced:
    """I adopted the peer's newer double-signed state after a reconnect."""

    latest: SignedChannelState


@dataclass(frozen=True, slots=True)
class EventUpdateFailed:
    """A proposal of mine was refused (by the peer or, on re-proposal, by the rules)."""

    update: ChannelUpdate
    reason: RejectReason
    detail: str


@dataclass(frozen=True, slots=True)
class ContractSendAuthorizedUpdate:
    """Submit `latest` (a double-signed state with pending operations) to the contract."""

    latest: SignedChannelState


# ---------------------------------------------------------------- the rules of updates


class Refusal(Exception):
    """Raised inside `apply_update` to carry a rejection out of nested checks."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _side_amounts(state: ThreadState, user: Address) -> tuple[Assets, Assets]:
    """(user's part, hub's part) of a thread state as seen from `user`'s channel."""
    if user == state.sender:
        return state.balance_sender, state.balance_receiver
    if user == state.receiver:
        return state.balance_receiver, state.balance_sender
    raise Refusal(RejectReason.NOT_A_PARTY, "the channel's user is not a party of the thread")


def _thread_double_signed(
    domain: Domain, state: ThreadState, sig_s: Signature, sig_r: Signature
) -> bool:
    digest = thread_state_digest(domain, state)
    return is_signed_by(digest, sig_s, state.sender) and is_signed_by(digest, sig_r, state.receiver)


def _debit(balance: Assets, amount: Assets, reason: RejectReason, who: str) -> Assets:
    if not balance.covers(amount):
        missing = balance.shortfall(amount)
        raise Refusal(reason, f"{who} short by {missing.eth} wei and {missing.token} token units")
    return balance - amount


def _credit(balance: Assets, amount: Assets) -> Assets:
    try:
        return balance + amount
    except InvalidValue as exc:
        raise Refusal(RejectReason.AMOUNT_OVERFLOW, "balance would exceed uint256") from exc


def apply_update(
    side: ChannelSide, proposer: Party, update: ChannelUpdate, tx_count_global: int
) -> tuple[ChannelState, tuple[SignedThreadState, ...]]:
    """The state (and open threads) that `update` by `proposer` makes of `side.latest`.

    Raises `Refusal` with the reason when the update is not allowed.
    """
    prev = side.latest.state
    threads = side.threads
    base = replace(prev, tx_count_global=tx_count_global)
    if isinstance(update, UpdatePayment):
        if update.payer is not proposer:
            raise Refusal(RejectReason.INVALID_TRANSITION, "a payment is proposed by its payer")
        if update.amount.is_zero():
            raise Refusal(RejectReason.EMPTY_PAYMENT, "payment of nothing")
        reason = (
            RejectReason.INSUFFICIENT_COLLATERAL
            if update.payer is Party.HUB
            else RejectReason.INSUFFICIENT_BALANCE
        )
        payer = _debit(prev.balance(update.payer), update.amount, reason, update.payer.value)
        payee = _credit(prev.balance(update.payer.other), update.amount)
        if update.payer is Party.HUB:
            return replace(base, balance_hub=payer, balance_user=payee), threads
        return replace(base, balance_user=payer, balance_hub=payee), threads

    if isinstance(update, UpdatePending):
        if prev.has_pending():
            raise Refusal(RejectReason.PENDING_OUTSTANDING, "a pending update is outstanding")
        amounts = (
            update.deposit_hub,
            update.deposit_user,
            update.withdrawal_hub,
            update.withdrawal_user,
        )
        if all(a.is_zero() for a in amounts):
            raise Refusal(RejectReason.EMPTY_PAYMENT, "pending update moves nothing")
        others = (update.deposit_hub, update.withdrawal_hub)
        if proposer is Party.HUB:
            others = (update.deposit_user, update.withdrawal_user)
        if any(not a.is_zero() for a in others) or (
            proposer is Party.HUB and update.recipient != prev.recipient
        ):
            raise Refusal(
                RejectReason.POLICY, "a party proposes only its own deposits and withdrawals"
            )
        if not side.now < update.timeout <= side.now + side.pending_window:
            raise Refusal(
                RejectReason.TIMEOUT_PASSED,
                f"timeout must be in ({side.now}, {side.now + side.pending_window}]",
            )
        hub = _debit(
            prev.balance_hub, update.withdrawal_hub, RejectReason.INSUFFICIENT_BALANCE, "hub"
        )
        user = _debit(
            prev.balance_user, update.withdrawal_user, RejectReason.INSUFFICIENT_BALANCE, "user"
        )
        # Deposits must stay payable into a uint256 balance once executed.
        _credit(hub, update.deposit_hub)
        _credit(user, update.deposit_user)
        return (
            replace(
                base,
                recipient=update.recipient,
                balance_hub=hub,
                balance_user=user,
                pending_deposit_hub=update.deposit_hub,
                pending_deposit_user=update.deposit_user,
                pending_withdrawal_hub=update.withdrawal_hub,
                pending_withdrawal_user=update.withdrawal_user,
                tx_count_onchain=prev.tx_count_onchain + 1,
                timeout=update.timeout,
            ),
            threads,
        )

    if isinstance(update, UpdateConfirmPending | UpdateInvalidatePending):
        if not prev.has_pending():
            raise Refusal(RejectReason.NO_PENDING, "no pending update to settle")
        if update.tx_count_onchain != prev.tx_count_onchain:
            raise Refusal(RejectReason.INVALID_TRANSITION, "names another pending update")
        cleared = replace(
            base,
            pending_deposit_hub=NO_ASSETS,
            pending_deposit_user=NO_ASSETS,
            pending_withdrawal_hub=NO_ASSETS,
            pending_withdrawal_user=NO_ASSETS,
            timeout=0,
        )
        if isinstance(update, UpdateConfirmPending):
            if side.onchain_executed < prev.tx_count_onchain:
                raise Refusal(RejectReason.NOT_EXECUTED_ONCHAIN, "not executed on-chain yet")
            return (
                replace(
                    cleared,
                    balance_hub=_credit(prev.balance_hub, prev.pending_deposit_hub),
                    balance_user=_credit(prev.balance_user, prev.pending_deposit_user),
                ),
                threads,
            )
        if side.onchain_executed >= prev.tx_count_onchain:
            raise Refusal(RejectReason.ALREADY_EXECUTED_ONCHAIN, "executed on-chain: confirm it")
        if side.now < prev.timeout:
            raise Refusal(RejectReason.TIMEOUT_NOT_PASSED, "pending update may still execute")
        return (
            replace(
                cleared,
                balance_hub=_credit(prev.balance_hub, prev.pending_withdrawal_hub),
                balance_user=_credit(prev.balance_user, prev.pending_withdrawal_user),
            ),
            threads,
        )

    if isinstance(update, UpdateOpenThread):
        initial = update.initial
        if initial.tx_count != 0:
            raise Refusal(RejectReason.INVALID_TRANSITION, "a thread opens at tx_count 0")
        user_part, hub_part = _side_amounts(initial, side.user)
        if side.open_thread(initial.key) is not None:
            raise Refusal(RejectReason.THREAD_ALREADY_OPEN, "thread already open")
        if initial.key in side.closed_threads:
            raise Refusal(RejectReason.THREAD_ALREADY_OPEN, "thread key used before")
        if len(threads) >= side.max_threads:
            raise Refusal(RejectReason.TOO_MANY_THREADS, f"at most {side.max_threads} threads")
        if not _thread_double_signed(side.domain, initial, update.sig_sender, update.sig_receiver):
            raise Refusal(RejectReason.BAD_SIGNATURE, "initial state not signed by both parties")
        user = _debit(prev.balance_user, user_part, RejectReason.INSUFFICIENT_BALANCE, "user")
        hub = _debit(prev.balance_hub, hub_part, RejectReason.INSUFFICIENT_COLLATERAL, "hub")
        opened = SignedThreadState(initial, update.sig_sender, update.sig_receiver)
        new_threads = tuple(sorted((*threads, opened), key=lambda t: t.state.key))
        return (
            replace(
                base,
                balance_user=user,
                balance_hub=hub,
                thread_root=thread_root(t.state for t in new_threads),
                thread_count=len(new_threads),
            ),
            new_threads,
        )

    # UpdateCloseThread
    final = update.final
    opened_thread = side.open_thread(final.key)
    if opened_thread is None:
        raise Refusal(RejectReason.THREAD_NOT_OPEN, "thread not open in this channel")
    if final.total() != opened_thread.state.total():
        raise Refusal(RejectReason.BALANCE_NOT_CONSERVED, "final state changes the thread total")
    if not _thread_double_signed(side.domain, final, update.sig_sender, update.sig_receiver):
        raise Refusal(RejectReason.BAD_SIGNATURE, "final state not signed by both parties")
    user_part, hub_part = _side_amounts(final, side.user)
    remaining = tuple(t for t in threads if t.state.key != final.key)
    return (
        replace(
            base,
            balance_user=_credit(prev.balance_user, user_part),
            balance_hub=_credit(prev.balance_hub, hub_part),
            thread_root=thread_root(t.state for t in remaining),
            thread_count=len(remaining),
        ),
        remaining,
    )


# ---------------------------------------------------------------- the step function


def step(
    side: ChannelSide,
    event: ChannelInput,
    signer: Signer,
    thread_nonces: Mapping[ThreadKey, int] | None = None,
) -> Transition[ChannelSide]:
    """Apply one input to `side`; `signer` is my key.

    `thread_nonces` gives the latest tx_count I know for threads of mine: a proposal to close
    one of them at an older state is refused (STALE_THREAD_STATE).
    """
    if isinstance(event, ActionProposeUpdate):
        return _propose(side, event.update, signer)
    if isinstance(event, ContractReceiveChannelUpdated):
        if event.user != side.user:
            return rejected(side, RejectReason.UNKNOWN_CHANNEL, "event of another channel")
        executed = max(side.onchain_executed, event.tx_count_onchain)
        return Transition(replace(side, onchain_executed=executed))
    if isinstance(event, ContractReceiveBlock):
        return Transition(replace(side, now=max(side.now, event.timestamp)))
    if isinstance(event, ActionReconnected):
        # Rejects and resumes in flight were lost with the old stream: a conflict handshake
        # cannot finish, so start it afresh (max_signed alone keeps signing safe).
        # Then go on with updates queued meanwhile (nothing of mine in flight means my latest
        # is current, so the nonce is right).
        side = replace(side, in_conflict=False, holding=False)
        return _pump(side, signer, _sync_effects(side))
    return _receive(side, event, signer, thread_nonces or {})


def _propose(side: ChannelSide, update: ChannelUpdate, signer: Signer) -> Transition[ChannelSide]:
    if (
        side.outgoing is None
        and not side.queued
        and not side.holding
        and not side.in_conflict
        and not side.awaiting_sync
    ):
        try:
            apply_update(side, side.role, update, side.max_signed + 1)
        except Refusal as refusal:
            return rejected(side, refusal.reason, refusal.detail)
    return _pump(replace(side, queued=(*side.queued, update)), signer, ())


def _pump(
    side: ChannelSide, signer: Signer, effects: tuple[object, ...]
) -> Transition[ChannelSide]:
    """Propose the next queued update if nothing is in flight and the conflict rule allows."""
    produced: list[object] = []
    while (
        side.outgoing is None
        and side.queued
        and not side.holding
        and not side.in_conflict
        and not side.awaiting_sync
    ):
        update, rest = side.queued[0], side.queued[1:]
        nonce = next_nonce(side.max_signed, side.floor)
        try:
            state, threads = apply_update(side, side.role, update, nonce)
        except Refusal as refusal:
            produced.append(EventUpdateFailed(update, refusal.reason, refusal.detail))
            side = replace(side, queued=rest)
            continue
        signature = signer.sign_digest(channel_state_digest(side.domain, state))
        prev = side.latest.state.tx_count_global
        side = replace(
            side,
            outgoing=OutgoingUpdate(update, state, prev, signature, threads),
            queued=rest,
            max_signed=nonce,
        )
        produced.append(Send(side.peer, ChannelProposal(update, state, prev, signature)))
    return Transition(side, (*effects, *produced))


def _signed(
    side: ChannelSide, state: ChannelState, mine: Signature, theirs: Signature
) -> SignedChannelState:
    if side.role is Party.HUB:
        return SignedChannelState(state, mine, theirs)
    return SignedChannelState(state, theirs, mine)


def _submit_effects(side: ChannelSide, latest: SignedChannelState) -> tuple[object, ...]:
    """The hub submits hub-authorized updates; the user submits its own deposits."""
    state = latest.state
    if not state.has_pending() or side.latest.state.has_pending():
        return ()
    user_deposits = not state.pending_deposit_user.is_zero()
    if (side.role is Party.USER) == user_deposits:
        return (ContractSendAuthorizedUpdate(latest),)
    return ()


def _receive(
    side: ChannelSide, event: Receive, signer: Signer, thread_nonces: Mapping[ThreadKey, int]
) -> Transition[ChannelSide]:
    if event.sender != side.peer:
        return rejected(side, RejectReason.NOT_A_PARTY, "message from a non-party")
    message = event.message
    if isinstance(message, ChannelProposal):
        return _receive_proposal(side, message, signer, thread_nonces)
    if isinstance(message, ChannelCountersign):
        return _receive_countersign(side, message, signer)
    if isinstance(message, ChannelReject):
        return _receive_reject(side, message, signer)
    if isinstance(message, ChannelResume):
        return _receive_resume(side, message, signer)
    if isinstance(message, ChannelSync):
        return _receive_sync(side, message, signer)
    if isinstance(message, ErrorNotice):
        return rejected(side, message.reason, f"peer error: {message.detail}")
    return rejected(side, RejectReason.POLICY, f"unexpected {type(message).__name__}")


def _reject_proposal(
    side: ChannelSide, tx_count: int, reason: RejectReason, detail: str
) -> Transition[ChannelSide]:
    reply = ChannelReject(side.user, tx_count, reason, side.max_signed, detail)
    return rejected(side, reason, detail, Send(side.peer, reply))


def _receive_proposal(
    side: ChannelSide,
    proposal: ChannelProposal,
    signer: Signer,
    thread_nonces: Mapping[ThreadKey, int],
) -> Transition[ChannelSide]:
    state = proposal.state
    nonce = state.tx_count_global
    if state.user != side.user:
        return _reject_proposal(side, nonce, RejectReason.UNKNOWN_CHANNEL, "not this channel")
    digest = channel_state_digest(side.domain, state)
    if not is_signed_by(digest, proposal.signature, side.peer):
        return _reject_proposal(side, nonce, RejectReason.BAD_SIGNATURE, "not signed by the peer")
    latest = side.latest
    if state == latest.state:
        mine = latest.sig_hub if side.role is Party.HUB else latest.sig_user
        if mine is None:
            return _reject_proposal(
                side, nonce, RejectReason.STALE_NONCE, "genesis needs no signature"
            )
        return Transition(side, (Send(side.peer, ChannelCountersign(side.user, nonce, mine)),))
    out_of_order = order_refusal(
        nonce=nonce,
        prev=proposal.prev_tx_count,
        latest=latest.state.tx_count_global,
        max_signed=side.max_signed,
        has_outgoing=side.outgoing is not None,
        in_conflict=side.in_conflict,
    )
    if out_of_order is not None:
        if out_of_order[0] is RejectReason.NONCE_CONFLICT:
            side = replace(side, in_conflict=True)
        return _reject_proposal(side, nonce, *out_of_order)
    update = proposal.update
    if isinstance(update, UpdateCloseThread):
        known = thread_nonces.get(update.final.key)
        if known is not None and known > update.final.tx_count:
            return _reject_proposal(
                side,
                nonce,
                RejectReason.STALE_THREAD_STATE,
                f"I hold thread state {known}, newer than {update.final.tx_count}",
            )
    try:
        expected_state, threads = apply_update(side, side.role.other, update, nonce)
    except Refusal as refusal:
        return _reject_proposal(side, nonce, refusal.reason, refusal.detail)
    if expected_state != state:
        return _reject_proposal(
            side, nonce, RejectReason.INVALID_TRANSITION, "state is not what the update makes"
        )
    signature = signer.sign_digest(digest)
    signed = _signed(side, state, signature, proposal.signature)
    effects: list[object] = [Send(side.peer, ChannelCountersign(side.user, nonce, signature))]
    effects.extend(_submit_effects(side, signed))
    effects.append(EventChannelUpdated(update, signed, side.role.other))
    side = replace(_with_threads(side, threads), latest=signed, max_signed=nonce)
    if side.awaiting_sync:
        # It built on my latest, so the peer holds nothing newer: what waited may go now.
        return _pump(replace(side, awaiting_sync=False), signer, tuple(effects))
    return Transition(side, tuple(effects))


def _with_threads(side: ChannelSide, threads: tuple[SignedThreadState, ...]) -> ChannelSide:
    """`side` with `threads` open; the threads no longer open join `closed_threads`."""
    closed = {t.state.key for t in side.threads} - {t.state.key for t in threads}
    return replace(side, threads=threads, closed_threads=side.closed_threads | closed)


def _receive_countersign(
    side: ChannelSide, message: ChannelCountersign, signer: Signer
) -> Transition[ChannelSide]:
    outgoing = side.outgoing
    if message.user != side.user:
        return rejected(side, RejectReason.UNKNOWN_CHANNEL, "not this channel")
    if outgoing is None or outgoing.state.tx_count_global != message.tx_count_global:
        if message.tx_count_global <= side.latest.state.tx_count_global:
            return Transition(side)  # a late duplicate
        return rejected(side, RejectReason.UNKNOWN_PROPOSAL, "no such proposal in flight")
    digest = channel_state_digest(side.domain, outgoing.state)
    if not is_signed_by(digest, message.signature, side.peer):
        return rejected(side, RejectReason.BAD_SIGNATURE, "countersign not by the peer")
    signed = _signed(side, outgoing.state, outgoing.signature, message.signature)
    effects = (
        *_submit_effects(side, signed),
        EventChannelUpdated(outgoing.update, signed, side.role),
    )
    side = replace(_with_threads(side, outgoing.threads), latest=signed, outgoing=None)
    return _pump(side, signer, effects)


def _receive_reject(
    side: ChannelSide, message: ChannelReject, signer: Signer
) -> Transition[ChannelSide]:
    outgoing = side.outgoing
    if message.user != side.user:
        return rejected(side, RejectReason.UNKNOWN_CHANNEL, "not this channel")
    if outgoing is None or outgoing.state.tx_count_global != message.tx_count_global:
        return Transition(side)  # about a proposal already abandoned or settled
    floor = max(side.floor, side.max_signed, message.max_signed)
    effects: list[object] = []
    queued = side.queued
    if message.reason in RETRYABLE:
        queued = (outgoing.update, *queued)
    else:
        effects.append(EventUpdateFailed(outgoing.update, message.reason, message.detail))
    outcome = after_refusal(message.reason, side.in_conflict, side.role is Party.HUB)
    side = replace(
        side, outgoing=None, queued=queued, floor=floor, in_conflict=False, holding=outcome.holding
    )
    result = _pump(side, signer, tuple(effects))
    if outcome.send_resume:
        resume = Send(side.peer, ChannelResume(side.user, result.state.max_signed))
        result = Transition(result.state, (*result.effects, resume))
    return result


def _receive_resume(
    side: ChannelSide, message: ChannelResume, signer: Signer
) -> Transition[ChannelSide]:
    if message.user != side.user:
        return rejected(side, RejectReason.UNKNOWN_CHANNEL, "not this channel")
    if side.role is Party.HUB:
        return rejected(side, RejectReason.POLICY, "only the hub hands the turn back")
    side = replace(
        side,
        holding=False,
        in_conflict=False,
        awaiting_sync=False,
        floor=max(side.floor, message.after),
    )
    return _pump(side, signer, ())


def _sync_effects(side: ChannelSide) -> tuple[object, ...]:
    effects: list[object] = []
    latest = side.latest
    if latest.sig_hub is not None and latest.sig_user is not None:
        sync = ChannelSync(latest.state, latest.sig_hub, latest.sig_user, side.threads)
        effects.append(Send(side.peer, sync))
    elif side.role is Party.HUB:
        # Nothing double-signed: say so, so that a user restored from a backup stops waiting.
        effects.append(Send(side.peer, ChannelResume(side.user, side.max_signed)))
    if side.outgoing is not None:
        o = side.outgoing
        proposal = ChannelProposal(o.update, o.state, o.prev_tx_count, o.signature)
        effects.append(Send(side.peer, proposal))
    return tuple(effects)


def check_sync(side: ChannelSide, message: ChannelSync) -> Rejection | None:
    """Why a synced channel state cannot be adopted, or None if it is valid."""
    state = message.state
    if state.user != side.user:
        return Rejection(RejectReason.UNKNOWN_CHANNEL, "not this channel")
    digest = channel_state_digest(side.domain, state)
    if not (
        is_signed_by(digest, message.sig_hub, side.hub)
        and is_signed_by(digest, message.sig_user, side.user)
    ):
        return Rejection(RejectReason.BAD_SIGNATURE, "synced state is not double-signed")
    if len(message.threads) != state.thread_count or len(message.threads) > side.max_threads:
        return Rejection(RejectReason.INVALID_TRANSITION, "thread list does not match the count")
    for t in message.threads:
        if t.state.tx_count != 0 or not _thread_double_signed(
            side.domain, t.state, t.sig_sender, t.sig_receiver
        ):
            return Rejection(RejectReason.BAD_SIGNATURE, "an open thread is not double-signed")
        if side.user not in (t.state.sender, t.state.receiver):
            return Rejection(RejectReason.NOT_A_PARTY, "a thread of another channel")
    try:
        root = thread_root(t.state for t in message.threads)
    except InvalidValue:
        return Rejection(RejectReason.INVALID_TRANSITION, "duplicate threads")
    if root != state.thread_root:
        return Rejection(RejectReason.INVALID_TRANSITION, "threads do not match the thread root")
    return None


def _receive_sync(
    side: ChannelSide, message: ChannelSync, signer: Signer
) -> Transition[ChannelSide]:
    refusal = check_sync(side, message)
    if refusal is not None:
        return rejected(side, refusal.reason, refusal.detail)
    state = message.state
    if state.tx_count_global <= side.latest.state.tx_count_global:
        if side.awaiting_sync:  # the peer holds nothing newer: what waited may go now
            return _pump(replace(side, awaiting_sync=False), signer, ())
        return Transition(side)  # not newer: the peer adopts mine from my own sync
    signed = SignedChannelState(state, message.sig_hub, message.sig_user)
    threads = tuple(sorted(message.threads, key=lambda t: t.state.key))
    # A pending update I never saw double-signed (its acknowledgement was lost) is still
    # mine to submit.
    effects: list[object] = list(_submit_effects(side, signed))
    outgoing = side.outgoing
    if outgoing is not None and outgoing.state.tx_count_global <= state.tx_count_global:
        # The peer countersigned my proposal; the acknowledgement was lost.
        effects.append(EventChannelUpdated(outgoing.update, signed, side.role))
        outgoing = None
    else:
        effects.append(EventChannelSynced(signed))
    side = replace(
        _with_threads(side, threads),
        latest=signed,
        outgoing=outgoing,
        max_signed=max(side.max_signed, state.tx_count_global),
        awaiting_sync=False,
    )
    return _pump(side, signer, tuple(effects))
