"""What the ChannelManager contract knows of a channel, and how each call changes it.

The contract stores only a hash per channel (`record_hash`) and is handed the full
`ChannelRecord` in every call; this module is the Python side of that record: its ABI
tuple, its hash, and the record each successful call leaves, as the contract computes it
(`protocols/contracts/ChannelManager.vy`; rules in SPEC.md, "On-chain rules"). The node
uses it to build calls and to predict the results; the tests hold the contract to it.

Functions here model successful calls. Each raises `OnchainRejected` with the contract's
revert reason where the contract would revert for a reason it can see from its inputs
(record, state, time); signatures, callers and token transfers are the contract's alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import IntEnum

from protocols.errors import InvalidValue, WeftProtocolError
from protocols.keccak import keccak
from protocols.thread_root import EMPTY_THREAD_ROOT, thread_leaf
from protocols.types import (
    NO_ASSETS,
    Address,
    Assets,
    ChannelState,
    ThreadState,
    check_bytes,
    check_uint256,
)

# Revert reasons (Error(string)) of ChannelManager that the model reproduces.
STALE_TX_COUNT_GLOBAL = "stale txCountGlobal"
STALE_TX_COUNT_ONCHAIN = "stale txCountOnchain"
UPDATE_TIMED_OUT = "update timed out"
WITHDRAWALS_EXCEED_FUNDS = "withdrawals exceed channel funds"
STATE_EXCEEDS_FUNDS = "state exceeds channel funds"
CHANNEL_NOT_OPEN = "channel is not open"
CHANNEL_NOT_EXITING = "channel is not exiting"
CHALLENGE_PERIOD_OVER = "challenge period over"
CHALLENGE_PERIOD_NOT_OVER = "challenge period not over"
NOT_SETTLING = "channel is not settling threads"
THREAD_EXCEEDS_FUNDS = "thread exceeds channel funds"
STALE_THREAD_TX_COUNT = "stale thread txCount"
THREAD_TOTAL_CHANGED = "thread total changed"
NOT_SAME_THREAD = "not the same thread"
USER_NOT_THREAD_PARTY = "user is not a party of the thread"
INITIAL_NOT_ZERO = "initial state has a non-zero txCount"


class OnchainRejected(WeftProtocolError):
    """The contract would revert this call; `reason` is its revert string."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ChannelPhase(IntEnum):
    """A channel's phase in the contract."""

    OPEN = 0
    EXITING = 1
    CHALLENGED = 2
    SETTLING_THREADS = 3


def _word(value: int) -> bytes:
    return value.to_bytes(32, "big")


@dataclass(frozen=True, slots=True)
class ChannelRecord:
    """The contract's record of one channel (the `ChannelRecord` struct).

    `held`: funds the contract holds for the channel (both balances and what its threads
    lock). `balance_hub`/`balance_user`: at rest (OPEN), under dispute (EXITING, CHALLENGED)
    or zero (SETTLING_THREADS). `tx_count_global`: the highest the contract accepted;
    `tx_count_onchain`: that of the last executed update. `exit_deadline`: end of the
    challenge period while exiting, else 0.
    """

    held: Assets = NO_ASSETS
    balance_hub: Assets = NO_ASSETS
    balance_user: Assets = NO_ASSETS
    tx_count_global: int = 0
    tx_count_onchain: int = 0
    thread_root: bytes = EMPTY_THREAD_ROOT
    thread_count: int = 0
    exit_deadline: int = 0
    phase: ChannelPhase = ChannelPhase.OPEN

    def __post_init__(self) -> None:
        for name in ("held", "balance_hub", "balance_user"):
            if type(getattr(self, name)) is not Assets:
                raise InvalidValue(f"{name} must be Assets")
        check_uint256(self.tx_count_global, "tx_count_global")
        check_uint256(self.tx_count_onchain, "tx_count_onchain")
        check_bytes(self.thread_root, 32, "thread_root")
        check_uint256(self.thread_count, "thread_count")
        check_uint256(self.exit_deadline, "exit_deadline")
        if type(self.phase) is not ChannelPhase:
            raise InvalidValue("phase must be a ChannelPhase")

    def as_abi(self) -> tuple[object, ...]:
        """The struct as web3 passes it: a tuple in field order."""
        return (
            self.held.eth,
            self.held.token,
            self.balance_hub.eth,
            self.balance_user.eth,
            self.balance_hub.token,
            self.balance_user.token,
            self.tx_count_global,
            self.tx_count_onchain,
            self.thread_root,
            self.thread_count,
            self.exit_deadline,
            int(self.phase),
        )

    @classmethod
    def from_abi(cls, values: tuple[object, ...] | list[object]) -> ChannelRecord:
        """Parse the struct as web3 decodes it (from an event or a call)."""
        if len(values) != 12:
            raise InvalidValue(f"a ChannelRecord has 12 fields, got {len(values)}")
        v = list(values)
        phase = v[11]
        if type(phase) is not int or phase not in {p.value for p in ChannelPhase}:
            raise InvalidValue(f"unknown channel phase {phase!r}")
        root = v[8]
        if not isinstance(root, bytes):
            raise InvalidValue("threadRoot must be bytes")
        ints = [v[i] for i in (0, 1, 2, 3, 4, 5, 6, 7, 9, 10)]
        if any(type(x) is not int for x in ints):
            raise InvalidValue("ChannelRecord amounts and counts must be int")
        return cls(
            held=Assets(v[0], v[1]),  # type: ignore[arg-type]
            balance_hub=Assets(v[2], v[4]),  # type: ignore[arg-type]
            balance_user=Assets(v[3], v[5]),  # type: ignore[arg-type]
            tx_count_global=v[6],  # type: ignore[arg-type]
            tx_count_onchain=v[7],  # type: ignore[arg-type]
            thread_root=bytes(root),
            thread_count=v[9],  # type: ignore[arg-type]
            exit_deadline=v[10],  # type: ignore[arg-type]
            phase=ChannelPhase(phase),
        )

    def encode(self) -> bytes:
        """`abi.encode(record)`: twelve 32-byte words."""
        return b"".join(
            x if isinstance(x, bytes) else _word(x)  # type: ignore[arg-type]
            for x in self.as_abi()
        )


GENESIS_RECORD = ChannelRecord()


def record_hash(record: ChannelRecord) -> bytes:
    """What `channelRecordHash(user)` holds for `record`: 32 zero bytes for genesis."""
    if record == GENESIS_RECORD:
        return b"\x00" * 32
    return keccak(record.encode())


@dataclass(frozen=True, slots=True)
class ThreadDispute:
    """The contract's record of a thread dispute (the `ThreadDispute` struct)."""

    balance_sender: Assets
    balance_receiver: Assets
    tx_count: int
    deadline: int
    challenged: bool = False

    def __post_init__(self) -> None:
        if type(self.balance_sender) is not Assets or type(self.balance_receiver) is not Assets:
            raise InvalidValue("thread dispute balances must be Assets")
        check_uint256(self.tx_count, "tx_count")
        check_uint256(self.deadline, "deadline")
        if type(self.challenged) is not bool:
            raise InvalidValue("challenged must be a bool")

    def as_abi(self) -> tuple[object, ...]:
        return (
            self.balance_sender.eth,
            self.balance_receiver.eth,
            self.balance_sender.token,
            self.balance_receiver.token,
            self.tx_count,
            self.deadline,
            self.challenged,
        )

    @classmethod
    def from_abi(cls, values: tuple[object, ...] | list[object]) -> ThreadDispute:
        if len(values) != 7:
            raise InvalidValue(f"a ThreadDispute has 7 fields, got {len(values)}")
        v = list(values)
        if any(type(x) is not int for x in v[:6]) or type(v[6]) is not bool:
            raise InvalidValue("malformed ThreadDispute")
        return cls(
            balance_sender=Assets(v[0], v[2]),  # type: ignore[arg-type]
            balance_receiver=Assets(v[1], v[3]),  # type: ignore[arg-type]
            tx_count=v[4],  # type: ignore[arg-type]
            deadline=v[5],  # type: ignore[arg-type]
            challenged=v[6],
        )

    def encode(self) -> bytes:
        return b"".join(_word(int(x)) for x in self.as_abi())  # type: ignore[call-overload]


def dispute_hash(dispute: ThreadDispute) -> bytes:
    """What `threadDisputeHash(leaf)` holds for `dispute`."""
    return keccak(dispute.encode())


def channel_state_abi(state: ChannelState) -> tuple[object, ...]:
    """A `ChannelState` as the contract's struct tuple (field order of the type string)."""
    return (
        state.user.checksum(),
        state.recipient.checksum(),
        state.balance_hub.eth,
        state.balance_user.eth,
        state.balance_hub.token,
        state.balance_user.token,
        state.pending_deposit_hub.eth,
        state.pending_deposit_user.eth,
        state.pending_deposit_hub.token,
        state.pending_deposit_user.token,
        state.pending_withdrawal_hub.eth,
        state.pending_withdrawal_user.eth,
        state.pending_withdrawal_hub.token,
        state.pending_withdrawal_user.token,
        state.tx_count_global,
        state.tx_count_onchain,
        state.thread_root,
        state.thread_count,
        state.timeout,
    )


def thread_state_abi(state: ThreadState) -> tuple[object, ...]:
    """A `ThreadState` as the contract's struct tuple."""
    return (
        state.thread_id,
        state.sender.checksum(),
        state.receiver.checksum(),
        state.balance_sender.eth,
        state.balance_receiver.eth,
        state.balance_sender.token,
        state.balance_receiver.token,
        state.tx_count,
    )


# --- Transitions (successful calls) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Payout:
    """Funds a call moves out of a channel: to the user (or recipient) and to the reserve."""

    to_user: Assets = NO_ASSETS
    to_reserve: Assets = NO_ASSETS


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise OnchainRejected(reason)


def executed_record(record: ChannelRecord, state: ChannelState, now: int) -> ChannelRecord:
    """The record after an authorized update executes `state` at block time `now`.

    Pending deposits are credited to the balances; pending withdrawals leave the channel
    (the user's to `state.recipient`, the hub's to the reserve).
    """
    _require(record.phase is ChannelPhase.OPEN, CHANNEL_NOT_OPEN)
    _require(state.tx_count_global > record.tx_count_global, STALE_TX_COUNT_GLOBAL)
    _require(state.tx_count_onchain > record.tx_count_onchain, STALE_TX_COUNT_ONCHAIN)
    _require(now < state.timeout, UPDATE_TIMED_OUT)
    deposits = state.pending_deposit_hub + state.pending_deposit_user
    withdrawals = state.pending_withdrawal_hub + state.pending_withdrawal_user
    _require((record.held + deposits).covers(withdrawals), WITHDRAWALS_EXCEED_FUNDS)
    held = record.held + deposits - withdrawals
    balance_hub = state.balance_hub + state.pending_deposit_hub
    balance_user = state.balance_user + state.pending_deposit_user
    _require(held.covers(balance_hub + balance_user), STATE_EXCEEDS_FUNDS)
    return ChannelRecord(
        held=held,
        balance_hub=balance_hub,
        balance_user=balance_user,
        tx_count_global=state.tx_count_global,
        tx_count_onchain=state.tx_count_onchain,
        thread_root=state.thread_root,
        thread_count=state.thread_count,
    )


def disputed_balances(record: ChannelRecord, state: ChannelState) -> tuple[Assets, Assets]:
    """(hub, user) balances the contract takes from `state` in an exit or challenge.

    If the contract executed the state's pending update (same `txCountOnchain`), its
    deposits count as credited; if it did not (higher), its withdrawals are refunded.
    """
    _require(state.tx_count_onchain >= record.tx_count_onchain, STALE_TX_COUNT_ONCHAIN)
    if state.tx_count_onchain == record.tx_count_onchain:
        return (
            state.balance_hub + state.pending_deposit_hub,
            state.balance_user + state.pending_deposit_user,
        )
    return (
        state.balance_hub + state.pending_withdrawal_hub,
        state.balance_user + state.pending_withdrawal_user,
    )


def _disputed(record: ChannelRecord, state: ChannelState) -> ChannelRecord:
    _require(state.tx_count_global > record.tx_count_global, STALE_TX_COUNT_GLOBAL)
    hub, user = disputed_balances(record, state)
    _require(record.held.covers(hub + user), STATE_EXCEEDS_FUNDS)
    return replace(
        record,
        balance_hub=hub,
        balance_user=user,
        tx_count_global=state.tx_count_global,
        thread_root=state.thread_root,
        thread_count=state.thread_count,
    )


def exit_started_record(
    record: ChannelRecord, state: ChannelState | None, now: int, challenge_period: int
) -> ChannelRecord:
    """The record after `startExit` (state None) or `startExitWithUpdate(state)`."""
    _require(record.phase is ChannelPhase.OPEN, CHANNEL_NOT_OPEN)
    base = record if state is None else _disputed(record, state)
    return replace(base, exit_deadline=now + challenge_period, phase=ChannelPhase.EXITING)


def exit_challenged_record(record: ChannelRecord, state: ChannelState, now: int) -> ChannelRecord:
    """The record after `challengeExit(state)`; challenges may repeat before the deadline."""
    _require(record.phase in (ChannelPhase.EXITING, ChannelPhase.CHALLENGED), CHANNEL_NOT_EXITING)
    _require(now < record.exit_deadline, CHALLENGE_PERIOD_OVER)
    return replace(_disputed(record, state), phase=ChannelPhase.CHALLENGED)


def reopened_record(record: ChannelRecord) -> ChannelRecord:
    """The channel once its exit is complete: open, empty, nonces kept."""
    return ChannelRecord(
        tx_count_global=record.tx_count_global, tx_count_onchain=record.tx_count_onchain
    )


def emptied_record(record: ChannelRecord, now: int) -> tuple[ChannelRecord, Payout]:
    """The record after `emptyChannel`, and what it pays (user; hub to the reserve).

    With no open threads the channel reopens at once; whatever is still held then (only if
    the parties signed balances below the channel's funds) also goes to the reserve.
    """
    _require(record.phase in (ChannelPhase.EXITING, ChannelPhase.CHALLENGED), CHANNEL_NOT_EXITING)
    _require(now >= record.exit_deadline, CHALLENGE_PERIOD_NOT_OVER)
    rest = record.held - record.balance_hub - record.balance_user
    to_reserve = record.balance_hub
    if record.thread_count == 0:
        return reopened_record(record), Payout(record.balance_user, to_reserve + rest)
    settling = replace(
        record,
        held=rest,
        balance_hub=NO_ASSETS,
        balance_user=NO_ASSETS,
        exit_deadline=0,
        phase=ChannelPhase.SETTLING_THREADS,
    )
    return settling, Payout(record.balance_user, to_reserve)


def thread_shares(user: Address, initial: ThreadState, dispute: ThreadDispute) -> Payout:
    """What settling a thread pays in `user`'s channel: the user's side to the user, the
    other side to the hub (the DESIGN money flow)."""
    _require(user in (initial.sender, initial.receiver), USER_NOT_THREAD_PARTY)
    if user == initial.sender:
        return Payout(dispute.balance_sender, dispute.balance_receiver)
    return Payout(dispute.balance_receiver, dispute.balance_sender)


def thread_settled_record(
    record: ChannelRecord, user: Address, initial: ThreadState, dispute: ThreadDispute, now: int
) -> tuple[ChannelRecord, Payout]:
    """The record after `settleThread` pays `initial`'s thread out of `user`'s channel."""
    _require(record.phase is ChannelPhase.SETTLING_THREADS, NOT_SETTLING)
    _require(now >= dispute.deadline, CHALLENGE_PERIOD_NOT_OVER)
    pay = thread_shares(user, initial, dispute)
    total = pay.to_user + pay.to_reserve
    _require(record.held.covers(total), THREAD_EXCEEDS_FUNDS)
    after = replace(record, held=record.held - total, thread_count=record.thread_count - 1)
    if after.thread_count == 0:
        return reopened_record(after), Payout(pay.to_user, pay.to_reserve + after.held)
    return after, pay


def new_thread_dispute(
    initial: ThreadState, latest: ThreadState | None, now: int, challenge_period: int
) -> ThreadDispute:
    """The dispute `startThreadExit` (latest None) or `startThreadExitWithUpdate` opens."""
    _require(initial.tx_count == 0, INITIAL_NOT_ZERO)
    state = initial
    if latest is not None:
        check_thread_successor(initial, latest, 0)
        state = latest
    return ThreadDispute(
        balance_sender=state.balance_sender,
        balance_receiver=state.balance_receiver,
        tx_count=state.tx_count,
        deadline=now + challenge_period,
    )


def challenged_dispute(
    initial: ThreadState, dispute: ThreadDispute, latest: ThreadState, now: int
) -> ThreadDispute:
    """The dispute after `challengeThread(latest)`; challenges may repeat before the deadline."""
    _require(now < dispute.deadline, CHALLENGE_PERIOD_OVER)
    check_thread_successor(initial, latest, dispute.tx_count)
    return ThreadDispute(
        balance_sender=latest.balance_sender,
        balance_receiver=latest.balance_receiver,
        tx_count=latest.tx_count,
        deadline=dispute.deadline,
        challenged=True,
    )


def check_thread_successor(initial: ThreadState, latest: ThreadState, min_tx_count: int) -> None:
    """Raise `OnchainRejected` unless `latest` may replace a dispute at `min_tx_count`."""
    _require(latest.key == initial.key, NOT_SAME_THREAD)
    _require(latest.tx_count > min_tx_count, STALE_THREAD_TX_COUNT)
    _require(latest.total() == initial.total(), THREAD_TOTAL_CHANGED)


def settled_key(user: Address, leaf: bytes) -> bytes:
    """The `threadSettled` key of a thread (by its leaf) in `user`'s channel."""
    return keccak(user.raw + leaf)


__all__ = [
    "GENESIS_RECORD",
    "ChannelPhase",
    "ChannelRecord",
    "OnchainRejected",
    "Payout",
    "ThreadDispute",
    "challenged_dispute",
    "channel_state_abi",
    "check_thread_successor",
    "dispute_hash",
    "disputed_balances",
    "emptied_record",
    "executed_record",
    "exit_challenged_record",
    "exit_started_record",
    "new_thread_dispute",
    "record_hash",
    "reopened_record",
    "settled_key",
    "thread_leaf",
    "thread_settled_record",
    "thread_shares",
    "thread_state_abi",
]
