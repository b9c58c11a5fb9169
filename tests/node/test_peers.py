"""The peer manager (node.peers) over real hosts on 127.0.0.1: a hub and users.

Each node is a `PeerManager` over its own `open_host`, recording its events. Raw hosts
(no manager) play misbehaving peers. Waits are for events, bounded by `trio.fail_after`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

from node.host import (
    HUB_PROTOCOL,
    THREAD_PROTOCOL,
    Host,
    PeerIdentityError,
    PeerUnreachable,
    open_host,
    peer_identity,
)
from node.peer_stream import FramedStream, StreamClosed
from node.peers import (
    MAX_QUEUE,
    PeerConnected,
    PeerDisconnected,
    PeerEvent,
    PeerManager,
    PeerMessages,
    PeerMisbehaved,
    PeerRef,
    PeerUnreachableEvent,
    UnknownPeer,
)
from protocols.errors import InvalidValue, LocalProtocolError
from protocols.messages import (
    ChannelResume,
    CollateralRequest,
    ErrorNotice,
    Message,
    PeerInfo,
    PeerLookup,
    RejectReason,
    ThreadResume,
)
from protocols.signing import Signer
from protocols.types import Address, Assets, ThreadKey
from protocols.wire import MAX_FRAME, decode_hub, encode

HANG_GUARD = 20.0  # seconds: only against hangs, never a timing assertion


def _key() -> bytes:
    while True:
        key = os.urandom(32)
        try:
            Signer(key)
        except InvalidValue:
            continue
        return key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class Recorder:
    """The events a manager delivered, in order, with a way to wait for one."""

    def __init__(self) -> None:
        self.events: list[PeerEvent] = []
        self._changed = trio.Event()

    async def deliver(self, event: PeerEvent) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        with trio.fail_after(HANG_GUARD):
            while not condition():
                await self._changed.wait()

    async def wait_for(self, event: PeerEvent, start: int = 0) -> int:
        """Index of the first `event` at or after `start`, once it was delivered."""
        await self.wait_until(lambda: event in self.events[start:])
        return self.events.index(event, start)

    async def misbehaved(self, address: Address, protocol: str) -> PeerMisbehaved:
        def found() -> PeerMisbehaved | None:
            for e in self.events:
                if isinstance(e, PeerMisbehaved) and (e.address, e.protocol) == (address, protocol):
                    return e
            return None

        await self.wait_until(lambda: found() is not None)
        event = found()
        assert event is not None
        return event

    def batches(self, sender: Address, protocol: str) -> list[tuple[Message, ...]]:
        return [
            e.messages
            for e in self.events
            if isinstance(e, PeerMessages) and (e.sender, e.protocol) == (sender, protocol)
        ]

    def messages(self, sender: Address, protocol: str) -> list[Message]:
        return [m for batch in self.batches(sender, protocol) for m in batch]


@dataclass
class Node:
    host: Host
    peers: PeerManager
    log: Recorder

    @property
    def address(self) -> Address:
        return self.host.address


@asynccontextmanager
async def running(
    key: bytes | None = None,
    *,
    is_hub: bool = False,
    hub: PeerRef | None = None,
    port: int = 0,
    max_queue: int = MAX_QUEUE,
) -> AsyncIterator[Node]:
    log = Recorder()
    async with open_host(key or _key(), port) as host, trio.open_nursery() as nursery:
        peers = PeerManager(host, is_hub=is_hub, hub=hub, deliver=log.deliver, max_queue=max_queue)
        await nursery.start(peers.run)
        yield Node(host, peers, log)
        peers.stop()


async def joined(hub: Node, user: Node) -> None:
    """Wait until `user`'s hub stream is up on both ends and the hub has its PeerInfo."""
    await user.log.wait_for(PeerConnected(hub.address, HUB_PROTOCOL))
    await hub.log.wait_for(PeerConnected(user.address, HUB_PROTOCOL))
    # PeerInfo went first on the same stream: once this arrives, it was recorded
    hello = ErrorNotice(RejectReason.POLICY, f"hello {os.urandom(8).hex()}")
    user.peers.send(hub.address, hello)
    await hub.log.wait_until(lambda: hello in hub.log.messages(user.address, HUB_PROTOCOL))


@asynccontextmanager
async def network() -> AsyncIterator[tuple[Node, Node, Node]]:
    """A hub and two users that joined it."""
    async with running(is_hub=True) as hub:
        ref = PeerRef.of_host(hub.host)
        async with running(hub=ref) as a, running(hub=ref) as b:
            await joined(hub, a)
            await joined(hub, b)
            yield hub, a, b


def _resume(sender: Address, receiver: Address, after: int) -> ThreadResume:
    return ThreadResume(ThreadKey(sender, receiver, 1), after)


async def _raw_stream(raw: Host, to: Host, protocol: str) -> FramedStream:
    with trio.fail_after(HANG_GUARD):
        await raw.connect(to.peer_id, to.listen_addrs)
        return await raw.new_stream(to.peer_id, protocol)


# ---------------------------------------------------------------- joining and discovery


async def test_users_join_the_hub_and_announce_themselves() -> None:
    async with network() as (hub, a, b):
        for user in (a, b):
            assert hub.peers.known(user.address) == PeerRef.of_host(user.host)
            assert hub.peers.is_connected(user.address, HUB_PROTOCOL)
            assert user.peers.is_connected(hub.address, HUB_PROTOCOL)
            assert not user.peers.is_connected(hub.address, THREAD_PROTOCOL)
            # discovery traffic is never delivered; the hello went on the hub protocol
            [hello] = hub.log.messages(user.address, HUB_PROTOCOL)
            assert isinstance(hello, ErrorNotice) and hello.detail.startswith("hello")
            assert user.log.events == [PeerConnected(hub.address, HUB_PROTOCOL)]
        assert all(isinstance(e, PeerConnected | PeerMessages) for e in hub.log.events)
        # the hub's ErrorNotice takes the hub protocol, on the stream the user opened
        notice = ErrorNotice(RejectReason.UNKNOWN_CHANNEL, "no channel")
        hub.peers.send(a.address, notice)
        await a.log.wait_for(PeerMessages(hub.address, HUB_PROTOCOL, (notice,)))


async def test_user_resolves_another_through_the_hub_and_they_talk() -> None:
    async with network() as (hub, a, b):
        with trio.fail_after(HANG_GUARD):
            ref = await a.peers.resolve(b.address)
            assert await a.peers.resolve(hub.address) == PeerRef.of_host(hub.host)
        assert ref == PeerRef.of_host(b.host)
        assert a.peers.known(b.address) == ref

        message = _resume(a.address, b.address, 7)
        a.peers.send(b.address, message)
        await b.log.wait_for(PeerMessages(a.address, THREAD_PROTOCOL, (message,)))
        await a.log.wait_for(PeerConnected(b.address, THREAD_PROTOCOL))
        assert PeerConnected(a.address, THREAD_PROTOCOL) in b.log.events

        # the answer takes the stream A opened; ErrorNotice to a user goes on the thread one
        notice = ErrorNotice(RejectReason.UNKNOWN_THREAD, "which thread?")
        b.peers.send(a.address, notice)
        await a.log.wait_for(PeerMessages(b.address, THREAD_PROTOCOL, (notice,)))
        for node, other in ((a, b), (b, a)):
            assert node.peers.is_connected(other.address, THREAD_PROTOCOL)
            assert node.log.events.count(PeerConnected(other.address, THREAD_PROTOCOL)) == 1
        assert not hub.log.messages(a.address, THREAD_PROTOCOL)


async def test_burst_arrives_in_order_in_few_events() -> None:
    async with network() as (_, a, b):
        first = _resume(a.address, b.address, 0)
        a.peers.send(b.address, first)
        await b.log.wait_for(PeerMessages(a.address, THREAD_PROTOCOL, (first,)))

        burst = [_resume(a.address, b.address, i) for i in range(1, 501)]
        for message in burst:
            a.peers.send(b.address, message)
        await b.log.wait_until(lambda: len(b.log.messages(a.address, THREAD_PROTOCOL)) >= 501)
        assert b.log.messages(a.address, THREAD_PROTOCOL) == [first, *burst]
        batches = b.log.batches(a.address, THREAD_PROTOCOL)[1:]
        assert len(batches) < len(burst)  # frames that arrived together: one event


async def test_simultaneous_dials_keep_one_stream_and_lose_nothing() -> None:
    async with network() as (_, a, b):
        with trio.fail_after(HANG_GUARD):
            await a.peers.resolve(b.address)
            await b.peers.resolve(a.address)
        n = 50
        to_b = [_resume(a.address, b.address, i) for i in range(n)]
        to_a = [_resume(b.address, a.address, i) for i in range(n)]
        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.peers.ensure, b.address, THREAD_PROTOCOL)
                nursery.start_soon(b.peers.ensure, a.address, THREAD_PROTOCOL)
                for x, y in zip(to_b, to_a, strict=True):
                    a.peers.send(b.address, x)
                    b.peers.send(a.address, y)
                    await trio.sleep(0)
        # whichever stream each message took, it arrives exactly once
        await b.log.wait_until(lambda: len(b.log.messages(a.address, THREAD_PROTOCOL)) >= n)
        await a.log.wait_until(lambda: len(a.log.messages(b.address, THREAD_PROTOCOL)) >= n)
        assert sorted(b.log.messages(a.address, THREAD_PROTOCOL), key=repr) == sorted(
            to_b, key=repr
        )
        assert sorted(a.log.messages(b.address, THREAD_PROTOCOL), key=repr) == sorted(
            to_a, key=repr
        )
        # and the kept stream carries the rest, in order
        more = [_resume(a.address, b.address, i) for i in range(n, 2 * n)]
        for message in more:
            a.peers.send(b.address, message)
        await b.log.wait_until(lambda: len(b.log.messages(a.address, THREAD_PROTOCOL)) >= 2 * n)
        assert b.log.messages(a.address, THREAD_PROTOCOL)[n:] == more
        assert a.peers.is_connected(b.address, THREAD_PROTOCOL)
        assert b.peers.is_connected(a.address, THREAD_PROTOCOL)


# ---------------------------------------------------------------- misbehaving peers


async def test_malformed_and_oversize_frames_are_misbehaviour_hub_keeps_serving() -> None:
    async with network() as (hub, a, _), open_host(_key()) as raw:
        stream = await _raw_stream(raw, hub.host, HUB_PROTOCOL)
        good = CollateralRequest(Assets(1, 0))
        await stream.send_frames([encode(good), b"\x93\x01garbage"])
        event = await hub.log.misbehaved(raw.address, HUB_PROTOCOL)
        assert "undecodable" in event.detail
        # what came before the bad frame was delivered first; the stream is gone
        assert hub.log.messages(raw.address, HUB_PROTOCOL) == [good]
        assert hub.log.events.index(PeerMessages(raw.address, HUB_PROTOCOL, (good,))) < (
            hub.log.events.index(event)
        )
        with trio.fail_after(HANG_GUARD), pytest.raises(StreamClosed):
            await stream.receive()

        mark = len(hub.log.events)
        oversize = await _raw_stream(raw, hub.host, HUB_PROTOCOL)
        await oversize.raw.write((MAX_FRAME + 1).to_bytes(4, "big") + b"xyz")
        await hub.log.wait_until(
            lambda: any(
                isinstance(e, PeerMisbehaved) and "oversize" in e.detail
                for e in hub.log.events[mark:]
            )
        )

        notice = ErrorNotice(RejectReason.POLICY, "still there?")
        a.peers.send(hub.address, notice)
        await hub.log.wait_until(lambda: notice in hub.log.messages(a.address, HUB_PROTOCOL))
        assert not any(
            isinstance(e, PeerMisbehaved) and e.address == a.address for e in hub.log.events
        )


async def test_hub_message_on_thread_protocol_is_refused() -> None:
    async with network() as (_, _a, b), open_host(_key()) as raw:
        stream = await _raw_stream(raw, b.host, THREAD_PROTOCOL)
        await stream.send(encode(CollateralRequest(Assets(1, 0))))
        event = await b.log.misbehaved(raw.address, THREAD_PROTOCOL)
        assert "CollateralRequest" in event.detail
        assert b.log.messages(raw.address, THREAD_PROTOCOL) == []
        with trio.fail_after(HANG_GUARD), pytest.raises(StreamClosed):
            await stream.receive()


async def test_hub_checks_peer_info_and_answers_lookups() -> None:
    async with network() as (hub, a, _), open_host(_key()) as raw:
        stream = await _raw_stream(raw, hub.host, HUB_PROTOCOL)
        raw_id = raw.peer_id.to_bytes()
        # claiming another user's address, or another peer id, is reported; the stream stays
        await stream.send(encode(PeerInfo(a.address, raw_id, raw.listen_addrs)))
        event = await hub.log.misbehaved(raw.address, HUB_PROTOCOL)
        assert "PeerInfo for" in event.detail
        mark = len(hub.log.events)
        await stream.send(encode(PeerInfo(raw.address, a.host.peer_id.to_bytes(), ())))
        await hub.log.wait_until(
            lambda: any(isinstance(e, PeerMisbehaved) for e in hub.log.events[mark:])
        )
        assert hub.peers.known(a.address) == PeerRef.of_host(a.host)
        assert hub.peers.known(raw.address) is None

        stranger = Address(os.urandom(20))
        await stream.send_frames(
            [
                encode(PeerInfo(raw.address, raw_id, raw.listen_addrs)),
                encode(PeerLookup(a.address)),
                encode(PeerLookup(stranger)),
                encode(PeerLookup(raw.address)),
            ]
        )
        answers = []
        with trio.fail_after(HANG_GUARD):
            for _ in range(3):
                answers.append(decode_hub(await stream.receive()))
        assert answers == [
            PeerInfo(a.address, a.host.peer_id.to_bytes(), a.host.listen_addrs),
            PeerInfo(stranger, b"", ()),
            PeerInfo(raw.address, raw_id, raw.listen_addrs),
        ]
        assert hub.peers.known(raw.address) == PeerRef.of_host(raw)
        assert hub.log.messages(raw.address, HUB_PROTOCOL) == []


# ---------------------------------------------------------------- failures


async def test_unknown_and_unroutable() -> None:
    async with network() as (hub, a, b):
        stranger = Address(os.urandom(20))
        with trio.fail_after(HANG_GUARD), pytest.raises(UnknownPeer):
            await a.peers.resolve(stranger)
        with trio.fail_after(HANG_GUARD), pytest.raises(UnknownPeer):
            await a.peers.ensure(stranger, THREAD_PROTOCOL)
        a.peers.send(stranger, _resume(a.address, stranger, 1))
        await a.log.wait_until(
            lambda: any(
                isinstance(e, PeerUnreachableEvent) and e.address == stranger for e in a.log.events
            )
        )

        # the hub never dials: a user without a stream is unreachable at once
        hub.peers.send(stranger, ChannelResume(stranger, 0))
        await hub.log.wait_until(
            lambda: any(
                isinstance(e, PeerUnreachableEvent) and e.protocol == HUB_PROTOCOL
                for e in hub.log.events
            )
        )
        with pytest.raises(PeerUnreachable):
            await hub.peers.ensure(stranger, HUB_PROTOCOL)
        with pytest.raises(UnknownPeer):
            await hub.peers.resolve(stranger)

        # local misuse is refused synchronously
        with pytest.raises(LocalProtocolError):
            a.peers.send(b.address, CollateralRequest(Assets(1, 0)))
        with pytest.raises(LocalProtocolError):
            a.peers.send(a.address, _resume(a.address, b.address, 1))
        bad_ref = PeerRef(b.address, PeerRef.of_host(a.host).peer_id, ())
        with pytest.raises(PeerIdentityError):
            a.peers.learn(bad_ref)

    async with running() as lonely:  # a user without a hub cannot resolve
        with pytest.raises(PeerUnreachable):
            await lonely.peers.resolve(stranger)


async def test_stopped_peer_is_unreachable() -> None:
    async with network() as (hub, a, b):
        ref = PeerRef.of_host(hub.host)
        async with running(hub=ref) as c:
            await joined(hub, c)
            c_address = c.address
            a.peers.send(c_address, _resume(a.address, c_address, 1))
            b.peers.send(c_address, _resume(b.address, c_address, 1))
            await c.log.wait_until(
                lambda: bool(
                    c.log.messages(a.address, THREAD_PROTOCOL)
                    and c.log.messages(b.address, THREAD_PROTOCOL)
                )
            )
            await b.log.wait_for(PeerConnected(c_address, THREAD_PROTOCOL))
        # C's streams close with its host
        await hub.log.wait_for(PeerDisconnected(c_address, HUB_PROTOCOL))
        await b.log.wait_for(PeerDisconnected(c_address, THREAD_PROTOCOL))
        assert not b.peers.is_connected(c_address, THREAD_PROTOCOL)

        # A dials (the hub still knows where C was): refused, dropped, reported
        a.peers.send(c_address, _resume(a.address, c_address, 2))
        await a.log.wait_until(
            lambda: any(
                isinstance(e, PeerUnreachableEvent) and e.address == c_address for e in a.log.events
            )
        )
        with trio.fail_after(HANG_GUARD), pytest.raises(PeerUnreachable):
            await b.peers.ensure(c_address, THREAD_PROTOCOL)


async def test_full_queue_is_dropped_and_reported() -> None:
    async with running(is_hub=True) as hub:
        ref = PeerRef.of_host(hub.host)
        async with running(hub=ref, max_queue=5) as a, running(hub=ref) as b:
            await joined(hub, a)
            await joined(hub, b)
            with trio.fail_after(HANG_GUARD):
                await a.peers.resolve(b.address)
            messages = [_resume(a.address, b.address, i) for i in range(10)]
            for message in messages:  # no writer ran yet: the sixth overflows the queue
                a.peers.send(b.address, message)
            await a.log.wait_until(
                lambda: any(isinstance(e, PeerUnreachableEvent) for e in a.log.events)
            )
            await b.log.wait_until(lambda: len(b.log.messages(a.address, THREAD_PROTOCOL)) >= 4)
            assert b.log.messages(a.address, THREAD_PROTOCOL) == messages[6:]


async def test_user_redials_hub_after_restart_with_same_key() -> None:
    hub_key, port = _key(), _free_port()
    identity = peer_identity(hub_key)
    ref = PeerRef(identity.address, identity.peer_id.to_base58(), (f"/ip4/127.0.0.1/tcp/{port}",))
    async with running(hub=ref) as user:
        # the hub is not up yet: reported once, then redialed until it is
        await user.log.wait_until(
            lambda: any(isinstance(e, PeerUnreachableEvent) for e in user.log.events)
        )
        async with running(hub_key, is_hub=True, port=port) as hub:
            await joined(hub, user)
        first = await user.log.wait_for(PeerDisconnected(ref.address, HUB_PROTOCOL))
        assert sum(isinstance(e, PeerUnreachableEvent) for e in user.log.events[:first]) == 1
        async with running(hub_key, is_hub=True, port=port) as hub:
            await user.log.wait_for(PeerConnected(ref.address, HUB_PROTOCOL), start=first)
            await joined(hub, user)
            assert hub.peers.known(user.address) == PeerRef.of_host(user.host)


async def test_thread_peer_restarted_elsewhere_is_found_again() -> None:
    b_key = _key()
    async with running(is_hub=True) as hub:
        ref = PeerRef.of_host(hub.host)
        async with running(hub=ref) as a:
            await joined(hub, a)
            async with running(b_key, hub=ref) as b:
                await joined(hub, b)
                b_address, old_ref = b.address, PeerRef.of_host(b.host)
                first = _resume(a.address, b_address, 1)
                a.peers.send(b_address, first)
                await b.log.wait_for(PeerMessages(a.address, THREAD_PROTOCOL, (first,)))
            await a.log.wait_for(PeerDisconnected(b_address, THREAD_PROTOCOL))
            assert a.peers.known(b_address) == old_ref

            async with running(b_key, hub=ref) as b:  # same key, another port
                await joined(hub, b)
                mark = len(a.log.events)
                second = _resume(a.address, b_address, 2)
                a.peers.send(b_address, second)  # the old address fails: A asks the hub again
                await b.log.wait_for(PeerMessages(a.address, THREAD_PROTOCOL, (second,)))
                await a.log.wait_for(PeerConnected(b_address, THREAD_PROTOCOL), start=mark)
                assert a.peers.known(b_address) == PeerRef.of_host(b.host)
                assert not any(isinstance(e, PeerUnreachableEvent) for e in a.log.events[mark:])


async def test_stopping_the_manager_closes_its_streams() -> None:
    async with network() as (hub, a, _):
        log = Recorder()
        async with open_host(_key()) as host, trio.open_nursery() as nursery:
            peers = PeerManager(
                host, is_hub=False, hub=PeerRef.of_host(hub.host), deliver=log.deliver
            )
            await nursery.start(peers.run)
            user = Node(host, peers, log)
            await joined(hub, user)
            message = _resume(host.address, a.address, 1)
            peers.send(a.address, message)
            await a.log.wait_for(PeerMessages(host.address, THREAD_PROTOCOL, (message,)))

            peers.stop()  # the host stays up
            await hub.log.wait_for(PeerDisconnected(host.address, HUB_PROTOCOL))
            await a.log.wait_for(PeerDisconnected(host.address, THREAD_PROTOCOL))
            assert host.is_connected(hub.host.peer_id)
            peers.send(a.address, message)  # after run: dropped, no error
            assert not peers.is_connected(a.address, THREAD_PROTOCOL)
