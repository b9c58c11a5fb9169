"""Thread exits: startThreadExit, startThreadExitWithUpdate, challengeThread, settleThread.

Most tests start from one prepared situation (`p`, built once per module): a thread
A -> B (A locks a, B locks b) open in both channels, and both channels exited at the
states that lock it, so both are settling their threads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace

import pytest

from protocols.onchain import (
    ChannelPhase,
    ThreadDispute,
    challenged_dispute,
    new_thread_dispute,
    thread_settled_record,
    thread_shares,
)
from protocols.thread_root import thread_leaf, thread_proof
from protocols.types import NO_ASSETS, Assets, ChannelState, ThreadState
from tests.contracts.conftest import (
    ACTION_CHALLENGE_THREAD,
    ACTION_SETTLE_THREAD,
    ACTION_START_THREAD_EXIT,
    CP,
    ETHER,
    LOCK_A,
    LOCK_B,
    Money,
    Pair,
    assert_record_event,
    assert_solvent,
    assert_stored,
    block_time,
    build_pair,
    catch_up,
    exit_and_empty,
    fund,
    next_block_at,
    pay_thread,
    reverts_unchanged,
    stored_dispute_hash,
    thread,
    with_threads,
)
from tests.contracts.conftest import (
    assert_dispute_stored as assert_dispute,
)
from tests.contracts.harness import Deployment, Party, Reverted

E = ETHER


@pytest.fixture(scope="module")
def prepared(deployment: Deployment) -> Iterator[Pair]:
    with deployment.snapshot():
        catch_up(deployment)
        yield build_pair(deployment)


@pytest.fixture
def p(prepared: Pair, d: Deployment) -> Pair:
    """The prepared pair, inside the test's own snapshot (`d`)."""
    assert d.record(prepared.a).phase is ChannelPhase.SETTLING_THREADS
    assert d.record(prepared.b).phase is ChannelPhase.SETTLING_THREADS
    return prepared


def dispute_event(d: Deployment, receipt: object) -> dict[str, object]:
    [event] = d.logs("ThreadDisputeChanged", receipt)
    args = dict(event["args"])
    args["dispute"] = ThreadDispute.from_abi(tuple(args["dispute"].values()))
    args["leaf"] = bytes(args["leaf"])
    return args


def settling_channel(d: Deployment, user: Party, threads: list[ThreadState]) -> ChannelState:
    """Fund `user`'s genesis channel, lock `threads` in it, exit and empty it."""
    state = with_threads(fund(d, user, Assets(5 * E, 500), Assets(3 * E, 300)), threads)
    exit_and_empty(d, state)
    return state


# --- the prepared situation ------------------------------------------------------------------


def test_prepared_channels_hold_the_thread_locks(d: Deployment, p: Pair) -> None:
    assert p.state_a.balance_user == Assets(4 * E, 400)  # 5 - a
    assert p.state_a.balance_hub == Assets(3 * E - E // 2, 260)  # 3 - b
    assert p.state_b.balance_user == Assets(4 * E - E // 2, 360)  # 4 - b
    assert p.state_b.balance_hub == Assets(E, 100)  # 2 - a
    for user in (p.a, p.b):
        record = d.record(user)
        assert record.held == p.t.total()
        assert record.thread_count == 1 and record.thread_root == thread_leaf(p.t)


# --- startThreadExit / startThreadExitWithUpdate -----------------------------------------------


@pytest.mark.parametrize(
    ("channel", "caller"),
    [("sender", "user"), ("sender", "hub"), ("receiver", "user"), ("receiver", "hub")],
)
def test_start_thread_exit_at_the_initial_state(
    d: Deployment, p: Pair, channel: str, caller: str
) -> None:
    user = p.channel_of(channel)
    sender = user if caller == "user" else d.hub
    record = d.record(user)
    money = Money(d)
    r = d.start_thread_exit(user, p.t, (), sender=sender)
    expected = new_thread_dispute(p.t, None, block_time(d, r), CP)
    assert expected.deadline == block_time(d, r) + CP and not expected.challenged
    assert_dispute(d, p.t, expected)
    assert dispute_event(d, r) == {
        "leaf": thread_leaf(p.t),
        "action": ACTION_START_THREAD_EXIT,
        "caller": sender.hex,
        "sender": p.a.hex,
        "receiver": p.b.hex,
        "threadId": p.t.thread_id,
        "dispute": expected,
    }
    assert d.record(user) == record  # the channel itself does not change
    assert d.logs("ChannelRecordChanged", r) == []
    money.check(receipts=[r])


@pytest.mark.parametrize("channel", ["sender", "receiver"])
def test_start_thread_exit_with_a_later_state(d: Deployment, p: Pair, channel: str) -> None:
    user = p.channel_of(channel)
    latest = pay_thread(p.t, Assets(E // 4, 30), tx_count=3)
    r = d.start_thread_exit(user, p.t, (), latest=latest)
    expected = new_thread_dispute(p.t, latest, block_time(d, r), CP)
    assert expected.tx_count == 3 and expected.balance_receiver == latest.balance_receiver
    assert_dispute(d, p.t, expected)
    event = dispute_event(d, r)
    assert event["action"] == ACTION_START_THREAD_EXIT and event["dispute"] == expected


# --- challengeThread ----------------------------------------------------------------------------


@pytest.mark.parametrize("challenger", ["receiver", "hub", "outsider"])
def test_challenge_thread_with_a_later_state(d: Deployment, p: Pair, challenger: str) -> None:
    d.start_thread_exit(p.a, p.t, ())
    started = d.dispute(p.t)
    latest = pay_thread(p.t, Assets(E, 60), tx_count=7)
    sender = {"receiver": p.b, "hub": d.hub, "outsider": d.outsider}[challenger]
    money = Money(d)
    r = d.challenge_thread(p.t, latest, sender)
    expected = challenged_dispute(p.t, started, latest, block_time(d, r))
    assert expected.challenged and expected.deadline == started.deadline
    assert_dispute(d, p.t, expected)
    event = dispute_event(d, r)
    assert event["action"] == ACTION_CHALLENGE_THREAD and event["caller"] == sender.hex
    assert event["dispute"] == expected
    money.check(receipts=[r])


def test_challenge_thread_in_the_last_second(d: Deployment, p: Pair) -> None:
    latest = pay_thread(p.t, Assets(1, 1), tx_count=2)
    d.start_thread_exit(p.b, p.t, (), latest=latest)
    started = d.dispute(p.t)
    newer = pay_thread(latest, Assets(1, 1))
    next_block_at(d, started.deadline - 1)
    r = d.challenge_thread(p.t, newer, d.outsider)
    assert_dispute(d, p.t, challenged_dispute(p.t, started, newer, block_time(d, r)))


# --- settleThread -------------------------------------------------------------------------------


def final_dispute(d: Deployment, p: Pair) -> ThreadState:
    """Open the dispute at a later state and wait out its challenge period."""
    final = pay_thread(p.t, Assets(E // 4, 70), tx_count=4)
    d.start_thread_exit(p.a, p.t, (), latest=final)
    d.travel(CP)
    return final


@pytest.mark.parametrize("channel", ["sender", "receiver"])
def test_settle_thread_pays_the_user_its_side_and_the_hub_the_other(
    d: Deployment, p: Pair, channel: str
) -> None:
    final = final_dispute(d, p)
    user = p.channel_of(channel)
    dispute = d.dispute(p.t)
    record = d.record(user)
    money = Money(d)
    r = d.settle_thread(user, p.t, ())
    expected, payout = thread_settled_record(record, user.address, p.t, dispute, block_time(d, r))
    mine = final.balance_sender if channel == "sender" else final.balance_receiver
    theirs = final.total() - mine
    assert payout.to_user == mine and payout.to_reserve == theirs
    # The last thread settled: the channel is open again, empty, its nonces kept.
    assert expected.phase is ChannelPhase.OPEN and expected.held == NO_ASSETS
    assert expected.tx_count_global == record.tx_count_global
    assert_stored(d, user, expected)
    assert_record_event(d, r, user, ACTION_SETTLE_THREAD, d.outsider, expected)
    [event] = d.logs("ThreadSettled", r)
    assert dict(event["args"]) == {
        "user": user.hex,
        "leaf": thread_leaf(p.t),
        "userEth": mine.eth,
        "userToken": mine.token,
        "hubEth": theirs.eth,
        "hubToken": theirs.token,
    }
    money.check(
        {user.hex: (mine.eth, mine.token), d.manager.address: (-mine.eth, -mine.token)},
        reserve=(theirs.eth, theirs.token),
        receipts=[r],
    )
    key = bytes(d.w3.keccak(user.address.raw + thread_leaf(p.t)))
    assert d.manager.functions.threadSettled(key).call()
    assert_solvent(d)


def test_settle_at_the_deadline(d: Deployment, p: Pair) -> None:
    d.start_thread_exit(p.a, p.t, ())
    deadline = d.dispute(p.t).deadline
    with reverts_unchanged(d, "challenge period not over", [p.a], [thread_leaf(p.t)]):
        d.settle_thread(p.a, p.t, ())
    next_block_at(d, deadline - 1)
    with reverts_unchanged(d, "challenge period not over", [p.a], [thread_leaf(p.t)]):
        d.settle_thread(p.a, p.t, ())
    next_block_at(d, deadline)
    r = d.settle_thread(p.a, p.t, ())
    assert block_time(d, r) == deadline
    # No challenge: the thread settles at its initial state.
    assert d.logs("ThreadSettled", r)[0]["args"]["userEth"] == LOCK_A.eth


def test_one_dispute_settles_the_thread_in_both_channels_and_the_hub_stays_neutral(
    d: Deployment, p: Pair
) -> None:
    final = final_dispute(d, p)
    money = Money(d)
    r1 = d.settle_thread(p.b, p.t, (), sender=p.b)
    r2 = d.settle_thread(p.a, p.t, (), sender=d.hub)
    a_final, b_final = final.balance_sender, final.balance_receiver
    # The hub locked b in A's channel and a in B's; it gets b' and a' back: a + b in all.
    money.check(
        {
            p.a.hex: (a_final.eth, a_final.token),
            p.b.hex: (b_final.eth, b_final.token),
            d.manager.address: (-a_final.eth - b_final.eth, -a_final.token - b_final.token),
        },
        reserve=(a_final.eth + b_final.eth, a_final.token + b_final.token),
        receipts=[r1, r2],
    )
    assert (a_final + b_final) == LOCK_A + LOCK_B
    for user in (p.a, p.b):
        assert d.record(user).phase is ChannelPhase.OPEN
    assert_solvent(d)


def test_thread_money_flow_conserves_every_deposit(d: Deployment) -> None:
    """DESIGN money flow from deposits to payouts: a thread C -> D locks c (C) and d (D);
    both channels exit at the locking states and the thread settles at (c', d'). C gets c'
    from C's channel, D gets d' from D's, the reserve gets d' + c', and all payouts together
    are exactly what was deposited: the hub's reserve ends where its deposits put it."""
    c, dd = d.users[2], d.users[3]
    dep_c, hub_c = Assets(3 * E, 300), Assets(2 * E, 250)
    dep_d, hub_d = Assets(E, 100), Assets(4 * E, 250)
    money = Money(d)
    receipts = [d.hub_deposit((hub_c + hub_d).eth, (hub_c + hub_d).token)]
    states = []
    for user, dep, hub_dep in ((c, dep_c, hub_c), (dd, dep_d, hub_d)):
        pending = d.state(
            user,
            pending_deposit_user=dep,
            pending_deposit_hub=hub_dep,
            tx_count_global=1,
            tx_count_onchain=1,
            timeout=d.now + 100,
        )
        receipts.append(d.user_update(pending))
        states.append(
            d.state(
                user, balance_user=dep, balance_hub=hub_dep, tx_count_global=2, tx_count_onchain=1
            )
        )
    t = thread(c, dd, Assets(2 * E, 200), Assets(E // 2, 40), thread_id=42)
    state_c, state_d = (with_threads(s, [t]) for s in states)
    final = pay_thread(t, Assets(E + E // 4, 130), tx_count=9)  # c' = 0.75 ETH, d' = 1.75
    receipts.append(d.start_exit_with(state_c))
    receipts.append(d.start_exit_with(state_d))
    d.travel(CP)
    paid_out = [d.empty_channel(c), d.empty_channel(dd)]
    receipts.append(d.start_thread_exit(dd, t, (), latest=final))
    d.travel(CP)
    paid_out += [d.settle_thread(c, t, ()), d.settle_thread(dd, t, ())]
    receipts += paid_out

    c_final, d_final = final.balance_sender, final.balance_receiver
    to_c = state_c.balance_user + c_final
    to_d = state_d.balance_user + d_final
    to_reserve = state_c.balance_hub + d_final + state_d.balance_hub + c_final
    assert to_c + to_d + to_reserve == dep_c + hub_c + dep_d + hub_d
    assert to_reserve == hub_c + hub_d  # the hub is neutral over the two channels
    # The events say the same, channel by channel.
    by_user: dict[str, Assets] = {c.hex: NO_ASSETS, dd.hex: NO_ASSETS}
    to_hub = NO_ASSETS
    for r in paid_out:
        for event in d.logs("ChannelPaidOut", r) + d.logs("ThreadSettled", r):
            args = event["args"]
            by_user[args["user"]] += Assets(args["userEth"], args["userToken"])
            to_hub = to_hub + Assets(args["hubEth"], args["hubToken"])
    assert by_user == {c.hex: to_c, dd.hex: to_d}
    assert to_hub == to_reserve
    # Users paid their deposits in and got their payouts out; the hub's deposits are back
    # in its reserve; the contract holds nothing more for these channels.
    money.check(
        {
            c.hex: (to_c.eth - dep_c.eth, to_c.token - dep_c.token),
            dd.hex: (to_d.eth - dep_d.eth, to_d.token - dep_d.token),
            d.hub.hex: (-(hub_c + hub_d).eth, -(hub_c + hub_d).token),
            d.manager.address: ((hub_c + hub_d).eth, (hub_c + hub_d).token),
        },
        reserve=((hub_c + hub_d).eth, (hub_c + hub_d).token),
        receipts=receipts,
    )
    for user in (c, dd):
        assert d.record(user).phase is ChannelPhase.OPEN and d.record(user).held == NO_ASSETS
    assert_solvent(d)


def test_threads_settle_one_by_one_and_the_last_reopens(d: Deployment, p: Pair) -> None:
    """Three threads under one root (proofs from thread_proof); each settles in C's channel;
    the channel reopens with the last."""
    c, dd = d.users[2], d.users[3]
    x = thread(c, p.a, Assets(E // 4, 10), NO_ASSETS, thread_id=7)
    y = thread(c, dd, Assets(E // 8, 20), Assets(E // 8, 0), thread_id=8)
    z = thread(p.b, c, Assets(E // 5, 5), Assets(E // 10, 1), thread_id=9)
    threads = [x, y, z]
    settling_channel(d, c, threads)
    proofs = {thread_leaf(t): thread_proof(threads, t) for t in threads}
    assert sorted(len(proof) for proof in proofs.values()) == [1, 2, 2]
    finals = {
        thread_leaf(x): pay_thread(x, Assets(E // 8, 3)),
        thread_leaf(y): None,
        thread_leaf(z): pay_thread(z, Assets(E // 5, 5), tx_count=12),
    }
    for t in threads:
        d.start_thread_exit(c, t, proofs[thread_leaf(t)], latest=finals[thread_leaf(t)])
    d.travel(CP)
    for i, t in enumerate([y, z, x]):
        record = d.record(c)
        dispute = d.dispute(t)
        money = Money(d)
        r = d.settle_thread(c, t, proofs[thread_leaf(t)])
        expected, payout = thread_settled_record(record, c.address, t, dispute, block_time(d, r))
        assert payout == thread_shares(c.address, t, dispute)  # nothing else is left
        assert_stored(d, c, expected)
        money.check(
            {
                c.hex: (payout.to_user.eth, payout.to_user.token),
                d.manager.address: (-payout.to_user.eth, -payout.to_user.token),
            },
            reserve=(payout.to_reserve.eth, payout.to_reserve.token),
            receipts=[r],
        )
        if i < 2:
            assert expected.phase is ChannelPhase.SETTLING_THREADS
            assert expected.thread_count == 2 - i
            # Settled once per channel.
            with reverts_unchanged(d, "thread already settled in this channel", [c]):
                d.settle_thread(c, t, proofs[thread_leaf(t)])
        else:
            assert expected.phase is ChannelPhase.OPEN and expected.held == NO_ASSETS
    assert_solvent(d)


def test_funds_left_after_the_last_thread_go_to_the_reserve(d: Deployment, p: Pair) -> None:
    """A channel whose signed balances left funds unassigned: the rest goes to the reserve
    when the last thread settles."""
    c = d.users[2]
    x = thread(c, p.a, Assets(E // 4, 10), NO_ASSETS, thread_id=3)
    conf = fund(d, c, Assets(5 * E, 500), Assets(3 * E, 300))
    state = with_threads(conf, [x])
    state = replace(state, balance_hub=state.balance_hub - Assets(E, 50))
    exit_and_empty(d, state)
    assert d.record(c).held == x.total() + Assets(E, 50)
    d.start_thread_exit(c, x, ())
    d.travel(CP)
    record, dispute = d.record(c), d.dispute(x)
    money = Money(d)
    r = d.settle_thread(c, x, ())
    expected, payout = thread_settled_record(record, c.address, x, dispute, block_time(d, r))
    assert payout.to_reserve == Assets(E, 50)  # the receiver's side (0) and the rest
    assert_stored(d, c, expected)
    money.check(
        {c.hex: (E // 4, 10), d.manager.address: (-(E // 4), -10)},
        reserve=(E, 50),
        receipts=[r],
    )
    [event] = d.logs("ThreadSettled", r)
    assert event["args"]["hubEth"] == 0 and event["args"]["userEth"] == E // 4


# --- who may call -------------------------------------------------------------------------------


def test_only_the_channels_parties_start_a_thread_exit(d: Deployment, p: Pair) -> None:
    latest = pay_thread(p.t, Assets(1, 1))
    for caller in (d.outsider, p.b, d.users[2]):
        with reverts_unchanged(d, "caller is not a party of the channel", [p.a]):
            d.start_thread_exit(p.a, p.t, (), sender=caller)
        with reverts_unchanged(d, "caller is not a party of the channel", [p.a]):
            d.start_thread_exit(p.a, p.t, (), latest=latest, sender=caller)


def test_user_must_be_a_party_of_the_thread(d: Deployment, p: Pair) -> None:
    c = d.users[2]
    with reverts_unchanged(d, "user is not a party of the thread", [c]):
        d.start_thread_exit(c, p.t, (), sender=d.hub)
    with reverts_unchanged(d, "user is not a party of the thread", [c]):
        d.start_thread_exit(c, p.t, (), sender=c)
    d.start_thread_exit(p.a, p.t, ())
    d.travel(CP)
    with reverts_unchanged(d, "user is not a party of the thread", [c]):
        d.settle_thread(c, p.t, ())


def test_initial_state_must_have_tx_count_zero(d: Deployment, p: Pair) -> None:
    later = replace(p.t, tx_count=1)
    with reverts_unchanged(d, "initial state has a non-zero txCount", [p.a]):
        d.start_thread_exit(p.a, later, ())
    with reverts_unchanged(d, "initial state has a non-zero txCount", [p.a]):
        d.start_thread_exit(p.a, later, (), latest=pay_thread(later, Assets(1, 0)))


# --- channel phase and proofs -------------------------------------------------------------------


def test_thread_exit_needs_a_settling_channel(d: Deployment, p: Pair) -> None:
    c = d.users[2]
    x = thread(c, p.a, Assets(E, 10), thread_id=5)
    locked = with_threads(fund(d, c, Assets(5 * E, 500), Assets(3 * E, 300)), [x])
    latest = pay_thread(x, Assets(1, 0))
    for phase in ("open", "exiting"):
        with reverts_unchanged(d, "channel is not settling threads", [c]):
            d.start_thread_exit(c, x, ())
        with reverts_unchanged(d, "channel is not settling threads", [c]):
            d.start_thread_exit(c, x, (), latest=latest, sender=d.hub)
        if phase == "open":
            d.start_exit_with(locked)
    d.travel(CP)
    d.empty_channel(c)
    d.start_thread_exit(c, x, ())
    d.travel(CP)
    d.settle_thread(c, x, ())  # the last thread: C's channel is open again
    with reverts_unchanged(d, "channel is not settling threads", [c]):
        d.settle_thread(c, x, ())


def test_settle_needs_a_settling_channel(d: Deployment, p: Pair) -> None:
    """A dispute opened through C's channel settles D's only once D's channel settles."""
    c, dd = d.users[2], d.users[3]
    x = thread(c, dd, Assets(E // 10, 1), Assets(E // 20, 2), thread_id=11)
    state_c = with_threads(fund(d, c, Assets(5 * E, 500), Assets(3 * E, 300)), [x])
    state_d = with_threads(fund(d, dd, Assets(E, 50), Assets(E, 50)), [x])
    exit_and_empty(d, state_c)
    d.start_thread_exit(c, x, ())
    d.travel(CP)
    with reverts_unchanged(d, "channel is not settling threads", [dd]):
        d.settle_thread(dd, x, ())
    d.start_exit_with(state_d)
    with reverts_unchanged(d, "channel is not settling threads", [dd]):
        d.settle_thread(dd, x, ())
    d.travel(CP)
    d.empty_channel(dd)
    r = d.settle_thread(dd, x, ())
    assert d.logs("ThreadSettled", r)[0]["args"]["userEth"] == E // 20


def test_thread_not_in_the_root(d: Deployment, p: Pair) -> None:
    other = replace(p.t, thread_id=2)
    with reverts_unchanged(d, "thread not in the channel's root", [p.a]):
        d.start_thread_exit(p.a, other, ())
    changed = replace(p.t, balance_sender=LOCK_A + Assets(1, 0))
    with reverts_unchanged(d, "thread not in the channel's root", [p.a]):
        d.start_thread_exit(p.a, changed, ())
    # A proof with an extra element does not verify against a one-leaf root either.
    with reverts_unchanged(d, "thread not in the channel's root", [p.a]):
        d.start_thread_exit(p.a, p.t, (thread_leaf(other),))


def test_proof_against_another_channels_root(d: Deployment, p: Pair) -> None:
    """x is in C's root, with a valid proof there; A is a party of x, but x is not in A's
    channel: the proof does not verify against A's root."""
    c = d.users[2]
    x = thread(c, p.a, Assets(E // 4, 10), thread_id=7)
    y = thread(c, d.users[3], Assets(E // 8, 20), thread_id=8)
    settling_channel(d, c, [x, y])
    proof = thread_proof([x, y], x)
    with reverts_unchanged(d, "thread not in the channel's root", [p.a]):
        d.start_thread_exit(p.a, x, proof)
    d.start_thread_exit(c, x, proof)  # the same proof works in C's channel
    d.travel(CP)
    with reverts_unchanged(d, "thread not in the channel's root", [p.a]):
        d.settle_thread(p.a, x, proof)
    # ... and the right thread with A's (empty) proof does not verify in C's channel.
    with reverts_unchanged(d, "thread not in the channel's root", [c]):
        d.settle_thread(c, x, ())


def test_tampered_or_wrong_proofs(d: Deployment, p: Pair) -> None:
    c = d.users[2]
    threads = [
        thread(c, p.a, Assets(E // 4, 10), thread_id=7),
        thread(c, d.users[3], Assets(E // 8, 20), thread_id=8),
        thread(p.b, c, Assets(E // 5, 5), thread_id=9),
    ]
    settling_channel(d, c, threads)
    x, y, _ = threads
    proof = thread_proof(threads, x)
    flipped = bytes([proof[0][0] ^ 1]) + proof[0][1:]
    bad_proofs = [
        (flipped, *proof[1:]),  # tampered sibling
        proof[:-1],  # missing a sibling
        (*proof, proof[0]),  # one sibling too many
        (),  # no proof at all
        thread_proof(threads, y),  # another thread's proof
    ]
    for bad in bad_proofs:
        with reverts_unchanged(d, "thread not in the channel's root", [c]):
            d.start_thread_exit(c, x, bad)
    d.start_thread_exit(c, x, proof)
    d.travel(CP)
    for bad in bad_proofs:
        with reverts_unchanged(d, "thread not in the channel's root", [c]):
            d.settle_thread(c, x, bad)
    d.settle_thread(c, x, proof)


def test_thread_dispute_starts_once(d: Deployment, p: Pair) -> None:
    d.start_thread_exit(p.a, p.t, ())
    leaf = thread_leaf(p.t)
    latest = pay_thread(p.t, Assets(1, 1))
    for user, sender in ((p.a, p.a), (p.b, p.b), (p.b, d.hub)):
        with reverts_unchanged(d, "thread dispute already started", [user], [leaf]):
            d.start_thread_exit(user, p.t, (), sender=sender)
        with reverts_unchanged(d, "thread dispute already started", [user], [leaf]):
            d.start_thread_exit(user, p.t, (), latest=latest, sender=sender)


# --- later states -------------------------------------------------------------------------------


def not_the_same(p: Pair, other: Party) -> list[ThreadState]:
    later = pay_thread(p.t, Assets(1, 1))
    return [
        replace(later, thread_id=2),
        replace(later, sender=other.address),
        replace(later, receiver=other.address),
    ]


def test_later_state_of_another_thread(d: Deployment, p: Pair) -> None:
    leaf = thread_leaf(p.t)
    for latest in not_the_same(p, d.users[2]):
        with reverts_unchanged(d, "not the same thread", [p.a], [leaf]):
            d.start_thread_exit(p.a, p.t, (), latest=latest)
    d.start_thread_exit(p.a, p.t, ())
    for latest in not_the_same(p, d.users[2]):
        with reverts_unchanged(d, "not the same thread", [p.a], [leaf]):
            d.challenge_thread(p.t, latest, d.outsider)


def test_stale_thread_tx_count(d: Deployment, p: Pair) -> None:
    leaf = thread_leaf(p.t)
    # The initial state is no "later" state.
    with reverts_unchanged(d, "stale thread txCount", [p.a], [leaf]):
        d.start_thread_exit(p.a, p.t, (), latest=pay_thread(p.t, Assets(1, 0), tx_count=0))
    latest = pay_thread(p.t, Assets(E // 2, 0), tx_count=5)
    d.start_thread_exit(p.a, p.t, (), latest=latest)
    for tx_count in (5, 4, 0):
        with reverts_unchanged(d, "stale thread txCount", [p.a], [leaf]):
            d.challenge_thread(p.t, pay_thread(p.t, Assets(1, 0), tx_count=tx_count), p.b)


@pytest.mark.parametrize("asset", ["eth", "token"])
def test_thread_total_must_not_change(d: Deployment, p: Pair, asset: str) -> None:
    leaf = thread_leaf(p.t)
    extra = Assets(1, 0) if asset == "eth" else Assets(0, 1)
    later = pay_thread(p.t, Assets(1, 1))
    more = replace(later, balance_receiver=later.balance_receiver + extra)
    less = replace(later, balance_sender=later.balance_sender - extra)
    for bad in (more, less):
        with reverts_unchanged(d, "thread total changed", [p.a], [leaf]):
            d.start_thread_exit(p.a, p.t, (), latest=bad)
    d.start_thread_exit(p.a, p.t, ())
    for bad in (more, less):
        with reverts_unchanged(d, "thread total changed", [p.a], [leaf]):
            d.challenge_thread(p.t, bad, d.hub)


# --- disputes -----------------------------------------------------------------------------------


def test_no_dispute_yet(d: Deployment, p: Pair) -> None:
    leaf = thread_leaf(p.t)
    assert stored_dispute_hash(d, leaf) == b"\x00" * 32
    empty = ThreadDispute(NO_ASSETS, NO_ASSETS, 0, 0)
    with reverts_unchanged(d, "no dispute for this thread", [p.a], [leaf]):
        d.challenge_thread(p.t, pay_thread(p.t, Assets(1, 0)), p.b, dispute=empty)
    with reverts_unchanged(d, "no dispute for this thread", [p.a], [leaf]):
        d.settle_thread(p.a, p.t, (), dispute=empty)


def test_dispute_must_be_the_current_one(d: Deployment, p: Pair) -> None:
    leaf = thread_leaf(p.t)
    d.start_thread_exit(p.a, p.t, ())
    started = d.dispute(p.t)
    forged = replace(
        started,
        balance_sender=started.balance_sender + started.balance_receiver,
        balance_receiver=NO_ASSETS,
    )
    early = replace(started, deadline=started.deadline - CP)
    later = pay_thread(p.t, Assets(1, 1))
    for wrong in (forged, early):
        with reverts_unchanged(d, "dispute is not the thread's current dispute", [p.a], [leaf]):
            d.challenge_thread(p.t, later, d.outsider, dispute=wrong)
    d.challenge_thread(p.t, later, d.outsider)
    d.travel(CP)
    for wrong in (started, forged):
        with reverts_unchanged(d, "dispute is not the thread's current dispute", [p.a], [leaf]):
            d.settle_thread(p.a, p.t, (), dispute=wrong)


def test_second_thread_challenge_needs_a_later_state(d: Deployment, p: Pair) -> None:
    leaf = thread_leaf(p.t)
    d.start_thread_exit(p.a, p.t, ())
    deadline = d.dispute(p.t).deadline
    d.challenge_thread(p.t, pay_thread(p.t, Assets(1, 1), tx_count=2), d.hub)
    for sender in (d.outsider, p.a, p.b, d.hub):
        with reverts_unchanged(d, "stale thread txCount", [p.a], [leaf]):
            d.challenge_thread(p.t, pay_thread(p.t, Assets(2, 2), tx_count=2), sender)
    d.challenge_thread(p.t, pay_thread(p.t, Assets(2, 2), tx_count=3), d.outsider)
    dispute = d.dispute(p.t)
    assert (dispute.tx_count, dispute.deadline, dispute.challenged) == (3, deadline, True)


@pytest.mark.parametrize("late", [0, 1, 5 * CP], ids=["at-deadline", "after", "long-after"])
def test_thread_challenge_after_the_deadline(d: Deployment, p: Pair, late: int) -> None:
    leaf = thread_leaf(p.t)
    d.start_thread_exit(p.b, p.t, ())
    next_block_at(d, d.dispute(p.t).deadline + late)
    with reverts_unchanged(d, "challenge period over", [p.b], [leaf]):
        d.challenge_thread(p.t, pay_thread(p.t, Assets(1, 1)), p.b)


@pytest.mark.parametrize("asset", ["eth", "token"])
def test_thread_cannot_pay_more_than_its_channel_holds(d: Deployment, p: Pair, asset: str) -> None:
    """A channel state whose balances already take all its funds though it names a thread
    (both parties signed it): the thread finds nothing held for it."""
    c = d.users[2]
    lock = Assets(E, 0) if asset == "eth" else Assets(0, 10)
    x = thread(c, p.a, lock, lock, thread_id=21)
    conf = fund(d, c, Assets(5 * E, 500), Assets(3 * E, 300))
    inconsistent = replace(
        with_threads(conf, [x]), balance_user=conf.balance_user, balance_hub=conf.balance_hub
    )
    exit_and_empty(d, inconsistent)
    record = d.record(c)
    assert record.phase is ChannelPhase.SETTLING_THREADS and record.held == NO_ASSETS
    d.start_thread_exit(c, x, ())
    d.travel(CP)
    with reverts_unchanged(d, "thread exceeds channel funds", [c], [thread_leaf(x)]):
        d.settle_thread(c, x, ())


# --- the only challenge -------------------------------------------------------------------------


def test_thread_dispute_initiator_cannot_shut_out_the_latest_state(d: Deployment, p: Pair) -> None:
    """A opens the thread's dispute at the initial state (all of a back to A) and challenges
    it at another old state. B, within the challenge period, must still be able to bring the
    latest double-signed state, and the thread must settle at it.

    (Fails while any caller may use the dispute's only challenge: its initiator takes it
    first and locks the thread at a stale state.)"""
    old = pay_thread(p.t, Assets(E // 10, 0), tx_count=1)
    latest = pay_thread(p.t, Assets(E, 100), tx_count=20)
    d.start_thread_exit(p.a, p.t, (), sender=p.a)
    with contextlib.suppress(Reverted):  # a contract may refuse the initiator's challenge
        d.challenge_thread(p.t, old, p.a)
    d.challenge_thread(p.t, latest, p.b)
    d.travel(CP)
    d.settle_thread(p.b, p.t, ())
    assert d.logs("ThreadSettled")[0]["args"]["userEth"] == latest.balance_receiver.eth


def test_a_reused_initial_state_cannot_settle_again(d: Deployment, p: Pair) -> None:
    """Thread disputes are keyed by the leaf and a settlement by (user, leaf), so the
    contract cannot tell two threads with the same initial state apart. A thread settles in
    A's channel, which reopens; if A and the hub lock the very same initial state again and
    A's channel exits once more, neither a new dispute nor a second settlement is possible.
    This is why SPEC (Channel updates, UpdateOpenThread) forbids reopening a thread key."""
    d.start_thread_exit(p.a, p.t, ())
    d.travel(CP)
    d.settle_thread(p.a, p.t, ())
    record = d.record(p.a)
    assert record.phase is ChannelPhase.OPEN
    deposit = d.state(
        p.a,
        pending_deposit_user=Assets(2 * E, 200),
        pending_deposit_hub=Assets(E, 100),
        tx_count_global=record.tx_count_global + 1,
        tx_count_onchain=record.tx_count_onchain + 1,
        timeout=d.now + 100,
    )
    d.user_update(deposit)
    again = with_threads(
        d.state(
            p.a,
            balance_user=Assets(2 * E, 200),
            balance_hub=Assets(E, 100),
            tx_count_global=deposit.tx_count_global + 1,
            tx_count_onchain=deposit.tx_count_onchain,
        ),
        [p.t],
    )
    exit_and_empty(d, again)
    assert d.record(p.a).phase is ChannelPhase.SETTLING_THREADS
    leaf = thread_leaf(p.t)
    with reverts_unchanged(d, "thread dispute already started", [p.a], [leaf]):
        d.start_thread_exit(p.a, p.t, ())
    d.travel(CP)
    with reverts_unchanged(d, "thread already settled in this channel", [p.a], [leaf]):
        d.settle_thread(p.a, p.t, ())
