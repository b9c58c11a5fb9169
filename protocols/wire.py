"""The wire codec: messages to canonical msgpack bytes and back, and stream framing.

A message is the msgpack array `[WIRE_VERSION, type code, body]`; the body is the array of
the message's fields in declared order. Every value has exactly one valid encoding, so
`encode(decode(data)) == data` whenever `decode` accepts `data`. SPEC.md ("Wire format")
is the normative description; the tables below are its implementation.

Decoding is total: any input either decodes to a valid message or raises `DecodeError`.
Encoding a message that the decoder would refuse (a field of the wrong type, out of range
or over its cap) raises `LocalProtocolError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from operator import attrgetter
from typing import Any, Final, cast, get_args

import msgpack

from protocols.errors import DecodeError, InvalidValue, LocalProtocolError
from protocols.messages import (
    ChannelCountersign,
    ChannelProposal,
    ChannelReject,
    ChannelResume,
    ChannelSync,
    CollateralNeeded,
    CollateralRequest,
    ErrorNotice,
    HubMessage,
    Message,
    PeerInfo,
    PeerLookup,
    RejectReason,
    SignedThreadState,
    ThreadCloseNotice,
    ThreadCloseRequest,
    ThreadCountersign,
    ThreadMessage,
    ThreadOpenProposal,
    ThreadOpenRefused,
    ThreadOpenRequest,
    ThreadProposal,
    ThreadReject,
    ThreadResume,
    ThreadSync,
    UpdateCloseThread,
    UpdateConfirmPending,
    UpdateInvalidatePending,
    UpdateOpenThread,
    UpdatePayment,
    UpdatePending,
)
from protocols.types import (
    UINT256_MAX,
    Address,
    Assets,
    ChannelState,
    Party,
    Signature,
    ThreadKey,
    ThreadState,
)

WIRE_VERSION: Final = 1
MAX_FRAME: Final = 1_048_576
"""Largest encoded message, and largest frame payload, in bytes."""
FRAME_HEADER: Final = 4
"""Bytes of the big-endian length prefix of a frame."""

MAX_DETAIL_BYTES: Final = 1024
"""`detail` of `ChannelReject`, `ThreadReject` and `ErrorNotice`, in UTF-8 bytes."""
MAX_PEER_ID_BYTES: Final = 128
MAX_MULTIADDRS: Final = 16
MAX_MULTIADDR_BYTES: Final = 256
"""One multiaddr of `PeerInfo`, in UTF-8 bytes."""
MAX_SYNC_THREADS: Final = 1024
"""Open threads listed in one `ChannelSync`."""

_UINT64_MAX: Final = 2**64 - 1

# Stable wire codes. Never renumber; retire a code rather than reuse it.
PARTY_CODES: Final[Mapping[Party, int]] = {Party.HUB: 0, Party.USER: 1}

UPDATE_CODES: Final[Mapping[type, int]] = {
    UpdatePayment: 1,
    UpdatePending: 2,
    UpdateConfirmPending: 3,
    UpdateInvalidatePending: 4,
    UpdateOpenThread: 5,
    UpdateCloseThread: 6,
}

MESSAGE_CODES: Final[Mapping[type, int]] = {
    # both protocols
    ErrorNotice: 1,
    # /weft/hub/1
    ChannelProposal: 16,
    ChannelCountersign: 17,
    ChannelReject: 18,
    ChannelResume: 19,
    ChannelSync: 20,
    ThreadOpenRequest: 21,
    ThreadCloseRequest: 22,
    CollateralRequest: 23,
    CollateralNeeded: 24,
    PeerLookup: 25,
    PeerInfo: 26,
    ThreadOpenRefused: 27,
    # /weft/thread/1
    ThreadOpenProposal: 32,
    ThreadProposal: 33,
    ThreadCountersign: 34,
    ThreadReject: 35,
    ThreadResume: 36,
    ThreadCloseNotice: 37,
    ThreadSync: 38,
}

HUB_MESSAGE_TYPES: Final[frozenset[type]] = frozenset(get_args(HubMessage))
"""Messages valid on `/weft/hub/1` (the `HubMessage` union)."""
THREAD_MESSAGE_TYPES: Final[frozenset[type]] = frozenset(get_args(ThreadMessage))
"""Messages valid on `/weft/thread/1` (the `ThreadMessage` union)."""

# No valid message holds a longer str, bin or array than these; maps and exts are never valid.
_UNPACK_LIMITS: Final[dict[str, Any]] = {
    "raw": False,
    "use_list": True,
    "strict_map_key": True,
    "max_str_len": max(MAX_DETAIL_BYTES, MAX_MULTIADDR_BYTES),
    "max_bin_len": max(65, MAX_PEER_ID_BYTES),
    "max_array_len": max(16, MAX_MULTIADDRS, MAX_SYNC_THREADS),
    "max_map_len": 0,
    "max_ext_len": 0,
}


# ---------------------------------------------------------------- errors


class FieldError(DecodeError):
    """A `DecodeError` located at a path of field names inside a message."""

    def __init__(self, path: tuple[str, ...], problem: str) -> None:
        where = "".join(p if p.startswith("[") else "." + p for p in path).removeprefix(".")
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.problem = problem


def _at(name: str, exc: DecodeError) -> FieldError:
    if isinstance(exc, FieldError):
        return FieldError((name, *exc.path), exc.problem)
    return FieldError((name,), str(exc))


def describe_value(x: object) -> str:
    """The msgpack type of a decoded object, for error messages."""
    if type(x) is bytes:
        return f"bin of {len(x)} bytes"
    if type(x) is list:
        return f"array of {len(x)}"
    if type(x) is str:
        return "str"
    if type(x) is bool:
        return "bool"
    if type(x) is int:
        return f"int {x}"
    if x is None:
        return "nil"
    if type(x) is float:
        return "float"
    if type(x) is dict:
        return "map"
    return "ext"


def _wrong_type(what: str, v: object) -> LocalProtocolError:
    return LocalProtocolError(f"{what} expected, got {type(v).__name__}")


# ---------------------------------------------------------------- kinds of values


@dataclass(frozen=True, slots=True)
class FieldKind:
    """How one kind of value is encoded and decoded, and its largest encoding in bytes."""

    encode: Callable[[Any], object]
    decode: Callable[[object], Any]
    max_size: int


def _array_header(n: int) -> int:
    return 1 if n < 16 else 3 if n < 2**16 else 5


def _str_header(n: int) -> int:
    return 1 if n < 32 else 2 if n < 256 else 3 if n < 2**16 else 5


def _bin_header(n: int) -> int:
    return 2 if n < 256 else 3 if n < 2**16 else 5


def _encode_uint256(v: object) -> object:
    if type(v) is not int:
        raise _wrong_type("uint256", v)
    if v < 0 or v > UINT256_MAX:
        raise LocalProtocolError(f"uint256 out of range: {v}")
    return v if v <= _UINT64_MAX else v.to_bytes(32, "big")


def _decode_uint256(x: object) -> int:
    if type(x) is int:
        if x < 0:
            raise DecodeError(f"uint256 must not be negative, got {x}")
        return x
    if type(x) is bytes and len(x) == 32:
        v = int.from_bytes(x, "big")
        if v <= _UINT64_MAX:
            raise DecodeError("uint256 below 2**64 must be a msgpack int, not bin")
        return v
    raise DecodeError(f"uint256 expected (int, or bin of 32 bytes), got {describe_value(x)}")


UINT256_FIELD: Final = FieldKind(_encode_uint256, _decode_uint256, 2 + 32)


def _enum(enum: type[Enum], codes: Mapping[Any, int]) -> FieldKind:
    members = {code: member for member, code in codes.items()}
    what = enum.__name__

    def encode(v: object) -> object:
        if type(v) is not enum:
            raise _wrong_type(what, v)
        return codes[v]

    def decode(x: object) -> Any:
        if type(x) is not int:
            raise DecodeError(f"{what} code (int) expected, got {describe_value(x)}")
        member = members.get(x)
        if member is None:
            raise DecodeError(f"unknown {what} code {x}")
        return member

    return FieldKind(encode, decode, max(len(msgpack.packb(c)) for c in codes.values()))


_PARTY: Final = _enum(Party, PARTY_CODES)
_REJECT_REASON: Final = _enum(RejectReason, {r: r.value for r in RejectReason})


def _encode_address(v: object) -> object:
    if type(v) is not Address:
        raise _wrong_type("Address", v)
    return v.raw


def _decode_address(x: object) -> Address:
    if type(x) is not bytes or len(x) != 20:
        raise DecodeError(f"address (bin of 20 bytes) expected, got {describe_value(x)}")
    return Address(x)


ADDRESS_FIELD: Final = FieldKind(_encode_address, _decode_address, 2 + 20)


def _encode_signature(v: object) -> object:
    if type(v) is not Signature:
        raise _wrong_type("Signature", v)
    return v.raw


def _decode_signature(x: object) -> Signature:
    if type(x) is not bytes or len(x) != 65:
        raise DecodeError(f"signature (bin of 65 bytes) expected, got {describe_value(x)}")
    try:
        return Signature(x)
    except InvalidValue as exc:
        raise DecodeError(str(exc)) from None


SIGNATURE_FIELD: Final = FieldKind(_encode_signature, _decode_signature, 2 + 65)


def _encode_bytes32(v: object) -> object:
    if type(v) is not bytes or len(v) != 32:
        raise LocalProtocolError(f"32 bytes expected, got {type(v).__name__}")
    return v


def _decode_bytes32(x: object) -> bytes:
    if type(x) is not bytes or len(x) != 32:
        raise DecodeError(f"bin of 32 bytes expected, got {describe_value(x)}")
    return x


_BYTES32: Final = FieldKind(_encode_bytes32, _decode_bytes32, 2 + 32)


def _text(max_bytes: int) -> FieldKind:
    def encode(v: object) -> object:
        if type(v) is not str:
            raise _wrong_type("str", v)
        try:
            size = len(v.encode("utf-8"))
        except UnicodeEncodeError:
            raise LocalProtocolError("str is not encodable as UTF-8") from None
        if size > max_bytes:
            raise LocalProtocolError(f"str of {size} UTF-8 bytes exceeds {max_bytes}")
        return v

    def decode(x: object) -> str:
        if type(x) is not str:
            raise DecodeError(f"str expected, got {describe_value(x)}")
        if len(x) * 4 > max_bytes and len(x.encode("utf-8")) > max_bytes:
            raise DecodeError(f"str exceeds {max_bytes} UTF-8 bytes")
        return x

    return FieldKind(encode, decode, _str_header(max_bytes) + max_bytes)


def _blob(max_bytes: int) -> FieldKind:
    def encode(v: object) -> object:
        if type(v) is not bytes:
            raise _wrong_type("bytes", v)
        if len(v) > max_bytes:
            raise LocalProtocolError(f"{len(v)} bytes exceed {max_bytes}")
        return v

    def decode(x: object) -> bytes:
        if type(x) is not bytes:
            raise DecodeError(f"bin expected, got {describe_value(x)}")
        if len(x) > max_bytes:
            raise DecodeError(f"bin of {len(x)} bytes exceeds {max_bytes}")
        return x

    return FieldKind(encode, decode, _bin_header(max_bytes) + max_bytes)


def tuple_of(item: FieldKind, max_items: int) -> FieldKind:
    item_encode = item.encode
    item_decode = item.decode

    def encode(v: object) -> object:
        if type(v) is not tuple:
            raise _wrong_type("tuple", v)
        if len(v) > max_items:
            raise LocalProtocolError(f"{len(v)} items exceed {max_items}")
        return [item_encode(e) for e in v]

    def decode(x: object) -> tuple[Any, ...]:
        if type(x) is not list:
            raise DecodeError(f"array expected, got {describe_value(x)}")
        if len(x) > max_items:
            raise DecodeError(f"array of {len(x)} items exceeds {max_items}")
        try:
            return tuple([item_decode(e) for e in x])
        except DecodeError:
            for i, e in enumerate(x):
                try:
                    item_decode(e)
                except DecodeError as exc:
                    raise _at(f"[{i}]", exc) from None
            raise

    return FieldKind(encode, decode, _array_header(max_items) + max_items * item.max_size)


class RecordStruct:
    """A dataclass encoded as the array of its fields in declared order."""

    __slots__ = ("_decoders", "_encoders", "_get", "cls", "fields", "kind", "max_fields_size")

    def __init__(self, cls: type, fields: Sequence[tuple[str, FieldKind]]) -> None:
        self.cls = cls
        self.fields = tuple(fields)
        names = [name for name, _ in fields]
        self._encoders = tuple(kind.encode for _, kind in fields)
        self._decoders = tuple(kind.decode for _, kind in fields)
        if len(names) == 1:
            get_one = attrgetter(names[0])
            self._get: Callable[[Any], tuple[Any, ...]] = lambda v: (get_one(v),)
        else:
            self._get = attrgetter(*names)
        self.max_fields_size = sum(kind.max_size for _, kind in fields)
        self.kind = FieldKind(
            self._encode, self._decode, _array_header(len(fields)) + self.max_fields_size
        )

    def encode_fields(self, v: Any) -> list[object]:
        """The encoded fields of `v`, which must be exactly of type `cls`."""
        try:
            return [encode(f) for encode, f in zip(self._encoders, self._get(v), strict=False)]
        except LocalProtocolError:
            for (name, kind), f in zip(self.fields, self._get(v), strict=True):
                try:
                    kind.encode(f)
                except LocalProtocolError as exc:
                    raise LocalProtocolError(f"{self.cls.__name__}.{name}: {exc}") from None
            raise

    def decode_fields(self, x: list[Any]) -> Any:
        """An instance of `cls` from its encoded fields."""
        if len(x) != len(self._decoders):
            raise DecodeError(f"{self.cls.__name__} has {len(self._decoders)} fields, got {len(x)}")
        try:
            args = [decode(f) for decode, f in zip(self._decoders, x, strict=False)]
        except DecodeError:
            for (name, kind), f in zip(self.fields, x, strict=True):
                try:
                    kind.decode(f)
                except DecodeError as exc:
                    raise _at(name, exc) from None
            raise
        try:
            return self.cls(*args)
        except InvalidValue as exc:
            raise DecodeError(f"invalid {self.cls.__name__}: {exc}") from None

    def _encode(self, v: object) -> object:
        if type(v) is not self.cls:
            raise _wrong_type(self.cls.__name__, v)
        return self.encode_fields(v)

    def _decode(self, x: object) -> Any:
        if type(x) is not list:
            raise DecodeError(f"{self.cls.__name__} (array) expected, got {describe_value(x)}")
        return self.decode_fields(x)


_ASSETS_STRUCT: Final = RecordStruct(Assets, [("eth", UINT256_FIELD), ("token", UINT256_FIELD)])


def _encode_assets(v: object) -> object:
    # Fast path for the most frequent nested value; the struct codec handles the rest.
    if type(v) is Assets and 0 <= v.eth <= _UINT64_MAX and 0 <= v.token <= _UINT64_MAX:
        return [v.eth, v.token]
    return _ASSETS_STRUCT.kind.encode(v)


def _decode_assets(x: object) -> Assets:
    # Fast path: two non-negative msgpack ints (bools are not ints here: `type(...) is int`).
    if type(x) is list and len(x) == 2:
        eth, token = x
        if type(eth) is int and type(token) is int and eth >= 0 and token >= 0:
            return Assets(eth, token)
    result: Assets = _ASSETS_STRUCT.kind.decode(x)
    return result


_ASSETS: Final = FieldKind(_encode_assets, _decode_assets, _ASSETS_STRUCT.kind.max_size)

_CHANNEL_STATE_STRUCT: Final = RecordStruct(
    ChannelState,
    [
        ("user", ADDRESS_FIELD),
        ("recipient", ADDRESS_FIELD),
        ("balance_hub", _ASSETS),
        ("balance_user", _ASSETS),
        ("pending_deposit_hub", _ASSETS),
        ("pending_deposit_user", _ASSETS),
        ("pending_withdrawal_hub", _ASSETS),
        ("pending_withdrawal_user", _ASSETS),
        ("tx_count_global", UINT256_FIELD),
        ("tx_count_onchain", UINT256_FIELD),
        ("thread_root", _BYTES32),
        ("thread_count", UINT256_FIELD),
        ("timeout", UINT256_FIELD),
    ],
)
CHANNEL_STATE_FIELD: Final = _CHANNEL_STATE_STRUCT.kind

_THREAD_STATE_STRUCT: Final = RecordStruct(
    ThreadState,
    [
        ("thread_id", UINT256_FIELD),
        ("sender", ADDRESS_FIELD),
        ("receiver", ADDRESS_FIELD),
        ("balance_sender", _ASSETS),
        ("balance_receiver", _ASSETS),
        ("tx_count", UINT256_FIELD),
    ],
)
_THREAD_STATE: Final = _THREAD_STATE_STRUCT.kind

_THREAD_KEY_STRUCT: Final = RecordStruct(
    ThreadKey,
    [("sender", ADDRESS_FIELD), ("receiver", ADDRESS_FIELD), ("thread_id", UINT256_FIELD)],
)


def _encode_thread_key(v: object) -> object:
    fields = _THREAD_KEY_STRUCT.kind.encode(v)
    if cast(ThreadKey, v).sender == cast(ThreadKey, v).receiver:
        raise LocalProtocolError("ThreadKey sender and receiver must differ")
    return fields


def _decode_thread_key(x: object) -> ThreadKey:
    key: ThreadKey = _THREAD_KEY_STRUCT.kind.decode(x)
    if key.sender == key.receiver:
        raise DecodeError("ThreadKey sender and receiver must differ")
    return key


_THREAD_KEY: Final = FieldKind(
    _encode_thread_key, _decode_thread_key, _THREAD_KEY_STRUCT.kind.max_size
)

_SIGNED_THREAD_STATE_STRUCT: Final = RecordStruct(
    SignedThreadState,
    [("state", _THREAD_STATE), ("sig_sender", SIGNATURE_FIELD), ("sig_receiver", SIGNATURE_FIELD)],
)
SIGNED_THREAD_STATE_FIELD: Final = _SIGNED_THREAD_STATE_STRUCT.kind

_NESTED_STRUCTS: Final = (
    _ASSETS_STRUCT,
    _CHANNEL_STATE_STRUCT,
    _THREAD_STATE_STRUCT,
    _THREAD_KEY_STRUCT,
    _SIGNED_THREAD_STATE_STRUCT,
)

_UPDATE_STRUCTS: Final[Mapping[type, RecordStruct]] = {
    s.cls: s
    for s in (
        RecordStruct(
            UpdatePayment, [("payer", _PARTY), ("amount", _ASSETS), ("forward_to", ADDRESS_FIELD)]
        ),
        RecordStruct(
            UpdatePending,
            [
                ("deposit_hub", _ASSETS),
                ("deposit_user", _ASSETS),
                ("withdrawal_hub", _ASSETS),
                ("withdrawal_user", _ASSETS),
                ("recipient", ADDRESS_FIELD),
                ("timeout", UINT256_FIELD),
            ],
        ),
        RecordStruct(UpdateConfirmPending, [("tx_count_onchain", UINT256_FIELD)]),
        RecordStruct(UpdateInvalidatePending, [("tx_count_onchain", UINT256_FIELD)]),
        RecordStruct(
            UpdateOpenThread,
            [
                ("initial", _THREAD_STATE),
                ("sig_sender", SIGNATURE_FIELD),
                ("sig_receiver", SIGNATURE_FIELD),
            ],
        ),
        RecordStruct(
            UpdateCloseThread,
            [
                ("final", _THREAD_STATE),
                ("sig_sender", SIGNATURE_FIELD),
                ("sig_receiver", SIGNATURE_FIELD),
            ],
        ),
    )
}
_UPDATE_BY_CODE: Final = {UPDATE_CODES[cls]: s for cls, s in _UPDATE_STRUCTS.items()}


def _encode_update(v: object) -> object:
    struct = _UPDATE_STRUCTS.get(type(v))
    if struct is None:
        raise _wrong_type("ChannelUpdate", v)
    return [UPDATE_CODES[struct.cls], *struct.encode_fields(v)]


def _decode_update(x: object) -> Any:
    if type(x) is not list or not x:
        raise DecodeError(f"ChannelUpdate (non-empty array) expected, got {describe_value(x)}")
    code = x[0]
    if type(code) is not int:
        raise DecodeError(f"ChannelUpdate code (int) expected, got {describe_value(code)}")
    struct = _UPDATE_BY_CODE.get(code)
    if struct is None:
        raise DecodeError(f"unknown ChannelUpdate code {code}")
    try:
        return struct.decode_fields(x[1:])
    except DecodeError as exc:
        raise _at(struct.cls.__name__, exc) from None


_CHANNEL_UPDATE: Final = FieldKind(
    _encode_update,
    _decode_update,
    max(_array_header(1 + len(s.fields)) + 1 + s.max_fields_size for s in _UPDATE_STRUCTS.values()),
)

_DETAIL: Final = _text(MAX_DETAIL_BYTES)

_MESSAGE_STRUCTS: Final[Mapping[type, RecordStruct]] = {
    s.cls: s
    for s in (
        RecordStruct(ErrorNotice, [("reason", _REJECT_REASON), ("detail", _DETAIL)]),
        RecordStruct(
            ChannelProposal,
            [
                ("update", _CHANNEL_UPDATE),
                ("state", CHANNEL_STATE_FIELD),
                ("prev_tx_count", UINT256_FIELD),
                ("signature", SIGNATURE_FIELD),
            ],
        ),
        RecordStruct(
            ChannelCountersign,
            [
                ("user", ADDRESS_FIELD),
                ("tx_count_global", UINT256_FIELD),
                ("signature", SIGNATURE_FIELD),
            ],
        ),
        RecordStruct(
            ChannelReject,
            [
                ("user", ADDRESS_FIELD),
                ("tx_count_global", UINT256_FIELD),
                ("reason", _REJECT_REASON),
                ("max_signed", UINT256_FIELD),
                ("detail", _DETAIL),
            ],
        ),
        RecordStruct(ChannelResume, [("user", ADDRESS_FIELD), ("after", UINT256_FIELD)]),
        RecordStruct(
            ChannelSync,
            [
                ("state", CHANNEL_STATE_FIELD),
                ("sig_hub", SIGNATURE_FIELD),
                ("sig_user", SIGNATURE_FIELD),
                ("threads", tuple_of(SIGNED_THREAD_STATE_FIELD, MAX_SYNC_THREADS)),
            ],
        ),
        RecordStruct(ThreadOpenRequest, [("initial", SIGNED_THREAD_STATE_FIELD)]),
        RecordStruct(ThreadCloseRequest, [("final", SIGNED_THREAD_STATE_FIELD)]),
        RecordStruct(CollateralRequest, [("amount", _ASSETS)]),
        RecordStruct(CollateralNeeded, [("user", ADDRESS_FIELD), ("missing", _ASSETS)]),
        RecordStruct(
            ThreadOpenRefused,
            [
                ("key", _THREAD_KEY),
                ("reason", _REJECT_REASON),
                ("missing", _ASSETS),
                ("detail", _DETAIL),
            ],
        ),
        RecordStruct(PeerLookup, [("address", ADDRESS_FIELD)]),
        RecordStruct(
            PeerInfo,
            [
                ("address", ADDRESS_FIELD),
                ("peer_id", _blob(MAX_PEER_ID_BYTES)),
                ("multiaddrs", tuple_of(_text(MAX_MULTIADDR_BYTES), MAX_MULTIADDRS)),
            ],
        ),
        RecordStruct(
            ThreadOpenProposal, [("initial", _THREAD_STATE), ("signature", SIGNATURE_FIELD)]
        ),
        RecordStruct(
            ThreadProposal,
            [
                ("state", _THREAD_STATE),
                ("prev_tx_count", UINT256_FIELD),
                ("signature", SIGNATURE_FIELD),
            ],
        ),
        RecordStruct(
            ThreadCountersign,
            [("key", _THREAD_KEY), ("tx_count", UINT256_FIELD), ("signature", SIGNATURE_FIELD)],
        ),
        RecordStruct(
            ThreadReject,
            [
                ("key", _THREAD_KEY),
                ("tx_count", UINT256_FIELD),
                ("reason", _REJECT_REASON),
                ("max_signed", UINT256_FIELD),
                ("detail", _DETAIL),
            ],
        ),
        RecordStruct(ThreadResume, [("key", _THREAD_KEY), ("after", UINT256_FIELD)]),
        RecordStruct(ThreadCloseNotice, [("key", _THREAD_KEY), ("tx_count", UINT256_FIELD)]),
        RecordStruct(ThreadSync, [("latest", SIGNED_THREAD_STATE_FIELD)]),
    )
}

_ENCODERS: Final = {cls: (MESSAGE_CODES[cls], s) for cls, s in _MESSAGE_STRUCTS.items()}
_ALL_BY_CODE: Final = {MESSAGE_CODES[cls]: s for cls, s in _MESSAGE_STRUCTS.items()}
_HUB_BY_CODE: Final = {c: s for c, s in _ALL_BY_CODE.items() if s.cls in HUB_MESSAGE_TYPES}
_THREAD_BY_CODE: Final = {c: s for c, s in _ALL_BY_CODE.items() if s.cls in THREAD_MESSAGE_TYPES}

MAX_MESSAGE_SIZE: Final[Mapping[type, int]] = {
    cls: 3 + s.kind.max_size for cls, s in _MESSAGE_STRUCTS.items()
}
"""Upper bound of the encoded size of each message type; longer input is refused unparsed."""


# ---------------------------------------------------------------- messages


def encode(message: Message) -> bytes:
    """Encode `message` as its canonical bytes.

    Raises `LocalProtocolError` if it is not a wire message, a field is of the wrong type,
    out of range or over its cap, or the result would exceed `MAX_FRAME`.
    """
    entry = _ENCODERS.get(type(message))
    if entry is None:
        raise LocalProtocolError(f"not a wire message: {type(message).__name__}")
    code, struct = entry
    data: bytes = msgpack.packb([WIRE_VERSION, code, struct.encode_fields(message)])
    if len(data) > MAX_FRAME:
        raise LocalProtocolError(
            f"encoded {type(message).__name__} of {len(data)} bytes exceeds MAX_FRAME"
        )
    return data


def decode(data: bytes) -> Message:
    """Decode one message of either protocol; raise `DecodeError` on any invalid input."""
    return cast(Message, _decode(data, _ALL_BY_CODE, "weft"))


def decode_hub(data: bytes) -> HubMessage:
    """Decode one `/weft/hub/1` message; raise `DecodeError` on anything else."""
    return cast(HubMessage, _decode(data, _HUB_BY_CODE, "/weft/hub/1"))


def decode_thread(data: bytes) -> ThreadMessage:
    """Decode one `/weft/thread/1` message; raise `DecodeError` on anything else."""
    return cast(ThreadMessage, _decode(data, _THREAD_BY_CODE, "/weft/thread/1"))


def _decode(data: bytes, allowed: Mapping[int, RecordStruct], protocol: str) -> Any:
    size = len(data)
    if size > MAX_FRAME:
        raise DecodeError(f"message of {size} bytes exceeds MAX_FRAME ({MAX_FRAME})")
    # The canonical envelope starts with fixarray(3), fixint version, fixint type code.
    if size < 4:
        raise DecodeError(f"message of {size} bytes is too short")
    if data[0] != 0x93:
        raise DecodeError(f"envelope must be an array of 3, first byte is 0x{data[0]:02x}")
    if data[1] != WIRE_VERSION:
        raise DecodeError(
            f"unsupported wire version (byte 0x{data[1]:02x}); this is {WIRE_VERSION}"
        )
    code = data[2]
    struct = allowed.get(code)
    if struct is None:
        known = _ALL_BY_CODE.get(code)
        if known is not None:
            raise DecodeError(f"{known.cls.__name__} (type {code}) is not a {protocol} message")
        raise DecodeError(f"unknown message type (byte 0x{code:02x})")
    name = struct.cls.__name__
    if size - 3 > struct.kind.max_size:
        raise DecodeError(f"{size} bytes is longer than any valid {name}")
    body_bytes = memoryview(data)[3:]
    try:
        body = msgpack.unpackb(body_bytes, **_UNPACK_LIMITS)
    except msgpack.StackError:
        raise DecodeError(f"{name}: msgpack nesting too deep") from None
    except msgpack.FormatError:
        raise DecodeError(f"{name}: malformed msgpack") from None
    except msgpack.ExtraData:
        raise DecodeError(f"{name}: trailing bytes after the message") from None
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        raise DecodeError(f"{name}: invalid msgpack: {exc}") from None
    try:
        message = struct.kind.decode(body)
    except FieldError as exc:
        raise DecodeError(f"{name}.{exc}") from None
    except DecodeError as exc:
        raise DecodeError(f"{name}: {exc}") from None
    except (ValueError, TypeError, LookupError, OverflowError, RecursionError) as exc:
        # Unreachable by design; kept so that decoding stays total.
        raise DecodeError(f"{name}: {type(exc).__name__}: {exc}") from None
    if msgpack.packb(body) != body_bytes:
        raise DecodeError(f"{name}: non-canonical encoding")
    return message


# ---------------------------------------------------------------- framing


def frame(payload: bytes) -> bytes:
    """`payload` prefixed with its length as 4 bytes big-endian.

    Raises `LocalProtocolError` if `payload` is longer than `MAX_FRAME`.
    """
    if len(payload) > MAX_FRAME:
        raise LocalProtocolError(f"payload of {len(payload)} bytes exceeds MAX_FRAME")
    return len(payload).to_bytes(FRAME_HEADER, "big") + payload


class FrameReader:
    """Splits a byte stream into frame payloads; no I/O.

    After it raises `DecodeError` the stream has lost its framing: every later `feed`
    raises too, and the caller should close the stream.
    """

    __slots__ = ("_buffer", "_failed")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a payload (0 at a frame boundary)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Append `data`; return the payloads it completes, in order (maybe none).

        Raises `DecodeError` as soon as a length prefix exceeds `MAX_FRAME`, without
        waiting for that frame's payload; payloads completed by the same `data` are lost.
        """
        if self._failed:
            raise DecodeError("frame stream already failed")
        buffer = self._buffer
        buffer += data
        end = len(buffer)
        pos = 0
        payloads: list[bytes] = []
        with memoryview(buffer) as view:
            while end - pos >= FRAME_HEADER:
                size = int.from_bytes(view[pos : pos + FRAME_HEADER], "big")
                if size > MAX_FRAME:
                    self._failed = True
                    raise DecodeError(f"frame length {size} exceeds MAX_FRAME ({MAX_FRAME})")
                stop = pos + FRAME_HEADER + size
                if stop > end:
                    break
                payloads.append(bytes(view[pos + FRAME_HEADER : stop]))
                pos = stop
        if pos:
            del buffer[:pos]
        return payloads
