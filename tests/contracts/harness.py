"""A ChannelManager deployment on the embedded chain (py-evm via eth-tester), for tests.

`Deployment.create()` deploys the test token and a ChannelManager for a fresh hub key, and
funds the hub and a few users with ETH and tokens. It tracks every channel's current
`ChannelRecord` from the contract's own `ChannelRecordChanged` logs, so a test passes
`d.record(user)` to a call just as the node would. Calls go through web3 with unlocked
eth-tester accounts; `d.reverts(reason)` expects a revert with exactly that reason.

This talks to web3 directly on purpose: it tests the contract, not the node's chain service.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from eth_tester import EthereumTester, PyEVMBackend
from eth_tester.exceptions import TransactionFailed
from web3 import Web3
from web3.exceptions import ContractLogicError
from web3.logs import DISCARD
from web3.providers.eth_tester import EthereumTesterProvider

from protocols.channel import genesis_state
from protocols.eip712 import Domain
from protocols.onchain import (
    ChannelRecord,
    ThreadDispute,
    channel_state_abi,
    thread_state_abi,
)
from protocols.signing import Signer
from protocols.thread_root import thread_leaf
from protocols.types import Address, Assets, ChannelState, ThreadState

BUILD_DIR = Path(__file__).resolve().parents[2] / "protocols" / "contracts" / "build"
CHALLENGE_PERIOD = 1000
ETHER = 10**18
FUNDING_ETH = 1000 * ETHER
FUNDING_TOKEN = 10**30
TX_GAS = 5_000_000


def artifact(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((BUILD_DIR / f"{name}.json").read_text())
    return data


def key_for(index: int) -> bytes:
    """A fixed private key per index (tests only)."""
    return (0x1000 + index).to_bytes(32, "big")


@dataclass
class Party:
    key: bytes
    signer: Signer = field(init=False)
    address: Address = field(init=False)

    def __post_init__(self) -> None:
        self.signer = Signer(self.key)
        self.address = self.signer.address

    @property
    def hex(self) -> str:
        return self.address.checksum()


class Reverted(AssertionError):
    pass


@dataclass
class Deployment:
    w3: Web3
    tester: EthereumTester
    hub: Party
    users: list[Party]
    outsider: Party
    token: Any
    manager: Any
    domain: Domain
    records: dict[Address, ChannelRecord] = field(default_factory=dict)
    disputes: dict[bytes, ThreadDispute] = field(default_factory=dict)
    last_receipt: Any = None

    # --- set-up -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        n_users: int = 3,
        token_name: str = "TestToken",
        challenge_period: int = CHALLENGE_PERIOD,
    ) -> Deployment:
        backend = PyEVMBackend(
            genesis_parameters=PyEVMBackend.generate_genesis_params({"gas_limit": 30_000_000})
        )
        tester = EthereumTester(backend)
        w3 = Web3(EthereumTesterProvider(tester))
        funder = w3.eth.accounts[0]
        hub = Party(key_for(0))
        users = [Party(key_for(i + 1)) for i in range(n_users)]
        outsider = Party(key_for(99))
        for party in [hub, *users, outsider]:
            tester.add_account("0x" + party.key.hex())
            w3.eth.send_transaction({"from": funder, "to": party.hex, "value": FUNDING_ETH})
        token = cls._deploy(w3, hub.hex, token_name, *cls._token_args(token_name))
        manager = cls._deploy(
            w3, hub.hex, "ChannelManager", hub.hex, token.address, challenge_period
        )
        domain = Domain(w3.eth.chain_id, Address.from_hex(manager.address))
        d = cls(w3, tester, hub, users, outsider, token, manager, domain)
        for party in [hub, *users, outsider]:
            d.mint(party, FUNDING_TOKEN)
            d.send(token.functions.approve(manager.address, 2**256 - 1), party)
        return d

    @staticmethod
    def _token_args(name: str) -> tuple[Any, ...]:
        return ("Weft Test Token", "WTT") if name == "TestToken" else ()

    @staticmethod
    def _deploy(w3: Web3, sender: str, name: str, *args: Any) -> Any:
        art = artifact(name)
        factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
        tx = factory.constructor(*args).transact({"from": sender})
        receipt = w3.eth.wait_for_transaction_receipt(tx)
        return w3.eth.contract(address=receipt["contractAddress"], abi=art["abi"])

    def mint(self, party: Party, amount: int) -> None:
        self.send(self.token.functions.mint(party.hex, amount), self.hub)

    # --- chain --------------------------------------------------------------------------

    @property
    def now(self) -> int:
        """Timestamp of the latest block; the next transaction's block is at least this."""
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def travel(self, seconds: int) -> None:
        """Move the chain's clock forward (mines a block)."""
        self.tester.time_travel(self.now + seconds)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Undo every change made inside (chain and tracked records)."""
        snap = self.tester.take_snapshot()
        records, disputes = dict(self.records), dict(self.disputes)
        try:
            yield
        finally:
            self.tester.revert_to_snapshot(snap)
            self.records, self.disputes = records, disputes

    def send(self, call: Any, sender: Party, value: int = 0) -> Any:
        """Send a transaction; raise `Reverted(reason)` if it reverts.

        One `eth_call` on the pending block (where the transaction lands) catches a revert
        with its reason; the transaction then goes with a fixed gas limit. web3's own gas
        estimate would run the call some twenty times.
        """
        tx_params = {"from": sender.hex, "value": value}
        try:
            call.call(tx_params, block_identifier="pending")
            tx = call.transact({**tx_params, "gas": TX_GAS})
        except (ContractLogicError, TransactionFailed) as exc:
            raise Reverted(_reason(exc)) from exc
        receipt = self.w3.eth.wait_for_transaction_receipt(tx)
        if receipt["status"] != 1:
            raise Reverted("")
        self._track(receipt)
        self.last_receipt = receipt
        return receipt

    @contextlib.contextmanager
    def reverts(self, reason: str) -> Iterator[None]:
        """Expect the block to raise `Reverted` with exactly `reason`."""
        try:
            yield
        except Reverted as exc:
            assert str(exc) == reason, f"reverted with {str(exc)!r}, expected {reason!r}"
        else:
            raise AssertionError(f"did not revert (expected {reason!r})")

    def _track(self, receipt: Any) -> None:
        for event in self.manager.events.ChannelRecordChanged().process_receipt(
            receipt, errors=DISCARD
        ):
            user = Address.from_hex(event["args"]["user"])
            self.records[user] = ChannelRecord.from_abi(tuple(event["args"]["record"].values()))
        for event in self.manager.events.ThreadDisputeChanged().process_receipt(
            receipt, errors=DISCARD
        ):
            leaf = bytes(event["args"]["leaf"])
            self.disputes[leaf] = ThreadDispute.from_abi(tuple(event["args"]["dispute"].values()))

    def logs(self, event_name: str, receipt: Any = None) -> list[Any]:
        event = getattr(self.manager.events, event_name)()
        return list(event.process_receipt(receipt or self.last_receipt, errors=DISCARD))

    # --- reads --------------------------------------------------------------------------

    def record(self, user: Party | Address) -> ChannelRecord:
        address = user.address if isinstance(user, Party) else user
        return self.records.get(address, ChannelRecord())

    def dispute(self, initial: ThreadState) -> ThreadDispute:
        return self.disputes[thread_leaf(initial)]

    def eth(self, who: Party | str) -> int:
        return int(self.w3.eth.get_balance(who.hex if isinstance(who, Party) else who))

    def tokens(self, who: Party | str) -> int:
        return int(
            self.token.functions.balanceOf(who.hex if isinstance(who, Party) else who).call()
        )

    def reserve(self) -> Assets:
        f = self.manager.functions
        return Assets(f.reserveEth().call(), f.reserveToken().call())

    def contract_holdings(self) -> Assets:
        return Assets(self.eth(self.manager.address), self.tokens(self.manager.address))

    # --- states and signatures ---------------------------------------------------------

    def state(self, user: Party, **fields: Any) -> ChannelState:
        """A channel state of `user`: all zero, recipient = user, unless given."""
        base = genesis_state(user.address)
        return replace(base, **fields)

    def sign(
        self,
        state: ChannelState,
        *,
        hub: Party | None = None,
        user: Party | None = None,
        domain: Domain | None = None,
    ) -> tuple[bytes, bytes]:
        """(sigHub, sigUser) over `state`; other signers or another domain if given."""
        dom = domain or self.domain
        hub_party = hub or self.hub
        user_party = user or self.party(state.user)
        return (
            hub_party.signer.sign_channel_state(dom, state).raw,
            user_party.signer.sign_channel_state(dom, state).raw,
        )

    def sign_thread(self, state: ThreadState, domain: Domain | None = None) -> tuple[bytes, bytes]:
        dom = domain or self.domain
        return (
            self.party(state.sender).signer.sign_thread_state(dom, state).raw,
            self.party(state.receiver).signer.sign_thread_state(dom, state).raw,
        )

    def party(self, address: Address) -> Party:
        for p in [self.hub, *self.users, self.outsider]:
            if p.address == address:
                return p
        raise KeyError(address)

    # --- contract calls -----------------------------------------------------------------

    def hub_deposit(self, eth: int, token: int) -> Any:
        return self.send(self.manager.functions.hubDeposit(token), self.hub, value=eth)

    def hub_withdraw(
        self, recipient: Party, eth: int, token: int, sender: Party | None = None
    ) -> Any:
        f = self.manager.functions.hubWithdraw(recipient.hex, eth, token)
        return self.send(f, sender or self.hub)

    def hub_update(
        self,
        state: ChannelState,
        sigs: tuple[bytes, bytes] | None = None,
        sender: Party | None = None,
        record: ChannelRecord | None = None,
    ) -> Any:
        sig_hub, sig_user = sigs or self.sign(state)
        rec = record or self.record(state.user)
        f = self.manager.functions.hubAuthorizedUpdate(
            rec.as_abi(), channel_state_abi(state), sig_hub, sig_user
        )
        return self.send(f, sender or self.hub)

    def user_update(
        self,
        state: ChannelState,
        sigs: tuple[bytes, bytes] | None = None,
        sender: Party | None = None,
        value: int | None = None,
        record: ChannelRecord | None = None,
    ) -> Any:
        sig_hub, sig_user = sigs or self.sign(state)
        rec = record or self.record(state.user)
        f = self.manager.functions.userAuthorizedUpdate(
            rec.as_abi(), channel_state_abi(state), sig_hub, sig_user
        )
        eth = state.pending_deposit_user.eth if value is None else value
        return self.send(f, sender or self.party(state.user), value=eth)

    def start_exit(
        self, user: Party, sender: Party | None = None, record: ChannelRecord | None = None
    ) -> Any:
        f = self.manager.functions.startExit(user.hex, (record or self.record(user)).as_abi())
        return self.send(f, sender or user)

    def start_exit_with(
        self,
        state: ChannelState,
        sigs: tuple[bytes, bytes] | None = None,
        sender: Party | None = None,
        record: ChannelRecord | None = None,
    ) -> Any:
        sig_hub, sig_user = sigs or self.sign(state)
        rec = record or self.record(state.user)
        f = self.manager.functions.startExitWithUpdate(
            rec.as_abi(), channel_state_abi(state), sig_hub, sig_user
        )
        return self.send(f, sender or self.party(state.user))

    def challenge_exit(
        self,
        state: ChannelState,
        sender: Party,
        sigs: tuple[bytes, bytes] | None = None,
        record: ChannelRecord | None = None,
    ) -> Any:
        sig_hub, sig_user = sigs or self.sign(state)
        rec = record or self.record(state.user)
        f = self.manager.functions.challengeExit(
            rec.as_abi(), channel_state_abi(state), sig_hub, sig_user
        )
        return self.send(f, sender)

    def empty_channel(
        self, user: Party, sender: Party | None = None, record: ChannelRecord | None = None
    ) -> Any:
        f = self.manager.functions.emptyChannel(user.hex, (record or self.record(user)).as_abi())
        return self.send(f, sender or self.outsider)

    def start_thread_exit(
        self,
        user: Party,
        initial: ThreadState,
        proof: tuple[bytes, ...],
        latest: ThreadState | None = None,
        sigs: tuple[bytes, bytes] | None = None,
        sender: Party | None = None,
    ) -> Any:
        rec = self.record(user).as_abi()
        if latest is None:
            f = self.manager.functions.startThreadExit(
                user.hex, rec, thread_state_abi(initial), list(proof)
            )
        else:
            sig_s, sig_r = sigs or self.sign_thread(latest)
            f = self.manager.functions.startThreadExitWithUpdate(
                user.hex,
                rec,
                thread_state_abi(initial),
                list(proof),
                thread_state_abi(latest),
                sig_s,
                sig_r,
            )
        return self.send(f, sender or user)

    def challenge_thread(
        self,
        initial: ThreadState,
        latest: ThreadState,
        sender: Party,
        sigs: tuple[bytes, bytes] | None = None,
        dispute: ThreadDispute | None = None,
    ) -> Any:
        sig_s, sig_r = sigs or self.sign_thread(latest)
        f = self.manager.functions.challengeThread(
            thread_state_abi(initial),
            (dispute or self.dispute(initial)).as_abi(),
            thread_state_abi(latest),
            sig_s,
            sig_r,
        )
        return self.send(f, sender)

    def settle_thread(
        self,
        user: Party,
        initial: ThreadState,
        proof: tuple[bytes, ...],
        sender: Party | None = None,
        dispute: ThreadDispute | None = None,
    ) -> Any:
        f = self.manager.functions.settleThread(
            user.hex,
            self.record(user).as_abi(),
            thread_state_abi(initial),
            list(proof),
            (dispute or self.dispute(initial)).as_abi(),
        )
        return self.send(f, sender or self.outsider)


def _reason(exc: Exception) -> str:
    message = str(getattr(exc, "message", None) or exc)
    prefix = "execution reverted: "
    return message[len(prefix) :] if message.startswith(prefix) else message
