"""Messages of the two peer protocols: `/weft/hub/1` (user <-> hub) and `/weft/thread/1` (A <-> B).

Each message is a frozen dataclass of value types; `protocols.wire` encodes and decodes them.
Field meanings and the rules for acting on each message are in SPEC.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from protocols.types import Address, Assets, ChannelState, Party, Signature, ThreadKey, ThreadState


class RejectReason(Enum):
    """Why an input was refused. The value is the stable wire code."""

    # Signatures and identity
    BAD_SIGNATURE = 1
    NOT_A_PARTY = 3
    UNKNOWN_CHANNEL = 4
    UNKNOWN_THREAD = 5
    # Ordering
    NONCE_CONFLICT = 10
    STALE_NONCE = 11
    NOT_SUCCESSOR = 13
    UNKNOWN_PROPOSAL = 14
    HOLDING_AFTER_CONFLICT = 16
    # Values
    INVALID_TRANSITION = 20
    INSUFFICIENT_BALANCE = 21
    INSUFFICIENT_COLLATERAL = 22
    EMPTY_PAYMENT = 23
    BALANCE_NOT_CONSERVED = 24
    AMOUNT_OVERFLOW = 25
    # Channel life cycle
    PENDING_OUTSTANDING = 30
    NO_PENDING = 31
    NOT_EXECUTED_ONCHAIN = 32
    ALREADY_EXECUTED_ONCHAIN = 33
    TIMEOUT_PASSED = 34
    TIMEOUT_NOT_PASSED = 35
    THREAD_ALREADY_OPEN = 36
    THREAD_NOT_OPEN = 37
    STALE_THREAD_STATE = 38
    TOO_MANY_THREADS = 39
    # Thread life cycle
    THREAD_CLOSING = 40
    THREAD_CLOSED = 41
    THREAD_NOT_OPEN_YET = 42
    LOCK_REFUSED = 44
    # Anything else a peer may say
    POLICY = 90


# ---------------------------------------------------------------- channel updates


@dataclass(frozen=True, slots=True)
class UpdatePayment:
    """`payer` pays `amount` to the other party of the channel.

    `forward_to` names the final recipient of a hub-routed payment (the hub pays it on in the
    recipient's channel); the zero address means the payment ends in this channel.
    """

    payer: Party
    amount: Assets
    forward_to: Address


@dataclass(frozen=True, slots=True)
class UpdatePending:
    """Phase one of a deposit or withdrawal: record what an on-chain update will execute."""

    deposit_hub: Assets
    deposit_user: Assets
    withdrawal_hub: Assets
    withdrawal_user: Assets
    recipient: Address
    timeout: int


@dataclass(frozen=True, slots=True)
class UpdateConfirmPending:
    """Phase two: the pending state with `tx_count_onchain` was executed on-chain."""

    tx_count_onchain: int


@dataclass(frozen=True, slots=True)
class UpdateInvalidatePending:
    """The pending state with `tx_count_onchain` timed out unexecuted: undo it off-chain."""

    tx_count_onchain: int


@dataclass(frozen=True, slots=True)
class UpdateOpenThread:
    """Lock a thread's initial balances in this channel (double-signed initial state)."""

    initial: ThreadState
    sig_sender: Signature
    sig_receiver: Signature


@dataclass(frozen=True, slots=True)
class UpdateCloseThread:
    """Settle an open thread at a double-signed state of it (its initial state refunds)."""

    final: ThreadState
    sig_sender: Signature
    sig_receiver: Signature


ChannelUpdate = (
    UpdatePayment
    | UpdatePending
    | UpdateConfirmPending
    | UpdateInvalidatePending
    | UpdateOpenThread
    | UpdateCloseThread
)


@dataclass(frozen=True, slots=True)
class SignedThreadState:
    """A thread state with both parties' signatures."""

    state: ThreadState
    sig_sender: Signature
    sig_receiver: Signature


# ---------------------------------------------------------------- /weft/hub/1


@dataclass(frozen=True, slots=True)
class ChannelProposal:
    """A proposed next channel state, signed by the proposer, with the update it applies
    and the txCountGlobal of the state it builds on."""

    update: ChannelUpdate
    state: ChannelState
    prev_tx_count: int
    signature: Signature


@dataclass(frozen=True, slots=True)
class ChannelCountersign:
    """The receiver's signature on the proposal at `tx_count_global` of `user`'s channel."""

    user: Address
    tx_count_global: int
    signature: Signature


@dataclass(frozen=True, slots=True)
class ChannelReject:
    """Refusal of the proposal at `tx_count_global`; `max_signed` is the sender's highest
    signed txCount, so the proposer can propose above it."""

    user: Address
    tx_count_global: int
    reason: RejectReason
    max_signed: int
    detail: str


@dataclass(frozen=True, slots=True)
class ChannelResume:
    """After a conflict, the priority side (the hub) hands the turn back above `after`."""

    user: Address
    after: int


@dataclass(frozen=True, slots=True)
class ChannelSync:
    """The sender's latest double-signed channel state and its open threads' initial states."""

    state: ChannelState
    sig_hub: Signature
    sig_user: Signature
    threads: tuple[SignedThreadState, ...]


@dataclass(frozen=True, slots=True)
class ThreadOpenRequest:
    """User to hub: open this thread (its initial state, signed by both thread parties)."""

    initial: SignedThreadState


@dataclass(frozen=True, slots=True)
class ThreadCloseRequest:
    """User to hub: settle this thread at this double-signed state."""

    final: SignedThreadState


@dataclass(frozen=True, slots=True)
class CollateralRequest:
    """User to hub: please collateralize my channel with at least `amount`."""

    amount: Assets


@dataclass(frozen=True, slots=True)
class CollateralNeeded:
    """Hub to user: a payment failed; `missing` is what the hub lacked in `user`'s channel."""

    user: Address
    missing: Assets


@dataclass(frozen=True, slots=True)
class ThreadOpenRefused:
    """Hub to the thread's sender: the hub did not lock the thread `key`.

    `missing` is the hub collateral that was lacking (zero unless the reason is
    INSUFFICIENT_COLLATERAL); nothing of the thread stays locked in any channel.
    """

    key: ThreadKey
    reason: RejectReason
    missing: Assets
    detail: str


@dataclass(frozen=True, slots=True)
class PeerLookup:
    """Ask the hub for the libp2p peer id and addresses of the user with `address`."""

    address: Address


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """The hub's answer to `PeerLookup` (a hint: Noise still proves who answers)."""

    address: Address
    peer_id: bytes
    multiaddrs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ErrorNotice:
    """A refusal of a request that is not itself a state proposal."""

    reason: RejectReason
    detail: str


# ---------------------------------------------------------------- /weft/thread/1


@dataclass(frozen=True, slots=True)
class ThreadOpenProposal:
    """A to B: the thread's initial state (tx_count 0), signed by A."""

    initial: ThreadState
    signature: Signature


@dataclass(frozen=True, slots=True)
class ThreadProposal:
    """The payer's next thread state, signed by the payer, and the tx_count it builds on."""

    state: ThreadState
    prev_tx_count: int
    signature: Signature


@dataclass(frozen=True, slots=True)
class ThreadCountersign:
    """The payee's signature on the proposal at `tx_count` (0 accepts the open)."""

    key: ThreadKey
    tx_count: int
    signature: Signature


@dataclass(frozen=True, slots=True)
class ThreadReject:
    """Refusal of the proposal at `tx_count`, with the sender's highest signed tx_count."""

    key: ThreadKey
    tx_count: int
    reason: RejectReason
    max_signed: int
    detail: str


@dataclass(frozen=True, slots=True)
class ThreadResume:
    """After a conflict, the priority side (A) hands the turn back above `after`."""

    key: ThreadKey
    after: int


@dataclass(frozen=True, slots=True)
class ThreadCloseNotice:
    """The sender will make no new proposals; `tx_count` is its latest double-signed state."""

    key: ThreadKey
    tx_count: int


@dataclass(frozen=True, slots=True)
class ThreadSync:
    """The sender's latest double-signed thread state (resync after reconnect)."""

    latest: SignedThreadState


HubMessage = (
    ChannelProposal
    | ChannelCountersign
    | ChannelReject
    | ChannelResume
    | ChannelSync
    | ThreadOpenRequest
    | ThreadCloseRequest
    | CollateralRequest
    | CollateralNeeded
    | ThreadOpenRefused
    | PeerLookup
    | PeerInfo
    | ErrorNotice
)

ThreadMessage = (
    ThreadOpenProposal
    | ThreadProposal
    | ThreadCountersign
    | ThreadReject
    | ThreadResume
    | ThreadCloseNotice
    | ThreadSync
    | ErrorNotice
)

Message = HubMessage | ThreadMessage
