"""`weft devnet demo`, run as a new user would (`python -m node.cli devnet demo ...` as a
subprocess on the embedded chain), and its check on its own.

The end-to-end tests read the devnet's pids from the demo's `devnet processes` line and,
whatever happens, stop the devnet (`weft devnet down`) and then kill any of them that still
runs its command (by pid) in a `finally`. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import devnet.demo
from devnet.demo import (
    DEMO_LOCK_FILE,
    MAX_PAYMENTS,
    PAYMENT,
    Figure,
    Outcome,
    Pair,
    Progress,
    UserResult,
    find_mismatches,
    render,
    ring,
    run,
)
from devnet.devnet import DEVNET_FILE, HUB_RESERVE, Devnet, read_devnet
from devnet.processes import REPO_ROOT, eventually
from node.cli import main
from node.control import ControlClient, assets_of
from protocols.types import Assets

DEMO_TIMEOUT = 300.0  # seconds one demo command may take, devnet start included
STOP_TIMEOUT = 120.0  # seconds an interrupted demo may take to stop its devnet and exit
MARKERS = {"chain": "devnet.chain_server"}  # every other recorded process runs node.run


def demo_argv(directory: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "node.cli", "devnet", "demo", "--dir", str(directory), *args]


DEMO_ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def run_demo(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        demo_argv(directory, *args),
        cwd=REPO_ROOT,
        env=DEMO_ENV,
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


def process_runs(pid: int, marker: str) -> bool:
    """Whether `pid` is a live (not zombie) process whose command line contains `marker`."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and marker in cmdline


def still_running(pids: dict[str, int]) -> list[str]:
    return [name for name, pid in pids.items() if process_runs(pid, marker(name))]


def kill_leftovers(pids: dict[str, int]) -> None:
    for name, pid in pids.items():
        if process_runs(pid, marker(name)):
            os.kill(pid, signal.SIGKILL)


def stop_devnet(directory: Path, pids: dict[str, int]) -> None:
    """Cleanup whatever happened: `weft devnet down`, then SIGKILL what still runs."""
    try:
        main(["devnet", "down", "--dir", str(directory)])
    finally:
        kill_leftovers(pids)


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


# ---------------------------------------------------------------- run, on a stand-in devnet


def stand_in_devnet() -> Devnet:
    """A complete record without processes (`up`, `down` and `play` are replaced)."""
    return Devnet("http://127.0.0.1:9", 0, "0x" + "11" * 20, "0x" + "22" * 20, 1, ())


@contextlib.contextmanager
def held_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def test_run_returns_1_on_a_mismatch_marks_both_users_of_a_pair_and_stops_its_devnet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "net"
    calls: list[tuple[str, Any]] = []

    def up(where: Path, nodes: int, progress: Any) -> Devnet:
        calls.append(("up", nodes))
        return stand_in_devnet()

    def fake_play(net: Devnet, payments: int, progress: Progress, stop: threading.Event) -> Outcome:
        users = ("u1", "u2", "u3")
        pairs = ring(users)
        expected: dict[Figure, Assets] = {
            **{(p.label, "final balance of the receiver"): p.amount for p in pairs},
            **{(u, "channel balance"): Assets(5, 5) for u in users},
        }
        receiver = ("u1->u2", "final balance of the receiver")
        observed = {**expected, receiver: Assets(PAYMENT.eth, PAYMENT.token - 1)}
        results = tuple(UserResult(u, PAYMENT, PAYMENT, PAYMENT, PAYMENT) for u in users)
        return Outcome(results, tuple(pairs), payments, 1.0, expected, observed)

    monkeypatch.setattr(devnet.demo, "read_devnet", lambda where: None)
    monkeypatch.setattr(devnet.demo, "up", up)
    monkeypatch.setattr(devnet.demo, "down", lambda where: calls.append(("down", where)))
    monkeypatch.setattr(devnet.demo, "play", fake_play)
    out, err = io.StringIO(), io.StringIO()
    assert run(directory, nodes=3, payments=7, out=out, err=err) == 1, err.getvalue()
    text = out.getvalue()
    assert [line for line in text.splitlines() if line.startswith("MISMATCH")] == [
        "MISMATCH: u1->u2 final balance of the receiver: expected 0.001 ETH + 1 WTT, observed "
        "0.001 ETH + 0.999999999999999999 WTT (token off by -1 base units)"
    ]
    assert summary_rows(text) == {"u1": "MISMATCH", "u2": "MISMATCH", "u3": "OK"}, text
    assert "1 differ" in text and "elapsed: " in text
    assert calls == [("up", 3), ("down", directory)]  # the devnet it started is stopped
    assert f"stopping the devnet in {directory}" in err.getvalue()


def test_a_second_demo_on_the_same_devnet_is_refused_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "net"
    directory.mkdir()
    monkeypatch.setattr(devnet.demo, "read_devnet", lambda where: stand_in_devnet())
    monkeypatch.setattr(devnet.demo, "up", lambda *args: pytest.fail("up called"))
    monkeypatch.setattr(devnet.demo, "down", lambda *args: pytest.fail("down called"))
    err = io.StringIO()
    with held_lock(directory / DEMO_LOCK_FILE):  # as a first demo holds it
        started = time.monotonic()
        assert run(directory, out=io.StringIO(), err=err) == 2
        assert time.monotonic() - started < 5
    assert err.getvalue().splitlines() == [
        f"weft demo: error: another weft devnet demo is running on {directory}"
    ]


def test_an_incomplete_devnet_is_refused_with_the_command_that_stops_it(tmp_path: Path) -> None:
    directory = tmp_path / "net"
    directory.mkdir()
    record = Devnet("", 0, "", "", 0, (), complete=False)  # as `up` first writes it
    (directory / DEVNET_FILE).write_text(json.dumps(record.to_json()))
    out, err = io.StringIO(), io.StringIO()
    assert run(directory, out=out, err=err) == 2
    lines = err.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert "is incomplete" in lines[0] and f"run 'weft devnet down --dir {directory}'" in lines[0]
    assert out.getvalue() == ""
    assert (directory / DEVNET_FILE).exists()  # left for `down`


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
        assert still_running(pids) == []
        assert processes_naming(directory) == []
        assert not (directory / "devnet.json").exists()
    finally:
        stop_devnet(directory, pids)


def test_sigterm_during_the_payments_stops_the_devnet_the_demo_started(tmp_path: Path) -> None:
    directory = tmp_path / "net"
    pids: dict[str, int] = {}
    lines: list[str] = []
    process = subprocess.Popen(
        demo_argv(directory, "--nodes", "2", "--payments", str(MAX_PAYMENTS)),
        cwd=REPO_ROOT,
        env=DEMO_ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        eventually(
            lambda: (
                process.poll() is not None
                or any(line.startswith("weft demo: paying:") for line in lines)
            ),
            "the demo paying",
            DEMO_TIMEOUT,
        )
        assert process.poll() is None, "".join(lines)
        process.send_signal(signal.SIGTERM)
        assert process.wait(STOP_TIMEOUT) == 130, "".join(lines)
        reader.join(10)
        stderr = "".join(lines)
        pids = demo_pids(stderr)
        assert set(pids) == {"hub", "u1", "u2", "chain"}
        assert "weft demo: interrupted\n" in stderr and "weft demo: stopping the devnet" in stderr
        assert "Traceback" not in stderr, stderr
        assert still_running(pids) == []
        assert processes_naming(directory) == []
        assert not (directory / DEVNET_FILE).exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        stop_devnet(directory, pids)


def hub_reserve(directory: Path) -> Assets:
    net = read_devnet(directory)
    assert net is not None
    hub = next(n for n in net.nodes if n.role == "hub")
    with ControlClient.from_data_dir(Path(hub.data_dir), timeout=30) as client:
        return assets_of(client.call("reserve"))


def test_demo_twice_on_a_kept_devnet_then_a_wrong_balance_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "net"
    pids: dict[str, int] = {}
    try:
        first = run_demo(directory, "--nodes", "2", "--payments", "20", "--keep")
        pids = demo_pids(first.stderr)
        assert first.returncode == 0, first.stdout + first.stderr
        assert summary_rows(first.stdout) == {"u1": "OK", "u2": "OK"}, first.stdout
        assert still_running(pids) == list(pids)

        # Again on the same devnet: new threads, new withdrawal addresses, deltas checked.
        second = run_demo(directory, "--payments", "20", "--keep")
        assert second.returncode == 0, second.stdout + second.stderr
        assert "using the devnet in" in second.stderr
        assert demo_pids(second.stderr) == pids
        assert summary_rows(second.stdout) == {"u1": "OK", "u2": "OK"}, second.stdout

        # The hub reclaimed the collateral each demo added: its reserve is whole again.
        assert hub_reserve(directory) == HUB_RESERVE

        # A third run in this process, whose figures all agree, until one is off by a wei:
        # exit 1, and the devnet (not started by this demo) keeps running.
        real_play = devnet.demo.play
        seen: list[list[str]] = []

        def off_by_one_wei(*args: Any) -> Outcome:
            outcome = real_play(*args)
            seen.append(find_mismatches(outcome.expected, outcome.observed))
            onchain = next(f for f in outcome.observed if f[0] == "u1" and "on-chain" in f[1])
            wrong = outcome.observed[onchain]
            observed = {**outcome.observed, onchain: Assets(wrong.eth + 1, wrong.token)}
            return replace(outcome, observed=observed)

        monkeypatch.setattr(devnet.demo, "play", off_by_one_wei)
        out, err = io.StringIO(), io.StringIO()
        assert run(directory, payments=5, out=out, err=err) == 1, out.getvalue() + err.getvalue()
        assert seen == [[]]  # before the change, every figure agreed
        mismatches = [line for line in out.getvalue().splitlines() if "MISMATCH:" in line]
        assert len(mismatches) == 1, mismatches
        assert mismatches[0].startswith("MISMATCH: u1 on-chain at 0x")
        assert mismatches[0].endswith("(ETH off by +1 wei)")
        assert summary_rows(out.getvalue()) == {"u1": "MISMATCH", "u2": "OK"}
        assert still_running(pids) == list(pids)
        assert hub_reserve(directory) == HUB_RESERVE

        # A devnet that is not fully alive is refused with one line.
        os.kill(pids["u2"], signal.SIGKILL)
        eventually(lambda: not process_runs(pids["u2"], "node.run"), "u2 gone")
        refused = run_demo(directory)
        assert refused.returncode == 2
        error = [line for line in refused.stderr.splitlines() if "error" in line]
        assert len(error) == 1 and f"weft devnet down --dir {directory}" in error[0], error
        assert "Traceback" not in refused.stderr

        assert main(["devnet", "down", "--dir", str(directory)]) == 0
        assert still_running(pids) == []
    finally:
        stop_devnet(directory, pids)
