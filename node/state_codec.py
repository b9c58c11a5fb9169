"""A canonical, total codec for machine state: the bytes the node's store keeps.

`encode(value)` turns a value built from the protocol's types into bytes, `decode(data)`
turns bytes back into the value. Both are total on their domain: `encode` raises
`CodecError` for anything it does not support, `decode` returns a value or raises
`CodecError`, never anything else.

The format is msgpack. Plain values use msgpack's own types; everything else is a msgpack
extension whose payload is itself a concatenation of encodings:

    None, bool, str, bytes       nil, bool, str (UTF-8), bin
    int in [-2**63, 2**64 - 1]   msgpack int, shortest form
    any other int                ext 1: sign byte (0 = positive, 1 = negative) + magnitude,
                                 big-endian, no leading zero byte
    tuple                        array of the element encodings
    frozenset                    ext 2: the element encodings concatenated in strictly
                                 increasing byte order
    Enum member                  ext 3: type name (str) + encoding of the member's value
    frozen dataclass             ext 4: type name (str) + map {field name: field encoding}
                                 in declaration order; fields declared `init=False` are
                                 not stored (the constructor recomputes them)

Type names are the classes' `module.qualname`, registered in `CODEC_TYPES` by scanning the
protocol modules. On decode a dataclass is built through its constructor, so its own
validation runs, after each field is checked against the field's type annotation.

Canonical rule: `encode` is the only writer, and `decode` accepts exactly what `encode`
writes. After decoding, the value is re-encoded and must give back the input bytes, else
`CodecError`. So a non-shortest int, a set out of order, a big int that fits in 64 bits,
trailing bytes: all refused. Hence `encode(decode(b)) == b` whenever `decode(b)` returns.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Any, Final

import msgpack

from protocols.errors import WeftProtocolError

__all__ = ["CODEC_MODULES", "CODEC_TYPES", "CodecError", "decode", "encode", "type_name"]

CODEC_MODULES: Final = (
    "protocols.types",
    "protocols.eip712",
    "protocols.messages",
    "protocols.effects",
    "protocols.channel",
    "protocols.thread",
    "protocols.onchain",
    "protocols.roles",
)
"""The modules whose dataclasses and enums the codec knows."""

EXT_BIGINT: Final = 1
EXT_FROZENSET: Final = 2
EXT_ENUM: Final = 3
EXT_DATACLASS: Final = 4

_NATIVE_INT_MIN: Final = -(2**63)
_NATIVE_INT_MAX: Final = 2**64 - 1


class CodecError(Exception):
    """A value cannot be encoded, or bytes are not a canonical encoding of a value."""


# ---------------------------------------------------------------- registry

Check = Callable[[object], bool]


def _check_for(hint: object) -> Check:
    """A predicate that holds exactly for values conforming to the annotation `hint`."""
    if hint is object or hint is Any or isinstance(hint, typing.TypeVar):
        return lambda value: True
    if hint is None or hint is type(None):
        return lambda value: value is None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        alternatives = tuple(_check_for(arg) for arg in args)
        return lambda value: any(check(value) for check in alternatives)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item = _check_for(args[0])
            return lambda value: type(value) is tuple and all(item(v) for v in value)
        items = tuple(_check_for(arg) for arg in args)
        return lambda value: (
            type(value) is tuple
            and len(value) == len(items)
            and all(check(v) for check, v in zip(items, value, strict=True))
        )
    if origin is frozenset:
        (element,) = (_check_for(arg) for arg in args)
        return lambda value: type(value) is frozenset and all(element(v) for v in value)
    if isinstance(hint, type) and origin is None:
        # Exact type: `int` excludes bool and IntEnum members, as the protocol's checks do.
        return lambda value: type(value) is hint
    raise TypeError(f"state codec: unsupported field annotation {hint!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class _DataclassInfo:
    cls: type
    names: tuple[str, ...]  # fields passed to the constructor, in declaration order
    checks: tuple[Check, ...]
    prefix: bytes  # the packed type name and map header
    packed_names: tuple[bytes, ...]


def type_name(cls: type) -> str:
    """The stable name a registered class is stored under, e.g. `protocols.types.Address`."""
    return f"{cls.__module__}.{cls.__qualname__}"


NOT_STORED: Final = frozenset({"protocols.roles.NodeState", "protocols.roles.NodeTransition"})
"""Types that live only in memory (their parts are stored one by one); private types too."""


def _scan(module_names: tuple[str, ...]) -> dict[str, type]:
    found: dict[str, type] = {}
    for module_name in module_names:
        module = importlib.import_module(module_name)
        for obj in vars(module).values():
            if not isinstance(obj, type) or obj.__module__ != module_name:
                continue
            if obj.__name__.startswith("_") or type_name(obj) in NOT_STORED:
                continue
            if issubclass(obj, Enum) or dataclasses.is_dataclass(obj):
                found[type_name(obj)] = obj
    return found


CODEC_TYPES: Final[dict[str, type]] = _scan(CODEC_MODULES)
"""Every class the codec encodes, by stored type name."""

_NAMES: Final[dict[type, str]] = {cls: name for name, cls in CODEC_TYPES.items()}
_DATACLASSES: dict[type, _DataclassInfo] = {}
for _cls in CODEC_TYPES.values():
    if not dataclasses.is_dataclass(_cls):
        continue
    if not _cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"state codec: {type_name(_cls)} is not a frozen dataclass")
    _hints = typing.get_type_hints(_cls)
    _fields = tuple(f for f in dataclasses.fields(_cls) if f.init)
    _DATACLASSES[_cls] = _DataclassInfo(
        _cls,
        tuple(f.name for f in _fields),
        tuple(_check_for(_hints[f.name]) for f in _fields),
        msgpack.packb(type_name(_cls)) + bytes(msgpack.Packer().pack_map_header(len(_fields))),
        tuple(msgpack.packb(f.name) for f in _fields),
    )

# Encodings of the immutable values that stay the same from one commit to the next (a
# thread's proposals in flight, signed states), by identity. The cache holds the value
# itself, so its id cannot be reused while cached; it is cleared when full.
_CACHED: Final = frozenset(
    CODEC_TYPES[name]
    for name in (
        "protocols.thread.Outgoing",
        "protocols.thread.Queued",
        "protocols.messages.SignedThreadState",
        "protocols.channel.SignedChannelState",
        "protocols.channel.OutgoingUpdate",
        "protocols.types.ThreadState",
        "protocols.types.ChannelState",
        "protocols.eip712.Domain",
    )
)
_CACHE_SIZE: Final = 8192
_cache: dict[int, tuple[object, bytes]] = {}


# ---------------------------------------------------------------- encode


def _packb(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def _ext(code: int, payload: bytes) -> bytes:
    return _packb(msgpack.ExtType(code, payload))


def _encode(value: object) -> bytes:
    kind = type(value)
    if value is None or kind is bool or kind is bytes:
        return _packb(value)
    if kind is str:
        try:
            return _packb(value)
        except UnicodeEncodeError as exc:  # lone surrogates
            raise CodecError(f"string is not encodable as UTF-8: {exc}") from exc
    if kind is int:
        assert isinstance(value, int)
        if _NATIVE_INT_MIN <= value <= _NATIVE_INT_MAX:
            return _packb(value)
        magnitude = abs(value)
        sign = b"\x01" if value < 0 else b"\x00"
        return _ext(EXT_BIGINT, sign + magnitude.to_bytes((magnitude.bit_length() + 7) // 8))
    if kind is tuple:
        assert isinstance(value, tuple)
        header = bytes(msgpack.Packer().pack_array_header(len(value)))
        return header + b"".join(_encode(item) for item in value)
    if kind is frozenset:
        assert isinstance(value, frozenset)
        return _ext(EXT_FROZENSET, b"".join(sorted(_encode(item) for item in value)))
    name = _NAMES.get(kind)
    if name is None:
        raise CodecError(f"cannot encode a value of type {kind.__module__}.{kind.__qualname__}")
    if isinstance(value, Enum):
        return _ext(EXT_ENUM, _packb(name) + _encode(value.value))
    cached = kind in _CACHED and _cache.get(id(value))
    if cached and cached[0] is value:
        return cached[1]
    info = _DATACLASSES[kind]
    parts = [info.prefix]
    for field_name, packed_name, check in zip(
        info.names, info.packed_names, info.checks, strict=True
    ):
        field_value = getattr(value, field_name)
        if not check(field_value):
            raise CodecError(f"{name}.{field_name} does not match its annotation")
        parts.append(packed_name)
        parts.append(_encode(field_value))
    encoded = _ext(EXT_DATACLASS, b"".join(parts))
    if kind in _CACHED:
        if len(_cache) >= _CACHE_SIZE:
            _cache.clear()
        _cache[id(value)] = (value, encoded)
    return encoded


def encode(value: object) -> bytes:
    """The canonical encoding of `value`; `CodecError` if it holds anything unsupported."""
    try:
        return _encode(value)
    except RecursionError as exc:
        raise CodecError("value nested too deeply") from exc


# ---------------------------------------------------------------- decode


def _unpacker(payload: bytes) -> Iterator[object]:
    unpacker = msgpack.Unpacker(
        None,
        raw=False,
        use_list=False,
        strict_map_key=True,
        ext_hook=_ext_hook,
        max_buffer_size=max(len(payload), 1),
    )
    unpacker.feed(payload)
    return iter(unpacker)


def _items(payload: bytes, count: int | None = None) -> tuple[object, ...]:
    items = tuple(_unpacker(payload))
    if count is not None and len(items) != count:
        raise CodecError(f"extension payload holds {len(items)} items, expected {count}")
    return items


def _registered(name: object) -> type:
    if type(name) is not str or name not in CODEC_TYPES:
        raise CodecError(f"unknown type name {name!r}")
    return CODEC_TYPES[name]


def _ext_hook(code: int, payload: bytes) -> object:
    if code == EXT_BIGINT:
        if len(payload) < 2 or payload[0] not in (0, 1):
            raise CodecError("malformed big int")
        magnitude = int.from_bytes(payload[1:])
        return -magnitude if payload[0] == 1 else magnitude
    if code == EXT_FROZENSET:
        items = _items(payload)
        result = frozenset(items)
        if len(result) != len(items):
            raise CodecError("frozenset with duplicate elements")
        return result
    if code == EXT_ENUM:
        name, raw_value = _items(payload, 2)
        cls = _registered(name)
        if not issubclass(cls, Enum):
            raise CodecError(f"{name} is not an enum")
        return cls(raw_value)
    if code == EXT_DATACLASS:
        name, fields = _items(payload, 2)
        cls = _registered(name)
        info = _DATACLASSES.get(cls)
        if info is None:
            raise CodecError(f"{name} is not a dataclass")
        if type(fields) is not dict or tuple(fields) != info.names:
            raise CodecError(f"fields of {name} do not match the class")
        for field_name, check in zip(info.names, info.checks, strict=True):
            if not check(fields[field_name]):
                raise CodecError(f"{name}.{field_name} does not match its annotation")
        return cls(**fields)
    raise CodecError(f"unknown extension type {code}")


def decode(data: bytes) -> object:
    """The value `data` canonically encodes; `CodecError` for anything else."""
    if type(data) is not bytes:
        raise CodecError(f"decode takes bytes, not {type(data).__name__}")
    try:
        value = msgpack.unpackb(
            data, raw=False, use_list=False, strict_map_key=True, ext_hook=_ext_hook
        )
    except CodecError:
        raise
    except (
        ValueError,  # msgpack format errors, bad UTF-8, InvalidValue, unknown enum values
        TypeError,  # a constructor given the wrong arguments, unhashable set elements
        LookupError,
        ArithmeticError,
        RecursionError,
        WeftProtocolError,
    ) as exc:
        raise CodecError(f"not a valid encoding: {type(exc).__name__}: {exc}") from exc
    try:
        canonical = _encode(value)
    except CodecError as exc:  # e.g. a msgpack map or float outside any dataclass
        raise CodecError(f"not a valid encoding: {exc}") from exc
    except RecursionError as exc:
        raise CodecError("value nested too deeply") from exc
    if canonical != data:
        raise CodecError("not the canonical encoding of its value")
    return value
