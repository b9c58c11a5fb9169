"""Authorized updates: hubAuthorizedUpdate and userAuthorizedUpdate."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from protocols.onchain import GENESIS_RECORD, executed_record
from protocols.thread_root import thread_root
from protocols.types import NO_ASSETS, ZERO_ADDRESS, Address, Assets, ChannelState
from tests.contracts.conftest import (
    ACTION_HUB_UPDATE,
    ACTION_USER_UPDATE,
    ETHER,
    Money,
    assert_record_event,
    assert_solvent,
    assert_stored,
    block_time,
    fund,
    next_block_at,
    reverts_unchanged,
    thread,
)
from tests.contracts.harness import Deployment, Party

E = ETHER


# --- success paths ----------------------------------------------------------------------------


def test_user_update_deposits_eth_and_token_with_a_hub_deposit_from_the_reserve(
    d: Deployment,
) -> None:
    user = d.users[0]
    d.hub_deposit(2 * E, 1000)
    state = d.state(
        user,
        pending_deposit_user=Assets(3 * E, 500),
        pending_deposit_hub=Assets(E, 400),
        tx_count_global=1,
        tx_count_onchain=1,
        timeout=d.now + 100,
    )
    money = Money(d)
    r = d.user_update(state)
    expected = executed_record(GENESIS_RECORD, state, block_time(d, r))
    assert expected.held == Assets(4 * E, 900)
    assert expected.balance_user == Assets(3 * E, 500)
    assert expected.balance_hub == Assets(E, 400)
    assert_stored(d, user, expected)
    assert_record_event(d, r, user, ACTION_USER_UPDATE, user, expected)
    # The user's funds come in with the call; the hub's move from the reserve.
    money.check(
        {user.hex: (-3 * E, -500), d.manager.address: (3 * E, 500)},
        reserve=(-E, -400),
        receipts=[r],
    )
    assert d.logs("ChannelPaidOut") == []
    assert_solvent(d)


@pytest.mark.parametrize("deposit", [Assets(E, 0), Assets(0, 77)], ids=["eth-only", "token-only"])
def test_user_update_deposits_one_asset(d: Deployment, deposit: Assets) -> None:
    user = d.users[1]
    state = d.state(
        user,
        pending_deposit_user=deposit,
        tx_count_global=5,
        tx_count_onchain=3,
        timeout=d.now + 10,
    )
    money = Money(d)
    r = d.user_update(state)
    expected = executed_record(GENESIS_RECORD, state, block_time(d, r))
    assert_stored(d, user, expected)
    money.check(
        {user.hex: (-deposit.eth, -deposit.token), d.manager.address: (deposit.eth, deposit.token)},
        receipts=[r],
    )


def test_hub_update_deposits_from_the_reserve_and_pays_a_user_withdrawal_to_its_recipient(
    d: Deployment,
) -> None:
    user, recipient = d.users[0], d.users[3]
    confirmed = fund(d, user, Assets(5 * E, 1000))
    d.hub_deposit(2 * E, 300)
    state = replace(
        confirmed,
        recipient=recipient.address,
        balance_user=Assets(3 * E, 600),
        pending_deposit_hub=Assets(2 * E, 300),
        pending_withdrawal_user=Assets(2 * E, 400),
        tx_count_global=confirmed.tx_count_global + 1,
        tx_count_onchain=2,
        timeout=d.now + 50,
    )
    before = d.record(user)
    money = Money(d)
    r = d.hub_update(state)
    expected = executed_record(before, state, block_time(d, r))
    assert expected.held == Assets(5 * E, 900)
    assert_stored(d, user, expected)
    assert_record_event(d, r, user, ACTION_HUB_UPDATE, d.hub, expected)
    money.check(
        {recipient.hex: (2 * E, 400), d.manager.address: (-2 * E, -400)},
        reserve=(-2 * E, -300),
        receipts=[r],
    )
    assert d.logs("PayoutDeferred") == []
    assert_solvent(d)


def test_hub_update_returns_a_hub_withdrawal_to_the_reserve(d: Deployment) -> None:
    user = d.users[0]
    confirmed = fund(d, user, Assets(E, 10), Assets(3 * E, 30))
    state = replace(
        confirmed,
        balance_hub=Assets(E, 5),
        pending_withdrawal_hub=Assets(2 * E, 25),
        tx_count_global=confirmed.tx_count_global + 1,
        tx_count_onchain=2,
        timeout=d.now + 50,
    )
    before = d.record(user)
    money = Money(d)
    r = d.hub_update(state)
    expected = executed_record(before, state, block_time(d, r))
    assert expected.held == Assets(2 * E, 15)
    assert_stored(d, user, expected)
    # Nothing leaves the contract: the hub's withdrawal goes to its reserve.
    money.check(reserve=(2 * E, 25), receipts=[r])
    assert_solvent(d)


def test_user_may_submit_a_withdrawal_itself(d: Deployment) -> None:
    user = d.users[2]
    confirmed = fund(d, user, Assets(2 * E, 20))
    state = replace(
        confirmed,
        balance_user=Assets(E, 15),
        pending_withdrawal_user=Assets(E, 5),
        tx_count_global=confirmed.tx_count_global + 1,
        tx_count_onchain=2,
        timeout=d.now + 50,
    )
    before = d.record(user)
    money = Money(d)
    r = d.user_update(state)
    expected = executed_record(before, state, block_time(d, r))
    assert_stored(d, user, expected)
    assert_record_event(d, r, user, ACTION_USER_UPDATE, user, expected)
    money.check({user.hex: (E, 5), d.manager.address: (-E, -5)}, receipts=[r])


def test_update_records_the_thread_root_and_count(d: Deployment) -> None:
    a, b = d.users[0], d.users[1]
    t = thread(a, b, Assets(E, 0))
    state = d.state(
        a,
        pending_deposit_user=Assets(2 * E, 0),
        thread_root=thread_root([t]),
        thread_count=1,
        tx_count_global=3,
        tx_count_onchain=1,
        timeout=d.now + 50,
    )
    r = d.user_update(state)
    expected = executed_record(GENESIS_RECORD, state, block_time(d, r))
    assert expected.thread_root == thread_root([t]) and expected.thread_count == 1
    assert_stored(d, a, expected)


def test_update_in_the_last_second_before_its_timeout(d: Deployment) -> None:
    user = d.users[0]
    timeout = d.now + 20
    state = d.state(
        user,
        pending_deposit_user=Assets(E, 1),
        tx_count_global=1,
        tx_count_onchain=1,
        timeout=timeout,
    )
    next_block_at(d, timeout - 1)
    r = d.user_update(state)
    assert block_time(d, r) == timeout - 1
    assert_stored(d, user, executed_record(GENESIS_RECORD, state, timeout - 1))


def test_successive_updates_keep_the_record_and_the_funds(d: Deployment) -> None:
    user = d.users[0]
    confirmed = fund(d, user, Assets(E, 100), Assets(E, 100))
    second = replace(
        confirmed,
        pending_deposit_user=Assets(E, 50),
        tx_count_global=confirmed.tx_count_global + 1,
        tx_count_onchain=2,
        timeout=d.now + 50,
    )
    d.user_update(second)
    third = replace(
        second,
        balance_user=Assets(2 * E, 150) - Assets(E // 2, 50),
        balance_hub=Assets(E, 100),
        pending_deposit_user=NO_ASSETS,
        pending_withdrawal_user=Assets(E // 2, 50),
        tx_count_global=second.tx_count_global + 2,
        tx_count_onchain=3,
        timeout=d.now + 50,
    )
    before = d.record(user)
    r = d.hub_update(third)
    expected = executed_record(before, third, block_time(d, r))
    assert expected.held == Assets(3 * E - E // 2, 200)
    assert_stored(d, user, expected)
    assert_solvent(d)


# --- who may call -------------------------------------------------------------------------------


def pending_deposit(d: Deployment, user_index: int = 0, **fields: Any) -> ChannelState:
    user = d.users[user_index]
    base = {
        "pending_deposit_user": Assets(E, 10),
        "tx_count_global": 1,
        "tx_count_onchain": 1,
        "timeout": d.now + 100,
    }
    base.update(fields)
    return d.state(user, **base)


def test_hub_update_is_for_the_hub_only(d: Deployment) -> None:
    user = d.users[0]
    state = d.state(user, tx_count_global=1, tx_count_onchain=1, timeout=d.now + 100)
    for caller in (user, d.outsider):
        with reverts_unchanged(d, "caller is not the hub", [user]):
            d.hub_update(state, sender=caller)


def test_hub_update_refuses_user_deposits(d: Deployment) -> None:
    user = d.users[0]
    d.hub_deposit(10 * E, 100)
    for deposit in (Assets(E, 0), Assets(0, 1)):
        state = d.state(
            user,
            pending_deposit_user=deposit,
            tx_count_global=1,
            tx_count_onchain=1,
            timeout=d.now + 100,
        )
        with reverts_unchanged(d, "user deposit in hub update", [user]):
            d.hub_update(state)


def test_user_update_is_for_the_channels_user_only(d: Deployment) -> None:
    user = d.users[0]
    state = pending_deposit(d)
    for caller in (d.hub, d.users[1], d.outsider):
        with reverts_unchanged(d, "caller is not the channel's user", [user]):
            d.user_update(state, sender=caller)


@pytest.mark.parametrize("value", [0, E - 1, E + 1])
def test_user_update_needs_exactly_the_eth_deposit(d: Deployment, value: int) -> None:
    state = pending_deposit(d)
    with reverts_unchanged(d, "msg.value is not the user's eth deposit", [d.users[0]]):
        d.user_update(state, value=value)


def test_user_update_without_a_deposit_refuses_eth(d: Deployment) -> None:
    state = pending_deposit(d, pending_deposit_user=Assets(0, 10))
    with reverts_unchanged(d, "msg.value is not the user's eth deposit", [d.users[0]]):
        d.user_update(state, value=1)


def test_update_for_the_zero_address_reverts(d: Deployment) -> None:
    d.hub_deposit(E, 0)
    state = replace(
        d.state(
            d.users[0],
            pending_deposit_hub=Assets(E, 0),
            tx_count_global=1,
            tx_count_onchain=1,
            timeout=d.now + 100,
        ),
        user=ZERO_ADDRESS,
    )
    sigs = d.sign(state, user=d.users[0])
    with reverts_unchanged(d, "user is the zero address"):
        d.hub_update(state, sigs=sigs)


def test_user_token_deposit_needs_an_allowance(d: Deployment) -> None:
    """The token's own revert reason comes back; nothing is credited."""
    user = d.users[0]
    d.send(d.token.functions.approve(d.manager.address, 9), user)
    state = pending_deposit(d, pending_deposit_user=Assets(E, 10))
    with reverts_unchanged(d, "allowance too low", [user]):
        d.user_update(state)


# --- record and phase ---------------------------------------------------------------------------


def test_update_needs_the_current_record(d: Deployment) -> None:
    user = d.users[0]
    confirmed = fund(d, user, Assets(E, 10))
    state = replace(
        confirmed,
        pending_deposit_user=Assets(E, 0),
        tx_count_global=confirmed.tx_count_global + 1,
        tx_count_onchain=2,
        timeout=d.now + 100,
    )
    current = d.record(user)
    for record in (
        GENESIS_RECORD,
        replace(current, held=current.held + Assets(1, 0)),
        replace(current, balance_user=Assets(E + 1, 10)),
        replace(current, tx_count_global=current.tx_count_global - 1),
    ):
        with reverts_unchanged(d, "record is not the channel's current record", [user]):
            d.user_update(state, record=record)
        with reverts_unchanged(d, "record is not the channel's current record", [user]):
            d.hub_update(replace(state, pending_deposit_user=NO_ASSETS), record=record)


def test_update_refused_while_the_channel_exits(d: Deployment) -> None:
    user = d.users[0]
    confirmed = fund(d, user, Assets(E, 10))
    d.start_exit(user)
    state = replace(
        confirmed,
        pending_withdrawal_user=Assets(E, 0),
        balance_user=Assets(0, 10),
        tx_count_global=confirmed.tx_count_global + 1,
        tx_count_onchain=2,
        timeout=d.now + 100,
    )
    with reverts_unchanged(d, "channel is not open", [user]):
        d.hub_update(state)
    with reverts_unchanged(d, "channel is not open", [user]):
        d.user_update(state)


# --- nonces and timeout -------------------------------------------------------------------------


def executed_channel(d: Deployment) -> Party:
    """A channel whose record has txCountGlobal 4 and txCountOnchain 2."""
    user = d.users[0]
    d.user_update(
        d.state(
            user,
            pending_deposit_user=Assets(2 * E, 20),
            tx_count_global=4,
            tx_count_onchain=2,
            timeout=d.now + 100,
        )
    )
    return user


@pytest.mark.parametrize("tx_count_global", [4, 3, 0], ids=["equal", "lower", "zero"])
def test_stale_tx_count_global(d: Deployment, tx_count_global: int) -> None:
    user = executed_channel(d)
    state = d.state(
        user,
        balance_user=Assets(2 * E, 20),
        pending_deposit_user=Assets(E, 0),
        tx_count_global=tx_count_global,
        tx_count_onchain=3,
        timeout=d.now + 100,
    )
    with reverts_unchanged(d, "stale txCountGlobal", [user]):
        d.user_update(state)
    with reverts_unchanged(d, "stale txCountGlobal", [user]):
        d.hub_update(replace(state, pending_deposit_user=NO_ASSETS))


@pytest.mark.parametrize("tx_count_onchain", [2, 1, 0], ids=["equal", "lower", "zero"])
def test_stale_tx_count_onchain(d: Deployment, tx_count_onchain: int) -> None:
    user = executed_channel(d)
    state = d.state(
        user,
        balance_user=Assets(2 * E, 20),
        pending_deposit_user=Assets(E, 0),
        tx_count_global=9,
        tx_count_onchain=tx_count_onchain,
        timeout=d.now + 100,
    )
    with reverts_unchanged(d, "stale txCountOnchain", [user]):
        d.user_update(state)
    with reverts_unchanged(d, "stale txCountOnchain", [user]):
        d.hub_update(replace(state, pending_deposit_user=NO_ASSETS))


def test_replaying_an_executed_state_reverts(d: Deployment) -> None:
    user = d.users[0]
    state = pending_deposit(d)
    d.user_update(state)
    with reverts_unchanged(d, "stale txCountGlobal", [user]):
        d.user_update(state)


@pytest.mark.parametrize("late", [0, 1, 500], ids=["at-timeout", "one-after", "long-after"])
def test_update_timed_out(d: Deployment, late: int) -> None:
    user = d.users[0]
    timeout = d.now + 20
    state = pending_deposit(d, timeout=timeout)
    next_block_at(d, timeout + late)
    with reverts_unchanged(d, "update timed out", [user]):
        d.user_update(state)


def test_state_without_a_timeout_cannot_be_executed(d: Deployment) -> None:
    user = d.users[0]
    state = pending_deposit(d, timeout=0)
    with reverts_unchanged(d, "update timed out", [user]):
        d.user_update(state)


# --- amounts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("withdrawal", [Assets(E + 1, 0), Assets(0, 11)], ids=["eth", "token"])
def test_withdrawals_exceed_channel_funds(d: Deployment, withdrawal: Assets) -> None:
    user = d.users[0]
    confirmed = fund(d, user, Assets(E, 10))
    state = replace(
        confirmed,
        balance_user=NO_ASSETS,
        pending_withdrawal_user=withdrawal,
        tx_count_global=confirmed.tx_count_global + 1,
        tx_count_onchain=2,
        timeout=d.now + 100,
    )
    with reverts_unchanged(d, "withdrawals exceed channel funds", [user]):
        d.hub_update(state)


@pytest.mark.parametrize(
    ("balance_user", "balance_hub"),
    [(Assets(E + 1, 10), NO_ASSETS), (Assets(E, 10), Assets(0, 1))],
    ids=["eth", "token"],
)
def test_state_exceeds_channel_funds(
    d: Deployment, balance_user: Assets, balance_hub: Assets
) -> None:
    user = d.users[0]
    confirmed = fund(d, user, Assets(E, 10))
    state = replace(
        confirmed,
        balance_user=balance_user,
        balance_hub=balance_hub,
        pending_deposit_user=Assets(0, 0),
        tx_count_global=confirmed.tx_count_global + 1,
        tx_count_onchain=2,
        timeout=d.now + 100,
    )
    with reverts_unchanged(d, "state exceeds channel funds", [user]):
        d.hub_update(state)
    # A deposit is credited to the balance and to the funds alike: still too much.
    with reverts_unchanged(d, "state exceeds channel funds", [user]):
        d.user_update(replace(state, pending_deposit_user=Assets(1, 1)))


@pytest.mark.parametrize(
    ("reserve", "deposit", "reason"),
    [
        (Assets(E, 10), Assets(E + 1, 0), "reserve too low (eth)"),
        (Assets(E, 10), Assets(0, 11), "reserve too low (token)"),
    ],
    ids=["eth", "token"],
)
def test_hub_deposit_needs_the_reserve(
    d: Deployment, reserve: Assets, deposit: Assets, reason: str
) -> None:
    user = d.users[0]
    d.hub_deposit(reserve.eth, reserve.token)
    state = d.state(
        user,
        pending_deposit_hub=deposit,
        tx_count_global=1,
        tx_count_onchain=1,
        timeout=d.now + 100,
    )
    with reverts_unchanged(d, reason, [user]):
        d.hub_update(state)
    with reverts_unchanged(d, reason, [user]):
        d.user_update(state)


def test_user_withdrawal_to_the_zero_address_reverts(d: Deployment) -> None:
    user = d.users[0]
    confirmed = fund(d, user, Assets(E, 10))
    state = replace(
        confirmed,
        recipient=Address(b"\x00" * 20),
        balance_user=Assets(0, 10),
        pending_withdrawal_user=Assets(E, 0),
        tx_count_global=confirmed.tx_count_global + 1,
        tx_count_onchain=2,
        timeout=d.now + 100,
    )
    with reverts_unchanged(d, "recipient is the zero address", [user]):
        d.hub_update(state)
    # Without a user withdrawal the recipient does not matter.
    no_withdrawal = replace(state, balance_user=Assets(E, 10), pending_withdrawal_user=NO_ASSETS)
    d.hub_update(no_withdrawal)
