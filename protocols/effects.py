"""What a state machine step returns: the new state, the effects to perform, a rejection.

Effects are performed by the node only after the new state is committed (DESIGN.md's
durability rule). A step that rejects its input returns the state it was given, unchanged,
with one exception: a proposal refused with NONCE_CONFLICT records the conflict
(`in_conflict`), so the node commits `Transition.state` whether or not it is a rejection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from protocols.messages import Message, RejectReason
from protocols.types import Address

S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class Receive:
    """Input: `message` arrived from the peer whose address the transport authenticated."""

    sender: Address
    message: Message


@dataclass(frozen=True, slots=True)
class Send:
    """Effect: deliver `message` to the peer with address `to`."""

    to: Address
    message: Message


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an input was refused; the state did not change."""

    reason: RejectReason
    detail: str


@dataclass(frozen=True, slots=True)
class Transition(Generic[S]):
    """The result of one step: new state, effects in order, and the rejection if any."""

    state: S
    effects: tuple[object, ...] = ()
    rejection: Rejection | None = None

    @property
    def accepted(self) -> bool:
        return self.rejection is None


def rejected(state: S, reason: RejectReason, detail: str, *effects: object) -> Transition[S]:
    """A step that refuses its input: `state` unchanged, optional effects (e.g. a reject)."""
    return Transition(state, tuple(effects), Rejection(reason, detail))
