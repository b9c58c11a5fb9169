"""Gas table: what each ChannelManager function costs, and the composite targets.

    python -m devnet.gas [--json]

Deploys the test token and a ChannelManager on the embedded chain (py-evm through
eth-tester) and runs one scenario in which every amount moved has both assets non-zero
where the row allows it (ETH in wei, the 18-decimal test token in base units). Each row is
the `gasUsed` of one transaction's receipt (21,000 base + calldata + execution, after
refunds), measured in this scenario:

- hubDeposit, first: the hub's first reserve deposit, ETH and tokens (the reserve's slots
  and the contract's token balance go from zero to non-zero); later: the next one.
- hubWithdraw: the hub pays ETH and tokens from its reserve to a fresh recipient.
- userAuthorizedUpdate, ETH/ERC20/both: a user's deposit (msg.value; tokens pulled with
  transferFrom), "fresh" into a channel that never had a record (a zero-to-non-zero record
  hash), "later" into a channel with one.
- hubAuthorizedUpdate, collateral: the hub moves ETH and tokens from its reserve into a
  channel; withdrawal: the user's ETH and tokens paid to a fresh recipient.
- startExit: exit at the on-chain record; startExitWithUpdate: exit at a newer signed
  state that carries one thread; challengeExit: a later state (two threads) replaces the
  one under dispute.
- emptyChannel, no threads: pays the user (both assets) and the hub's share to the reserve
  and reopens the channel; with threads: pays the balances, keeps the threads' locks.
- startThreadExit: a thread dispute at its initial state (proof of two leaves);
  startThreadExitWithUpdate: at a later double-signed state (a one-thread root, empty
  proof); challengeThread: a later double-signed thread state replaces the dispute's.
- settleThread, not last: pays a thread out of a channel that still has another;
  last: pays the channel's last thread and reopens it.
- claim: a payout the recipient (a contract refusing ETH) deferred, claimed by it; the row
  includes that contract's own call around `claim`.

Targets (sums of the rows named; the ratio is gas / target; targets are reported, never
asserted): an ETH deposit <= 46,000 and an ERC20 deposit <= 70,000 (fresh and later
channel each); a unilateral exit without challenge, startExit + emptyChannel (no threads),
<= 195,000; one challenge, challengeExit, <= 113,000; a thread's full exit through its
channel's exit, in one channel: startExitWithUpdate + emptyChannel (with threads) +
startThreadExitWithUpdate + settleThread (last, reopening), <= 470,000.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from eth_tester import EthereumTester, PyEVMBackend
from web3 import Web3
from web3.logs import DISCARD
from web3.providers.eth_tester import EthereumTesterProvider

from protocols.channel import genesis_state
from protocols.eip712 import Domain
from protocols.onchain import ChannelRecord, ThreadDispute, channel_state_abi, thread_state_abi
from protocols.signing import Signer
from protocols.thread_root import thread_leaf, thread_proof, thread_root
from protocols.types import NO_ASSETS, Address, Assets, ChannelState, ThreadState

BUILD_DIR = Path(__file__).resolve().parent.parent / "protocols" / "contracts" / "build"
CHALLENGE_PERIOD = 3600
ETHER = 10**18
TOKEN = 10**18  # one whole test token (18 decimals)

# Function rows, in table order.
HUB_DEPOSIT = "hubDeposit: first"
HUB_DEPOSIT_LATER = "hubDeposit: later"
HUB_WITHDRAW = "hubWithdraw"
DEPOSIT_ETH_FRESH = "userAuthorizedUpdate: ETH deposit, fresh channel"
DEPOSIT_ETH_LATER = "userAuthorizedUpdate: ETH deposit, later"
DEPOSIT_TOKEN_FRESH = "userAuthorizedUpdate: ERC20 deposit, fresh channel"
DEPOSIT_TOKEN_LATER = "userAuthorizedUpdate: ERC20 deposit, later"
DEPOSIT_BOTH = "userAuthorizedUpdate: ETH + ERC20 deposit, fresh channel"
HUB_COLLATERAL = "hubAuthorizedUpdate: collateral from reserve"
HUB_USER_WITHDRAWAL = "hubAuthorizedUpdate: user withdrawal to a recipient"
START_EXIT = "startExit"
START_EXIT_WITH_UPDATE = "startExitWithUpdate"
CHALLENGE_EXIT = "challengeExit"
EMPTY_NO_THREADS = "emptyChannel: no threads"
EMPTY_WITH_THREADS = "emptyChannel: with threads"
START_THREAD_EXIT = "startThreadExit"
START_THREAD_EXIT_WITH_UPDATE = "startThreadExitWithUpdate"
CHALLENGE_THREAD = "challengeThread"
SETTLE_NOT_LAST = "settleThread: not last"
SETTLE_LAST = "settleThread: last, reopening"
CLAIM = "claim (through the refusing contract)"

FUNCTION_ROWS = (
    HUB_DEPOSIT,
    HUB_DEPOSIT_LATER,
    HUB_WITHDRAW,
    DEPOSIT_ETH_FRESH,
    DEPOSIT_ETH_LATER,
    DEPOSIT_TOKEN_FRESH,
    DEPOSIT_TOKEN_LATER,
    DEPOSIT_BOTH,
    HUB_COLLATERAL,
    HUB_USER_WITHDRAWAL,
    START_EXIT,
    START_EXIT_WITH_UPDATE,
    CHALLENGE_EXIT,
    EMPTY_NO_THREADS,
    EMPTY_WITH_THREADS,
    START_THREAD_EXIT,
    START_THREAD_EXIT_WITH_UPDATE,
    CHALLENGE_THREAD,
    SETTLE_NOT_LAST,
    SETTLE_LAST,
    CLAIM,
)


@dataclass(frozen=True)
class Gas:
    """A receipt's gasUsed, and what of it the transaction pays before executing: 21,000
    plus 4 per zero and 16 per non-zero byte of calldata."""

    used: int
    intrinsic: int


@dataclass(frozen=True)
class Target:
    name: str
    parts: tuple[str, ...]
    limit: int


TARGETS = (
    Target("ETH deposit, fresh channel", (DEPOSIT_ETH_FRESH,), 46_000),
    Target("ETH deposit, later", (DEPOSIT_ETH_LATER,), 46_000),
    Target("ERC20 deposit, fresh channel", (DEPOSIT_TOKEN_FRESH,), 70_000),
    Target("ERC20 deposit, later", (DEPOSIT_TOKEN_LATER,), 70_000),
    Target("unilateral exit, no challenge", (START_EXIT, EMPTY_NO_THREADS), 195_000),
    Target("one challenge", (CHALLENGE_EXIT,), 113_000),
    Target(
        "thread exit through a channel exit",
        (START_EXIT_WITH_UPDATE, EMPTY_WITH_THREADS, START_THREAD_EXIT_WITH_UPDATE, SETTLE_LAST),
        470_000,
    ),
)


def artifact(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((BUILD_DIR / f"{name}.json").read_text())
    return data


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Party:
    """A key the chain has unlocked, with its protocol signer."""

    name: str
    key: bytes
    signer: Signer = field(init=False)
    address: Address = field(init=False)

    def __post_init__(self) -> None:
        self.signer = Signer(self.key)
        self.address = self.signer.address

    @property
    def hex(self) -> str:
        return self.address.checksum()


class Chain:
    """The embedded chain with the token and the ChannelManager deployed.

    Tracks every channel's current record and every thread dispute from the contract's
    own events, as a node would, so each call is given what the contract expects.
    """

    def __init__(self, names: Sequence[str]) -> None:
        backend = PyEVMBackend(
            genesis_parameters=PyEVMBackend.generate_genesis_params({"gas_limit": 30_000_000})
        )
        self.tester = EthereumTester(backend)
        self.w3 = Web3(EthereumTesterProvider(self.tester))
        funder = self.w3.eth.accounts[0]
        self.parties = {
            name: Party(name, (0x6A5 * 0x10000 + i).to_bytes(32, "big"))
            for i, name in enumerate(names)
        }
        for party in self.parties.values():
            self.tester.add_account("0x" + party.key.hex())
            self.w3.eth.send_transaction(
                {"from": funder, "to": party.hex, "value": self.w3.to_wei(1000, "ether")}
            )
        self.hub = self.parties["hub"]
        self.token = self.deploy("TestToken", "Weft Test Token", "WTT")
        self.manager = self.deploy(
            "ChannelManager", self.hub.hex, self.token.address, CHALLENGE_PERIOD
        )
        self.domain = Domain(self.w3.eth.chain_id, Address.from_hex(self.manager.address))
        self.records: dict[Address, ChannelRecord] = {}
        self.disputes: dict[bytes, ThreadDispute] = {}
        for party in self.parties.values():
            self.send(self.token.functions.mint(party.hex, 10**6 * TOKEN), self.hub)
            self.send(self.token.functions.approve(self.manager.address, 2**256 - 1), party)

    def deploy(self, name: str, *args: Any) -> Any:
        art = artifact(name)
        factory = self.w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
        tx = factory.constructor(*args).transact({"from": self.hub.hex})
        receipt = self.w3.eth.wait_for_transaction_receipt(tx)
        return self.w3.eth.contract(address=receipt["contractAddress"], abi=art["abi"])

    @property
    def now(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def travel(self, seconds: int) -> None:
        self.tester.time_travel(self.now + seconds)

    def send(self, call: Any, sender: Party, value: int = 0) -> Gas:
        """Send a transaction, track the records it logs; return its gas."""
        tx = call.transact({"from": sender.hex, "value": value})
        receipt = self.w3.eth.wait_for_transaction_receipt(tx)
        if receipt["status"] != 1:
            raise RuntimeError(f"transaction reverted: {call.fn_name}")
        data = bytes(self.w3.eth.get_transaction(tx)["input"])
        zeros = data.count(0)
        events = self.manager.events
        for event in events.ChannelRecordChanged().process_receipt(receipt, errors=DISCARD):
            user = Address.from_hex(event["args"]["user"])
            self.records[user] = ChannelRecord.from_abi(tuple(event["args"]["record"].values()))
        for event in events.ThreadDisputeChanged().process_receipt(receipt, errors=DISCARD):
            dispute = tuple(event["args"]["dispute"].values())
            self.disputes[bytes(event["args"]["leaf"])] = ThreadDispute.from_abi(dispute)
        return Gas(int(receipt["gasUsed"]), 21_000 + 4 * zeros + 16 * (len(data) - zeros))

    def record(self, user: Party) -> tuple[object, ...]:
        return self.records.get(user.address, ChannelRecord()).as_abi()

    def sign(self, state: ChannelState) -> tuple[bytes, bytes]:
        user = next(p for p in self.parties.values() if p.address == state.user)
        return (
            self.hub.signer.sign_channel_state(self.domain, state).raw,
            user.signer.sign_channel_state(self.domain, state).raw,
        )

    def sign_thread(self, state: ThreadState) -> tuple[bytes, bytes]:
        by = {p.address: p for p in self.parties.values()}
        return (
            by[state.sender].signer.sign_thread_state(self.domain, state).raw,
            by[state.receiver].signer.sign_thread_state(self.domain, state).raw,
        )


class Channel:
    """The off-chain side of one channel: its latest double-signed state."""

    def __init__(self, chain: Chain, user: Party) -> None:
        self.chain = chain
        self.user = user
        self.threads: tuple[ThreadState, ...] = ()
        self.state = genesis_state(user.address)

    def next(self, **fields: Any) -> ChannelState:
        self.state = replace(self.state, tx_count_global=self.state.tx_count_global + 1, **fields)
        return self.state

    def pending(
        self,
        *,
        deposit_hub: Assets = NO_ASSETS,
        deposit_user: Assets = NO_ASSETS,
        withdrawal_user: Assets = NO_ASSETS,
        recipient: Address | None = None,
    ) -> ChannelState:
        s = self.state
        return self.next(
            balance_user=s.balance_user - withdrawal_user,
            pending_deposit_hub=deposit_hub,
            pending_deposit_user=deposit_user,
            pending_withdrawal_user=withdrawal_user,
            recipient=recipient or self.user.address,
            tx_count_onchain=s.tx_count_onchain + 1,
            timeout=self.chain.now + 3600,
        )

    def confirm(self) -> ChannelState:
        """UpdateConfirmPending once the contract executed the pending state."""
        s = self.state
        return self.next(
            balance_hub=s.balance_hub + s.pending_deposit_hub,
            balance_user=s.balance_user + s.pending_deposit_user,
            pending_deposit_hub=NO_ASSETS,
            pending_deposit_user=NO_ASSETS,
            pending_withdrawal_hub=NO_ASSETS,
            pending_withdrawal_user=NO_ASSETS,
            timeout=0,
        )

    def lock(self, thread: ThreadState) -> ChannelState:
        """Open `thread` here (the DESIGN money flow: my side's lock from my balance, the
        other side's from the hub's)."""
        mine, other = (
            (thread.balance_sender, thread.balance_receiver)
            if thread.sender == self.user.address
            else (thread.balance_receiver, thread.balance_sender)
        )
        self.threads = (*self.threads, thread)
        return self.next(
            balance_user=self.state.balance_user - mine,
            balance_hub=self.state.balance_hub - other,
            thread_root=thread_root(self.threads),
            thread_count=len(self.threads),
        )

    def proof(self, thread: ThreadState) -> list[bytes]:
        return list(thread_proof(self.threads, thread))

    # --- calls ---------------------------------------------------------------------------

    def user_update(self, state: ChannelState) -> Gas:
        f = self.chain.manager.functions.userAuthorizedUpdate(
            self.chain.record(self.user), channel_state_abi(state), *self.chain.sign(state)
        )
        return self.chain.send(f, self.user, value=state.pending_deposit_user.eth)

    def hub_update(self, state: ChannelState) -> Gas:
        f = self.chain.manager.functions.hubAuthorizedUpdate(
            self.chain.record(self.user), channel_state_abi(state), *self.chain.sign(state)
        )
        return self.chain.send(f, self.chain.hub)

    def start_exit(self) -> Gas:
        f = self.chain.manager.functions.startExit(self.user.hex, self.chain.record(self.user))
        return self.chain.send(f, self.user)

    def start_exit_with(self, state: ChannelState) -> Gas:
        f = self.chain.manager.functions.startExitWithUpdate(
            self.chain.record(self.user), channel_state_abi(state), *self.chain.sign(state)
        )
        return self.chain.send(f, self.user)

    def challenge_exit(self, state: ChannelState, sender: Party) -> Gas:
        f = self.chain.manager.functions.challengeExit(
            self.chain.record(self.user), channel_state_abi(state), *self.chain.sign(state)
        )
        return self.chain.send(f, sender)

    def empty(self, sender: Party) -> Gas:
        f = self.chain.manager.functions.emptyChannel(self.user.hex, self.chain.record(self.user))
        return self.chain.send(f, sender)

    def start_thread_exit(self, initial: ThreadState, latest: ThreadState | None = None) -> Gas:
        m = self.chain.manager.functions
        args = (
            self.user.hex,
            self.chain.record(self.user),
            thread_state_abi(initial),
            self.proof(initial),
        )
        if latest is None:
            return self.chain.send(m.startThreadExit(*args), self.user)
        f = m.startThreadExitWithUpdate(
            *args, thread_state_abi(latest), *self.chain.sign_thread(latest)
        )
        return self.chain.send(f, self.user)

    def settle_thread(self, initial: ThreadState, sender: Party) -> Gas:
        dispute = self.chain.disputes[thread_leaf(initial)]
        f = self.chain.manager.functions.settleThread(
            self.user.hex,
            self.chain.record(self.user),
            thread_state_abi(initial),
            self.proof(initial),
            dispute.as_abi(),
        )
        return self.chain.send(f, sender)


def measure() -> dict[str, Gas]:
    """Run the scenario; return each function row's gas."""
    gas: dict[str, Gas] = {}

    def row(name: str, used: Gas) -> None:
        gas[name] = used
        _progress(f"  {name}: {used.used:,}")

    _progress("deploying on the embedded chain")
    chain = Chain(["hub", "alice", "bob", "carol", "dave", "erin", "recipient", "watchtower"])
    p = chain.parties
    hub, recipient, watchtower = p["hub"], p["recipient"], p["watchtower"]
    alice, bob, carol, dave, erin = (
        Channel(chain, p[name]) for name in ("alice", "bob", "carol", "dave", "erin")
    )
    m = chain.manager.functions

    _progress("reserve and deposits")
    row(HUB_DEPOSIT, chain.send(m.hubDeposit(500 * TOKEN), hub, value=50 * ETHER))
    row(HUB_DEPOSIT_LATER, chain.send(m.hubDeposit(100 * TOKEN), hub, value=10 * ETHER))
    row(DEPOSIT_ETH_FRESH, alice.user_update(alice.pending(deposit_user=Assets(5 * ETHER, 0))))
    alice.confirm()
    row(DEPOSIT_ETH_LATER, alice.user_update(alice.pending(deposit_user=Assets(2 * ETHER, 0))))
    alice.confirm()
    row(DEPOSIT_TOKEN_FRESH, bob.user_update(bob.pending(deposit_user=Assets(0, 50 * TOKEN))))
    bob.confirm()
    row(DEPOSIT_TOKEN_LATER, bob.user_update(bob.pending(deposit_user=Assets(0, 20 * TOKEN))))
    bob.confirm()
    row(DEPOSIT_BOTH, carol.user_update(carol.pending(deposit_user=Assets(3 * ETHER, 30 * TOKEN))))
    carol.confirm()
    # Carol's channel backs both threads below: the hub's collateral covers their locks.
    row(HUB_COLLATERAL, carol.hub_update(carol.pending(deposit_hub=Assets(2 * ETHER, 20 * TOKEN))))
    carol.confirm()
    alice.hub_update(alice.pending(deposit_hub=Assets(0, 10 * TOKEN)))
    alice.confirm()
    dave.user_update(
        dave.pending(
            deposit_user=Assets(4 * ETHER, 40 * TOKEN), deposit_hub=Assets(ETHER, 10 * TOKEN)
        )
    )
    dave.confirm()
    row(
        HUB_USER_WITHDRAWAL,
        dave.hub_update(
            dave.pending(withdrawal_user=Assets(ETHER, 10 * TOKEN), recipient=recipient.address)
        ),
    )
    dave.confirm()
    row(HUB_WITHDRAW, chain.send(m.hubWithdraw(recipient.hex, ETHER, 10 * TOKEN), hub))

    _progress("threads")
    # Alice -> Carol: Alice locks ETH, Carol tokens. Bob -> Carol: Bob locks tokens.
    t1 = ThreadState(
        1, alice.user.address, carol.user.address, Assets(ETHER, 0), Assets(0, 5 * TOKEN), 0
    )
    t2 = ThreadState(2, bob.user.address, carol.user.address, Assets(0, 10 * TOKEN), NO_ASSETS, 0)
    alice.lock(t1)
    carol_t1 = carol.lock(t1)
    bob.lock(t2)
    carol.lock(t2)
    # Both pay: Alice 0.4 ETH to Carol, Carol 1 token to Alice.
    t1_later = replace(
        t1,
        balance_sender=Assets(ETHER * 6 // 10, TOKEN),
        balance_receiver=Assets(ETHER * 4 // 10, 4 * TOKEN),
        tx_count=3,
    )
    t2_later = replace(
        t2, balance_sender=Assets(0, 6 * TOKEN), balance_receiver=Assets(0, 4 * TOKEN), tx_count=1
    )

    _progress("channel exits")
    row(START_EXIT, dave.start_exit())
    row(START_EXIT_WITH_UPDATE, alice.start_exit_with(alice.state))
    carol.start_exit_with(carol_t1)  # an older state: only the first thread
    row(CHALLENGE_EXIT, carol.challenge_exit(carol.state, watchtower))
    chain.travel(CHALLENGE_PERIOD)
    row(EMPTY_NO_THREADS, dave.empty(watchtower))
    row(EMPTY_WITH_THREADS, alice.empty(watchtower))
    carol.empty(watchtower)

    _progress("thread exits")
    row(START_THREAD_EXIT_WITH_UPDATE, alice.start_thread_exit(t1, t1_later))
    row(START_THREAD_EXIT, carol.start_thread_exit(t2))
    row(
        CHALLENGE_THREAD,
        chain.send(
            m.challengeThread(
                thread_state_abi(t2),
                chain.disputes[thread_leaf(t2)].as_abi(),
                thread_state_abi(t2_later),
                *chain.sign_thread(t2_later),
            ),
            watchtower,
        ),
    )
    chain.travel(CHALLENGE_PERIOD)
    row(SETTLE_LAST, alice.settle_thread(t1, watchtower))
    row(SETTLE_NOT_LAST, carol.settle_thread(t1, watchtower))
    carol.settle_thread(t2, watchtower)

    _progress("a deferred payout")
    rejector = chain.deploy("Rejector")
    erin.user_update(erin.pending(deposit_user=Assets(ETHER, 0)))
    erin.confirm()
    erin.hub_update(
        erin.pending(
            withdrawal_user=Assets(ETHER // 2, 0), recipient=Address.from_hex(rejector.address)
        )
    )
    row(
        CLAIM,
        chain.send(rejector.functions.claimFrom(chain.manager.address, recipient.hex), erin.user),
    )
    return gas


def targets(gas: dict[str, Gas]) -> dict[str, dict[str, Any]]:
    """Each target's measured sum, limit, ratio and verdict."""
    result: dict[str, dict[str, Any]] = {}
    for t in TARGETS:
        used = sum(gas[part].used for part in t.parts)
        result[t.name] = {
            "gas": used,
            "parts": list(t.parts),
            "target": t.limit,
            "ratio": round(used / t.limit, 3),
            "status": "ok" if used <= t.limit else "over",
        }
    return result


def report(gas: dict[str, Gas]) -> dict[str, Any]:
    """The JSON object: every function row (gas, intrinsic part) and every target row."""
    return {
        "functions": {
            name: {"gas": g.used, "intrinsic": g.intrinsic, "execution": g.used - g.intrinsic}
            for name, g in gas.items()
        },
        "targets": targets(gas),
    }


def render(data: dict[str, Any]) -> str:
    """The report as two text tables."""
    functions: dict[str, dict[str, int]] = data["functions"]
    goals: dict[str, dict[str, Any]] = data["targets"]
    width = max(len(name) for name in (*functions, *goals)) + 2
    lines = [
        f"{'function':<{width}}{'gas':>9}{'21k+calldata':>14}{'execution':>11}",
        "-" * (width + 34),
    ]
    for name in FUNCTION_ROWS:
        if name in functions:
            f = functions[name]
            lines.append(f"{name:<{width}}{f['gas']:>9,}{f['intrinsic']:>14,}{f['execution']:>11,}")
    lines += [
        "",
        f"{'target':<{width}}{'gas':>9}{'target':>10}{'ratio':>7}  status",
        "-" * (width + 34),
    ]
    for name, g in goals.items():
        lines.append(
            f"{name:<{width}}{g['gas']:>9,}{g['target']:>10,}{g['ratio']:>7.2f}  {g['status']}"
        )
        if len(g["parts"]) > 1:
            lines.append(f"    = {' + '.join(g['parts'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devnet.gas", description="Gas of every ChannelManager function."
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object, not a table")
    args = parser.parse_args(argv)
    data = report(measure())
    print(json.dumps(data, indent=1) if args.json else render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
