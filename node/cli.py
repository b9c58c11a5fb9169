"""The `weft` command line.

`main(argv)` parses the arguments, runs one subcommand and returns the process exit code.
Expected failures (a missing or malformed key file, a refused overwrite, a bad argument)
print one line on stderr and return 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import secrets
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

from protocols.errors import InvalidValue
from protocols.signing import Signer

DISTRIBUTION = "weft"
EXIT_USAGE = 2
KEY_FILE_MODE = 0o600


class CliError(Exception):
    """An expected failure, reported as one line on stderr and exit code 2."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises `CliError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{self.prog} --help')")


def new_private_key() -> bytes:
    """32 random bytes that are a valid secp256k1 private key (0 < k < n)."""
    while True:
        candidate = secrets.token_bytes(32)
        try:
            Signer(candidate)
        except InvalidValue:
            continue  # probability about 2**-128: zero or not below the group order
        return candidate


def parse_private_key(text: str) -> bytes:
    """The key in a key file's text: 64 hex digits, optional `0x`, surrounding whitespace."""
    text = text.strip()
    if text[:2] in ("0x", "0X"):
        text = text[2:]
    if len(text) != 64:
        raise InvalidValue("not 64 hex digits")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise InvalidValue("not 64 hex digits") from None


def read_key_file(path: Path) -> Signer:
    """The signer for the key stored in `path`; raise `CliError` with a reason otherwise."""
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise CliError(f"key file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read key file {path}: {_reason(exc)}") from None
    try:
        return Signer(parse_private_key(text))
    except InvalidValue as exc:
        raise CliError(
            f"key file {path} does not hold a valid secp256k1 private key ({exc})"
        ) from None


def write_key_file(path: Path, key: bytes, *, force: bool) -> None:
    """Write `key` as hex to `path` with mode 0600, atomically.

    The key goes to a temporary file beside `path` first, so a crash never leaves a partial
    key file. Without `force` an existing `path` is never replaced (raises `CliError`).
    """
    if not force and (path.exists() or path.is_symlink()):
        raise CliError(f"{path} already exists; use --force to overwrite it")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
        try:
            os.fchmod(fd, KEY_FILE_MODE)  # exactly 0600 whatever the umask
            os.write(fd, key.hex().encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if `path` appeared in the meantime
    except FileExistsError:
        raise CliError(f"{path} already exists; use --force to overwrite it") from None
    except OSError as exc:
        raise CliError(f"cannot write key file {path}: {_reason(exc)}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def cmd_version(args: argparse.Namespace) -> int:
    try:
        print(metadata.version(DISTRIBUTION))
    except metadata.PackageNotFoundError:
        raise CliError(f"distribution {DISTRIBUTION!r} is not installed") from None
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    key = new_private_key()
    address = Signer(key).address
    if args.out is None:
        print(key.hex())
        print(address, file=sys.stderr)
    else:
        write_key_file(args.out, key, force=args.force)
        print(address)
    return 0


def cmd_address(args: argparse.Namespace) -> int:
    print(read_key_file(args.key).address)
    return 0


def _load(module: str, what: str) -> Any:
    """Import `module` for a command; `CliError` if it is not part of this install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise CliError(f"{what} ({module}) is not part of this install") from None
        raise CliError(f"cannot load {module}: {exc}") from None


def cmd_sim(args: argparse.Namespace) -> int:
    sim = _load("devnet.sim", "the simulation")
    return int(sim.main(list(args.passed_args)) or 0)


def cmd_bench(args: argparse.Namespace) -> int:
    bench = _load("devnet.bench_node", "the benchmark")
    return int(bench.main(list(args.passed_args)) or 0)


def cmd_bench_backup(args: argparse.Namespace) -> int:
    bench = _load("devnet.bench_backup", "the backup benchmark")
    return int(bench.main(list(args.passed_args)) or 0)


def cmd_node_run(args: argparse.Namespace) -> int:
    run = _load("node.run", "the node runner")
    return int(run.main(["--config", str(args.config)]) or 0)


def cmd_recover(args: argparse.Namespace) -> int:
    run = _load("node.run", "the node runner")
    recover = _load("node.recover", "recovery")
    import trio

    from node.api import WeftError

    try:
        config = run.load_config(args.config)
    except run.ConfigError as exc:
        raise CliError(str(exc)) from None
    if not (args.timeout > 0):
        raise CliError("--timeout must be a positive number of seconds")
    settings = config.settings
    signer = Signer(settings.private_key)
    try:
        peers = [recover.parse_peer_multiaddr(p) for p in args.peer]
        if args.devnet is not None:
            peers.extend(recover.peers_of_devnet(args.devnet, signer.address))
    except (ValueError, WeftError) as exc:
        raise CliError(str(exc)) from None
    try:
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = run._lock_data_dir(settings.data_dir)
    except run.StartupError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot use data directory {settings.data_dir}: {_reason(exc)}") from None
    try:
        report = trio.run(
            lambda: recover.recover_node(
                settings,
                peers,
                timeout=args.timeout,
                allow_older=args.allow_older,
            )
        )
    except WeftError as exc:
        raise CliError(" ".join(str(exc).split())) from None
    except Exception as exc:  # the chain or the network could not be used
        inner = run._innermost(exc)
        raise CliError(f"recovery failed: {run._one_line(inner)}") from None
    finally:
        os.close(lock)
    print(report.describe())
    print(f"sequence: {report.sequence}")
    print(f"channels: {report.channels}")
    print(f"threads: {report.threads}")
    print(f"from peer: {report.source}")
    print(f"next backup sequence: above {report.next_sequence}")
    for note in report.rejected:
        print(f"refused: {note}")
    print(f"now run the node: weft node run --config {args.config}")
    return 0


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(header), *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def cmd_devnet(args: argparse.Namespace) -> int:
    # Imported here: devnet.devnet imports this module, and other commands need no chain.
    from devnet import devnet

    def progress(line: str) -> None:
        print(f"weft devnet: {line}", file=sys.stderr, flush=True)

    try:
        if args.action == "demo":
            demo = _load("devnet.demo", "the demo")
            code: int = demo.run(args.dir, nodes=args.nodes, payments=args.payments, keep=args.keep)
            return code
        if args.action == "up":
            net = devnet.up(args.dir, args.nodes, progress, chain=args.chain)
            rows = [
                (n.name, n.role, n.address, n.peer_id, n.pid, n.control_port) for n in net.nodes
            ]
            print(_table(("NAME", "ROLE", "ADDRESS", "PEER ID", "PID", "CONTROL PORT"), rows))
            print(f"chain: {devnet.describe_chain(net)}")
            print(f"manager contract: {net.manager}")
            print(f"token contract: {net.token}")
            record = args.dir.resolve() / devnet.DEVNET_FILE
            print(f"devnet file: {record} (also each node's multiaddrs and data directory)")
        elif args.action == "status":
            found = devnet.status(args.dir)
            if found is None:
                print(f"no devnet in {args.dir}")
                return 0
            net, nodes = found

            def amount(value: Any) -> str:
                return "-" if value is None else f"{value.eth}/{value.token}"

            def count(value: int | None) -> str:
                return "-" if value is None else str(value)

            status_rows = [
                (
                    n.name,
                    n.role,
                    "up" if n.alive else "down",
                    count(n.channels),
                    amount(n.user_balance),
                    amount(n.hub_balance),
                    amount(n.reserve),
                    count(n.open_threads),
                )
                for n in nodes
            ]
            header = (
                "NAME",
                "ROLE",
                "ALIVE",
                "CHANNELS",
                "USER (ETH/TOKEN)",
                "HUB (ETH/TOKEN)",
                "RESERVE (ETH/TOKEN)",
                "THREADS",
            )
            print(_table(header, status_rows))
            for n in nodes:
                if n.error is not None:
                    print(f"{n.name}: {n.error}")
            print(f"chain: {devnet.describe_chain(net)}")
            if not net.complete:
                print(
                    "incomplete: 'weft devnet up' did not finish; stop what it started with "
                    f"'weft devnet down --dir {args.dir}'"
                )
        else:
            stopped = devnet.down(args.dir)
            if stopped is None:
                print(f"nothing running in {args.dir}")
            for s in stopped or ():
                print(f"{s.name} (pid {s.pid}): {s.how}")
    except devnet.DevnetError as exc:
        raise CliError(str(exc)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="weft", description="Weft: peer-to-peer payment threads on Ethereum."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    version = commands.add_parser("version", help="print the installed weft version")
    version.set_defaults(run=cmd_version)

    keygen = commands.add_parser("keygen", help="create a new secp256k1 node key")
    keygen.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="write the key as hex to FILE (mode 0600) and print its address; "
        "without it the key goes to stdout and the address to stderr",
    )
    keygen.add_argument("--force", action="store_true", help="overwrite an existing FILE")
    keygen.set_defaults(run=cmd_keygen)

    address = commands.add_parser("address", help="print the Ethereum address of a key file")
    address.add_argument("--key", type=Path, metavar="FILE", required=True, help="key file")
    address.set_defaults(run=cmd_address)

    sim = commands.add_parser(
        "sim",
        help="run the in-process protocol simulation (arguments go to it unchanged)",
        add_help=False,
    )
    sim.set_defaults(run=cmd_sim)

    bench = commands.add_parser(
        "bench",
        help="benchmark thread payments between node processes "
        "(arguments go to it unchanged; 'weft bench --help' lists them)",
        add_help=False,
    )
    bench.set_defaults(run=cmd_bench)

    bench_backup = commands.add_parser(
        "bench-backup",
        help="benchmark gossip backups: replication lag and recovery time "
        "(arguments go to it unchanged; 'weft bench-backup --help' lists them)",
        add_help=False,
    )
    bench_backup.set_defaults(run=cmd_bench_backup)

    node = commands.add_parser("node", help="run a node")
    node_actions = node.add_subparsers(dest="action", metavar="ACTION", required=True)
    node_run = node_actions.add_parser(
        "run", help="run a node in the foreground until SIGTERM or SIGINT"
    )
    node_run.add_argument(
        "--config", type=Path, required=True, metavar="FILE", help="the node's JSON config"
    )
    node_run.set_defaults(run=cmd_node_run)

    recover = commands.add_parser(
        "recover",
        help="rebuild a node's empty store from its newest gossip backup, with only its key; "
        "then run it with 'weft node run --config FILE'",
        description="Recover a node from its key alone: ask the hub and the given peers for "
        "the newest backup of the node's address (over /weft/backup/1, and listening on the "
        "backup topic), fetch and verify its blocks, decrypt it with the key, check every "
        "signature and write the node's store. Refuses a store that holds a state, and "
        "never adopts a backup older than one it has seen unless --allow-older. Then start "
        "the node as usual ('weft node run --config FILE'): it resyncs with the hub and its "
        "thread peers and resumes payments.",
    )
    recover.add_argument(
        "--config", type=Path, required=True, metavar="FILE", help="the node's JSON config"
    )
    recover.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="MULTIADDR/p2p/ID",
        help="a peer to ask besides the hub (repeatable), e.g. /ip4/127.0.0.1/tcp/4001/p2p/16U…",
    )
    recover.add_argument(
        "--devnet",
        type=Path,
        metavar="DIR",
        help="also ask every node of the devnet recorded in DIR",
    )
    recover.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="give up after this long (default 30)",
    )
    recover.add_argument(
        "--allow-older",
        action="store_true",
        help="adopt an older backup when the newest seen cannot be fetched (reported)",
    )
    recover.set_defaults(run=cmd_recover)

    devnet = commands.add_parser("devnet", help="start, inspect or stop a local devnet")
    actions = devnet.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = actions.add_parser("up", help="start a chain, a hub and N users in the background")
    up.add_argument("--nodes", type=int, default=2, metavar="N", help="user nodes (default 2)")
    up.add_argument(
        "--chain",
        default="embedded",
        metavar="CHAIN",
        help="'embedded' (default: py-evm served by a process of the devnet), 'anvil' "
        "(started by the devnet; must be installed), or the JSON-RPC URL of a running "
        "development chain with a prefunded unlocked account",
    )
    demo = actions.add_parser(
        "demo",
        help="run the demo: payments on threads between several pairs, checked on-chain "
        "(uses the devnet running in DIR, or brings one up and stops it after)",
    )
    demo.add_argument(
        "--nodes", type=int, default=4, metavar="N", help="user nodes of a new devnet (default 4)"
    )
    demo.add_argument(
        "--payments", type=int, default=200, metavar="N", help="payments per thread (default 200)"
    )
    demo.add_argument(
        "--keep", action="store_true", help="leave a devnet the demo brought up running"
    )
    for action in (
        up,
        demo,
        actions.add_parser(
            "status",
            help="show the devnet's nodes: channels, the users' channel balances, the "
            "hub's reserve, open threads",
        ),
        actions.add_parser("down", help="stop the devnet's processes"),
    ):
        action.add_argument(
            "--dir",
            type=Path,
            default=Path(".weft-devnet"),
            metavar="DIR",
            help="the devnet's directory (default ./.weft-devnet)",
        )
    devnet.set_defaults(run=cmd_devnet)

    from node.commands import add_node_commands  # node.commands imports this module

    add_node_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `weft` command line on `argv` (default: `sys.argv[1:]`); return the exit code."""
    parser = build_parser()
    try:
        try:
            # Unknown arguments are allowed only for `sim` and the benchmarks, which pass them
            # on verbatim.
            args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
        except SystemExit as exc:  # --help printed its text
            return exc.code if isinstance(exc.code, int) else 0
        if args.command in ("sim", "bench", "bench-backup"):
            args.passed_args = extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        code: int = args.run(args)
        return code
    except CliError as exc:
        print(f"weft: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Through `node.cli`, not `__main__`: node.commands raises `node.cli.CliError`.
    from node.cli import main as _main

    sys.exit(_main())
