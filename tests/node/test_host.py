"""The libp2p host (node.host) and framed streams (node.peer_stream).

Real hosts on 127.0.0.1 in one process (Noise + Yamux), plus `FramedStream` over a scripted
fake stream where exact read/write boundaries matter. Every wait is bounded by
`trio.fail_after`; every loop by a count.

Regression tests for the py-libp2p 0.8.1 workarounds in node/host.py:
- a handler that raises must not take the host down: test_failing_handler_keeps_host_serving
- the 60 s negative dial cache: test_connect_after_failed_dial_to_same_peer
- exceptions out of `host.run` wrapped in groups: test_port_in_use_is_host_error,
  test_body_exception_leaves_open_host_unwrapped
- dial retries (~0.7 s to report a refused port): test_dial_closed_port_is_unreachable_fast
- connections closed one after the other on shutdown:
  test_shutdown_closes_every_connection_at_once
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from itertools import pairwise

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair as create_ed25519_key_pair
from libp2p.network.connection.swarm_connection import SwarmConn
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.peer.id import ID

from node.host import (
    HUB_PROTOCOL,
    THREAD_PROTOCOL,
    Host,
    HostError,
    PeerIdentityError,
    PeerUnreachable,
    address_of_peer,
    open_host,
    parse_peer_id,
    peer_identity,
)
from node.peer_stream import FramedStream, FrameTooLarge, StreamClosed
from protocols.errors import InvalidValue, LocalProtocolError
from protocols.signing import Signer
from protocols.types import Address
from protocols.wire import MAX_FRAME, frame

STEP = 5.0  # seconds any single network step may take before the test fails


def _key() -> bytes:
    while True:  # a random 32-byte string is a valid secp256k1 secret but for ~2^-128
        key = os.urandom(32)
        try:
            Signer(key)
        except InvalidValue:
            continue
        return key


@asynccontextmanager
async def two_hosts() -> AsyncIterator[tuple[Host, Host]]:
    async with open_host(_key()) as a, open_host(_key()) as b:
        yield a, b


async def _echo(stream: FramedStream) -> None:
    async for payload in stream:
        await stream.send(payload)


async def _batch_echo(stream: FramedStream) -> None:
    for _ in range(100_000):
        try:
            batch = await stream.receive_batch()
        except StreamClosed as exc:
            if exc.clean:
                return
            raise
        await stream.send_frames(batch)


async def _receive_n(stream: FramedStream, n: int) -> list[bytes]:
    out = []
    with trio.fail_after(STEP):
        for _ in range(n):
            out.append(await stream.receive())
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# ---------------------------------------------------------------- identity


def test_identity_matches_ethereum_address() -> None:
    for _ in range(25):
        key = _key()
        identity = peer_identity(key)
        expected = Signer(key).address
        assert identity.address == expected
        assert address_of_peer(identity.peer_id) == expected
        text = identity.peer_id.to_base58()
        assert parse_peer_id(text) == identity.peer_id
        assert address_of_peer(text) == expected


def test_identity_of_known_key() -> None:
    # Private key 1: its address is a well-known constant.
    identity = peer_identity((1).to_bytes(32, "big"))
    assert identity.address == Address.from_hex("0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf")


def test_peer_identity_rejects_invalid_keys() -> None:
    for bad in (bytes(32), b"\xff" * 32, b"\x01" * 31):
        with pytest.raises(InvalidValue):
            peer_identity(bad)


def test_address_of_peer_needs_secp256k1() -> None:
    ed25519 = ID.from_pubkey(create_ed25519_key_pair().public_key)
    hashed = ID(b"\x12\x20" + bytes(32))  # sha2-256 multihash: no key inside
    for peer_id in (ed25519, hashed):
        with pytest.raises(PeerIdentityError):
            address_of_peer(peer_id)
    for text in ("", "not-a-peer-id", "0OIl"):
        with pytest.raises(PeerIdentityError):
            address_of_peer(text)


def test_protocol_ids() -> None:
    assert HUB_PROTOCOL == "/weft/hub/1"
    assert THREAD_PROTOCOL == "/weft/thread/1"


# ---------------------------------------------------------------- two real hosts


async def test_remote_addresses_are_authenticated() -> None:
    async with two_hosts() as (a, b):
        assert a.listen_addrs and all(x.startswith("/ip4/127.0.0.1/tcp/") for x in a.listen_addrs)
        seen: list[Address] = []

        async def handler(stream: FramedStream) -> None:
            seen.append(stream.remote_address)
            await stream.send(stream.remote_address.raw)

        b.set_handler(THREAD_PROTOCOL, handler)
        with trio.fail_after(STEP):
            await a.connect(b.peer_id, b.listen_addrs)
            assert a.is_connected(b.peer_id)
            stream = await a.new_stream(b.peer_id, THREAD_PROTOCOL)
        assert stream.remote_address == b.address
        assert stream.protocol == THREAD_PROTOCOL
        assert await _receive_n(stream, 1) == [a.address.raw]
        assert seen == [a.address]
        await stream.close()


async def test_echo_both_ways() -> None:
    async with two_hosts() as (a, b):
        a.set_handler(THREAD_PROTOCOL, _echo)
        b.set_handler(THREAD_PROTOCOL, _echo)
        with trio.fail_after(STEP):
            await a.connect(b.peer_id, b.listen_addrs)
            a_to_b = await a.new_stream(b.peer_id, THREAD_PROTOCOL)
            # the reverse direction reuses the connection a dialed
            b_to_a = await b.new_stream(a.peer_id, THREAD_PROTOCOL)
        assert b_to_a.remote_address == a.address

        for stream in (a_to_b, b_to_a):
            # 100 frames in one write, including empty and maximal payloads
            payloads = [i.to_bytes(2, "big") * i for i in range(98)]
            payloads += [b"", os.urandom(MAX_FRAME)]
            await stream.send_frames(payloads)
            assert await _receive_n(stream, len(payloads)) == payloads

            # one frame split across many writes (so across reads): header, then payload
            payload = os.urandom(3000)
            data = frame(payload) + frame(b"next")
            pieces = [data[:1], data[1:3], data[3:4], data[4:5], data[5:1000], data[1000:]]
            for piece in pieces:
                await stream.raw.write(piece)
                await trio.sleep(0.005)
            assert await _receive_n(stream, 2) == [payload, b"next"]
        await a_to_b.close()
        await a_to_b.close()  # idempotent
        with pytest.raises(StreamClosed):
            await a_to_b.send(b"after close")
        with pytest.raises(StreamClosed):
            await a_to_b.receive()


async def test_concurrent_sends_are_all_echoed() -> None:
    """Pipelined proposals: many concurrent senders share writes, replies come in order."""
    async with two_hosts() as (a, b):
        b.set_handler(THREAD_PROTOCOL, _echo)
        with trio.fail_after(STEP):
            await a.connect(b.peer_id, b.listen_addrs)
            stream = await a.new_stream(b.peer_id, THREAD_PROTOCOL)
        n = 2000
        payloads = [b"payment %d" % i for i in range(n)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_in_tasks, stream, payloads)
            received = await _receive_n(stream, n)
        assert sorted(received) == sorted(payloads)  # concurrent senders: any interleaving
        await stream.close()


async def test_batch_echo_answers_a_burst_in_few_writes() -> None:
    async with two_hosts() as (a, b):
        b.set_handler(THREAD_PROTOCOL, _batch_echo)
        with trio.fail_after(STEP):
            await a.connect(b.peer_id, b.listen_addrs)
            stream = await a.new_stream(b.peer_id, THREAD_PROTOCOL)
        rounds, per_write = 20, 100
        for r in range(rounds):
            payloads = [b"%d/%d" % (r, i) for i in range(per_write)]
            await stream.send_frames(payloads)
            assert await _receive_n(stream, per_write) == payloads
        await stream.close()


async def _send_in_tasks(stream: FramedStream, payloads: list[bytes]) -> None:
    async with trio.open_nursery() as nursery:
        for p in payloads:
            nursery.start_soon(stream.send, p)


async def test_oversize_length_prefix_resets_stream_and_host_keeps_serving() -> None:
    async with two_hosts() as (a, b):
        errors: list[BaseException] = []

        async def handler(stream: FramedStream) -> None:
            try:
                async for payload in stream:
                    await stream.send(payload)
            except Exception as exc:
                errors.append(exc)
                raise

        b.set_handler(THREAD_PROTOCOL, handler)
        with trio.fail_after(STEP):
            await a.connect(b.peer_id, b.listen_addrs)
            bad = await a.new_stream(b.peer_id, THREAD_PROTOCOL)
            await bad.send(b"fine")
            assert await bad.receive() == b"fine"
            # a raw writer announces MAX_FRAME + 1 bytes and sends only a few of them
            await bad.raw.write((MAX_FRAME + 1).to_bytes(4, "big") + b"xyz")
            # py-libp2p 0.8.1 yamux: the peer's RST finalizes the stream first, so the
            # reader sees StreamEOF, not StreamReset; `clean` cannot tell them apart.
            with pytest.raises(StreamClosed):
                await bad.receive()
            with pytest.raises(StreamClosed):
                for _ in range(10):  # the RST has arrived: writing fails at once or soon
                    await bad.send(b"more")
                    await trio.sleep(0.01)
            while not errors:
                await trio.sleep(0.01)
        assert len(errors) == 1 and isinstance(errors[0], FrameTooLarge)

        with trio.fail_after(STEP):
            good = await a.new_stream(b.peer_id, THREAD_PROTOCOL)
            await good.send_frames([b"still", b"serving"])
            assert await _receive_n(good, 2) == [b"still", b"serving"]
        assert a.is_connected(b.peer_id)
        await good.close()


async def test_failing_handler_keeps_host_serving() -> None:
    """py-libp2p lets a handler's exception tear down the host; set_handler contains it."""
    async with two_hosts() as (a, b):

        async def boom(stream: FramedStream) -> None:
            await stream.receive()
            raise RuntimeError("handler bug")

        b.set_handler(HUB_PROTOCOL, boom)
        b.set_handler(THREAD_PROTOCOL, _echo)
        with trio.fail_after(STEP):
            await a.connect(b.peer_id, b.listen_addrs)
            s1 = await a.new_stream(b.peer_id, HUB_PROTOCOL)
            await s1.send(b"trigger")
            with pytest.raises(StreamClosed):
                await s1.receive()
            s2 = await a.new_stream(b.peer_id, THREAD_PROTOCOL)
            await s2.send(b"ok")
            assert await s2.receive() == b"ok"
        await s2.close()


async def test_dial_closed_port_is_unreachable_after_one_attempt() -> None:
    async with open_host(_key()) as a:
        other = peer_identity(_key()).peer_id
        # libp2p's default is 3 retries with backoff (~0.7 s per refused dial); the node
        # retries at its own level, so the host dials once.
        assert a.libp2p.get_network().retry_config.max_retries == 0
        with trio.fail_after(3), pytest.raises(PeerUnreachable):
            await a.connect(other, [f"/ip4/127.0.0.1/tcp/{_free_port()}"])
        with trio.fail_after(3), pytest.raises(PeerUnreachable):
            await a.new_stream(peer_identity(_key()).peer_id, THREAD_PROTOCOL)
        with pytest.raises(PeerUnreachable):
            await a.connect(other, [])
        with pytest.raises(HostError):
            await a.connect(other, ["not a multiaddr"])


async def test_wrong_peer_at_address_is_unreachable() -> None:
    """The Noise handshake proves the peer id: a hint pointing elsewhere fails."""
    async with two_hosts() as (a, b):
        impostor = peer_identity(_key()).peer_id
        with trio.fail_after(STEP), pytest.raises(PeerUnreachable):
            await a.connect(impostor, b.listen_addrs)
        assert not a.is_connected(impostor)
        assert not a.is_connected(b.peer_id)


async def test_connect_after_failed_dial_to_same_peer() -> None:
    """py-libp2p blocks a peer for 60 s after a failed dial; Host.connect lifts that."""
    async with two_hosts() as (a, b):
        with trio.fail_after(STEP), pytest.raises(PeerUnreachable):
            await a.connect(b.peer_id, [f"/ip4/127.0.0.1/tcp/{_free_port()}"])
        with trio.fail_after(STEP):
            await a.connect(b.peer_id, b.listen_addrs)
        assert a.is_connected(b.peer_id)


async def test_auto_connector_does_not_redial_a_peer_that_left() -> None:
    """py-libp2p's auto-connector redials peerstore peers (to keep 50 connections) every
    30 s and on each disconnect; a Weft host dials only whom the node asks for."""
    async with open_host(_key()) as a:
        swarm = a.libp2p.get_network()
        dials: list[object] = []
        real_dial = swarm.dial_peer

        async def counting_dial(peer_id: ID) -> object:
            dials.append(peer_id)
            return await real_dial(peer_id)

        swarm.dial_peer = counting_dial
        async with open_host(_key()) as b:
            with trio.fail_after(STEP):
                await a.connect(b.peer_id, b.listen_addrs)
        dials.clear()
        with trio.fail_after(STEP):
            await swarm.auto_connector.maybe_connect()
            swarm._schedule_auto_connect()
            await trio.sleep(0.2)
        assert dials == []
        assert swarm.auto_connector.maybe_connect.__name__ == "_no_auto_connect"


async def test_unsupported_protocol_is_host_error() -> None:
    async with two_hosts() as (a, b):
        with trio.fail_after(STEP):
            await a.connect(b.peer_id, b.listen_addrs)
            with pytest.raises(HostError) as raised:
                await a.new_stream(b.peer_id, "/weft/nothing/1")
        assert not isinstance(raised.value, PeerUnreachable)
        assert a.is_connected(b.peer_id)


async def test_port_in_use_is_host_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with trio.fail_after(STEP), pytest.raises(HostError):
            async with open_host(_key(), port):
                pytest.fail("host started on a taken port")


async def test_body_exception_leaves_open_host_unwrapped() -> None:
    with pytest.raises(KeyError, match="mine"):
        async with open_host(_key()):
            raise KeyError("mine")


async def test_shutdown_with_busy_streams_is_prompt() -> None:
    """Exiting open_host cancels handlers and closes connections; nothing hangs."""
    handlers_ended = 0

    async def idle(stream: FramedStream) -> None:
        nonlocal handlers_ended
        try:
            await stream.receive()
        finally:
            handlers_ended += 1

    with trio.fail_after(STEP):
        async with two_hosts() as (a, b):
            b.set_handler(THREAD_PROTOCOL, idle)
            await a.connect(b.peer_id, b.listen_addrs)
            streams = [await a.new_stream(b.peer_id, THREAD_PROTOCOL) for _ in range(3)]
            # one handler gets its frame and returns; the other two wait in receive()
            await streams[0].send(b"x" * 10)
            for _ in range(100):
                if handlers_ended == 1:
                    break
                await trio.sleep(0.01)
    assert handlers_ended == 3
    for stream in streams:
        with pytest.raises(StreamClosed):
            await stream.send(b"after shutdown")
        await stream.close()


def _libp2p_tasks() -> list[str]:
    found = []
    todo = [trio.lowlevel.current_root_task()]
    for _ in range(10_000):
        if not todo:
            break
        task = todo.pop()
        if "libp2p" in task.name:
            found.append(task.name)
        todo.extend(t for n in task.child_nurseries for t in n.child_tasks)
    return found


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_shutdown_releases_port_tasks_and_sockets() -> None:
    """py-libp2p's host.run leaves the listener and identify running as system tasks and
    leaks dialed sockets; open_host closes the host itself."""
    fds = _open_fds()
    with trio.fail_after(STEP):
        async with two_hosts() as (a, b):
            b.set_handler(THREAD_PROTOCOL, _echo)
            await a.connect(b.peer_id, b.listen_addrs)
            stream = await a.new_stream(b.peer_id, THREAD_PROTOCOL)
            await stream.send(b"x")
            assert await stream.receive() == b"x"
            port = int(b.listen_addrs[0].rsplit("/", 1)[1])
            assert _libp2p_tasks()
    assert _libp2p_tasks() == []
    assert _open_fds() == fds
    with trio.fail_after(STEP):  # the port is free again: a new host can listen on it
        async with open_host(_key(), port) as again:
            assert again.listen_addrs == (f"/ip4/127.0.0.1/tcp/{port}",)


async def test_shutdown_closes_every_connection_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """py-libp2p's `host.close()` closes connections one after the other, 0.2 s each;
    open_host closes them all at the same time, and every peer sees its connection go."""
    closing: set[SwarmConn] = set()  # this host's connections being closed
    most = 0
    close = SwarmConn.close

    async def counted(conn: SwarmConn) -> None:
        nonlocal most
        if conn.swarm is not swarm:  # a peer's side of the connection
            await close(conn)
            return
        closing.add(conn)
        most = max(most, len(closing))
        try:
            await close(conn)
        finally:
            closing.discard(conn)

    with trio.fail_after(STEP):
        async with AsyncExitStack() as stack:
            peers = [await stack.enter_async_context(open_host(_key())) for _ in range(5)]
            async with open_host(_key()) as host:
                swarm = host.libp2p.get_network()
                for peer in peers:
                    await host.connect(peer.peer_id, peer.listen_addrs)
                monkeypatch.setattr(SwarmConn, "close", counted)
            assert most == len(peers)
            for _ in range(500):
                if not any(peer.is_connected(host.peer_id) for peer in peers):
                    break
                await trio.sleep(0.01)
            assert not any(peer.is_connected(host.peer_id) for peer in peers)


# ---------------------------------------------------------------- FramedStream alone


class FakeStream:
    """A scripted libp2p stream: reads return the given chunks, then end as told."""

    def __init__(self, chunks: Sequence[bytes] = (), end: BaseException | None = None) -> None:
        self.incoming = deque(chunks)
        self.end = end  # None: return b"" at the end
        self.writes: list[bytes] = []
        self.write_delay = 0.0
        self.calls: list[str] = []

    async def read(self, n: int) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.incoming:
            chunk = self.incoming.popleft()
            if len(chunk) > n:
                self.incoming.appendleft(chunk[n:])
            return chunk[:n]
        if self.end is not None:
            raise self.end
        return b""

    async def write(self, data: bytes) -> None:
        await trio.sleep(self.write_delay)
        self.writes.append(data)

    async def close(self) -> None:
        self.calls.append("close")

    async def reset(self) -> None:
        self.calls.append("reset")


ME = Address(b"\x01" * 20)


async def test_frames_split_anywhere_and_clean_eof() -> None:
    payloads = [b"", b"a", os.urandom(70_000), b"tail"]
    data = b"".join(frame(p) for p in payloads)
    cuts = [0, 1, 2, 4, 5, 6, 9, 40_000, len(data) - 1, len(data)]
    chunks = [data[i:j] for i, j in pairwise(cuts)]
    stream = FramedStream(FakeStream(chunks), ME, THREAD_PROTOCOL)
    with trio.fail_after(STEP):
        assert [p async for p in stream] == payloads
    with pytest.raises(StreamClosed) as closed:
        await stream.receive()
    assert closed.value.clean


async def test_eof_inside_a_frame_or_reset_is_not_clean() -> None:
    for end in (None, StreamEOF(), StreamReset()):
        stream = FramedStream(FakeStream([frame(b"whole"), frame(b"half")[:6]], end), ME)
        with trio.fail_after(STEP), pytest.raises(StreamClosed) as closed:
            assert [p async for p in stream] == [b"whole"]
        assert not closed.value.clean
    stream = FramedStream(FakeStream([frame(b"x")], StreamReset()), ME)
    assert await stream.receive() == b"x"
    with pytest.raises(StreamClosed) as closed:
        await stream.receive()
    assert not closed.value.clean and isinstance(closed.value.__cause__, StreamReset)


async def test_oversize_prefix_resets_without_waiting_for_payload() -> None:
    # Only the header of the oversize frame arrives; the reader must not wait for more.
    fake = FakeStream([frame(b"ok") + (MAX_FRAME + 1).to_bytes(4, "big")])
    fake.incoming.append(b"never read")
    stream = FramedStream(fake, ME)
    with trio.fail_after(STEP), pytest.raises(FrameTooLarge):
        await stream.receive()  # the good frame is in the same read: lost with it
    assert fake.calls == ["reset"]
    assert stream.closed
    with pytest.raises(StreamClosed):
        await stream.receive()
    await stream.close()
    await stream.reset()
    assert fake.calls == ["reset"]
    # exactly MAX_FRAME is allowed
    ok = FramedStream(FakeStream([MAX_FRAME.to_bytes(4, "big") + bytes(MAX_FRAME)]), ME)
    assert len(await ok.receive()) == MAX_FRAME


async def test_concurrent_sends_coalesce_into_few_writes() -> None:
    fake = FakeStream()
    fake.write_delay = 0.01
    stream = FramedStream(fake, ME)
    n = 200
    with trio.fail_after(STEP):
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(stream.send, b"%d" % i)
    assert len(fake.writes) <= 3  # the first alone, then everyone who queued meanwhile
    received = FramedStream(FakeStream([b"".join(fake.writes)]), ME)
    got = [p async for p in received]
    assert sorted(got) == sorted(b"%d" % i for i in range(n))
    batched = FramedStream(FakeStream([b"".join(fake.writes)]), ME)
    first = await batched.receive_batch(limit=150)
    assert len(first) == 150
    assert len(await batched.receive_batch()) == n - 150
    # frames of one call stay together and in order
    fake.writes.clear()
    await stream.send_frames([b"1", b"2", b"3"])
    assert fake.writes == [frame(b"1") + frame(b"2") + frame(b"3")]
    await stream.send_frames([])
    assert len(fake.writes) == 1


async def test_oversize_payload_is_refused_before_sending() -> None:
    fake = FakeStream()
    stream = FramedStream(fake, ME)
    with pytest.raises(LocalProtocolError):
        await stream.send_frames([b"ok", bytes(MAX_FRAME + 1)])
    assert fake.writes == []


async def test_cancelled_sender_withdraws_queued_frames() -> None:
    fake = FakeStream()
    fake.write_delay = 0.05
    stream = FramedStream(fake, ME)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send, b"first")
        await trio.sleep(0.01)  # first is writing; the next one queues
        with trio.move_on_after(0.01):
            await stream.send(b"withdrawn")
    await stream.send(b"later")
    assert fake.writes == [frame(b"first"), frame(b"later")]


async def test_close_is_idempotent_and_ends_both_directions() -> None:
    fake = FakeStream([frame(b"unread")])
    stream = FramedStream(fake, ME)
    await stream.close()
    await stream.close()
    assert fake.calls == ["close"]
    with pytest.raises(StreamClosed):
        await stream.send(b"x")
    with pytest.raises(StreamClosed) as closed:
        await stream.receive()
    assert not closed.value.clean
