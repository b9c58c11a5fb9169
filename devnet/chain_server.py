"""Serve one embedded py-evm chain (eth-tester) as HTTP JSON-RPC on 127.0.0.1.

Several OS processes (a hub node, user nodes) can then share one chain: each builds
`ChainService.from_url(server.url)` and sees it exactly as it would see anvil.

    with serve_embedded_chain() as server:      # in process, served by threads
        chain = ChainService.from_url(server.url)

    python -m devnet.chain_server [--port N]    # prints the URL (one line), serves until
                                                # SIGTERM / SIGINT, then exits 0

`EmbeddedChainRpc` is the JSON-RPC side and touches no socket: a request body in, a
response body out. One lock serializes every call into eth-tester, which is not
thread-safe. `ChainServer` puts it behind a `ThreadingHTTPServer` (HTTP/1.1 keep-alive,
one thread per connection, 127.0.0.1 only).

Methods (`EmbeddedChainRpc.supported_methods`): the standard reads and writes a web3
client needs (`eth_chainId`, `eth_blockNumber`, `eth_getBlockByNumber`/`ByHash`, `eth_getBalance`,
`eth_getCode`, `eth_getStorageAt`, `eth_getTransactionCount` incl. "pending",
`eth_getTransactionByHash`, `eth_getTransactionReceipt`, `eth_call`, `eth_estimateGas`,
`eth_sendRawTransaction`, `eth_getLogs`, `eth_gasPrice`, `eth_maxPriorityFeePerGas`,
`eth_feeHistory`, `eth_syncing`, `net_version`, `web3_clientVersion`), the prefunded
unlocked accounts (`eth_accounts`, `eth_sendTransaction`: what `ChainService.fund` uses),
and anvil's test methods that `ChainService` calls: `evm_increaseTime` (the next mined
block is `seconds` later; nothing is mined) and `evm_mine` (one block, optionally at a
given timestamp). Requests and results are standard JSON-RPC: hex quantities, hex data,
camelCase keys. eth-tester's own API is reached through web3's eth-tester bridge
(`web3.providers.eth_tester`: its endpoint table and its request/result formatters), the
same code the in-process `ChainService.embedded()` goes through, so both chains answer
alike.

Errors are JSON-RPC errors, never a dropped connection (`RpcError` codes):

- a revert (eth_call, eth_estimateGas): code 3, "execution reverted: <reason>" (or
  "execution reverted" without a reason) and `data`, the revert data (`Error(string)`
  ABI encoding for a reason string), as geth and anvil answer; web3 raises
  `ContractLogicError` and `node.chain.translate_error` gives `ContractReverted(reason)`;
- a transaction or query the chain refuses (stale nonce, no funds for gas, a raw
  transaction it cannot decode): -32000 with eth-tester's message (`RequestRejected` in
  the chain service);
- malformed JSON: -32700; not a JSON-RPC request, a batch over `MAX_BATCH`, or JSON
  nested deeper than `MAX_JSON_DEPTH`: -32600; an unknown method: -32601 (web3's
  `MethodUnavailable`, `NotSupported` in the chain service); bad parameters: -32602; a
  bug: -32603 (logged with its traceback).

A missing block, transaction or receipt is a null result, as on any node.

A body over `MAX_REQUEST_BYTES` (or one without a Content-Length) gets an HTTP error
status with a JSON-RPC error body, and the connection is closed.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from eth.exceptions import PyEVMError
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_tester import EthereumTester, PyEVMBackend
from eth_tester import exceptions as tester_errors
from eth_utils.exceptions import ValidationError as EthUtilsValidationError
from rlp.exceptions import RLPException
from web3 import exceptions as web3_errors
from web3.providers.eth_tester.defaults import API_ENDPOINTS
from web3.providers.eth_tester.middleware import (
    request_formatters,
    result_formatters,
    transaction_result_formatter,
    transaction_result_remapper,
)
from web3.types import RPCEndpoint

from node.chain import EMBEDDED_GAS_LIMIT
from node.json_depth import json_depth_within

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
MAX_REQUEST_BYTES = 5 * 1024 * 1024
MAX_BATCH = 100
MAX_JSON_DEPTH = 32  # checked before json.loads (see node.json_depth for why)
IDLE_TIMEOUT = 120.0  # seconds a connection may sit idle (or stall mid-request)
ERROR_STRING_SELECTOR = bytes.fromhex("08c379a0")  # Error(string)
LOGS_BLOOM_BYTES = 256

# JSON-RPC error codes (JSON-RPC 2.0, EIP-1474, geth's revert code).
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVER_ERROR = -32000
EXECUTION_REVERTED = 3


class RpcError(Exception):
    """A JSON-RPC error object: `code`, `message` and optional `data`."""

    def __init__(self, code: int, message: str, data: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def as_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


# --- eth-tester values -> JSON-RPC values ----------------------------------------------------


# eth-tester keys web3's bridge leaves in snake_case: renamed, or dropped ("").
_KEY_FIXES = {"y_parity": "yParity", "state_root": ""}


def to_json_value(value: Any, key: str | None = None) -> Any:
    """A result in eth-tester's form (ints, bytes, hex strings) in JSON-RPC form.

    Integers become hex quantities, bytes hex data; `logsBloom` (an int in eth-tester) is
    256 bytes of hex data. Booleans, strings, floats (`gasUsedRatio`) and null stay.
    Keys web3's bridge leaves in eth-tester's form are fixed (`_KEY_FIXES`).
    """
    if value is None or isinstance(value, bool | str | float):
        return value
    if isinstance(value, int):
        if key == "logsBloom" and value >= 0:
            return "0x" + value.to_bytes(LOGS_BLOOM_BYTES, "big").hex()
        return hex(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return "0x" + bytes(value).hex()
    if isinstance(value, Mapping):
        result: dict[str, Any] = {}
        for k, v in value.items():
            name = _KEY_FIXES.get(str(k), str(k))
            if name:
                result[name] = to_json_value(v, name)
        return result
    if isinstance(value, Sequence):
        return [to_json_value(item) for item in value]
    raise TypeError(f"cannot encode {type(value).__name__} as a JSON-RPC value")


def _quantity(value: Any, what: str) -> int:
    """A non-negative integer given as a JSON number or a hex string."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value[:2] in ("0x", "0X"):
        try:
            number = int(value, 16)
        except ValueError:
            raise RpcError(INVALID_PARAMS, f"{what} is not a hex quantity: {value!r}") from None
    else:
        raise RpcError(INVALID_PARAMS, f"{what} must be a number or hex quantity")
    if number < 0:
        raise RpcError(INVALID_PARAMS, f"{what} must not be negative")
    return number


def _revert_data(exc: BaseException) -> bytes:
    """The revert data of eth-tester's TransactionFailed.

    eth-tester carries it in three forms: the EVM's Revert exception (estimate_gas), its
    decoded `Error(string)` reason (call), or the repr of the raw bytes (call, when the
    data is not an `Error(string)`). A plain reason string is re-encoded as `Error(string)`.
    """
    arg: Any = exc.args[0] if exc.args else b""
    if isinstance(arg, BaseException):
        arg = arg.args[0] if arg.args else b""
    if isinstance(arg, bytes | bytearray):
        return bytes(arg)
    text = str(arg)
    if text.startswith(("b'", 'b"')):
        try:
            literal = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            literal = None
        if isinstance(literal, bytes):
            return literal
    return ERROR_STRING_SELECTOR + abi_encode(["string"], [text])


def revert_error(data: bytes) -> RpcError:
    """The code-3 error geth and anvil give for a revert with `data`."""
    message = "execution reverted"
    if data[:4] == ERROR_STRING_SELECTOR:
        try:
            (reason,) = abi_decode(["string"], data[4:])
            message = f"execution reverted: {reason}"
        except Exception:  # not a well-formed Error(string): no reason in the message
            pass
    return RpcError(EXECUTION_REVERTED, message, "0x" + data.hex())


# --- the JSON-RPC side ---------------------------------------------------------------------

Handler = Callable[[EthereumTester, list[Any]], Any]


def _bridged(
    method: str, prepare: Callable[[EthereumTester, list[Any]], list[Any]] | None = None
) -> Handler:
    """`method` through web3's eth-tester bridge: its request formatter, endpoint, result
    formatter (eth-tester's snake_case keys to JSON-RPC's camelCase)."""
    namespace, _, endpoint = method.partition("_")
    delegator = API_ENDPOINTS[namespace][endpoint]
    format_request = request_formatters.get(RPCEndpoint(method))
    format_result = (result_formatters or {}).get(RPCEndpoint(method))

    def handle(tester: EthereumTester, params: list[Any]) -> Any:
        try:
            if prepare is not None:
                params = prepare(tester, params)
            if format_request is not None:
                params = list(format_request(params))
        except RpcError:
            raise
        except Exception as exc:
            raise RpcError(INVALID_PARAMS, f"invalid params: {exc}") from exc
        result = delegator(tester, params)
        return result if format_result is None else format_result(result)

    return handle


def _transaction_params(*, for_call: bool) -> Callable[[EthereumTester, list[Any]], list[Any]]:
    """Shape a JSON-RPC transaction object for eth-tester: `input` is `data`; a missing
    `to` is a deployment; a call or estimate takes no `nonce`, and its `from` defaults to
    the first prefunded account (eth-tester charges gas even for calls, so geth's zero
    address would fail; web3's eth-tester provider makes the same choice)."""

    def prepare(tester: EthereumTester, params: list[Any]) -> list[Any]:
        if not params or not isinstance(params[0], dict):
            raise RpcError(INVALID_PARAMS, "the first parameter must be a transaction object")
        tx = dict(params[0])
        if "input" in tx:
            tx["data"] = tx.pop("input")
        if tx.get("to") is None:
            tx.pop("to", None)
        if for_call:
            tx.pop("nonce", None)
            if tx.get("from") is None:
                tx["from"] = tester.get_accounts()[0]
        return [tx, *params[1:]]

    return prepare


def _block_transaction(tx: Any) -> Any:
    return transaction_result_remapper(transaction_result_formatter(tx))


def _with_full_transactions(handler: Handler) -> Handler:
    """A block handler whose full transactions (if asked for) get JSON-RPC keys too."""

    def handle(tester: EthereumTester, params: list[Any]) -> Any:
        block = handler(tester, params)
        if isinstance(block, Mapping) and any(
            isinstance(tx, Mapping) for tx in block.get("transactions", ())
        ):
            transactions = [
                _block_transaction(tx) if isinstance(tx, Mapping) else tx
                for tx in block["transactions"]
            ]
            block = {**block, "transactions": transactions}
        return block

    return handle


class EmbeddedChainRpc:
    """JSON-RPC over one eth-tester chain: request bytes in, response bytes out.

    The chain is a fresh one like `ChainService.embedded()`'s (py-evm, `gas_limit`, ten
    prefunded unlocked accounts). Thread-safe: every call into it holds one lock.
    """

    def __init__(self, *, gas_limit: int = EMBEDDED_GAS_LIMIT) -> None:
        params = PyEVMBackend.generate_genesis_params({"gas_limit": gas_limit})
        tester = EthereumTester(PyEVMBackend(genesis_parameters=params))
        self._tester = tester
        self._lock = threading.Lock()
        self._time_offset = 0
        self.chain_id = int(tester.backend.chain.chain_id)
        self._methods: dict[str, Handler] = {
            "web3_clientVersion": _bridged("web3_clientVersion"),
            "net_version": lambda _tester, _params: str(self.chain_id),
            "eth_chainId": lambda _tester, _params: self.chain_id,
            "eth_syncing": _bridged("eth_syncing"),
            "eth_blockNumber": _bridged("eth_blockNumber"),
            "eth_gasPrice": _bridged("eth_gasPrice"),
            "eth_maxPriorityFeePerGas": _bridged("eth_maxPriorityFeePerGas"),
            "eth_feeHistory": _bridged("eth_feeHistory"),
            "eth_accounts": _bridged("eth_accounts"),
            "eth_getBalance": _bridged("eth_getBalance"),
            "eth_getCode": _bridged("eth_getCode"),
            "eth_getStorageAt": _bridged("eth_getStorageAt"),
            "eth_getTransactionCount": _bridged("eth_getTransactionCount"),
            "eth_getBlockByNumber": _with_full_transactions(_bridged("eth_getBlockByNumber")),
            "eth_getBlockByHash": _with_full_transactions(_bridged("eth_getBlockByHash")),
            "eth_getTransactionByHash": _bridged("eth_getTransactionByHash"),
            "eth_getTransactionReceipt": _bridged("eth_getTransactionReceipt"),
            "eth_getLogs": _bridged("eth_getLogs"),
            "eth_call": _bridged("eth_call", _transaction_params(for_call=True)),
            "eth_estimateGas": _bridged("eth_estimateGas", _transaction_params(for_call=True)),
            "eth_sendRawTransaction": _bridged("eth_sendRawTransaction"),
            "eth_sendTransaction": _bridged(
                "eth_sendTransaction", _transaction_params(for_call=False)
            ),
            "evm_increaseTime": self._increase_time,
            "evm_mine": self._mine,
        }

    @property
    def supported_methods(self) -> frozenset[str]:
        return frozenset(self._methods)

    # --- anvil's test methods -------------------------------------------------------------

    def _increase_time(self, tester: EthereumTester, params: list[Any]) -> int:
        """evm_increaseTime [seconds]: the next block is mined `seconds` later than it
        would have been; returns the total increase so far."""
        if len(params) != 1:
            raise RpcError(INVALID_PARAMS, "evm_increaseTime takes [seconds]")
        seconds = _quantity(params[0], "seconds")
        self._set_pending_timestamp(tester, self._pending_timestamp(tester) + seconds)
        self._time_offset += seconds
        return self._time_offset

    def _mine(self, tester: EthereumTester, params: list[Any]) -> str:
        """evm_mine [] or [timestamp]: mine one block (at `timestamp`, if given)."""
        if len(params) > 1:
            raise RpcError(INVALID_PARAMS, "evm_mine takes [] or [timestamp]")
        if params:
            timestamp = _quantity(params[0], "timestamp")
            latest = int(tester.get_block_by_number("latest")["timestamp"])
            if timestamp <= latest:
                raise RpcError(INVALID_PARAMS, f"timestamp {timestamp} is not after {latest}")
            self._set_pending_timestamp(tester, timestamp)
        tester.mine_blocks(1)
        return "0x0"

    @staticmethod
    def _pending_timestamp(tester: EthereumTester) -> int:
        return int(tester.backend.chain.header.timestamp)

    @staticmethod
    def _set_pending_timestamp(tester: EthereumTester, timestamp: int) -> None:
        # eth-tester has no public way to move the clock without mining a block; its own
        # PyEVMBackend.time_travel does this to the block being built, then mines.
        chain = tester.backend.chain
        chain.header = chain.header.copy(timestamp=timestamp)

    # --- dispatch -------------------------------------------------------------------------

    def call(self, method: str, params: list[Any]) -> Any:
        """Run one method; its result in JSON-RPC form. Raises `RpcError`."""
        handler = self._methods.get(method)
        if handler is None:
            raise RpcError(METHOD_NOT_FOUND, f"the method {method} does not exist/is not available")
        try:
            with self._lock:
                result = handler(self._tester, params)
        except RpcError:
            raise
        except tester_errors.TransactionFailed as exc:
            raise revert_error(_revert_data(exc)) from exc
        except web3_errors.ContractLogicError as exc:  # a panic or CCIP read, decoded by web3
            data = exc.data if isinstance(exc.data, str) else "0x"
            raise RpcError(EXECUTION_REVERTED, "execution reverted", data) from exc
        except NotImplementedError as exc:
            raise RpcError(SERVER_ERROR, f"{method}: not supported: {exc}") from exc
        except (
            tester_errors.ValidationError,
            tester_errors.BlockNotFound,
            tester_errors.TransactionNotFound,
            EthUtilsValidationError,
            PyEVMError,
            RLPException,
        ) as exc:  # the chain refuses the transaction or query
            raise RpcError(SERVER_ERROR, f"{type(exc).__name__}: {exc}") from exc
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            raise RpcError(INVALID_PARAMS, f"invalid params: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            log.exception("internal error in %s", method)
            raise RpcError(INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {exc}") from exc
        try:
            return to_json_value(result)
        except TypeError as exc:
            log.exception("cannot encode the result of %s", method)
            raise RpcError(INTERNAL_ERROR, f"internal error: {exc}") from exc

    def handle_request(self, request: Any) -> dict[str, Any] | None:
        """One parsed JSON-RPC request object; its response, None for a notification."""
        if not isinstance(request, dict):
            return _error_response(None, RpcError(INVALID_REQUEST, "invalid request"))
        request_id = request.get("id")
        if isinstance(request_id, bool) or not isinstance(request_id, str | int | None):
            return _error_response(None, RpcError(INVALID_REQUEST, "invalid id"))
        method = request.get("method")
        params = request.get("params", [])
        if request.get("jsonrpc") != "2.0" or not isinstance(method, str):
            return _error_response(request_id, RpcError(INVALID_REQUEST, "invalid request"))
        try:
            if not isinstance(params, list):
                raise RpcError(INVALID_PARAMS, "params must be an array")
            result = self.call(method, params)
        except RpcError as exc:
            response = _error_response(request_id, exc)
        else:
            response = {"jsonrpc": "2.0", "id": request_id, "result": result}
        return response if "id" in request else None

    def handle_body(self, body: bytes) -> bytes | None:
        """A request body (one request or a batch); the response body, None if there is
        nothing to answer (notifications only)."""
        if not json_depth_within(body, MAX_JSON_DEPTH):
            error = RpcError(INVALID_REQUEST, f"JSON nested deeper than {MAX_JSON_DEPTH}")
            return _dump(_error_response(None, error))
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            return _dump(_error_response(None, RpcError(PARSE_ERROR, "parse error")))
        if isinstance(parsed, list):
            if not parsed:
                return _dump(_error_response(None, RpcError(INVALID_REQUEST, "empty batch")))
            if len(parsed) > MAX_BATCH:
                error = RpcError(
                    INVALID_REQUEST, f"batch of {len(parsed)} requests exceeds {MAX_BATCH}"
                )
                return _dump(_error_response(None, error))
            responses = [r for r in map(self.handle_request, parsed) if r is not None]
            return _dump(responses) if responses else None
        response = self.handle_request(parsed)
        return None if response is None else _dump(response)


def _error_response(request_id: Any, error: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": error.as_json()}


def _dump(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# --- the HTTP side --------------------------------------------------------------------------


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    timeout = IDLE_TIMEOUT
    server: _HttpServer

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in two writes: without this, Nagle's algorithm and the
        # client's delayed ACK add ~40 ms to every response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self) -> None:
        if self.headers.get("Transfer-Encoding"):
            self._refuse(HTTPStatus.LENGTH_REQUIRED, "a Content-Length body is required")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._refuse(HTTPStatus.LENGTH_REQUIRED, "a Content-Length body is required")
            return
        if length < 0:
            self._refuse(HTTPStatus.BAD_REQUEST, "bad Content-Length")
            return
        if length > MAX_REQUEST_BYTES:
            self._refuse(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request of {length} bytes exceeds {MAX_REQUEST_BYTES}",
            )
            return
        body = self.rfile.read(length)
        if len(body) < length:  # the client went away mid-body
            self.close_connection = True
            return
        response = self.server.rpc.handle_body(body)
        if response is None:
            self.send_response(HTTPStatus.NO_CONTENT)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send_json(HTTPStatus.OK, response)

    def do_GET(self) -> None:
        self._refuse(HTTPStatus.METHOD_NOT_ALLOWED, "JSON-RPC takes POST")

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def _refuse(self, status: HTTPStatus, message: str) -> None:
        """An HTTP error with a JSON-RPC error body; the connection is closed (the body,
        if any, is not read)."""
        self.close_connection = True
        body = _dump(_error_response(None, RpcError(INVALID_REQUEST, message)))
        self._send_json(status, body, extra={"Connection": "close", "Allow": "POST"})

    def _send_json(
        self, status: HTTPStatus, body: bytes, extra: Mapping[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _HttpServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that can close its open (keep-alive) connections on close."""

    daemon_threads = False
    block_on_close = True  # server_close joins the connection threads

    def __init__(self, port: int, rpc: EmbeddedChainRpc) -> None:
        self.rpc = rpc
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__((HOST, port), _RequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End every open connection: their threads see EOF and finish."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # a client went away, or we closed its connection
            log.debug("connection from %s: %s", client_address, exc)
        else:
            log.exception("error serving %s", client_address)


class ChainServer:
    """An embedded chain served on 127.0.0.1 (see `serve_embedded_chain`)."""

    def __init__(self, rpc: EmbeddedChainRpc, port: int = 0) -> None:
        self.rpc = rpc
        self._http = _HttpServer(port, rpc)
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return int(self._http.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def chain_id(self) -> int:
        return self.rpc.chain_id

    def start(self) -> None:
        """Serve in a background thread (once)."""
        if self._thread is not None or self._closed:
            raise RuntimeError("the server was already started")
        self._thread = threading.Thread(
            target=self._http.serve_forever, name=f"chain-server:{self.port}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving: no new connections, open ones are ended, threads joined."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join()
        self._http.close_connections()
        self._http.server_close()


@contextlib.contextmanager
def serve_embedded_chain(
    port: int = 0, *, gas_limit: int = EMBEDDED_GAS_LIMIT
) -> Iterator[ChainServer]:
    """A fresh embedded chain served at `http://127.0.0.1:<port>` (0: a free port) until
    the block exits. Yields the `ChainServer` (`url`, `chain_id`). Raises OSError if the
    port cannot be bound."""
    server = ChainServer(EmbeddedChainRpc(gas_limit=gas_limit), port)
    try:
        server.start()
        yield server
    finally:
        server.close()


# --- command line ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devnet.chain_server",
        description="Serve an embedded py-evm chain as JSON-RPC on 127.0.0.1; "
        "print its URL, serve until SIGTERM or SIGINT.",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0..65535")
    logging.basicConfig(level=logging.WARNING, format="chain_server: %(levelname)s %(message)s")
    try:
        server = ChainServer(EmbeddedChainRpc(), args.port)
    except OSError as exc:
        print(f"chain_server: cannot listen on {HOST}:{args.port}: {exc}", file=sys.stderr)
        return 1
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    # Blocked before the server threads start, so they inherit the mask and the signals
    # wait for sigwait below.
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    with contextlib.closing(server):
        server.start()
        print(server.url, flush=True)
        signal.sigwait(stop_signals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
