"""Channel exits: startExit, startExitWithUpdate, challengeExit, emptyChannel."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest

from protocols.onchain import (
    GENESIS_RECORD,
    ChannelPhase,
    emptied_record,
    exit_challenged_record,
    exit_started_record,
)
from protocols.types import NO_ASSETS, ZERO_ADDRESS, Assets, ChannelState
from tests.contracts.conftest import (
    ACTION_CHALLENGE_EXIT,
    ACTION_EMPTY_CHANNEL,
    ACTION_START_EXIT,
    CP,
    ETHER,
    ZERO,
    Money,
    assert_record_event,
    assert_solvent,
    assert_stored,
    block_time,
    fund,
    next_block_at,
    reverts_unchanged,
    stored_hash,
    thread,
    with_threads,
)
from tests.contracts.harness import Deployment, Party, Reverted

E = ETHER
USER_DEPOSIT = Assets(5 * E, 500)
HUB_DEPOSIT = Assets(3 * E, 300)


def funded(d: Deployment, index: int = 0) -> tuple[Party, ChannelState]:
    """User `index` with a channel holding (8 ETH, 800): user 5/500, hub 3/300 on-chain
    (txCountGlobal 1, txCountOnchain 1); returns the confirmed state (txCountGlobal 2)."""
    user = d.users[index]
    return user, fund(d, user, USER_DEPOSIT, HUB_DEPOSIT)


def paid(state: ChannelState, amount: Assets, steps: int = 1) -> ChannelState:
    """`state` after the user pays the hub `amount` (txCountGlobal + steps)."""
    return replace(
        state,
        balance_user=state.balance_user - amount,
        balance_hub=state.balance_hub + amount,
        tx_count_global=state.tx_count_global + steps,
    )


# --- startExit / startExitWithUpdate ----------------------------------------------------------


@pytest.mark.parametrize("caller", ["user", "hub"])
def test_start_exit_at_the_onchain_record(d: Deployment, caller: str) -> None:
    user, _ = funded(d)
    sender = user if caller == "user" else d.hub
    before = d.record(user)
    money = Money(d)
    r = d.start_exit(user, sender=sender)
    expected = exit_started_record(before, None, block_time(d, r), CP)
    assert expected.phase is ChannelPhase.EXITING
    assert expected.exit_deadline == block_time(d, r) + CP
    assert_stored(d, user, expected)
    assert_record_event(d, r, user, ACTION_START_EXIT, sender, expected)
    money.check(receipts=[r])


@pytest.mark.parametrize("caller", ["user", "hub"])
def test_start_exit_with_a_newer_state(d: Deployment, caller: str) -> None:
    user, confirmed = funded(d)
    latest = paid(confirmed, Assets(E, 100))
    sender = user if caller == "user" else d.hub
    before = d.record(user)
    money = Money(d)
    r = d.start_exit_with(latest, sender=sender)
    expected = exit_started_record(before, latest, block_time(d, r), CP)
    assert expected.balance_user == Assets(4 * E, 400)
    assert expected.balance_hub == Assets(4 * E, 400)
    assert expected.tx_count_global == latest.tx_count_global
    assert_stored(d, user, expected)
    assert_record_event(d, r, user, ACTION_START_EXIT, sender, expected)
    money.check(receipts=[r])


def test_untouched_channel_exits_and_comes_back_to_genesis(d: Deployment) -> None:
    user = d.users[3]
    assert stored_hash(d, user) == b"\x00" * 32
    d.start_exit(user)
    assert d.record(user) == replace(
        GENESIS_RECORD, exit_deadline=block_time(d) + CP, phase=ChannelPhase.EXITING
    )
    d.travel(CP)
    money = Money(d)
    r = d.empty_channel(user)
    assert_stored(d, user, GENESIS_RECORD)
    assert stored_hash(d, user) == b"\x00" * 32
    money.check(receipts=[r])


# --- pending operations in exits ----------------------------------------------------------------

# (user deposit, hub deposit, user withdrawal, hub withdrawal) of the pending update.
PENDING = {
    "user-withdraws-hub-deposits": (NO_ASSETS, Assets(2 * E, 100), Assets(E, 50), NO_ASSETS),
    "user-deposits-hub-withdraws": (Assets(E, 10), NO_ASSETS, NO_ASSETS, Assets(E, 100)),
}


def pending_state(d: Deployment, confirmed: ChannelState, kind: str) -> ChannelState:
    dep_user, dep_hub, wd_user, wd_hub = PENDING[kind]
    return replace(
        confirmed,
        balance_user=confirmed.balance_user - wd_user,
        balance_hub=confirmed.balance_hub - wd_hub,
        pending_deposit_user=dep_user,
        pending_deposit_hub=dep_hub,
        pending_withdrawal_user=wd_user,
        pending_withdrawal_hub=wd_hub,
        tx_count_global=confirmed.tx_count_global + 1,
        tx_count_onchain=confirmed.tx_count_onchain + 1,
        timeout=d.now + 100,
    )


def execute(d: Deployment, state: ChannelState) -> None:
    if state.pending_deposit_user.is_zero():
        if not state.pending_deposit_hub.is_zero():
            d.hub_deposit(state.pending_deposit_hub.eth, state.pending_deposit_hub.token)
        d.hub_update(state)
    else:
        d.user_update(state)


@pytest.mark.parametrize("kind", sorted(PENDING))
def test_exit_with_an_executed_pending_update_counts_its_deposits(d: Deployment, kind: str) -> None:
    """Same txCountOnchain as the record: the update was executed, so its deposits are in
    the channel and count; its withdrawals were paid and are not given back."""
    user, confirmed = funded(d)
    pending = pending_state(d, confirmed, kind)
    execute(d, pending)
    # A later payment carries the pending fields forward unchanged.
    later = paid(pending, Assets(E // 2, 5))
    dep_user, dep_hub, _, _ = PENDING[kind]
    before = d.record(user)
    r = d.start_exit_with(later)
    expected = exit_started_record(before, later, block_time(d, r), CP)
    assert expected.balance_user == later.balance_user + dep_user
    assert expected.balance_hub == later.balance_hub + dep_hub
    assert_stored(d, user, expected)

    d.travel(CP)
    money = Money(d)
    r = d.empty_channel(user)
    reopened, payout = emptied_record(expected, block_time(d, r))
    assert payout.to_user == later.balance_user + dep_user
    assert_stored(d, user, reopened)
    money.check(
        {
            user.hex: (payout.to_user.eth, payout.to_user.token),
            d.manager.address: (-payout.to_user.eth, -payout.to_user.token),
        },
        reserve=(payout.to_reserve.eth, payout.to_reserve.token),
        receipts=[r],
    )
    assert_solvent(d)


@pytest.mark.parametrize("kind", sorted(PENDING))
def test_exit_with_an_unexecuted_pending_update_refunds_withdrawals_and_ignores_deposits(
    d: Deployment, kind: str
) -> None:
    """Higher txCountOnchain than the record: the update never ran, so the withdrawals go
    back to the balances and the deposits (never made) do not count."""
    user, confirmed = funded(d)
    pending = pending_state(d, confirmed, kind)
    reserve = d.reserve()
    before = d.record(user)
    r = d.start_exit_with(pending)
    expected = exit_started_record(before, pending, block_time(d, r), CP)
    assert expected.balance_user == confirmed.balance_user
    assert expected.balance_hub == confirmed.balance_hub
    assert expected.tx_count_onchain == before.tx_count_onchain
    assert_stored(d, user, expected)
    # The update cannot run any more: the channel is exiting.
    d.hub_deposit(10 * E, 1000)
    with reverts_unchanged(d, "channel is not open", [user]):
        if pending.pending_deposit_user.is_zero():
            d.hub_update(pending)
        else:
            d.user_update(pending)
    d.travel(CP)
    r = d.empty_channel(user)
    _, payout = emptied_record(expected, block_time(d, r))
    assert payout.to_user == USER_DEPOSIT
    assert d.reserve() == reserve + Assets(10 * E, 1000) + HUB_DEPOSIT
    assert_solvent(d)


# --- challengeExit ------------------------------------------------------------------------------


@pytest.mark.parametrize("challenger", ["hub", "user", "outsider"])
def test_challenge_exit_with_a_later_state(d: Deployment, challenger: str) -> None:
    """Anyone may bring a later double-signed state; the deadline does not move."""
    user, confirmed = funded(d)
    d.start_exit_with(confirmed, sender=d.hub)
    started = d.record(user)
    latest = paid(confirmed, Assets(2 * E, 50), steps=3)
    sender = {"hub": d.hub, "user": user, "outsider": d.outsider}[challenger]
    money = Money(d)
    r = d.challenge_exit(latest, sender)
    expected = exit_challenged_record(started, latest, block_time(d, r))
    assert expected.phase is ChannelPhase.CHALLENGED
    assert expected.exit_deadline == started.exit_deadline
    assert expected.balance_user == Assets(3 * E, 450)
    assert_stored(d, user, expected)
    assert_record_event(d, r, user, ACTION_CHALLENGE_EXIT, sender, expected)
    money.check(receipts=[r])


def test_challenge_in_the_last_second(d: Deployment) -> None:
    user, confirmed = funded(d)
    d.start_exit(user)
    started = d.record(user)
    next_block_at(d, started.exit_deadline - 1)
    r = d.challenge_exit(confirmed, d.hub)
    assert_stored(d, user, exit_challenged_record(started, confirmed, block_time(d, r)))


def test_challenge_with_an_unexecuted_pending_state(d: Deployment) -> None:
    user, confirmed = funded(d)
    d.start_exit(user)
    started = d.record(user)
    pending = pending_state(d, confirmed, "user-withdraws-hub-deposits")
    r = d.challenge_exit(pending, d.hub)
    expected = exit_challenged_record(started, pending, block_time(d, r))
    assert expected.balance_user == USER_DEPOSIT
    assert expected.balance_hub == HUB_DEPOSIT
    assert_stored(d, user, expected)


# --- emptyChannel -------------------------------------------------------------------------------


@pytest.mark.parametrize("challenged", [False, True], ids=["exiting", "challenged"])
def test_empty_channel_pays_the_user_and_the_reserve_and_reopens(
    d: Deployment, challenged: bool
) -> None:
    user, confirmed = funded(d)
    d.start_exit(user)
    if challenged:
        d.challenge_exit(paid(confirmed, Assets(E, 20)), d.outsider)
    disputed = d.record(user)
    d.travel(CP)
    money = Money(d)
    r = d.empty_channel(user, sender=d.outsider)
    reopened, payout = emptied_record(disputed, block_time(d, r))
    assert reopened == replace(
        GENESIS_RECORD,
        tx_count_global=disputed.tx_count_global,
        tx_count_onchain=disputed.tx_count_onchain,
    )
    assert payout.to_user + payout.to_reserve == Assets(8 * E, 800)
    assert_stored(d, user, reopened)
    assert_record_event(d, r, user, ACTION_EMPTY_CHANNEL, d.outsider, reopened)
    money.check(
        {
            user.hex: (payout.to_user.eth, payout.to_user.token),
            d.manager.address: (-payout.to_user.eth, -payout.to_user.token),
        },
        reserve=(payout.to_reserve.eth, payout.to_reserve.token),
        receipts=[r],
    )
    [event] = d.logs("ChannelPaidOut", r)
    assert dict(event["args"]) == {
        "user": user.hex,
        "userEth": disputed.balance_user.eth,
        "userToken": disputed.balance_user.token,
        "hubEth": disputed.balance_hub.eth,
        "hubToken": disputed.balance_hub.token,
    }
    assert_solvent(d)


def test_funds_the_parties_left_unassigned_go_to_the_reserve(d: Deployment) -> None:
    """Balances signed below the channel's funds: the rest goes to the reserve on reopen."""
    user, confirmed = funded(d)
    short = replace(
        confirmed,
        balance_user=Assets(2 * E, 100),
        balance_hub=Assets(E, 100),
        tx_count_global=confirmed.tx_count_global + 1,
    )
    d.start_exit_with(short)
    disputed = d.record(user)
    d.travel(CP)
    money = Money(d)
    r = d.empty_channel(user)
    reopened, payout = emptied_record(disputed, block_time(d, r))
    assert payout.to_user == Assets(2 * E, 100)
    assert payout.to_reserve == Assets(6 * E, 700)
    assert_stored(d, user, reopened)
    money.check(
        {user.hex: (2 * E, 100), d.manager.address: (-2 * E, -100)},
        reserve=(6 * E, 700),
        receipts=[r],
    )
    assert_solvent(d)


def test_empty_channel_at_the_deadline(d: Deployment) -> None:
    user, _ = funded(d)
    d.start_exit(user)
    deadline = d.record(user).exit_deadline
    with reverts_unchanged(d, "challenge period not over", [user]):
        d.empty_channel(user)
    next_block_at(d, deadline - 1)
    with reverts_unchanged(d, "challenge period not over", [user]):
        d.empty_channel(user)
    next_block_at(d, deadline)
    r = d.empty_channel(user)
    assert block_time(d, r) == deadline
    assert d.record(user).phase is ChannelPhase.OPEN


def test_empty_channel_with_threads_keeps_their_locks(d: Deployment) -> None:
    user, confirmed = funded(d)
    other = d.users[1]
    t1 = thread(user, other, Assets(E, 10), Assets(0, 5), thread_id=1)
    t2 = thread(other, user, Assets(E // 2, 0), NO_ASSETS, thread_id=2)
    locked = with_threads(confirmed, [t1, t2])
    d.start_exit_with(locked)
    disputed = d.record(user)
    d.travel(CP)
    money = Money(d)
    r = d.empty_channel(user)
    settling, payout = emptied_record(disputed, block_time(d, r))
    assert settling.phase is ChannelPhase.SETTLING_THREADS
    assert settling.held == t1.total() + t2.total()
    assert settling.thread_count == 2 and settling.thread_root == locked.thread_root
    assert payout.to_user == locked.balance_user
    assert payout.to_reserve == locked.balance_hub
    assert_stored(d, user, settling)
    assert_record_event(d, r, user, ACTION_EMPTY_CHANNEL, d.outsider, settling)
    money.check(
        {
            user.hex: (payout.to_user.eth, payout.to_user.token),
            d.manager.address: (-payout.to_user.eth, -payout.to_user.token),
        },
        reserve=(payout.to_reserve.eth, payout.to_reserve.token),
        receipts=[r],
    )
    assert_solvent(d)


def test_reopened_channel_works_and_old_states_do_not_replay(d: Deployment) -> None:
    user, confirmed = funded(d)
    latest = paid(confirmed, Assets(E, 0))
    d.start_exit_with(latest)
    d.travel(CP)
    d.empty_channel(user)
    # The old states are refused: their nonces are spent.
    with reverts_unchanged(d, "stale txCountGlobal", [user]):
        d.start_exit_with(latest)
    with reverts_unchanged(d, "stale txCountGlobal", [user]):
        d.user_update(
            d.state(
                user,
                pending_deposit_user=Assets(E, 0),
                tx_count_global=3,
                tx_count_onchain=2,
                timeout=d.now + 100,
            )
        )
    # A new deposit with higher nonces opens it again.
    state = d.state(
        user,
        pending_deposit_user=Assets(E, 1),
        tx_count_global=latest.tx_count_global + 1,
        tx_count_onchain=2,
        timeout=d.now + 100,
    )
    d.user_update(state)
    assert d.record(user).held == Assets(E, 1)
    d.start_exit(user)
    assert d.record(user).phase is ChannelPhase.EXITING


# --- who may call -------------------------------------------------------------------------------


def test_only_the_parties_start_an_exit(d: Deployment) -> None:
    user, confirmed = funded(d)
    for caller in (d.outsider, d.users[1]):
        with reverts_unchanged(d, "caller is not a party of the channel", [user]):
            d.start_exit(user, sender=caller)
        with reverts_unchanged(d, "caller is not a party of the channel", [user]):
            d.start_exit_with(confirmed, sender=caller)


def test_exit_of_the_zero_address_reverts(d: Deployment) -> None:
    with reverts_unchanged(d, "user is the zero address"):
        d.send(d.manager.functions.startExit(ZERO, GENESIS_RECORD.as_abi()), d.hub)
    with reverts_unchanged(d, "user is the zero address"):
        d.send(d.manager.functions.emptyChannel(ZERO, GENESIS_RECORD.as_abi()), d.outsider)
    user, confirmed = funded(d)
    state = replace(confirmed, user=ZERO_ADDRESS)
    sigs = d.sign(state, user=user)
    with reverts_unchanged(d, "user is the zero address"):
        d.start_exit_with(state, sigs=sigs, sender=d.hub)
    d.start_exit(user)
    with reverts_unchanged(d, "user is the zero address"):
        d.challenge_exit(state, d.hub, sigs=sigs, record=d.record(user))


# --- record and phase ---------------------------------------------------------------------------


def test_exit_calls_need_the_current_record(d: Deployment) -> None:
    user, confirmed = funded(d)
    stale = d.record(user)
    wrong = replace(stale, balance_user=stale.balance_user + Assets(1, 0))
    with reverts_unchanged(d, "record is not the channel's current record", [user]):
        d.start_exit(user, record=wrong)
    with reverts_unchanged(d, "record is not the channel's current record", [user]):
        d.start_exit_with(confirmed, record=GENESIS_RECORD)
    d.start_exit(user)
    later = paid(confirmed, Assets(1, 1))
    with reverts_unchanged(d, "record is not the channel's current record", [user]):
        d.challenge_exit(later, d.hub, record=stale)
    d.travel(CP)
    with reverts_unchanged(d, "record is not the channel's current record", [user]):
        d.empty_channel(user, record=stale)


def test_exit_cannot_start_twice(d: Deployment) -> None:
    user, confirmed = funded(d)
    d.start_exit(user)
    with reverts_unchanged(d, "channel is not open", [user]):
        d.start_exit(user)
    with reverts_unchanged(d, "channel is not open", [user]):
        d.start_exit_with(paid(confirmed, Assets(1, 0)), sender=d.hub)
    d.challenge_exit(confirmed, d.hub)
    with reverts_unchanged(d, "channel is not open", [user]):
        d.start_exit(user, sender=d.hub)


def test_exit_cannot_start_while_threads_settle(d: Deployment) -> None:
    user, confirmed = funded(d)
    locked = with_threads(confirmed, [thread(user, d.users[1], Assets(E, 0))])
    d.start_exit_with(locked)
    d.travel(CP)
    d.empty_channel(user)
    assert d.record(user).phase is ChannelPhase.SETTLING_THREADS
    with reverts_unchanged(d, "channel is not open", [user]):
        d.start_exit(user)
    with reverts_unchanged(d, "channel is not exiting", [user]):
        d.challenge_exit(paid(locked, Assets(1, 0)), d.hub)
    with reverts_unchanged(d, "channel is not exiting", [user]):
        d.empty_channel(user)


def test_open_channel_cannot_be_challenged_or_emptied(d: Deployment) -> None:
    user, confirmed = funded(d)
    with reverts_unchanged(d, "channel is not exiting", [user]):
        d.challenge_exit(confirmed, d.hub)
    with reverts_unchanged(d, "channel is not exiting", [user]):
        d.empty_channel(user)


# --- nonces and amounts -------------------------------------------------------------------------


@pytest.mark.parametrize("tx_count_global", [1, 0], ids=["equal", "lower"])
def test_exit_with_a_stale_tx_count_global(d: Deployment, tx_count_global: int) -> None:
    user, confirmed = funded(d)  # the record has txCountGlobal 1
    state = replace(confirmed, tx_count_global=tx_count_global)
    with reverts_unchanged(d, "stale txCountGlobal", [user]):
        d.start_exit_with(state)


@pytest.mark.parametrize("offset", [0, -1], ids=["equal", "lower"])
def test_challenge_with_a_stale_tx_count_global(d: Deployment, offset: int) -> None:
    user, confirmed = funded(d)
    latest = paid(confirmed, Assets(E, 0), steps=2)
    d.start_exit_with(latest)
    stale = paid(confirmed, Assets(2 * E, 0), steps=2 + offset)
    with reverts_unchanged(d, "stale txCountGlobal", [user]):
        d.challenge_exit(stale, d.hub)


def test_exit_with_a_lower_tx_count_onchain(d: Deployment) -> None:
    user, confirmed = funded(d)
    pending = pending_state(d, confirmed, "user-deposits-hub-withdraws")
    execute(d, pending)  # the record now has txCountOnchain 2
    old = replace(confirmed, tx_count_global=pending.tx_count_global + 1)  # txCountOnchain 1
    with reverts_unchanged(d, "stale txCountOnchain", [user]):
        d.start_exit_with(old)
    d.start_exit(user)
    with reverts_unchanged(d, "stale txCountOnchain", [user]):
        d.challenge_exit(old, d.hub)


@pytest.mark.parametrize("extra", [Assets(1, 0), Assets(0, 1)], ids=["eth", "token"])
def test_exit_with_a_state_beyond_the_channel_funds(d: Deployment, extra: Assets) -> None:
    user, confirmed = funded(d)
    rich = replace(confirmed, balance_user=confirmed.balance_user + extra)
    with reverts_unchanged(d, "state exceeds channel funds", [user]):
        d.start_exit_with(rich)
    # Unexecuted deposits do not count towards the funds either.
    pending = replace(
        confirmed, pending_deposit_user=extra, tx_count_onchain=2, timeout=d.now + 100
    )
    d.start_exit(user)
    assert d.record(user).held == USER_DEPOSIT + HUB_DEPOSIT
    with reverts_unchanged(d, "state exceeds channel funds", [user]):
        d.challenge_exit(replace(pending, balance_user=rich.balance_user), d.hub)


# --- challenge rules ------------------------------------------------------------------------------


def test_second_challenge_needs_a_later_state(d: Deployment) -> None:
    """Challenges repeat within the one challenge round, each strictly later; the deadline
    stays where the exit put it."""
    user, confirmed = funded(d)
    d.start_exit(user, sender=d.hub)
    deadline = d.record(user).exit_deadline
    d.challenge_exit(confirmed, user)
    later = paid(confirmed, Assets(E, 0))
    for sender in (d.outsider, user, d.hub):
        with reverts_unchanged(d, "stale txCountGlobal", [user]):
            d.challenge_exit(confirmed, sender)
    d.challenge_exit(later, d.outsider)
    record = d.record(user)
    assert (record.phase, record.exit_deadline) == (ChannelPhase.CHALLENGED, deadline)
    assert record.tx_count_global == later.tx_count_global
    with reverts_unchanged(d, "stale txCountGlobal", [user]):
        d.challenge_exit(later, d.hub)
    d.travel(CP)
    d.empty_channel(user)
    assert d.logs("ChannelPaidOut")[0]["args"]["userEth"] == later.balance_user.eth


@pytest.mark.parametrize("late", [0, 1, 10 * CP], ids=["at-deadline", "after", "long-after"])
def test_challenge_after_the_deadline(d: Deployment, late: int) -> None:
    user, confirmed = funded(d)
    d.start_exit(user)
    next_block_at(d, d.record(user).exit_deadline + late)
    with reverts_unchanged(d, "challenge period over", [user]):
        d.challenge_exit(confirmed, d.hub)


def test_exit_initiator_cannot_shut_out_the_latest_state(d: Deployment) -> None:
    """The user exits at an old state and challenges its own exit at another old one, both
    better for it than the latest. The hub, still within the challenge period, must be able
    to bring the latest double-signed state, and the exit must pay at it.

    (Fails while any caller may use the exit's only challenge: the exit's initiator takes
    it first and locks the dispute at a stale state.)"""
    user, confirmed = funded(d)
    old = paid(confirmed, Assets(0, 0))  # user 5 ETH
    older_challenge = paid(confirmed, Assets(E, 0), steps=2)  # user 4 ETH
    latest = paid(confirmed, Assets(4 * E, 0), steps=5)  # user 1 ETH
    d.start_exit_with(old, sender=user)
    with contextlib.suppress(Reverted):  # a contract may refuse the initiator's challenge
        d.challenge_exit(older_challenge, user)
    d.challenge_exit(latest, d.hub)
    d.travel(CP)
    d.empty_channel(user)
    assert d.logs("ChannelPaidOut")[0]["args"]["userEth"] == latest.balance_user.eth
