"""Benchmark thread payments between node processes, against their floor, and the hub.

    weft bench [--runs 3] [--sequential 1000] [--pipelined 10000] [--window 256]
               [--checkpoints 50] [--relaxed] [--no-backups] [--profile DIR] [--json]
    python -m devnet.bench_node ...                        (the same)

Each run starts its own network: the embedded chain served by `devnet.chain_server` (one
for all runs), and a hub and two users, A (the payer) and B (the payee), each
`python -m node.run` (libp2p on 127.0.0.1, SQLite in WAL mode with `synchronous=FULL`, or
`relaxed_commits` with `--relaxed`; gossip backups on, as by default, or off with
`--no-backups` to see what they cost). A and B deposit, the hub collateralizes both, A opens
a thread to B. Then, in this order:

1. Node payments, inside A's process (`bench_pay` over the control interface, so the
   control round trip is not counted), after 200 untimed ones: sequential (one payment in
   flight; each latency from `pay` to the countersignature A stored) and pipelined (up to
   `--window` in flight). A pipelined latency runs from the moment the payment is started
   (it enters the window) to the moment `bench_pay`, which waits for the payments in the
   order they were started, sees its countersignature stored: it includes the queueing
   behind the other payments in flight, not the wait for a free place in the window. The
   CPU time (user + system, from /proc) of the hub, A and B is read around the pipelined
   payments: the hub takes no part in them.
2. Hub checkpoints: the payments' thread is closed, then two pairs run at the same time,
   each `--checkpoints` cycles of open a thread, one payment, close it: A to B, and B to A.
   Every open locks the thread in both users' channels and every close settles it in both,
   each a channel update countersigned through the hub process. The rate counts opens +
   closes over the time from the first open until the hub holds no thread lock in either
   channel; the open and close latencies are those of the control calls
   (`open_thread`, `close_thread`) as the pair saw them. The rate is the throughput of two
   pairs each doing one open / pay / close cycle at a time, waiting for each step before
   the next: it includes each cycle's one payment (direct, A and B only) and the control
   round trips of its three calls. It is not the hub's capacity: the hub is idle part of
   that time. `hub_cpu_s_during_checkpoints` and `hub_cpu_ms_per_checkpoint` show the load
   the hub took.
3. Resident memory (VmRSS now, VmHWM peak) of each node process, read after the
   checkpoints; then the network is stopped.
4. The floor (`devnet.bench_floor`): the same payments, counts and window over raw trio
   TCP between two fresh processes on 127.0.0.1, with the node's signer, EIP-712 digests
   and wire codec, but no libp2p, no storage and no protocol machines. The floor batches:
   in the pipelined phase its payer writes all the proposals it has credit for in one
   write, and its payee answers each batch it read in one write (the node's writes gather
   only the frames queued while a write is in flight). So part of the pipelined ratio
   comes from this batching, not only from what the node adds. The ratios node / floor
   are taken within each run.

Every figure is the median over the runs (a ratio: the median of the per-run ratios).
Progress goes to stderr, one line per run; a failed run ends the benchmark with one line
`weft bench: error: ...` (after the tails of the node logs, if nodes were started) and exit
code 1. `--profile DIR` runs A and B under cProfile and writes `a.prof` and `b.prof` of the
last run there (profiling slows them down: use it to see where the time goes, not for the
rates). Targets (issue 4): pipelined >= 2,000/s; sequential >= 300/s with p50 <= 3 ms; hub
CPU near zero; RSS <= 150 MB.

`--json` prints one JSON object. Its top-level figures (medians over the runs):

- `sequential_payments_per_s`, `pipelined_payments_per_s`: node payments per second
- `sequential_p50_ms`, `sequential_p99_ms`, `pipelined_p50_ms`, `pipelined_p99_ms`: node
  payment latency percentiles, milliseconds
- `floor_sequential_payments_per_s`, `floor_pipelined_payments_per_s`: floor payments per
  second
- `floor_sequential_p50_ms`, `floor_sequential_p99_ms`, `floor_pipelined_p50_ms`,
  `floor_pipelined_p99_ms`: floor latency percentiles, milliseconds
- `sequential_ratio_to_floor`, `pipelined_ratio_to_floor`: node rate / floor rate (0..1,
  higher is closer to the floor)
- `hub_checkpoints_per_s`: thread opens + closes per second of the two pairs together (the
  pairs' throughput, not the hub's capacity)
- `checkpoint_open_p50_ms`, `checkpoint_close_p50_ms`: open / close latency, milliseconds
- `hub_cpu_s_during_pipelined`, `payer_cpu_s_during_pipelined`,
  `payee_cpu_s_during_pipelined`: CPU seconds of each node during the pipelined payments
- `floor_payer_cpu_s_during_pipelined`: CPU seconds of the floor's payer, the same payments
- `disk_fsync_p50_ms`: the disk's baseline, measured after the floor in the directory that
  held the node stores: median of 200 rounds of writing 4 KiB and fsyncing it, milliseconds
  (a sequential node payment waits for three fsyncs; the floor for none)
- `hub_cpu_s_during_checkpoints`: CPU seconds of the hub during the checkpoint cycles
- `hub_cpu_ms_per_checkpoint`: `hub_cpu_s_during_checkpoints` per open or close,
  milliseconds (/proc counts CPU time in clock ticks, 10 ms on Linux: coarse for few cycles)
- `rss_mb`, `peak_rss_mb`: `{"hub", "payer", "payee"}`, resident memory now / at peak, MB

and `runs`, `sequential_count`, `pipelined_count`, `window`, `checkpoint_cycles` (per
pair), `checkpoint_pairs`, `relaxed`, `backups` (the parameters), `machine` (`cpu`: the model from
/proc/cpuinfo, `cores`, `python`), `seconds` (wall time of the whole benchmark) and `all`
(the same figures for each run, in order).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import trio

from devnet.bench_floor import AMOUNT, FloorError, percentile, run_floor
from devnet.deploy import ETHER
from devnet.processes import (
    Deployment,
    NodeProcess,
    ProcessError,
    deploy,
    eventually,
    free_port,
    node_config,
    served_chain,
)
from node.chain_errors import ChainError
from node.control import ControlClient, ControlError, assets_json
from node.run import PROFILE_ENV
from protocols.types import Address, Assets

RESERVE = Assets(500 * ETHER, 10**22)
DEPOSIT = Assets(50 * ETHER, 10**21)
LOCK = Assets(10 * ETHER, 10**20)
"""A's lock in the payments' thread, and the hub's collateral for A and for B."""
CHECKPOINT_LOCK = Assets(ETHER // 10, 10**18)
"""Each checkpoint thread's lock. A sender's close returns once its own channel settled:
the hub may still hold the lock in the receiver's channel when the pair opens its next
thread, so the collateral covers many locks."""
WARMUP = 200
CHECKPOINT_PAIRS: Final = 2
CHECKPOINT_TIME_LIMIT = 300.0  # seconds all checkpoint cycles may take
PAY_TIME_LIMIT = 300.0  # seconds one bench_pay may take
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
QUIET_POLL_INTERVAL: Final = 0.5
"""Seconds between a node's chain polls: the chain matters only to set the threads up, so
poll it rarely, to keep the noise of three pollers off a small machine while the payments
are measured."""
NODES: Final = (("hub", "hub"), ("a", "payer"), ("b", "payee"))
"""Node process names and the names the report gives them."""

# The documented top-level figures of `--json`, all medians over the runs.
FIGURES: Final = (
    "sequential_payments_per_s",
    "sequential_p50_ms",
    "sequential_p99_ms",
    "pipelined_payments_per_s",
    "pipelined_p50_ms",
    "pipelined_p99_ms",
    "floor_sequential_payments_per_s",
    "floor_sequential_p50_ms",
    "floor_sequential_p99_ms",
    "floor_pipelined_payments_per_s",
    "floor_pipelined_p50_ms",
    "floor_pipelined_p99_ms",
    "sequential_ratio_to_floor",
    "pipelined_ratio_to_floor",
    "hub_checkpoints_per_s",
    "checkpoint_open_p50_ms",
    "checkpoint_close_p50_ms",
    "hub_cpu_s_during_pipelined",
    "payer_cpu_s_during_pipelined",
    "payee_cpu_s_during_pipelined",
    "floor_payer_cpu_s_during_pipelined",
    "disk_fsync_p50_ms",
    "hub_cpu_s_during_checkpoints",
    "hub_cpu_ms_per_checkpoint",
    "rss_mb",
    "peak_rss_mb",
)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of process `pid`, in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) / 1024
    return {"rss_mb": values["VmRSS"], "peak_mb": values["VmHWM"]}


def machine() -> dict[str, Any]:
    """The CPU model (from /proc/cpuinfo), the number of cores and the Python version."""
    cpu = platform.processor() or platform.machine() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                cpu = value.strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


class BenchError(Exception):
    """A run gave no usable figure (e.g. `bench_pay` or the floor reported no rate), or was
    given up."""


def node_options(relaxed: bool, backups: bool = True) -> dict[str, Any]:
    """The config entries every node of a run gets on top of `node_config`'s."""
    options: dict[str, Any] = {"poll_interval": QUIET_POLL_INTERVAL}
    if relaxed:
        options["relaxed_commits"] = True
    if not backups:
        options["backups"] = False
    return options


def rate(result: dict[str, Any], what: str) -> float:
    """`result["payments_per_s"]` of a `bench_pay` or floor summary; `BenchError` if there
    is none (`None` when no time elapsed) or it is not a positive finite number."""
    value = result.get("payments_per_s")
    if isinstance(value, bool) or not isinstance(value, int | float):
        value = None
    if value is None or not (math.isfinite(value) and value > 0):
        raise BenchError(
            f"{what}: no payment rate ({result.get('count')} payments in "
            f"{result.get('seconds')} s, rate {result.get('payments_per_s')!r})"
        )
    return float(value)


class Network:
    """The hub and users A and B of one run, their control clients and the deployment.

    A context manager: entered before the first process starts, it stops (by their pids)
    every process started through `start`, and closes the clients, however it is left.
    """

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self.nodes: dict[str, NodeProcess] = {}
        self.clients: dict[str, ControlClient] = {}
        self._stack = ExitStack()

    def __enter__(self) -> Network:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stack.close()  # the clients, then the processes, the last started first

    def start(self, node: NodeProcess, env: dict[str, str] | None = None) -> None:
        """Start `node` (`env`: extra environment variables); it is stopped on exit."""
        self.nodes[node.name] = node
        self._stack.callback(node.stop)  # before the start: a no-op if it never started
        node.start(env)

    def connect(self) -> None:
        """A control client for every node (all must be ready)."""
        for name, node in self.nodes.items():
            self.clients[name] = client = node.client()
            self._stack.callback(client.close)

    def pid(self, name: str) -> int:
        process = self.nodes[name].process
        assert process is not None
        return process.pid

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(self.pid(name)) for name in self.nodes}

    def open_locks(self) -> int:
        """Thread locks the hub holds in A's and B's channels together."""
        hub = self.clients["hub"]
        return sum(
            int(hub.call("balance", user=self.dep.address(name).checksum())["open_threads"])
            for name in ("a", "b")
        )


def start_network(net: Network, root: Path, profile: Path | None, options: dict[str, Any]) -> None:
    """Start the hub, A and B in `net` (A and B under cProfile if `profile`), each with the
    config entries `options`; fund the channels."""
    dep = net.dep
    hub = NodeProcess(root, "hub", node_config(dep, "hub", **options), dep.keys["hub"])
    net.start(hub)
    hub_info = hub.wait_ready()
    for name in ("a", "b"):
        config = node_config(
            dep, "user", hub=hub_info.hub_entry, listen_port=free_port(), **options
        )
        env = {PROFILE_ENV: str(profile / f"{name}.prof")} if profile else None
        net.start(NodeProcess(root, name, config, dep.keys[name]), env)
    for name in ("a", "b"):
        net.nodes[name].wait_ready()
    net.connect()
    hub_c, a, b = net.clients["hub"], net.clients["a"], net.clients["b"]
    eventually(lambda: a.call("status")["hub_connected"], "A connected to the hub")
    eventually(lambda: b.call("status")["hub_connected"], "B connected to the hub")
    hub_c.call("deposit_reserve", amount=assets_json(RESERVE))
    a.call("deposit", amount=assets_json(DEPOSIT))
    b.call("deposit", amount=assets_json(DEPOSIT))
    hub_c.call("collateralize", user=dep.address("b").checksum(), amount=assets_json(LOCK))
    hub_c.call("collateralize", user=dep.address("a").checksum(), amount=assets_json(LOCK))


def measure_payments(net: Network, sequential: int, pipelined: int, window: int) -> dict[str, Any]:
    """Node payments A to B on a new thread (closed at the end): the figures of phase 1.

    Raises `BenchError` if `bench_pay` reports no rate."""
    a = net.clients["a"]
    key = a.call("open_thread", peer=net.dep.address("b").checksum(), lock=assets_json(LOCK))
    amount = assets_json(AMOUNT)

    def bench_pay(count: int, mode: str) -> dict[str, Any]:
        result = a.call(
            "bench_pay",
            key=key,
            count=count,
            mode=mode,
            amount=amount,
            window=window,
            time_limit=PAY_TIME_LIMIT,
        )
        if not isinstance(result, dict) or not isinstance(result.get("latencies_ms"), dict):
            raise BenchError(f"node {mode} payments: bench_pay answered {result!r}")
        rate(result, f"node {mode} payments (bench_pay)")
        return result

    bench_pay(WARMUP, "sequential")
    seq = bench_pay(sequential, "sequential")
    cpu_before = net.cpu()
    pipe = bench_pay(pipelined, "pipelined")
    cpu_after = net.cpu()
    a.call("close_thread", key=key)
    cpu = {role: cpu_after[name] - cpu_before[name] for name, role in NODES}
    return {
        "sequential_payments_per_s": seq["payments_per_s"],
        "sequential_p50_ms": seq["latencies_ms"]["p50"],
        "sequential_p99_ms": seq["latencies_ms"]["p99"],
        "pipelined_payments_per_s": pipe["payments_per_s"],
        "pipelined_p50_ms": pipe["latencies_ms"]["p50"],
        "pipelined_p99_ms": pipe["latencies_ms"]["p99"],
        "hub_cpu_s_during_pipelined": cpu["hub"],
        "payer_cpu_s_during_pipelined": cpu["payer"],
        "payee_cpu_s_during_pipelined": cpu["payee"],
    }


def checkpoint_cycles(
    client: ControlClient,
    peer: Address,
    cycles: int,
    deadline: float,
    given_up: threading.Event | None = None,
) -> tuple[list[float], list[float]]:
    """`cycles` times: open a thread to `peer`, pay once, close it; (open latencies, close
    latencies) in seconds. Raises `TimeoutError` once past `deadline` (time.monotonic),
    `BenchError` once `given_up` is set (the other pair failed)."""
    opens: list[float] = []
    closes: list[float] = []
    lock, amount = assets_json(CHECKPOINT_LOCK), assets_json(AMOUNT)
    with client:
        for i in range(cycles):
            if time.monotonic() > deadline:
                raise TimeoutError(f"checkpoints: {i} of {cycles} cycles done in the time limit")
            if given_up is not None and given_up.is_set():
                raise BenchError(f"checkpoints: given up after {i} of {cycles} cycles")
            begun = time.perf_counter()
            key = client.call("open_thread", peer=peer.checksum(), lock=lock)
            opens.append(time.perf_counter() - begun)
            client.call("pay", key=key, amount=amount)
            begun = time.perf_counter()
            client.call("close_thread", key=key)
            closes.append(time.perf_counter() - begun)
    return opens, closes


def measure_checkpoints(net: Network, cycles: int) -> dict[str, Any]:
    """Phase 2: two pairs (A to B, B to A) of `cycles` open / pay / close cycles at once."""
    eventually(lambda: net.open_locks() == 0, "the payments' thread settled in both channels")
    deadline = time.monotonic() + CHECKPOINT_TIME_LIMIT
    pairs = (("a", "b"), ("b", "a"))
    given_up = threading.Event()  # set when one pair fails: the other stops too

    def pair(sender: str, receiver: str) -> tuple[list[float], list[float]]:
        try:
            return checkpoint_cycles(
                net.nodes[sender].client(), net.dep.address(receiver), cycles, deadline, given_up
            )
        except BaseException:
            given_up.set()
            raise

    hub_cpu = cpu_seconds(net.pid("hub"))
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(pairs)) as pool:
        try:
            futures = [pool.submit(pair, sender, receiver) for sender, receiver in pairs]
            results = [future.result(timeout=CHECKPOINT_TIME_LIMIT + 60) for future in futures]
        finally:
            given_up.set()  # a no-op once both pairs are done
    while net.open_locks() > 0:  # the hub may still be settling the last closes
        if time.monotonic() > deadline:
            raise TimeoutError("checkpoints: thread locks left in the channels")
        time.sleep(0.002)
    elapsed = time.perf_counter() - started
    hub_cpu = cpu_seconds(net.pid("hub")) - hub_cpu
    opens = [t for pair_opens, _ in results for t in pair_opens]
    closes = [t for _, pair_closes in results for t in pair_closes]
    checkpoints = len(opens) + len(closes)
    return {
        "hub_checkpoints_per_s": checkpoints / elapsed,
        "checkpoint_open_p50_ms": 1000 * percentile(sorted(opens), 0.5),
        "checkpoint_close_p50_ms": 1000 * percentile(sorted(closes), 0.5),
        "hub_cpu_s_during_checkpoints": hub_cpu,
        "hub_cpu_ms_per_checkpoint": 1000 * hub_cpu / checkpoints,
    }


def measure_floor(sequential: int, pipelined: int, window: int) -> dict[str, Any]:
    """Phase 4: the floor's figures, under the names of the report. Raises `FloorError` if
    the floor fails, `BenchError` if it reports no rate."""
    floor = run_floor(sequential, pipelined, window, warmup=WARMUP, time_limit=PAY_TIME_LIMIT)
    figures: dict[str, Any] = {}
    for mode in ("sequential", "pipelined"):
        figures[f"floor_{mode}_payments_per_s"] = rate(floor[mode], f"floor {mode} payments")
        figures[f"floor_{mode}_p50_ms"] = floor[mode]["latencies_ms"]["p50"]
        figures[f"floor_{mode}_p99_ms"] = floor[mode]["latencies_ms"]["p99"]
    figures["floor_payer_cpu_s_during_pipelined"] = floor["pipelined"]["payer_cpu_s"]
    return figures


FSYNC_SAMPLES: Final = 200
FSYNC_BLOCK: Final = b"\0" * 4096


def measure_fsync(directory: Path) -> float:
    """The disk's baseline in the same run: median ms of `FSYNC_SAMPLES` rounds of writing
    4 KiB and fsyncing it, in a file in `directory` (where the node stores were)."""
    path = directory / "fsync-probe"
    samples = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(FSYNC_SAMPLES):
            start = time.perf_counter()
            os.write(fd, FSYNC_BLOCK)
            os.fsync(fd)
            samples.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return 1000 * statistics.median(samples)


def one_run(
    root: Path,
    url: str,
    args: argparse.Namespace,
    profile: Path | None,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """One run on a fresh network, then the floor: every figure of the report.

    Every node process it starts is stopped before it returns or raises."""
    dep: Deployment = trio.run(deploy, url)
    with Network(dep) as net:
        try:
            start_network(net, root, profile, node_options(args.relaxed, args.backups))
            progress("node payments")
            run = measure_payments(net, args.sequential, args.pipelined, args.window)
            progress("hub checkpoints")
            run.update(measure_checkpoints(net, args.checkpoints))
            memory = {role: memory_mb(net.pid(name)) for name, role in NODES}
            run["rss_mb"] = {role: mem["rss_mb"] for role, mem in memory.items()}
            run["peak_rss_mb"] = {role: mem["peak_mb"] for role, mem in memory.items()}
        except BaseException:
            for name, node in net.nodes.items():
                progress(f"log of {name} (last lines):")
                for line in node.log_tail(10).splitlines():
                    print(f"    {line}", file=sys.stderr)
            raise
    progress("floor")
    run.update(measure_floor(args.sequential, args.pipelined, args.window))
    run["disk_fsync_p50_ms"] = measure_fsync(root)
    for mode in ("sequential", "pipelined"):
        run[f"{mode}_ratio_to_floor"] = (
            run[f"{mode}_payments_per_s"] / run[f"floor_{mode}_payments_per_s"]
        )
    return {name: run[name] for name in FIGURES}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every figure (and of every entry of a dict of figures) over `runs`."""
    result: dict[str, Any] = {}
    for name, value in runs[0].items():
        if isinstance(value, dict):
            result[name] = median_of([run[name] for run in runs])
        else:
            result[name] = statistics.median(run[name] for run in runs)
    return result


# ---------------------------------------------------------------- profiles

# Where a profiled node's own time (cProfile tottime) goes, by the code it is spent in.
PROFILE_GROUPS = (
    ("waiting for I/O (epoll)", ("select.epoll", "_io_epoll")),
    ("SQLite (commit, fsync)", ("sqlite3",)),
    ("secp256k1 sign and recover", ("_libsecp256k1", "coincurve")),
    ("state codec (store encoding)", ("node/state_codec",)),
    ("wire codec and framing", ("protocols/wire", "msgpack", "node/peer_stream")),
    ("libp2p: yamux, noise, streams", ("libp2p/", "ChaCha20Poly1305")),
    ("sockets", ("_socket",)),
    ("protocol machines", ("protocols/",)),
    ("node engine, peers, API", ("node/",)),
    ("trio scheduling", ("trio/", "outcome", "_contextvars")),
    ("Python built-ins, dataclasses, contextlib", ("~:", "dataclasses.py", "contextlib.py")),
)


def profile_breakdown(path: Path) -> list[tuple[str, float]]:
    """(group, share of the non-waiting time) for the cProfile stats at `path`."""
    import pstats

    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    totals: dict[str, float] = {}
    for (filename, _, function), (_, _, tottime, _, _) in stats.items():
        where = f"{filename}:{function}"
        group = next(
            (name for name, marks in PROFILE_GROUPS if any(m in where for m in marks)),
            "other",
        )
        totals[group] = totals.get(group, 0.0) + tottime
    busy = sum(t for g, t in totals.items() if not g.startswith("waiting"))
    return sorted(
        ((g, t / busy) for g, t in totals.items() if not g.startswith("waiting")),
        key=lambda item: -item[1],
    )


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weft bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=3, help="fresh networks (1..10)")
    parser.add_argument("--sequential", type=int, default=1000, help="sequential payments")
    parser.add_argument("--pipelined", type=int, default=10_000, help="pipelined payments")
    parser.add_argument("--window", type=int, default=256, help="payments in flight (1..1024)")
    parser.add_argument(
        "--checkpoints", type=int, default=50, help="open/pay/close cycles per pair (1..10000)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--profile", type=Path, help="write cProfile stats of A and B here")
    parser.add_argument(
        "--relaxed", action="store_true", help="nodes with relaxed_commits (see SPEC.md)"
    )
    parser.add_argument(
        "--no-backups",
        dest="backups",
        action="store_false",
        help="nodes without gossip backups (what backups cost)",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments; `SystemExit` (2 with the usage) if they are out of range."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 10 or not 1 <= args.sequential <= 100_000:
        parser.error("--runs in 1..10, --sequential in 1..100000")
    if not 1 <= args.pipelined <= 1_000_000 or not 1 <= args.window <= 1024:
        parser.error("--pipelined in 1..1000000, --window in 1..1024")
    if not 1 <= args.checkpoints <= 10_000:
        parser.error("--checkpoints in 1..10000")
    return args


def print_report(result: dict[str, Any], profile: Path | None) -> None:
    if profile:
        for name in ("a", "b"):
            print(f"profile of {name} (share of its busy time; under cProfile):")
            for group, share in profile_breakdown(profile / f"{name}.prof"):
                print(f"  {share:6.1%}  {group}")
    r = result
    print(
        f"median of {r['runs']} runs ({r['sequential_count']:,} sequential, "
        f"{r['pipelined_count']:,} pipelined with window {r['window']}; "
        f"{r['machine']['cores']} cores, {r['machine']['cpu']}, Python {r['machine']['python']}):"
    )
    print("                      node payments/s   p50 ms   p99 ms | floor/s  p50 ms   node/floor")
    targets = {"pipelined": "target >= 2,000/s", "sequential": "target >= 300/s, p50 <= 3 ms"}
    for mode, target in targets.items():
        print(
            f"  {mode:<11} {r[f'{mode}_payments_per_s']:>17,.0f} {r[f'{mode}_p50_ms']:>8.2f}"
            f" {r[f'{mode}_p99_ms']:>8.2f} | {r[f'floor_{mode}_payments_per_s']:>7,.0f}"
            f" {r[f'floor_{mode}_p50_ms']:>7.2f}   {r[f'{mode}_ratio_to_floor']:>6.1%}  ({target})"
        )
    print(
        f"  hub checkpoints: {r['hub_checkpoints_per_s']:,.1f} opens+closes/s "
        f"({r['checkpoint_pairs']} pairs x {r['checkpoint_cycles']} cycles), open p50 "
        f"{r['checkpoint_open_p50_ms']:.1f} ms, close p50 {r['checkpoint_close_p50_ms']:.1f} ms,"
        f" hub CPU {r['hub_cpu_s_during_checkpoints']:.2f} s"
        f" ({r['hub_cpu_ms_per_checkpoint']:.2f} ms per open or close)"
    )
    print(
        f"  CPU during the pipelined payments: hub {r['hub_cpu_s_during_pipelined']:.2f} s"
        f" (target near zero), payer {r['payer_cpu_s_during_pipelined']:.2f} s,"
        f" payee {r['payee_cpu_s_during_pipelined']:.2f} s;"
        f" floor payer {r['floor_payer_cpu_s_during_pipelined']:.2f} s"
    )
    print(
        f"  disk: write 4 KiB + fsync p50 {r['disk_fsync_p50_ms']:.2f} ms"
        " (a sequential node payment waits for three)"
    )
    for role, rss in r["rss_mb"].items():
        print(f"  {role:<5} RSS {rss:.0f} MB, peak {r['peak_rss_mb'][role]:.0f} MB (target <= 150)")
    print(f"  ({r['seconds']:.0f} s in all)")


EXPECTED_FAILURES: Final = (
    BenchError,
    ChainError,  # deploying the contracts, funding the keys
    ControlError,  # a node's error answer, or a broken control connection
    FloorError,
    ProcessError,  # a node process did not come up, or exited
    TimeoutError,  # something never happened (`eventually`), a time limit passed
    RuntimeError,  # the chain server did not start
    OSError,
)
"""The failures `main` reports in one line (exit code 1); any other exception is a bug."""


def error_line(exc: BaseException) -> str:
    """`exc` in one line: its type and the first line of its message (the rest, such as a
    node's log tail, is printed before)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on `argv`; the exit code (2 for bad arguments, 1 if a run failed)."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # a usage error (2) or --help (0), already printed
        return exc.code if isinstance(exc.code, int) else 0
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
        with served_chain() as url:
            for i in range(args.runs):

                def progress(what: str, i: int = i) -> None:
                    print(f"weft bench: run {i + 1}/{args.runs}: {what}", file=sys.stderr)

                with tempfile.TemporaryDirectory(prefix="weft-bench-") as tmp:
                    profile = args.profile if args.profile and i == args.runs - 1 else None
                    run = one_run(Path(tmp), url, args, profile, progress)
                runs.append(run)
                progress(
                    f"sequential {run['sequential_payments_per_s']:,.0f}/s (p50 "
                    f"{run['sequential_p50_ms']:.2f} ms, floor "
                    f"{run['floor_sequential_payments_per_s']:,.0f}/s), pipelined "
                    f"{run['pipelined_payments_per_s']:,.0f}/s (floor "
                    f"{run['floor_pipelined_payments_per_s']:,.0f}/s), checkpoints "
                    f"{run['hub_checkpoints_per_s']:,.1f}/s"
                )
    except EXPECTED_FAILURES as exc:
        print(f"weft bench: error: {error_line(exc)}", file=sys.stderr)
        return 1
    result: dict[str, Any] = {
        **median_of(runs),
        "runs": args.runs,
        "sequential_count": args.sequential,
        "pipelined_count": args.pipelined,
        "window": args.window,
        "checkpoint_cycles": args.checkpoints,
        "checkpoint_pairs": CHECKPOINT_PAIRS,
        "relaxed": args.relaxed,
        "backups": args.backups,
        "machine": machine(),
        "seconds": round(time.monotonic() - started, 1),
        "all": runs,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_report(result, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
