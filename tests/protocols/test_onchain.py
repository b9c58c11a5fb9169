"""The pure model of the contract's records (`protocols.onchain`), without a chain."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.channel import genesis_state
from protocols.errors import InvalidValue
from protocols.keccak import keccak
from protocols.onchain import (
    GENESIS_RECORD,
    ChannelPhase,
    ChannelRecord,
    OnchainRejected,
    Payout,
    ThreadDispute,
    challenged_dispute,
    dispute_hash,
    disputed_balances,
    emptied_record,
    executed_record,
    exit_challenged_record,
    exit_started_record,
    new_thread_dispute,
    record_hash,
    thread_settled_record,
    thread_shares,
)
from protocols.types import NO_ASSETS, Address, Assets, ChannelState, ThreadState

A = Address(b"\x11" * 20)
B = Address(b"\x22" * 20)
C = Address(b"\x33" * 20)


def state(**fields: object) -> ChannelState:
    base = replace(genesis_state(A), tx_count_global=1, tx_count_onchain=1, timeout=100)
    return replace(base, **fields)  # type: ignore[arg-type]


INITIAL_SENDER = Assets(7, 3)
INITIAL_RECEIVER = Assets(1, 1)


def thread(
    tx_count: int = 0, sender_bal: Assets = INITIAL_SENDER, receiver_bal: Assets = INITIAL_RECEIVER
) -> ThreadState:
    return ThreadState(5, A, B, sender_bal, receiver_bal, tx_count)


uint = st.integers(0, 2**256 - 1)
records = st.builds(
    ChannelRecord,
    held=st.builds(Assets, uint, uint),
    balance_hub=st.builds(Assets, uint, uint),
    balance_user=st.builds(Assets, uint, uint),
    tx_count_global=uint,
    tx_count_onchain=uint,
    thread_root=st.binary(min_size=32, max_size=32),
    thread_count=uint,
    exit_deadline=uint,
    phase=st.sampled_from(ChannelPhase),
)


@settings(max_examples=200)
@given(records)
def test_record_abi_round_trip_and_hash(record: ChannelRecord) -> None:
    assert ChannelRecord.from_abi(record.as_abi()) == record
    encoded = record.encode()
    assert len(encoded) == 12 * 32
    expected = b"\x00" * 32 if record == GENESIS_RECORD else keccak(encoded)
    assert record_hash(record) == expected


def test_genesis_hash_is_zero_and_any_change_is_not() -> None:
    assert record_hash(GENESIS_RECORD) == b"\x00" * 32
    assert record_hash(replace(GENESIS_RECORD, tx_count_global=1)) != b"\x00" * 32


@pytest.mark.parametrize(
    "values",
    [
        (0,) * 11,
        (0,) * 11 + (4,),
        (0,) * 8 + ("root",) + (0,) * 3,
        (0,) * 8 + (b"\x00" * 31,) + (0,) * 3,
        (-1,) + (0,) * 7 + (b"\x00" * 32,) + (0,) * 3,
        (True,) + (0,) * 7 + (b"\x00" * 32,) + (0,) * 3,
    ],
)
def test_record_from_abi_refuses_malformed(values: tuple[object, ...]) -> None:
    with pytest.raises(InvalidValue):
        ChannelRecord.from_abi(values)


def test_dispute_abi_round_trip_and_hash() -> None:
    d = ThreadDispute(Assets(1, 2), Assets(3, 4), 9, 1000, True)
    assert d.as_abi() == (1, 3, 2, 4, 9, 1000, True)
    assert ThreadDispute.from_abi(d.as_abi()) == d
    assert dispute_hash(d) == keccak(
        b"".join(x.to_bytes(32, "big") for x in (1, 3, 2, 4, 9, 1000, 1))
    )
    with pytest.raises(InvalidValue):
        ThreadDispute.from_abi((1, 3, 2, 4, 9, 1000, 1))


def test_executed_update_credits_deposits_and_releases_withdrawals() -> None:
    record = ChannelRecord(
        held=Assets(100, 50), balance_user=Assets(100, 50), tx_count_global=3, tx_count_onchain=1
    )
    s = state(
        balance_user=Assets(60, 40),
        balance_hub=NO_ASSETS,
        pending_deposit_hub=Assets(20, 0),
        pending_withdrawal_user=Assets(40, 10),
        tx_count_global=5,
        tx_count_onchain=2,
        timeout=100,
    )
    after = executed_record(record, s, now=99)
    assert after.held == Assets(80, 40)
    assert after.balance_hub == Assets(20, 0)
    assert after.balance_user == Assets(60, 40)
    assert (after.tx_count_global, after.tx_count_onchain) == (5, 2)
    for now, reason in [(100, "update timed out")]:
        with pytest.raises(OnchainRejected, match=reason):
            executed_record(record, s, now)
    with pytest.raises(OnchainRejected, match="stale txCountGlobal"):
        executed_record(record, replace(s, tx_count_global=3), 0)
    with pytest.raises(OnchainRejected, match="stale txCountOnchain"):
        executed_record(record, replace(s, tx_count_onchain=1), 0)
    with pytest.raises(OnchainRejected, match="withdrawals exceed channel funds"):
        executed_record(record, replace(s, pending_withdrawal_user=Assets(200, 0)), 0)
    with pytest.raises(OnchainRejected, match="state exceeds channel funds"):
        executed_record(record, replace(s, balance_user=Assets(61, 40)), 0)
    with pytest.raises(OnchainRejected, match="channel is not open"):
        executed_record(replace(record, phase=ChannelPhase.EXITING), s, 0)


def test_disputed_balances_depend_on_execution() -> None:
    record = ChannelRecord(held=Assets(100, 0), tx_count_onchain=2)
    s = state(
        balance_user=Assets(50, 0),
        pending_deposit_user=Assets(30, 0),
        pending_withdrawal_user=Assets(5, 0),
        tx_count_onchain=2,
    )
    assert disputed_balances(record, s) == (NO_ASSETS, Assets(80, 0))
    assert disputed_balances(record, replace(s, tx_count_onchain=3)) == (NO_ASSETS, Assets(55, 0))
    with pytest.raises(OnchainRejected, match="stale txCountOnchain"):
        disputed_balances(record, replace(s, tx_count_onchain=1))


def test_exit_challenge_and_empty_without_threads() -> None:
    record = ChannelRecord(
        held=Assets(100, 10),
        balance_hub=Assets(30, 0),
        balance_user=Assets(70, 10),
        tx_count_global=4,
        tx_count_onchain=1,
    )
    started = exit_started_record(record, None, now=10, challenge_period=50)
    assert (started.phase, started.exit_deadline) == (ChannelPhase.EXITING, 60)
    later = state(balance_hub=Assets(60, 5), balance_user=Assets(40, 5), tx_count_global=9)
    challenged = exit_challenged_record(started, later, now=59)
    assert challenged.phase is ChannelPhase.CHALLENGED
    assert (challenged.balance_hub, challenged.exit_deadline) == (Assets(60, 5), 60)
    again = exit_challenged_record(challenged, replace(later, tx_count_global=10), now=59)
    assert again.tx_count_global == 10
    with pytest.raises(OnchainRejected, match="stale txCountGlobal"):
        exit_challenged_record(again, later, now=59)
    with pytest.raises(OnchainRejected, match="challenge period over"):
        exit_challenged_record(started, later, now=60)
    with pytest.raises(OnchainRejected, match="challenge period not over"):
        emptied_record(challenged, now=59)
    reopened, pay = emptied_record(challenged, now=60)
    assert pay == Payout(to_user=Assets(40, 5), to_reserve=Assets(60, 5))
    assert reopened == ChannelRecord(tx_count_global=9, tx_count_onchain=1)


def test_thread_settles_into_both_channels_with_hub_neutrality() -> None:
    initial = thread()
    final = thread(3, Assets(2, 1), Assets(6, 3))
    dispute = new_thread_dispute(initial, final, now=0, challenge_period=10)
    assert thread_shares(A, initial, dispute) == Payout(Assets(2, 1), Assets(6, 3))
    assert thread_shares(B, initial, dispute) == Payout(Assets(6, 3), Assets(2, 1))
    with pytest.raises(OnchainRejected, match="user is not a party of the thread"):
        thread_shares(C, initial, dispute)
    settling = ChannelRecord(
        held=Assets(8, 4), thread_count=1, tx_count_global=7, phase=ChannelPhase.SETTLING_THREADS
    )
    reopened, pay = thread_settled_record(settling, A, initial, dispute, now=10)
    assert pay == Payout(Assets(2, 1), Assets(6, 3))
    assert reopened == ChannelRecord(tx_count_global=7)
    with pytest.raises(OnchainRejected, match="thread exceeds channel funds"):
        thread_settled_record(replace(settling, held=Assets(7, 4)), A, initial, dispute, 10)
    with pytest.raises(OnchainRejected, match="challenge period not over"):
        thread_settled_record(settling, A, initial, dispute, 9)


def test_thread_dispute_challenge_rules() -> None:
    initial = thread()
    dispute = new_thread_dispute(initial, None, now=0, challenge_period=10)
    assert (dispute.tx_count, dispute.deadline, dispute.challenged) == (0, 10, False)
    later = thread(4, Assets(3, 3), Assets(5, 1))
    challenged = challenged_dispute(initial, dispute, later, now=9)
    assert (challenged.tx_count, challenged.challenged) == (4, True)
    again = challenged_dispute(initial, challenged, thread(5, Assets(3, 3), Assets(5, 1)), now=9)
    assert again.tx_count == 5
    with pytest.raises(OnchainRejected, match="stale thread txCount"):
        challenged_dispute(initial, again, later, now=9)
    with pytest.raises(OnchainRejected, match="challenge period over"):
        challenged_dispute(initial, dispute, later, now=10)
    with pytest.raises(OnchainRejected, match="thread total changed"):
        challenged_dispute(initial, dispute, thread(4, Assets(3, 3), Assets(5, 2)), now=0)
    with pytest.raises(OnchainRejected, match="not the same thread"):
        challenged_dispute(initial, dispute, replace(later, thread_id=6), now=0)
    with pytest.raises(OnchainRejected, match="stale thread txCount"):
        new_thread_dispute(initial, thread(0, Assets(3, 3), Assets(5, 1)), 0, 10)
    with pytest.raises(OnchainRejected, match="initial state has a non-zero txCount"):
        new_thread_dispute(later, None, 0, 10)
