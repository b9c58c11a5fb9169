"""A local Weft devnet that outlives the command that started it: `weft devnet up|status|down`.

`up(dir, nodes)` starts, each as a detached OS process in its own session, the embedded
chain (`python -m devnet.chain_server`), a hub and `nodes` users (`python -m node.run`),
deploys and funds (`devnet.processes.deploy`), has the hub deposit a reserve and records
everything in `dir/devnet.json` (written atomically). `status(dir)` asks every recorded node
over its control interface; `down(dir)` stops exactly the recorded processes.

A recorded pid is only ever signalled while `/proc/<pid>/cmdline` still names the command
it was recorded for ("node.run" or "devnet.chain_server"), so a recycled pid is never hit.
Every wait is bounded. Expected failures raise `DevnetError` (one line); `up` stops what
it started before raising.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import trio

from devnet.deploy import ETHER
from devnet.processes import (
    REPO_ROOT,
    STARTUP_GUARD,
    STOP_GUARD,
    NodeProcess,
    ProcessError,
    deploy,
    free_port,
    node_config,
    stop_process,
)
from node.control import ControlClient, ControlError, assets_json, read_token
from protocols.types import Assets

__all__ = [
    "DEFAULT_DIR",
    "DEVNET_FILE",
    "Devnet",
    "DevnetError",
    "DevnetNode",
    "NodeStatus",
    "Stopped",
    "down",
    "process_runs",
    "read_devnet",
    "status",
    "up",
]

DEFAULT_DIR: Final = Path(".weft-devnet")
DEVNET_FILE: Final = "devnet.json"
CHAIN_LOG: Final = "chain.log"
CHAIN_MARKER: Final = "devnet.chain_server"
NODE_MARKER: Final = "node.run"
HUB_RESERVE: Final = Assets(100 * ETHER, 10**23)
STATUS_TIMEOUT: Final = 10.0  # seconds one status call may take
CALL_TIMEOUT: Final = 90.0
MAX_NODES: Final = 64
_NODE_DIR = re.compile(r"^(hub|u[0-9]+)$")

Progress = Callable[[str], None]


class DevnetError(Exception):
    """An expected failure of a devnet command; the message is the one line to show."""


@dataclass(frozen=True, slots=True)
class DevnetNode:
    name: str
    role: str
    address: str
    peer_id: str
    multiaddrs: tuple[str, ...]
    control_port: int
    pid: int
    data_dir: str


@dataclass(frozen=True, slots=True)
class Devnet:
    """What `devnet.json` records about a running devnet."""

    chain_url: str
    chain_pid: int
    manager: str
    token: str
    deployed_block: int
    nodes: tuple[DevnetNode, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "chain": {"url": self.chain_url, "pid": self.chain_pid},
            "manager": self.manager,
            "token": self.token,
            "deployed_block": self.deployed_block,
            "nodes": [{**asdict(n), "multiaddrs": list(n.multiaddrs)} for n in self.nodes],
        }

    @classmethod
    def from_json(cls, raw: object) -> Devnet:
        """Raises ValueError on a malformed record."""
        try:
            assert isinstance(raw, dict)
            nodes = tuple(
                DevnetNode(
                    str(n["name"]),
                    str(n["role"]),
                    str(n["address"]),
                    str(n["peer_id"]),
                    tuple(str(m) for m in n["multiaddrs"]),
                    int(n["control_port"]),
                    int(n["pid"]),
                    str(n["data_dir"]),
                )
                for n in raw["nodes"]
            )
            return cls(
                str(raw["chain"]["url"]),
                int(raw["chain"]["pid"]),
                str(raw["manager"]),
                str(raw["token"]),
                int(raw["deployed_block"]),
                nodes,
            )
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed devnet record ({type(exc).__name__}: {exc})") from None

    def processes(self) -> list[tuple[str, int, str]]:
        """(name, pid, cmdline marker) of every recorded process: nodes, then the chain."""
        recorded = [(n.name, n.pid, NODE_MARKER) for n in self.nodes]
        return [*recorded, ("chain", self.chain_pid, CHAIN_MARKER)]


@dataclass(frozen=True, slots=True)
class NodeStatus:
    name: str
    role: str
    pid: int
    control_port: int
    alive: bool
    user_balance: Assets | None  # users only: the channel's balance of the user and the hub
    hub_balance: Assets | None
    open_threads: int | None
    error: str | None  # why the node could not be asked, if it could not


@dataclass(frozen=True, slots=True)
class Stopped:
    name: str
    pid: int
    how: str  # "stopped" (SIGTERM), "killed" (SIGKILL), "not running"


# ---------------------------------------------------------------- processes by pid


def _reap(pid: int) -> None:
    """Collect `pid` if it is an exited child of this process (so it is not a zombie)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def process_runs(pid: int, marker: str) -> bool:
    """Whether `pid` is a live process whose command line contains `marker`."""
    if pid <= 0:
        return False
    _reap(pid)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return marker in cmdline.replace(b"\0", b" ").decode(errors="replace")


def _signal(pid: int, marker: str, sig: int) -> bool:
    """Send `sig` to `pid` if it still runs `marker`; whether it was sent."""
    if not process_runs(pid, marker):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(procs: Iterable[tuple[str, int, str]], timeout: float) -> list[tuple[str, int, str]]:
    """Wait up to `timeout` seconds for `procs` to end; those still running."""
    pending = list(procs)
    deadline = time.monotonic() + timeout
    while True:
        pending = [p for p in pending if process_runs(p[1], p[2])]
        if not pending or time.monotonic() >= deadline:
            return pending
        time.sleep(0.05)


# ---------------------------------------------------------------- the devnet file


def read_devnet(directory: Path) -> Devnet | None:
    """The devnet recorded in `directory`, or None if there is none; DevnetError if the
    record cannot be read."""
    path = directory / DEVNET_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DevnetError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return Devnet.from_json(json.loads(text))
    except ValueError as exc:
        raise DevnetError(f"{path}: {exc}") from None


def _write_devnet(directory: Path, devnet: Devnet) -> None:
    path = directory / DEVNET_FILE
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("x") as out:
            json.dump(devnet.to_json(), out, indent=1)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _running(devnet: Devnet) -> list[tuple[str, int, str]]:
    return [p for p in devnet.processes() if process_runs(p[1], p[2])]


def _clear_stale(directory: Path) -> None:
    """Remove what an earlier, stopped devnet left in `directory`: its record, chain log
    and node directories (only `hub`/`u<N>` directories holding a node config and key)."""
    (directory / DEVNET_FILE).unlink(missing_ok=True)
    (directory / CHAIN_LOG).unlink(missing_ok=True)
    for entry in directory.iterdir():
        if (
            _NODE_DIR.match(entry.name)
            and entry.is_dir()
            and not entry.is_symlink()
            and (entry / "config.json").is_file()
            and (entry / "node.key").is_file()
        ):
            shutil.rmtree(entry)


# ---------------------------------------------------------------- up


def _popen_detached(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start `python <argv>` in its own session (it outlives this process), output to
    `log_path`."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, *argv],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_chain_url(process: subprocess.Popen[bytes], log_path: Path) -> str:
    deadline = time.monotonic() + STARTUP_GUARD
    while time.monotonic() < deadline:
        try:
            text = log_path.read_text(errors="replace")
        except OSError:
            text = ""
        for line in text.splitlines():
            if line.startswith("http://127.0.0.1:"):
                return line.strip()
        if process.poll() is not None:
            raise DevnetError(
                f"the chain server exited with {process.returncode}: {_log_tail(log_path)}"
            )
        time.sleep(0.05)
    raise DevnetError(f"the chain server gave no URL within {STARTUP_GUARD} s (see {log_path})")


def _start_node(node: NodeProcess) -> subprocess.Popen[bytes]:
    process = _popen_detached(["-m", NODE_MARKER, "--config", str(node.config_path)], node.log_path)
    node.process = process  # so NodeProcess.wait_ready watches this detached process
    return process


def _wait_connected(client: ControlClient, name: str) -> None:
    deadline = time.monotonic() + STARTUP_GUARD
    while time.monotonic() < deadline:
        if client.call("status")["hub_connected"]:
            return
        time.sleep(0.1)
    raise DevnetError(f"{name} did not connect to the hub within {STARTUP_GUARD} s")


def up(directory: Path, nodes: int, progress: Progress = lambda _line: None) -> Devnet:
    """Start a devnet of a hub and `nodes` users (u1..uN) on a new embedded chain in
    `directory`, and record it in `directory/devnet.json`. Returns the record.

    Raises DevnetError if `directory` already holds a running devnet, or if any step fails;
    in the latter case every process it started has been stopped.
    """
    if not 1 <= nodes <= MAX_NODES:
        raise DevnetError(f"--nodes must be 1..{MAX_NODES}")
    directory = directory.resolve()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DevnetError(f"cannot create {directory}: {exc.strerror or exc}") from None
    existing = read_devnet(directory) if (directory / DEVNET_FILE).exists() else None
    if existing is not None:
        alive = _running(existing)
        if alive:
            pids = ", ".join(str(pid) for _, pid, _ in alive)
            raise DevnetError(
                f"{directory} already holds a running devnet (pids {pids}); "
                f"stop it with 'weft devnet down --dir {directory}'"
            )
    _clear_stale(directory)

    started: list[subprocess.Popen[bytes]] = []
    try:
        progress("starting the chain server")
        chain_log = directory / CHAIN_LOG
        chain = _popen_detached(["-m", CHAIN_MARKER, "--port", "0"], chain_log)
        started.append(chain)
        url = _wait_chain_url(chain, chain_log)
        progress(f"chain at {url}; deploying the contracts and funding the accounts")
        users = tuple(f"u{i}" for i in range(1, nodes + 1))
        try:
            dep = trio.run(deploy, url, users)
        except Exception as exc:
            raise DevnetError(f"deployment failed: {type(exc).__name__}: {exc}") from None

        progress("starting the hub")
        hub = NodeProcess(
            directory, "hub", node_config(dep, "hub", listen_port=free_port()), dep.keys["hub"]
        )
        started.append(_start_node(hub))
        hub_info = hub.wait_ready()
        progress(f"starting {nodes} user node(s)")
        user_nodes = []
        for name in users:
            config = node_config(dep, "user", hub=hub_info.hub_entry, listen_port=free_port())
            user_nodes.append(NodeProcess(directory, name, config, dep.keys[name]))
        for node in user_nodes:
            started.append(_start_node(node))
        infos = [hub_info, *(node.wait_ready() for node in user_nodes)]
        for node in user_nodes:
            with ControlClient.from_data_dir(node.data_dir, timeout=CALL_TIMEOUT) as client:
                _wait_connected(client, node.name)

        progress("depositing the hub's reserve")
        with ControlClient.from_data_dir(hub.data_dir, timeout=CALL_TIMEOUT) as client:
            client.call("deposit_reserve", amount=assets_json(HUB_RESERVE))

        entries = tuple(
            DevnetNode(
                node.name,
                "hub" if node is hub else "user",
                info.address,
                info.peer_id,
                info.multiaddrs,
                info.control_port,
                info.pid,
                str(node.data_dir),
            )
            for node, info in zip([hub, *user_nodes], infos, strict=True)
        )
        devnet = Devnet(
            url,
            chain.pid,
            dep.manager.checksum(),
            dep.token.checksum(),
            dep.deployed_block,
            entries,
        )
        _write_devnet(directory, devnet)
        return devnet
    except BaseException as exc:
        for process in reversed(started):
            stop_process(process)
        if isinstance(exc, ProcessError):
            first = str(exc).splitlines()[0] if str(exc) else "a node failed"
            raise DevnetError(f"{first} (see its node.log in {directory})") from None
        if isinstance(exc, ControlError):
            raise DevnetError(f"control call failed: {exc}") from None
        if isinstance(exc, DevnetError) or not isinstance(exc, Exception):
            raise
        # e.g. an OSError, or the CliError of a node directory that is in the way
        raise DevnetError(f"{type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------- status


def _node_status(node: DevnetNode) -> NodeStatus:
    def result(alive: bool, error: str | None = None, **found: Any) -> NodeStatus:
        return NodeStatus(
            node.name,
            node.role,
            node.pid,
            node.control_port,
            alive,
            found.get("user"),
            found.get("hub"),
            found.get("threads"),
            error,
        )

    if not process_runs(node.pid, NODE_MARKER):
        return result(False, "not running")
    try:
        token = read_token(Path(node.data_dir))
    except OSError as exc:
        return result(False, f"cannot read its control token: {exc.strerror or exc}")
    try:
        with ControlClient(node.control_port, token, timeout=STATUS_TIMEOUT) as client:
            answer = client.call("status")
    except ControlError as exc:
        return result(False, str(exc))
    threads = sum(1 for t in answer["threads"] if t["phase"] not in ("final", "refused"))
    balance = answer.get("balance")
    if balance is None:
        return result(True, threads=threads)
    return result(True, user=Assets(*balance["user"]), hub=Assets(*balance["hub"]), threads=threads)


def status(directory: Path) -> tuple[Devnet, list[NodeStatus]] | None:
    """The devnet recorded in `directory` and what each of its nodes answers (a node that
    does not run or answer is reported as not alive); None if there is no devnet."""
    devnet = read_devnet(directory)
    if devnet is None:
        return None
    return devnet, [_node_status(node) for node in devnet.nodes]


# ---------------------------------------------------------------- down


def down(directory: Path) -> list[Stopped] | None:
    """Stop the processes recorded in `directory/devnet.json` (nodes, then the chain):
    SIGTERM, a bounded wait, SIGKILL for stragglers; then remove the record. Only a pid
    that still runs its recorded command is signalled. Returns what happened to each
    recorded process, or None if there is no record.
    """
    devnet = read_devnet(directory)
    if devnet is None:
        return None
    how: dict[int, str] = {}
    for group in (
        [p for p in devnet.processes() if p[2] == NODE_MARKER],
        [p for p in devnet.processes() if p[2] == CHAIN_MARKER],
    ):
        signalled = [p for p in group if _signal(p[1], p[2], signal.SIGTERM)]
        for _, pid, _ in group:
            how[pid] = "stopped" if any(pid == p[1] for p in signalled) else "not running"
        for _, pid, marker in _wait_gone(signalled, STOP_GUARD):
            if _signal(pid, marker, signal.SIGKILL):
                how[pid] = "killed"
        left = _wait_gone(signalled, STOP_GUARD)
        if left:
            names = ", ".join(f"{name} (pid {pid})" for name, pid, _ in left)
            raise DevnetError(f"still running after SIGKILL: {names}")
    (directory / DEVNET_FILE).unlink(missing_ok=True)
    return [Stopped(name, pid, how[pid]) for name, pid, _ in devnet.processes()]
