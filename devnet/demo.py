"""`weft devnet demo`: payments on threads between every user of a devnet, checked on-chain.

`run(dir, nodes=4, payments=200, keep=False)` does, against the devnet in `dir`:

1. Takes the demo lock of `dir` (an exclusive, non-blocking `flock` on `dir/.demo.lock`,
   held for the whole run: a second demo on the same devnet fails at once; `up` and `down`
   take `dir/.lock` themselves). Uses the devnet recorded there if its record is complete,
   all its processes run and its nodes answer; if there is none, starts one with `nodes`
   users (`devnet.devnet.up`) and stops it at the end (`down`) unless `keep`. A recorded
   devnet that is incomplete (its `up` was interrupted, or still runs) or not fully alive
   is an error.
2. Every user deposits `DEPOSIT` (2 ETH and 2,000 tokens) into its channel; the hub
   collateralizes each user's channel with what the threads to that user lock; each user
   opens a thread to the next one in a ring (u1->u2, ..., uN->u1; with two users u1->u2
   and u2->u1), locking exactly what it will pay over it.
3. Every payer makes `payments` payments on its thread, each thread on its own OS thread
   and control connection, with a progress bar on stderr (a line every 10% or so when
   stderr is not a terminal). At most `MAX_PARALLEL` (12) threads pay at once: with more
   users than that, a thread starts paying once another has finished. The payments on the
   k-th thread are k x `PAYMENT` (0.001 ETH and 1 token), k = 1..4 and round again, so
   that users end with different balances and a payment credited to the wrong user shows.
4. Every payer closes its thread; once both channels settled it, every user withdraws its
   whole channel balance to a fresh address (so gas does not blur the figures). Then the
   hub reclaims (`reclaim_collateral`) its balance in each user's channel above what it
   had there before the demo, back to its reserve, so that demos run again and again on a
   kept devnet do not drain the reserve. (A demo that fails or is interrupted midway
   reclaims nothing; once the reserve cannot cover the collateral the threads need, the
   demo says so in one line: stop the devnet and start a new one.)
5. Compares what the chain and the nodes show with what the payments imply, using only
   differences from what it read before (so it can run again on the same devnet): each
   fresh address holds exactly the user's prior channel balance + deposit + received - sent
   (ETH and token); the ChannelManager holds what it held less the users' prior balances;
   the hub's reserve plus its balances in the users' channels is unchanged, and its balance
   in each channel is what the reclaim left; the hub's view of each channel agrees with
   the user's; every thread's final state gave the receiver exactly what was paid.

Prints (stdout) a table of the users (sent, received, withdrawn, on-chain, OK/MISMATCH)
and the elapsed time, and returns 0; 1 if any figure differs (one line per mismatch; a
user whose figure, or one of whose threads' figures, differs is marked MISMATCH); 2 with
one line on an expected failure (another demo runs on the devnet, the devnet cannot
start or is incomplete or not fully alive, a node refuses or cannot be reached, a chain
read fails); 130 on Ctrl-C or SIGTERM (while `run` runs in the main thread, SIGTERM is
handled as Ctrl-C). Progress lines go to stderr, prefixed `weft demo:`. Every wait is
bounded. A failure, Ctrl-C or SIGTERM stops a devnet the demo started, even with `keep`;
while it is being stopped (a bounded wait), further Ctrl-C and SIGTERM are ignored.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final, TextIO, TypeVar

import trio

from devnet.deploy import ETHER
from devnet.devnet import (
    Devnet,
    DevnetError,
    DevnetNode,
    down,
    process_runs,
    read_devnet,
    status,
    up,
)
from node.chain import ChainService
from node.chain_errors import ChainError
from node.cli import _table, new_private_key
from node.control import MAX_CONNECTIONS, ControlClient, ControlError, assets_json, assets_of
from protocols.errors import InvalidValue
from protocols.signing import Signer
from protocols.types import NO_ASSETS, Address, Assets

__all__ = [
    "DEPOSIT",
    "MAX_PAYMENTS",
    "PAYMENT",
    "DemoError",
    "Figure",
    "Outcome",
    "Pair",
    "Progress",
    "find_mismatches",
    "play",
    "render",
    "ring",
    "run",
]

TOKEN: Final = 10**18
"""Base units in one token (the devnet's test token has 18 decimals)."""
DEPOSIT: Final = Assets(2 * ETHER, 2000 * TOKEN)
PAYMENT: Final = Assets(ETHER // 1000, TOKEN)
STEPS: Final = 4
"""Thread k pays (1 + k % STEPS) x PAYMENT a payment (k = 0, 1, ...)."""
MAX_PAYMENTS: Final = min(DEPOSIT.eth // PAYMENT.eth, DEPOSIT.token // PAYMENT.token) // STEPS
"""The most payments per thread: a payer's lock (what it pays) must fit its deposit."""
CALL_TIMEOUT: Final = 120.0  # seconds a control call may take (the node's own limit is lower)
CONNECT_TIMEOUT: Final = 30.0  # seconds a user may take to (re)connect to the hub
SETTLE_TIMEOUT: Final = 60.0  # seconds a closed thread may take to settle in both channels
CHAIN_TIMEOUT: Final = 30.0  # seconds one chain read may take
RECLAIM_TIMEOUT: Final = 60.0  # seconds the hub's reclaims may take to reach its reserve
MAX_PARALLEL: Final = MAX_CONNECTIONS - 4
"""Jobs (payers, users) the demo runs at once, in all. Each holds one control connection to
its node and may hold one to the hub, so the hub, which serves `MAX_CONNECTIONS`, sees at
most this many from the demo and keeps a few for other clients. Further jobs wait for a
running one to finish."""
DEMO_LOCK_FILE: Final = ".demo.lock"
EXIT_INTERRUPTED: Final = 130
EXIT_OK: Final = 0
EXIT_MISMATCH: Final = 1
EXIT_FAILED: Final = 2

T = TypeVar("T")

Figure = tuple[str, str]
"""What a figure is about and what it is: ("u1", "on-chain"), ("contract", "balance")."""


class DemoError(Exception):
    """An expected failure of the demo; the message is the one line to show."""


@dataclass(frozen=True, slots=True)
class Pair:
    """A thread of the demo: `payer` opens it to `payee` and pays `amount` a payment."""

    payer: str
    payee: str
    amount: Assets

    @property
    def label(self) -> str:
        return f"{self.payer}->{self.payee}"


@dataclass(frozen=True, slots=True)
class UserResult:
    name: str
    sent: Assets
    received: Assets
    withdrawn: Assets  # what the user's node said its channel held, and withdrew
    onchain: Assets  # what its fresh address holds afterwards


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one demo did, and every figure it expected and observed."""

    users: tuple[UserResult, ...]
    pairs: tuple[Pair, ...]
    payments: int
    paying_seconds: float
    expected: Mapping[Figure, Assets]
    observed: Mapping[Figure, Assets]


def ring(users: Sequence[str]) -> list[Pair]:
    """Each user pays the next one, the last pays the first: every user pays and is paid.
    The k-th pair's payments are (1 + k % STEPS) x PAYMENT."""
    if len(users) < 2:
        raise DemoError(f"the demo needs at least 2 users, not {len(users)}")
    return [
        Pair(users[k], users[(k + 1) % len(users)], times(PAYMENT, 1 + k % STEPS))
        for k in range(len(users))
    ]


def times(amount: Assets, count: int) -> Assets:
    return Assets(amount.eth * count, amount.token * count)


# ---------------------------------------------------------------- checking and reporting


def amount_text(amount: Assets) -> str:
    """`amount` in ETH and tokens, exactly: "0.2 ETH + 200 WTT"."""
    return f"{_decimal(amount.eth, ETHER)} ETH + {_decimal(amount.token, TOKEN)} WTT"


def _decimal(value: int, unit: int) -> str:
    whole, fraction = divmod(value, unit)
    if not fraction:
        return str(whole)
    digits = len(str(unit)) - 1
    return f"{whole}.{str(fraction).rjust(digits, '0').rstrip('0')}"


def find_mismatches(
    expected: Mapping[Figure, Assets], observed: Mapping[Figure, Assets]
) -> list[str]:
    """One line for every expected figure whose observed value differs (or is missing), and
    for every observed figure nothing was expected of; [] if all agree. Pure."""
    lines = []
    for figure, want in expected.items():
        subject, what = figure
        got = observed.get(figure)
        if got is None:
            lines.append(f"{subject} {what}: expected {amount_text(want)}, not observed")
        elif got != want:
            off = [
                f"{name} off by {have - need:+} {unit}"
                for name, have, need, unit in (
                    ("ETH", got.eth, want.eth, "wei"),
                    ("token", got.token, want.token, "base units"),
                )
                if have != need
            ]
            lines.append(
                f"{subject} {what}: expected {amount_text(want)}, observed {amount_text(got)} "
                f"({', '.join(off)})"
            )
    for subject, what in observed:
        if (subject, what) not in expected:
            lines.append(f"{subject} {what}: observed, but nothing was expected")
    return lines


def render(outcome: Outcome, mismatches: Sequence[str]) -> str:
    """The summary table of `outcome` (a user is OK if no mismatch line names it, alone or
    in a pair like `u1->u2`), the mismatch lines, and the payment rate."""
    failed = {user for line in mismatches for user in line.split(" ", 1)[0].split("->")}
    rows = [
        (
            user.name,
            amount_text(user.sent),
            amount_text(user.received),
            amount_text(user.withdrawn),
            amount_text(user.onchain),
            "MISMATCH" if user.name in failed else "OK",
        )
        for user in outcome.users
    ]
    header = ("USER", "SENT", "RECEIVED", "WITHDRAWN", "ON-CHAIN", "RESULT")
    total = outcome.payments * len(outcome.pairs)
    rate = total / outcome.paying_seconds if outcome.paying_seconds > 0 else float("inf")
    lines = [
        _table(header, rows),
        "",
        *(f"MISMATCH: {line}" for line in mismatches),
        f"{outcome.payments} payments on each thread: "
        + "; ".join(f"{p.label} {amount_text(p.amount)} each" for p in outcome.pairs),
        f"{total} payments in {outcome.paying_seconds:.1f} s ({rate:.0f}/s); "
        f"{len(outcome.expected)} figures checked: "
        + ("all agree" if not mismatches else f"{len(mismatches)} differ"),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- talking to the nodes


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Node:
    """Control calls to one devnet node, each failure a `DemoError` naming the node."""

    def __init__(self, node: DevnetNode) -> None:
        self.node = node
        self.name = node.name
        self.address = node.address
        try:
            self._client = ControlClient.from_data_dir(node.data_dir, timeout=CALL_TIMEOUT)
        except (OSError, ValueError) as exc:
            raise DemoError(f"cannot reach {node.name}: {_one_line(str(exc))}") from None

    def call(self, method: str, /, **params: Any) -> Any:
        try:
            return self._client.call(method, **params)
        except ControlError as exc:
            raise DemoError(
                f"{self.name}: {method} failed: {_one_line(f'{exc.type}: {exc.message}')}"
            ) from None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> _Node:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _concurrently(
    jobs: Sequence[Callable[[], T]], tick: Callable[[], None] = lambda: None
) -> list[T]:
    """Run `jobs` in daemon threads, at most `MAX_PARALLEL` at once (the others wait for a
    running one to end); their results in order.

    Calls `tick` about ten times a second while waiting. After a job fails no other job
    starts, and the first failure is raised once the running ones have ended (each is
    bounded by its control calls' timeouts). A KeyboardInterrupt leaves the threads
    running: they are daemons, and stopping the devnet ends their calls.
    """
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []
    gate = threading.Semaphore(MAX_PARALLEL)

    def work(index: int, job: Callable[[], T]) -> None:
        with gate:
            if errors:
                return
            try:
                results[index] = job()
            except BaseException as exc:  # handed to the main thread
                errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(i, job), name=f"weft-demo-{i}", daemon=True)
        for i, job in enumerate(jobs)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.1)
            tick()
    tick()
    if errors:
        raise errors[0]
    return results


def _wait_until(check: Callable[[], bool], timeout: float) -> bool:
    """Whether `check()` became true within `timeout` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _wait_for(check: Callable[[], bool], what: str, timeout: float) -> None:
    if not _wait_until(check, timeout):
        raise DemoError(f"{what} did not happen within {timeout:.0f} s")


def _chain_balances(url: str, token: str, addresses: Mapping[str, str]) -> dict[str, Assets]:
    """The ETH and token balances of `addresses` (by label) on the chain at `url`."""

    async def read() -> dict[str, Assets]:
        chain = ChainService.from_url(url, request_timeout=CHAIN_TIMEOUT)
        try:
            client = chain.token(Address.from_hex(token))
            found = {}
            for label, address in addresses.items():
                who = Address.from_hex(address)
                found[label] = Assets(await chain.eth_balance(who), await client.balance_of(who))
            return found
        finally:
            chain.close()

    try:
        return trio.run(read)
    except ChainError as exc:
        raise DemoError(f"reading the chain at {url} failed: {_one_line(str(exc))}") from None


# ---------------------------------------------------------------- the progress bar


class Progress:
    """`weft demo:` lines on `out`; a payment bar redrawn in place on a terminal, else a
    line at every tenth."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._lock = threading.Lock()
        self._done = 0
        self._total = 0
        self._shown = -1
        self._started = 0.0

    def line(self, text: str) -> None:
        print(f"weft demo: {text}", file=self.out, flush=True)

    def start_bar(self, total: int) -> None:
        self._done, self._total, self._shown = 0, total, -1
        self._started = time.monotonic()
        self.draw()

    def add(self, count: int = 1) -> None:
        with self._lock:
            self._done += count

    def draw(self) -> None:
        done, total = self._done, self._total
        if self.tty:
            if self._shown == total:
                return  # the full bar is drawn and its line ended
            self._shown = total if done >= total else -1
            width = 30
            filled = width * done // max(total, 1)
            seconds = time.monotonic() - self._started
            rate = f"{done / seconds:.0f}/s" if seconds > 0 else ""
            bar = "#" * filled + "." * (width - filled)
            self.out.write(f"\rweft demo: paying [{bar}] {done}/{total} payments {rate}  ")
            if done >= total:
                self.out.write("\n")
            self.out.flush()
            return
        tenth = 10 * done // max(total, 1)
        if tenth != self._shown:
            self._shown = tenth
            self.line(f"paid {done}/{total} ({10 * tenth}%)")


# ---------------------------------------------------------------- the demo


def _users(net: Devnet) -> tuple[DevnetNode, list[DevnetNode]]:
    hubs = [n for n in net.nodes if n.role == "hub"]
    if len(hubs) != 1:
        raise DemoError(f"the devnet has {len(hubs)} hubs, not one")
    return hubs[0], [n for n in net.nodes if n.role == "user"]


def play(net: Devnet, payments: int, progress: Progress, stop: threading.Event) -> Outcome:
    """Run the demo's deposits, threads, payments, closes and withdrawals on the running
    devnet `net`, and collect every figure it expects and observes (steps 2 to 5 of the
    module docstring; nothing is compared here). Raises DemoError; `stop` (set on Ctrl-C)
    ends the payments early."""
    hub_node, user_nodes = _users(net)
    names = [u.name for u in user_nodes]
    pairs = ring(names)
    by_name = {u.name: u for u in user_nodes}
    # The payer's lock is exactly what it pays over the thread.
    paid = {p: times(p.amount, payments) for p in pairs}
    for pair in pairs:
        if not DEPOSIT.covers(paid[pair]):
            raise DemoError(
                f"{payments} payments of {amount_text(pair.amount)} do not fit a deposit of "
                f"{amount_text(DEPOSIT)}"
            )
    sent = {n: sum((paid[p] for p in pairs if p.payer == n), NO_ASSETS) for n in names}
    received = {n: sum((paid[p] for p in pairs if p.payee == n), NO_ASSETS) for n in names}
    expected: dict[Figure, Assets] = {}
    observed: dict[Figure, Assets] = {}

    def each_user(job: Callable[[_Node], T]) -> list[T]:
        """`job` with a connection to each user, all users at once."""

        def one(node: DevnetNode) -> T:
            with _Node(node) as user:
                return job(user)

        return _concurrently([partial(one, node) for node in user_nodes])

    def each_pair(
        job: Callable[[_Node, Pair, Any], T],
        keys: Sequence[Any],
        tick: Callable[[], None] = lambda: None,
    ) -> list[T]:
        """`job` with a connection to each pair's payer (and the pair's thread key), all
        pairs at once."""

        def one(pair: Pair, key: Any) -> T:
            with _Node(by_name[pair.payer]) as payer:
                return job(payer, pair, key)

        jobs = [partial(one, p, k) for p, k in zip(pairs, keys, strict=True)]
        return _concurrently(jobs, tick)

    # What there was before: the users' channels, the ChannelManager's holdings.
    def prepare(user: _Node) -> Assets:
        _wait_for(
            lambda: bool(user.call("status")["hub_connected"]),
            f"{user.name} connecting to the hub",
            CONNECT_TIMEOUT,
        )
        found = user.call("status")["balance"]
        return NO_ASSETS if found is None else assets_of(found["user"])

    before = dict(zip(names, each_user(prepare), strict=True))
    contract_before = _chain_balances(net.chain_url, net.token, {"contract": net.manager})

    progress.line(f"depositing {amount_text(DEPOSIT)} for each of {len(names)} users")
    each_user(lambda user: user.call("deposit", amount=assets_json(DEPOSIT)))

    # The hub's holdings before it collateralizes: its reserve and its channel balances.
    with _Node(hub_node) as hub:
        reserve_before = assets_of(hub.call("reserve"))
        hub_in = {
            node.name: assets_of(hub.call("balance", user=node.address)["hub"])
            for node in user_nodes
        }
    hub_before = sum(hub_in.values(), reserve_before)
    need = sum((hub_in[n].shortfall(received[n]) for n in names), NO_ASSETS)
    if not reserve_before.covers(need):
        raise DemoError(
            f"the hub's reserve ({amount_text(reserve_before)}) cannot cover the collateral the "
            f"threads need ({amount_text(need)}); stop the devnet and start a new one"
        )

    progress.line("the hub collateralizes what the threads to each user lock")

    def collateralize(user: _Node) -> None:
        need = received[user.name]  # what the threads to this user lock of the hub's
        with _Node(hub_node) as hub:
            hub.call("collateralize", user=user.address, amount=assets_json(need))

    each_user(collateralize)

    progress.line(
        f"opening {len(pairs)} threads ({', '.join(p.label for p in pairs)}), each "
        "locking what its payer will pay"
    )
    keys = each_pair(
        lambda payer, pair, _: payer.call(
            "open_thread", peer=by_name[pair.payee].address, lock=assets_json(paid[pair])
        ),
        [None] * len(pairs),
    )

    total = payments * len(pairs)
    progress.line(f"paying: {payments} payments on each thread")

    def pay(payer: _Node, pair: Pair, key: Any) -> None:
        for _ in range(payments):
            if stop.is_set():
                raise DemoError("interrupted")
            payer.call("pay", key=key, amount=assets_json(pair.amount))
            progress.add()

    progress.start_bar(total)
    paying_started = time.monotonic()
    each_pair(pay, keys, progress.draw)
    paying_seconds = time.monotonic() - paying_started

    progress.line("closing the threads")
    finals = each_pair(lambda payer, _, key: payer.call("close_thread", key=key), keys)
    for pair, final in zip(pairs, finals, strict=True):
        expected[(pair.label, "final balance of the receiver")] = paid[pair]
        observed[(pair.label, "final balance of the receiver")] = assets_of(
            final["balance_receiver"]
        )
        expected[(pair.label, "final balance of the sender")] = NO_ASSETS  # locked = paid
        observed[(pair.label, "final balance of the sender")] = assets_of(final["balance_sender"])

    def settled(user: _Node) -> tuple[Assets, Assets]:
        """Once the user's demo threads are settled: its channel balance as it and as the
        hub see it (once both hold the same channel state, or after a bounded wait)."""
        mine = [
            k for k in keys if user.address.lower() in (k["sender"].lower(), k["receiver"].lower())
        ]
        _wait_for(
            lambda: not any(t["key"] in mine for t in user.call("threads")),
            f"the threads of {user.name} settling",
            SETTLE_TIMEOUT,
        )
        with _Node(hub_node) as hub:
            deadline = time.monotonic() + SETTLE_TIMEOUT
            while True:
                own = user.call("balance")
                hubs = hub.call("balance", user=user.address)
                if own["tx_count"] == hubs["tx_count"] or time.monotonic() >= deadline:
                    return assets_of(own["user"]), assets_of(hubs["user"])
                time.sleep(0.05)

    channels = dict(zip(names, each_user(settled), strict=True))

    progress.line("withdrawing every user's channel balance to a fresh address")
    fresh = {n: Signer(new_private_key()).address.checksum() for n in names}
    fresh_before = _chain_balances(net.chain_url, net.token, fresh)

    def withdraw(user: _Node) -> Assets:
        amount = channels[user.name][0]
        user.call("withdraw", amount=assets_json(amount), recipient=fresh[user.name])
        return assets_of(user.call("balance")["user"])

    left = dict(zip(names, each_user(withdraw), strict=True))

    progress.line("the hub reclaims the collateral the demo added, back to its reserve")
    with _Node(hub_node) as hub:
        left_to_hub = _reclaim(hub, user_nodes, hub_in)

        progress.line("checking the balances on the chain and at the hub")
        after = _chain_balances(net.chain_url, net.token, {**fresh, "contract": net.manager})
        reserve_after = assets_of(hub.call("reserve"))
        hub_now = {
            node.name: assets_of(hub.call("balance", user=node.address)["hub"])
            for node in user_nodes
        }
    hub_after = sum(hub_now.values(), reserve_after)

    results = []
    for name in names:
        owed = before[name] + DEPOSIT + received[name] - sent[name]
        expected[(name, "channel balance")] = owed
        observed[(name, "channel balance")] = channels[name][0]
        expected[(name, "channel balance at the hub")] = owed
        observed[(name, "channel balance at the hub")] = channels[name][1]
        expected[(name, "left in the channel")] = NO_ASSETS
        observed[(name, "left in the channel")] = left[name]
        expected[(name, f"on-chain at {fresh[name]}")] = fresh_before[name] + owed
        observed[(name, f"on-chain at {fresh[name]}")] = after[name]
        expected[(name, "hub's balance after the reclaim")] = left_to_hub[name]
        observed[(name, "hub's balance after the reclaim")] = hub_now[name]
        results.append(UserResult(name, sent[name], received[name], channels[name][0], after[name]))
    expected[("contract", "balance")] = contract_before["contract"] - sum(
        before.values(), NO_ASSETS
    )
    observed[("contract", "balance")] = after["contract"]
    expected[("hub", "reserve + channel balances")] = hub_before
    observed[("hub", "reserve + channel balances")] = hub_after
    return Outcome(tuple(results), tuple(pairs), payments, paying_seconds, expected, observed)


def _reclaim(
    hub: _Node, user_nodes: Sequence[DevnetNode], before: Mapping[str, Assets]
) -> dict[str, Assets]:
    """Have the hub move its balance in each user's channel above `before` (what it had there
    before the demo) back to its reserve, and wait (bounded) until the reserve holds it.
    Returns what the hub should have left in each channel. A reclaim that does not happen
    is not an error here: the figures compared afterwards show it."""
    reserve = assets_of(hub.call("reserve"))
    left: dict[str, Assets] = {}
    reclaimed = NO_ASSETS

    def balance(node: DevnetNode) -> dict[str, Any]:
        found: dict[str, Any] = hub.call("balance", user=node.address)
        return found

    def withdrawn(node: DevnetNode) -> bool:
        """Whether the hub, too, sees the user's withdrawal confirmed."""
        return assets_of(balance(node)["pending_withdrawal_user"]).is_zero()

    for node in user_nodes:
        _wait_until(partial(withdrawn, node), SETTLE_TIMEOUT)
        have = assets_of(balance(node)["hub"])
        extra = before[node.name].shortfall(have)  # what it has above what it had
        left[node.name] = have - extra
        if not extra.is_zero():
            hub.call("reclaim_collateral", user=node.address, amount=assets_json(extra))
            reclaimed += extra
    _wait_until(
        lambda: (
            assets_of(hub.call("reserve")) == reserve + reclaimed
            and all(assets_of(balance(n)["hub"]) == left[n.name] for n in user_nodes)
        ),
        RECLAIM_TIMEOUT,
    )
    return left


@contextlib.contextmanager
def _demo_lock(directory: Path) -> Iterator[None]:
    """Hold the demo lock of `directory` (`flock` on `directory/.demo.lock`, created with
    the directory if need be); DemoError at once if another demo holds it. The lock goes
    with this process (also on SIGKILL)."""
    path = directory / DEMO_LOCK_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise DemoError(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DemoError(f"another weft devnet demo is running on {directory}") from None
        yield
    finally:
        os.close(fd)


def _devnet(directory: Path, nodes: int, progress: Progress) -> tuple[Devnet, bool]:
    """The devnet running in `directory`, or a new one; whether the demo started it."""
    net = read_devnet(directory)
    if net is not None and not net.complete:
        raise DemoError(
            f"the devnet in {directory} is incomplete (its 'weft devnet up' was interrupted "
            f"or still runs); run 'weft devnet down --dir {directory}' and try again"
        )
    if net is None:
        if nodes < 2:
            raise DemoError(f"the demo needs at least 2 users: --nodes {nodes} is too few")
        progress.line(f"no devnet in {directory}: starting one with a hub and {nodes} users")
        net = up(directory, nodes, progress.line)
        ours = True
    else:
        progress.line(f"using the devnet in {directory}")
        ours = False
        down_command = f"weft devnet down --dir {directory}"
        gone = [
            f"{name} (pid {pid}) is not running"
            for name, pid, marker in net.processes()
            if pid > 0 and not process_runs(pid, marker)
        ]
        if not gone:
            found = status(directory)
            if found is None:
                raise DemoError(f"the devnet in {directory} went away while the demo looked at it")
            gone = [f"{n.name} does not answer ({n.error})" for n in found[1] if not n.alive]
        if gone:
            raise DemoError(
                f"the devnet in {directory} is not fully running: {'; '.join(gone)}; "
                f"run '{down_command}' and try again"
            )
    pids = ", ".join(f"{name} {pid}" for name, pid, _ in net.processes())
    progress.line(f"devnet processes (name pid): {pids}")
    return net, ours


def run(
    directory: Path,
    *,
    nodes: int = 4,
    payments: int = 200,
    keep: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run the demo on the devnet in `directory` (see the module docstring); returns the
    exit code: 0 all figures agree, 1 some differ, 2 an expected failure, 130 Ctrl-C or
    SIGTERM. Results go to `out` (default stdout), progress to `err` (default stderr)."""
    started = time.monotonic()
    out = sys.stdout if out is None else out
    progress = Progress(sys.stderr if err is None else err)
    if not 1 <= payments <= MAX_PAYMENTS:
        progress.line(f"error: --payments must be 1..{MAX_PAYMENTS} (each payer locks them all)")
        return EXIT_FAILED
    with _sigterm_as_interrupt():
        code = _run(directory, nodes, payments, keep, out, progress)
    if code in (EXIT_OK, EXIT_MISMATCH):
        print(f"elapsed: {time.monotonic() - started:.1f} s", file=out, flush=True)
    return code


def _run(
    directory: Path, nodes: int, payments: int, keep: bool, out: TextIO, progress: Progress
) -> int:
    try:
        with _demo_lock(directory):
            return _run_locked(directory, nodes, payments, keep, out, progress)
    except DemoError as exc:
        progress.line(f"error: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        progress.line("interrupted")
        return EXIT_INTERRUPTED


def _run_locked(
    directory: Path, nodes: int, payments: int, keep: bool, out: TextIO, progress: Progress
) -> int:
    stop = threading.Event()
    ours = False
    code = EXIT_FAILED
    try:
        net, ours = _devnet(directory, nodes, progress)
        outcome = play(net, payments, progress, stop)
        mismatches = find_mismatches(outcome.expected, outcome.observed)
        print(render(outcome, mismatches), file=out, flush=True)
        code = EXIT_MISMATCH if mismatches else EXIT_OK
    except (DemoError, DevnetError) as exc:
        progress.line(f"error: {exc}")
    except InvalidValue as exc:  # a node's answer, or a figure that went below zero
        progress.line(f"error: a figure is out of range: {exc}")
    except KeyboardInterrupt:
        progress.line("interrupted")
        code = EXIT_INTERRUPTED
    finally:
        stop.set()
        with _interrupts_ignored():
            if ours and (code not in (EXIT_OK, EXIT_MISMATCH) or not keep):
                progress.line(f"stopping the devnet in {directory}")
                try:
                    down(directory)
                except DevnetError as exc:
                    progress.line(f"error: {exc}")
                    code = EXIT_FAILED
            elif ours:
                progress.line(
                    f"the devnet keeps running; stop it with 'weft devnet down --dir {directory}'"
                )
    return code


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs (in the main thread; elsewhere nothing changes), the first
    SIGTERM is handled as Ctrl-C: by the current SIGINT handler (Python's raises
    KeyboardInterrupt; trio's, inside `trio.run`, delivers it safely), or by raising
    KeyboardInterrupt if SIGINT has no Python handler. Later ones are ignored."""
    if not _in_main_thread():
        yield
        return
    fired = False

    def on_sigterm(signum: int, frame: Any) -> None:
        nonlocal fired
        if fired:
            return
        fired = True
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def _interrupts_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM are ignored while the block runs (in the main thread): a bounded
    cleanup is not cut short."""
    if not _in_main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in previous.items():
        if handler is not None:
            signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
