"""`weft devnet up|status|down`: a devnet of detached OS processes, driven through
`node.cli.main`, used for a payment, then stopped by exactly its recorded pids.

Every wait is bounded (no timing assertions); the `finally` calls `down` and, as a last
resort, kills any recorded pid that still runs its recorded command.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from devnet.deploy import ETHER
from devnet.devnet import Devnet, process_runs, read_devnet
from devnet.processes import eventually
from node.cli import main
from node.control import ControlClient, assets_json, assets_of
from protocols.types import Assets

DEPOSIT = Assets(2 * ETHER, 2 * 10**21)
LOCK = Assets(ETHER // 2, 5 * 10**20)
CALL_GUARD = 90.0


def recorded_pids(directory: Path) -> list[tuple[int, str]]:
    try:
        raw = json.loads((directory / "devnet.json").read_text())
    except (OSError, ValueError):
        return []
    devnet = Devnet.from_json(raw)
    return [(pid, marker) for _, pid, marker in devnet.processes()]


def kill_leftovers(recorded: list[tuple[int, str]]) -> None:
    for pid, marker in recorded:
        if process_runs(pid, marker):
            os.kill(pid, signal.SIGKILL)


def test_devnet_up_status_pay_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "net"
    recorded: list[tuple[int, str]] = []
    clients: list[ControlClient] = []
    try:
        assert main(["devnet", "up", "--nodes", "2", "--dir", str(directory)]) == 0
        out, err = capsys.readouterr()
        devnet = read_devnet(directory)
        assert devnet is not None
        recorded = [(pid, marker) for _, pid, marker in devnet.processes()]
        assert [n.name for n in devnet.nodes] == ["hub", "u1", "u2"]
        assert "starting the chain server" in err
        assert devnet.chain_url in out
        for node in devnet.nodes:
            assert f" {node.pid} " in out and node.address in out

        # A second `up` on a running devnet is refused with one line, and changes nothing.
        assert main(["devnet", "up", "--dir", str(directory)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "already holds a running devnet" in err
        assert read_devnet(directory) == devnet

        assert main(["devnet", "status", "--dir", str(directory)]) == 0
        out = capsys.readouterr().out
        rows = {line.split()[0]: line.split() for line in out.splitlines()[1:4]}
        assert set(rows) == {"hub", "u1", "u2"}
        assert all(row[2] == "up" for row in rows.values()), out

        # A payment through the devnet's nodes.
        hub, u1, u2 = (
            ControlClient.from_data_dir(n.data_dir, timeout=CALL_GUARD) for n in devnet.nodes
        )
        clients = [hub, u1, u2]
        users = {n.name: n.address for n in devnet.nodes}
        for name, user in (("u1", u1), ("u2", u2)):
            user.call("deposit", amount=assets_json(DEPOSIT))
            added = hub.call("collateralize", user=users[name], amount=assets_json(LOCK))
            assert assets_of(added).covers(LOCK)
        key = u1.call(
            "open_thread",
            peer=users["u2"],
            lock=assets_json(LOCK),
            peer_lock=assets_json(LOCK),
        )
        paid = Assets(1000, 7)
        assert u1.call("pay", key=key, amount=assets_json(paid)) == 1
        final = u1.call("close_thread", key=key)
        assert assets_of(final["balance_receiver"]) == LOCK + paid
        eventually(lambda: u2.call("balance")["open_threads"] == 0, "u2's thread settled")
        assert assets_of(u2.call("balance")["user"]) == DEPOSIT + paid
        for client in clients:
            client.close()

        assert main(["devnet", "down", "--dir", str(directory)]) == 0
        out = capsys.readouterr().out
        for name, pid, _ in devnet.processes():
            assert f"{name} (pid {pid}): " in out
        for pid, marker in recorded:
            assert not process_runs(pid, marker)
        assert not (directory / "devnet.json").exists()

        # Nothing left: a second `down` says so and succeeds; `status` finds no devnet.
        assert main(["devnet", "down", "--dir", str(directory)]) == 0
        assert "nothing running" in capsys.readouterr().out
        assert main(["devnet", "status", "--dir", str(directory)]) == 0
        assert "no devnet" in capsys.readouterr().out
    finally:
        for client in clients:
            client.close()
        recorded = recorded or recorded_pids(directory)
        try:
            main(["devnet", "down", "--dir", str(directory)])
        finally:
            kill_leftovers(recorded)


def test_status_shows_a_dead_node_as_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "net"
    recorded: list[tuple[int, str]] = []
    try:
        assert main(["devnet", "up", "--nodes", "1", "--dir", str(directory)]) == 0
        devnet = read_devnet(directory)
        assert devnet is not None
        recorded = [(pid, marker) for _, pid, marker in devnet.processes()]
        user = devnet.nodes[1]
        os.kill(user.pid, signal.SIGKILL)
        eventually(lambda: not process_runs(user.pid, "node.run"), "u1 gone")
        capsys.readouterr()
        assert main(["devnet", "status", "--dir", str(directory)]) == 0
        out, err = capsys.readouterr()
        rows = {line.split()[0]: line.split() for line in out.splitlines()[1:3]}
        assert rows["hub"][2] == "up" and rows["u1"][2] == "down", out
        assert "Traceback" not in err
        assert main(["devnet", "down", "--dir", str(directory)]) == 0
        out = capsys.readouterr().out
        assert f"u1 (pid {user.pid}): not running" in out
        assert f"hub (pid {devnet.nodes[0].pid}): stopped" in out
    finally:
        recorded = recorded or recorded_pids(directory)
        try:
            main(["devnet", "down", "--dir", str(directory)])
        finally:
            kill_leftovers(recorded)
