"""Run one node as its own process: `weft node run --config FILE` (or, the same,
`python -m node.run --config FILE`).

The node runs until SIGTERM or SIGINT, then stops cleanly and exits 0. Besides the node it
serves the control interface (`node.control`) on 127.0.0.1. Once both are up it writes, in
its data directory:

- `control.token`: a new random token (32 bytes as hex), mode 0600, on every start;
- `node.json`: `{address, peer_id, multiaddrs, control_port, pid}`, replaced atomically,
  so a parent process that waits for it (with its child's pid) knows the node is up, where
  its libp2p host listens (a hub's `node.json` gives its users their `hub` entry) and
  where to control it. It is removed again on a clean stop.

A data directory serves one process at a time (`node.lock`, an flock the kernel drops when
the process dies, even by SIGKILL). Logs go to stderr at INFO.

A startup failure (a bad config or key file, a chain that cannot be reached, a store of
another node, a port in use, the data directory in use) prints one line on stderr,
`weft-node: error: ...`, and exits 2. A failure after startup is logged with its
traceback and exits 1.

The config file is a JSON object. Relative paths are relative to the config file's directory.

    key_file        path of a file holding the node's private key as 64 hex digits
                    (as `weft keygen --out` writes it)                        required
    data_dir        directory of the node's store and of the files above    required
    role            "hub" or "user"                                          required
    chain_url       JSON-RPC URL of the chain (http:// or https://)          required
    manager         the ChannelManager's address, 0x hex                     required
    deployed_block  block to start reading the manager's logs at             default 0
    hub             users only: where the hub is,
                    {"address": 0x hex, "peer_id": base58, "multiaddrs": [str, ...]}
    listen_port     libp2p TCP port on 127.0.0.1 (0: any free one)          default 0
    control_port    control interface TCP port on 127.0.0.1 (0: any free)   default 0
    policies        {"max_lock": [eth, token], "collateral_floor": [eth, token],
                     "collateral_ceiling": [eth, token]}, each optional
                    (see `protocols.roles.NodeConfig`)                       default {}
    poll_interval   seconds between reads of the chain                      default 0.2
    relaxed_commits true: commits that only record what peers already hold do
                    not wait for the disk (SPEC.md, "Persistence")          default false
    request_timeout seconds a request may take before RequestTimeout        default 60
    backups         true: announce my backups on gossip and keep others'
                    (node.backup); false: no gossip at all                  default true
    backup_interval seconds between two backup announcements at most (one
                    is made at once after a thread closes or a pending
                    deposit or withdrawal is signed)                        default 2
    replica_max_owners  how many other nodes' backups to keep at most      default 64
    replica_max_bytes   bytes those backups may take at most      default 67108864 (64 MiB)

Unknown keys are an error (they are most likely typos).

A node that lost its data directory but kept its key is recovered first with
`weft recover --config FILE [--peer MULTIADDR/p2p/ID ...] [--devnet DIR]` (`node.recover`):
it rebuilds the empty store from the newest backup the hub or the given peers hold and
exits; then `weft node run --config FILE` runs it as usual (it resyncs with the hub and its
thread peers, then pays on).
"""

from __future__ import annotations

import argparse
import cProfile
import fcntl
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from node import api
from node.api import NodeSettings, PeerRef, open_node
from node.backup import DEFAULT_INTERVAL, DEFAULT_MAX_BYTES, DEFAULT_MAX_OWNERS
from node.cli import parse_private_key
from node.control import (
    NODE_FILE,
    NodeInfo,
    assets_of,
    serve_control,
    write_node_info,
    write_token,
)
from protocols.errors import InvalidValue
from protocols.roles import UNLIMITED
from protocols.signing import Signer
from protocols.types import NO_ASSETS, Address, Assets, Party

__all__ = ["ConfigError", "RunConfig", "StartupError", "load_config", "main", "run_node"]

log = logging.getLogger("weft.run")

EXIT_STARTUP: Final = 2
EXIT_CRASH: Final = 1
LOCK_FILE: Final = "node.lock"
LOG_FORMAT: Final = "%(asctime)s %(levelname).1s %(name)s: %(message)s"
PROFILE_ENV = "WEFT_PROFILE"  # a file path: profile the run with cProfile, stats there

_REQUIRED: Final = ("key_file", "data_dir", "role", "chain_url", "manager")
_OPTIONAL: Final = (
    "deployed_block",
    "hub",
    "listen_port",
    "control_port",
    "policies",
    "poll_interval",
    "relaxed_commits",
    "request_timeout",
    "backups",
    "backup_interval",
    "replica_max_owners",
    "replica_max_bytes",
)
_POLICIES: Final = ("max_lock", "collateral_floor", "collateral_ceiling")


class ConfigError(Exception):
    """The config file or the key file it names is missing or malformed."""


class StartupError(Exception):
    """The node could not start; the message is the one line to show."""


@dataclass(frozen=True, slots=True)
class RunConfig:
    """A parsed config file: the node's settings and the control port."""

    settings: NodeSettings
    control_port: int


# ---------------------------------------------------------------- the config file


def load_config(path: Path) -> RunConfig:
    """Read and check the config file at `path` (and the key file it names).

    Raises `ConfigError` with a reason.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"config file {path} is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} is not a JSON object")
    try:
        return _parse(raw, path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def _parse(raw: dict[str, Any], base: Path) -> RunConfig:
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"missing key(s): {', '.join(missing)}")
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ConfigError(f"unknown key(s): {', '.join(unknown)}")

    role_name = raw["role"]
    if role_name not in ("hub", "user"):
        raise ConfigError('"role" must be "hub" or "user"')
    role = Party(role_name)
    hub: PeerRef | None = None
    if role is Party.USER:
        if raw.get("hub") is None:
            raise ConfigError('a user needs "hub": {address, peer_id, multiaddrs}')
        hub = _peer_ref(raw["hub"])
    elif raw.get("hub") is not None:
        raise ConfigError('a hub takes no "hub" entry')

    chain_url = raw["chain_url"]
    if not isinstance(chain_url, str) or not chain_url.startswith(("http://", "https://")):
        raise ConfigError('"chain_url" must be an http:// or https:// URL')

    policies = raw.get("policies", {})
    if not isinstance(policies, dict):
        raise ConfigError('"policies" must be an object')
    unknown = sorted(set(policies) - set(_POLICIES))
    if unknown:
        raise ConfigError(f"unknown policy key(s): {', '.join(unknown)}")

    key = _private_key(_path(raw["key_file"], base, "key_file"))
    settings = NodeSettings(
        private_key=key,
        data_dir=_path(raw["data_dir"], base, "data_dir"),
        role=role,
        chain=chain_url,
        manager=_address(raw["manager"], "manager"),
        hub=hub,
        listen_port=_port(raw.get("listen_port", 0), "listen_port"),
        deployed_block=_count(raw.get("deployed_block", 0), "deployed_block"),
        max_lock=_assets(policies.get("max_lock"), UNLIMITED, "policies.max_lock"),
        collateral_floor=_assets(
            policies.get("collateral_floor"), NO_ASSETS, "policies.collateral_floor"
        ),
        collateral_ceiling=_assets(
            policies.get("collateral_ceiling"), UNLIMITED, "policies.collateral_ceiling"
        ),
        poll_interval=_seconds(raw.get("poll_interval", 0.2), "poll_interval"),
        relaxed_commits=_flag(raw.get("relaxed_commits", False), "relaxed_commits"),
        request_timeout=_seconds(
            raw.get("request_timeout", api.DEFAULT_TIMEOUT), "request_timeout"
        ),
        backups=_flag(raw.get("backups", True), "backups"),
        backup_interval=_seconds(raw.get("backup_interval", DEFAULT_INTERVAL), "backup_interval"),
        replica_max_owners=_count(
            raw.get("replica_max_owners", DEFAULT_MAX_OWNERS), "replica_max_owners"
        ),
        replica_max_bytes=_count(
            raw.get("replica_max_bytes", DEFAULT_MAX_BYTES), "replica_max_bytes"
        ),
    )
    return RunConfig(settings, _port(raw.get("control_port", 0), "control_port"))


def _flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false")
    return value


def _path(value: object, base: Path, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f'"{what}" must be a path')
    return base / Path(value).expanduser()


def _private_key(path: Path) -> bytes:
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(f"key file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read key file {path}: {exc}") from None
    try:
        key = parse_private_key(text)
        Signer(key)
    except (InvalidValue, ValueError) as exc:
        raise ConfigError(f"key file {path} does not hold a valid private key ({exc})") from None
    return key


def _address(value: object, what: str) -> Address:
    try:
        if not isinstance(value, str):
            raise InvalidValue("not a string")
        return Address.from_hex(value)
    except InvalidValue as exc:
        raise ConfigError(f'"{what}" is not an address: {exc}') from None


def _peer_ref(value: object) -> PeerRef:
    if not isinstance(value, dict) or set(value) != {"address", "peer_id", "multiaddrs"}:
        raise ConfigError('"hub" must be {"address", "peer_id", "multiaddrs"}')
    peer_id, multiaddrs = value["peer_id"], value["multiaddrs"]
    if not isinstance(peer_id, str) or not peer_id:
        raise ConfigError('"hub.peer_id" must be a base58 peer id')
    if (
        not isinstance(multiaddrs, list)
        or not multiaddrs
        or not all(isinstance(m, str) and m.startswith("/") for m in multiaddrs)
    ):
        raise ConfigError('"hub.multiaddrs" must be a non-empty list of multiaddrs')
    return PeerRef(_address(value["address"], "hub.address"), peer_id, tuple(multiaddrs))


def _port(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= 65535:
        raise ConfigError(f'"{what}" must be a port number in [0, 65535]')
    return value


def _count(value: object, what: str) -> int:
    if type(value) is not int or value < 0:
        raise ConfigError(f'"{what}" must be a non-negative integer')
    return value


def _seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f'"{what}" must be a positive number of seconds')
    return float(value)


def _assets(value: object, default: Assets, what: str) -> Assets:
    if value is None:
        return default
    try:
        return assets_of(value)
    except InvalidValue as exc:
        raise ConfigError(f'"{what}" must be [eth, token]: {exc}') from None


# ---------------------------------------------------------------- running


def _lock_data_dir(data_dir: Path) -> int:
    """Take `data_dir/node.lock` exclusively; return its fd (closing it drops the lock).

    Raises `StartupError` if another process holds it, OSError if it cannot be made."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"another node process is running on {data_dir}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _innermost(exc: BaseException) -> BaseException:
    """The one exception inside (nested) groups of one."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    known = (api.WeftError, ConfigError, StartupError)
    return text if isinstance(exc, known) else f"{type(exc).__name__}: {text}"


async def run_node(config: RunConfig, stop_requested: Callable[[], bool] = lambda: False) -> None:
    """Run the node of `config` and its control interface until SIGTERM or SIGINT.

    Returns after a clean stop. Raises `StartupError` if the node cannot start; whatever
    goes wrong after that propagates. Must run in the main thread (signals).

    A signal once the node is up stops it cleanly (its last backup announced, see
    `node.backup`); a signal during startup, or a second one, cancels at once.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        if stop_requested():
            return
        up = trio.Event()
        stop = trio.Event()
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if up.is_set() and not stop.is_set():
                        log.info("%s received: stopping", name)
                        stop.set()
                        continue
                    log.info("%s received: stopping now", name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            await _serve(config, up, stop)
            nursery.cancel_scope.cancel()


async def _serve(config: RunConfig, up: trio.Event, stop: trio.Event) -> None:
    settings = config.settings
    data_dir = settings.data_dir
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = _lock_data_dir(data_dir)
    except OSError as exc:
        raise StartupError(f"cannot use data directory {data_dir}: {_one_line(exc)}") from exc
    started = False
    try:
        token = write_token(data_dir)
        async with open_node(settings) as node, trio.open_nursery() as nursery:
            control_port = await nursery.start(serve_control, node, config.control_port, token)
            ref = node.peer_ref
            info = NodeInfo(
                ref.address.checksum(), ref.peer_id, ref.multiaddrs, control_port, os.getpid()
            )
            write_node_info(data_dir, info)
            started = True
            log.info(
                "%s %s running: %s; control on 127.0.0.1:%d",
                settings.role.value,
                info.address,
                " ".join(info.multiaddrs),
                control_port,
            )
            up.set()
            try:
                await stop.wait()
            finally:
                (data_dir / NODE_FILE).unlink(missing_ok=True)
                nursery.cancel_scope.cancel()  # the control interface; the node stops next
    except Exception as exc:
        if started:
            raise
        inner = _innermost(exc)
        if isinstance(inner, StartupError):
            raise inner from None
        raise StartupError(f"cannot start the node: {_one_line(inner)}") from exc
    finally:
        os.close(lock)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `python -m node.run` with `argv`; return the exit code."""
    stop = [False]

    def early_stop(signum: int, frame: object) -> None:
        stop[0] = True  # before trio took the signals over: stop as soon as it does

    previous = {s: signal.signal(s, early_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        parser = argparse.ArgumentParser(
            prog="python -m node.run",
            description="Run one Weft node until SIGTERM or SIGINT (see the module docs).",
        )
        parser.add_argument("--config", type=Path, required=True, metavar="FILE")
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=LOG_FORMAT)
        try:
            config = load_config(args.config)
            profile_path = os.environ.get(PROFILE_ENV)
            if profile_path:
                # For the benchmarks: the whole run under cProfile, written at a clean stop.
                profiler = cProfile.Profile()
                profiler.enable()
                try:
                    trio.run(run_node, config, lambda: stop[0])
                finally:
                    profiler.disable()
                    profiler.dump_stats(profile_path)
            else:
                trio.run(run_node, config, lambda: stop[0])
        except BaseException as exc:
            inner = _innermost(exc)
            if isinstance(inner, ConfigError | StartupError):
                print(f"weft-node: error: {_one_line(inner)}", file=sys.stderr)
                return EXIT_STARTUP
            if isinstance(inner, KeyboardInterrupt):
                return 0
            log.critical("the node failed", exc_info=exc)
            return EXIT_CRASH
        log.info("stopped")
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
