"""The local control interface of a running node: newline-delimited JSON over TCP on 127.0.0.1.

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_control, node, 0, token)

    with ControlClient.from_data_dir(data_dir) as client:       # another process
        client.call("deposit", amount=[10**18, 0])

Protocol: one JSON object per line, each way, at most `MAX_LINE` bytes. A request is
`{"id": int, "token": hex, "method": str, "params": {...}}` (`params` may be left out); the
answer is `{"id": id, "result": ...}` or `{"id": id, "error": {"type": str, "message": str}}`.
Requests on one connection are answered in order, one at a time; use several connections
for concurrent requests (at most `MAX_CONNECTIONS` at once; one more is told `Busy` and
closed).

Error types: the name of the `node.api.WeftError` subclass the node raised
(`InsufficientBalance`, `InsufficientCollateral` with `"missing": [eth, token]`,
`UnknownPeer`, `UnknownThread`, `PeerOffline`, `HubOffline`, `ThreadClosing`,
`RequestRefused` with `"reason"`, `ChainTransactionFailed`, `RequestTimeout`,
`NodeStopped`, `WeftError`), or
`BadRequest` (not JSON, not a request, unknown method or parameter, a bad value; a line
over `MAX_LINE` also closes the connection), `Unauthorized` (wrong or missing token; the
connection is closed), `Busy` (too many connections), `ChainError` (a chain read failed),
`InternalError` (a bug; logged with its traceback). A bad request never stops the node.
A connection must make an authorized request within `AUTH_TIMEOUT` seconds of opening
(refused requests do not extend that), or it is closed.

Values: amounts are `[eth, token]` pairs of ints (wei, token base units); addresses are
0x hex (any case; EIP-55 checked when mixed); a thread key is
`{"sender": address, "receiver": address, "thread_id": int}`. Requests that wait on the
network or the chain take an optional `"timeout"` (seconds, default the node's
`request_timeout`).

Methods (`METHODS`):

- `status()` -> `{address, role, peer: {address, peer_id, multiaddrs}, balance,
  threads, hub_connected, channels}` (`balance`: my channel, null for the hub or before
  it exists; `hub_connected`: null for the hub; `channels`: how many channels I know)
- `balance(user?)` -> `{hub, user, pending_deposit_user, pending_withdrawal_user,
  open_threads, tx_count}`; the hub names the `user` whose channel it means
- `threads()` -> `[{key, phase, mine, peer, tx_count}]`
- user: `deposit(amount)`, `withdraw(amount, recipient?)`, `open_thread(peer, lock,
  peer_lock?)` -> key, `pay(key, amount)` -> the thread's tx_count, `close_thread(key,
  force?)` -> `{key, tx_count, balance_sender, balance_receiver}` (the final state),
  `pay_via_hub(to, amount)`, `request_collateral(amount)`
- hub: `deposit_reserve(amount)`, `reserve()` -> amount, `collateralize(user, amount)`
  -> my balance in that channel once it covers `amount`, `reclaim_collateral(user, amount)`
- `bench_pay(key, count, mode, amount, window?, time_limit?)`: `count` payments of
  `amount` inside the node -> `{count, seconds, payments_per_s, tx_count, latencies_ms:
  {p50, p90, p99}}`. `"sequential"` awaits each `Node.pay` and times it;
  `"pipelined"` keeps up to `window` (default 256) `Node.start_payment`s in flight and
  times each from its start until it is seen countersigned, in order (so its latencies
  include queueing). The first failed payment ends the run: its error is returned, with
  how many payments were done in the message. `count` is at most `MAX_BENCH_COUNT`; a
  run longer than `time_limit` seconds (default 300) ends as `RequestTimeout`.

Files a running node keeps in its data directory (`python -m node.run` writes them):
`node.json` (`NodeInfo`: address, peer_id, multiaddrs, control_port, pid; replaced
atomically) and `control.token` (the token as hex, mode 0600).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import hmac
import itertools
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from node.api import (
    Balance,
    InsufficientCollateral,
    Node,
    Payment,
    PeerRef,
    RequestRefused,
    RequestTimeout,
    ThreadInfo,
    WeftError,
)
from node.chain_errors import ChainError
from node.host import HUB_PROTOCOL
from node.json_depth import json_depth_within
from protocols.errors import InvalidValue
from protocols.messages import SignedThreadState
from protocols.types import Address, Assets, ThreadKey

if TYPE_CHECKING:
    # The trio stubs that libp2p brings in (trio-typing) keep TaskStatus there.
    from trio_typing import TaskStatus

__all__ = [
    "AUTH_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_LINE",
    "METHODS",
    "NODE_FILE",
    "TOKEN_FILE",
    "AsyncControlClient",
    "ControlClient",
    "ControlError",
    "NodeInfo",
    "assets_json",
    "assets_of",
    "key_json",
    "key_of",
    "read_node_info",
    "read_token",
    "serve_control",
    "write_node_info",
    "write_token",
]

log = logging.getLogger("weft.control")

HOST: Final = "127.0.0.1"
MAX_LINE: Final = 64 * 1024
"""Most bytes in one request line (without its newline)."""
MAX_RESPONSE: Final = 16 * 1024 * 1024
"""Most bytes a client reads as one answer line."""
MAX_CONNECTIONS: Final = 16
AUTH_TIMEOUT: Final = 10.0
"""Seconds a new connection has to make its first authorized request."""
MAX_JSON_DEPTH: Final = 32
"""Deepest nesting of a request line, checked before parsing (see `node.json_depth`)."""
MAX_TIMEOUT: Final = 3600.0
MAX_BENCH_COUNT: Final = 1_000_000
MAX_BENCH_WINDOW: Final = 1024
DEFAULT_BENCH_WINDOW: Final = 256
DEFAULT_BENCH_TIME_LIMIT: Final = 300.0
CLIENT_TIMEOUT: Final = 120.0
"""Seconds a client waits for an answer by default."""
NODE_FILE: Final = "node.json"
TOKEN_FILE: Final = "control.token"
TOKEN_FILE_MODE: Final = 0o600


# ---------------------------------------------------------------- values on the wire


def assets_json(amount: Assets) -> list[int]:
    return [amount.eth, amount.token]


def assets_of(value: object) -> Assets:
    """`[eth, token]` as `Assets`; raises `InvalidValue` otherwise."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise InvalidValue("an amount is [eth, token]")
    eth, token = value
    return Assets(eth, token)  # checks that both are ints in uint256 range (bool is not)


def address_of(value: object) -> Address:
    if not isinstance(value, str):
        raise InvalidValue("an address is a 0x hex string")
    return Address.from_hex(value)


def key_json(key: ThreadKey) -> dict[str, Any]:
    return {
        "sender": key.sender.checksum(),
        "receiver": key.receiver.checksum(),
        "thread_id": key.thread_id,
    }


def key_of(value: object) -> ThreadKey:
    """`{sender, receiver, thread_id}` as a `ThreadKey`; raises `InvalidValue` otherwise."""
    if not isinstance(value, dict) or set(value) != {"sender", "receiver", "thread_id"}:
        raise InvalidValue("a thread key is {sender, receiver, thread_id}")
    return ThreadKey(address_of(value["sender"]), address_of(value["receiver"]), value["thread_id"])


def _ref_json(ref: PeerRef) -> dict[str, Any]:
    return {
        "address": ref.address.checksum(),
        "peer_id": ref.peer_id,
        "multiaddrs": list(ref.multiaddrs),
    }


def _balance_json(balance: Balance) -> dict[str, Any]:
    return {
        "hub": assets_json(balance.hub),
        "user": assets_json(balance.user),
        "pending_deposit_user": assets_json(balance.pending_deposit_user),
        "pending_withdrawal_user": assets_json(balance.pending_withdrawal_user),
        "open_threads": balance.open_threads,
        "tx_count": balance.tx_count,
    }


def _thread_json(info: ThreadInfo) -> dict[str, Any]:
    return {
        "key": key_json(info.key),
        "phase": info.phase.value,
        "mine": assets_json(info.mine),
        "peer": assets_json(info.peer),
        "tx_count": info.tx_count,
    }


def _final_json(final: SignedThreadState) -> dict[str, Any]:
    state = final.state
    return {
        "key": key_json(state.key),
        "tx_count": state.tx_count,
        "balance_sender": assets_json(state.balance_sender),
        "balance_receiver": assets_json(state.balance_receiver),
    }


# ---------------------------------------------------------------- requests and answers


class ControlError(Exception):
    """An error answer (or a failed connection, type `ConnectionError`) of the control
    interface. `type` is the error type (see the module docstring); `missing` is set for
    `InsufficientCollateral`; `reason` for `RequestRefused`."""

    def __init__(
        self,
        type: str,
        message: str,
        missing: Assets | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.missing = missing
        self.reason = reason


class _BadRequest(Exception):
    """A request the server cannot take (answered as `BadRequest`)."""


def encode_request(request_id: int, token: str, method: str, params: dict[str, Any]) -> bytes:
    line = json.dumps(
        {"id": request_id, "token": token, "method": method, "params": params},
        separators=(",", ":"),
    ).encode()
    if len(line) > MAX_LINE:
        raise ControlError("BadRequest", f"request of {len(line)} bytes exceeds {MAX_LINE}")
    return line + b"\n"


def decode_response(line: bytes, request_id: int) -> Any:
    """The result in answer `line` to request `request_id`; raises `ControlError`."""
    try:
        answer = json.loads(line)
    except (ValueError, RecursionError):
        raise ControlError("BadResponse", "the node's answer is not JSON") from None
    if not isinstance(answer, dict):
        raise ControlError("BadResponse", "the node's answer is not an object")
    error = answer.get("error")
    if isinstance(error, dict):
        try:
            missing = assets_of(error["missing"]) if "missing" in error else None
        except InvalidValue:
            missing = None
        reason = error.get("reason")
        raise ControlError(
            str(error.get("type", "Error")),
            str(error.get("message", "")),
            missing,
            str(reason) if reason is not None else None,
        )
    if answer.get("id") != request_id or "result" not in answer:
        raise ControlError("BadResponse", f"not the answer to request {request_id}")
    return answer["result"]


def _error(request_id: object, type_: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"id": request_id, "error": {"type": type_, "message": message, **extra}}


def _error_for(exc: Exception) -> dict[str, Any]:
    """The `error` object of an exception raised while serving a request."""
    if isinstance(exc, _BadRequest | InvalidValue):
        return {"type": "BadRequest", "message": str(exc)}
    if isinstance(exc, WeftError):
        error: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
        if isinstance(exc, InsufficientCollateral):
            error["missing"] = assets_json(exc.missing)
        if isinstance(exc, RequestRefused):
            error["reason"] = exc.reason.name
        return error
    if isinstance(exc, ChainError):
        return {"type": "ChainError", "message": f"{type(exc).__name__}: {exc}"}
    log.error("control request failed with a bug", exc_info=exc)
    return {"type": "InternalError", "message": f"{type(exc).__name__}: {exc}"}


class _Params:
    """A request's params, read one by one; `finish()` rejects any left unread."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self._raw = raw
        self._read: set[str] = set()

    def _get(self, name: str) -> object:
        self._read.add(name)
        if name not in self._raw:
            raise _BadRequest(f"missing parameter {name!r}")
        return self._raw[name]

    def _has(self, name: str) -> bool:
        self._read.add(name)
        return self._raw.get(name) is not None

    def _value(self, name: str, parse: Callable[[object], Any]) -> Any:
        try:
            return parse(self._get(name))
        except InvalidValue as exc:
            raise _BadRequest(f"parameter {name!r}: {exc}") from None

    def assets(self, name: str) -> Assets:
        result: Assets = self._value(name, assets_of)
        return result

    def optional_assets(self, name: str) -> Assets | None:
        return self.assets(name) if self._has(name) else None

    def address(self, name: str) -> Address:
        result: Address = self._value(name, address_of)
        return result

    def optional_address(self, name: str) -> Address | None:
        return self.address(name) if self._has(name) else None

    def key(self, name: str) -> ThreadKey:
        result: ThreadKey = self._value(name, key_of)
        return result

    def flag(self, name: str) -> bool:
        if not self._has(name):
            return False
        value = self._get(name)
        if not isinstance(value, bool):
            raise _BadRequest(f"parameter {name!r} must be true or false")
        return value

    def integer(self, name: str, low: int, high: int, default: int | None = None) -> int:
        if default is not None and not self._has(name):
            return default
        value = self._get(name)
        if type(value) is not int or not low <= value <= high:
            raise _BadRequest(f"parameter {name!r} must be an integer in [{low}, {high}]")
        return value

    def seconds(self, name: str, default: float | None) -> float | None:
        if not self._has(name):
            return default
        value = self._get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            value = math.nan
        if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
            raise _BadRequest(f"parameter {name!r} must be seconds in (0, {MAX_TIMEOUT}]")
        return float(value)

    def timeout(self) -> float | None:
        return self.seconds("timeout", None)

    def choice(self, name: str, options: tuple[str, ...]) -> str:
        value = self._get(name)
        if value not in options:
            raise _BadRequest(f"parameter {name!r} must be one of {', '.join(options)}")
        assert isinstance(value, str)
        return value

    def finish(self) -> None:
        unknown = sorted(set(self._raw) - self._read)
        if unknown:
            raise _BadRequest(f"unknown parameter(s): {', '.join(unknown)}")


# ---------------------------------------------------------------- methods

Method = Callable[[Node, _Params], Awaitable[Any]]


async def _status(node: Node, p: _Params) -> Any:
    p.finish()
    balance = None
    hub_connected = None
    if not node.is_hub:
        try:
            balance = _balance_json(node.balance())
        except WeftError:
            balance = None  # no channel yet
        hub = node.settings.hub
        assert hub is not None
        hub_connected = node.peers.is_connected(hub.address, HUB_PROTOCOL)
    return {
        "address": node.address.checksum(),
        "role": node.settings.role.value,
        "peer": _ref_json(node.peer_ref),
        "balance": balance,
        "threads": [_thread_json(t) for t in node.threads()],
        "hub_connected": hub_connected,
        "channels": len(node.state.channels),
    }


async def _balance(node: Node, p: _Params) -> Any:
    user = p.optional_address("user")
    p.finish()
    return _balance_json(node.balance(user))


async def _threads(node: Node, p: _Params) -> Any:
    p.finish()
    return [_thread_json(t) for t in node.threads()]


async def _deposit(node: Node, p: _Params) -> Any:
    amount, timeout = p.assets("amount"), p.timeout()
    p.finish()
    await node.deposit(amount, timeout=timeout)
    return None


async def _withdraw(node: Node, p: _Params) -> Any:
    amount, recipient, timeout = p.assets("amount"), p.optional_address("recipient"), p.timeout()
    p.finish()
    await node.withdraw(amount, recipient, timeout=timeout)
    return None


async def _open_thread(node: Node, p: _Params) -> Any:
    peer, lock = p.address("peer"), p.assets("lock")
    peer_lock = p.optional_assets("peer_lock") or Assets()
    timeout = p.timeout()
    p.finish()
    return key_json(await node.open_thread(peer, lock, peer_lock, timeout=timeout))


async def _pay(node: Node, p: _Params) -> Any:
    key, amount, timeout = p.key("key"), p.assets("amount"), p.timeout()
    p.finish()
    return await node.pay(key, amount, timeout=timeout)


async def _close_thread(node: Node, p: _Params) -> Any:
    key, force, timeout = p.key("key"), p.flag("force"), p.timeout()
    p.finish()
    return _final_json(await node.close_thread(key, force=force, timeout=timeout))


async def _pay_via_hub(node: Node, p: _Params) -> Any:
    to, amount, timeout = p.address("to"), p.assets("amount"), p.timeout()
    p.finish()
    await node.pay_via_hub(to, amount, timeout=timeout)
    return None


async def _request_collateral(node: Node, p: _Params) -> Any:
    amount = p.assets("amount")
    p.finish()
    await node.request_collateral(amount)
    return None


async def _deposit_reserve(node: Node, p: _Params) -> Any:
    amount = p.assets("amount")
    p.finish()
    await node.deposit_reserve(amount)
    return None


async def _reserve(node: Node, p: _Params) -> Any:
    p.finish()
    return assets_json(await node.reserve())


async def _collateralize(node: Node, p: _Params) -> Any:
    user, amount, timeout = p.address("user"), p.assets("amount"), p.timeout()
    p.finish()
    return assets_json(await node.collateralize(user, amount, timeout=timeout))


async def _reclaim_collateral(node: Node, p: _Params) -> Any:
    user, amount = p.address("user"), p.assets("amount")
    p.finish()
    await node.reclaim_collateral(user, amount)
    return None


async def _bench_pay(node: Node, p: _Params) -> Any:
    key = p.key("key")
    count = p.integer("count", 1, MAX_BENCH_COUNT)
    mode = p.choice("mode", ("sequential", "pipelined"))
    amount = p.assets("amount")
    window = p.integer("window", 1, MAX_BENCH_WINDOW, DEFAULT_BENCH_WINDOW)
    time_limit = p.seconds("time_limit", DEFAULT_BENCH_TIME_LIMIT)
    assert time_limit is not None
    p.finish()
    latencies: list[float] = []
    tx_count = 0
    started = time.perf_counter()
    try:
        with trio.fail_after(time_limit):
            if mode == "sequential":
                for _ in range(count):
                    begun = time.perf_counter()
                    tx_count = await node.pay(key, amount)
                    latencies.append(time.perf_counter() - begun)
            else:
                tx_count = await _pay_pipelined(node, key, amount, count, window, latencies)
    except trio.TooSlowError:
        raise RequestTimeout(
            f"bench_pay: {len(latencies)} of {count} payments done when the time limit "
            f"of {time_limit} s passed"
        ) from None
    except WeftError as exc:
        exc.args = (f"{exc} (bench_pay: {len(latencies)} of {count} payments done)",)
        raise
    seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "count": count,
        "seconds": seconds,
        "payments_per_s": count / seconds if seconds > 0 else None,
        "tx_count": tx_count,
        "latencies_ms": {
            name: 1000 * _percentile(latencies, q)
            for name, q in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))
        },
    }


async def _pay_pipelined(
    node: Node, key: ThreadKey, amount: Assets, count: int, window: int, latencies: list[float]
) -> int:
    """Make `count` payments with up to `window` in flight; return the last tx_count."""
    in_flight: collections.deque[tuple[float, Payment]] = collections.deque()
    started = 0
    tx_count = 0
    try:
        while len(latencies) < count:
            while started < count and len(in_flight) < window:
                in_flight.append((time.perf_counter(), node.start_payment(key, amount)))
                started += 1
            begun, payment = in_flight[0]
            tx_count = await payment.wait()
            in_flight.popleft()
            latencies.append(time.perf_counter() - begun)
    finally:
        # Forget the payments nobody will wait for (they may still complete in the node).
        with trio.CancelScope(shield=True):
            for _, payment in in_flight:
                with contextlib.suppress(WeftError):
                    await payment.wait(timeout=0)
    return tx_count


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


METHODS: Final[dict[str, Method]] = {
    "status": _status,
    "balance": _balance,
    "threads": _threads,
    "deposit": _deposit,
    "withdraw": _withdraw,
    "open_thread": _open_thread,
    "pay": _pay,
    "close_thread": _close_thread,
    "pay_via_hub": _pay_via_hub,
    "request_collateral": _request_collateral,
    "deposit_reserve": _deposit_reserve,
    "reserve": _reserve,
    "collateralize": _collateralize,
    "reclaim_collateral": _reclaim_collateral,
    "bench_pay": _bench_pay,
}


# ---------------------------------------------------------------- the server


class _LineTooLong(Exception):
    pass


class _LineReader:
    """Lines (without their newline) from a stream, each at most `limit` bytes."""

    def __init__(self, stream: trio.abc.ReceiveStream, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._buffer = bytearray()
        self._scanned = 0

    async def next_line(self) -> bytes | None:
        """The next line; None at the end of the stream (a partial last line is dropped)."""
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            if end >= 0:
                if end > self._limit:
                    raise _LineTooLong
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                self._scanned = 0
                return line
            self._scanned = len(self._buffer)
            if len(self._buffer) > self._limit:
                raise _LineTooLong
            data = await self._stream.receive_some(65536)
            if not data:
                return None
            self._buffer += data


class _Verdict(enum.Enum):
    """What an answered request means for its connection."""

    ANONYMOUS = "anonymous"  # refused before its token was looked at: stays open
    AUTHORIZED = "authorized"  # carried the right token
    CLOSE = "close"  # wrong token: answered, then the connection is closed


class _ControlServer:
    def __init__(self, node: Node, token: str, max_connections: int, auth_timeout: float) -> None:
        self.node = node
        self._token = token.encode()
        self._max_connections = max_connections
        self._auth_timeout = auth_timeout
        self._connections = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self._connections >= self._max_connections:
                await self._send(stream, _error(None, "Busy", "too many control connections"))
                return
            self._connections += 1
            try:
                await self._serve(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away
            finally:
                self._connections -= 1

    async def _serve(self, stream: trio.SocketStream) -> None:
        reader = _LineReader(stream, MAX_LINE)
        # One deadline per connection, from its opening until its first authorized
        # request (reading lines and sending their answers): lines refused before their
        # token is looked at (junk, a request without an id) do not extend it, so a
        # client without the token cannot hold a connection slot.
        auth_deadline = trio.current_time() + self._auth_timeout
        authorized = False
        while True:
            line = None
            with trio.CancelScope(deadline=math.inf if authorized else auth_deadline):
                try:
                    line = await reader.next_line()
                except _LineTooLong:
                    message = f"request line exceeds {MAX_LINE} bytes"
                    await self._send(stream, _error(None, "BadRequest", message))
                    return
            if line is None:
                return  # end of stream, or out of time to authorize
            answer, verdict = await self.answer(line)
            authorized = authorized or verdict is _Verdict.AUTHORIZED
            sent = False
            with trio.CancelScope(deadline=math.inf if authorized else auth_deadline):
                await self._send(stream, answer)
                sent = True
            if not sent or verdict is _Verdict.CLOSE:
                return

    async def answer(self, line: bytes) -> tuple[dict[str, Any], _Verdict]:
        """The answer to one request line, and what it means for the connection."""
        if not json_depth_within(line, MAX_JSON_DEPTH):
            return _error(
                None, "BadRequest", f"JSON nested deeper than {MAX_JSON_DEPTH}"
            ), _Verdict.ANONYMOUS
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):
            return _error(None, "BadRequest", "not JSON"), _Verdict.ANONYMOUS
        if not isinstance(request, dict):
            return _error(None, "BadRequest", "a request is a JSON object"), _Verdict.ANONYMOUS
        request_id = request.get("id")
        if type(request_id) is not int:
            return _error(None, "BadRequest", "a request needs an integer id"), _Verdict.ANONYMOUS
        token = request.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(
            token.encode("utf-8", "replace"), self._token
        ):
            return _error(request_id, "Unauthorized", "wrong or missing token"), _Verdict.CLOSE
        method_name = request.get("method")
        params = request.get("params", {})
        method = METHODS.get(method_name) if isinstance(method_name, str) else None
        if method is None:
            return _error(
                request_id, "BadRequest", f"unknown method {method_name!r}"
            ), _Verdict.AUTHORIZED
        if not isinstance(params, dict):
            return _error(request_id, "BadRequest", "params must be an object"), _Verdict.AUTHORIZED
        try:
            result = await method(self.node, _Params(params))
        except Exception as exc:
            return {"id": request_id, "error": _error_for(exc)}, _Verdict.AUTHORIZED
        return {"id": request_id, "result": result}, _Verdict.AUTHORIZED

    @staticmethod
    async def _send(stream: trio.SocketStream, answer: dict[str, Any]) -> None:
        await stream.send_all(json.dumps(answer, separators=(",", ":")).encode() + b"\n")


async def serve_control(
    node: Node,
    port: int = 0,
    token: str = "",
    *,
    max_connections: int = MAX_CONNECTIONS,
    auth_timeout: float = AUTH_TIMEOUT,
    task_status: TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control interface of `node` on 127.0.0.1:`port` (0: a free port) until
    cancelled; start it with `nursery.start`, which returns the port.

    `token`: the secret every request must carry (non-empty). At most `max_connections`
    at once; each must make an authorized request within `auth_timeout` seconds of
    opening. Raises OSError if the port cannot be bound. Cancelling it closes the listener
    and every connection; requests in progress are cancelled (what they asked the node may
    still complete).
    """
    if not token:
        raise ValueError("the control interface needs a token")
    server = _ControlServer(node, token, max_connections, auth_timeout)
    listeners = await trio.open_tcp_listeners(port, host=HOST)
    bound = listeners[0].socket.getsockname()[1]
    log.info("control interface on %s:%d", HOST, bound)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, server.handle, listeners)
        task_status.started(bound)


# ---------------------------------------------------------------- files of a running node


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a running node tells other processes about itself (`node.json`)."""

    address: str
    peer_id: str
    multiaddrs: tuple[str, ...]
    control_port: int
    pid: int

    @property
    def hub_entry(self) -> dict[str, Any]:
        """This node as the `hub` entry of a user's config (`node.run`)."""
        return {
            "address": self.address,
            "peer_id": self.peer_id,
            "multiaddrs": list(self.multiaddrs),
        }


def write_node_info(data_dir: Path, info: NodeInfo) -> None:
    """Write `data_dir/node.json` atomically (a temporary file renamed over it)."""
    body = json.dumps({**asdict(info), "multiaddrs": list(info.multiaddrs)}, indent=1) + "\n"
    _replace_file(data_dir / NODE_FILE, body.encode(), 0o644)


def read_node_info(data_dir: Path) -> NodeInfo:
    """The `node.json` in `data_dir`; raises OSError or ValueError (malformed)."""
    raw = json.loads((data_dir / NODE_FILE).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{data_dir / NODE_FILE} is not a JSON object")
    try:
        info = NodeInfo(
            str(raw["address"]),
            str(raw["peer_id"]),
            tuple(str(m) for m in raw["multiaddrs"]),
            int(raw["control_port"]),
            int(raw["pid"]),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{data_dir / NODE_FILE} is malformed: {exc!r}") from None
    return info


def write_token(data_dir: Path) -> str:
    """A new random token (32 bytes, hex) in `data_dir/control.token`, mode 0600; returns
    it. The file is created exclusively beside the old one and renamed over it, so it is
    never readable by others, not even for a moment."""
    token = secrets.token_hex(32)
    _replace_file(data_dir / TOKEN_FILE, token.encode() + b"\n", TOKEN_FILE_MODE)
    return token


def read_token(data_dir: Path) -> str:
    return (data_dir / TOKEN_FILE).read_text().strip()


def _replace_file(path: Path, body: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)  # exactly `mode` whatever the umask
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- clients


class ControlClient:
    """A blocking client of one node's control interface (for command lines and tests).

    One connection, opened at the first call and kept; not thread-safe (use one client
    per thread). `call` raises `ControlError`: the node's error answer, or type
    `ConnectionError` when the node cannot be reached or the connection broke (the
    connection is then dropped; the next call opens a new one).
    """

    def __init__(
        self, port: int, token: str, *, host: str = HOST, timeout: float = CLIENT_TIMEOUT
    ) -> None:
        self.port = port
        self.host = host
        self.timeout = timeout
        self._token = token
        self._ids = itertools.count(1)
        self._socket: socket.socket | None = None
        self._file: Any = None

    @classmethod
    def from_data_dir(
        cls, data_dir: Path | str, *, timeout: float = CLIENT_TIMEOUT
    ) -> ControlClient:
        """A client of the node running on `data_dir` (its `node.json` and `control.token`)."""
        path = Path(data_dir)
        return cls(read_node_info(path).control_port, read_token(path), timeout=timeout)

    def call(self, method: str, /, **params: Any) -> Any:
        """Make request `method` with `params`; return its result or raise `ControlError`."""
        request_id = next(self._ids)
        line = encode_request(request_id, self._token, method, params)
        try:
            if self._socket is None:
                self._socket = socket.create_connection((self.host, self.port), self.timeout)
                self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._file = self._socket.makefile("rb")
            self._socket.settimeout(self.timeout)
            self._socket.sendall(line)
            answer = self._file.readline(MAX_RESPONSE + 1)
        except OSError as exc:
            self.close()
            raise ControlError("ConnectionError", f"control connection failed: {exc}") from exc
        if not answer.endswith(b"\n"):
            self.close()
            raise ControlError("ConnectionError", "the node closed the control connection")
        try:
            return decode_response(answer, request_id)
        except ControlError as exc:
            if exc.type in ("Unauthorized", "Busy", "BadResponse"):
                self.close()
            raise

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncControlClient:
    """A trio client of one node's control interface; like `ControlClient`, but `await
    call(...)`. Concurrent calls take turns on the one connection."""

    def __init__(
        self, port: int, token: str, *, host: str = HOST, timeout: float = CLIENT_TIMEOUT
    ) -> None:
        self.port = port
        self.host = host
        self.timeout = timeout
        self._token = token
        self._ids = itertools.count(1)
        self._stream: trio.SocketStream | None = None
        self._reader: _LineReader | None = None
        self._lock = trio.Lock()

    async def call(self, method: str, /, **params: Any) -> Any:
        request_id = next(self._ids)
        line = encode_request(request_id, self._token, method, params)
        async with self._lock:
            try:
                with trio.fail_after(self.timeout):
                    if self._stream is None:
                        self._stream = await trio.open_tcp_stream(self.host, self.port)
                        self._reader = _LineReader(self._stream, MAX_RESPONSE)
                    assert self._reader is not None
                    await self._stream.send_all(line)
                    answer = await self._reader.next_line()
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, _LineTooLong) as exc:
                await self.aclose()
                raise ControlError(
                    "ConnectionError", f"control connection failed: {exc!r}"
                ) from exc
            if answer is None:
                await self.aclose()
                raise ControlError("ConnectionError", "the node closed the control connection")
        try:
            return decode_response(answer, request_id)
        except ControlError as exc:
            if exc.type in ("Unauthorized", "Busy", "BadResponse"):
                await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream, self._reader = self._stream, None, None
            await stream.aclose()

    async def __aenter__(self) -> AsyncControlClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
