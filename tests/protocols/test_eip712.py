"""Our EIP-712 hashing and coincurve signing are byte-identical to eth_account's.

eth_account is the reference: it is given the type strings of `protocols.eip712`, parsed
into its `types` dict, and the states as plain field values named as in those strings.
"""

from __future__ import annotations

from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.eip712 import (
    CHANNEL_STATE_TYPE,
    DOMAIN_TYPE,
    THREAD_STATE_TYPE,
    Domain,
    channel_state_digest,
    thread_state_digest,
)
from protocols.errors import InvalidSignature, InvalidValue
from protocols.signing import (
    Signer,
    is_signed_by,
    recover_channel_state,
    recover_digest,
    recover_thread_state,
)
from protocols.types import (
    SECP256K1_HALF_N,
    SECP256K1_N,
    UINT256_MAX,
    Address,
    Assets,
    ChannelState,
    Signature,
    ThreadState,
)

EXAMPLES = settings(max_examples=200, deadline=None)
SECP256K1_P = 2**256 - 2**32 - 977

# --- strategies (local: tests/protocols/strategies.py is written separately) ---

UINT256_EDGES = (
    0,
    1,
    2,
    2**64 - 1,
    2**64,
    2**128,
    2**255 - 1,
    2**255,
    UINT256_MAX - 1,
    UINT256_MAX,
)
uint256s = st.one_of(st.sampled_from(UINT256_EDGES), st.integers(0, UINT256_MAX))
addresses = st.one_of(
    st.sampled_from((Address(b"\x00" * 20), Address(b"\xff" * 20))),
    st.binary(min_size=20, max_size=20).map(Address),
)
assets = st.builds(Assets, uint256s, uint256s)
private_keys = st.one_of(
    st.sampled_from((1, 2, SECP256K1_N - 1)), st.integers(1, SECP256K1_N - 1)
).map(lambda k: k.to_bytes(32, "big"))
chain_ids = st.one_of(st.sampled_from((0, 1, 5, 1337, 31337, 11155111, UINT256_MAX)), uint256s)
domains = st.builds(Domain, chain_ids, addresses)
roots = st.one_of(st.just(b"\x00" * 32), st.just(b"\xff" * 32), st.binary(min_size=32, max_size=32))

channel_states = st.builds(
    ChannelState,
    user=addresses,
    recipient=addresses,
    balance_hub=assets,
    balance_user=assets,
    pending_deposit_hub=assets,
    pending_deposit_user=assets,
    pending_withdrawal_hub=assets,
    pending_withdrawal_user=assets,
    tx_count_global=uint256s,
    tx_count_onchain=uint256s,
    thread_root=roots,
    thread_count=uint256s,
    timeout=uint256s,
)


def _split(total: int) -> st.SearchStrategy[tuple[int, int]]:
    """Two amounts whose sum is at most `total`, edges included."""
    return st.one_of(st.sampled_from((0, total)), st.integers(0, total)).flatmap(
        lambda a: st.tuples(
            st.just(a), st.one_of(st.sampled_from((0, total - a)), st.integers(0, total - a))
        )
    )


@st.composite
def thread_states(draw: st.DrawFn) -> ThreadState:
    sender = draw(addresses)
    receiver = draw(addresses.filter(lambda a: a != sender))
    eth_sender, eth_receiver = draw(_split(draw(uint256s)))
    token_sender, token_receiver = draw(_split(draw(uint256s)))
    return ThreadState(
        thread_id=draw(uint256s),
        sender=sender,
        receiver=receiver,
        balance_sender=Assets(eth_sender, token_sender),
        balance_receiver=Assets(eth_receiver, token_receiver),
        tx_count=draw(uint256s),
    )


# --- eth_account's view of the same data ---


def _eip712_type(type_string: str) -> tuple[str, list[dict[str, str]]]:
    """'Name(t1 a,t2 b)' -> ('Name', [{'name': 'a', 'type': 't1'}, ...])."""
    name, _, rest = type_string.partition("(")
    assert rest.endswith(")"), type_string
    fields = []
    for member in rest[:-1].split(","):
        field_type, field_name = member.split(" ")
        fields.append({"name": field_name, "type": field_type})
    return name, fields


def _domain_message(domain: Domain) -> dict[str, Any]:
    return {
        "name": domain.name,
        "version": domain.version,
        "chainId": domain.chain_id,
        "verifyingContract": domain.verifying_contract.checksum(),
    }


def _channel_values(state: ChannelState) -> dict[str, Any]:
    return {
        "user": state.user.checksum(),
        "recipient": state.recipient.checksum(),
        "balanceEthHub": state.balance_hub.eth,
        "balanceEthUser": state.balance_user.eth,
        "balanceTokenHub": state.balance_hub.token,
        "balanceTokenUser": state.balance_user.token,
        "pendingDepositEthHub": state.pending_deposit_hub.eth,
        "pendingDepositEthUser": state.pending_deposit_user.eth,
        "pendingDepositTokenHub": state.pending_deposit_hub.token,
        "pendingDepositTokenUser": state.pending_deposit_user.token,
        "pendingWithdrawalEthHub": state.pending_withdrawal_hub.eth,
        "pendingWithdrawalEthUser": state.pending_withdrawal_user.eth,
        "pendingWithdrawalTokenHub": state.pending_withdrawal_hub.token,
        "pendingWithdrawalTokenUser": state.pending_withdrawal_user.token,
        "txCountGlobal": state.tx_count_global,
        "txCountOnchain": state.tx_count_onchain,
        "threadRoot": state.thread_root,
        "threadCount": state.thread_count,
        "timeout": state.timeout,
    }


def _thread_values(state: ThreadState) -> dict[str, Any]:
    return {
        "threadId": state.thread_id,
        "sender": state.sender.checksum(),
        "receiver": state.receiver.checksum(),
        "balanceEthSender": state.balance_sender.eth,
        "balanceEthReceiver": state.balance_receiver.eth,
        "balanceTokenSender": state.balance_sender.token,
        "balanceTokenReceiver": state.balance_receiver.token,
        "txCount": state.tx_count,
    }


def _full_message(domain: Domain, type_string: str, values: dict[str, Any]) -> dict[str, Any]:
    domain_name, domain_fields = _eip712_type(DOMAIN_TYPE)
    primary, fields = _eip712_type(type_string)
    assert domain_name == "EIP712Domain"
    # Every field of the type string has a value and no value is left over.
    assert sorted(f["name"] for f in fields) == sorted(values)
    return {
        "types": {"EIP712Domain": domain_fields, primary: fields},
        "primaryType": primary,
        "domain": _domain_message(domain),
        "message": values,
    }


def channel_message(domain: Domain, state: ChannelState) -> dict[str, Any]:
    return _full_message(domain, CHANNEL_STATE_TYPE, _channel_values(state))


def thread_message(domain: Domain, state: ThreadState) -> dict[str, Any]:
    return _full_message(domain, THREAD_STATE_TYPE, _thread_values(state))


def reference_digest(message: dict[str, Any]) -> bytes:
    return bytes(_hash_eip191_message(encode_typed_data(full_message=message)))


def reference_recover(message: dict[str, Any], signature: bytes) -> Address:
    text = Account.recover_message(encode_typed_data(full_message=message), signature=signature)
    return Address.from_hex(text)


def test_type_strings_parse() -> None:
    assert _eip712_type(DOMAIN_TYPE)[0] == "EIP712Domain"
    assert [f["name"] for f in _eip712_type(THREAD_STATE_TYPE)[1]] == list(
        _thread_values(
            ThreadState(0, Address(b"\x01" * 20), Address(b"\x02" * 20), Assets(), Assets(), 0)
        )
    )


# --- equivalence on random data ---


@EXAMPLES
@given(key=private_keys, domain=domains, state=channel_states)
def test_channel_state_matches_eth_account(key: bytes, domain: Domain, state: ChannelState) -> None:
    message = channel_message(domain, state)
    signer = Signer(key)
    reference = Account.sign_typed_data(key, full_message=message)

    digest = channel_state_digest(domain, state)
    assert digest == bytes(reference.message_hash) == reference_digest(message)

    signature = signer.sign_channel_state(domain, state)
    assert signature.raw == bytes(reference.signature)

    assert signer.address == Address.from_hex(Account.from_key(key).address)
    assert recover_channel_state(domain, state, signature) == signer.address
    assert reference_recover(message, signature.raw) == signer.address


@EXAMPLES
@given(key=private_keys, domain=domains, state=thread_states())
def test_thread_state_matches_eth_account(key: bytes, domain: Domain, state: ThreadState) -> None:
    message = thread_message(domain, state)
    signer = Signer(key)
    reference = Account.sign_typed_data(key, full_message=message)

    digest = thread_state_digest(domain, state)
    assert digest == bytes(reference.message_hash) == reference_digest(message)

    signature = signer.sign_thread_state(domain, state)
    assert signature.raw == bytes(reference.signature)

    assert signer.address == Address.from_hex(Account.from_key(key).address)
    assert recover_thread_state(domain, state, signature) == signer.address
    assert reference_recover(message, signature.raw) == signer.address


# --- the domain binds chain and contract ---


@EXAMPLES
@given(
    key=private_keys,
    domain=domains,
    other_chain=chain_ids,
    other_contract=addresses,
    state=thread_states(),
)
def test_wrong_domain_recovers_another_address(
    key: bytes, domain: Domain, other_chain: int, other_contract: Address, state: ThreadState
) -> None:
    signer = Signer(key)
    signature = signer.sign_thread_state(domain, state)
    others = []
    if other_chain != domain.chain_id:
        others.append(Domain(other_chain, domain.verifying_contract))
    if other_contract != domain.verifying_contract:
        others.append(Domain(domain.chain_id, other_contract))
    for other in others:
        assert other.separator != domain.separator
        assert recover_thread_state(other, state, signature) != signer.address
        assert not is_signed_by(thread_state_digest(other, state), signature, signer.address)


@settings(max_examples=50, deadline=None)
@given(key=private_keys, domain=domains, channel=channel_states, thread=thread_states())
def test_signature_is_bound_to_its_type(
    key: bytes, domain: Domain, channel: ChannelState, thread: ThreadState
) -> None:
    """Different type hashes: a channel signature says nothing about a thread state."""
    signer = Signer(key)
    assert (
        recover_thread_state(domain, thread, signer.sign_channel_state(domain, channel))
        != signer.address
    )
    assert (
        recover_channel_state(domain, channel, signer.sign_thread_state(domain, thread))
        != signer.address
    )


# --- signature format ---


def _real_signature(key: bytes = b"\x07" * 32) -> tuple[Signer, bytes, Signature]:
    signer = Signer(key)
    digest = bytes(range(32))
    return signer, digest, signer.sign_digest(digest)


@settings(max_examples=50, deadline=None)
@given(key=private_keys, digest=st.binary(min_size=32, max_size=32))
def test_high_s_twin_is_rejected(key: bytes, digest: bytes) -> None:
    """(r, n - s, 55 - v) is also a valid ECDSA signature by the same key: EIP-2 forbids it."""
    signer = Signer(key)
    signature = signer.sign_digest(digest)
    s = int.from_bytes(signature.raw[32:64], "big")
    assert 0 < s <= SECP256K1_HALF_N
    twin = (
        signature.raw[:32]
        + (SECP256K1_N - s).to_bytes(32, "big")
        + bytes((55 - signature.raw[64],))
    )
    with pytest.raises(InvalidValue, match="low-s"):
        Signature(twin)
    # eth_account accepts the twin, which is why `Signature` must not.
    assert Address.from_hex(Account._recover_hash(digest, signature=twin)) == signer.address


@pytest.mark.parametrize("v", [v for v in range(256) if v not in (27, 28)])
def test_v_outside_27_28_is_rejected(v: int) -> None:
    _, _, signature = _real_signature()
    with pytest.raises(InvalidValue, match="v must be 27 or 28"):
        Signature(signature.raw[:64] + bytes((v,)))


def test_flipped_v_recovers_another_address() -> None:
    signer, digest, signature = _real_signature()
    flipped = Signature(signature.raw[:64] + bytes((55 - signature.raw[64],)))
    # Both points with x == r exist, so the flipped signature recovers, to another key.
    assert recover_digest(digest, flipped) != signer.address


@EXAMPLES
@given(
    key=private_keys,
    digest=st.binary(min_size=32, max_size=32),
    r=st.one_of(st.sampled_from((1, SECP256K1_N - 1)), st.integers(1, SECP256K1_N - 1)),
    s=st.one_of(st.sampled_from((1, SECP256K1_HALF_N)), st.integers(1, SECP256K1_HALF_N)),
    v=st.sampled_from((27, 28)),
)
def test_garbage_signature_never_recovers_the_signer(
    key: bytes, digest: bytes, r: int, s: int, v: int
) -> None:
    signer = Signer(key)
    garbage = Signature(r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes((v,)))
    try:
        recovered = recover_digest(digest, garbage)
    except InvalidSignature:
        assert not is_signed_by(digest, garbage, signer.address)
        return
    assert recovered != signer.address
    assert not is_signed_by(digest, garbage, signer.address)


def _first_r_off_curve() -> int:
    """The smallest r for which no curve point has x == r (r^3 + 7 is not a square mod p)."""
    r = 1
    while pow((r**3 + 7) % SECP256K1_P, (SECP256K1_P - 1) // 2, SECP256K1_P) != SECP256K1_P - 1:
        r += 1
    return r


def test_unrecoverable_signature_raises_invalid_signature() -> None:
    r = _first_r_off_curve()
    signature = Signature(r.to_bytes(32, "big") + (1).to_bytes(32, "big") + b"\x1b")
    with pytest.raises(InvalidSignature):
        recover_digest(b"\x00" * 32, signature)
    assert not is_signed_by(b"\x00" * 32, signature, Signer(b"\x01" * 32).address)


def test_signer_rejects_bad_private_keys() -> None:
    for bad in (b"\x00" * 32, SECP256K1_N.to_bytes(32, "big"), b"\xff" * 32):
        with pytest.raises(InvalidValue):
            Signer(bad)
    for wrong_length in (b"\x01" * 31, b"\x01" * 33):
        with pytest.raises(InvalidValue):
            Signer(wrong_length)
