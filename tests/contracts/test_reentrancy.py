"""Re-entry through the token: a ChannelManager on HostileToken, whose transfer and
transferFrom first call a target with a set payload.

Every test arms the token with a call that is valid for any caller (emptying, or settling a
thread in, a channel that is ready for it), then makes a call that moves tokens. The call
back from inside the token transfer must fail (the reentry lock), the outer call must
succeed, and the very same call back, made by the same token outside any ChannelManager
call, must then succeed: it was a valid call, refused only for coming in mid-call. No money
is created or lost on the way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from web3.logs import DISCARD

from protocols.onchain import ChannelPhase, emptied_record, record_hash, thread_state_abi
from protocols.types import NO_ASSETS, Address, Assets
from tests.contracts.conftest import (
    CP,
    ETHER,
    Pair,
    assert_solvent,
    build_pair,
    catch_up,
    fund,
    stored_hash,
)
from tests.contracts.harness import Deployment, Party

E = ETHER


@pytest.fixture(scope="session")
def hostile_deployment() -> Deployment:
    return Deployment.create(n_users=4, token_name="HostileToken")


@pytest.fixture
def h(hostile_deployment: Deployment) -> Iterator[Deployment]:
    with hostile_deployment.snapshot():
        catch_up(hostile_deployment)
        yield hostile_deployment


def counters(h: Deployment) -> tuple[int, int]:
    f = h.token.functions
    return f.attempts().call(), f.successes().call()


def arm(h: Deployment, payload: str) -> None:
    h.send(h.token.functions.arm(h.manager.address, payload), h.outsider)


def disarm(h: Deployment) -> None:
    h.send(h.token.functions.disarm(), h.outsider)


def fire_outside(h: Deployment) -> Any:
    """Make the armed token run its call back with no ChannelManager call under way: a
    zero transfer between outsiders, sent straight to the token."""
    return h.send(h.token.functions.transfer(h.outsider.hex, 0), h.outsider)


def token_total(h: Deployment) -> int:
    addresses = [p.hex for p in [h.hub, *h.users, h.outsider]] + [h.manager.address]
    return sum(h.tokens(a) for a in addresses)


def ready_to_empty(h: Deployment, user: Party) -> Assets:
    """Fund `user`'s channel (tokens too), start its exit and wait it out; return what
    emptying it pays the user."""
    confirmed = fund(h, user, Assets(2 * E, 300), Assets(E, 100))
    paid = replace(
        confirmed,
        balance_user=Assets(E + E // 2, 250),
        balance_hub=Assets(E + E // 2, 150),
        tx_count_global=confirmed.tx_count_global + 1,
    )
    h.start_exit_with(paid)
    h.travel(CP)
    return paid.balance_user


def empty_payload(h: Deployment, user: Party) -> str:
    return str(h.manager.encode_abi("emptyChannel", args=[user.hex, h.record(user).as_abi()]))


def reentry_events(h: Deployment, receipt: Any) -> list[bool]:
    events = h.token.events.ReentryAttempted().process_receipt(receipt, errors=DISCARD)
    return [bool(e["args"]["succeeded"]) for e in events]


# --- the outer calls --------------------------------------------------------------------------

# Each prepares its call (without the victim channel's help) and returns it with the token
# amounts it must move: (outer call, {address: token change}).
Outer = Callable[[Deployment], tuple[Callable[[], Any], dict[str, int]]]


def outer_empty_channel(h: Deployment) -> tuple[Callable[[], Any], dict[str, int]]:
    user = h.users[3]
    payout = ready_to_empty(h, user)
    return (lambda: h.empty_channel(user)), {
        user.hex: payout.token,
        h.manager.address: -payout.token,
    }


def outer_hub_withdraw(h: Deployment) -> tuple[Callable[[], Any], dict[str, int]]:
    h.hub_deposit(E, 500)
    recipient = h.users[3]
    return (lambda: h.hub_withdraw(recipient, E, 500)), {
        recipient.hex: 500,
        h.manager.address: -500,
    }


def outer_user_update(h: Deployment) -> tuple[Callable[[], Any], dict[str, int]]:
    user = h.users[3]
    state = h.state(
        user,
        pending_deposit_user=Assets(E, 400),
        tx_count_global=1,
        tx_count_onchain=1,
        timeout=h.now + 10 * CP,
    )
    return (lambda: h.user_update(state)), {user.hex: -400, h.manager.address: 400}


def outer_hub_deposit(h: Deployment) -> tuple[Callable[[], Any], dict[str, int]]:
    return (lambda: h.hub_deposit(E, 600)), {h.hub.hex: -600, h.manager.address: 600}


def outer_hub_update(h: Deployment) -> tuple[Callable[[], Any], dict[str, int]]:
    user = h.users[3]
    confirmed = fund(h, user, Assets(2 * E, 300))
    state = replace(
        confirmed,
        recipient=h.outsider.address,
        balance_user=Assets(E, 100),
        pending_withdrawal_user=Assets(E, 200),
        tx_count_global=confirmed.tx_count_global + 1,
        tx_count_onchain=2,
        timeout=h.now + 10 * CP,
    )
    return (lambda: h.hub_update(state)), {h.outsider.hex: 200, h.manager.address: -200}


OUTERS: dict[str, Outer] = {
    "emptyChannel": outer_empty_channel,
    "hubWithdraw": outer_hub_withdraw,
    "userAuthorizedUpdate": outer_user_update,
    "hubDeposit": outer_hub_deposit,
    "hubAuthorizedUpdate": outer_hub_update,
}


@pytest.mark.parametrize("outer", list(OUTERS))
def test_reentry_during_a_token_transfer_is_refused(h: Deployment, outer: str) -> None:
    victim = h.users[2]
    victim_payout = ready_to_empty(h, victim)
    call, token_changes = OUTERS[outer](h)
    victim_record = h.record(victim)
    victim_hash = stored_hash(h, victim)
    total = token_total(h)
    arm(h, empty_payload(h, victim))
    tokens_before = {a: h.tokens(a) for a in token_changes}

    r = call()
    attempts, successes = counters(h)
    assert attempts >= 1 and successes == 0
    assert reentry_events(h, r) == [False] * attempts
    paid_out = [e["args"]["user"] for e in h.logs("ChannelPaidOut", r)]
    assert paid_out == ([h.users[3].hex] if outer == "emptyChannel" else [])
    # The victim's channel was not touched; the outer call did exactly its own job.
    assert stored_hash(h, victim) == victim_hash
    assert h.record(victim) == victim_record
    for address, change in token_changes.items():
        assert h.tokens(address) == tokens_before[address] + change
    assert token_total(h) == total
    assert_solvent(h)

    # The same call back, from the same token, outside any ChannelManager call: accepted.
    victim_tokens = h.tokens(victim)
    r = fire_outside(h)
    # It pays the victim in tokens, so the armed token tries once more from inside it:
    # that nested attempt is refused (logged first), the call back itself succeeds.
    assert counters(h) == (attempts + 2, 1)
    assert reentry_events(h, r) == [False, True]
    reopened, _ = emptied_record(victim_record, victim_record.exit_deadline)
    assert stored_hash(h, victim) == record_hash(reopened)
    assert h.record(victim).phase is ChannelPhase.OPEN
    assert h.tokens(victim) == victim_tokens + victim_payout.token
    assert token_total(h) == total
    assert_solvent(h)
    disarm(h)


# --- settleThread ---------------------------------------------------------------------------------


@pytest.fixture
def pair(h: Deployment) -> Pair:
    p = build_pair(h)
    h.start_thread_exit(p.a, p.t, ())
    h.travel(CP)
    return p


def settle_payload(h: Deployment, p: Pair, user: Party) -> str:
    args = [user.hex, h.record(user).as_abi(), thread_state_abi(p.t), [], h.dispute(p.t).as_abi()]
    return str(h.manager.encode_abi("settleThread", args=args))


def test_reentry_during_settle_thread_is_refused(h: Deployment, pair: Pair) -> None:
    """During A's settlement, the token tries to settle the thread in B's channel."""
    p = pair
    b_hash = stored_hash(h, p.b)
    total = token_total(h)
    arm(h, settle_payload(h, p, p.b))
    a_tokens, b_tokens = h.tokens(p.a), h.tokens(p.b)
    r = h.settle_thread(p.a, p.t, ())
    assert counters(h) == (1, 0)
    assert reentry_events(h, r) == [False]
    assert [e["args"]["user"] for e in h.logs("ThreadSettled", r)] == [p.a.hex]
    assert h.tokens(p.a) == a_tokens + p.t.balance_sender.token
    assert stored_hash(h, p.b) == b_hash
    assert h.record(p.b).phase is ChannelPhase.SETTLING_THREADS
    assert token_total(h) == total
    assert_solvent(h)

    r = fire_outside(h)
    assert counters(h) == (3, 1)  # the call back's own payout re-enters once more: refused
    assert reentry_events(h, r) == [False, True]
    assert [e["args"]["user"] for e in h.logs("ThreadSettled", r)] == [p.b.hex]
    assert h.tokens(p.b) == b_tokens + p.t.balance_receiver.token
    assert h.record(p.b).phase is ChannelPhase.OPEN
    assert token_total(h) == total
    assert_solvent(h)


def test_reentry_into_emptying_during_settle_thread_is_refused(h: Deployment, pair: Pair) -> None:
    p = pair
    victim = h.users[2]
    ready_to_empty(h, victim)
    victim_hash = stored_hash(h, victim)
    arm(h, empty_payload(h, victim))
    h.settle_thread(p.b, p.t, ())
    assert counters(h) == (1, 0)
    assert stored_hash(h, victim) == victim_hash
    fire_outside(h)
    assert counters(h) == (3, 1)
    assert h.record(victim).phase is ChannelPhase.OPEN
    assert_solvent(h)


def test_settle_thread_cannot_pay_twice_through_reentry(h: Deployment, pair: Pair) -> None:
    """The call back tries to settle the same thread in the same channel again, with the
    record the outer call started from: refused, and refused again afterwards (the record
    has moved on and the thread is settled)."""
    p = pair
    total = token_total(h)
    arm(h, settle_payload(h, p, p.a))
    a_tokens = h.tokens(p.a)
    h.settle_thread(p.a, p.t, ())
    assert counters(h) == (1, 0)
    fire_outside(h)
    assert counters(h) == (2, 0)
    assert h.tokens(p.a) == a_tokens + p.t.balance_sender.token
    assert token_total(h) == total
    assert_solvent(h)


def test_hostile_token_deployment_is_what_the_tests_assume(h: Deployment) -> None:
    assert h.manager.functions.token().call() == h.token.address
    assert Address.from_hex(h.token.address) != Address(b"\x00" * 20)
    assert counters(h) == (0, 0)
    assert h.reserve() == NO_ASSETS
