"""The one contract between a transport and the tunnel it carries: a :class:`Link`.

A link is a reliable, ordered, push-mode byte pipe carrying exactly one tunnel. Every transport hands out links
(``Transport.connect`` returns one, ``Transport.listen`` yields one per peer), and the tunnel connection
(:mod:`vtunnel.runtime.connection`) is their only consumer:

* **input is pushed**: while :meth:`Link.run` runs, the link calls ``consumer.link_data(data)`` with the bytes as
  they arrive, and ``consumer.link_ended(error)`` once when no more will come (``None``: the peer ended it;
  otherwise the failure). :meth:`Link.pause_reading` stops the calls and :meth:`Link.resume_reading` restarts
  them; a paused link stops reading its transport, so the peer is held back by the transport's own flow control.
* **output never blocks**: :meth:`Link.send_nowait` takes all of ``data`` now or none of it, exactly like
  :meth:`anyio.streams.memory.MemoryObjectSendStream.send_nowait`: it returns, or raises
  :class:`anyio.WouldBlock` (nothing taken: the link's queue is full; ``consumer.link_writable()`` follows once
  there is room), :class:`anyio.ClosedResourceError` (this side closed the link) or
  :class:`anyio.BrokenResourceError` (the link failed). "Taken" means queued for sending in order; a link that
  can write synchronously (KCP) writes it in the same call.
* **room is asked before building output**: :meth:`Link.send_room` says how many bytes the next
  :meth:`Link.send_nowait` takes whole (:data:`ANY_SIZE`: a write of any size; 0: it would raise ``WouldBlock``).
  Asking arms ``consumer.link_writable()`` when the answer is 0, exactly as a refused write does, so a writer
  that asks first never builds (joins, seals) bytes the link would refuse, and resumes on the callback.
* **unreliable datagrams, where the transport has them**: :attr:`Link.max_datagram` says how large a datagram
  :meth:`Link.send_datagram_nowait` takes, and 0 that the link carries none (the default: byte streams, KCP).
  A datagram is delivered at most once, whole, as ``consumer.link_datagram(data)``, in any order with the other
  datagrams and with the bytes, or not at all; it is never retransmitted (``rudp://`` carries them).

Transports built on an anyio :class:`~anyio.abc.ByteStream` (tcp, tls, plugins) do not implement any of this:
they subclass :class:`vtunnel.transports.base.ByteStreamTransport`, and :class:`StreamLink` (below) turns their
byte stream into a link, owning its reader and writer tasks inside :meth:`Link.run`. :class:`LinkStream` goes the
other way, for code that wants to await bytes from a link (tools, tests).
"""

from __future__ import annotations

import abc
import asyncio
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Generic, Protocol, TypeVar

import anyio
import anyio.lowlevel
from anyio import TypedAttributeProvider, TypedAttributeSet, typed_attribute
from anyio.abc import AsyncResource, ByteStream, TaskGroup

from vtunnel.io.stream_sockets import LeanSocketStream, SocketTransport
from vtunnel.security.keys import UserKey

__all__ = [
    "ANY_SIZE",
    "Link",
    "LinkConsumer",
    "LinkStats",
    "LinkStream",
    "ListenerAttribute",
    "Refusals",
    "SocketLink",
    "StreamLink",
]

#: what :meth:`Link.send_room` says when the link takes a write of any size now (it queues what it cannot send yet)
ANY_SIZE: Final = 1 << 62
#: bytes a :class:`StreamLink` queues for its byte stream before ``send_nowait`` raises ``WouldBlock``
SEND_HIGH_WATER: Final = 1024 * 1024
#: how long closing a :class:`StreamLink` waits for what it queued to be sent
CLOSE_GRACE: Final = 1.0
#: unreliable datagrams a :class:`LinkStream` keeps for its reader
DATAGRAM_BACKLOG: Final = 256
#: the most a :class:`StreamLink` asks its byte stream for in one read: more than one event-loop read
#: (256 KiB), so a stream that decrypts or reassembles never has to split what it has into several reads
READ_SIZE: Final = 1024 * 1024


class LinkConsumer(Protocol):
    """What a link calls while :meth:`Link.run` runs (the tunnel connection implements it)."""

    def link_data(self, data: bytes) -> None:
        """Bytes arrived, in order. Called only while reading is not paused."""

    def link_writable(self) -> None:
        """``send_nowait`` raised ``WouldBlock`` earlier and the link has room again."""

    def link_ended(self, error: BaseException | None) -> None:
        """No more input: the peer ended the link (``None``) or it failed (the error). Called once."""

    def link_datagram(self, data: bytes) -> None:
        """An unreliable datagram arrived (only on a link whose ``max_datagram`` is not 0; not while paused)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LinkStats:
    """What a link knows of its path, read when asked (for metrics): ``None`` where the transport does not know.

    The counters only grow over the link's life.
    """

    #: smoothed round-trip time, seconds
    rtt: float | None = None
    #: the delivery-rate estimate, bytes per second (a paced sender's model of the path)
    delivery_rate: float | None = None
    #: packets (KCP segments) sent again
    retransmitted_packets: int | None = None
    #: stream bytes sent again (a transport that resends data, not packets)
    retransmitted_bytes: int | None = None
    #: packets declared lost
    lost_packets: int | None = None


@dataclass(slots=True)
class Refusals:
    """Peers a listener turned away, counted by reason (a short fixed word, never who they were): read by the
    metrics. A listener that has them gives them as ``listener.extra(ListenerAttribute.refusals)``."""

    #: peers that began a handshake and failed it (a wrong key, a replay, too slow, a broken TLS handshake)
    handshake_failures: Counter[str] = field(default_factory=Counter)
    #: connections and datagrams answered with nothing (or a stateless reset): probes, strays, the shed
    probes: Counter[str] = field(default_factory=Counter)


class ListenerAttribute(TypedAttributeSet):
    """Typed attributes of a tunnel listener (``listener.extra(ListenerAttribute.refusals, None)``)."""

    #: the listener's count of peers it refused
    refusals: Refusals = typed_attribute()
    #: a listener whose sessions live on its own socket (a datagram transport's) keeps routing their datagrams
    #: after the server stopped taking new tunnels; calling this makes it start no session any more (no
    #: handshake answered), so a peer tries again elsewhere (another worker) instead of waiting for a tunnel
    #: nobody accepts
    stop_accepting: Callable[[], None] = typed_attribute()


class Link(AsyncResource, TypedAttributeProvider):
    """A reliable ordered byte pipe carrying one tunnel, in push mode (see the module docstring).

    Addresses are anyio typed attributes (``link.extra(SocketAttribute.remote_address)``) where they exist.
    """

    @abc.abstractmethod
    async def run(self, consumer: LinkConsumer) -> None:
        """Deliver input to ``consumer`` until the link is closed or this call is cancelled.

        Input that arrived before the call is delivered at its start. Ending the input (``link_ended``) does not
        end this call: the link may still send (a half-closed peer still reads).
        """

    @abc.abstractmethod
    def send_nowait(self, data: bytes) -> None:
        """Take all of ``data`` now, or raise ``WouldBlock`` / ``ClosedResourceError`` / ``BrokenResourceError``."""

    @abc.abstractmethod
    def send_room(self) -> int:
        """How many bytes :meth:`send_nowait` takes whole now: a write of at most this many is taken (no
        ``WouldBlock``); :data:`ANY_SIZE` when any write is. 0: the link's queue is full, a write now raises
        ``WouldBlock``, and ``consumer.link_writable()`` follows once there is room (asking arms it, as a refused
        write does). A closed or failed link answers :data:`ANY_SIZE`: the write then raises its error. Cheap: the
        tunnel connection asks before every write."""

    def send_pieces_nowait(self, pieces: Sequence[bytes | memoryview]) -> None:
        """:meth:`send_nowait` of the pieces' bytes in order (a scatter-gather write where the link has one: a
        socket's ``sendmsg``). The pieces must not change afterwards (``bytes``, or views of ``bytes``)."""
        self.send_nowait(b"".join(pieces))

    @property
    def max_datagram(self) -> int:
        """The largest datagram :meth:`send_datagram_nowait` takes; 0: this link carries no unreliable datagrams
        (what a link says unless its transport has them)."""
        return 0

    def send_datagram_nowait(self, data: bytes) -> None:
        """Send ``data`` as one unreliable datagram: it reaches the peer's ``link_datagram`` at most once, maybe
        never, in any order. Never blocks and never raises ``WouldBlock``: a datagram the link has no room for
        is dropped, as a full network queue would. Raises ``ValueError`` when ``data`` is larger than
        :attr:`max_datagram` (always, on a link without datagrams), else like :meth:`send_nowait`."""
        raise ValueError(f"a {len(data)}-byte datagram: this link carries no datagrams")

    @abc.abstractmethod
    def pause_reading(self) -> None:
        """Stop calling ``link_data`` (and ``link_datagram``: datagrams arriving meanwhile are dropped) until
        :meth:`resume_reading` (idempotent)."""

    @abc.abstractmethod
    def resume_reading(self) -> None:
        """Deliver again, starting with what arrived while paused (idempotent)."""

    @abc.abstractmethod
    async def send_eof(self) -> None:
        """Send what is queued, then end this direction. A link that cannot half-close closes itself."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close the link (idempotent): later calls raise ``ClosedResourceError``; ``run`` returns."""

    def carry_passthrough_records(self) -> bool:
        """Called once, before anything is sent: from now on send PASSTHROUGH DATA frames (lite-tls) as
        passthrough records, their TLS record bodies outside the link's encryption (docs/security.md). True if
        this link does (a byte stream with a key); False (the default: no key, kcp://, rudp://) and the tunnel
        does not offer lite-tls over it, unless its streams may leave over dedicated connections (splice mode,
        docs/lite-tls.md)."""
        return False

    def carry_passthrough_runs(self) -> bool:
        """Asked once, after :meth:`carry_passthrough_records` said yes: whether a PASSTHROUGH frame may also carry
        a run of whole TLS records (the ``lite-tls-runs`` extension, docs/lite-tls.md). True on a byte stream with
        a key (its passthrough record seals every record header of the run); False (the default) and the tunnel
        does not offer it."""
        return False

    def user(self) -> UserKey | None:
        """On a server's link with a key: the user whose key the peer authenticated with (docs/security.md, Users).
        None on a client's link and without a key (the default)."""
        return None

    def stats(self) -> LinkStats:
        """The path's round trip, rate and losses as far as the transport knows them (nothing, by default).

        Cheap, and called only when someone asks (a metrics scrape), never on the data path. Still answers
        after the link closed, with its last values.
        """
        return LinkStats()


#: a link type, for :class:`LinkStream`
LinkT = TypeVar("LinkT", bound="Link")


class StreamLink(Link):
    """A link over an anyio :class:`~anyio.abc.ByteStream`: the one adapter for byte-stream transports.

    ``send_nowait`` queues (up to :data:`SEND_HIGH_WATER`; the queue always takes one chunk when empty, so no
    frame is ever too large) and a writer task inside :meth:`run` sends the queue with one ``send`` of all of it
    each time the previous one finished. A reader task inside :meth:`run` receives and pushes. Both end with
    :meth:`run`.
    """

    def __init__(self, stream: ByteStream) -> None:
        self._stream = stream
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._blocked = False  # a send_nowait raised WouldBlock: link_writable is owed
        self._send_wakeup = anyio.Event()
        self._sent = anyio.Event()  # set each time the queue is empty (send_eof waits for it)
        self._sent.set()
        self._resume = anyio.Event()
        self._resume.set()
        self._error: BaseException | None = None
        self._eof_sent = False
        self._closed = False
        self._closed_event = anyio.Event()
        self._consumer: LinkConsumer | None = None
        self._writer_scope = anyio.CancelScope()
        self._writer_exited = anyio.Event()

    @property
    def stream(self) -> ByteStream:
        """The byte stream this link runs over."""
        return self._stream

    async def run(self, consumer: LinkConsumer) -> None:
        self._consumer = consumer
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._writer, consumer)
                await self._reader(consumer)
                await self._closed_event.wait()  # input ended; the writer goes on until the link is closed
                tg.cancel_scope.cancel()
        finally:
            self._consumer = None

    async def _reader(self, consumer: LinkConsumer) -> None:
        stream = self._stream
        while True:
            await self._resume.wait()
            try:
                data = await stream.receive(READ_SIZE)
            except anyio.EndOfStream:
                await self._resume.wait()
                consumer.link_ended(None)
                return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self._error = self._error or exc
                consumer.link_ended(exc)
                return
            await self._resume.wait()  # paused while the read was under way: the bytes wait for the resume
            consumer.link_data(data)

    async def _writer(self, consumer: LinkConsumer) -> None:
        try:
            with self._writer_scope:
                await self._write_queue(consumer)
        finally:
            self._writer_exited.set()

    async def _write_queue(self, consumer: LinkConsumer) -> None:
        queue = self._queue
        while True:
            if not queue:
                self._sent.set()
                if self._closed:
                    return
                self._send_wakeup = anyio.Event()
                await self._send_wakeup.wait()
                continue
            data = queue.popleft() if len(queue) == 1 else b"".join(queue)
            queue.clear()
            try:
                await self._stream.send(data)
            # (anyio's TLS stream raises EndOfStream for a write after the peer closed)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError) as exc:
                self._error = self._error or anyio.BrokenResourceError(f"write failed: {exc!r}")
                self._queued = 0
                self._sent.set()
                if self._blocked:
                    self._blocked = False
                    consumer.link_writable()  # its next send_nowait raises the error
                return
            self._queued -= len(data)
            if self._blocked and self._queued < SEND_HIGH_WATER:
                self._blocked = False
                consumer.link_writable()

    def send_nowait(self, data: bytes) -> None:
        if self._closed or self._eof_sent:
            raise anyio.ClosedResourceError
        if self._error is not None:
            raise anyio.BrokenResourceError(str(self._error)) from self._error
        if self._queued and self._queued + len(data) > SEND_HIGH_WATER:
            self._blocked = True
            raise anyio.WouldBlock
        self._queue.append(data)
        self._queued += len(data)
        self._sent = anyio.Event() if self._sent.is_set() else self._sent
        self._send_wakeup.set()

    def send_room(self) -> int:
        """Up to :data:`SEND_HIGH_WATER` queued; an empty queue takes any write."""
        queued = self._queued
        if not queued or self._closed or self._eof_sent or self._error is not None:
            return ANY_SIZE
        room = SEND_HIGH_WATER - queued
        if room <= 0:
            self._blocked = True
            return 0
        return room

    def pause_reading(self) -> None:
        if self._resume.is_set():
            self._resume = anyio.Event()

    def resume_reading(self) -> None:
        self._resume.set()

    async def send_eof(self) -> None:
        if self._closed or self._eof_sent:
            return
        self._eof_sent = True
        if self._consumer is not None:  # the writer runs: let it finish the queue
            await self._sent.wait()
        elif self._queue and self._error is None:
            data = b"".join(self._queue)
            self._queue.clear()
            await self._stream.send(data)
        if self._error is None:
            try:
                await self._stream.send_eof()
            except (NotImplementedError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                raise
            except Exception as exc:
                # the stream's own failure (anyio's TLS stream, its connection already shut, raises TypeError; a
                # plugin's may raise anything): the link is broken, which its user handles
                raise anyio.BrokenResourceError(f"send_eof failed: {exc!r}") from exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closed_event.set()
        self._send_wakeup.set()
        self._resume.set()
        try:
            if self._consumer is not None and not self._writer_exited.is_set():
                # what is queued still goes out if the peer takes it soon; the stream is never written by two
                # tasks at once (its own close may write: TLS, WebSocket)
                with anyio.move_on_after(CLOSE_GRACE):
                    await self._sent.wait()
                self._writer_scope.cancel()
                await self._writer_exited.wait()
        finally:  # closed even when this call is cancelled
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(CLOSE_GRACE) as scope:
                    await self._stream.aclose()
                if scope.cancelled_caught:
                    await anyio.aclose_forcefully(self._stream)

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._stream.extra_attributes


class SocketLink(Link, asyncio.Protocol):
    """A link straight on a connected socket's lean transport (:mod:`vtunnel.io.stream_sockets`): the socket's
    reads are pushed to the consumer from the event loop's callback, ``send_nowait`` writes at once (what the
    kernel does not take waits in the transport's buffer), and no task runs for it. ``tcp://`` links are these.

    It takes the socket over from a :class:`~vtunnel.io.stream_sockets.LeanSocketStream` that ran the
    transport's handshakes (the PSK one included), with whatever that stream read and did not return yet.
    """

    def __init__(self, stream: LeanSocketStream) -> None:
        self._transport: SocketTransport | None = None
        self._attributes = dict(stream.extra_attributes)
        self._consumer: LinkConsumer | None = None
        self._early: list[bytes] = []  # what arrived before run()
        self._ended = False  # the consumer was told (or will be, at run()) that input ended
        self._end_error: BaseException | None = None
        self._error: BaseException | None = None
        self._blocked = False
        self._write_paused = False
        self._eof_sent = False
        self._closed = False
        self._done = anyio.Event()
        stream.hand_off(self)

    # ------------------------------------------------------------------ Link
    async def run(self, consumer: LinkConsumer) -> None:
        self._consumer = consumer
        try:
            early, self._early = self._early, []
            for data in early:
                consumer.link_data(data)
            if self._ended:
                consumer.link_ended(self._end_error)
            await self._done.wait()
        finally:
            self._consumer = None

    def send_nowait(self, data: bytes) -> None:
        self._writer().write(data)

    def send_pieces_nowait(self, pieces: Sequence[bytes | memoryview]) -> None:
        self._writer().writelines(pieces)

    def send_room(self) -> int:
        """Any write while the transport's buffer is under its high-water mark (it buffers what the kernel does
        not take); 0 while it asked to pause writing."""
        if self._write_paused and not (self._closed or self._eof_sent or self._error is not None):
            self._blocked = True
            return 0
        return ANY_SIZE

    def _writer(self) -> SocketTransport:
        """The transport, if it takes a write now; else the exception ``send_nowait`` raises."""
        t = self._transport
        if self._closed or self._eof_sent:
            raise anyio.ClosedResourceError
        if self._error is not None or t is None or t.is_closing():
            raise anyio.BrokenResourceError(str(self._error or "connection lost"))
        if self._write_paused:
            self._blocked = True
            raise anyio.WouldBlock
        return t

    def pause_reading(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    async def send_eof(self) -> None:
        if self._closed or self._eof_sent:
            return
        self._eof_sent = True
        if self._transport is not None and self._error is None:
            self._transport.write_eof()  # after what is buffered
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if self._transport is not None:
                self._transport.close()  # what is buffered still goes out
            self._done.set()
        await anyio.lowlevel.checkpoint()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._attributes

    # ------------------------------------------------------------------ asyncio.Protocol (the transport calls)
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, SocketTransport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        consumer = self._consumer
        if consumer is None:
            self._early.append(data)
        else:
            consumer.link_data(data)

    def eof_received(self) -> bool:
        self._end(None)
        return True  # the peer half-closed: this side may still send

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self._error is None:
            self._error = exc
        self._end(exc or anyio.BrokenResourceError("connection lost"))  # (nothing once the peer's end came)
        self._write_paused = False
        self._wake_writer()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self._blocked:
            self._blocked = False
            if self._consumer is not None:
                self._consumer.link_writable()

    def _end(self, error: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._end_error = error
        if self._consumer is not None:
            self._consumer.link_ended(error)


class LinkStream(ByteStream, Generic[LinkT]):
    """A link read and written by awaiting, as an anyio byte stream (for tools and tests).

    Use it as an async context manager: it runs the link in a task of its own while open. Received bytes wait in
    a buffer of at most about ``buffer`` bytes; above that the link is paused until ``receive`` takes some.
    """

    def __init__(self, link: LinkT, *, buffer: int = 1024 * 1024) -> None:
        self.link: LinkT = link
        self._limit = buffer
        self._buffer = bytearray()
        self._paused = False
        self._ended = False
        self._error: BaseException | None = None
        self._readable = anyio.Event()
        self._writable = anyio.Event()
        self._closed = False
        self._tg: TaskGroup | None = None
        #: unreliable datagrams that arrived, oldest first (the caller takes them; beyond
        #: :data:`DATAGRAM_BACKLOG` the oldest is dropped, as a full socket buffer drops)
        self.datagrams: deque[bytes] = deque(maxlen=DATAGRAM_BACKLOG)

    async def __aenter__(self) -> LinkStream[LinkT]:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self.link.run, self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(exc_type, exc_val, exc_tb)

    # LinkConsumer
    def link_data(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > self._limit and not self._paused:
            self._paused = True
            self.link.pause_reading()
        self._readable.set()

    def link_writable(self) -> None:
        self._writable.set()

    def link_ended(self, error: BaseException | None) -> None:
        self._ended = True
        self._error = error
        self._readable.set()

    def link_datagram(self, data: bytes) -> None:
        self.datagrams.append(data)

    # ByteStream
    async def receive(self, max_bytes: int = 65536) -> bytes:
        while not self._buffer:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._ended:
                if self._error is None:
                    raise anyio.EndOfStream
                raise anyio.BrokenResourceError(str(self._error)) from self._error
            self._readable = anyio.Event()
            await self._readable.wait()
        data = bytes(self._buffer[:max_bytes])
        del self._buffer[:max_bytes]
        if self._paused and len(self._buffer) <= self._limit // 2:
            self._paused = False
            self.link.resume_reading()
        return data

    async def send(self, item: bytes) -> None:
        while True:
            try:
                self.link.send_nowait(item)
            except anyio.WouldBlock:
                self._writable = anyio.Event()
                await self._writable.wait()
                continue
            await anyio.lowlevel.checkpoint()
            return

    async def send_eof(self) -> None:
        await self.link.send_eof()

    async def aclose(self) -> None:
        self._closed = True
        self._readable.set()
        await self.link.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self.link.extra_attributes
