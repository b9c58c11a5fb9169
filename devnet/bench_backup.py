"""Benchmark gossip backups: replication lag and recovery from the key alone (issue 6).

    weft bench-backup [--runs 3] [--users 5] [--burst 20] [--interval 2] [--json]
    python -m devnet.bench_backup ...                      (the same)

Each run starts a fresh network in this process (`devnet.local`): the embedded chain, a hub
and `--users` users, each a real node (libp2p on 127.0.0.1, SQLite stores, gossip backups
with the default settings, but for `backup_interval`: `--interval`, 2 s by default). They
all share this process, so one core: a node's backup work competes with the other nodes'
on it. User A deposits and opens two threads to user B; every other node (the hub and the
other users) is one of A's k replicas. Then, in this order:

1. **Replication lag** of three kinds of change of A's state. Each is timed from the moment
   A's call returned (the change committed) to A's announcement of a backup that holds it,
   and to each of the others keeping that backup (announcement validated, every block
   fetched over bitswap, checked against its CID and pinned): `k1` is the first replica,
   `kN` the last. A backup "holds" the change when it opens, with A's key, to A's latest
   thread and channel states.
   - `quiet`: one payment after a quiet interval (announced at once);
   - `burst`: the last of `--burst` payments in a row (debounced: announced once
     `backup_interval` has passed since the burst's first announcement);
   - `close`: the second thread closed (urgent: announced without waiting the interval).
2. **Recovery**: A is stopped (its last backup announced and fetched), its data directory
   deleted; `node.recover.recover_node` rebuilds the store from the newest backup the hub
   and the other users hold (it listens 1 s on the backup topic while it asks them). Then A
   starts on the rebuilt store and pays B once on the first thread: that payment waits for
   the resync with the hub and B. `recovery_store_ms` runs to the rebuilt store,
   `recovery_first_payment_ms` from the same start to that payment's countersignature.
   Last, A closes the thread: A's channel, at A and at the hub, must hold the lock less
   every payment made on it, before and after the loss, or the run fails.

Every figure is the median over the runs. Progress goes to stderr; a failed run ends the
benchmark with one line `weft bench-backup: error: ...` and exit code 1.

`--json` prints one JSON object. Its top-level figures (medians over the runs, ms):

- `quiet_announce_ms`, `burst_announce_ms`, `close_announce_ms`: change to announcement
- `quiet_lag_ms`, `burst_lag_ms`, `close_lag_ms`: `{"k1": .., "kN": ..}`, change to the
  k-th replica keeping the backup
- `recovery_store_ms`: start of the recovery to the rebuilt store
- `recovery_first_payment_ms`: start of the recovery to the first payment after it
- `recovery_phases_ms`: `{step: ms since the start}` (`RecoveryReport.phases`)
- `backup_bytes`: the size of A's last sealed backup
- `announcements`: how many backups A announced in the run

and `runs`, `users`, `burst`, `interval_s` (the parameters), `machine`, `seconds` (wall
time) and `all` (the figures of each run).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import trio

from devnet.bench_node import error_line, machine, median_of
from devnet.local import ETHER, Network, Slot, local_network
from node.api import Node, WeftError
from node.backup import DEFAULT_INTERVAL, BackupService
from node.recover import recover_node
from protocols.backup import (
    Announcement,
    BackupContent,
    BackupError,
    backup_key,
    from_blocks,
    open_backup,
    parse_root,
)
from protocols.types import Assets, ThreadKey

DEPOSIT: Final = Assets(ETHER, 10**18)
LOCK: Final = Assets(ETHER // 10, 10**17)
AMOUNT: Final = Assets(1000, 10)
REPLICATION_GUARD: Final = 30.0  # seconds a backup may take to reach every replica
STEP_GUARD: Final = 60.0  # seconds any other step may take
KINDS: Final = ("quiet", "burst", "close")
LABELS: Final = {
    "quiet": "one payment after a quiet interval",
    "burst": "last payment of a burst",
    "close": "thread close (urgent)",
}


class BenchError(Exception):
    """A run did not go as it must (a backup never replicated, a wrong balance)."""


# ---------------------------------------------------------------- watching backups


def backups(node: Node) -> BackupService:
    if node.backups is None:
        raise BenchError(f"{node.address} runs without backups")
    return node.backups


def slot_key(net: Network, node: Node) -> bytes:
    """The private key of `node`, a node of `net`."""
    return slot_of(net, node).key


def slot_of(net: Network, node: Node) -> Slot:
    for slot in (net.hub_slot, *net.user_slots):
        if slot.node is node:
            return slot
    raise BenchError("not a node of the network")


async def sealed_from(node: Node, announcement: Announcement) -> bytes | None:
    """The sealed backup of `announcement` from `node`'s pinned blocks, or None if they
    are not all there (not yet fetched, or replaced and unpinned)."""
    store = backups(node).store
    root_data = await store.get(announcement.root_cid)
    if root_data is None:
        return None
    blocks = {announcement.root_cid: root_data}
    for cid in parse_root(announcement.root_cid, root_data).children:
        data = await store.get(cid)
        if data is None:
            return None
        blocks[cid] = data
    return from_blocks(announcement.root_cid, blocks.get, announcement.size)


def held(node: Node, owner: Node) -> Announcement | None:
    """The announcement of `owner`'s backup that `node` keeps (blocks pinned), if any."""
    replica = backups(node).keeper.table.get(owner.address)
    return None if replica is None else replica.announcement


def has_thread_at(node: Node, key: ThreadKey) -> Callable[[BackupContent], bool]:
    """The content holds `node`'s latest double-signed state of thread `key` and of its
    channel, as they are now."""
    latest = node.state.threads[key].latest
    channel = node.state.channels[node.address].latest

    def check(content: BackupContent) -> bool:
        entries = [t for t in content.threads if t.key == key]
        return bool(entries) and entries[0].latest == latest and content.channels == (channel,)

    return check


def lacks_thread(node: Node, key: ThreadKey) -> Callable[[BackupContent], bool]:
    """The content no longer holds thread `key`, and holds `node`'s channel as it is now."""
    channel = node.state.channels[node.address].latest

    def check(content: BackupContent) -> bool:
        return all(t.key != key for t in content.threads) and content.channels == (channel,)

    return check


async def wait_replicated(
    net: Network,
    owner: Node,
    others: list[Node],
    wanted: Callable[[BackupContent], bool],
    timeout: float = REPLICATION_GUARD,
) -> tuple[Announcement, list[float]]:
    """Wait until `owner`'s last backup opens (with its key) to content that satisfies
    `wanted` and every node of `others` keeps it; return it and the times (trio clock) each
    of them pinned it. Raises `BenchError` after `timeout` seconds."""
    key = backup_key(slot_key(net, owner))
    domain = owner.state.config.domain
    checked: Announcement | None = None
    good = False
    with trio.move_on_after(timeout):
        while True:
            own = backups(owner).agent.own
            if own is not None and own != checked:
                sealed = await sealed_from(owner, own)
                if sealed is not None:  # else replaced (and unpinned) while read: again
                    checked = own
                    good = wanted(open_backup(key, sealed, own, domain))
            if good and all(held(n, owner) == checked for n in others):
                assert checked is not None
                return checked, [backups(n).keeper.kept_at[owner.address] for n in others]
            await trio.sleep(0.002)
    raise BenchError(f"{owner.address}'s latest backup not kept by all after {timeout} s")


# ---------------------------------------------------------------- one run


def lag_figures(kind: str, owner: Node, changed_at: float, times: list[float]) -> dict[str, Any]:
    """The lags of one change, ms: to the announcement, and to the k-th replica."""
    published = backups(owner).agent.last_published_at
    if published is None:
        raise BenchError("no backup was announced")
    lags = sorted(t - changed_at for t in times)
    return {
        f"{kind}_announce_ms": (published - changed_at) * 1000,
        f"{kind}_lag_ms": {f"k{k}": lag * 1000 for k, lag in enumerate(lags, 1)},
    }


async def one_run(
    root: Path, users: int, burst: int, interval: float, progress: Callable[[str], None]
) -> dict[str, Any]:
    """One run on a fresh network in `root`: every figure of the report."""
    run: dict[str, Any] = {}
    async with local_network(root, users=users, backup_interval=interval) as net:
        hub = net.hub
        a, b = net.users[0], net.users[1]
        others = [hub, *net.users[1:]]
        progress("deposit, two threads")
        with trio.fail_after(STEP_GUARD):
            await a.deposit(DEPOSIT)
            await hub.collateralize(b.address, DEPOSIT)
            kept = await a.open_thread(b.address, LOCK)
            closed = await a.open_thread(b.address, LOCK)
            await a.pay(closed, AMOUNT)
            await a.pay(kept, AMOUNT)
        paid = 1  # on `kept`
        await wait_replicated(net, a, others, has_thread_at(a, kept))

        progress("replication lag")
        await trio.sleep(interval + 0.2)
        with trio.fail_after(STEP_GUARD):
            await a.pay(kept, AMOUNT)
        paid += 1
        changed = trio.current_time()
        _, times = await wait_replicated(net, a, others, has_thread_at(a, kept))
        run.update(lag_figures("quiet", a, changed, times))

        await trio.sleep(interval + 0.2)
        with trio.fail_after(STEP_GUARD):
            for _ in range(burst):
                await a.pay(kept, AMOUNT)
        paid += burst
        changed = trio.current_time()
        _, times = await wait_replicated(net, a, others, has_thread_at(a, kept))
        run.update(lag_figures("burst", a, changed, times))

        await trio.sleep(interval / 4)  # within the interval: only urgency announces at once
        with trio.fail_after(STEP_GUARD):
            await a.close_thread(closed)
        changed = trio.current_time()
        _, times = await wait_replicated(net, a, others, lacks_thread(a, closed))
        run.update(lag_figures("close", a, changed, times))

        progress("recovery")
        channel_before = a.balance().user
        a_slot = slot_of(net, a)
        await net.stop(a_slot)
        last = backups(a).agent.own
        if last is None:
            raise BenchError("A announced no backup")
        run["backup_bytes"] = last.size
        run["announcements"] = backups(a).agent.published
        with trio.fail_after(REPLICATION_GUARD):
            while any(held(n, a) != last for n in others):
                await trio.sleep(0.01)
        shutil.rmtree(root / a_slot.name)
        started = trio.current_time()
        report = await recover_node(net.settings(a_slot), tuple(n.peer_ref for n in others[1:]))
        rebuilt = trio.current_time()
        if report.sequence != last.sequence or report.threads != 1:
            raise BenchError(f"recovered the wrong backup: {report.describe()}")
        a = await net.start(a_slot)
        with trio.fail_after(STEP_GUARD):
            await a.pay(kept, AMOUNT)
        paid += 1
        resumed = trio.current_time()
        run["recovery_store_ms"] = (rebuilt - started) * 1000
        run["recovery_first_payment_ms"] = (resumed - started) * 1000
        run["recovery_phases_ms"] = {step: at * 1000 for step, at in report.phases}

        with trio.fail_after(STEP_GUARD):
            final = await a.close_thread(kept)
            sent = Assets(AMOUNT.eth * paid, AMOUNT.token * paid)
            expected = Assets(
                channel_before.eth + LOCK.eth - sent.eth,
                channel_before.token + LOCK.token - sent.token,
            )
            if final.state.balance_of(b.address) != sent:
                raise BenchError(f"B got {final.state.balance_of(b.address)}, not {sent}")
            while a.balance().user != expected or hub.balance(a.address).user != expected:
                await trio.sleep(0.02)
    return run


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weft bench-backup",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=3, help="fresh networks (1..10)")
    parser.add_argument("--users", type=int, default=5, help="users besides the hub (2..10)")
    parser.add_argument("--burst", type=int, default=20, help="payments in a burst (1..1000)")
    parser.add_argument(
        "--interval",
        type=float,
        default=DEFAULT_INTERVAL,
        help="backup_interval of every node, seconds (0.1..60)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments; `SystemExit` (2 with the usage) if they are out of range."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 10 or not 2 <= args.users <= 10 or not 1 <= args.burst <= 1000:
        parser.error("--runs in 1..10, --users in 2..10, --burst in 1..1000")
    if not 0.1 <= args.interval <= 60:
        parser.error("--interval in 0.1..60")
    return args


def print_report(result: dict[str, Any]) -> None:
    r = result
    m = r["machine"]
    replicas = r["users"]  # the hub and the other users
    print(
        f"median of {r['runs']} runs: hub + {r['users']} users in one process, backup "
        f"interval {r['interval_s']:g} s ({m['cores']} cores, {m['cpu']}, Python {m['python']})"
    )
    print(f"replication lag of A's backup to its {replicas} replicas, ms:")
    ks = [f"k{k}" for k in range(1, replicas + 1)]
    print(f"  {'change':<36} {'announced':>9} " + " ".join(f"{k:>6}" for k in ks))
    for kind in KINDS:
        label = LABELS[kind] + (f" of {r['burst']}" if kind == "burst" else "")
        lags = r[f"{kind}_lag_ms"]
        print(
            f"  {label:<36} {r[f'{kind}_announce_ms']:>9.0f} "
            + " ".join(f"{lags[k]:>6.0f}" for k in ks)
        )
    print(
        f"recovery from the key alone: store rebuilt after {r['recovery_store_ms']:,.0f} ms, "
        f"first payment after {r['recovery_first_payment_ms']:,.0f} ms"
    )
    print("  " + ", ".join(f"{s} {ms:,.0f}" for s, ms in r["recovery_phases_ms"].items()))
    print(
        f"A's backup: {r['backup_bytes']:,.0f} bytes sealed, {r['announcements']:.0f} "
        f"announcements in a run ({r['seconds']:.0f} s in all)"
    )


EXPECTED_FAILURES: Final = (BenchError, WeftError, BackupError, trio.TooSlowError, OSError)
"""The failures `main` reports in one line (exit code 1); any other exception is a bug."""


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on `argv`; the exit code (2 for bad arguments, 1 if a run failed)."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # a usage error (2) or --help (0), already printed
        return exc.code if isinstance(exc.code, int) else 0
    logging.getLogger("weft").setLevel(logging.WARNING)
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for i in range(args.runs):

            def progress(what: str, i: int = i) -> None:
                print(f"weft bench-backup: run {i + 1}/{args.runs}: {what}", file=sys.stderr)

            with tempfile.TemporaryDirectory(prefix="weft-bench-backup-") as tmp:
                run = trio.run(one_run, Path(tmp), args.users, args.burst, args.interval, progress)
            runs.append(run)
            progress(
                f"lag to all replicas: quiet {run['quiet_lag_ms'][f'k{args.users}']:,.0f} ms, "
                f"burst {run['burst_lag_ms'][f'k{args.users}']:,.0f} ms, close "
                f"{run['close_lag_ms'][f'k{args.users}']:,.0f} ms; recovery "
                f"{run['recovery_store_ms']:,.0f} ms"
            )
    except Exception as exc:
        leaf = first_leaf(exc)
        if not isinstance(leaf, EXPECTED_FAILURES):
            raise
        print(f"weft bench-backup: error: {error_line(leaf)}", file=sys.stderr)
        return 1
    result: dict[str, Any] = {
        **median_of(runs),
        "runs": args.runs,
        "users": args.users,
        "burst": args.burst,
        "interval_s": args.interval,
        "machine": machine(),
        "seconds": round(time.monotonic() - started, 1),
        "all": runs,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_report(result)
    return 0


def first_leaf(exc: BaseException) -> BaseException:
    """The first exception in `exc`, exception groups opened."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    sys.exit(main())
