"""In-process simulation: a hub and N users run the protocol state machines end to end.

Nothing here touches a network or a chain: messages travel through in-memory links in a
random (seeded) order, and a small ledger stands in for the ChannelManager contract. Every
signature is real. The run deposits, collateralizes, opens threads between pairs of users,
pays both ways over every thread with proposals in flight on both sides, closes the threads,
withdraws everything and checks that every wei and token unit is accounted for.

    weft sim [--users 3] [--payments 300] [--seed 1]

Exit status 0 when every balance matches, 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from protocols import channel as ch
from protocols import roles
from protocols import thread as th
from protocols.effects import Receive, Send
from protocols.eip712 import Domain
from protocols.keccak import keccak
from protocols.messages import Message
from protocols.signing import Signer
from protocols.types import Address, Assets, Party, ThreadKey

CHAIN_ID = 1337
PENDING_TIMEOUT = 600


class SimulationError(Exception):
    """A step the simulation expected to succeed was refused."""


@dataclass
class Ledger:
    """What the contract would hold: per channel, net assets and the last executed txCount."""

    held: dict[Address, Assets] = field(default_factory=lambda: defaultdict(Assets))
    onchain: dict[Address, int] = field(default_factory=lambda: defaultdict(int))
    paid_out: dict[Address, Assets] = field(default_factory=lambda: defaultdict(Assets))
    now: int = 1_000

    def execute(self, latest: ch.SignedChannelState) -> None:
        """Execute an authorized update the way the contract will (SPEC.md, on-chain rules)."""
        state = latest.state
        if state.tx_count_onchain <= self.onchain[state.user]:
            raise SimulationError("stale tx_count_onchain")
        if self.now >= state.timeout:
            raise SimulationError("pending update timed out")
        self.onchain[state.user] = state.tx_count_onchain
        held = self.held[state.user] + state.pending_deposit_hub + state.pending_deposit_user
        out = state.pending_withdrawal_hub + state.pending_withdrawal_user
        self.held[state.user] = held - out
        self.paid_out[state.recipient] += state.pending_withdrawal_user
        self.paid_out[Address(b"\xff" * 20)] += state.pending_withdrawal_hub  # the hub's reserve


@dataclass
class Node:
    signer: Signer
    state: roles.NodeState
    done: dict[int, roles.EventOpDone | roles.EventOpFailed] = field(default_factory=dict)

    @property
    def address(self) -> Address:
        return self.signer.address

    @property
    def channels(self) -> Mapping[Address, ch.ChannelSide]:
        return self.state.channels

    @property
    def threads(self) -> Mapping[ThreadKey, th.ThreadSide]:
        return self.state.threads


class World:
    """A hub, its users, their links (FIFO per direction) and the ledger.

    Every node is one `protocols.roles` machine: the scenario only makes requests (deposit,
    open a thread, pay, close, withdraw) and delivers messages; the hub's coordination is
    the hub's own.
    """

    def __init__(self, users: int, seed: int) -> None:
        self.rng = random.Random(seed)

        def key(label: str) -> bytes:
            return keccak(f"weft-sim/{seed}/{label}".encode())

        self.domain = Domain(CHAIN_ID, Address(keccak(b"weft-sim-contract")[12:]))
        hub_signer = Signer(key("hub"))
        self.hub = self._node(hub_signer, Party.HUB, hub_signer.address)
        self.users = [
            self._node(Signer(key(f"user{i}")), Party.USER, hub_signer.address)
            for i in range(users)
        ]
        self.nodes = {n.address: n for n in (self.hub, *self.users)}
        self.links: dict[tuple[Address, Address], list[Message]] = defaultdict(list)
        self.ledger = Ledger()
        self.sent: dict[Address, Assets] = defaultdict(Assets)
        self.received: dict[Address, Assets] = defaultdict(Assets)
        self.payments_done = 0
        self.payments_failed = 0
        self.next_op = 0
        self.block(self.ledger.now)

    def _node(self, signer: Signer, role: Party, hub: Address) -> Node:
        config = roles.NodeConfig(self.domain, role, signer.address, hub)
        return Node(signer, roles.new_node(config))

    # -- stepping machines and routing their effects

    def step(self, node: Node, event: roles.NodeInput) -> None:
        result = roles.node_step(node.state, event, node.signer)
        node.state = result.state
        self.route(node, result.effects)

    def block(self, timestamp: int) -> None:
        self.ledger.now = timestamp
        for node in self.nodes.values():
            self.step(node, ch.ContractReceiveBlock(timestamp))

    def route(self, node: Node, effects: tuple[object, ...]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                self.links[(node.address, effect.to)].append(effect.message)
            elif isinstance(effect, ch.ContractSendAuthorizedUpdate):
                self.ledger.execute(effect.latest)
                user = effect.latest.state.user
                executed = ch.ContractReceiveChannelUpdated(
                    user, effect.latest.state.tx_count_onchain
                )
                for party in (self.hub, self.nodes[user]):
                    self.step(party, executed)
            elif isinstance(effect, th.EventPaymentSent):
                self.sent[node.address] += effect.amount
                self.payments_done += 1
            elif isinstance(effect, th.EventPaymentReceived):
                self.received[node.address] += effect.amount
            elif isinstance(effect, th.EventPaymentFailed):
                self.payments_failed += 1
            elif isinstance(effect, roles.EventOpDone | roles.EventOpFailed):
                node.done[effect.op_id] = effect

    def deliver_one(self, link: tuple[Address, Address]) -> None:
        sender, receiver = link
        message = self.links[link].pop(0)
        self.step(self.nodes[receiver], Receive(sender, message))

    def deliver_some(self) -> None:
        """Deliver a random number of messages on random links (proposals cross)."""
        busy = [link for link, queue in self.links.items() if queue]
        for link in self.rng.sample(busy, k=len(busy)):
            for _ in range(self.rng.randint(0, len(self.links[link]))):
                self.deliver_one(link)

    def drain(self) -> None:
        for _ in range(1_000_000):
            busy = [link for link, queue in self.links.items() if queue]
            if not busy:
                return
            self.deliver_one(self.rng.choice(busy))
        raise SimulationError("links did not go quiet")

    def request(self, node: Node, make: Callable[[int], roles.NodeInput]) -> roles.EventOpDone:
        """Make a request of `node`, run the network until it is answered, return the answer."""
        self.next_op += 1
        op_id = self.next_op
        self.step(node, make(op_id))
        self.drain()
        outcome = node.done.pop(op_id, None)
        if outcome is None:
            raise SimulationError(f"request {op_id} of {node.address} never completed")
        if isinstance(outcome, roles.EventOpFailed):
            raise SimulationError(
                f"{node.address}: request failed: {outcome.reason.name}: {outcome.detail}"
            )
        return outcome

    # -- the scenario's steps

    def deposit(self, user: Node, amount: Assets) -> None:
        self.request(user, lambda op: roles.ActionDeposit(op, amount))

    def collateralize(self, user: Node, amount: Assets) -> None:
        self.step(self.hub, roles.ActionCollateralize(user.address, amount))
        self.drain()
        have = self.hub.channels[user.address].latest.state.balance_hub
        if not have.covers(amount):
            raise SimulationError(f"hub collateral in {user.address} is {have}, not {amount}")

    def withdraw_all(self, user: Node, recipient: Address) -> None:
        state = user.channels[user.address].latest.state
        amount = state.balance_user
        self.request(user, lambda op: roles.ActionWithdraw(op, amount, recipient))
        hub_balance = self.hub.channels[user.address].latest.state.balance_hub
        if not hub_balance.is_zero():
            self.step(self.hub, roles.ActionReclaimCollateral(user.address, hub_balance))
            self.drain()

    def open_thread(self, a: Node, b: Node, lock_a: Assets, lock_b: Assets) -> ThreadKey:
        done = self.request(a, lambda op: roles.ActionOpenThread(op, b.address, lock_a, lock_b))
        assert done.key is not None
        if b.threads[done.key].phase is not th.ThreadPhase.OPEN:
            raise SimulationError("the receiver's side of the thread is not open")
        return done.key

    def close_thread(self, a: Node, key: ThreadKey) -> None:
        self.request(a, lambda op: roles.ActionCloseThread(op, key))


def progress(done: int, total: int, started: float) -> None:
    width = 30
    filled = width * done // max(total, 1)
    rate = done / max(time.perf_counter() - started, 1e-9)
    sys.stderr.write(
        f"\r  payments [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {rate:,.0f}/s"
    )
    sys.stderr.flush()


def run(users: int, payments: int, seed: int) -> int:
    world = World(users, seed)
    deposit_user = Assets(10**18, 10**21)
    collateral = Assets(10**18, 10**21)
    print(f"weft sim: hub {world.hub.address} and {users} users, seed {seed}")

    for user in world.users:
        world.deposit(user, deposit_user)
        world.collateralize(user, collateral)
    print(
        f"  deposited {deposit_user.eth} wei + {deposit_user.token} token units per user, "
        "the hub collateralized each channel with the same"
    )

    lock = Assets(10**17, 10**20)
    pairs = [(world.users[i], world.users[(i + 1) % users]) for i in range(users)]
    keys = [world.open_thread(a, b, lock, lock) for a, b in pairs]
    print(
        f"  opened {len(keys)} threads (each side locks {lock.eth} wei + {lock.token} token units)"
    )

    started = time.perf_counter()
    requested = 0
    payment_id = 0
    while requested < payments:
        (a, b), key = world.rng.choice(list(zip(pairs, keys, strict=True)))
        payer = world.rng.choice((a, b))
        amount = Assets(world.rng.randint(0, 10**12), world.rng.randint(1, 10**15))
        payment_id += 1
        failed_before = world.payments_failed
        world.step(payer, roles.ActionPayThread(key, payment_id, amount))
        if world.payments_failed == failed_before:
            requested += 1
        world.deliver_some()
        if requested % 50 == 0:
            progress(world.payments_done, payments, started)
    world.drain()
    elapsed = time.perf_counter() - started
    progress(world.payments_done, payments, started)
    sys.stderr.write("\n")
    print(
        f"  {world.payments_done} thread payments in {elapsed:.2f} s "
        f"({world.payments_done / elapsed:,.0f}/s through the state machines, with signatures), "
        f"{world.payments_failed} failed"
    )

    for (a, _), key in zip(pairs, keys, strict=True):
        world.close_thread(a, key)
    print(f"  closed {len(keys)} threads; the hub settled both channels of each")

    recipients = {
        u.address: Address(keccak(b"recipient" + u.address.raw)[12:]) for u in world.users
    }
    for user in world.users:
        world.block(world.ledger.now + 15)
        world.withdraw_all(user, recipients[user.address])

    return verify(world, deposit_user, collateral, recipients)


def verify(
    world: World, deposit: Assets, collateral: Assets, recipients: dict[Address, Address]
) -> int:
    mismatches = []
    print(f"  {'user':<44} {'withdrawn wei':>22} {'withdrawn token':>26}")
    for user in world.users:
        expected = deposit + world.received[user.address] - world.sent[user.address]
        got = world.ledger.paid_out[recipients[user.address]]
        flag = "ok" if got == expected else "MISMATCH"
        print(f"  {user.address!s:<44} {got.eth:>22} {got.token:>26} {flag}")
        if got != expected:
            mismatches.append(f"{user.address}: expected {expected}, withdrew {got}")
        for side in (user.channels[user.address], world.hub.channels[user.address]):
            state = side.latest.state
            if not (
                state.balance_hub.is_zero()
                and state.balance_user.is_zero()
                and state.thread_count == 0
            ):
                mismatches.append(f"{user.address}: channel not empty at the end")
        if not world.ledger.held[user.address].is_zero():
            mismatches.append(
                f"{user.address}: contract still holds {world.ledger.held[user.address]}"
            )
    for node in world.nodes.values():
        if node.threads or node.state.coordination.ops or node.state.coordination.openings:
            mismatches.append(f"{node.address}: work left over at the end")
    hub_out = world.ledger.paid_out[Address(b"\xff" * 20)]
    hub_in = Assets(collateral.eth * len(world.users), collateral.token * len(world.users))
    print(
        f"  hub: collateral in {hub_in.eth} wei + {hub_in.token} token units, "
        f"out {hub_out.eth} wei + {hub_out.token} token units"
    )
    if hub_out != hub_in:
        mismatches.append(f"hub: put in {hub_in}, took out {hub_out}")
    if world.payments_done == 0:
        mismatches.append("no payment went through")
    for line in mismatches:
        print(f"  MISMATCH: {line}")
    print("  every balance matches" if not mismatches else f"  {len(mismatches)} mismatches")
    return 1 if mismatches else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="weft sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=3, help="number of users (>= 2)")
    parser.add_argument("--payments", type=int, default=300, help="thread payments to make")
    parser.add_argument("--seed", type=int, default=1, help="seed of keys and interleavings")
    args = parser.parse_args(argv)
    if args.users < 2:
        parser.error("--users must be at least 2")
    if not 0 < args.payments <= 1_000_000:
        parser.error("--payments must be in 1..1000000")
    try:
        return run(args.users, args.payments, args.seed)
    except SimulationError as exc:
        print(f"weft sim: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
