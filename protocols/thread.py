"""One party's view of a thread, and the sans-I/O steps that advance it.

A payment is the payer's proposal of the next thread state, signed; the payee verifies it,
countersigns and replies. Up to `window` proposals may be in flight. Conflicting proposals
(both sides signed the same tx_count) are resolved by the rule in SPEC.md: both are void,
the thread's sender A has priority, the receiver B holds until A hands the turn back.
No party ever signs two different states with the same tx_count.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from protocols.effects import Receive, Send, Transition, rejected
from protocols.eip712 import Domain, thread_state_digest
from protocols.errors import LocalProtocolError
from protocols.messages import (
    ErrorNotice,
    RejectReason,
    SignedThreadState,
    ThreadCloseNotice,
    ThreadCountersign,
    ThreadOpenProposal,
    ThreadProposal,
    ThreadReject,
    ThreadResume,
    ThreadSync,
)
from protocols.ordering import RETRYABLE, after_refusal, next_nonce, order_refusal
from protocols.signing import Signer, is_signed_by
from protocols.types import NO_ASSETS, Address, Assets, Signature, ThreadKey, ThreadState

DEFAULT_WINDOW = 128


class ThreadPhase(Enum):
    PROPOSED = "proposed"  # A signed the initial state; B has not countersigned yet
    AGREED = "agreed"  # initial state double-signed; waiting for the lock in my channel
    OPEN = "open"  # locked in my channel: payments flow
    CLOSING = "closing"  # no new payments; finishing what is in flight
    FINAL = "final"  # both sides stopped: `latest` is the state to settle
    REFUSED = "refused"  # B refused the open


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A proposal of mine not yet countersigned."""

    payment_id: int
    amount: Assets
    state: ThreadState
    prev_tx_count: int  # the state it builds on
    signature: Signature


@dataclass(frozen=True, slots=True)
class Queued:
    """A payment accepted from the local API, not yet proposed."""

    payment_id: int
    amount: Assets


@dataclass(frozen=True, slots=True)
class ThreadSide:
    """What one party of a thread knows and has promised."""

    domain: Domain
    me: Address
    initial: ThreadState
    phase: ThreadPhase
    latest: SignedThreadState | None
    # My signature on the initial state while PROPOSED (A's side).
    initial_signature: Signature | None
    max_signed: int  # highest tx_count I have signed, -1 if none
    floor: int  # the highest nonce the peer said it signed: my proposals go above it
    outgoing: tuple[Outgoing, ...] = ()
    queued: tuple[Queued, ...] = ()
    queued_total: Assets = NO_ASSETS  # the sum of the queued amounts (kept with `queued`)
    in_conflict: bool = False  # I detected a conflict and stopped proposing
    holding: bool = False  # non-priority side after a conflict, until ThreadResume
    sent_close: bool = False
    peer_closed: bool = False
    window: int = DEFAULT_WINDOW
    # Restored from a backup that may be older than what I signed: propose nothing until the
    # peer shows its latest state (a sync, or a proposal built on my latest).
    awaiting_sync: bool = False

    @property
    def key(self) -> ThreadKey:
        return self.initial.key

    @property
    def peer(self) -> Address:
        return self.initial.receiver if self.me == self.initial.sender else self.initial.sender

    @property
    def has_priority(self) -> bool:
        """The thread's sender A wins conflicts."""
        return self.me == self.initial.sender

    def tip(self) -> ThreadState:
        """The state my next proposal builds on."""
        if self.outgoing:
            return self.outgoing[-1].state
        assert self.latest is not None
        return self.latest.state

    def spendable(self) -> Assets:
        """My balance at the tip, less payments queued but not yet proposed."""
        if self.latest is None:
            return Assets()
        balance = self.tip().balance_of(self.me)
        if balance.covers(self.queued_total):
            return balance - self.queued_total
        return Assets()


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class ActionPay:
    """Pay `amount` to the peer; `payment_id` names it in the events."""

    payment_id: int
    amount: Assets


@dataclass(frozen=True, slots=True)
class ActionConfirmLock:
    """My channel with the hub now holds this thread (double-signed)."""


@dataclass(frozen=True, slots=True)
class ActionCloseThread:
    """Stop paying and agree a final state with the peer; `force` finalizes without it."""

    force: bool = False


@dataclass(frozen=True, slots=True)
class ActionReconnected:
    """A new stream to the peer is up: send my latest state and retransmit proposals."""


ThreadInput = ActionPay | ActionConfirmLock | ActionCloseThread | ActionReconnected | Receive


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class EventThreadAgreed:
    """The initial state is double-signed: the hub may lock it."""

    initial: SignedThreadState


@dataclass(frozen=True, slots=True)
class EventThreadOpenRefused:
    key: ThreadKey
    reason: RejectReason
    detail: str


@dataclass(frozen=True, slots=True)
class EventPaymentSent:
    key: ThreadKey
    payment_id: int
    amount: Assets
    tx_count: int


@dataclass(frozen=True, slots=True)
class EventPaymentReceived:
    key: ThreadKey
    amount: Assets
    tx_count: int


@dataclass(frozen=True, slots=True)
class EventPaymentFailed:
    key: ThreadKey
    payment_id: int
    reason: RejectReason


@dataclass(frozen=True, slots=True)
class EventThreadFinal:
    """Neither side will propose again: `final` is the state to settle."""

    final: SignedThreadState


# ---------------------------------------------------------------- opening


def propose_thread(
    domain: Domain, signer: Signer, initial: ThreadState, window: int = DEFAULT_WINDOW
) -> Transition[ThreadSide]:
    """A's first step: sign the initial state and send it to B.

    Raises `LocalProtocolError` if the caller is not the sender or the state is not initial.
    """
    if initial.sender != signer.address:
        raise LocalProtocolError("only the thread's sender proposes its initial state")
    if initial.tx_count != 0:
        raise LocalProtocolError("an initial thread state has tx_count 0")
    if window < 1:
        raise LocalProtocolError("window must be at least 1")
    signature = signer.sign_digest(thread_state_digest(domain, initial))
    side = ThreadSide(
        domain=domain,
        me=signer.address,
        initial=initial,
        phase=ThreadPhase.PROPOSED,
        latest=None,
        initial_signature=signature,
        max_signed=0,
        floor=0,
        window=window,
    )
    return Transition(side, (Send(initial.receiver, ThreadOpenProposal(initial, signature)),))


def accept_thread(
    domain: Domain,
    signer: Signer,
    sender: Address,
    proposal: ThreadOpenProposal,
    max_lock: Assets,
    window: int = DEFAULT_WINDOW,
) -> Transition[ThreadSide | None]:
    """B's answer to a `ThreadOpenProposal` from the authenticated peer `sender`.

    Countersigns if the proposal is A's own, addressed to me, initial, validly signed, and
    locks at most `max_lock` of mine; otherwise returns state None, a rejection and a
    `ThreadReject` to send back.
    """
    initial = proposal.initial
    me = signer.address

    def refuse(reason: RejectReason, detail: str) -> Transition[ThreadSide | None]:
        reply = ThreadReject(initial.key, 0, reason, 0, detail)
        return rejected(None, reason, detail, Send(sender, reply))

    if initial.receiver != me or initial.sender != sender:
        return refuse(RejectReason.NOT_A_PARTY, "thread must be from its sender to me")
    if initial.tx_count != 0:
        return refuse(RejectReason.INVALID_TRANSITION, "initial state must have tx_count 0")
    if not is_signed_by(thread_state_digest(domain, initial), proposal.signature, sender):
        return refuse(RejectReason.BAD_SIGNATURE, "initial state not signed by its sender")
    if not max_lock.covers(initial.balance_receiver):
        return refuse(RejectReason.LOCK_REFUSED, "thread locks more of mine than I allow")
    signature = signer.sign_digest(thread_state_digest(domain, initial))
    signed = SignedThreadState(initial, proposal.signature, signature)
    side = ThreadSide(
        domain=domain,
        me=me,
        initial=initial,
        phase=ThreadPhase.AGREED,
        latest=signed,
        initial_signature=None,
        max_signed=0,
        floor=0,
        window=window,
    )
    effects = (
        Send(sender, ThreadCountersign(initial.key, 0, signature)),
        EventThreadAgreed(signed),
    )
    return Transition(side, effects)


def restored_thread(
    domain: Domain,
    me: Address,
    initial: ThreadState,
    latest: SignedThreadState,
    nonce_gap: int,
    window: int = DEFAULT_WINDOW,
) -> ThreadSide:
    """An open thread (locked in my channel) rebuilt from a backup at its double-signed
    `latest`, awaiting sync.

    A close that had begun is forgotten: the peer's resync and a new close decide. I may
    have signed up to `nonce_gap` nonces above `latest` that the backup does not show, so
    `max_signed` counts them as signed. The caller checked the signatures. Raises
    `LocalProtocolError` for an `initial` that is not initial, a `latest` of another thread
    or total, or if I am not a party.
    """
    if me not in (initial.sender, initial.receiver):
        raise LocalProtocolError("I am not a party of the thread")
    if initial.tx_count != 0:
        raise LocalProtocolError("an initial thread state has tx_count 0")
    state = latest.state
    if state.key != initial.key or state.total() != initial.total():
        raise LocalProtocolError("the latest state is not of this thread")
    if window < 1:
        raise LocalProtocolError("window must be at least 1")
    return ThreadSide(
        domain=domain,
        me=me,
        initial=initial,
        phase=ThreadPhase.OPEN,
        latest=latest,
        initial_signature=None,
        max_signed=state.tx_count + nonce_gap,
        floor=0,
        window=window,
        awaiting_sync=True,
    )


# ---------------------------------------------------------------- the step function


def step(side: ThreadSide, event: ThreadInput, signer: Signer) -> Transition[ThreadSide]:
    """Apply one input to `side`; `signer` is my key (its address must be `side.me`)."""
    if isinstance(event, ActionPay):
        return _pay(side, event, signer)
    if isinstance(event, ActionConfirmLock):
        return _confirm_lock(side)
    if isinstance(event, ActionCloseThread):
        return _close(side, event)
    if isinstance(event, ActionReconnected):
        return _reconnected(side, signer)
    return _receive(side, event, signer)


def _pay(side: ThreadSide, action: ActionPay, signer: Signer) -> Transition[ThreadSide]:
    if side.phase in (ThreadPhase.PROPOSED, ThreadPhase.AGREED):
        return rejected(side, RejectReason.THREAD_NOT_OPEN_YET, "thread not locked yet")
    if side.phase is ThreadPhase.REFUSED:
        return rejected(side, RejectReason.THREAD_CLOSED, "thread open was refused")
    if side.phase is ThreadPhase.CLOSING:
        return rejected(side, RejectReason.THREAD_CLOSING, "thread is closing")
    if side.phase is ThreadPhase.FINAL:
        return rejected(side, RejectReason.THREAD_CLOSED, "thread is closed")
    if action.amount.is_zero():
        return rejected(side, RejectReason.EMPTY_PAYMENT, "payment of nothing")
    available = side.spendable()
    if not available.covers(action.amount):
        missing = available.shortfall(action.amount)
        return rejected(
            side,
            RejectReason.INSUFFICIENT_BALANCE,
            f"thread balance short by {missing.eth} wei and {missing.token} token units",
        )
    side = replace(
        side,
        queued=(*side.queued, Queued(action.payment_id, action.amount)),
        queued_total=side.queued_total + action.amount,
    )
    return _pump(side, signer, ())


def _pump(side: ThreadSide, signer: Signer, effects: tuple[object, ...]) -> Transition[ThreadSide]:
    """Propose queued payments while the window, the phase and the conflict rule allow."""
    if side.phase is not ThreadPhase.OPEN or side.in_conflict or side.holding or side.awaiting_sync:
        return Transition(side, effects)
    out = list(side.outgoing)
    queue = list(side.queued)
    sends: list[object] = []
    max_signed = side.max_signed
    tip = side.tip()
    total = side.queued_total
    while queue and len(out) < side.window:
        queued = queue.pop(0)
        total = total - queued.amount
        nonce = next_nonce(max_signed, side.floor)
        state = _pay_state(tip, side.me, queued.amount, nonce)
        signature = signer.sign_digest(thread_state_digest(side.domain, state))
        out.append(Outgoing(queued.payment_id, queued.amount, state, tip.tx_count, signature))
        sends.append(Send(side.peer, ThreadProposal(state, tip.tx_count, signature)))
        max_signed = nonce
        tip = state
    side = replace(
        side, outgoing=tuple(out), queued=tuple(queue), queued_total=total, max_signed=max_signed
    )
    return Transition(side, (*effects, *sends))


def _pay_state(prev: ThreadState, payer: Address, amount: Assets, nonce: int) -> ThreadState:
    if payer == prev.sender:
        return replace(
            prev,
            balance_sender=prev.balance_sender - amount,
            balance_receiver=prev.balance_receiver + amount,
            tx_count=nonce,
        )
    return replace(
        prev,
        balance_sender=prev.balance_sender + amount,
        balance_receiver=prev.balance_receiver - amount,
        tx_count=nonce,
    )


def _confirm_lock(side: ThreadSide) -> Transition[ThreadSide]:
    if side.phase is not ThreadPhase.AGREED:
        return rejected(
            side, RejectReason.INVALID_TRANSITION, f"cannot lock a {side.phase.value} thread"
        )
    return Transition(replace(side, phase=ThreadPhase.OPEN))


def _close(side: ThreadSide, action: ActionCloseThread) -> Transition[ThreadSide]:
    if side.phase in (ThreadPhase.FINAL, ThreadPhase.REFUSED):
        return rejected(side, RejectReason.THREAD_CLOSED, "thread already closed")
    if side.phase is ThreadPhase.PROPOSED:
        return rejected(side, RejectReason.THREAD_NOT_OPEN_YET, "thread not agreed yet")
    if side.phase is ThreadPhase.CLOSING and not action.force:
        return rejected(side, RejectReason.THREAD_CLOSING, "thread already closing")
    failed = tuple(
        EventPaymentFailed(side.key, q.payment_id, RejectReason.THREAD_CLOSING) for q in side.queued
    )
    side = replace(side, phase=ThreadPhase.CLOSING, queued=(), queued_total=NO_ASSETS)
    if action.force:
        # Settle what is double-signed now. Proposals still in flight stay in doubt: the peer
        # may have countersigned them, and if that comes to light the final state moves up.
        side = replace(side, phase=ThreadPhase.FINAL)
        assert side.latest is not None
        return Transition(side, (*failed, EventThreadFinal(side.latest)))
    return _advance_close(side, failed)


def _advance_close(side: ThreadSide, effects: tuple[object, ...]) -> Transition[ThreadSide]:
    """While CLOSING: announce once nothing of mine is in flight; finish once both announced."""
    if side.phase is not ThreadPhase.CLOSING:
        return Transition(side, effects)
    latest = side.latest
    assert latest is not None
    if not side.sent_close and not side.outgoing:
        notice = ThreadCloseNotice(side.key, latest.state.tx_count)
        side = replace(side, sent_close=True)
        effects = (*effects, Send(side.peer, notice))
    if side.sent_close and side.peer_closed:
        side = replace(side, phase=ThreadPhase.FINAL)
        effects = (*effects, EventThreadFinal(latest))
    return Transition(side, effects)


def _reconnected(side: ThreadSide, signer: Signer) -> Transition[ThreadSide]:
    effects: list[object] = []
    if side.phase is ThreadPhase.PROPOSED:
        assert side.initial_signature is not None
        effects.append(Send(side.peer, ThreadOpenProposal(side.initial, side.initial_signature)))
        return Transition(side, tuple(effects))
    # Rejects and resumes in flight were lost with the old stream, so a conflict handshake
    # cannot finish: start afresh. The proposals I retransmit meet the peer's again and a
    # conflict that still stands is detected anew; max_signed alone keeps signing safe.
    side = replace(side, in_conflict=False, holding=False)
    if side.latest is not None:
        effects.append(Send(side.peer, ThreadSync(side.latest)))
        # Retransmit now, before anything new is proposed on the new stream: a proposal that
        # overtook an older one of mine would be refused, and my reaction would break my
        # chain of proposals in two (the later part could be countersigned on its own).
        effects.extend(_retransmit(side))
        if side.sent_close:
            notice = ThreadCloseNotice(side.key, side.latest.state.tx_count)
            effects.append(Send(side.peer, notice))
    # Then go on with payments queued meanwhile (e.g. while holding after a conflict).
    return _pump(side, signer, tuple(effects))


# ---------------------------------------------------------------- peer messages


def _receive(side: ThreadSide, event: Receive, signer: Signer) -> Transition[ThreadSide]:
    message = event.message
    if event.sender != side.peer:
        return rejected(side, RejectReason.NOT_A_PARTY, "message from a non-party")
    if isinstance(message, ThreadProposal):
        return _receive_proposal(side, message, signer)
    if isinstance(message, ThreadCountersign):
        return _receive_countersign(side, message, signer)
    if isinstance(message, ThreadReject):
        return _receive_reject(side, message, signer)
    if isinstance(message, ThreadResume):
        return _receive_resume(side, message, signer)
    if isinstance(message, ThreadCloseNotice):
        return _receive_close_notice(side, message)
    if isinstance(message, ThreadSync):
        return _receive_sync(side, message, signer)
    if isinstance(message, ErrorNotice):
        return rejected(side, message.reason, f"peer error: {message.detail}")
    return rejected(side, RejectReason.POLICY, f"unexpected {type(message).__name__}")


def _reject_proposal(
    side: ThreadSide, tx_count: int, reason: RejectReason, detail: str
) -> Transition[ThreadSide]:
    reply = ThreadReject(side.key, tx_count, reason, side.max_signed, detail)
    return rejected(side, reason, detail, Send(side.peer, reply))


def _receive_proposal(
    side: ThreadSide, proposal: ThreadProposal, signer: Signer
) -> Transition[ThreadSide]:
    state = proposal.state
    nonce = state.tx_count
    if state.key != side.key:
        return _reject_proposal(side, nonce, RejectReason.UNKNOWN_THREAD, "not this thread")
    digest = thread_state_digest(side.domain, state)
    if not is_signed_by(digest, proposal.signature, side.peer):
        return _reject_proposal(side, nonce, RejectReason.BAD_SIGNATURE, "not signed by the peer")
    latest = side.latest
    if latest is not None and state == latest.state:
        # An exact duplicate of what I countersigned last: answer it again.
        mine = latest.sig_receiver if side.me == side.initial.receiver else latest.sig_sender
        return Transition(side, (Send(side.peer, ThreadCountersign(side.key, nonce, mine)),))
    if side.phase is not ThreadPhase.OPEN and not (
        side.phase is ThreadPhase.CLOSING and not side.peer_closed
    ):
        reason = (
            RejectReason.THREAD_NOT_OPEN_YET
            if side.phase in (ThreadPhase.PROPOSED, ThreadPhase.AGREED)
            else RejectReason.THREAD_CLOSED
            if side.phase in (ThreadPhase.FINAL, ThreadPhase.REFUSED)
            else RejectReason.THREAD_CLOSING
        )
        return _reject_proposal(side, nonce, reason, f"thread is {side.phase.value}")
    assert latest is not None
    out_of_order = order_refusal(
        nonce=nonce,
        prev=proposal.prev_tx_count,
        latest=latest.state.tx_count,
        max_signed=side.max_signed,
        has_outgoing=bool(side.outgoing),
        in_conflict=side.in_conflict,
    )
    if out_of_order is not None:
        if out_of_order[0] is RejectReason.NONCE_CONFLICT:
            side = replace(side, in_conflict=True)
        return _reject_proposal(side, nonce, *out_of_order)
    prev = latest.state
    if state.total() != prev.total():
        return _reject_proposal(
            side, nonce, RejectReason.BALANCE_NOT_CONSERVED, "proposal changes the thread total"
        )
    paid = _amount_paid(prev, state, side.peer)
    if paid is None:
        return _reject_proposal(
            side, nonce, RejectReason.INVALID_TRANSITION, "balances must move from the payer"
        )
    if paid.is_zero():
        return _reject_proposal(side, nonce, RejectReason.EMPTY_PAYMENT, "payment of nothing")
    signature = signer.sign_digest(digest)
    if side.me == side.initial.sender:
        signed = SignedThreadState(state, signature, proposal.signature)
    else:
        signed = SignedThreadState(state, proposal.signature, signature)
    side = replace(side, latest=signed, max_signed=nonce)
    effects = (
        Send(side.peer, ThreadCountersign(side.key, nonce, signature)),
        EventPaymentReceived(side.key, paid, nonce),
    )
    if side.awaiting_sync:
        # It built on my latest, so the peer holds nothing newer: what waited may go now.
        return _pump(replace(side, awaiting_sync=False), signer, effects)
    return Transition(side, effects)


def _amount_paid(prev: ThreadState, new: ThreadState, payer: Address) -> Assets | None:
    """What `payer` pays in `prev` -> `new`, or None if that is not a payment by `payer`."""
    payer_before, payer_after = prev.balance_of(payer), new.balance_of(payer)
    payee = prev.receiver if payer == prev.sender else prev.sender
    payee_before, payee_after = prev.balance_of(payee), new.balance_of(payee)
    if not payer_before.covers(payer_after) or not payee_after.covers(payee_before):
        return None
    paid = payer_before - payer_after
    if payee_after - payee_before != paid:
        return None
    return paid


def _receive_countersign(
    side: ThreadSide, message: ThreadCountersign, signer: Signer
) -> Transition[ThreadSide]:
    if message.key != side.key:
        return rejected(side, RejectReason.UNKNOWN_THREAD, "not this thread")
    if side.phase is ThreadPhase.PROPOSED:
        if message.tx_count != 0:
            return rejected(side, RejectReason.UNKNOWN_PROPOSAL, "open not countersigned yet")
        digest = thread_state_digest(side.domain, side.initial)
        if not is_signed_by(digest, message.signature, side.peer):
            return rejected(side, RejectReason.BAD_SIGNATURE, "countersign not by the peer")
        assert side.initial_signature is not None
        signed = SignedThreadState(side.initial, side.initial_signature, message.signature)
        side = replace(side, phase=ThreadPhase.AGREED, latest=signed, initial_signature=None)
        return Transition(side, (EventThreadAgreed(signed),))
    if not side.outgoing or side.outgoing[0].state.tx_count != message.tx_count:
        if side.latest is not None and message.tx_count <= side.latest.state.tx_count:
            return Transition(side)  # a late duplicate: already settled
        return rejected(side, RejectReason.UNKNOWN_PROPOSAL, "no such proposal in flight")
    first = side.outgoing[0]
    digest = thread_state_digest(side.domain, first.state)
    if not is_signed_by(digest, message.signature, side.peer):
        return rejected(side, RejectReason.BAD_SIGNATURE, "countersign not by the peer")
    mine = first.signature
    if side.me == side.initial.sender:
        signed = SignedThreadState(first.state, mine, message.signature)
    else:
        signed = SignedThreadState(first.state, message.signature, mine)
    side = replace(side, latest=signed, outgoing=side.outgoing[1:])
    sent = EventPaymentSent(side.key, first.payment_id, first.amount, first.state.tx_count)
    result = _pump(side, signer, (sent, *_final_moved(side)))
    return _advance_close(result.state, result.effects)


def _final_moved(side: ThreadSide) -> tuple[object, ...]:
    """After a forced close, a proposal in doubt turned out countersigned: a newer final."""
    if side.phase is ThreadPhase.FINAL and side.latest is not None:
        return (EventThreadFinal(side.latest),)
    return ()


def _receive_reject(
    side: ThreadSide, message: ThreadReject, signer: Signer
) -> Transition[ThreadSide]:
    if message.key != side.key:
        return rejected(side, RejectReason.UNKNOWN_THREAD, "not this thread")
    if side.phase is ThreadPhase.PROPOSED and message.tx_count == 0:
        side = replace(side, phase=ThreadPhase.REFUSED)
        return Transition(side, (EventThreadOpenRefused(side.key, message.reason, message.detail),))
    index = next(
        (i for i, o in enumerate(side.outgoing) if o.state.tx_count == message.tx_count), None
    )
    if index is None:
        return Transition(side)  # about a proposal already abandoned or settled
    abandoned = side.outgoing[index:]
    floor = max(side.floor, side.max_signed, message.max_signed)
    effects: list[object] = []
    requeue: list[Queued] = []
    closing = side.phase is not ThreadPhase.OPEN
    for i, o in enumerate(abandoned):
        if closing or (i == 0 and message.reason not in RETRYABLE):
            reason = RejectReason.THREAD_CLOSING if closing and i > 0 else message.reason
            effects.append(EventPaymentFailed(side.key, o.payment_id, reason))
        else:
            requeue.append(Queued(o.payment_id, o.amount))
    side = replace(
        side,
        outgoing=side.outgoing[:index],
        queued=(*requeue, *side.queued),
        queued_total=sum((q.amount for q in requeue), side.queued_total),
        floor=floor,
    )
    outcome = after_refusal(message.reason, side.in_conflict, side.has_priority)
    side = replace(side, in_conflict=False, holding=outcome.holding)
    result = _pump(side, signer, tuple(effects))
    if outcome.send_resume:
        resume = Send(side.peer, ThreadResume(side.key, result.state.max_signed))
        result = Transition(result.state, (*result.effects, resume))
    return _advance_close(result.state, result.effects)


def _receive_resume(
    side: ThreadSide, message: ThreadResume, signer: Signer
) -> Transition[ThreadSide]:
    if message.key != side.key:
        return rejected(side, RejectReason.UNKNOWN_THREAD, "not this thread")
    if side.has_priority:
        return rejected(side, RejectReason.POLICY, "only the priority side hands the turn back")
    side = replace(side, holding=False, in_conflict=False, floor=max(side.floor, message.after))
    result = _pump(side, signer, ())
    return _advance_close(result.state, result.effects)


def _receive_close_notice(side: ThreadSide, message: ThreadCloseNotice) -> Transition[ThreadSide]:
    if message.key != side.key:
        return rejected(side, RejectReason.UNKNOWN_THREAD, "not this thread")
    if side.phase in (ThreadPhase.PROPOSED, ThreadPhase.REFUSED):
        return rejected(side, RejectReason.THREAD_NOT_OPEN_YET, "thread was never agreed")
    if side.phase is ThreadPhase.FINAL or side.peer_closed:
        return Transition(side)  # duplicate notice
    effects: tuple[object, ...] = ()
    if side.phase is not ThreadPhase.CLOSING:
        effects = tuple(
            EventPaymentFailed(side.key, q.payment_id, RejectReason.THREAD_CLOSING)
            for q in side.queued
        )
        side = replace(side, phase=ThreadPhase.CLOSING, queued=(), queued_total=NO_ASSETS)
    side = replace(side, peer_closed=True)
    return _advance_close(side, effects)


def _receive_sync(side: ThreadSide, message: ThreadSync, signer: Signer) -> Transition[ThreadSide]:
    theirs = message.latest
    state = theirs.state
    if state.key != side.key:
        return rejected(side, RejectReason.UNKNOWN_THREAD, "not this thread")
    digest = thread_state_digest(side.domain, state)
    if not (
        is_signed_by(digest, theirs.sig_sender, state.sender)
        and is_signed_by(digest, theirs.sig_receiver, state.receiver)
    ):
        return rejected(side, RejectReason.BAD_SIGNATURE, "synced state is not double-signed")
    if state.total() != side.initial.total():
        return rejected(side, RejectReason.BALANCE_NOT_CONSERVED, "synced state changes the total")
    latest = side.latest
    if side.phase is ThreadPhase.PROPOSED and state.tx_count == 0:
        side = replace(side, phase=ThreadPhase.AGREED, latest=theirs, initial_signature=None)
        return Transition(side, (EventThreadAgreed(theirs),))
    if latest is None:
        return Transition(side)
    if state.tx_count < latest.state.tx_count:
        # The peer is behind (it may have missed my own sync): answer with my latest.
        reply: tuple[object, ...] = (Send(side.peer, ThreadSync(latest)),)
        if not side.awaiting_sync:
            return Transition(side, reply)
        side = replace(side, awaiting_sync=False)
        result = _pump(side, signer, reply)
        return _advance_close(result.state, result.effects)
    if state.tx_count == latest.state.tx_count:
        if not side.awaiting_sync:
            return Transition(side)  # not newer: my proposals were retransmitted on reconnect
        result = _pump(replace(side, awaiting_sync=False), signer, ())
        return _advance_close(result.state, result.effects)
    # The peer countersigned proposals of mine whose acknowledgements I never got.
    effects: list[object] = []
    remaining = []
    for o in side.outgoing:
        if o.state.tx_count <= state.tx_count:
            effects.append(EventPaymentSent(side.key, o.payment_id, o.amount, o.state.tx_count))
        else:
            remaining.append(o)
    side = replace(
        side,
        latest=theirs,
        outgoing=tuple(remaining),
        max_signed=max(side.max_signed, state.tx_count),
        awaiting_sync=False,
    )
    side, failed = _fit_queue(side)
    result = _pump(side, signer, (*effects, *failed, *_final_moved(side)))
    return _advance_close(result.state, result.effects)


def _fit_queue(side: ThreadSide) -> tuple[ThreadSide, tuple[object, ...]]:
    """Fail the queued payments my balance at the tip no longer covers (in order).

    Only a side restored from an older backup can find its balance lower after a sync (the
    adopted state holds payments of mine it had forgotten); otherwise nothing changes.
    """
    available = side.tip().balance_of(side.me)
    if available.covers(side.queued_total):
        return side, ()
    kept: list[Queued] = []
    failed: list[object] = []
    total = NO_ASSETS
    for q in side.queued:
        if available.covers(total + q.amount):
            kept.append(q)
            total = total + q.amount
        else:
            failed.append(
                EventPaymentFailed(side.key, q.payment_id, RejectReason.INSUFFICIENT_BALANCE)
            )
    return replace(side, queued=tuple(kept), queued_total=total), tuple(failed)


def _retransmit(side: ThreadSide) -> tuple[object, ...]:
    """Resend my proposals still in flight (receivers accept exact duplicates)."""
    return tuple(
        Send(side.peer, ThreadProposal(o.state, o.prev_tx_count, o.signature))
        for o in side.outgoing
    )
