"""An in-memory world for stateful tests: one hub, N users, their channels and threads.

Every channel is a `Pair` of `ChannelSide`s (hub end `a`, user end `b`) and every thread a
`Pair` of `ThreadSide`s (A's end `a`, B's end `b`, whose state is None until B accepts).
Messages wait in the pairs' inboxes until a test delivers them. The world plays the parts
the node and the chain would play:

- a tiny contract ledger per channel (deposits credited, withdrawals paid out when a
  double-signed pending state is executed before its timeout);
- the hub's policy: route hub-routed payments on, lock an agreed thread in B's channel then
  A's (refunding B's if A's fails), settle a thread in both channels once both sides are
  final;
- the user's node: `ActionConfirmLock` once its channel holds the thread.

It also keeps what the invariants need: the signed digests of every signer mapped to the
states they sign, the hub's expected position, every payment request and its reports.
`problems` collects violations seen while reacting to events; the checks assert it empty.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from protocols import channel, thread
from protocols.channel import (
    ActionProposeUpdate,
    ChannelSide,
    ContractReceiveBlock,
    ContractReceiveChannelUpdated,
    ContractSendAuthorizedUpdate,
    EventChannelSynced,
    EventChannelUpdated,
    EventUpdateFailed,
    SignedChannelState,
    new_channel,
)
from protocols.effects import Receive, Send, Transition, rejected
from protocols.eip712 import Domain, channel_state_digest, thread_state_digest
from protocols.messages import (
    ChannelProposal,
    ChannelSync,
    ChannelUpdate,
    RejectReason,
    SignedThreadState,
    ThreadOpenProposal,
    ThreadProposal,
    ThreadSync,
    UpdateCloseThread,
    UpdateConfirmPending,
    UpdateInvalidatePending,
    UpdateOpenThread,
    UpdatePayment,
    UpdatePending,
)
from protocols.signing import Signer, is_signed_by
from protocols.thread import (
    ActionCloseThread,
    ActionConfirmLock,
    ActionPay,
    EventPaymentFailed,
    EventPaymentReceived,
    EventPaymentSent,
    EventThreadAgreed,
    EventThreadFinal,
    EventThreadOpenRefused,
    ThreadPhase,
    ThreadSide,
    accept_thread,
    propose_thread,
)
from protocols.thread_root import thread_root
from protocols.types import (
    NO_ASSETS,
    ZERO_ADDRESS,
    Address,
    Assets,
    ChannelState,
    Party,
    ThreadKey,
    ThreadState,
)
from tests.protocols.pair import End, Pair, RecordingSigner

DOMAIN = Domain(chain_id=1337, verifying_contract=Address(b"\xc0" * 20))
DRAIN_LIMIT = 2_000  # deliveries before a drain counts as a livelock (runs need < 200)

Vec = tuple[int, int]  # (eth, token) that may go negative, for running sums
ZERO: Vec = (0, 0)


def vec(a: Assets) -> Vec:
    return (a.eth, a.token)


def plus(x: Vec, y: Vec) -> Vec:
    return (x[0] + y[0], x[1] + y[1])


def minus(x: Vec, y: Vec) -> Vec:
    return (x[0] - y[0], x[1] - y[1])


def hub_part(state: ThreadState, user: Address) -> Assets:
    """What the hub locks of `state` in `user`'s channel: the other party's balance."""
    return state.balance_receiver if user == state.sender else state.balance_sender


class Link(Pair):
    """A pair that tells the world about every effect: sends are indexed, events reacted to."""

    def __init__(self, world: World, record: Any, step_fn: Any, a: End, b: End) -> None:
        super().__init__(step_fn, a, b)
        self.world = world
        self.record = record

    def absorb(self, end: End, effects: tuple[object, ...]) -> None:
        super().absorb(end, effects)
        for effect in effects:
            if isinstance(effect, Send):
                self.world.index_message(effect.message)
            else:
                self.world.reactions.append((self, end, effect))

    def quiet(self) -> bool:
        return not (self.a.inbox or self.b.inbox)


@dataclass
class ChannelRecord:
    user: Address
    hub_end: End
    user_end: End
    link: Link = field(init=False)
    # The contract ledger of this channel.
    deposited: Assets = NO_ASSETS
    withdrawn: Assets = NO_ASSETS
    onchain: int = 0
    hub_prev: ChannelState | None = None  # the hub side's latest before its last update

    def end(self, party: Party) -> End:
        return self.hub_end if party is Party.HUB else self.user_end


@dataclass
class ThreadRecord:
    initial: ThreadState
    max_lock: Assets
    window: int
    link: Link = field(init=False)
    # proposed -> agreed -> locking (in B's) -> open (in A's too) -> settling -> closed;
    # or refused, failed (B's lock failed), refunding -> refunded (A's lock failed).
    status: str = "proposed"
    close_requested: bool = False
    forced: bool = False  # closed with force: its link is cut for good (the peer is gone)
    finals: dict[Address, SignedThreadState] = field(default_factory=dict)
    closed_in: set[Address] = field(default_factory=set)
    close_delta: Vec = ZERO  # what the hub's closes in the channels moved, summed
    sent: dict[Address, Vec] = field(default_factory=dict)  # by payer, from EventPaymentSent
    received: dict[Address, Vec] = field(default_factory=dict)  # by payee

    @property
    def key(self) -> ThreadKey:
        return self.initial.key

    def side(self, address: Address) -> ThreadSide | None:
        state: ThreadSide | None = self.link.ends[address].state
        return state


@dataclass
class PaymentRecord:
    key: ThreadKey
    payer: Address
    amount: Assets
    reports: list[object] = field(default_factory=list)


class World:
    def __init__(self, n_users: int) -> None:
        self.hub = RecordingSigner((1).to_bytes(32, "big"))
        self.users = [RecordingSigner((i + 2).to_bytes(32, "big")) for i in range(n_users)]
        self.signers = {s.address: s for s in (self.hub, *self.users)}
        self.now = 0
        self.reactions: deque[tuple[Link, End, object]] = deque()
        self.settling = False
        self.channels: dict[Address, ChannelRecord] = {}
        for user in self.users:
            hub_end = End(new_channel(DOMAIN, Party.HUB, self.hub.address, user.address), self.hub)
            user_end = End(new_channel(DOMAIN, Party.USER, self.hub.address, user.address), user)
            record = ChannelRecord(user.address, hub_end, user_end)
            record.hub_prev = hub_end.state.latest.state
            record.link = Link(self, record, self._channel_step, hub_end, user_end)
            self.channels[user.address] = record
        self.threads: dict[ThreadKey, ThreadRecord] = {}
        self.submissions: list[tuple[Address, SignedChannelState]] = []
        self.payments: dict[int, PaymentRecord] = {}
        self.next_id = 1
        self.hub_flow: Vec = ZERO  # hub deposits - withdrawals + routed legs in - out
        self.problems: list[str] = []
        self.stats: Counter[str] = Counter()
        # Signature bookkeeping: digest -> (kind, key, nonce) slot; per signer slot -> digest.
        self.slots: dict[bytes, tuple[str, object, int]] = {}
        self.indexed: set[object] = set()
        self.signed_slots: dict[Address, dict[tuple[str, object, int], bytes]] = {
            a: {} for a in self.signers
        }
        self.signed_checked: dict[Address, int] = dict.fromkeys(self.signers, 0)
        # Nonce bookkeeping: per end, the last nonce of an event and of `latest`.
        self.event_nonce: dict[int, int] = {}
        self.latest_nonce: dict[int, int] = {}

    # ------------------------------------------------------------ stepping

    def _channel_step(self, side: ChannelSide, event: object, signer: Signer) -> Transition[Any]:
        nonces = self.thread_nonces(side.user) if side.role is Party.USER else None
        return channel.step(side, event, signer, nonces)  # type: ignore[arg-type]

    def thread_nonces(self, user: Address) -> dict[ThreadKey, int]:
        nonces = {}
        for record in self.threads.values():
            if user in record.link.ends:
                side = record.side(user)
                if side is not None and side.latest is not None:
                    nonces[record.key] = side.latest.state.tx_count
        return nonces

    def _thread_step_fn(self, record: ThreadRecord) -> Any:
        def step_fn(side: ThreadSide | None, event: object, signer: Signer) -> Transition[Any]:
            if side is not None:
                return thread.step(side, event, signer)  # type: ignore[arg-type]
            if isinstance(event, Receive) and isinstance(event.message, ThreadOpenProposal):
                return accept_thread(
                    DOMAIN, signer, event.sender, event.message, record.max_lock, record.window
                )
            if isinstance(event, thread.ActionReconnected):
                return Transition(None)
            return rejected(None, RejectReason.UNKNOWN_THREAD, "no thread here yet")

        return step_fn

    def links(self) -> list[Link]:
        threads = [t.link for t in self.threads.values() if not t.forced]
        return [c.link for c in self.channels.values()] + threads

    def act(self, link: Link, end: End, event: object) -> Transition[Any]:
        """Step `end` with a local input, then let everyone react to what it reported."""
        result = link.input(end, event)
        self.settle()
        return result

    def settle(self) -> None:
        if self.settling:  # a reaction's own steps: the outer loop handles their effects
            return
        self.settling = True
        try:
            while self.reactions:
                self._react(*self.reactions.popleft())
        finally:
            self.settling = False

    def deliver(self, link: Link, end: End, count: int | None = None) -> int:
        delivered = 0
        while end.inbox and (count is None or delivered < count):
            link.deliver(end, 1)
            self.settle()
            delivered += 1
        return delivered

    def drain(self, links: list[Link] | None = None) -> None:
        """Deliver everything everywhere (or on `links`) until no message is in flight."""
        delivered = 0
        while True:
            moved = 0
            for link in links if links is not None else self.links():
                moved += self.deliver(link, link.a) + self.deliver(link, link.b)
            if not moved:
                return
            delivered += moved
            if delivered > DRAIN_LIMIT:
                raise AssertionError("livelock: the links never went quiet")

    def quiet(self) -> bool:
        return all(link.quiet() for link in self.links()) and not self.reactions

    def reconnect(self, link: Link) -> None:
        """Lose everything in flight on `link`; both ends see a new stream."""
        link.drop_in_flight()
        is_thread = isinstance(link.record, ThreadRecord)
        event = thread.ActionReconnected() if is_thread else channel.ActionReconnected()
        self.act(link, link.a, event)
        self.act(link, link.b, event)

    # ------------------------------------------------------------ local actions

    def propose(self, user: Address, party: Party, update: ChannelUpdate) -> Transition[Any]:
        record = self.channels[user]
        result = self.act(record.link, record.end(party), ActionProposeUpdate(update))
        if result.rejection is not None:
            self.stats[f"propose rejected: {result.rejection.reason.name}"] += 1
            if party is Party.HUB:
                self._hub_update_failed(record, update, result.rejection.reason)
                self.settle()
        return result

    def advance_time(self, seconds: int) -> None:
        self.now += seconds
        for record in self.channels.values():
            for end in (record.hub_end, record.user_end):
                self.act(record.link, end, ContractReceiveBlock(self.now))

    def execute(self, index: int) -> bool:
        """Submit one authorized update to the contract; True if it executed."""
        user, signed = self.submissions.pop(index)
        record = self.channels[user]
        state = signed.state
        digest = channel_state_digest(DOMAIN, state)
        if not (
            signed.sig_hub is not None
            and signed.sig_user is not None
            and is_signed_by(digest, signed.sig_hub, self.hub.address)
            and is_signed_by(digest, signed.sig_user, user)
        ):
            self.problems.append(f"submitted a state not double-signed: {state}")
            return False
        if not (self.now < state.timeout and state.tx_count_onchain > record.onchain):
            self.stats["execution reverted"] += 1
            return False
        self.stats["execution"] += 1
        record.deposited += state.pending_deposit_hub + state.pending_deposit_user
        record.withdrawn += state.pending_withdrawal_hub + state.pending_withdrawal_user
        record.onchain = state.tx_count_onchain
        event = ContractReceiveChannelUpdated(user, state.tx_count_onchain)
        self.act(record.link, record.hub_end, event)
        self.act(record.link, record.user_end, event)
        return True

    def settle_pending(self, user: Address, party: Party) -> None:
        """Propose phase two of the pending update: confirm if executed, else invalidate."""
        record = self.channels[user]
        state = record.end(party).state.latest.state
        if not state.has_pending():
            return
        onchain = state.tx_count_onchain
        executed = record.onchain >= onchain
        update = UpdateConfirmPending(onchain) if executed else UpdateInvalidatePending(onchain)
        self.propose(user, party, update)

    def fund(self, user: Address, party: Party, amount: Assets) -> None:
        """A deposit run to the end: pending, executed, confirmed."""
        if amount.is_zero():
            return
        record = self.channels[user]
        zero = NO_ASSETS
        deposit = (amount, zero) if party is Party.HUB else (zero, amount)
        recipient = record.end(party).state.latest.state.recipient
        self.propose(user, party, UpdatePending(*deposit, zero, zero, recipient, self.now + 100))
        self.drain()
        while self.submissions:
            self.execute(0)
        self.settle_pending(user, party)
        self.drain()

    def open_thread(
        self, a: int, b: int, lock_a: Assets, lock_b: Assets, max_lock: Assets, window: int
    ) -> ThreadRecord:
        sender, receiver = self.users[a], self.users[b]
        initial = ThreadState(self.next_id, sender.address, receiver.address, lock_a, lock_b, 0)
        self.next_id += 1
        record = ThreadRecord(initial, max_lock, window)
        first = propose_thread(DOMAIN, sender, initial, window)
        a_end, b_end = End(first.state, sender), End(None, receiver)
        record.link = Link(self, record, self._thread_step_fn(record), a_end, b_end)
        self.threads[initial.key] = record
        record.link.absorb(a_end, first.effects)
        self.settle()
        return record

    def pay(self, record: ThreadRecord, payer: Address, amount: Assets) -> None:
        payment_id = self.next_id
        self.next_id += 1
        end = record.link.ends[payer]
        result = self.act(record.link, end, ActionPay(payment_id, amount))
        if result.rejection is not None:
            self.stats[f"pay rejected: {result.rejection.reason.name}"] += 1
        else:
            self.payments[payment_id] = PaymentRecord(record.key, payer, amount)

    def close_thread(self, record: ThreadRecord, by: Address, force: bool = False) -> None:
        """Close `record`; `force` is for a peer that is gone: the link is cut for good."""
        record.close_requested = True
        if force:
            record.forced = True
            record.link.drop_in_flight()
        self.act(record.link, record.link.ends[by], ActionCloseThread(force))
        if force:
            record.link.drop_in_flight()

    # ------------------------------------------------------------ reactions (node and hub)

    def _react(self, link: Link, end: End, effect: object) -> None:
        if isinstance(link.record, ChannelRecord):
            self._on_channel(link.record, end, effect)
        else:
            self._on_thread(link.record, end, effect)

    def _advance(self, end: End, nonce: int, what: str) -> None:
        last = self.event_nonce.get(id(end), 0)
        if nonce <= last:
            self.problems.append(f"{what} at nonce {nonce} after {last} on {end.address}")
        self.event_nonce[id(end)] = max(last, nonce)

    def _on_channel(self, record: ChannelRecord, end: End, effect: object) -> None:
        hub = end is record.hub_end
        if isinstance(effect, ContractSendAuthorizedUpdate):
            # The user submits its own deposits (its transaction carries them), the hub the rest.
            user_deposit = not effect.latest.state.pending_deposit_user.is_zero()
            if hub == user_deposit:
                self.problems.append(f"the wrong party submits {effect.latest.state}")
            self.submissions.append((record.user, effect.latest))
        elif isinstance(effect, EventChannelSynced):
            self._advance(end, effect.latest.state.tx_count_global, "channel sync")
            if hub:
                self.problems.append("the hub adopted a synced state it did not propose")
        elif isinstance(effect, EventChannelUpdated):
            self._advance(end, effect.latest.state.tx_count_global, "channel update")
            self.stats[f"channel update: {type(effect.update).__name__}"] += hub
            if hub:
                self._hub_updated(record, effect)
            elif isinstance(effect.update, UpdateOpenThread):
                opened = self.threads[effect.update.initial.key]
                self.act(opened.link, opened.link.ends[record.user], ActionConfirmLock())
        elif isinstance(effect, EventUpdateFailed):
            self.stats[f"update failed: {effect.reason.name}"] += 1
            if hub:
                self._hub_update_failed(record, effect.update, effect.reason)

    def _hub_updated(self, record: ChannelRecord, event: EventChannelUpdated) -> None:
        prev = record.hub_prev
        assert prev is not None
        record.hub_prev = event.latest.state
        update = event.update
        if isinstance(update, UpdatePayment):
            if update.payer is Party.USER:
                self.hub_flow = plus(self.hub_flow, vec(update.amount))
                if update.forward_to != ZERO_ADDRESS:
                    leg = UpdatePayment(Party.HUB, update.amount, ZERO_ADDRESS)
                    self.propose(update.forward_to, Party.HUB, leg)
            else:
                self.hub_flow = minus(self.hub_flow, vec(update.amount))
        elif isinstance(update, UpdateConfirmPending):
            moved = minus(vec(prev.pending_deposit_hub), vec(prev.pending_withdrawal_hub))
            self.hub_flow = plus(self.hub_flow, moved)
        elif isinstance(update, UpdateOpenThread):
            opened = self.threads[update.initial.key]
            if record.user == opened.initial.receiver:
                opened.status = "locking"
                lock = UpdateOpenThread(update.initial, update.sig_sender, update.sig_receiver)
                self.propose(opened.initial.sender, Party.HUB, lock)
            else:
                opened.status = "open"
        elif isinstance(update, UpdateCloseThread):
            closed = self.threads[update.final.key]
            moved = minus(
                vec(hub_part(update.final, record.user)),
                vec(hub_part(closed.initial, record.user)),
            )
            closed.close_delta = plus(closed.close_delta, moved)
            closed.closed_in.add(record.user)
            if closed.status == "refunding":
                closed.status = "refunded"
            elif len(closed.closed_in) == 2:
                closed.status = "closed"

    def _hub_update_failed(
        self, record: ChannelRecord, update: ChannelUpdate, reason: RejectReason
    ) -> None:
        if isinstance(update, UpdatePayment) and update.payer is Party.HUB:
            self.stats["routed leg failed"] += 1
        elif isinstance(update, UpdateOpenThread):
            failed = self.threads[update.initial.key]
            if record.user == failed.initial.receiver:
                failed.status = "failed"
            else:
                failed.status = "refunding"
                refund = UpdateCloseThread(update.initial, update.sig_sender, update.sig_receiver)
                self.propose(failed.initial.receiver, Party.HUB, refund)
        elif isinstance(update, UpdateCloseThread):
            closing = self.threads[update.final.key]
            if closing.forced and reason is RejectReason.STALE_THREAD_STATE:
                closing.status = "disputed"  # the user holds a newer state: on-chain dispute
            else:
                self.problems.append(f"the hub could not settle a thread: {reason.name}")

    def _on_thread(self, record: ThreadRecord, end: End, effect: object) -> None:
        me = end.address
        if isinstance(effect, EventThreadAgreed):
            if me == record.initial.sender and record.status == "proposed":
                record.status = "agreed"
                initial = effect.initial
                lock = UpdateOpenThread(initial.state, initial.sig_sender, initial.sig_receiver)
                self.propose(record.initial.receiver, Party.HUB, lock)
        elif isinstance(effect, EventThreadOpenRefused):
            record.status = "refused"
        elif isinstance(effect, EventPaymentSent):
            self._advance(end, effect.tx_count, "payment sent")
            self._report(effect.payment_id, effect)
            record.sent[me] = plus(record.sent.get(me, ZERO), vec(effect.amount))
        elif isinstance(effect, EventPaymentReceived):
            self._advance(end, effect.tx_count, "payment received")
            record.received[me] = plus(record.received.get(me, ZERO), vec(effect.amount))
        elif isinstance(effect, EventPaymentFailed):
            self.stats[f"payment failed: {effect.reason.name}"] += 1
            self._report(effect.payment_id, effect)
        elif isinstance(effect, EventThreadFinal):
            record.finals[me] = effect.final
            if record.status == "open" and (record.forced or len(record.finals) == 2):
                a, *rest = record.finals.values()
                if rest and rest[0] != a and not record.forced:
                    self.problems.append(f"thread {record.key} final states differ: {a} / {rest}")
                record.status = "settling"
                close = UpdateCloseThread(a.state, a.sig_sender, a.sig_receiver)
                self.propose(record.initial.receiver, Party.HUB, close)
                self.propose(record.initial.sender, Party.HUB, close)

    def _report(self, payment_id: int, event: object) -> None:
        payment = self.payments.get(payment_id)
        if payment is None:
            self.problems.append(f"report of unknown payment {payment_id}: {event}")
            return
        payment.reports.append(event)
        if len(payment.reports) > 1:
            self.problems.append(f"payment {payment_id} reported twice: {payment.reports}")

    # ------------------------------------------------------------ signature bookkeeping

    def index_message(self, message: object) -> None:
        """Map the digest of every state in `message` to its (kind, key, nonce) slot."""
        if isinstance(message, ChannelProposal):
            self._index_channel(message.state)
            if isinstance(message.update, UpdateOpenThread):
                self._index_thread(message.update.initial)
            elif isinstance(message.update, UpdateCloseThread):
                self._index_thread(message.update.final)
        elif isinstance(message, ChannelSync):
            self._index_channel(message.state)
            for t in message.threads:
                self._index_thread(t.state)
        elif isinstance(message, ThreadOpenProposal):
            self._index_thread(message.initial)
        elif isinstance(message, ThreadProposal):
            self._index_thread(message.state)
        elif isinstance(message, ThreadSync):
            self._index_thread(message.latest.state)

    def _index_channel(self, state: ChannelState) -> None:
        if state not in self.indexed:
            self.indexed.add(state)
            slot = ("channel", state.user, state.tx_count_global)
            self.slots[channel_state_digest(DOMAIN, state)] = slot

    def _index_thread(self, state: ThreadState) -> None:
        if state not in self.indexed:
            self.indexed.add(state)
            self.slots[thread_state_digest(DOMAIN, state)] = ("thread", state.key, state.tx_count)

    # ------------------------------------------------------------ invariants

    def check(self) -> None:
        assert not self.problems, self.problems
        self.check_signatures()
        self.check_channels()
        self.check_hub()
        self.check_threads()
        if self.quiet():
            self.check_quiet()

    def check_signatures(self) -> None:
        """No signer signed two different states for one (channel or thread, nonce)."""
        for address, signer in self.signers.items():
            slots = self.signed_slots[address]
            for digest in signer.digests[self.signed_checked[address] :]:
                slot = self.slots.get(digest)
                assert slot is not None, f"{address} signed a state no message carried"
                previous = slots.setdefault(slot, digest)
                assert previous == digest, f"{address} signed two states for {slot}"
            self.signed_checked[address] = len(signer.digests)

    def _check_latest_nonce(self, end: End, nonce: int) -> None:
        last = self.latest_nonce.get(id(end), 0)
        assert nonce >= last, f"latest nonce of {end.address} went back from {last} to {nonce}"
        self.latest_nonce[id(end)] = nonce

    def check_channels(self) -> None:
        for record in self.channels.values():
            hub, user = record.hub_end.state, record.user_end.state
            for end in (record.hub_end, record.user_end):
                self._check_latest_nonce(end, end.state.latest.state.tx_count_global)
            h, u = hub.latest.state, user.latest.state
            if h.tx_count_global == u.tx_count_global:
                assert h == u, f"same nonce, different channel states:\n{h}\n{u}"
            lead = hub if h.tx_count_global >= u.tx_count_global else user
            state = lead.latest.state
            assert state.thread_count == len(lead.threads)
            assert state.thread_root == thread_root(t.state for t in lead.threads)
            held = state.balance_hub + state.balance_user
            for t in lead.threads:
                held += t.state.total()
            if state.has_pending() and record.onchain >= state.tx_count_onchain:
                held += state.pending_deposit_hub + state.pending_deposit_user
            else:
                held += state.pending_withdrawal_hub + state.pending_withdrawal_user
            assert held + record.withdrawn == record.deposited, (
                f"channel of {record.user} holds {held}, ledger has {record.deposited} "
                f"in and {record.withdrawn} out; state {state}"
            )

    def check_hub(self) -> None:
        """The hub's position moves only by its deposits, withdrawals and routed legs."""
        total = ZERO
        for record in self.channels.values():
            state = record.hub_end.state.latest.state
            total = plus(total, vec(state.balance_hub + state.pending_withdrawal_hub))
            for t in record.hub_end.state.threads:
                total = plus(total, vec(hub_part(t.state, record.user)))
        expected = self.hub_flow
        for t in self.threads.values():
            expected = plus(expected, t.close_delta)
            if t.status in ("closed", "refunded"):
                assert t.close_delta == ZERO, f"settling thread {t.key} moved the hub's money"
        assert total == expected, f"hub holds {total}, expected {expected}"

    def check_threads(self) -> None:
        for record in self.threads.values():
            for address, end in record.link.ends.items():
                side: ThreadSide | None = end.state
                if side is None or side.latest is None:
                    continue
                latest = side.latest.state
                self._check_latest_nonce(end, latest.tx_count)
                assert latest.total() == record.initial.total()
                assert side.queued_total == sum((q.amount for q in side.queued), Assets())
                assert side.tip().balance_of(address).covers(side.queued_total)
                for o in side.outgoing:
                    assert o.state.total() == record.initial.total()
                expected = minus(
                    plus(
                        vec(record.initial.balance_of(address)), record.received.get(address, ZERO)
                    ),
                    record.sent.get(address, ZERO),
                )
                assert vec(latest.balance_of(address)) == expected, (
                    f"{address}'s balance in thread {record.key} is {latest.balance_of(address)}, "
                    f"its events say {expected}"
                )

    def check_quiet(self) -> None:
        """Once nothing is in flight: both ends agree and nothing is left undone."""
        for record in self.channels.values():
            hub, user = record.hub_end.state, record.user_end.state
            assert hub.latest == user.latest, f"channel of {record.user} did not converge"
            assert hub.threads == user.threads
            for side in (hub, user):
                assert side.outgoing is None and not side.queued, f"{side.role} stuck: {side}"
                assert not side.holding and not side.in_conflict, f"{side.role} stuck: {side}"
        for record in self.threads.values():
            a = record.side(record.initial.sender)
            b = record.side(record.initial.receiver)
            assert a is not None
            assert a.phase is not ThreadPhase.PROPOSED, f"thread {record.key} never answered"
            if record.forced:
                continue  # the peer may be left closing, with states the forcer never saw
            sides = [s for s in (a, b) if s is not None]
            for side in sides:
                assert not side.outgoing and not side.queued, f"thread side stuck: {side}"
                assert not side.holding and not side.in_conflict, f"thread side stuck: {side}"
                assert side.phase is not ThreadPhase.CLOSING, f"thread close stuck: {side}"
            if b is not None and a.latest is not None and b.latest is not None:
                assert a.latest == b.latest, f"thread {record.key} did not converge"
            a_addr, b_addr = record.initial.sender, record.initial.receiver
            assert record.sent.get(a_addr, ZERO) == record.received.get(b_addr, ZERO)
            assert record.sent.get(b_addr, ZERO) == record.received.get(a_addr, ZERO)
        for payment_id, payment in self.payments.items():
            if not self.threads[payment.key].forced:
                assert len(payment.reports) == 1, f"payment {payment_id}: {payment.reports}"
