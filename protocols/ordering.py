"""The ordering rules both agreements share (channel: hub and user; thread: A and B).

A proposal names the nonce of the state it builds on (`prev`); the receiver takes it only if
that is its latest double-signed state and its own nonce is above every nonce the receiver
has signed. Nonces may skip (after a refused or conflicting proposal) but never repeat.
SPEC.md, "Agreement", states the rules in full.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocols.messages import RejectReason

# Refusals after which the proposer proposes the same request again, above the peer's nonce.
RETRYABLE = frozenset(
    {
        RejectReason.NONCE_CONFLICT,
        RejectReason.STALE_NONCE,
        RejectReason.NOT_SUCCESSOR,
        RejectReason.HOLDING_AFTER_CONFLICT,
    }
)


def next_nonce(max_signed: int, floor: int) -> int:
    """The nonce of my next proposal: above all I signed and all the peer told me it signed."""
    return max(max_signed, floor) + 1


def order_refusal(
    *, nonce: int, prev: int, latest: int, max_signed: int, has_outgoing: bool, in_conflict: bool
) -> tuple[RejectReason, str] | None:
    """Why a peer proposal cannot be taken in this order, or None if it can.

    `latest` is the nonce of my latest double-signed state. A new proposal that meets my own
    proposals in flight is a conflict: both build on `latest`, and neither may be taken.
    """
    if has_outgoing and nonce > latest:
        return RejectReason.NONCE_CONFLICT, "both proposed"
    if nonce <= max_signed:
        return RejectReason.STALE_NONCE, f"nonce {nonce} is not above {max_signed}, already signed"
    if in_conflict:
        return RejectReason.HOLDING_AFTER_CONFLICT, "conflict not resolved yet"
    if prev != latest:
        return RejectReason.NOT_SUCCESSOR, f"builds on {prev}, my latest is {latest}"
    return None


@dataclass(frozen=True, slots=True)
class ConflictOutcome:
    """What a side does after a refusal of its own proposal."""

    holding: bool  # propose nothing until the priority side's Resume
    send_resume: bool  # re-propose now, then hand the turn back


def after_refusal(reason: RejectReason, in_conflict: bool, has_priority: bool) -> ConflictOutcome:
    """A NONCE_CONFLICT, or any refusal while I am in a conflict, settles the conflict:
    the priority side goes first and hands the turn back; the other side holds."""
    if reason is RejectReason.NONCE_CONFLICT or in_conflict:
        return ConflictOutcome(holding=not has_priority, send_resume=has_priority)
    return ConflictOutcome(holding=False, send_resume=False)
