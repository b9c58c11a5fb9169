"""The node's durable store: machine states and the outbox of effects, in one SQLite file.

The engine commits a step's new states and its effects in one `Batch`, and performs the
effects only after `commit` returned (DESIGN.md, "Durability rule"). After a crash, `load`
gives back every state and every effect committed but not yet marked done.

The store knows nothing of what it keeps: keys are strings, values are bytes (in practice
`node.state_codec` encodings).

Schema (version 1):

    schema_version(version INTEGER NOT NULL)                  one row
    state(key TEXT PRIMARY KEY, value BLOB NOT NULL)          machine states, singletons
    outbox(seq INTEGER PRIMARY KEY AUTOINCREMENT,             effects not yet performed
           value BLOB NOT NULL)

CHECK constraints hold keys to TEXT and values to BLOB. AUTOINCREMENT means a seq is never
given out twice, even after the newest entry is marked done.

Connection: `journal_mode=WAL`, `synchronous=FULL` (a commit that returned survives power
loss), `foreign_keys=ON`. Every sqlite3 error is raised as `StoreError`.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from os import PathLike
from typing import Final, TypeVar

import trio

__all__ = [
    "SCHEMA_VERSION",
    "AsyncStore",
    "Batch",
    "Snapshot",
    "Store",
    "StoreError",
    "open_store",
]

SCHEMA_VERSION: Final = 1

_SCHEMA: Final = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE state (
        key TEXT PRIMARY KEY CHECK (typeof(key) = 'text'),
        value BLOB NOT NULL CHECK (typeof(value) = 'blob')
    )""",
    """CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        value BLOB NOT NULL CHECK (typeof(value) = 'blob')
    )""",
)

T = TypeVar("T")


class StoreError(Exception):
    """The store cannot be opened or used, or a batch was not committed (nothing written)."""


@dataclass(frozen=True, slots=True)
class Batch:
    """Everything one engine step writes, applied atomically by `Store.commit`.

    `puts`: keys to set; `deletes`: keys to remove (absent keys are fine); `outbox_add`:
    effects to keep until performed, in order; `outbox_done`: seqs of effects performed
    (each must be in the outbox). A key may not be both put and deleted.
    """

    puts: Mapping[str, bytes] = field(default_factory=dict)
    deletes: frozenset[str] = frozenset()
    outbox_add: tuple[bytes, ...] = ()
    outbox_done: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """All the store holds: states by key, and the outbox as (seq, value) in seq order."""

    states: dict[str, bytes]
    outbox: tuple[tuple[int, bytes], ...]


class Store:
    """A synchronous store over one SQLite file. Not for concurrent use: one caller at a time."""

    def __init__(self, path: str | PathLike[str], busy_timeout: float = 5.0) -> None:
        """Open (creating if absent) the store at `path`; `StoreError` if it is not usable.

        `busy_timeout`: seconds to wait for another connection's lock before failing.
        """
        self.path = path
        try:
            self._db = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from exc
        try:
            self._setup()
        except BaseException:
            self._db.close()
            raise

    def _setup(self) -> None:
        def setup() -> None:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"store {self.path}: cannot use WAL (journal mode {mode})")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            # DEFERRED: opening an existing store only reads, so a writer elsewhere does not
            # block it; creating the schema in a fresh file upgrades to a write.
            self._transaction(self._check_schema, "DEFERRED")

        self._guard("open", setup)

    def _check_schema(self) -> None:
        tables = {
            row[0]
            for row in self._db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        }
        if not tables:
            for statement in _SCHEMA:
                self._db.execute(statement)
            self._db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            return
        if "schema_version" not in tables:
            raise StoreError(f"{self.path} is an SQLite file but not a Weft store")
        versions = self._db.execute("SELECT version FROM schema_version").fetchall()
        if versions != [(SCHEMA_VERSION,)]:
            found = ", ".join(repr(row[0]) for row in versions) or "none"
            raise StoreError(
                f"store {self.path} has schema version {found}; this node reads {SCHEMA_VERSION}"
            )

    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path}: {what} failed: {exc}") from exc

    def _transaction(self, fn: Callable[[], T], mode: str = "IMMEDIATE") -> T:
        """Run `fn` in one transaction: committed if it returns, rolled back if it raises."""
        self._db.execute(f"BEGIN {mode}")
        try:
            result = fn()
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                # If even ROLLBACK fails the connection is broken: SQLite rolls back on reopen.
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise
        return result

    def commit(self, batch: Batch, *, durable: bool = True) -> tuple[int, ...]:
        """Apply `batch` in one transaction; the seqs given to `batch.outbox_add`, in order.

        `durable=False` commits without waiting for the disk (`synchronous=NORMAL` for this
        transaction only): the batch survives a crash of the process, but a power loss may
        take it back, down to the last durable commit (which also makes every earlier one
        durable). Raise `StoreError` with nothing written if any part of it fails.
        """
        # SQLite would store an int key as text (column affinity): refuse it here.
        if any(type(key) is not str for key in (*batch.puts, *batch.deletes)):
            raise StoreError("state keys must be str")
        if any(type(seq) is not int for seq in batch.outbox_done):
            raise StoreError("outbox seqs must be int")
        overlap = set(batch.puts) & set(batch.deletes)
        if overlap:
            raise StoreError(f"keys both put and deleted: {sorted(overlap)!r}")

        def apply() -> tuple[int, ...]:
            db = self._db
            db.executemany("DELETE FROM state WHERE key = ?", ((k,) for k in batch.deletes))
            db.executemany(
                "INSERT INTO state (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                batch.puts.items(),
            )
            for seq in batch.outbox_done:
                if db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount != 1:
                    raise StoreError(f"outbox entry {seq!r} is not pending")
            seqs: list[int] = []
            for value in batch.outbox_add:
                cursor = db.execute("INSERT INTO outbox (value) VALUES (?)", (value,))
                assert cursor.lastrowid is not None
                seqs.append(cursor.lastrowid)
            return tuple(seqs)

        if durable:
            return self._guard("commit", lambda: self._transaction(apply))

        def relaxed() -> tuple[int, ...]:
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                return self._transaction(apply)
            finally:
                self._db.execute("PRAGMA synchronous=FULL")

        return self._guard("commit", relaxed)

    def load(self) -> Snapshot:
        """Everything stored, read in one transaction (a consistent snapshot)."""

        def read() -> Snapshot:
            states = dict(self._db.execute("SELECT key, value FROM state ORDER BY key"))
            outbox = tuple(self._db.execute("SELECT seq, value FROM outbox ORDER BY seq"))
            return Snapshot(states, outbox)

        return self._guard("load", lambda: self._transaction(read, "DEFERRED"))

    def pragma(self, name: str) -> object:
        """The value of `PRAGMA name` on this connection (for checks and diagnostics)."""
        if not name.replace("_", "").isalnum():
            raise StoreError(f"not a pragma name: {name!r}")
        return self._guard("pragma", lambda: self._db.execute(f"PRAGMA {name}").fetchone()[0])

    def close(self) -> None:
        """Close the connection; the store cannot be used after. Closing twice is fine."""
        self._guard("close", self._db.close)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncStore:
    """A `Store` for trio code: each call runs in a worker thread, one call at a time.

    A call cancelled while its thread runs waits for the thread to finish (trio's default),
    so when `commit` raises `Cancelled` the batch may or may not have been committed: the
    next `load` tells.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._limiter = trio.CapacityLimiter(1)

    @property
    def sync(self) -> Store:
        """The underlying store (only for use while no call of this wrapper runs)."""
        return self._store

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def commit(self, batch: Batch, *, durable: bool = True) -> tuple[int, ...]:
        """`Store.commit` in a worker thread."""
        return await self._run(lambda: self._store.commit(batch, durable=durable))

    async def load(self) -> Snapshot:
        """`Store.load` in a worker thread."""
        return await self._run(self._store.load)

    async def pragma(self, name: str) -> object:
        """`Store.pragma` in a worker thread."""
        return await self._run(self._store.pragma, name)

    async def aclose(self) -> None:
        """Close the store (shielded from cancellation, so it always completes)."""
        with trio.CancelScope(shield=True):
            await self._run(self._store.close)


@asynccontextmanager
async def open_store(
    path: str | PathLike[str], busy_timeout: float = 5.0
) -> AsyncIterator[AsyncStore]:
    """`async with open_store(path) as store:` an `AsyncStore`, closed on exit."""
    store = AsyncStore(await trio.to_thread.run_sync(Store, path, busy_timeout))
    try:
        yield store
    finally:
        await store.aclose()
