"""Property: random exit scenarios on the real ChannelManager move every wei and token exactly.

Each example runs one scenario (drawn by `scenarios()`) on a shared deployment on the
embedded py-evm chain, undone afterwards by a chain snapshot:

1. Set-up. The hub deposits into its reserve; each user then makes a first pending update
   (user deposit and hub collateral from the reserve), followed by random operations:
   pending updates with deposits and withdrawals of either side (executed and confirmed,
   executed but never confirmed, invalidated after their timeout, or left outstanding),
   channel payments either way, threads between users (locks in both channels as in the
   DESIGN money flow, their initial states under both channels' thread roots), thread
   payments, threads closed off-chain, and withdrawals from the reserve.
2. Exits. Each chosen channel starts its exit by hub or user, at the on-chain record or a
   newer double-signed state; it may be challenged (up to twice, each time with a later
   state) by anyone: hub, a user, an outsider; after the challenge period anyone empties
   it. Every thread under an exited channel's disputed root gets a dispute (initial or a
   later state), maybe challenged up to twice with still later states, and is settled in
   every exited channel that holds it. Channels not chosen stay open (their threads' locks
   stay held there).

A model built from `protocols.onchain` predicts each call's record, the reserve, every thread
dispute and every payout. Checked after every transaction: the contract's records and
disputes equal the model's; the reserve equals the model's; the contract's ETH and token
balances equal the reserve plus the `held` of every channel (so it never paid out more than
it held); every record is exact: it holds its balances plus the locks of its threads not
yet settled in it, no less (it could not pay) and no more (nothing stranded). No balance
goes negative: model amounts are `Assets`, which raise on a negative, and every state the
scenario signs is built from them. Checked at the end: every exited channel is open again
and holds nothing; nothing is left unclaimed; each party's ETH and token balance moved by
exactly what the model predicts (deposits out, payouts in, gas paid); and what was deposited
equals what was paid out plus what the contract still holds (all of it, once every channel
exited).

`--hypothesis-show-statistics` shows which contract functions the examples called.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from protocols.onchain import (
    ChannelPhase,
    ChannelRecord,
    ThreadDispute,
    challenged_dispute,
    emptied_record,
    executed_record,
    exit_challenged_record,
    exit_started_record,
    new_thread_dispute,
    record_hash,
    thread_settled_record,
)
from protocols.thread_root import EMPTY_THREAD_ROOT, thread_leaf, thread_proof, thread_root
from protocols.types import NO_ASSETS, Address, Assets, ChannelState, ThreadState
from tests.contracts.conftest import catch_up
from tests.contracts.harness import CHALLENGE_PERIOD, Deployment, Party, key_for

N_USERS = 3
N_RECIPIENTS = 2  # fresh addresses that only ever receive withdrawals
MAX_THREADS = 4  # threads opened per scenario
PENDING_WINDOW = 300  # seconds a pending update may be executed (its timeout)
SMALL = 12  # amounts are drawn in [0, SMALL]
T = TypeVar("T")


# --- Scenarios ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pending:
    """A double-signed pending update (SPEC, UpdatePending) and what becomes of it."""

    user: int
    deposit_hub: Assets
    deposit_user: Assets
    withdrawal_hub: Assets
    withdrawal_user: Assets
    recipient: int  # 0: the user itself; i > 0: fresh recipient i - 1
    outcome: str  # "confirm" | "executed" | "invalidate" | "outstanding"
    by_hub: bool  # the submitter when the user deposits nothing


@dataclass(frozen=True)
class Pay:
    user: int
    hub_pays: bool
    amount: Assets


@dataclass(frozen=True)
class OpenThread:
    sender: int
    receiver_offset: int
    lock_sender: Assets
    lock_receiver: Assets


@dataclass(frozen=True)
class ThreadPay:
    thread: int  # index among the open threads
    sender_pays: bool
    amount: Assets


@dataclass(frozen=True)
class CloseThread:
    thread: int  # index among the open threads


@dataclass(frozen=True)
class ReserveWithdraw:
    amount: Assets
    recipient: int


Op = Pending | Pay | OpenThread | ThreadPay | CloseThread | ReserveWithdraw


@dataclass(frozen=True)
class ChannelExit:
    exits: bool
    start: int  # pick() among [on-chain record, *newer signed states]
    by_hub: bool
    challenges: tuple[tuple[int, int], ...]  # (pick() among later states, challenger) each
    emptier: int


@dataclass(frozen=True)
class ThreadExit:
    start: int  # pick() among the thread's states (0: initial)
    by_hub: bool
    challenges: tuple[tuple[int, int], ...]
    settler: int


@dataclass(frozen=True)
class Scenario:
    reserve: tuple[Assets, ...]
    ops: tuple[Op, ...]
    exits: tuple[ChannelExit, ...]  # one per user
    thread_exits: tuple[ThreadExit, ...]  # by thread id - 1 (MAX_THREADS plans)


def assets(hi: int = SMALL, lo: int = 0) -> st.SearchStrategy[Assets]:
    return st.builds(Assets, st.integers(lo, hi), st.integers(lo, hi))


def some_assets(hi: int = SMALL) -> st.SearchStrategy[Assets]:
    """Non-zero in at least one asset."""
    return st.one_of(
        st.builds(Assets, st.integers(1, hi), st.integers(0, hi)),
        st.builds(Assets, st.integers(0, hi), st.integers(1, hi)),
    )


USER = st.integers(0, N_USERS - 1)
ANYONE = st.integers(0, N_USERS + 1)  # hub, users, outsider
RECIPIENT = st.integers(0, N_RECIPIENTS)
OUTCOME = st.sampled_from(("confirm", "executed", "invalidate", "outstanding"))


@st.composite
def pending(
    draw: st.DrawFn,
    user: st.SearchStrategy[int],
    outcome: st.SearchStrategy[str],
    first: bool = False,
) -> Pending:
    """A user deposit with hub collateral (always, for a channel's first update), hub
    collateral alone, or withdrawals."""
    kinds = ("user deposit",) if first else ("user deposit", "collateral", "withdrawal")
    kind = draw(st.sampled_from(kinds))
    none = st.just(NO_ASSETS)
    deposit = assets(2 * SMALL, lo=1) if first else some_assets(2 * SMALL)
    return Pending(
        user=draw(user),
        deposit_hub=draw(none if kind == "withdrawal" else deposit),
        deposit_user=draw(deposit if kind == "user deposit" else none),
        withdrawal_hub=draw(assets() if kind == "withdrawal" else none),
        withdrawal_user=draw(some_assets() if kind == "withdrawal" else none),
        recipient=draw(RECIPIENT),
        outcome=draw(outcome),
        # The hub submits what the user does not pay for (SPEC), mostly; sometimes the user.
        by_hub=draw(st.sampled_from((True, True, True, False))),
    )


OPEN_THREAD = st.builds(
    OpenThread,
    sender=USER,
    receiver_offset=st.integers(0, N_USERS - 2),
    lock_sender=some_assets(),
    lock_receiver=assets(),
)
THREAD_PAY = st.builds(
    ThreadPay,
    thread=st.integers(0, MAX_THREADS - 1),
    sender_pays=st.booleans(),
    amount=some_assets(),
)
OPS: st.SearchStrategy[Op] = st.one_of(
    pending(USER, OUTCOME),
    pending(USER, OUTCOME),
    st.builds(Pay, user=USER, hub_pays=st.booleans(), amount=some_assets()),
    THREAD_PAY,
    st.builds(CloseThread, thread=st.integers(0, MAX_THREADS - 1)),
    st.builds(ReserveWithdraw, amount=assets(), recipient=st.integers(1, N_RECIPIENTS)),
)
# Up to two challenges in a row (each needs a later state than the one it replaces).
CHALLENGES = st.lists(st.tuples(st.integers(0, 7), ANYONE), max_size=2).map(tuple)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    reserve = draw(st.lists(assets(8 * SMALL, lo=SMALL), min_size=1, max_size=2))
    # Mostly executed first deposits, so that the random operations have funds to move.
    first_outcome = st.sampled_from(("confirm",) * 6 + ("executed", "outstanding"))
    firsts = [draw(pending(st.just(i), first_outcome, first=True)) for i in range(N_USERS)]
    ops = draw(st.lists(OPS, min_size=2, max_size=10))
    # Threads are opened at random points, each followed by a few payments, so that most
    # scenarios have threads (and thread states later than the initial one) to exit.
    for open_thread in draw(st.lists(OPEN_THREAD, min_size=1, max_size=MAX_THREADS)):
        at = draw(st.integers(0, len(ops)))
        ops[at:at] = [open_thread, *draw(st.lists(THREAD_PAY, min_size=1, max_size=3))]
    exits = draw(
        st.lists(
            st.builds(
                ChannelExit,
                exits=st.sampled_from((True, True, True, False)),
                start=st.integers(0, 7),
                by_hub=st.booleans(),
                challenges=CHALLENGES,
                emptier=ANYONE,
            ),
            min_size=N_USERS,
            max_size=N_USERS,
        )
    )
    thread_exits = draw(
        st.lists(
            st.builds(
                ThreadExit,
                start=st.integers(0, 7),
                by_hub=st.booleans(),
                challenges=CHALLENGES,
                settler=ANYONE,
            ),
            min_size=MAX_THREADS,
            max_size=MAX_THREADS,
        )
    )
    return Scenario(tuple(reserve), (*firsts, *ops), tuple(exits), tuple(thread_exits))


# --- Running a scenario against the model ----------------------------------------------------


def pick(options: list[T], choice: int) -> T:
    """Choice 0 is the first option (the on-chain record, a thread's initial state, the
    oldest later state), 1-3 the last (the newest), others spread over all."""
    if choice in (1, 2, 3):
        return options[-1]
    return options[choice % len(options)]


def amin(a: Assets, b: Assets) -> Assets:
    return Assets(min(a.eth, b.eth), min(a.token, b.token))


def locks(threads: tuple[ThreadState, ...]) -> Assets:
    total = NO_ASSETS
    for t in threads:
        total += t.total()
    return total


class Run:
    """One scenario on the chain, with the model of what every call must do."""

    def __init__(self, d: Deployment) -> None:
        self.d = d
        self.users = d.users[:N_USERS]
        self.parties = [d.hub, *self.users, d.outsider]
        self.recipients = [Party(key_for(200 + i)) for i in range(N_RECIPIENTS)]
        # Off-chain: every channel's latest state, all its double-signed states, its open
        # threads, and whether its outstanding pending update was executed.
        self.latest = {u.address: d.state(u) for u in self.users}
        self.signed: dict[Address, list[ChannelState]] = {u.address: [] for u in self.users}
        self.open: dict[Address, tuple[ThreadState, ...]] = {u.address: () for u in self.users}
        self.pending: dict[Address, str | None] = {u.address: None for u in self.users}
        self.thread_states: list[list[ThreadState]] = []  # by thread id - 1; [0] initial
        self.roots: dict[bytes, tuple[ThreadState, ...]] = {EMPTY_THREAD_ROOT: ()}
        # Model of the contract.
        self.records = {u.address: ChannelRecord() for u in self.users}
        self.reserve = NO_ASSETS
        self.disputes: dict[bytes, ThreadDispute] = {}
        self.settled: set[tuple[Address, bytes]] = set()
        self.calls: list[str] = []
        # Expected balance moves (deposits negative, payouts positive) and gas paid.
        tracked = [*self.parties, *self.recipients]
        self.expect_eth: dict[Address, int] = {p.address: 0 for p in tracked}
        self.expect_token: dict[Address, int] = {p.address: 0 for p in tracked}
        self.gas_paid: dict[Address, int] = defaultdict(int)
        self.deposited = NO_ASSETS
        self.paid_out = NO_ASSETS
        self.start_eth = {p.address: d.eth(p) for p in tracked}
        self.start_token = {p.address: d.tokens(p) for p in tracked}
        assert d.contract_holdings() == NO_ASSETS == d.reserve()

    # --- bookkeeping -------------------------------------------------------------------

    def credit(self, who: Address, amount: Assets) -> None:
        self.paid_out += amount
        self.expect_eth[who] += amount.eth
        self.expect_token[who] += amount.token

    def debit(self, who: Address, amount: Assets) -> None:
        self.expect_eth[who] -= amount.eth
        self.expect_token[who] -= amount.token
        self.deposited += amount

    def sent(self, receipt: Any) -> int:
        """Charge a harness call's gas to its sender; return its block time."""
        tx = self.d.w3.eth.get_transaction(receipt["transactionHash"])
        self.calls.append(self.d.manager.decode_function_input(tx["input"])[0].fn_name)
        sender = Address.from_hex(receipt["from"])
        self.gas_paid[sender] += receipt["gasUsed"] * receipt["effectiveGasPrice"]
        return int(self.d.w3.eth.get_block(receipt["blockNumber"])["timestamp"])

    def party(self, index: int) -> Party:
        return self.parties[index % len(self.parties)]

    def check(self) -> None:
        """The per-transaction invariants."""
        d = self.d
        held = NO_ASSETS
        for u in self.users:
            model = self.records[u.address]
            assert d.record(u) == model, f"record of {u.hex}"
            self.check_exact(u.address, model)
            held += model.held
        for leaf, dispute in self.disputes.items():
            assert d.disputes[leaf] == dispute
        assert d.reserve() == self.reserve
        assert d.contract_holdings() == self.reserve + held  # nothing unclaimed: see check_final

    def check_exact(self, user: Address, record: ChannelRecord) -> None:
        """A record holds its balances plus the locks of its threads not yet settled in it:
        never less (the contract could not pay) and never more (nothing stranded)."""
        unsettled = tuple(
            t for t in self.roots[record.thread_root] if (user, thread_leaf(t)) not in self.settled
        )
        assert record.thread_count == len(unsettled)
        if record.phase is ChannelPhase.SETTLING_THREADS:
            assert record.balance_hub == record.balance_user == NO_ASSETS
        assert record.held == record.balance_hub + record.balance_user + locks(unsettled)

    # --- off-chain states ----------------------------------------------------------------

    def advance(self, user: Address, **fields: Any) -> ChannelState:
        """The next double-signed state of `user`'s channel."""
        state = replace(
            self.latest[user], tx_count_global=self.latest[user].tx_count_global + 1, **fields
        )
        self.latest[user] = state
        self.signed[user].append(state)
        return state

    def with_threads(self, user: Address, threads: tuple[ThreadState, ...]) -> dict[str, Any]:
        self.open[user] = threads
        root = thread_root(threads)
        self.roots[root] = threads
        return {"thread_root": root, "thread_count": len(threads)}

    def resolve(self, user: Address) -> None:
        """Confirm (executed) or invalidate (not executed) the outstanding pending update."""
        s = self.latest[user]
        cleared: dict[str, Any] = {
            "pending_deposit_hub": NO_ASSETS,
            "pending_deposit_user": NO_ASSETS,
            "pending_withdrawal_hub": NO_ASSETS,
            "pending_withdrawal_user": NO_ASSETS,
            "timeout": 0,
        }
        if self.pending[user] == "executed":
            self.advance(
                user,
                balance_hub=s.balance_hub + s.pending_deposit_hub,
                balance_user=s.balance_user + s.pending_deposit_user,
                **cleared,
            )
        else:
            if self.d.now < s.timeout:
                self.d.travel(s.timeout - self.d.now)
            self.advance(
                user,
                balance_hub=s.balance_hub + s.pending_withdrawal_hub,
                balance_user=s.balance_user + s.pending_withdrawal_user,
                **cleared,
            )
        self.pending[user] = None

    # --- operations ---------------------------------------------------------------------

    def apply(self, op: Op) -> None:
        if isinstance(op, Pending):
            self.pending_update(op)
        elif isinstance(op, Pay):
            self.pay(op)
        elif isinstance(op, OpenThread):
            self.open_thread(op)
        elif isinstance(op, ThreadPay):
            self.thread_pay(op)
        elif isinstance(op, CloseThread):
            self.close_thread(op)
        else:
            self.reserve_withdraw(op)

    def hub_deposit(self, amount: Assets) -> None:
        if amount.is_zero():
            return
        self.sent(self.d.hub_deposit(amount.eth, amount.token))
        self.debit(self.d.hub.address, amount)
        self.reserve += amount
        self.check()

    def reserve_withdraw(self, op: ReserveWithdraw) -> None:
        amount = amin(op.amount, self.reserve)
        if amount.is_zero():
            return
        to = self.recipients[op.recipient - 1]
        self.sent(self.d.hub_withdraw(to, amount.eth, amount.token))
        self.reserve -= amount
        self.credit(to.address, amount)
        self.check()

    def pending_update(self, op: Pending) -> None:
        user = self.users[op.user]
        u = user.address
        if self.pending[u] is not None:
            self.resolve(u)
        s = self.latest[u]
        wd_hub = amin(op.withdrawal_hub, s.balance_hub)
        wd_user = amin(op.withdrawal_user, s.balance_user)
        dep_hub = amin(op.deposit_hub, self.reserve)
        dep_user = op.deposit_user
        if (wd_hub + wd_user + dep_hub + dep_user).is_zero():
            return
        recipient = user if op.recipient == 0 else self.recipients[op.recipient - 1]
        state = self.advance(
            u,
            balance_hub=s.balance_hub - wd_hub,
            balance_user=s.balance_user - wd_user,
            pending_deposit_hub=dep_hub,
            pending_deposit_user=dep_user,
            pending_withdrawal_hub=wd_hub,
            pending_withdrawal_user=wd_user,
            recipient=recipient.address,
            timeout=self.d.now + PENDING_WINDOW,
            tx_count_onchain=s.tx_count_onchain + 1,
        )
        if op.outcome in ("confirm", "executed"):
            self.execute(user, state, by_user=not dep_user.is_zero() or not op.by_hub)
            self.pending[u] = "executed"
        else:
            self.pending[u] = "unexecuted"
        if op.outcome in ("confirm", "invalidate"):
            self.resolve(u)

    def execute(self, user: Party, state: ChannelState, by_user: bool) -> None:
        u = user.address
        record = executed_record(self.records[u], state, self.d.now)
        if by_user:
            self.sent(self.d.user_update(state))
            self.debit(u, state.pending_deposit_user)
        else:
            self.sent(self.d.hub_update(state))
        self.records[u] = record
        self.reserve = self.reserve - state.pending_deposit_hub + state.pending_withdrawal_hub
        self.credit(state.recipient, state.pending_withdrawal_user)
        self.check()

    def pay(self, op: Pay) -> None:
        u = self.users[op.user].address
        s = self.latest[u]
        if op.hub_pays:
            amount = amin(op.amount, s.balance_hub)
            hub, user = s.balance_hub - amount, s.balance_user + amount
        else:
            amount = amin(op.amount, s.balance_user)
            hub, user = s.balance_hub + amount, s.balance_user - amount
        if not amount.is_zero():
            self.advance(u, balance_hub=hub, balance_user=user)

    def open_thread(self, op: OpenThread) -> None:
        if len(self.thread_states) >= MAX_THREADS:
            return
        a = self.users[op.sender].address
        # The drawn receiver, or the next one with something to lock (channels whose
        # deposits are still pending have nothing yet).
        for k in range(N_USERS - 1):
            b = self.users[
                (op.sender + 1 + (op.receiver_offset + k) % (N_USERS - 1)) % N_USERS
            ].address
            sa, sb = self.latest[a], self.latest[b]
            lock_a = amin(op.lock_sender, amin(sa.balance_user, sb.balance_hub))
            lock_b = amin(op.lock_receiver, amin(sb.balance_user, sa.balance_hub))
            if not (lock_a + lock_b).is_zero():
                break
        else:
            return
        initial = ThreadState(
            thread_id=len(self.thread_states) + 1,
            sender=a,
            receiver=b,
            balance_sender=lock_a,
            balance_receiver=lock_b,
            tx_count=0,
        )
        self.thread_states.append([initial])
        self.advance(
            a,
            balance_user=sa.balance_user - lock_a,
            balance_hub=sa.balance_hub - lock_b,
            **self.with_threads(a, (*self.open[a], initial)),
        )
        self.advance(
            b,
            balance_user=sb.balance_user - lock_b,
            balance_hub=sb.balance_hub - lock_a,
            **self.with_threads(b, (*self.open[b], initial)),
        )

    def open_threads(self) -> list[ThreadState]:
        seen = {t for threads in self.open.values() for t in threads}
        return sorted(seen, key=lambda t: t.thread_id)

    def thread_pay(self, op: ThreadPay) -> None:
        threads = self.open_threads()
        if not threads:
            return
        states = self.thread_states[threads[op.thread % len(threads)].thread_id - 1]
        t = states[-1]
        if op.sender_pays:
            amount = amin(op.amount, t.balance_sender)
            sender, receiver = t.balance_sender - amount, t.balance_receiver + amount
        else:
            amount = amin(op.amount, t.balance_receiver)
            sender, receiver = t.balance_sender + amount, t.balance_receiver - amount
        if not amount.is_zero():
            states.append(
                replace(
                    t, balance_sender=sender, balance_receiver=receiver, tx_count=t.tx_count + 1
                )
            )

    def close_thread(self, op: CloseThread) -> None:
        threads = self.open_threads()
        if not threads:
            return
        initial = threads[op.thread % len(threads)]
        final = self.thread_states[initial.thread_id - 1][-1]
        for user, mine, hubs in (
            (initial.sender, final.balance_sender, final.balance_receiver),
            (initial.receiver, final.balance_receiver, final.balance_sender),
        ):
            s = self.latest[user]
            rest = tuple(t for t in self.open[user] if t != initial)
            self.advance(
                user,
                balance_user=s.balance_user + mine,
                balance_hub=s.balance_hub + hubs,
                **self.with_threads(user, rest),
            )

    # --- exits -----------------------------------------------------------------------------

    def exit_channels(self, plans: tuple[ChannelExit, ...]) -> list[Party]:
        exiting = [(u, p) for u, p in zip(self.users, plans, strict=True) if p.exits]
        for user, plan in exiting:
            u = user.address
            record = self.records[u]
            options: list[ChannelState | None] = [
                None,
                *(s for s in self.signed[u] if s.tx_count_global > record.tx_count_global),
            ]
            state = pick(options, plan.start)
            sender = self.d.hub if plan.by_hub else user
            if state is None:
                now = self.sent(self.d.start_exit(user, sender=sender))
            else:
                now = self.sent(self.d.start_exit_with(state, sender=sender))
            self.records[u] = exit_started_record(record, state, now, CHALLENGE_PERIOD)
            if self.records[u].thread_count:
                event("an exit disputes a state with threads")
            self.check()
        for user, plan in exiting:
            u = user.address
            for choice, who in plan.challenges:
                record = self.records[u]
                later = [s for s in self.signed[u] if s.tx_count_global > record.tx_count_global]
                if not later:
                    break
                state, challenger = pick(later, choice), self.party(who)
                now = self.sent(self.d.challenge_exit(state, sender=challenger))
                self.records[u] = exit_challenged_record(record, state, now)
                self.check()
        self.d.travel(CHALLENGE_PERIOD)
        for user, plan in exiting:
            u = user.address
            emptier = self.party(plan.emptier)
            now = self.sent(self.d.empty_channel(user, sender=emptier))
            self.records[u], payout = emptied_record(self.records[u], now)
            self.credit(u, payout.to_user)
            self.reserve += payout.to_reserve
            self.check()
        return [user for user, _ in exiting]

    def exit_threads(self, exited: list[Party], plans: tuple[ThreadExit, ...]) -> None:
        # (channel, thread, proof) for every thread under a settling channel's root.
        pairs: list[tuple[Party, ThreadState, tuple[bytes, ...]]] = []
        for user in exited:
            record = self.records[user.address]
            if record.phase is ChannelPhase.SETTLING_THREADS:
                threads = self.roots[record.thread_root]
                assert record.thread_count == len(threads)
                assert record.held == locks(threads)  # exact: nothing more, nothing less
                pairs += [(user, t, thread_proof(threads, t)) for t in threads]
        pairs.sort(key=lambda p: (p[1].thread_id, p[0].address))
        started: list[ThreadState] = []
        for user, initial, proof in pairs:
            leaf = thread_leaf(initial)
            if leaf in self.disputes:
                continue
            plan = plans[initial.thread_id - 1]
            states = self.thread_states[initial.thread_id - 1]
            latest = pick(states, plan.start)
            sender = self.d.hub if plan.by_hub else user
            update = None if latest.tx_count == 0 else latest
            now = self.sent(
                self.d.start_thread_exit(user, initial, proof, latest=update, sender=sender)
            )
            self.disputes[leaf] = new_thread_dispute(initial, update, now, CHALLENGE_PERIOD)
            started.append(initial)
            self.check()
        for initial in started:
            leaf = thread_leaf(initial)
            for choice, who in plans[initial.thread_id - 1].challenges:
                dispute = self.disputes[leaf]
                later = [
                    s
                    for s in self.thread_states[initial.thread_id - 1]
                    if s.tx_count > dispute.tx_count
                ]
                if not later:
                    break
                latest, challenger = pick(later, choice), self.party(who)
                now = self.sent(self.d.challenge_thread(initial, latest, sender=challenger))
                self.disputes[leaf] = challenged_dispute(initial, dispute, latest, now)
                self.check()
        if pairs:
            self.d.travel(CHALLENGE_PERIOD)
        for user, initial, proof in pairs:
            u = user.address
            settler = self.party(plans[initial.thread_id - 1].settler)
            now = self.sent(self.d.settle_thread(user, initial, proof, sender=settler))
            self.records[u], payout = thread_settled_record(
                self.records[u], u, initial, self.disputes[thread_leaf(initial)], now
            )
            self.settled.add((u, thread_leaf(initial)))
            self.credit(u, payout.to_user)
            self.reserve += payout.to_reserve
            self.check()

    # --- the end ---------------------------------------------------------------------------

    def check_final(self, exited: list[Party]) -> None:
        d = self.d
        for user in exited:
            record = self.records[user.address]
            assert record.phase is ChannelPhase.OPEN and record.held == NO_ASSETS
        f = d.manager.functions
        for user in self.users:
            assert bytes(f.channelRecordHash(user.hex).call()) == record_hash(
                self.records[user.address]
            )
        # Every recipient here accepts ETH and tokens, so no payout was deferred.
        for who in self.expect_eth:
            assert f.unclaimedEth(who.checksum()).call() == 0
            assert f.unclaimedToken(who.checksum()).call() == 0
        held = NO_ASSETS
        for record in self.records.values():
            held += record.held
        # Each party moved by exactly what the model says: deposits out, payouts in, gas.
        for who in self.expect_eth:
            eth = d.eth(who.checksum()) - self.start_eth[who] + self.gas_paid[who]
            token = d.tokens(who.checksum()) - self.start_token[who]
            assert (eth, token) == (self.expect_eth[who], self.expect_token[who]), who
        # Every wei and token unit deposited is paid out or still held (reserve, channels),
        # by the model and by the chain; no unit went to an address nobody expected.
        holdings = d.contract_holdings()
        assert holdings == self.reserve + held
        assert self.deposited == self.paid_out + self.reserve + held
        moved = Assets(-sum(self.expect_eth.values()), -sum(self.expect_token.values()))
        assert moved == holdings


# 25 examples, to stay within ~60 s on the 2-core machine with a margin: the session's
# deployment (conftest) serves them all, each undone by a snapshot; an example sends 10-30
# transactions (~40 ms each without the gas estimate) and reads the contract after each
# (~20 ms), so it takes 1.0-2.5 s; 30 examples measured 42-52 s, 25 take ~35-45 s. Across 25
# examples every contract function but `claim` (no recipient here refuses a payout) is
# called; see the share of examples per function with --hypothesis-show-statistics.
# Raise max_examples for a longer hunt: 150 examples (~5 min) found nothing either.
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenario=scenarios())
def test_random_exits_move_every_unit_exactly(deployment: Deployment, scenario: Scenario) -> None:
    d = deployment
    with d.snapshot():
        catch_up(d)
        run = Run(d)
        for amount in scenario.reserve:
            run.hub_deposit(amount)
        for op in scenario.ops:
            run.apply(op)
        run.check()
        exited = run.exit_channels(scenario.exits)
        run.exit_threads(exited, scenario.thread_exits)
        run.check()
        run.check_final(exited)
        event(f"threads opened {len(run.thread_states)}")
        for name in sorted(set(run.calls)):
            event(f"calls {name}")
        event(f"transactions: {len(run.calls) // 10 * 10}-{len(run.calls) // 10 * 10 + 9}")
