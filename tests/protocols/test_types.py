"""Value types validate themselves at construction and cannot be changed afterwards."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from eth_keys.datatypes import PrivateKey
from eth_utils.address import to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.eip712 import Domain
from protocols.errors import InvalidValue
from protocols.types import (
    NO_ASSETS,
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
    check_bytes,
    check_uint256,
)

# --- strategies (local: tests/protocols/strategies.py is written separately) ---

UINT256_EDGES = (0, 1, 2**255, UINT256_MAX - 1, UINT256_MAX)
uint256s = st.one_of(st.sampled_from(UINT256_EDGES), st.integers(0, UINT256_MAX))
addresses = st.binary(min_size=20, max_size=20).map(Address)
assets = st.builds(Assets, uint256s, uint256s)

A = Address(b"\xaa" * 20)
B = Address(b"\xbb" * 20)
NOT_UINT256: tuple[object, ...] = (-1, 2**256, True, False, 1.0, "1", None, b"\x01")


def channel_state(**changes: Any) -> ChannelState:
    fields: dict[str, Any] = {
        "user": A,
        "recipient": A,
        "balance_hub": Assets(10, 20),
        "balance_user": Assets(1, 2),
        "pending_deposit_hub": NO_ASSETS,
        "pending_deposit_user": NO_ASSETS,
        "pending_withdrawal_hub": NO_ASSETS,
        "pending_withdrawal_user": NO_ASSETS,
        "tx_count_global": 1,
        "tx_count_onchain": 0,
        "thread_root": b"\x00" * 32,
        "thread_count": 0,
        "timeout": 0,
    }
    fields.update(changes)
    return ChannelState(**fields)


def thread_state(**changes: Any) -> ThreadState:
    fields: dict[str, Any] = {
        "thread_id": 7,
        "sender": A,
        "receiver": B,
        "balance_sender": Assets(5, 6),
        "balance_receiver": NO_ASSETS,
        "tx_count": 0,
    }
    fields.update(changes)
    return ThreadState(**fields)


def signature_bytes(r: int = 1, s: int = 1, v: int = 27) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes((v,))


# --- checkers ---


@pytest.mark.parametrize("value", NOT_UINT256)
def test_check_uint256_rejects(value: object) -> None:
    with pytest.raises(InvalidValue):
        check_uint256(value, "x")


@pytest.mark.parametrize("value", [0, 1, UINT256_MAX])
def test_check_uint256_accepts(value: int) -> None:
    assert check_uint256(value, "x") == value


@pytest.mark.parametrize(
    "value", [bytearray(4), memoryview(bytes(4)), b"\x00" * 3, b"\x00" * 5, "abcd"]
)
def test_check_bytes_rejects(value: object) -> None:
    with pytest.raises(InvalidValue):
        check_bytes(value, 4, "x")


def test_invalid_value_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        check_uint256(-1, "x")


# --- Address ---


@pytest.mark.parametrize("raw", [b"", b"\x00" * 19, b"\x00" * 21, b"\x00" * 32])
def test_address_wrong_length(raw: bytes) -> None:
    with pytest.raises(InvalidValue, match="20 bytes"):
        Address(raw)


@pytest.mark.parametrize("raw", [bytearray(20), "00" * 20, None, 0])
def test_address_wrong_type(raw: object) -> None:
    with pytest.raises(InvalidValue):
        Address(raw)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(min_size=20, max_size=20))
def test_address_checksum_matches_eth_utils(raw: bytes) -> None:
    address = Address(raw)
    text = address.checksum()
    assert text == to_checksum_address(raw)
    assert str(address) == text
    assert text in repr(address)
    assert Address.from_hex(text) == address
    assert Address.from_hex(text.lower()) == address
    assert Address.from_hex("0x" + text[2:].upper()) == address


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0x",
        "00" * 20,  # no prefix
        "0x" + "00" * 19,  # too short
        "0x" + "00" * 21,  # too long
        "0x" + "0" * 41,  # odd length
        "0x" + "gg" * 20,  # not hex
        "0x" + " 0" * 20,  # whitespace
        " 0x" + "00" * 20,
        "0x" + "00" * 19 + "0\n",
        "0x" + "\u0660" * 40,  # Arabic-Indic digit zero
    ],
)
def test_address_from_hex_rejects(text: str) -> None:
    with pytest.raises(InvalidValue):
        Address.from_hex(text)


@pytest.mark.parametrize("value", [b"0x" + b"00" * 20, None, 0])
def test_address_from_hex_rejects_non_str(value: object) -> None:
    with pytest.raises(InvalidValue):
        Address.from_hex(value)  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None)
@given(secret=st.integers(1, SECP256K1_N - 1))
def test_address_from_public_key_matches_eth_keys(secret: int) -> None:
    private = PrivateKey(secret.to_bytes(32, "big"))
    expected = Address.from_hex(private.public_key.to_checksum_address())
    assert Address.from_public_key(private.public_key.to_bytes()) == expected
    assert Address.from_public_key(b"\x04" + private.public_key.to_bytes()) == expected


@pytest.mark.parametrize("public", [b"\x04" * 63, b"\x05" + b"\x00" * 64, b"\x00" * 33])
def test_address_from_public_key_rejects(public: bytes) -> None:
    with pytest.raises(InvalidValue):
        Address.from_public_key(public)


def test_address_order_and_hash() -> None:
    assert ZERO_ADDRESS < A < B
    assert len({A, Address(b"\xaa" * 20), B}) == 2


# --- Assets ---


@pytest.mark.parametrize("value", NOT_UINT256)
def test_assets_reject_non_uint256(value: object) -> None:
    with pytest.raises(InvalidValue):
        Assets(value, 0)  # type: ignore[arg-type]
    with pytest.raises(InvalidValue):
        Assets(0, value)  # type: ignore[arg-type]


def test_assets_edges() -> None:
    assert Assets(UINT256_MAX, UINT256_MAX).eth == UINT256_MAX
    assert Assets() == NO_ASSETS == Assets(0, 0)
    assert NO_ASSETS.is_zero()
    assert not Assets(0, 1).is_zero()
    assert not Assets(1, 0).is_zero()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (Assets(UINT256_MAX, 0), Assets(1, 0)),
        (Assets(0, UINT256_MAX), Assets(0, 1)),
        (Assets(UINT256_MAX, UINT256_MAX), Assets(UINT256_MAX, UINT256_MAX)),
    ],
)
def test_assets_add_overflow(a: Assets, b: Assets) -> None:
    with pytest.raises(InvalidValue):
        _ = a + b


@pytest.mark.parametrize(
    ("a", "b"),
    [(Assets(0, 0), Assets(1, 0)), (Assets(5, 5), Assets(0, 6)), (NO_ASSETS, Assets(0, 1))],
)
def test_assets_sub_underflow(a: Assets, b: Assets) -> None:
    with pytest.raises(InvalidValue):
        _ = a - b


@settings(max_examples=200, deadline=None)
@given(a=assets, b=assets)
def test_assets_arithmetic(a: Assets, b: Assets) -> None:
    fits = a.eth + b.eth <= UINT256_MAX and a.token + b.token <= UINT256_MAX
    if fits:
        total = a + b
        assert total == Assets(a.eth + b.eth, a.token + b.token)
        assert total - b == a
        assert total.covers(a)
        assert total.covers(b)
    else:
        with pytest.raises(InvalidValue):
            _ = a + b
    if a.covers(b):
        assert (a - b) + b == a
    else:
        with pytest.raises(InvalidValue):
            _ = a - b


@settings(max_examples=200, deadline=None)
@given(have=assets, needed=assets)
def test_assets_covers_and_shortfall(have: Assets, needed: Assets) -> None:
    missing = have.shortfall(needed)
    assert have.covers(needed) == missing.is_zero()
    assert have + missing == Assets(max(have.eth, needed.eth), max(have.token, needed.token))
    assert (have + missing).covers(needed)
    assert have.covers(have)
    assert have.covers(NO_ASSETS)
    assert have.shortfall(have) == NO_ASSETS


def test_assets_covers_is_per_component() -> None:
    assert not Assets(10, 0).covers(Assets(0, 1))
    assert not Assets(0, 10).covers(Assets(1, 0))
    assert Assets(10, 0).shortfall(Assets(3, 4)) == Assets(0, 4)


# --- Signature ---


def test_signature_accepts_bounds() -> None:
    Signature(signature_bytes(r=1, s=1, v=27))
    Signature(signature_bytes(r=SECP256K1_N - 1, s=SECP256K1_HALF_N, v=28))


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (signature_bytes()[:64], "65 bytes"),
        (signature_bytes() + b"\x00", "65 bytes"),
        (signature_bytes(v=0), "v must be"),
        (signature_bytes(v=1), "v must be"),
        (signature_bytes(v=29), "v must be"),
        (signature_bytes(r=0), "r out of range"),
        (signature_bytes(r=SECP256K1_N), "r out of range"),
        (signature_bytes(r=2**256 - 1), "r out of range"),
        (signature_bytes(s=0), "s out of range"),
        (signature_bytes(s=SECP256K1_HALF_N + 1), "low-s"),
        (signature_bytes(s=SECP256K1_N - 1), "low-s"),
    ],
)
def test_signature_rejects(raw: bytes, match: str) -> None:
    with pytest.raises(InvalidValue, match=match):
        Signature(raw)


@pytest.mark.parametrize("raw", [bytearray(signature_bytes()), signature_bytes().hex(), None])
def test_signature_wrong_type(raw: object) -> None:
    with pytest.raises(InvalidValue):
        Signature(raw)  # type: ignore[arg-type]


def test_signature_repr_is_short() -> None:
    assert len(repr(Signature(signature_bytes()))) < 30


# --- ChannelState ---


def test_channel_state_valid() -> None:
    state = channel_state()
    assert state.balance(Party.HUB) == Assets(10, 20)
    assert state.balance(Party.USER) == Assets(1, 2)
    assert Party.HUB.other is Party.USER and Party.USER.other is Party.HUB
    assert not state.has_pending()
    for name in (
        "pending_deposit_hub",
        "pending_deposit_user",
        "pending_withdrawal_hub",
        "pending_withdrawal_user",
    ):
        assert channel_state(**{name: Assets(0, 1)}).has_pending()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("user", A.raw),
        ("user", A.checksum()),
        ("recipient", None),
        ("balance_hub", (10, 20)),
        ("balance_user", 3),
        ("pending_deposit_hub", None),
        ("pending_deposit_user", ThreadKey(A, B, 1)),
        ("pending_withdrawal_hub", 0),
        ("pending_withdrawal_user", {"eth": 0, "token": 0}),
        ("thread_root", b"\x00" * 31),
        ("thread_root", b"\x00" * 33),
        ("thread_root", bytearray(32)),
        ("thread_root", "00" * 32),
    ]
    + [(name, value) for name in ("tx_count_global", "tx_count_onchain") for value in NOT_UINT256]
    + [(name, value) for name in ("thread_count", "timeout") for value in NOT_UINT256],
)
def test_channel_state_rejects(name: str, value: object) -> None:
    with pytest.raises(InvalidValue):
        channel_state(**{name: value})


# --- ThreadState ---


def test_thread_state_valid() -> None:
    state = thread_state(balance_receiver=Assets(1, 0))
    assert state.key == ThreadKey(A, B, 7)
    assert state.total() == Assets(6, 6)
    assert state.balance_of(A) == Assets(5, 6)
    assert state.balance_of(B) == Assets(1, 0)
    with pytest.raises(InvalidValue):
        state.balance_of(ZERO_ADDRESS)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"receiver": A}, "must differ"),
        ({"sender": A.raw}, "Address"),
        ({"receiver": str(B)}, "Address"),
        ({"balance_sender": (5, 6)}, "Assets"),
        ({"balance_receiver": None}, "Assets"),
        ({"balance_sender": Assets(UINT256_MAX, 0), "balance_receiver": Assets(1, 0)}, "range"),
        ({"balance_sender": Assets(0, 1), "balance_receiver": Assets(0, UINT256_MAX)}, "range"),
    ]
    + [({"thread_id": value}, "thread_id") for value in NOT_UINT256]
    + [({"tx_count": value}, "tx_count") for value in NOT_UINT256],
)
def test_thread_state_rejects(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidValue, match=match):
        thread_state(**changes)


def test_thread_state_total_at_the_edge() -> None:
    state = thread_state(
        balance_sender=Assets(UINT256_MAX, 0), balance_receiver=Assets(0, UINT256_MAX)
    )
    assert state.total() == Assets(UINT256_MAX, UINT256_MAX)


def test_thread_key_order() -> None:
    assert ThreadKey(A, B, 1) < ThreadKey(A, B, 2) < ThreadKey(B, A, 0)


# --- frozen ---

FROZEN_VALUES: list[tuple[object, str]] = [
    (A, "raw"),
    (Assets(1, 2), "eth"),
    (Signature(signature_bytes()), "raw"),
    (channel_state(), "balance_hub"),
    (thread_state(), "tx_count"),
    (ThreadKey(A, B, 1), "thread_id"),
    (Domain(1, A), "chain_id"),
]


@pytest.mark.parametrize(("value", "field"), FROZEN_VALUES)
def test_values_are_frozen(value: object, field: str) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, field, getattr(value, field))
    with pytest.raises((AttributeError, TypeError)):
        value.extra = 1  # type: ignore[attr-defined]


def test_replace_revalidates() -> None:
    with pytest.raises(InvalidValue):
        dataclasses.replace(thread_state(), receiver=A)
    with pytest.raises(InvalidValue):
        dataclasses.replace(Assets(1, 1), eth=-1)
    assert dataclasses.replace(Domain(1, A), chain_id=2).separator != Domain(1, A).separator


def test_values_are_hashable_and_compare_by_value() -> None:
    assert hash(thread_state()) == hash(thread_state())
    assert channel_state() == channel_state()
    assert channel_state() != channel_state(timeout=1)
    assert Domain(1, A) == Domain(1, A)
    assert Domain(1, A) != Domain(2, A)


def test_address_from_hex_checks_mixed_case_checksum() -> None:
    raw = bytes(range(1, 21))
    good = to_checksum_address(raw)
    assert Address.from_hex(good).raw == raw
    assert Address.from_hex(good.lower()).raw == raw
    assert Address.from_hex("0x" + good[2:].upper()).raw == raw
    with pytest.raises(InvalidValue, match="checksum"):
        Address.from_hex("0x" + "aB" * 20)  # mixed case, wrong checksum


def test_assets_arithmetic_with_other_types_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        _ = Assets(1, 1) + 1  # type: ignore[operator]


def test_signer_and_recover_check_digest_length() -> None:
    from protocols.signing import Signer, recover_digest

    signer = Signer(b"\x01" * 32)
    signature = signer.sign_digest(b"\x02" * 32)
    for digest in (b"\x02" * 31, b"\x02" * 33):
        with pytest.raises(InvalidValue, match="digest"):
            signer.sign_digest(digest)
        with pytest.raises(InvalidValue, match="digest"):
            recover_digest(digest, signature)


def test_domain_rejects_wrong_types() -> None:
    with pytest.raises(InvalidValue):
        Domain(1, b"\x00" * 20)  # type: ignore[arg-type]
    with pytest.raises(InvalidValue):
        Domain(1, Address(b"\x00" * 20), name=1)  # type: ignore[arg-type]


def test_thread_key_validates() -> None:
    with pytest.raises(InvalidValue, match="differ"):
        ThreadKey(A, A, 1)
    with pytest.raises(InvalidValue, match="uint256"):
        ThreadKey(A, B, -1)
    with pytest.raises(InvalidValue, match="Address"):
        ThreadKey(A.raw, B, 1)  # type: ignore[arg-type]
