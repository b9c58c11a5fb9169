"""The control interface (node.control) over a real node of an in-process network.

`serve_control` runs beside user A of `local_network`; the tests talk to it as another
process would: raw lines on a TCP socket, `AsyncControlClient`, and the blocking
`ControlClient` (in a worker thread). Checked: the token, malformed and oversized
requests (answered, never fatal), the connection limit, a whole deposit / open / pay /
close, the typed errors, and `bench_pay`.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from node.api import Node
from node.cli import new_private_key
from node.control import (
    MAX_LINE,
    AsyncControlClient,
    ControlClient,
    ControlError,
    NodeInfo,
    assets_json,
    assets_of,
    key_json,
    key_of,
    read_node_info,
    read_token,
    serve_control,
    write_node_info,
    write_token,
)
from protocols.signing import Signer
from protocols.types import Assets
from tests.integration.network import ETHER, Network, eventually, local_network

DEPOSIT = Assets(ETHER, 10**21)
LOCK = Assets(ETHER // 4, 10**20)
GUARD = 120  # seconds; a hang guard, never a timing assertion


@dataclass
class Served:
    net: Network
    a: Node
    b: Node
    port: int
    token: str
    client: AsyncControlClient

    def other_client(self, token: str | None = None) -> AsyncControlClient:
        return AsyncControlClient(self.port, self.token if token is None else token)


@asynccontextmanager
async def served(tmp_path: Path, **options: Any) -> AsyncIterator[Served]:
    """A hub and two users; user A's control interface on a free port."""
    with trio.fail_after(GUARD):
        async with local_network(tmp_path, users=2) as net, trio.open_nursery() as nursery:
            a, b = net.users
            token = secrets.token_hex(32)
            port = await nursery.start(partial(serve_control, a, 0, token, **options))
            async with AsyncControlClient(port, token) as client:
                yield Served(net, a, b, port, token, client)
            nursery.cancel_scope.cancel()
            # Users first, then the hub: a user that redials its hub while the hub's
            # host shuts down can make libp2p raise there (KeyError: '/weft/hub/1').
            for slot in net.user_slots:
                await net.stop(slot)
            await net.stop(net.hub_slot)


class RawConnection:
    """Bytes in, lines out: for requests no client would send."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def open(cls, port: int) -> RawConnection:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def line(self) -> dict[str, Any] | None:
        """The next answer; None once the server closed the connection."""
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def ask(self, data: bytes) -> dict[str, Any] | None:
        await self.send(data)
        return await self.line()

    async def closed(self) -> bool:
        """Whether the server closed the connection (after any answers left to read)."""
        try:
            return await self.line() is None
        except trio.BrokenResourceError:
            return True


def request(token: str, method: str = "status", request_id: int = 1, **params: Any) -> bytes:
    body = {"id": request_id, "token": token, "method": method, "params": params}
    return json.dumps(body).encode() + b"\n"


async def expect_error(
    client: AsyncControlClient, kind: str, method: str, **params: Any
) -> ControlError:
    with pytest.raises(ControlError) as caught:
        await client.call(method, **params)
    assert caught.value.type == kind, caught.value
    return caught.value


# ---------------------------------------------------------------- the wire


async def test_a_wrong_or_missing_token_is_refused_and_the_connection_closed(
    tmp_path: Path,
) -> None:
    async with served(tmp_path) as s:
        for bad in (request("00" * 32), request(s.token[:-2] + "00"), b'{"id": 5}\n'):
            conn = await RawConnection.open(s.port)
            answer = await conn.ask(bad)
            assert answer is not None
            assert answer["error"]["type"] == "Unauthorized"
            assert "result" not in answer
            assert await conn.closed()
        intruder = s.other_client(token="ab" * 32)
        await expect_error(intruder, "Unauthorized", "status")
        # The right token still works, on a new connection and on the old client.
        assert (await s.client.call("status"))["address"] == s.a.address.checksum()


async def test_malformed_requests_get_bad_request_and_the_node_goes_on(tmp_path: Path) -> None:
    async with served(tmp_path) as s:
        conn = await RawConnection.open(s.port)
        for garbage in (
            b"not json\n",
            b"\xff\xfe\n",
            b"[1, 2]\n",
            b'{"token": "x"}\n',
            b'{"id": true, "token": "x"}\n',
            b"[" * 50_000 + b"\n",
        ):
            answer = await conn.ask(garbage)
            assert answer is not None
            assert answer == {"id": None, "error": answer["error"]}
            assert answer["error"]["type"] == "BadRequest", garbage[:20]
        # Same connection, now with the token: unknown method, bad params.
        cases: list[tuple[bytes, str]] = [
            (request(s.token, "launch_rockets"), "unknown method"),
            (request(s.token, "deposit"), "missing parameter 'amount'"),
            (request(s.token, "deposit", amount=[1]), "'amount'"),
            (request(s.token, "deposit", amount=[-1, 0]), "'amount'"),
            (request(s.token, "deposit", amount=[2**256, 0]), "'amount'"),
            (request(s.token, "deposit", amount=[True, 0]), "'amount'"),
            (request(s.token, "deposit", amount=[1, 0], colour="red"), "colour"),
            (request(s.token, "pay", key={"sender": "0x12"}, amount=[1, 0]), "'key'"),
            (request(s.token, "open_thread", peer="0xZZ", lock=[1, 0]), "'peer'"),
            (request(s.token, "close_thread", key=None, force="yes"), "'key'"),
            (request(s.token, "deposit", amount=[1, 0], timeout=-1), "'timeout'"),
            (request(s.token, "bench_pay", key=None, count=0, mode="x", amount=[1, 0]), "key"),
        ]
        for line, fragment in cases:
            answer = await conn.ask(line)
            assert answer is not None
            assert answer["id"] == 1
            assert answer["error"]["type"] == "BadRequest", answer
            assert fragment in answer["error"]["message"], answer
        answer = await conn.ask(
            json.dumps({"id": 9, "token": s.token, "method": "status", "params": 3}).encode()
            + b"\n"
        )
        assert answer is not None and answer["error"]["type"] == "BadRequest"
        # A request without params is a request with none.
        answer = await conn.ask(
            json.dumps({"id": 2, "token": s.token, "method": "status"}).encode() + b"\n"
        )
        assert answer is not None and answer["result"]["role"] == "user"
        # A line over MAX_LINE is refused, and that connection closed (it cannot resync).
        answer = await conn.ask(b"x" * (MAX_LINE + 10) + b"\n")
        assert answer is not None and answer["error"]["type"] == "BadRequest"
        assert "exceeds" in answer["error"]["message"]
        assert await conn.closed()
        # Through it all the node kept running. (Its stream to the hub may be redialing
        # for a moment on a busy machine: wait for it, within a bound.)
        status = await s.client.call("status")
        assert status["peer"]["address"] == s.a.address.checksum()
        with trio.move_on_after(20):
            while status["hub_connected"] is not True:
                await trio.sleep(0.05)
                status = await s.client.call("status")
        assert status["hub_connected"] is True


async def test_connections_are_bounded_and_must_authorize_in_time(tmp_path: Path) -> None:
    async with served(tmp_path, max_connections=2, auth_timeout=0.5) as s:
        await s.client.call("status")  # connection 1, authorized: stays
        idle = await RawConnection.open(s.port)  # connection 2: says nothing
        await trio.sleep(0.05)
        third = await RawConnection.open(s.port)
        answer = await third.line()
        assert answer is not None and answer["error"]["type"] == "Busy"
        assert await third.closed()
        # The silent one is dropped after auth_timeout; then there is room again.
        with trio.fail_after(10):
            assert await idle.closed()
        await trio.sleep(0.05)
        async with s.other_client() as again:
            assert (await again.call("threads")) == []
        # The authorized connection stays open however long it idles.
        await trio.sleep(0.7)
        assert (await s.client.call("status"))["role"] == "user"


async def test_junk_lines_do_not_extend_the_time_to_authorize(tmp_path: Path) -> None:
    """The deadline to authorize runs from the connection's opening: a client without
    the token that keeps sending refused lines, each well within `auth_timeout` of the
    last, is still closed, and its slot freed."""
    async with served(tmp_path, max_connections=2, auth_timeout=1.0) as s:
        await s.client.call("status")  # connection 1, authorized
        conn = await RawConnection.open(s.port)  # connection 2: junk, never a token
        with trio.fail_after(30):  # hang guard: it should take about auth_timeout
            while True:
                try:
                    answer = await conn.ask(b"junk\n")
                except trio.BrokenResourceError:
                    break  # reset by the server, with our line unread
                if answer is None:
                    break  # closed by the server
                assert answer["error"]["type"] == "BadRequest", answer
                await trio.sleep(0.1)
        # The slot is free again.
        async with s.other_client() as again:
            assert (await again.call("threads")) == []


# ---------------------------------------------------------------- the methods


async def test_deposit_open_pay_close_withdraw_through_the_control_interface(
    tmp_path: Path,
) -> None:
    async with served(tmp_path) as s:
        c, a, b, hub = s.client, s.a, s.b, s.net.hub
        await c.call("deposit", amount=assets_json(DEPOSIT))
        balance = await c.call("balance")
        assert assets_of(balance["user"]) == DEPOSIT
        assert balance["open_threads"] == 0
        await hub.collateralize(a.address, LOCK)
        await hub.collateralize(b.address, LOCK)
        key = await c.call(
            "open_thread", peer=b.address.checksum(), lock=assets_json(LOCK), timeout=30
        )
        assert key_of(key).receiver == b.address
        assert key == key_json(key_of(key))
        for i in range(1, 6):
            assert await c.call("pay", key=key, amount=[1000, 10]) == i
        # Addresses in any case: all lower is as good as EIP-55.
        lower_key = {**key, "sender": key["sender"].lower()}
        assert await c.call("pay", key=lower_key, amount=[0, 1]) == 6
        (thread,) = await c.call("threads")
        assert thread["key"] == key and thread["phase"] == "open" and thread["tx_count"] == 6
        assert assets_of(thread["mine"]) == LOCK - Assets(5000, 51)
        assert assets_of(thread["peer"]) == Assets(5000, 51)
        status = await c.call("status")
        assert status["threads"] == [thread]
        assert status["balance"]["open_threads"] == 1

        final = await c.call("close_thread", key=key)
        assert final == {
            "key": key,
            "tx_count": 6,
            "balance_sender": assets_json(LOCK - Assets(5000, 51)),
            "balance_receiver": [5000, 51],
        }
        await eventually(lambda: b.balance().open_threads == 0, "B's channel settled")
        left = DEPOSIT - Assets(5000, 51)
        assert assets_of((await c.call("balance"))["user"]) == left

        # The blocking client, as a command line would use it (in a worker thread here).
        recipient = Signer(new_private_key()).address

        def withdraw_all() -> Any:
            with ControlClient(s.port, s.token, timeout=60) as blocking:
                blocking.call("withdraw", amount=assets_json(left), recipient=recipient.checksum())
                return blocking.call("balance")

        after = await trio.to_thread.run_sync(withdraw_all)
        assert assets_of(after["user"]) == Assets()
        assert await s.net.onchain(recipient) == left


async def test_errors_keep_their_weft_error_type(tmp_path: Path) -> None:
    async with served(tmp_path) as s:
        c, b, hub = s.client, s.b, s.net.hub
        stranger = Signer(new_private_key()).address.checksum()
        await c.call("deposit", amount=assets_json(DEPOSIT))
        # No collateral from the hub in B's channel yet: the open is refused with the
        # amount that was missing, and the hub is asked for it (which it grants).
        error = await expect_error(
            c,
            "InsufficientCollateral",
            "open_thread",
            peer=b.address.checksum(),
            lock=assets_json(LOCK),
        )
        assert error.missing == LOCK
        await eventually(
            lambda: hub.balance(b.address).hub.covers(LOCK), "the hub added the collateral"
        )
        key = await c.call("open_thread", peer=b.address.checksum(), lock=assets_json(LOCK))
        await expect_error(c, "InsufficientBalance", "pay", key=key, amount=[LOCK.eth + 1, 0])
        error = await expect_error(
            c,
            "InsufficientBalance",
            "bench_pay",
            key=key,
            count=3,
            mode="sequential",
            amount=[LOCK.eth + 1, 0],
        )
        assert "0 of 3 payments done" in error.message
        with pytest.raises(ControlError) as caught:
            await c.call("open_thread", peer=stranger, lock=[1, 0], timeout=10)
        assert caught.value.type in ("UnknownPeer", "PeerOffline"), caught.value
        await expect_error(c, "WeftError", "collateralize", user=stranger, amount=[1, 0])
        await expect_error(c, "WeftError", "balance", user=stranger)
        missing_thread = {**key, "thread_id": key["thread_id"] + 1000}
        await expect_error(c, "UnknownThread", "pay", key=missing_thread, amount=[1, 0])
        await c.call("close_thread", key=key)
        await expect_error(c, "ThreadClosing", "pay", key=key, amount=[1, 0])
        # After all that the node still serves.
        assert (await c.call("status"))["balance"]["open_threads"] in (0, 1)


async def test_bench_pay_sequential_and_pipelined(tmp_path: Path) -> None:
    async with served(tmp_path) as s:
        c, b, hub = s.client, s.b, s.net.hub
        await c.call("deposit", amount=assets_json(DEPOSIT))
        await hub.collateralize(b.address, LOCK)
        key = await c.call("open_thread", peer=b.address.checksum(), lock=assets_json(LOCK))
        sequential = await c.call("bench_pay", key=key, count=20, mode="sequential", amount=[3, 1])
        pipelined = await c.call(
            "bench_pay", key=key, count=100, mode="pipelined", amount=[3, 1], window=16
        )
        for run, count in ((sequential, 20), (pipelined, 100)):
            assert run["count"] == count
            assert run["seconds"] > 0 and run["payments_per_s"] > 0
            ms = run["latencies_ms"]
            assert 0 < ms["p50"] <= ms["p90"] <= ms["p99"]
        assert sequential["tx_count"] == 20
        assert pipelined["tx_count"] == 120
        assert b.thread(key_of(key)).mine == Assets(360, 120)
        await expect_error(
            c, "BadRequest", "bench_pay", key=key, count=2_000_000, mode="pipelined", amount=[1, 0]
        )
        await expect_error(
            c,
            "BadRequest",
            "bench_pay",
            key=key,
            count=5,
            mode="pipelined",
            amount=[1, 0],
            window=0,
        )


async def test_node_files_round_trip(tmp_path: Path) -> None:
    info = NodeInfo("0x" + "ab" * 20, "16Uiu2HAm", ("/ip4/127.0.0.1/tcp/4001",), 5555, 42)
    write_node_info(tmp_path, info)
    assert read_node_info(tmp_path) == info
    token = write_token(tmp_path)
    assert read_token(tmp_path) == token and len(bytes.fromhex(token)) == 32
    assert (tmp_path / "control.token").stat().st_mode & 0o777 == 0o600
    assert write_token(tmp_path) != token  # rewritten in place, still 0600
    assert (tmp_path / "control.token").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control.token", "node.json"]
