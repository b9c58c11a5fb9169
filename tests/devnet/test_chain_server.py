"""The embedded chain served over HTTP JSON-RPC (devnet.chain_server).

Clients are `ChainService.from_url`, as against anvil: the same calls must work, and a
revert must come back as `ContractReverted` with the contract's reason. The server runs
in process (one per module, each test deploys its own contracts with fresh keys) and
once as `python -m devnet.chain_server` in a subprocess.
"""

from __future__ import annotations

import http.client
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import pytest
import trio
from eth_abi.abi import decode as abi_decode

from devnet import chain_server
from devnet.chain_server import ChainServer, serve_embedded_chain
from node.chain import (
    ChainService,
    ChannelRecordChangedLog,
    ManagerClient,
    TokenClient,
)
from node.chain_errors import ContractReverted, RequestRejected, TransactionFailed
from node.contracts import CHANNEL_MANAGER, load_artifact
from protocols.channel import genesis_state
from protocols.eip712 import Domain
from protocols.onchain import GENESIS_RECORD, ChannelPhase, ChannelRecord
from protocols.types import Assets, ChannelState
from tests.node.test_chain import Key

REPO_ROOT = Path(__file__).resolve().parents[2]
ETHER = 10**18
TOKENS = 10**24
CHALLENGE_PERIOD = 100
HANG_GUARD = 60  # seconds; only against hangs, never a timing assertion
STARTUP_GUARD = 30


# --- helpers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    chain: ChainService
    hub: Key
    user: Key
    other: Key
    token: TokenClient
    manager: ManagerClient
    domain: Domain

    async def user_deposit(self, amount: Assets) -> tuple[ChannelState, ChannelRecord]:
        """Open `user`'s channel with a user-authorized deposit of `amount`."""
        now = await self.chain.timestamp()
        state = replace(
            genesis_state(self.user.address),
            pending_deposit_user=amount,
            tx_count_global=1,
            tx_count_onchain=1,
            timeout=now + 3600,
        )
        sig_hub = self.hub.signer.sign_channel_state(self.domain, state)
        sig_user = self.user.signer.sign_channel_state(self.domain, state)
        receipt = await self.manager.user_authorized_update(
            GENESIS_RECORD, state, sig_hub, sig_user, sender_key=self.user.key
        )
        (log,) = [x for x in receipt.logs if isinstance(x, ChannelRecordChangedLog)]
        return state, log.record


async def deploy_world(chain: ChainService) -> World:
    """Fund three fresh keys, deploy TestToken + ChannelManager, mint and approve."""
    hub, user, other = Key.new(), Key.new(), Key.new()
    for key in (hub, user, other):
        await chain.fund(key.address, 100 * ETHER)
    token = await chain.deploy_token("Weft Test Token", "WTT", sender_key=hub.key)
    manager = await chain.deploy_channel_manager(
        hub.address, token.address, CHALLENGE_PERIOD, sender_key=hub.key
    )
    for key in (hub, user):
        await token.mint(key.address, TOKENS, sender_key=hub.key)
        await token.approve(manager.address, 2**256 - 1, sender_key=key.key)
    return World(chain, hub, user, other, token, manager, await manager.domain())


def post(url: str, body: bytes, conn: http.client.HTTPConnection | None = None) -> Any:
    """POST `body`; (HTTP status, parsed JSON reply or None). Reuses `conn` if given."""
    own = conn is None
    if conn is None:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=HANG_GUARD)
    try:
        conn.request("POST", "/", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        return response.status, (json.loads(data) if data else None)
    finally:
        if own:
            conn.close()


def read_line(stream: IO[str], timeout: float) -> str:
    """The next line of a pipe; TimeoutError if none comes within `timeout` seconds."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError(f"no output within {timeout}s")
    return stream.readline()


def rpc(method: str, params: list[Any], request_id: int = 1) -> bytes:
    return json.dumps(
        {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
    ).encode()


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ChainServer]:
    with serve_embedded_chain() as served:
        yield served


@pytest.fixture
def chain(server: ChainServer) -> Iterator[ChainService]:
    service = ChainService.from_url(server.url, poll_interval=0.01)
    try:
        yield service
    finally:
        service.close()


@pytest.fixture
async def world(chain: ChainService) -> AsyncIterator[World]:
    with trio.fail_after(HANG_GUARD):
        deployed = await deploy_world(chain)
    yield deployed


# --- a channel over the served chain -------------------------------------------------------------


async def test_a_channel_deposits_exits_and_empties_over_http(
    world: World, server: ChainServer
) -> None:
    chain, m, user = world.chain, world.manager, world.user
    with trio.fail_after(HANG_GUARD):
        assert server.url.startswith("http://127.0.0.1:")
        assert await chain.chain_id() == server.chain_id
        assert await chain.eth_balance(world.other.address) == 100 * ETHER  # fund
        assert await chain.code_at(m.address) != b""
        assert await m.hub() == world.hub.address

        deposit = Assets(2 * ETHER, 500)
        _, record = await world.user_deposit(deposit)
        assert m.deployed_block is not None
        logs, cursor = await m.events_since(m.deployed_block)
        assert cursor == await chain.block_number() + 1
        (changed,) = logs
        assert isinstance(changed, ChannelRecordChangedLog)
        assert (changed.user, changed.record) == (user.address, record)
        assert record.held == deposit
        assert await m.events_since(cursor) == ([], cursor)

        with pytest.raises(ContractReverted) as caught:
            await m.hub_deposit(Assets(ETHER, 0), sender_key=user.key)
        assert caught.value.reason == "caller is not the hub"

        receipt = await m.start_exit(user.address, record, sender_key=user.key)
        (exiting,) = receipt.logs
        assert isinstance(exiting, ChannelRecordChangedLog)
        assert exiting.record.phase is ChannelPhase.EXITING
        with pytest.raises(ContractReverted) as caught:
            await m.empty_channel(user.address, exiting.record, sender_key=world.other.key)
        assert caught.value.reason == "challenge period not over"

        before = await chain.latest_block()
        now = await chain.advance_time(CHALLENGE_PERIOD)
        after = await chain.latest_block()
        assert after.number == before.number + 1  # evm_increaseTime mines nothing
        assert now == after.timestamp >= before.timestamp + CHALLENGE_PERIOD
        assert now >= exiting.record.exit_deadline

        eth_before = await chain.eth_balance(user.address)
        await m.empty_channel(user.address, exiting.record, sender_key=world.other.key)
        assert await chain.eth_balance(user.address) == eth_before + deposit.eth
        assert await world.token.balance_of(user.address) == TOKENS  # all back

        height = await chain.block_number()
        await chain.mine()
        assert await chain.block_number() == height + 1


async def test_reverts_and_rejections_map_like_anvil(world: World, server: ChainServer) -> None:
    chain, m = world.chain, world.manager
    with trio.fail_after(HANG_GUARD):
        # eth_call path (a view-style call): the reason comes back too.
        contract = chain.contract(load_artifact(CHANNEL_MANAGER), m.address)
        call = contract.functions.hubDeposit(0)
        with pytest.raises(ContractReverted) as caught:
            await chain.run(lambda: call.call({"from": world.user.address.checksum()}))
        assert caught.value.reason == "caller is not the hub"

        # A revert without data (TestToken has no payable fallback): reason "".
        with pytest.raises(ContractReverted) as caught:
            await chain.send_eth(world.token.address, 1, sender_key=world.hub.key)
        assert caught.value.reason == ""

        # A fixed gas limit skips the estimate: the reverting transaction is mined.
        with pytest.raises(TransactionFailed):
            await m.hub_withdraw(
                world.hub.address, Assets(ETHER, 0), sender_key=world.hub.key, gas=200_000
            )

        # A stale nonce is refused by the chain, then the service re-reads it.
        await chain.send_eth(world.other.address, 1, sender_key=world.hub.key)
        chain._nonces[chain.account(world.hub.key).address] -= 1
        with pytest.raises(RequestRejected):
            await chain.send_eth(world.other.address, 1, sender_key=world.hub.key)
        await chain.send_eth(world.other.address, 1, sender_key=world.hub.key)

        # The wire form is geth's and anvil's: code 3, the reason, the revert data.
        tx = {
            "from": world.user.address.checksum(),
            "to": m.address.checksum(),
            "data": contract.encode_abi("hubDeposit", args=[0]),
        }
        for method, params in (("eth_call", [tx, "latest"]), ("eth_estimateGas", [tx])):
            status, reply = await trio.to_thread.run_sync(post, server.url, rpc(method, params))
            assert status == 200 and reply["id"] == 1 and "result" not in reply
            error = reply["error"]
            assert (error["code"], error["message"]) == (
                3,
                "execution reverted: caller is not the hub",
            )
            assert error["data"].startswith("0x08c379a0")
            assert abi_decode(["string"], bytes.fromhex(error["data"][10:])) == (
                "caller is not the hub",
            )
        bare = {"from": tx["from"], "to": world.token.address.checksum(), "value": "0x1"}
        status, reply = await trio.to_thread.run_sync(
            post, server.url, rpc("eth_call", [bare, "latest"])
        )
        assert reply["error"] == {"code": 3, "message": "execution reverted", "data": "0x"}


async def test_two_clients_see_one_chain(world: World, server: ChainServer) -> None:
    first = world.chain
    second = ChainService.from_url(server.url, poll_interval=0.01)
    try:
        with trio.fail_after(HANG_GUARD):
            assert await second.code_at(world.manager.address) == await first.code_at(
                world.manager.address
            )
            their_token = second.token(world.token.address)
            assert await their_token.balance_of(world.user.address) == TOKENS
            a, b = Key.new(), Key.new()
            await first.fund(a.address, ETHER)
            await second.fund(b.address, ETHER)
            sink = Key.new().address

            async def pay(chain: ChainService, key: Key) -> None:
                for _ in range(4):
                    await chain.send_eth(sink, 1_000, sender_key=key.key)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pay, first, a)
                nursery.start_soon(pay, second, b)
            assert await first.eth_balance(sink) == await second.eth_balance(sink) == 8_000
            assert await first.pending_nonce(b.address) == 4
            assert await first.block_number() == await second.block_number()
            logs, _ = await second.manager(world.manager.address).events_since(0)
            assert logs == (await world.manager.events_since(0))[0]
    finally:
        second.close()


# --- the JSON-RPC layer --------------------------------------------------------------------------


def test_results_are_standard_json_rpc(server: ChainServer) -> None:
    status, reply = post(server.url, rpc("eth_chainId", [], request_id=42))
    assert status == 200 and reply == {"jsonrpc": "2.0", "id": 42, "result": hex(server.chain_id)}
    _, reply = post(server.url, rpc("eth_getBlockByNumber", ["latest", False]))
    block = reply["result"]
    assert block["number"].startswith("0x") and block["timestamp"].startswith("0x")
    assert len(block["logsBloom"]) == 2 + 2 * 256
    assert {"baseFeePerGas", "gasLimit", "parentHash", "miner"} <= set(block)
    _, reply = post(server.url, rpc("eth_feeHistory", ["0x1", "latest", []]))
    assert set(reply["result"]) >= {"oldestBlock", "baseFeePerGas", "gasUsedRatio"}
    _, reply = post(server.url, rpc("eth_getTransactionReceipt", ["0x" + "11" * 32]))
    assert reply["result"] is None
    _, reply = post(server.url, rpc("eth_accounts", []))
    assert len(reply["result"]) > 0


def test_malformed_requests_get_errors_and_the_server_keeps_serving(server: ChainServer) -> None:
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=HANG_GUARD)
    try:

        def error_of(body: bytes) -> dict[str, Any]:
            status, reply = post(server.url, body, conn)  # one keep-alive connection
            assert status == 200 and "result" not in reply
            return dict(reply["error"])

        assert error_of(b'{"jsonrpc": "2.0", "id": 1, "method"')["code"] == -32700
        assert error_of(b"\xff\xfe")["code"] == -32700
        assert error_of(b"[" * 100_000)["code"] == -32600  # too deep to parse safely
        assert error_of(b"[]")["code"] == -32600
        assert error_of(b'"eth_chainId"')["code"] == -32600
        assert error_of(b'{"jsonrpc": "2.0", "id": 1}')["code"] == -32600
        assert error_of(rpc("eth_sign", []))["code"] == -32601
        assert error_of(rpc("eth_nope", []))["code"] == -32601
        assert error_of(rpc("eth_getBalance", [["not", "an address"], "latest"]))["code"] in (
            -32602,
            -32000,
        )
        assert error_of(rpc("evm_increaseTime", ["soon"]))["code"] == -32602
        assert error_of(rpc("eth_call", ["not a transaction"]))["code"] == -32602
        assert error_of(rpc("eth_sendRawTransaction", ["0x1234"]))["code"] == -32000
        too_many = [json.loads(rpc("eth_chainId", [], i)) for i in range(101)]
        assert error_of(json.dumps(too_many).encode())["code"] == -32600

        # A batch answers each request, by id; a notification gets no answer.
        batch = [json.loads(rpc("eth_chainId", [], 1)), json.loads(rpc("eth_nope", [], 2))]
        status, replies = post(server.url, json.dumps(batch).encode(), conn)
        assert status == 200
        assert [(r["id"], "result" in r) for r in replies] == [(1, True), (2, False)]
        note = json.dumps({"jsonrpc": "2.0", "method": "eth_chainId", "params": []}).encode()
        assert post(server.url, note, conn) == (204, None)

        status, reply = post(server.url, rpc("eth_chainId", []), conn)
        assert (status, reply["result"]) == (200, hex(server.chain_id))
    finally:
        conn.close()

    # Too large: refused before the body is read, and that connection is closed.
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=HANG_GUARD)
    try:
        conn.putrequest("POST", "/")
        conn.putheader("Content-Length", str(chain_server.MAX_REQUEST_BYTES + 1))
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413 and response.will_close
        assert json.loads(response.read())["error"]["code"] == -32600
        conn.request("GET", "/")  # http.client reconnects
        assert conn.getresponse().status == 405
    finally:
        conn.close()
    status, reply = post(server.url, rpc("eth_blockNumber", []))
    assert status == 200 and reply["result"].startswith("0x")


def test_close_ends_idle_keep_alive_connections() -> None:
    with serve_embedded_chain() as served:
        parts = urlsplit(served.url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=HANG_GUARD)
        status, _ = post(served.url, rpc("eth_chainId", []), conn)
        assert status == 200  # the connection stays open, its thread waiting on it
    # close() returned, so that thread is done: the connection is gone.
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        conn.auto_open = 0
        post(served.url, rpc("eth_chainId", []), conn)
    conn.close()


def test_cli_reports_a_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert chain_server.main(["--port", str(port)]) == 1
    assert "cannot listen" in capsys.readouterr().err


# --- as its own process --------------------------------------------------------------------------


async def test_subprocess_server_serves_until_sigterm_and_exits_0() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "devnet.chain_server", "--port", "0"],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    stdout = process.stdout
    chain: ChainService | None = None
    try:
        line = await trio.to_thread.run_sync(read_line, stdout, STARTUP_GUARD)
        url = line.strip()
        assert url.startswith("http://127.0.0.1:"), line
        chain = ChainService.from_url(url, poll_interval=0.01)
        with trio.fail_after(HANG_GUARD):
            hub, other = Key.new(), Key.new()
            await chain.fund(hub.address, 10 * ETHER)
            await chain.fund(other.address, 10 * ETHER)  # eth-tester charges estimates
            token = await chain.deploy_token("T", "T", sender_key=hub.key)
            await token.mint(hub.address, 7, sender_key=hub.key)
            assert await token.balance_of(hub.address) == 7
            with pytest.raises(ContractReverted) as caught:
                await token.mint(hub.address, 1, sender_key=other.key)
            assert caught.value.reason == "caller is not the minter"
            before = await chain.timestamp()
            assert await chain.advance_time(1_000) >= before + 1_000
        chain.close()
        chain = None
        process.send_signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(process.wait, HANG_GUARD)
        assert code == 0
        assert stdout.read() == ""  # the URL was the only output
    finally:
        if chain is not None:
            chain.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        stdout.close()
