"""`weft deposit|withdraw|open-thread|pay|close-thread|balance|threads` against a devnet of
real node processes, driven through `node.cli.main`.

Every wait is bounded (no timing assertions); the `finally` calls `devnet down` and, as a
last resort, kills any recorded pid that still runs its recorded command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from devnet.deploy import ETHER
from devnet.devnet import Devnet, process_runs, read_devnet
from devnet.processes import REPO_ROOT, eventually, stop_process
from node.cli import main
from node.commands import format_thread, parse_thread
from node.control import ControlClient, assets_json
from protocols.types import Assets

DEPOSIT = Assets(2 * ETHER, 2 * 10**21)
LOCK = Assets(ETHER // 2, 5 * 10**20)
CALL_GUARD = 90.0


def recorded_pids(directory: Path) -> list[tuple[int, str]]:
    try:
        raw = json.loads((directory / "devnet.json").read_text())
    except (OSError, ValueError):
        return []
    return [(pid, marker) for _, pid, marker in Devnet.from_json(raw).processes()]


def kill_leftovers(recorded: list[tuple[int, str]]) -> None:
    for pid, marker in recorded:
        if process_runs(pid, marker):
            os.kill(pid, signal.SIGKILL)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """`weft argv` must succeed without stderr output; returns its stdout."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""
    return out


def fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """`weft argv` must fail with exit code 2 and one line on stderr; returns that line."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("weft: error: ")
    return err


def restart_node(node_dir: Path) -> subprocess.Popen[bytes]:
    """Start the devnet node in `node_dir` again (`config.json`, log to `node.log`)."""
    with (node_dir / "node.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "node.run", "--config", str(node_dir / "config.json")],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def test_node_commands_on_a_devnet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "net"
    recorded: list[tuple[int, str]] = []
    restarted: subprocess.Popen[bytes] | None = None
    try:
        assert main(["devnet", "up", "--nodes", "2", "--dir", str(directory)]) == 0
        capsys.readouterr()
        devnet = read_devnet(directory)
        assert devnet is not None
        recorded = [(pid, marker) for _, pid, marker in devnet.processes()]
        hub, u1, u2 = devnet.nodes
        at_u1 = ("--node", u1.data_dir)  # by data directory
        at_u2 = ("--devnet", str(directory), "--name", "u2")  # by devnet name

        out = run(capsys, "deposit", str(DEPOSIT.eth), str(DEPOSIT.token), *at_u1)
        assert out == f"deposited {DEPOSIT.eth} wei + {DEPOSIT.token} token\n"
        run(capsys, "deposit", str(DEPOSIT.eth), str(DEPOSIT.token), *at_u2)
        with ControlClient.from_data_dir(hub.data_dir, timeout=CALL_GUARD) as client:
            for user in (u1, u2):
                client.call("collateralize", user=user.address, amount=assets_json(LOCK))

        out = run(capsys, "open-thread", u2.address, str(LOCK.eth), str(LOCK.token), *at_u1)
        thread = out.strip()
        assert len(out.splitlines()) == 1
        key = parse_thread(thread)
        assert key["sender"].lower() == u1.address.lower()
        assert key["receiver"].lower() == u2.address.lower()

        for n in range(1, 4):
            out = run(capsys, "pay", thread, "1000", "7", *at_u1)
            assert out == f"paid 1000 wei + 7 token (thread tx_count {n})\n"

        out = run(capsys, "balance", *at_u1)
        assert "open threads 1" in out and len(out.splitlines()) == 1
        # The hub has no channel of its own: its reserve and how many channels it holds,
        # or, with --user, that user's channel.
        at_hub = ("--devnet", str(directory), "--name", "hub")
        out = run(capsys, "balance", *at_hub)
        assert out.startswith("hub reserve ") and out.endswith(", channels 2\n")
        out = run(capsys, "balance", "--user", u1.address, *at_hub)
        assert out.startswith(f"user {DEPOSIT.eth - LOCK.eth} wei + {DEPOSIT.token - LOCK.token}")
        out = run(capsys, "threads", *at_u1)
        header, row = out.splitlines()
        assert header.split()[0] == "THREAD"
        cells = row.split()
        assert cells[0] == thread
        assert cells[2] == f"{LOCK.eth - 3000}/{LOCK.token - 21}"
        assert cells[4] == "3"

        # More than the thread holds: the node's typed error, one line, exit 2.
        err = fails(capsys, "pay", thread, str(LOCK.eth), *at_u1)
        assert "InsufficientBalance" in err

        out = run(capsys, "close-thread", thread, *at_u1)
        assert out.startswith(f"closed {thread} at tx_count 3: ")
        assert out.endswith("receiver 3000 wei + 21 token\n")
        eventually(
            lambda: "open threads 0" in run(capsys, "balance", *at_u2), "u2's thread settled"
        )
        out = run(capsys, "balance", *at_u2)
        assert out.startswith(f"user {DEPOSIT.eth + 3000} wei + {DEPOSIT.token + 21} token")

        out = run(capsys, "withdraw", str(ETHER), "0", "--to", u1.address, *at_u1)
        assert out == f"withdrew {ETHER} wei + 0 token to {u1.address}\n"

        # No node there, or no such node: one line, exit 2.
        err = fails(capsys, "balance", "--node", str(tmp_path / "nowhere"))
        assert "no node running at" in err
        err = fails(capsys, "threads", "--devnet", str(directory), "--name", "u9")
        assert "no node 'u9'" in err
        err = fails(capsys, "pay", "not-a-thread", "1", *at_u1)
        assert "sender:receiver:id" in err

        # A thread where both lock (--peer-lock) and both pay, then closed with --force by
        # the receiver while the sender's node is stopped. The force close does not wait
        # for the peer (the thread is final at once); the hub settles it in the sender's
        # channel first, so the command returns once the sender's node is back.
        peer_lock = ("--peer-lock", "500", "5")
        out = run(capsys, "open-thread", u1.address, "1000", "10", *peer_lock, *at_u2)
        back = out.strip()
        assert parse_thread(back)["sender"].lower() == u2.address.lower()
        run(capsys, "pay", back, "100", "1", *at_u1)  # the receiver pays from its peer lock
        run(capsys, "pay", back, "200", "3", *at_u2)
        row = next(r for r in run(capsys, "threads", *at_u1).splitlines() if r.startswith(back))
        assert row.split()[1:5] == ["open", "600/7", "900/8", "2"]
        assert process_runs(u2.pid, "node.run")
        os.kill(u2.pid, signal.SIGTERM)
        eventually(lambda: not process_runs(u2.pid, "node.run"), "u2 stopped")
        closed: list[int] = []
        closing = threading.Thread(
            target=lambda: closed.append(main(["close-thread", back, "--force", *at_u1])),
            daemon=True,  # a failed assertion below must not keep pytest waiting on it
        )
        closing.start()
        with ControlClient.from_data_dir(Path(u1.data_dir), timeout=CALL_GUARD) as client:
            eventually(
                lambda: any(
                    t["phase"] == "final" and format_thread(t["key"]) == back
                    for t in client.call("threads")
                ),
                "u1's thread final without u2",
            )
        assert closing.is_alive()  # the hub waits for u2 to settle its channel first
        restarted = restart_node(Path(u1.data_dir).parents[1] / "u2")
        closing.join(CALL_GUARD)
        assert not closing.is_alive() and closed == [0]
        out, err = capsys.readouterr()
        assert err == ""
        assert out == (
            f"closed {back} at tx_count 2: sender 900 wei + 8 token, receiver 600 wei + 7 token\n"
        )
        err = fails(capsys, "pay", back, "1", *at_u1)
        assert "ThreadClosing" in err

        assert main(["devnet", "down", "--dir", str(directory)]) == 0
        capsys.readouterr()
        # The data directory is still there but its node is gone.
        err = fails(capsys, "balance", *at_u1)
        assert "no node running at" in err
    finally:
        recorded = recorded or recorded_pids(directory)
        try:
            main(["devnet", "down", "--dir", str(directory)])
        finally:
            kill_leftovers(recorded)
            if restarted is not None:
                stop_process(restarted)
