"""A local Weft devnet that outlives the command that started it: `weft devnet up|status|down`.

`up(dir, nodes, chain=...)` starts, each as a detached OS process in its own session, a
hub and `nodes` users (`python -m node.run`) on a chain, deploys and funds
(`devnet.processes.deploy`), has the hub deposit a reserve, and records everything in
`dir/devnet.json`. The chain is one of:

- "embedded": `python -m devnet.chain_server`, a process of the devnet (log `dir/chain.log`);
- "anvil": anvil on a free 127.0.0.1 port, a process of the devnet (`find_anvil`; log
  `dir/chain.log`, errors only);
- an http(s):// URL: a running development chain with a prefunded unlocked account
  ("external"); nothing is started for it and `down` leaves it running.

`status(dir)` asks every recorded node over its control interface; `down(dir)` stops
exactly the recorded processes. `up` and `down` hold an exclusive `flock` on `dir/.lock`
for their whole run: a second one on the same directory fails at once.

The record (`devnet.json`, JSON, replaced atomically at every change):

    {"complete": true,
     "chain": {"kind": "embedded" | "anvil" | "external", "url": "http://...", "pid": 123},
     "manager": "0x...", "token": "0x...", "deployed_block": 1,
     "nodes": [{"name": "hub", "role": "hub", "address": "0x...", "peer_id": "...",
                "multiaddrs": ["..."], "control_port": 40001, "pid": 124,
                "data_dir": "/abs/dir/hub/data"}, ...]}

`up` writes it as soon as it starts anything and rewrites it after each step (chain
started, deployed, each node started, each node ready) with `"complete": false` until the
devnet is fully up; what is not known yet is "" or 0 (an external chain's pid is always
0). So if `up` is killed midway, the record still names every process it started (except
one started in the instant before the record was rewritten), `down` stops them and
`status` reports the devnet as incomplete. A record without "complete" or "kind" is a
complete devnet on the embedded chain.

A recorded pid is only ever signalled while `/proc/<pid>/cmdline` still names the command
it was recorded for ("node.run", "devnet.chain_server" or "anvil"), so a recycled pid is
never hit. Every wait is bounded. Expected failures raise `DevnetError` (one line); `up`
stops what it started, and removes the record, before raising.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

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
    "ANVIL_INSTALL",
    "CHAIN_KINDS",
    "DEFAULT_DIR",
    "DEVNET_FILE",
    "Devnet",
    "DevnetError",
    "DevnetNode",
    "NodeStatus",
    "Stopped",
    "chain_kind",
    "describe_chain",
    "down",
    "find_anvil",
    "process_runs",
    "read_devnet",
    "status",
    "up",
]

DEFAULT_DIR: Final = Path(".weft-devnet")
DEVNET_FILE: Final = "devnet.json"
LOCK_FILE: Final = ".lock"
CHAIN_LOG: Final = "chain.log"
CHAIN_MARKER: Final = "devnet.chain_server"
ANVIL_MARKER: Final = "anvil"
NODE_MARKER: Final = "node.run"
CHAIN_KINDS: Final = ("embedded", "anvil", "external")
_CHAIN_MARKERS: Final = {"embedded": CHAIN_MARKER, "anvil": ANVIL_MARKER}
PINNED_ANVIL: Final = (
    REPO_ROOT / ".ci" / "anvil" / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin"
) / "anvil"
ANVIL_INSTALL: Final = "npm ci --prefix .ci/anvil"
ANVIL_HARDFORK: Final = "prague"  # the EVM version the artifacts are compiled for
ANVIL_ATTEMPTS: Final = 3  # ports tried (another process may take a free port meanwhile)
HUB_RESERVE: Final = Assets(100 * ETHER, 10**23)
STATUS_TIMEOUT: Final = 10.0  # seconds one status call may take
PROBE_TIMEOUT: Final = 5.0  # seconds an external chain may take to answer eth_chainId
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
    peer_id: str  # "" until the node is ready (then also multiaddrs and control_port)
    multiaddrs: tuple[str, ...]
    control_port: int
    pid: int
    data_dir: str


@dataclass(frozen=True, slots=True)
class Devnet:
    """What `devnet.json` records about a devnet (see the module docstring)."""

    chain_url: str
    chain_pid: int  # 0: no process (external chain, or not started yet)
    manager: str
    token: str
    deployed_block: int
    nodes: tuple[DevnetNode, ...]
    chain_kind: str = "embedded"  # one of CHAIN_KINDS
    complete: bool = True  # False while `up` runs, or if it was killed midway

    def to_json(self) -> dict[str, Any]:
        return {
            "complete": self.complete,
            "chain": {"kind": self.chain_kind, "url": self.chain_url, "pid": self.chain_pid},
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
            kind = raw["chain"].get("kind", "embedded")
            if kind not in CHAIN_KINDS:
                raise ValueError(f"unknown chain kind {kind!r}")
            complete = raw.get("complete", True)
            if not isinstance(complete, bool):
                raise ValueError(f"'complete' is not true or false: {complete!r}")
            return cls(
                str(raw["chain"]["url"]),
                int(raw["chain"]["pid"]),
                str(raw["manager"]),
                str(raw["token"]),
                int(raw["deployed_block"]),
                nodes,
                kind,
                complete,
            )
        except (AssertionError, AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed devnet record ({type(exc).__name__}: {exc})") from None

    @property
    def chain_marker(self) -> str | None:
        """What the chain process's command line names; None if the devnet runs none."""
        return _CHAIN_MARKERS.get(self.chain_kind)

    def processes(self) -> list[tuple[str, int, str]]:
        """(name, pid, cmdline marker) of every recorded process: nodes, then the chain
        (if the devnet started one)."""
        recorded = [(n.name, n.pid, NODE_MARKER) for n in self.nodes if n.pid > 0]
        marker = self.chain_marker
        if marker is not None and self.chain_pid > 0:
            recorded.append(("chain", self.chain_pid, marker))
        return recorded

    def with_node(self, node: DevnetNode) -> Devnet:
        """This record with `node` added, or replacing the node of the same name."""
        others = tuple(n for n in self.nodes if n.name != node.name)
        if len(others) == len(self.nodes):
            return replace(self, nodes=(*self.nodes, node))
        return replace(self, nodes=tuple(node if n.name == node.name else n for n in self.nodes))


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


# ---------------------------------------------------------------- the chain argument


def chain_kind(chain: str) -> str:
    """The kind ("embedded", "anvil" or "external") of a `--chain` value: "embedded",
    "anvil" or an http(s):// URL. DevnetError for anything else."""
    if chain in ("embedded", "anvil"):
        return chain
    parts = urlsplit(chain)
    if parts.scheme in ("http", "https") and parts.hostname and chain.isprintable():
        return "external"
    raise DevnetError(
        f"--chain must be 'embedded', 'anvil' or the http(s):// URL of a running chain, "
        f"not {chain!r}"
    )


def find_anvil() -> str | None:
    """Path of the anvil binary to use: `$WEFT_ANVIL`, the pinned npm package installed by
    `npm ci --prefix .ci/anvil`, or `anvil` on PATH; None if there is none."""
    chosen = os.environ.get("WEFT_ANVIL")
    if chosen:
        return chosen
    if PINNED_ANVIL.is_file() and os.access(PINNED_ANVIL, os.X_OK):
        return str(PINNED_ANVIL)
    return shutil.which("anvil")


def _anvil_binary() -> str:
    binary = find_anvil()
    if binary is None:
        raise DevnetError(
            f"anvil is not installed: run '{ANVIL_INSTALL}' in {REPO_ROOT} "
            "(or put anvil on PATH, or set WEFT_ANVIL to its path)"
        )
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise DevnetError(
            f"anvil not found: WEFT_ANVIL={binary!r} is not an executable file (install anvil "
            f"with '{ANVIL_INSTALL}' in {REPO_ROOT} and unset WEFT_ANVIL, or point it at anvil)"
        )
    return binary


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _chain_id(url: str, timeout: float) -> int:
    """The chain id that `url` answers to `eth_chainId`; DevnetError if it does not."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
    request = urllib.request.Request(
        url, data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(json.loads(response.read())["result"], 16)
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:
        reason = str(exc.reason)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = _one_line(exc)
    raise DevnetError(f"no JSON-RPC chain answers eth_chainId at {url}: {reason}")


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


# ---------------------------------------------------------------- the devnet file and lock


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


def _write_devnet(directory: Path, devnet: Devnet) -> Devnet:
    """Replace the record in `directory` by `devnet` (atomically); returns `devnet`."""
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
    return devnet


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold the exclusive lock of `directory` (`flock` on `directory/.lock`); DevnetError
    at once if another process holds it. The lock goes with this process (also on
    SIGKILL); started processes do not inherit it."""
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise DevnetError(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DevnetError(f"another weft devnet command is running in {directory}") from None
        yield
    finally:
        os.close(fd)


def _running(devnet: Devnet) -> list[tuple[str, int, str]]:
    return [p for p in devnet.processes() if process_runs(p[1], p[2])]


def _clear_stale(directory: Path) -> None:
    """Remove what an earlier, stopped devnet left in `directory`: its record (and any
    temporary copy), chain log and node directories (only `hub`/`u<N>` directories holding
    a node config and key)."""
    (directory / DEVNET_FILE).unlink(missing_ok=True)
    (directory / CHAIN_LOG).unlink(missing_ok=True)
    for tmp in directory.glob(f".{DEVNET_FILE}.*.tmp"):  # from an `up` killed mid-write
        tmp.unlink(missing_ok=True)
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


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start `argv` in its own session (it outlives this process), output to `log_path`."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            argv,
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


def _wait_anvil(process: subprocess.Popen[bytes], url: str, log_path: Path) -> bool:
    """Wait until the anvil `process` answers at `url` (True), or exits (False)."""
    deadline = time.monotonic() + STARTUP_GUARD
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with contextlib.suppress(DevnetError):
            _chain_id(url, 1.0)
            return process.poll() is None  # not another process's port
        time.sleep(0.05)
    raise DevnetError(f"anvil did not answer on {url} within {STARTUP_GUARD} s (see {log_path})")


def _start_chain(
    directory: Path,
    net: Devnet,
    binary: str | None,
    started: list[subprocess.Popen[bytes]],
) -> Devnet:
    """Start the devnet's chain process (embedded or anvil); record it at once, and again
    with its URL once it answers. Returns the record."""
    log_path = directory / CHAIN_LOG
    if binary is None:
        chain = _spawn([sys.executable, "-m", CHAIN_MARKER, "--port", "0"], log_path)
        started.append(chain)
        net = _write_devnet(directory, replace(net, chain_pid=chain.pid))
        url = _wait_chain_url(chain, log_path)
        return _write_devnet(directory, replace(net, chain_url=url))
    for _ in range(ANVIL_ATTEMPTS):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [binary, "--host", "127.0.0.1", "--port", str(port), "--hardfork", ANVIL_HARDFORK]
        chain = _spawn([*argv, "--quiet"], log_path)
        started.append(chain)
        net = _write_devnet(directory, replace(net, chain_url=url, chain_pid=chain.pid))
        if _wait_anvil(chain, url, log_path):
            return net
        stop_process(chain)  # most likely the port was taken meanwhile: try another
        started.remove(chain)
    raise DevnetError(f"anvil exited with {chain.returncode}: {_log_tail(log_path)}")


def _start_node(node: NodeProcess) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", NODE_MARKER, "--config", str(node.config_path)]
    process = _spawn(argv, node.log_path)
    node.process = process  # so NodeProcess.wait_ready watches this detached process
    return process


def _wait_connected(client: ControlClient, name: str) -> None:
    deadline = time.monotonic() + STARTUP_GUARD
    while time.monotonic() < deadline:
        if client.call("status")["hub_connected"]:
            return
        time.sleep(0.1)
    raise DevnetError(f"{name} did not connect to the hub within {STARTUP_GUARD} s")


def up(
    directory: Path,
    nodes: int,
    progress: Progress = lambda _line: None,
    *,
    chain: str = "embedded",
) -> Devnet:
    """Start a devnet of a hub and `nodes` users (u1..uN) in `directory` on `chain`
    ("embedded", "anvil" or the http(s):// URL of a running development chain with a
    prefunded unlocked account), and record it in `directory/devnet.json`, step by step.
    Returns the complete record.

    Raises DevnetError if the arguments are bad, anvil is not installed, the chain URL does
    not answer, another devnet command runs in `directory`, `directory` already holds a
    running devnet, or any step fails; in the last case every process it started has been
    stopped and the record removed.
    """
    if not 1 <= nodes <= MAX_NODES:
        raise DevnetError(f"--nodes must be 1..{MAX_NODES}")
    kind = chain_kind(chain)
    binary = _anvil_binary() if kind == "anvil" else None
    directory = directory.resolve()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DevnetError(f"cannot create {directory}: {exc.strerror or exc}") from None
    with _locked(directory):
        existing = read_devnet(directory)
        alive = _running(existing) if existing is not None else []
        if existing is not None and alive:
            pids = ", ".join(str(pid) for _, pid, _ in alive)
            what = "a running devnet" if existing.complete else "an incomplete devnet that runs"
            raise DevnetError(
                f"{directory} already holds {what} (pids {pids}); "
                f"stop it with 'weft devnet down --dir {directory}'"
            )
        if kind == "external":
            _chain_id(chain, PROBE_TIMEOUT)
        _clear_stale(directory)
        return _up(directory, nodes, progress, kind, chain, binary)


def _up(
    directory: Path, nodes: int, progress: Progress, kind: str, chain: str, binary: str | None
) -> Devnet:
    """The steps of `up` in `directory`, locked and cleared; on failure, stop what was
    started, remove the record and raise DevnetError."""
    net = Devnet("", 0, "", "", 0, (), kind, complete=False)
    started: list[subprocess.Popen[bytes]] = []
    try:
        if kind == "external":
            net = _write_devnet(directory, replace(net, chain_url=chain))
        else:
            progress(
                "starting the chain server" if binary is None else f"starting anvil ({binary})"
            )
            net = _start_chain(directory, net, binary, started)
        url = net.chain_url
        progress(f"chain at {url}; deploying the contracts and funding the accounts")
        users = tuple(f"u{i}" for i in range(1, nodes + 1))
        try:
            dep = trio.run(deploy, url, users)
        except Exception as exc:
            hint = " (it needs a prefunded unlocked account)" if kind == "external" else ""
            raise DevnetError(f"deployment failed on {url}{hint}: {_one_line(exc)}") from None
        net = _write_devnet(
            directory,
            replace(
                net,
                manager=dep.manager.checksum(),
                token=dep.token.checksum(),
                deployed_block=dep.deployed_block,
            ),
        )

        def started_node(net: Devnet, node: NodeProcess, role: str) -> Devnet:
            process = _start_node(node)
            started.append(process)
            address = dep.address(node.name).checksum()
            entry = DevnetNode(node.name, role, address, "", (), 0, process.pid, str(node.data_dir))
            return _write_devnet(directory, net.with_node(entry))

        def ready_node(net: Devnet, node: NodeProcess, role: str) -> Devnet:
            info = node.wait_ready()
            entry = DevnetNode(
                node.name,
                role,
                info.address,
                info.peer_id,
                info.multiaddrs,
                info.control_port,
                info.pid,
                str(node.data_dir),
            )
            return _write_devnet(directory, net.with_node(entry))

        progress("starting the hub")
        hub = NodeProcess(
            directory, "hub", node_config(dep, "hub", listen_port=free_port()), dep.keys["hub"]
        )
        net = started_node(net, hub, "hub")
        net = ready_node(net, hub, "hub")
        assert hub.info is not None
        progress(f"starting {nodes} user node(s)")
        user_nodes = [
            NodeProcess(
                directory,
                name,
                node_config(dep, "user", hub=hub.info.hub_entry, listen_port=free_port()),
                dep.keys[name],
            )
            for name in users
        ]
        for node in user_nodes:
            net = started_node(net, node, "user")
        for node in user_nodes:
            net = ready_node(net, node, "user")
        for node in user_nodes:
            with ControlClient.from_data_dir(node.data_dir, timeout=CALL_TIMEOUT) as client:
                _wait_connected(client, node.name)

        progress("depositing the hub's reserve")
        with ControlClient.from_data_dir(hub.data_dir, timeout=CALL_TIMEOUT) as client:
            client.call("deposit_reserve", amount=assets_json(HUB_RESERVE))
        return _write_devnet(directory, replace(net, complete=True))
    except BaseException as exc:
        for process in reversed(started):
            stop_process(process)
        (directory / DEVNET_FILE).unlink(missing_ok=True)
        if isinstance(exc, ProcessError):
            first = str(exc).splitlines()[0] if str(exc) else "a node failed"
            raise DevnetError(f"{first} (see its node.log in {directory})") from None
        if isinstance(exc, ControlError):
            raise DevnetError(f"control call failed: {exc}") from None
        if isinstance(exc, DevnetError) or not isinstance(exc, Exception):
            raise
        # e.g. an OSError, or the CliError of a node directory that is in the way
        raise DevnetError(_one_line(exc)) from None


# ---------------------------------------------------------------- status


def describe_chain(devnet: Devnet) -> str:
    """One line on the devnet's chain: its kind, URL and, if the devnet runs it, its pid
    and whether it runs."""
    url = devnet.chain_url or "(no URL yet)"
    marker = devnet.chain_marker
    if marker is None:
        return f"external {url} (not started or stopped by the devnet)"
    state = "up" if process_runs(devnet.chain_pid, marker) else "down"
    return f"{devnet.chain_kind} {url} (pid {devnet.chain_pid}, {state})"


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
    if node.control_port == 0:
        return result(False, "not ready (the devnet is incomplete)")
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
    """The devnet recorded in `directory` (`Devnet.complete` is False while `up` runs or
    if it was killed midway; `describe_chain` tells of its chain) and what each of its
    nodes answers (a node that does not run or answer is reported as not alive); None if
    there is no devnet."""
    devnet = read_devnet(directory)
    if devnet is None:
        return None
    return devnet, [_node_status(node) for node in devnet.nodes]


# ---------------------------------------------------------------- down


def down(directory: Path) -> list[Stopped] | None:
    """Stop the processes recorded in `directory/devnet.json` (nodes, then the chain if the
    devnet started it; an external chain is left alone): SIGTERM, a bounded wait, SIGKILL
    for stragglers; then remove the record. Only a pid that still runs its recorded command
    is signalled. Returns what happened to each recorded process, or None if there is no
    record. DevnetError if another devnet command runs in `directory`, or a process
    outlives SIGKILL.
    """
    if not directory.is_dir():
        return None
    with _locked(directory):
        devnet = read_devnet(directory)
        if devnet is None:
            return None
        how: dict[int, str] = {}
        processes = devnet.processes()
        for group in (
            [p for p in processes if p[2] == NODE_MARKER],
            [p for p in processes if p[2] != NODE_MARKER],
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
        return [Stopped(name, pid, how[pid]) for name, pid, _ in processes]
