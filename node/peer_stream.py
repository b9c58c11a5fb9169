"""Length-prefixed frames over one libp2p stream (SPEC.md, "Wire format" > "Framing").

`FramedStream` wraps a libp2p stream (anything with async `read(n)`, `write(data)`,
`close()` and `reset()`; `node.host` hands them out already wrapped) and moves whole frame
payloads:

- `receive()` reads whatever the stream has (`read(n)` returns what is available, not `n`
  bytes), feeds `protocols.wire.FrameReader` and returns one payload at a time, in order.
  A length prefix above `MAX_FRAME` resets the stream at once, without buffering the
  payload, and raises `FrameTooLarge`.
- `send(payload)` / `send_frames(payloads)` coalesce: frames of every sender that is
  waiting while a write is in flight go out together in the next single `write()` (one
  libp2p write costs ~0.5 ms whatever its size). A call returns once its frames were
  handed to the stream in one piece, or raises `StreamClosed`.
- The end of the stream (EOF, reset, a closed connection) is `StreamClosed`, whichever
  side caused it; libp2p exceptions never leave this module. `close()` and `reset()` are
  idempotent and bounded in time, also when the caller is being cancelled.

Not thread-safe; every call must come from the trio run that owns the stream.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Any, Final

import trio

from protocols.errors import DecodeError
from protocols.types import Address
from protocols.wire import FrameReader, frame

__all__ = [
    "CLOSE_TIMEOUT",
    "READ_CHUNK",
    "FrameTooLarge",
    "FramedStream",
    "PeerStreamError",
    "StreamClosed",
    "shielded_for",
]

logger = logging.getLogger(__name__)

READ_CHUNK: Final = 65_536
"""Largest `read()` asked of the libp2p stream; it returns whatever is available."""
CLOSE_TIMEOUT: Final = 1.0
"""Seconds `close()` / `reset()` may take before the stream is abandoned."""


class PeerStreamError(Exception):
    """Base of the errors of a framed peer stream."""


class StreamClosed(PeerStreamError):
    """The stream ended: EOF, reset by either side, closed locally or a broken connection.

    `clean` is true for EOF at a frame boundary. It is a hint, not proof of an orderly end:
    over py-libp2p 0.8.1 Yamux a reset by the peer usually surfaces as EOF too (the RST
    drops the stream before the pending read looks at it).
    """

    def __init__(self, message: str, *, clean: bool = False) -> None:
        super().__init__(message)
        self.clean = clean


class FrameTooLarge(PeerStreamError):
    """The peer sent a length prefix above `MAX_FRAME`: a protocol violation.

    The stream has already been reset when this is raised.
    """


def _is_stream_failure(exc: BaseException) -> bool:
    """Exceptions a libp2p stream raises when it ends or its connection breaks."""
    # Imported lazily: `import libp2p` costs ~0.9 s, and this module is also used over
    # plain trio streams in tests.
    from libp2p.exceptions import BaseLibp2pError

    return isinstance(exc, BaseLibp2pError | OSError | trio.BrokenResourceError | EOFError)


def shielded_for(seconds: float) -> trio.CancelScope:
    """A cancel scope that shields its body from outer cancellation for at most `seconds`."""
    scope = trio.move_on_after(seconds)
    scope.shield = True
    return scope


class _Batch:
    """Frames that will go out in one write."""

    __slots__ = ("chunks", "done", "error", "taken")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.taken = False  # a writer joined the chunks; nothing may be added or removed
        self.done = False  # the write finished (see error)
        self.error: StreamClosed | None = None


class FramedStream:
    """Frame payloads over one libp2p stream; see the module docstring.

    `remote_address` is the Ethereum address of the authenticated remote peer (the host
    derives it from the Noise-authenticated peer id of the connection). `protocol` is
    the negotiated protocol id, for logs and dispatch.
    """

    __slots__ = (
        "_batch",
        "_closed",
        "_reader",
        "_ready",
        "_receive_error",
        "_receive_lock",
        "_send_error",
        "_stream",
        "_was_reset",
        "_write_lock",
        "protocol",
        "remote_address",
    )

    def __init__(self, stream: Any, remote_address: Address, protocol: str = "") -> None:
        self._stream = stream
        self.remote_address = remote_address
        self.protocol = protocol
        self._reader = FrameReader()
        self._ready: deque[bytes] = deque()
        self._receive_lock = trio.Lock()
        self._receive_error: PeerStreamError | None = None
        self._write_lock = trio.Lock()
        self._batch = _Batch()
        self._send_error: StreamClosed | None = None
        self._closed = False
        self._was_reset = False

    @property
    def raw(self) -> Any:
        """The wrapped libp2p stream."""
        return self._stream

    @property
    def closed(self) -> bool:
        """True once `close()` or `reset()` was called, or a violation reset the stream."""
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"FramedStream({self.protocol or '?'} with {self.remote_address}, {state})"

    # ------------------------------------------------------------ receiving

    async def receive(self) -> bytes:
        """The next frame payload; raise `StreamClosed` or `FrameTooLarge` when none comes."""
        if self._ready:
            return self._ready.popleft()
        async with self._receive_lock:
            while not self._ready:
                self._check_receivable()
                data = await self._read_some()
                try:
                    payloads = self._reader.feed(data)
                except DecodeError as exc:
                    self._receive_error = FrameTooLarge(str(exc))
                    await self.reset()
                    raise FrameTooLarge(str(exc)) from None
                self._ready.extend(payloads)
            return self._ready.popleft()

    async def receive_batch(self, limit: int = 1024) -> list[bytes]:
        """At least one payload: the next one plus those already buffered, up to `limit`.

        Lets a peer answer a burst of pipelined frames with one `send_frames` (one write).
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        batch = [await self.receive()]
        ready = self._ready
        while ready and len(batch) < limit:
            batch.append(ready.popleft())
        return batch

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        """Payloads until the peer closes at a frame boundary (a clean end).

        A reset, a truncated frame or a violation still raises.
        """
        while True:
            try:
                payload = await self.receive()
            except StreamClosed as exc:
                if exc.clean:
                    return
                raise
            yield payload

    def _check_receivable(self) -> None:
        error = self._receive_error
        if isinstance(error, FrameTooLarge):
            raise StreamClosed(f"stream was reset after a protocol violation: {error}")
        if isinstance(error, StreamClosed):
            raise StreamClosed(str(error), clean=error.clean)
        if self._closed:
            raise StreamClosed("stream closed locally")

    async def _read_some(self) -> bytes:
        cause: Exception | None = None
        try:
            data: bytes = await self._stream.read(READ_CHUNK)
        except Exception as exc:
            if not _is_stream_failure(exc):
                raise
            data, cause = b"", exc
        if data:
            return data
        # EOF (an empty read, or StreamEOF) is clean at a frame boundary; a reset or a
        # broken connection never is.
        pending = self._reader.buffered
        clean = not pending and (cause is None or isinstance(cause, EOFError))
        if clean:
            what = "stream closed by the peer"
        elif pending:
            what = f"stream ended inside a frame ({pending} bytes pending)"
        else:
            what = f"stream reset or broken: {type(cause).__name__}: {cause}"
        self._receive_error = StreamClosed(what, clean=clean)
        raise StreamClosed(what, clean=clean) from cause

    # ------------------------------------------------------------ sending

    async def send(self, payload: bytes) -> None:
        """Send one frame; see `send_frames`."""
        await self.send_frames((payload,))

    async def send_frames(self, payloads: Iterable[bytes]) -> None:
        """Send frames, in order, in one write together with those of concurrent senders.

        Raises `protocols.errors.LocalProtocolError` (nothing sent) if a payload exceeds
        `MAX_FRAME`, and `StreamClosed` if the stream cannot take them. Frames of one call
        are never split between writes. If the call is cancelled before its write began,
        its frames are withdrawn; once the write began, the stream's framing is lost and
        every later send raises `StreamClosed`.
        """
        chunks = [frame(p) for p in payloads]
        if not chunks:
            return
        self._check_sendable()
        batch = self._batch
        batch.chunks.extend(chunks)
        try:
            await self._write_lock.acquire()
        except BaseException:
            if not batch.taken:
                mine = {id(c) for c in chunks}
                batch.chunks = [c for c in batch.chunks if id(c) not in mine]
            raise
        try:
            if batch.done:  # an earlier sender wrote our frames along with its own
                if batch.error is not None:
                    raise StreamClosed(str(batch.error))
                return
            batch.taken = True
            self._batch = _Batch()
            try:
                self._check_sendable()
                await self._stream.write(b"".join(batch.chunks))
            except StreamClosed as exc:
                batch.error = exc
                raise
            except Exception as exc:
                if not _is_stream_failure(exc):
                    batch.error = self._send_error = StreamClosed(f"write failed: {exc!r}")
                    raise
                batch.error = self._send_error = StreamClosed(f"stream broken: {exc}")
                raise StreamClosed(str(batch.error)) from exc
            except BaseException:  # cancelled mid-write: part of a frame may be out
                batch.error = self._send_error = StreamClosed("a write was cancelled")
                raise
            finally:
                batch.done = True
        finally:
            self._write_lock.release()

    def _check_sendable(self) -> None:
        if self._closed:
            raise StreamClosed("stream closed locally")
        if self._send_error is not None:
            raise StreamClosed(str(self._send_error))

    # ------------------------------------------------------------ ending

    async def close(self) -> None:
        """Finish the in-flight write, then close; idempotent, at most `CLOSE_TIMEOUT` s."""
        if self._closed:
            return
        self._closed = True
        with shielded_for(CLOSE_TIMEOUT):
            async with self._write_lock:
                await self._end("close")

    async def reset(self) -> None:
        """Abort the stream in both directions; idempotent, at most `CLOSE_TIMEOUT` s."""
        if self._was_reset:
            return
        self._was_reset = self._closed = True
        with shielded_for(CLOSE_TIMEOUT):
            await self._end("reset")

    async def _end(self, how: str) -> None:
        try:
            await getattr(self._stream, how)()
        except Exception as exc:
            if not _is_stream_failure(exc):
                raise
            logger.debug("%s of %r failed: %r", how, self, exc)
