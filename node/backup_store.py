"""Durable backups of a node: its own latest backup, the replicas it keeps, and their blocks.

One SQLite file, `backups.sqlite` in the node's data directory, apart from the node's store
(`node.store`): losing it loses no state, only the copies other nodes rely on and the
node's backup sequence (which recovery restores from the announcements it sees).

Schema (version 1):

    schema_version(version INTEGER NOT NULL)                        one row
    identity(id = 1, owner BLOB, chain_id TEXT, manager BLOB)      whose file this is
    own(id = 1, sequence INTEGER, announcement BLOB, fingerprint BLOB)
        the last sequence used (never reused), the announcement of the backup published
        with it and the fingerprint of its content (`node.backup`)
    replicas(owner BLOB PRIMARY KEY, announcement BLOB, priority INTEGER, tick INTEGER)
        the kept backups of other owners (`protocols.backup.ReplicaTable`)
    ticks(id = 1, tick INTEGER)                                    the table's tick
    blocks(cid BLOB PRIMARY KEY, data BLOB)                        pinned blocks
    pins(owner BLOB, cid BLOB, PRIMARY KEY (owner, cid))           who needs each block

Every block is pinned by the owner whose backup lists it (this node for its own); a block
no owner pins any more is deleted in the same transaction. Each change is one transaction:
a new own backup and the unpinning of the previous one, or a replica admitted with its
blocks and the evictions it causes. Commits wait for the disk (`synchronous=FULL`): a
sequence that was published must never be given out again.

`BackupStore` is synchronous; `AsyncBackupStore` runs each call in a worker thread, one at
a time, and is the `node.gossip.BlockStore` the block service serves from. Every sqlite3
error is raised as `BackupStoreError`.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Final, TypeVar

import trio

from protocols.backup import (
    Announcement,
    BackupError,
    Priority,
    Replica,
    decode_announcement,
    encode_announcement,
    stored_bytes,
)
from protocols.eip712 import Domain
from protocols.types import Address

__all__ = [
    "SCHEMA_VERSION",
    "AsyncBackupStore",
    "BackupSnapshot",
    "BackupStore",
    "BackupStoreError",
    "open_backup_store",
]

SCHEMA_VERSION: Final = 1
MAX_SEQUENCE: Final = 2**63 - 1
"""Largest sequence SQLite's INTEGER holds (the protocol allows uint64; no node gets here)."""
MANUAL_OWNER: Final = b""
"""Owner of the blocks pinned through the plain `BlockStore` interface (`put`)."""

_SCHEMA: Final = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE identity (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        owner BLOB NOT NULL,
        chain_id TEXT NOT NULL,
        manager BLOB NOT NULL
    )""",
    """CREATE TABLE own (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        sequence INTEGER NOT NULL CHECK (typeof(sequence) = 'integer' AND sequence >= 0),
        announcement BLOB,
        fingerprint BLOB
    )""",
    """CREATE TABLE replicas (
        owner BLOB PRIMARY KEY CHECK (typeof(owner) = 'blob'),
        announcement BLOB NOT NULL,
        priority INTEGER NOT NULL,
        tick INTEGER NOT NULL
    )""",
    """CREATE TABLE ticks (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        tick INTEGER NOT NULL
    )""",
    """CREATE TABLE blocks (
        cid BLOB PRIMARY KEY CHECK (typeof(cid) = 'blob'),
        data BLOB NOT NULL CHECK (typeof(data) = 'blob')
    )""",
    """CREATE TABLE pins (
        owner BLOB NOT NULL,
        cid BLOB NOT NULL REFERENCES blocks (cid),
        PRIMARY KEY (owner, cid)
    )""",
    "CREATE INDEX pins_by_cid ON pins (cid)",
)

T = TypeVar("T")


class BackupStoreError(Exception):
    """The backup store cannot be opened or used, belongs to another node, or a change was
    not committed (nothing written)."""


@dataclass(frozen=True, slots=True)
class BackupSnapshot:
    """What the backup store holds when the node starts.

    `sequence`: the last own sequence used (0: none yet). `own`: the announcement of the
    last own backup (its blocks are pinned), `fingerprint` that of its content.
    `replicas`: the kept backups of others, by owner; `tick`: the replica table's tick.
    """

    sequence: int
    own: Announcement | None
    fingerprint: bytes | None
    replicas: tuple[Replica, ...]
    tick: int


def published_sequence(path: Path) -> int:
    """The last own sequence recorded in the backup store at `path`, read without writing
    (0 if there is no such file or it records none). For a node whose own store is empty:
    a sequence above 0 means it published states it no longer holds."""
    if not path.exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT sequence FROM own").fetchone()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise BackupStoreError(f"backup store {path}: unreadable: {exc}") from exc
    return int(row[0]) if row and row[0] else 0


class BackupStore:
    """A synchronous backup store over one SQLite file. One caller at a time."""

    def __init__(
        self,
        path: str | PathLike[str],
        owner: Address,
        domain: Domain,
        busy_timeout: float = 5.0,
    ) -> None:
        """Open (creating if absent) the backup store of `owner` on `domain` at `path`.

        Raises `BackupStoreError` if it cannot be used or belongs to another owner, chain
        or ChannelManager.
        """
        self.path = path
        self.owner = owner
        self.domain = domain
        try:
            self._db = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise BackupStoreError(f"cannot open backup store {path}: {exc}") from exc
        try:
            self._guard("open", self._setup)
        except BaseException:
            self._db.close()
            raise

    # -- plumbing

    def _setup(self) -> None:
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise BackupStoreError(f"backup store {self.path}: cannot use WAL ({mode})")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._transaction(self._check_schema)

    def _check_schema(self) -> None:
        db = self._db
        tables = {
            row[0]
            for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        }
        identity = (self.owner.raw, str(self.domain.chain_id), self.domain.verifying_contract.raw)
        if not tables:
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            db.execute(
                "INSERT INTO identity (id, owner, chain_id, manager) VALUES (1, ?, ?, ?)",
                identity,
            )
            db.execute("INSERT INTO own (id, sequence) VALUES (1, 0)")
            db.execute("INSERT INTO ticks (id, tick) VALUES (1, 0)")
            return
        if "schema_version" not in tables or "identity" not in tables:
            raise BackupStoreError(f"{self.path} is an SQLite file but not a Weft backup store")
        versions = db.execute("SELECT version FROM schema_version").fetchall()
        if versions != [(SCHEMA_VERSION,)]:
            found = ", ".join(repr(row[0]) for row in versions) or "none"
            raise BackupStoreError(
                f"backup store {self.path} has schema version {found};"
                f" this node reads {SCHEMA_VERSION}"
            )
        stored = db.execute("SELECT owner, chain_id, manager FROM identity").fetchone()
        if stored is None or tuple(stored) != identity:
            raise BackupStoreError(
                f"backup store {self.path} belongs to another node (owner, chain or manager)"
            )

    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except sqlite3.Error as exc:
            raise BackupStoreError(f"backup store {self.path}: {what} failed: {exc}") from exc

    def _transaction(self, fn: Callable[[], T], mode: str = "IMMEDIATE") -> T:
        self._db.execute(f"BEGIN {mode}")
        try:
            result = fn()
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise
        return result

    def _write(self, what: str, fn: Callable[[], T]) -> T:
        return self._guard(what, lambda: self._transaction(fn))

    def _pin(self, owner: bytes, blocks: Mapping[bytes, bytes]) -> None:
        self._db.executemany(
            "INSERT INTO blocks (cid, data) VALUES (?, ?) ON CONFLICT (cid) DO NOTHING",
            ((bytes(cid), bytes(data)) for cid, data in blocks.items()),
        )
        self._db.executemany(
            "INSERT INTO pins (owner, cid) VALUES (?, ?) ON CONFLICT DO NOTHING",
            ((owner, bytes(cid)) for cid in blocks),
        )

    def _unpin_owner(self, owner: bytes, keep: Iterable[bytes] = ()) -> None:
        """Drop every pin of `owner` but those of `keep`; delete blocks nobody pins."""
        kept = set(keep)
        cids = [
            row[0]
            for row in self._db.execute("SELECT cid FROM pins WHERE owner = ?", (owner,))
            if row[0] not in kept
        ]
        self._db.executemany(
            "DELETE FROM pins WHERE owner = ? AND cid = ?", ((owner, c) for c in cids)
        )
        self._collect(cids)

    def _collect(self, cids: Iterable[bytes]) -> None:
        self._db.executemany(
            "DELETE FROM blocks WHERE cid = ? AND NOT EXISTS (SELECT 1 FROM pins WHERE cid = ?)",
            ((c, c) for c in cids),
        )

    # -- reading

    def load(self) -> BackupSnapshot:
        """Everything but the blocks, in one read transaction.

        Raises `BackupStoreError` if a stored announcement does not decode.
        """

        def read() -> BackupSnapshot:
            db = self._db
            sequence, own_raw, fingerprint = db.execute(
                "SELECT sequence, announcement, fingerprint FROM own"
            ).fetchone()
            tick = db.execute("SELECT tick FROM ticks").fetchone()[0]
            replicas = []
            for owner, raw, priority, replica_tick in db.execute(
                "SELECT owner, announcement, priority, tick FROM replicas ORDER BY owner"
            ):
                announcement = self._announcement(raw)
                if announcement.owner.raw != owner:
                    raise BackupStoreError(f"replica of {owner.hex()} holds another owner's")
                replicas.append(
                    Replica(
                        announcement,
                        Priority(priority),
                        replica_tick,
                        stored_bytes(announcement.size),
                    )
                )
            own = None if own_raw is None else self._announcement(own_raw)
            return BackupSnapshot(sequence, own, fingerprint, tuple(replicas), tick)

        try:
            return self._guard("load", lambda: self._transaction(read, "DEFERRED"))
        except ValueError as exc:  # an unknown priority
            raise BackupStoreError(f"backup store {self.path}: unreadable: {exc}") from exc

    def _announcement(self, raw: bytes) -> Announcement:
        try:
            return decode_announcement(bytes(raw))
        except BackupError as exc:
            raise BackupStoreError(f"backup store {self.path}: bad announcement: {exc}") from exc

    def get_block(self, cid: bytes) -> bytes | None:
        """The pinned block `cid`, or None."""
        row = self._guard(
            "get",
            lambda: self._db.execute("SELECT data FROM blocks WHERE cid = ?", (cid,)).fetchone(),
        )
        return None if row is None else bytes(row[0])

    def pinned(self, owner: Address | bytes) -> frozenset[bytes]:
        """CIDs pinned for `owner` (this node's address for its own backup)."""
        key = owner.raw if isinstance(owner, Address) else owner
        rows = self._guard(
            "pinned",
            lambda: self._db.execute("SELECT cid FROM pins WHERE owner = ?", (key,)).fetchall(),
        )
        return frozenset(bytes(row[0]) for row in rows)

    def block_count(self) -> int:
        """How many blocks are stored."""
        row = self._guard(
            "count", lambda: self._db.execute("SELECT count(*) FROM blocks").fetchone()
        )
        return int(row[0])

    # -- writing

    def commit_own(
        self, announcement: Announcement, fingerprint: bytes, blocks: Mapping[bytes, bytes]
    ) -> None:
        """Record a new own backup: its sequence, announcement and fingerprint, pin its
        blocks and unpin those of the previous one, in one transaction.

        Raises `BackupStoreError` if the sequence is not above the last one used (nothing
        written), or if the announcement is not this store's owner's.
        """
        if announcement.owner != self.owner:
            raise BackupStoreError(f"announcement of {announcement.owner}, not of {self.owner}")
        sequence = announcement.sequence
        if sequence > MAX_SEQUENCE:
            raise BackupStoreError(f"sequence {sequence} is beyond what the store holds")
        raw = encode_announcement(announcement)

        def apply() -> None:
            db = self._db
            (last,) = db.execute("SELECT sequence FROM own").fetchone()
            if sequence <= last:
                raise BackupStoreError(f"sequence {sequence} is not above the last used, {last}")
            self._pin(self.owner.raw, blocks)
            self._unpin_owner(self.owner.raw, keep=blocks)
            db.execute(
                "UPDATE own SET sequence = ?, announcement = ?, fingerprint = ?",
                (sequence, raw, fingerprint),
            )

        self._write("commit_own", apply)

    def commit_replica(
        self,
        kept: Replica,
        blocks: Mapping[bytes, bytes],
        evicted: Iterable[Address],
        tick: int,
    ) -> None:
        """Keep `kept` (replacing any backup of its owner) with its `blocks`, drop the
        replicas of `evicted` owners and their blocks, and set the table's tick; one
        transaction."""
        owner = kept.owner.raw
        raw = encode_announcement(kept.announcement)
        gone = [a.raw for a in evicted if a.raw != owner]

        def apply() -> None:
            db = self._db
            self._pin(owner, blocks)
            self._unpin_owner(owner, keep=blocks)
            for other in gone:
                self._unpin_owner(other)
                db.execute("DELETE FROM replicas WHERE owner = ?", (other,))
            db.execute(
                "INSERT INTO replicas (owner, announcement, priority, tick) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (owner) DO UPDATE SET announcement = excluded.announcement,"
                " priority = excluded.priority, tick = excluded.tick",
                (owner, raw, int(kept.priority), kept.tick),
            )
            db.execute("UPDATE ticks SET tick = ?", (tick,))

        self._write("commit_replica", apply)

    def drop_replicas(self, owners: Iterable[Address]) -> None:
        """Forget the replicas of `owners` and unpin their blocks (one transaction)."""
        keys = [a.raw for a in owners]

        def apply() -> None:
            for key in keys:
                self._unpin_owner(key)
                self._db.execute("DELETE FROM replicas WHERE owner = ?", (key,))

        self._write("drop_replicas", apply)

    def put_block(self, cid: bytes, data: bytes) -> None:
        """Pin one block outside any backup (the plain `BlockStore` interface)."""
        self._write("put", lambda: self._pin(MANUAL_OWNER, {cid: data}))

    def delete_block(self, cid: bytes) -> None:
        """Undo `put_block` (blocks pinned by a backup stay)."""

        def apply() -> None:
            self._db.execute("DELETE FROM pins WHERE owner = ? AND cid = ?", (MANUAL_OWNER, cid))
            self._collect([cid])

        self._write("delete", apply)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._guard("close", self._db.close)


class AsyncBackupStore:
    """A `BackupStore` for trio code: each call in a worker thread, one at a time.

    Also the `node.gossip.BlockStore` of the node's block service.
    """

    def __init__(self, store: BackupStore) -> None:
        self._store = store
        self._limiter = trio.CapacityLimiter(1)

    @property
    def sync(self) -> BackupStore:
        """The underlying store (only while no call of this wrapper runs)."""
        return self._store

    async def _run(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    async def load(self) -> BackupSnapshot:
        return await self._run(self._store.load)

    async def commit_own(
        self, announcement: Announcement, fingerprint: bytes, blocks: Mapping[bytes, bytes]
    ) -> None:
        await self._run(lambda: self._store.commit_own(announcement, fingerprint, blocks))

    async def commit_replica(
        self, kept: Replica, blocks: Mapping[bytes, bytes], evicted: Iterable[Address], tick: int
    ) -> None:
        gone = tuple(evicted)
        await self._run(lambda: self._store.commit_replica(kept, blocks, gone, tick))

    async def drop_replicas(self, owners: Iterable[Address]) -> None:
        gone = tuple(owners)
        await self._run(lambda: self._store.drop_replicas(gone))

    async def pinned(self, owner: Address) -> frozenset[bytes]:
        return await self._run(lambda: self._store.pinned(owner))

    async def block_count(self) -> int:
        return await self._run(self._store.block_count)

    # node.gossip.BlockStore

    async def get(self, cid: bytes) -> bytes | None:
        return await self._run(lambda: self._store.get_block(cid))

    async def put(self, cid: bytes, data: bytes) -> None:
        await self._run(lambda: self._store.put_block(cid, data))

    async def delete(self, cid: bytes) -> None:
        await self._run(lambda: self._store.delete_block(cid))

    async def aclose(self) -> None:
        """Close the store (shielded, so it always completes)."""
        with trio.CancelScope(shield=True):
            await self._run(self._store.close)


@asynccontextmanager
async def open_backup_store(
    path: str | PathLike[str], owner: Address, domain: Domain
) -> AsyncIterator[AsyncBackupStore]:
    """`async with open_backup_store(path, owner, domain) as store:`, closed on exit.

    Raises `BackupStoreError` like `BackupStore`.
    """
    store = AsyncBackupStore(await trio.to_thread.run_sync(BackupStore, path, owner, domain))
    try:
        yield store
    finally:
        await store.aclose()
