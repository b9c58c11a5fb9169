"""Benchmark thread payments between two node processes over libp2p with durable storage.

    python -m devnet.bench_node [--runs 3] [--sequential 1000] [--pipelined 10000]
                                [--window 256] [--json] [--profile DIR]

Each run starts its own network: the embedded chain served by `devnet.chain_server`, and a
hub and two users, each `python -m node.run` (libp2p on 127.0.0.1, SQLite in WAL mode with
`synchronous=FULL`). User A deposits, the hub collateralizes B, A opens a thread to B; then,
inside A's process (`bench_pay` over the control interface, so the control round trip is
not counted):

- sequential: one payment in flight; each payment's latency from `pay` to the
  countersignature A stored;
- pipelined: up to `--window` payments in flight.

The hub's CPU time (user + system, from /proc) is read before and after the pipelined
payments: it takes part only in the thread's open and close. Resident memory (VmRSS now,
VmHWM peak) of each node process is read at the end. The figures printed are medians over
the runs. `--profile DIR` runs A and B under cProfile and writes `a.prof` and `b.prof` of the
last run there (profiling slows them down: use it to see where the time goes, not for the
rates). Targets (issue 4): pipelined >= 2,000/s; sequential >= 300/s with p50 <= 3 ms; hub
CPU near zero; RSS <= 150 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from devnet.deploy import ETHER
from devnet.processes import (
    Deployment,
    NodeProcess,
    deploy,
    eventually,
    free_port,
    node_config,
    served_chain,
)
from node.control import assets_json
from node.run import PROFILE_ENV
from protocols.types import Assets

RESERVE = Assets(500 * ETHER, 10**22)
DEPOSIT = Assets(50 * ETHER, 10**21)
LOCK = Assets(10 * ETHER, 10**20)
AMOUNT = Assets(1_000_000, 1)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
QUIET: dict[str, Any] = {"poll_interval": 0.5}


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


def one_run(
    root: Path, url: str, sequential: int, pipelined: int, window: int, profile: Path | None
) -> dict[str, Any]:
    dep: Deployment = trio.run(deploy, url)
    nodes: list[NodeProcess] = []
    try:
        # The chain matters only to set the thread up: poll it rarely, to keep the noise of
        # three pollers off a small machine while the payments are measured.
        hub = NodeProcess(root, "hub", node_config(dep, "hub", **QUIET), dep.keys["hub"])
        nodes.append(hub)
        hub.start()
        hub_info = hub.wait_ready()
        users = {}
        for name in ("a", "b"):
            config = node_config(
                dep, "user", hub=hub_info.hub_entry, listen_port=free_port(), **QUIET
            )
            users[name] = NodeProcess(root, name, config, dep.keys[name])
            nodes.append(users[name])
            env = {PROFILE_ENV: str(profile / f"{name}.prof")} if profile else None
            users[name].start(env)
        for node in users.values():
            node.wait_ready()
        hub_c, a, b = hub.client(), users["a"].client(), users["b"].client()
        eventually(lambda: a.call("status")["hub_connected"], "A connected to the hub")
        eventually(lambda: b.call("status")["hub_connected"], "B connected to the hub")
        hub_c.call("deposit_reserve", amount=assets_json(RESERVE))
        a.call("deposit", amount=assets_json(DEPOSIT))
        hub_c.call("collateralize", user=dep.address("b").checksum(), amount=assets_json(LOCK))
        key = a.call("open_thread", peer=dep.address("b").checksum(), lock=assets_json(LOCK))
        amount = assets_json(AMOUNT)
        a.call("bench_pay", key=key, count=200, mode="sequential", amount=amount)  # warm-up
        seq = a.call("bench_pay", key=key, count=sequential, mode="sequential", amount=amount)
        assert hub.process is not None
        hub_cpu = cpu_seconds(hub.process.pid)
        payer_cpu = cpu_seconds(users["a"].process.pid)  # type: ignore[union-attr]
        payee_cpu = cpu_seconds(users["b"].process.pid)  # type: ignore[union-attr]
        pipe = a.call(
            "bench_pay", key=key, count=pipelined, mode="pipelined", amount=amount, window=window
        )
        hub_cpu = cpu_seconds(hub.process.pid) - hub_cpu
        payer_cpu = cpu_seconds(users["a"].process.pid) - payer_cpu  # type: ignore[union-attr]
        payee_cpu = cpu_seconds(users["b"].process.pid) - payee_cpu  # type: ignore[union-attr]
        memory = {
            name: memory_mb(node.process.pid)  # type: ignore[union-attr]
            for name, node in (("hub", hub), *users.items())
        }
        a.call("close_thread", key=key)
        for client in (hub_c, a, b):
            client.close()
        return {
            "sequential_payments_per_s": seq["payments_per_s"],
            "sequential_p50_ms": seq["latencies_ms"]["p50"],
            "sequential_p99_ms": seq["latencies_ms"]["p99"],
            "pipelined_payments_per_s": pipe["payments_per_s"],
            "pipelined_count": pipe["count"],
            "hub_cpu_s_during_pipelined": hub_cpu,
            "payer_cpu_s_during_pipelined": payer_cpu,
            "payee_cpu_s_during_pipelined": payee_cpu,
            "memory": memory,
        }
    finally:
        for node in reversed(nodes):
            node.stop()


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


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in runs[0].items():
        if isinstance(value, dict):
            result[name] = median_of([run[name] for run in runs])
        else:
            result[name] = statistics.median(run[name] for run in runs)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devnet.bench_node", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sequential", type=int, default=1000, help="sequential payments")
    parser.add_argument("--pipelined", type=int, default=10_000, help="pipelined payments")
    parser.add_argument("--window", type=int, default=256, help="payments in flight")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--profile", type=Path, help="write cProfile stats of A and B here")
    parser.add_argument(
        "--relaxed", action="store_true", help="nodes with relaxed_commits (see SPEC.md)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 10 or not 1 <= args.sequential <= 100_000:
        parser.error("--runs in 1..10, --sequential in 1..100000")
    if not 1 <= args.pipelined <= 1_000_000 or not 1 <= args.window <= 1024:
        parser.error("--pipelined in 1..1000000, --window in 1..1024")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    if args.relaxed:
        QUIET["relaxed_commits"] = True
    runs = []
    started = time.monotonic()
    with served_chain() as url:
        for i in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="weft-bench-") as tmp:
                profile = args.profile if args.profile and i == args.runs - 1 else None
                run = one_run(Path(tmp), url, args.sequential, args.pipelined, args.window, profile)
            runs.append(run)
            if not args.json:
                print(
                    f"run {i + 1}/{args.runs}: sequential {run['sequential_payments_per_s']:,.0f}/s"
                    f" (p50 {run['sequential_p50_ms']:.2f} ms), pipelined "
                    f"{run['pipelined_payments_per_s']:,.0f}/s, hub CPU "
                    f"{run['hub_cpu_s_during_pipelined']:.2f} s",
                    file=sys.stderr,
                )
    result = {"runs": args.runs, "median": median_of(runs), "all": runs}
    result["seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    if args.profile:
        for name in ("a", "b"):
            print(f"profile of {name} (share of its busy time; under cProfile):")
            for group, share in profile_breakdown(args.profile / f"{name}.prof"):
                print(f"  {share:6.1%}  {group}")
    m = result["median"]
    print(f"median of {args.runs} runs ({args.pipelined:,} pipelined, window {args.window}):")
    print(f"  pipelined   {m['pipelined_payments_per_s']:>10,.0f} payments/s   (target >= 2,000)")
    print(
        f"  sequential  {m['sequential_payments_per_s']:>10,.0f} payments/s   (target >= 300),"
        f" p50 {m['sequential_p50_ms']:.2f} ms (target <= 3), p99 {m['sequential_p99_ms']:.2f} ms"
    )
    print(
        f"  CPU during the pipelined payments: hub {m['hub_cpu_s_during_pipelined']:.2f} s,"
        f" payer {m['payer_cpu_s_during_pipelined']:.2f} s,"
        f" payee {m['payee_cpu_s_during_pipelined']:.2f} s"
    )
    for name, mem in m["memory"].items():
        print(
            f"  {name:<4} RSS {mem['rss_mb']:.0f} MB, peak {mem['peak_mb']:.0f} MB (target <= 150)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
