"""Bidirectional copy between two byte streams, and the opener type the proxy fronts use.

``pipe(a, b)`` copies ``a -> b`` and ``b -> a`` at the same time until both directions have ended:

* an end of stream on one side is passed on as ``send_eof()`` on the other (a faithful half-close) while the
  other direction keeps flowing; ``a`` is the side that asked for the connection (the client) and ``b`` the side
  it reached: when ``a`` cannot half-close (a TLS stream), the end of ``b``'s answer closes both instead;
* a broken or reset side (``BrokenResourceError``, ``ClosedResourceError``, ``OSError``) ends both directions
  at once, and a socket whose direction had not ended yet is reset (SO_LINGER 0), not closed: a clean end of
  stream would pass a cut-short transfer off as a whole one;
* an optional idle timeout ends both directions when no byte moved either way for that long;
* both streams are closed when it returns, whatever happened.

:class:`SocketRelay` does the same between one TCP socket and one tunnel stream with no task at all: it is the
socket's asyncio protocol and the stream's consumer, so an idle relay is a few small objects waiting for a
callback (no coroutine frames, no buffers, no events).  Back-pressure is the same as ``pipe``'s: the socket is
not read while the stream's send window is shut or the tunnel's output is over its high-water mark, and the
peer's credit is returned only once the socket took the bytes (its write buffer is under its high-water mark).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar, cast

import anyio
import structlog
from anyio.abc import ByteStream, SocketAttribute

from vtunnel.io.stream_sockets import LeanSocketStream
from vtunnel.runtime.errors import StreamRefused
from vtunnel.runtime.tunnel_stream import TunnelStream

if TYPE_CHECKING:
    from vtunnel.protocol import StreamMetadata

__all__ = [
    "CHUNK_SIZE",
    "HeaderTooLarge",
    "Opener",
    "SocketRelay",
    "StreamBuffer",
    "hand_to_relay",
    "pipe",
    "reset_on_close",
]

log = structlog.get_logger(__name__)

#: The largest read issued per step of the copy: anyio's socket streams hand out what the event loop read
#: (up to 256 KiB), and a smaller read would split, and so copy, those chunks.
CHUNK_SIZE = 256 * 1024

#: Opens one stream through the tunnel for the given metadata.  Raises
#: ``vtunnel.runtime.errors.StreamRefused`` when the server refused it and
#: ``vtunnel.runtime.errors.TunnelUnavailable`` when no tunnel can be used.
Opener = Callable[["StreamMetadata"], Awaitable[ByteStream]]


#: SO_LINGER on, zero seconds: close() sends RST
_LINGER_RESET = struct.pack("ii", 1, 0)

#: What a broken, reset or already closed side raises.
_BROKEN = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, StreamRefused)

T = TypeVar("T")


class HeaderTooLarge(Exception):
    """A peer sent more than the allowed number of bytes without completing a header."""


class StreamBuffer:
    """Reads a protocol header off a byte stream with an incremental parser, keeping what follows it.

    ``parser(buffer)`` returns ``None`` while it needs more bytes, or ``(value, consumed)``; it raises its own
    error for malformed input.  Bytes after the header stay in ``pending`` (for example data a 0-RTT client
    sent before our reply); ``take_pending()`` hands them over.
    """

    __slots__ = ("limit", "pending", "stream")

    def __init__(self, stream: ByteStream, *, limit: int = 65536, initial: bytes = b"") -> None:
        self.stream = stream
        self.limit = limit
        self.pending = bytearray(initial)

    async def parse(self, parser: Callable[[bytes], tuple[T, int] | None]) -> T:
        """Receive until ``parser`` completes; ``anyio.EndOfStream`` if the peer ends first."""
        while True:
            if self.pending:
                result = parser(bytes(self.pending))
                if result is not None:
                    value, consumed = result
                    del self.pending[:consumed]
                    return value
            if len(self.pending) >= self.limit:
                raise HeaderTooLarge(f"no complete header in {len(self.pending)} bytes")
            self.pending += await self.stream.receive()

    def take_pending(self) -> bytes:
        data = bytes(self.pending)
        self.pending.clear()
        return data


class _Progress:
    """Bytes moved per direction, shared with the idle watcher (no clock read per chunk); which directions
    passed their end of stream on, and whether a side broke."""

    __slots__ = ("broken", "ended", "moved")

    def __init__(self) -> None:
        self.moved = [0, 0]
        self.ended = [False, False]
        self.broken = False

    def total(self) -> int:
        return self.moved[0] + self.moved[1]


async def _copy(
    src: ByteStream, dst: ByteStream, progress: _Progress, index: int, scope: anyio.CancelScope
) -> None:
    """Copy ``src`` into ``dst`` until ``src`` ends; on a broken side cancel ``scope`` (both directions)."""
    moved = progress.moved
    try:
        while True:
            try:
                data = await src.receive(CHUNK_SIZE)
            except anyio.EndOfStream:
                break
            await dst.send(data)
            moved[index] += len(data)
    except _BROKEN as exc:
        log.debug("pipe.broken", error=type(exc).__name__)
        progress.broken = True
        scope.cancel()
        return
    except Exception as exc:  # a stream implementation failing in its own way still ends both directions
        log.warning("pipe.failed", error=repr(exc))
        progress.broken = True
        scope.cancel()
        return
    try:
        await dst.send_eof()
    except NotImplementedError:
        # The other side cannot half-close (a TLS stream). The end of the request waits for the answer (the
        # remaining direction ends the pipe); the end of the answer can only be passed on by closing the client.
        if index == 1:
            progress.ended[index] = True
            scope.cancel()
            return
    except _BROKEN as exc:
        log.debug("pipe.eof_failed", error=type(exc).__name__)
        progress.broken = True
        scope.cancel()
        return
    progress.ended[index] = True


async def _watch_idle(idle_timeout: float, progress: _Progress, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` once no chunk moved for ``idle_timeout`` seconds (checked four times per period)."""
    step = idle_timeout / 4
    seen = progress.total()
    idle_for = 0.0
    while True:
        await anyio.sleep(step)
        if progress.total() != seen:
            seen = progress.total()
            idle_for = 0.0
            continue
        idle_for += step
        if idle_for >= idle_timeout:
            log.debug("pipe.idle_timeout", idle_timeout=idle_timeout)
            scope.cancel()
            return


async def pipe(a: ByteStream, b: ByteStream, *, idle_timeout: float | None = None) -> tuple[int, int]:
    """Copy both ways between ``a`` and ``b`` until both directions ended; return ``(a_to_b, b_to_a)`` bytes.

    Both streams are closed on return.  Cancellation from outside propagates after the streams are closed.
    """
    if idle_timeout is not None and idle_timeout <= 0:
        raise ValueError("idle_timeout must be positive")
    progress = _Progress()
    if idle_timeout is None:
        # the common case: one extra task (the other direction runs in this one), one task group
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_copy, b, a, progress, 1, tg.cancel_scope)
                await _copy(a, b, progress, 0, tg.cancel_scope)
        finally:
            with anyio.CancelScope(shield=True):
                await _close_both(a, b, progress)
        return progress.moved[0], progress.moved[1]
    try:
        with anyio.CancelScope() as outer:
            async with anyio.create_task_group() as tg:
                if idle_timeout is not None:
                    watcher = anyio.CancelScope()

                    async def watch() -> None:
                        with watcher:
                            await _watch_idle(idle_timeout, progress, outer)

                    tg.start_soon(watch)
                async with anyio.create_task_group() as copiers:
                    copiers.start_soon(_copy, a, b, progress, 0, outer)
                    copiers.start_soon(_copy, b, a, progress, 1, outer)
                if idle_timeout is not None:
                    watcher.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await _close_both(a, b, progress)
    return progress.moved[0], progress.moved[1]


async def _close_both(a: ByteStream, b: ByteStream, progress: _Progress) -> None:
    """Close both streams; after a broken side, a socket whose incoming direction had not ended is reset."""
    if progress.broken:
        if not progress.ended[0]:
            reset_on_close(b)
        if not progress.ended[1]:
            reset_on_close(a)
    await _close_quietly(a)
    await _close_quietly(b)


def reset_on_close(stream: ByteStream) -> None:
    """Make closing ``stream`` send a TCP reset, when it is a TCP socket (other streams are left as they are): its
    peer must not take a clean end of stream for a complete answer."""
    sock = stream.extra(SocketAttribute.raw_socket, None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


async def _close_quietly(stream: ByteStream) -> None:
    try:
        await stream.aclose()
    except _BROKEN as exc:
        log.debug("pipe.close_failed", error=type(exc).__name__)


# ------------------------------------------------------------------------------------------------ callback relay


def _reset_transport(transport: asyncio.Transport) -> None:
    """Close the connection under ``transport`` with a TCP reset (SO_LINGER 0), dropping what is unsent.

    A FIN tells the peer "that was everything"; when what it was sent is cut short (the tunnel died under its
    stream), a reset is the only way it can tell the difference.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class SocketRelay(asyncio.Protocol):
    """Copies between one TCP socket (this is its protocol) and one tunnel stream (this is its consumer).

    Same rules as :func:`pipe`: an end of stream on one side is passed on as a half-close; a reset, refused or
    broken side ends both at once; the optional idle timeout ends both when no byte moved for that long; both
    ends are closed when it is over, and ``on_done`` (if given) is called once then.  When the stream breaks
    (reset, refused, or its tunnel died under it) before its end of stream came, the socket is reset, not
    closed: its peer must not take a clean end of stream for the whole of what was sent to it.  The socket may come before
    the stream (a front opens the stream after the accept: the socket is not read until :meth:`attach`) or
    after it (the exit dials first).
    """

    __slots__ = (
        "_down_done",
        "_fin_pending",
        "_finished",
        "_held",
        "_idle",
        "_on_done",
        "_pending",
        "_room",
        "_stream",
        "_transport",
        "_up_done",
        "_waiter",
        "_write_paused",
        "moved_in",
        "moved_out",
    )

    def __init__(
        self, *, idle_timeout: float | None = None, on_done: Callable[[], None] | None = None
    ) -> None:
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")
        self._transport: asyncio.Transport | None = None
        self._stream: TunnelStream | None = None
        self._pending: bytes | memoryview | None = None  # socket bytes the window has no room for yet
        self._fin_pending = False  # the socket ended: FIN once ``_pending`` is sent
        self._up_done = False  # socket -> stream finished (FIN sent)
        self._down_done = False  # stream -> socket finished (peer FIN passed on)
        self._write_paused = False  # the socket's write buffer is over its high-water mark
        self._held = 0  # bytes written to the socket whose credit waits for it to drain
        self._finished = False
        self._waiter: asyncio.Future[None] | None = None
        self._room: asyncio.Task[None] | None = None
        self._idle: _IdleTimer | None = _IdleTimer(self, idle_timeout) if idle_timeout is not None else None
        self._on_done = on_done
        self.moved_in = 0  # bytes socket -> stream
        self.moved_out = 0  # bytes stream -> socket

    # -------------------------------------------------------------------- wiring
    def attach(self, stream: TunnelStream) -> None:
        """Relay to ``stream`` from now on (closes it at once if the socket is already gone)."""
        if self._finished:
            stream.close_nowait()
            return
        self._stream = stream
        stream.attach(self)
        self._start()

    def _start(self) -> None:
        if self._transport is None or self._stream is None or self._finished:
            return
        if self._idle is not None:
            self._idle.start()
        if self._pending is not None:
            self._push()
        elif self._fin_pending:
            self._send_fin()
        else:
            self._resume_if_clear()

    def factory(self) -> SocketRelay:
        """This relay, as the protocol factory ``loop.connect_accepted_socket`` asks for."""
        return self

    def close(self) -> None:
        """End the relay now (both ends closed; an open stream is reset)."""
        self._finish()

    def abort(self) -> None:
        """End the relay now because the connection cannot be carried: the socket is reset (its peer sees a
        connection reset, not an end of stream) and an open stream is reset."""
        self._finish(reset=True)

    def done(self) -> asyncio.Future[None]:
        """A future that completes when the relay is over (awaiting it needs no coroutine frame of its own)."""
        waiter = self._waiter
        if waiter is None:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            if self._finished:
                waiter.set_result(None)
        return waiter

    async def wait(self) -> tuple[int, int]:
        """Wait until the relay is over; ``(socket_to_stream, stream_to_socket)`` bytes."""
        await self.done()
        return self.moved_in, self.moved_out

    @property
    def finished(self) -> bool:
        return self._finished

    def _finish(self, *, reset: bool = False) -> None:
        if self._finished:
            return
        self._finished = True
        if self._idle is not None:
            self._idle.stop()
        if self._room is not None:
            self._room.cancel()
            self._room = None
        if self._transport is not None:
            if reset:
                _reset_transport(self._transport)
            else:
                self._transport.close()  # what was written still goes out
        if self._stream is not None:
            self._stream.close_nowait()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._ended()

    def _ended(self) -> None:
        """Called once when the relay is over (a subclass may override it instead of passing ``on_done``)."""
        if self._on_done is not None:
            on_done, self._on_done = self._on_done, None
            on_done()

    def _stream_failed(self) -> None:
        """The stream broke. Unless the peer's FIN was already passed on (the socket has the whole answer and
        only its own sending is cut short, which its next write learns from our kernel), reset the socket."""
        self._finish(reset=not self._down_done)

    def _maybe_done(self) -> None:
        if self._up_done and self._down_done:
            self._finish()

    # -------------------------------------------------------------------- socket side (asyncio.Protocol)
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        if self._stream is None:
            self._transport.pause_reading()
        self._start()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._finished:
            log.debug("relay.socket_lost", error=type(exc).__name__ if exc else None)
        self._finish()

    def data_received(self, data: bytes) -> None:
        self.moved_in += len(data)
        pending = self._pending
        self._pending = data if pending is None else bytes(pending) + data
        self._push()

    def eof_received(self) -> bool:
        self._fin_pending = True
        if self._pending is None:
            self._send_fin()
        return True  # keep the socket open for the other direction

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        held, self._held = self._held, 0
        if held and self._stream is not None:
            self._stream.acknowledge(held)

    # -------------------------------------------------------------------- socket -> stream
    def _push(self) -> None:
        stream = self._stream
        data = self._pending
        if stream is None or data is None or self._finished:
            return
        try:
            n = stream.send_nowait(data)
        except _BROKEN as exc:
            log.debug("relay.broken", error=type(exc).__name__)
            self._stream_failed()
            return
        if n < len(data):
            self._pending = memoryview(data)[n:]
            self._pause()
            return
        self._pending = None
        if self._fin_pending:
            self._send_fin()
            return
        if stream.outbound_congested:
            self._pause()
            if self._room is None:
                self._room = asyncio.get_running_loop().create_task(stream.wait_outbound_room())
                self._room.add_done_callback(self._room_free)
            return
        self._resume_if_clear()

    def _room_free(self, task: asyncio.Task[None]) -> None:
        if self._room is task:
            self._room = None
            self._resume_if_clear()

    def _pause(self) -> None:
        if self._transport is not None and self._transport.is_reading():
            self._transport.pause_reading()

    def _resume_if_clear(self) -> None:
        t = self._transport
        if (
            t is not None
            and not self._finished
            and self._pending is None
            and self._room is None
            and not self._fin_pending
            and not t.is_reading()
        ):
            t.resume_reading()

    def _send_fin(self) -> None:
        if self._up_done or self._stream is None:
            return
        self._up_done = True
        self._stream.send_eof_nowait()
        self._maybe_done()

    # -------------------------------------------------------------------- stream -> socket (StreamConsumer)
    def stream_data(self, data: bytes) -> None:
        self.moved_out += len(data)
        t = self._transport
        stream = self._stream
        assert stream is not None
        if t is None or self._finished or t.is_closing():
            stream.acknowledge(len(data))  # nobody will read it: do not hold the peer's credit
            return
        t.write(data)
        if self._write_paused:
            self._held += len(data)
        else:
            stream.acknowledge(len(data))

    def stream_eof(self) -> None:
        if self._down_done:
            return
        self._down_done = True
        t = self._transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            try:
                t.write_eof()
            except OSError as exc:
                log.debug("relay.eof_failed", error=type(exc).__name__)
                self._finish(reset=True)
                return
        self._maybe_done()

    def stream_broken(self) -> None:
        log.debug("relay.stream_broken")
        self._stream_failed()

    def stream_writable(self) -> None:
        if self._pending is not None:
            self._push()


def hand_to_relay(socket_end: ByteStream, tunnel_end: ByteStream) -> SocketRelay | None:
    """Join ``socket_end`` to ``tunnel_end`` with a :class:`SocketRelay` when both allow it (a lean socket stream
    and a tunnel stream): the relay then owns both and no task is needed.  Returns the relay, or ``None`` when
    the caller must ``await pipe(socket_end, tunnel_end)`` instead.  Either way the caller must not close
    either end itself once this returned a relay."""
    if not isinstance(socket_end, LeanSocketStream) or not isinstance(tunnel_end, TunnelStream):
        return None
    relay = SocketRelay(on_done=socket_end.on_relay_done)
    early, eof = socket_end.hand_off(relay)
    if early:
        relay.data_received(early)
    if eof:
        relay.eof_received()
    relay.attach(tunnel_end)
    return relay


class _IdleTimer:
    """Ends a relay once no byte moved either way for ``timeout`` seconds (checked four times per period)."""

    __slots__ = ("_handle", "_idle_for", "_relay", "_seen", "_step", "timeout")

    def __init__(self, relay: SocketRelay, timeout: float) -> None:
        self._relay = relay
        self.timeout = timeout
        self._step = timeout / 4
        self._seen = 0
        self._idle_for = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._handle is None:
            self._seen = self._relay.moved_in + self._relay.moved_out
            self._handle = asyncio.get_running_loop().call_later(self._step, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        total = self._relay.moved_in + self._relay.moved_out
        if total != self._seen:
            self._seen = total
            self._idle_for = 0.0
        else:
            self._idle_for += self._step
            if self._idle_for >= self.timeout:
                self._handle = None
                log.debug("pipe.idle_timeout", idle_timeout=self.timeout)
                self._relay.close()
                return
        self._handle = asyncio.get_running_loop().call_later(self._step, self._check)
