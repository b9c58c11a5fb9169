"""Gossip, blocks and /weft/backup/1 (node.gossip) over real hosts on 127.0.0.1.

Hosts are made by `node.host.open_host`, as the node makes them. Every test is bounded by
`trio.fail_after`. Negative checks ("X never arrives") publish a sentinel afterwards and
wait for it to arrive everywhere, twice: by then anything sent earlier has arrived too.

Regression tests for the py-libp2p 0.8.1 workarounds in node/gossip.py:
- queues of 32 and a 10 msg/s spam limit drop silently: test_burst_is_not_dropped,
  test_library_defaults_drop_a_burst
- IGNORE without a penalty and without forwarding: test_line_validates_ignores_rejects
- garbage on a gossipsub stream tears the host down, a message with an undecodable key
  stops pubsub: test_malformed_pubsub_traffic_is_contained
- own bitswap exchange instead of BitswapClient (1 s stall on repeated fetches):
  test_fetch_1mib_in_four_blocks (repeated fetches), test_library_client_fetches

Serving is bounded (a security review): repeated CIDs of a wantlist are merged
(test_repeated_wants_get_each_block_once), one wantlist is answered with at most
`MAX_REPLY_BYTES` of blocks and the stream goes on serving
(test_answer_is_capped_and_serving_goes_on), and a fetch asks in parts that fit the cap,
so a backup of the maximum size still comes in one fetch
(test_a_backup_of_the_maximum_size_fetches_whole).
"""

from __future__ import annotations

import os
import statistics
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from itertools import pairwise

import msgpack
import pytest
import trio
from libp2p.bitswap import BitswapClient
from libp2p.bitswap import MemoryBlockStore as LibraryBlockStore
from libp2p.bitswap.pb.bitswap_pb2 import Message as BitswapMessage
from libp2p.pubsub.pb import rpc_pb2
from libp2p.utils import encode_varint_prefixed

from node.gossip import (
    BACKUP_PROTOCOL,
    BITSWAP_PROTOCOL,
    MAX_ANNOUNCEMENT_BYTES,
    MAX_BLOCK_BYTES,
    MAX_REPLY_BYTES,
    BackupProtocolError,
    BlockMismatch,
    BlockService,
    BlockTooLarge,
    BlockUnavailable,
    GossipClosed,
    GossipConfig,
    GossipError,
    GossipMessage,
    GossipMessageTooLarge,
    GossipService,
    GossipSubscription,
    GossipTimeout,
    InvalidCid,
    MemoryBlockStore,
    Verdict,
    block_cid,
    decode_backup_request,
    decode_backup_response,
    encode_backup_request,
    encode_backup_response,
    is_block_cid,
    open_block_service,
    open_gossip,
    request_latest_announcement,
    serve_backup_requests,
)
from node.host import Host, HostError, open_host
from node.peer_stream import FramedStream, StreamClosed
from protocols.backup import MAX_SEALED_BYTES, from_blocks, parse_root, to_blocks
from protocols.errors import DecodeError, InvalidValue
from protocols.signing import Signer
from protocols.types import Address
from protocols.wire import MAX_FRAME

STEP = 5.0  # seconds any single network step may take before the test fails
TOPIC = "/weft/test-announcements"


def _key() -> bytes:
    while True:  # a random 32-byte string is a valid secp256k1 secret but for ~2^-128
        key = os.urandom(32)
        try:
            Signer(key)
        except InvalidValue:
            continue
        return key


@asynccontextmanager
async def hosts(n: int) -> AsyncIterator[list[Host]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_host(_key())) for _ in range(n)]


@asynccontextmanager
async def gossip_on(
    hs: list[Host], configs: list[GossipConfig] | None = None
) -> AsyncIterator[list[GossipService]]:
    async with AsyncExitStack() as stack:
        services = []
        for i, host in enumerate(hs):
            config = configs[i] if configs else None
            services.append(await stack.enter_async_context(open_gossip(host, config)))
        yield services


async def connect_line(hs: list[Host]) -> None:
    for a, b in pairwise(hs):
        await b.connect(a.peer_id, a.listen_addrs)


async def wait_mesh(hs: list[Host], gs: list[GossipService], edges: list[tuple[int, int]]) -> None:
    for i, j in edges:
        await gs[i].wait_for_mesh(TOPIC, hs[j].peer_id, STEP)
        await gs[j].wait_for_mesh(TOPIC, hs[i].peer_id, STEP)


def accept_all(data: bytes) -> Verdict:
    return Verdict.ACCEPT


def judging(data: bytes) -> Verdict:
    if data.startswith(b"reject"):
        return Verdict.REJECT
    if data.startswith(b"ignore"):
        return Verdict.IGNORE
    if data.startswith(b"boom"):
        raise RuntimeError("validator bug")
    return Verdict.ACCEPT


async def collect_until(sub: GossipSubscription, sentinel: bytes) -> list[GossipMessage]:
    out: list[GossipMessage] = []
    while True:
        message = await sub.receive()
        if message.data == sentinel:
            return out
        out.append(message)


# ====================================================================== gossip


async def test_line_validates_ignores_rejects() -> None:
    """A-B-C-D in a line: accepted messages reach every other node; rejected and ignored
    ones reach no application; B ignores "ignore..." without penalizing A and without
    forwarding it, though C and D would accept it; a reject counts against A at B."""
    with trio.fail_after(30):
        async with hosts(4) as hs, gossip_on(hs) as gs:
            validators: list[Callable[[bytes], Verdict]] = [
                judging,
                judging,
                accept_all,
                accept_all,
            ]
            subs = [await g.subscribe(TOPIC, v) for g, v in zip(gs, validators, strict=True)]
            await connect_line(hs)
            await wait_mesh(hs, gs, [(0, 1), (1, 2), (2, 3)])
            a, b = hs[0], gs[1]

            await gs[0].publish(TOPIC, b"hello")
            await gs[0].publish(TOPIC, b"ignore me")
            await gs[0].publish(TOPIC, b"boom")  # a validator exception: ignored
            got: list[list[GossipMessage]] = [[] for _ in subs[1:]]
            for round_ in (b"sentinel-1", b"sentinel-2"):  # trio may reorder within a batch
                await gs[0].publish(TOPIC, round_)
                for messages, s in zip(got, subs[1:], strict=True):
                    messages += await collect_until(s, round_)
            for messages in got:
                assert [m.data for m in messages] == [b"hello"]
                assert messages[0].origin == a.peer_id
                assert messages[0].origin_address == a.address
                assert messages[0].topic == TOPIC
            assert b.invalid_messages_from(a.peer_id, TOPIC) == 0

            await gs[0].publish(TOPIC, b"reject me")
            for round_ in (b"sentinel-3", b"sentinel-4"):
                await gs[0].publish(TOPIC, round_)
                for s in subs[1:]:
                    assert await collect_until(s, round_) == []
            assert b.invalid_messages_from(a.peer_id, TOPIC) == 1
            assert gs[2].invalid_messages_from(hs[1].peer_id, TOPIC) == 0  # never forwarded

            # a node's own messages are not delivered to itself
            await gs[3].publish(TOPIC, b"from D")
            assert (await subs[0].receive()).data == b"from D"
            await gs[0].publish(TOPIC, b"sentinel-5")
            assert await collect_until(subs[3], b"sentinel-5") == []
            assert all(s.dropped == 0 for s in subs)


async def test_star_started_after_connecting() -> None:
    """Hub H and leaves L1..L3 connected before gossip starts: pubsub takes the existing
    connections in, and a leaf's message reaches the others through H."""
    with trio.fail_after(30):
        async with hosts(4) as hs:
            hub, leaves = hs[0], hs[1:]
            for leaf in leaves:
                await leaf.connect(hub.peer_id, hub.listen_addrs)
            async with gossip_on(hs) as gs:
                subs = [await g.subscribe(TOPIC, accept_all) for g in gs]
                await wait_mesh(hs, gs, [(0, 1), (0, 2), (0, 3)])
                await gs[1].publish(TOPIC, b"from L1")
                for i in (0, 2, 3):
                    message = await subs[i].receive()
                    assert (message.data, message.origin_address) == (b"from L1", hs[1].address)
                assert gs[0].subscribers(TOPIC) == {leaf.peer_id for leaf in leaves}
                assert gs[0].mesh_peers(TOPIC) == {leaf.peer_id for leaf in leaves}


async def test_a_peer_whose_gossip_starts_later_is_taken_in() -> None:
    """A runs gossip; B is connected but runs none yet, so it refuses A's pubsub stream.
    Once B's gossip starts, A tries again and each hears the other. (py-libp2p 0.8.1 never
    retries that refusal: A would never send B anything.)"""
    with trio.fail_after(30):
        async with hosts(2) as (a, b), open_gossip(a) as ga:
            sub_a = await ga.subscribe(TOPIC, accept_all)
            await b.connect(a.peer_id, a.listen_addrs)
            await trio.sleep(0.2)  # A's first try, refused by B
            async with open_gossip(b) as gb:
                sub_b = await gb.subscribe(TOPIC, accept_all)
                await ga.wait_for_mesh(TOPIC, b.peer_id, STEP)
                await gb.wait_for_mesh(TOPIC, a.peer_id, STEP)
                await ga.publish(TOPIC, b"from A")
                assert (await sub_b.receive()).data == b"from A"
                await gb.publish(TOPIC, b"from B")
                assert (await sub_a.receive()).data == b"from B"


async def test_no_announcement_dropped_at_node_rate() -> None:
    """5 hosts in a line each publish one message per 0.2 s for 10 s: every subscriber
    receives every other node's 50 messages, exactly once."""
    nodes, period, count = 5, 0.2, 50
    with trio.fail_after(40):
        async with hosts(nodes) as hs, gossip_on(hs) as gs:
            subs = [await g.subscribe(TOPIC, accept_all) for g in gs]
            await connect_line(hs)
            await wait_mesh(hs, gs, [(i, i + 1) for i in range(nodes - 1)])
            received: list[set[tuple[int, int]]] = [set() for _ in range(nodes)]
            duplicates = 0
            latencies: list[float] = []
            by_hops: dict[int, list[float]] = {}

            async def publisher(i: int) -> None:
                start = trio.current_time()
                for seq in range(count):
                    await trio.sleep_until(start + seq * period + i * period / nodes)
                    await gs[i].publish(TOPIC, msgpack.packb([i, seq, trio.current_time()]))

            async def receiver(i: int) -> None:
                nonlocal duplicates
                expected = (nodes - 1) * count
                while len(received[i]) < expected:
                    message = await subs[i].receive()
                    origin, seq, sent = msgpack.unpackb(message.data)
                    latencies.append(trio.current_time() - sent)
                    by_hops.setdefault(abs(origin - i), []).append(latencies[-1])
                    if (origin, seq) in received[i]:
                        duplicates += 1
                    received[i].add((origin, seq))

            t0 = trio.current_time()
            async with trio.open_nursery() as nursery:
                for i in range(nodes):
                    nursery.start_soon(publisher, i)
                    nursery.start_soon(receiver, i)
            elapsed = trio.current_time() - t0
            for i in range(nodes):
                assert received[i] == {(o, s) for o in range(nodes) if o != i for s in range(count)}
            assert duplicates == 0
            assert all(s.dropped == 0 for s in subs)
            latencies.sort()
            print(
                f"\n{len(latencies)} deliveries in {elapsed:.1f} s over a {nodes}-node line: "
                f"latency median {statistics.median(latencies) * 1000:.1f} ms, "
                f"p95 {latencies[int(0.95 * len(latencies))] * 1000:.1f} ms, "
                f"max {latencies[-1] * 1000:.1f} ms; median by hops: "
                + ", ".join(
                    f"{h}: {statistics.median(v) * 1000:.1f} ms" for h, v in sorted(by_hops.items())
                )
            )


async def _burst(config: GossipConfig, n: int) -> tuple[int, int]:
    """A publishes `n` messages without pausing, then a sentinel; B starts reading only once
    the sentinel has been validated (so everything sits in B's delivery queue), or after
    1.5 s if the sentinel never comes. Returns (messages B received, B's dropped count)."""
    arrived = trio.Event()

    def watch(data: bytes) -> Verdict:
        if data == b"sentinel":
            arrived.set()
        return Verdict.ACCEPT

    async with hosts(2) as hs, gossip_on(hs, [config, config]) as gs:
        await gs[0].subscribe(TOPIC, accept_all)
        sub = await gs[1].subscribe(TOPIC, watch)
        await connect_line(hs)
        await wait_mesh(hs, gs, [(0, 1)])
        for i in range(n):
            await gs[0].publish(TOPIC, i.to_bytes(4, "big") + bytes(200))
        await gs[0].publish(TOPIC, b"sentinel")
        with trio.move_on_after(1.5):
            await arrived.wait()
        seen: set[bytes] = set()
        while True:  # until idle: trio may run the sentinel's task before earlier ones
            with trio.move_on_after(0.2) as idle:
                message = await sub.receive()
            if idle.cancelled_caught:
                return len(seen), sub.dropped
            if message.data != b"sentinel":
                seen.add(message.data[:4])


async def test_burst_is_not_dropped() -> None:
    """150 publishes in a row (no checkpoint between them) all arrive: the spam limit, the
    outbound queue and the delivery queue are all above py-libp2p's defaults."""
    with trio.fail_after(20):
        assert await _burst(GossipConfig(), 150) == (150, 0)


@pytest.mark.parametrize(
    ("library_default", "most_received"),
    [
        ({"max_messages_per_topic_per_second": 10}, 10),
        ({"outbound_queue_size": 32}, 32),
        ({"delivery_queue_size": 32}, 32),
    ],
    ids=["spam-limit-10", "outbound-queue-32", "delivery-queue-32"],
)
async def test_library_defaults_drop_a_burst(
    library_default: dict[str, int], most_received: int
) -> None:
    """With any one of py-libp2p's defaults (10 msg/s, outbound queue 32, subscription
    queue 32) the same burst is cut, silently but for our `dropped` count. If this starts
    receiving all 150, the library changed and the workaround can be revisited."""
    with trio.fail_after(20):
        received, dropped = await _burst(GossipConfig(**library_default), 150)
    assert received <= most_received
    if "delivery_queue_size" in library_default:
        assert (received, dropped) == (32, 151 - 32)


async def test_message_size_limits_and_closing() -> None:
    with trio.fail_after(20):
        async with hosts(2) as hs:
            big = GossipConfig(max_message_bytes=2 * MAX_ANNOUNCEMENT_BYTES)
            async with gossip_on(hs, [big, GossipConfig()]) as gs:
                subs = [await g.subscribe(TOPIC, accept_all) for g in gs]
                await connect_line(hs)
                await wait_mesh(hs, gs, [(0, 1)])
                with pytest.raises(GossipMessageTooLarge):
                    await gs[1].publish(TOPIC, bytes(MAX_ANNOUNCEMENT_BYTES + 1))
                with pytest.raises(GossipError):
                    await gs[1].subscribe(TOPIC, accept_all)  # already subscribed
                # A may send 8 KiB, B rejects above 4 KiB and counts it against A
                await gs[0].publish(TOPIC, bytes(MAX_ANNOUNCEMENT_BYTES + 1))
                await gs[0].publish(TOPIC, b"sentinel")
                assert await collect_until(subs[1], b"sentinel") == []
                assert gs[1].invalid_messages_from(hs[0].peer_id, TOPIC) == 1

                await subs[1].aclose()
                await subs[1].aclose()  # idempotent
                assert [m async for m in subs[1]] == []
                with pytest.raises(GossipClosed):
                    await subs[1].receive()
                late = await gs[1].subscribe(TOPIC, accept_all)  # again, after closing
            # the services are closed: subscriptions end, publishing fails
            assert [m async for m in late] == []
            with pytest.raises(GossipClosed):
                await gs[0].publish(TOPIC, b"after close")
            with pytest.raises(GossipClosed):
                await gs[0].subscribe("other", accept_all)
            # the hosts still work, and gossip can start again on them. py-libp2p 0.8.1 now
            # and then drops their connection as the old gossip streams and the new ones
            # cross (a Noise frame fails authentication): then they connect again, as
            # nodes do.
            async with gossip_on(hs) as again:
                subs = [await g.subscribe(TOPIC, accept_all) for g in again]
                for attempt in range(2):
                    await hs[1].connect(hs[0].peer_id, hs[0].listen_addrs)
                    try:
                        await wait_mesh(hs, again, [(0, 1)])
                        break
                    except GossipTimeout:
                        if attempt == 1 or hs[1].is_connected(hs[0].peer_id):
                            raise
                await again[0].publish(TOPIC, b"second life")
                assert (await subs[1].receive()).data == b"second life"


async def test_malformed_pubsub_traffic_is_contained() -> None:
    """B (no gossip) writes raw gossipsub RPCs to A: garbage, then a message whose public
    key does not decode. Alone, py-libp2p would tear down A's host on the first and stop
    A's pubsub on the second; here the stream is reset and the message counted invalid."""
    with trio.fail_after(20):
        async with hosts(3) as (a, b, c), gossip_on([a, c]) as (ga, gc):
            sub = await ga.subscribe(TOPIC, accept_all)
            await gc.subscribe(TOPIC, accept_all)
            await c.connect(a.peer_id, a.listen_addrs)
            await b.connect(a.peer_id, a.listen_addrs)
            await wait_mesh([a, c], [ga, gc], [(0, 1)])

            stream = await b.new_stream(a.peer_id, "/meshsub/1.1.0")
            await stream.raw.write(b"\x03abc")
            with pytest.raises(StreamClosed):
                await stream.receive()  # A reset it
            await stream.close()

            evil = rpc_pb2.Message(
                from_id=b"\x12\x20" + bytes(32),  # a hashed peer id: the key must be sent
                key=b"not a key",
                signature=b"x",
                data=b"evil",
                seqno=bytes(8),
                topicIDs=[TOPIC],
            )
            stream = await b.new_stream(a.peer_id, "/meshsub/1.1.0")
            await stream.raw.write(
                encode_varint_prefixed(rpc_pb2.RPC(publish=[evil]).SerializeToString())
            )
            while ga.invalid_messages_from(b.peer_id, TOPIC) == 0:
                await trio.sleep(0.01)
            await stream.close()

            await gc.publish(TOPIC, b"still alive")
            assert (await sub.receive()).data == b"still alive"
            assert a.is_connected(c.peer_id)


async def test_pubsub_failure_and_body_exceptions() -> None:
    """pubsub stopping on its own (a library bug) cancels the body and surfaces as a
    GossipError; an exception of the body comes out as itself, not in a group."""

    async def library_bug() -> None:
        raise RuntimeError("library bug")

    with trio.fail_after(10):
        async with hosts(1) as (host,):
            with pytest.raises(GossipError, match="gossipsub stopped"):
                async with open_gossip(host) as gossip:
                    gossip._pubsub.manager.run_task(library_bug)
                    await trio.sleep_forever()
            with pytest.raises(KeyError, match="mine"):
                async with open_gossip(host):
                    raise KeyError("mine")
            async with open_gossip(host) as gossip:  # the host is still usable
                await gossip.subscribe(TOPIC, accept_all)


def test_gossip_config_checks() -> None:
    for bad in (
        {"degree_low": 7},
        {"degree_high": 5},
        {"heartbeat_interval": 0},
        {"outbound_queue_size": 0},
        {"max_messages_per_topic_per_second": 0},
    ):
        with pytest.raises(ValueError):
            GossipConfig(**bad)


# ====================================================================== blocks


class LyingStore(MemoryBlockStore):
    """Serves other bytes than those pinned."""

    async def get(self, cid: bytes) -> bytes | None:
        data = await super().get(cid)
        return None if data is None else bytes(len(data))


def _split(payload: bytes, size: int) -> list[bytes]:
    return [payload[i : i + size] for i in range(0, len(payload), size)]


@asynccontextmanager
async def block_nodes(
    n: int, stores: list[MemoryBlockStore] | None = None
) -> AsyncIterator[tuple[list[Host], list[BlockService]]]:
    async with hosts(n) as hs, AsyncExitStack() as stack:
        services = []
        for i, host in enumerate(hs):
            store = stores[i] if stores else None
            services.append(await stack.enter_async_context(open_block_service(host, store)))
        yield hs, services


async def test_fetch_1mib_in_four_blocks() -> None:
    """1 MiB in 4 blocks of 256 KiB pinned on A, fetched by C from A, then from whoever has
    them (B, asked first or not, has none); repeated fetches do not stall."""
    stores = [MemoryBlockStore() for _ in range(3)]
    with trio.fail_after(30):
        async with block_nodes(3, stores) as (hs, bs):
            a, b, c = hs
            await c.connect(b.peer_id, b.listen_addrs)
            await c.connect(a.peer_id, a.listen_addrs)
            timings = []
            for _ in range(5):
                payload = os.urandom(1024 * 1024)
                cids = [await bs[0].pin(part) for part in _split(payload, 256 * 1024)]
                assert all(is_block_cid(cid) for cid in cids)
                t0 = trio.current_time()
                got = await bs[2].fetch(cids, a.peer_id, timeout=STEP)
                timings.append(trio.current_time() - t0)
                assert b"".join(got[cid] for cid in cids) == payload
            assert len(stores[2]) == 0  # fetching pins nothing
            got = await bs[2].fetch(cids, timeout=STEP)  # any connected peer
            assert b"".join(got[cid] for cid in cids) == payload
            print(
                f"\n1 MiB (4 x 256 KiB) fetched from one peer: median "
                f"{statistics.median(timings) * 1000:.1f} ms, max {max(timings) * 1000:.1f} ms"
            )
            assert max(timings) < 0.8  # py-libp2p's BitswapClient stalls ~1 s every other time

            # pinned blocks are served from the local store without asking anyone
            own = await bs[2].pin(b"local")
            assert await bs[2].fetch_one(own, timeout=STEP) == b"local"


def _wantlist(cids: Sequence[bytes], *, have: bool = False) -> bytes:
    """One bitswap request (varint-framed) for `cids`, each asking for a DontHave."""
    message = BitswapMessage()
    for cid in cids:
        entry = message.wantlist.entries.add()
        entry.block = cid
        entry.wantType = BitswapMessage.Wantlist.Have if have else BitswapMessage.Wantlist.Block
        entry.sendDontHave = True
    return encode_varint_prefixed(message.SerializeToString())


class RawAnswers:
    """What a server sends on a raw bitswap stream: blocks and DontHaves, in order."""

    def __init__(self, stream: FramedStream) -> None:
        self.stream = stream
        self.blocks: list[bytes] = []
        self.lacking: list[bytes] = []
        self.haves: list[bytes] = []
        self._buffer = bytearray()

    async def until_lacking(self, sentinel: bytes) -> None:
        """Read until the server says it lacks `sentinel` (asked for after the rest)."""
        while sentinel not in self.lacking:
            data = await self.stream.raw.read(64 * 1024)
            assert data, "the server closed the stream"
            self._buffer += data
            while (frame := self._next_frame()) is not None:
                message = BitswapMessage()
                message.ParseFromString(frame)
                self.blocks += [bytes(b.data) for b in message.payload]
                for presence in message.blockPresences:
                    if presence.type == BitswapMessage.DontHave:
                        self.lacking.append(bytes(presence.cid))
                    else:
                        self.haves.append(bytes(presence.cid))

    def _next_frame(self) -> bytes | None:
        size = shift = pos = 0
        while True:
            if pos >= len(self._buffer):
                return None
            byte = self._buffer[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if len(self._buffer) - pos < size:
            return None
        frame = bytes(self._buffer[pos : pos + size])
        del self._buffer[: pos + size]
        return frame


async def test_repeated_wants_get_each_block_once() -> None:
    """A wantlist naming one block 1000 times (and another 20 times, a missing one 3 times,
    a want-have twice) gets each block once and each presence once."""
    with trio.fail_after(20):
        async with block_nodes(2) as (hs, bs):
            a, c = hs
            await c.connect(a.peer_id, a.listen_addrs)
            big, small = os.urandom(10_000), b"small block"
            big_cid, small_cid = await bs[0].pin(big), await bs[0].pin(small)
            absent, sentinel = block_cid(b"nobody has this"), block_cid(b"sentinel")
            stream = await c.new_stream(a.peer_id, BITSWAP_PROTOCOL)
            wants = [big_cid] * 1000 + [small_cid] * 20 + [absent] * 3
            await stream.raw.write(
                _wantlist(wants)
                + _wantlist([small_cid, small_cid], have=True)
                + _wantlist([sentinel])
            )
            answers = RawAnswers(stream)
            await answers.until_lacking(sentinel)
            assert Counter(answers.blocks) == Counter({big: 1, small: 1})
            assert answers.lacking == [absent, sentinel]
            assert answers.haves == [small_cid]
            await stream.close()


async def test_answer_is_capped_and_serving_goes_on() -> None:
    """One wantlist for 17 maximal blocks (8.5 MiB) gets at most `MAX_REPLY_BYTES` of them
    and a DontHave for the rest; the same stream then serves the next wantlist, and other
    peers fetch all 17 blocks (the fetcher asks in parts that fit the cap)."""
    count = 2 * (MAX_REPLY_BYTES // MAX_BLOCK_BYTES) + 1
    with trio.fail_after(30):
        async with block_nodes(3) as (hs, bs):
            a, b, c = hs
            await c.connect(a.peer_id, a.listen_addrs)
            await b.connect(a.peer_id, a.listen_addrs)
            blocks = {block_cid(d): d for d in (os.urandom(MAX_BLOCK_BYTES) for _ in range(count))}
            for data in blocks.values():
                await bs[0].pin(data)
            cids = list(blocks)
            sentinel = block_cid(b"sentinel")
            stream = await c.new_stream(a.peer_id, BITSWAP_PROTOCOL)
            await stream.raw.write(_wantlist(cids) + _wantlist([sentinel]))
            answers = RawAnswers(stream)
            await answers.until_lacking(sentinel)
            sent = {block_cid(d) for d in answers.blocks}
            assert len(sent) == len(answers.blocks)
            assert sum(map(len, answers.blocks)) <= MAX_REPLY_BYTES
            assert len(sent) == MAX_REPLY_BYTES // MAX_BLOCK_BYTES
            assert sorted([*sent, *answers.lacking]) == sorted([*cids, sentinel])

            # the stream goes on serving: a block not sent before, asked for again
            (unsent, *_) = (cid for cid in cids if cid not in sent)
            again = block_cid(b"sentinel again")
            await stream.raw.write(_wantlist([unsent]) + _wantlist([again]))
            answers.blocks.clear()
            await answers.until_lacking(again)
            assert answers.blocks == [blocks[unsent]]
            await stream.close()

            # and the host too, to whole fetches of every block, from two peers at once
            got: list[dict[bytes, bytes]] = []

            async def fetch(service: BlockService) -> None:
                got.append(await service.fetch(cids, a.peer_id, timeout=STEP))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetch, bs[1])
                nursery.start_soon(fetch, bs[2])
            assert got == [blocks, blocks]


async def test_a_backup_of_the_maximum_size_fetches_whole() -> None:
    """A sealed backup of MAX_SEALED_BYTES (a root and 65 children) is fetched in one
    `fetch` of its children, from a given peer and from any peer (B, which lacks them,
    may be asked first)."""
    sealed = os.urandom(MAX_SEALED_BYTES)
    root_cid, blocks = to_blocks(sealed)
    with trio.fail_after(60):
        async with block_nodes(3) as (hs, bs):
            a, b, c = hs
            for data in blocks.values():
                await bs[0].pin(data)
            await c.connect(b.peer_id, b.listen_addrs)
            await c.connect(a.peer_id, a.listen_addrs)
            for source in (a.peer_id, None):
                root = await bs[2].fetch_one(root_cid, source, timeout=STEP)
                children = list(parse_root(root_cid, root).children)
                assert len(children) == 65
                got = await bs[2].fetch(children, source, timeout=4 * STEP, peer_timeout=STEP)
                got[root_cid] = root
                assert from_blocks(root_cid, got.get, len(sealed)) == sealed


async def test_lying_peer_is_rejected() -> None:
    """A serves other bytes than the CID names: C rejects them (`BlockMismatch`) and keeps
    nothing; asking any peer, C moves on to B, which has the real block."""
    lying, honest, fetcher = LyingStore(), MemoryBlockStore(), MemoryBlockStore()
    with trio.fail_after(20):
        async with block_nodes(3, [lying, honest, fetcher]) as (hs, bs):
            a, b, c = hs
            data = os.urandom(100_000)
            cid = await bs[0].pin(data)
            await c.connect(a.peer_id, a.listen_addrs)
            with pytest.raises(BlockMismatch):
                await bs[2].fetch([cid], a.peer_id, timeout=STEP)
            with pytest.raises(BlockUnavailable) as info:
                await bs[2].fetch([cid], timeout=STEP)
            assert info.value.missing == (cid,)
            assert len(fetcher) == 0
            assert await bs[1].pin(data) == cid
            await c.connect(b.peer_id, b.listen_addrs)
            assert await bs[2].fetch_one(cid, timeout=STEP) == data


async def test_missing_blocks_fail_within_the_bound() -> None:
    """A block the peer lacks fails at once (DontHave); a peer that never answers fails at
    the time bound; both as `BlockUnavailable`."""
    with trio.fail_after(20):
        async with block_nodes(2) as (hs, bs):
            a, c = hs
            await c.connect(a.peer_id, a.listen_addrs)
            absent = block_cid(b"nobody has this")
            t0 = trio.current_time()
            with pytest.raises(BlockUnavailable) as info:
                await bs[1].fetch([absent], a.peer_id, timeout=STEP)
            assert trio.current_time() - t0 < 1.0
            assert info.value.missing == (absent,)
            assert info.value.every_peer_lacks
            with pytest.raises(BlockUnavailable) as info:
                await bs[1].fetch([absent], timeout=STEP)
            assert info.value.every_peer_lacks

            async def silent(stream: FramedStream) -> None:
                await trio.sleep_forever()

            a.set_handler(BITSWAP_PROTOCOL, silent)
            t0 = trio.current_time()
            with pytest.raises(BlockUnavailable) as info:
                await bs[1].fetch([absent], a.peer_id, timeout=1.0)
            assert 0.9 <= trio.current_time() - t0 < 2.0
            assert "timed out" in str(info.value)
            assert not info.value.every_peer_lacks
            t0 = trio.current_time()
            with pytest.raises(BlockUnavailable) as info:
                await bs[1].fetch([absent], timeout=5.0, peer_timeout=0.5)
            assert trio.current_time() - t0 < 2.0
            assert not info.value.every_peer_lacks


async def test_pin_unpin_and_bad_input() -> None:
    with trio.fail_after(20):
        async with block_nodes(2) as (hs, bs):
            a, c = hs
            await c.connect(a.peer_id, a.listen_addrs)
            with pytest.raises(BlockTooLarge):
                await bs[0].pin(bytes(MAX_BLOCK_BYTES + 1))
            cid = await bs[0].pin(bytes(MAX_BLOCK_BYTES))
            assert await bs[1].fetch_one(cid, a.peer_id, timeout=STEP) == bytes(MAX_BLOCK_BYTES)
            await bs[0].unpin(cid)
            with pytest.raises(BlockUnavailable):
                await bs[1].fetch_one(cid, a.peer_id, timeout=STEP)
            for bad in (b"", cid[:-1], b"\x01\x70" + cid[2:], "text"):
                with pytest.raises(InvalidCid):
                    await bs[1].fetch([bad], a.peer_id)  # type: ignore[list-item]
                with pytest.raises(InvalidCid):
                    await bs[0].unpin(bad)  # type: ignore[arg-type]

            # a malformed bitswap request resets that stream; the server goes on serving
            cid = await bs[0].pin(b"still served")
            for junk in (b"\xff" * 12, b"\x05\xff\xff\xff\xff\xff", b"\xfe\xff\x7f"):
                stream = await c.new_stream(a.peer_id, BITSWAP_PROTOCOL)
                await stream.raw.write(junk)
                with pytest.raises(StreamClosed):
                    await stream.receive()
                await stream.close()
            assert await bs[1].fetch_one(cid, a.peer_id, timeout=STEP) == b"still served"


async def test_library_client_fetches() -> None:
    """py-libp2p's own BitswapClient fetches from a BlockService (wire compatibility)."""
    with trio.fail_after(20):
        async with block_nodes(1) as (hs, bs), hosts(1) as (c,), trio.open_nursery() as nursery:
            a = hs[0]
            await c.connect(a.peer_id, a.listen_addrs)
            client = BitswapClient(c.libp2p, LibraryBlockStore())
            client.set_nursery(nursery)  # not started: C only fetches
            data = os.urandom(300_000)
            cid = await bs[0].pin(data)
            assert (
                await client.new_session().get_block(cid, peer_id=a.peer_id, timeout=STEP) == data
            )
            nursery.cancel_scope.cancel()


# ====================================================================== /weft/backup/1


def test_backup_codec() -> None:
    owner = Address(bytes(range(20)))
    request = encode_backup_request(owner)
    assert decode_backup_request(request) == owner
    assert len(request) == 24
    for announcement in (None, b"", b"x" * MAX_ANNOUNCEMENT_BYTES):
        assert decode_backup_response(encode_backup_response(announcement)) == announcement
    with pytest.raises(ValueError):
        encode_backup_response(b"x" * (MAX_ANNOUNCEMENT_BYTES + 1))
    bad_requests = [
        b"",
        b"\xc1",
        msgpack.packb([2, owner.raw]),
        msgpack.packb([1, owner.raw[:19]]),
        msgpack.packb([1, owner.raw.hex()]),
        msgpack.packb([1, owner.raw, 3]),
        msgpack.packb({"owner": owner.raw}),
        msgpack.packb([1.0, owner.raw]),
        msgpack.packb([True, owner.raw]),
        request + b"\x00",
        bytes(65),
    ]
    for bad in bad_requests:
        with pytest.raises(DecodeError):
            decode_backup_request(bad)
    for bad in (b"", msgpack.packb([1, "text"]), msgpack.packb([1, bytes(4097)]), b"\x92\x01"):
        with pytest.raises(DecodeError):
            decode_backup_response(bad)


async def test_backup_request_answers() -> None:
    owner, stranger = Address(os.urandom(20)), Address(os.urandom(20))
    held = {owner: b"signed announcement"}
    asked: list[Address] = []

    async def latest(who: Address) -> bytes | None:
        asked.append(who)
        return held.get(who)

    with trio.fail_after(20):
        async with hosts(2) as (server, client), serve_backup_requests(server, latest):
            await client.connect(server.peer_id, server.listen_addrs)
            assert await request_latest_announcement(client, server.peer_id, owner) == (
                b"signed announcement"
            )
            assert await request_latest_announcement(client, server.peer_id, stranger) is None
            assert asked == [owner, stranger]

            # several requests on one stream
            stream = await client.new_stream(server.peer_id, BACKUP_PROTOCOL)
            await stream.send_frames([encode_backup_request(a) for a in (owner, stranger, owner)])
            answers = [decode_backup_response(await stream.receive()) for _ in range(3)]
            assert answers == [b"signed announcement", None, b"signed announcement"]
            await stream.close()


async def test_backup_bad_requests_close_the_stream_only() -> None:
    owner = Address(os.urandom(20))

    async def latest(who: Address) -> bytes | None:
        if who == owner:
            raise RuntimeError("store failed")
        return b"ok"

    with trio.fail_after(20):
        async with hosts(2) as (server, client), serve_backup_requests(server, latest):
            await client.connect(server.peer_id, server.listen_addrs)
            for junk in (b"", b"\xc1", msgpack.packb([1, b"short"]), bytes(200)):
                stream = await client.new_stream(server.peer_id, BACKUP_PROTOCOL)
                await stream.send(junk)
                with pytest.raises(StreamClosed):
                    await stream.receive()
                await stream.close()
            # a frame header over MAX_FRAME, and a frame cut short by the client
            for raw in ((MAX_FRAME + 1).to_bytes(4, "big"), (10).to_bytes(4, "big") + b"abc"):
                stream = await client.new_stream(server.peer_id, BACKUP_PROTOCOL)
                await stream.raw.write(raw)
                if len(raw) > 4:
                    await stream.raw.close()
                with pytest.raises(StreamClosed):
                    await stream.receive()
                await stream.close()
            # the callback failing resets that stream; the client gets a typed error
            with pytest.raises(BackupProtocolError):
                await request_latest_announcement(client, server.peer_id, owner)
            # and the server still answers
            other = Address(os.urandom(20))
            assert await request_latest_announcement(client, server.peer_id, other) == b"ok"


async def test_backup_request_timeout() -> None:
    async def slow(who: Address) -> bytes | None:
        await trio.sleep_forever()
        return None  # pragma: no cover

    with trio.fail_after(20):
        async with hosts(2) as (server, client), serve_backup_requests(server, slow):
            await client.connect(server.peer_id, server.listen_addrs)
            t0 = trio.current_time()
            with pytest.raises(BackupProtocolError):
                await request_latest_announcement(
                    client, server.peer_id, Address(bytes(20)), timeout=0.5
                )
            assert 0.4 <= trio.current_time() - t0 < 1.5

    async def latest(who: Address) -> bytes | None:
        return b"ok"

    with trio.fail_after(20):
        async with hosts(2) as (server, client):
            await client.connect(server.peer_id, server.listen_addrs)
            async with serve_backup_requests(server, latest):
                assert await request_latest_announcement(client, server.peer_id, Address(bytes(20)))
            # once the service is closed the protocol is refused (the stream is reset, during
            # or after negotiation), and the host lives on
            with pytest.raises((BackupProtocolError, HostError)):
                await request_latest_announcement(client, server.peer_id, Address(bytes(20)))
            assert client.is_connected(server.peer_id)
