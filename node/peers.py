"""The node's peers: one long-lived framed stream per (peer, protocol), messages in and out.

`PeerManager` runs over a started `node.host.Host`. The engine hands it messages with
`send` (non-blocking) and gets everything that happens on the wire as `PeerEvent`s through
its `deliver` callback (awaited: a slow engine slows the readers down).

Rules, each kept in one place below:

- Protocol of a message (`send`): `HUB_MESSAGE_TYPES` only -> `/weft/hub/1`,
  `THREAD_MESSAGE_TYPES` only -> `/weft/thread/1`; `ErrorNotice` (both) -> `/weft/hub/1`
  if this node is the hub or `to` is the hub, else `/weft/thread/1`.
- Who dials (`_dial`): users dial the hub on `/weft/hub/1` and each other on
  `/weft/thread/1`. The hub never dials: it answers on the streams its users opened, and a
  send to a user without one is reported as `PeerUnreachableEvent`. A user node keeps its
  hub stream up: it redials after a loss, backing off from `REDIAL_MIN` to `REDIAL_MAX`.
- One stream per (peer, protocol) (`_prefer`). When a second one comes up, the newer wins
  if both were opened by the same side (the peer redialed); if the two sides opened one each
  (simultaneous dial), the stream opened by the side with the smaller address bytes wins, so
  both ends keep the same one. The loser is half-closed once no write of ours is in flight
  on it, and read until the peer half-closes it too (at most `RETIRE_GRACE` seconds): no
  message written on it before the switch is lost. `PeerConnected` is reported for each
  stream that becomes the kept one (a repeat means a new stream: resync), `PeerDisconnected`
  when the kept stream ends without a replacement.
- Outbound (`_write`): per (peer, protocol) one writer task drains the queue and writes all
  of it in one `send_frames` call. No stream: it dials (resolving an unknown thread peer
  through the hub first); if that fails the queued messages are dropped and
  `PeerUnreachableEvent` is reported (the protocols resend what matters on reconnect). A
  queue that reaches `max_queue` messages is dropped with the new message, the stream is
  reset and `PeerUnreachableEvent` is reported.
- Inbound (`_read`): `receive_batch` then `decode_hub` / `decode_thread`; the frames that
  arrived together become one `PeerMessages`, attributed to the stream's authenticated
  `remote_address`. An undecodable payload, a message of the other protocol or an oversize
  frame resets that stream and is reported as `PeerMisbehaved`; other streams go on.
- Discovery (`_on_discovery`), never delivered to the engine: when its hub stream comes up a
  user sends `PeerInfo(own address, own peer id bytes, host.listen_addrs)` (multiaddrs
  *without* the `/p2p/<peer id>` suffix: the peer id travels in its own field). The hub
  records it only if `address` is the stream's authenticated address and `peer_id` the
  connection's authenticated peer id; otherwise it reports `PeerMisbehaved` and keeps the
  stream (the message is ignored). The hub answers `PeerLookup(x)` with `PeerInfo(x, ...)`,
  or `PeerInfo(x, b"", ())` if it knows nothing; `resolve` waits for that answer.
  A `PeerInfo` is only a hint: dialing checks that the Noise-proven peer is `x`.

Errors: `node.host.PeerUnreachable` and `UnknownPeer` (both `HostError`) from `ensure` and
`resolve`, `LocalProtocolError` for a message `send` cannot route or encode. No libp2p
exception leaves this module.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio
from libp2p.peer.id import ID

from node.host import (
    HUB_PROTOCOL,
    THREAD_PROTOCOL,
    Host,
    HostError,
    PeerIdentityError,
    PeerUnreachable,
    address_of_peer,
    parse_peer_id,
)
from node.peer_stream import (
    CLOSE_TIMEOUT,
    FramedStream,
    FrameTooLarge,
    StreamClosed,
    shielded_for,
)
from protocols.errors import DecodeError, LocalProtocolError
from protocols.messages import Message, PeerInfo, PeerLookup
from protocols.types import Address
from protocols.wire import (
    HUB_MESSAGE_TYPES,
    MAX_MULTIADDR_BYTES,
    MAX_MULTIADDRS,
    THREAD_MESSAGE_TYPES,
    decode_hub,
    decode_thread,
    encode,
)

if TYPE_CHECKING:
    # The trio stubs that libp2p brings in (trio-typing) keep TaskStatus there.
    from trio_typing import TaskStatus

__all__ = [
    "DIAL_TIMEOUT",
    "MAX_QUEUE",
    "REDIAL_MAX",
    "REDIAL_MIN",
    "RESOLVE_TIMEOUT",
    "RETIRE_GRACE",
    "Deliver",
    "PeerConnected",
    "PeerDisconnected",
    "PeerEvent",
    "PeerManager",
    "PeerMessages",
    "PeerMisbehaved",
    "PeerRef",
    "PeerUnreachableEvent",
    "UnknownPeer",
]

logger = logging.getLogger(__name__)

MAX_QUEUE: Final = 10_000
"""Default bound of the messages queued for one (peer, protocol)."""
RESOLVE_TIMEOUT: Final = 5.0
"""Default seconds `resolve` waits for the hub's answer."""
DIAL_TIMEOUT: Final = 10.0
"""Seconds connecting and opening one stream may take."""
REDIAL_MIN: Final = 0.1
REDIAL_MAX: Final = 5.0
"""Bounds of a user's back-off between failed dials of its hub, in seconds."""
RETIRE_GRACE: Final = 30.0
"""Seconds a half-closed losing stream is read before it is closed for good."""
RECEIVE_BATCH: Final = 1024
"""Most frames turned into one `PeerMessages`."""


class UnknownPeer(HostError):
    """No peer id is known for the address, and the hub knows none either."""


@dataclass(frozen=True, slots=True)
class PeerRef:
    """Where to reach a peer: its address, base58 peer id and multiaddrs (no `/p2p` part)."""

    address: Address
    peer_id: str
    multiaddrs: tuple[str, ...]

    @classmethod
    def of_host(cls, host: Host) -> PeerRef:
        """The reference of a running host."""
        return cls(host.address, host.peer_id.to_base58(), host.listen_addrs)


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class PeerMessages:
    """Messages from `sender` that arrived together on one `protocol` stream, in order."""

    sender: Address
    protocol: str
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class PeerConnected:
    """A new stream to `address` for `protocol` is the one kept: time to resync."""

    address: Address
    protocol: str


@dataclass(frozen=True, slots=True)
class PeerDisconnected:
    """The kept stream to `address` for `protocol` ended and none replaced it."""

    address: Address
    protocol: str


@dataclass(frozen=True, slots=True)
class PeerMisbehaved:
    """`address` broke the wire protocol on `protocol`; `detail` says how."""

    address: Address
    protocol: str
    detail: str


@dataclass(frozen=True, slots=True)
class PeerUnreachableEvent:
    """Messages queued for `address` on `protocol` were dropped: no stream could be had."""

    address: Address
    protocol: str
    detail: str


PeerEvent = PeerMessages | PeerConnected | PeerDisconnected | PeerMisbehaved | PeerUnreachableEvent
Deliver = Callable[[PeerEvent], Awaitable[None]]

_HUB_ONLY: Final = 1
_THREAD_ONLY: Final = 2
_BOTH: Final = 3
_ROUTES: Final[dict[type, int]] = {
    t: (_HUB_ONLY if t in HUB_MESSAGE_TYPES else 0)
    | (_THREAD_ONLY if t in THREAD_MESSAGE_TYPES else 0)
    for t in HUB_MESSAGE_TYPES | THREAD_MESSAGE_TYPES
}

_DECODERS: Final[dict[str, Callable[[bytes], Message]]] = {
    HUB_PROTOCOL: decode_hub,
    THREAD_PROTOCOL: decode_thread,
}


# ---------------------------------------------------------------- bookkeeping


class _Stream:
    """One framed stream of a link, and who opened it."""

    __slots__ = (
        "announced",
        "dialer",
        "done",
        "framed",
        "link",
        "peer_id",
        "reading",
        "write_lock",
    )

    def __init__(self, link: _Link, framed: FramedStream, dialer: Address) -> None:
        self.link = link
        self.framed = framed
        self.dialer = dialer
        self.peer_id = _authenticated_peer_id(framed)
        self.announced = False  # PeerConnected was delivered for it
        self.write_lock = trio.Lock()  # held by the writer around a write, by _retire
        self.done = trio.Event()  # its reader closed it and reported its end
        # Ends the reader: py-libp2p 0.8.1 yamux does not wake a pending read on a local
        # reset or close, so a reader is stopped by cancelling it.
        self.reading = trio.CancelScope()


class _Link:
    """Everything about one (peer, protocol): queue, writer, streams."""

    __slots__ = (
        "changed",
        "current",
        "dial_lock",
        "ended",
        "key",
        "queue",
        "wakeup",
        "writing",
    )

    def __init__(self, key: tuple[Address, str]) -> None:
        self.key = key
        self.queue: list[bytes] = []  # encoded messages not yet handed to a stream
        self.writing = False  # a writer task runs
        self.wakeup = trio.Event()  # set on enqueue and when `current` changes
        self.current: _Stream | None = None  # the kept stream
        self.changed = trio.Event()  # set (and replaced) when `current` changes
        self.dial_lock = trio.Lock()
        self.ended: _Stream | None = None  # the last kept stream that ended


class _Lookup:
    """A `PeerLookup` waiting for the hub's `PeerInfo`."""

    __slots__ = ("done", "error", "ref")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.ref: PeerRef | None = None
        self.error: HostError | None = None


def _authenticated_peer_id(framed: FramedStream) -> bytes | None:
    """The Noise-authenticated peer id of the stream's connection, as bytes."""
    try:
        peer_id = framed.raw.muxed_conn.peer_id
    except AttributeError:
        return None
    return peer_id.to_bytes() if isinstance(peer_id, ID) else None


def _prefer(new: _Stream, old: _Stream) -> bool:
    """Whether `new` replaces `old` as the kept stream of their link (module docstring)."""
    if new.dialer == old.dialer:
        return True
    return new.dialer.raw < old.dialer.raw


def _ref_of_info(info: PeerInfo) -> PeerRef:
    """The `PeerRef` a non-empty `PeerInfo` describes; `PeerIdentityError` if inconsistent."""
    try:
        peer_id = ID(info.peer_id)
    except Exception as exc:  # multihash raises assorted types
        raise PeerIdentityError(f"not a peer id: {info.peer_id.hex()}") from exc
    if address_of_peer(peer_id) != info.address:
        raise PeerIdentityError(f"peer id {peer_id} is not that of {info.address}")
    return PeerRef(info.address, peer_id.to_base58(), info.multiaddrs)


def _info_of_ref(ref: PeerRef) -> PeerInfo:
    """`ref` as a `PeerInfo` the wire accepts (over-long multiaddrs left out)."""
    addrs = tuple(a for a in ref.multiaddrs if len(a.encode("utf-8")) <= MAX_MULTIADDR_BYTES)
    return PeerInfo(ref.address, parse_peer_id(ref.peer_id).to_bytes(), addrs[:MAX_MULTIADDRS])


# ---------------------------------------------------------------- the manager


class PeerManager:
    """Peer streams of one node; see the module docstring.

    `hub` is the hub's reference on a user node (None on the hub, or for a user with no
    hub). `deliver` receives every `PeerEvent`; what it raises ends `run`.
    """

    def __init__(
        self,
        host: Host,
        *,
        is_hub: bool,
        hub: PeerRef | None,
        deliver: Deliver,
        max_queue: int = MAX_QUEUE,
    ) -> None:
        if is_hub and hub is not None:
            raise ValueError("the hub has no hub")
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self._host = host
        self.is_hub = is_hub
        self.hub = hub
        self._deliver = deliver
        self._max_queue = max_queue
        self._book: dict[Address, PeerRef] = {}
        self._links: dict[tuple[Address, str], _Link] = {}
        self._lookups: dict[Address, _Lookup] = {}
        self._nursery: trio.Nursery | None = None
        self._started = False
        self._stopped = False
        if hub is not None:
            self.learn(hub)

    @property
    def address(self) -> Address:
        return self._host.address

    @property
    def host(self) -> Host:
        """The host the manager runs over."""
        return self._host

    def __repr__(self) -> str:
        role = "hub" if self.is_hub else "user"
        return f"PeerManager({role} {self.address}, {len(self._links)} links)"

    # ------------------------------------------------------------ running

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the peer protocols until cancelled (or `stop()`); started once serving.

        Leaving it closes every stream and drops what is queued. Runs once per manager.
        """
        if self._started:
            raise RuntimeError("PeerManager.run may be called once")
        self._started = True
        protocols = (HUB_PROTOCOL, THREAD_PROTOCOL) if self.is_hub else (THREAD_PROTOCOL,)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for protocol in protocols:
                    self._host.set_handler(protocol, self._accept)
                if self.hub is not None:
                    nursery.start_soon(self._keep_hub, self.hub)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._stopped = True
            self._nursery = None
            for protocol in protocols:
                self._host.remove_handler(protocol)
            for lookup in self._lookups.values():
                lookup.error = PeerUnreachable("the peer manager stopped")
                lookup.done.set()
            self._lookups.clear()

    def stop(self) -> None:
        """Make `run` return (closing every stream); idempotent."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # ------------------------------------------------------------ address book

    def learn(self, ref: PeerRef) -> None:
        """Remember where `ref.address` is; `PeerIdentityError` if its peer id is not
        that address's."""
        if address_of_peer(ref.peer_id) != ref.address:
            raise PeerIdentityError(f"peer id {ref.peer_id} is not that of {ref.address}")
        self._book[ref.address] = ref

    def known(self, address: Address) -> PeerRef | None:
        """What the address book holds for `address`."""
        return self._book.get(address)

    def is_connected(self, address: Address, protocol: str) -> bool:
        """Whether a kept stream to `address` for `protocol` is up."""
        link = self._links.get((address, protocol))
        return link is not None and link.current is not None

    async def ensure(self, address: Address, protocol: str) -> None:
        """Make sure a stream to `address` for `protocol` is up, dialing if need be.

        Raises `PeerUnreachable` (also on the hub, which never dials), `UnknownPeer` for a
        thread peer the hub does not know. Cancelling abandons the dial.
        """
        if protocol not in _DECODERS:
            raise ValueError(f"not a weft protocol: {protocol!r}")
        self._check_running()
        link = self._link((address, protocol))
        if link.current is None:
            await self._open(link)

    async def resolve(self, address: Address, timeout: float = RESOLVE_TIMEOUT) -> PeerRef:
        """Ask the hub where `address` is; the answer also goes into the address book.

        Raises `UnknownPeer` if the hub knows nothing (the hub itself answers from its
        book), `PeerUnreachable` without a hub or if it does not answer within `timeout`
        seconds. Cancelling abandons the wait.
        """
        self._check_running()
        if self.is_hub:
            ref = self._book.get(address)
            if ref is None:
                raise UnknownPeer(f"no user {address} has announced itself")
            return ref
        hub = self.hub
        if hub is None:
            raise PeerUnreachable(f"no hub to ask where {address} is")
        if address == hub.address:
            return hub
        lookup = self._lookups.get(address)
        with trio.move_on_after(timeout):
            if lookup is None:
                lookup = self._lookups[address] = _Lookup()
                try:
                    await self.ensure(hub.address, HUB_PROTOCOL)
                except BaseException as exc:  # others may be waiting for this lookup
                    error = exc if isinstance(exc, HostError) else PeerUnreachable("abandoned")
                    self._finish_lookup(address, lookup, error=error)
                    raise
                self._enqueue(self._link((hub.address, HUB_PROTOCOL)), encode(PeerLookup(address)))
            await lookup.done.wait()
        if not lookup.done.is_set():
            self._finish_lookup(address, lookup, error=PeerUnreachable("the hub did not answer"))
        if lookup.error is not None:
            failure = lookup.error
            raise type(failure)(f"cannot resolve {address}: {failure}") from failure
        if lookup.ref is None:
            raise UnknownPeer(f"the hub knows no user {address}")
        return lookup.ref

    def _finish_lookup(
        self, address: Address, lookup: _Lookup, *, error: HostError | None = None
    ) -> None:
        if self._lookups.get(address) is lookup:
            del self._lookups[address]
        if not lookup.done.is_set():
            lookup.error = error
            lookup.done.set()

    # ------------------------------------------------------------ sending

    def send(self, to: Address, message: Message) -> None:
        """Queue `message` for `to`; never blocks (see the module docstring for the rules).

        Raises `LocalProtocolError` if the message cannot be encoded, or has no protocol
        towards `to` (a hub message from a user to anyone but the hub, anything to
        oneself), and `RuntimeError` before `run`. After `run` ended it drops the message.
        """
        route = _ROUTES.get(type(message), 0)
        if route == _BOTH:
            hub = self.hub
            to_hub = self.is_hub or (hub is not None and to == hub.address)
            protocol = HUB_PROTOCOL if to_hub else THREAD_PROTOCOL
        elif route == _HUB_ONLY:
            hub = self.hub
            if not self.is_hub and (hub is None or to != hub.address):
                raise LocalProtocolError(f"{type(message).__name__} goes to the hub only")
            protocol = HUB_PROTOCOL
        elif route == _THREAD_ONLY:
            protocol = THREAD_PROTOCOL
        else:
            raise LocalProtocolError(f"not a peer message: {type(message).__name__}")
        if to == self._host.address:
            raise LocalProtocolError("cannot send a message to oneself")
        data = encode(message)
        self._enqueue(self._link((to, protocol)), data)

    def _enqueue(self, link: _Link, data: bytes) -> None:
        nursery = self._nursery
        if nursery is None:
            if self._stopped:
                logger.debug("peer manager stopped: dropping a message to %s", link.key[0])
                return
            raise RuntimeError("PeerManager is not running")
        queue = link.queue
        if len(queue) >= self._max_queue:
            dropped = len(queue) + 1
            queue.clear()
            nursery.start_soon(self._overflow, link, dropped)
            return
        queue.append(data)
        if link.writing:
            link.wakeup.set()
        else:
            link.writing = True
            nursery.start_soon(self._write, link)

    async def _write(self, link: _Link) -> None:
        """The writer of one link: everything queued goes out in one write."""
        address, protocol = link.key
        try:
            while True:
                if not link.queue:
                    if link.current is None:
                        return  # idle and unconnected: the next send starts a new writer
                    await link.wakeup.wait()
                    link.wakeup = trio.Event()
                    continue
                stream = link.current
                if stream is None:
                    try:
                        stream = await self._open(link)
                    except HostError as exc:
                        dropped = len(link.queue)
                        link.queue.clear()
                        logger.debug("%s %s unreachable: %s", address, protocol, exc)
                        await self._deliver(
                            PeerUnreachableEvent(
                                address, protocol, f"{exc} ({dropped} messages dropped)"
                            )
                        )
                        continue
                async with stream.write_lock:
                    if stream is not link.current:
                        continue  # replaced or ended while we waited: take the new one
                    batch = link.queue
                    link.queue = []
                    try:
                        await stream.framed.send_frames(batch)
                    except StreamClosed as exc:
                        logger.debug(
                            "%s %s: %d messages lost: %s", address, protocol, len(batch), exc
                        )
        finally:
            link.writing = False

    async def _overflow(self, link: _Link, dropped: int) -> None:
        address, protocol = link.key
        logger.info("%s %s: send queue full, %d messages dropped", address, protocol, dropped)
        stream = link.current
        if stream is not None:
            stream.reading.cancel()
            await stream.framed.reset()
        await self._deliver(
            PeerUnreachableEvent(
                address, protocol, f"send queue over {self._max_queue}: {dropped} dropped"
            )
        )

    # ------------------------------------------------------------ streams

    def _link(self, key: tuple[Address, str]) -> _Link:
        link = self._links.get(key)
        if link is None:
            link = self._links[key] = _Link(key)
        return link

    def _check_running(self) -> None:
        if self._nursery is None:
            raise PeerUnreachable("the peer manager is not running")

    async def _open(self, link: _Link) -> _Stream:
        """The kept stream of `link`, dialing if there is none; see `ensure`."""
        async with link.dial_lock:
            if link.current is not None:
                return link.current
            ended = link.ended
            if ended is not None:  # report its end (PeerDisconnected) before any news
                await ended.done.wait()
                link.ended = None
                if link.current is not None:  # the peer dialed us meanwhile
                    return link.current
            framed = await self._dial(*link.key)
            if self._nursery is None:  # run() ended while we dialed
                await framed.reset()
                raise PeerUnreachable("the peer manager stopped")
            self._adopt(framed, dialer=self._host.address)
            if link.current is None:  # unreachable: adopting a stream into an empty link
                raise PeerUnreachable(f"the stream to {link.key[0]} ended at once")
            return link.current

    async def _dial(self, address: Address, protocol: str) -> FramedStream:
        """A new outbound stream; raises `PeerUnreachable` or `UnknownPeer`."""
        if self.is_hub:
            raise PeerUnreachable(f"{address} has no {protocol} stream (the hub does not dial)")
        hub = self.hub
        if protocol == HUB_PROTOCOL and (hub is None or address != hub.address):
            raise PeerUnreachable(f"{address} is not the hub")
        ref = self._book.get(address)
        if ref is None:
            return await self._dial_ref(await self.resolve(address), protocol)
        try:
            return await self._dial_ref(ref, protocol)
        except PeerUnreachable:
            if hub is None or address == hub.address:
                raise
            try:  # the peer may have moved: ask the hub once
                newer = await self.resolve(address)
            except HostError:
                newer = ref
            if newer == ref:
                raise
            return await self._dial_ref(newer, protocol)

    async def _dial_ref(self, ref: PeerRef, protocol: str) -> FramedStream:
        host = self._host
        framed: FramedStream | None = None
        with trio.move_on_after(DIAL_TIMEOUT):
            try:
                await host.connect(ref.peer_id, ref.multiaddrs)
                framed = await host.new_stream(ref.peer_id, protocol)
            except PeerUnreachable:
                raise
            except HostError as exc:  # a bad peer id or multiaddr, a refused protocol
                raise PeerUnreachable(f"cannot open {protocol} to {ref.address}: {exc}") from exc
        if framed is None:
            raise PeerUnreachable(f"dialing {ref.address} timed out after {DIAL_TIMEOUT} s")
        if framed.remote_address != ref.address:  # unreachable: the peer id proves it
            await framed.reset()
            raise PeerUnreachable(f"{framed.remote_address} answered for {ref.address}")
        return framed

    async def _accept(self, framed: FramedStream) -> None:
        """Host handler: adopt an inbound stream; return once it has been served."""
        if self._nursery is None:
            await framed.reset()
            return
        stream = self._adopt(framed, dialer=framed.remote_address)
        try:
            await stream.done.wait()
        finally:  # the host is dropping the stream: stop reading it
            stream.reading.cancel()

    def _adopt(self, framed: FramedStream, *, dialer: Address) -> _Stream:
        """Take a new stream into its link (keeping one, `_prefer`) and start its reader."""
        nursery = self._nursery
        assert nursery is not None
        link = self._link((framed.remote_address, framed.protocol))
        stream = _Stream(link, framed, dialer)
        old = link.current
        if old is None or _prefer(stream, old):
            self._set_current(link, stream)
            if old is not None:
                nursery.start_soon(self._retire, old)
            hub = self.hub
            if hub is not None and link.key == (hub.address, HUB_PROTOCOL):
                me = PeerInfo(
                    self._host.address,
                    self._host.peer_id.to_bytes(),
                    self._host.listen_addrs[:MAX_MULTIADDRS],
                )
                self._enqueue(link, encode(me))
        else:
            nursery.start_soon(self._retire, stream)
        logger.debug("%s %s stream (opened by %s) adopted", *link.key, dialer)
        nursery.start_soon(self._read, stream)
        return stream

    def _set_current(self, link: _Link, stream: _Stream | None) -> None:
        link.current = stream
        link.changed.set()
        link.changed = trio.Event()
        link.wakeup.set()

    async def _retire(self, stream: _Stream) -> None:
        """Half-close a losing stream once our write on it is done; close it after a grace."""
        framed = stream.framed
        async with stream.write_lock:
            if not framed.closed:
                # FramedStream has no half-close; libp2p's close() of a yamux stream is one
                # (it sends FIN and keeps reading), and FramedStream stays readable.
                with shielded_for(CLOSE_TIMEOUT):
                    try:
                        await framed.raw.close()
                    except Exception as exc:  # libp2p raises assorted types
                        logger.debug("half-close of %r failed: %r", framed, exc)
                        await framed.reset()
        with trio.move_on_after(RETIRE_GRACE):
            await stream.done.wait()
        stream.reading.cancel()

    async def _read(self, stream: _Stream) -> None:
        """The reader of one stream: its frames as events, until it ends."""
        link = stream.link
        address, protocol = link.key
        misbehaved: str | None = None
        try:
            try:
                with stream.reading:
                    misbehaved = await self._receive(stream)
            finally:
                lost = False
                if link.current is stream:
                    link.ended = stream
                    self._set_current(link, None)
                    lost = stream.announced
                if misbehaved is not None:
                    await stream.framed.reset()
                await stream.framed.close()
            if misbehaved is not None:
                logger.info("%s misbehaved on %s: %s", address, protocol, misbehaved)
                await self._deliver(PeerMisbehaved(address, protocol, misbehaved))
            if lost:
                logger.debug("%s %s disconnected", address, protocol)
                await self._deliver(PeerDisconnected(address, protocol))
        finally:
            stream.done.set()

    async def _receive(self, stream: _Stream) -> str | None:
        """Deliver the stream's messages until it ends; a protocol violation, or None."""
        link = stream.link
        address, protocol = link.key
        deliver = self._deliver
        decode = _DECODERS[protocol]
        framed = stream.framed
        if link.current is stream:
            stream.announced = True
            await deliver(PeerConnected(address, protocol))
        while True:
            try:
                payloads = await framed.receive_batch(RECEIVE_BATCH)
            except FrameTooLarge as exc:
                return f"oversize frame: {exc}"
            except StreamClosed as exc:
                logger.debug("%r ended: %s", framed, exc)
                return None
            messages: list[Message] = []
            violation: str | None = None
            try:
                for payload in payloads:
                    message = decode(payload)
                    if type(message) is PeerInfo or type(message) is PeerLookup:
                        violation = self._on_discovery(stream, message) or violation
                    else:
                        messages.append(message)
            except DecodeError as exc:
                if messages:
                    await deliver(PeerMessages(address, protocol, tuple(messages)))
                return f"undecodable message: {exc}"
            if messages:
                await deliver(PeerMessages(address, protocol, tuple(messages)))
            if violation is not None:
                logger.info("%s misbehaved on %s: %s", address, protocol, violation)
                await deliver(PeerMisbehaved(address, protocol, violation))

    # ------------------------------------------------------------ discovery

    def _on_discovery(self, stream: _Stream, message: PeerInfo | PeerLookup) -> str | None:
        """Handle a discovery message; a violation to report (stream kept), or None."""
        sender = stream.framed.remote_address
        if self.is_hub:
            if isinstance(message, PeerLookup):
                self._answer_lookup(sender, message.address)
                return None
            return self._record_user(stream, message)
        hub = self.hub
        if isinstance(message, PeerInfo) and hub is not None and sender == hub.address:
            self._on_lookup_answer(message)
        else:
            logger.debug("ignoring %s from %s", type(message).__name__, sender)
        return None

    def _answer_lookup(self, asker: Address, address: Address) -> None:
        ref = self._book.get(address)
        if ref is None and address == self._host.address:
            ref = PeerRef.of_host(self._host)
        info = PeerInfo(address, b"", ()) if ref is None else _info_of_ref(ref)
        self._enqueue(self._link((asker, HUB_PROTOCOL)), encode(info))

    def _record_user(self, stream: _Stream, info: PeerInfo) -> str | None:
        sender = stream.framed.remote_address
        if info.address != sender:
            return f"PeerInfo for {info.address} from {sender}"
        if stream.peer_id is not None and info.peer_id != stream.peer_id:
            return "PeerInfo with a peer id other than the connection's"
        try:
            self._book[sender] = _ref_of_info(info)
        except PeerIdentityError as exc:
            return f"PeerInfo: {exc}"
        return None

    def _on_lookup_answer(self, info: PeerInfo) -> None:
        ref: PeerRef | None = None
        if info.peer_id:
            try:
                ref = _ref_of_info(info)
            except PeerIdentityError as exc:
                logger.warning("the hub answered with an inconsistent PeerInfo: %s", exc)
            else:
                self._book[ref.address] = ref
        lookup = self._lookups.get(info.address)
        if lookup is not None:
            lookup.ref = ref
            self._finish_lookup(info.address, lookup)

    # ------------------------------------------------------------ the hub link

    async def _keep_hub(self, hub: PeerRef) -> None:
        """A user's hub stream: dial it, and dial again whenever it is lost."""
        link = self._link((hub.address, HUB_PROTOCOL))
        delay = REDIAL_MIN
        reported = False
        while True:
            if link.current is None:
                try:
                    await self._open(link)
                except HostError as exc:
                    if not reported:  # once per outage
                        reported = True
                        await self._deliver(
                            PeerUnreachableEvent(hub.address, HUB_PROTOCOL, str(exc))
                        )
                    await trio.sleep(delay)
                    delay = min(delay * 2, REDIAL_MAX)
                    continue
            delay = REDIAL_MIN
            reported = False
            while link.current is not None:
                await link.changed.wait()
