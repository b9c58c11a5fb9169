"""The channel state machine (`protocols.channel`): every update type, every refusal, threads'
money flow, hub/user conflicts, contract calls and resync.

Hub and user machines are joined by `tests.protocols.pair.Pair` (`pair.a` is the hub,
`pair.b` the user). They sign through a `RecordingSigner`, and a `Recorder` keeps every
channel state that crossed the link, so tests can check that nobody signed two different
states at the same txCount.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import replace

import pytest

from protocols.channel import (
    ActionProposeUpdate,
    ActionReconnected,
    ChannelInput,
    ChannelSide,
    ContractReceiveBlock,
    ContractReceiveChannelUpdated,
    ContractSendAuthorizedUpdate,
    EventChannelSynced,
    EventChannelUpdated,
    EventUpdateFailed,
    SignedChannelState,
    apply_update,
    new_channel,
    step,
)
from protocols.effects import Receive, Send, Transition
from protocols.eip712 import Domain, channel_state_digest, thread_state_digest
from protocols.errors import LocalProtocolError
from protocols.messages import (
    ChannelCountersign,
    ChannelProposal,
    ChannelReject,
    ChannelResume,
    ChannelSync,
    ChannelUpdate,
    ErrorNotice,
    Message,
    RejectReason,
    SignedThreadState,
    UpdateCloseThread,
    UpdateConfirmPending,
    UpdateInvalidatePending,
    UpdateOpenThread,
    UpdatePayment,
    UpdatePending,
)
from protocols.signing import Signer, is_signed_by
from protocols.thread_root import EMPTY_THREAD_ROOT, thread_root
from protocols.types import (
    NO_ASSETS,
    UINT256_MAX,
    ZERO_ADDRESS,
    Address,
    Assets,
    ChannelState,
    Party,
    Signature,
    ThreadKey,
    ThreadState,
)
from tests.protocols.pair import End, Pair, RecordingSigner

DOMAIN = Domain(1337, Address(b"\x22" * 20))
HUB_KEY = (20).to_bytes(32, "big")
USER_A_KEY = (21).to_bytes(32, "big")
USER_B_KEY = (22).to_bytes(32, "big")
STRANGER_KEY = (23).to_bytes(32, "big")
# Plain signers stand for parties acting by hand (forged or hand-built messages, thread
# states signed by the thread's parties); the double-sign check does not count them.
HUB, USER_A, USER_B, STRANGER = (
    Signer(HUB_KEY),
    Signer(USER_A_KEY),
    Signer(USER_B_KEY),
    Signer(STRANGER_KEY),
)
TIMEOUT = 100


class Recorder:
    """Steps channel machines and remembers every channel state seen on the link."""

    def __init__(self, thread_nonces: Mapping[ThreadKey, int] | None = None) -> None:
        self.states: dict[bytes, ChannelState] = {}
        self.thread_nonces = thread_nonces

    def scan(self, message: Message) -> None:
        if isinstance(message, ChannelProposal | ChannelSync):
            self.states[channel_state_digest(DOMAIN, message.state)] = message.state

    def step(
        self, side: ChannelSide, event: ChannelInput, signer: Signer
    ) -> Transition[ChannelSide]:
        if isinstance(event, Receive):
            self.scan(event.message)
        result = step(side, event, signer, self.thread_nonces)
        for effect in result.effects:
            if isinstance(effect, Send):
                self.scan(effect.message)
        return result

    def assert_no_double_sign(self, *signers: RecordingSigner) -> None:
        for signer in signers:
            by_nonce: dict[tuple[Address, int], set[ChannelState]] = defaultdict(set)
            for digest in signer.digests:
                assert digest in self.states, f"{signer} signed a state never seen on the link"
                state = self.states[digest]
                by_nonce[(state.user, state.tx_count_global)].add(state)
            for (_, tx_count), states in by_nonce.items():
                assert len(states) == 1, f"{signer} signed {len(states)} states at {tx_count}"


def channel_pair(
    user_key: bytes = USER_A_KEY, max_threads: int = 64, recorder: Recorder | None = None
) -> tuple[Pair, Recorder]:
    """A fresh channel: `pair.a` is the hub, `pair.b` the user."""
    recorder = recorder or Recorder()
    hub_signer, user_signer = RecordingSigner(HUB_KEY), RecordingSigner(user_key)
    hub_side = new_channel(DOMAIN, Party.HUB, hub_signer.address, user_signer.address, max_threads)
    user_side = new_channel(
        DOMAIN, Party.USER, hub_signer.address, user_signer.address, max_threads
    )
    return Pair(recorder.step, End(hub_side, hub_signer), End(user_side, user_signer)), recorder


def latest(end: End) -> ChannelState:
    return end.state.latest.state


def events_of(end: End, kind: type) -> list:
    return [e for e in end.events if isinstance(e, kind)]


def clear_events(pair: Pair) -> None:
    for end in (pair.a, pair.b):
        end.events.clear()
        end.rejections.clear()


def assert_double_signed(signed: SignedChannelState, hub: Address, user: Address) -> None:
    digest = channel_state_digest(DOMAIN, signed.state)
    assert signed.sig_hub is not None and signed.sig_user is not None
    assert is_signed_by(digest, signed.sig_hub, hub)
    assert is_signed_by(digest, signed.sig_user, user)


def assert_agreed(pair: Pair) -> None:
    """Link quiet, both at the same double-signed state and thread set, nothing pending."""
    hub, user = pair.a, pair.b
    assert not hub.inbox and not user.inbox
    assert hub.state.latest == user.state.latest
    assert hub.state.threads == user.state.threads
    assert_double_signed(hub.state.latest, hub.address, user.address)
    for end in (hub, user):
        assert end.state.outgoing is None and not end.state.queued
        assert not end.state.in_conflict and not end.state.holding


def propose(pair: Pair, end: End, update: ChannelUpdate) -> Transition[ChannelSide]:
    """`end` proposes `update`; the link is drained; the update must have gone through."""
    result = pair.input(end, ActionProposeUpdate(update))
    assert result.accepted, result.rejection
    pair.drain()
    assert_agreed(pair)
    return result


def executed(pair: Pair) -> None:
    """The contract executed the pending state: both sides see the event."""
    event = ContractReceiveChannelUpdated(pair.b.address, latest(pair.a).tx_count_onchain)
    for end in (pair.a, pair.b):
        assert pair.input(end, event).accepted


def block(pair: Pair, timestamp: int) -> None:
    for end in (pair.a, pair.b):
        pair.input(end, ContractReceiveBlock(timestamp))


def pending(
    deposit_hub: Assets = NO_ASSETS,
    deposit_user: Assets = NO_ASSETS,
    withdrawal_hub: Assets = NO_ASSETS,
    withdrawal_user: Assets = NO_ASSETS,
    recipient: Address | None = None,
    timeout: int = TIMEOUT,
) -> UpdatePending:
    return UpdatePending(
        deposit_hub,
        deposit_user,
        withdrawal_hub,
        withdrawal_user,
        recipient if recipient is not None else USER_A.address,
        timeout,
    )


def fund(pair: Pair, user: Assets = NO_ASSETS, hub: Assets = NO_ASSETS) -> None:
    """Deposit into the channel through the full two-phase flow; events cleared after."""
    now = pair.a.state.now
    for end, update in (
        (pair.b, pending(deposit_user=user, recipient=pair.b.address, timeout=now + TIMEOUT)),
        (
            pair.a,
            pending(deposit_hub=hub, recipient=latest(pair.a).recipient, timeout=now + TIMEOUT),
        ),
    ):
        if update.deposit_user.is_zero() and update.deposit_hub.is_zero():
            continue
        propose(pair, end, update)
        executed(pair)
        propose(pair, end, UpdateConfirmPending(latest(pair.a).tx_count_onchain))
    clear_events(pair)


def pay(payer: Party, amount: Assets, forward_to: Address = ZERO_ADDRESS) -> UpdatePayment:
    return UpdatePayment(payer, amount, forward_to)


def raw_proposal(
    signer: Signer, update: ChannelUpdate, state: ChannelState, prev: int | None = None
) -> ChannelProposal:
    """`state` signed by `signer`, built on txCount `prev` (default: the one before it)."""
    prev = state.tx_count_global - 1 if prev is None else prev
    signature = signer.sign_digest(channel_state_digest(DOMAIN, state))
    return ChannelProposal(update, state, prev, signature)


def true_state(end: End, proposer: Party, update: ChannelUpdate) -> ChannelState:
    """What `update` by `proposer` honestly makes of the receiver `end`'s latest state."""
    state, _ = apply_update(end.state, proposer, update, end.state.max_signed + 1)
    return state


def next_state(end: End, **changes: object) -> ChannelState:
    """The receiver's latest state at its next txCount, with `changes`."""
    return replace(latest(end), tx_count_global=end.state.max_signed + 1, **changes)  # type: ignore[arg-type]


def expect_refused(
    receiver: End,
    sender: Address,
    message: Message,
    reason: RejectReason,
    thread_nonces: Mapping[ThreadKey, int] | None = None,
) -> Transition[ChannelSide]:
    old = receiver.state
    result = step(old, Receive(sender, message), receiver.signer, thread_nonces)
    assert result.rejection is not None, "expected a rejection"
    assert result.rejection.reason is reason, result.rejection
    assert result.state is old
    return result


def expect_proposal_refused(
    pair: Pair,
    receiver: End,
    proposal: ChannelProposal,
    reason: RejectReason,
    thread_nonces: Mapping[ThreadKey, int] | None = None,
) -> str:
    """`receiver` refuses the peer's proposal, replies why with its max_signed; the detail."""
    old = receiver.state
    peer = pair.other(receiver)
    result = expect_refused(receiver, peer.address, proposal, reason, thread_nonces)
    (reply,) = result.effects
    assert isinstance(reply, Send) and reply.to == peer.address
    message = reply.message
    assert isinstance(message, ChannelReject)
    assert (message.user, message.tx_count_global, message.reason, message.max_signed) == (
        old.user,
        proposal.state.tx_count_global,
        reason,
        old.max_signed,
    )
    return message.detail


def thread_initial(
    a: Assets, b: Assets, thread_id: int = 1, sender: Signer = USER_A, receiver: Signer = USER_B
) -> ThreadState:
    return ThreadState(thread_id, sender.address, receiver.address, a, b, 0)


def double_sign(
    state: ThreadState, sender: Signer = USER_A, receiver: Signer = USER_B
) -> SignedThreadState:
    digest = thread_state_digest(DOMAIN, state)
    return SignedThreadState(state, sender.sign_digest(digest), receiver.sign_digest(digest))


def open_update(signed: SignedThreadState) -> UpdateOpenThread:
    return UpdateOpenThread(signed.state, signed.sig_sender, signed.sig_receiver)


def close_update(signed: SignedThreadState) -> UpdateCloseThread:
    return UpdateCloseThread(signed.state, signed.sig_sender, signed.sig_receiver)


# ---------------------------------------------------------------- genesis


def test_new_channel_starts_at_genesis() -> None:
    side = new_channel(DOMAIN, Party.USER, HUB.address, USER_A.address)
    state = side.latest.state
    assert side.me == USER_A.address and side.peer == HUB.address
    assert (state.tx_count_global, state.tx_count_onchain) == (0, 0)
    assert state.thread_root == EMPTY_THREAD_ROOT and state.thread_count == 0
    assert state.recipient == USER_A.address and not state.has_pending()
    assert side.latest.sig_hub is None and side.latest.sig_user is None
    with pytest.raises(LocalProtocolError):
        new_channel(DOMAIN, Party.HUB, HUB.address, HUB.address)
    # Nothing double-signed yet: a reconnect sends no sync.
    assert step(side, ActionReconnected(), USER_A).effects == ()


# ---------------------------------------------------------------- deposits and withdrawals


def test_user_deposit_two_phase() -> None:
    pair, recorder = channel_pair()
    hub, user = pair.a, pair.b
    deposit = pending(deposit_user=Assets(100, 7), timeout=TIMEOUT)
    propose(pair, user, deposit)
    state = latest(user)
    assert state.pending_deposit_user == Assets(100, 7)
    assert state.balance_user == NO_ASSETS  # credited only once executed
    assert (state.tx_count_global, state.tx_count_onchain, state.timeout) == (1, 1, TIMEOUT)
    # The user submits its own deposit (it sends the funds with the call); the hub does not.
    assert events_of(user, ContractSendAuthorizedUpdate) == [
        ContractSendAuthorizedUpdate(user.state.latest)
    ]
    assert events_of(hub, ContractSendAuthorizedUpdate) == []
    assert events_of(user, EventChannelUpdated) == [
        EventChannelUpdated(deposit, user.state.latest, Party.USER)
    ]
    assert events_of(hub, EventChannelUpdated) == [
        EventChannelUpdated(deposit, hub.state.latest, Party.USER)
    ]
    # Not executed yet: the user's own check refuses a confirm.
    old = user.state
    early = pair.input(user, ActionProposeUpdate(UpdateConfirmPending(1)))
    assert early.rejection is not None
    assert early.rejection.reason is RejectReason.NOT_EXECUTED_ONCHAIN
    assert early.state is old and not hub.inbox
    executed(pair)
    propose(pair, hub, UpdateConfirmPending(1))  # either side may confirm
    state = latest(user)
    assert state.balance_user == Assets(100, 7) and state.balance_hub == NO_ASSETS
    assert not state.has_pending() and state.timeout == 0
    assert (state.tx_count_global, state.tx_count_onchain) == (2, 1)
    recorder.assert_no_double_sign(hub.signer, user.signer)


def test_hub_deposit_is_submitted_by_the_hub() -> None:
    pair, recorder = channel_pair()
    hub, user = pair.a, pair.b
    propose(pair, hub, pending(deposit_hub=Assets(500, 50)))
    assert events_of(hub, ContractSendAuthorizedUpdate) == [
        ContractSendAuthorizedUpdate(hub.state.latest)
    ]
    assert events_of(user, ContractSendAuthorizedUpdate) == []
    executed(pair)
    propose(pair, user, UpdateConfirmPending(1))
    assert latest(hub).balance_hub == Assets(500, 50)
    assert latest(hub).balance_user == NO_ASSETS
    recorder.assert_no_double_sign(hub.signer, user.signer)


def test_user_withdrawal_is_submitted_by_the_hub() -> None:
    pair, recorder = channel_pair()
    hub, user = pair.a, pair.b
    fund(pair, user=Assets(100, 10), hub=Assets(40, 4))
    elsewhere = STRANGER.address
    withdrawal = pending(withdrawal_user=Assets(30, 3), recipient=elsewhere, timeout=TIMEOUT)
    propose(pair, user, withdrawal)
    state = latest(hub)
    assert state.balance_user == Assets(70, 7)  # excluded from the balance at once
    assert state.pending_withdrawal_user == Assets(30, 3)
    assert state.recipient == elsewhere
    assert events_of(hub, ContractSendAuthorizedUpdate) == [
        ContractSendAuthorizedUpdate(hub.state.latest)
    ]
    assert events_of(user, ContractSendAuthorizedUpdate) == []
    executed(pair)
    propose(pair, user, UpdateConfirmPending(state.tx_count_onchain))
    state = latest(hub)
    assert state.balance_user == Assets(70, 7) and state.balance_hub == Assets(40, 4)
    assert not state.has_pending()
    recorder.assert_no_double_sign(hub.signer, user.signer)


def test_hub_withdrawal() -> None:
    pair, _ = channel_pair()
    hub = pair.a
    fund(pair, hub=Assets(40, 4))
    propose(pair, hub, pending(withdrawal_hub=Assets(40, 1), timeout=TIMEOUT))
    assert latest(hub).balance_hub == Assets(0, 3)
    assert events_of(hub, ContractSendAuthorizedUpdate) != []


def test_unexecuted_deposit_is_invalidated_after_its_timeout() -> None:
    pair, recorder = channel_pair()
    hub, user = pair.a, pair.b
    fund(pair, user=Assets(10, 0))
    propose(pair, user, pending(deposit_user=Assets(5, 5), timeout=TIMEOUT))
    old = user.state
    early = pair.input(user, ActionProposeUpdate(UpdateInvalidatePending(2)))
    assert early.rejection is not None
    assert early.rejection.reason is RejectReason.TIMEOUT_NOT_PASSED
    assert early.state is old
    block(pair, TIMEOUT)
    propose(pair, user, UpdateInvalidatePending(2))
    state = latest(hub)
    assert state.balance_user == Assets(10, 0) and not state.has_pending()
    assert state.timeout == 0 and state.tx_count_onchain == 2
    recorder.assert_no_double_sign(hub.signer, user.signer)


def test_unexecuted_withdrawal_is_invalidated_and_refunded() -> None:
    pair, _ = channel_pair()
    hub, user = pair.a, pair.b
    fund(pair, user=Assets(10, 3), hub=Assets(8, 0))
    propose(pair, user, pending(withdrawal_user=Assets(4, 3), timeout=TIMEOUT))
    assert latest(hub).balance_user == Assets(6, 0)
    block(pair, TIMEOUT + 50)
    propose(pair, hub, UpdateInvalidatePending(latest(hub).tx_count_onchain))
    assert latest(user).balance_user == Assets(10, 3)
    assert latest(user).balance_hub == Assets(8, 0)


def test_blocks_and_chain_events() -> None:
    pair, _ = channel_pair()
    user = pair.b
    pair.input(user, ContractReceiveBlock(50))
    pair.input(user, ContractReceiveBlock(40))  # time never goes back
    assert user.state.now == 50
    pair.input(user, ContractReceiveChannelUpdated(user.address, 3))
    pair.input(user, ContractReceiveChannelUpdated(user.address, 2))
    assert user.state.onchain_executed == 3
    old = user.state
    other = pair.input(user, ContractReceiveChannelUpdated(STRANGER.address, 9))
    assert other.rejection is not None
    assert other.rejection.reason is RejectReason.UNKNOWN_CHANNEL
    assert other.state is old


# ---------------------------------------------------------------- payments


def test_payments_both_ways() -> None:
    pair, recorder = channel_pair()
    hub, user = pair.a, pair.b
    fund(pair, user=Assets(100, 10), hub=Assets(50, 5))
    propose(pair, user, pay(Party.USER, Assets(30, 1)))
    assert (latest(hub).balance_user, latest(hub).balance_hub) == (Assets(70, 9), Assets(80, 6))
    propose(pair, hub, pay(Party.HUB, Assets(80, 6), forward_to=USER_B.address))
    assert (latest(user).balance_user, latest(user).balance_hub) == (Assets(150, 15), NO_ASSETS)
    updated = events_of(user, EventChannelUpdated)
    assert [(e.update.payer, e.proposed_by) for e in updated] == [
        (Party.USER, Party.USER),
        (Party.HUB, Party.HUB),
    ]
    assert updated[1].update.forward_to == USER_B.address
    assert events_of(hub, ContractSendAuthorizedUpdate) == []
    recorder.assert_no_double_sign(hub.signer, user.signer)


def test_updates_queue_behind_the_one_in_flight() -> None:
    pair, recorder = channel_pair()
    hub, user = pair.a, pair.b
    fund(pair, user=Assets(100, 0))
    for amount in (10, 20, 30):
        assert pair.input(user, ActionProposeUpdate(pay(Party.USER, Assets(amount)))).accepted
    assert len(hub.inbox) == 1 and len(user.state.queued) == 2
    # Queued updates are checked when their turn comes: this one no longer fits.
    pair.input(user, ActionProposeUpdate(pay(Party.USER, Assets(50))))
    pair.drain()
    assert latest(hub).balance_user == Assets(40, 0)
    (failed,) = events_of(user, EventUpdateFailed)
    assert failed.update == pay(Party.USER, Assets(50))
    assert failed.reason is RejectReason.INSUFFICIENT_BALANCE
    assert_agreed(pair)
    recorder.assert_no_double_sign(hub.signer, user.signer)


def test_local_proposal_is_checked_at_once() -> None:
    pair, _ = channel_pair()
    user = pair.b
    old = user.state
    result = pair.input(user, ActionProposeUpdate(pay(Party.USER, Assets(1))))
    assert result.rejection is not None
    assert result.rejection.reason is RejectReason.INSUFFICIENT_BALANCE
    assert result.state is old and result.effects == ()


# ---------------------------------------------------------------- threads: money flow


def two_channels() -> tuple[Pair, Pair, Recorder]:
    """A's channel and B's channel with the same hub, both funded."""
    recorder = Recorder()
    pair_a, _ = channel_pair(USER_A_KEY, recorder=recorder)
    pair_b, _ = channel_pair(USER_B_KEY, recorder=recorder)
    fund(pair_a, user=Assets(100, 10), hub=Assets(60, 6))
    fund(pair_b, user=Assets(50, 5), hub=Assets(120, 12))
    return pair_a, pair_b, recorder


def balances(pair: Pair) -> tuple[Assets, Assets]:
    """(user, hub) balances of a channel."""
    state = latest(pair.a)
    return state.balance_user, state.balance_hub


def test_thread_open_and_close_money_flow_in_both_channels() -> None:
    pair_a, pair_b, recorder = two_channels()
    lock_a, lock_b = Assets(30, 3), Assets(20, 2)
    initial = double_sign(thread_initial(lock_a, lock_b))
    # The hub proposes the lock in A's channel; B proposes it in its own channel.
    propose(pair_a, pair_a.a, open_update(initial))
    propose(pair_b, pair_b.b, open_update(initial))
    # A's channel: A locks its part, the hub locks B's part.
    assert balances(pair_a) == (Assets(70, 7), Assets(40, 4))
    # B's channel: B locks its part, the hub locks A's part.
    assert balances(pair_b) == (Assets(30, 3), Assets(90, 9))
    for pair in (pair_a, pair_b):
        state = latest(pair.a)
        assert state.thread_count == 1
        assert state.thread_root == thread_root([initial.state])
        assert pair.a.state.threads == (initial,)
        assert pair.a.state.open_thread(initial.state.key) == initial
    # Inside the thread A pays B 12 wei and 1 token unit.
    final = double_sign(
        replace(
            initial.state,
            balance_sender=Assets(18, 2),
            balance_receiver=Assets(32, 3),
            tx_count=5,
        )
    )
    propose(pair_a, pair_a.b, close_update(final))
    propose(pair_b, pair_b.a, close_update(final))
    # A's channel pays A its final part and the hub B's final part; B's channel the reverse.
    assert balances(pair_a) == (Assets(88, 9), Assets(72, 7))
    assert balances(pair_b) == (Assets(62, 6), Assets(108, 11))
    for pair in (pair_a, pair_b):
        assert latest(pair.a).thread_count == 0
        assert latest(pair.a).thread_root == EMPTY_THREAD_ROOT
        assert pair.a.state.threads == ()
    # The hub is neutral: its total over both channels is what it was.
    hub_before = Assets(60, 6) + Assets(120, 12)
    assert balances(pair_a)[1] + balances(pair_b)[1] == hub_before
    # And the users' totals moved by exactly the thread payment.
    assert balances(pair_a)[0] == Assets(100, 10) - Assets(12, 1)
    assert balances(pair_b)[0] == Assets(50, 5) + Assets(12, 1)
    recorder.assert_no_double_sign(pair_a.a.signer, pair_a.b.signer, pair_b.b.signer)


def test_half_open_thread_refunds_exactly() -> None:
    pair_a, _, _ = two_channels()
    before = latest(pair_a.a)
    initial = double_sign(thread_initial(Assets(30, 3), Assets(20, 2)))
    propose(pair_a, pair_a.a, open_update(initial))
    propose(pair_a, pair_a.a, close_update(initial))  # refund at the initial state
    after = latest(pair_a.a)
    assert after == replace(before, tx_count_global=before.tx_count_global + 2)


def test_several_threads_and_closing_one() -> None:
    pair_a, _, _ = two_channels()
    first = double_sign(thread_initial(Assets(10), Assets(1), thread_id=1))
    second = double_sign(thread_initial(Assets(5), Assets(0), thread_id=2))
    # A is the receiver of a third thread, opened by B.
    third = double_sign(
        thread_initial(Assets(2), Assets(3), thread_id=3, sender=USER_B, receiver=USER_A),
        sender=USER_B,
        receiver=USER_A,
    )
    for signed in (first, second, third):
        propose(pair_a, pair_a.a, open_update(signed))
    state = latest(pair_a.a)
    assert state.thread_count == 3
    assert state.thread_root == thread_root([first.state, second.state, third.state])
    assert balances(pair_a) == (Assets(100 - 10 - 5 - 3, 10), Assets(60 - 1 - 0 - 2, 6))
    propose(pair_a, pair_a.b, close_update(second))
    state = latest(pair_a.a)
    assert state.thread_count == 2
    assert state.thread_root == thread_root([first.state, third.state])
    assert balances(pair_a) == (Assets(100 - 10 - 3, 10), Assets(60 - 1 - 2, 6))


# ---------------------------------------------------------------- refusals of peer proposals


@pytest.fixture
def funded() -> Pair:
    pair, _ = channel_pair()
    fund(pair, user=Assets(100, 10), hub=Assets(50, 5))
    return pair


def with_user_deposit_pending(pair: Pair) -> None:
    propose(pair, pair.b, pending(deposit_user=Assets(5), timeout=pair.a.state.now + TIMEOUT))
    clear_events(pair)


def test_refused_pending_outstanding(funded: Pair) -> None:
    with_user_deposit_pending(funded)
    update = pending(deposit_user=Assets(1), timeout=TIMEOUT)
    proposal = raw_proposal(USER_A, update, next_state(funded.a))
    expect_proposal_refused(funded, funded.a, proposal, RejectReason.PENDING_OUTSTANDING)


@pytest.mark.parametrize("update", [UpdateConfirmPending(2), UpdateInvalidatePending(2)])
def test_refused_no_pending(funded: Pair, update: ChannelUpdate) -> None:
    proposal = raw_proposal(USER_A, update, next_state(funded.a))
    expect_proposal_refused(funded, funded.a, proposal, RejectReason.NO_PENDING)


def test_refused_not_executed_onchain(funded: Pair) -> None:
    with_user_deposit_pending(funded)
    onchain = latest(funded.a).tx_count_onchain
    proposal = raw_proposal(USER_A, UpdateConfirmPending(onchain), next_state(funded.a))
    expect_proposal_refused(funded, funded.a, proposal, RejectReason.NOT_EXECUTED_ONCHAIN)


def test_refused_already_executed_onchain(funded: Pair) -> None:
    with_user_deposit_pending(funded)
    executed(funded)
    block(funded, 10 * TIMEOUT)
    onchain = latest(funded.a).tx_count_onchain
    proposal = raw_proposal(USER_A, UpdateInvalidatePending(onchain), next_state(funded.a))
    expect_proposal_refused(funded, funded.a, proposal, RejectReason.ALREADY_EXECUTED_ONCHAIN)


def test_refused_timeout_not_passed(funded: Pair) -> None:
    with_user_deposit_pending(funded)
    onchain = latest(funded.a).tx_count_onchain
    proposal = raw_proposal(USER_A, UpdateInvalidatePending(onchain), next_state(funded.a))
    expect_proposal_refused(funded, funded.a, proposal, RejectReason.TIMEOUT_NOT_PASSED)


def test_refused_confirm_of_another_pending_update(funded: Pair) -> None:
    with_user_deposit_pending(funded)
    executed(funded)
    onchain = latest(funded.a).tx_count_onchain
    proposal = raw_proposal(USER_A, UpdateConfirmPending(onchain + 1), next_state(funded.a))
    expect_proposal_refused(funded, funded.a, proposal, RejectReason.INVALID_TRANSITION)


@pytest.mark.parametrize("timeout", [0, 10, 10 + 3601])
def test_refused_timeout_passed(funded: Pair, timeout: int) -> None:
    block(funded, 10)
    update = pending(deposit_user=Assets(1), timeout=timeout)
    proposal = raw_proposal(USER_A, update, next_state(funded.a))
    expect_proposal_refused(funded, funded.a, proposal, RejectReason.TIMEOUT_PASSED)


def test_refused_thread_already_open(funded: Pair) -> None:
    initial = double_sign(thread_initial(Assets(1), Assets(1)))
    propose(funded, funded.a, open_update(initial))
    proposal = raw_proposal(USER_A, open_update(initial), next_state(funded.a))
    expect_proposal_refused(funded, funded.a, proposal, RejectReason.THREAD_ALREADY_OPEN)


def test_refused_reopening_a_closed_thread_key(funded: Pair) -> None:
    """A thread key is used once: the contract could not tell the two threads apart."""
    initial = double_sign(thread_initial(Assets(1), Assets(1)))
    propose(funded, funded.a, open_update(initial))
    propose(funded, funded.a, close_update(initial))
    for side in (funded.a, funded.b):
        assert side.state.closed_threads == {initial.state.key}
        assert side.state.threads == ()
    proposal = raw_proposal(USER_A, open_update(initial), next_state(funded.a))
    detail = expect_proposal_refused(funded, funded.a, proposal, RejectReason.THREAD_ALREADY_OPEN)
    assert detail == "thread key used before"


def test_refused_thread_not_open(funded: Pair) -> None:
    final = double_sign(thread_initial(Assets(1), Assets(1)))
    proposal = raw_proposal(USER_A, close_update(final), next_state(funded.a))
    expect_proposal_refused(funded, funded.a, proposal, RejectReason.THREAD_NOT_OPEN)


def test_refused_too_many_threads() -> None:
    pair, _ = channel_pair(max_threads=1)
    fund(pair, user=Assets(10), hub=Assets(10))
    propose(pair, pair.a, open_update(double_sign(thread_initial(Assets(1), Assets(1), 1))))
    second = double_sign(thread_initial(Assets(1), Assets(1), 2))
    proposal = raw_proposal(USER_A, open_update(second), next_state(pair.a))
    expect_proposal_refused(pair, pair.a, proposal, RejectReason.TOO_MANY_THREADS)


def test_refused_insufficient_balance(funded: Pair) -> None:
    update = pay(Party.USER, Assets(101, 0))
    proposal = raw_proposal(USER_A, update, next_state(funded.a))
    detail = expect_proposal_refused(funded, funded.a, proposal, RejectReason.INSUFFICIENT_BALANCE)
    assert "1 wei and 0 token units" in detail


def test_refused_insufficient_collateral_for_a_hub_payment(funded: Pair) -> None:
    update = pay(Party.HUB, Assets(50, 8))
    proposal = raw_proposal(HUB, update, next_state(funded.b))
    detail = expect_proposal_refused(
        funded, funded.b, proposal, RejectReason.INSUFFICIENT_COLLATERAL
    )
    assert "0 wei and 3 token units" in detail


def test_refused_insufficient_collateral_for_a_thread(funded: Pair) -> None:
    # A locks 10; the hub must lock B's 57 in A's channel but has 50 wei and 5 units.
    initial = double_sign(thread_initial(Assets(10), Assets(57, 7)))
    proposal = raw_proposal(HUB, open_update(initial), next_state(funded.b))
    detail = expect_proposal_refused(
        funded, funded.b, proposal, RejectReason.INSUFFICIENT_COLLATERAL
    )
    assert "hub short by 7 wei and 2 token units" in detail
    # And the user's own part must be covered too.
    initial = double_sign(thread_initial(Assets(101), Assets(1)))
    proposal = raw_proposal(HUB, open_update(initial), next_state(funded.b))
    expect_proposal_refused(funded, funded.b, proposal, RejectReason.INSUFFICIENT_BALANCE)


@pytest.mark.parametrize(
    "update",
    [
        pay(Party.USER, NO_ASSETS),
        pending(timeout=TIMEOUT),  # moves nothing
    ],
)
def test_refused_empty(funded: Pair, update: ChannelUpdate) -> None:
    proposal = raw_proposal(USER_A, update, next_state(funded.a))
    expect_proposal_refused(funded, funded.a, proposal, RejectReason.EMPTY_PAYMENT)


def test_refused_bad_signature(funded: Pair) -> None:
    update = pay(Party.USER, Assets(1))
    state = next_state(funded.a, balance_user=Assets(99, 10), balance_hub=Assets(51, 5))
    proposal = raw_proposal(STRANGER, update, state)
    expect_proposal_refused(funded, funded.a, proposal, RejectReason.BAD_SIGNATURE)
    # A thread state not signed by both of its parties cannot be locked.
    initial = thread_initial(Assets(1), Assets(1))
    digest = thread_state_digest(DOMAIN, initial)
    half = SignedThreadState(initial, USER_A.sign_digest(digest), STRANGER.sign_digest(digest))
    proposal = raw_proposal(USER_A, open_update(half), next_state(funded.a))
    expect_proposal_refused(funded, funded.a, proposal, RejectReason.BAD_SIGNATURE)


def test_refused_invalid_transition(funded: Pair) -> None:
    hub = funded.a
    # The proposer lies about the balances the payment makes.
    update = pay(Party.USER, Assets(1))
    lie = next_state(hub, balance_user=Assets(99, 10), balance_hub=Assets(61, 5))
    expect_proposal_refused(
        funded, hub, raw_proposal(USER_A, update, lie), RejectReason.INVALID_TRANSITION
    )
    # ... or changes a field the update does not touch.
    truth = next_state(hub, balance_user=Assets(99, 10), balance_hub=Assets(51, 5))
    sneaky = replace(truth, recipient=STRANGER.address)
    expect_proposal_refused(
        funded, hub, raw_proposal(USER_A, update, sneaky), RejectReason.INVALID_TRANSITION
    )
    # A payment is proposed by its payer only.
    hub_pays = pay(Party.HUB, Assets(1))
    expect_proposal_refused(
        funded, hub, raw_proposal(USER_A, hub_pays, truth), RejectReason.INVALID_TRANSITION
    )
    # A thread opens at tx_count 0.
    later = double_sign(replace(thread_initial(Assets(1), Assets(1)), tx_count=1))
    expect_proposal_refused(
        funded,
        hub,
        raw_proposal(USER_A, open_update(later), next_state(hub)),
        RejectReason.INVALID_TRANSITION,
    )
    # The truth itself is countersigned.
    result = step(
        hub.state, Receive(USER_A.address, raw_proposal(USER_A, update, truth)), hub.signer
    )
    assert result.accepted and result.state.latest.state == truth


def test_refused_balance_not_conserved_at_close(funded: Pair) -> None:
    initial = double_sign(thread_initial(Assets(10), Assets(5)))
    propose(funded, funded.a, open_update(initial))
    richer = double_sign(replace(initial.state, balance_receiver=Assets(6), tx_count=1))
    proposal = raw_proposal(USER_A, close_update(richer), next_state(funded.a))
    expect_proposal_refused(funded, funded.a, proposal, RejectReason.BALANCE_NOT_CONSERVED)


def test_refused_stale_thread_state(funded: Pair) -> None:
    initial = double_sign(thread_initial(Assets(10), Assets(5)))
    propose(funded, funded.a, open_update(initial))
    older = double_sign(
        replace(initial.state, balance_sender=Assets(8), balance_receiver=Assets(7), tx_count=3)
    )
    update = close_update(older)
    proposal = raw_proposal(USER_A, update, true_state(funded.a, Party.USER, update))
    nonces = {initial.state.key: 4}
    detail = expect_proposal_refused(
        funded, funded.a, proposal, RejectReason.STALE_THREAD_STATE, nonces
    )
    assert "4" in detail and "3" in detail
    # The newest one is fine, and so is a close when I know no newer state.
    for known in ({initial.state.key: 3}, {}):
        result = step(funded.a.state, Receive(USER_A.address, proposal), funded.a.signer, known)
        assert result.accepted


def test_refused_not_a_party(funded: Pair) -> None:
    hub, user = funded.a, funded.b
    update = pay(Party.USER, Assets(1))
    state = next_state(hub, balance_user=Assets(99, 10), balance_hub=Assets(51, 5))
    for message in (
        raw_proposal(STRANGER, update, state),
        ChannelCountersign(user.address, 1, STRANGER.sign_digest(b"\x00" * 32)),
        ChannelResume(user.address, 3),
        ChannelReject(user.address, 1, RejectReason.POLICY, 0, "x"),
    ):
        result = expect_refused(hub, STRANGER.address, message, RejectReason.NOT_A_PARTY)
        assert result.effects == ()
    # A thread between two other users is not this channel's business.
    other = double_sign(
        thread_initial(Assets(1), Assets(1), sender=USER_B, receiver=STRANGER),
        sender=USER_B,
        receiver=STRANGER,
    )
    proposal = raw_proposal(USER_A, open_update(other), next_state(hub))
    expect_proposal_refused(funded, hub, proposal, RejectReason.NOT_A_PARTY)


@pytest.mark.parametrize(
    ("proposer", "update"),
    [
        ("user", pending(deposit_hub=Assets(1), timeout=TIMEOUT)),
        ("user", pending(withdrawal_hub=Assets(1), timeout=TIMEOUT)),
        ("hub", pending(deposit_user=Assets(1), timeout=TIMEOUT)),
        ("hub", pending(withdrawal_user=Assets(1), timeout=TIMEOUT)),
        ("hub", pending(deposit_hub=Assets(1), recipient=Address(b"\x99" * 20))),
    ],
)
def test_refused_policy(funded: Pair, proposer: str, update: ChannelUpdate) -> None:
    hub, user = funded.a, funded.b
    if proposer == "user":
        proposal = raw_proposal(USER_A, update, next_state(hub))
        expect_proposal_refused(funded, hub, proposal, RejectReason.POLICY)
    else:
        proposal = raw_proposal(HUB, update, next_state(user))
        expect_proposal_refused(funded, user, proposal, RejectReason.POLICY)


def test_refused_amount_overflow() -> None:
    pair, _ = channel_pair()
    hub, user = pair.a, pair.b
    fund(pair, user=Assets(UINT256_MAX, 0), hub=Assets(1, 0))
    update = pending(deposit_user=Assets(1), timeout=TIMEOUT)
    proposal = raw_proposal(USER_A, update, next_state(hub))
    expect_proposal_refused(pair, hub, proposal, RejectReason.AMOUNT_OVERFLOW)
    update = pay(Party.HUB, Assets(1))
    proposal = raw_proposal(HUB, update, next_state(user))
    expect_proposal_refused(pair, user, proposal, RejectReason.AMOUNT_OVERFLOW)


def test_refused_ordering_and_channel(funded: Pair) -> None:
    hub, user = funded.a, funded.b
    update = pay(Party.USER, Assets(1))
    truth = next_state(hub, balance_user=Assets(99, 10), balance_hub=Assets(51, 5))
    gap = replace(truth, tx_count_global=truth.tx_count_global + 1)
    expect_proposal_refused(
        funded,
        hub,
        raw_proposal(USER_A, update, gap, prev=gap.tx_count_global - 1),
        RejectReason.NOT_SUCCESSOR,
    )
    old = replace(truth, tx_count_global=truth.tx_count_global - 1)
    expect_proposal_refused(
        funded, hub, raw_proposal(USER_A, update, old), RejectReason.STALE_NONCE
    )
    other = replace(truth, user=USER_B.address, recipient=USER_B.address)
    expect_proposal_refused(
        funded, hub, raw_proposal(USER_A, update, other), RejectReason.UNKNOWN_CHANNEL
    )
    expect_refused(
        hub,
        user.address,
        ChannelCountersign(STRANGER.address, 1, truth_sig(truth)),
        RejectReason.UNKNOWN_CHANNEL,
    )
    expect_refused(hub, user.address, ErrorNotice(RejectReason.POLICY, "no"), RejectReason.POLICY)
    expect_refused(hub, user.address, ChannelResume(user.address, 5), RejectReason.POLICY)


def truth_sig(state: ChannelState) -> Signature:
    return USER_A.sign_digest(channel_state_digest(DOMAIN, state))


def test_duplicate_of_latest_gets_the_countersign_again(funded: Pair) -> None:
    hub, user = funded.a, funded.b
    propose(funded, user, pay(Party.USER, Assets(1)))
    signed = hub.state.latest
    assert signed.sig_user is not None and signed.sig_hub is not None
    duplicate = ChannelProposal(
        pay(Party.USER, Assets(1)), signed.state, signed.state.tx_count_global - 1, signed.sig_user
    )
    old = hub.state
    result = step(old, Receive(user.address, duplicate), hub.signer)
    assert result.accepted and result.state is old
    assert result.effects == (
        Send(
            user.address,
            ChannelCountersign(user.address, signed.state.tx_count_global, signed.sig_hub),
        ),
    )
    # The user takes the late duplicate quietly.
    old = user.state
    late = step(old, Receive(hub.address, result.effects[0].message), user.signer)
    assert late.accepted and late.effects == () and late.state is old


def test_forged_or_unknown_countersign(funded: Pair) -> None:
    hub, user = funded.a, funded.b
    funded.input(user, ActionProposeUpdate(pay(Party.USER, Assets(1))))
    proposal = hub.inbox[0].message
    assert isinstance(proposal, ChannelProposal)
    forged = ChannelCountersign(
        user.address,
        proposal.state.tx_count_global,
        STRANGER.sign_digest(channel_state_digest(DOMAIN, proposal.state)),
    )
    expect_refused(user, hub.address, forged, RejectReason.BAD_SIGNATURE)
    ahead = ChannelCountersign(user.address, proposal.state.tx_count_global + 1, forged.signature)
    expect_refused(user, hub.address, ahead, RejectReason.UNKNOWN_PROPOSAL)


# ---------------------------------------------------------------- conflicts


def test_conflict_hub_wins_and_the_user_goes_after_resume(funded: Pair) -> None:
    pair = funded
    hub, user = pair.a, pair.b
    before = latest(hub)
    hub_pays = pay(Party.HUB, Assets(5))
    user_pays = pay(Party.USER, Assets(3))
    pair.input(hub, ActionProposeUpdate(hub_pays))
    pair.input(user, ActionProposeUpdate(user_pays))
    pair.deliver(hub)  # the user's proposal meets the hub's at the same txCount
    assert hub.rejections[-1].reason is RejectReason.NONCE_CONFLICT and hub.state.in_conflict
    pair.deliver(user, 1)
    assert user.rejections[-1].reason is RejectReason.NONCE_CONFLICT
    pair.deliver(hub)  # the hub takes the user's reject: re-proposes above, hands back
    assert [type(m.message) for m in user.inbox] == [ChannelReject, ChannelProposal, ChannelResume]
    pair.deliver(user, 1)
    assert user.state.holding and user.state.queued == (user_pays,)
    pair.drain()
    assert_agreed(pair)
    hub_events = events_of(hub, EventChannelUpdated)
    assert [(e.update, e.proposed_by) for e in hub_events] == [
        (hub_pays, Party.HUB),
        (user_pays, Party.USER),
    ]
    assert [e.latest.state.tx_count_global for e in hub_events] == [
        before.tx_count_global + 2,
        before.tx_count_global + 3,
    ]
    assert latest(hub).balance_user == before.balance_user + Assets(5) - Assets(3)
    assert not events_of(hub, EventUpdateFailed) and not events_of(user, EventUpdateFailed)


def test_replayed_proposal_while_one_is_in_flight_is_stale_not_a_conflict(funded: Pair) -> None:
    """Regression: an old proposal sent again must not put me in conflict for good."""
    pair = funded
    hub, user = pair.a, pair.b
    propose(pair, user, pay(Party.USER, Assets(1)))
    first = hub.state.latest
    propose(pair, user, pay(Party.USER, Assets(2)))
    pair.input(hub, ActionProposeUpdate(pay(Party.HUB, Assets(3))))  # in flight
    assert first.sig_user is not None
    replay = ChannelProposal(
        pay(Party.USER, Assets(1)), first.state, first.state.tx_count_global - 1, first.sig_user
    )
    result = pair.input(hub, Receive(user.address, replay))
    assert result.rejection is not None
    assert result.rejection.reason is RejectReason.STALE_NONCE
    assert not hub.state.in_conflict
    pair.drain()
    propose(pair, hub, pay(Party.HUB, Assets(4)))
    assert_agreed(pair)


# ---------------------------------------------------------------- resync


def test_resync_after_a_lost_acknowledgement(funded: Pair) -> None:
    pair = funded
    hub, user = pair.a, pair.b
    update = pay(Party.USER, Assets(7))
    pair.input(user, ActionProposeUpdate(update))
    pair.deliver(hub)  # the hub countersigned ...
    pair.drop_in_flight()  # ... and the acknowledgement is lost
    assert user.state.outgoing is not None
    pair.input(user, ActionReconnected())
    pair.input(hub, ActionReconnected())
    pair.drain()
    assert_agreed(pair)
    assert events_of(user, EventChannelUpdated) == [
        EventChannelUpdated(update, user.state.latest, Party.USER)
    ]
    assert len(events_of(hub, EventChannelUpdated)) == 1  # applied once
    assert latest(user).balance_user == Assets(93, 10)


def test_resync_after_a_lost_proposal(funded: Pair) -> None:
    pair = funded
    hub, user = pair.a, pair.b
    pair.input(hub, ActionProposeUpdate(pay(Party.HUB, Assets(7))))
    pair.drop_in_flight()
    pair.input(hub, ActionReconnected())
    pair.input(user, ActionReconnected())
    pair.drain()
    assert_agreed(pair)
    assert latest(user).balance_user == Assets(107, 10)


def test_resync_of_a_deposit_whose_ack_was_lost_still_submits_it(funded: Pair) -> None:
    """Regression: the user adopts its countersigned deposit from the hub's sync and must
    still submit it to the contract (before the fix the call was only made on the ack)."""
    pair = funded
    hub, user = pair.a, pair.b
    pair.input(user, ActionProposeUpdate(pending(deposit_user=Assets(9), timeout=TIMEOUT)))
    pair.deliver(hub)
    pair.drop_in_flight()
    pair.input(user, ActionReconnected())
    pair.input(hub, ActionReconnected())
    pair.drain()
    assert_agreed(pair)
    assert events_of(user, ContractSendAuthorizedUpdate) == [
        ContractSendAuthorizedUpdate(user.state.latest)
    ]
    assert events_of(hub, ContractSendAuthorizedUpdate) == []


def test_restored_side_adopts_the_newer_state(funded: Pair) -> None:
    pair = funded
    hub, user = pair.a, pair.b
    snapshot = user.state
    propose(pair, hub, pay(Party.HUB, Assets(1)))
    initial = double_sign(thread_initial(Assets(1), Assets(1)))
    propose(pair, hub, open_update(initial))
    user.state = snapshot  # e.g. restored from an older backup
    pair.input(hub, ActionReconnected())
    pair.input(user, ActionReconnected())
    pair.drain()
    assert_agreed(pair)
    assert events_of(user, EventChannelSynced)[-1] == EventChannelSynced(hub.state.latest)
    assert user.state.threads == (initial,)


@pytest.mark.parametrize("lost", ["hub_reject", "user_reject", "resume"])
def test_resync_after_losing_conflict_messages(funded: Pair, lost: str) -> None:
    pair = funded
    hub, user = pair.a, pair.b
    before = latest(hub)
    pair.input(hub, ActionProposeUpdate(pay(Party.HUB, Assets(5))))
    pair.input(user, ActionProposeUpdate(pay(Party.USER, Assets(3))))
    pair.deliver(hub)
    pair.deliver(user, 1)
    if lost == "hub_reject":
        user.inbox.clear()
        pair.deliver(hub)
    elif lost == "user_reject":
        hub.inbox.clear()
        pair.deliver(user)
    else:
        pair.deliver(hub)
        pair.deliver(user, 1)
    pair.drop_in_flight()
    for _ in range(2):  # a cut handshake may need a second resync (see the thread tests)
        pair.input(hub, ActionReconnected())
        pair.input(user, ActionReconnected())
        pair.drain()
    assert_agreed(pair)
    assert latest(hub).balance_user == before.balance_user + Assets(2)


def _sync(side_state: SignedChannelState, threads: tuple[SignedThreadState, ...]) -> ChannelSync:
    assert side_state.sig_hub is not None and side_state.sig_user is not None
    return ChannelSync(side_state.state, side_state.sig_hub, side_state.sig_user, threads)


def test_sync_is_refused_when_its_threads_do_not_match(funded: Pair) -> None:
    pair = funded
    hub, user = pair.a, pair.b
    stale = user.state  # the user before the two threads opened (as if restored)
    first = double_sign(thread_initial(Assets(1), Assets(1), 1))
    second = double_sign(thread_initial(Assets(2), Assets(2), 2))
    propose(pair, hub, open_update(first))
    propose(pair, hub, open_update(second))
    signed = hub.state.latest
    other = double_sign(thread_initial(Assets(9), Assets(9), 9))
    renamed = replace(second, state=replace(second.state, thread_id=3))  # signatures now void
    forged = ChannelSync(
        signed.state,
        STRANGER.sign_digest(channel_state_digest(DOMAIN, signed.state)),
        _sync(signed, ()).sig_user,
        (first, second),
    )
    for message, reason, detail in (
        (_sync(signed, (first,)), RejectReason.INVALID_TRANSITION, "count"),
        (_sync(signed, (first, first)), RejectReason.INVALID_TRANSITION, "duplicate"),
        (_sync(signed, (first, other)), RejectReason.INVALID_TRANSITION, "root"),
        (_sync(signed, (first, renamed)), RejectReason.BAD_SIGNATURE, "thread"),
        (forged, RejectReason.BAD_SIGNATURE, "double-signed"),
    ):
        result = expect_refused(replace_state(user, stale), hub.address, message, reason)
        assert detail in result.rejection.detail
    # The genuine sync is adopted, in whatever order it lists the threads.
    result = step(stale, Receive(hub.address, _sync(signed, (second, first))), user.signer)
    assert result.accepted and result.state.latest == signed
    assert result.state.threads == hub.state.threads
    assert events_of_effects(result, EventChannelSynced) == [EventChannelSynced(signed)]


def replace_state(end: End, state: ChannelSide) -> End:
    return End(state, end.signer)


def events_of_effects(result: Transition[ChannelSide], kind: type) -> list:
    return [e for e in result.effects if isinstance(e, kind)]


# ---------------------------------------------------------------- random interleavings


@pytest.mark.parametrize("seed", range(40))
def test_random_interleavings(seed: int) -> None:
    """Random payments both ways and random deliveries; odd seeds also lose the link.

    Each payment is made unique by its `forward_to`, so every update can be followed to
    exactly one outcome: applied on both sides, or failed on its proposer's.
    """
    rng = random.Random(seed)
    recorder = Recorder()
    pair, _ = channel_pair(recorder=recorder)
    fund(pair, user=Assets(60, 10), hub=Assets(60, 10))
    hub, user = pair.a, pair.b
    start = latest(hub)
    proposed: dict[Party, list[UpdatePayment]] = {Party.HUB: [], Party.USER: []}
    with_drops = seed % 2 == 1
    for i in range(150):
        roll = rng.random()
        if roll < 0.3:
            end = rng.choice([hub, user])
            party = end.state.role
            update = pay(
                party, Assets(rng.randint(0, 9), rng.randint(0, 2)), Address(i.to_bytes(20, "big"))
            )
            if pair.input(end, ActionProposeUpdate(update)).accepted:
                proposed[party].append(update)
        elif roll < 0.95 or not with_drops:
            pair.deliver(rng.choice([hub, user]), rng.randint(1, 3))
        else:
            pair.drop_in_flight()
            pair.input(hub, ActionReconnected())
            pair.input(user, ActionReconnected())
        recorder.assert_no_double_sign(hub.signer, user.signer)
    pair.drain(limit=20_000)
    if with_drops:
        pair.input(hub, ActionReconnected())
        pair.input(user, ActionReconnected())
        pair.drain(limit=20_000)
    assert_agreed(pair)
    net = [0, 0]  # what the user gained, eth and token
    for party, end in ((Party.HUB, hub), (Party.USER, user)):
        mine = [e.update for e in events_of(end, EventChannelUpdated) if e.proposed_by is party]
        failed = [e.update for e in events_of(end, EventUpdateFailed)]
        assert len(mine) == len(set(mine)) and len(failed) == len(set(failed))
        assert set(mine) | set(failed) == set(proposed[party]) and not set(mine) & set(failed)
        other = pair.other(end)
        theirs = [e.update for e in events_of(other, EventChannelUpdated) if e.proposed_by is party]
        assert theirs == mine  # in the same order on both sides
        sign = 1 if party is Party.HUB else -1
        for update in mine:
            net[0] += sign * update.amount.eth
            net[1] += sign * update.amount.token
    final = latest(hub)
    assert (final.balance_user.eth, final.balance_user.token) == (
        start.balance_user.eth + net[0],
        start.balance_user.token + net[1],
    )
    assert final.balance_user + final.balance_hub == start.balance_user + start.balance_hub
    recorder.assert_no_double_sign(hub.signer, user.signer)
