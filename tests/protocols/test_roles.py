"""The whole node as one pure machine (`protocols.roles.node_step`).

A hub and users run in `tests.protocols.role_world.RoleWorld`: real keys and signatures,
FIFO links delivered in a fixed order (or a seeded random one), a ledger for the contract
that executes authorized updates when the test says so. Every step of every node also
checks the transition's bookkeeping against the old and new mappings
(`role_world.check_bookkeeping`); `test_transition_bookkeeping_names_what_changed` holds a
whole open-and-close to the exact sets.

Some tests pin bugs found and fixed in `protocols/roles.py`; their docstrings say which.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import replace
from typing import Any

import pytest

from protocols import channel as ch
from protocols import roles
from protocols import thread as th
from protocols.effects import Send
from protocols.messages import (
    ChannelCountersign,
    ChannelProposal,
    ChannelSync,
    CollateralNeeded,
    ErrorNotice,
    Message,
    RejectReason,
    SignedThreadState,
    ThreadCloseRequest,
    ThreadCountersign,
    ThreadOpenProposal,
    ThreadOpenRefused,
    ThreadOpenRequest,
    ThreadProposal,
    ThreadReject,
    UpdateCloseThread,
    UpdateConfirmPending,
    UpdateInvalidatePending,
    UpdateOpenThread,
    UpdatePayment,
    UpdatePending,
)
from protocols.types import NO_ASSETS, Address, Assets, Party, ThreadKey, ThreadState
from tests.protocols.role_world import (
    DOMAIN,
    START,
    ChainError,
    RoleNode,
    RoleWorld,
    check_exact_bookkeeping,
    money,
    signer_for,
)

FUNDS = Assets(100, 1_000)
COLLATERAL = Assets(50, 500)


# ---------------------------------------------------------------- helpers


def funded(
    users: tuple[str, ...] = ("a", "b"),
    collateral: Assets = COLLATERAL,
    *,
    hub_config: dict[str, Any] | None = None,
    user_config: dict[str, dict[str, Any]] | None = None,
    auto_chain: bool = True,
    seed: int | None = None,
) -> RoleWorld:
    """A world whose users each deposited FUNDS and whose hub put `collateral` in each."""
    world = RoleWorld(
        users, hub_config=hub_config, user_config=user_config, auto_chain=auto_chain, seed=seed
    )
    for node in world.u.values():
        world.fund(node, FUNDS, collateral)
    return world


def set_hub_policy(w: RoleWorld, **policy: Any) -> None:
    """The hub's operator changes its policy (the configuration is the hub's own)."""
    config = replace(w.hub.state.config, **policy)
    w.hub.state = replace(w.hub.state, config=config)


def sent_since(world: RoleWorld, mark: int) -> list[tuple[Address, Address, Message]]:
    return world.trace[mark:]


def hub_updates(world: RoleWorld, user: RoleNode, kind: type, mark: int = 0) -> list[Any]:
    """The updates of `kind` the hub proposed in `user`'s channel (a retransmission once)."""
    found: dict[int, Any] = {}
    for src, dst, m in world.trace[mark:]:
        if (
            src == world.hub.address
            and dst == user.address
            and isinstance(m, ChannelProposal)
            and isinstance(m.update, kind)
        ):
            found.setdefault(m.state.tx_count_global, m.update)
    return list(found.values())


def agreed_updates(world: RoleWorld, user: RoleNode, mark: int = 0) -> list[Any]:
    """The updates of `user`'s channel that became double-signed, in order (from the trace)."""
    proposals: dict[int, Any] = {}
    done: list[Any] = []
    counted: set[int] = set()
    for _src, _dst, m in world.trace[mark:]:
        if isinstance(m, ChannelProposal) and m.state.user == user.address:
            proposals[m.state.tx_count_global] = m.update
        elif isinstance(m, ChannelCountersign) and m.user == user.address:
            n = m.tx_count_global
            if n in proposals and n not in counted:
                counted.add(n)
                done.append(proposals[n])
    return done


def thread_key(node: RoleNode) -> ThreadKey:
    (key,) = node.state.threads
    return key


def double_sign(state: ThreadState, a: str = "a", b: str = "b") -> SignedThreadState:
    return SignedThreadState(
        state,
        signer_for(a).sign_thread_state(DOMAIN, state),
        signer_for(b).sign_thread_state(DOMAIN, state),
    )


def signed_sigs(signed: SignedThreadState) -> tuple[Any, Any]:
    return signed.sig_sender, signed.sig_receiver


def latest_tx(node: RoleNode, key: ThreadKey) -> int:
    latest = node.state.threads[key].latest
    assert latest is not None
    return latest.state.tx_count


def reasons(t: roles.NodeTransition) -> list[RejectReason | None]:
    """The reasons of the refusals `t` sends (None for a message that carries none)."""
    return [getattr(s.message, "reason", None) for s in sends(t)]


def unchanged(t: roles.NodeTransition) -> bool:
    return not (
        t.changed_channels or t.changed_threads or t.removed_threads or t.coordination_changed
    )


def sends(t: roles.NodeTransition) -> list[Send]:
    return [e for e in t.effects if isinstance(e, Send)]


def open_done(
    world: RoleWorld, a: RoleNode, b: RoleNode, lock_a: Assets, lock_b: Assets
) -> ThreadKey:
    _, out = world.open_thread(a, b, lock_a, lock_b)
    assert isinstance(out, roles.EventOpDone), out
    assert out.key is not None
    return out.key


# ---------------------------------------------------------------- 1. thread open


def test_thread_open_locks_receivers_channel_first_then_senders() -> None:
    w = funded()
    a, b, hub = w.u["a"], w.u["b"], w.hub
    before_a, before_b = w.agreed(a), w.agreed(b)
    lock_a, lock_b = Assets(10, 100), Assets(4, 40)
    mark = len(w.trace)
    op, out = w.open_thread(a, b, lock_a, lock_b)

    assert isinstance(out, roles.EventOpDone) and out.op_id == op
    key = out.key
    assert key == ThreadKey(a.address, b.address, 1)
    trace = sent_since(w, mark)
    locks = [
        (i, dst)
        for i, (src, dst, m) in enumerate(trace)
        if src == hub.address and isinstance(m, ChannelProposal)
        if isinstance(m.update, UpdateOpenThread)
    ]
    assert [dst for _, dst in locks] == [b.address, a.address]
    b_countersigned = next(
        i
        for i, (src, _dst, m) in enumerate(trace)
        if src == b.address and isinstance(m, ChannelCountersign)
    )
    assert locks[0][0] < b_countersigned < locks[1][0]  # A's lock waits for B's

    for node in (a, b):
        assert node.state.threads[key].phase is th.ThreadPhase.OPEN
    initial = a.state.threads[key].latest
    assert initial is not None and initial.state.tx_count == 0
    for node in (a, b, hub):
        assert node.of(roles.EventThreadOpened) == [roles.EventThreadOpened(initial)]
    assert not hub.state.coordination.openings
    assert not a.state.coordination.ops

    after_a, after_b = w.agreed(a), w.agreed(b)
    assert after_a.balance_user == before_a.balance_user - lock_a
    assert after_a.balance_hub == before_a.balance_hub - lock_b
    assert after_b.balance_user == before_b.balance_user - lock_b
    assert after_b.balance_hub == before_b.balance_hub - lock_a
    assert after_a.thread_count == after_b.thread_count == 1
    assert after_a.thread_root == after_b.thread_root
    assert w.hub.channel(a.address).open_thread(key) == initial


# ---------------------------------------------------------------- 2. collateral for an open


def test_open_refused_for_collateral_then_collateralized_to_the_floor_and_retried() -> None:
    floor = Assets(30, 300)
    w = RoleWorld(("a", "b"), auto_chain=False)
    a, b, hub = w.u["a"], w.u["b"], w.hub
    w.fund(a, FUNDS, COLLATERAL)
    w.fund(b, FUNDS, Assets(3, 0))
    set_hub_policy(w, collateral_floor=floor)  # raised once B's channel holds 3 wei
    lock = Assets(10, 5)
    added = len(hub.of(roles.EventCollateralAdded))
    mark = len(w.trace)

    op, out = w.open_thread(a, b, lock)
    assert isinstance(out, roles.EventOpFailed) and out.op_id == op
    assert out.reason is RejectReason.INSUFFICIENT_COLLATERAL
    assert out.missing == Assets(7, 5)  # exactly the shortfall: (10, 5) needed, (3, 0) there
    assert not a.state.threads  # A forgets the refused thread
    assert w.agreed(b).balance_hub == Assets(3, 0)  # nothing locked
    # The hub tops B's channel up to the floor (above the need): one pending deposit.
    pending = w.agreed(b)
    assert pending.pending_deposit_hub == floor - Assets(3, 0)
    assert hub.state.coordination.collateral == ((b.address, Assets(27, 300)),)
    assert len(w.chain) == 1

    # A retry while the collateral is in flight is refused the same way; no second deposit.
    op2, out2 = w.open_thread(a, b, lock)
    assert isinstance(out2, roles.EventOpFailed) and out2.op_id == op2
    assert out2.reason is RejectReason.INSUFFICIENT_COLLATERAL and out2.missing == Assets(7, 5)
    assert len(hub_updates(w, b, UpdatePending, mark)) == 1
    assert len(w.chain) == 1

    # Executed on-chain: the hub proposes the confirm, and only its countersign completes it.
    w.execute()
    assert len(hub.of(roles.EventCollateralAdded)) == added
    assert [type(m) for m in w.pending(hub, b)] == [ChannelProposal]
    w.run()
    assert hub.of(roles.EventCollateralAdded)[added:] == [
        roles.EventCollateralAdded(b.address, Assets(27, 300))
    ]
    assert w.agreed(b).balance_hub == floor
    assert not hub.state.coordination.collateral

    op3, out3 = w.open_thread(a, b, lock)
    assert isinstance(out3, roles.EventOpDone) and out3.op_id == op3
    assert w.agreed(b).balance_hub == floor - lock


def test_collateral_is_capped_by_the_ceiling() -> None:
    ceiling = Assets(6, 1_000)
    w = RoleWorld(("a", "b"), hub_config={"collateral_ceiling": ceiling})
    a, b, hub = w.u["a"], w.u["b"], w.hub
    w.fund(a, FUNDS)
    w.fund(b, FUNDS)
    lock = Assets(10, 0)

    _, out = w.open_thread(a, b, lock)
    assert isinstance(out, roles.EventOpFailed) and out.missing == Assets(10, 0)
    # Capped: only up to the ceiling (6), though 10 were missing.
    assert hub.of(roles.EventCollateralAdded) == [
        roles.EventCollateralAdded(b.address, Assets(6, 0))
    ]
    assert w.agreed(b).balance_hub == Assets(6, 0)

    mark = len(w.trace)
    _, out = w.open_thread(a, b, lock)
    assert isinstance(out, roles.EventOpFailed) and out.missing == Assets(4, 0)
    refusals = [e for e in hub.of(roles.EventRejected) if e.detail == "collateral ceiling reached"]
    assert refusals == [
        roles.EventRejected(b.address, RejectReason.POLICY, "collateral ceiling reached")
    ]
    assert not hub_updates(w, b, UpdatePending, mark)
    assert w.agreed(b).balance_hub == Assets(6, 0)


def test_collateral_shortfall_in_the_senders_channel() -> None:
    w = funded(collateral=NO_ASSETS)
    a, b, hub = w.u["a"], w.u["b"], w.hub
    w.collateralize(b, Assets(20, 0))  # B's channel can take A's lock; A's cannot take B's
    op, out = w.open_thread(a, b, Assets(5, 0), Assets(0, 9))
    assert isinstance(out, roles.EventOpFailed) and out.op_id == op
    assert out.reason is RejectReason.INSUFFICIENT_COLLATERAL and out.missing == Assets(0, 9)
    assert hub.of(roles.EventCollateralAdded)[-1] == roles.EventCollateralAdded(
        a.address, Assets(0, 9)
    )
    assert w.agreed(a).thread_count == w.agreed(b).thread_count == 0
    _, out = w.open_thread(a, b, Assets(5, 0), Assets(0, 9))
    assert isinstance(out, roles.EventOpDone)


# ---------------------------------------------------------------- 3. half-open refund


def test_half_open_thread_is_refunded_when_the_sender_refuses_its_lock() -> None:
    w = funded()
    a, b, hub = w.u["a"], w.u["b"], w.hub
    # A's policy: no threads in its channel (it refuses the hub's lock).
    a.state = replace(a.state, channels={a.address: replace(a.channel(), max_threads=0)})
    before = {n: money(w.agreed(n)) for n in (a, b)}

    mark = len(w.trace)
    op, out = w.open_thread(a, b, Assets(10, 100), Assets(4, 40))

    assert isinstance(out, roles.EventOpFailed) and out.op_id == op
    assert out.reason is RejectReason.TOO_MANY_THREADS
    refunds = hub_updates(w, b, UpdateCloseThread, mark)
    assert len(refunds) == 1
    assert refunds[0].final.tx_count == 0
    assert hub_updates(w, a, UpdateCloseThread, mark) == []
    assert agreed_updates(w, b, mark) == [*hub_updates(w, b, UpdateOpenThread, mark), *refunds]
    for n in (a, b):
        assert money(w.agreed(n)) == before[n]
        assert w.agreed(n).thread_count == 0
        assert not n.state.threads
    assert not hub.state.coordination.openings
    assert not hub.of(roles.EventThreadOpened)
    assert len(a.of(roles.EventOpFailed)) == 1


def test_half_open_thread_is_refunded_when_the_senders_channel_lost_its_collateral() -> None:
    w = funded(auto_chain=False)
    a, b, hub = w.u["a"], w.u["b"], w.hub
    before = {n: money(w.agreed(n)) for n in (a, b)}
    lock_a, lock_b = Assets(10, 100), Assets(4, 40)
    op = w.op(a, lambda i: roles.ActionOpenThread(i, b.address, lock_a, lock_b))
    w.deliver(a, b)
    w.deliver(b, a)
    w.deliver(a, hub)  # the hub checks both channels and proposes B's lock
    assert [type(m) for m in w.pending(hub, b)] == [ChannelProposal]
    assert hub_updates(w, b, UpdateOpenThread)  # B's lock is in flight
    # Meanwhile the hub moves all its collateral in A's channel back to its reserve.
    w.step(hub, roles.ActionReclaimCollateral(a.address, COLLATERAL))
    w.deliver(hub, a)
    w.deliver(a, hub)
    assert w.agreed(a).balance_hub == NO_ASSETS
    w.run()

    out = a.outcome(op)
    assert isinstance(out, roles.EventOpFailed)
    assert out.reason is RejectReason.INSUFFICIENT_COLLATERAL and out.missing == lock_b
    assert money(w.agreed(b)) == before[b]  # B's half refunded at the initial state
    assert w.agreed(b).thread_count == 0 and not b.state.threads
    state_a = w.agreed(a)
    assert state_a.balance_user == FUNDS and state_a.thread_count == 0
    assert state_a.pending_withdrawal_hub == COLLATERAL
    assert not a.state.threads and not hub.state.coordination.openings
    # The reclaim is never executed: once timed out it is undone, and A's channel is whole.
    w.block(state_a.timeout)
    w.run()
    assert money(w.agreed(a)) == before[a]


# ---------------------------------------------------------------- 4. close


def paid_thread(w: RoleWorld) -> tuple[ThreadKey, ThreadState]:
    """A thread A -> B with payments both ways; returns its key and latest state."""
    a, b = w.u["a"], w.u["b"]
    key = open_done(w, a, b, Assets(10, 100), Assets(4, 40))
    w.step(a, roles.ActionPayThread(key, 1, Assets(3, 30)))
    w.step(b, roles.ActionPayThread(key, 2, Assets(1, 0)))
    w.step(a, roles.ActionPayThread(key, 3, Assets(2, 5)))
    w.run()
    latest = a.state.threads[key].latest
    assert latest is not None and latest == b.state.threads[key].latest
    assert latest.state.balance_sender == Assets(6, 65)
    return key, latest.state


@pytest.mark.parametrize("closer", ["a", "b"])
def test_close_settles_both_channels_once(closer: str) -> None:
    w = funded()
    a, b, hub = w.u["a"], w.u["b"], w.hub
    before = {n: w.agreed(n) for n in (a, b)}
    key, final = paid_thread(w)
    mark = len(w.trace)
    node = w.u[closer]
    op = w.op(node, lambda i: roles.ActionCloseThread(i, key))
    w.run()

    assert node.outcome(op) == roles.EventOpDone(op, key)
    # Whoever is final first hands the final state to the hub (the other side may see its
    # channel settled before it is final itself, and then has nothing left to hand over).
    requests = [
        (src, m) for src, dst, m in sent_since(w, mark) if isinstance(m, ThreadCloseRequest)
    ]
    assert requests
    assert {src for src, _ in requests} <= {a.address, b.address}
    for n in (a, b):
        assert len(hub_updates(w, n, UpdateCloseThread, mark)) == 1
        assert not n.state.threads
        assert [e.final.state for e in n.of(roles.EventThreadClosed)] == [final]
    assert [e.final.state for e in hub.of(roles.EventThreadClosed)] == [final]
    assert not hub.state.coordination.closings
    sa, sb = w.agreed(a), w.agreed(b)
    # A's channel: user a', hub b'; B's: user b', hub a' (each added back to what was locked).
    assert sa.balance_user == before[a].balance_user - Assets(10, 100) + final.balance_sender
    assert sa.balance_hub == before[a].balance_hub - Assets(4, 40) + final.balance_receiver
    assert sb.balance_user == before[b].balance_user - Assets(4, 40) + final.balance_receiver
    assert sb.balance_hub == before[b].balance_hub - Assets(10, 100) + final.balance_sender
    hub_total = sa.balance_hub + sb.balance_hub
    assert hub_total == before[a].balance_hub + before[b].balance_hub  # the hub is neutral
    assert sa.thread_count == sb.thread_count == 0

    # A retransmitted request, once settled, changes nothing and proposes nothing.
    for sender, request in requests:
        t = w.receive(hub, sender, request)
        assert unchanged(t) and not sends(t)


def test_duplicate_close_request_during_settlement_is_ignored() -> None:
    w = funded()
    a, b, hub = w.u["a"], w.u["b"], w.hub
    key, final = paid_thread(w)
    signed = a.state.threads[key].latest
    assert signed is not None
    request = ThreadCloseRequest(signed)
    mark = len(w.trace)
    w.receive(hub, a.address, request)
    closing = hub.state.coordination.closing(key)
    # One channel after the other: B's (who did not ask) first, then A's at the same state.
    assert closing is not None and closing.order == (b.address, a.address)
    for sender in (a, b, a):
        t = w.receive(hub, sender.address, request)
        assert unchanged(t) and not sends(t)
    assert len(w.pending(hub, b)) == 1 and not w.pending(hub, a)
    w.run()
    for n in (a, b):
        assert agreed_updates(w, n, mark) == [UpdateCloseThread(final, *signed_sigs(signed))]
        assert w.agreed(n).thread_count == 0 and not n.state.threads
    assert [e.final for e in hub.of(roles.EventThreadClosed)] == [signed]


def test_newer_final_replaces_an_older_one_in_a_closing() -> None:
    w = funded()
    a, b, hub = w.u["a"], w.u["b"], w.hub
    key, _ = paid_thread(w)
    older = a.state.threads[key].latest
    assert older is not None
    newer_state = replace(
        older.state,
        balance_sender=older.state.balance_sender - Assets(1, 0),
        balance_receiver=older.state.balance_receiver + Assets(1, 0),
        tx_count=older.state.tx_count + 1,
    )
    newer = double_sign(newer_state)
    w.receive(hub, a.address, ThreadCloseRequest(older))
    t = w.receive(hub, b.address, ThreadCloseRequest(newer))
    closing = hub.state.coordination.closing(key)
    assert closing is not None and closing.final == newer
    assert t.coordination_changed
    # An older one never replaces a newer one.
    t = w.receive(hub, a.address, ThreadCloseRequest(older))
    assert unchanged(t)
    closing = hub.state.coordination.closing(key)
    assert closing is not None and closing.final == newer


def force_closed_at_an_older_state(w: RoleWorld) -> tuple[ThreadKey, int]:
    """A pays twice more; B countersigns the last, the countersign is lost, A force-closes."""
    a, b = w.u["a"], w.u["b"]
    key, _ = paid_thread(w)
    w.step(a, roles.ActionPayThread(key, 10, Assets(1, 0)))
    w.deliver(a, b)
    w.cut(a, b)  # B's countersign is lost, and B is unreachable from now on
    newest = latest_tx(b, key)
    assert latest_tx(a, key) == newest - 1
    op = w.op(a, lambda i: roles.ActionCloseThread(i, key, force=True))
    w.run()
    assert a.outcome(op) == roles.EventOpDone(op, key)
    return key, newest


def test_a_close_at_an_older_state_settles_both_channels_at_the_newest() -> None:
    """A force-closes at a state older than one B holds: B refuses to settle at it and hands
    the hub its newer one, and both channels settle at that (the hub's total unchanged)."""
    w = funded()
    a, b, hub = w.u["a"], w.u["b"], w.hub
    hub_before = w.agreed(a).balance_hub + w.agreed(b).balance_hub
    _, newest = force_closed_at_an_older_state(w)
    refused = [
        e for e in hub.of(roles.EventRejected) if e.reason is RejectReason.STALE_THREAD_STATE
    ]
    assert len(refused) == 1 and refused[0].sender == b.address
    assert w.agreed(a).thread_count == 0 and w.agreed(b).thread_count == 0
    (closed,) = hub.of(roles.EventThreadClosed)
    assert closed.final.state.tx_count == newest
    assert not hub.state.coordination.closings
    assert w.agreed(a).balance_hub + w.agreed(b).balance_hub == hub_before


def test_the_requesters_channel_waits_while_the_other_refuses() -> None:
    """Until the other channel settles, the requester's is not touched: no state is ever
    settled in one channel and another state in the other."""
    w = funded()
    a, b, hub = w.u["a"], w.u["b"], w.hub
    key, _ = paid_thread(w)
    w.step(a, roles.ActionPayThread(key, 10, Assets(1, 0)))
    w.deliver(a, b)
    w.cut(a, b)
    w.cut(b, hub)  # B cannot answer the hub either
    op = w.op(a, lambda i: roles.ActionCloseThread(i, key, force=True))
    w.run()
    assert a.outcome(op) is None  # A's close waits for B's channel
    assert w.agreed(a).thread_count == 1
    closing = hub.state.coordination.closing(key)
    assert closing is not None and closing.order == (b.address, a.address)
    assert not closing.fixed


def close_while_opening(w: RoleWorld, receiver_locked: bool) -> tuple[int, int, ThreadKey]:
    """A opens a thread to B and closes it before the hub has locked it everywhere: both
    close requests reach the hub while the lock in B's channel (or A's) is in flight."""
    a, b, hub = w.u["a"], w.u["b"], w.hub
    op = w.op(a, lambda i: roles.ActionOpenThread(i, b.address, Assets(10, 0), Assets(4, 0)))
    w.deliver(a, b)
    w.deliver(b, a)
    w.deliver(a, hub)
    if receiver_locked:
        w.deliver(hub, b)
        w.deliver(b, hub)
        assert [type(m) for m in w.pending(hub, a)] == [ChannelProposal]
        assert hub_updates(w, a, UpdateOpenThread)  # A's lock is in flight
    key = thread_key(a)
    close = w.op(a, lambda i: roles.ActionCloseThread(i, key))
    # A's channel has not locked it: A forgets the thread at once and asks the hub to
    # settle it (at its initial state) once locked.
    assert a.outcome(close) == roles.EventOpDone(close, key)
    assert key not in a.state.threads
    assert w.deliver(a, hub) == 1
    opening = hub.state.coordination.opening(key)
    assert opening is not None
    w.run()
    return op, close, key


def test_close_during_the_receivers_lock_is_not_lost() -> None:
    w = funded()
    a, b, hub = w.u["a"], w.u["b"], w.hub
    before = {n: money(w.agreed(n)) for n in (a, b)}
    _, close, _ = close_while_opening(w, receiver_locked=False)
    assert a.outcome(close) is not None  # the close op is answered
    for n in (a, b):
        assert w.agreed(n).thread_count == 0 and not n.state.threads
        assert money(w.agreed(n)) == before[n]
    assert not hub.state.coordination.openings and not hub.state.coordination.closings


def test_close_during_the_senders_lock_leaves_no_thread_locked() -> None:
    w = funded()
    a, b, hub = w.u["a"], w.u["b"], w.hub
    before = {n: money(w.agreed(n)) for n in (a, b)}
    _, close, _ = close_while_opening(w, receiver_locked=True)
    assert money(w.agreed(b)) == before[b]  # B's half is refunded (this much works)
    assert a.outcome(close) is not None
    assert w.agreed(a).thread_count == 0 and not a.state.threads
    assert money(w.agreed(a)) == before[a]
    assert not hub.state.coordination.openings and not hub.state.coordination.closings


def test_close_request_from_a_non_party_or_badly_signed_changes_nothing() -> None:
    w = funded(("a", "b", "c"))
    a, c, hub = w.u["a"], w.u["c"], w.hub
    key, _ = paid_thread(w)
    final = a.state.threads[key].latest
    assert final is not None
    before = w.snapshot()

    t = w.receive(hub, c.address, ThreadCloseRequest(final))
    assert unchanged(t)
    assert [s.message for s in sends(t)] == [
        ErrorNotice(RejectReason.NOT_A_PARTY, "not a party of the thread")
    ]
    assert sends(t)[0].to == c.address

    # B's signature replaced by C's; and a richer state for A with B's signature of another.
    forged = replace(final, sig_receiver=signer_for("c").sign_thread_state(DOMAIN, final.state))
    richer = replace(
        final.state,
        balance_sender=final.state.total(),
        balance_receiver=NO_ASSETS,
        tx_count=final.state.tx_count + 1,
    )
    stolen = SignedThreadState(
        richer, signer_for("a").sign_thread_state(DOMAIN, richer), final.sig_receiver
    )
    for bad in (forged, stolen):
        t = w.receive(hub, a.address, ThreadCloseRequest(bad))
        assert unchanged(t)
        assert reasons(t) == [RejectReason.BAD_SIGNATURE]
        assert (
            roles.EventRejected(a.address, RejectReason.BAD_SIGNATURE, "close not double-signed")
            in t.effects
        )
    w.run()
    assert w.snapshot() == before
    assert not hub.state.coordination.closings


# ---------------------------------------------------------------- 5. hub-routed payments


def test_routed_payment_credits_the_recipient() -> None:
    w = funded()
    a, b = w.u["a"], w.u["b"]
    before = {n: w.agreed(n) for n in (a, b)}
    amount = Assets(7, 70)
    op = w.op(a, lambda i: roles.ActionPayViaHub(i, b.address, amount))
    w.run()
    assert a.outcome(op) == roles.EventOpDone(op)
    assert b.of(roles.EventHubPaymentReceived) == [roles.EventHubPaymentReceived(amount)]
    sa, sb = w.agreed(a), w.agreed(b)
    assert sa.balance_user == before[a].balance_user - amount
    assert sa.balance_hub == before[a].balance_hub + amount
    assert sb.balance_user == before[b].balance_user + amount
    assert sb.balance_hub == before[b].balance_hub - amount
    assert not a.of(roles.EventHubPaymentReceived)


def test_routed_payment_waits_for_collateral_in_the_recipients_channel() -> None:
    w = funded(auto_chain=False, collateral=NO_ASSETS)
    a, b, hub = w.u["a"], w.u["b"], w.hub
    w.fund(b, NO_ASSETS, Assets(2, 0))
    amount = Assets(7, 0)
    mark = len(w.trace)
    op = w.op(a, lambda i: roles.ActionPayViaHub(i, b.address, amount))
    w.run()
    assert a.outcome(op) == roles.EventOpDone(op)  # A paid the hub
    needed = [m for s, d, m in sent_since(w, mark) if isinstance(m, CollateralNeeded)]
    assert needed == [CollateralNeeded(b.address, Assets(5, 0))]
    assert a.of(roles.EventCollateralNeeded) == [
        roles.EventCollateralNeeded(b.address, Assets(5, 0))
    ]
    assert not b.of(roles.EventHubPaymentReceived)
    assert hub.state.coordination.forwards == (roles.Forward(a.address, b.address, amount),)
    assert w.agreed(b).pending_deposit_hub == Assets(5, 0)

    w.execute()
    w.run()
    assert hub.of(roles.EventCollateralAdded) == [
        roles.EventCollateralAdded(b.address, Assets(2, 0)),
        roles.EventCollateralAdded(b.address, Assets(5, 0)),
    ]
    assert b.of(roles.EventHubPaymentReceived) == [roles.EventHubPaymentReceived(amount)]
    assert not hub.state.coordination.forwards
    assert w.agreed(b).balance_user == FUNDS + amount
    assert w.agreed(b).balance_hub == NO_ASSETS


def test_routed_payment_is_refunded_when_the_collateral_transaction_fails() -> None:
    w = funded(auto_chain=False, collateral=NO_ASSETS)
    a, b, hub = w.u["a"], w.u["b"], w.hub
    amount = Assets(7, 0)
    w.op(a, lambda i: roles.ActionPayViaHub(i, b.address, amount))
    w.run()
    assert w.agreed(a).balance_user == FUNDS - amount
    w.fail_tx()
    w.run()
    assert a.of(roles.EventHubPaymentReceived) == [roles.EventHubPaymentReceived(amount)]
    assert w.agreed(a).balance_user == FUNDS
    assert not b.of(roles.EventHubPaymentReceived)
    assert not hub.state.coordination.forwards and not hub.state.coordination.collateral
    assert any(e.sender == a.address for e in hub.of(roles.EventRejected))


def test_routed_payment_is_refunded_when_the_collateral_times_out_unexecuted() -> None:
    w = funded(auto_chain=False, collateral=NO_ASSETS)
    a, b, hub = w.u["a"], w.u["b"], w.hub
    amount = Assets(7, 0)
    w.op(a, lambda i: roles.ActionPayViaHub(i, b.address, amount))
    w.run()
    timeout = w.agreed(b).timeout
    assert hub.state.coordination.forwards and timeout > 0
    w.block(timeout)  # the hub never got its collateral mined
    w.run()
    assert isinstance(agreed_updates(w, b)[-1], UpdateInvalidatePending)
    assert a.of(roles.EventHubPaymentReceived) == [roles.EventHubPaymentReceived(amount)]
    assert w.agreed(a).balance_user == FUNDS
    assert not hub.state.coordination.forwards and not hub.state.coordination.collateral
    assert not hub.of(roles.EventCollateralAdded)


@pytest.mark.parametrize("to", ["a", "hub", "zero"])
def test_routed_payment_to_myself_or_no_user_is_refused_locally(to: str) -> None:
    w = funded()
    a = w.u["a"]
    target = {"a": a.address, "hub": w.hub.address, "zero": Address(b"\0" * 20)}[to]
    before = w.snapshot()
    mark = len(w.trace)
    op = w.op(a, lambda i: roles.ActionPayViaHub(i, target, Assets(1, 0)))
    w.run()
    out = a.outcome(op)
    assert isinstance(out, roles.EventOpFailed) and out.reason is RejectReason.POLICY
    assert not sent_since(w, mark)
    assert w.snapshot() == before


def hostile_routed_payment(w: RoleWorld, payer: RoleNode, to: Address, amount: Assets) -> None:
    """`payer` bypasses its node's checks: its channel machine proposes the payment itself."""
    update = UpdatePayment(Party.USER, amount, to)
    result = ch.step(payer.channel(), ch.ActionProposeUpdate(update), payer.signer)
    assert result.accepted
    payer.state = replace(payer.state, channels={payer.address: result.state})
    w.route(payer, result.effects)


@pytest.mark.parametrize("to", ["self", "hub", "stranger_over_capacity"])
def test_routed_payment_the_hub_cannot_forward_is_refunded(to: str) -> None:
    max_channels = {"stranger_over_capacity": 2}.get(to, 100)
    w = funded(hub_config={"max_channels": max_channels})
    a, b, hub = w.u["a"], w.u["b"], w.hub
    target = {
        "self": a.address,
        "hub": hub.address,
        "stranger_over_capacity": signer_for("stranger").address,
    }[to]
    before = w.snapshot()
    hostile_routed_payment(w, a, target, Assets(3, 3))
    w.run()
    assert a.of(roles.EventHubPaymentReceived) == [roles.EventHubPaymentReceived(Assets(3, 3))]
    assert money(w.agreed(a)) == money(before[("a", a.address)])
    assert money(w.agreed(b)) == money(before[("b", b.address)])
    assert target not in hub.state.channels or target == a.address
    assert not hub.state.coordination.forwards and not hub.state.coordination.collateral


def test_routed_payment_to_a_stranger_who_never_answers_is_refunded() -> None:
    w = funded()
    a, hub = w.u["a"], w.hub
    stranger = signer_for("stranger").address
    w.op(a, lambda i: roles.ActionPayViaHub(i, stranger, Assets(5, 0)))
    w.run()
    w.block(START + 10 * roles.DEFAULT_PENDING_TIMEOUT)
    w.run()
    assert w.agreed(a).balance_user == FUNDS  # refunded
    assert not hub.state.coordination.forwards


# ---------------------------------------------------------------- 6. deposit and withdraw


def test_deposit_completes_only_once_executed_and_confirmed() -> None:
    w = RoleWorld(("a",), auto_chain=False)
    a, hub = w.u["a"], w.hub
    op = w.op(a, lambda i: roles.ActionDeposit(i, FUNDS))
    w.run()
    assert a.outcome(op) is None
    assert w.agreed(a).pending_deposit_user == FUNDS
    assert w.agreed(a).balance_user == NO_ASSETS
    (submission,) = w.chain
    assert submission.latest == a.channel().latest  # the user submits its own deposit
    assert not [e for e in hub.events if isinstance(e, ch.ContractSendAuthorizedUpdate)]

    w.execute()
    assert a.outcome(op) is None  # executed, but the confirm is not countersigned yet
    (confirm,) = w.pending(a, hub)
    assert isinstance(confirm, ChannelProposal) and isinstance(confirm.update, UpdateConfirmPending)
    assert not w.pending(hub, a)  # the hub does not confirm what the user submitted
    w.run()
    assert a.outcome(op) == roles.EventOpDone(op)
    assert a.of(roles.EventDepositConfirmed) == [roles.EventDepositConfirmed(a.address, FUNDS)]
    state = w.agreed(a)
    assert state.balance_user == FUNDS and not state.has_pending()
    assert w.ledger.held[a.address] == FUNDS
    assert not a.state.coordination.ops


def test_withdraw_completes_only_once_the_hub_executed_and_confirmed() -> None:
    w = RoleWorld(("a",), auto_chain=False)
    a, hub = w.u["a"], w.hub
    w.fund(a, FUNDS)
    recipient = signer_for("recipient").address
    amount = Assets(30, 300)
    op = w.op(a, lambda i: roles.ActionWithdraw(i, amount, recipient))
    w.run()
    assert a.outcome(op) is None
    assert w.agreed(a).balance_user == FUNDS - amount  # taken out at once
    (submission,) = w.chain
    assert submission in hub.events  # the hub submits withdrawals
    w.execute()
    assert a.outcome(op) is None
    w.run()
    assert a.outcome(op) == roles.EventOpDone(op)
    assert a.of(roles.EventWithdrawalConfirmed) == [
        roles.EventWithdrawalConfirmed(a.address, amount, recipient)
    ]
    assert w.ledger.paid_out[recipient] == amount
    assert w.agreed(a).balance_user == FUNDS - amount and not w.agreed(a).has_pending()


def test_failed_deposit_transaction_fails_the_op_and_the_timeout_undoes_it() -> None:
    w = RoleWorld(("a",), auto_chain=False)
    a = w.u["a"]
    op = w.op(a, lambda i: roles.ActionDeposit(i, FUNDS))
    w.run()
    timeout = w.agreed(a).timeout
    w.fail_tx(reason="out of gas")
    out = a.outcome(op)
    assert out == roles.EventOpFailed(op, RejectReason.NOT_EXECUTED_ONCHAIN, "out of gas")
    assert w.agreed(a).has_pending()  # still pending until it times out
    w.block(timeout)
    w.run()
    state = w.agreed(a)
    assert not state.has_pending() and state.balance_user == NO_ASSETS
    assert isinstance(agreed_updates(w, a)[-1], UpdateInvalidatePending)
    assert len(a.of(roles.EventOpFailed)) == 1  # failed once


@pytest.mark.parametrize("kind", ["deposit", "withdraw"])
def test_timed_out_pending_update_is_invalidated_once(kind: str) -> None:
    w = RoleWorld(("a",), auto_chain=False)
    a, hub = w.u["a"], w.hub
    w.fund(a, FUNDS)
    before = money(w.agreed(a))
    amount = Assets(30, 300)
    if kind == "deposit":
        op = w.op(a, lambda i: roles.ActionDeposit(i, amount))
    else:
        op = w.op(a, lambda i: roles.ActionWithdraw(i, amount, a.address))
    w.run()
    pending = w.agreed(a)
    assert pending.has_pending() and len(w.chain) == 1
    mark = len(w.trace)

    w.block(pending.timeout - 1)  # not yet
    w.run()
    assert w.agreed(a) == pending
    w.block(pending.timeout)
    w.block(pending.timeout + 1)  # both before any message moves: still proposed once each
    w.run()
    w.block(pending.timeout + 50)
    w.run()

    invalidations = [
        u for u in agreed_updates(w, a, mark) if isinstance(u, UpdateInvalidatePending)
    ]
    assert invalidations == [UpdateInvalidatePending(pending.tx_count_onchain)]
    assert agreed_updates(w, a, mark) == invalidations
    assert money(w.agreed(a)) == before  # a withdrawal's amount is back in the balance
    assert w.agreed(a).tx_count_onchain == pending.tx_count_onchain  # never lowered
    assert a.outcome(op) == roles.EventOpFailed(
        op, RejectReason.NOT_EXECUTED_ONCHAIN, "timed out unexecuted"
    )
    for node in (a, hub):
        assert not node.state.coordination.invalidating
    with pytest.raises(ChainError):
        w.execute()  # the contract refuses it now
    # The next pending update uses a higher txCountOnchain than the voided one.
    op2 = w.op(a, lambda i: roles.ActionDeposit(i, amount))
    w.run()
    assert w.agreed(a).tx_count_onchain == pending.tx_count_onchain + 1
    w.execute(-1)
    w.run()
    assert isinstance(a.outcome(op2), roles.EventOpDone)


def test_two_equal_deposits_each_get_their_own_answer() -> None:
    w = RoleWorld(("a",))
    a = w.u["a"]
    op1 = w.op(a, lambda i: roles.ActionDeposit(i, Assets(10, 0)))
    op2 = w.op(a, lambda i: roles.ActionDeposit(i, Assets(10, 0)))
    w.run()
    assert w.agreed(a).balance_user == Assets(10, 0)  # the first deposit went through
    assert a.outcome(op1) == roles.EventOpDone(op1)
    assert a.outcome(op2) is not None  # either done later or refused, but answered
    assert not a.state.coordination.ops


# ---------------------------------------------------------------- 7. hostile inputs


def test_thread_open_request_from_someone_other_than_the_sender_is_refused() -> None:
    w = funded(("a", "b", "c"))
    a, b, c, hub = w.u["a"], w.u["b"], w.u["c"], w.hub
    initial = ThreadState(1, a.address, b.address, Assets(5, 0), NO_ASSETS, 0)
    signed = double_sign(initial)
    before = w.snapshot()
    t = w.receive(hub, c.address, ThreadOpenRequest(signed))
    assert [s.message for s in sends(t)] == [
        ThreadOpenRefused(initial.key, RejectReason.NOT_A_PARTY, NO_ASSETS, "only the sender opens")
    ]
    assert unchanged(t)
    # From an address the hub has no channel with: refused before anything is looked at.
    stranger = signer_for("stranger").address
    t = w.receive(hub, stranger, ThreadOpenRequest(signed))
    assert reasons(t) == [RejectReason.UNKNOWN_CHANNEL]
    assert unchanged(t)
    w.run()
    assert w.snapshot() == before


@pytest.mark.parametrize("forge", ["receiver", "sender", "other_state"])
def test_forged_initial_state_is_refused(forge: str) -> None:
    w = funded(("a", "b", "c"))
    a, hub = w.u["a"], w.hub
    b = w.u["b"]
    initial = ThreadState(1, a.address, b.address, Assets(5, 0), NO_ASSETS, 0)
    good = double_sign(initial)
    other = replace(initial, balance_sender=Assets(1, 0))
    if forge == "receiver":
        bad = replace(good, sig_receiver=signer_for("c").sign_thread_state(DOMAIN, initial))
    elif forge == "sender":
        bad = replace(good, sig_sender=signer_for("c").sign_thread_state(DOMAIN, initial))
    else:
        bad = replace(good, sig_receiver=signer_for("b").sign_thread_state(DOMAIN, other))
    before = w.snapshot()
    t = w.receive(hub, a.address, ThreadOpenRequest(bad))
    assert reasons(t) == [RejectReason.BAD_SIGNATURE]
    assert [s.to for s in sends(t)] == [a.address]
    assert unchanged(t)
    w.run()
    assert w.snapshot() == before
    assert not hub.state.coordination.openings


def test_thread_open_proposal_not_from_its_sender_or_forged_is_refused() -> None:
    w = funded(("a", "b", "c"))
    a, b, c = w.u["a"], w.u["b"], w.u["c"]
    initial = ThreadState(1, a.address, b.address, Assets(1, 0), Assets(1, 0), 0)
    genuine = a.signer.sign_thread_state(DOMAIN, initial)
    forged = c.signer.sign_thread_state(DOMAIN, initial)
    before = w.snapshot()
    for sender, signature, reason in (
        (c, genuine, RejectReason.NOT_A_PARTY),  # C relays A's proposal
        (a, forged, RejectReason.BAD_SIGNATURE),
    ):
        t = w.receive(b, sender.address, ThreadOpenProposal(initial, signature))
        assert reasons(t) == [reason] and [s.to for s in sends(t)] == [sender.address]
        assert unchanged(t)
    assert not b.state.threads
    assert w.snapshot() == before


def test_channel_message_about_another_users_channel_is_refused() -> None:
    w = funded()
    a, b, hub = w.u["a"], w.u["b"], w.hub
    before = w.snapshot()
    state_b = w.agreed(b)
    theirs = replace(
        state_b,
        balance_hub=state_b.balance_hub - Assets(1, 0),
        balance_user=state_b.balance_user + Assets(1, 0),
        tx_count_global=state_b.tx_count_global + 1,
    )
    sig = a.signer.sign_channel_state(DOMAIN, theirs)
    proposal = ChannelProposal(
        UpdatePayment(Party.HUB, Assets(1, 0), Address(b"\0" * 20)),
        theirs,
        state_b.tx_count_global,
        sig,
    )
    t = w.receive(hub, a.address, proposal)
    assert unchanged(t) and not sends(t)
    assert t.effects == (
        roles.EventRejected(a.address, RejectReason.NOT_A_PARTY, "another's channel"),
    )
    latest_b = hub.channel(b.address).latest
    assert latest_b.sig_hub is not None and latest_b.sig_user is not None
    sync = ChannelSync(latest_b.state, latest_b.sig_hub, latest_b.sig_user, ())
    t = w.receive(hub, a.address, sync)
    assert unchanged(t) and not sends(t)
    # A user takes channel messages only from the hub, about its own channel.
    t = w.receive(a, b.address, proposal)
    assert unchanged(t) and not sends(t)
    assert [e.reason for e in t.effects if isinstance(e, roles.EventRejected)] == [
        RejectReason.UNKNOWN_CHANNEL
    ]
    t = w.receive(a, hub.address, sync)
    assert unchanged(t) and not sends(t)
    assert w.snapshot() == before


def test_thread_proposal_for_an_unknown_thread_gets_one_reject_and_no_loop() -> None:
    w = funded(("a", "b"))
    a, b = w.u["a"], w.u["b"]
    before = w.snapshot()
    state = ThreadState(9, a.address, b.address, Assets(1, 0), Assets(1, 0), 1)
    proposal = ThreadProposal(state, 0, a.signer.sign_thread_state(DOMAIN, state))
    mark = len(w.trace)
    w.route(a, (Send(b.address, proposal),))
    w.run()
    replies = sent_since(w, mark)[1:]
    assert [(s, d) for s, d, _ in replies] == [(b.address, a.address)]
    (_, _, reply) = replies[0]
    assert isinstance(reply, ThreadReject) and reply.reason is RejectReason.UNKNOWN_THREAD
    assert reply.key == state.key
    # A ThreadReject (and other thread messages) about an unknown thread get no answer.
    for message in (
        reply,
        ThreadCountersign(state.key, 1, a.signer.sign_thread_state(DOMAIN, state)),
    ):
        t = w.receive(b, a.address, message)
        assert unchanged(t) and not t.effects
    assert w.snapshot() == before
    assert not a.state.threads and not b.state.threads


def test_too_many_unlocked_threads_from_one_peer_are_refused() -> None:
    w = funded(("a", "b", "c"))
    a, b, c, hub = w.u["a"], w.u["b"], w.u["c"], w.hub
    w.down.add((a.address, hub.address))  # A never asks the hub to lock them
    before = w.snapshot()
    ops = [
        w.op(a, lambda i: roles.ActionOpenThread(i, b.address, Assets(1, 0), NO_ASSETS))
        for _ in range(roles.MAX_UNLOCKED_THREADS_PER_PEER + 2)
    ]
    w.run()
    agreed = [k for k, t in b.state.threads.items() if t.phase is th.ThreadPhase.AGREED]
    assert len(agreed) == roles.MAX_UNLOCKED_THREADS_PER_PEER
    for op in ops[: roles.MAX_UNLOCKED_THREADS_PER_PEER]:
        assert a.outcome(op) is None  # agreed, waiting for the hub
    for op in ops[roles.MAX_UNLOCKED_THREADS_PER_PEER :]:
        out = a.outcome(op)
        assert isinstance(out, roles.EventOpFailed) and out.reason is RejectReason.POLICY
    assert len(a.state.threads) == roles.MAX_UNLOCKED_THREADS_PER_PEER
    # The limit is per peer: C may still open a thread to B.
    op_c = w.op(c, lambda i: roles.ActionOpenThread(i, b.address, Assets(1, 0), NO_ASSETS))
    w.run()
    assert isinstance(c.outcome(op_c), roles.EventOpDone)
    snapshot = w.snapshot()
    for key in before:
        if key[1] != c.address and key[1] != b.address:
            assert snapshot[key] == before[key]
    assert w.agreed(b).balance_user == before[("b", b.address)].balance_user  # B locked nothing


def test_refused_opens_do_not_use_up_the_receivers_unlocked_thread_allowance() -> None:
    w = funded(collateral=NO_ASSETS, hub_config={"collateral_ceiling": NO_ASSETS})
    a, b = w.u["a"], w.u["b"]
    for _ in range(roles.MAX_UNLOCKED_THREADS_PER_PEER):
        _, out = w.open_thread(a, b, Assets(1, 0))
        assert isinstance(out, roles.EventOpFailed)
        assert out.reason is RejectReason.INSUFFICIENT_COLLATERAL
    assert not b.state.threads  # the refused threads are forgotten by B too
    set_hub_policy(w, collateral_ceiling=roles.UNLIMITED)
    w.collateralize(b, Assets(1, 0))
    _, out = w.open_thread(a, b, Assets(1, 0))
    assert isinstance(out, roles.EventOpDone), out


def test_unreachable_peer_fails_a_thread_open_it_never_answered() -> None:
    w = funded()
    a, b = w.u["a"], w.u["b"]
    w.down.add((a.address, b.address))
    op = w.op(a, lambda i: roles.ActionOpenThread(i, b.address, Assets(1, 0), NO_ASSETS))
    key = thread_key(a)
    t = w.step(a, roles.ActionPeerUnreachable(b.address))
    assert t.removed_threads == {key} and not a.state.threads
    out = a.outcome(op)
    assert isinstance(out, roles.EventOpFailed) and out.reason is RejectReason.POLICY
    # The hub ignores it; an unrelated peer's unreachability fails nothing.
    assert unchanged(w.step(w.hub, roles.ActionPeerUnreachable(a.address)))
    assert unchanged(w.step(b, roles.ActionPeerUnreachable(a.address)))


def test_requested_collateral_is_added_by_the_hub() -> None:
    w = RoleWorld(("a",))
    a, hub = w.u["a"], w.hub
    w.fund(a, FUNDS)
    op = w.op(a, lambda i: roles.ActionRequestCollateral(i, Assets(8, 80)))
    assert a.outcome(op) == roles.EventOpDone(op)  # asked; the hub decides
    w.run()
    assert hub.of(roles.EventCollateralAdded) == [
        roles.EventCollateralAdded(a.address, Assets(8, 80))
    ]
    assert w.agreed(a).balance_hub == Assets(8, 80)
    assert w.ledger.held[a.address] == FUNDS + Assets(8, 80)


# ---------------------------------------------------------------- 8. thread ids


def test_thread_ids_are_never_reused_after_refusals_and_closes() -> None:
    w = funded(collateral=NO_ASSETS, user_config={"b": {"max_lock": Assets(1, 1)}})
    a, b = w.u["a"], w.u["b"]
    ids: list[int] = []

    def open_(lock_b: Assets = NO_ASSETS) -> roles.EventOpDone | roles.EventOpFailed:
        mark = len(w.trace)
        _, out = w.open_thread(a, b, Assets(2, 0), lock_b)
        proposal = next(m for s, _d, m in sent_since(w, mark) if s == a.address)
        assert isinstance(proposal, ThreadOpenProposal)
        ids.append(proposal.initial.thread_id)
        assert out is not None
        return out

    out = open_()  # refused by the hub: no collateral yet (it collateralizes)
    assert isinstance(out, roles.EventOpFailed) and not a.state.threads
    out = open_()
    assert isinstance(out, roles.EventOpDone) and out.key is not None
    key = out.key
    op = w.op(a, lambda i: roles.ActionCloseThread(i, key))
    w.run()
    assert a.outcome(op) == roles.EventOpDone(op, key) and not a.state.threads
    out = open_(Assets(5, 0))  # refused by B: it locks more of B than B allows
    assert isinstance(out, roles.EventOpFailed) and out.reason is RejectReason.LOCK_REFUSED
    assert not a.state.threads
    out = open_()
    assert isinstance(out, roles.EventOpDone)
    assert ids == [1, 2, 3, 4]
    assert a.state.coordination.last_thread_id == 4


# ---------------------------------------------------------------- 9. resync


def test_reconnect_resyncs_a_thread_whose_countersignatures_were_lost() -> None:
    w = funded()
    a, b = w.u["a"], w.u["b"]
    key = open_done(w, a, b, Assets(10, 100), Assets(4, 40))
    for pid, amount in enumerate((Assets(1, 0), Assets(2, 0), Assets(3, 3)), start=1):
        w.step(a, roles.ActionPayThread(key, pid, amount))
    w.deliver(a, b)
    lost = w.drop(b, a)
    assert [type(m) for m in lost] == [ThreadCountersign] * 3
    assert latest_tx(b, key) == 3 and latest_tx(a, key) == 0
    w.heal(a, b)
    w.run()
    assert a.state.threads[key].latest == b.state.threads[key].latest
    sent = a.of(th.EventPaymentSent)
    assert sorted(e.payment_id for e in sent) == [1, 2, 3]
    received = b.of(th.EventPaymentReceived)
    assert len(received) == 3
    total = Assets(6, 3)
    assert sum((e.amount for e in sent), NO_ASSETS) == total
    assert sum((e.amount for e in received), NO_ASSETS) == total
    latest = a.state.threads[key].latest
    assert latest is not None and latest.state.balance_sender == Assets(4, 97)
    # Payments go on after the resync.
    w.step(b, roles.ActionPayThread(key, 9, Assets(1, 1)))
    w.run()
    assert a.state.threads[key].latest == b.state.threads[key].latest


def test_reconnect_resyncs_a_channel_whose_countersignature_was_lost() -> None:
    w = RoleWorld(("a",))
    a, hub = w.u["a"], w.hub
    op = w.op(a, lambda i: roles.ActionDeposit(i, FUNDS))
    w.deliver(a, hub)
    assert [type(m) for m in w.drop(hub, a)] == [ChannelCountersign]
    assert not w.chain  # the user never saw its deposit double-signed
    w.heal(hub, a)
    w.run()
    assert a.outcome(op) == roles.EventOpDone(op)
    assert len(w.submitted) == 1  # submitted once, from the adopted state
    assert w.ledger.held[a.address] == FUNDS
    assert w.agreed(a).balance_user == FUNDS
    assert a.of(roles.EventDepositConfirmed) == [roles.EventDepositConfirmed(a.address, FUNDS)]


def test_reconnect_after_a_lost_ack_forwards_a_routed_payment_once() -> None:
    w = funded()
    a, b, hub = w.u["a"], w.u["b"], w.hub
    amount = Assets(9, 9)
    op = w.op(a, lambda i: roles.ActionPayViaHub(i, b.address, amount))
    w.deliver(a, hub)  # the hub countersigns and passes the payment on to B
    assert [type(m) for m in w.drop(hub, a)] == [ChannelCountersign]
    w.heal(a, hub)
    w.heal(hub, a)  # reconnecting twice changes nothing more
    w.run()
    assert a.outcome(op) == roles.EventOpDone(op)
    assert b.of(roles.EventHubPaymentReceived) == [roles.EventHubPaymentReceived(amount)]
    assert w.agreed(a).balance_user == FUNDS - amount
    assert w.agreed(b).balance_user == FUNDS + amount
    assert len(hub_updates(w, b, UpdatePayment)) == 1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_cuts_and_reconnects_converge_without_double_payment(seed: int) -> None:
    rng = random.Random(seed)
    w = funded(seed=seed)
    a, b, hub = w.u["a"], w.u["b"], w.hub
    key = open_done(w, a, b, Assets(50, 500), Assets(50, 500))
    for pid in range(1, 41):
        payer = rng.choice((a, b))
        amount = Assets(rng.randint(0, 2), rng.randint(1, 3))
        w.step(payer, roles.ActionPayThread(key, pid, amount))
        if rng.random() < 0.3:
            payee = b if payer is a else a
            w.step(payer, roles.ActionPayViaHub(1_000 + pid, payee.address, Assets(1, 0)))
        for _ in range(rng.randint(0, 6)):
            busy = w.busy()
            if busy:
                w.deliver_one(rng.choice(busy))
        if rng.random() < 0.15:
            x, y = rng.choice(((a, b), (a, hub), (b, hub)))
            w.cut(x, y)
            w.heal(x, y)
    w.run()
    ta, tb = a.state.threads[key], b.state.threads[key]
    assert ta.latest == tb.latest and not ta.outgoing and not tb.outgoing
    for payer in (a, b):
        sent = payer.of(th.EventPaymentSent)
        ids = [e.payment_id for e in sent]
        assert len(ids) == len(set(ids))
        failed = {e.payment_id for e in payer.of(th.EventPaymentFailed)}
        assert not failed & set(ids)
    assert ta.latest is not None
    paid_a = sum((e.amount for e in a.of(th.EventPaymentSent)), NO_ASSETS)
    paid_b = sum((e.amount for e in b.of(th.EventPaymentSent)), NO_ASSETS)
    got_b = sum((e.amount for e in b.of(th.EventPaymentReceived)), NO_ASSETS)
    got_a = sum((e.amount for e in a.of(th.EventPaymentReceived)), NO_ASSETS)
    assert paid_a == got_b and paid_b == got_a
    assert ta.latest.state.balance_sender + paid_a == Assets(50, 500) + paid_b
    for user in (a, b):
        w.agreed(user)  # hub and user hold the same latest channel state
    check_ledger_conservation(w)


# ---------------------------------------------------------------- randomized interleavings


def check_ledger_conservation(w: RoleWorld) -> None:
    """What the ledger holds for each channel is its balances plus its threads' locks."""
    for user in w.u.values():
        state = w.agreed(user)
        if state.has_pending():
            continue
        locked = sum((t.state.total() for t in user.channel().threads), NO_ASSETS)
        assert w.ledger.held[user.address] == state.balance_hub + state.balance_user + locked


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_random_interleavings_open_pay_route_close(seed: int) -> None:
    rng = random.Random(seed)
    w = funded(("a", "b", "c"), seed=seed)
    a, b, c, hub = w.u["a"], w.u["b"], w.u["c"], w.hub
    total_before = {n.name: w.agreed(n) for n in (a, b, c)}
    # Three opens at once, crossing each other in the channels.
    ops = [
        (
            x,
            w.op(
                x, lambda i, y=y: roles.ActionOpenThread(i, y.address, Assets(10, 10), Assets(5, 5))
            ),
        )
        for x, y in ((a, b), (b, c), (c, a))
    ]
    w.run()
    keys = []
    for node, op in ops:
        out = node.outcome(op)
        assert isinstance(out, roles.EventOpDone) and out.key is not None, out
        keys.append(out.key)
    routed: list[tuple[RoleNode, RoleNode, Assets]] = []
    for pid in range(1, 41):
        key = rng.choice(keys)
        payer = w.nodes[rng.choice((key.sender, key.receiver))]
        w.step(payer, roles.ActionPayThread(key, pid, Assets(rng.randint(0, 1), rng.randint(1, 2))))
        if rng.random() < 0.2:
            x, y = rng.sample((a, b, c), 2)
            amount = Assets(1, 1)
            w.step(x, roles.ActionPayViaHub(1_000 + pid, y.address, amount))
            routed.append((x, y, amount))
        for _ in range(rng.randint(0, 8)):
            busy = w.busy()
            if busy:
                w.deliver_one(rng.choice(busy))
    w.run()
    finals = {}
    for key in keys:
        closer = w.nodes[rng.choice((key.sender, key.receiver))]
        w.op(closer, lambda i, k=key: roles.ActionCloseThread(i, k))
    w.run()
    for key in keys:
        closed = [
            e.final.state for e in hub.of(roles.EventThreadClosed) if e.final.state.key == key
        ]
        assert len(closed) == 1
        finals[key] = closed[0]
    for n in (a, b, c):
        assert not n.state.threads and not n.state.coordination.ops
    assert not hub.state.coordination.openings and not hub.state.coordination.closings
    assert not hub.state.coordination.forwards
    # Every unit is where the payments put it.
    for n in (a, b, c):
        expected = total_before[n.name].balance_user
        for key, final in finals.items():
            if key.sender == n.address:
                expected = expected - Assets(10, 10) + final.balance_sender
            if key.receiver == n.address:
                expected = expected - Assets(5, 5) + final.balance_receiver
        for x, y, amount in routed:
            if x is n:
                expected = expected - amount
            if y is n:
                expected = expected + amount
        assert w.agreed(n).balance_user == expected
        assert w.agreed(n).thread_count == 0
    hub_total = sum((w.agreed(n).balance_hub for n in (a, b, c)), NO_ASSETS)
    assert hub_total == sum((total_before[n].balance_hub for n in "abc"), NO_ASSETS)
    check_ledger_conservation(w)


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_random_mixed_workload_settles(seed: int) -> None:
    """Opens (some refused for collateral), thread and routed payments, deposits and
    withdrawals whose transactions the chain executes late or never, blocks, cut links and
    reconnects, closes; then the links heal, the chain catches up and time passes: every
    channel agrees on its latest state, nothing is pending, the ledger balances."""
    rng = random.Random(seed)
    w = RoleWorld(("a", "b", "c"), seed=seed, auto_chain=False)
    users = list(w.u.values())
    for node in users:
        w.fund(node, FUNDS, Assets(4, 4))
    now = w.ledger.now
    for step in range(120):
        x = rng.choice(users)
        y = rng.choice([u for u in users if u is not x])
        r = rng.random()
        if r < 0.1:
            lock_x, lock_y = Assets(rng.randint(0, 5), 1), Assets(rng.randint(0, 5), 0)
            w.step(x, roles.ActionOpenThread(w.new_op(), y.address, lock_x, lock_y))
        elif r < 0.45:
            keys = [k for k, t in x.state.threads.items() if t.phase is th.ThreadPhase.OPEN]
            if keys:
                amount = Assets(rng.randint(0, 1), rng.randint(1, 2))
                w.step(x, roles.ActionPayThread(rng.choice(keys), step, amount))
        elif r < 0.52:
            w.step(x, roles.ActionPayViaHub(w.new_op(), y.address, Assets(1, step % 3)))
        elif r < 0.62:
            amount = Assets(rng.randint(1, 5), step)
            if r < 0.57:
                w.step(x, roles.ActionDeposit(w.new_op(), amount))
            else:
                w.step(x, roles.ActionWithdraw(w.new_op(), amount, x.address))
        elif r < 0.68:
            if x.state.threads:
                key = rng.choice(list(x.state.threads))
                w.step(x, roles.ActionCloseThread(w.new_op(), key))
        elif r < 0.73:
            other = rng.choice((w.hub, y))
            w.cut(x, other)
            w.heal(x, other)
        elif r < 0.8:
            if w.chain:
                with contextlib.suppress(ChainError):  # e.g. timed out meanwhile
                    w.execute(rng.randrange(len(w.chain)))
        elif r < 0.85:
            now += rng.randint(1, 400)
            w.block(now)
        for _ in range(rng.randint(0, 10)):
            busy = w.busy()
            if busy:
                w.deliver_one(rng.choice(busy))
    for _ in range(3):
        w.run()
        while w.chain:
            with contextlib.suppress(ChainError):
                w.execute()
            w.run()
        now += 2 * roles.DEFAULT_PENDING_TIMEOUT
        w.block(now)
        w.run()
    for node in users:
        assert not w.agreed(node).has_pending()
        waiting = {op.kind for op in node.state.coordination.ops}
        assert waiting <= {roles.OpKind.OPEN_THREAD, roles.OpKind.CLOSE_THREAD}, waiting
        for key, side in node.state.threads.items():
            peer = w.nodes[side.peer].state.threads.get(key)
            if side.phase is th.ThreadPhase.OPEN and peer is not None:
                assert peer.phase is not th.ThreadPhase.OPEN or peer.latest == side.latest
    assert not w.hub.state.coordination.collateral
    assert not w.hub.state.coordination.forwards
    check_ledger_conservation(w)


# ---------------------------------------------------------------- 10. node_steps


@pytest.mark.parametrize("seed", [5, 6])
def test_node_steps_equals_node_step_one_by_one(seed: int) -> None:
    """Every input each node got in a random run, fed again as one batch from its first
    state: the same final state, the same effects in the same order."""
    rng = random.Random(seed)
    w = RoleWorld(("a", "b"), seed=seed)
    a, b, hub = w.u["a"], w.u["b"], w.hub
    for node in (a, b):
        w.fund(node, FUNDS, COLLATERAL)
    _, refused = w.open_thread(a, b, Assets(0, 600))  # more than the hub holds in B's
    assert isinstance(refused, roles.EventOpFailed)
    key = open_done(w, a, b, Assets(20, 20), Assets(20, 20))
    for pid in range(20):
        payer = rng.choice((a, b))
        w.step(payer, roles.ActionPayThread(key, pid, Assets(0, rng.randint(1, 3))))
        if rng.random() < 0.3:
            w.step(a, roles.ActionPayViaHub(100 + pid, b.address, Assets(1, 0)))
        for _ in range(rng.randint(0, 5)):
            busy = w.busy()
            if busy:
                w.deliver_one(rng.choice(busy))
    w.op(b, lambda i: roles.ActionWithdraw(i, Assets(1, 1), b.address))
    w.run()
    w.op(b, lambda i: roles.ActionCloseThread(i, key))
    w.run()
    w.block(START + 1)
    for node in (hub, a, b):
        assert len(node.inputs) > 20
        batch = roles.node_steps(node.start, list(node.inputs), node.signer)
        assert batch.state == node.state
        assert batch.effects == tuple(e for t in node.transitions for e in t.effects)
        start, end = node.start, node.state
        assert batch.changed_channels == {
            u for u in end.channels if start.channels.get(u) != end.channels[u]
        }
        assert batch.changed_threads == {
            k for k in end.threads if start.threads.get(k) != end.threads[k]
        }
        # Removed: every thread that was there and is gone; a thread that came and went
        # within the batch may be named too (deleting what was never stored is harmless).
        assert set(start.threads) - set(end.threads) <= batch.removed_threads
        assert not batch.removed_threads & set(end.threads)
        assert batch.coordination_changed == (start.coordination != end.coordination)


# ---------------------------------------------------------------- bookkeeping


def test_transition_bookkeeping_names_what_changed() -> None:
    """`check_bookkeeping` runs on every step of every test; here, step by step, the sets are
    exactly the channels and threads whose value changed (no equal copies named)."""
    w = funded(auto_chain=False)
    a, b, hub = w.u["a"], w.u["b"], w.hub
    mark = {n.name: len(n.transitions) for n in (a, b, hub)}
    op = w.op(a, lambda i: roles.ActionOpenThread(i, b.address, Assets(1, 0), NO_ASSETS))
    t = a.transitions[-1]
    key = thread_key(a)
    assert t.changed_threads == {key} and not t.changed_channels and t.coordination_changed
    w.deliver(a, b)
    t = b.transitions[-1]
    assert t.changed_threads == {key} and not t.changed_channels and not t.coordination_changed
    w.deliver(b, a)
    t = a.transitions[-1]
    assert t.changed_threads == {key} and not t.coordination_changed
    w.deliver(a, hub)
    t = hub.transitions[-1]
    assert t.changed_channels == {b.address} and t.coordination_changed and not t.changed_threads
    w.deliver(hub, b)
    t = b.transitions[-1]  # B countersigns its lock and opens its thread
    assert t.changed_channels == {b.address} and t.changed_threads == {key}
    w.run()
    assert isinstance(a.outcome(op), roles.EventOpDone)
    w.step(a, roles.ActionCloseThread(2, key))
    w.run()
    t = next(t for t in reversed(a.transitions) if t.removed_threads)
    assert t.removed_threads == {key} and t.changed_channels == {a.address}
    assert not t.changed_threads
    # A block moves the node's clock (once, not in every channel); a message that changes
    # nothing names nothing.
    w.block(START + 1)
    t = hub.transitions[-1]
    assert not t.changed_channels and t.coordination_changed
    t = w.receive(hub, a.address, ErrorNotice(RejectReason.POLICY, "hello"))
    assert unchanged(t)
    for node in (hub, a, b):
        old = node.transitions[mark[node.name] - 1].state
        for tr in node.transitions[mark[node.name] :]:
            check_exact_bookkeeping(old, tr)
            old = tr.state
