"""Two sans-I/O machines joined by a fake, ordered link (like h11's ConnectionPair).

Each side's `Send` effects are queued in FIFO order for the other side and delivered when a
test says so, so tests control interleavings: crossing proposals, late acknowledgements,
dropped links. Everything else a step returns (events, contract calls, rejections) is
recorded per side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocols.effects import Receive, Send, Transition
from protocols.signing import Signer
from protocols.types import Address, Signature

StepFn = Callable[[Any, Any, Signer], Transition[Any]]


class RecordingSigner(Signer):
    """A `Signer` that remembers every digest it signed (for no-double-sign checks)."""

    def __init__(self, private_key: bytes) -> None:
        super().__init__(private_key)
        self.digests: list[bytes] = []

    def sign_digest(self, digest: bytes) -> Signature:
        self.digests.append(digest)
        return super().sign_digest(digest)


@dataclass
class End:
    """One side of a pair: its machine state, key, inbox and what it reported."""

    state: Any
    signer: Signer
    inbox: list[Receive] = field(default_factory=list)
    events: list[object] = field(default_factory=list)
    rejections: list[object] = field(default_factory=list)

    @property
    def address(self) -> Address:
        return self.signer.address


class Pair:
    """Machines `a` and `b` of one kind, stepped by `step_fn`."""

    def __init__(self, step_fn: StepFn, a: End, b: End) -> None:
        self.step_fn = step_fn
        self.ends = {a.address: a, b.address: b}
        self.a = a
        self.b = b

    def other(self, end: End) -> End:
        return self.b if end is self.a else self.a

    def input(self, end: End, event: object) -> Transition[Any]:
        """Step `end` with `event`; route sends to the other end's inbox."""
        result = self.step_fn(end.state, event, end.signer)
        end.state = result.state
        if result.rejection is not None:
            end.rejections.append(result.rejection)
        self.absorb(end, result.effects)
        return result

    def absorb(self, end: End, effects: tuple[object, ...]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                target = self.ends[effect.to]
                target.inbox.append(Receive(end.address, effect.message))
            else:
                end.events.append(effect)

    def deliver(self, end: End, count: int | None = None) -> int:
        """Deliver up to `count` (all if None) queued messages to `end`; return how many."""
        delivered = 0
        while end.inbox and (count is None or delivered < count):
            self.input(end, end.inbox.pop(0))
            delivered += 1
        return delivered

    def drain(self, limit: int = 1_000_000) -> None:
        """Deliver in both directions until no message is in flight."""
        steps = 0
        while self.a.inbox or self.b.inbox:
            steps += self.deliver(self.a) + self.deliver(self.b)
            if steps > limit:
                raise AssertionError("link did not go quiet")

    def drop_in_flight(self) -> None:
        """Lose every message in flight (a broken connection)."""
        self.a.inbox.clear()
        self.b.inbox.clear()
