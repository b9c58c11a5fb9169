"""The local network of `devnet.local`, with what tests add: killing a node on the spot."""

from __future__ import annotations

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
    """Kill the node of `slot` right after its next store commit, before it performs any
    effect of it (sends, transactions, events): the worst moment to die."""
    node = slot.node
    assert node is not None
    slot.crash_expected = True

    def crash(*args: object) -> None:
        raise SimulatedCrash(f"{slot.name} killed between commit and send")

    node.engine._perform = crash  # type: ignore[method-assign]
