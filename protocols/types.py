"""Value types of the protocol: addresses, amounts, signatures, channel and thread states.

Every type validates itself at construction, so a value that exists is a valid value.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from protocols.errors import InvalidValue
from protocols.keccak import keccak

UINT256_MAX = 2**256 - 1
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SECP256K1_HALF_N = SECP256K1_N // 2


def check_uint256(value: object, what: str) -> int:
    """Return `value` if it is an int in [0, 2**256 - 1], else raise `InvalidValue`."""
    if type(value) is not int:
        raise InvalidValue(f"{what} must be an int, not {type(value).__name__}")
    if value < 0 or value > UINT256_MAX:
        raise InvalidValue(f"{what} out of uint256 range: {value}")
    return value


def check_bytes(value: object, length: int, what: str) -> bytes:
    """Return `value` if it is `bytes` of exactly `length` bytes, else raise `InvalidValue`."""
    if type(value) is not bytes:
        raise InvalidValue(f"{what} must be bytes, not {type(value).__name__}")
    if len(value) != length:
        raise InvalidValue(f"{what} must be {length} bytes, got {len(value)}")
    return value


@dataclass(frozen=True, slots=True, order=True)
class Address:
    """A 20-byte Ethereum address."""

    raw: bytes

    def __post_init__(self) -> None:
        check_bytes(self.raw, 20, "address")

    @classmethod
    def from_hex(cls, text: str) -> Address:
        """Parse `0x`-prefixed hex: all lower, all upper, or EIP-55 mixed case (checked).

        Raise `InvalidValue` on anything else, including a mixed-case checksum mismatch.
        """
        if not isinstance(text, str) or not text.startswith(("0x", "0X")) or len(text) != 42:
            raise InvalidValue(f"not a 0x-prefixed 20-byte hex address: {text!r}")
        body = text[2:]
        try:
            address = cls(bytes.fromhex(body))
        except ValueError as exc:
            raise InvalidValue(f"not a hex address: {text!r}") from exc
        if body != body.lower() and body != body.upper() and address.checksum()[2:] != body:
            raise InvalidValue(f"EIP-55 checksum mismatch: {text!r}")
        return address

    @classmethod
    def from_public_key(cls, uncompressed: bytes) -> Address:
        """Address of a 64-byte (x || y) or 65-byte (04 || x || y) secp256k1 public key."""
        if len(uncompressed) == 65 and uncompressed[0] == 4:
            uncompressed = uncompressed[1:]
        check_bytes(uncompressed, 64, "public key")
        return cls(keccak(uncompressed)[12:])

    def checksum(self) -> str:
        """EIP-55 mixed-case hex form."""
        lower = self.raw.hex()
        digest = keccak(lower.encode("ascii")).hex()
        return "0x" + "".join(
            c.upper() if c.isalpha() and int(digest[i], 16) >= 8 else c for i, c in enumerate(lower)
        )

    def __str__(self) -> str:
        return self.checksum()

    def __repr__(self) -> str:
        return f"Address({self.checksum()})"


ZERO_ADDRESS = Address(b"\x00" * 20)


@dataclass(frozen=True, slots=True)
class Assets:
    """An amount in both assets of a channel: wei of ETH and base units of the token.

    Both are uint256. Arithmetic raises `InvalidValue` on overflow or underflow.
    """

    eth: int = 0
    token: int = 0

    def __post_init__(self) -> None:
        check_uint256(self.eth, "eth amount")
        check_uint256(self.token, "token amount")

    def __add__(self, other: Assets) -> Assets:
        if type(other) is not Assets:
            return NotImplemented
        return Assets(self.eth + other.eth, self.token + other.token)

    def __sub__(self, other: Assets) -> Assets:
        if type(other) is not Assets:
            return NotImplemented
        return Assets(self.eth - other.eth, self.token - other.token)

    def covers(self, other: Assets) -> bool:
        """True if both components are at least `other`'s."""
        return self.eth >= other.eth and self.token >= other.token

    def shortfall(self, needed: Assets) -> Assets:
        """What is missing from `self` to cover `needed` (zero where it already does)."""
        return Assets(max(0, needed.eth - self.eth), max(0, needed.token - self.token))

    def is_zero(self) -> bool:
        return self.eth == 0 and self.token == 0


NO_ASSETS = Assets(0, 0)


@dataclass(frozen=True, slots=True)
class Signature:
    """A 65-byte Ethereum signature r || s || v with v in {27, 28} and low s (EIP-2)."""

    raw: bytes

    def __post_init__(self) -> None:
        check_bytes(self.raw, 65, "signature")
        if self.raw[64] not in (27, 28):
            raise InvalidValue(f"signature v must be 27 or 28, got {self.raw[64]}")
        r = int.from_bytes(self.raw[0:32], "big")
        s = int.from_bytes(self.raw[32:64], "big")
        if not 0 < r < SECP256K1_N:
            raise InvalidValue("signature r out of range")
        if not 0 < s <= SECP256K1_HALF_N:
            raise InvalidValue("signature s out of range (must be low-s)")

    def __repr__(self) -> str:
        return f"Signature(0x{self.raw[:4].hex()}…)"


class Party(Enum):
    """Which side of a channel."""

    HUB = "hub"
    USER = "user"

    @property
    def other(self) -> Party:
        return Party.USER if self is Party.HUB else Party.HUB


@dataclass(frozen=True, slots=True)
class ChannelState:
    """A hub-user channel state, as both sign it and as the contract checks it.

    Balances are what each party can spend off-chain now. Pending deposits are credited and
    pending withdrawals paid out by an authorized on-chain update (two-phase, see SPEC.md);
    pending withdrawals are already excluded from the balances. Funds locked in open threads
    are in neither balance; `thread_root` commits to those threads' initial states.
    """

    user: Address
    recipient: Address
    balance_hub: Assets
    balance_user: Assets
    pending_deposit_hub: Assets
    pending_deposit_user: Assets
    pending_withdrawal_hub: Assets
    pending_withdrawal_user: Assets
    tx_count_global: int
    tx_count_onchain: int
    thread_root: bytes
    thread_count: int
    timeout: int

    def __post_init__(self) -> None:
        check_uint256(self.tx_count_global, "tx_count_global")
        check_uint256(self.tx_count_onchain, "tx_count_onchain")
        check_bytes(self.thread_root, 32, "thread_root")
        check_uint256(self.thread_count, "thread_count")
        check_uint256(self.timeout, "timeout")
        for name in (
            "user",
            "recipient",
        ):
            if type(getattr(self, name)) is not Address:
                raise InvalidValue(f"{name} must be an Address")
        for name in (
            "balance_hub",
            "balance_user",
            "pending_deposit_hub",
            "pending_deposit_user",
            "pending_withdrawal_hub",
            "pending_withdrawal_user",
        ):
            if type(getattr(self, name)) is not Assets:
                raise InvalidValue(f"{name} must be Assets")

    def balance(self, party: Party) -> Assets:
        return self.balance_hub if party is Party.HUB else self.balance_user

    def has_pending(self) -> bool:
        """True if the state carries deposits or withdrawals not yet executed on-chain."""
        return not (
            self.pending_deposit_hub.is_zero()
            and self.pending_deposit_user.is_zero()
            and self.pending_withdrawal_hub.is_zero()
            and self.pending_withdrawal_user.is_zero()
        )


@dataclass(frozen=True, slots=True)
class ThreadState:
    """A thread state between sender A and receiver B, as both sign it.

    `tx_count` 0 is the initial state, committed to in both channels' thread roots.
    """

    thread_id: int
    sender: Address
    receiver: Address
    balance_sender: Assets
    balance_receiver: Assets
    tx_count: int

    def __post_init__(self) -> None:
        check_uint256(self.thread_id, "thread_id")
        check_uint256(self.tx_count, "tx_count")
        if type(self.sender) is not Address or type(self.receiver) is not Address:
            raise InvalidValue("sender and receiver must be Address")
        if self.sender == self.receiver:
            raise InvalidValue("thread sender and receiver must differ")
        if type(self.balance_sender) is not Assets or type(self.balance_receiver) is not Assets:
            raise InvalidValue("thread balances must be Assets")
        # The total must stay a uint256 so that it can be paid out on-chain.
        _ = self.balance_sender + self.balance_receiver

    @property
    def key(self) -> ThreadKey:
        return ThreadKey(self.sender, self.receiver, self.thread_id)

    def total(self) -> Assets:
        return self.balance_sender + self.balance_receiver

    def balance_of(self, address: Address) -> Assets:
        if address == self.sender:
            return self.balance_sender
        if address == self.receiver:
            return self.balance_receiver
        raise InvalidValue(f"{address} is not a party of thread {self.thread_id}")


@dataclass(frozen=True, slots=True, order=True)
class ThreadKey:
    """What identifies a thread: (sender, receiver, thread id)."""

    sender: Address
    receiver: Address
    thread_id: int

    def __post_init__(self) -> None:
        check_uint256(self.thread_id, "thread_id")
        if type(self.sender) is not Address or type(self.receiver) is not Address:
            raise InvalidValue("sender and receiver must be Address")
        if self.sender == self.receiver:
            raise InvalidValue("thread sender and receiver must differ")
