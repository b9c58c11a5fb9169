"""A Weft network of OS processes: a chain server and `python -m node.run` per node.

`served_chain()` runs `python -m devnet.chain_server` (the embedded chain over JSON-RPC on
127.0.0.1); `deploy(url)` deploys the contracts and funds fresh keys; `NodeProcess` writes a
node's key and config, starts it, waits for its `node.json` and gives a `ControlClient`.
Every process is stopped by its own pid (SIGTERM, then SIGKILL if it lingers). Used by the
benchmarks and the process tests.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from devnet.deploy import deploy_contracts
from node.chain import ChainService
from node.cli import new_private_key, write_key_file
from node.control import ControlClient, NodeInfo, read_node_info
from protocols.signing import Signer
from protocols.types import Address, Assets

REPO_ROOT = Path(__file__).resolve().parents[1]

STARTUP_GUARD = 45.0  # seconds a process may take to come up (imports on a busy machine)
STOP_GUARD = 15.0
CALL_GUARD = 90.0  # seconds one control call may take
SETTLE_GUARD = 60.0

T = TypeVar("T")


class ProcessError(Exception):
    """A node process did not come up, or exited."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


@contextmanager
def served_chain() -> Iterator[str]:
    """An embedded chain served over JSON-RPC by its own process; yields its URL."""
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
        if not url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"the chain server printed {url!r}, not its URL")
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
    keys: dict[str, bytes]  # "hub" and the users, by name

    def address(self, name: str) -> Address:
        return Signer(self.keys[name]).address


async def deploy(url: str, users: tuple[str, ...] = ("a", "b")) -> Deployment:
    """A TestToken and a ChannelManager for a fresh hub key; the hub and `users` funded
    with ETH and tokens (`devnet.deploy.deploy_contracts`, at the chain server `url`)."""
    keys = {name: new_private_key() for name in ("hub", *users)}
    chain = ChainService.from_url(url, poll_interval=0.01)
    try:
        token, manager = await deploy_contracts(chain, keys["hub"], [keys[u] for u in users])
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
        """Write `<root>/<name>/`: the key file, `config.json` (data in `data/`)."""
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

    def start(self, env: dict[str, str] | None = None) -> None:
        """Start the process (`env`: extra environment variables)."""
        assert self.process is None or self.process.poll() is not None
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "node.run", "--config", str(self.config_path)],
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
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
                raise ProcessError(
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
        raise ProcessError(f"{self.name} not up within {STARTUP_GUARD} s:\n{self.log_tail()}")

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
    """The `node.run` config of a node of `dep` (key file and data dir added by NodeProcess)."""
    return {
        "role": role,
        "chain_url": dep.url,
        "manager": dep.manager.checksum(),
        "deployed_block": dep.deployed_block,
        "poll_interval": 0.05,
        "request_timeout": 60,
        **extra,
    }


def eventually(check: Callable[[], T | None], what: str, timeout: float = SETTLE_GUARD) -> T:
    """Poll `check` until it returns something other than None/False; raise after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result is not None and result is not False:
            return result
        time.sleep(0.05)
    raise TimeoutError(f"never happened within {timeout} s: {what}")
