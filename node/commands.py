"""`weft deposit|withdraw|open-thread|pay|close-thread|balance|threads`: commands for a
running node, made over its control interface (`node.control`).

The node is named by `--node DATA_DIR` (the directory where `node.run` writes `node.json`
and `control.token`) or by `--devnet DIR --name NAME` (its `data_dir` in `DIR/devnet.json`).
Amounts are integers: wei and token base units. A thread is written `sender:receiver:id`,
as `open-thread` prints it. Every failure becomes a `CliError` (one line, exit code 2): a
node's error answer shows its type and message, an unreachable node "no node running at".
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.cli import CliError, _table

if TYPE_CHECKING:
    from node.control import ControlClient

UINT256_MAX = 2**256 - 1

__all__ = ["add_node_commands", "format_thread", "parse_thread"]


# ---------------------------------------------------------------- arguments


def _amount(text: str) -> int:
    """An amount argument: a non-negative integer that fits in a uint256."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer amount: {text!r}") from None
    if not 0 <= value <= UINT256_MAX:
        raise argparse.ArgumentTypeError(f"amount out of range: {text}")
    return value


def parse_thread(text: str) -> dict[str, Any]:
    """`sender:receiver:id` as the control interface's thread key; raises `CliError`."""
    parts = text.split(":")
    if len(parts) != 3 or not all(parts):
        raise CliError(f"a thread is sender:receiver:id, not {text!r}")
    sender, receiver, thread_id = parts
    try:
        number = int(thread_id, 10)
    except ValueError:
        raise CliError(f"thread id is not an integer: {thread_id!r}") from None
    return {"sender": sender, "receiver": receiver, "thread_id": number}


def format_thread(key: dict[str, Any]) -> str:
    """A thread key of the control interface as `sender:receiver:id`."""
    return f"{key['sender']}:{key['receiver']}:{key['thread_id']}"


def _assets(value: list[int]) -> str:
    return f"{value[0]} wei + {value[1]} token"


# ---------------------------------------------------------------- the node


def _data_dir(args: argparse.Namespace) -> Path:
    """The data directory of the node the command is for."""
    if args.node is not None:
        if args.devnet is not None or args.name is not None:
            raise CliError("give either --node DATA_DIR or --devnet DIR --name NAME, not both")
        path: Path = args.node
        return path
    if args.devnet is None or args.name is None:
        raise CliError("which node? give --node DATA_DIR or --devnet DIR --name NAME")
    from devnet.devnet import DevnetError, read_devnet  # devnet.devnet imports node.cli

    try:
        net = read_devnet(args.devnet)
    except DevnetError as exc:
        raise CliError(str(exc)) from None
    if net is None:
        raise CliError(f"no devnet in {args.devnet}")
    for node in net.nodes:
        if node.name == args.name:
            return Path(node.data_dir)
    names = ", ".join(n.name for n in net.nodes)
    raise CliError(f"no node {args.name!r} in the devnet in {args.devnet} (nodes: {names})")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _run(args: argparse.Namespace, action: Callable[[ControlClient], str]) -> int:
    """Connect to the node of `args`, run `action` with the client, print its output."""
    # Imported here: the control client brings in the node, which other commands do not need.
    from node.control import ControlClient, ControlError

    data_dir = _data_dir(args)
    try:
        client = ControlClient.from_data_dir(data_dir)
    except (OSError, ValueError) as exc:
        raise CliError(f"no node running at {data_dir} ({_one_line(str(exc))})") from None
    try:
        with client:
            output = action(client)
    except ControlError as exc:
        if exc.type == "ConnectionError":
            raise CliError(f"no node running at {data_dir} ({_one_line(exc.message)})") from None
        raise CliError(_one_line(f"{exc.type}: {exc.message}")) from None
    print(output)
    return 0


# ---------------------------------------------------------------- the commands


def cmd_deposit(args: argparse.Namespace) -> int:
    amount = [args.eth, args.token]

    def action(client: ControlClient) -> str:
        client.call("deposit", amount=amount)
        return f"deposited {_assets(amount)}"

    return _run(args, action)


def cmd_withdraw(args: argparse.Namespace) -> int:
    amount = [args.eth, args.token]
    params: dict[str, Any] = {"amount": amount}
    if args.to is not None:
        params["recipient"] = args.to

    def action(client: ControlClient) -> str:
        client.call("withdraw", **params)
        return f"withdrew {_assets(amount)}" + (f" to {args.to}" if args.to else "")

    return _run(args, action)


def cmd_open_thread(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"peer": args.peer, "lock": [args.lock_eth, args.lock_token]}
    if args.peer_lock is not None:
        params["peer_lock"] = list(args.peer_lock)

    def action(client: ControlClient) -> str:
        return format_thread(client.call("open_thread", **params))

    return _run(args, action)


def cmd_pay(args: argparse.Namespace) -> int:
    key = parse_thread(args.thread)
    amount = [args.eth, args.token]

    def action(client: ControlClient) -> str:
        tx_count = client.call("pay", key=key, amount=amount)
        return f"paid {_assets(amount)} (thread tx_count {tx_count})"

    return _run(args, action)


def cmd_close_thread(args: argparse.Namespace) -> int:
    key = parse_thread(args.thread)

    def action(client: ControlClient) -> str:
        final = client.call("close_thread", key=key, force=args.force)
        return (
            f"closed {format_thread(final['key'])} at tx_count {final['tx_count']}: "
            f"sender {_assets(final['balance_sender'])}, "
            f"receiver {_assets(final['balance_receiver'])}"
        )

    return _run(args, action)


def cmd_balance(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {} if args.user is None else {"user": args.user}

    def action(client: ControlClient) -> str:
        if args.user is None:
            status = client.call("status")
            if status["role"] == "hub":  # no channel of its own: its reserve and channels
                reserve = client.call("reserve")
                return f"hub reserve {_assets(reserve)}, channels {status['channels']}"
        b = client.call("balance", **params)
        line = (
            f"user {_assets(b['user'])}, hub {_assets(b['hub'])}, open threads {b['open_threads']}"
        )
        pending = [
            f"{what} {_assets(b[field])}"
            for what, field in (
                ("deposit", "pending_deposit_user"),
                ("withdrawal", "pending_withdrawal_user"),
            )
            if any(b[field])
        ]
        return line + (f" (pending {', '.join(pending)})" if pending else "")

    return _run(args, action)


def cmd_threads(args: argparse.Namespace) -> int:
    def action(client: ControlClient) -> str:
        threads = client.call("threads")
        if not threads:
            return "no threads"
        rows = [
            (
                format_thread(t["key"]),
                t["phase"],
                f"{t['mine'][0]}/{t['mine'][1]}",
                f"{t['peer'][0]}/{t['peer'][1]}",
                t["tx_count"],
            )
            for t in threads
        ]
        header = ("THREAD", "PHASE", "MINE (ETH/TOKEN)", "PEER (ETH/TOKEN)", "TX")
        return _table(header, rows)

    return _run(args, action)


# ---------------------------------------------------------------- registration


def add_node_commands(commands: Any) -> None:
    """Add the node commands to `commands` (the `add_subparsers` object of `weft`)."""
    which = argparse.ArgumentParser(add_help=False)
    group = which.add_argument_group("which node")
    group.add_argument("--node", type=Path, metavar="DATA_DIR", help="the node's data directory")
    group.add_argument("--devnet", type=Path, metavar="DIR", help="a devnet's directory")
    group.add_argument("--name", metavar="NAME", help="the node's name in the devnet (u1, hub)")

    def add(name: str, help: str, run: Callable[[argparse.Namespace], int]) -> Any:
        parser = commands.add_parser(name, help=help, parents=[which])
        parser.set_defaults(run=run)
        return parser

    def amounts(parser: Any, eth: str = "eth", token: str = "token", what: str = "") -> None:
        parser.add_argument(eth, type=_amount, metavar="ETH", help=f"{what}wei")
        parser.add_argument(
            token, type=_amount, nargs="?", default=0, metavar="TOKEN",
            help=f"{what}token base units (default 0)",
        )  # fmt: skip

    amounts(add("deposit", "deposit into my channel with the hub", cmd_deposit))
    withdraw = add("withdraw", "withdraw from my channel with the hub", cmd_withdraw)
    amounts(withdraw)
    withdraw.add_argument("--to", metavar="ADDRESS", help="recipient (default: me)")

    open_thread = add("open-thread", "open a thread to PEER; prints its key", cmd_open_thread)
    open_thread.add_argument("peer", metavar="PEER", help="the receiver's address")
    amounts(open_thread, "lock_eth", "lock_token", "my lock: ")
    open_thread.add_argument(
        "--peer-lock", type=_amount, nargs=2, metavar=("ETH", "TOKEN"), help="the peer's lock"
    )

    pay = add("pay", "pay on a thread", cmd_pay)
    pay.add_argument("thread", metavar="THREAD", help="sender:receiver:id")
    amounts(pay)

    close = add("close-thread", "close a thread", cmd_close_thread)
    close.add_argument("thread", metavar="THREAD", help="sender:receiver:id")
    close.add_argument("--force", action="store_true", help="close without the peer")

    balance = add(
        "balance",
        "show my channel's balance (a hub: its reserve, or --user's channel)",
        cmd_balance,
    )
    balance.add_argument("--user", metavar="ADDRESS", help="(hub) the user whose channel")
    add("threads", "list my threads", cmd_threads)
