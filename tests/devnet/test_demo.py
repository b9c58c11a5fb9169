"""`weft devnet demo`, run as a new user would (`python -m node.cli devnet demo ...` as a
subprocess on the embedded chain), and its check on its own.

The end-to-end tests read the devnet's pids from the demo's `devnet processes` line and,
whatever happens, kill any of them that still runs its recorded command (by pid) in a
`finally`. Every wait is bounded.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

from devnet.demo import (
    PAYMENT,
    Figure,
    Outcome,
    Pair,
    Progress,
    UserResult,
    find_mismatches,
    play,
    render,
    ring,
)
from devnet.devnet import process_runs, read_devnet
from devnet.processes import REPO_ROOT, eventually
from node.cli import main
from protocols.types import Assets

DEMO_TIMEOUT = 300.0  # seconds one demo command may take, devnet start included
MARKERS = {"chain": "devnet.chain_server"}  # every other recorded process runs node.run


def run_demo(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "devnet", "demo", "--dir", str(directory), *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
    )


def demo_pids(stderr: str) -> dict[str, int]:
    """The devnet's processes by name, from the demo's progress line."""
    found = re.search(r"^weft demo: devnet processes \(name pid\): (.*)$", stderr, re.M)
    assert found, stderr
    return {name: int(pid) for name, pid in (e.split() for e in found.group(1).split(", "))}


def marker(name: str) -> str:
    return MARKERS.get(name, "node.run")


def kill_leftovers(pids: dict[str, int]) -> None:
    for name, pid in pids.items():
        if process_runs(pid, marker(name)):
            os.kill(pid, signal.SIGKILL)


def processes_naming(directory: Path) -> list[int]:
    """Pids of live processes whose command line contains `directory`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(directory) in cmdline and int(entry.name) != os.getpid():
                found.append(int(entry.name))
    return found


def summary_rows(stdout: str) -> dict[str, str]:
    """User name -> RESULT column of the demo's table."""
    return {
        line.split()[0]: line.split()[-1]
        for line in stdout.splitlines()
        if re.match(r"^u[0-9]+ ", line)
    }


# ---------------------------------------------------------------- the check on its own


def outcome_of(expected: dict[Figure, Assets], observed: dict[Figure, Assets]) -> Outcome:
    users = tuple(
        UserResult(name, Assets(1, 1), Assets(2, 2), Assets(3, 3), Assets(3, 3))
        for name in ("u1", "u2")
    )
    return Outcome(users, tuple(ring(["u1", "u2"])), 10, 1.0, expected, observed)


def test_the_check_reports_a_balance_off_by_one_wei() -> None:
    expected = {
        ("u1", "on-chain at 0xabc"): Assets(2 * 10**18, 7),
        ("u2", "on-chain at 0xdef"): Assets(10**18, 5),
        ("contract", "balance"): Assets(3 * 10**18, 0),
    }
    assert find_mismatches(expected, dict(expected)) == []

    observed = {**expected, ("u2", "on-chain at 0xdef"): Assets(10**18 - 1, 5)}
    lines = find_mismatches(expected, observed)
    assert lines == [
        "u2 on-chain at 0xdef: expected 1 ETH + 0.000000000000000005 WTT, observed "
        "0.999999999999999999 ETH + 0.000000000000000005 WTT (ETH off by -1 wei)"
    ]
    text = render(outcome_of(expected, observed), lines)
    assert summary_rows(text) == {"u1": "OK", "u2": "MISMATCH"}
    assert "MISMATCH: u2 on-chain at 0xdef" in text

    # A missing figure, an unexpected one, and a token difference are reported too.
    del observed[("contract", "balance")]
    observed[("u1", "on-chain at 0xabc")] = Assets(2 * 10**18, 8)
    observed[("hub", "reserve")] = Assets(0, 0)
    lines = find_mismatches(expected, observed)
    assert len(lines) == 4, lines
    assert "u1 on-chain at 0xabc: " in lines[0] and "(token off by +1 base units)" in lines[0]
    assert lines[2] == "contract balance: expected 3 ETH + 0 WTT, not observed"
    assert lines[3] == "hub reserve: observed, but nothing was expected"


def test_the_ring_has_every_user_pay_and_be_paid() -> None:
    assert ring(["u1", "u2"]) == [
        Pair("u1", "u2", PAYMENT),
        Pair("u2", "u1", Assets(2 * PAYMENT.eth, 2 * PAYMENT.token)),
    ]
    pairs = ring([f"u{i}" for i in range(1, 6)])
    assert [p.label for p in pairs] == ["u1->u2", "u2->u3", "u3->u4", "u4->u5", "u5->u1"]
    assert [p.amount.token // PAYMENT.token for p in pairs] == [1, 2, 3, 4, 1]


# ---------------------------------------------------------------- the demo, end to end


def test_demo_starts_a_devnet_pays_checks_and_stops_it(tmp_path: Path) -> None:
    directory = tmp_path / "net"
    pids: dict[str, int] = {}
    try:
        result = run_demo(directory, "--nodes", "3", "--payments", "50")
        pids = demo_pids(result.stderr)
        assert result.returncode == 0, result.stdout + result.stderr
        assert summary_rows(result.stdout) == {"u1": "OK", "u2": "OK", "u3": "OK"}, result.stdout
        assert "MISMATCH" not in result.stdout and "Traceback" not in result.stderr
        assert "150 payments in " in result.stdout and "elapsed: " in result.stdout
        assert set(pids) == {"hub", "u1", "u2", "u3", "chain"}
        # Stopped: no recorded process runs, no process names the directory, no record.
        assert [n for n, pid in pids.items() if process_runs(pid, marker(n))] == []
        assert processes_naming(directory) == []
        assert not (directory / "devnet.json").exists()
    finally:
        kill_leftovers(pids)


def test_demo_twice_on_a_kept_devnet_then_a_wrong_balance_is_caught(tmp_path: Path) -> None:
    directory = tmp_path / "net"
    pids: dict[str, int] = {}
    try:
        first = run_demo(directory, "--nodes", "2", "--payments", "20", "--keep")
        pids = demo_pids(first.stderr)
        assert first.returncode == 0, first.stdout + first.stderr
        assert summary_rows(first.stdout) == {"u1": "OK", "u2": "OK"}, first.stdout
        assert all(process_runs(pid, marker(n)) for n, pid in pids.items())

        # Again on the same devnet: new threads, new withdrawal addresses, deltas checked.
        second = run_demo(directory, "--payments", "20", "--keep")
        assert second.returncode == 0, second.stdout + second.stderr
        assert "using the devnet in" in second.stderr
        assert demo_pids(second.stderr) == pids
        assert summary_rows(second.stdout) == {"u1": "OK", "u2": "OK"}, second.stdout

        # A third run in this process, whose figures all agree, until one is off by a wei.
        net = read_devnet(directory)
        assert net is not None
        outcome = play(net, 5, Progress(io.StringIO()), threading.Event())
        assert find_mismatches(outcome.expected, outcome.observed) == []
        onchain = next(f for f in outcome.observed if f[0] == "u1" and "on-chain" in f[1])
        wrong = outcome.observed[onchain]
        bad = replace(
            outcome, observed={**outcome.observed, onchain: Assets(wrong.eth + 1, wrong.token)}
        )
        lines = find_mismatches(bad.expected, bad.observed)
        assert len(lines) == 1 and lines[0].startswith("u1 on-chain at 0x"), lines
        assert lines[0].endswith("(ETH off by +1 wei)")
        assert summary_rows(render(bad, lines)) == {"u1": "MISMATCH", "u2": "OK"}

        # A devnet that is not fully alive is refused with one line.
        os.kill(pids["u2"], signal.SIGKILL)
        eventually(lambda: not process_runs(pids["u2"], "node.run"), "u2 gone")
        refused = run_demo(directory)
        assert refused.returncode == 2
        error = [line for line in refused.stderr.splitlines() if "error" in line]
        assert len(error) == 1 and f"weft devnet down --dir {directory}" in error[0], error
        assert "Traceback" not in refused.stderr

        assert main(["devnet", "down", "--dir", str(directory)]) == 0
        assert [n for n, pid in pids.items() if process_runs(pid, marker(n))] == []
    finally:
        try:
            main(["devnet", "down", "--dir", str(directory)])
        finally:
            kill_leftovers(pids)
