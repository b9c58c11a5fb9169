"""A hub and two users as separate OS processes (`python -m node.run`), driven through
their control interfaces, on one chain served by `python -m devnet.chain_server`.

The test process deploys the contracts and funds the keys, writes the config and key
files, starts the nodes (the hub first: its `node.json` gives the users their hub), and
from then on only talks to them over `node.control`. At the end the chain must show
exactly what the payments imply; a user killed with SIGKILL in the middle of a stream of
payments loses none and gets none twice.

Every wait is bounded (hang guards, never timing assertions); every process this file
starts is stopped by its pid in a `finally`.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest
import trio

from node.chain import ChainService
from node.cli import new_private_key, write_key_file
from node.control import (
    ControlClient,
    ControlError,
    NodeInfo,
    assets_json,
    assets_of,
    read_node_info,
)
from node.run import main as run_main
from protocols.signing import Signer
from protocols.types import Address, Assets
from tests.node.anvil import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
ETHER = 10**18
TOKENS = 10**24
CHALLENGE_PERIOD = 100
RESERVE = Assets(50 * ETHER, 10**22)
DEPOSIT = Assets(2 * ETHER, 2 * 10**21)
LOCK = Assets(ETHER // 2, 5 * 10**20)

STARTUP_GUARD = 45.0  # seconds a process may take to come up (imports on a busy machine)
STOP_GUARD = 15.0
CALL_GUARD = 90.0  # seconds one control call may take
SETTLE_GUARD = 60.0

T = TypeVar("T")


# ---------------------------------------------------------------- the chain


def read_line(stream: IO[str], timeout: float) -> str:
    """The next line of a pipe; TimeoutError if none comes within `timeout` seconds."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError(f"no output within {timeout} s")
    return stream.readline()


def stop_process(process: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> int:
    """Stop `process` (this one, by its pid): `sig`, wait, then SIGKILL if it lingers."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=STOP_GUARD)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_GUARD)
    return process.returncode


@pytest.fixture(scope="module")
def chain_url() -> Iterator[str]:
    """One embedded chain served over JSON-RPC by its own process for this module."""
    process = subprocess.Popen(
        [sys.executable, "-m", "devnet.chain_server", "--port", "0"],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    try:
        url = read_line(process.stdout, STARTUP_GUARD).strip()
        assert url.startswith("http://127.0.0.1:"), url
        yield url
    finally:
        stop_process(process)
        process.stdout.close()


@dataclass(frozen=True)
class Deployment:
    url: str
    manager: Address
    token: Address
    deployed_block: int
    keys: dict[str, bytes]  # "hub", "a", "b"

    def address(self, name: str) -> Address:
        return Signer(self.keys[name]).address


async def deploy(url: str) -> Deployment:
    """A TestToken and a ChannelManager for a fresh hub key; three funded accounts."""
    keys = {name: new_private_key() for name in ("hub", "a", "b")}
    chain = ChainService.from_url(url, poll_interval=0.01)
    try:
        hub_key = keys["hub"]
        hub = Signer(hub_key).address
        await chain.fund(hub, 1000 * ETHER)
        token = await chain.deploy_token("Weft Test Token", "WTT", sender_key=hub_key)
        manager = await chain.deploy_channel_manager(
            hub, token.address, CHALLENGE_PERIOD, sender_key=hub_key
        )
        await token.mint(hub, TOKENS, sender_key=hub_key)
        for name in ("a", "b"):
            user = Signer(keys[name]).address
            await chain.fund(user, 100 * ETHER)
            await token.mint(user, TOKENS, sender_key=hub_key)
        return Deployment(url, manager.address, token.address, manager.deployed_block or 0, keys)
    finally:
        chain.close()


async def onchain(url: str, token: Address, who: Address) -> Assets:
    chain = ChainService.from_url(url)
    try:
        return Assets(await chain.eth_balance(who), await chain.token(token).balance_of(who))
    finally:
        chain.close()


# ---------------------------------------------------------------- node processes


class NodeProcess:
    """One `python -m node.run` process on its own config and data directory."""

    def __init__(self, root: Path, name: str, config: dict[str, Any], key: bytes) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        write_key_file(self.dir / "node.key", key, force=False)
        self.config_path = self.dir / "config.json"
        self.config_path.write_text(
            json.dumps({"key_file": "node.key", "data_dir": "data", **config}, indent=1)
        )
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "node.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.info: NodeInfo | None = None

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "node.run", "--config", str(self.config_path)],
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self.info = None

    def wait_ready(self) -> NodeInfo:
        """Wait until this process has written its `node.json`."""
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_GUARD
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                info = read_node_info(self.data_dir)
            except (OSError, ValueError):
                info = None
            if info is not None and info.pid == self.process.pid:
                self.info = info
                return info
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not up within {STARTUP_GUARD} s:\n{self.log_tail()}")

    def client(self) -> ControlClient:
        return ControlClient.from_data_dir(self.data_dir, timeout=CALL_GUARD)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        return stop_process(self.process)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()  # SIGKILL, to this process only
        self.process.wait(timeout=STOP_GUARD)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def node_config(dep: Deployment, role: str, **extra: Any) -> dict[str, Any]:
    return {
        "role": role,
        "chain_url": dep.url,
        "manager": dep.manager.checksum(),
        "deployed_block": dep.deployed_block,
        "poll_interval": 0.05,
        "request_timeout": 60,
        **extra,
    }


@dataclass
class Network:
    dep: Deployment
    hub: NodeProcess
    a: NodeProcess
    b: NodeProcess
    clients: dict[str, ControlClient]


def start_network(tmp_path: Path, dep: Deployment) -> Network:
    """Start the hub, then both users (on fixed libp2p ports, so a restart keeps them)."""
    hub = NodeProcess(tmp_path, "hub", node_config(dep, "hub"), dep.keys["hub"])
    hub.start()
    net = Network(dep, hub, hub, hub, {})  # the users follow once the hub is up
    hub_info = hub.wait_ready()
    users = []
    for name in ("a", "b"):
        config = node_config(dep, "user", hub=hub_info.peer_ref, listen_port=free_port())
        users.append(NodeProcess(tmp_path, name, config, dep.keys[name]))
    net.a, net.b = users
    for user in users:
        user.start()
    for user in users:
        user.wait_ready()
    net.clients = {"hub": hub.client(), "a": net.a.client(), "b": net.b.client()}
    return net


def stop_network(net: Network | None, started: list[NodeProcess]) -> None:
    if net is not None:
        for client in net.clients.values():
            client.close()
    for node in reversed(started):
        node.stop()


def eventually(check: Callable[[], T | None], what: str, timeout: float = SETTLE_GUARD) -> T:
    """Poll `check` until it returns something other than None/False; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result is not None and result is not False:
            return result
        time.sleep(0.05)
    raise AssertionError(f"never happened within {timeout} s: {what}")


def thread_view(client: ControlClient, key: dict[str, Any]) -> dict[str, Any] | None:
    for info in client.call("threads"):
        if info["key"] == key:
            return dict(info)
    return None


def fund_channels(net: Network) -> dict[str, Any]:
    """Reserve, deposits and collateral; a thread A->B locking LOCK on both sides."""
    hub, a, b = net.clients["hub"], net.clients["a"], net.clients["b"]
    hub.call("deposit_reserve", amount=assets_json(RESERVE))
    assert assets_of(hub.call("reserve")) == RESERVE
    for name, user in (("a", a), ("b", b)):
        user.call("deposit", amount=assets_json(DEPOSIT))
        assert assets_of(user.call("balance")["user"]) == DEPOSIT
        added = hub.call(
            "collateralize", user=net.dep.address(name).checksum(), amount=assets_json(LOCK)
        )
        assert assets_of(added).covers(LOCK)
    key: dict[str, Any] = a.call(
        "open_thread",
        peer=net.dep.address("b").checksum(),
        lock=assets_json(LOCK),
        peer_lock=assets_json(LOCK),
    )
    assert key["sender"] == net.dep.address("a").checksum()
    return key


# ---------------------------------------------------------------- tests


def test_hub_and_two_users_as_processes_every_wei_accounted(tmp_path: Path, chain_url: str) -> None:
    dep = trio.run(deploy, chain_url)
    net: Network | None = None
    started: list[NodeProcess] = []
    try:
        net = start_network(tmp_path, dep)
        started = [net.hub, net.a, net.b]
        hub, a, b = net.clients["hub"], net.clients["a"], net.clients["b"]
        status = eventually(
            lambda: (s := a.call("status"))["hub_connected"] and s, "A connected to the hub"
        )
        assert status["role"] == "user"
        assert status["address"] == dep.address("a").checksum()
        assert hub.call("status")["role"] == "hub"

        key = fund_channels(net)
        to_b, to_a = Assets(1_000_003, 7), Assets(500_001, 3)
        run_a = a.call("bench_pay", key=key, count=200, mode="sequential", amount=assets_json(to_b))
        run_b = b.call(
            "bench_pay", key=key, count=200, mode="pipelined", amount=assets_json(to_a), window=32
        )
        for run in (run_a, run_b):
            assert run["count"] == 200
            assert run["payments_per_s"] > 0
            assert 0 <= run["latencies_ms"]["p50"] <= run["latencies_ms"]["p99"]
        assert run_b["tx_count"] == 400
        flow = Assets(200 * to_b.eth, 200 * to_b.token) - Assets(200 * to_a.eth, 200 * to_a.token)

        final = a.call("close_thread", key=key)
        assert final["tx_count"] == 400
        assert assets_of(final["balance_sender"]) == LOCK - flow
        assert assets_of(final["balance_receiver"]) == LOCK + flow
        eventually(lambda: b.call("balance")["open_threads"] == 0, "B's channel settled")
        expected = {"a": DEPOSIT - flow, "b": DEPOSIT + flow}
        recipients = {name: Signer(new_private_key()).address for name in ("a", "b")}
        for name in ("a", "b"):
            client = net.clients[name]
            assert assets_of(client.call("balance")["user"]) == expected[name]
            client.call(
                "withdraw",
                amount=assets_json(expected[name]),
                recipient=recipients[name].checksum(),
            )
            assert assets_of(client.call("balance")["user"]) == Assets()
        for name in ("a", "b"):
            held = trio.run(onchain, dep.url, dep.token, recipients[name])
            assert held == expected[name], name

        # Stopped by SIGTERM, each node exits 0 and takes its node.json with it.
        for client in net.clients.values():
            client.close()
        for node in (net.a, net.b, net.hub):
            assert node.stop() == 0, node.log_tail()
            assert not (node.data_dir / "node.json").exists()
    finally:
        stop_network(net, started)


def test_a_user_killed_mid_payments_loses_nothing_and_is_paid_once(
    tmp_path: Path, chain_url: str
) -> None:
    dep = trio.run(deploy, chain_url)
    net: Network | None = None
    started: list[NodeProcess] = []
    try:
        net = start_network(tmp_path, dep)
        started = [net.hub, net.a, net.b]
        a, b = net.clients["a"], net.clients["b"]
        key = fund_channels(net)
        amount = Assets(1, 1)
        count = 3000
        outcome: dict[str, Any] = {}

        def pay_in_background() -> None:
            with net.a.client() as payer:
                try:
                    outcome["run"] = payer.call(
                        "bench_pay",
                        key=key,
                        count=count,
                        mode="pipelined",
                        amount=assets_json(amount),
                        window=64,
                    )
                except ControlError as exc:
                    outcome["error"] = exc

        payer = threading.Thread(target=pay_in_background, daemon=True)
        payer.start()
        # Kill B once some payments went through, while the rest are still coming.
        seen = eventually(
            lambda: (view := thread_view(b, key)) is not None and view["tx_count"] >= 200 and view,
            "B countersigned the first payments",
        )
        net.b.kill()
        b.close()
        killed_at = seen["tx_count"]
        net.b.start()
        net.b.wait_ready()
        b = net.clients["b"] = net.b.client()
        payer.join(timeout=CALL_GUARD + 10)
        assert not payer.is_alive(), "bench_pay never returned"
        assert "error" not in outcome, outcome.get("error")
        assert outcome["run"]["tx_count"] == count
        assert killed_at < count, "B was killed after the last payment: nothing was tested"

        def same_view() -> dict[str, Any] | None:
            mine_a, mine_b = thread_view(a, key), thread_view(b, key)
            if mine_a is None or mine_b is None or mine_a["tx_count"] != mine_b["tx_count"]:
                return None
            return {"a": mine_a, "b": mine_b}

        views = eventually(same_view, "A and B agree on the thread")
        paid = Assets(count * amount.eth, count * amount.token)
        assert views["a"]["tx_count"] == views["b"]["tx_count"] == count
        assert assets_of(views["b"]["mine"]) == LOCK + paid
        assert assets_of(views["b"]["peer"]) == LOCK - paid
        assert views["a"]["mine"] == views["b"]["peer"]
        assert views["a"]["peer"] == views["b"]["mine"]
        # The thread goes on after the restart, and closes at that state.
        assert b.call("pay", key=key, amount=assets_json(amount)) == count + 1
        final = a.call("close_thread", key=key)
        assert final["tx_count"] == count + 1
        assert assets_of(final["balance_receiver"]) == LOCK + paid - amount
    finally:
        stop_network(net, started)


# ---------------------------------------------------------------- startup errors


def test_bad_configs_fail_with_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "node.key"
    write_key_file(key_file, new_private_key(), force=False)
    good = {
        "key_file": "node.key",
        "data_dir": "data",
        "role": "hub",
        "chain_url": "http://127.0.0.1:1",
        "manager": "0x" + "11" * 20,
    }
    cases: list[tuple[Any, str]] = [
        ({k: v for k, v in good.items() if k != "manager"}, "missing key(s): manager"),
        ({**good, "colour": "red"}, "unknown key(s): colour"),
        ({**good, "role": "boss"}, '"role"'),
        ({**good, "role": "user"}, '"hub"'),
        ({**good, "key_file": "nope.key"}, "key file not found"),
        ({**good, "manager": "0x12"}, '"manager"'),
        ({**good, "listen_port": 70000}, '"listen_port"'),
        ({**good, "policies": {"max_lock": [1]}}, "policies.max_lock"),
        ({**good, "chain_url": "ftp://x"}, '"chain_url"'),
        ([1, 2], "not a JSON object"),
    ]
    config = tmp_path / "config.json"
    for body, fragment in cases:
        config.write_text(json.dumps(body))
        assert run_main(["--config", str(config)]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("weft-node: error:")]
        assert len(lines) == 1 and fragment in lines[0], (body, err)
    config.write_text("{not json")
    assert run_main(["--config", str(config)]) == 2
    assert "not JSON" in capsys.readouterr().err


def test_an_unreachable_chain_fails_startup_with_exit_2(tmp_path: Path) -> None:
    write_key_file(tmp_path / "node.key", new_private_key(), force=False)
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "key_file": "node.key",
                "data_dir": "data",
                "role": "hub",
                "chain_url": f"http://127.0.0.1:{free_port()}",
                "manager": "0x" + "11" * 20,
            }
        )
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "node.run", "--config", str(config)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = process.communicate(timeout=STARTUP_GUARD)
    finally:
        stop_process(process)
    assert process.returncode == 2, err
    errors = [line for line in err.splitlines() if line.startswith("weft-node: error:")]
    assert len(errors) == 1, err
    assert "cannot start the node" in errors[0]
    assert out == ""
    assert not (tmp_path / "data" / "node.json").exists()
