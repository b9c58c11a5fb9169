"""The chain service (node.chain) against the embedded chain and against anvil.

Each test runs twice: on a fresh embedded py-evm chain, and on one anvil process shared by
the session (each test deploys its own contracts with fresh random keys, so tests do not
see each other's channels). Anvil tests are skipped only where npm is missing; see
tests/node/anvil.py.
"""

from __future__ import annotations

import pathlib
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
import trio
from eth_tester import exceptions as tester_errors
from web3.exceptions import ContractLogicError, Web3RPCError

from node.chain import (
    Action,
    ChainService,
    ChannelPaidOutLog,
    ChannelRecordChangedLog,
    ChannelReopenedLog,
    ManagerClient,
    PayoutClaimedLog,
    PayoutDeferredLog,
    ReserveDepositedLog,
    ReserveWithdrawnLog,
    TokenClient,
    latest_records,
    translate_error,
)
from node.chain_errors import (
    ChainError,
    ChainUnavailable,
    ContractReverted,
    RequestRejected,
    TransactionFailed,
)
from node.contracts import ArtifactError, load_artifact, parse_artifact
from protocols.channel import genesis_state
from protocols.eip712 import Domain
from protocols.keccak import keccak
from protocols.onchain import (
    GENESIS_RECORD,
    ChannelPhase,
    ChannelRecord,
    emptied_record,
    executed_record,
    exit_started_record,
    record_hash,
)
from protocols.signing import Signer
from protocols.types import NO_ASSETS, Address, Assets, ChannelState
from tests.node import anvil

ETHER = 10**18
CHALLENGE_PERIOD = 100
TOKENS = 10**24


@dataclass
class Key:
    key: bytes
    signer: Signer

    @classmethod
    def new(cls) -> Key:
        while True:
            raw = secrets.token_bytes(32)
            try:
                return cls(raw, Signer(raw))
            except ValueError:
                continue

    @property
    def address(self) -> Address:
        return self.signer.address


@dataclass
class World:
    chain: ChainService
    hub: Key
    user: Key
    other: Key
    token: TokenClient
    manager: ManagerClient
    domain: Domain

    def state(self, **fields: Any) -> ChannelState:
        """A state of `user`'s channel: all zero, recipient = user, unless given."""
        base = genesis_state(self.user.address)
        return replace(base, **fields)

    def sign(self, state: ChannelState) -> tuple[bytes, bytes]:
        return (
            self.hub.signer.sign_channel_state(self.domain, state).raw,
            self.user.signer.sign_channel_state(self.domain, state).raw,
        )

    async def user_deposit(self, amount: Assets) -> tuple[ChannelState, ChannelRecord]:
        """Open `user`'s channel with a user-authorized deposit of `amount`."""
        now = await self.chain.timestamp()
        state = self.state(
            pending_deposit_user=amount, tx_count_global=1, tx_count_onchain=1, timeout=now + 3600
        )
        receipt = await self.manager.user_authorized_update(
            GENESIS_RECORD, state, *self.sign(state), sender_key=self.user.key
        )
        (log,) = [x for x in receipt.logs if isinstance(x, ChannelRecordChangedLog)]
        return state, log.record


@pytest.fixture
async def world(chain: ChainService) -> AsyncIterator[World]:
    hub, user, other = Key.new(), Key.new(), Key.new()
    for key in (hub, user, other):
        await chain.fund(key.address, 100 * ETHER)
    token = await chain.deploy_token("Weft Test Token", "WTT", sender_key=hub.key)
    manager = await chain.deploy_channel_manager(
        hub.address, token.address, CHALLENGE_PERIOD, sender_key=hub.key
    )
    for key in (hub, user):
        await token.mint(key.address, TOKENS, sender_key=hub.key)
        await token.approve(manager.address, 2**256 - 1, sender_key=key.key)
    yield World(chain, hub, user, other, token, manager, await manager.domain())


# --- deployment and views --------------------------------------------------------------------


async def test_deployment_views_and_domain(world: World) -> None:
    m = world.manager
    assert await m.hub() == world.hub.address
    assert await m.token_address() == world.token.address
    assert await m.challenge_period() == CHALLENGE_PERIOD
    assert await m.reserve() == NO_ASSETS
    assert await m.channel_record_hash(world.user.address) == b"\x00" * 32
    domain = await m.domain()
    assert domain == Domain(await world.chain.chain_id(), m.address)
    assert await m.domain_separator() == domain.separator
    if not world.chain.is_embedded:
        assert domain.chain_id == 31337
    code = await world.chain.code_at(m.address)
    assert code.startswith(load_artifact("ChannelManager").runtime_bytecode)
    assert await world.chain.code_at(world.user.address) == b""
    assert m.deployed_block is not None and m.deployed_block <= await world.chain.block_number()


# --- hub reserve -------------------------------------------------------------------------------


async def test_hub_reserve_deposit_and_withdraw(world: World) -> None:
    m, hub = world.manager, world.hub
    receipt = await m.hub_deposit(Assets(3 * ETHER, 500), sender_key=hub.key)
    assert receipt.logs == (
        ReserveDepositedLog(
            receipt.block_number,
            receipt.logs[0].log_index,
            receipt.tx_hash,
            amount=Assets(3 * ETHER, 500),
            reserve=Assets(3 * ETHER, 500),
        ),
    )
    assert await m.reserve() == Assets(3 * ETHER, 500)
    assert await world.chain.eth_balance(m.address) == 3 * ETHER
    assert await world.token.balance_of(m.address) == 500

    before = await world.chain.eth_balance(world.other.address)
    receipt = await m.hub_withdraw(world.other.address, Assets(ETHER, 200), sender_key=hub.key)
    (log,) = receipt.logs
    assert isinstance(log, ReserveWithdrawnLog)
    assert log.recipient == world.other.address
    assert (log.amount, log.reserve) == (Assets(ETHER, 200), Assets(2 * ETHER, 300))
    assert await m.reserve() == Assets(2 * ETHER, 300)
    assert await world.chain.eth_balance(world.other.address) == before + ETHER
    assert await world.token.balance_of(world.other.address) == 200


# --- authorized updates ------------------------------------------------------------------------


async def test_user_deposit_then_hub_update_with_withdrawal(world: World) -> None:
    m = world.manager
    deposit = Assets(5 * ETHER, 7_000)
    state1, record1 = await world.user_deposit(deposit)
    assert record1 == executed_record(GENESIS_RECORD, state1, 0)
    assert record1.held == deposit and record1.balance_user == deposit
    assert await m.channel_record_hash(world.user.address) == record_hash(record1)
    assert await world.chain.eth_balance(m.address) == 5 * ETHER
    assert await world.token.balance_of(m.address) == 7_000

    # The user withdraws 2 ETH and 3000 tokens to another address, through the hub.
    recipient = world.other.address
    eth_before = await world.chain.eth_balance(recipient)
    state2 = world.state(
        recipient=recipient,
        balance_user=Assets(3 * ETHER, 4_000),
        pending_withdrawal_user=Assets(2 * ETHER, 3_000),
        tx_count_global=2,
        tx_count_onchain=2,
        timeout=await world.chain.timestamp() + 3600,
    )
    receipt = await m.hub_authorized_update(
        record1, state2, *world.sign(state2), sender_key=world.hub.key
    )
    (log,) = receipt.logs
    assert isinstance(log, ChannelRecordChangedLog)
    assert (log.user, log.action, log.caller) == (
        world.user.address,
        Action.HUB_UPDATE,
        world.hub.address,
    )
    assert log.record == executed_record(record1, state2, 0)
    assert log.record.held == Assets(3 * ETHER, 4_000)
    assert await m.channel_record_hash(world.user.address) == record_hash(log.record)
    assert await world.chain.eth_balance(recipient) == eth_before + 2 * ETHER
    assert await world.token.balance_of(recipient) == 3_000


async def test_revert_is_a_typed_error_with_the_exact_reason(world: World) -> None:
    m = world.manager
    state1, record1 = await world.user_deposit(Assets(ETHER, 0))
    nonce = await world.chain.pending_nonce(world.user.address)
    stale = replace(state1, pending_deposit_user=NO_ASSETS)
    with pytest.raises(ContractReverted) as caught:
        await m.user_authorized_update(
            record1, stale, *world.sign(stale), sender_key=world.user.key
        )
    assert caught.value.reason == "stale txCountGlobal"
    with pytest.raises(ContractReverted) as caught:
        await m.hub_deposit(Assets(ETHER, 0), sender_key=world.user.key)
    assert caught.value.reason == "caller is not the hub"
    with pytest.raises(ContractReverted) as caught:
        await m.hub_authorized_update(
            GENESIS_RECORD, state1, *world.sign(state1), sender_key=world.hub.key
        )
    assert caught.value.reason == "user deposit in hub update"
    # Nothing was sent, so no nonce was used, and the next transaction lands.
    assert await world.chain.pending_nonce(world.user.address) == nonce
    await m.start_exit(world.user.address, record1, sender_key=world.user.key)
    assert await world.chain.pending_nonce(world.user.address) == nonce + 1


async def test_mined_failure_is_transaction_failed(world: World) -> None:
    m = world.manager
    nonce = await world.chain.pending_nonce(world.hub.address)
    with pytest.raises(TransactionFailed) as caught:
        # A fixed gas limit skips the estimate, so the reverting call is mined.
        await m.hub_withdraw(
            world.hub.address, Assets(ETHER, 0), sender_key=world.hub.key, gas=200_000
        )
    assert caught.value.gas_used > 0
    assert await world.chain.pending_nonce(world.hub.address) == nonce + 1
    await m.hub_deposit(Assets(ETHER, 0), sender_key=world.hub.key)
    assert await m.reserve() == Assets(ETHER, 0)


# --- events ------------------------------------------------------------------------------------


async def test_events_since_decodes_and_advances_the_cursor(world: World) -> None:
    m = world.manager
    assert m.deployed_block is not None
    await m.hub_deposit(Assets(ETHER, 10), sender_key=world.hub.key)
    state1, record1 = await world.user_deposit(Assets(2 * ETHER, 20))

    logs, cursor = await m.events_since(m.deployed_block)
    assert cursor == await world.chain.block_number() + 1
    assert [type(x) for x in logs] == [ReserveDepositedLog, ChannelRecordChangedLog]
    assert [(x.block_number, x.log_index) for x in logs] == sorted(
        (x.block_number, x.log_index) for x in logs
    )
    changed = logs[1]
    assert isinstance(changed, ChannelRecordChangedLog)
    assert changed.user == world.user.address
    assert changed.action is Action.USER_UPDATE
    assert changed.caller == world.user.address
    assert changed.record == record1 == executed_record(GENESIS_RECORD, state1, 0)
    assert latest_records(logs) == {world.user.address: record1}

    # Nothing new: same cursor, no logs.
    assert await m.events_since(cursor) == ([], cursor)

    # A new log shows up from the cursor on, and only it.
    await m.start_exit(world.user.address, record1, sender_key=world.hub.key)
    more, cursor2 = await m.events_since(cursor)
    assert cursor2 == cursor + 1
    (exiting,) = more
    assert isinstance(exiting, ChannelRecordChangedLog)
    assert exiting.action is Action.START_EXIT and exiting.caller == world.hub.address
    assert exiting.record.phase is ChannelPhase.EXITING
    assert latest_records(more, latest_records(logs)) == {world.user.address: exiting.record}

    # Reading one block per call yields the same logs in the same order.
    paged: list[object] = []
    at = m.deployed_block
    while at < cursor2:
        page, at = await m.events_since(at, max_blocks=1)
        paged.extend(page)
    assert paged == [*logs, *more]


# --- nonces ------------------------------------------------------------------------------------


async def test_back_to_back_transactions_from_one_sender_all_land(world: World) -> None:
    m, hub = world.manager, world.hub
    nonce = await world.chain.pending_nonce(hub.address)
    receipts: list[Any] = []

    async def deposit(wei: int) -> None:
        receipts.append(await m.hub_deposit(Assets(wei, 0), sender_key=hub.key))

    async with trio.open_nursery() as nursery:
        for i in range(1, 6):
            nursery.start_soon(deposit, i * 1000)
    assert len(receipts) == 5
    assert await m.reserve() == Assets(15_000, 0)
    assert await world.chain.pending_nonce(hub.address) == nonce + 5

    # Submitting without waiting: explicit nonces, all mined.
    hashes = [
        await world.chain.submit(sender_key=hub.key, to=world.other.address, value=1)
        for _ in range(3)
    ]
    for tx_hash in hashes:
        await world.chain.wait_for_receipt(tx_hash)
    assert await world.chain.pending_nonce(hub.address) == nonce + 8


async def test_nonce_is_resynced_after_a_failure(world: World) -> None:
    chain, hub = world.chain, world.hub
    await chain.send_eth(world.other.address, 1, sender_key=hub.key)
    # Someone else spends the next nonce behind the service's back.
    chain._nonces[chain.account(hub.key).address] -= 1
    with pytest.raises(RequestRejected):
        await chain.send_eth(world.other.address, 1, sender_key=hub.key)
    await chain.send_eth(world.other.address, 1, sender_key=hub.key)  # re-read: lands


# --- exit and time -----------------------------------------------------------------------------


async def test_start_exit_time_travel_and_empty_channel(world: World) -> None:
    m, user = world.manager, world.user
    deposit = Assets(4 * ETHER, 900)
    _, record1 = await world.user_deposit(deposit)
    receipt = await m.start_exit(user.address, record1, sender_key=user.key)
    (log,) = receipt.logs
    assert isinstance(log, ChannelRecordChangedLog)
    started_at = (await world.chain.latest_block()).timestamp
    assert log.record == exit_started_record(record1, None, started_at, CHALLENGE_PERIOD)

    with pytest.raises(ContractReverted) as caught:
        await m.empty_channel(user.address, log.record, sender_key=world.other.key)
    assert caught.value.reason == "challenge period not over"

    now = await world.chain.advance_time(CHALLENGE_PERIOD)
    assert now >= log.record.exit_deadline
    eth_before = await world.chain.eth_balance(user.address)
    tokens_before = await world.token.balance_of(user.address)
    receipt = await m.empty_channel(user.address, log.record, sender_key=world.other.key)
    expected, payout = emptied_record(log.record, now)
    reopened, changed, paid = receipt.logs
    assert isinstance(reopened, ChannelReopenedLog)
    assert (reopened.user, reopened.unassigned) == (user.address, NO_ASSETS)
    assert isinstance(changed, ChannelRecordChangedLog) and isinstance(paid, ChannelPaidOutLog)
    assert changed.action is Action.EMPTY_CHANNEL and changed.record == expected
    assert (paid.user, paid.to_user, paid.to_hub) == (user.address, deposit, NO_ASSETS)
    assert payout.to_user == deposit
    assert await world.chain.eth_balance(user.address) == eth_before + 4 * ETHER
    assert await world.token.balance_of(user.address) == tokens_before + 900
    assert await m.channel_record_hash(user.address) == record_hash(expected)


# --- failures without a chain --------------------------------------------------------------------


async def test_unreachable_url_is_chain_unavailable_quickly() -> None:
    service = ChainService.from_url("http://127.0.0.1:1", request_timeout=2.0)
    start = time.monotonic()
    with trio.fail_after(10):
        with pytest.raises(ChainUnavailable):
            await service.chain_id()
        manager = service.manager(Address(b"\x11" * 20))
        with pytest.raises(ChainUnavailable):
            await manager.hub_deposit(Assets(1, 0), sender_key=b"\x01" * 32)
        with pytest.raises(ChainUnavailable):
            await manager.events_since(0)
    assert time.monotonic() - start < 5
    service.close()


def test_library_exceptions_are_translated() -> None:
    reverted = translate_error(ContractLogicError("execution reverted: stale txCountGlobal"))
    assert isinstance(reverted, ContractReverted) and reverted.reason == "stale txCountGlobal"
    data = (
        "0x08c379a0"
        + (32).to_bytes(32, "big").hex()
        + (3).to_bytes(32, "big").hex()
        + b"why".ljust(32, b"\x00").hex()
    )
    decoded = translate_error(ContractLogicError("execution reverted", data=data))
    assert isinstance(decoded, ContractReverted) and decoded.reason == "why"
    bare = translate_error(tester_errors.TransactionFailed("execution reverted: b''"))
    assert isinstance(bare, ContractReverted) and bare.reason == ""
    assert isinstance(translate_error(ConnectionRefusedError()), ChainUnavailable)
    assert isinstance(translate_error(Web3RPCError("nonce too low")), RequestRejected)
    other = translate_error(KeyError("x"))
    assert type(other) is ChainError


def test_artifacts_load_and_bad_ones_are_typed_errors() -> None:
    manager = load_artifact("ChannelManager")
    assert manager.name == "ChannelManager"
    assert any(entry.get("name") == "hubDeposit" for entry in manager.abi)
    assert manager.bytecode and manager.runtime_bytecode
    with pytest.raises(ArtifactError, match="not found"):
        load_artifact("NoSuchContract")
    with pytest.raises(ArtifactError):
        load_artifact("../ChannelManager")
    with pytest.raises(ArtifactError, match="JSON"):
        parse_artifact("X", "{not json")
    with pytest.raises(ArtifactError, match="abi"):
        parse_artifact("X", '{"bytecode": "0x00", "runtimeBytecode": "0x00"}')
    with pytest.raises(ArtifactError, match="hex"):
        parse_artifact("X", '{"abi": [], "bytecode": "0xzz", "runtimeBytecode": "0x00"}')


def test_missing_anvil_skips_only_without_npm(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.delenv("WEFT_ANVIL", raising=False)
    monkeypatch.setattr(anvil, "PINNED_ANVIL", tmp_path / "missing" / "anvil")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match="npm is absent"):
        anvil.require_anvil()
    only_npm = {"npm": "/usr/bin/npm"}
    monkeypatch.setattr(shutil, "which", only_npm.get)
    with pytest.raises(pytest.fail.Exception, match=re.escape("npm ci --prefix .ci/anvil")):
        anvil.require_anvil()
    monkeypatch.setenv("WEFT_ANVIL", str(tmp_path / "nope"))
    with pytest.raises(pytest.fail.Exception, match="not an executable"):
        anvil.require_anvil()


def test_artifacts_load_without_the_compiler() -> None:
    """The node needs no Vyper: loading every artifact in a process where importing vyper
    fails works, and loads no vyper module."""
    code = (
        "import sys\n"
        "sys.modules['vyper'] = None  # any import of vyper now raises ImportError\n"
        "from node.contracts import load_artifact\n"
        "for name in ('ChannelManager', 'TestToken'):\n"
        "    assert load_artifact(name).bytecode\n"
        "assert not [m for m in sys.modules if m.startswith('vyper.')]\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


async def test_refused_payout_is_deferred_and_claimed(world: World) -> None:
    """A withdrawal to a contract that refuses ETH is kept for it (PayoutDeferred); the
    contract claims it on to another address (PayoutClaimed). Both logs decode."""
    m = world.manager
    rejector_address = await world.chain.deploy(load_artifact("Rejector"), sender_key=world.hub.key)
    _, record1 = await world.user_deposit(Assets(2 * ETHER, 10))
    state2 = world.state(
        recipient=rejector_address,
        balance_user=Assets(ETHER, 10),
        pending_withdrawal_user=Assets(ETHER, 0),
        tx_count_global=2,
        tx_count_onchain=2,
        timeout=await world.chain.timestamp() + 3600,
    )
    receipt = await m.hub_authorized_update(
        record1, state2, *world.sign(state2), sender_key=world.hub.key
    )
    deferred = [log for log in receipt.logs if isinstance(log, PayoutDeferredLog)]
    assert [(log.recipient, log.amount) for log in deferred] == [
        (rejector_address, Assets(ETHER, 0))
    ]
    assert await world.chain.eth_balance(rejector_address) == 0

    to = world.other.address
    before = await world.chain.eth_balance(to)
    selector = keccak(b"claimFrom(address,address)")[:4]
    data = selector + bytes(12) + m.address.raw + bytes(12) + to.raw
    await world.chain.transact(sender_key=world.hub.key, to=rejector_address, data=data)
    assert await world.chain.eth_balance(to) == before + ETHER
    logs, _ = await m.events_since(receipt.block_number + 1)
    claimed = [log for log in logs if isinstance(log, PayoutClaimedLog)]
    assert [(log.recipient, log.to, log.amount) for log in claimed] == [
        (rejector_address, to, Assets(ETHER, 0))
    ]
