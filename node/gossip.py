"""The network layer of backups (issue 6): gossipsub, blocks over bitswap, and `/weft/backup/1`.

Three services over a running `node.host.Host`, each an async context manager:

- `open_gossip(host, config)` -> `GossipService`: py-libp2p 0.8.1 `Pubsub` + `GossipSub`
  tuned for announcements (see `GossipConfig`). `subscribe(topic, validator)` gives a
  `GossipSubscription` yielding `GossipMessage`s that passed the validator; `publish(topic,
  data)` sends. Messages are signed by their origin's libp2p key (strict signing), so
  `GossipMessage.origin_address` is authenticated. A node's own messages are not delivered
  back to it.
- `open_block_service(host, store)` -> `BlockService`: serves the blocks pinned in a
  `BlockStore` and fetches blocks by CID (CIDv1, raw, sha2-256), verifying every byte.
  Serving is bounded per inbound wantlist: repeated CIDs are merged (each block is sent
  at most once), and at most `MAX_REPLY_BYTES` (4 MiB) of blocks are sent; a block past
  that is answered as not held (DontHave if asked for), and the stream goes on serving.
  A fetch therefore asks in wantlists of 8 CIDs (8 blocks of `MAX_BLOCK_BYTES` fit),
  written at once on its stream. A store that is a `ServeWatcher` is told which
  authenticated peer was sent which block, once the write is done
  (`node.backup.ServedBlocks` counts each peer once). `BlockUnavailable.every_peer_lacks`
  tells a fetch that every peer asked answered DontHave from one that ran out of time.
- `serve_backup_requests(host, latest)` and `request_latest_announcement(host, peer, owner)`:
  "give me the latest announcement you hold for owner X" on its own stream.

Validators return a `Verdict`. py-libp2p only knows accept/reject, and a reject counts
against the forwarder's score, so IGNORE is done here: the message is accepted by libp2p
(marked seen, no penalty) and then neither delivered nor forwarded.

Workarounds for py-libp2p 0.8.1 (see LIBP2P-NOTES.md), each pinned by a test in
tests/node/test_gossip.py:

- Queues: the subscription channel (32) and the per-peer outbound `RpcQueue` (32) drop
  silently when full; the spam limit (10 msg/s per forwarder and topic, own publishes
  included) stops forwarding and publishing silently. Delivery goes through our own
  channel of `delivery_queue_size` (overriding `Pubsub.notify_subscriptions`), outbound
  queues are resized as pubsub registers them (`_SizedPeerQueues`), and the spam limit is
  a config value. Pinned by test_burst_is_not_dropped, test_library_defaults_drop_a_burst.
- "Adaptive gossip" (on by default) resets the heartbeat to at least 30-60 s whenever its
  network-health score is under 0.7, which a 3-node mesh with degree 6 always is; and the
  eclipse protection prunes by IP diversity, meaningless on loopback. Both are off.
- Garbage from a peer on a gossipsub stream (a protobuf DecodeError) escapes
  `Pubsub.stream_handler` and tears down the whole host; a message whose public key does
  not decode makes the signature check raise, which ends a pubsub task with an error and
  so stops pubsub altogether. Both are caught here (`_WeftPubsub.stream_handler`,
  `.push_msg`): the stream is reset, the message dropped and counted against its
  forwarder. Validators run under a catch-all too (a failing one means IGNORE, logged).
  Pinned by test_malformed_pubsub_traffic_is_contained.
- A pubsub stream that the peer refuses to negotiate (its gossip not running yet, or
  stopped and started again) is a `StreamFailure`, which the library never retries: the
  peer is then never sent anything. Retried like a dial failure, for at most
  `PEER_STREAM_RETRY_TIMEOUT` (the library retries those for as long as the peer stays
  connected). Pinned by test_a_peer_whose_gossip_starts_later_is_taken_in.
- Stream handlers must not be removed while the host runs (node/host.py): on exit the
  protocols are switched to handlers that reset their streams, and the pubsub notifee is
  removed from the network.
- The library `BitswapClient` stalls ~1 s on every other repeated fetch from one peer (its
  response reader closes the shared outbound stream while the next want is written to
  it; the session resends after 1 s), stores every block any peer pushes at it, and its
  `stop()` removes stream handlers. `BlockService` therefore speaks bitswap 1.2.0 itself,
  as one request/response exchange per fetch on a fresh stream: all wants in one
  message, `sendDontHave` so a missing block fails fast, nothing stored but what the
  caller pins. A stock `BitswapClient` can fetch from it (test_library_client_fetches).

Errors: `GossipError` (and `GossipClosed`, `GossipMessageTooLarge`, `GossipTimeout`),
`BlockError` (`InvalidCid`, `BlockTooLarge`, `BlockUnavailable`, `BlockMismatch`),
`BackupProtocolError`, plus `node.host.HostError` / `PeerUnreachable` for dialing. No
libp2p exception leaves this module.
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

import msgpack
import trio
from libp2p.abc import IHost, INetStream
from libp2p.bitswap.cid import compute_cid_v1
from libp2p.bitswap.pb.bitswap_pb2 import Message as BitswapMessage
from libp2p.exceptions import ValidationError
from libp2p.host.exceptions import StreamFailure
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.rpc_queue import RpcQueue
from libp2p.tools.anyio_service import background_trio_service

from node.host import Host, HostError, PeerIdentityError, address_of_peer, parse_peer_id
from node.peer_stream import (
    CLOSE_TIMEOUT,
    READ_CHUNK,
    FramedStream,
    PeerStreamError,
    StreamClosed,
    shielded_for,
)
from protocols.errors import DecodeError, InvalidValue
from protocols.types import Address

__all__ = [
    "BACKUP_PROTOCOL",
    "BITSWAP_PROTOCOL",
    "MAX_ANNOUNCEMENT_BYTES",
    "MAX_BLOCK_BYTES",
    "MAX_REPLY_BYTES",
    "BackupProtocolError",
    "BlockError",
    "BlockMismatch",
    "BlockService",
    "BlockStore",
    "BlockTooLarge",
    "BlockUnavailable",
    "GossipClosed",
    "GossipConfig",
    "GossipError",
    "GossipMessage",
    "GossipMessageTooLarge",
    "GossipService",
    "GossipSubscription",
    "GossipTimeout",
    "InvalidCid",
    "LatestAnnouncement",
    "MemoryBlockStore",
    "ServeWatcher",
    "Validator",
    "Verdict",
    "block_cid",
    "decode_backup_request",
    "decode_backup_response",
    "encode_backup_request",
    "encode_backup_response",
    "is_block_cid",
    "open_block_service",
    "open_gossip",
    "request_latest_announcement",
    "serve_backup_requests",
]

logger = logging.getLogger(__name__)

MAX_ANNOUNCEMENT_BYTES: Final = 4096
"""Largest announcement (a gossip message, a `/weft/backup/1` answer), in bytes.

A signed backup record (owner, sequence, root CID, size, signature) is ~200 bytes."""


# ====================================================================== gossip


class GossipError(Exception):
    """Base of the gossip service's errors; a libp2p failure is kept as `__cause__`."""


class GossipClosed(GossipError):
    """The service or the subscription is closed."""


class GossipMessageTooLarge(GossipError):
    """A message to publish exceeds `GossipConfig.max_message_bytes`."""


class GossipTimeout(GossipError):
    """A wait on the mesh ran out of time."""


class Verdict(enum.Enum):
    """What a topic validator says of a message."""

    ACCEPT = "accept"
    """Deliver it and forward it to the mesh."""
    IGNORE = "ignore"
    """Drop it (not delivered, not forwarded) without holding it against the sender:
    e.g. an announcement older than the one we hold."""
    REJECT = "reject"
    """Drop it and count it against the peer that forwarded it: e.g. a forged signature."""


Validator = Callable[[bytes], Verdict]
"""Judges a message's payload. Synchronous and quick: it runs inside the pubsub reader."""


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Gossipsub parameters, chosen for 3-20 peers each publishing a few messages a second.

    py-libp2p defaults in brackets.
    """

    heartbeat_interval: int = 1
    """Seconds between heartbeats (mesh repair, IHAVE gossip, cache shift) [120]."""
    heartbeat_initial_delay: float = 0.1
    """Seconds before the first heartbeat [0.1]."""
    degree: int = 6
    """Target mesh degree D: with 20 peers every message is at most ~2 hops away [set by
    the caller; 6 in go-libp2p]. With fewer peers the mesh is everyone."""
    degree_low: int = 4
    """Below this many mesh peers, graft up to D [go: 5]."""
    degree_high: int = 12
    """Above this many, prune down to D [go: 12]."""
    max_messages_per_topic_per_second: float = 200.0
    """Per (forwarder, topic) and per second, own publishes included; more are delivered
    locally but neither forwarded nor published [10]. A mesh neighbour forwards the
    messages of every peer: 20 peers at a few per second stay far under this."""
    delivery_queue_size: int = 1024
    """Validated messages waiting for the subscriber, per topic [32]. Over it they are
    dropped, counted in `GossipSubscription.dropped` and logged."""
    outbound_queue_size: int = 256
    """RPCs waiting to be written, per peer [32]; over it they are dropped."""
    max_message_bytes: int = MAX_ANNOUNCEMENT_BYTES
    """Largest payload: bigger ones are refused by `publish` and rejected on receipt."""
    seen_ttl: int = 120
    """Seconds a message id is remembered, so that a duplicate is dropped [120]."""

    def __post_init__(self) -> None:
        if not 0 < self.degree_low <= self.degree <= self.degree_high:
            raise ValueError("need 0 < degree_low <= degree <= degree_high")
        if self.heartbeat_interval < 1 or self.heartbeat_initial_delay < 0:
            raise ValueError("heartbeat_interval must be >= 1 s, the initial delay >= 0")
        for name in ("delivery_queue_size", "outbound_queue_size", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.max_messages_per_topic_per_second <= 0 or self.seen_ttl < 1:
            raise ValueError("rate limit and seen_ttl must be positive")


@dataclass(frozen=True, slots=True)
class GossipMessage:
    """A validated message from another node.

    `origin` is the peer id that published it and signed it (checked by pubsub's strict
    signing); `origin_address` its Ethereum address. The forwarder may be someone else.
    """

    topic: str
    data: bytes
    origin: ID
    origin_address: Address
    seqno: int


@dataclass(slots=True)
class _Topic:
    validator: Validator
    send: trio.MemorySendChannel[GossipMessage]
    dropped: int = 0


class GossipSubscription:
    """Validated messages of one topic, in arrival order; from `GossipService.subscribe`.

    Iterate it (`async for message in subscription`) or call `receive()`. `aclose()`
    unsubscribes; iteration then ends.
    """

    __slots__ = ("_receive", "_service", "_state", "topic")

    def __init__(
        self,
        service: GossipService,
        topic: str,
        state: _Topic,
        receive: trio.MemoryReceiveChannel[GossipMessage],
    ) -> None:
        self._service = service
        self._state = state
        self._receive = receive
        self.topic = topic

    @property
    def dropped(self) -> int:
        """Validated messages dropped because this subscription's queue was full."""
        return self._state.dropped

    async def receive(self) -> GossipMessage:
        """The next validated message; `GossipClosed` once unsubscribed or stopped."""
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise GossipClosed(f"subscription to {self.topic!r} is closed") from None

    def __aiter__(self) -> AsyncIterator[GossipMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[GossipMessage]:
        while True:
            try:
                message = await self.receive()
            except GossipClosed:
                return
            yield message

    async def aclose(self) -> None:
        """Unsubscribe (idempotent). Messages already queued can still be received."""
        await self._service._unsubscribe(self.topic, self._state)

    async def __aenter__(self) -> GossipSubscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _SizedPeerQueues(dict[ID, RpcQueue]):
    """`Pubsub.peer_queues` that resizes each per-peer `RpcQueue` as pubsub registers it.

    py-libp2p 0.8.1 creates them as `RpcQueue()` (32 RPCs, a default bound at definition
    time) inside `Pubsub._handle_new_peer` and stores them here before any use.
    """

    def __init__(self, max_size: int) -> None:
        super().__init__()
        self.max_size = max_size

    def __setitem__(self, peer_id: ID, queue: RpcQueue) -> None:
        inner = getattr(queue, "_queue", None)
        if inner is not None and hasattr(inner, "max_size"):
            inner.max_size = self.max_size
        else:  # a later py-libp2p: the library bound applies; say so once per peer
            logger.warning("cannot resize the pubsub queue of %s", peer_id)
        super().__setitem__(peer_id, queue)


_IGNORED_MEMORY: Final = 4096
"""Ids of ignored messages remembered between validation and forwarding."""
PEER_STREAM_RETRY_TIMEOUT: Final = 30.0
"""Seconds to keep trying to open the pubsub stream to a connected peer (back-off 0.5 s
doubling to 10 s: about six tries)."""


class _WeftPubsub(Pubsub):
    """`Pubsub` with three-way validation and our own delivery channels."""

    def __init__(self, host: IHost, router: _WeftGossipSub, config: GossipConfig) -> None:
        super().__init__(host, router, seen_ttl=config.seen_ttl, strict_signing=True)
        self.peer_queues = _SizedPeerQueues(config.outbound_queue_size)
        self.weft_config = config
        self.weft_topics: dict[str, _Topic] = {}
        self._ignored: OrderedDict[bytes, None] = OrderedDict()

    # Registered by Pubsub.__init__ for the router's protocols. The library version lets a
    # protobuf DecodeError (garbage from a peer) escape, which tears down the whole host.
    async def stream_handler(self, stream: INetStream) -> None:
        try:
            await super().stream_handler(stream)
        except Exception as exc:
            logger.info("pubsub stream from %s failed: %r", stream.muxed_conn.peer_id, exc)
            with shielded_for(CLOSE_TIMEOUT), suppress(Exception):
                await stream.reset()

    # Opens the pubsub stream to a connected peer. The library retries (with back-off, while
    # the peer stays connected) only a SwarmException; a negotiation the peer refuses is a
    # StreamFailure, after which the peer is never registered and never hears from us: a
    # peer whose gossip is not running yet (it starts after the connection, or again on a
    # host whose earlier gossip stopped) would stay deaf to ours. Retried here too.
    async def _handle_new_peer(self, peer_id: ID) -> None:
        try:
            await super()._handle_new_peer(peer_id)
        except StreamFailure as exc:
            raise SwarmException(str(exc)) from exc

    # The library retries for as long as the peer stays connected; a peer that never runs
    # gossip would be asked every 10 s for ever. Bounded here.
    async def _handle_new_peer_with_retry(self, peer_id: ID, timeout: float | None = None) -> None:
        bound = PEER_STREAM_RETRY_TIMEOUT if timeout is None else timeout
        await super()._handle_new_peer_with_retry(peer_id, bound)

    # Run as a pubsub task per received message. In the library version an exception (e.g.
    # an undecodable public key in a message, from its signature check) ends the task
    # with an error, which stops the whole pubsub service.
    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        try:
            await super().push_msg(msg_forwarder, msg)
        except Exception as exc:
            if msg_forwarder == self.my_id:
                raise
            logger.info("dropping a message forwarded by %s: %r", msg_forwarder, exc)
            scorer = getattr(self.router, "scorer", None)
            if scorer is not None:
                for topic in msg.topicIDs:
                    scorer.on_invalid_message(msg_forwarder, topic)

    # Called by Pubsub.push_msg for every new message (own publishes included), after the
    # seen-check and the signature check; a ValidationError counts against the forwarder.
    async def validate_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        verdict = self._verdict(msg_forwarder, msg)
        if verdict is Verdict.REJECT:
            raise ValidationError("rejected by the topic validator")
        if verdict is Verdict.IGNORE:
            msg_id = self.get_message_id(msg)
            self._ignored[msg_id] = None
            while len(self._ignored) > _IGNORED_MEMORY:
                self._ignored.popitem(last=False)

    def take_ignored(self, msg: rpc_pb2.Message) -> bool:
        """True (once) if `msg` was judged IGNORE."""
        msg_id = self.get_message_id(msg)
        if msg_id in self._ignored:
            del self._ignored[msg_id]
            return True
        return False

    def _verdict(self, forwarder: ID, msg: rpc_pb2.Message) -> Verdict:
        if forwarder == self.my_id:
            return Verdict.ACCEPT  # our own publish: size checked by GossipService.publish
        if len(msg.data) > self.weft_config.max_message_bytes:
            return Verdict.REJECT
        try:
            address_of_peer(ID(msg.from_id))
        except Exception:  # not a secp256k1 peer id: not a Weft node
            return Verdict.REJECT
        verdicts = []
        for topic in msg.topicIDs:
            state = self.weft_topics.get(topic)
            if state is None:
                continue
            try:
                verdict = state.validator(msg.data)
            except Exception:
                logger.exception("validator of topic %r failed; ignoring the message", topic)
                verdict = Verdict.IGNORE
            if not isinstance(verdict, Verdict):
                logger.error("validator of topic %r returned %r", topic, verdict)
                verdict = Verdict.IGNORE
            verdicts.append(verdict)
        if not verdicts:
            return Verdict.IGNORE  # unsubscribed meanwhile
        if Verdict.REJECT in verdicts:
            return Verdict.REJECT
        if Verdict.IGNORE in verdicts:
            return Verdict.IGNORE
        return Verdict.ACCEPT

    # Called by Pubsub.push_msg after validation, before forwarding; the library version
    # feeds 32-slot channels that drop silently.
    def notify_subscriptions(self, publish_message: rpc_pb2.Message) -> None:
        msg = publish_message
        if self.get_message_id(msg) in self._ignored:
            return
        origin = ID(msg.from_id)
        if origin == self.my_id:
            return
        try:
            origin_address = address_of_peer(origin)
        except PeerIdentityError:  # validated above; kept for totality
            return
        seqno = int.from_bytes(msg.seqno[:8], "big")
        for topic in msg.topicIDs:
            state = self.weft_topics.get(topic)
            if state is None:
                continue
            message = GossipMessage(topic, bytes(msg.data), origin, origin_address, seqno)
            try:
                state.send.send_nowait(message)
            except trio.WouldBlock:
                state.dropped += 1
                logger.warning("subscription to %r is full: message dropped", topic)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass


class _WeftGossipSub(GossipSub):
    """`GossipSub` that does not forward (nor cache for IWANT) messages judged IGNORE."""

    async def publish(self, msg_forwarder: ID, pubsub_msg: rpc_pb2.Message) -> None:
        pubsub = self.pubsub
        if isinstance(pubsub, _WeftPubsub) and pubsub.take_ignored(pubsub_msg):
            return
        await super().publish(msg_forwarder, pubsub_msg)


class GossipService:
    """Gossipsub on a host; obtain one from `open_gossip`."""

    __slots__ = ("_closed", "_pubsub", "_router", "config")

    def __init__(self, pubsub: _WeftPubsub, router: _WeftGossipSub, config: GossipConfig) -> None:
        self._pubsub = pubsub
        self._router = router
        self._closed = False
        self.config = config

    def _check_open(self) -> None:
        if self._closed or not self._pubsub.manager.is_running:
            raise GossipClosed("the gossip service is not running")

    async def subscribe(self, topic: str, validator: Validator) -> GossipSubscription:
        """Join `topic`; every message on it is judged by `validator` before delivery.

        Returns the subscription (its queue holds `config.delivery_queue_size` messages).
        Raises `GossipError` if already subscribed to `topic` or if pubsub fails,
        `GossipClosed` if the service is not running. If cancelled, the subscription is
        withdrawn locally (peers may have heard of it: they will send, we will ignore).
        """
        self._check_open()
        if not isinstance(topic, str) or not topic or len(topic.encode()) > 256:
            raise GossipError(f"not a usable topic: {topic!r}")
        if topic in self._pubsub.weft_topics:
            raise GossipError(f"already subscribed to {topic!r}")
        send, receive = trio.open_memory_channel[GossipMessage](self.config.delivery_queue_size)
        state = _Topic(validator, send)
        self._pubsub.weft_topics[topic] = state
        try:
            await self._pubsub.subscribe(topic)
        except BaseException as exc:
            self._pubsub.weft_topics.pop(topic, None)
            send.close()
            if isinstance(exc, Exception):
                raise GossipError(f"cannot subscribe to {topic!r}: {exc!r}") from exc
            raise
        return GossipSubscription(self, topic, state, receive)

    async def _unsubscribe(self, topic: str, state: _Topic) -> None:
        if self._pubsub.weft_topics.get(topic) is not state:
            return
        del self._pubsub.weft_topics[topic]
        state.send.close()
        if self._closed or not self._pubsub.manager.is_running:
            return
        try:
            await self._pubsub.unsubscribe(topic)
        except Exception as exc:
            raise GossipError(f"cannot unsubscribe from {topic!r}: {exc!r}") from exc

    async def publish(self, topic: str, data: bytes) -> None:
        """Sign and send `data` on `topic` to the mesh (or, unsubscribed, fanout) peers.

        Returns once it is queued for every peer; delivery is best effort. Not validated
        locally, and not delivered to our own subscription. Raises `GossipMessageTooLarge`
        above `config.max_message_bytes`, `GossipClosed` if the service is not running,
        `GossipError` if pubsub fails.
        """
        self._check_open()
        if not isinstance(data, bytes | bytearray):
            raise GossipError("data must be bytes")
        if len(data) > self.config.max_message_bytes:
            raise GossipMessageTooLarge(
                f"{len(data)} bytes exceeds the limit of {self.config.max_message_bytes}"
            )
        try:
            await self._pubsub.publish(topic, bytes(data))
        except Exception as exc:
            raise GossipError(f"cannot publish on {topic!r}: {exc!r}") from exc

    def mesh_peers(self, topic: str) -> frozenset[ID]:
        """Peers that this node forwards `topic` to (its mesh)."""
        return frozenset(self._router.mesh.get(topic, ()))

    def subscribers(self, topic: str) -> frozenset[ID]:
        """Connected peers known to be subscribed to `topic`."""
        return frozenset(self._pubsub.peer_topics.get(topic, ()))

    async def wait_for_mesh(self, topic: str, peer_id: ID | str, timeout: float) -> None:
        """Wait until `peer_id` is in this node's mesh for `topic` (we are subscribed).

        Raises `GossipTimeout` after `timeout` seconds, `GossipClosed` if not running.
        """
        self._check_open()
        pid = parse_peer_id(peer_id) if isinstance(peer_id, str) else peer_id
        try:
            await self._router.wait_for_mesh(pid, topic, timeout=timeout)
        except trio.TooSlowError:
            raise GossipTimeout(f"{pid} not in the mesh of {topic!r} after {timeout} s") from None

    def invalid_messages_from(self, peer_id: ID, topic: str) -> float:
        """How many messages forwarded by `peer_id` on `topic` were rejected (decays with
        the heartbeat only if score decay is configured; it is not by default)."""
        scorer = self._router.scorer
        if scorer is None:
            return 0.0
        by_topic = scorer.invalid_messages.get(peer_id)
        return by_topic.get(topic, 0.0) if by_topic is not None else 0.0


def _new_router(config: GossipConfig) -> _WeftGossipSub:
    return _WeftGossipSub(
        # v1.1 only: v1.2 sends an IDONTWANT to every mesh peer for every message, which
        # for ~200-byte announcements doubles the RPCs without saving anything.
        protocols=[PROTOCOL_ID_V11],
        degree=config.degree,
        degree_low=config.degree_low,
        degree_high=config.degree_high,
        heartbeat_interval=config.heartbeat_interval,
        heartbeat_initial_delay=config.heartbeat_initial_delay,
        max_messages_per_topic_per_second=config.max_messages_per_topic_per_second,
        adaptive_gossip_enabled=False,
        eclipse_protection_enabled=False,
    )


def _unwrap(group: BaseExceptionGroup[BaseException], inner: BaseException | None) -> None:
    """Re-raise `inner` alone if it is all that `group` holds (nurseries wrap it)."""
    if inner is not None:
        _, rest = group.split(lambda e: e is inner)
        if rest is None:
            raise inner from inner.__cause__


@asynccontextmanager
async def open_gossip(
    host: Host, config: GossipConfig | None = None
) -> AsyncIterator[GossipService]:
    """Run gossipsub on `host` (a running `node.host.Host`) until the block exits.

    Peers connected before or after are taken in. Raises `GossipError` if pubsub cannot
    start or stops on its own (the body is then cancelled). On exit every subscription
    ends and the gossipsub protocols refuse new streams.
    """
    config = config or GossipConfig()
    lib = host.libp2p
    network = lib.get_network()
    notifees_before = list(getattr(network, "notifees", ()))
    try:
        router = _new_router(config)
        pubsub = _WeftPubsub(lib, router, config)
    except Exception as exc:
        raise GossipError(f"cannot create gossipsub: {exc!r}") from exc
    ours = [n for n in getattr(network, "notifees", ()) if n not in notifees_before]
    service = GossipService(pubsub, router, config)
    inner: BaseException | None = None
    try:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(background_trio_service(pubsub))
            await stack.enter_async_context(background_trio_service(router))
            await pubsub.wait_until_ready()
            for peer_id in list(network.connections):
                pubsub.manager.run_task(pubsub.ensure_peer_stream, peer_id)
            try:
                yield service
            except BaseException as exc:
                inner = exc
                raise
            finally:
                service._closed = True
                for state in list(pubsub.weft_topics.values()):
                    state.send.close()
                pubsub.weft_topics.clear()
    except BaseExceptionGroup as group:
        _unwrap(group, inner)
        failures = group.subgroup(lambda e: e is not inner and not isinstance(e, trio.Cancelled))
        if failures is not None:
            raise GossipError(f"gossipsub stopped: {failures!r}") from group
        raise
    except Exception as exc:
        if exc is inner:
            raise
        raise GossipError(f"gossipsub failed: {exc!r}") from exc
    finally:
        for notifee in ours:
            with suppress(Exception):
                network.remove_notifee(notifee)
        for protocol in router.get_protocols():
            host.remove_handler(protocol)


# ====================================================================== blocks

MAX_BLOCK_BYTES: Final = 512 * 1024
"""Largest block served or accepted (LIBP2P-NOTES.md, "Bitswap")."""
BITSWAP_PROTOCOL: Final = "/ipfs/bitswap/1.2.0"
FETCH_TIMEOUT: Final = 10.0
"""Default seconds a whole `BlockService.fetch` may take."""
PEER_FETCH_TIMEOUT: Final = 5.0
"""Default seconds one peer may take to answer, when any connected peer will do."""
MAX_FETCH_PEERS: Final = 16
"""Connected peers asked, in turn, when no peer is given."""
MAX_WANTS: Final = 1024
"""Most CIDs in one fetch, and in one inbound wantlist."""
MAX_REPLY_BYTES: Final = 4 * 1024 * 1024
"""Most bytes of blocks sent in answer to one inbound wantlist (after its repeated CIDs are
merged); a wanted block that would go over is answered as not held (DontHave, when the
want asks for one). A fetch asks in parts of `_WANTS_PER_MESSAGE` CIDs, whose blocks always
fit, pipelined on one stream, so that a whole backup (up to MAX_SEALED_BYTES, 16 MiB, in
65 children) comes in one fetch."""
_WANTS_PER_MESSAGE: Final = MAX_REPLY_BYTES // MAX_BLOCK_BYTES
"""CIDs in one outbound wantlist: 8 blocks of at most `MAX_BLOCK_BYTES` fit the cap."""
SERVE_IDLE_TIMEOUT: Final = 30.0
"""Seconds a served bitswap stream may take to bring its next request and have it
answered; after that it is closed."""
_MAX_WANT_MESSAGE: Final = 128 * 1024
"""Largest inbound bitswap request (1024 wants of ~40 bytes fit)."""
_MAX_BLOCK_MESSAGE: Final = MAX_BLOCK_BYTES + 64 * 1024
"""Largest bitswap response accepted: one maximal block, or small ones up to 60 kB
(py-libp2p's batching), plus framing."""
_WRITE_BYTES: Final = 1024 * 1024
"""Served blocks are coalesced into writes of about this size (one write costs ~0.5 ms)."""
_CID_PREFIX: Final = bytes((0x01, 0x55, 0x12, 0x20))
"""CIDv1, codec raw (0x55), multihash sha2-256 (0x12) of 32 bytes."""
_CID_BYTES: Final = len(_CID_PREFIX) + 32


class BlockError(Exception):
    """Base of the block service's errors."""


class InvalidCid(BlockError):
    """Not a CIDv1 raw sha2-256 in binary form."""


class BlockTooLarge(BlockError):
    """A block above `MAX_BLOCK_BYTES`."""


class BlockUnavailable(BlockError):
    """Blocks not obtained: every peer asked lacked them, failed, or ran out of time.

    `missing` lists their CIDs; `details` says what each peer did. `every_peer_lacks` is
    True when at least one peer was asked and every peer asked answered in full, saying
    (DontHave) that it lacks what is missing: no timeout, no failure, no stream cut short.
    """

    def __init__(
        self,
        message: str,
        missing: Iterable[bytes],
        details: Sequence[str] = (),
        *,
        every_peer_lacks: bool = False,
    ) -> None:
        super().__init__(message)
        self.missing = tuple(missing)
        self.details = tuple(details)
        self.every_peer_lacks = every_peer_lacks


class BlockMismatch(BlockError):
    """The peer sent bytes that match none of the CIDs asked for (or a block too large)."""


def block_cid(data: bytes) -> bytes:
    """The CID (binary CIDv1, raw, sha2-256) of a block."""
    return compute_cid_v1(bytes(data))


def is_block_cid(cid: object) -> bool:
    """True for a binary CIDv1 raw sha2-256, the only kind of CID this module uses."""
    return isinstance(cid, bytes) and len(cid) == _CID_BYTES and cid.startswith(_CID_PREFIX)


def _check_cid(cid: object) -> bytes:
    if not is_block_cid(cid):
        raise InvalidCid(f"not a CIDv1 raw sha2-256: {cid!r:.80}")
    assert isinstance(cid, bytes)
    return cid


class BlockStore(Protocol):
    """Where pinned blocks live, keyed by binary CID. Implementations: `MemoryBlockStore`;
    a SQLite one later. The service checks CIDs and sizes before calling `put`."""

    async def get(self, cid: bytes) -> bytes | None:
        """The block, or None if it is not pinned."""
        ...

    async def put(self, cid: bytes, data: bytes) -> None:
        """Pin `data` under `cid` (idempotent)."""
        ...

    async def delete(self, cid: bytes) -> None:
        """Unpin `cid` (no error if absent)."""
        ...


@runtime_checkable
class ServeWatcher(Protocol):
    """A `BlockStore` that wants to know what was sent to whom: if the store given to
    `open_block_service` has this method, the service calls it for every block it served,
    once the write that carried the block is done (`node.backup.ServedBlocks`)."""

    def block_served(self, cid: bytes, peer: Address) -> None:
        """`cid` was sent to the authenticated peer `peer` (quick; must not block)."""
        ...


class MemoryBlockStore:
    """A `BlockStore` in a dict (tests, and until the SQLite store exists)."""

    __slots__ = ("_blocks",)

    def __init__(self) -> None:
        self._blocks: dict[bytes, bytes] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, cid: object) -> bool:
        return cid in self._blocks

    async def get(self, cid: bytes) -> bytes | None:
        return self._blocks.get(cid)

    async def put(self, cid: bytes, data: bytes) -> None:
        self._blocks[cid] = data

    async def delete(self, cid: bytes) -> None:
        self._blocks.pop(cid, None)


# ---------------------------------------------------------------- bitswap framing


class _VarintFrames:
    """Splits a byte stream into unsigned-varint-prefixed frames (bitswap's framing)."""

    __slots__ = ("_buffer", "_max")

    def __init__(self, max_frame: int) -> None:
        self._buffer = bytearray()
        self._max = max_frame

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Frames completed by `data`; `DecodeError` on a bad or oversized length."""
        buffer = self._buffer
        buffer += data
        frames: list[bytes] = []
        while True:
            size = 0
            shift = 0
            pos = 0
            while True:
                if pos >= len(buffer):
                    return frames
                byte = buffer[pos]
                pos += 1
                size |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
                if shift > 63:
                    raise DecodeError("varint length prefix too long")
            if size > self._max:
                raise DecodeError(f"message of {size} bytes exceeds {self._max}")
            if len(buffer) - pos < size:
                return frames
            frames.append(bytes(buffer[pos : pos + size]))
            del buffer[: pos + size]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _bitswap_frame(message: BitswapMessage) -> bytes:
    body = message.SerializeToString()
    return _varint(len(body)) + body


def _parse_bitswap(frame: bytes) -> BitswapMessage:
    message = BitswapMessage()
    try:
        message.ParseFromString(frame)
    except Exception as exc:  # protobuf DecodeError
        raise DecodeError(f"not a bitswap message: {exc}") from None
    return message


async def _read_some(stream: FramedStream) -> bytes:
    """Bytes from the raw libp2p stream under `stream`; b"" at its end, whatever the cause."""
    try:
        data: bytes = await stream.raw.read(READ_CHUNK)
    except Exception as exc:  # EOF, reset, broken connection: libp2p raises assorted types
        logger.debug("read from %r ended: %r", stream, exc)
        return b""
    return data or b""


async def _write(stream: FramedStream, data: bytes) -> None:
    try:
        await stream.raw.write(data)
    except Exception as exc:
        raise StreamClosed(f"write to {stream!r} failed: {exc!r}") from exc


# ---------------------------------------------------------------- service


def _take_answer(
    peer_id: ID | str,
    message: BitswapMessage,
    pending: set[bytes],
    found: dict[bytes, bytes],
    lacking: set[bytes],
) -> None:
    """Take the blocks and DontHaves of one response; `BlockMismatch` for a block that is
    too large or matches no CID asked for."""
    blocks = [bytes(b.data) for b in message.payload] + [bytes(b) for b in message.blocks]
    for data in blocks:
        if len(data) > MAX_BLOCK_BYTES:
            raise BlockMismatch(f"{peer_id} sent a block of {len(data)} bytes")
        cid = block_cid(data)
        if cid in pending:
            pending.discard(cid)
            found[cid] = data
        elif cid not in found:
            raise BlockMismatch(
                f"{peer_id} sent {len(data)} bytes that match none of the CIDs asked for"
            )
    for presence in message.blockPresences:
        cid = bytes(presence.cid)
        if presence.type == BitswapMessage.DontHave and cid in pending:
            pending.discard(cid)
            lacking.add(cid)


class BlockService:
    """Serves pinned blocks over bitswap and fetches blocks; obtain one from
    `open_block_service`."""

    __slots__ = ("_host", "_store", "_watcher")

    def __init__(self, host: Host, store: BlockStore) -> None:
        self._host = host
        self._store = store
        self._watcher = store if isinstance(store, ServeWatcher) else None

    @property
    def store(self) -> BlockStore:
        return self._store

    async def pin(self, data: bytes) -> bytes:
        """Keep `data` and serve it; returns its CID. `BlockTooLarge` above the limit."""
        if len(data) > MAX_BLOCK_BYTES:
            raise BlockTooLarge(f"block of {len(data)} bytes exceeds {MAX_BLOCK_BYTES}")
        cid = block_cid(data)
        await self._store.put(cid, bytes(data))
        return cid

    async def unpin(self, cid: bytes) -> None:
        """Stop keeping and serving `cid`. `InvalidCid` if malformed."""
        await self._store.delete(_check_cid(cid))

    async def fetch(
        self,
        cids: Sequence[bytes],
        peer_id: ID | str | None = None,
        *,
        timeout: float = FETCH_TIMEOUT,
        peer_timeout: float = PEER_FETCH_TIMEOUT,
    ) -> dict[bytes, bytes]:
        """Get the blocks `cids` from `peer_id`, or from connected peers in turn.

        The wants go out at once on a fresh stream, in wantlists of `_WANTS_PER_MESSAGE`
        (so that each answer fits `MAX_REPLY_BYTES`); the peer answers with the blocks and
        a DontHave for each block it lacks. Every block's bytes are hashed and must be one
        of `cids`. Nothing is pinned: the caller decides. Returns {cid: data} for every
        CID. Blocks we pinned ourselves are not fetched.

        Raises `InvalidCid` (nothing sent), `BlockUnavailable` when blocks are still
        missing after every peer was asked or after `timeout` seconds (each peer gets at
        most `peer_timeout` when none is given), `BlockMismatch` when `peer_id` sent bytes
        matching none of the CIDs, `node.host.PeerUnreachable` / `HostError` when
        `peer_id` cannot be reached. Cancelling abandons the fetch.
        """
        wanted = list(dict.fromkeys(_check_cid(c) for c in cids))
        if len(wanted) > MAX_WANTS:
            raise BlockError(f"at most {MAX_WANTS} CIDs per fetch")
        found: dict[bytes, bytes] = {}
        for cid in wanted:
            data = await self._store.get(cid)
            if data is not None:
                found[cid] = data
        missing = [c for c in wanted if c not in found]
        if not missing:
            return found
        details: list[str] = []
        complete: list[bool] = []  # per peer asked: it answered every want
        with trio.move_on_after(timeout) as scope:
            if peer_id is not None:
                lacking, unanswered = await self._fetch_from(peer_id, missing, found)
                complete.append(not unanswered)
                if lacking:
                    details.append(f"{peer_id}: lacks {len(lacking)}")
                if unanswered:
                    details.append(f"{peer_id}: closed with {len(unanswered)} unanswered")
            else:
                await self._fetch_from_any(missing, found, peer_timeout, details, complete)
        if scope.cancelled_caught:
            details.append(f"timed out after {timeout} s")
        still = [c for c in wanted if c not in found]
        if still:
            raise BlockUnavailable(
                f"{len(still)} of {len(wanted)} blocks unavailable: {'; '.join(details)}",
                still,
                details,
                every_peer_lacks=bool(complete) and all(complete) and not scope.cancelled_caught,
            )
        return found

    async def fetch_one(
        self, cid: bytes, peer_id: ID | str | None = None, *, timeout: float = FETCH_TIMEOUT
    ) -> bytes:
        """One block; see `fetch`."""
        return (await self.fetch([cid], peer_id, timeout=timeout))[cid]

    async def _fetch_from_any(
        self,
        missing: list[bytes],
        found: dict[bytes, bytes],
        peer_timeout: float,
        details: list[str],
        complete: list[bool],
    ) -> None:
        network = self._host.libp2p.get_network()
        peers = [p for p in list(network.connections) if p != self._host.peer_id]
        if not peers:
            details.append("no connected peer")
        for peer in peers[:MAX_FETCH_PEERS]:
            want = [c for c in missing if c not in found]
            if not want:
                return
            answered = False
            with trio.move_on_after(peer_timeout) as scope:
                try:
                    lacking, unanswered = await self._fetch_from(peer, want, found)
                except (BlockError, HostError) as exc:
                    details.append(f"{peer}: {exc}")
                else:
                    answered = not unanswered
                    if lacking:
                        details.append(f"{peer}: lacks {len(lacking)}")
                    if unanswered:
                        details.append(f"{peer}: closed with {len(unanswered)} unanswered")
            if scope.cancelled_caught:
                details.append(f"{peer}: no answer within {peer_timeout} s")
            complete.append(answered)

    async def _fetch_from(
        self, peer_id: ID | str, wanted: list[bytes], found: dict[bytes, bytes]
    ) -> tuple[set[bytes], set[bytes]]:
        """Ask one peer for `wanted` on a fresh stream, in wantlists of
        `_WANTS_PER_MESSAGE` written at once; blocks go into `found` as they arrive (so
        they survive a timeout). Returns the CIDs the peer said it lacks, and those left
        unanswered when it closed the stream."""
        stream = await self._host.new_stream(peer_id, BITSWAP_PROTOCOL)
        try:
            requests: list[bytes] = []
            for start in range(0, len(wanted), _WANTS_PER_MESSAGE):
                request = BitswapMessage()
                for cid in wanted[start : start + _WANTS_PER_MESSAGE]:
                    entry = request.wantlist.entries.add()
                    entry.block = cid
                    entry.priority = 1
                    entry.wantType = BitswapMessage.Wantlist.Block
                    entry.sendDontHave = True
                requests.append(_bitswap_frame(request))
            await _write(stream, b"".join(requests))
            pending = set(wanted)
            lacking: set[bytes] = set()
            frames = _VarintFrames(_MAX_BLOCK_MESSAGE)
            while pending:
                data = await _read_some(stream)
                if not data:
                    logger.debug("%s closed with %d blocks pending", peer_id, len(pending))
                    return lacking, pending
                try:
                    messages = [_parse_bitswap(f) for f in frames.feed(data)]
                except DecodeError as exc:
                    raise BlockMismatch(f"{peer_id} broke the bitswap framing: {exc}") from None
                for message in messages:
                    _take_answer(peer_id, message, pending, found, lacking)
            return lacking, set()
        except StreamClosed as exc:  # our request could not be written
            raise BlockUnavailable(f"{peer_id}: {exc}", wanted) from exc
        finally:
            await stream.close()

    async def serve(self, stream: FramedStream) -> None:
        """Answer bitswap wantlists on one inbound stream until it ends or idles.

        Each wantlist is answered on its own: repeated CIDs are merged, blocks we hold are
        sent (one per message) up to `MAX_REPLY_BYTES` in all, the rest get a DontHave
        when asked for (`sendDontHave`, or a want-have). Blocks pushed at us are ignored.
        A malformed or oversized message resets the stream.
        """
        frames = _VarintFrames(_MAX_WANT_MESSAGE)
        while True:
            with trio.move_on_after(SERVE_IDLE_TIMEOUT):
                data = await _read_some(stream)
                if not data:
                    return
                try:
                    messages = [_parse_bitswap(f) for f in frames.feed(data)]
                except DecodeError as exc:
                    logger.info("bad bitswap request from %r: %s", stream, exc)
                    await stream.reset()
                    return
                for message in messages:
                    if len(message.wantlist.entries) > MAX_WANTS:
                        logger.info("bitswap request of %r too long", stream)
                        await stream.reset()
                        return
                    await self._answer(message, stream)
                continue
            logger.debug("%r idle for %s s; closing", stream, SERVE_IDLE_TIMEOUT)
            return

    async def _answer(self, message: BitswapMessage, stream: FramedStream) -> None:
        """Send the blocks and presences `message` asks for: each CID once, at most
        `MAX_REPLY_BYTES` of blocks (a block over that is answered as not held), ~1 MiB
        per write at most."""
        wants: dict[bytes, tuple[bool, bool]] = {}  # cid: (block wanted, tell if lacking)
        for entry in message.wantlist.entries:
            if entry.cancel:
                continue
            cid = bytes(entry.block)
            block = entry.wantType != BitswapMessage.Wantlist.Have
            tell = entry.sendDontHave or not block
            was_block, was_told = wants.get(cid, (False, False))
            wants[cid] = (was_block or block, was_told or tell)
        budget = MAX_REPLY_BYTES
        frames: list[bytes] = []
        carried: list[bytes] = []  # the CIDs of the blocks in `frames`
        size = 0
        presences = BitswapMessage()
        for cid, (block, tell) in wants.items():
            data = await self._store.get(cid) if is_block_cid(cid) else None
            if data is not None and len(data) > MAX_BLOCK_BYTES:
                logger.error("pinned block %s is over the limit; not served", cid.hex())
                data = None
            if data is None or (block and len(data) > budget):
                if tell:
                    presence = presences.blockPresences.add()
                    presence.cid = cid
                    presence.type = BitswapMessage.DontHave
            elif not block:
                presence = presences.blockPresences.add()
                presence.cid = cid
                presence.type = BitswapMessage.Have
            else:
                budget -= len(data)
                reply = BitswapMessage()
                payload = reply.payload.add()
                payload.prefix = _CID_PREFIX
                payload.data = data
                frames.append(_bitswap_frame(reply))
                carried.append(cid)
                size += len(frames[-1])
                if size >= _WRITE_BYTES:
                    await self._send(stream, frames, carried)
                    frames, carried, size = [], [], 0
        if presences.blockPresences:
            frames.append(_bitswap_frame(presences))
        if frames:
            await self._send(stream, frames, carried)

    async def _send(self, stream: FramedStream, frames: list[bytes], carried: list[bytes]) -> None:
        await _write(stream, b"".join(frames))
        if self._watcher is not None:
            for cid in carried:
                self._watcher.block_served(cid, stream.remote_address)


class _Handlers:
    """Inbound stream handlers of one service: cancelled together when it stops."""

    __slots__ = ("_scopes",)

    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()

    def wrap(
        self, handler: Callable[[FramedStream], Awaitable[None]]
    ) -> Callable[[FramedStream], Awaitable[None]]:
        async def run(stream: FramedStream) -> None:
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    await handler(stream)
                finally:
                    self._scopes.discard(scope)

        return run

    def cancel_all(self) -> None:
        for scope in list(self._scopes):
            scope.cancel()


@asynccontextmanager
async def open_block_service(
    host: Host, store: BlockStore | None = None
) -> AsyncIterator[BlockService]:
    """Serve the blocks of `store` (default: a new `MemoryBlockStore`) over bitswap 1.2.0
    on `host` until the block exits; then the protocol refuses new streams and streams
    being served are cut."""
    service = BlockService(host, store if store is not None else MemoryBlockStore())
    handlers = _Handlers()
    host.set_handler(BITSWAP_PROTOCOL, handlers.wrap(service.serve))
    try:
        yield service
    finally:
        host.remove_handler(BITSWAP_PROTOCOL)
        handlers.cancel_all()


# ====================================================================== /weft/backup/1

BACKUP_PROTOCOL: Final = "/weft/backup/1"
BACKUP_WIRE_VERSION: Final = 1
MAX_BACKUP_REQUEST_BYTES: Final = 64
"""Largest request payload: `[1, <20-byte owner>]` packs to 24 bytes."""
MAX_BACKUP_RESPONSE_BYTES: Final = MAX_ANNOUNCEMENT_BYTES + 16
BACKUP_REQUEST_TIMEOUT: Final = 5.0
"""Default seconds a request may take, dialing excluded."""
BACKUP_IDLE_TIMEOUT: Final = 30.0
"""Seconds a served `/weft/backup/1` stream may stay silent before it is closed."""
MAX_BACKUP_REQUESTS_PER_STREAM: Final = 1024

LatestAnnouncement = Callable[[Address], Awaitable[bytes | None]]
"""The latest announcement held for an owner (encoded, at most `MAX_ANNOUNCEMENT_BYTES`),
or None if none is held."""


class BackupProtocolError(Exception):
    """The peer did not answer a `/weft/backup/1` request properly: it closed the stream,
    sent a malformed answer, or ran out of time."""


def _unpack(payload: bytes, max_bytes: int) -> list[Any]:
    if len(payload) > max_bytes:
        raise DecodeError(f"{len(payload)} bytes exceeds {max_bytes}")
    try:
        value = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=0,
            max_array_len=2,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises assorted ValueError subclasses
        raise DecodeError(f"not msgpack: {exc}") from None
    if type(value) is not list or len(value) != 2 or value[0] != BACKUP_WIRE_VERSION:
        raise DecodeError("expected [1, body]")
    if type(value[0]) is not int:
        raise DecodeError("version must be an int")
    return value


def encode_backup_request(owner: Address) -> bytes:
    """`[1, owner]` in msgpack."""
    return msgpack.packb([BACKUP_WIRE_VERSION, owner.raw], use_bin_type=True)  # type: ignore[no-any-return]


def decode_backup_request(payload: bytes) -> Address:
    """The owner asked about; `DecodeError` for anything but the canonical encoding."""
    value = _unpack(payload, MAX_BACKUP_REQUEST_BYTES)
    owner = value[1]
    if type(owner) is not bytes:
        raise DecodeError("owner must be bin")
    try:
        address = Address(owner)
    except InvalidValue as exc:
        raise DecodeError(f"owner: {exc}") from None
    if encode_backup_request(address) != payload:
        raise DecodeError("not canonical")
    return address


def encode_backup_response(announcement: bytes | None) -> bytes:
    """`[1, announcement or nil]` in msgpack. `ValueError` above `MAX_ANNOUNCEMENT_BYTES`."""
    if announcement is not None and len(announcement) > MAX_ANNOUNCEMENT_BYTES:
        raise ValueError(f"announcement of {len(announcement)} bytes is too large")
    body = None if announcement is None else bytes(announcement)
    return msgpack.packb([BACKUP_WIRE_VERSION, body], use_bin_type=True)  # type: ignore[no-any-return]


def decode_backup_response(payload: bytes) -> bytes | None:
    """The announcement, or None; `DecodeError` if malformed."""
    value = _unpack(payload, MAX_BACKUP_RESPONSE_BYTES)
    body = value[1]
    if body is not None and (type(body) is not bytes or len(body) > MAX_ANNOUNCEMENT_BYTES):
        raise DecodeError("announcement must be nil or bin of at most 4096 bytes")
    return body


async def _serve_backup(stream: FramedStream, latest: LatestAnnouncement) -> None:
    for _ in range(MAX_BACKUP_REQUESTS_PER_STREAM):
        with trio.move_on_after(BACKUP_IDLE_TIMEOUT) as idle:
            try:
                payload = await stream.receive()
            except PeerStreamError:  # closed, reset, or a frame over MAX_FRAME (reset)
                return
        if idle.cancelled_caught:
            logger.debug("%r idle for %s s; closing", stream, BACKUP_IDLE_TIMEOUT)
            return
        try:
            owner = decode_backup_request(payload)
        except DecodeError as exc:
            logger.info(
                "malformed %s request from %s: %s", BACKUP_PROTOCOL, stream.remote_address, exc
            )
            await stream.reset()
            return
        announcement = await latest(owner)
        try:
            response = encode_backup_response(announcement)
        except ValueError:
            logger.error("announcement held for %s is too large; answering none", owner)
            response = encode_backup_response(None)
        await stream.send(response)


@asynccontextmanager
async def serve_backup_requests(host: Host, latest: LatestAnnouncement) -> AsyncIterator[None]:
    """Answer `/weft/backup/1` requests on `host` from `latest` until the block exits.

    Each request is a frame `[1, owner]`; each answer `[1, announcement or nil]`. A
    malformed request resets its stream (other streams go on); an exception in `latest`
    is logged and resets that stream only. On exit the protocol refuses new streams and
    requests being served are cut.
    """
    handlers = _Handlers()

    async def handle(stream: FramedStream) -> None:
        await _serve_backup(stream, latest)

    host.set_handler(BACKUP_PROTOCOL, handlers.wrap(handle))
    try:
        yield
    finally:
        host.remove_handler(BACKUP_PROTOCOL)
        handlers.cancel_all()


async def request_latest_announcement(
    host: Host, peer_id: ID | str, owner: Address, *, timeout: float = BACKUP_REQUEST_TIMEOUT
) -> bytes | None:
    """Ask `peer_id` for the latest announcement it holds for `owner`; None if it holds none.

    The answer is not checked beyond its encoding: verify it like a gossiped one. Raises
    `node.host.PeerUnreachable` / `HostError` if no stream can be opened,
    `BackupProtocolError` if the peer closes, answers malformed or takes over `timeout`
    seconds.
    """
    with trio.move_on_after(timeout) as scope:
        stream = await host.new_stream(peer_id, BACKUP_PROTOCOL)
        try:
            await stream.send(encode_backup_request(owner))
            payload = await stream.receive()
        except PeerStreamError as exc:
            raise BackupProtocolError(f"{peer_id} did not answer: {exc}") from exc
        finally:
            await stream.close()
        try:
            return decode_backup_response(payload)
        except DecodeError as exc:
            raise BackupProtocolError(f"malformed answer from {peer_id}: {exc}") from exc
    assert scope.cancelled_caught
    raise BackupProtocolError(f"{peer_id} did not answer within {timeout} s")
