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
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from devnet.deploy import ETHER
from devnet.processes import (
    CALL_GUARD,
    REPO_ROOT,
    STARTUP_GUARD,
    Deployment,
    NodeProcess,
    deploy,
    eventually,
    free_port,
    node_config,
    onchain,
    served_chain,
    stop_process,
)
from node.cli import new_private_key, write_key_file
from node.control import (
    ControlClient,
    ControlError,
    assets_json,
    assets_of,
)
from node.run import main as run_main
from protocols.signing import Signer
from protocols.types import Assets

RESERVE = Assets(50 * ETHER, 10**22)
DEPOSIT = Assets(2 * ETHER, 2 * 10**21)
LOCK = Assets(ETHER // 2, 5 * 10**20)


@pytest.fixture(scope="module")
def chain_url() -> Iterator[str]:
    """One embedded chain served over JSON-RPC by its own process for this module."""
    with served_chain() as url:
        yield url


def spawn_expecting_failure(config: Path) -> subprocess.Popen[str]:
    """`python -m node.run` on `config`, for a run that must fail at startup."""
    return subprocess.Popen(
        [sys.executable, "-m", "node.run", "--config", str(config)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def startup_failure(process: subprocess.Popen[str]) -> str:
    """The one error line of a process that must exit 2 at startup."""
    try:
        out, err = process.communicate(timeout=STARTUP_GUARD)
    finally:
        stop_process(process)
    assert process.returncode == 2, err
    errors = [line for line in err.splitlines() if line.startswith("weft-node: error:")]
    assert len(errors) == 1, err
    assert out == ""
    return errors[0]


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
        config = node_config(dep, "user", hub=hub_info.hub_entry, listen_port=free_port())
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
        # A second process on A's data directory is refused (it exits by itself).
        duplicate = spawn_expecting_failure(net.a.config_path)

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
        assert "another node process is running" in startup_failure(duplicate)
        # B's key on A's store: the store belongs to another node.
        config = json.loads(net.a.config_path.read_text())
        config["key_file"] = str(net.b.dir / "node.key")
        foreign = net.a.dir / "foreign.json"
        foreign.write_text(json.dumps(config))
        assert "belongs to another node" in startup_failure(spawn_expecting_failure(foreign))
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
    error = startup_failure(spawn_expecting_failure(config))
    assert "cannot start the node" in error and "ChainUnavailable" in error
    assert not (tmp_path / "data" / "node.json").exists()


def test_weft_node_run_runs_a_node_until_sigterm(tmp_path: Path, chain_url: str) -> None:
    """`weft node run --config FILE` (the installed console script) is `node.run`."""
    dep = trio.run(deploy, chain_url, ())
    node = NodeProcess(tmp_path, "hub", node_config(dep, "hub"), dep.keys["hub"])
    script = Path(sys.executable).with_name("weft")
    with node.log_path.open("ab") as log:
        process = subprocess.Popen(
            [str(script), "node", "run", "--config", str(node.config_path)],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    node.process = process  # `wait_ready` and `client` watch this process
    try:
        info = node.wait_ready()
        assert info.pid == process.pid
        with node.client() as client:
            status = client.call("status")
        assert status["role"] == "hub"
        assert status["address"] == dep.address("hub").checksum()
        assert stop_process(process) == 0, node.log_tail()
        assert not (node.data_dir / "node.json").exists()
    finally:
        stop_process(process)
