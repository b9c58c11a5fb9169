"""The durable store (node.store) on real SQLite files: atomic batches, the outbox, schema
checks, error translation, the trio wrapper, and a SIGKILL crash test."""

from __future__ import annotations

import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from node.store import SCHEMA_VERSION, AsyncStore, Batch, Snapshot, Store, StoreError, open_store

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "node.db"


@pytest.fixture
def store(path: Path) -> Iterator[Store]:
    with Store(path) as opened:
        yield opened


# ---------------------------------------------------------------- commit and load


def test_fresh_store_is_empty(store: Store) -> None:
    assert store.load() == Snapshot({}, ())


def test_commit_and_load_round_trip(store: Store) -> None:
    seqs = store.commit(
        Batch(puts={"channel/a": b"\x01", "cursor": b"\x00" * 40}, outbox_add=(b"e1", b"e2"))
    )
    assert seqs == (1, 2)
    assert store.load() == Snapshot(
        {"channel/a": b"\x01", "cursor": b"\x00" * 40}, ((1, b"e1"), (2, b"e2"))
    )
    store.commit(Batch(puts={"channel/a": b"\x02"}))  # overwrite
    assert store.load().states == {"channel/a": b"\x02", "cursor": b"\x00" * 40}


def test_empty_values_and_empty_batch(store: Store) -> None:
    assert store.commit(Batch()) == ()
    store.commit(Batch(puts={"": b""}, outbox_add=(b"",)))
    assert store.load() == Snapshot({"": b""}, ((1, b""),))


def test_deletes(store: Store) -> None:
    store.commit(Batch(puts={"a": b"1", "b": b"2", "c": b"3"}))
    store.commit(Batch(puts={"d": b"4"}, deletes=frozenset({"a", "c", "never-there"})))
    assert store.load().states == {"b": b"2", "d": b"4"}


def test_put_and_delete_of_one_key_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="both put and deleted"):
        store.commit(Batch(puts={"a": b"1"}, deletes=frozenset({"a"})))
    assert store.load() == Snapshot({}, ())


def test_outbox_order_done_and_seqs_never_reused(store: Store) -> None:
    assert store.commit(Batch(outbox_add=(b"a", b"b", b"c"))) == (1, 2, 3)
    # Marking done and adding in one batch: the done entries go, the new ones queue last.
    assert store.commit(Batch(outbox_add=(b"d",), outbox_done=frozenset({1, 3}))) == (4,)
    assert store.load().outbox == ((2, b"b"), (4, b"d"))
    store.commit(Batch(outbox_done=frozenset({2, 4})))
    assert store.load().outbox == ()
    # AUTOINCREMENT: the seq of an entry that was done is not given out again.
    assert store.commit(Batch(outbox_add=(b"e",))) == (5,)


def test_done_of_an_entry_not_pending_fails_and_writes_nothing(store: Store) -> None:
    store.commit(Batch(puts={"k": b"old"}, outbox_add=(b"a",)))
    before = store.load()
    for done in (frozenset({2}), frozenset({1, 99})):
        with pytest.raises(StoreError, match="not pending"):
            store.commit(Batch(puts={"k": b"new", "x": b"1"}, outbox_add=(b"b",), outbox_done=done))
        assert store.load() == before
    assert store.commit(Batch(outbox_add=(b"b",))) == (2,)  # the failed batches took no seq


@pytest.mark.parametrize(
    "batch",
    [
        # The first put is written, the second one fails its CHECK (not a BLOB).
        Batch(puts={"a": b"1", "b": "text"}),  # type: ignore[dict-item]
        Batch(puts={"a": b"1"}, outbox_add=(b"ok", 5)),  # type: ignore[arg-type]
        Batch(puts={"a": b"1", 7: b"int key"}),  # type: ignore[dict-item]
        Batch(puts={"a": b"1"}, deletes=frozenset({b"k"})),  # type: ignore[arg-type]
        Batch(puts={"a": b"1"}, outbox_done=frozenset({"1"})),  # type: ignore[arg-type]
        Batch(puts={"a": b"1", "b": None}),  # type: ignore[dict-item]
        Batch(puts={"a": b"1", "b": object()}),  # type: ignore[dict-item]
        Batch(deletes=frozenset({"k"}), outbox_add=(b"ok", None)),  # type: ignore[arg-type]
    ],
)
def test_failing_batch_writes_nothing(store: Store, batch: Batch) -> None:
    store.commit(Batch(puts={"k": b"v"}, outbox_add=(b"first",)))
    before = store.load()
    with pytest.raises(StoreError):
        store.commit(batch)
    assert store.load() == before
    assert not store._db.in_transaction
    assert store.commit(Batch(outbox_add=(b"next",))) == (2,)


def test_failure_at_commit_time_rolls_back(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after every statement ran (here: at COMMIT itself) still writes nothing."""
    store.commit(Batch(puts={"k": b"v"}))
    real = store._db

    class FailingCommit:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            if sql == "COMMIT":
                raise sqlite3.OperationalError("disk I/O error (simulated)")
            return real.execute(sql, *args)

    monkeypatch.setattr(store, "_db", FailingCommit())
    with pytest.raises(StoreError, match="simulated"):
        store.commit(Batch(puts={"k": b"new"}, outbox_add=(b"e",)))
    monkeypatch.undo()
    assert store.load() == Snapshot({"k": b"v"}, ())


def test_reopen_restores_everything(path: Path) -> None:
    with Store(path) as store:
        store.commit(Batch(puts={"a": b"1", "b": b"2"}, outbox_add=(b"x", b"y", b"z")))
        store.commit(Batch(deletes=frozenset({"b"}), outbox_done=frozenset({2})))
        expected = store.load()
    with Store(path) as store:
        assert store.load() == expected == Snapshot({"a": b"1"}, ((1, b"x"), (3, b"z")))
        assert store.commit(Batch(outbox_add=(b"w",))) == (4,)


def test_pragmas_are_really_set(store: Store, path: Path) -> None:
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("synchronous") == 2  # FULL
    assert store.pragma("foreign_keys") == 1
    # WAL is a property of the file: another connection sees it too.
    other = sqlite3.connect(path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()
    with pytest.raises(StoreError):
        store.pragma("journal_mode; DROP TABLE state")


def test_relaxed_commit_skips_only_its_own_fsync(store: Store) -> None:
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    store.commit(Batch(puts={"a": b"1"}), durable=False)
    relaxed = list(statements)
    statements.clear()
    store.commit(Batch(puts={"b": b"2"}))
    store._db.set_trace_callback(None)
    assert relaxed[0] == "PRAGMA synchronous=NORMAL"
    assert relaxed.index("COMMIT") < relaxed.index("PRAGMA synchronous=FULL")
    assert not any("synchronous" in statement for statement in statements)
    assert store.pragma("synchronous") == 2  # FULL again for everything else
    assert store.load().states == {"a": b"1", "b": b"2"}
    # A relaxed batch that fails writes nothing and leaves FULL in place too.
    with pytest.raises(StoreError):
        store.commit(Batch(outbox_done=frozenset({999})), durable=False)
    assert store.pragma("synchronous") == 2


def test_used_after_close(path: Path) -> None:
    store = Store(path)
    store.close()
    store.close()  # closing twice is fine
    with pytest.raises(StoreError):
        store.load()
    with pytest.raises(StoreError):
        store.commit(Batch(puts={"a": b"1"}))


# ---------------------------------------------------------------- refusing bad files


def _set_version(path: Path, sql: str) -> None:
    db = sqlite3.connect(path)
    try:
        with db:
            db.execute(sql)
    finally:
        db.close()


@pytest.mark.parametrize(
    "sql",
    [
        f"UPDATE schema_version SET version = {SCHEMA_VERSION + 1}",
        "UPDATE schema_version SET version = 0",
        "UPDATE schema_version SET version = 'one'",
        "DELETE FROM schema_version",
        f"INSERT INTO schema_version VALUES ({SCHEMA_VERSION})",
    ],
)
def test_unknown_schema_version_is_refused(path: Path, sql: str) -> None:
    Store(path).close()
    _set_version(path, sql)
    with pytest.raises(StoreError, match="schema version"):
        Store(path)


def test_foreign_sqlite_file_is_refused(path: Path) -> None:
    _set_version(path, "CREATE TABLE something (x)")
    with pytest.raises(StoreError, match="not a Weft store"):
        Store(path)


@pytest.mark.parametrize(
    "content", [b"garbage " * 1000, b"SQLite format 3\x00" + b"\xff" * 4000, os.urandom(8192)]
)
def test_garbage_file_gives_store_error(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    with pytest.raises(StoreError):
        Store(path)


def test_unopenable_paths(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        Store(tmp_path / "no" / "such" / "dir" / "node.db")
    with pytest.raises(StoreError):
        Store(tmp_path)  # a directory


def test_read_only_file_system() -> None:
    with pytest.raises(StoreError):
        Store("/proc/weft-test-store.db")  # not creatable, even by root


def test_locked_database_gives_store_error(path: Path) -> None:
    Store(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
        with Store(path, busy_timeout=0.05) as store:  # opening an existing store only reads
            with pytest.raises(StoreError, match="locked"):
                store.commit(Batch(puts={"a": b"1"}, outbox_add=(b"e",)))
            assert store.load() == Snapshot({}, ())  # WAL: readers are not blocked
            holder.execute("ROLLBACK")
            assert store.commit(Batch(puts={"a": b"1"}, outbox_add=(b"e",))) == (1,)
            assert store.load() == Snapshot({"a": b"1"}, ((1, b"e"),))
    finally:
        holder.close()


# ---------------------------------------------------------------- trio wrapper


async def test_async_store_round_trip_and_close(path: Path) -> None:
    async with open_store(path) as store:
        assert isinstance(store, AsyncStore)
        assert await store.pragma("journal_mode") == "wal"
        assert await store.commit(Batch(puts={"a": b"1"}, outbox_add=(b"e",))) == (1,)
        assert await store.load() == Snapshot({"a": b"1"}, ((1, b"e"),))
        sync = store.sync
    with pytest.raises(StoreError):  # closed on exit
        sync.load()
    async with open_store(path) as store:
        assert await store.load() == Snapshot({"a": b"1"}, ((1, b"e"),))


async def test_async_calls_run_one_at_a_time(path: Path) -> None:
    async with open_store(path) as store:
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(store.commit, Batch(puts={f"k{i}": b"v"}, outbox_add=(b"e",)))
        snapshot = await store.load()
    assert len(snapshot.states) == 20
    assert [seq for seq, _ in snapshot.outbox] == list(range(1, 21))


async def test_async_store_closes_on_error_and_cancel(path: Path) -> None:
    with pytest.raises(RuntimeError):
        async with open_store(path) as store:
            raise RuntimeError("boom")
    with pytest.raises(StoreError):
        store.sync.load()
    with trio.CancelScope() as scope:
        async with open_store(path) as store:
            scope.cancel()
            await trio.sleep_forever()
    with pytest.raises(StoreError):
        store.sync.load()


async def test_open_store_errors_are_store_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.db").write_bytes(b"garbage " * 1000)
    with pytest.raises(StoreError):
        async with open_store(tmp_path / "bad.db"):
            pass  # pragma: no cover


# ---------------------------------------------------------------- crash test

WRITER = textwrap.dedent(
    """
    import sys
    from node.store import Batch, Store

    store = Store(sys.argv[1])
    for counter in range(1, int(sys.argv[2]) + 1):
        value = str(counter).encode()
        store.commit(Batch(puts={"k": value}, outbox_add=(value,)))
        sys.stdout.write(f"{counter}\\n")
        sys.stdout.flush()
    """
)
MAX_BATCHES = 10_000
WAIT_SECONDS = 20.0


def _read_until(proc: subprocess.Popen[bytes], lines: int, deadline: float) -> bytes:
    """What `proc` printed, read until it printed `lines` lines, exited or `deadline` passed."""
    assert proc.stdout is not None
    out = b""
    fd = proc.stdout.fileno()
    while out.count(b"\n") < lines and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
    return out


@pytest.mark.parametrize("kill_after", [1, 37, 400, 2500])
def test_sigkill_loses_no_acknowledged_commit_and_tears_no_batch(
    tmp_path: Path, kill_after: int
) -> None:
    path = tmp_path / "crash.db"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), str(MAX_BATCHES)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO_ROOT,
    )
    try:
        out = _read_until(proc, kill_after, time.monotonic() + WAIT_SECONDS)
        time.sleep(random.uniform(0, 0.005))  # land somewhere inside a commit
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        rest, err = proc.communicate(timeout=10)
    out += rest
    printed = [int(line) for line in out.decode().split()]
    assert printed, f"the writer printed nothing: {err.decode()}"
    assert printed == list(range(1, len(printed) + 1))
    acknowledged = printed[-1]
    if acknowledged < MAX_BATCHES:
        assert proc.returncode == -signal.SIGKILL, err.decode()

    with Store(path) as store:
        snapshot = store.load()
    stored = int(snapshot.states["k"])
    # A commit that returned is never lost; at most one more committed before the kill.
    assert acknowledged <= stored <= acknowledged + 1
    # Atomicity: exactly one outbox entry per committed batch, in order.
    assert snapshot.outbox == tuple((i, str(i).encode()) for i in range(1, stored + 1))
