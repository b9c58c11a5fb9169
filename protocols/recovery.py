"""Recovery, the pure part: a node's machines as a backup, and the machines rebuilt from one.

`backup_content(state, sequence)` takes the latest double-signed states out of a node's
`roles.NodeState` as the `backup.BackupContent` that the node seals and announces.
`restore_state(config, content)` rebuilds the `roles.NodeState` of a node that has nothing
but its key and a checked backup (`backup.open_backup` or `backup.check_content` came first).

A backup may be older than the last state the node signed (backups are debounced), so a
restored side must not sign a state the node may already have signed differently (DESIGN.md,
"Durability rule"). Two rules keep it safe; SPEC.md ("Recovery: restoring the machines")
states them:

- every restored side is *awaiting sync*: it proposes nothing (requests queue) until its
  counterparty shows its latest double-signed state (`ChannelSync`, `ThreadSync`, a proposal
  built on my latest, or, from a hub with nothing double-signed, `ChannelResume`);
- every restored side counts `RECOVERY_NONCE_GAP` more nonces as signed than its backup
  shows, so neither its own proposals nor its countersignatures land on a nonce it may have
  used before the loss (proposals of mine the peer refused, which no backup holds); a
  restored user's thread ids skip as many.

Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Final

from protocols import backup, roles
from protocols import channel as ch
from protocols import thread as th
from protocols.errors import InvalidValue, LocalProtocolError
from protocols.messages import SignedThreadState
from protocols.thread_root import thread_root
from protocols.types import Address, ChannelState, Party, ThreadKey

__all__ = [
    "RECOVERY_NONCE_GAP",
    "RecoveryError",
    "backup_content",
    "restore_state",
]

RECOVERY_NONCE_GAP: Final = roles.RECOVERY_NONCE_GAP
"""Nonces a restored side treats as possibly signed above its backed-up latest state."""

_BACKED_UP_PHASES: Final = frozenset(
    {th.ThreadPhase.OPEN, th.ThreadPhase.CLOSING, th.ThreadPhase.FINAL}
)


class RecoveryError(LocalProtocolError):
    """A backup cannot be restored for this node (not its backup, or inconsistent)."""


# ---------------------------------------------------------------- backup content


def backup_content(state: roles.NodeState, sequence: int) -> backup.BackupContent:
    """The node's latest double-signed states as backup content number `sequence`.

    A user backs up its channel (if anything in it is double-signed) and every thread that
    is open, closing or final, with the thread's double-signed initial state (as its channel
    holds it) and its latest double-signed state; a thread its channel holds but that the
    user forgot (closed before it was locked) is backed up at its initial state, so that the
    channel's thread root can be rebuilt. Threads agreed but not locked are left out: nothing
    of mine is locked in them, and should the hub lock one later, my channel's resync brings
    it back (`roles`, `user_channel_synced`). The hub backs up every channel with a
    double-signed state and, once per key, the initial state of every thread those channels
    hold (as both initial and latest: the hub signs no thread state). Each thread's `held`
    names the backed-up channels that hold it: the user's own for a user; for the hub, the
    sender's, the receiver's or both (a thread being opened or settled is locked in one
    party's channel and not yet, or no longer, in the other's).

    Entries are sorted (channels by user, threads by key), so equal states give equal bytes.
    The result passes `backup.check_content(content, config.me, config.domain)`. Raises
    `InvalidValue` for a sequence out of uint64 range.
    """
    config = state.config
    channels = [
        side.latest
        for _, side in sorted(state.channels.items(), key=lambda item: item[0].raw)
        if side.latest.sig_hub is not None and side.latest.sig_user is not None
    ]
    threads: dict[ThreadKey, backup.BackupThread] = {}
    if config.role is Party.USER:
        channel = state.channels.get(config.me)
        locked = {t.state.key: t for t in channel.threads} if channel is not None else {}
        for key, side in state.threads.items():
            latest = side.latest
            if latest is None or side.phase not in _BACKED_UP_PHASES:
                continue
            initial = locked.get(key)
            if initial is None:
                continue  # not (or no longer) locked in my channel: nothing of mine in it
            threads[key] = backup.BackupThread(initial, latest, backup.held_bit(key, config.me))
        for key, initial in locked.items():
            held = backup.held_bit(key, config.me)
            threads.setdefault(key, backup.BackupThread(initial, initial, held))
    else:
        initials: dict[ThreadKey, SignedThreadState] = {}
        holders: dict[ThreadKey, int] = {}
        for signed in channels:
            user = signed.state.user
            for initial in state.channels[user].threads:
                key = initial.state.key
                initials.setdefault(key, initial)
                holders[key] = holders.get(key, 0) | backup.held_bit(key, user)
        for key, initial in initials.items():
            threads[key] = backup.BackupThread(initial, initial, holders[key])
    return backup.BackupContent(
        owner=config.me,
        domain=config.domain,
        hub=config.hub,
        sequence=sequence,
        channels=tuple(channels),
        threads=tuple(threads[key] for key in sorted(threads)),
    )


# ---------------------------------------------------------------- restore


def restore_state(
    config: roles.NodeConfig,
    content: backup.BackupContent,
    gap: int = RECOVERY_NONCE_GAP,
) -> roles.NodeState:
    """The state a node with an empty store rebuilds from its checked backup `content`.

    Every channel side stands at its backed-up latest state with the backed-up threads whose
    `held` names its user; a user without a backed-up channel gets its genesis channel. The
    threads a user's channel holds stand at their latest backed-up states, `OPEN` (a thread
    whose close had begun is open again: the resync and a new close decide). Every side is
    awaiting its peer's sync and counts `RECOVERY_NONCE_GAP` nonces above its latest as
    signed; the coordination is empty but for `recovered` and (user) `last_thread_id`, which
    skips `RECOVERY_NONCE_GAP` ids above the highest backed-up id I sent. So the restored
    node signs nothing at a nonce or thread id it may have used, and builds on nothing older
    than its peers' latest.

    `gap` (at least `RECOVERY_NONCE_GAP`) is that number of nonces. The node draws it at
    random for each recovery (a multiple of `RECOVERY_NONCE_GAP`), so that two recoveries
    from one backup, with nothing newer published in between, do not sign at the same
    nonces.

    `content` must have passed `backup.check_content` for `config.me` and `config.domain`;
    signatures are not checked again. Raises `RecoveryError` if the content is not this
    node's (owner, domain, hub), a thread's `held` names a channel the backup lacks, or the
    threads held in a channel do not give exactly its thread root and count.
    """
    if content.owner != config.me or content.domain != config.domain:
        raise RecoveryError("the backup is not of this node or not for this contract")
    if content.hub != config.hub:
        raise RecoveryError(f"the backup is for hub {content.hub}, not {config.hub}")
    if config.role is Party.HUB and config.me != config.hub:
        raise RecoveryError("a hub node must be the contract's hub")
    if gap < RECOVERY_NONCE_GAP:
        raise RecoveryError(f"a recovery gap below {RECOVERY_NONCE_GAP}")
    channels: dict[Address, ch.ChannelSide] = {}
    for signed in content.channels:
        user = signed.state.user
        if config.role is Party.USER and user != config.me:
            raise RecoveryError(f"a user's backup holds the channel of {user}")
        held = _channel_threads(signed.state, content.threads)
        try:
            channels[user] = ch.restored_channel(
                config.domain, config.role, config.hub, user, signed, held, gap
            )
        except (LocalProtocolError, InvalidValue) as exc:
            raise RecoveryError(f"channel of {user}: {exc}") from None
    for entry in content.threads:
        for party in (entry.key.sender, entry.key.receiver):
            if entry.held_in(party) and party not in channels:
                raise RecoveryError(
                    f"thread {entry.key.thread_id} is held in the channel of {party},"
                    " which the backup lacks"
                )
    threads: dict[ThreadKey, th.ThreadSide] = {}
    last_thread_id = 0
    if config.role is Party.USER:
        if config.me not in channels:
            genesis = ch.new_channel(config.domain, Party.USER, config.hub, config.me)
            channels[config.me] = replace(genesis, max_signed=gap, awaiting_sync=True)
        locked = {t.state.key for t in channels[config.me].threads}
        for entry in content.threads:
            key = entry.key
            if key.sender == config.me:
                last_thread_id = max(last_thread_id, key.thread_id)
            if key not in locked:
                continue  # nothing of mine is locked in it
            try:
                threads[key] = th.restored_thread(
                    config.domain,
                    config.me,
                    entry.initial.state,
                    entry.latest,
                    gap,
                    config.window,
                )
            except LocalProtocolError as exc:
                raise RecoveryError(f"thread {key.thread_id}: {exc}") from None
        last_thread_id += gap
    coordination = roles.Coordination(
        recovered=True, recovery_gap=gap, last_thread_id=last_thread_id
    )
    return roles.NodeState(config, channels, threads, coordination)


def _channel_threads(
    state: ChannelState, backed_up: Iterable[backup.BackupThread]
) -> tuple[SignedThreadState, ...]:
    """The initial states of the threads among `backed_up` held in `state`'s channel.

    Raises `RecoveryError` unless they give exactly `state`'s thread root and count.
    """
    held = tuple(
        sorted((t.initial for t in backed_up if t.held_in(state.user)), key=lambda t: t.state.key)
    )
    if len(held) != state.thread_count:
        raise RecoveryError(
            f"channel of {state.user}: {len(held)} backed-up threads held for a root of"
            f" {state.thread_count}"
        )
    if thread_root(t.state for t in held) != state.thread_root:
        raise RecoveryError(f"channel of {state.user}: the threads held do not give its root")
    return held
