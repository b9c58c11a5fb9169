"""The node's libp2p host: identity, listening, dialing and framed protocol streams.

One secp256k1 key is both the node's Ethereum key and its libp2p identity (DESIGN.md,
"Identity"), so a Noise-authenticated connection proves the remote's Ethereum address:
`address_of_peer(stream.muxed_conn.peer_id)`.

`open_host(private_key)` runs a py-libp2p 0.8.1 host configured as LIBP2P-NOTES.md
measured it (Noise with an x25519 static key, Yamux, `max_connections_per_peer=1`) on
127.0.0.1 and yields a small `Host`. Streams come out as `node.peer_stream.FramedStream`.
libp2p exceptions do not leave this module: dialing failures are `PeerUnreachable`, other
host failures `HostError`, bad peer ids `PeerIdentityError`.

Workarounds for py-libp2p 0.8.1, each pinned by a test in tests/node/test_host.py:

- `host.run()` never closes the host, and the TCP listener and identify run as trio
  *system* tasks: after it returns the port is still bound, tasks live on and dialed
  sockets leak. `open_host` calls `host.close()` (shielded, bounded) before leaving it.
- Exceptions raised inside `host.run()`'s body come out wrapped in nested exception
  groups; `open_host` re-raises the body's own exception unwrapped.
- `host.close()` closes the connections one after the other, each taking 0.2 s (two
  `trio.sleep(0.1)` in Yamux and SwarmConn): 1 s with five peers, past `HOST_CLOSE_TIMEOUT`
  with 25. `open_host` closes them all at once first.

- An exception escaping a stream handler tears down the whole host (it propagates through
  the connection's nursery into `host.run`): `set_handler` wraps every handler, logs the
  error and resets that stream only.
- After a failed dial the swarm blocks the peer for 60 s ("negative cache"), even for an
  explicit `connect` to new addresses: `Host.connect` lifts the block and replaces the
  peer's known addresses with the ones given.
- The swarm retries a failed dial 3 times with backoff (~0.7 s to report a refused port):
  `dial_retries` (default 0) sets how many; the node retries at its own level.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Final

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.secp256k1 import Secp256k1PublicKey, create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.exceptions import SwarmException
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from node.peer_stream import CLOSE_TIMEOUT, FramedStream, PeerStreamError, shielded_for
from protocols.errors import InvalidValue
from protocols.signing import Signer
from protocols.types import Address

__all__ = [
    "HUB_PROTOCOL",
    "THREAD_PROTOCOL",
    "Host",
    "HostError",
    "PeerIdentity",
    "PeerIdentityError",
    "PeerUnreachable",
    "StreamHandler",
    "address_of_peer",
    "open_host",
    "parse_peer_id",
    "peer_identity",
]

logger = logging.getLogger(__name__)

HUB_PROTOCOL: Final = "/weft/hub/1"
THREAD_PROTOCOL: Final = "/weft/thread/1"

LISTEN_HOST: Final = "127.0.0.1"
HOST_CLOSE_TIMEOUT: Final = 5.0
"""Seconds closing a host may take on exit from `open_host`."""
ADDRS_TTL: Final = 120
"""Seconds the peerstore keeps the addresses given to `Host.connect`."""

StreamHandler = Callable[[FramedStream], Awaitable[None]]
"""Serves one inbound stream; the stream is closed when the handler returns."""


class HostError(Exception):
    """Base of the host's errors; a libp2p failure is kept as `__cause__`."""


class PeerUnreachable(HostError):
    """No authenticated connection to the peer could be made (refused, timed out, or the
    party at the address is not the peer id asked for)."""


class PeerIdentityError(HostError):
    """A peer id that is malformed or carries no secp256k1 public key."""


# ---------------------------------------------------------------- identity


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """The libp2p identity of a node's 32-byte Ethereum key."""

    key_pair: KeyPair
    peer_id: ID
    address: Address


def peer_identity(private_key: bytes) -> PeerIdentity:
    """Key pair, peer id and Ethereum address of `private_key` (32 bytes).

    Raises `protocols.errors.InvalidValue` if it is not a valid secp256k1 secret.
    """
    address = Signer(private_key).address  # validates length and range
    key_pair = create_new_key_pair(private_key)
    return PeerIdentity(key_pair, ID.from_pubkey(key_pair.public_key), address)


def parse_peer_id(text: str) -> ID:
    """A peer id from its base58 text; `PeerIdentityError` if malformed."""
    try:
        return ID.from_base58(text)
    except Exception as exc:  # base58 and multihash raise assorted types
        raise PeerIdentityError(f"not a peer id: {text!r}") from exc


def address_of_peer(peer_id: ID | str) -> Address:
    """The Ethereum address of a secp256k1 peer id.

    Raises `PeerIdentityError` for any other peer id (Ed25519, RSA, hashed keys).
    """
    if isinstance(peer_id, str):
        peer_id = parse_peer_id(peer_id)
    public_key = peer_id.extract_public_key()
    if not isinstance(public_key, Secp256k1PublicKey):
        raise PeerIdentityError(f"peer id {peer_id} does not carry a secp256k1 key")
    try:
        return Address.from_public_key(public_key.impl.format(compressed=False))
    except InvalidValue as exc:  # unreachable for a parsed key; kept for totality
        raise PeerIdentityError(f"peer id {peer_id}: {exc}") from exc


def _as_peer_id(peer_id: ID | str) -> ID:
    return parse_peer_id(peer_id) if isinstance(peer_id, str) else peer_id


def _multiaddr(text: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(text)
    except Exception as exc:
        raise HostError(f"not a multiaddr: {text!r}") from exc


# ---------------------------------------------------------------- host


class Host:
    """A running libp2p host; obtain one from `open_host`."""

    __slots__ = ("_host", "_swarm", "address", "peer_id")

    def __init__(self, host: IHost, identity: PeerIdentity) -> None:
        self._host = host
        network = host.get_network()
        self._swarm: Swarm | None = network if isinstance(network, Swarm) else None
        self.peer_id: ID = identity.peer_id
        self.address: Address = identity.address

    @property
    def libp2p(self) -> IHost:
        """The underlying py-libp2p host (for pubsub, bitswap and the like)."""
        return self._host

    @property
    def listen_addrs(self) -> tuple[str, ...]:
        """Multiaddrs this host listens on, without the `/p2p/<peer id>` suffix."""
        return tuple(str(a) for a in self._host.get_transport_addrs())

    def __repr__(self) -> str:
        return f"Host({self.address}, {self.peer_id}, {list(self.listen_addrs)})"

    def is_connected(self, peer_id: ID | str) -> bool:
        return bool(self._host.get_network().connections.get(_as_peer_id(peer_id)))

    async def connect(self, peer_id: ID | str, multiaddrs: Iterable[str]) -> None:
        """Make sure there is an authenticated connection to `peer_id`.

        Without one, dial `multiaddrs` (which replace any addresses known for the peer);
        the Noise handshake must prove `peer_id`. Raises `PeerUnreachable`, or
        `HostError` for unusable arguments.
        """
        pid = _as_peer_id(peer_id)
        addrs = [_multiaddr(a) for a in multiaddrs]
        if self.is_connected(pid):
            return
        if not addrs:
            raise PeerUnreachable(f"no address to dial for {pid}")
        self._host.get_peerstore().clear_addrs(pid)
        if self._swarm is not None:
            self._swarm.unblock_peer(pid)
        try:
            await self._host.connect(PeerInfo(pid, addrs))
        except SwarmException as exc:
            raise PeerUnreachable(f"cannot connect to {pid}: {exc}") from exc
        except (BaseLibp2pError, OSError) as exc:
            raise PeerUnreachable(f"cannot connect to {pid}: {exc!r}") from exc

    async def new_stream(self, peer_id: ID | str, protocol: str) -> FramedStream:
        """Open a stream for `protocol` to `peer_id` (connecting from known addresses).

        Streams cost 3-9 ms to open: keep them long-lived. Raises `PeerUnreachable`
        without a connection, `HostError` if the peer refuses the protocol.
        """
        pid = _as_peer_id(peer_id)
        try:
            stream = await self._host.new_stream(pid, [TProtocol(protocol)])
        except SwarmException as exc:
            raise PeerUnreachable(f"cannot reach {pid}: {exc}") from exc
        except (BaseLibp2pError, OSError) as exc:
            raise HostError(f"cannot open {protocol} to {pid}: {exc}") from exc
        try:
            remote = address_of_peer(stream.muxed_conn.peer_id)
        except PeerIdentityError:
            await FramedStream(stream, self.address, protocol).reset()
            raise
        return FramedStream(stream, remote, protocol)

    def set_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve inbound streams of `protocol` with `handler`, one task per stream.

        The handler gets a `FramedStream` whose `remote_address` is the authenticated
        peer's; the stream is closed when it returns. A `PeerStreamError` ending the
        handler is routine (logged at debug); any other exception is logged and resets
        that stream only: it never reaches libp2p, which would tear the host down.
        """

        async def serve(stream: INetStream) -> None:
            await _serve(stream, protocol, handler)

        self._host.set_stream_handler(TProtocol(protocol), serve)

    def remove_handler(self, protocol: str) -> None:
        """Stop serving `protocol`: from now on its inbound streams are reset.

        The protocol stays registered: py-libp2p looks the handler up again after it
        negotiated a stream, and a handler removed in between raises KeyError inside
        libp2p, which tears the host down.
        """

        async def refuse(stream: INetStream) -> None:
            with shielded_for(CLOSE_TIMEOUT), suppress(BaseLibp2pError, OSError):
                await stream.reset()

        self._host.set_stream_handler(TProtocol(protocol), refuse)


async def _serve(stream: INetStream, protocol: str, handler: StreamHandler) -> None:
    try:
        remote = address_of_peer(stream.muxed_conn.peer_id)
    except PeerIdentityError as exc:
        logger.info("refusing %s stream: %s", protocol, exc)
        with shielded_for(CLOSE_TIMEOUT), suppress(BaseLibp2pError, OSError):
            await stream.reset()
        return
    framed = FramedStream(stream, remote, protocol)
    try:
        await handler(framed)
    except PeerStreamError as exc:
        logger.debug("%r ended: %s", framed, exc)
    except Exception:
        logger.exception("handler of %r failed; resetting the stream", framed)
        await framed.reset()
    finally:
        await framed.close()


async def _no_auto_connect() -> None:
    return None


def _new_libp2p_host(identity: PeerIdentity, listen: multiaddr.Multiaddr) -> IHost:
    key_pair = identity.key_pair
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=[listen],
        # The default (3 per peer) waits out a 250 ms race delay on every connect.
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )


async def _close_connections(host: IHost) -> None:
    """Close every connection of `host` at the same time (errors logged, as libp2p does)."""

    async def close(conn: INetConn) -> None:
        try:
            await conn.close()
        except Exception as exc:
            logger.warning("error closing a connection: %s", exc)

    connections = host.get_network().connections
    async with trio.open_nursery() as nursery:
        for conns in list(connections.values()):
            for conn in list(conns):
                nursery.start_soon(close, conn)


@asynccontextmanager
async def open_host(
    private_key: bytes, listen_port: int = 0, *, dial_retries: int = 0
) -> AsyncIterator[Host]:
    """Run a host for `private_key` listening on 127.0.0.1:`listen_port` (0: any free).

    Raises `HostError` if it cannot start (e.g. the port is taken). On exit every
    connection, stream and background task of the host is closed.
    """
    identity = peer_identity(private_key)
    listen = _multiaddr(f"/ip4/{LISTEN_HOST}/tcp/{int(listen_port)}")
    try:
        host = _new_libp2p_host(identity, listen)
    except (BaseLibp2pError, OSError, ValueError) as exc:
        raise HostError(f"cannot create the libp2p host: {exc}") from exc
    network = host.get_network()
    if isinstance(network, Swarm):
        network.retry_config = RetryConfig(max_retries=dial_retries)
        # The swarm's auto-connector dials peers from the peerstore to keep 50 connections
        # (every 30 s and on each disconnect): old addresses of peers that went away, and
        # peers this node has nothing to say to. Weft dials only whom it needs.
        network.auto_connector.maybe_connect = _no_auto_connect  # type: ignore[method-assign]
    inner: BaseException | None = None
    try:
        async with AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(host.run([listen]))
            except (BaseLibp2pError, OSError) as exc:
                raise HostError(f"cannot listen on {listen}: {exc}") from exc
            try:
                if not host.get_transport_addrs():
                    # libp2p logs a failed listen (e.g. the port is taken) and carries on
                    raise HostError(f"cannot listen on {listen} (port taken?)")
                yield Host(host, identity)
            except BaseException as exc:
                inner = exc
                raise
            finally:
                # host.run does not close the host: without this the listener and identify
                # (trio system tasks) outlive it, the port stays bound and dialed
                # connections leak their sockets.
                with shielded_for(HOST_CLOSE_TIMEOUT):
                    await _close_connections(host)
                    await host.close()
    except BaseExceptionGroup as group:
        # host.run runs the body inside nurseries, which wrap whatever it raises in
        # (nested) exception groups: give the caller its own exception back.
        if inner is not None:
            _, rest = group.split(lambda e: e is inner)
            if rest is None:
                raise inner from inner.__cause__
        raise
