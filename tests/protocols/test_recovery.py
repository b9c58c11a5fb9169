"""Recovery (`protocols.recovery`): a node's machines as a backup, and rebuilt from one.

Whole nodes run in `tests.protocols.role_world.RoleWorld` with real keys and signatures. A
crash is played as: every link of the node is cut (what was in flight is lost), its state is
replaced by `restore_state` of a backup taken earlier, and its links come back (`heal`, so
both ends resync). Every signature any node makes goes through a `RecordingSigner`, and
`check_no_equivocation` holds the durability rule over the whole run, across the crash: no
key ever signed two different states with one (channel, txCountGlobal) or one
(thread, txCount).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import backup, recovery, roles
from protocols import channel as ch
from protocols import thread as th
from protocols.backup import HELD_BOTH, HELD_RECEIVER, HELD_SENDER
from protocols.eip712 import channel_state_digest, thread_state_digest
from protocols.keccak import keccak
from protocols.messages import (
    ChannelProposal,
    ChannelResume,
    ChannelSync,
    Message,
    RejectReason,
    SignedThreadState,
    ThreadCloseRequest,
    ThreadOpenProposal,
    ThreadOpenRequest,
    ThreadProposal,
    ThreadSync,
    UpdateCloseThread,
    UpdateOpenThread,
)
from protocols.signing import Signer
from protocols.types import NO_ASSETS, Assets, ChannelState, Party, ThreadKey, ThreadState
from tests.protocols.pair import RecordingSigner
from tests.protocols.role_world import DOMAIN, RoleNode, RoleWorld

FUNDS = Assets(100, 1_000)
COLLATERAL = Assets(50, 500)
GAP = recovery.RECOVERY_NONCE_GAP


# ---------------------------------------------------------------- the world and its checks


def world(users: tuple[str, ...] = ("a", "b"), fund: bool = True) -> RoleWorld:
    """A world whose every node signs through a `RecordingSigner`, users funded."""
    w = RoleWorld(users)
    for node in w.nodes.values():
        node.signer = RecordingSigner(keccak(f"role-world/{node.name}".encode()))
    if fund:
        for node in w.u.values():
            w.fund(node, FUNDS, COLLATERAL)
    return w


def open_thread(
    w: RoleWorld, a: RoleNode, b: RoleNode, lock_a: Assets, lock_b: Assets
) -> ThreadKey:
    _, out = w.open_thread(a, b, lock_a, lock_b)
    assert isinstance(out, roles.EventOpDone) and out.key is not None, out
    return out.key


def pay(w: RoleWorld, payer: RoleNode, key: ThreadKey, amount: Assets, run: bool = True) -> int:
    payment_id = w.new_op()
    w.step(payer, roles.ActionPayThread(key, payment_id, amount))
    if run:
        w.run()
    return payment_id


def take_backup(node: RoleNode, sequence: int = 1) -> backup.BackupContent:
    """`node`'s backup as a peer would hand it back: sealed, in blocks, opened, checked."""
    content = recovery.backup_content(node.state, sequence)
    private_key = keccak(f"role-world/{node.name}".encode())
    key = backup.backup_key(private_key)
    # A signer of its own: the announcement's signature is not a state's.
    announcement, blocks = backup.pack_backup(key, bytes(12), content, Signer(private_key))
    sealed = backup.from_blocks(announcement.root_cid, blocks.get, announcement.size)
    opened = backup.open_backup(key, sealed, announcement, DOMAIN)
    assert opened == content
    return opened


def crash_and_restore(
    w: RoleWorld, node: RoleNode, content: backup.BackupContent, gap: int = GAP
) -> None:
    """`node` loses its store and everything in flight, and comes back from `content`."""
    for other in w.nodes.values():
        if other is not node:
            w.cut(node, other)
    node.state = recovery.restore_state(node.state.config, content, gap)
    w.step(node, ch.ContractReceiveBlock(w.ledger.now))  # the node reads the chain first


def run_holding(w: RoleWorld, src: RoleNode, dst: RoleNode) -> None:
    """Deliver until quiet, but for what `src` sends `dst` (held in flight, not lost)."""
    held = (src.address, dst.address)
    for _ in range(10_000):
        busy = [link for link in w.busy() if link != held]
        if not busy:
            return
        w.deliver_one(busy[0])
    raise AssertionError("the links did not go quiet")


def reconnect(w: RoleWorld, node: RoleNode, *peers: RoleNode) -> None:
    for peer in peers:
        w.heal(node, peer)


def signed_states(w: RoleWorld) -> dict[bytes, tuple[object, ...]]:
    """Every channel and thread state the run has shown, by digest: (kind, id, nonce)."""
    states: list[ChannelState | ThreadState] = []

    def thread(signed: SignedThreadState) -> None:
        states.append(signed.state)

    for _src, _dst, m in w.trace:
        if isinstance(m, ChannelProposal):
            states.append(m.state)
            if isinstance(m.update, UpdateOpenThread):
                states.append(m.update.initial)
            elif isinstance(m.update, UpdateCloseThread):
                states.append(m.update.final)
        elif isinstance(m, ChannelSync):
            states.append(m.state)
            for t in m.threads:
                thread(t)
        elif isinstance(m, ThreadProposal):
            states.append(m.state)
        elif isinstance(m, ThreadSync):
            thread(m.latest)
        elif isinstance(m, ThreadOpenProposal):
            states.append(m.initial)
        elif isinstance(m, ThreadOpenRequest):
            thread(m.initial)
        elif isinstance(m, ThreadCloseRequest):
            thread(m.final)
    found: dict[bytes, tuple[object, ...]] = {}
    for s in states:
        if isinstance(s, ChannelState):
            found[channel_state_digest(DOMAIN, s)] = ("channel", s.user, s.tx_count_global)
        else:
            found[thread_state_digest(DOMAIN, s)] = ("thread", s.key, s.tx_count)
    return found


def check_no_equivocation(w: RoleWorld) -> None:
    """No node signed two different states with one (channel or thread, nonce), ever."""
    known = signed_states(w)
    for node in w.nodes.values():
        assert isinstance(node.signer, RecordingSigner)
        by_slot: dict[tuple[object, ...], set[bytes]] = defaultdict(set)
        for digest in node.signer.digests:
            assert digest in known, f"{node.name} signed a state no message shows"
            by_slot[known[digest]].add(digest)
        doubled = {slot: len(d) for slot, d in by_slot.items() if len(d) > 1}
        assert not doubled, f"{node.name} signed two states at {doubled}"


def thread_latest(node: RoleNode, key: ThreadKey) -> SignedThreadState:
    latest = node.state.threads[key].latest
    assert latest is not None
    return latest


def proposals_from(w: RoleWorld, node: RoleNode, mark: int) -> list[Message]:
    return [
        m
        for src, _dst, m in w.trace[mark:]
        if src == node.address and isinstance(m, ChannelProposal | ThreadProposal)
    ]


# ---------------------------------------------------------------- 1. backup content


def test_user_and_hub_backups_hold_their_double_signed_states_and_pass_the_checks() -> None:
    w = world(("a", "b", "c"))
    a, b, c, hub = w.u["a"], w.u["b"], w.u["c"], w.hub
    k_ab = open_thread(w, a, b, Assets(10, 100), Assets(4, 40))
    k_ca = open_thread(w, c, a, Assets(5, 5), NO_ASSETS)
    pay(w, a, k_ab, Assets(1, 1))
    pay(w, b, k_ab, Assets(2, 0))
    pay(w, c, k_ca, Assets(1, 2))

    for node in (a, b, c, hub):
        content = recovery.backup_content(node.state, 7)
        backup.check_content(content, node.address, DOMAIN)
        assert backup.decode_content(backup.encode_content(content)) == content
        assert (content.owner, content.domain, content.hub, content.sequence) == (
            node.address,
            DOMAIN,
            hub.address,
            7,
        )
        assert recovery.backup_content(node.state, 7) == content  # deterministic

    user = recovery.backup_content(a.state, 1)
    assert user.channels == (a.channel().latest,)
    assert {t.key: t.latest for t in user.threads} == {k: thread_latest(a, k) for k in (k_ab, k_ca)}
    assert {t.key: t.initial for t in user.threads} == {t.state.key: t for t in a.channel().threads}
    assert [t.key for t in user.threads] == sorted([k_ab, k_ca])
    assert [t.held for t in user.threads] == [
        HELD_SENDER if t.key.sender == a.address else HELD_RECEIVER for t in user.threads
    ]
    assert {t.key: t.held for t in user.threads} == {k_ab: HELD_SENDER, k_ca: HELD_RECEIVER}

    hub_content = recovery.backup_content(hub.state, 1)
    assert hub_content.channels == tuple(
        hub.state.channels[u].latest for u in sorted(hub.state.channels, key=lambda u: u.raw)
    )
    assert {t.key for t in hub_content.threads} == {k_ab, k_ca}
    assert all(t.initial == t.latest for t in hub_content.threads)
    assert all(t.held == HELD_BOTH for t in hub_content.threads)  # open in both channels


def test_backups_leave_out_what_is_not_double_signed_or_not_locked() -> None:
    w = RoleWorld(("a", "b"))
    a, b, hub = w.u["a"], w.u["b"], w.hub
    for node in (a, hub):
        empty = recovery.backup_content(node.state, 0)
        assert empty.channels == () and empty.threads == ()
        backup.check_content(empty, node.address, DOMAIN)
    w.fund(a, FUNDS, COLLATERAL)
    w.fund(b, FUNDS, COLLATERAL)
    w.cut(a, hub)
    w.cut(b, hub)
    w.cut(a, b)
    w.op(a, lambda i: roles.ActionOpenThread(i, b.address, Assets(1, 1), NO_ASSETS))
    (key,) = a.state.threads
    assert a.state.threads[key].phase is th.ThreadPhase.PROPOSED  # B has not answered
    assert recovery.backup_content(a.state, 1).threads == ()
    w.heal(a, b)
    w.run()
    assert a.state.threads[key].phase is th.ThreadPhase.AGREED  # the hub has not locked it
    assert b.state.threads[key].phase is th.ThreadPhase.AGREED
    for node in (a, b):
        content = recovery.backup_content(node.state, 2)
        assert content.threads == ()
        assert content.channels == (node.channel().latest,)


# ---------------------------------------------------------------- 2. restore


def check_restored(original: roles.NodeState, restored: roles.NodeState) -> None:
    """The restored state equals the original in what a backup holds, and awaits sync."""
    assert restored.config is original.config
    for user, side in restored.channels.items():
        old = original.channels[user]
        assert side.latest == old.latest
        assert side.threads == old.threads
        assert (side.role, side.hub, side.user, side.domain) == (
            old.role,
            old.hub,
            old.user,
            old.domain,
        )
        assert side.awaiting_sync and side.outgoing is None and not side.queued
        assert side.max_signed == side.latest.state.tx_count_global + GAP
    backed_up = {u for u, s in original.channels.items() if s.latest.sig_hub is not None}
    assert set(restored.channels) == backed_up | (
        {original.config.me} if original.config.role is Party.USER else set()
    )
    for key, thread in restored.threads.items():
        was = original.threads[key]
        assert thread.latest == was.latest and thread.initial == was.initial
        assert thread.phase is th.ThreadPhase.OPEN
        assert thread.awaiting_sync and not thread.outgoing and not thread.queued
        assert thread.latest is not None
        assert thread.max_signed == thread.latest.state.tx_count + GAP
    assert restored.coordination.recovered


workload = st.lists(
    st.tuples(st.sampled_from(["ab", "ba", "ca", "ac", "close"]), st.integers(1, 3)),
    max_size=8,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload)
def test_backup_then_restore_gives_back_the_backed_up_states(ops: list[tuple[str, int]]) -> None:
    w = world(("a", "b", "c"))
    a, b, c = w.u["a"], w.u["b"], w.u["c"]
    keys = {
        "ab": open_thread(w, a, b, Assets(10, 10), Assets(10, 10)),
        "ca": open_thread(w, c, a, Assets(10, 10), Assets(10, 10)),
    }
    payer = {"ab": (a, "ab"), "ba": (b, "ab"), "ca": (c, "ca"), "ac": (a, "ca")}
    for op, amount in ops:
        if op == "close":
            if keys["ab"] in a.state.threads:
                w.op(a, lambda i: roles.ActionCloseThread(i, keys["ab"]))
                w.run()
            continue
        node, which = payer[op]
        if keys[which] in node.state.threads:
            pay(w, node, keys[which], Assets(amount, 0), run=False)
    w.run()
    for node in w.nodes.values():
        content = take_backup(node, 5)
        restored = recovery.restore_state(node.state.config, content)
        check_restored(node.state, restored)
        # Backing up the restored state gives the same content back.
        assert recovery.backup_content(restored, 5) == content
        expected = max(
            (k.thread_id for k in restored.threads if k.sender == node.address), default=0
        )
        if node is not w.hub:
            assert restored.coordination.last_thread_id == expected + GAP
    check_no_equivocation(w)


def test_a_user_without_a_backed_up_channel_restores_its_genesis_channel_awaiting_sync() -> None:
    w = RoleWorld(("a",))
    a = w.u["a"]
    restored = recovery.restore_state(a.state.config, recovery.backup_content(a.state, 0))
    side = restored.channels[a.address]
    assert side.latest == a.channel().latest and side.latest.sig_hub is None
    assert side.awaiting_sync and side.max_signed == GAP
    assert restored.threads == {} and restored.coordination.last_thread_id == GAP


def test_restore_refuses_a_backup_of_another_node_or_hub() -> None:
    w = world(("a", "b"))
    a, b, hub = w.u["a"], w.u["b"], w.hub
    content = recovery.backup_content(a.state, 1)
    with pytest.raises(recovery.RecoveryError, match="not of this node"):
        recovery.restore_state(b.state.config, content)
    other_hub = replace(a.state.config, hub=b.address)
    with pytest.raises(recovery.RecoveryError, match="hub"):
        recovery.restore_state(other_hub, content)
    other_domain = replace(a.state.config, domain=replace(DOMAIN, chain_id=1))
    with pytest.raises(recovery.RecoveryError, match="not of this node"):
        recovery.restore_state(other_domain, content)
    hub_content = recovery.backup_content(hub.state, 1)
    assert recovery.restore_state(hub.state.config, hub_content).coordination.recovered


def test_restore_refuses_threads_that_do_not_give_the_channels_root() -> None:
    w = world(("a", "b"))
    a, b = w.u["a"], w.u["b"]
    open_thread(w, a, b, Assets(1, 1), Assets(1, 1))
    content = recovery.backup_content(a.state, 1)
    with pytest.raises(recovery.RecoveryError, match="root"):
        recovery.restore_state(a.state.config, replace(content, threads=()))
    forged = replace(content.threads[0].initial.state, thread_id=99)
    original = content.threads[0].initial
    signed = replace(original, state=forged)  # restore checks roots, not signatures
    wrong = replace(content, threads=(backup.BackupThread(signed, signed, HELD_SENDER),))
    with pytest.raises(recovery.RecoveryError, match="root"):
        recovery.restore_state(a.state.config, wrong)


def test_the_hub_rebuilds_each_channels_threads_while_an_open_is_half_done() -> None:
    """A thread locked in the receiver's channel only (its sender's lock in flight) is in the
    hub's backup once; the sender's channel is rebuilt without it."""
    w = world(("a", "b"))
    a, b, hub = w.u["a"], w.u["b"], w.hub
    w.op(a, lambda i: roles.ActionOpenThread(i, b.address, Assets(3, 3), NO_ASSETS))
    w.deliver(a, b)
    w.deliver(b, a)
    w.deliver(a, hub)  # the open request: the hub proposes the lock in B's channel
    w.deliver(hub, b)
    w.deliver(b, hub)  # B countersigned: the hub proposes the lock in A's channel
    (key,) = a.state.threads
    assert hub.channel(b.address).open_thread(key) is not None
    assert hub.channel(a.address).open_thread(key) is None
    content = recovery.backup_content(hub.state, 1)
    assert [t.held for t in content.threads] == [HELD_RECEIVER]
    restored = recovery.restore_state(hub.state.config, content)
    check_restored(hub.state, restored)


def half_open_world(count: int) -> tuple[RoleWorld, ThreadKey, list[ThreadKey]]:
    """A thread B -> A open in both channels, then `count` opens A -> B that the hub locked
    in B's channel and whose locks in A's channel it sent but A never got."""
    w = world(("a", "b"))
    a, b, hub = w.u["a"], w.u["b"], w.hub
    full = open_thread(w, b, a, Assets(2, 2), NO_ASSETS)
    for _ in range(count):
        w.op(a, lambda i: roles.ActionOpenThread(i, b.address, Assets(1, 1), NO_ASSETS))
        run_holding(w, hub, a)
    half = sorted(k for k in a.state.threads if k != full)
    assert len(half) == count
    for key in half:
        assert hub.channel(b.address).open_thread(key) is not None
        assert hub.channel(a.address).open_thread(key) is None
    assert w.pending(hub, a)  # the first lock in A's channel, not countersigned
    return w, full, half


@pytest.mark.parametrize("count", [1, 4, 6])
def test_a_hub_with_many_threads_locked_in_the_receivers_channel_only_restores(
    count: int,
) -> None:
    """The reproduction: a sender that never countersigns its locks (here, never gets them)
    leaves threads locked in the receiver's channel only; the hub's backup says so and
    restores each channel with exactly the threads its root holds."""
    w, full, half = half_open_world(count)
    a, b, hub = w.u["a"], w.u["b"], w.hub
    content = take_backup(hub)
    assert {t.key: t.held for t in content.threads} == {
        full: HELD_BOTH,
        **{k: HELD_RECEIVER for k in half},
    }
    restored = recovery.restore_state(hub.state.config, content)
    check_restored(hub.state, restored)
    assert [t.state.key for t in restored.channels[a.address].threads] == [full]
    assert [t.state.key for t in restored.channels[b.address].threads] == sorted([full, *half])
    assert recovery.backup_content(restored, 1) == content
    crash_and_restore(w, hub, content)
    reconnect(w, hub, a, b)
    w.run()
    w.agreed(a)
    w.agreed(b)
    check_no_equivocation(w)


@pytest.mark.parametrize("first", ["a", "b"])
@pytest.mark.parametrize("count", [1, 4, 6])
def test_a_hub_with_many_threads_settled_in_one_channel_only_restores(
    count: int, first: str
) -> None:
    """A closes `count` threads and both parties ask the hub to settle. The hub settles each
    first in the channel of the party that did not ask first, then in the other's; those
    second settles never reach their party, so the threads are held in its channel only."""
    w = world(("a", "b"))
    a, b, hub = w.u["a"], w.u["b"], w.hub
    last, bit = (a, HELD_SENDER) if first == "a" else (b, HELD_RECEIVER)
    keys = [open_thread(w, a, b, Assets(2, 2), NO_ASSETS) for _ in range(count)]
    for key in keys:
        pay(w, a, key, Assets(1, 0))
    for key in keys:
        w.op(a, lambda i, key=key: roles.ActionCloseThread(i, key))
        w.deliver(a, b)
        w.deliver(b, a)  # both final; both close requests are on their way to the hub
        w.deliver(last, hub)  # its request first: the hub settles in its channel last
        run_holding(w, hub, last)
    other = b if last is a else a
    for key in keys:
        assert hub.channel(other.address).open_thread(key) is None
        assert hub.channel(last.address).open_thread(key) is not None
    assert w.pending(hub, last)  # the first settle in its channel, not countersigned
    content = take_backup(hub)
    assert {t.key: t.held for t in content.threads} == {k: bit for k in keys}
    restored = recovery.restore_state(hub.state.config, content)
    check_restored(hub.state, restored)
    assert restored.channels[other.address].threads == ()
    assert [t.state.key for t in restored.channels[last.address].threads] == sorted(keys)
    assert recovery.backup_content(restored, 1) == content


def _with_held(content: backup.BackupContent, held: dict[ThreadKey, int]) -> backup.BackupContent:
    threads = tuple(replace(t, held=held.get(t.key, t.held)) for t in content.threads)
    return replace(content, threads=threads)


def test_restore_refuses_held_bits_that_do_not_give_the_channels_roots() -> None:
    w, full, half = half_open_world(2)
    a, b, hub = w.u["a"], w.u["b"], w.hub
    content = take_backup(hub)
    config = hub.state.config
    recovery.restore_state(config, content)  # as backed up, it restores
    # `full` is B -> A (A's bit is HELD_RECEIVER), each of `half` A -> B (A's: HELD_SENDER).
    cases = [
        # a bit cleared: A's channel holds `full` but no entry says so
        ({full: HELD_SENDER}, "0 backed-up threads held for a root of 1"),
        # a bit set: A's channel would hold a thread its root does not
        ({half[0]: HELD_BOTH}, "2 backed-up threads held for a root of 1"),
        # as many threads as the root, but not the ones it holds
        ({full: HELD_SENDER, half[0]: HELD_BOTH}, "do not give its root"),
    ]
    for held, needle in cases:
        with pytest.raises(recovery.RecoveryError, match=needle):
            recovery.restore_state(config, _with_held(content, held))
    # A bit naming a channel the backup lacks (which `check_content` refuses, too).
    without_a = replace(
        _with_held(content, {full: HELD_SENDER}),
        channels=tuple(c for c in content.channels if c.state.user != a.address),
    )
    recovery.restore_state(config, without_a)  # B's channel alone restores
    with pytest.raises(recovery.RecoveryError, match="lacks"):
        recovery.restore_state(config, replace(without_a, threads=content.threads))
    # A user's backup whose bit is not its own.
    user_content = take_backup(b)
    recovery.restore_state(b.state.config, user_content)
    other = {t.key: HELD_BOTH ^ t.held for t in user_content.threads}
    with pytest.raises(recovery.RecoveryError, match="root"):
        recovery.restore_state(b.state.config, _with_held(user_content, other))


# ---------------------------------------------------------------- 3. resync after restore


def test_a_user_five_payments_behind_its_peer_resyncs_and_pays_on_above_the_gap() -> None:
    w = world(("a", "b"))
    a, b = w.u["a"], w.u["b"]
    key = open_thread(w, a, b, Assets(20, 20), Assets(20, 20))
    pay(w, a, key, Assets(1, 0))
    content = take_backup(a)
    behind = thread_latest(a, key).state.tx_count
    for amount, payer in ((2, a), (1, b), (3, a), (1, b), (4, a)):
        pay(w, payer, key, Assets(amount, 0))
    newest = thread_latest(b, key)
    assert newest.state.tx_count == behind + 5
    crash_and_restore(w, a, content)
    assert thread_latest(a, key).state.tx_count == behind

    reconnect(w, a, w.hub, b)
    w.run()
    assert thread_latest(a, key) == newest  # adopted the peer's later state
    assert not a.state.threads[key].awaiting_sync
    mark = len(w.trace)
    paid = pay(w, a, key, Assets(1, 1))
    (proposal,) = proposals_from(w, a, mark)
    assert isinstance(proposal, ThreadProposal)
    assert proposal.state.tx_count == behind + GAP + 1 and proposal.prev_tx_count == behind + 5
    assert thread_latest(a, key) == thread_latest(b, key)
    assert thread_latest(b, key).state.balance_sender == newest.state.balance_sender - Assets(1, 1)
    assert th.EventPaymentSent(key, paid, Assets(1, 1), behind + GAP + 1) in a.events
    check_no_equivocation(w)


def test_proposals_the_peer_countersigned_after_the_backup_are_adopted_not_resigned() -> None:
    """A's pipelined payments were countersigned by B, but the acknowledgements died with
    A's disk; the backup is older. A adopts B's state and never re-signs those nonces."""
    w = world(("a", "b"))
    a, b = w.u["a"], w.u["b"]
    key = open_thread(w, a, b, Assets(20, 20), Assets(20, 20))
    content = take_backup(a)
    for amount in (1, 2, 3):
        pay(w, a, key, Assets(amount, 0), run=False)
    w.deliver(a, b)  # B countersigns all three; A never hears of it
    newest = thread_latest(b, key)
    assert newest.state.tx_count == 3
    crash_and_restore(w, a, content)
    mark = len(w.trace)
    pay(w, a, key, Assets(5, 0), run=False)  # asked for before the resync: it waits
    assert proposals_from(w, a, mark) == []
    reconnect(w, a, w.hub, b)
    w.run()
    assert thread_latest(a, key).state.balance_sender == Assets(20 - 6 - 5, 20)
    assert thread_latest(a, key) == thread_latest(b, key)
    assert thread_latest(a, key).state.tx_count == 0 + GAP + 1  # above the backup, by the gap
    check_no_equivocation(w)


def test_a_conflict_before_the_crash_is_not_signed_over_after_it() -> None:
    """A and B proposed at the same nonce and refused each other; A's backup is older. B holds
    A's refused proposal, so A must not sign another state at that nonce: the gap sees to it,
    and without the gap the check would catch A."""
    for gap in (GAP, 0):
        w = world(("a", "b"))
        a, b = w.u["a"], w.u["b"]
        key = open_thread(w, a, b, Assets(20, 20), Assets(20, 20))
        content = take_backup(a)
        pay(w, a, key, Assets(1, 0), run=False)
        pay(w, b, key, Assets(2, 0), run=False)
        w.deliver(a, b)  # B: NONCE_CONFLICT, A's proposal refused, unsigned by B
        w.deliver(b, a)  # A: the same; A's disk is lost before A re-proposes
        crash_and_restore(w, a, content)
        if gap == 0:  # what a restore without the gap would give
            side = a.state.threads[key]
            a.state = replace(
                a.state,
                threads={key: replace(side, max_signed=side.latest.state.tx_count)},  # type: ignore[union-attr]
            )
        reconnect(w, a, w.hub, b)
        w.run()
        pay(w, a, key, Assets(3, 0))
        assert thread_latest(a, key) == thread_latest(b, key)
        if gap:
            check_no_equivocation(w)
        else:
            with pytest.raises(AssertionError, match="signed two states"):
                check_no_equivocation(w)


def test_payments_received_before_the_crash_are_retransmitted_and_paid_once() -> None:
    """B's payments that A countersigned after its backup: the countersignatures died with
    A's disk. B proposes them again above A's gap and they are paid exactly once."""
    w = world(("a", "b"))
    a, b = w.u["a"], w.u["b"]
    key = open_thread(w, a, b, Assets(20, 20), Assets(20, 20))
    content = take_backup(a)
    ids = [pay(w, b, key, Assets(n, 0), run=False) for n in (1, 2)]
    w.deliver(b, a)  # A countersigns both; the countersignatures are lost with A
    crash_and_restore(w, a, content)
    reconnect(w, a, w.hub, b)
    w.run()
    latest = thread_latest(a, key)
    assert latest == thread_latest(b, key)
    assert latest.state.balance_receiver == Assets(17, 20)
    assert latest.state.tx_count > GAP
    assert sorted(e.payment_id for e in b.of(th.EventPaymentSent)) == ids
    check_no_equivocation(w)


def test_requests_before_the_resync_wait_and_then_go_or_fail_on_the_real_balance() -> None:
    w = world(("a", "b"))
    a, b, hub = w.u["a"], w.u["b"], w.hub
    key = open_thread(w, a, b, Assets(10, 10), NO_ASSETS)
    content = take_backup(a)
    pay(w, a, key, Assets(8, 0))  # after the backup: A has 2 left in the thread
    crash_and_restore(w, a, content)
    mark = len(w.trace)
    first = pay(w, a, key, Assets(2, 0), run=False)  # fits the real balance
    second = pay(w, a, key, Assets(5, 0), run=False)  # fitted the backup only
    deposit = w.op(a, lambda i: roles.ActionDeposit(i, Assets(1, 1)))
    routed = w.op(a, lambda i: roles.ActionPayViaHub(i, b.address, Assets(1, 0)))
    assert proposals_from(w, a, mark) == []  # nothing signed before the resync
    assert a.state.threads[key].queued and a.channel().queued
    reconnect(w, a, hub, b)
    w.run()
    assert th.EventPaymentFailed(key, second, RejectReason.INSUFFICIENT_BALANCE) in a.events
    sent = [e for e in a.of(th.EventPaymentSent) if e.payment_id == first]
    assert len(sent) == 1 and sent[0].tx_count > GAP
    assert thread_latest(a, key).state.balance_sender == NO_ASSETS + Assets(0, 10)
    assert a.outcome(deposit) == roles.EventOpDone(deposit)
    assert a.outcome(routed) == roles.EventOpDone(routed)
    assert w.agreed(a).tx_count_global > GAP
    check_no_equivocation(w)


@pytest.mark.parametrize("hub_first", [True, False])
def test_a_channel_behind_the_hub_adopts_threads_locked_and_settled_after_the_backup(
    hub_first: bool,
) -> None:
    w = world(("a", "b", "c"))
    a, b, c, hub = w.u["a"], w.u["b"], w.u["c"], w.hub
    closed = open_thread(w, a, b, Assets(5, 5), Assets(5, 5))
    w.cut(a, hub)  # the hub will lock this one only after the backup
    w.op(b, lambda i: roles.ActionOpenThread(i, a.address, Assets(2, 2), NO_ASSETS))
    w.run()
    (agreed_before,) = (k for k, s in a.state.threads.items() if s.phase is th.ThreadPhase.AGREED)
    content = take_backup(a)
    assert {t.key for t in content.threads} == {closed}
    w.heal(a, hub)
    w.run()
    assert a.state.threads[agreed_before].phase is th.ThreadPhase.OPEN
    # After the backup: B's thread is locked, A's thread with B is settled, C opens one to A
    # and pays in it, and A pays through the hub.
    pay(w, a, closed, Assets(1, 0))
    w.op(a, lambda i: roles.ActionCloseThread(i, closed))
    w.run()
    assert closed not in a.state.threads
    opened_after = open_thread(w, c, a, Assets(6, 6), NO_ASSETS)
    pay(w, c, opened_after, Assets(2, 1))
    pay(w, b, agreed_before, Assets(1, 1))
    w.op(a, lambda i: roles.ActionPayViaHub(i, c.address, Assets(3, 0)))
    w.run()
    channel = w.agreed(a)

    crash_and_restore(w, a, content)
    assert set(a.state.threads) == {closed}
    if hub_first:
        reconnect(w, a, hub, b, c)
    else:
        # The peers' syncs come first, about threads A does not know yet: they are dropped.
        # Rebuilt from the hub's sync, A's threads ask their peers, who answer.
        reconnect(w, a, b, c)
        w.deliver(b, a)
        w.deliver(c, a)
        assert set(a.state.threads) == {closed}
        reconnect(w, a, hub)
    w.run()
    assert a.channel().latest.state == channel and not a.channel().awaiting_sync
    assert set(a.state.threads) == {agreed_before, opened_after}  # the closed one forgotten
    for key, peer in ((agreed_before, b), (opened_after, c)):
        assert thread_latest(a, key) == thread_latest(peer, key)
        assert a.state.threads[key].phase is th.ThreadPhase.OPEN
        assert not a.state.threads[key].awaiting_sync
    # A pays on in both threads and through the hub, at nonces above the gap.
    pay(w, a, opened_after, Assets(1, 0))
    pay(w, a, agreed_before, Assets(0, 1))
    routed = w.op(a, lambda i: roles.ActionPayViaHub(i, b.address, Assets(1, 0)))
    w.run()
    assert a.outcome(routed) == roles.EventOpDone(routed)
    assert thread_latest(c, opened_after).state.balance_sender == Assets(5, 5)
    for key, peer in ((agreed_before, b), (opened_after, c)):
        assert thread_latest(a, key) == thread_latest(peer, key)
        assert thread_latest(a, key).state.tx_count > GAP
    w.agreed(a)
    # A closes the rebuilt thread: both channels settle at its latest state.
    w.op(a, lambda i: roles.ActionCloseThread(i, opened_after))
    w.run()
    assert opened_after not in a.state.threads and opened_after not in c.state.threads
    w.agreed(a)
    w.agreed(c)
    check_no_equivocation(w)


def test_the_hub_restored_from_an_older_backup_adopts_its_users_states() -> None:
    w = world(("a", "b", "c"))
    a, b, c, hub = w.u["a"], w.u["b"], w.u["c"], w.hub
    key = open_thread(w, a, b, Assets(5, 5), Assets(5, 5))
    content = take_backup(hub)
    # After the hub's backup: routed payments, a thread locked and one settled.
    for payer, to in ((a, b), (b, c), (c, a)):
        op = w.op(payer, lambda i, to=to: roles.ActionPayViaHub(i, to.address, Assets(2, 0)))
        w.run()
        assert payer.outcome(op) == roles.EventOpDone(op)
    late = open_thread(w, b, c, Assets(3, 3), NO_ASSETS)
    w.op(a, lambda i: roles.ActionCloseThread(i, key))
    w.run()
    before = {u: w.agreed(u) for u in (a, b, c)}

    crash_and_restore(w, hub, content)
    assert all(side.awaiting_sync for side in hub.state.channels.values())
    reconnect(w, hub, a, b, c)
    w.run()
    for user in (a, b, c):
        assert w.agreed(user) == before[user]
        assert not hub.channel(user.address).awaiting_sync
    assert hub.channel(b.address).open_thread(late) is not None
    # The restored hub opens and settles threads and routes payments again.
    again = open_thread(w, c, a, Assets(1, 1), NO_ASSETS)
    pay(w, c, again, Assets(1, 0))
    w.op(c, lambda i: roles.ActionCloseThread(i, again))
    w.op(b, lambda i: roles.ActionCloseThread(i, late))
    op = w.op(a, lambda i: roles.ActionPayViaHub(i, b.address, Assets(1, 0)))
    w.run()
    assert a.outcome(op) == roles.EventOpDone(op)
    assert not hub.state.coordination.closings and not hub.state.coordination.openings
    for user in (a, b, c):
        state = w.agreed(user)
        assert state.thread_count == 0 and state.tx_count_global > GAP
    check_no_equivocation(w)


def test_a_restored_hub_waits_for_a_user_it_lost_before_proposing_in_its_channel() -> None:
    """B's channel came after the hub's backup. A's thread open to B makes the restored hub
    hold B's channel (at genesis, as far as it knows) and ask for collateral in it: nothing
    is proposed to B until B's own state is in."""
    w = world(("a", "b"), fund=False)
    a, b, hub = w.u["a"], w.u["b"], w.hub
    w.fund(a, FUNDS, COLLATERAL)
    content = take_backup(hub)
    w.fund(b, FUNDS, COLLATERAL)
    crash_and_restore(w, hub, content)
    assert b.address not in hub.state.channels
    mark = len(w.trace)
    w.heal(hub, a)
    _, out = w.open_thread(a, b, Assets(1, 1), NO_ASSETS)
    assert isinstance(out, roles.EventOpFailed)
    assert out.reason is RejectReason.INSUFFICIENT_COLLATERAL
    assert hub.channel(b.address).awaiting_sync and hub.channel(b.address).queued
    assert proposals_from(w, hub, mark) == []
    w.heal(hub, b)
    w.run()
    assert not hub.channel(b.address).awaiting_sync
    assert w.agreed(b).balance_user == FUNDS
    # The collateral asked for before the resync is proposed after it, on B's real state.
    assert w.agreed(b).balance_hub == COLLATERAL + Assets(1, 1)
    open_thread(w, a, b, Assets(1, 1), NO_ASSETS)
    assert w.agreed(b).tx_count_global > GAP
    check_no_equivocation(w)


@pytest.mark.parametrize("hub_has_channel", [False, True])
def test_a_genesis_user_whose_hub_holds_nothing_stops_waiting_at_the_hubs_word(
    hub_has_channel: bool,
) -> None:
    w = world(("a",), fund=False)
    a, hub = w.u["a"], w.hub
    if hub_has_channel:  # at genesis, nothing in flight: the hub has no state to sync
        w.step(hub, roles.ActionCollateralize(a.address, NO_ASSETS))
        assert hub.channel(a.address).latest.sig_user is None
        assert hub.channel(a.address).outgoing is None
    content = take_backup(a, 0)  # nothing double-signed yet
    crash_and_restore(w, a, content)
    op = w.op(a, lambda i: roles.ActionDeposit(i, FUNDS))
    assert proposals_from(w, a, 0) == []
    reconnect(w, a, hub)
    assert any(isinstance(m, ChannelResume) for _s, _d, m in w.trace)
    w.run()
    assert a.outcome(op) == roles.EventOpDone(op)
    assert w.agreed(a).balance_user == FUNDS
    check_no_equivocation(w)


def test_a_genesis_user_whose_hub_holds_its_channel_adopts_it_before_proposing() -> None:
    w = world(("a",))
    a, hub = w.u["a"], w.hub
    empty = recovery.backup_content(recovery.restore_state(a.state.config, take_backup(a)), 0)
    empty = replace(empty, channels=(), threads=())
    crash_and_restore(w, a, empty)
    op = w.op(a, lambda i: roles.ActionWithdraw(i, Assets(1, 0), a.address))
    reconnect(w, a, hub)
    w.run()
    assert a.outcome(op) == roles.EventOpDone(op)
    assert w.agreed(a).balance_user == FUNDS - Assets(1, 0)
    check_no_equivocation(w)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_work_and_a_crash_from_an_older_backup_converge(seed: int) -> None:
    rng = random.Random(seed)
    w = world(("a", "b"))
    a, b, hub = w.u["a"], w.u["b"], w.hub
    key = open_thread(w, a, b, Assets(30, 30), Assets(30, 30))
    content = take_backup(a)
    pid = 0
    for _ in range(30):
        pid += 1
        payer = rng.choice((a, b))
        w.step(payer, roles.ActionPayThread(key, pid, Assets(rng.randint(0, 1), rng.randint(1, 2))))
        for _ in range(rng.randint(0, 4)):
            busy = w.busy()
            if busy:
                w.deliver_one(rng.choice(busy))
        if rng.random() < 0.1:
            content = take_backup(a, pid)
    crash_and_restore(w, a, content)
    for _ in range(5):
        pid += 1
        w.step(a, roles.ActionPayThread(key, pid, Assets(0, 1)))
    reconnect(w, a, hub, b)
    w.run()
    assert thread_latest(a, key) == thread_latest(b, key)
    assert not a.state.threads[key].outgoing and not b.state.threads[key].outgoing
    sent_b = b.of(th.EventPaymentSent)
    assert len({e.payment_id for e in sent_b}) == len(sent_b)
    total = thread_latest(a, key).state.total()
    assert total == Assets(60, 60)
    w.agreed(a)
    check_no_equivocation(w)


def test_a_restored_hub_takes_a_new_users_first_proposal_as_its_sync() -> None:
    """D first signs with the hub after its backup and never had a double-signed state, so
    it has no sync to send: its first proposal, built on the genesis state the hub holds,
    shows the hub nothing newer exists, and the hub's own proposals may go."""
    w = world(("a", "d"), fund=False)
    a, d, hub = w.u["a"], w.u["d"], w.hub
    w.fund(a, FUNDS, COLLATERAL)
    content = take_backup(hub)
    crash_and_restore(w, hub, content)
    reconnect(w, hub, a, d)
    w.run()
    w.fund(d, FUNDS, COLLATERAL)  # a deposit (its first proposal), then collateral
    side = hub.channel(d.address)
    assert not side.awaiting_sync
    assert w.agreed(d).balance_hub == COLLATERAL and w.agreed(d).balance_user == FUNDS
    assert w.agreed(d).tx_count_global > GAP  # D's first proposal was refused below the gap
    check_no_equivocation(w)


def test_a_rebuilt_thread_whose_peer_has_nothing_newer_waits_for_its_first_payment() -> None:
    """A lost a thread C opened to it; the hub's sync rebuilds it at its initial state. C's
    own sync came before and was dropped, and C holds nothing newer, so it does not answer
    A's: A's payments wait until C shows its state (here, by paying A)."""
    w = world(("a", "c"))
    a, c, hub = w.u["a"], w.u["c"], w.hub
    content = take_backup(a)
    key = open_thread(w, c, a, Assets(5, 5), Assets(5, 5))
    crash_and_restore(w, a, content)
    reconnect(w, a, c)
    w.deliver(c, a)  # C's sync, about a thread A does not know: dropped
    reconnect(w, a, hub)
    w.run()
    assert a.state.threads[key].awaiting_sync
    mark = len(w.trace)
    paid = pay(w, a, key, Assets(1, 0))
    assert proposals_from(w, a, mark) == []
    pay(w, c, key, Assets(2, 0))
    assert not a.state.threads[key].awaiting_sync
    assert any(e.payment_id == paid for e in a.of(th.EventPaymentSent))
    assert thread_latest(a, key) == thread_latest(c, key)
    assert thread_latest(a, key).state.balance_sender == Assets(4, 5)
    check_no_equivocation(w)


def test_a_channel_proposal_the_hub_countersigned_is_adopted_not_signed_again() -> None:
    w = world(("a", "b"))
    a, b, hub = w.u["a"], w.u["b"], w.hub
    content = take_backup(a)
    op = w.op(a, lambda i: roles.ActionPayViaHub(i, b.address, Assets(4, 0)))
    w.deliver(a, hub)  # the hub countersigns and pays B on; A never hears of it
    w.drop(hub, a)
    w.run()
    paid = w.agreed(b)
    crash_and_restore(w, a, content)
    assert a.outcome(op) is None  # the request died with A's disk, its effect did not
    later = w.op(a, lambda i: roles.ActionPayViaHub(i, b.address, Assets(1, 0)))
    reconnect(w, a, hub, b)
    w.run()
    assert a.outcome(later) == roles.EventOpDone(later)
    assert w.agreed(a).balance_user == FUNDS - Assets(5, 0)
    assert w.agreed(b).balance_user == paid.balance_user + Assets(1, 0)
    check_no_equivocation(w)


def test_a_pending_deposit_in_the_backup_is_confirmed_once_the_chain_executes_it() -> None:
    w = world(("a",))
    a, hub = w.u["a"], w.hub
    w.auto_chain = False
    w.op(a, lambda i: roles.ActionDeposit(i, Assets(7, 7)))
    w.run()
    assert w.agreed(a).has_pending() and len(w.chain) == 1
    content = take_backup(a)
    crash_and_restore(w, a, content)
    assert a.channel().onchain_executed == w.agreed(a).tx_count_onchain - 1
    reconnect(w, a, hub)
    w.run()
    w.execute()  # the deposit transaction A sent before the crash is mined
    w.run()
    state = w.agreed(a)
    assert not state.has_pending() and state.balance_user == FUNDS + Assets(7, 7)
    check_no_equivocation(w)


def test_a_close_under_way_at_the_crash_is_finished_after_it() -> None:
    """B closed; A was final and had handed the final state to a hub that never got it; A's
    backup is from before. Restored open, A follows B's close again and the hub settles."""
    w = world(("a", "b"))
    a, b, hub = w.u["a"], w.u["b"], w.hub
    key = open_thread(w, a, b, Assets(5, 5), Assets(5, 5))
    pay(w, a, key, Assets(2, 0))
    content = take_backup(a)
    pay(w, b, key, Assets(1, 1))
    w.cut(a, hub)
    w.cut(b, hub)
    w.op(b, lambda i: roles.ActionCloseThread(i, key))
    w.run()
    assert a.state.threads[key].phase is th.ThreadPhase.FINAL
    final = thread_latest(b, key)
    crash_and_restore(w, a, content)
    assert a.state.threads[key].phase is th.ThreadPhase.OPEN
    reconnect(w, a, b)
    w.run()
    assert a.state.threads[key].phase is th.ThreadPhase.FINAL
    assert thread_latest(a, key) == final
    reconnect(w, hub, a, b)
    w.run()
    assert key not in a.state.threads and key not in b.state.threads
    assert [e.final for e in hub.of(roles.EventThreadClosed)] == [final]
    w.agreed(a)
    w.agreed(b)
    check_no_equivocation(w)


@pytest.mark.parametrize("second_gap", [2 * GAP, GAP])
def test_two_recoveries_from_one_backup_sign_apart_only_with_their_own_gaps(
    second_gap: int,
) -> None:
    """The node draws a gap per recovery (`node.recover.recovery_gap`): a proposal the peer
    never got, signed after the first recovery, is not signed over after a second recovery
    from the same backup. With the same gap both times it would be."""
    w = world(("a", "b"))
    a, b = w.u["a"], w.u["b"]
    key = open_thread(w, a, b, Assets(20, 20), Assets(20, 20))
    pay(w, a, key, Assets(1, 0))
    content = take_backup(a)
    crash_and_restore(w, a, content, GAP)
    reconnect(w, a, w.hub, b)
    w.run()
    w.cut(a, b)  # a's next proposal never reaches b
    pay(w, a, key, Assets(1, 0))
    crash_and_restore(w, a, content, second_gap)  # nothing newer was published
    reconnect(w, a, w.hub, b)
    w.run()
    pay(w, a, key, Assets(2, 0))
    assert thread_latest(b, key) == thread_latest(a, key)
    assert thread_latest(b, key).state.balance_receiver == Assets(20 + 1 + 2, 20)
    if second_gap == GAP:
        with pytest.raises(AssertionError, match="signed two states"):
            check_no_equivocation(w)
    else:
        check_no_equivocation(w)


def test_restore_refuses_a_gap_below_the_minimum() -> None:
    w = world(("a", "b"))
    content = take_backup(w.u["a"])
    with pytest.raises(recovery.RecoveryError, match="gap"):
        recovery.restore_state(w.u["a"].state.config, content, GAP - 1)
