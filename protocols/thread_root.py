"""The thread root: a merkle tree over the initial states of a channel's open threads.

A channel state commits to its open threads through `threadRoot`; the contract checks a
thread's initial state against it with an inclusion proof. The tree is built so that the
on-chain check is one keccak per proof element and needs no direction bits:

- leaf = keccak256(0x00 || hashStruct(ThreadState)), the EIP-712 struct hash;
- inner node = keccak256(0x01 || min(a, b) || max(a, b)), a sorted pair (byte-wise order);
- leaves are sorted ascending; each level pairs neighbours left to right and promotes an odd
  last node unchanged to the next level;
- the root of no threads is 32 zero bytes (`EMPTY_THREAD_ROOT`); of one thread, its leaf.

The 0x00 / 0x01 prefixes keep a leaf from ever being read as an inner node. The rule is
written down in SPEC.md ("Thread root").
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import pairwise

from protocols.eip712 import thread_state_struct_hash
from protocols.errors import InvalidValue
from protocols.keccak import keccak
from protocols.types import ThreadState

EMPTY_THREAD_ROOT = b"\x00" * 32
"""`threadRoot` of a channel with no open threads."""

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"


def thread_leaf(state: ThreadState) -> bytes:
    """The leaf of `state`: keccak256(0x00 || hashStruct(state))."""
    return keccak(LEAF_PREFIX + thread_state_struct_hash(state))


def _node(a: bytes, b: bytes) -> bytes:
    """The parent of two nodes: keccak256(0x01 || min(a, b) || max(a, b))."""
    return keccak(NODE_PREFIX + a + b if a <= b else NODE_PREFIX + b + a)


def _sorted_leaves(states: Iterable[ThreadState]) -> list[bytes]:
    """The leaves of `states`, ascending; raise `InvalidValue` on a repeated leaf."""
    leaves = sorted(thread_leaf(state) for state in states)
    for previous, current in pairwise(leaves):
        if previous == current:
            raise InvalidValue(
                f"thread state appears twice in the thread set (leaf {current.hex()})"
            )
    return leaves


def _parent_level(level: Sequence[bytes]) -> list[bytes]:
    """Pair neighbours left to right; an odd last node goes up unchanged."""
    parents = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
    if len(level) % 2 == 1:
        parents.append(level[-1])
    return parents


def thread_root(states: Iterable[ThreadState]) -> bytes:
    """The thread root of a set of initial thread states, in any order.

    Raises `InvalidValue` if the same state appears twice.
    """
    level = _sorted_leaves(states)
    if not level:
        return EMPTY_THREAD_ROOT
    while len(level) > 1:
        level = _parent_level(level)
    return level[0]


def thread_proof(states: Iterable[ThreadState], state: ThreadState) -> tuple[bytes, ...]:
    """The inclusion proof of `state` in the tree of `states`: the siblings, bottom-up.

    A level where the node on `state`'s path has no sibling (odd last node) adds nothing.
    The proof of the only member of a one-thread set is empty. Raises `InvalidValue` if
    `state` is not in `states` or if a state appears twice.
    """
    level = _sorted_leaves(states)
    leaf = thread_leaf(state)
    index = bisect_left(level, leaf)
    if index == len(level) or level[index] != leaf:
        raise InvalidValue(f"thread {state.thread_id} is not in the thread set")
    siblings: list[bytes] = []
    while len(level) > 1:
        sibling = index ^ 1
        if sibling < len(level):
            siblings.append(level[sibling])
        level = _parent_level(level)
        index //= 2
    return tuple(siblings)


def verify_thread_proof(root: bytes, state: ThreadState, proof: Iterable[bytes]) -> bool:
    """True if `proof` shows that `state` is a leaf of the tree whose root is `root`.

    This is the check the contract makes. Malformed input (a root or sibling that is not
    32 bytes) gives False, not an error. No state verifies against `EMPTY_THREAD_ROOT`.
    """
    if type(root) is not bytes or len(root) != 32:
        return False
    node = thread_leaf(state)
    for sibling in proof:
        if type(sibling) is not bytes or len(sibling) != 32:
            return False
        node = _node(node, sibling)
    return node == root
