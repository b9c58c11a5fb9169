"""`weft devnet up|status|down`: a devnet of detached OS processes, driven through
`node.cli.main` (or `python -m node.cli` where the command must be killed or bounded), on
each kind of chain (embedded, anvil, an external URL), used for a payment, then stopped by
exactly its recorded pids; and its failures: a bad `--chain`, anvil missing, a chain
without a prefunded account, the directory lock, an `up` killed midway.

Every wait is bounded (no timing assertions); each `finally` calls `down` and, as a last
resort, kills any recorded pid that still runs its recorded command.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trio

from devnet.deploy import ETHER
from devnet.devnet import (
    HUB_RESERVE,
    Devnet,
    DevnetError,
    describe_chain,
    process_runs,
    read_devnet,
    status,
    up,
)
from devnet.processes import REPO_ROOT, eventually, free_port, onchain, served_chain
from node.cli import main
from node.control import ControlClient, assets_json, assets_of
from protocols.types import Address, Assets
from tests.node.anvil import require_anvil

DEPOSIT = Assets(2 * ETHER, 2 * 10**21)
LOCK = Assets(ETHER // 2, 5 * 10**20)
CALL_GUARD = 90.0
COMMAND_GUARD = 180.0  # seconds one `python -m node.cli devnet ...` may take


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


@contextlib.contextmanager
def stopped_at_the_end(directory: Path) -> Iterator[list[tuple[int, str]]]:
    """Yield a list for the test to fill with the recorded (pid, marker)s; at the end,
    `weft devnet down`, then SIGKILL whatever recorded process still runs."""
    recorded: list[tuple[int, str]] = []
    try:
        yield recorded
    finally:
        recorded.extend(recorded_pids(directory))
        try:
            main(["devnet", "down", "--dir", str(directory)])
        finally:
            kill_leftovers(recorded)


def mentioning(text: str) -> list[int]:
    """Pids of live processes other than this one whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, UnicodeDecodeError):
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def weft(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m node.cli ARGS` to its end (bounded)."""
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_GUARD,
    )


def pay_through(devnet: Devnet) -> None:
    """u1 and u2 deposit (checked on-chain), the hub collateralizes both, u1 pays u2 on a
    thread and closes it; u2's channel balance grows by the payment."""
    with contextlib.ExitStack() as stack:
        hub, u1, u2 = (
            stack.enter_context(ControlClient.from_data_dir(n.data_dir, timeout=CALL_GUARD))
            for n in devnet.nodes[:3]
        )
        users = {n.name: n.address for n in devnet.nodes}
        for user in (u1, u2):
            user.call("deposit", amount=assets_json(DEPOSIT))
        manager = Address.from_hex(devnet.manager)
        held = trio.run(onchain, devnet.chain_url, Address.from_hex(devnet.token), manager)
        assert held == HUB_RESERVE + DEPOSIT + DEPOSIT
        for name in ("u1", "u2"):
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


def test_devnet_up_status_pay_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "net"
    with stopped_at_the_end(directory) as recorded:
        assert main(["devnet", "up", "--nodes", "2", "--dir", str(directory)]) == 0
        out, err = capsys.readouterr()
        devnet = read_devnet(directory)
        assert devnet is not None
        recorded.extend((pid, marker) for _, pid, marker in devnet.processes())
        assert [n.name for n in devnet.nodes] == ["hub", "u1", "u2"]
        assert devnet.complete and devnet.chain_kind == "embedded"
        assert describe_chain(devnet).startswith(f"embedded {devnet.chain_url} (pid ")
        assert describe_chain(devnet).endswith(", up)")
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

        pay_through(devnet)

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


def test_status_shows_a_dead_node_as_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "net"
    with stopped_at_the_end(directory) as recorded:
        assert main(["devnet", "up", "--nodes", "1", "--dir", str(directory)]) == 0
        devnet = read_devnet(directory)
        assert devnet is not None
        recorded.extend((pid, marker) for _, pid, marker in devnet.processes())
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


def test_devnet_on_anvil(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_anvil()
    directory = tmp_path / "net"
    with stopped_at_the_end(directory) as recorded:
        assert main(["devnet", "up", "--chain", "anvil", "--dir", str(directory)]) == 0
        devnet = read_devnet(directory)
        assert devnet is not None
        recorded.extend((pid, marker) for _, pid, marker in devnet.processes())
        assert devnet.complete and devnet.chain_kind == "anvil"
        assert process_runs(devnet.chain_pid, "anvil")
        assert ("chain", devnet.chain_pid, "anvil") in devnet.processes()
        assert describe_chain(devnet) == f"anvil {devnet.chain_url} (pid {devnet.chain_pid}, up)"

        pay_through(devnet)

        capsys.readouterr()
        assert main(["devnet", "down", "--dir", str(directory)]) == 0
        assert f"chain (pid {devnet.chain_pid}): stopped" in capsys.readouterr().out
        for pid, marker in recorded:
            assert not process_runs(pid, marker)


def test_devnet_on_an_external_chain_leaves_it_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "net"
    with served_chain() as url, stopped_at_the_end(directory) as recorded:
        assert main(["devnet", "up", "--nodes", "1", "--chain", url, "--dir", str(directory)]) == 0
        devnet = read_devnet(directory)
        assert devnet is not None
        recorded.extend((pid, marker) for _, pid, marker in devnet.processes())
        assert (devnet.chain_kind, devnet.chain_url, devnet.chain_pid) == ("external", url, 0)
        assert [name for name, _, _ in devnet.processes()] == ["hub", "u1"]
        assert describe_chain(devnet).startswith(f"external {url} (not started")
        found = status(directory)
        assert found is not None and all(n.alive for n in found[1])

        capsys.readouterr()
        assert main(["devnet", "down", "--dir", str(directory)]) == 0
        assert "chain" not in capsys.readouterr().out
        for pid, marker in recorded:
            assert not process_runs(pid, marker)
        # The chain still serves: it has the deployment on it.
        held = trio.run(
            onchain, url, Address.from_hex(devnet.token), Address.from_hex(devnet.manager)
        )
        assert held == HUB_RESERVE


def test_bad_chains_fail_with_one_line_and_leave_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "net"
    refused = f"http://127.0.0.1:{free_port()}"
    cases = [
        ("foo", "--chain must be 'embedded', 'anvil' or the http(s):// URL"),
        ("ftp://127.0.0.1:8545", "--chain must be"),
        ("http://", "--chain must be"),
        (refused, f"no JSON-RPC chain answers eth_chainId at {refused}: "),
    ]
    for chain, message in cases:
        assert main(["devnet", "up", "--chain", chain, "--dir", str(directory)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err

    monkeypatch.setenv("WEFT_ANVIL", str(tmp_path / "no-such-anvil"))
    assert main(["devnet", "up", "--chain", "anvil", "--dir", str(directory)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "npm ci --prefix .ci/anvil" in err, err
    assert not (directory / "devnet.json").exists()
    assert mentioning(str(directory)) == []


class _NoAccountsChain(BaseHTTPRequestHandler):
    """A JSON-RPC chain that answers `eth_chainId` and has no unlocked accounts."""

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        results: dict[str, object] = {"eth_chainId": "0x539", "eth_accounts": []}
        answer: dict[str, object]
        if request["method"] in results:
            answer = {"result": results[request["method"]]}
        else:
            answer = {"error": {"code": -32601, "message": "method not found"}}
        body = json.dumps({"jsonrpc": "2.0", "id": request["id"], **answer}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_deployment_failure_on_an_external_chain_is_one_line(tmp_path: Path) -> None:
    directory = tmp_path / "net"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoAccountsChain)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(DevnetError) as failed:
            up(directory, 1, chain=url)
        message = str(failed.value)
        assert message.startswith(f"deployment failed on {url} (it needs a prefunded unlocked")
        assert "\n" not in message
        assert not (directory / "devnet.json").exists()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_the_lock_refuses_a_second_command_at_once(tmp_path: Path) -> None:
    directory = tmp_path / "net"
    directory.mkdir()
    idle = Devnet("http://127.0.0.1:1", 0, "", "", 0, (), "external", complete=False)
    (directory / "devnet.json").write_text(json.dumps(idle.to_json()))
    with (directory / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for action in ("up", "down"):
            done = weft("devnet", action, "--dir", str(directory))
            assert done.returncode == 2, done.stderr
            assert done.stderr == (
                f"weft: error: another weft devnet command is running in {directory}\n"
            )
        assert read_devnet(directory) == idle
    assert main(["devnet", "down", "--dir", str(directory)]) == 0
    assert not (directory / "devnet.json").exists()


def test_down_stops_what_a_killed_up_started(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "net"
    command = [sys.executable, "-m", "node.cli", "devnet", "up", "--dir", str(directory)]
    with stopped_at_the_end(directory) as recorded:
        starting = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:

            def partly_up() -> Devnet | None:
                assert starting.poll() is None, "up ended before it could be killed"
                with contextlib.suppress(DevnetError):
                    devnet = read_devnet(directory)
                    if devnet is not None and devnet.chain_pid > 0 and devnet.nodes:
                        return devnet
                return None

            eventually(partly_up, "the chain and a node recorded", timeout=COMMAND_GUARD)
        finally:
            starting.kill()
            starting.wait(timeout=COMMAND_GUARD)
        devnet = read_devnet(directory)
        assert devnet is not None and not devnet.complete
        recorded.extend((pid, marker) for _, pid, marker in devnet.processes())
        assert process_runs(devnet.chain_pid, "devnet.chain_server")

        found = status(directory)
        assert found is not None and not found[0].complete
        not_ready = "not ready (the devnet is incomplete)"
        assert all(n.alive or n.error == not_ready for n in found[1]), found
        assert main(["devnet", "status", "--dir", str(directory)]) == 0
        assert "Traceback" not in capsys.readouterr().err
        # Another `up` is refused while what the killed one started runs.
        refused = weft("devnet", "up", "--dir", str(directory))
        assert refused.returncode == 2
        assert "already holds an incomplete devnet that runs" in refused.stderr

        stopped = weft("devnet", "down", "--dir", str(directory))
        assert stopped.returncode == 0, stopped.stderr
        for name, pid, _ in devnet.processes():
            assert f"{name} (pid {pid}): " in stopped.stdout
        for pid, marker in recorded:
            assert not process_runs(pid, marker)
        assert mentioning(str(directory)) == []
        assert not (directory / "devnet.json").exists()
