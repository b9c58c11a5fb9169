"""The wire codec: round trips, one encoding per message, strict and total decoding, framing."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable, Iterator
from typing import Any, get_args

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import wire
from protocols.errors import DecodeError, LocalProtocolError
from protocols.messages import (
    ChannelCountersign,
    ChannelProposal,
    ChannelReject,
    ChannelResume,
    ChannelSync,
    ChannelUpdate,
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
    SECP256K1_HALF_N,
    SECP256K1_N,
    UINT256_MAX,
    ZERO_ADDRESS,
    Address,
    Assets,
    ChannelState,
    Party,
    Signature,
    ThreadKey,
    ThreadState,
)
from protocols.wire import (
    HUB_MESSAGE_TYPES,
    MAX_DETAIL_BYTES,
    MAX_FRAME,
    MAX_MESSAGE_SIZE,
    MAX_MULTIADDR_BYTES,
    MAX_MULTIADDRS,
    MAX_PEER_ID_BYTES,
    MAX_SYNC_THREADS,
    MESSAGE_CODES,
    THREAD_MESSAGE_TYPES,
    UPDATE_CODES,
    WIRE_VERSION,
    FrameReader,
    decode,
    decode_hub,
    decode_thread,
    encode,
    frame,
)
from tests.protocols.strategies import (
    MESSAGE_STRATEGIES,
    UPDATE_STRATEGIES,
    addresses,
    assets,
    channel_states,
    channel_updates,
    messages,
    parties,
    reject_reasons,
    signatures,
    signed_thread_states,
    thread_keys,
    thread_states,
    uint256s,
)

FUZZ = settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

A = Address(b"\x11" * 20)
B = Address(b"\x22" * 20)
SIG = Signature((1).to_bytes(32, "big") + (2).to_bytes(32, "big") + b"\x1b")
MAX_SIG = Signature(
    (SECP256K1_N - 1).to_bytes(32, "big") + SECP256K1_HALF_N.to_bytes(32, "big") + b"\x1c"
)
STATE = ChannelState(
    user=A,
    recipient=B,
    balance_hub=Assets(10, 0),
    balance_user=Assets(5, 0),
    pending_deposit_hub=Assets(),
    pending_deposit_user=Assets(),
    pending_withdrawal_hub=Assets(),
    pending_withdrawal_user=Assets(),
    tx_count_global=7,
    tx_count_onchain=0,
    thread_root=b"\x00" * 32,
    thread_count=0,
    timeout=0,
)
THREAD = ThreadState(3, A, B, Assets(10, 0), Assets(), 0)
SIGNED_THREAD = SignedThreadState(THREAD, SIG, SIG)

DECODERS: dict[Callable[[bytes], Message], frozenset[type]] = {
    decode: frozenset(MESSAGE_CODES),
    decode_hub: HUB_MESSAGE_TYPES,
    decode_thread: THREAD_MESSAGE_TYPES,
}
DECODER_IDS = ["decode", "decode_hub", "decode_thread"]


def by_name(cls: type) -> str:
    return cls.__name__


def envelope(cls: type, body: object) -> bytes:
    """A message of type `cls` with an arbitrary body, packed canonically."""
    data: bytes = msgpack.packb([WIRE_VERSION, MESSAGE_CODES[cls], body])
    return data


def body_of(message: Message) -> list[Any]:
    """The decoded msgpack body of `message`'s encoding, to tamper with."""
    body: list[Any] = msgpack.unpackb(encode(message))[2]
    return body


def rejects(data: bytes, match: str | None = None) -> DecodeError:
    with pytest.raises(DecodeError, match=match) as info:
        decode(data)
    return info.value


# ---------------------------------------------------------------- tables


def test_type_codes_are_stable() -> None:
    assert {cls.__name__: code for cls, code in MESSAGE_CODES.items()} == {
        "ErrorNotice": 1,
        "ChannelProposal": 16,
        "ChannelCountersign": 17,
        "ChannelReject": 18,
        "ChannelResume": 19,
        "ChannelSync": 20,
        "ThreadOpenRequest": 21,
        "ThreadCloseRequest": 22,
        "CollateralRequest": 23,
        "CollateralNeeded": 24,
        "PeerLookup": 25,
        "PeerInfo": 26,
        "ThreadOpenRefused": 27,
        "ThreadOpenProposal": 32,
        "ThreadProposal": 33,
        "ThreadCountersign": 34,
        "ThreadReject": 35,
        "ThreadResume": 36,
        "ThreadCloseNotice": 37,
        "ThreadSync": 38,
    }
    assert {cls.__name__: code for cls, code in UPDATE_CODES.items()} == {
        "UpdatePayment": 1,
        "UpdatePending": 2,
        "UpdateConfirmPending": 3,
        "UpdateInvalidatePending": 4,
        "UpdateOpenThread": 5,
        "UpdateCloseThread": 6,
    }
    assert dict(wire.PARTY_CODES) == {Party.HUB: 0, Party.USER: 1}


def test_tables_cover_the_message_unions() -> None:
    assert set(MESSAGE_CODES) == set(get_args(Message))
    assert set(HUB_MESSAGE_TYPES) == set(get_args(HubMessage))
    assert set(THREAD_MESSAGE_TYPES) == set(get_args(ThreadMessage))
    assert set(UPDATE_CODES) == set(get_args(ChannelUpdate))
    assert set(MESSAGE_STRATEGIES) == set(MESSAGE_CODES)
    assert set(UPDATE_STRATEGIES) == set(UPDATE_CODES)
    for codes in (MESSAGE_CODES, UPDATE_CODES):
        assert len(set(codes.values())) == len(codes)
        assert all(0 <= code < 128 for code in codes.values())  # one-byte positive fixints


def test_field_tables_follow_declared_field_order() -> None:
    structs = [
        *wire._NESTED_STRUCTS,
        *wire._UPDATE_STRUCTS.values(),
        *wire._MESSAGE_STRUCTS.values(),
    ]
    assert {s.cls for s in structs} >= set(MESSAGE_CODES) | set(UPDATE_CODES)
    for struct in structs:
        assert [name for name, _ in struct.fields] == [
            f.name for f in dataclasses.fields(struct.cls)
        ], struct.cls.__name__


def test_every_valid_message_fits_a_frame() -> None:
    assert max(MAX_MESSAGE_SIZE.values()) <= MAX_FRAME


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("cls", list(MESSAGE_STRATEGIES), ids=by_name)
@given(data=st.data())
def test_every_message_round_trips(cls: type, data: st.DataObject) -> None:
    message = data.draw(MESSAGE_STRATEGIES[cls])
    encoded = encode(message)
    assert len(encoded) <= MAX_MESSAGE_SIZE[cls]
    assert decode(encoded) == message
    for decoder, allowed in DECODERS.items():
        if cls in allowed:
            assert decoder(encoded) == message
        else:
            with pytest.raises(DecodeError, match="is not a /weft/"):
                decoder(encoded)


@pytest.mark.parametrize("cls", list(UPDATE_STRATEGIES), ids=by_name)
@given(data=st.data())
def test_every_channel_update_round_trips(cls: type, data: st.DataObject) -> None:
    proposal = ChannelProposal(
        data.draw(UPDATE_STRATEGIES[cls]),
        data.draw(channel_states()),
        data.draw(uint256s()),
        data.draw(signatures()),
    )
    assert decode_hub(encode(proposal)) == proposal


NESTED_KINDS = [
    ("uint256", wire.UINT256_FIELD, uint256s()),
    ("address", wire.ADDRESS_FIELD, addresses()),
    ("signature", wire.SIGNATURE_FIELD, signatures()),
    ("assets", wire._ASSETS, assets()),
    ("party", wire._PARTY, parties()),
    ("reject_reason", wire._REJECT_REASON, reject_reasons()),
    ("channel_state", wire.CHANNEL_STATE_FIELD, channel_states()),
    ("thread_state", wire._THREAD_STATE, thread_states()),
    ("thread_key", wire._THREAD_KEY, thread_keys()),
    ("signed_thread_state", wire.SIGNED_THREAD_STATE_FIELD, signed_thread_states()),
    ("channel_update", wire._CHANNEL_UPDATE, channel_updates()),
]


@pytest.mark.parametrize(
    ("kind", "values"), [k[1:] for k in NESTED_KINDS], ids=[k[0] for k in NESTED_KINDS]
)
@given(data=st.data())
def test_nested_values_round_trip(kind: Any, values: Any, data: st.DataObject) -> None:
    value = data.draw(values)
    packed = msgpack.packb(kind.encode(value))
    assert len(packed) <= kind.max_size
    unpacked = msgpack.unpackb(packed, raw=False)
    assert kind.decode(unpacked) == value
    assert msgpack.packb(unpacked) == packed


@given(messages())
def test_encoding_is_deterministic(message: Message) -> None:
    assert encode(message) == encode(copy.deepcopy(message))


# Test vectors, also in SPEC.md ("Wire format").
VECTORS = [
    (ChannelResume(A, 5), "93011392c414" + "11" * 20 + "05"),
    (
        ChannelResume(A, 2**64),
        "93011392c414" + "11" * 20 + "c420" + "00" * 23 + "01" + "00" * 8,
    ),
    (ChannelResume(A, 2**64 - 1), "93011392c414" + "11" * 20 + "cf" + "ff" * 8),
    (ErrorNotice(RejectReason.POLICY, "busy"), "930101925aa4" + b"busy".hex()),
    (PeerLookup(B), "93011991c414" + "22" * 20),
    (
        ThreadResume(ThreadKey(A, B, 3), 0),
        "9301249293c414" + "11" * 20 + "c414" + "22" * 20 + "0300",
    ),
    (
        CollateralRequest(Assets(1, 2**255)),
        "930117919201c42080" + "00" * 31,
    ),
]


@pytest.mark.parametrize(("message", "hex_bytes"), VECTORS)
def test_vectors(message: Message, hex_bytes: str) -> None:
    assert encode(message).hex() == hex_bytes
    assert decode(bytes.fromhex(hex_bytes)) == message


def test_uint256_rule() -> None:
    assert wire.UINT256_FIELD.encode(0) == 0
    assert wire.UINT256_FIELD.encode(2**64 - 1) == 2**64 - 1
    assert wire.UINT256_FIELD.encode(2**64) == (2**64).to_bytes(32, "big")
    assert wire.UINT256_FIELD.encode(UINT256_MAX) == b"\xff" * 32
    assert wire.UINT256_FIELD.decode(b"\xff" * 32) == UINT256_MAX


# ---------------------------------------------------------------- maximal messages

BIG = UINT256_MAX
HALF = 2**255
BIG_ASSETS = Assets(BIG, BIG)
BIG_THREAD = ThreadState(BIG, A, B, Assets(HALF, HALF), Assets(HALF - 1, HALF - 1), BIG)
BIG_SIGNED_THREAD = SignedThreadState(BIG_THREAD, MAX_SIG, MAX_SIG)
BIG_STATE = ChannelState(
    A,
    B,
    BIG_ASSETS,
    BIG_ASSETS,
    BIG_ASSETS,
    BIG_ASSETS,
    BIG_ASSETS,
    BIG_ASSETS,
    BIG,
    BIG,
    b"\xff" * 32,
    BIG,
    BIG,
)
BIG_DETAIL = "é" * (MAX_DETAIL_BYTES // 2)
BIG_KEY = ThreadKey(A, B, BIG)
REASON = RejectReason.POLICY
BIG_UPDATES: list[ChannelUpdate] = [
    UpdatePayment(Party.USER, BIG_ASSETS, A),
    UpdatePending(BIG_ASSETS, BIG_ASSETS, BIG_ASSETS, BIG_ASSETS, A, BIG),
    UpdateConfirmPending(BIG),
    UpdateInvalidatePending(BIG),
    UpdateOpenThread(BIG_THREAD, MAX_SIG, MAX_SIG),
    UpdateCloseThread(BIG_THREAD, MAX_SIG, MAX_SIG),
]


def largest(cls: type) -> list[Message]:
    """Messages of type `cls` with every field at its longest; the first is the largest."""
    if cls is ChannelProposal:
        return sorted(
            (ChannelProposal(u, BIG_STATE, BIG, MAX_SIG) for u in BIG_UPDATES),
            key=lambda m: -len(encode(m)),
        )
    longest: dict[type, Message] = {
        ErrorNotice: ErrorNotice(REASON, BIG_DETAIL),
        ChannelCountersign: ChannelCountersign(A, BIG, MAX_SIG),
        ChannelReject: ChannelReject(A, BIG, REASON, BIG, BIG_DETAIL),
        ChannelResume: ChannelResume(A, BIG),
        ChannelSync: ChannelSync(
            BIG_STATE, MAX_SIG, MAX_SIG, (BIG_SIGNED_THREAD,) * MAX_SYNC_THREADS
        ),
        ThreadOpenRequest: ThreadOpenRequest(BIG_SIGNED_THREAD),
        ThreadCloseRequest: ThreadCloseRequest(BIG_SIGNED_THREAD),
        CollateralRequest: CollateralRequest(BIG_ASSETS),
        CollateralNeeded: CollateralNeeded(A, BIG_ASSETS),
        ThreadOpenRefused: ThreadOpenRefused(BIG_KEY, REASON, BIG_ASSETS, BIG_DETAIL),
        PeerLookup: PeerLookup(A),
        PeerInfo: PeerInfo(
            A,
            b"\x01" * MAX_PEER_ID_BYTES,
            ("/" * MAX_MULTIADDR_BYTES,) * MAX_MULTIADDRS,
        ),
        ThreadOpenProposal: ThreadOpenProposal(BIG_THREAD, MAX_SIG),
        ThreadProposal: ThreadProposal(BIG_THREAD, BIG, MAX_SIG),
        ThreadCountersign: ThreadCountersign(BIG_KEY, BIG, MAX_SIG),
        ThreadReject: ThreadReject(BIG_KEY, BIG, REASON, BIG, BIG_DETAIL),
        ThreadResume: ThreadResume(BIG_KEY, BIG),
        ThreadCloseNotice: ThreadCloseNotice(BIG_KEY, BIG),
        ThreadSync: ThreadSync(BIG_SIGNED_THREAD),
    }
    return [longest[cls]]


@pytest.mark.parametrize("cls", list(MESSAGE_CODES), ids=by_name)
def test_size_bound_is_exact(cls: type) -> None:
    """`MAX_MESSAGE_SIZE` is reached by the largest message, and every variant decodes."""
    candidates = largest(cls)
    assert len(encode(candidates[0])) == MAX_MESSAGE_SIZE[cls]
    for message in candidates:
        assert decode(encode(message)) == message


# ---------------------------------------------------------------- caps


def test_detail_cap() -> None:
    ok = ErrorNotice(REASON, "x" * MAX_DETAIL_BYTES)
    assert decode(encode(ok)) == ok
    big = ErrorNotice(REASON, BIG_DETAIL)
    assert decode(encode(big)) == big
    for text in ("x" * (MAX_DETAIL_BYTES + 1), "é" * (MAX_DETAIL_BYTES // 2 + 1)):
        with pytest.raises(LocalProtocolError, match=r"ErrorNotice\.detail"):
            encode(ErrorNotice(REASON, text))
        # ChannelReject, not ErrorNotice: its size bound leaves room for a longer detail.
        rejects(envelope(ChannelReject, [A.raw, 0, REASON.value, 0, text]), "exceeds")


def test_peer_info_caps() -> None:
    peer_id = b"\x01" * MAX_PEER_ID_BYTES
    addrs = ("a" * MAX_MULTIADDR_BYTES,) * MAX_MULTIADDRS
    ok = PeerInfo(A, peer_id, addrs)
    assert decode(encode(ok)) == ok
    too_long_id = PeerInfo(A, peer_id + b"\x01", addrs)
    too_many = PeerInfo(A, peer_id, (*addrs, "a"))
    too_long_addr = PeerInfo(A, peer_id, ("a" * (MAX_MULTIADDR_BYTES + 1),))
    for bad in (too_long_id, too_many, too_long_addr):
        with pytest.raises(LocalProtocolError, match=r"PeerInfo\."):
            encode(bad)
        rejects(envelope(PeerInfo, [A.raw, bad.peer_id, list(bad.multiaddrs)]), "PeerInfo")


def test_sync_thread_cap() -> None:
    ok = ChannelSync(STATE, SIG, SIG, (SIGNED_THREAD,) * MAX_SYNC_THREADS)
    assert decode(encode(ok)) == ok
    over = dataclasses.replace(ok, threads=(SIGNED_THREAD,) * (MAX_SYNC_THREADS + 1))
    with pytest.raises(LocalProtocolError, match=r"ChannelSync\.threads"):
        encode(over)
    body = body_of(ok)
    body[3].append(body[3][0])
    rejects(envelope(ChannelSync, body), "ChannelSync")


def test_decode_refuses_input_over_the_frame_cap_unparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    def unpack_called(*args: object, **kwargs: object) -> object:
        raise AssertionError("parsed input over the cap")

    monkeypatch.setattr(msgpack, "unpackb", unpack_called)
    header = bytes((0x93, WIRE_VERSION, MESSAGE_CODES[ChannelSync]))
    for decoder in DECODERS:
        with pytest.raises(DecodeError, match="exceeds MAX_FRAME"):
            decoder(header + b"\x00" * (MAX_FRAME + 1 - len(header)))
        # At the cap the frame check passes; no message is that long, so the type's bound
        # refuses it, still before parsing.
        with pytest.raises(DecodeError, match="longer than any valid"):
            decode(header + b"\x00" * (MAX_FRAME - len(header)))


def test_encode_refuses_a_result_over_the_frame_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    message = ChannelSync(STATE, SIG, SIG, (SIGNED_THREAD,) * 2)
    size = len(encode(message))
    monkeypatch.setattr(wire, "MAX_FRAME", size)
    assert len(encode(message)) == size
    monkeypatch.setattr(wire, "MAX_FRAME", size - 1)
    with pytest.raises(LocalProtocolError, match="exceeds MAX_FRAME"):
        encode(message)


# ---------------------------------------------------------------- strict decoding


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x93",
        b"\x93\x01",
        b"\x93\x01\x13",
        b"\xc0",
        b"\x92\x01\x13",
        b"\x94\x01\x13\x90\x00",
        b"\x80",
    ],
)
def test_truncated_or_malformed_envelopes(data: bytes) -> None:
    rejects(data)


@pytest.mark.parametrize("version", [0, 2, 127, 0xCC])
def test_unknown_version(version: int) -> None:
    data = bytearray(encode(ChannelResume(A, 1)))
    data[1] = version
    rejects(bytes(data), "unsupported wire version")


@pytest.mark.parametrize("code", [0, 2, 15, 28, 31, 39, 127, 0xCC, 0xFF])
def test_unknown_type_code(code: int) -> None:
    rejects(bytes((0x93, WIRE_VERSION, code)) + b"\x90", "unknown message type")


def test_each_protocol_decoder_refuses_the_other_protocol() -> None:
    hub_only = encode(ChannelResume(A, 1))
    thread_only = encode(ThreadResume(ThreadKey(A, B, 1), 1))
    shared = encode(ErrorNotice(REASON, ""))
    with pytest.raises(DecodeError, match=r"ThreadResume .* is not a /weft/hub/1 message"):
        decode_hub(thread_only)
    with pytest.raises(DecodeError, match=r"ChannelResume .* is not a /weft/thread/1 message"):
        decode_thread(hub_only)
    assert decode_hub(shared) == decode_thread(shared) == ErrorNotice(REASON, "")


ADDR_BIN = b"\xc4\x14" + A.raw


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"\x92" + ADDR_BIN + b"\xcc\x05", "non-canonical"),  # uint8 form of 5
        (b"\x92" + ADDR_BIN + b"\xd0\x05", "non-canonical"),  # int8 form of 5
        (b"\xdc\x00\x02" + ADDR_BIN + b"\x05", "non-canonical"),  # array16 of 2
        (b"\x92\xc5\x00\x14" + A.raw + b"\x05", "non-canonical"),  # bin16 address
        (b"\x92" + ADDR_BIN + b"\xc4\x20" + (5).to_bytes(32, "big"), "below 2\\*\\*64"),
        (b"\x92" + ADDR_BIN + b"\xc4\x20" + (2**64 - 1).to_bytes(32, "big"), "below 2\\*\\*64"),
        (b"\x92" + ADDR_BIN + b"\xc4\x21" + (2**64).to_bytes(33, "big"), "longer than any"),
        (b"\x92" + ADDR_BIN + b"\xc4\x1f" + (2**64).to_bytes(31, "big"), "uint256 expected"),
        (b"\x92" + ADDR_BIN + b"\xff", "negative"),
        (b"\x92" + ADDR_BIN + b"\xc3", "got bool"),
        (b"\x92" + ADDR_BIN + b"\xc2", "got bool"),
        (b"\x92" + ADDR_BIN + b"\xc0", "got nil"),
        (b"\x92" + ADDR_BIN + b"\xcb" + b"\x40\x14" + b"\x00" * 6, "got float"),
        (b"\x92" + ADDR_BIN + b"\x80", "got map"),
        (b"\x92" + ADDR_BIN + b"\xd4\x01\x00", "exceeds max_ext_len"),
        (b"\x92" + ADDR_BIN + b"\xc7\x00\x01", "got ext"),  # empty ext gets past msgpack
        (b"\x92" + ADDR_BIN + b"\xd6\xff" + b"\x00" * 4, "exceeds max_ext_len"),  # timestamp
        (b"\x92" + ADDR_BIN + b"\xa1\x35", "got str"),
        (b"\x92" + ADDR_BIN, "msgpack"),  # truncated
        (b"\x92" + ADDR_BIN + b"\x05\x05", "trailing bytes"),
        (b"\x91" + ADDR_BIN, "has 2 fields, got 1"),
        (b"\x93" + ADDR_BIN + b"\x05\x05", "has 2 fields, got 3"),
        (b"\x92\xc4\x13" + A.raw[:19] + b"\x05", "address"),
        (b"\x92\xa0\x05", "address"),
        (b"\x81\xa1a\x05", "map"),
        (b"\x92" + ADDR_BIN + b"\xc1", "malformed"),
    ],
)
def test_strict_channel_resume_bodies(body: bytes, why: str) -> None:
    rejects(bytes((0x93, WIRE_VERSION, MESSAGE_CODES[ChannelResume])) + body, why)


def test_deep_nesting_is_a_decode_error() -> None:
    header = bytes((0x93, WIRE_VERSION, MESSAGE_CODES[ChannelSync]))
    rejects(header + b"\x91" * 100_000 + b"\x00")


def test_invalid_utf8_is_a_decode_error() -> None:
    rejects(envelope(ErrorNotice, [1, ""])[:-1] + b"\xa2\xff\xfe")
    rejects(bytes((0x93, 1, 1, 0x92, 0x5A, 0xA3, 0xED, 0xA0, 0x80)))  # encoded surrogate


def test_str_must_be_canonical() -> None:
    canonical = encode(ErrorNotice(REASON, "busy"))
    assert canonical.endswith(b"\xa4busy")
    rejects(canonical[:-5] + b"\xd9\x04busy", "non-canonical")


def test_errors_name_the_field() -> None:
    proposal = ChannelProposal(UpdatePayment(Party.HUB, Assets(1, 0), ZERO_ADDRESS), STATE, 1, SIG)
    body = body_of(proposal)
    body[1][2][0] = True
    rejects(envelope(ChannelProposal, body), r"ChannelProposal\.state\.balance_hub\.eth: .*bool")
    body = body_of(proposal)
    body[0][2] = [1, 2, 3]
    rejects(envelope(ChannelProposal, body), r"ChannelProposal\.update\.UpdatePayment\.amount")
    sync = body_of(ChannelSync(STATE, SIG, SIG, (SIGNED_THREAD,) * 3))
    sync[3][2][0][1] = sync[3][2][0][2]
    rejects(envelope(ChannelSync, sync), r"ChannelSync\.threads\[2\]\.state: .*must differ")


def high_s(sig: Signature) -> bytes:
    return sig.raw[:32] + (SECP256K1_N - 2).to_bytes(32, "big") + sig.raw[64:]


@pytest.mark.parametrize(
    ("signature", "why"),
    [
        (SIG.raw[:64] + b"\x1d", "v must be 27 or 28"),
        (SIG.raw[:64] + b"\x00", "v must be 27 or 28"),
        (high_s(SIG), "low-s"),
        (b"\x00" * 32 + SIG.raw[32:], "r out of range"),
        (SECP256K1_N.to_bytes(32, "big") + SIG.raw[32:], "r out of range"),
        (SIG.raw[:32] + b"\x00" * 32 + b"\x1b", "s out of range"),
        (SIG.raw[:64], "65 bytes"),
    ],
)
def test_invalid_signatures_are_decode_errors(signature: bytes, why: str) -> None:
    body = body_of(ChannelCountersign(A, 1, SIG))
    body[2] = signature
    rejects(envelope(ChannelCountersign, body), f"ChannelCountersign.signature: .*{why}")


def test_invalid_value_types_are_decode_errors() -> None:
    body = body_of(ThreadProposal(THREAD, 1, SIG))
    body[0][2] = body[0][1]  # receiver = sender
    rejects(envelope(ThreadProposal, body), "sender and receiver must differ")
    body = body_of(ThreadProposal(THREAD, 1, SIG))
    body[0][3] = [b"\xff" * 32, 0]
    body[0][4] = [1, 0]  # total overflows uint256
    rejects(envelope(ThreadProposal, body), "ThreadProposal.state: invalid ThreadState")
    body = body_of(ThreadResume(ThreadKey(A, B, 1), 0))
    body[0][1] = body[0][0]
    rejects(envelope(ThreadResume, body), r"ThreadResume\.key: .*must differ")
    body = body_of(ChannelProposal(UpdateConfirmPending(1), STATE, 1, SIG))
    body[1][10] = b"\x00" * 31
    rejects(envelope(ChannelProposal, body), r"state\.thread_root")


@pytest.mark.parametrize(
    ("update", "why"),
    [
        ([], "non-empty array"),
        ([0, 1], "unknown ChannelUpdate code 0"),
        ([7, 1], "unknown ChannelUpdate code 7"),
        ([True, 1], "code \\(int\\) expected"),
        ([3], "UpdateConfirmPending has 1 fields, got 0"),
        ([3, 1, 2], "UpdateConfirmPending has 1 fields, got 2"),
        ([1, 2, [1, 0], ZERO_ADDRESS.raw], "unknown Party code 2"),
        ([1, -1, [1, 0], ZERO_ADDRESS.raw], "unknown Party code -1"),
        ([1, "hub", [1, 0], ZERO_ADDRESS.raw], "Party code \\(int\\) expected"),
    ],
)
def test_invalid_channel_updates(update: list[Any], why: str) -> None:
    body = body_of(ChannelProposal(UpdateConfirmPending(1), STATE, 1, SIG))
    body[0] = update
    rejects(envelope(ChannelProposal, body), why)


@pytest.mark.parametrize("code", [0, 6, 91, 255, -1])
def test_unknown_reject_reason(code: int) -> None:
    rejects(envelope(ErrorNotice, [code, ""]), "unknown RejectReason code")


# ---------------------------------------------------------------- encoding checks


@pytest.mark.parametrize(
    ("message", "where"),
    [
        (ChannelResume(A, -1), "ChannelResume.after: uint256 out of range"),
        (ChannelResume(A, UINT256_MAX + 1), "ChannelResume.after: uint256 out of range"),
        (ChannelResume(A, True), "ChannelResume.after: uint256 expected, got bool"),
        (ChannelResume(A, "1"), "ChannelResume.after: uint256 expected, got str"),  # type: ignore[arg-type]
        (ChannelResume(A.raw, 1), "ChannelResume.user: Address expected"),  # type: ignore[arg-type]
        (ErrorNotice(1, ""), "ErrorNotice.reason: RejectReason expected"),  # type: ignore[arg-type]
        (ErrorNotice(REASON, b""), "ErrorNotice.detail: str expected"),  # type: ignore[arg-type]
        (ErrorNotice(REASON, "\ud800"), "ErrorNotice.detail: str is not encodable"),
        (PeerInfo(A, bytearray(), ()), "PeerInfo.peer_id: bytes expected"),  # type: ignore[arg-type]
        (PeerInfo(A, b"", ["x"]), "PeerInfo.multiaddrs: tuple expected"),  # type: ignore[arg-type]
        (ChannelSync(STATE, SIG, SIG, (THREAD,)), "ChannelSync.threads: SignedThreadState"),  # type: ignore[arg-type]
        (ChannelProposal(Party.HUB, STATE, 1, SIG), "ChannelProposal.update: ChannelUpdate"),  # type: ignore[arg-type]
        (
            ChannelProposal(UpdatePayment(Party.HUB, (1, 0), A), STATE, 1, SIG),
            "UpdatePayment.amount",
        ),  # type: ignore[arg-type]
    ],
)
def test_encode_refuses_invalid_messages(message: Any, where: str) -> None:
    with pytest.raises(LocalProtocolError, match=where):
        encode(message)


@pytest.mark.parametrize("value", [STATE, THREAD, SIGNED_THREAD, A, b"", None, 1])
def test_encode_refuses_non_messages(value: Any) -> None:
    with pytest.raises(LocalProtocolError, match="not a wire message"):
        encode(value)


# ---------------------------------------------------------------- fuzzing

CODES = sorted(MESSAGE_CODES.values())


def check_total(decoder: Callable[[bytes], Message], data: bytes) -> None:
    """`data` decodes to an allowed message that encodes back to `data`, or is refused."""
    try:
        message = decoder(data)
    except DecodeError:
        return
    assert type(message) in DECODERS[decoder]
    assert encode(message) == data


def arbitrary_bytes() -> st.SearchStrategy[bytes]:
    return st.binary(max_size=400)


def bytes_after_a_valid_header() -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda code, body: bytes((0x93, WIRE_VERSION, code)) + body,
        st.sampled_from(CODES),
        st.binary(max_size=400),
    )


@st.composite
def mutated_encodings(draw: st.DrawFn) -> bytes:
    """A valid encoding with a few bytes flipped, set, inserted, deleted or cut off."""
    data = bytearray(encode(draw(messages())))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("flip", "set", "insert", "delete", "truncate", "append")))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[at:]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


INTERESTING_INTS = (
    *range(-1, 8),
    -32,
    -33,
    27,
    28,
    29,
    90,
    91,
    127,
    128,
    255,
    256,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
)
INTERESTING_BINS = (
    b"",
    bytes(20),
    bytes(32),
    b"\xff" * 32,
    (2**64 - 1).to_bytes(32, "big"),
    (2**64).to_bytes(32, "big"),
    bytes(65),
    SIG.raw,
    MAX_SIG.raw,
    high_s(SIG),
    SIG.raw[:64] + b"\x1d",
)
PLAUSIBLE_LEAVES = st.one_of(
    st.sampled_from(INTERESTING_INTS),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from(INTERESTING_BINS),
    st.binary(max_size=70),
    st.text(max_size=20),
)
ODD_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.just(b"")),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(min_size=1, max_size=4)),
    st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999)),
    st.dictionaries(st.text(max_size=3), st.integers(-5, 5), max_size=2),
)
MSGPACK_TREES = st.recursive(
    st.one_of(PLAUSIBLE_LEAVES, ODD_LEAVES),
    lambda children: st.lists(children, max_size=6),
    max_leaves=8,
)
"""Any msgpack value (odd kinds included: nil, bool, float, ext, map)."""


def list_paths(node: Any, prefix: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """Paths (index tuples) of every element of every list under `node`."""
    if type(node) is list:
        for i, child in enumerate(node):
            yield (*prefix, i)
            yield from list_paths(child, (*prefix, i))


def near_miss(draw: st.DrawFn, value: object) -> object:
    """A value of the same msgpack type as `value`, often just outside what is valid."""
    if type(value) is int:
        return draw(
            st.one_of(
                st.sampled_from(INTERESTING_INTS),
                st.sampled_from((value - 1, value + 1)).filter(lambda v: -(2**63) <= v < 2**64),
                st.integers(-(2**63), 2**64 - 1),
            )
        )
    if type(value) is bytes:
        n = len(value)
        return draw(
            st.one_of(
                st.binary(min_size=n, max_size=n),
                st.sampled_from(INTERESTING_BINS),
                st.binary(min_size=max(0, n - 1), max_size=n + 1),
            )
        )
    if type(value) is str:
        return draw(st.text(max_size=40))
    return draw(MSGPACK_TREES)


@st.composite
def message_trees(draw: st.DrawFn) -> list[Any]:
    """A valid message's msgpack tree with a few mutations at any depth: a leaf changed to a
    near miss, a subtree replaced, removed, inserted, duplicated or copied from a sibling, and
    sometimes the type code swapped."""
    tree: list[Any] = msgpack.unpackb(encode(draw(messages())))
    for _ in range(draw(st.integers(0, 3))):
        paths = list(list_paths(tree[2], (2,)))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = tree
        for i in path[:-1]:
            parent = parent[i]
        at = path[-1]
        op = draw(
            st.sampled_from(
                (
                    "near_miss",
                    "near_miss",
                    "near_miss",
                    "replace",
                    "delete",
                    "insert",
                    "duplicate",
                    "sibling",
                )
            )
        )
        if op == "near_miss":
            parent[at] = near_miss(draw, parent[at])
        elif op == "replace":
            parent[at] = draw(MSGPACK_TREES)
        elif op == "delete":
            del parent[at]
        elif op == "insert":
            parent.insert(at, draw(MSGPACK_TREES))
        elif op == "duplicate":
            parent.insert(at, copy.deepcopy(parent[at]))
        else:
            parent[at] = copy.deepcopy(parent[draw(st.integers(0, len(parent) - 1))])
    if draw(st.integers(0, 9)) == 0:
        tree[1] = draw(st.sampled_from(CODES))
    return tree


def mutated_trees() -> st.SearchStrategy[bytes]:
    """`message_trees`, packed canonically: they get past msgpack parsing and reach the
    codec's own checks at any depth."""
    return message_trees().map(msgpack.packb)


def _int_forms(v: int) -> list[bytes]:
    forms = []
    if 0 <= v < 128 or -32 <= v < 0:
        forms.append(v.to_bytes(1, "big", signed=v < 0))
    for tag, size in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
        if 0 <= v < 2 ** (8 * size):
            forms.append(bytes((tag,)) + v.to_bytes(size, "big"))
    for tag, size in ((0xD0, 1), (0xD1, 2), (0xD2, 4), (0xD3, 8)):
        if -(2 ** (8 * size - 1)) <= v < 2 ** (8 * size - 1):
            forms.append(bytes((tag,)) + v.to_bytes(size, "big", signed=True))
    return forms


def _length_forms(
    n: int, fix: int | None, fix_limit: int, tagged: tuple[tuple[int, int], ...]
) -> list[bytes]:
    forms = [bytes((fix | n,))] if fix is not None and n < fix_limit else []
    for tag, size in tagged:
        if n < 2 ** (8 * size):
            forms.append(bytes((tag,)) + n.to_bytes(size, "big"))
    return forms


def loose_pack(draw: st.DrawFn, obj: Any) -> bytes:
    """Pack `obj` as msgpack, choosing any valid width for each header (mostly the
    shortest, sometimes a longer one): every encoding msgpack allows for the same value."""
    if type(obj) is list:
        heads = _length_forms(len(obj), 0x90, 16, ((0xDC, 2), (0xDD, 4)))
        head = heads[0] if draw(st.integers(0, 5)) else draw(st.sampled_from(heads))
        return head + b"".join(loose_pack(draw, item) for item in obj)
    if type(obj) is int:
        forms = _int_forms(obj)
    elif type(obj) is bytes:
        heads = _length_forms(len(obj), None, 0, ((0xC4, 1), (0xC5, 2), (0xC6, 4)))
        forms = [head + obj for head in heads]
    elif type(obj) is str:
        raw = obj.encode()
        heads = _length_forms(len(raw), 0xA0, 32, ((0xD9, 1), (0xDA, 2), (0xDB, 4)))
        forms = [head + raw for head in heads]
    else:
        return bytes(msgpack.packb(obj))
    assert forms[0] == msgpack.packb(obj)
    return forms[0] if draw(st.integers(0, 5)) else draw(st.sampled_from(forms))


@st.composite
def loose_encodings(draw: st.DrawFn) -> bytes:
    """A (maybe mutated) message tree packed with arbitrary header widths."""
    return loose_pack(draw, draw(message_trees()))


def random_bodies() -> st.SearchStrategy[bytes]:
    """A correct envelope around any msgpack array."""
    return st.builds(
        lambda code, body: msgpack.packb([WIRE_VERSION, code, body]),
        st.sampled_from(CODES),
        st.lists(MSGPACK_TREES, max_size=14),
    )


FUZZ_INPUTS = {
    "arbitrary_bytes": st.one_of(arbitrary_bytes(), bytes_after_a_valid_header()),
    "mutated_encodings": st.one_of(
        mutated_encodings(), mutated_trees(), loose_encodings(), random_bodies()
    ),
}


@pytest.mark.parametrize("decoder", list(DECODERS), ids=DECODER_IDS)
@pytest.mark.parametrize("inputs", list(FUZZ_INPUTS.values()), ids=list(FUZZ_INPUTS))
@FUZZ
@given(data=st.data())
def test_decoding_is_total(
    decoder: Callable[[bytes], Message], inputs: st.SearchStrategy[bytes], data: st.DataObject
) -> None:
    check_total(decoder, data.draw(inputs))


# ---------------------------------------------------------------- framing


def test_frame_prefixes_the_length() -> None:
    assert frame(b"") == b"\x00\x00\x00\x00"
    assert frame(b"abc") == b"\x00\x00\x00\x03abc"


def test_frame_cap() -> None:
    payload = b"\x00" * MAX_FRAME
    framed = frame(payload)
    assert framed[:4] == MAX_FRAME.to_bytes(4, "big")
    assert FrameReader().feed(framed) == [payload]
    with pytest.raises(LocalProtocolError, match="exceeds MAX_FRAME"):
        frame(payload + b"\x00")


def test_frame_reader_refuses_an_oversized_length_before_its_payload() -> None:
    reader = FrameReader()
    assert reader.feed(frame(b"ok")) == [b"ok"]
    assert reader.feed((MAX_FRAME + 1).to_bytes(4, "big")[:2]) == []
    with pytest.raises(DecodeError, match="exceeds MAX_FRAME"):
        reader.feed((MAX_FRAME + 1).to_bytes(4, "big")[2:])
    with pytest.raises(DecodeError, match="already failed"):
        reader.feed(frame(b"later"))


def test_frame_reader_byte_by_byte() -> None:
    stream = frame(b"one") + frame(b"") + frame(b"three")
    reader = FrameReader()
    out: list[bytes] = []
    for i in range(len(stream)):
        out += reader.feed(stream[i : i + 1])
        if i == 5:
            assert out == [] and reader.buffered == 6
    assert out == [b"one", b"", b"three"]
    assert reader.buffered == 0


@given(
    payloads=st.lists(st.binary(max_size=300), max_size=10),
    cuts=st.lists(st.integers(0, 3000), max_size=12),
)
def test_frame_reader_split_and_coalesced(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(p) for p in payloads)
    bounds = [0, *sorted(c for c in cuts if c <= len(stream)), len(stream)]
    reader = FrameReader()
    out: list[bytes] = []
    for start, stop in itertools.pairwise(bounds):
        out += reader.feed(stream[start:stop])
    assert out == payloads
    assert reader.buffered == 0
    assert FrameReader().feed(stream) == payloads


@given(messages=st.lists(messages(), min_size=1, max_size=5), cut=st.integers(0, 10_000))
def test_framed_messages_survive_the_stream(messages: list[Message], cut: int) -> None:
    stream = b"".join(frame(encode(m)) for m in messages)
    cut = min(cut, len(stream))
    reader = FrameReader()
    payloads = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
    assert [decode(p) for p in payloads] == messages
