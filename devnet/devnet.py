"""A local Weft devnet that outlives the command that started it: `weft devnet up|status|down`.

`up(dir, nodes, chain=...)` starts, each as a detached OS process in its own session, a
hub and `nodes` users (`python -m node.run`) on a chain, deploys and funds
(`devnet.processes.deploy`), has the hub deposit a reserve, and records everything in
`dir/devnet.json`. The chain is one of:

- "embedded": `python -m devnet.chain_server`, a process of the devnet (log `dir/chain.log`);
- "anvil": anvil on a free 127.0.0.1 port, a process of the devnet (`find_anvil`; log
  `dir/chain.log`, errors only); a start only counts once the socket listening on that
  port belongs to the anvil process (`/proc/net/tcp` against `/proc/<pid>/fd`), else
  another port is tried;
- an http(s):// URL: a running development chain with a prefunded unlocked account
  ("external"); nothing is started for it and `down` leaves it running.

Each node has its directory `dir/<name>` (`hub`, `u1`, ...): `node.key`, `config.json`,
`node.log`, `data/` and `devnet-chain` (the kind of chain the node was made for).

`status(dir)` asks every recorded node over its control interface (users: their channel's
balances; the hub: its reserve; all: channels held and open threads); `down(dir)` stops
exactly the recorded processes. `up` and `down` hold an exclusive `flock` on `dir/.lock`
for their whole run: a second one on the same directory fails at once.

The record (`devnet.json`, JSON, replaced atomically at every change):

    {"complete": true,
     "chain": {"kind": "embedded" | "anvil" | "external", "url": "http://...", "pid": 123,
               "start_time": 4567, "argv": ["/usr/bin/python3", "-m", ...]},
     "manager": "0x...", "token": "0x...", "deployed_block": 1,
     "nodes": [{"name": "hub", "role": "hub", "address": "0x...", "peer_id": "...",
                "multiaddrs": ["..."], "control_port": 40001, "pid": 124,
                "data_dir": "/abs/dir/hub/data", "start_time": 4570,
                "argv": ["/usr/bin/python3", "-m", "node.run", "--config", "..."]}, ...]}

`start_time` is field 22 of `/proc/<pid>/stat` (clock ticks after boot) and `argv` the
process's command line (`/proc/<pid>/cmdline`), both read just after the process was
started. `up` writes the record as soon as it starts anything and rewrites it after each
step (chain started, deployed, each node started, each node ready) with
`"complete": false` until the devnet is fully up; what is not known yet is "", 0 or []
(an external chain's pid and start_time are always 0). So if `up` is killed midway, the
record still names every process it started (except one started in the instant before
the record was rewritten), `down` stops them and `status` reports the devnet as
incomplete. A record without "complete" or "kind" is a complete devnet on the embedded
chain.

A recorded pid counts as running, and is signalled, only while its start time and its
command line are exactly the recorded ones (the check and the signal go through a pidfd,
so the pid cannot be recycled in between): a recycled pid is never hit, even by a process
running the same command. A record written before `start_time` and `argv` were recorded
(both absent, or 0 and []) is still read; for it a pid counts only if its command line,
after the program path, is exactly the command the devnet starts for that process
(`-m node.run --config <the node's config.json>`, `-m devnet.chain_server --port 0`, or
anvil's arguments with the recorded URL's port) — a word in the command line is not
enough — and a chain whose command cannot be derived (an anvil record without a URL) is
never signalled. Every wait is bounded. Expected failures raise `DevnetError` (one line);
`up` stops what it started, and removes the record, before raising. A `devnet.json` that
cannot be read is never overwritten or removed by these commands: the error says to
remove it once no devnet runs there.

`up` first removes what a stopped devnet left in `dir` (its record, chain log and node
directories), but it refuses to delete node keys that may hold funds on a chain that
outlives the devnet: those of a devnet on an external chain, or whose chain is not known
(a node directory without `devnet-chain` that no record names); the user moves `dir`
aside or passes another `--dir`.
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
from node.control import ControlClient, ControlError, assets_json, assets_of, read_token
from protocols.types import Assets

__all__ = [
    "ANVIL_INSTALL",
    "CHAIN_KINDS",
    "DEFAULT_DIR",
    "DEVNET_FILE",
    "Devnet",
    "DevnetError",
    "DevnetNode",
    "Identity",
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
NODE_CHAIN_FILE: Final = "devnet-chain"  # in a node's directory: the kind of its chain
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
class Identity:
    """Which process a recorded pid must be to count as ours (see the module docstring)."""

    marker: str  # NODE_MARKER, CHAIN_MARKER or ANVIL_MARKER: what kind of process it is
    start_time: int  # field 22 of /proc/<pid>/stat; 0: not recorded (an older record)
    argv: tuple[str, ...]  # its command line; (): not recorded (an older record)
    expected_tail: tuple[str, ...] = ()  # older records: its command line after argv[0]

    def matches(self, pid: int, argv: tuple[str, ...]) -> bool:
        """Whether the live process `pid`, whose command line is `argv`, is this one."""
        if self.start_time > 0 and self.argv:
            return argv == self.argv and _start_time(pid) == self.start_time
        return bool(self.expected_tail) and argv[1:] == self.expected_tail


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
    start_time: int = 0  # of the process `pid` (see Identity); 0 in older records
    argv: tuple[str, ...] = ()  # its command line; () in older records

    def identity(self) -> Identity:
        config = str(Path(self.data_dir).parent / "config.json")
        return Identity(
            NODE_MARKER, self.start_time, self.argv, ("-m", NODE_MARKER, "--config", config)
        )


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
    chain_start_time: int = 0  # of the process `chain_pid` (see Identity); 0: not recorded
    chain_argv: tuple[str, ...] = ()  # its command line; (): not recorded

    def to_json(self) -> dict[str, Any]:
        return {
            "complete": self.complete,
            "chain": {
                "kind": self.chain_kind,
                "url": self.chain_url,
                "pid": self.chain_pid,
                "start_time": self.chain_start_time,
                "argv": list(self.chain_argv),
            },
            "manager": self.manager,
            "token": self.token,
            "deployed_block": self.deployed_block,
            "nodes": [
                {**asdict(n), "multiaddrs": list(n.multiaddrs), "argv": list(n.argv)}
                for n in self.nodes
            ],
        }

    @classmethod
    def from_json(cls, raw: object) -> Devnet:
        """Raises ValueError (saying what is wrong) on a malformed record."""
        record = _object(raw, "the record")
        chain = _object(_need(record, "chain", "the record"), "'chain'")
        kind = _need(chain, "kind", "'chain'", default="embedded")
        if kind not in CHAIN_KINDS:
            raise ValueError(f"unknown chain kind {_brief(kind)}")
        complete = _need(record, "complete", "the record", default=True)
        if not isinstance(complete, bool):
            raise ValueError(f"'complete' is not true or false: {_brief(complete)}")
        raw_nodes = _need(record, "nodes", "the record")
        if not isinstance(raw_nodes, list) or len(raw_nodes) > MAX_NODES + 1:
            raise ValueError(f"'nodes' is not a list of at most {MAX_NODES + 1} nodes")
        nodes = tuple(_node_of(n, f"node {i + 1}") for i, n in enumerate(raw_nodes))
        names = [n.name for n in nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"a node name appears twice: {', '.join(names)}")
        return cls(
            _string(chain, "url", "'chain'"),
            _integer(chain, "pid", "'chain'"),
            _string(record, "manager", "the record"),
            _string(record, "token", "the record"),
            _integer(record, "deployed_block", "the record"),
            nodes,
            kind,
            complete,
            _integer(chain, "start_time", "'chain'", default=0),
            _strings(chain, "argv", "'chain'", default=()),
        )

    def chain_identity(self) -> Identity | None:
        """Which process the chain must be; None if the devnet runs none (external)."""
        marker = _CHAIN_MARKERS.get(self.chain_kind)
        if marker is None:
            return None
        tail: tuple[str, ...] = ()
        if marker == CHAIN_MARKER:
            tail = ("-m", CHAIN_MARKER, "--port", "0")
        else:
            with contextlib.suppress(ValueError):
                port = urlsplit(self.chain_url).port
                if port is not None:
                    tail = _anvil_args(port)
        return Identity(marker, self.chain_start_time, self.chain_argv, tail)

    @property
    def chain_marker(self) -> str | None:
        """What the chain process's command line names; None if the devnet runs none."""
        return _CHAIN_MARKERS.get(self.chain_kind)

    def processes(self) -> list[tuple[str, int, Identity]]:
        """(name, pid, identity) of every recorded process: nodes, then the chain (if the
        devnet started one). `process_runs(pid, identity)` tells whether it still runs."""
        recorded = [(n.name, n.pid, n.identity()) for n in self.nodes if n.pid > 0]
        chain = self.chain_identity()
        if chain is not None and self.chain_pid > 0:
            recorded.append(("chain", self.chain_pid, chain))
        return recorded

    def with_node(self, node: DevnetNode) -> Devnet:
        """This record with `node` added, or replacing the node of the same name."""
        others = tuple(n for n in self.nodes if n.name != node.name)
        if len(others) == len(self.nodes):
            return replace(self, nodes=(*self.nodes, node))
        return replace(self, nodes=tuple(node if n.name == node.name else n for n in self.nodes))


_REQUIRED: Final = object()


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a JSON object: {_brief(value)}")
    return value


def _need(obj: dict[str, Any], key: str, where: str, default: Any = _REQUIRED) -> Any:
    if key in obj:
        return obj[key]
    if default is _REQUIRED:
        raise ValueError(f"{where} has no {key!r}")
    return default


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = _need(obj, key, where)
    if not isinstance(value, str):
        raise ValueError(f"{key!r} of {where} is not a string: {_brief(value)}")
    return value


def _integer(obj: dict[str, Any], key: str, where: str, *, default: int | None = None) -> int:
    value = _need(obj, key, where, _REQUIRED if default is None else default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ValueError(f"{key!r} of {where} is not a natural number: {_brief(value)}")
    return value


def _strings(
    obj: dict[str, Any], key: str, where: str, *, default: tuple[str, ...] | None = None
) -> tuple[str, ...]:
    value = _need(obj, key, where, _REQUIRED if default is None else default)
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key!r} of {where} is not a list of strings: {_brief(value)}")
    return tuple(value)


def _node_of(raw: object, where: str) -> DevnetNode:
    node = _object(raw, where)
    name = _string(node, "name", where)
    where = f"node {name!r}"
    role = _string(node, "role", where)
    if role not in ("hub", "user"):
        raise ValueError(f"the role of {where} is not 'hub' or 'user': {_brief(role)}")
    port = _integer(node, "control_port", where)
    if port > 65535:
        raise ValueError(f"the control_port of {where} is not a port: {port}")
    return DevnetNode(
        name,
        role,
        _string(node, "address", where),
        _string(node, "peer_id", where),
        _strings(node, "multiaddrs", where),
        port,
        _integer(node, "pid", where),
        _string(node, "data_dir", where),
        _integer(node, "start_time", where, default=0),
        _strings(node, "argv", where, default=()),
    )


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
    channels: int | None = None  # channels the node holds (a user: 1 once it has its own)
    reserve: Assets | None = None  # the hub only: its reserve in the manager


@dataclass(frozen=True, slots=True)
class Stopped:
    name: str
    pid: int
    how: str  # "stopped" (SIGTERM), "killed" (SIGKILL), "not running" (maybe with why)


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


def _command_line(pid: int) -> tuple[str, ...] | None:
    """The command line of `pid` (`/proc/<pid>/cmdline`): () for a zombie, None if there
    is no such process."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    parts = raw.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    return tuple(os.fsdecode(part) for part in parts)


def _start_time(pid: int) -> int | None:
    """When `pid` started: field 22 of `/proc/<pid>/stat` (clock ticks after boot, counted
    after the command name, which may hold spaces and parentheses); None if unknown."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
        return int(raw[raw.rindex(b")") + 2 :].split()[22 - 3])
    except (OSError, ValueError, IndexError):
        return None


def _identity_of(process: subprocess.Popen[bytes], argv: list[str]) -> tuple[int, tuple[str, ...]]:
    """(start time, command line) of a process just started with `argv` (`Popen` returns
    once it has exec'd); `argv` if it has already exited."""
    return _start_time(process.pid) or 0, _command_line(process.pid) or tuple(argv)


def process_runs(pid: int, what: Identity | str) -> bool:
    """Whether `pid` is a live process that is `what`: the recorded process of an
    `Identity` (from `Devnet.processes`; see the module docstring), or, given a string,
    any process whose command line contains it (only to tell whether something runs,
    never to decide what to signal)."""
    if pid <= 0:
        return False
    _reap(pid)
    argv = _command_line(pid)
    if not argv:  # gone, or a zombie
        return False
    if isinstance(what, str):
        return what in " ".join(argv)
    return what.matches(pid, argv)


def _signal(pid: int, identity: Identity, sig: int) -> bool:
    """Send `sig` to `pid` if it is still the recorded process; whether it was sent. The
    check and the signal go through one pidfd: a pid recycled in between is not hit."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:  # no pidfd (a kernel before 5.3): check, then kill by pid
        fd = -1
    try:
        if not process_runs(pid, identity):
            return False
        if fd >= 0:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        if fd >= 0:
            os.close(fd)


Recorded = tuple[str, int, Identity]


def _wait_gone(procs: Iterable[Recorded], timeout: float) -> list[Recorded]:
    """Wait up to `timeout` seconds for `procs` to end; those still running."""
    pending = list(procs)
    deadline = time.monotonic() + timeout
    while True:
        pending = [p for p in pending if process_runs(p[1], p[2])]
        if not pending or time.monotonic() >= deadline:
            return pending
        time.sleep(0.05)


def _anvil_args(port: int) -> tuple[str, ...]:
    """anvil's arguments after its path, for `port`."""
    return ("--host", "127.0.0.1", "--port", str(port), "--hardfork", ANVIL_HARDFORK, "--quiet")


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes of the TCP sockets listening on `port` (any address, IPv4 or IPv6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid
            # timeout inode ...; an address is HEX_IP:HEX_PORT; state 0A is LISTEN
            if len(fields) > 9 and fields[3] == "0A" and fields[1].endswith(f":{port:04X}"):
                found.add(fields[9])
    return found


def _listens_on(pid: int, port: int) -> bool:
    """Whether `pid` holds a socket listening on TCP `port` (so it is what answers there)."""
    inodes = _listening_inodes(port)
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


# ---------------------------------------------------------------- the devnet file and lock


def read_devnet(directory: Path) -> Devnet | None:
    """The devnet recorded in `directory`, or None if there is none; DevnetError if the
    record cannot be read (a malformed one: saying to remove it if no devnet runs)."""
    path = directory / DEVNET_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DevnetError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return Devnet.from_json(json.loads(raw))
    except (ValueError, RecursionError) as exc:  # also not JSON, not UTF-8, nested too deep
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DevnetError(
            f"{path} is not a readable devnet record ({reason}); if no devnet runs in "
            f"{directory}, remove {path} (if one does, stop its processes first)"
        ) from None


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


def _running(devnet: Devnet) -> list[Recorded]:
    return [p for p in devnet.processes() if process_runs(p[1], p[2])]


def _node_chain(entry: Path, stale: Devnet | None) -> str | None:
    """The kind of chain the node directory `entry` was made for: its `devnet-chain`
    file, else the stale record's chain if it names the node; None if not known."""
    try:
        written = (entry / NODE_CHAIN_FILE).read_text().strip()
    except OSError:
        written = ""
    if written in CHAIN_KINDS:
        return written
    if stale is not None and any(n.name == entry.name for n in stale.nodes):
        return stale.chain_kind
    return None


def _clear_stale(directory: Path, stale: Devnet | None) -> None:
    """Remove what an earlier, stopped devnet (recorded as `stale`, if at all) left in
    `directory`: its record (and any temporary copy), chain log and node directories
    (only `hub`/`u<N>` directories holding a node config and key). DevnetError, removing
    nothing, if a node directory's key may hold funds on a chain that outlives the devnet:
    its chain was external, or is not known."""
    node_dirs = [
        entry
        for entry in sorted(directory.iterdir())
        if _NODE_DIR.match(entry.name)
        and entry.is_dir()
        and not entry.is_symlink()
        and (entry / "config.json").is_file()
        and (entry / "node.key").is_file()
    ]
    chains = {entry.name: _node_chain(entry, stale) for entry in node_dirs}
    external = [name for name, kind in chains.items() if kind == "external"]
    unknown = [name for name, kind in chains.items() if kind is None]
    if external or unknown:
        what = (
            f"ran on an external chain ({', '.join(external)})"
            if external
            else f"ran on a chain this devnet cannot tell ({', '.join(unknown)})"
        )
        raise DevnetError(
            f"{directory} holds the node keys of an earlier devnet that {what}, where they "
            f"may still hold funds; move {directory} aside or pass another --dir"
        )
    (directory / DEVNET_FILE).unlink(missing_ok=True)
    (directory / CHAIN_LOG).unlink(missing_ok=True)
    for tmp in directory.glob(f".{DEVNET_FILE}.*.tmp"):  # from an `up` killed mid-write
        tmp.unlink(missing_ok=True)
    for entry in node_dirs:
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


def _wait_anvil(process: subprocess.Popen[bytes], port: int, log_path: Path) -> str | None:
    """Wait until the anvil `process` answers on 127.0.0.1:`port` and holds the socket
    listening there (so the answer is its own): None; or why not (it exited, or another
    process answers on the port)."""
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_GUARD
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"anvil exited with {process.returncode}: {_log_tail(log_path)}"
        with contextlib.suppress(DevnetError):
            _chain_id(url, 1.0)
            if process.poll() is None and _listens_on(process.pid, port):
                return None
            return f"another process answers on port {port}"
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
        argv = [sys.executable, "-m", CHAIN_MARKER, "--port", "0"]
        chain = _spawn(argv, log_path)
        started.append(chain)
        start_time, cmdline = _identity_of(chain, argv)
        net = _write_devnet(
            directory,
            replace(net, chain_pid=chain.pid, chain_start_time=start_time, chain_argv=cmdline),
        )
        url = _wait_chain_url(chain, log_path)
        return _write_devnet(directory, replace(net, chain_url=url))
    why = "anvil did not start"
    for _ in range(ANVIL_ATTEMPTS):
        port = free_port()
        argv = [binary, *_anvil_args(port)]
        chain = _spawn(argv, log_path)
        started.append(chain)
        start_time, cmdline = _identity_of(chain, argv)
        net = _write_devnet(
            directory,
            replace(
                net,
                chain_url=f"http://127.0.0.1:{port}",
                chain_pid=chain.pid,
                chain_start_time=start_time,
                chain_argv=cmdline,
            ),
        )
        failed = _wait_anvil(chain, port, log_path)
        if failed is None:
            return net
        why = failed
        stop_process(chain)  # most likely the port was taken meanwhile: try another
        started.remove(chain)
    raise DevnetError(f"anvil did not start in {ANVIL_ATTEMPTS} attempts; the last: {why}")


def _start_node(node: NodeProcess) -> tuple[subprocess.Popen[bytes], int, tuple[str, ...]]:
    """Start `node` detached: its process, start time and command line."""
    argv = [sys.executable, "-m", NODE_MARKER, "--config", str(node.config_path)]
    process = _spawn(argv, node.log_path)
    node.process = process  # so NodeProcess.wait_ready watches this detached process
    return (process, *_identity_of(process, argv))


def _node_dir(directory: Path, name: str, kind: str) -> None:
    """Create the directory of node `name` and note in it the kind of its chain (before
    its key is written, so a key is never left without it)."""
    path = directory / name
    path.mkdir(exist_ok=True)
    if (path / "node.key").exists():
        raise DevnetError(f"{path} already holds a node key; move it aside")
    (path / NODE_CHAIN_FILE).write_text(f"{kind}\n")


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
        _clear_stale(directory, existing)
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
            process, start_time, argv = _start_node(node)
            started.append(process)
            address = dep.address(node.name).checksum()
            data_dir = str(node.data_dir)
            entry = DevnetNode(node.name, role, address, "", (), 0, process.pid, data_dir)
            entry = replace(entry, start_time=start_time, argv=argv)
            return _write_devnet(directory, net.with_node(entry))

        def ready_node(net: Devnet, node: NodeProcess) -> Devnet:
            info = node.wait_ready()  # the pid is the started one's (it checks)
            entry = next(n for n in net.nodes if n.name == node.name)
            entry = replace(
                entry,
                address=info.address,
                peer_id=info.peer_id,
                multiaddrs=info.multiaddrs,
                control_port=info.control_port,
            )
            return _write_devnet(directory, net.with_node(entry))

        progress("starting the hub")
        _node_dir(directory, "hub", kind)
        hub = NodeProcess(
            directory, "hub", node_config(dep, "hub", listen_port=free_port()), dep.keys["hub"]
        )
        net = started_node(net, hub, "hub")
        net = ready_node(net, hub)
        assert hub.info is not None
        progress(f"starting {nodes} user node(s)")
        for name in users:
            _node_dir(directory, name, kind)
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
            net = ready_node(net, node)
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
    identity = devnet.chain_identity()
    if identity is None:
        return f"external {url} (not started or stopped by the devnet)"
    state = "up" if process_runs(devnet.chain_pid, identity) else "down"
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
            found.get("channels"),
            found.get("reserve"),
        )

    if not process_runs(node.pid, node.identity()):
        return result(False, "not running")
    if node.control_port == 0:
        return result(False, "not ready (the devnet is incomplete)")
    try:
        token = read_token(Path(node.data_dir))
    except OSError as exc:
        return result(False, f"cannot read its control token: {exc.strerror or exc}")
    reserve: Assets | None = None
    try:
        with ControlClient(node.control_port, token, timeout=STATUS_TIMEOUT) as client:
            answer = client.call("status")
            if node.role == "hub":
                with contextlib.suppress(ControlError):  # e.g. a chain read failed: "-"
                    reserve = assets_of(client.call("reserve"))
    except ControlError as exc:
        return result(False, str(exc))
    try:
        threads = sum(1 for t in answer["threads"] if t["phase"] not in ("final", "refused"))
        channels = int(answer["channels"])
        balance = answer.get("balance")
        found: dict[str, Any] = {"threads": threads, "channels": channels, "reserve": reserve}
        if balance is not None:
            found.update(user=assets_of(balance["user"]), hub=assets_of(balance["hub"]))
    except (KeyError, TypeError, ValueError) as exc:
        return result(False, f"unexpected answer to 'status': {_one_line(exc)}")
    return result(True, **found)


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
    for stragglers; then remove the record. Only a pid that is still the recorded process
    (its start time and command line) is signalled. Returns what happened to each
    recorded process, or None if there is no record. DevnetError if another devnet
    command runs in `directory`, or a process outlives SIGKILL.
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
            [p for p in processes if p[2].marker == NODE_MARKER],
            [p for p in processes if p[2].marker != NODE_MARKER],
        ):
            signalled = [p for p in group if _signal(p[1], p[2], signal.SIGTERM)]
            for _, pid, _ in group:
                if any(pid == p[1] for p in signalled):
                    how[pid] = "stopped"
                elif _command_line(pid):
                    how[pid] = "not running (the pid is another process now: left alone)"
                else:
                    how[pid] = "not running"
            for _, pid, identity in _wait_gone(signalled, STOP_GUARD):
                if _signal(pid, identity, signal.SIGKILL):
                    how[pid] = "killed"
            left = _wait_gone(signalled, STOP_GUARD)
            if left:
                names = ", ".join(f"{name} (pid {pid})" for name, pid, _ in left)
                raise DevnetError(f"still running after SIGKILL: {names}")
        (directory / DEVNET_FILE).unlink(missing_ok=True)
        return [Stopped(name, pid, how[pid]) for name, pid, _ in processes]
