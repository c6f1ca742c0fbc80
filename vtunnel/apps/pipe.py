"""The one relay engine, and the legs, opener type and header reader the proxy fronts use.

A :class:`Relay` copies both ways between two *ends* (:class:`RelayEnd`) until both directions have ended:

* :class:`SocketEnd`: a lean TCP socket; the end is its asyncio protocol (``io.stream_sockets``);
* :class:`TunnelEnd`: a tunnel stream; the end is its consumer (``TunnelStream.attach``);
* :class:`StreamEnd`: any other anyio byte stream (TLS, the WebSocks client connection, tests), with a reader and a
  writer task that exist only while :meth:`Relay.run` runs.

A front talks on a connection before it relays it: a :class:`Leg` is that connection, typed by what it is (a
:class:`SocketLeg`, :class:`TunnelLeg` or :class:`StreamLeg`), a byte stream for the front's exchange that turns
into the matching end (:meth:`Leg.relay_end`) when :func:`join` relays it.

A relay of a socket and a tunnel stream runs no task: an idle one is three small objects waiting for a callback.
The rules are the relay's, the same for every pair of ends (docs/agent.md, "The relay"): an end of stream is
passed on as a half-close (``a``, the client, cannot half-close: the end of ``b``'s answer closes both; ``b``
cannot: the end of the request waits for the answer); a broken end ends both, and an end whose incoming direction
had not ended is reset, not closed; a full end stops the reading of the other; the optional idle timeout ends both
when nothing moved for that long; both ends are closed when it is over (what was written still goes out).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol, TypeVar

import anyio
import structlog
from anyio.abc import ByteStream, SocketAttribute

from vtunnel.io.splice import SPLICE_AVAILABLE, SpliceRelay
from vtunnel.io.stream_sockets import DetachedSocket, LeanSocketStream, SocketTransport
from vtunnel.io.tuning import linger_reset
from vtunnel.runtime.byte_stream import TunnelByteStream
from vtunnel.runtime.errors import StreamRefused
from vtunnel.runtime.tunnel_stream import TunnelStream

if TYPE_CHECKING:
    from vtunnel.protocol import StreamMetadata

__all__ = [
    "CHUNK_SIZE",
    "READ_FLOOR",
    "HeaderTooLarge",
    "IdleTimer",
    "Leg",
    "Opener",
    "Relay",
    "RelayEnd",
    "SocketEnd",
    "SocketLeg",
    "StreamBuffer",
    "StreamEnd",
    "StreamLeg",
    "TunnelEnd",
    "TunnelLeg",
    "join",
    "pipe",
    "reset_on_close",
]

log = structlog.get_logger(__name__)

#: The largest read a :class:`StreamEnd` issues, and what it queues before it is full: anyio's socket streams hand
#: out what the event loop read (up to 256 KiB), and a smaller read would split, and so copy, those chunks.
CHUNK_SIZE: Final = 256 * 1024
#: The smallest read of an end while its other end takes anything at all: a relay reads no further ahead than
#: the other end can send now (a tunnel stream's send window), but not in pieces smaller than this.
READ_FLOOR: Final = 16 * 1024

#: Opens one stream through the tunnel for the given metadata (a leg: the front may talk on it, then relays it).
#: Raises ``vtunnel.runtime.errors.StreamRefused`` when the server refused it and
#: ``vtunnel.runtime.errors.TunnelUnavailable`` when no tunnel can be used.
Opener = Callable[["StreamMetadata"], Awaitable["Leg"]]

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


# ------------------------------------------------------------------------------------------------ the relay


class RelayEnd(Protocol):
    """One side of a :class:`Relay`, which calls these; the end calls the relay back: ``received(end, data)``,
    ``ended(end)`` (its end of stream), ``broken(end)``, ``full(end)`` / ``room(end)`` (its writes are over / back
    under its limit) and ``eof_refused(end)`` (it cannot half-close). It reports nothing before the first
    :meth:`resume_reading`, and then first what arrived before (bytes a front read past its header, an end of
    stream)."""

    @property
    def serve(self) -> Callable[[], Coroutine[Any, Any, None]] | None:
        """What the end runs in a task while relayed (a byte stream's reader and writer); ``None``: nothing."""

    def start(self, relay: Relay) -> None:
        """Report to ``relay`` from now on."""

    def write(self, data: bytes) -> None:
        """Send after what was written before; never blocks (a full end tells the relay)."""

    def writable_size(self) -> int:
        """Bytes a :meth:`write` would pass on now without holding them (0: it would hold all of them)."""

    def write_eof(self) -> None:
        """Half-close once what was written went out."""

    def pause_reading(self) -> None:
        """Report no bytes until :meth:`resume_reading` (a tunnel stream holds back its peer's credit)."""

    def resume_reading(self) -> None: ...

    def close(self) -> None:
        """Close once what was written went out."""

    def reset(self) -> None:
        """Close at once, dropping what was not sent: the peer sees a reset (idempotent, also after close)."""


# bits of Relay._state (one integer per relay: an idle relay is a few slots)
_EOF_A: Final = 1  # a was given its end of stream (b -> a ended)
_EOF_B: Final = 2
_FULL_A: Final = 4  # a is full: b is not read
_FULL_B: Final = 8
_FINISHED: Final = 16


class Relay:
    """Copies between two ends until both directions ended, following the rules in the module docstring.

    The relay starts at once: it owns both ends from then on (the caller must not close them). ``a`` is the end
    that asked for the connection, ``b`` the end it reached.
    """

    __slots__ = ("_a", "_b", "_idle", "_state", "_waiter", "a_to_b", "b_to_a")

    def __init__(self, a: RelayEnd, b: RelayEnd, *, idle_timeout: float | None = None) -> None:
        self._a = a
        self._b = b
        self._state = 0
        self._waiter: asyncio.Future[None] | None = None
        self.a_to_b = 0  # bytes moved each way
        self.b_to_a = 0
        self._idle = None if idle_timeout is None else IdleTimer(idle_timeout, self._moved, self.close)
        a.start(self)
        b.start(self)
        if self._idle is not None:
            self._idle.start()
        if not self._state & _FULL_B:
            a.resume_reading()
        if not self._state & (_FINISHED | _FULL_A):
            b.resume_reading()

    def _moved(self) -> int:
        return self.a_to_b + self.b_to_a

    def other_room(self, end: RelayEnd) -> Callable[[], int]:
        """What ``end`` asks before each read: the other end's ``writable_size``, looked up once (a read asks the
        other end itself, not the relay)."""
        return (self._b if end is self._a else self._a).writable_size

    # -------------------------------------------------------------------- for the owner
    async def run(self) -> None:
        """Serve the ends that need a task until the relay is over; returns at once when none does (the relay
        then lives on in callbacks). Cancelled, it ends the relay (both ends closed)."""
        tasks = [serve for serve in (self._a.serve, self._b.serve) if serve is not None]
        if tasks:
            async with anyio.create_task_group() as tg:
                for serve in tasks:
                    tg.start_soon(serve)

    async def wait(self) -> tuple[int, int]:
        """Wait until the relay is over (awaiting needs no task of its own); ``(a_to_b, b_to_a)`` bytes."""
        if not self._state & _FINISHED:
            if self._waiter is None:
                self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self.a_to_b, self.b_to_a

    @property
    def finished(self) -> bool:
        return bool(self._state & _FINISHED)

    def close(self) -> None:
        """End the relay now: both ends closed (what was written still goes out)."""
        self._finish(0)

    def splice(self, end: TunnelEnd, dedicated: socket.socket, to_peer: bytes, ended: bool) -> bool:
        """``end``'s lite-tls stream left the tunnel for ``dedicated`` (docs/lite-tls.md, splice mode): when the
        other end is a socket, it and ``dedicated`` are relayed in the kernel from now on (``io.splice``) and
        this relay is over without closing either end; ``to_peer`` goes to ``dedicated`` first, then its FIN if
        ``ended``. False when the other end has no socket to give (nothing changed)."""
        other = self._b if end is self._a else self._a
        if self._state & _FINISHED or not SPLICE_AVAILABLE or not isinstance(other, SocketEnd):
            return False
        taken = other.detach()
        if taken is None:
            return False
        self._state |= _FINISHED
        idle = self._idle
        if idle is not None:  # the kernel relay gets the same idle timeout, counting its own bytes
            idle.stop()
        a_to_b = other is self._a
        on_close = taken.on_close

        def done(moved: tuple[int, int]) -> None:
            if idle is not None:
                idle.stop()
            if a_to_b:
                self.a_to_b += moved[0]
                self.b_to_a += moved[1]
            else:
                self.b_to_a += moved[0]
                self.a_to_b += moved[1]
            end.stream.spliced_relay_ended()
            if on_close is not None:
                on_close()
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        spliced = SpliceRelay(
            taken.sock,
            dedicated,
            to_a=taken.unsent,
            to_b=to_peer,
            a_ended=taken.ended or ended,
            a_shut=taken.write_closed,
            on_done=done,
            count_b=end.stream.count_spliced,  # the dedicated connection's bytes count as the tunnel's
        )
        if idle is not None and not spliced.finished:
            self._idle = idle = IdleTimer(idle.timeout, lambda: spliced.moved, spliced.close)
            idle.start()
        return True

    # -------------------------------------------------------------------- from the ends
    def received(self, end: RelayEnd, data: bytes) -> None:
        if self._state & _FINISHED:
            return
        if end is self._a:
            self.a_to_b += len(data)
            self._b.write(data)
        else:
            self.b_to_a += len(data)
            self._a.write(data)

    def ended(self, end: RelayEnd) -> None:
        """``end``'s input ended: half-close the other end."""
        if self._state & _FINISHED:
            return
        other, bit = (self._b, _EOF_B) if end is self._a else (self._a, _EOF_A)
        other.write_eof()
        self._state |= bit
        if self._state & (_EOF_A | _EOF_B) == _EOF_A | _EOF_B:
            self._finish(0)

    def eof_refused(self, end: RelayEnd) -> None:
        """``end`` cannot half-close: when it is the client, the end of the answer closes both; else the end of
        the request waits for the answer."""
        if end is self._a:
            self._finish(0)

    def broken(self, end: RelayEnd) -> None:
        """``end`` broke: both end now; an end whose incoming direction had not ended is reset."""
        if not self._state & _FINISHED:
            log.debug("relay.broken", end=type(end).__name__)
            self._finish(~self._state & (_EOF_A | _EOF_B))

    def full(self, end: RelayEnd) -> None:
        """``end`` takes no more for now: the other end is not read until :meth:`room`."""
        bit, other = (_FULL_A, self._b) if end is self._a else (_FULL_B, self._a)
        if not self._state & bit:
            self._state |= bit
            other.pause_reading()

    def room(self, end: RelayEnd) -> None:
        bit, other = (_FULL_A, self._b) if end is self._a else (_FULL_B, self._a)
        if self._state & bit:
            self._state &= ~bit
            if not self._state & _FINISHED:
                other.resume_reading()

    def _finish(self, reset: int) -> None:
        """Close both ends, resetting those whose bit (``_EOF_A``, ``_EOF_B``) is in ``reset``."""
        if self._state & _FINISHED:
            return
        self._state |= _FINISHED
        if self._idle is not None:
            self._idle.stop()
        for end, bit in ((self._a, _EOF_A), (self._b, _EOF_B)):
            if reset & bit:
                end.reset()
            else:
                end.close()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class IdleTimer:
    """Calls ``expire`` once ``moved()`` stayed the same for ``timeout`` seconds: a timer handle checks four times
    per period, so nothing reads the clock per chunk moved."""

    __slots__ = ("_expire", "_handle", "_moved", "_quiet", "_seen", "timeout")

    def __init__(self, timeout: float, moved: Callable[[], int], expire: Callable[[], None]) -> None:
        if timeout <= 0:
            raise ValueError("idle_timeout must be positive")
        self.timeout = timeout
        self._moved = moved
        self._expire = expire
        self._seen = moved()
        self._quiet = 0  # checks in a row that saw nothing move
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(self.timeout / 4, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        moved = self._moved()
        self._quiet = self._quiet + 1 if moved == self._seen else 0
        self._seen = moved
        if self._quiet < 4:
            self.start()
            return
        self._handle = None
        log.debug("relay.idle_timeout", idle_timeout=self.timeout)
        self._expire()


# ------------------------------------------------------------------------------------------------ the ends


class SocketEnd(asyncio.Protocol):
    """A relay end on one lean socket: this is its protocol (``io.stream_sockets.SocketTransport``).

    It may exist before its relay (a ``--forward`` connection is accepted before its tunnel stream is open): the
    socket is not read until the relay starts reading it. Given a front's ``LeanSocketStream``, it takes the
    socket over then (``hand_off``), with what the stream read but did not return, or at the relay's first write
    to it if that comes first (the other end may report what waited for it as soon as it is read).
    """

    __slots__ = ("_relay", "_room", "_stream", "transport")
    serve: ClassVar[None] = None

    def __init__(self, stream: LeanSocketStream | None = None) -> None:
        self.transport: SocketTransport | None = None  # None again once the connection is lost
        self._relay: Relay | None = None
        self._room: Callable[[], int] | None = None  # the other end's writable_size (Relay.other_room)
        self._stream = stream

    # -------------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, SocketTransport)
        self.transport = t = transport
        t.limit_reads(self._read_size)
        if self._relay is None:
            t.pause_reading()
        else:
            t.resume_reading()

    def _read_size(self) -> int:
        """The most bytes to read now: what the other end passes on at once, at least :data:`READ_FLOOR`, at most
        :data:`CHUNK_SIZE`. Bytes not read stay with their sender (the socket's receive buffer, so TCP holds the
        client back), not in this process."""
        room = self._room
        if room is None:
            return CHUNK_SIZE
        size = room()
        return CHUNK_SIZE if size >= CHUNK_SIZE else READ_FLOOR if size <= READ_FLOOR else size

    def data_received(self, data: bytes) -> None:
        assert self._relay is not None  # not read before the relay starts
        self._relay.received(self, data)

    def eof_received(self) -> bool:
        assert self._relay is not None
        self._relay.ended(self)
        return True  # keep the socket open for the other direction

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._relay is not None:
            self._relay.broken(self)

    def pause_writing(self) -> None:
        if self._relay is not None:
            self._relay.full(self)

    def resume_writing(self) -> None:
        if self._relay is not None:
            self._relay.room(self)

    # -------------------------------------------------------------------- RelayEnd
    def start(self, relay: Relay) -> None:
        self._relay = relay
        self._room = relay.other_room(self)

    def resume_reading(self) -> None:
        if self._stream is not None:
            self._take_over()  # connection_made (reading resumes), then what the stream knew
        elif self.transport is not None:
            self.transport.resume_reading()
        elif self._relay is not None:
            self._relay.broken(self)  # lost before the relay started

    def _take_over(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.hand_off(self)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def write(self, data: bytes) -> None:
        if self._stream is not None:
            self._take_over()  # the other end's first bytes may come before this end's resume_reading
        if self.transport is not None:
            self.transport.write(data)

    def writable_size(self) -> int:
        return CHUNK_SIZE  # the socket's write buffer says when it is full (pause_writing)

    def write_eof(self) -> None:
        self._take_over()
        t = self.transport
        if t is not None and not t.is_closing():
            try:
                t.write_eof()
            except OSError as exc:
                log.debug("relay.eof_failed", error=type(exc).__name__)
                if self._relay is not None:
                    self._relay.broken(self)

    def close(self) -> None:
        self._take_over()
        if self.transport is not None:
            self.transport.close()

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0), dropping what is unsent."""
        self._take_over()
        if self.transport is not None:
            linger_reset(self.transport.get_extra_info("socket"))
            self.transport.abort()

    def detach(self) -> DetachedSocket | None:
        """Give the socket up with what was not sent yet (:meth:`SocketTransport.detach`): nothing is reported to
        the relay after it; ``None`` when the socket is closing or gone."""
        self._take_over()
        t, self.transport = self.transport, None
        if t is None:
            return None
        taken = t.detach()
        if taken is None:
            self.transport = t
        return taken


# bits of TunnelEnd._state
_CLOSING: Final = 1  # close once the pending bytes went
_EOF_WANTED: Final = 2  # FIN once the pending bytes went
_NO_ROOM: Final = 4  # full while the tunnel's output is over its high-water mark
_TOLD_FULL: Final = 8  # the relay was told this end is full (Relay.full): it hears of the room again
_PUSHING: Final = 16  # in the stream's write: a room told meanwhile is for the push to see after it


class TunnelEnd:
    """A relay end on a tunnel stream: the stream's consumer (:meth:`TunnelStream.attach`, at the first
    :meth:`resume_reading`). Bytes the send window has no room for wait here (the end is full until they went, and
    while the tunnel's output is over its high-water mark); credit is returned to the peer for what the relay passed
    on, held back while the relay pauses this end."""

    __slots__ = ("_held", "_pending", "_relay", "_state", "stream")
    serve: ClassVar[None] = None
    _relay: Relay  # set by start(), before anything is reported

    def __init__(self, stream: TunnelStream) -> None:
        self.stream = stream
        self._pending: bytes | memoryview | None = None  # written, not yet taken by the send window
        self._held: int | None = 0  # credit held back while paused; None once reading (attached, not paused)
        self._state = 0  # _CLOSING, _EOF_WANTED, _NO_ROOM bits

    def start(self, relay: Relay) -> None:
        self._relay = relay

    @property
    def pending(self) -> int:
        """Bytes written to this end that the send window has not taken yet (held here, in this process)."""
        data = self._pending
        return 0 if data is None else len(data)

    # -------------------------------------------------------------------- StreamConsumer
    def stream_data(self, data: bytes) -> None:
        self._relay.received(self, data)
        if self._held is None:
            self.stream.acknowledge(len(data))
        else:
            self._held += len(data)

    def stream_eof(self) -> None:
        self._relay.ended(self)

    def stream_broken(self) -> None:
        if self._state & _CLOSING:
            self.reset()  # the relay is over: only the pending bytes were waiting
        else:
            self._relay.broken(self)

    def stream_spliced(self, dedicated: socket.socket, to_peer: bytes, ended: bool) -> bool:
        """The stream left for a dedicated connection: the relay joins it to the other end's socket in the
        kernel, after what this end still held for the stream."""
        pending = self._pending
        if pending is not None:
            to_peer += bytes(pending)
            ended = ended or bool(self._state & _EOF_WANTED)
        if not self._relay.splice(self, dedicated, to_peer, ended):
            return False
        self._pending = None
        self._state |= _CLOSING
        return True

    def stream_writable(self) -> None:
        if self._state & _PUSHING:
            # the write's transmit told the waiting streams of room, this one too (it may still be listed from
            # a has_room() that said no before the window opened): the push looks at the room itself next
            return
        pending = self._pending
        if pending is not None:
            self._pending = None
            self.write(pending)  # (pushes what waited)
        elif self._state & _TOLD_FULL and not self._window_shut() and self.stream.has_room():
            # (the window first: has_room() asks for a call once the output drained when it says no, and a
            # stream whose window is shut has nothing to write then)
            self._state &= ~(_NO_ROOM | _TOLD_FULL)
            self._relay.room(self)

    # -------------------------------------------------------------------- RelayEnd
    def resume_reading(self) -> None:
        held, self._held = self._held, None
        if not self.stream.attached:
            self.stream.attach(self)  # reports what waited for it, then the end of stream or breakage
        elif held:
            self.stream.acknowledge(held)

    def pause_reading(self) -> None:
        if self._held is None:
            self._held = 0

    def write(self, data: bytes | memoryview) -> None:
        """Queue ``data`` behind what waits, or hand it to the stream now: what the window does not take waits
        (the end is full until it went)."""
        if self._pending is not None:
            self._pending = bytes(self._pending) + data
            return
        # pending while the stream takes it (a splice meanwhile sends it on the dedicated connection)
        self._pending = data
        stream = self.stream
        self._state |= _PUSHING
        try:
            n = stream.write(data)
        except _BROKEN:
            self._state &= ~_PUSHING
            self.stream_broken()
            return
        self._state &= ~_PUSHING
        if n < len(data):
            self._pending = memoryview(data)[n:]
            self._state |= _TOLD_FULL
            self._relay.full(self)
            return
        self._pending = None
        state = self._state
        if state & _EOF_WANTED:
            stream.write_eof()
        if state & _CLOSING:
            stream.close()
        elif not state & _EOF_WANTED and self._window_shut():
            # the data took the window: the other end is not read until it opens (stream_writable, which then
            # asks for room if the output is over its mark), so no read waits here
            if not state & _TOLD_FULL:
                self._state |= _TOLD_FULL
                self._relay.full(self)
        elif not stream.has_room():  # the tunnel's output is over its high-water mark: stream_writable comes
            self._state |= _NO_ROOM | _TOLD_FULL  # once it drained
            self._relay.full(self)
        elif state & _TOLD_FULL:  # (else the relay reads the other end already: nothing to tell)
            self._state &= ~(_NO_ROOM | _TOLD_FULL)
            self._relay.room(self)

    def writable_size(self) -> int:
        return 0 if self._pending is not None else self.stream.send_room()

    def write_eof(self) -> None:
        if self._pending is None:
            self.stream.write_eof()
        else:
            self._state |= _EOF_WANTED

    def _window_shut(self) -> bool:
        """The send window is shut (a lite-tls stream's tracker takes what comes and waits for credit itself)."""
        stream = self.stream
        return stream.send_room() <= 0 and not stream.lite_tls  # (the window first: it is open, mostly)

    def close(self) -> None:
        self._state |= _CLOSING
        if self._pending is None:
            self.reset()

    def reset(self) -> None:
        self._state |= _CLOSING
        self._pending = None
        self.stream.close()  # RST if it is still open both ways


class StreamEnd:
    """A relay end on any other anyio byte stream: a reader task and a writer task, which exist only while
    :meth:`serve` runs (inside :meth:`Relay.run`). The writer sends what was queued with one ``send``; the end
    is full while :data:`CHUNK_SIZE` bytes or more wait."""

    _relay: Relay  # set by start()

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self._queue: list[bytes] = []
        self._queued = 0
        self._full = False
        self._reading = anyio.Event()
        self._wakeup = anyio.Event()
        self._eof = 0  # 1: FIN wanted, 2: sent
        self._closing = False
        self._reset = False

    def start(self, relay: Relay) -> None:
        self._relay = relay

    async def serve(self) -> None:
        relay = self._relay
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read, relay)
                await self._write(relay)
                tg.cancel_scope.cancel()
        finally:
            relay.close()  # cancelled from outside: the relay ends with this end
            if self._reset:
                reset_on_close(self.stream)
            with anyio.CancelScope(shield=True):
                try:
                    await self.stream.aclose()
                except _BROKEN as exc:
                    log.debug("relay.close_failed", error=type(exc).__name__)

    async def _read(self, relay: Relay) -> None:
        while True:
            await self._reading.wait()
            try:
                # (its bytes are in this process already, in the stream's own buffer: a smaller read than
                # CHUNK_SIZE would only split and copy them; a full other end pauses this reader all the same)
                data = await self.stream.receive(CHUNK_SIZE)
            except anyio.EndOfStream:
                await self._reading.wait()
                relay.ended(self)
                return
            except Exception as exc:
                _log_failure(exc)
                relay.broken(self)
                return
            await self._reading.wait()  # paused while the read was under way: the bytes wait for the resume
            relay.received(self, data)

    async def _write(self, relay: Relay) -> None:
        while not self._reset:
            if self._queue:
                data = b"".join(self._queue) if len(self._queue) > 1 else self._queue[0]
                self._queue.clear()
                try:
                    await self.stream.send(data)
                except Exception as exc:
                    _log_failure(exc)
                    relay.broken(self)
                    return
                self._queued -= len(data)
                if self._full and self._queued < CHUNK_SIZE:
                    self._full = False
                    relay.room(self)
            elif self._eof == 1:
                self._eof = 2
                try:
                    await self.stream.send_eof()
                except NotImplementedError:
                    relay.eof_refused(self)
                except Exception as exc:
                    _log_failure(exc)
                    relay.broken(self)
                    return
            elif self._closing:
                return
            else:
                self._wakeup = anyio.Event()
                await self._wakeup.wait()

    def write(self, data: bytes) -> None:
        if self._closing or self._reset:
            return
        self._queue.append(data)
        self._queued += len(data)
        self._wakeup.set()
        if not self._full and self._queued >= CHUNK_SIZE:
            self._full = True
            self._relay.full(self)

    def writable_size(self) -> int:
        return max(CHUNK_SIZE - self._queued, 0)

    def write_eof(self) -> None:
        self._eof = self._eof or 1
        self._wakeup.set()

    def pause_reading(self) -> None:
        if self._reading.is_set():
            self._reading = anyio.Event()

    def resume_reading(self) -> None:
        self._reading.set()

    def close(self) -> None:
        self._closing = True
        self._wakeup.set()
        self._reading.set()

    def reset(self) -> None:
        self._reset = True
        self._queue.clear()
        self.close()


def _log_failure(exc: Exception) -> None:
    if isinstance(exc, _BROKEN):
        log.debug("relay.broken", error=type(exc).__name__)
    else:  # a stream implementation failing in its own way still ends both directions
        log.warning("relay.failed", error=repr(exc))


def reset_on_close(stream: ByteStream) -> None:
    """Make closing ``stream`` send a TCP reset, when it is a TCP socket (other streams are left as they are): its
    peer must not take a clean end of stream for a complete answer."""
    linger_reset(stream.extra(SocketAttribute.raw_socket, None))


# ------------------------------------------------------------------------------------------------ joining


class Leg(Protocol):
    """A connection a front talks on (:attr:`stream`, a byte stream) before it relays it (:meth:`relay_end`, after
    which :attr:`stream` is done): each kind of connection says which relay end it becomes."""

    @property
    def stream(self) -> ByteStream: ...

    def relay_end(self) -> RelayEnd:
        """The connection as a relay end, with what the stream read and did not return (called once)."""
        ...


class SocketLeg:
    """A lean socket (a front's client, a dialed destination): relayed by its socket, a :class:`SocketEnd`."""

    __slots__ = ("stream",)

    def __init__(self, stream: LeanSocketStream) -> None:
        self.stream = stream

    def relay_end(self) -> SocketEnd:
        return SocketEnd(self.stream)


class TunnelLeg:
    """A tunnel stream: talked on through its byte-stream adapter, relayed by its callbacks, a :class:`TunnelEnd`."""

    __slots__ = ("stream",)

    def __init__(self, stream: TunnelByteStream) -> None:
        self.stream = stream

    def relay_end(self) -> TunnelEnd:
        return TunnelEnd(self.stream.hand_off())


class StreamLeg:
    """Any other anyio byte stream (TLS, a WebSocks server connection, tests): a :class:`StreamEnd`, two tasks."""

    __slots__ = ("stream",)

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream

    def relay_end(self) -> StreamEnd:
        return StreamEnd(self.stream)


def join(a: Leg, b: Leg, *, idle_timeout: float | None = None) -> Relay:
    """Relay between ``a`` (the client) and ``b`` (what it reached) from now on; the relay owns both. Await
    :meth:`Relay.run` next: it returns at once unless an end needs a task."""
    return Relay(a.relay_end(), b.relay_end(), idle_timeout=idle_timeout)


async def pipe(a: Leg, b: Leg, *, idle_timeout: float | None = None) -> tuple[int, int]:
    """Relay between ``a`` and ``b`` until it is over; ``(a_to_b, b_to_a)`` bytes. Cancelled, it ends the relay."""
    relay = join(a, b, idle_timeout=idle_timeout)
    try:
        await relay.run()
        return await relay.wait()
    finally:
        relay.close()
