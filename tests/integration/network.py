"""The local network of `devnet.local`, with what tests add: killing a node on the spot."""

from __future__ import annotations

from typing import Any

from devnet.local import (
    CHALLENGE_PERIOD,
    ETHER,
    TOKENS,
    Network,
    Slot,
    eventually,
    local_network,
    new_key,
)
from protocols import roles
from protocols.effects import Send

__all__ = [
    "CHALLENGE_PERIOD",
    "ETHER",
    "TOKENS",
    "Network",
    "SimulatedCrash",
    "Slot",
    "crash_after_next_commit",
    "eventually",
    "local_network",
    "new_key",
]


class SimulatedCrash(Exception):
    """Raised inside a node to kill it on the spot."""


def crash_after_next_commit(slot: Slot) -> None:
    """Kill the node of `slot` right after the next store commit that is followed by a
    send, before it performs any effect of it (sends, transactions, events): the worst
    moment to die."""
    node = slot.node
    assert node is not None
    slot.crash_expected = True

    perform = node.engine._perform

    def crash(transition: roles.NodeTransition, *args: Any) -> None:
        if any(isinstance(effect, Send) for effect in transition.effects):
            raise SimulatedCrash(f"{slot.name} killed between commit and send")
        perform(transition, *args)

    node.engine._perform = crash  # type: ignore[method-assign]
