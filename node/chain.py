"""The chain service: the node's only door to Ethereum (DESIGN.md, "Chain access").

`ChainService` wraps a synchronous web3.py `Web3` and exposes async trio methods; each
blocking web3 call runs in `trio.to_thread.run_sync` under a `trio.CapacityLimiter`
(web3's async provider needs asyncio). Two chains:

- `ChainService.embedded()`: py-evm through eth-tester, in process (tests, devnets);
- `ChainService.from_url(url)`: any JSON-RPC HTTP endpoint (anvil, geth, a provider).

Transactions are signed locally with the sender's private key, carry an explicit nonce
the service keeps per sender (read once from the chain's `pending` count, re-read after
any failure), an estimated gas limit plus a margin, and EIP-1559 fees from the latest
base fee. Receipts are polled. A would-be revert is caught by the gas estimate and raised
as `ContractReverted(reason)` before anything is sent.

`ManagerClient` (from `ChainService.manager(address)`) has one typed method per
ChannelManager function, taking `protocols` values, and `events_since(cursor)`, which
decodes the contract's logs into the frozen `*Log` dataclasses below. The caller keeps
the cursor; the service keeps none. `latest_records` / `latest_disputes` fold the logs
into each channel's current record and each thread's current dispute.

Errors are those of `node.chain_errors`; no web3, eth-tester or requests exception leaves
this module.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeVar, cast

import requests
import trio
from eth_abi.abi import decode as abi_decode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_tester import EthereumTester, PyEVMBackend
from eth_tester import exceptions as tester_errors
from eth_typing import ChecksumAddress
from eth_utils.abi import event_abi_to_log_topic
from eth_utils.exceptions import ValidationError as EthUtilsValidationError
from web3 import HTTPProvider, Web3
from web3 import exceptions as web3_errors
from web3.providers.eth_tester import EthereumTesterProvider

from node.chain_errors import (
    ChainDataError,
    ChainError,
    ChainUnavailable,
    ContractReverted,
    NotSupported,
    ReceiptTimeout,
    RequestRejected,
    TransactionFailed,
)
from node.contracts import CHANNEL_MANAGER, TEST_TOKEN, Artifact, load_artifact
from protocols.eip712 import Domain
from protocols.errors import WeftProtocolError
from protocols.onchain import (
    ChannelRecord,
    ThreadDispute,
    channel_state_abi,
    settled_key,
    thread_state_abi,
)
from protocols.types import Address, Assets, ChannelState, Signature, ThreadState

T = TypeVar("T")

EMBEDDED_GAS_LIMIT = 30_000_000
GWEI = 10**9
DEFAULT_PRIORITY_FEE = 1 * GWEI
ERROR_STRING_SELECTOR = bytes.fromhex("08c379a0")  # Error(string)


# --- Values --------------------------------------------------------------------------------


class Action(IntEnum):
    """`action` codes of ChannelRecordChanged and ThreadDisputeChanged (the contract's)."""

    HUB_UPDATE = 1
    USER_UPDATE = 2
    START_EXIT = 3
    CHALLENGE_EXIT = 4
    EMPTY_CHANNEL = 5
    START_THREAD_EXIT = 6
    CHALLENGE_THREAD = 7
    SETTLE_THREAD = 8


@dataclass(frozen=True, slots=True)
class ChainLog:
    """Where a log is: block, index in the block, transaction."""

    block_number: int
    log_index: int
    tx_hash: bytes


@dataclass(frozen=True, slots=True)
class ReserveDepositedLog(ChainLog):
    amount: Assets
    reserve: Assets


@dataclass(frozen=True, slots=True)
class ReserveWithdrawnLog(ChainLog):
    recipient: Address
    amount: Assets
    reserve: Assets


@dataclass(frozen=True, slots=True)
class ChannelRecordChangedLog(ChainLog):
    """`user`'s channel record is now `record` (in full), after `action` by `caller`."""

    user: Address
    action: Action
    caller: Address
    record: ChannelRecord


@dataclass(frozen=True, slots=True)
class ChannelPaidOutLog(ChainLog):
    """emptyChannel paid `to_user` to the user and `to_hub` to the reserve."""

    user: Address
    to_user: Assets
    to_hub: Assets


@dataclass(frozen=True, slots=True)
class ThreadDisputeChangedLog(ChainLog):
    """The dispute of the thread with leaf `leaf` is now `dispute`."""

    leaf: bytes
    action: Action
    caller: Address
    sender: Address
    receiver: Address
    thread_id: int
    dispute: ThreadDispute


@dataclass(frozen=True, slots=True)
class ThreadSettledLog(ChainLog):
    """settleThread paid `to_user` to `user` and `to_hub` to the reserve."""

    user: Address
    leaf: bytes
    to_user: Assets
    to_hub: Assets


@dataclass(frozen=True, slots=True)
class ChannelReopenedLog(ChainLog):
    """`user`'s exit is complete; `unassigned` (normally zero) went to the reserve."""

    user: Address
    unassigned: Assets


@dataclass(frozen=True, slots=True)
class PayoutDeferredLog(ChainLog):
    """`recipient` refused a payout of `amount`; it is kept for it to claim."""

    recipient: Address
    amount: Assets


@dataclass(frozen=True, slots=True)
class PayoutClaimedLog(ChainLog):
    """`recipient` claimed its deferred payouts, `amount`, paid to `to`."""

    recipient: Address
    to: Address
    amount: Assets


ManagerLog = (
    ReserveDepositedLog
    | ReserveWithdrawnLog
    | ChannelRecordChangedLog
    | ChannelPaidOutLog
    | ChannelReopenedLog
    | ThreadDisputeChangedLog
    | ThreadSettledLog
    | PayoutDeferredLog
    | PayoutClaimedLog
)


def latest_records(
    logs: Iterable[ManagerLog], records: Mapping[Address, ChannelRecord] | None = None
) -> dict[Address, ChannelRecord]:
    """`records` (default: none) updated by the ChannelRecordChanged logs, in order.

    A user absent from the result has the genesis record, `ChannelRecord()`.
    """
    result = dict(records or {})
    for log in logs:
        if isinstance(log, ChannelRecordChangedLog):
            result[log.user] = log.record
    return result


def latest_disputes(
    logs: Iterable[ManagerLog], disputes: Mapping[bytes, ThreadDispute] | None = None
) -> dict[bytes, ThreadDispute]:
    """`disputes` (by thread leaf) updated by the ThreadDisputeChanged logs, in order."""
    result = dict(disputes or {})
    for log in logs:
        if isinstance(log, ThreadDisputeChangedLog):
            result[log.leaf] = log.dispute
    return result


@dataclass(frozen=True, slots=True)
class Receipt:
    """A mined, successful transaction. `logs`: the ChannelManager logs it emitted."""

    tx_hash: bytes
    block_number: int
    gas_used: int
    effective_gas_price: int
    contract_address: Address | None = None
    logs: tuple[ManagerLog, ...] = ()


@dataclass(frozen=True, slots=True)
class BlockInfo:
    number: int
    timestamp: int
    base_fee: int | None


SignatureLike = Signature | bytes


def _checksum(address: Address) -> ChecksumAddress:
    return cast(ChecksumAddress, address.checksum())


def _sig(value: SignatureLike) -> bytes:
    return value.raw if isinstance(value, Signature) else bytes(value)


# --- Library exceptions -> chain errors ---------------------------------------------------


def _revert_reason(exc: BaseException) -> str:
    """The revert string of a ContractLogicError or eth-tester TransactionFailed."""
    data = getattr(exc, "data", None)
    if isinstance(data, str) and data.startswith("0x"):
        try:
            raw = bytes.fromhex(data[2:])
        except ValueError:
            raw = b""
        if raw[:4] == ERROR_STRING_SELECTOR:
            try:
                (reason,) = abi_decode(["string"], raw[4:])
                return str(reason)
            except Exception:  # malformed revert data: fall back to the message
                pass
    message = getattr(exc, "message", None) or (exc.args[0] if exc.args else "")
    text = str(message)
    for prefix in ("execution reverted: ", "execution reverted"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    return "" if text in ("b''", 'b""') else text


def translate_error(exc: BaseException) -> ChainError:
    """The chain error for a library exception (`exc` is kept as the cause by callers)."""
    if isinstance(exc, ChainError):
        return exc
    if isinstance(exc, web3_errors.ContractLogicError | tester_errors.TransactionFailed):
        return ContractReverted(_revert_reason(exc))
    if isinstance(
        exc,
        requests.RequestException
        | OSError
        | TimeoutError
        | web3_errors.ProviderConnectionError
        | web3_errors.RequestTimedOut
        | web3_errors.BadResponseFormat
        | web3_errors.TooManyRequests,
    ):
        return ChainUnavailable(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, web3_errors.MethodUnavailable):
        return NotSupported(str(exc))
    if isinstance(
        exc,
        web3_errors.Web3RPCError
        | EthUtilsValidationError
        | tester_errors.ValidationError
        | web3_errors.InvalidTransaction,
    ):
        message = getattr(exc, "message", None) or str(exc)
        return RequestRejected(str(message))
    if isinstance(exc, WeftProtocolError):
        return ChainDataError(f"{type(exc).__name__}: {exc}")
    return ChainError(f"{type(exc).__name__}: {exc}")


def _guard(fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    try:
        return fn(*args)
    except ChainError:
        raise
    except Exception as exc:
        raise translate_error(exc) from exc


def _receipt(tx_hash: bytes, raw: Any) -> Receipt:
    created = raw.get("contractAddress")
    return Receipt(
        tx_hash=tx_hash,
        block_number=int(raw["blockNumber"]),
        gas_used=int(raw["gasUsed"]),
        effective_gas_price=int(raw.get("effectiveGasPrice") or 0),
        contract_address=Address.from_hex(created) if created else None,
    )


# --- The service ---------------------------------------------------------------------------


class ChainService:
    """Async access to one chain. Construct with `embedded()` or `from_url(url)`."""

    def __init__(
        self,
        w3: Web3,
        *,
        tester: EthereumTester | None = None,
        max_threads: int = 1,
        poll_interval: float = 0.05,
        receipt_timeout: float = 120.0,
        gas_margin_percent: int = 25,
        priority_fee: int | None = None,
        log_batch_blocks: int = 2_000,
        confirmations: int = 0,
        session: requests.Session | None = None,
    ) -> None:
        if max_threads < 1 or log_batch_blocks < 1 or confirmations < 0:
            raise ValueError("max_threads and log_batch_blocks must be >= 1, confirmations >= 0")
        self._w3 = w3
        self._tester = tester
        # eth-tester is not thread-safe: the embedded chain gets one thread at a time.
        self._limiter = trio.CapacityLimiter(1 if tester is not None else max_threads)
        self.poll_interval = poll_interval
        self.receipt_timeout = receipt_timeout
        self.gas_margin_percent = gas_margin_percent
        self.priority_fee = priority_fee
        self.log_batch_blocks = log_batch_blocks
        self.confirmations = confirmations
        self._session = session
        self._chain_id: int | None = None
        self._accounts: dict[bytes, LocalAccount] = {}
        self._accounts_lock = threading.Lock()
        self._nonces: dict[str, int] = {}
        self._send_locks: dict[str, trio.Lock] = {}

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def embedded(cls, *, gas_limit: int = EMBEDDED_GAS_LIMIT, **options: Any) -> ChainService:
        """A fresh in-process py-evm chain (eth-tester) with prefunded, unlocked accounts."""
        try:
            params = PyEVMBackend.generate_genesis_params({"gas_limit": gas_limit})
            tester = EthereumTester(PyEVMBackend(genesis_parameters=params))
            w3 = Web3(EthereumTesterProvider(tester))
        except Exception as exc:
            raise translate_error(exc) from exc
        return cls(w3, tester=tester, **options)

    @classmethod
    def from_url(cls, url: str, *, request_timeout: float = 10.0, **options: Any) -> ChainService:
        """A JSON-RPC HTTP(S) endpoint. Nothing is sent until the first call.

        Requests are not retried: a failure is `ChainUnavailable` at once, and the caller
        decides when to try again.
        """
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"not an http(s) JSON-RPC URL: {url!r}")
        session = requests.Session()
        provider = HTTPProvider(
            url,
            request_kwargs={"timeout": request_timeout},
            session=session,
            exception_retry_configuration=None,
        )
        return cls(Web3(provider), session=session, **options)

    def close(self) -> None:
        """Release the HTTP session (if any)."""
        if self._session is not None:
            self._session.close()

    @property
    def is_embedded(self) -> bool:
        return self._tester is not None

    @property
    def limiter(self) -> trio.CapacityLimiter:
        return self._limiter

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call in a worker thread; library exceptions become chain errors."""
        return await trio.to_thread.run_sync(_guard, fn, args, limiter=self._limiter)

    # --- reads -------------------------------------------------------------------------------

    async def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = int(await self.run(lambda: self._w3.eth.chain_id))
        return self._chain_id

    async def block_number(self) -> int:
        return int(await self.run(lambda: self._w3.eth.block_number))

    async def latest_block(self) -> BlockInfo:
        return await self.run(self._sync_latest_block)

    async def timestamp(self) -> int:
        """Timestamp of the latest block."""
        return (await self.latest_block()).timestamp

    async def eth_balance(self, owner: Address) -> int:
        return int(await self.run(self._w3.eth.get_balance, owner.checksum()))

    async def code_at(self, address: Address) -> bytes:
        """The runtime code deployed at `address` (empty for an account without code)."""
        return bytes(await self.run(self._w3.eth.get_code, _checksum(address)))

    async def pending_nonce(self, owner: Address) -> int:
        """The chain's count of `owner`'s transactions, pending ones included."""
        return int(await self.run(self._w3.eth.get_transaction_count, owner.checksum(), "pending"))

    def _sync_latest_block(self) -> BlockInfo:
        block = self._w3.eth.get_block("latest")
        base_fee = block.get("baseFeePerGas")
        return BlockInfo(
            number=int(block["number"]),
            timestamp=int(block["timestamp"]),
            base_fee=None if base_fee is None else int(base_fee),
        )

    # --- accounts ----------------------------------------------------------------------------

    def account(self, private_key: bytes) -> LocalAccount:
        """The eth-account signer of a 32-byte private key (cached)."""
        with self._accounts_lock:
            account = self._accounts.get(private_key)
            if account is None:
                if type(private_key) is not bytes or len(private_key) != 32:
                    raise ValueError("a private key is 32 bytes")
                try:
                    account = Account.from_key(private_key)
                except Exception as exc:  # zero or not below the curve order
                    raise ValueError("not a valid secp256k1 private key") from exc
                self._accounts[private_key] = account
            return account

    def address_of(self, private_key: bytes) -> Address:
        return Address.from_hex(self.account(private_key).address)

    # --- transactions ------------------------------------------------------------------------

    async def transact(
        self,
        *,
        sender_key: bytes,
        to: Address | None,
        data: bytes = b"",
        value: int = 0,
        gas: int | None = None,
    ) -> Receipt:
        """Sign and send one transaction, wait for its receipt.

        `to` None deploys `data`. `gas` None estimates it (a revert raises
        `ContractReverted` and sends nothing). Raises `TransactionFailed` if it is mined
        but fails, `ReceiptTimeout` if not mined in `receipt_timeout` seconds.
        """
        receipt, _ = await self._transact_raw(sender_key, to, data, value, gas)
        return receipt

    async def _transact_raw(
        self, sender_key: bytes, to: Address | None, data: bytes, value: int, gas: int | None
    ) -> tuple[Receipt, list[Any]]:
        tx_hash = await self.submit(sender_key=sender_key, to=to, data=data, value=value, gas=gas)
        try:
            raw = await self._wait_raw(tx_hash, self.receipt_timeout)
        except ReceiptTimeout:
            self._nonces.pop(self.account(sender_key).address, None)
            raise
        return _receipt(tx_hash, raw), list(raw["logs"])

    async def submit(
        self,
        *,
        sender_key: bytes,
        to: Address | None,
        data: bytes = b"",
        value: int = 0,
        gas: int | None = None,
    ) -> bytes:
        """Sign and send one transaction with the sender's next nonce; its hash.

        Transactions of one sender are submitted one at a time, in call order.
        """
        account = self.account(sender_key)
        chain_id = await self.chain_id()
        lock = self._send_locks.setdefault(account.address, trio.Lock())
        async with lock:
            try:
                return await self.run(self._sync_submit, chain_id, account, to, data, value, gas)
            except BaseException:
                self._nonces.pop(account.address, None)  # re-read from the chain next time
                raise

    def _sync_submit(
        self,
        chain_id: int,
        account: LocalAccount,
        to: Address | None,
        data: bytes,
        value: int,
        gas: int | None,
    ) -> bytes:
        w3 = self._w3
        sender = account.address
        call: dict[str, Any] = {"from": sender, "value": value, "data": data}
        if to is not None:
            call["to"] = to.checksum()
        block = w3.eth.get_block("latest")
        if gas is None:
            estimate = int(w3.eth.estimate_gas(call))  # type: ignore[arg-type]
            gas = estimate + estimate * self.gas_margin_percent // 100
            gas = min(gas, int(block["gasLimit"]))
        nonce = self._nonces.get(sender)
        if nonce is None:
            nonce = int(w3.eth.get_transaction_count(sender, "pending"))
        tx: dict[str, Any] = {**call, "nonce": nonce, "gas": gas, "chainId": chain_id}
        base_fee = block.get("baseFeePerGas")
        if base_fee is None:  # pre-London chain: legacy pricing
            tx["gasPrice"] = int(w3.eth.gas_price)
        else:
            priority = self._sync_priority_fee()
            tx["maxPriorityFeePerGas"] = priority
            tx["maxFeePerGas"] = 2 * int(base_fee) + priority
            tx["type"] = 2
        signed = account.sign_transaction(tx)
        tx_hash = bytes(w3.eth.send_raw_transaction(signed.raw_transaction))
        self._nonces[sender] = nonce + 1
        return tx_hash

    def _sync_priority_fee(self) -> int:
        if self.priority_fee is not None:
            return self.priority_fee
        try:
            return int(self._w3.eth.max_priority_fee)
        except Exception:  # the node does not offer a suggestion
            return DEFAULT_PRIORITY_FEE

    async def wait_for_receipt(self, tx_hash: bytes, timeout: float | None = None) -> Receipt:
        """Poll for `tx_hash`'s receipt; `TransactionFailed` if it failed."""
        limit = self.receipt_timeout if timeout is None else timeout
        return _receipt(tx_hash, await self._wait_raw(tx_hash, limit))

    async def _wait_raw(self, tx_hash: bytes, timeout: float) -> Any:
        deadline = trio.current_time() + timeout
        while True:
            raw = await self.run(self._sync_receipt, tx_hash)
            if raw is not None:
                break
            if trio.current_time() >= deadline:
                raise ReceiptTimeout(tx_hash, timeout)
            await trio.sleep(self.poll_interval)
        if int(raw["status"]) != 1:
            raise TransactionFailed(tx_hash, int(raw["blockNumber"]), int(raw["gasUsed"]))
        return raw

    def _sync_receipt(self, tx_hash: bytes) -> Any:
        try:
            return self._w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
        except (web3_errors.TransactionNotFound, tester_errors.TransactionNotFound):
            return None

    async def send_eth(self, to: Address, amount: int, *, sender_key: bytes) -> Receipt:
        return await self.transact(sender_key=sender_key, to=to, value=amount)

    # --- contracts -----------------------------------------------------------------------------

    async def deploy_with_receipt(
        self, artifact: Artifact, *args: Any, sender_key: bytes, value: int = 0
    ) -> Receipt:
        """Deploy `artifact` with constructor `args`; the receipt (with the address)."""
        data = _guard(self._constructor_data, (artifact, args))
        receipt = await self.transact(sender_key=sender_key, to=None, data=data, value=value)
        if receipt.contract_address is None:
            raise ChainDataError(f"deployment of {artifact.name} has no contract address")
        return receipt

    async def deploy(
        self, artifact: Artifact, *args: Any, sender_key: bytes, value: int = 0
    ) -> Address:
        """Deploy `artifact` with constructor `args`; its address."""
        receipt = await self.deploy_with_receipt(
            artifact, *args, sender_key=sender_key, value=value
        )
        assert receipt.contract_address is not None
        return receipt.contract_address

    def _constructor_data(self, artifact: Artifact, args: tuple[Any, ...]) -> bytes:
        factory = self._w3.eth.contract(abi=artifact.abi_list(), bytecode=artifact.bytecode)
        data = factory.constructor(*args).data_in_transaction
        return bytes.fromhex(data[2:] if data.startswith("0x") else data)

    async def deploy_token(self, name: str, symbol: str, *, sender_key: bytes) -> TokenClient:
        """Deploy a TestToken (its deployer may mint)."""
        address = await self.deploy(load_artifact(TEST_TOKEN), name, symbol, sender_key=sender_key)
        return self.token(address)

    async def deploy_channel_manager(
        self, hub: Address, token: Address, challenge_period: int, *, sender_key: bytes
    ) -> ManagerClient:
        receipt = await self.deploy_with_receipt(
            load_artifact(CHANNEL_MANAGER),
            hub.checksum(),
            token.checksum(),
            challenge_period,
            sender_key=sender_key,
        )
        assert receipt.contract_address is not None
        return self.manager(receipt.contract_address, deployed_block=receipt.block_number)

    def manager(self, address: Address, *, deployed_block: int | None = None) -> ManagerClient:
        return ManagerClient(self, address, deployed_block=deployed_block)

    def token(self, address: Address) -> TokenClient:
        return TokenClient(self, address)

    def contract(self, artifact: Artifact, address: Address) -> Any:
        """The web3 contract object (for building calls; use it through `run`)."""
        return self._w3.eth.contract(address=_checksum(address), abi=artifact.abi_list())

    # --- test and devnet utilities ---------------------------------------------------------

    async def fund(self, to: Address, amount: int) -> Receipt:
        """Send `amount` wei from the chain's first prefunded unlocked account.

        Works on the embedded chain, anvil and dev-mode nodes; `NotSupported` elsewhere.
        """
        tx_hash = await self.run(self._sync_fund, to, amount)
        return await self.wait_for_receipt(tx_hash)

    def _sync_fund(self, to: Address, amount: int) -> bytes:
        accounts = self._w3.eth.accounts
        if not accounts:
            raise NotSupported("the chain has no unlocked accounts to fund from")
        tx = {"from": accounts[0], "to": to.checksum(), "value": amount}
        return bytes(self._w3.eth.send_transaction(tx))  # type: ignore[arg-type]

    async def advance_time(self, seconds: int) -> int:
        """Move the chain's clock forward by `seconds` and mine a block; its timestamp.

        Embedded: eth-tester's time travel. Otherwise `evm_increaseTime` + `evm_mine`
        (anvil, hardhat); `NotSupported` where those are missing.
        """
        if seconds < 0:
            raise ValueError("cannot travel back in time")
        await self.run(self._sync_advance_time, seconds)
        return await self.timestamp()

    def _sync_advance_time(self, seconds: int) -> None:
        target = int(self._w3.eth.get_block("latest")["timestamp"]) + seconds
        if self._tester is not None:
            pending = int(self._tester.get_block_by_number("pending")["timestamp"])
            # eth-tester 0.14.0b1 mines the block at `to_timestamp - 1` (its pending block
            # then sits at `to_timestamp`), hence the + 1.
            self._tester.time_travel(max(target + 1, pending + 1))
        else:
            self._rpc("evm_increaseTime", [seconds])
            self._rpc("evm_mine", [])
        reached = int(self._w3.eth.get_block("latest")["timestamp"])
        if reached < target:
            raise ChainError(f"time travel reached {reached}, short of {target}")

    def _rpc(self, method: str, params: list[Any]) -> Any:
        response = self._w3.provider.make_request(method, params)  # type: ignore[arg-type]
        if "error" in response:
            raise NotSupported(f"{method}: {response['error']}")
        return response.get("result")

    async def mine(self) -> None:
        """Mine one empty block."""
        await self.run(self._sync_mine)

    def _sync_mine(self) -> None:
        if self._tester is not None:
            self._tester.mine_blocks(1)
        else:
            self._rpc("evm_mine", [])


# --- Contract clients -----------------------------------------------------------------------


class _ContractClient:
    artifact_name: str

    def __init__(self, service: ChainService, address: Address) -> None:
        self.service = service
        self.address = address
        self._contract = service.contract(load_artifact(self.artifact_name), address)

    async def _view(self, fn: str, *args: Any) -> Any:
        return await self.service.run(lambda: getattr(self._contract.functions, fn)(*args).call())

    def _encode(self, fn: str, args: Sequence[Any]) -> bytes:
        def encode() -> bytes:
            data: str = self._contract.encode_abi(fn, args=list(args))
            return bytes.fromhex(data[2:] if data.startswith("0x") else data)

        return _guard(encode, ())

    async def _send(
        self,
        fn: str,
        args: Sequence[Any],
        *,
        sender_key: bytes,
        value: int = 0,
        gas: int | None = None,
    ) -> Receipt:
        data = self._encode(fn, args)
        return await self.service.transact(
            sender_key=sender_key, to=self.address, data=data, value=value, gas=gas
        )


class TokenClient(_ContractClient):
    """An ERC20 token (TestToken's `mint` only works on a TestToken, for its minter)."""

    artifact_name = TEST_TOKEN

    async def balance_of(self, owner: Address) -> int:
        return int(await self._view("balanceOf", owner.checksum()))

    async def allowance(self, owner: Address, spender: Address) -> int:
        return int(await self._view("allowance", owner.checksum(), spender.checksum()))

    async def approve(self, spender: Address, amount: int, *, sender_key: bytes) -> Receipt:
        return await self._send("approve", [spender.checksum(), amount], sender_key=sender_key)

    async def transfer(self, to: Address, amount: int, *, sender_key: bytes) -> Receipt:
        return await self._send("transfer", [to.checksum(), amount], sender_key=sender_key)

    async def mint(self, to: Address, amount: int, *, sender_key: bytes) -> Receipt:
        return await self._send("mint", [to.checksum(), amount], sender_key=sender_key)


class ManagerClient(_ContractClient):
    """One deployed ChannelManager: typed calls, views and decoded logs.

    Every transaction method takes the sender's private key (`sender_key`) and, for tests,
    an optional fixed `gas` that skips the estimate (so a reverting call is mined and
    raises `TransactionFailed` instead of `ContractReverted`). Each returns the `Receipt`
    with the ChannelManager logs the transaction emitted.
    """

    artifact_name = CHANNEL_MANAGER

    def __init__(
        self, service: ChainService, address: Address, *, deployed_block: int | None = None
    ) -> None:
        super().__init__(service, address)
        self.deployed_block = deployed_block
        abi = load_artifact(CHANNEL_MANAGER).abi
        self._events_by_topic: dict[bytes, str] = {
            bytes(event_abi_to_log_topic(entry)): str(entry["name"])  # type: ignore[arg-type]
            for entry in abi
            if entry.get("type") == "event"
        }
        self._struct_fields: dict[tuple[str, str], tuple[str, ...]] = {
            (str(entry["name"]), str(arg["name"])): tuple(
                str(c["name"]) for c in arg.get("components", ())
            )
            for entry in abi
            if entry.get("type") == "event"
            for arg in entry.get("inputs", ())
            if arg.get("type") == "tuple"
        }

    # --- views ---------------------------------------------------------------------------------

    async def domain(self) -> Domain:
        """The EIP-712 domain every signature for this manager is bound to."""
        return Domain(await self.service.chain_id(), self.address)

    async def domain_separator(self) -> bytes:
        return bytes(await self._view("domainSeparator"))

    async def hub(self) -> Address:
        return Address.from_hex(await self._view("hub"))

    async def token_address(self) -> Address:
        return Address.from_hex(await self._view("token"))

    async def challenge_period(self) -> int:
        return int(await self._view("challengePeriod"))

    async def reserve(self) -> Assets:
        def read() -> Assets:
            f = self._contract.functions
            return Assets(int(f.reserveEth().call()), int(f.reserveToken().call()))

        return await self.service.run(read)

    async def channel_record_hash(self, user: Address) -> bytes:
        """keccak(abi.encode(record)) of `user`'s current record; 32 zero bytes for genesis."""
        return bytes(await self._view("channelRecordHash", user.checksum()))

    async def thread_dispute_hash(self, leaf: bytes) -> bytes:
        return bytes(await self._view("threadDisputeHash", leaf))

    async def thread_settled(self, user: Address, leaf: bytes) -> bool:
        return bool(await self._view("threadSettled", settled_key(user, leaf)))

    # --- hub reserve ----------------------------------------------------------------------------

    async def hub_deposit(
        self, amount: Assets, *, sender_key: bytes, gas: int | None = None
    ) -> Receipt:
        """Add `amount` to the hub's reserve (the token part is pulled: approve it first)."""
        return await self._send(
            "hubDeposit", [amount.token], sender_key=sender_key, value=amount.eth, gas=gas
        )

    async def hub_withdraw(
        self, recipient: Address, amount: Assets, *, sender_key: bytes, gas: int | None = None
    ) -> Receipt:
        return await self._send(
            "hubWithdraw",
            [recipient.checksum(), amount.eth, amount.token],
            sender_key=sender_key,
            gas=gas,
        )

    # --- authorized updates ------------------------------------------------------------------

    async def hub_authorized_update(
        self,
        record: ChannelRecord,
        state: ChannelState,
        sig_hub: SignatureLike,
        sig_user: SignatureLike,
        *,
        sender_key: bytes,
        gas: int | None = None,
    ) -> Receipt:
        args = [record.as_abi(), channel_state_abi(state), _sig(sig_hub), _sig(sig_user)]
        return await self._send("hubAuthorizedUpdate", args, sender_key=sender_key, gas=gas)

    async def user_authorized_update(
        self,
        record: ChannelRecord,
        state: ChannelState,
        sig_hub: SignatureLike,
        sig_user: SignatureLike,
        *,
        sender_key: bytes,
        value: int | None = None,
        gas: int | None = None,
    ) -> Receipt:
        """Sent by the user; `value` defaults to the state's pending user ETH deposit."""
        args = [record.as_abi(), channel_state_abi(state), _sig(sig_hub), _sig(sig_user)]
        eth = state.pending_deposit_user.eth if value is None else value
        return await self._send(
            "userAuthorizedUpdate", args, sender_key=sender_key, value=eth, gas=gas
        )

    # --- channel exit -------------------------------------------------------------------------

    async def start_exit(
        self, user: Address, record: ChannelRecord, *, sender_key: bytes, gas: int | None = None
    ) -> Receipt:
        args = [user.checksum(), record.as_abi()]
        return await self._send("startExit", args, sender_key=sender_key, gas=gas)

    async def start_exit_with_update(
        self,
        record: ChannelRecord,
        state: ChannelState,
        sig_hub: SignatureLike,
        sig_user: SignatureLike,
        *,
        sender_key: bytes,
        gas: int | None = None,
    ) -> Receipt:
        args = [record.as_abi(), channel_state_abi(state), _sig(sig_hub), _sig(sig_user)]
        return await self._send("startExitWithUpdate", args, sender_key=sender_key, gas=gas)

    async def challenge_exit(
        self,
        record: ChannelRecord,
        state: ChannelState,
        sig_hub: SignatureLike,
        sig_user: SignatureLike,
        *,
        sender_key: bytes,
        gas: int | None = None,
    ) -> Receipt:
        args = [record.as_abi(), channel_state_abi(state), _sig(sig_hub), _sig(sig_user)]
        return await self._send("challengeExit", args, sender_key=sender_key, gas=gas)

    async def empty_channel(
        self, user: Address, record: ChannelRecord, *, sender_key: bytes, gas: int | None = None
    ) -> Receipt:
        args = [user.checksum(), record.as_abi()]
        return await self._send("emptyChannel", args, sender_key=sender_key, gas=gas)

    # --- thread exit --------------------------------------------------------------------------

    async def start_thread_exit(
        self,
        user: Address,
        record: ChannelRecord,
        initial: ThreadState,
        proof: Sequence[bytes],
        *,
        sender_key: bytes,
        gas: int | None = None,
    ) -> Receipt:
        args = [user.checksum(), record.as_abi(), thread_state_abi(initial), list(proof)]
        return await self._send("startThreadExit", args, sender_key=sender_key, gas=gas)

    async def start_thread_exit_with_update(
        self,
        user: Address,
        record: ChannelRecord,
        initial: ThreadState,
        proof: Sequence[bytes],
        latest: ThreadState,
        sig_sender: SignatureLike,
        sig_receiver: SignatureLike,
        *,
        sender_key: bytes,
        gas: int | None = None,
    ) -> Receipt:
        args = [
            user.checksum(),
            record.as_abi(),
            thread_state_abi(initial),
            list(proof),
            thread_state_abi(latest),
            _sig(sig_sender),
            _sig(sig_receiver),
        ]
        return await self._send("startThreadExitWithUpdate", args, sender_key=sender_key, gas=gas)

    async def challenge_thread(
        self,
        initial: ThreadState,
        dispute: ThreadDispute,
        latest: ThreadState,
        sig_sender: SignatureLike,
        sig_receiver: SignatureLike,
        *,
        sender_key: bytes,
        gas: int | None = None,
    ) -> Receipt:
        args = [
            thread_state_abi(initial),
            dispute.as_abi(),
            thread_state_abi(latest),
            _sig(sig_sender),
            _sig(sig_receiver),
        ]
        return await self._send("challengeThread", args, sender_key=sender_key, gas=gas)

    async def settle_thread(
        self,
        user: Address,
        record: ChannelRecord,
        initial: ThreadState,
        proof: Sequence[bytes],
        dispute: ThreadDispute,
        *,
        sender_key: bytes,
        gas: int | None = None,
    ) -> Receipt:
        args = [
            user.checksum(),
            record.as_abi(),
            thread_state_abi(initial),
            list(proof),
            dispute.as_abi(),
        ]
        return await self._send("settleThread", args, sender_key=sender_key, gas=gas)

    async def _send(
        self,
        fn: str,
        args: Sequence[Any],
        *,
        sender_key: bytes,
        value: int = 0,
        gas: int | None = None,
    ) -> Receipt:
        receipt, raw_logs = await self.service._transact_raw(
            sender_key, self.address, self._encode(fn, args), value, gas
        )
        return Receipt(
            tx_hash=receipt.tx_hash,
            block_number=receipt.block_number,
            gas_used=receipt.gas_used,
            effective_gas_price=receipt.effective_gas_price,
            logs=tuple(self._decode_logs(raw_logs)),
        )

    # --- logs ----------------------------------------------------------------------------------

    async def events_since(
        self, cursor: int, *, max_blocks: int | None = None
    ) -> tuple[list[ManagerLog], int]:
        """The manager's logs in blocks `cursor`.. (at most `max_blocks`, default the
        service's `log_batch_blocks`), up to the latest block less `confirmations`.

        Returns the logs in (block, log index) order and the next cursor (the first block
        not yet read). When nothing new is mined, ([], cursor). The caller persists the
        cursor; start from `deployed_block` (or 0).
        """
        if cursor < 0:
            raise ValueError("cursor must be >= 0")
        batch = self.service.log_batch_blocks if max_blocks is None else max_blocks
        if batch < 1:
            raise ValueError("max_blocks must be >= 1")
        raw_logs, next_cursor = await self.service.run(self._sync_logs, cursor, batch)
        return self._decode_logs(raw_logs), next_cursor

    def _sync_logs(self, cursor: int, batch: int) -> tuple[list[Any], int]:
        w3 = self.service._w3
        head = int(w3.eth.block_number) - self.service.confirmations
        if cursor > head:
            return [], cursor
        to_block = min(head, cursor + batch - 1)
        logs = w3.eth.get_logs(
            {
                "address": _checksum(self.address),
                "fromBlock": cursor,
                "toBlock": to_block,
            }
        )
        return list(logs), to_block + 1

    def _decode_logs(self, raw_logs: Iterable[Any]) -> list[ManagerLog]:
        decoded: list[ManagerLog] = []
        for raw in raw_logs:
            if raw.get("removed"):
                continue
            if Address.from_hex(raw["address"]) != self.address or not raw["topics"]:
                continue
            name = self._events_by_topic.get(bytes(raw["topics"][0]))
            if name is None:
                continue
            try:
                decoded.append(self._decode_log(name, raw))
            except ChainError:
                raise
            except Exception as exc:
                raise ChainDataError(f"cannot decode {name} log: {exc}") from exc
        decoded.sort(key=lambda log: (log.block_number, log.log_index))
        return decoded

    def _struct(self, event: str, arg: str, value: Any) -> tuple[object, ...]:
        if isinstance(value, Mapping):
            return tuple(value[name] for name in self._struct_fields[(event, arg)])
        return tuple(value)

    def _decode_log(self, name: str, raw: Any) -> ManagerLog:
        event = getattr(self._contract.events, name)().process_log(raw)
        a = event["args"]
        at = (int(raw["blockNumber"]), int(raw["logIndex"]), bytes(raw["transactionHash"]))
        if name == "ChannelRecordChanged":
            record = ChannelRecord.from_abi(self._struct(name, "record", a["record"]))
            return ChannelRecordChangedLog(
                *at,
                user=Address.from_hex(a["user"]),
                action=Action(a["action"]),
                caller=Address.from_hex(a["caller"]),
                record=record,
            )
        if name == "ThreadDisputeChanged":
            dispute = ThreadDispute.from_abi(self._struct(name, "dispute", a["dispute"]))
            return ThreadDisputeChangedLog(
                *at,
                leaf=bytes(a["leaf"]),
                action=Action(a["action"]),
                caller=Address.from_hex(a["caller"]),
                sender=Address.from_hex(a["sender"]),
                receiver=Address.from_hex(a["receiver"]),
                thread_id=int(a["threadId"]),
                dispute=dispute,
            )
        if name == "ReserveDeposited":
            return ReserveDepositedLog(
                *at,
                amount=Assets(a["amountEth"], a["amountToken"]),
                reserve=Assets(a["reserveEth"], a["reserveToken"]),
            )
        if name == "ReserveWithdrawn":
            return ReserveWithdrawnLog(
                *at,
                recipient=Address.from_hex(a["recipient"]),
                amount=Assets(a["amountEth"], a["amountToken"]),
                reserve=Assets(a["reserveEth"], a["reserveToken"]),
            )
        if name == "ChannelPaidOut":
            return ChannelPaidOutLog(
                *at,
                user=Address.from_hex(a["user"]),
                to_user=Assets(a["userEth"], a["userToken"]),
                to_hub=Assets(a["hubEth"], a["hubToken"]),
            )
        if name == "ThreadSettled":
            return ThreadSettledLog(
                *at,
                user=Address.from_hex(a["user"]),
                leaf=bytes(a["leaf"]),
                to_user=Assets(a["userEth"], a["userToken"]),
                to_hub=Assets(a["hubEth"], a["hubToken"]),
            )
        if name == "ChannelReopened":
            return ChannelReopenedLog(
                *at,
                user=Address.from_hex(a["user"]),
                unassigned=Assets(a["unassignedEth"], a["unassignedToken"]),
            )
        if name == "PayoutDeferred":
            return PayoutDeferredLog(
                *at,
                recipient=Address.from_hex(a["recipient"]),
                amount=Assets(a["amountEth"], a["amountToken"]),
            )
        if name == "PayoutClaimed":
            return PayoutClaimedLog(
                *at,
                recipient=Address.from_hex(a["recipient"]),
                to=Address.from_hex(a["to"]),
                amount=Assets(a["amountEth"], a["amountToken"]),
            )
        raise ChainDataError(f"unknown ChannelManager event {name}")
