"""The thread root: a sorted-pair merkle tree over initial thread states (SPEC "Thread root")."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import InvalidValue
from protocols.keccak import keccak
from protocols.thread_root import (
    EMPTY_THREAD_ROOT,
    thread_leaf,
    thread_proof,
    thread_root,
    verify_thread_proof,
)
from protocols.types import UINT256_MAX, Address, Assets, ThreadState

# --- strategies (local: tests/protocols/strategies.py is written separately) ---

uint256s = st.one_of(st.sampled_from((0, 1, UINT256_MAX)), st.integers(0, UINT256_MAX))
amounts = st.one_of(st.sampled_from((0, 1, 2**128)), st.integers(0, 2**128))
addresses = st.binary(min_size=20, max_size=20).map(Address)


@st.composite
def thread_states(draw: st.DrawFn) -> ThreadState:
    sender = draw(addresses)
    receiver = draw(addresses.filter(lambda a: a != sender))
    return ThreadState(
        thread_id=draw(uint256s),
        sender=sender,
        receiver=receiver,
        balance_sender=Assets(draw(amounts), draw(amounts)),
        balance_receiver=Assets(draw(amounts), draw(amounts)),
        tx_count=0,
    )


thread_sets = st.lists(thread_states(), max_size=40, unique=True)
nonempty_thread_sets = st.lists(thread_states(), min_size=1, max_size=40, unique=True)

A = Address(b"\x11" * 20)
B = Address(b"\x22" * 20)
C = Address(b"\x33" * 20)


def initial(thread_id: int, sender: Address = A, receiver: Address = B) -> ThreadState:
    return ThreadState(thread_id, sender, receiver, Assets(10, 0), Assets(0, 0), 0)


def flip_bit(value: bytes, bit: int) -> bytes:
    index, shift = divmod(bit, 8)
    return value[:index] + bytes((value[index] ^ (1 << shift),)) + value[index + 1 :]


# --- properties ---


@settings(max_examples=100, deadline=None)
@given(states=thread_sets)
def test_every_member_proof_verifies(states: list[ThreadState]) -> None:
    root = thread_root(states)
    assert len(root) == 32
    depth = math.ceil(math.log2(len(states))) if states else 0
    for state in states:
        proof = thread_proof(states, state)
        assert len(proof) <= depth
        assert all(len(sibling) == 32 for sibling in proof)
        assert verify_thread_proof(root, state, proof)


@settings(max_examples=100, deadline=None)
@given(states=nonempty_thread_sets, outsider=thread_states(), data=st.data())
def test_non_member_does_not_verify(
    states: list[ThreadState], outsider: ThreadState, data: st.DataObject
) -> None:
    if outsider in states:
        states = [s for s in states if s != outsider]
    root = thread_root(states)
    with pytest.raises(InvalidValue, match="not in the thread set"):
        thread_proof(states, outsider)
    member = data.draw(st.sampled_from(states)) if states else None
    proof = thread_proof(states, member) if member is not None else ()
    assert not verify_thread_proof(root, outsider, proof)


@settings(max_examples=100, deadline=None)
@given(states=nonempty_thread_sets, data=st.data())
def test_member_with_changed_field_does_not_verify(
    states: list[ThreadState], data: st.DataObject
) -> None:
    """A later state of the thread (or any other change) is not the committed initial state."""
    member = data.draw(st.sampled_from(states))
    proof = thread_proof(states, member)
    root = thread_root(states)
    changed = dataclasses.replace(member, tx_count=member.tx_count + 1)
    assert not verify_thread_proof(root, changed, proof)
    changed = dataclasses.replace(member, thread_id=(member.thread_id + 1) % 2**256)
    assert not verify_thread_proof(root, changed, proof)


@settings(max_examples=60, deadline=None)
@given(states=st.lists(thread_states(), min_size=2, max_size=40, unique=True), data=st.data())
def test_tampered_proof_does_not_verify(states: list[ThreadState], data: st.DataObject) -> None:
    member = data.draw(st.sampled_from(states))
    proof = thread_proof(states, member)
    root = thread_root(states)
    assert proof  # two or more leaves: every member has a sibling somewhere
    for position in range(len(proof)):
        bit = data.draw(st.integers(0, 255))
        tampered = list(proof)
        tampered[position] = flip_bit(proof[position], bit)
        assert not verify_thread_proof(root, member, tampered)
    assert not verify_thread_proof(root, member, proof[:-1])
    assert not verify_thread_proof(root, member, (*proof, proof[-1]))
    assert not verify_thread_proof(flip_bit(root, data.draw(st.integers(0, 255))), member, proof)


@settings(max_examples=100, deadline=None)
@given(states=thread_sets, data=st.data())
def test_root_independent_of_order(states: list[ThreadState], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(states))
    assert thread_root(shuffled) == thread_root(states)
    assert thread_root(iter(shuffled)) == thread_root(tuple(states))
    if states:
        member = data.draw(st.sampled_from(states))
        assert thread_proof(shuffled, member) == thread_proof(states, member)


@settings(max_examples=50, deadline=None)
@given(states=nonempty_thread_sets, data=st.data())
def test_adding_a_thread_changes_the_root(states: list[ThreadState], data: st.DataObject) -> None:
    removed = data.draw(st.sampled_from(states))
    rest = [s for s in states if s != removed]
    assert thread_root(rest) != thread_root(states)


@settings(max_examples=50, deadline=None)
@given(states=nonempty_thread_sets, data=st.data())
def test_duplicate_is_rejected(states: list[ThreadState], data: st.DataObject) -> None:
    duplicate = data.draw(st.sampled_from(states))
    with_duplicate = [*states, duplicate]
    with pytest.raises(InvalidValue, match="twice"):
        thread_root(with_duplicate)
    with pytest.raises(InvalidValue, match="twice"):
        thread_proof(with_duplicate, duplicate)


# --- edge cases ---


def test_empty_set() -> None:
    assert thread_root([]) == EMPTY_THREAD_ROOT == b"\x00" * 32
    with pytest.raises(InvalidValue):
        thread_proof([], initial(1))
    assert not verify_thread_proof(EMPTY_THREAD_ROOT, initial(1), ())


def test_single_thread_root_is_its_leaf() -> None:
    state = initial(1)
    assert thread_root([state]) == thread_leaf(state)
    assert thread_proof([state], state) == ()
    assert verify_thread_proof(thread_leaf(state), state, ())
    assert not verify_thread_proof(thread_leaf(state), initial(2), ())


@pytest.mark.parametrize("size", range(41))
def test_every_size_up_to_40(size: int) -> None:
    states = [initial(i, A if i % 2 else B, C) for i in range(size)]
    root = thread_root(states)
    assert (root == EMPTY_THREAD_ROOT) == (size == 0)
    for state in states:
        assert verify_thread_proof(root, state, thread_proof(states, state))
    assert not verify_thread_proof(root, initial(size), ())


def test_power_of_two_sets_have_full_depth_proofs() -> None:
    for depth in range(6):
        states = [initial(i) for i in range(2**depth)]
        root = thread_root(states)
        for state in states:
            proof = thread_proof(states, state)
            assert len(proof) == depth
            assert verify_thread_proof(root, state, proof)


def test_leaf_is_not_an_inner_node() -> None:
    """Domain separation: the root of two leaves is not the leaf of anything."""
    one, two = initial(1), initial(2)
    low, high = sorted((thread_leaf(one), thread_leaf(two)))
    assert thread_root([one, two]) == keccak(b"\x01" + low + high)
    assert thread_root([one, two]) != keccak(low + high)


@pytest.mark.parametrize(
    ("root", "proof"),
    [
        (b"\x00" * 31, ()),
        (bytearray(32), ()),
        ("00" * 32, ()),
        (None, ()),
        (b"\x00" * 32, (b"\x00" * 31,)),
        (b"\x00" * 32, (bytearray(32),)),
        (b"\x00" * 32, ("00" * 32,)),
    ],
)
def test_malformed_input_does_not_verify(root: object, proof: tuple[object, ...]) -> None:
    assert not verify_thread_proof(root, initial(1), proof)  # type: ignore[arg-type]


def test_malformed_sibling_does_not_verify_even_for_a_member() -> None:
    states = [initial(1), initial(2)]
    root = thread_root(states)
    (sibling,) = thread_proof(states, states[0])
    assert verify_thread_proof(root, states[0], [sibling])
    assert not verify_thread_proof(root, states[0], [bytearray(sibling)])  # type: ignore[list-item]


# --- known answer, computed from keccak by hand ---

THREAD_STATE_TYPE_STRING = (
    b"ThreadState(uint256 threadId,address sender,address receiver,"
    b"uint256 balanceEthSender,uint256 balanceEthReceiver,"
    b"uint256 balanceTokenSender,uint256 balanceTokenReceiver,uint256 txCount)"
)

VECTOR = (
    ThreadState(1, A, B, Assets(100, 0), Assets(0, 0), 0),
    ThreadState(2, A, C, Assets(0, 50), Assets(0, 0), 0),
    ThreadState(3, B, C, Assets(7, 7), Assets(3, 3), 0),
)
VECTOR_ROOT = "b4a13e91687cd48d2147ba378c844539ab47c16535a3abd06a6597a394329fa4"


def _word(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _hand_struct_hash(state: ThreadState) -> bytes:
    return keccak(
        keccak(THREAD_STATE_TYPE_STRING)
        + _word(state.thread_id)
        + b"\x00" * 12
        + state.sender.raw
        + b"\x00" * 12
        + state.receiver.raw
        + _word(state.balance_sender.eth)
        + _word(state.balance_receiver.eth)
        + _word(state.balance_sender.token)
        + _word(state.balance_receiver.token)
        + _word(state.tx_count)
    )


def test_three_leaf_known_answer() -> None:
    leaf1, leaf2, leaf3 = (keccak(b"\x00" + _hand_struct_hash(s)) for s in VECTOR)
    assert [thread_leaf(s) for s in VECTOR] == [leaf1, leaf2, leaf3]
    # Sorted ascending: leaf3 (0x2064…) < leaf2 (0x303f…) < leaf1 (0x4ca5…).
    assert leaf3 < leaf2 < leaf1
    # Level 1: (leaf3, leaf2) are paired; leaf1, the odd last node, goes up unchanged.
    node = keccak(b"\x01" + leaf3 + leaf2)
    # Level 2: sorted pair of (node, leaf1); node (0xc03a…) > leaf1 (0x4ca5…).
    assert leaf1 < node
    root = keccak(b"\x01" + leaf1 + node)

    assert root.hex() == VECTOR_ROOT
    assert thread_root(VECTOR) == root
    assert thread_proof(VECTOR, VECTOR[0]) == (node,)
    assert thread_proof(VECTOR, VECTOR[1]) == (leaf3, leaf1)
    assert thread_proof(VECTOR, VECTOR[2]) == (leaf2, leaf1)
    for state in VECTOR:
        assert verify_thread_proof(root, state, thread_proof(VECTOR, state))
