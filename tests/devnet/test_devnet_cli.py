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
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio

from devnet.deploy import ETHER
from devnet.devnet import (
    HUB_RESERVE,
    Devnet,
    DevnetError,
    Identity,
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


def recorded_pids(directory: Path) -> list[tuple[int, Identity | str]]:
    try:
        raw = json.loads((directory / "devnet.json").read_text())
    except (OSError, ValueError):
        return []
    devnet = Devnet.from_json(raw)
    return [(pid, marker) for _, pid, marker in devnet.processes()]


def kill_leftovers(recorded: list[tuple[int, Identity | str]]) -> None:
    for pid, marker in recorded:
        if process_runs(pid, marker):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def stopped_at_the_end(directory: Path) -> Iterator[list[tuple[int, Identity | str]]]:
    """Yield a list for the test to fill with the recorded (pid, marker)s; at the end,
    `weft devnet down`, then SIGKILL whatever recorded process still runs."""
    recorded: list[tuple[int, Identity | str]] = []
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


def pay_through(devnet: Devnet) -> Assets:
    """u1 and u2 deposit (checked on-chain), the hub collateralizes both, u1 pays u2 on a
    thread and closes it; u2's channel balance grows by the payment. Returns the payment."""
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
        return paid


def shown(value: Assets) -> str:
    """An amount as `weft devnet status` shows it."""
    return f"{value.eth}/{value.token}"


def status_rows(out: str) -> dict[str, list[str]]:
    """The rows of `weft devnet status` by name: NAME ROLE ALIVE CHANNELS USER HUB RESERVE
    THREADS (no cell holds a space)."""
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "ROLE", "ALIVE", "CHANNELS"], out
    rows = {}
    for line in lines[1:]:
        cells = line.split()
        if len(cells) != 8 or cells[1] not in ("hub", "user"):
            break
        rows[cells[0]] = cells
    return rows


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
            assert node.peer_id and f" {node.peer_id} " in out
        assert f"manager contract: {devnet.manager}\n" in out
        assert f"token contract: {devnet.token}\n" in out
        assert f"devnet file: {directory / 'devnet.json'} (" in out
        # Each process is recorded with its start time and command line, each node
        # directory with the kind of its chain.
        config = [str(directory / "hub" / "config.json")]
        assert devnet.nodes[0].argv[1:] == ("-m", "node.run", "--config", *config)
        assert devnet.chain_argv[1:] == ("-m", "devnet.chain_server", "--port", "0")
        assert devnet.chain_start_time > 0 and all(n.start_time > 0 for n in devnet.nodes)
        assert (directory / "u2" / "devnet-chain").read_text() == "embedded\n"

        # A second `up` on a running devnet is refused with one line, and changes nothing.
        assert main(["devnet", "up", "--dir", str(directory)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "already holds a running devnet" in err
        assert read_devnet(directory) == devnet

        assert main(["devnet", "status", "--dir", str(directory)]) == 0
        rows = status_rows(capsys.readouterr().out)
        assert set(rows) == {"hub", "u1", "u2"}
        assert all(row[2] == "up" for row in rows.values()), rows
        # Nothing deposited yet: the hub holds no channel and has its whole reserve.
        assert rows["hub"][3:] == ["0", "-", "-", shown(HUB_RESERVE), "0"], rows
        assert rows["u1"][6:] == ["-", "0"], rows

        paid = pay_through(devnet)

        # After the deposits and the payment: each user's channel balances, the hub's
        # reserve (less what it moved into the channels) and channel count.
        assert main(["devnet", "status", "--dir", str(directory)]) == 0
        rows = status_rows(capsys.readouterr().out)
        with contextlib.ExitStack() as stack:
            hub, u1 = (
                stack.enter_context(ControlClient.from_data_dir(n.data_dir, timeout=CALL_GUARD))
                for n in devnet.nodes[:2]
            )
            reserve = assets_of(hub.call("reserve"))
            u1_balance = u1.call("balance")
        assert HUB_RESERVE.covers(reserve) and reserve != HUB_RESERVE
        assert rows["hub"][3:] == ["2", "-", "-", shown(reserve), "0"], rows
        assert rows["u2"][3:5] == ["1", shown(DEPOSIT + paid)], rows
        u1_row = ["1", shown(assets_of(u1_balance["user"])), shown(assets_of(u1_balance["hub"]))]
        assert rows["u1"][3:6] == u1_row and rows["u1"][6:] == ["-", "0"], rows

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
        rows = status_rows(out)
        assert rows["hub"][2] == "up" and rows["u1"][2] == "down", out
        assert rows["u1"][3:] == ["-"] * 5 and "\nu1: not running\n" in out
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
        name, pid, identity = devnet.processes()[-1]
        assert (name, pid, identity.marker) == ("chain", devnet.chain_pid, "anvil")
        assert identity.start_time > 0 and "--port" in identity.argv
        assert process_runs(pid, identity)
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


# ---------------------------------------------------------------- recorded processes


def sleeper(*extra: str) -> subprocess.Popen[bytes]:
    """A process that sleeps, whose command line holds `extra` (e.g. the devnet's marker
    words) and whose name looks like the start of a /proc/<pid>/stat line."""
    code = "open('/proc/self/comm', 'w').write('z) R 1 2 3 4'); import time; time.sleep(120)"
    process = subprocess.Popen([sys.executable, "-c", code, *extra], stdin=subprocess.DEVNULL)
    comm = Path(f"/proc/{process.pid}/comm")
    eventually(lambda: comm.read_text() == "z) R 1 2 3 4\n", "the sleeper named itself")
    return process


def record(directory: Path, raw: dict[str, Any]) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "devnet.json").write_text(json.dumps(raw))


def legacy_record(kind: str, pid: int, data_dir: Path) -> dict[str, Any]:
    """A record as written before start times and command lines were recorded."""
    node = {
        "name": "hub",
        "role": "hub",
        "address": "0x" + "11" * 20,
        "peer_id": "",
        "multiaddrs": [],
        "control_port": 0,
        "pid": pid,
        "data_dir": str(data_dir),
    }
    chain = {"kind": kind, "url": "http://127.0.0.1:8545", "pid": pid}
    return {
        "complete": False,
        "chain": chain,
        "manager": "",
        "token": "",
        "deployed_block": 0,
        "nodes": [node],
    }


def test_down_signals_only_the_recorded_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "net"
    data_dir = directory / "hub" / "data"
    markers = ("notes-about-anvil.txt", "node.run", "devnet.chain_server", "--port", "8545")
    other = sleeper(*markers)
    try:
        argv = tuple(Path(f"/proc/{other.pid}/cmdline").read_bytes().decode().split("\0")[:-1])
        stat = Path(f"/proc/{other.pid}/stat").read_text()
        start_time = int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22
        # It started after this test process and before now (clock ticks after boot).
        ticks = os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        mine = Path(f"/proc/{os.getpid()}/stat").read_text()
        assert int(mine[mine.rindex(")") + 2 :].split()[19]) <= start_time
        assert start_time <= uptime * ticks + 1

        # Records that name its pid, whose command line holds every marker word, but that
        # are not this process: older records (the devnet's own command is not it), and
        # records whose start time or command line differ (a recycled pid).
        node_identity = {"start_time": start_time, "argv": list(argv)}
        fakes = [legacy_record(kind, other.pid, data_dir) for kind in ("anvil", "embedded")]
        for changed in ({"start_time": start_time + 1}, {"argv": [*argv[:-1], "8546"]}):
            fake = legacy_record("anvil", other.pid, data_dir)
            fake["nodes"][0].update({**node_identity, **changed})
            fake["chain"].update({**node_identity, **changed})
            fakes.append(fake)
        for fake in fakes:
            record(directory, fake)
            devnet = read_devnet(directory)
            assert devnet is not None
            assert not any(process_runs(pid, who) for _, pid, who in devnet.processes())
            assert main(["devnet", "status", "--dir", str(directory)]) == 0
            assert status_rows(capsys.readouterr().out)["hub"][2] == "down"
            assert main(["devnet", "down", "--dir", str(directory)]) == 0
            out = capsys.readouterr().out
            assert out.count("not running (the pid is another process now: left alone)") == 2
            assert other.poll() is None, fake
            assert not (directory / "devnet.json").exists()

        # The record of exactly this process (start time and command line) is signalled.
        fake = legacy_record("external", other.pid, data_dir)
        fake["nodes"][0].update(node_identity)
        record(directory, fake)
        assert main(["devnet", "down", "--dir", str(directory)]) == 0
        assert capsys.readouterr().out == f"hub (pid {other.pid}): stopped\n"
        other.wait(timeout=COMMAND_GUARD)  # (`down` may have reaped it: no exit status)
    finally:
        other.kill()
        other.wait(timeout=COMMAND_GUARD)


MALFORMED = [
    "{",
    "\xff",
    "[]",
    '{"chain": {"url": "x", "pid": 1}}',
    json.dumps({**legacy_record("embedded", 1, Path("/x")), "chain": 5}),
    json.dumps({**legacy_record("embedded", 1, Path("/x")), "complete": "yes"}),
    json.dumps({**legacy_record("embedded", 1, Path("/x")), "nodes": [None]}),
    json.dumps({**legacy_record("embedded", 1, Path("/x")), "deployed_block": -1}),
    json.dumps({**legacy_record("embedded", 1, Path("/x")), "deployed_block": True}),
    json.dumps({**legacy_record("warp", 1, Path("/x"))}),
]


def test_a_malformed_record_says_how_to_get_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "net"
    directory.mkdir()
    path = directory / "devnet.json"
    for text in MALFORMED:
        path.write_bytes(text.encode("latin-1"))
        with pytest.raises(ValueError):
            Devnet.from_json(json.loads(text.encode("latin-1")))
        for action in ("status", "down", "up", "demo"):
            assert main(["devnet", action, "--dir", str(directory)]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1, err
            assert f"{path} is not a readable devnet record (" in err
            advice = f"; if no devnet runs in {directory}, remove {path} (if one does, stop"
            assert err.endswith(f"{advice} its processes first)\n"), err
        assert path.read_bytes() == text.encode("latin-1")
    # Validation does not rest on `assert` (which `python -O` drops).
    path.write_text('{"chain": [], "nodes": []}')
    done = subprocess.run(
        [sys.executable, "-O", "-m", "node.cli", "devnet", "status", "--dir", str(directory)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_GUARD,
    )
    assert done.returncode == 2 and "'chain' is not a JSON object: []" in done.stderr
    # An older record (without start times and command lines) is still read.
    path.write_text(json.dumps(legacy_record("anvil", 7, Path("/x/hub/data"))))
    devnet = read_devnet(directory)
    assert devnet is not None and devnet.chain_start_time == 0 and devnet.nodes[0].argv == ()
    assert devnet.processes()[0][2].expected_tail == (
        "-m",
        "node.run",
        "--config",
        "/x/hub/config.json",
    )
    assert devnet.processes()[1][2].expected_tail[2:4] == ("--port", "8545")


def node_dir(directory: Path, name: str, chain: str | None) -> Path:
    """A node directory as `up` leaves it: a key and config (and the kind of its chain)."""
    path = directory / name
    path.mkdir(parents=True)
    (path / "node.key").write_text("11" * 32)
    (path / "config.json").write_text("{}")
    if chain is not None:
        (path / "devnet-chain").write_text(f"{chain}\n")
    return path


def test_up_keeps_the_keys_of_a_devnet_on_an_external_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [  # (the record's chain kind or None, the node directory's devnet-chain file)
        ("external", None),
        ("external", "external"),
        (None, "external"),
        (None, None),  # not known
        ("embedded", "external"),
    ]
    for i, (recorded, written) in enumerate(cases):
        directory = tmp_path / f"net{i}"
        hub = node_dir(directory, "hub", written)
        if recorded is not None:
            record(directory, legacy_record(recorded, 0, hub / "data"))
        assert main(["devnet", "up", "--dir", str(directory)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"{directory} holds the node keys of an earlier devnet that ran on " in err
        assert f"may still hold funds; move {directory} aside or pass another --dir" in err
        assert (hub / "node.key").is_file() and (hub / "config.json").is_file()
        assert (directory / "devnet.json").exists() == (recorded is not None)
        assert sorted(p.name for p in directory.iterdir()) == sorted(
            ["hub", ".lock", *(["devnet.json"] if recorded else [])]
        )

    # The node directories of devnets on a chain of their own are cleared.
    from devnet.devnet import _clear_stale

    directory = tmp_path / "own"
    node_dir(directory, "hub", "anvil")
    node_dir(directory, "u1", None)  # named by the record below
    node_dir(directory, "u2", "embedded")
    kept = node_dir(directory, "u3", None) / "config.json"
    kept.unlink()  # not a node directory: left alone
    stale = Devnet.from_json(legacy_record("embedded", 0, directory / "u1" / "data"))
    stale = stale.with_node(replace(stale.nodes[0], name="u1", role="user"))
    _clear_stale(directory, stale)
    assert sorted(p.name for p in directory.iterdir()) == ["u3"]


def test_only_the_anvil_process_counts_as_listening() -> None:
    from devnet.devnet import _listens_on

    with socket.socket() as listening, socket.socket() as bound:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        bound.bind(("127.0.0.1", 0))  # bound, not listening
        other = sleeper()
        try:
            assert _listens_on(os.getpid(), port)
            assert not _listens_on(other.pid, port)
            assert not _listens_on(os.getpid(), bound.getsockname()[1])
        finally:
            other.kill()
            other.wait(timeout=COMMAND_GUARD)
