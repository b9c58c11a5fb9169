"""Gossip backups, the pure part: content, encryption, blocks, announcements, replica policy.

A node backs up its latest double-signed states (`BackupContent`), encoded canonically,
sealed with ChaCha20-Poly1305 under a key derived from its private key (`backup_key`),
split into content-addressed blocks (`to_blocks`: CIDv1, raw codec, sha2-256) and announced
by a signed `Announcement` of (owner, sequence, root CID, size). Peers keep the latest
backup of a bounded set of owners (`ReplicaTable`, `offer`). A node that has only its key
picks the newest backup it can see (`choose_backup`), reassembles it (`from_blocks`), opens
it (`open_backup`) and refuses anything older than an announcement it has seen
(`check_not_stale`). SPEC.md ("Backups") is the normative description.

Nothing here does I/O or draws randomness: the AEAD nonce is an argument, block fetching
is the caller's `get` function. Every refusal of outside data is a `BackupError` subclass
whose class attribute `reason` names the rule that failed; misuse by the local caller
raises `LocalProtocolError` or `InvalidValue`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from enum import Enum, IntEnum
from typing import Any, ClassVar, Final

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocols.channel import SignedChannelState
from protocols.eip712 import (
    DOMAIN_NAME,
    DOMAIN_VERSION,
    Domain,
    channel_state_digest,
    thread_state_digest,
)
from protocols.errors import (
    DecodeError,
    InvalidSignature,
    InvalidValue,
    LocalProtocolError,
    WeftProtocolError,
)
from protocols.keccak import keccak
from protocols.messages import SignedThreadState
from protocols.signing import Signer, recover_digest
from protocols.types import Address, Signature, ThreadKey, check_bytes
from protocols.wire import (
    ADDRESS_FIELD,
    CHANNEL_STATE_FIELD,
    SIGNATURE_FIELD,
    SIGNED_THREAD_STATE_FIELD,
    UINT256_FIELD,
    FieldError,
    FieldKind,
    RecordStruct,
    describe_value,
    tuple_of,
)

BACKUP_VERSION: Final = 1
"""First element of every backup record (content, root block, announcement)."""

# Record codes, the second element. Never renumber.
CONTENT_CODE: Final = 1
ROOT_CODE: Final = 2
ANNOUNCEMENT_CODE: Final = 3

MAX_BACKUP_CHANNELS: Final = 65_536
MAX_BACKUP_THREADS: Final = 65_536
MAX_CONTENT_BYTES: Final = 16 * 1024 * 1024
"""Largest encoded `BackupContent`; longer input is refused unparsed."""

KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
SEALED_OVERHEAD: Final = NONCE_BYTES + TAG_BYTES
MAX_SEALED_BYTES: Final = MAX_CONTENT_BYTES + SEALED_OVERHEAD
"""Largest sealed backup, hence largest `Announcement.size` any node accepts."""

BLOCK_BYTES: Final = 256 * 1024
"""Every child block but the last holds exactly this many bytes."""
MAX_CHILDREN: Final = -(-MAX_SEALED_BYTES // BLOCK_BYTES)

CID_PREFIX: Final = bytes((0x01, 0x55, 0x12, 0x20))
"""CIDv1, multicodec raw (0x55), multihash sha2-256 (0x12) of 32 bytes (0x20)."""
CID_BYTES: Final = len(CID_PREFIX) + 32

HKDF_SALT: Final = b"weft backup salt v1"
HKDF_INFO: Final = b"weft backup v1"
AAD_PREFIX: Final = b"weft backup aad v1"
ANNOUNCEMENT_PREFIX: Final = b"\x19weft backup announcement v1"

HELD_SENDER: Final = 1
"""`BackupThread.held` bit: the sender's channel holds the thread."""
HELD_RECEIVER: Final = 2
"""`BackupThread.held` bit: the receiver's channel holds the thread."""
HELD_BOTH: Final = HELD_SENDER | HELD_RECEIVER

_UINT64_MAX: Final = 2**64 - 1


# ---------------------------------------------------------------- errors


class BackupReason(Enum):
    """The rule a backup, block or announcement broke."""

    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    BAD_SIGNATURE = "bad_signature"
    MISMATCH = "mismatch"
    NOT_OWNERS_STATE = "not_owners_state"
    DUPLICATE = "duplicate"
    INVALID_ENTRY = "invalid_entry"
    DECRYPTION_FAILED = "decryption_failed"
    CID_MISMATCH = "cid_mismatch"
    BLOCK_MISSING = "block_missing"
    SIZE_MISMATCH = "size_mismatch"
    STALE = "stale"


class BackupError(WeftProtocolError):
    """Outside data about a backup is refused; `reason` says which rule, `detail` where."""

    reason: ClassVar[BackupReason]

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.reason.value}: {detail}")
        self.detail = detail


class BackupDecodeError(BackupError, DecodeError):
    """Bytes are not a valid backup record (content, root block or announcement)."""

    reason = BackupReason.MALFORMED


class BackupTooLarge(BackupError):
    """A record, a sealed backup or an announced size is over its cap."""

    reason = BackupReason.TOO_LARGE


class BadBackupSignature(BackupError, InvalidSignature):
    """A signature does not recover to the party that must have signed."""

    reason = BackupReason.BAD_SIGNATURE


class BackupMismatch(BackupError):
    """The content is not for the expected owner, domain or sequence."""

    reason = BackupReason.MISMATCH


class NotOwnersState(BackupError):
    """A channel or thread of the content is not the owner's."""

    reason = BackupReason.NOT_OWNERS_STATE


class DuplicateEntry(BackupError):
    """The content lists one channel or one thread twice."""

    reason = BackupReason.DUPLICATE


class InvalidEntry(BackupError):
    """A channel or thread entry is inconsistent in itself."""

    reason = BackupReason.INVALID_ENTRY


class DecryptionFailed(BackupError):
    """The AEAD refused: wrong key, tampered bytes, or another owner, domain or sequence."""

    reason = BackupReason.DECRYPTION_FAILED


class CidMismatch(BackupError):
    """A block's bytes do not hash to the CID it was fetched by."""

    reason = BackupReason.CID_MISMATCH


class BlockMissing(BackupError):
    """A block the root lists could not be had."""

    reason = BackupReason.BLOCK_MISSING


class SizeMismatch(BackupError):
    """Block sizes do not add up to the root's total, or the total is not the announced size."""

    reason = BackupReason.SIZE_MISMATCH


class StaleBackup(BackupError):
    """The content is older than a valid announcement of the same owner."""

    reason = BackupReason.STALE


# ---------------------------------------------------------------- values


def _check_uint64(value: object, what: str) -> int:
    if type(value) is not int:
        raise InvalidValue(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= _UINT64_MAX:
        raise InvalidValue(f"{what} out of uint64 range: {value}")
    return value


def _check_cid(value: object, what: str) -> bytes:
    check_bytes(value, CID_BYTES, what)
    assert isinstance(value, bytes)
    if not value.startswith(CID_PREFIX):
        raise InvalidValue(f"{what} is not a CIDv1 raw sha2-256: prefix {value[:4].hex()}")
    return value


def _check_tuple_of(value: object, cls: type, what: str) -> None:
    if type(value) is not tuple or any(type(item) is not cls for item in value):
        raise InvalidValue(f"{what} must be a tuple of {cls.__name__}")


@dataclass(frozen=True, slots=True)
class BackupThread:
    """One open or closing thread: its double-signed initial and latest states, and `held`.

    `held` says whose channels in this backup hold the thread's lock: `HELD_SENDER` (the
    sender's channel), `HELD_RECEIVER` (the receiver's), or both (`HELD_BOTH`). Only the
    type is checked here; `check_content` checks the value.
    """

    initial: SignedThreadState
    latest: SignedThreadState
    held: int

    def __post_init__(self) -> None:
        if (
            type(self.initial) is not SignedThreadState
            or type(self.latest) is not SignedThreadState
        ):
            raise InvalidValue("initial and latest must be SignedThreadState")
        _check_uint64(self.held, "held")

    @property
    def key(self) -> ThreadKey:
        return self.initial.state.key

    def held_in(self, user: Address) -> bool:
        """Whether `user`'s channel holds the thread in this backup."""
        return bool(self.held & held_bit(self.key, user))


def held_bit(key: ThreadKey, party: Address) -> int:
    """The `held` bit of `party`'s channel for thread `key`; 0 if it is not a party."""
    if party == key.sender:
        return HELD_SENDER
    return HELD_RECEIVER if party == key.receiver else 0


@dataclass(frozen=True, slots=True)
class BackupContent:
    """What a node backs up: its latest double-signed states, as of `sequence`.

    `channels`: the owner's channel (a user) or every channel (the hub), each the latest
    state with both signatures. `threads`: every open or closing thread, with the initial
    state (for proofs against the thread root), the latest double-signed state, and which
    of the backed-up channels hold it (`held`).
    `hub` is the hub of the ChannelManager (`owner` itself for the hub's own backup).
    Only the types are checked here; `check_content` checks the rest.
    """

    owner: Address
    domain: Domain
    hub: Address
    sequence: int
    channels: tuple[SignedChannelState, ...]
    threads: tuple[BackupThread, ...]

    def __post_init__(self) -> None:
        if type(self.owner) is not Address or type(self.hub) is not Address:
            raise InvalidValue("owner and hub must be Address")
        if type(self.domain) is not Domain:
            raise InvalidValue("domain must be a Domain")
        _check_uint64(self.sequence, "sequence")
        _check_tuple_of(self.channels, SignedChannelState, "channels")
        _check_tuple_of(self.threads, BackupThread, "threads")


@dataclass(frozen=True, slots=True)
class BackupRoot:
    """The root block: the total sealed size and the CIDs of the child blocks, in order."""

    total_size: int
    children: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _check_uint64(self.total_size, "total_size")
        if not 1 <= self.total_size <= MAX_SEALED_BYTES:
            raise InvalidValue(f"total_size {self.total_size} not in [1, {MAX_SEALED_BYTES}]")
        if type(self.children) is not tuple:
            raise InvalidValue("children must be a tuple")
        for cid in self.children:
            _check_cid(cid, "child CID")
        expected = -(-self.total_size // BLOCK_BYTES)
        if len(self.children) != expected:
            raise InvalidValue(
                f"{len(self.children)} children for {self.total_size} bytes, expected {expected}"
            )


@dataclass(frozen=True, slots=True)
class Announcement:
    """A signed claim: `owner`'s backup number `sequence` is the blocks under `root_cid`.

    `size` is the length of the sealed backup (the sum of the child blocks).
    """

    owner: Address
    sequence: int
    root_cid: bytes
    size: int
    signature: Signature

    def __post_init__(self) -> None:
        if type(self.owner) is not Address:
            raise InvalidValue("owner must be an Address")
        _check_uint64(self.sequence, "sequence")
        _check_cid(self.root_cid, "root_cid")
        _check_uint64(self.size, "size")
        if self.size == 0:
            raise InvalidValue("size must be positive")
        if type(self.signature) is not Signature:
            raise InvalidValue("signature must be a Signature")


# ---------------------------------------------------------------- canonical encoding


def _encode_uint64(v: object) -> object:
    if type(v) is not int:
        raise LocalProtocolError(f"uint64 expected, got {type(v).__name__}")
    if not 0 <= v <= _UINT64_MAX:
        raise LocalProtocolError(f"uint64 out of range: {v}")
    return v


def _decode_uint64(x: object) -> int:
    if type(x) is not int or x < 0:
        raise DecodeError(f"uint64 expected, got {describe_value(x)}")
    return x


_UINT64: Final = FieldKind(_encode_uint64, _decode_uint64, 9)


def _encode_cid(v: object) -> object:
    try:
        return _check_cid(v, "CID")
    except InvalidValue as exc:
        raise LocalProtocolError(str(exc)) from None


def _decode_cid(x: object) -> bytes:
    if type(x) is not bytes or len(x) != CID_BYTES or not x.startswith(CID_PREFIX):
        raise DecodeError(
            f"CIDv1 raw sha2-256 (bin of {CID_BYTES} bytes) expected, got {describe_value(x)}"
        )
    return x


_CID: Final = FieldKind(_encode_cid, _decode_cid, 2 + CID_BYTES)

_DOMAIN_STRUCT: Final = RecordStruct(
    Domain, [("chain_id", UINT256_FIELD), ("verifying_contract", ADDRESS_FIELD)]
)


def _encode_domain(v: object) -> object:
    if type(v) is Domain and (v.name != DOMAIN_NAME or v.version != DOMAIN_VERSION):
        raise LocalProtocolError("only the Weft EIP-712 domain name and version are encoded")
    return _DOMAIN_STRUCT.kind.encode(v)


_DOMAIN: Final = FieldKind(_encode_domain, _DOMAIN_STRUCT.kind.decode, _DOMAIN_STRUCT.kind.max_size)

_SIGNED_CHANNEL_STATE: Final = RecordStruct(
    SignedChannelState,
    [("state", CHANNEL_STATE_FIELD), ("sig_hub", SIGNATURE_FIELD), ("sig_user", SIGNATURE_FIELD)],
).kind

_BACKUP_THREAD: Final = RecordStruct(
    BackupThread,
    [
        ("initial", SIGNED_THREAD_STATE_FIELD),
        ("latest", SIGNED_THREAD_STATE_FIELD),
        ("held", _UINT64),
    ],
).kind

_CONTENT: Final = RecordStruct(
    BackupContent,
    [
        ("owner", ADDRESS_FIELD),
        ("domain", _DOMAIN),
        ("hub", ADDRESS_FIELD),
        ("sequence", _UINT64),
        ("channels", tuple_of(_SIGNED_CHANNEL_STATE, MAX_BACKUP_CHANNELS)),
        ("threads", tuple_of(_BACKUP_THREAD, MAX_BACKUP_THREADS)),
    ],
)

_ROOT: Final = RecordStruct(
    BackupRoot, [("total_size", _UINT64), ("children", tuple_of(_CID, MAX_CHILDREN))]
)

_ANNOUNCEMENT: Final = RecordStruct(
    Announcement,
    [
        ("owner", ADDRESS_FIELD),
        ("sequence", _UINT64),
        ("root_cid", _CID),
        ("size", _UINT64),
        ("signature", SIGNATURE_FIELD),
    ],
)

MAX_ROOT_BYTES: Final = 3 + _ROOT.kind.max_size
MAX_ANNOUNCEMENT_BYTES: Final = 3 + _ANNOUNCEMENT.kind.max_size


def _unpack_limits(max_array: int) -> dict[str, Any]:
    # No valid record holds a str, a map, an ext or a bin longer than a signature.
    return {
        "raw": False,
        "use_list": True,
        "strict_map_key": True,
        "max_str_len": 0,
        "max_bin_len": 65,
        "max_array_len": max(16, max_array),
        "max_map_len": 0,
        "max_ext_len": 0,
    }


_CONTENT_LIMITS: Final = _unpack_limits(max(MAX_BACKUP_CHANNELS, MAX_BACKUP_THREADS))
_ROOT_LIMITS: Final = _unpack_limits(MAX_CHILDREN)
_ANNOUNCEMENT_LIMITS: Final = _unpack_limits(0)


def _encode(struct: RecordStruct, code: int, value: object, max_bytes: int) -> bytes:
    if type(value) is not struct.cls:
        raise LocalProtocolError(f"{struct.cls.__name__} expected, got {type(value).__name__}")
    data: bytes = msgpack.packb([BACKUP_VERSION, code, struct.encode_fields(value)])
    if len(data) > max_bytes:
        raise LocalProtocolError(
            f"encoded {struct.cls.__name__} of {len(data)} bytes exceeds {max_bytes}"
        )
    return data


def _decode(
    data: bytes, struct: RecordStruct, code: int, max_bytes: int, limits: Mapping[str, Any]
) -> Any:
    name = struct.cls.__name__
    if type(data) is not bytes:
        raise BackupDecodeError(f"{name}: bytes expected, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise BackupTooLarge(f"{name} of {len(data)} bytes exceeds {max_bytes}")
    if len(data) < 4 or data[:3] != bytes((0x93, BACKUP_VERSION, code)):
        raise BackupDecodeError(f"{name}: must start with 93 {BACKUP_VERSION:02x} {code:02x}")
    body_bytes = memoryview(data)[3:]
    try:
        body = msgpack.unpackb(body_bytes, **limits)
    except msgpack.ExtraData:
        raise BackupDecodeError(f"{name}: trailing bytes after the record") from None
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        raise BackupDecodeError(f"{name}: invalid msgpack: {type(exc).__name__}") from None
    try:
        value = struct.kind.decode(body)
    except FieldError as exc:
        raise BackupDecodeError(f"{name}.{exc}") from None
    except DecodeError as exc:
        raise BackupDecodeError(f"{name}: {exc}") from None
    except (ValueError, TypeError, LookupError, OverflowError, RecursionError) as exc:
        raise BackupDecodeError(f"{name}: {type(exc).__name__}: {exc}") from None
    if msgpack.packb(body) != body_bytes:
        raise BackupDecodeError(f"{name}: non-canonical encoding")
    return value


def encode_content(content: BackupContent) -> bytes:
    """The canonical bytes of `content`.

    Raises `LocalProtocolError` for a channel without both signatures, a domain with another
    name or version than Weft's, too many entries, or more than `MAX_CONTENT_BYTES`.
    """
    return _encode(_CONTENT, CONTENT_CODE, content, MAX_CONTENT_BYTES)


def decode_content(data: bytes) -> BackupContent:
    """Decode content bytes; raise `BackupTooLarge` or `BackupDecodeError` if not valid.

    Checks form only: call `check_content` before trusting any state in it.
    """
    content: BackupContent = _decode(
        data, _CONTENT, CONTENT_CODE, MAX_CONTENT_BYTES, _CONTENT_LIMITS
    )
    return content


def encode_announcement(announcement: Announcement) -> bytes:
    """The canonical bytes of `announcement`, as published on the gossip topic."""
    return _encode(_ANNOUNCEMENT, ANNOUNCEMENT_CODE, announcement, MAX_ANNOUNCEMENT_BYTES)


def decode_announcement(data: bytes) -> Announcement:
    """Decode an announcement; raise `BackupTooLarge` or `BackupDecodeError` if not valid.

    Checks form only: call `check_announcement` for the signature and the size cap.
    """
    announcement: Announcement = _decode(
        data, _ANNOUNCEMENT, ANNOUNCEMENT_CODE, MAX_ANNOUNCEMENT_BYTES, _ANNOUNCEMENT_LIMITS
    )
    return announcement


def encode_root(root: BackupRoot) -> bytes:
    """The canonical bytes of a root block."""
    return _encode(_ROOT, ROOT_CODE, root, MAX_ROOT_BYTES)


def decode_root(data: bytes) -> BackupRoot:
    """Decode a root block; raise `BackupTooLarge` or `BackupDecodeError` if not valid."""
    root: BackupRoot = _decode(data, _ROOT, ROOT_CODE, MAX_ROOT_BYTES, _ROOT_LIMITS)
    return root


# ---------------------------------------------------------------- content checks


def check_content(content: BackupContent, owner: Address, domain: Domain) -> None:
    """Check decoded content fully; return None or raise a `BackupError`.

    - `BackupMismatch`: `content.owner` is not `owner` or `content.domain` is not `domain`;
    - `DuplicateEntry`: two channels of one user, or two threads with one key;
    - `NotOwnersState`: a user's backup holding another user's channel or a thread the
      owner is not a party of; a hub's backup holding a thread of a user without a channel
      in it;
    - `InvalidEntry`: a channel whose user is the hub; a thread whose `held` is not in
      [1, 3], names a party without a channel in the content, or (a user's backup) is not
      exactly the owner's bit; a thread whose initial state has a tx_count other than 0,
      whose latest state has another key, an older tx_count or another total;
    - `BadBackupSignature`: any signature (hub, user, sender, receiver; initial and latest)
      that does not recover to its party.
    """
    if content.owner != owner:
        raise BackupMismatch(f"content of {content.owner}, expected {owner}")
    if content.domain != domain:
        raise BackupMismatch(
            f"content for chain {content.domain.chain_id} manager"
            f" {content.domain.verifying_contract}, expected chain {domain.chain_id}"
            f" manager {domain.verifying_contract}"
        )
    hub = content.hub
    owner_is_hub = owner == hub
    users: set[Address] = set()
    for i, entry in enumerate(content.channels):
        user = entry.state.user
        if user in users:
            raise DuplicateEntry(f"channels[{i}]: a second channel of {user}")
        users.add(user)
        if user == hub:
            raise InvalidEntry(f"channels[{i}]: the hub {hub} has no channel with itself")
        if not owner_is_hub and user != owner:
            raise NotOwnersState(f"channels[{i}]: channel of {user}, not of {owner}")
    keys: set[ThreadKey] = set()
    for i, thread in enumerate(content.threads):
        initial, latest = thread.initial.state, thread.latest.state
        key = initial.key
        if key in keys:
            raise DuplicateEntry(f"threads[{i}]: a second entry for thread {key.thread_id}")
        keys.add(key)
        parties = (initial.sender, initial.receiver)
        if owner_is_hub:
            if not users.intersection(parties):
                raise NotOwnersState(f"threads[{i}]: neither party has a channel in the backup")
        elif owner not in parties:
            raise NotOwnersState(f"threads[{i}]: {owner} is not a party of the thread")
        held = thread.held
        if not 1 <= held <= HELD_BOTH:
            raise InvalidEntry(f"threads[{i}]: held {held} not in [1, {HELD_BOTH}]")
        if not owner_is_hub and held != held_bit(key, owner):
            raise InvalidEntry(f"threads[{i}]: held {held} names another channel than the owner's")
        for party in parties:
            if held & held_bit(key, party) and party not in users:
                raise InvalidEntry(f"threads[{i}]: held names {party}, without a channel here")
        if initial.tx_count != 0:
            raise InvalidEntry(f"threads[{i}]: initial state has tx_count {initial.tx_count}")
        if latest.key != key:
            raise InvalidEntry(f"threads[{i}]: latest state is of another thread")
        if latest.total() != initial.total():
            raise InvalidEntry(f"threads[{i}]: latest state does not conserve the total")
    for i, entry in enumerate(content.channels):
        if entry.sig_hub is None or entry.sig_user is None:  # never after decoding
            raise InvalidEntry(f"channels[{i}]: a channel state without both signatures")
        state = entry.state
        digest = channel_state_digest(domain, state)
        _expect_signer(digest, entry.sig_hub, hub, f"channels[{i}]: hub")
        _expect_signer(digest, entry.sig_user, state.user, f"channels[{i}]: user")
    for i, thread in enumerate(content.threads):
        for which, signed in (("initial", thread.initial), ("latest", thread.latest)):
            t = signed.state
            digest = thread_state_digest(domain, t)
            where = f"threads[{i}].{which}"
            _expect_signer(digest, signed.sig_sender, t.sender, f"{where}: sender")
            _expect_signer(digest, signed.sig_receiver, t.receiver, f"{where}: receiver")


def _expect_signer(digest: bytes, signature: Signature, expected: Address, what: str) -> None:
    try:
        signer = recover_digest(digest, signature)
    except InvalidSignature:
        raise BadBackupSignature(f"{what} signature does not recover") from None
    if signer != expected:
        raise BadBackupSignature(f"{what} signature is by {signer}, expected {expected}")


# ---------------------------------------------------------------- key and AEAD


def backup_key(private_key: bytes) -> bytes:
    """The 32-byte backup encryption key of a node: HKDF-SHA256 of its secp256k1 key.

    Raises `InvalidValue` unless `private_key` is 32 bytes.
    """
    check_bytes(private_key, 32, "private key")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=HKDF_SALT, info=HKDF_INFO)
    return hkdf.derive(private_key)


def backup_aad(domain: Domain, owner: Address, sequence: int) -> bytes:
    """The associated data that binds a sealed backup to its domain, owner and sequence."""
    _check_uint64(sequence, "sequence")
    return b"".join(
        (
            AAD_PREFIX,
            domain.chain_id.to_bytes(32, "big"),
            domain.verifying_contract.raw,
            owner.raw,
            sequence.to_bytes(8, "big"),
        )
    )


def seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """`nonce || ChaCha20-Poly1305(key, nonce, plaintext, aad)` (ciphertext and 16-byte tag).

    `nonce` is 12 bytes the caller draws at random for each seal: never reuse one with a key.
    Raises `InvalidValue` for a key or nonce of the wrong length.
    """
    check_bytes(key, KEY_BYTES, "backup key")
    check_bytes(nonce, NONCE_BYTES, "nonce")
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """The plaintext of `seal`'s output; raise `DecryptionFailed` if it does not authenticate.

    Wrong key, any changed byte, another `aad` (so another owner, domain or sequence) or a
    truncated input all raise `DecryptionFailed`.
    """
    check_bytes(key, KEY_BYTES, "backup key")
    if len(sealed) < SEALED_OVERHEAD:
        raise DecryptionFailed(f"{len(sealed)} bytes is shorter than nonce and tag")
    nonce, body = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, body, aad)
    except InvalidTag:
        raise DecryptionFailed("authentication failed") from None


def seal_backup(key: bytes, nonce: bytes, content: BackupContent) -> bytes:
    """`content` encoded and sealed under the AAD of its own domain, owner and sequence."""
    aad = backup_aad(content.domain, content.owner, content.sequence)
    return seal(key, nonce, encode_content(content), aad)


def open_backup(
    key: bytes, sealed: bytes, announcement: Announcement, domain: Domain
) -> BackupContent:
    """Unseal, decode and fully check the backup that `announcement` announced.

    Raises `DecryptionFailed`, `BackupTooLarge`, `BackupDecodeError`, `BackupMismatch`
    (content of another sequence than announced) or any error of `check_content`.
    """
    aad = backup_aad(domain, announcement.owner, announcement.sequence)
    content = decode_content(unseal(key, sealed, aad))
    if content.sequence != announcement.sequence:
        raise BackupMismatch(
            f"content sequence {content.sequence}, announced {announcement.sequence}"
        )
    check_content(content, announcement.owner, domain)
    return content


# ---------------------------------------------------------------- blocks


def cid_of(data: bytes) -> bytes:
    """The CIDv1 of `data` as raw bytes: 0x01 0x55 0x12 0x20 followed by sha2-256(data)."""
    return CID_PREFIX + hashlib.sha256(data).digest()


def check_block(cid: bytes, data: bytes) -> None:
    """Raise `CidMismatch` unless `data` hashes to `cid`."""
    if cid_of(data) != cid:
        raise CidMismatch(f"block of {len(data)} bytes does not hash to {cid.hex()}")


def to_blocks(sealed: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """Split `sealed` into child blocks of `BLOCK_BYTES` and a root block listing them.

    Returns the root CID and every block (root included) by CID. Raises
    `LocalProtocolError` if `sealed` is empty or longer than `MAX_SEALED_BYTES`.
    """
    if not 1 <= len(sealed) <= MAX_SEALED_BYTES:
        raise LocalProtocolError(f"sealed backup of {len(sealed)} bytes is empty or too large")
    blocks: dict[bytes, bytes] = {}
    children: list[bytes] = []
    for start in range(0, len(sealed), BLOCK_BYTES):
        chunk = sealed[start : start + BLOCK_BYTES]
        cid = cid_of(chunk)
        blocks[cid] = chunk
        children.append(cid)
    root = encode_root(BackupRoot(len(sealed), tuple(children)))
    root_cid = cid_of(root)
    blocks[root_cid] = root
    return root_cid, blocks


def parse_root(root_cid: bytes, data: bytes) -> BackupRoot:
    """The root block `data` fetched by `root_cid`, checked: `CidMismatch`, or decode errors."""
    check_block(root_cid, data)
    return decode_root(data)


def stored_bytes(size: int) -> int:
    """Bytes a replica stores for a sealed backup of `size` bytes: children plus root.

    Raises `InvalidValue` unless `1 <= size <= MAX_SEALED_BYTES`.
    """
    count = -(-size // BLOCK_BYTES)
    dummy = CID_PREFIX + bytes(32)
    return size + len(encode_root(BackupRoot(size, (dummy,) * count)))


def from_blocks(
    root_cid: bytes, get: Callable[[bytes], bytes | None], size: int | None = None
) -> bytes:
    """Reassemble the sealed backup under `root_cid`, fetching blocks with `get`.

    `get(cid)` returns the block's bytes or None if it has none. Every block is checked
    against its CID. Raises `BlockMissing`, `CidMismatch`, `BackupDecodeError` or
    `BackupTooLarge` (a bad root), or `SizeMismatch` (a child of the wrong length, or a
    total other than `size` when `size` is given).
    """
    root_data = get(root_cid)
    if root_data is None:
        raise BlockMissing(f"root block {root_cid.hex()}")
    root = parse_root(root_cid, root_data)
    if size is not None and root.total_size != size:
        raise SizeMismatch(f"root says {root.total_size} bytes, announced {size}")
    parts: list[bytes] = []
    last = len(root.children) - 1
    for i, cid in enumerate(root.children):
        data = get(cid)
        if data is None:
            raise BlockMissing(f"child block {i} ({cid.hex()})")
        check_block(cid, data)
        expected = BLOCK_BYTES if i < last else root.total_size - BLOCK_BYTES * last
        if len(data) != expected:
            raise SizeMismatch(f"child block {i} has {len(data)} bytes, expected {expected}")
        parts.append(data)
    return b"".join(parts)


# ---------------------------------------------------------------- announcements


def announcement_digest(
    domain: Domain, owner: Address, sequence: int, root_cid: bytes, size: int
) -> bytes:
    """keccak-256 of the domain-separated, fixed-width announcement fields (SPEC.md)."""
    return keccak(
        b"".join(
            (
                ANNOUNCEMENT_PREFIX,
                domain.chain_id.to_bytes(32, "big"),
                domain.verifying_contract.raw,
                owner.raw,
                sequence.to_bytes(8, "big"),
                root_cid,
                size.to_bytes(8, "big"),
            )
        )
    )


def make_announcement(
    signer: Signer, domain: Domain, sequence: int, root_cid: bytes, size: int
) -> Announcement:
    """`signer`'s signed announcement of its backup `sequence` under `root_cid`.

    Raises `InvalidValue` for a malformed CID, a sequence or size out of range.
    """
    _check_uint64(sequence, "sequence")
    _check_cid(root_cid, "root_cid")
    _check_uint64(size, "size")
    digest = announcement_digest(domain, signer.address, sequence, root_cid, size)
    return Announcement(signer.address, sequence, root_cid, size, signer.sign_digest(digest))


def check_announcement(announcement: Announcement, domain: Domain, max_size: int) -> None:
    """Raise `BackupTooLarge` if the size is over `max_size` (or `MAX_SEALED_BYTES`), or
    `BadBackupSignature` if the signature does not recover to the owner for `domain`."""
    cap = min(max_size, MAX_SEALED_BYTES)
    if announcement.size > cap:
        raise BackupTooLarge(f"announced backup of {announcement.size} bytes exceeds {cap}")
    _check_announcement_signature(announcement, domain)


def _check_announcement_signature(announcement: Announcement, domain: Domain) -> None:
    a = announcement
    digest = announcement_digest(domain, a.owner, a.sequence, a.root_cid, a.size)
    try:
        signer = recover_digest(digest, a.signature)
    except InvalidSignature:
        raise BadBackupSignature("announcement signature does not recover") from None
    if signer != a.owner:
        raise BadBackupSignature(f"announcement of {a.owner} is signed by {signer}")


def pack_backup(
    key: bytes, nonce: bytes, content: BackupContent, signer: Signer
) -> tuple[Announcement, dict[bytes, bytes]]:
    """Seal `content`, split it into blocks and sign its announcement.

    Returns the announcement and every block by CID. Raises `LocalProtocolError` if the
    content is not `signer`'s.
    """
    if content.owner != signer.address:
        raise LocalProtocolError(f"content of {content.owner} cannot be announced by {signer}")
    sealed = seal_backup(key, nonce, content)
    root_cid, blocks = to_blocks(sealed)
    announcement = make_announcement(
        signer, content.domain, content.sequence, root_cid, len(sealed)
    )
    return announcement, blocks


# ---------------------------------------------------------------- replica policy


class Priority(IntEnum):
    """How much an owner's backup is worth keeping; higher is kept first."""

    OTHER = 0
    THREAD_PEER = 1


class OfferOutcome(Enum):
    ADMITTED = "admitted"  # a new owner: fetch its blocks
    REPLACED = "replaced"  # a newer backup of a kept owner: drop the old blocks, fetch new
    OWN = "own"  # our own backup: never kept as a replica
    STALE = "stale"  # sequence not above the one kept: ignored
    NO_ROOM = "no_room"  # too large, or every kept owner outranks it: ignored


@dataclass(frozen=True, slots=True)
class Replica:
    """One owner's backup that this node keeps, and where it ranks."""

    announcement: Announcement
    priority: Priority
    tick: int  # the table's tick when it was accepted: higher is more recent
    stored: int  # `stored_bytes(announcement.size)`

    @property
    def owner(self) -> Address:
        return self.announcement.owner

    @property
    def rank(self) -> tuple[int, int]:
        """Lower ranks are evicted first: thread peers over others, then most recent."""
        return (int(self.priority), self.tick)


@dataclass(frozen=True, slots=True)
class ReplicaTable:
    """The backups this node keeps for other owners, at most `max_owners` and `max_bytes`.

    `replicas` is sorted by owner, one per owner; `tick` counts accepted announcements.
    """

    me: Address
    max_owners: int
    max_bytes: int
    replicas: tuple[Replica, ...] = ()
    tick: int = 0

    def __post_init__(self) -> None:
        if type(self.me) is not Address:
            raise InvalidValue("me must be an Address")
        if type(self.max_owners) is not int or self.max_owners < 0:
            raise InvalidValue("max_owners must be a non-negative int")
        if type(self.max_bytes) is not int or self.max_bytes < 0:
            raise InvalidValue("max_bytes must be a non-negative int")
        owners = [r.owner for r in self.replicas]
        if owners != sorted(set(owners)) or self.me in owners:
            raise InvalidValue("replicas must be sorted by owner, unique, and not our own")
        if len(owners) > self.max_owners or self.total_bytes > self.max_bytes:
            raise InvalidValue("replicas exceed the table's bounds")

    @property
    def total_bytes(self) -> int:
        return sum(r.stored for r in self.replicas)

    def get(self, owner: Address) -> Replica | None:
        return next((r for r in self.replicas if r.owner == owner), None)


@dataclass(frozen=True, slots=True)
class ReplicaUpdate:
    """What `offer` decided: the new table, the outcome, the blocks to drop and to fetch.

    The node drops the blocks of every `evict` announcement (an old backup of the same owner
    included) and then fetches and pins the blocks of `fetch`.
    """

    table: ReplicaTable
    outcome: OfferOutcome
    fetch: Announcement | None = None
    evict: tuple[Announcement, ...] = ()


def offer(table: ReplicaTable, announcement: Announcement, priority: Priority) -> ReplicaUpdate:
    """Decide whether to keep a checked announcement (`check_announcement` came first).

    Our own owner, and a sequence not above the kept one, are ignored (not errors). A higher
    sequence replaces the kept one. A backup that does not fit is admitted only by evicting
    owners of lower rank (lower priority first, then least recently accepted); if even that
    does not make room, it is ignored and the table is unchanged.
    """
    owner = announcement.owner
    if owner == table.me:
        return ReplicaUpdate(table, OfferOutcome.OWN)
    kept = table.get(owner)
    if kept is not None and announcement.sequence <= kept.announcement.sequence:
        return ReplicaUpdate(table, OfferOutcome.STALE)
    if announcement.size > min(table.max_bytes, MAX_SEALED_BYTES) or table.max_owners == 0:
        return ReplicaUpdate(table, OfferOutcome.NO_ROOM)
    new = Replica(announcement, Priority(priority), table.tick + 1, stored_bytes(announcement.size))
    if new.stored > table.max_bytes:
        return ReplicaUpdate(table, OfferOutcome.NO_ROOM)
    others = [r for r in table.replicas if r.owner != owner]
    count = len(others) + 1
    total = sum(r.stored for r in others) + new.stored
    victims: list[Replica] = []
    for candidate in sorted(others, key=lambda r: r.rank):
        if count <= table.max_owners and total <= table.max_bytes:
            break
        if candidate.rank >= new.rank:
            break
        victims.append(candidate)
        count -= 1
        total -= candidate.stored
    if count > table.max_owners or total > table.max_bytes:
        return ReplicaUpdate(table, OfferOutcome.NO_ROOM)
    kept_replicas = [r for r in others if r not in victims]
    kept_replicas.append(new)
    kept_replicas.sort(key=lambda r: r.owner)
    evict = tuple(v.announcement for v in victims)
    if kept is not None:
        evict = (kept.announcement, *evict)
    return ReplicaUpdate(
        replace(table, replicas=tuple(kept_replicas), tick=new.tick),
        OfferOutcome.REPLACED if kept is not None else OfferOutcome.ADMITTED,
        fetch=announcement,
        evict=evict,
    )


def forget(table: ReplicaTable, owner: Address) -> tuple[ReplicaTable, Announcement | None]:
    """Drop `owner`'s replica (say its blocks could not be fetched).

    Returns the new table and the announcement whose blocks to drop (None if not kept).
    """
    kept = table.get(owner)
    if kept is None:
        return table, None
    remaining = tuple(r for r in table.replicas if r.owner != owner)
    return replace(table, replicas=remaining), kept.announcement


# ---------------------------------------------------------------- recovery


def rank_backups(
    seen: Iterable[Announcement], owner: Address, domain: Domain, max_size: int
) -> tuple[Announcement, ...]:
    """`owner`'s announcements that pass `check_announcement`, newest first, no duplicates.

    Equal sequences (which only an owner that lost its data produces) are ordered by root
    CID, so every node tries them in the same order.
    """
    valid: set[Announcement] = set()
    for announcement in seen:
        if announcement.owner != owner or announcement in valid:
            continue
        try:
            check_announcement(announcement, domain, max_size)
        except BackupError:
            continue
        valid.add(announcement)
    return tuple(sorted(valid, key=lambda a: (-a.sequence, a.root_cid, a.size)))


def choose_backup(
    seen: Iterable[Announcement], owner: Address, domain: Domain, max_size: int
) -> Announcement | None:
    """The newest valid announcement of `owner` among `seen`, or None if there is none."""
    ranked = rank_backups(seen, owner, domain, max_size)
    return ranked[0] if ranked else None


def newest_sequence(seen: Iterable[Announcement], owner: Address, domain: Domain) -> int | None:
    """The highest sequence among `owner`'s correctly signed announcements, whatever size."""
    newest: int | None = None
    for announcement in seen:
        if announcement.owner != owner:
            continue
        if newest is not None and announcement.sequence <= newest:
            continue
        try:
            _check_announcement_signature(announcement, domain)
        except BackupError:
            continue
        newest = announcement.sequence
    return newest


def check_not_stale(content: BackupContent, seen: Iterable[Announcement], domain: Domain) -> None:
    """Raise `StaleBackup` if a correctly signed announcement of the owner in `seen` has a
    higher sequence than `content`: never adopt a state older than one you can see."""
    newest = newest_sequence(seen, content.owner, domain)
    if newest is not None and newest > content.sequence:
        raise StaleBackup(
            f"content has sequence {content.sequence}, an announcement of {newest} was seen"
        )
