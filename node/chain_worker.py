"""The engine's link to the chain: the ChannelManager's logs in, authorized updates out.

`ChainWatcher` follows the manager's logs from a cursor (a block number) and a set of
channel records, both persisted by the engine. `poll` reads what was mined since the
cursor and returns it as a `ChainUpdate` without changing the watcher; the engine persists
the update and then calls `advance(update)`. A crash between the two re-reads the same
blocks (at-least-once delivery; the engine's inputs are idempotent).

`ChainSubmitter` performs the on-chain effects of the protocol for one node (one key):
`submit_authorized_update` sends a double-signed pending state by the party that must send
it (SPEC.md, "Two-phase deposits and withdrawals"), and reports the outcome as a
`SubmitResult` value; chain errors never escape it. `hub_deposit` and `reserve` serve the
hub's reserve.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import trio

from node.chain import (
    Action,
    ChannelRecordChangedLog,
    ManagerClient,
    ManagerLog,
    Receipt,
    TokenClient,
    latest_records,
)
from node.chain_errors import ChainError, ChainUnavailable, ContractReverted, TransactionFailed
from protocols.channel import SignedChannelState
from protocols.onchain import GENESIS_RECORD, ChannelRecord, record_hash
from protocols.types import Address, Assets, ChannelState

if TYPE_CHECKING:
    # The trio stubs that libp2p brings in (trio-typing) shadow trio's own annotations and
    # keep TaskStatus there.
    from trio_typing import TaskStatus

__all__ = [
    "RECORD_NOT_CURRENT",
    "ChainStatus",
    "ChainSubmitter",
    "ChainUpdate",
    "ChainWatcher",
    "NotSubmittable",
    "SubmitAlreadyExecuted",
    "SubmitError",
    "SubmitFailed",
    "SubmitMined",
    "SubmitResult",
    "WrongSubmitter",
]

# The contract's revert reason when the record passed is not the stored one (another
# transaction changed the channel first). Not among the reasons `protocols.onchain` models,
# since the model is handed the current record.
RECORD_NOT_CURRENT = "record is not the channel's current record"

_EXECUTING_ACTIONS = (Action.HUB_UPDATE, Action.USER_UPDATE)


# --- Watcher ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChainUpdate:
    """What the blocks `from_cursor` .. `cursor - 1` hold for the manager.

    `timestamp`: that of block `cursor - 1`, the last block read (so every log of a block is
    reported no later than its time). `records`: the latest record of each user whose
    record changed in these blocks. `executed`: (user, tx_count_onchain) of each executed
    authorized update, in log order. `logs`: every manager log, in (block, index) order.
    """

    from_cursor: int
    cursor: int
    timestamp: int
    records: Mapping[Address, ChannelRecord]
    executed: tuple[tuple[Address, int], ...]
    logs: tuple[ManagerLog, ...]


@dataclass(frozen=True, slots=True)
class ChainStatus:
    """The chain became unreachable (`available` False) or reachable again (True)."""

    available: bool
    detail: str


Deliver = Callable[[ChainUpdate | ChainStatus], Awaitable[None]]


class ChainWatcher:
    """Follows one ChannelManager's logs from a persisted cursor and records.

    `cursor`: the first block not yet read (start at the manager's deployment block).
    `records`: each channel's record as of `cursor`; a user absent from it has the genesis
    record. Only `advance` changes the watcher.
    """

    def __init__(
        self,
        manager: ManagerClient,
        cursor: int,
        records: Mapping[Address, ChannelRecord] | None = None,
    ) -> None:
        if cursor < 0:
            raise ValueError("cursor must be >= 0")
        self.manager = manager
        self._cursor = cursor
        self._records: dict[Address, ChannelRecord] = dict(records or {})
        self._records_view = MappingProxyType(self._records)

    @property
    def cursor(self) -> int:
        return self._cursor

    @property
    def records(self) -> Mapping[Address, ChannelRecord]:
        """Every channel record seen so far (read-only; absent users are at genesis)."""
        return self._records_view

    def record_of(self, user: Address) -> ChannelRecord:
        """`user`'s record as of the cursor (the genesis record if never changed)."""
        return self._records.get(user, GENESIS_RECORD)

    async def poll(self) -> ChainUpdate | None:
        """Read the blocks mined since the cursor (at most the service's log batch).

        Returns None when no new block is there. Does not change the watcher: until
        `advance` is called, every poll starts again from the same cursor. Raises the
        chain errors of `node.chain_errors` (`ChainUnavailable` when unreachable).
        """
        service = self.manager.service
        cursor = self._cursor
        latest = await service.latest_block()
        last = latest.number - service.confirmations
        if last < cursor:
            return None
        batch = min(service.log_batch_blocks, last - cursor + 1)
        logs, next_cursor = await self.manager.events_since(cursor, max_blocks=batch)
        if next_cursor <= cursor:
            return None  # the head moved back (a reorganisation) since it was read
        if next_cursor - 1 == latest.number:
            timestamp = latest.timestamp
        else:  # a catch-up batch, or confirmations: the last block read is not the latest
            timestamp = await _block_timestamp(self.manager, next_cursor - 1)
        executed = tuple(
            (log.user, log.record.tx_count_onchain)
            for log in logs
            if isinstance(log, ChannelRecordChangedLog) and log.action in _EXECUTING_ACTIONS
        )
        return ChainUpdate(
            from_cursor=cursor,
            cursor=next_cursor,
            timestamp=timestamp,
            records=MappingProxyType(latest_records(logs)),
            executed=executed,
            logs=tuple(logs),
        )

    def advance(self, update: ChainUpdate) -> None:
        """Take `update` (from `poll`, once persisted) as read: move the cursor past it.

        Raises ValueError if `update` was not read from the current cursor.
        """
        if update.from_cursor != self._cursor:
            raise ValueError(
                f"update read from block {update.from_cursor}, the cursor is at {self._cursor}"
            )
        self._records.update(update.records)
        self._cursor = update.cursor

    async def fresh_record(self, user: Address) -> ChannelRecord:
        """`user`'s record as far as one `poll` reads now, without advancing the watcher."""
        update = await self.poll()
        if update is not None and user in update.records:
            return update.records[user]
        return self.record_of(user)

    async def run(
        self,
        deliver: Deliver,
        interval: float = 0.2,
        *,
        max_backoff: float = 10.0,
        task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Poll forever: each new `ChainUpdate` is passed to `await deliver(update)`, which
        persists it and calls `advance(update)`; then wait `interval` seconds.

        If `deliver` returns without advancing, the same blocks come again at the next
        poll. `ChainUnavailable` is not raised: polls are retried with a doubling backoff
        (up to `max_backoff` seconds), and the outage is delivered once as
        `ChainStatus(False, detail)`, its end as `ChainStatus(True, ...)`. Any other chain
        error, and whatever `deliver` raises, propagates. Started (`task_status`) once
        the first poll's outcome was delivered. Cancellation stops it between or during
        polls; an update not advanced is read again by the next watcher.
        """
        started = False
        unavailable = False
        backoff = interval
        while True:
            try:
                update = await self.poll()
            except ChainUnavailable as exc:
                if not unavailable:
                    unavailable = True
                    await deliver(ChainStatus(False, str(exc)))
                if not started:
                    started = True
                    task_status.started()
                await trio.sleep(backoff)
                backoff = min(max(backoff * 2, interval), max_backoff)
                continue
            backoff = interval
            if unavailable:
                unavailable = False
                await deliver(ChainStatus(True, "chain reachable again"))
            if update is not None:
                await deliver(update)
            if not started:
                started = True
                task_status.started()
            await trio.sleep(interval)


async def _block_timestamp(manager: ManagerClient, number: int) -> int:
    """Timestamp of block `number`.

    ChainService reads only the latest block; this reaches into its web3 object (through
    `run`, so errors are still chain errors) until it offers a read by number.
    """
    service = manager.service
    w3 = service._w3

    def read() -> int:
        return int(w3.eth.get_block(number)["timestamp"])

    return await service.run(read)


# --- Submitter -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubmitMined:
    """The update of `user`'s channel at `tx_count_onchain` was mined and executed."""

    user: Address
    tx_count_onchain: int
    tx_hash: bytes
    block_number: int
    gas_used: int


@dataclass(frozen=True, slots=True)
class SubmitAlreadyExecuted:
    """Nothing was sent: the contract already executed an update of `user`'s channel at
    `executed_tx_count_onchain` >= this state's `tx_count_onchain` (typically this very
    state, submitted again after a restart)."""

    user: Address
    tx_count_onchain: int
    executed_tx_count_onchain: int


@dataclass(frozen=True, slots=True)
class SubmitFailed:
    """The update was not executed. `revert`: the contract refused it (`reason` is its
    revert string, or the failed transaction when mined without one); otherwise the chain
    was unreachable or refused the request (`reason` says how). A `ReceiptTimeout` is a
    failure with `revert` False whose transaction may still be mined later."""

    user: Address
    tx_count_onchain: int
    reason: str
    revert: bool


SubmitResult = SubmitMined | SubmitAlreadyExecuted | SubmitFailed


class SubmitError(Exception):
    """The submitter was asked for something it must not do (a local bug, not the chain)."""


class WrongSubmitter(SubmitError):
    """This node's key is not the party that must send this transaction."""

    def __init__(self, what: str, expected: Address, actual: Address) -> None:
        super().__init__(f"{what} must be sent by {expected}, this node is {actual}")
        self.expected = expected
        self.actual = actual


class NotSubmittable(SubmitError):
    """The state cannot be executed: not double-signed, or nothing pending."""


class ChainSubmitter:
    """Sends one node's transactions to the manager, one at a time (nonces are per sender).

    `watcher` supplies the channel records passed to the contract; the submitter only
    reads it (it polls without advancing when a record turns out stale).
    """

    def __init__(self, manager: ManagerClient, watcher: ChainWatcher, sender_key: bytes) -> None:
        self.manager = manager
        self.watcher = watcher
        self._key = sender_key
        self.address = manager.service.address_of(sender_key)
        self._lock = trio.Lock()
        self._hub: Address | None = None
        self._token: TokenClient | None = None

    async def hub(self) -> Address:
        """The manager's hub (read once)."""
        if self._hub is None:
            self._hub = await self.manager.hub()
        return self._hub

    async def token(self) -> TokenClient:
        """The manager's token (read once)."""
        if self._token is None:
            self._token = self.manager.service.token(await self.manager.token_address())
        return self._token

    async def submit_authorized_update(self, latest: SignedChannelState) -> SubmitResult:
        """Execute the pending operations of the double-signed `latest` on-chain.

        With a pending user deposit the user sends `userAuthorizedUpdate` carrying its ETH
        deposit, after approving the manager for its token deposit if the allowance falls
        short (and, before such an approval, after checking the watcher's record against
        the contract's hash); otherwise the hub sends `hubAuthorizedUpdate`. The record
        passed is the watcher's; if the contract finds it stale (or the transaction fails
        when mined, as when another one changed the channel earlier in the block), the
        submitter polls once for the current record, without advancing the watcher, and
        tries once more. Waits for the receipt.

        Returns `SubmitMined`, `SubmitAlreadyExecuted` (the contract is already at or past
        this state's tx_count_onchain: nothing sent) or `SubmitFailed`; chain errors are
        never raised. Raises `NotSubmittable` for a state without both signatures or
        without pending operations, `WrongSubmitter` if this node is not the party that
        must send it. Cancelled while a transaction is out, it may still be mined;
        submitting the state again then gives `SubmitAlreadyExecuted`.
        """
        state = latest.state
        sig_hub, sig_user = latest.sig_hub, latest.sig_user
        if sig_hub is None or sig_user is None:
            raise NotSubmittable("the state is not double-signed")
        if not state.has_pending():
            raise NotSubmittable("the state has no pending operations to execute")
        by_user = not state.pending_deposit_user.is_zero()
        if by_user:
            expected = state.user
        else:
            try:
                expected = await self.hub()
            except ChainError as exc:
                return _failed(state, exc)
        if expected != self.address:
            what = "a user deposit" if by_user else "a hub-authorized update"
            raise WrongSubmitter(what, expected, self.address)

        async with self._lock:
            record = self.watcher.record_of(state.user)
            if record.tx_count_onchain >= state.tx_count_onchain:
                return _already(state, record)
            if by_user and state.pending_deposit_user.token > 0:
                # An approval is a transaction of its own: first make sure the update is
                # still to be done (after a restart the watcher may lag behind the chain).
                try:
                    record = await self._current_record(state.user, record)
                except ChainError as exc:
                    return _failed(state, exc)
                if record.tx_count_onchain >= state.tx_count_onchain:
                    return _already(state, record)
                try:
                    await self._ensure_allowance(state.pending_deposit_user.token)
                except ChainError as exc:
                    return _failed(state, exc, "token approval: ")
            try:
                receipt = await self._send(by_user, record, latest)
            except ChainError as exc:
                if not _maybe_stale_record(exc):
                    return _failed(state, exc)
                first_error = exc
            else:
                return _mined(state, receipt)

            # The record may be stale: another transaction changed the channel first.
            try:
                fresh = await self.watcher.fresh_record(state.user)
            except ChainError as exc:
                return _failed(state, exc)
            if fresh.tx_count_onchain >= state.tx_count_onchain:
                return _already(state, fresh)
            if fresh == record:
                return _failed(state, first_error)
            try:
                receipt = await self._send(by_user, fresh, latest)
            except ChainError as exc:
                return _failed(state, exc)
            return _mined(state, receipt)

    async def _send(
        self, by_user: bool, record: ChannelRecord, latest: SignedChannelState
    ) -> Receipt:
        assert latest.sig_hub is not None and latest.sig_user is not None
        send = (
            self.manager.user_authorized_update if by_user else self.manager.hub_authorized_update
        )
        return await send(
            record, latest.state, latest.sig_hub, latest.sig_user, sender_key=self._key
        )

    async def _current_record(self, user: Address, record: ChannelRecord) -> ChannelRecord:
        """`record` if the contract stores it for `user`, else the watcher's fresh read."""
        if await self.manager.channel_record_hash(user) == record_hash(record):
            return record
        return await self.watcher.fresh_record(user)

    async def _ensure_allowance(self, amount: int) -> None:
        """Approve the manager for `amount` of this node's tokens unless already allowed."""
        token = await self.token()
        if await token.allowance(self.address, self.manager.address) >= amount:
            return
        await token.approve(self.manager.address, amount, sender_key=self._key)

    async def hub_deposit(self, amount: Assets) -> Receipt:
        """Add `amount` to the hub's reserve (approving the token part first if needed).

        Returns the receipt (its logs hold the `ReserveDepositedLog`). Raises
        `WrongSubmitter` if this node is not the hub, and the chain errors of
        `node.chain_errors` (`ContractReverted` with the contract's reason, e.g. "nothing to
        deposit"). Cancelled while a transaction is out, it may still be mined.
        """
        hub = await self.hub()
        if hub != self.address:
            raise WrongSubmitter("a reserve deposit", hub, self.address)
        async with self._lock:
            if amount.token > 0:
                await self._ensure_allowance(amount.token)
            return await self.manager.hub_deposit(amount, sender_key=self._key)

    async def reserve(self) -> Assets:
        """The hub's reserve in the manager now. Raises the chain errors."""
        return await self.manager.reserve()


def _maybe_stale_record(exc: ChainError) -> bool:
    """True if `exc` may come from a record another transaction changed first: the
    contract's reason for it, or a failure mined without a reason (the estimate passed,
    then a transaction earlier in the block changed the channel)."""
    if isinstance(exc, ContractReverted):
        return exc.reason == RECORD_NOT_CURRENT
    return isinstance(exc, TransactionFailed)


def _mined(state: ChannelState, receipt: Receipt) -> SubmitMined:
    return SubmitMined(
        state.user, state.tx_count_onchain, receipt.tx_hash, receipt.block_number, receipt.gas_used
    )


def _already(state: ChannelState, record: ChannelRecord) -> SubmitAlreadyExecuted:
    return SubmitAlreadyExecuted(state.user, state.tx_count_onchain, record.tx_count_onchain)


def _failed(state: ChannelState, exc: ChainError, prefix: str = "") -> SubmitFailed:
    if isinstance(exc, ContractReverted):
        return SubmitFailed(state.user, state.tx_count_onchain, prefix + exc.reason, True)
    revert = isinstance(exc, TransactionFailed)
    return SubmitFailed(state.user, state.tx_count_onchain, prefix + str(exc), revert)
