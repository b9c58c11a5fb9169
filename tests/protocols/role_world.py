"""An in-memory world of whole nodes (`protocols.roles`): one hub, some users, FIFO links.

Every node is one `roles.NodeState` advanced only by `roles.node_step`, with real keys and
real signatures. The world plays what surrounds the nodes: links (one FIFO queue per
direction, delivered in a deterministic or a seeded random order, and cut or emptied on
demand) and the chain (a small ledger standing in for the ChannelManager contract, which
executes an authorized update only when a test says so, or at once with `auto_chain`).

Every step also checks the transition's bookkeeping against the old and the new state
(`check_bookkeeping`): `changed_channels` and `changed_threads` name every channel and
thread whose value changed and none that is still the same object, `removed_threads` exactly
the threads that are gone, `coordination_changed` whether the coordination was replaced.
"""

from __future__ import annotations

import random
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from protocols import channel as ch
from protocols import roles
from protocols.effects import Receive, Send
from protocols.eip712 import Domain
from protocols.keccak import keccak
from protocols.messages import Message
from protocols.signing import Signer
from protocols.types import NO_ASSETS, Address, Assets, ChannelState, Party

DOMAIN = Domain(chain_id=1337, verifying_contract=Address(keccak(b"role-world")[12:]))
START = 1_000  # the first block's timestamp
RUN_LIMIT = 5_000  # deliveries before a run counts as a livelock

T = TypeVar("T")


def signer_for(label: str) -> Signer:
    return Signer(keccak(f"role-world/{label}".encode()))


class ChainError(Exception):
    """The ledger would not execute a submitted state (as the contract would revert)."""


@dataclass
class Ledger:
    """What the contract holds per channel, and the last executed txCountOnchain."""

    held: dict[Address, Assets] = field(default_factory=lambda: defaultdict(Assets))
    onchain: dict[Address, int] = field(default_factory=lambda: defaultdict(int))
    paid_out: dict[Address, Assets] = field(default_factory=lambda: defaultdict(Assets))
    now: int = START

    def execute(self, latest: ch.SignedChannelState) -> None:
        state = latest.state
        if latest.sig_hub is None or latest.sig_user is None:
            raise ChainError("not double-signed")
        if state.tx_count_onchain <= self.onchain[state.user]:
            raise ChainError("stale txCountOnchain")
        if self.now >= state.timeout:
            raise ChainError("update timed out")
        self.onchain[state.user] = state.tx_count_onchain
        held = self.held[state.user] + state.pending_deposit_hub + state.pending_deposit_user
        out = state.pending_withdrawal_hub + state.pending_withdrawal_user
        self.held[state.user] = held - out
        self.paid_out[state.recipient] += state.pending_withdrawal_user


@dataclass(eq=False)
class RoleNode:
    """One node: its key, its state, what it emitted, every input it was given."""

    name: str
    signer: Signer
    state: roles.NodeState
    start: roles.NodeState
    events: list[object] = field(default_factory=list)  # every effect but Send, in order
    inputs: list[Any] = field(default_factory=list)
    transitions: list[roles.NodeTransition] = field(default_factory=list)

    @property
    def address(self) -> Address:
        return self.signer.address

    def of(self, kind: type[T]) -> list[T]:
        return [e for e in self.events if isinstance(e, kind)]

    def channel(self, user: Address | None = None) -> ch.ChannelSide:
        return self.state.channels[user if user is not None else self.address]

    def latest(self, user: Address | None = None) -> ChannelState:
        return self.channel(user).latest.state

    def outcome(self, op_id: int) -> roles.EventOpDone | roles.EventOpFailed | None:
        found = [
            e
            for e in self.events
            if isinstance(e, roles.EventOpDone | roles.EventOpFailed) and e.op_id == op_id
        ]
        assert len(found) <= 1, f"op {op_id} answered {len(found)} times: {found}"
        return found[0] if found else None


def check_bookkeeping(old: roles.NodeState, t: roles.NodeTransition) -> None:
    """The transition names what changed between the old and the new state: every channel
    and thread whose value changed, and none that is still the very same object (a machine
    may hand back an equal copy, e.g. on a repeated conflict: persisting it is harmless)."""
    new = t.state
    assert new.config is old.config
    assert set(old.channels) <= set(new.channels), "a channel disappeared"
    changed = {u for u in new.channels if old.channels.get(u) != new.channels[u]}
    touched = {u for u in new.channels if old.channels.get(u) is not new.channels[u]}
    assert changed <= t.changed_channels <= touched, (t.changed_channels, changed, touched)
    removed = set(old.threads) - set(new.threads)
    assert t.removed_threads == removed, (t.removed_threads, removed)
    changed_threads = {k for k in new.threads if old.threads.get(k) != new.threads[k]}
    touched_threads = {k for k in new.threads if old.threads.get(k) is not new.threads[k]}
    assert changed_threads <= t.changed_threads <= touched_threads, (
        t.changed_threads,
        changed_threads,
        touched_threads,
    )
    assert t.coordination_changed == (old.coordination is not new.coordination)
    if old.coordination != new.coordination:
        assert t.coordination_changed


def check_exact_bookkeeping(old: roles.NodeState, t: roles.NodeTransition) -> None:
    """As `check_bookkeeping`, and nothing named that is equal to what it was."""
    check_bookkeeping(old, t)
    new = t.state
    assert t.changed_channels == {u for u in new.channels if old.channels.get(u) != new.channels[u]}
    assert t.changed_threads == {k for k in new.threads if old.threads.get(k) != new.threads[k]}
    assert t.coordination_changed == (old.coordination != new.coordination)


class RoleWorld:
    """A hub and users joined by FIFO links, and a ledger for the chain."""

    def __init__(
        self,
        users: Iterable[str] = ("a", "b"),
        *,
        hub_config: dict[str, Any] | None = None,
        user_config: dict[str, dict[str, Any]] | None = None,
        auto_chain: bool = True,
        seed: int | None = None,
    ) -> None:
        self.rng = random.Random(seed) if seed is not None else None
        self.auto_chain = auto_chain
        hub_signer = signer_for("hub")
        self.hub = self._node("hub", hub_signer, Party.HUB, hub_signer.address, hub_config or {})
        self.u: dict[str, RoleNode] = {}
        for name in users:
            config = (user_config or {}).get(name, {})
            self.u[name] = self._node(
                name, signer_for(name), Party.USER, hub_signer.address, config
            )
        self.nodes: dict[Address, RoleNode] = {n.address: n for n in (self.hub, *self.u.values())}
        self.links: dict[tuple[Address, Address], deque[Message]] = defaultdict(deque)
        self.down: set[tuple[Address, Address]] = set()  # messages sent on these are lost
        # Every message sent (messages to an address with no node are lost).
        self.trace: list[tuple[Address, Address, Message]] = []
        self.chain: list[ch.ContractSendAuthorizedUpdate] = []  # submitted, not executed
        self.submitted: list[ch.ContractSendAuthorizedUpdate] = []  # every submission
        self.ledger = Ledger()
        self.next_op = 0
        self.block(START)

    def _node(
        self, name: str, signer: Signer, role: Party, hub: Address, extra: dict[str, Any]
    ) -> RoleNode:
        config = roles.NodeConfig(DOMAIN, role, signer.address, hub, **extra)
        state = roles.new_node(config)
        return RoleNode(name, signer, state, state)

    # -- stepping

    def step(self, node: RoleNode, event: Any) -> roles.NodeTransition:
        old = node.state
        result = roles.node_step(old, event, node.signer)
        check_bookkeeping(old, result)
        node.state = result.state
        node.inputs.append(event)
        node.transitions.append(result)
        self.route(node, result.effects)
        return result

    def route(self, node: RoleNode, effects: tuple[object, ...]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                self.trace.append((node.address, effect.to, effect.message))
                if effect.to in self.nodes and (node.address, effect.to) not in self.down:
                    self.links[(node.address, effect.to)].append(effect.message)
            else:
                node.events.append(effect)
                if isinstance(effect, ch.ContractSendAuthorizedUpdate):
                    self.chain.append(effect)
                    self.submitted.append(effect)

    def new_op(self) -> int:
        """A fresh op id (unique in the world)."""
        self.next_op += 1
        return self.next_op

    def op(self, node: RoleNode, make: Any) -> int:
        """Step `node` with the request `make(op_id)`; return the op id."""
        op_id = self.new_op()
        self.step(node, make(op_id))
        return op_id

    def receive(self, node: RoleNode, sender: Address, message: Message) -> roles.NodeTransition:
        """Hand `node` a message as if `sender` sent it (a hostile or crafted message)."""
        return self.step(node, Receive(sender, message))

    # -- links

    def busy(self) -> list[tuple[Address, Address]]:
        return [link for link, queue in self.links.items() if queue]

    def deliver_one(self, link: tuple[Address, Address]) -> None:
        sender, receiver = link
        message = self.links[link].popleft()
        self.step(self.nodes[receiver], Receive(sender, message))

    def deliver(self, src: RoleNode, dst: RoleNode, count: int | None = None) -> int:
        """Deliver up to `count` (all if None) messages queued from `src` to `dst`."""
        link = (src.address, dst.address)
        done = 0
        while self.links[link] and (count is None or done < count):
            self.deliver_one(link)
            done += 1
        return done

    def pending(self, src: RoleNode, dst: RoleNode) -> list[Message]:
        return list(self.links[(src.address, dst.address)])

    def drop(self, src: RoleNode, dst: RoleNode) -> list[Message]:
        """Lose the messages queued from `src` to `dst`; return them."""
        link = (src.address, dst.address)
        lost = list(self.links[link])
        self.links[link].clear()
        return lost

    def cut(self, a: RoleNode, b: RoleNode) -> None:
        """Lose everything in flight between `a` and `b`, and what they send until `heal`."""
        for link in ((a.address, b.address), (b.address, a.address)):
            self.links[link].clear()
            self.down.add(link)

    def heal(self, a: RoleNode, b: RoleNode) -> None:
        """A new stream between `a` and `b`: both are told and resync."""
        self.down.discard((a.address, b.address))
        self.down.discard((b.address, a.address))
        self.step(a, roles.ActionPeerReconnected(b.address))
        self.step(b, roles.ActionPeerReconnected(a.address))

    def run(self, limit: int = RUN_LIMIT) -> int:
        """Deliver until every link is quiet (and, with `auto_chain`, the chain too).

        Deterministic: the first busy link (in order of first use) goes first; with a seed,
        a random busy link. Returns the number of deliveries.
        """
        deliveries = 0
        while True:
            busy = self.busy()
            if busy:
                link = self.rng.choice(busy) if self.rng is not None else busy[0]
                self.deliver_one(link)
                deliveries += 1
                if deliveries > limit:
                    raise AssertionError("the links did not go quiet (a reply loop?)")
            elif self.auto_chain and self.chain:
                self.execute()
            else:
                return deliveries

    # -- chain

    def block(self, timestamp: int) -> None:
        self.ledger.now = timestamp
        for node in self.nodes.values():
            self.step(node, ch.ContractReceiveBlock(timestamp))

    def execute(self, index: int = 0) -> ch.SignedChannelState:
        """Execute the submitted update `index` on the ledger; both parties see the event."""
        submission = self.chain.pop(index)
        latest = submission.latest
        self.ledger.execute(latest)
        user = latest.state.user
        event = ch.ContractReceiveChannelUpdated(user, latest.state.tx_count_onchain)
        for party in (self.hub, self.nodes[user]):
            self.step(party, event)
        return latest

    def fail_tx(self, index: int = 0, reason: str = "reverted") -> None:
        """The submitted update `index` was not mined: its submitter is told."""
        submission = self.chain.pop(index)
        state = submission.latest.state
        submitter = self.nodes[state.user] if not state.pending_deposit_user.is_zero() else self.hub
        self.step(
            submitter, roles.ContractReceiveTxFailed(state.user, state.tx_count_onchain, reason)
        )

    # -- scenario helpers

    def deposit(self, user: RoleNode, amount: Assets) -> int:
        op = self.op(user, lambda i: roles.ActionDeposit(i, amount))
        self.run()
        return op

    def collateralize(self, user: RoleNode, amount: Assets) -> None:
        self.step(self.hub, roles.ActionCollateralize(user.address, amount))
        self.run()

    def fund(self, user: RoleNode, mine: Assets, hub: Assets = NO_ASSETS) -> None:
        """Deposit `mine` for `user` and collateralize its channel with `hub`, to completion."""
        auto = self.auto_chain
        self.auto_chain = True
        if not mine.is_zero():
            op = self.deposit(user, mine)
            assert isinstance(user.outcome(op), roles.EventOpDone), user.outcome(op)
        if not hub.is_zero():
            self.collateralize(user, hub)
        self.auto_chain = auto
        assert self.hub.latest(user.address).balance_user == user.latest().balance_user

    def open_thread(
        self, a: RoleNode, b: RoleNode, lock_a: Assets, lock_b: Assets = NO_ASSETS
    ) -> tuple[int, roles.EventOpDone | roles.EventOpFailed | None]:
        op = self.op(a, lambda i: roles.ActionOpenThread(i, b.address, lock_a, lock_b))
        self.run()
        return op, a.outcome(op)

    def snapshot(self) -> dict[tuple[str, Address], ChannelState]:
        """Every channel's latest state at every node."""
        return {
            (node.name, user): side.latest.state
            for node in self.nodes.values()
            for user, side in node.state.channels.items()
        }

    def agreed(self, user: RoleNode) -> ChannelState:
        """The channel's latest state, which the hub and the user must hold alike."""
        theirs = self.hub.channel(user.address).latest
        mine = user.channel().latest
        assert theirs == mine, "hub and user disagree on the channel's latest state"
        return mine.state


def money(state: ChannelState) -> tuple[Assets, ...]:
    """The balances and pending amounts of a channel state (what a refund must restore)."""
    return (
        state.balance_hub,
        state.balance_user,
        state.pending_deposit_hub,
        state.pending_deposit_user,
        state.pending_withdrawal_hub,
        state.pending_withdrawal_user,
    )
