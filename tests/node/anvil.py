"""Start and stop an anvil node for tests (127.0.0.1 only).

The binary is, in order: `$WEFT_ANVIL`, the pinned npm package installed by
`npm ci --prefix .ci/anvil` (`.ci/anvil/node_modules/...`), or `anvil` on PATH.
`require_anvil()` skips the calling test when neither anvil nor npm exists (no way to
install it here), and fails it when npm exists but the package was not installed.
`running_anvil(binary)` starts one process on a free port, waits until it answers
`eth_chainId`, yields its URL, and stops exactly that process (terminate, then kill).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PINNED_ANVIL = (
    REPO_ROOT / ".ci" / "anvil" / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin"
) / "anvil"
INSTALL_HINT = "npm ci --prefix .ci/anvil"
STARTUP_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
HARDFORK = "prague"  # the EVM version the artifacts are compiled for


def find_anvil() -> str | None:
    """Path of the anvil binary to use, or None if there is none."""
    chosen = os.environ.get("WEFT_ANVIL")
    if chosen:
        return chosen
    if PINNED_ANVIL.is_file() and os.access(PINNED_ANVIL, os.X_OK):
        return str(PINNED_ANVIL)
    return shutil.which("anvil")


def require_anvil() -> str:
    """The anvil binary; skip the test if npm is absent, fail it if anvil is not installed."""
    binary = find_anvil()
    if binary is not None:
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            pytest.fail(f"WEFT_ANVIL={binary!r} is not an executable file")
        return binary
    if shutil.which("npm") is None:
        pytest.skip(f"anvil tests need anvil; npm is absent, so `{INSTALL_HINT}` cannot run")
    pytest.fail(f"anvil is not installed: run `{INSTALL_HINT}` (npm is available)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
    request = urllib.request.Request(
        url, data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=1.0) as response:
            return "result" in json.loads(response.read())
    except (OSError, ValueError, urllib.error.URLError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def running_anvil(binary: str, *, attempts: int = 3) -> Iterator[str]:
    """Run anvil on a free 127.0.0.1 port; yield its HTTP URL; stop it afterwards."""
    with tempfile.TemporaryDirectory(prefix="weft-anvil-") as tmp:
        log_path = Path(tmp) / "anvil.log"
        for attempt in range(1, attempts + 1):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            with log_path.open("ab") as log:
                process = subprocess.Popen(
                    [binary, "--host", "127.0.0.1", "--port", str(port), "--hardfork", HARDFORK],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:
                deadline = time.monotonic() + STARTUP_TIMEOUT
                while process.poll() is None and time.monotonic() < deadline:
                    if _answers(url):
                        break
                    time.sleep(0.05)
                else:
                    exited = process.poll() is not None
                    if exited and attempt < attempts:
                        continue  # most likely the port was taken meanwhile: try another
                    state = f"exited with {process.returncode}" if exited else "timed out"
                    raise RuntimeError(f"anvil {state} on {url}; log:\n{_tail(log_path)}")
                yield url
                return
            finally:
                _stop(process)
