"""A tunnel stream as an anyio :class:`~anyio.abc.ByteStream`.

``send`` waits for flow-control credit and transport room; ``receive`` returns buffered bytes and gives the credit
back; ``send_eof`` is a FIN (half-close, the other direction keeps flowing); ``aclose`` frees the stream.
Streams of kind ``udp`` keep message boundaries: one ``send`` is one DATA frame, one ``receive`` one datagram.

Exceptions follow anyio: :class:`anyio.EndOfStream` after the peer's FIN, :class:`anyio.BrokenResourceError` after a
reset or a dead tunnel (``reset_error`` says why), :class:`anyio.ClosedResourceError` after our own ``aclose``.

A ``lite-tls`` stream (when the tunnel negotiated the extension) runs a
:class:`~vtunnel.protocol.lite_tls.LiteTlsSession` on both directions: what the user sends and what the peer
delivers pass through it, and once the stream left the tunnel its TLS records go as PASSTHROUGH frames
(docs/lite-tls.md). The rest of this module does not see the difference.

A stream may instead be driven by callbacks: :meth:`TunnelStream.attach` hands everything that arrives to a
:class:`StreamConsumer` as it arrives, and ``send_nowait``/``send_eof_nowait``/``close_nowait``/``acknowledge`` are
the synchronous halves of the byte-stream calls. A relay built that way needs no task and no buffer while the
stream is idle (see "Memory per stream" in docs/architecture.md).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import anyio
import structlog
from anyio.abc import ByteStream

from vtunnel.protocol import StreamMetadata, Tunnel
from vtunnel.protocol.errors import VTunnelError
from vtunnel.protocol.lite_tls import LiteTlsSession, LiteTlsStep, whole_records
from vtunnel.runtime.errors import StreamRefused

__all__ = ["JOIN_BELOW", "StreamCarrier", "StreamConsumer", "TunnelStream", "TunnelStreamAttribute"]

#: ``receive`` joins buffered chunks smaller than this into one (up to ``max_bytes``)
JOIN_BELOW = 65536

log = structlog.get_logger("vtunnel.lite_tls")


class StreamCarrier(Protocol):
    """What a :class:`TunnelStream` needs from the connection that carries it (``TunnelConnection`` is the one
    implementation); a contract, so that this module does not import the connection's."""

    name: str
    tunnel: Tunnel

    @property
    def closed(self) -> bool: ...

    @property
    def outbound_congested(self) -> bool:
        """More than the high-water mark waits for the transport."""
        ...

    def transmit(self) -> None:
        """Hand what the tunnel queued to the transport (the one output point)."""

    def forget_stream(self, stream_id: int) -> None: ...

    def resume_reading(self, stream: TunnelStream | None = None) -> None: ...

    async def wait_outbound_room(self) -> None: ...


class TunnelStreamAttribute(anyio.TypedAttributeSet):
    """Typed attributes for ``TunnelStream.extra()``."""

    metadata: StreamMetadata | None = anyio.typed_attribute()
    stream_id: int = anyio.typed_attribute()


class StreamConsumer(Protocol):
    """Receives a stream's events as they happen (see :meth:`TunnelStream.attach`).

    ``stream_data`` must eventually be matched by ``TunnelStream.acknowledge(len(data))`` (at once, or when the
    bytes left the consumer's hands): that is what returns flow-control credit to the peer.
    """

    def stream_data(self, data: bytes) -> None: ...

    def stream_eof(self) -> None: ...

    def stream_broken(self) -> None: ...

    def stream_writable(self) -> None: ...


class TunnelStream(ByteStream):
    def __init__(
        self,
        conn: StreamCarrier,
        stream_id: int,
        metadata: StreamMetadata | None,
        *,
        accepted: bool,
    ) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.metadata = metadata
        self.datagrams = metadata is not None and metadata.kind == "udp"
        self._buffer: deque[bytes] | None = None  # created by the first chunk that has to wait for a reader
        self._consumer: StreamConsumer | None = None
        self._offset = 0  # bytes of ``_buffer[0]`` already handed out
        self.buffered = 0
        # events exist only while a task waits on them (an idle stream holds none)
        self._readable: anyio.Event | None = None
        self._writable: anyio.Event | None = None
        self._accept_waiter: anyio.Event | None = None
        self._syn_acked = accepted
        self._eof = False
        self._broken: str | None = None
        self.reset_error: str | None = None
        self._closed = False
        self._sent_eof = False
        self._lite: _LiteTls | None = None
        if metadata is not None and metadata.kind == "lite-tls" and conn.tunnel.extensions.lite_tls:
            self._lite = _LiteTls(self)

    # ---------------------------------------------------------------- wake-ups
    def _wake_reader(self) -> None:
        ev = self._readable
        if ev is not None:
            self._readable = None
            ev.set()

    def _wake_writer(self) -> None:
        ev = self._writable
        if ev is not None:
            self._writable = None
            ev.set()

    def _wake_accept(self) -> None:
        ev = self._accept_waiter
        if ev is not None:
            self._accept_waiter = None
            ev.set()

    # ---------------------------------------------------------------- events from the pump
    # Called by the stream's TunnelConnection only (one method per core event), in the order the core gave them.
    def deliver_data(self, data: bytes, passthrough: bool = False) -> None:
        lite = self._lite
        if lite is not None:
            lite.from_peer(data, passthrough)
        elif passthrough:
            self._lite_violation(len(data), "PASSTHROUGH DATA on a stream that is not lite-tls")
        else:
            self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        self.buffered += len(data)
        consumer = self._consumer
        if consumer is not None:
            consumer.stream_data(data)
            return
        buf = self._buffer
        if buf is None:
            buf = self._buffer = deque()
        buf.append(data)
        self._wake_reader()

    def deliver_eof(self) -> None:
        self._eof = True
        if self._consumer is not None:
            self._consumer.stream_eof()
            return
        self._wake_reader()

    def deliver_reset(self, error: str | None) -> None:
        if self._broken is None:
            self._broken = "reset"
            self.reset_error = error
        self._wake_all()

    def deliver_tunnel_closed(self) -> None:
        if self._broken is None and not (self._eof and self._sent_eof):
            self._broken = "tunnel closed"
            self.reset_error = "tunnel closed"
        self._wake_all()

    def _wake_all(self) -> None:
        consumer = self._consumer
        if consumer is not None:
            if self._broken is not None and not self._closed:
                consumer.stream_broken()
            return
        self._wake_reader()
        self._wake_writer()
        self._wake_accept()

    def deliver_window(self) -> None:
        if self._lite is not None and not self._lite.writable():
            return  # what the tracker queued goes first
        if self._consumer is not None:
            self._consumer.stream_writable()
            return
        self._wake_writer()

    def deliver_accepted(self) -> None:
        self._syn_acked = True
        # the core may have held data until the SYN-ACK (no 0-RTT): the window opens now
        if self._consumer is not None:
            self._consumer.stream_writable()
            return
        self._wake_accept()
        self._wake_writer()

    # ---------------------------------------------------------------- server side
    def accept(self) -> None:
        """Server: answer the peer's SYN with a SYN-ACK."""
        if self._broken is not None:
            raise anyio.BrokenResourceError(f"stream {self.stream_id} {self._broken}")
        if self._syn_acked:
            return
        self._syn_acked = True
        self._wake_accept()
        try:
            self._conn.tunnel.accept_stream(self.stream_id)
        except VTunnelError as exc:
            raise anyio.BrokenResourceError(str(exc)) from exc
        self._conn.transmit()

    def refuse(self, error: str | None = None) -> None:
        """Server: answer the peer's SYN with an RST carrying ``error`` (when the peer understands reasons)."""
        if self._broken is None:
            self._broken = "refused"
        with contextlib.suppress(VTunnelError):
            self._conn.tunnel.reset_stream(self.stream_id, error=error)
        self._conn.transmit()

    async def wait_accepted(self) -> None:
        if not self._syn_acked and self._broken is None and not self._conn.closed:
            ev = self._accept_waiter = anyio.Event()
            await ev.wait()
        if not self._syn_acked:
            raise StreamRefused(self.reset_error)

    # ---------------------------------------------------------------- callbacks instead of tasks
    @property
    def tunnel_name(self) -> str:
        """The name of the tunnel connection carrying this stream (for logs)."""
        return self._conn.name

    @property
    def handed_off(self) -> bool:
        """A consumer is attached (:meth:`attach`): it, not the task that accepted the stream, closes it."""
        return self._consumer is not None

    def attach(self, consumer: StreamConsumer) -> None:
        """Deliver everything from now on to ``consumer`` (what is buffered first, then FIN or breakage).

        ``receive`` and ``send`` must not be used any more; the consumer writes with :meth:`send_nowait`.
        """
        self._consumer = consumer
        buf = self._buffer
        self._buffer = None
        if buf:
            if self._offset:
                buf[0] = buf[0][self._offset :]
                self._offset = 0
            for chunk in buf:
                consumer.stream_data(chunk)
        if self._closed:
            return
        if self._eof:
            consumer.stream_eof()
        if self._broken is not None:
            consumer.stream_broken()

    def acknowledge(self, n: int) -> None:
        """``n`` received bytes left our hands: return their credit to the peer (and let a paused reader go on)."""
        self.buffered -= n
        conn = self._conn
        if not conn.closed:
            with contextlib.suppress(VTunnelError):
                conn.tunnel.acknowledge_received_data(self.stream_id, n)
            conn.transmit()
            conn.resume_reading(self)

    def send_nowait(self, data: bytes | memoryview) -> int:
        """Queue as much of ``data`` as the send window allows; return how many bytes were taken (may be 0).

        Raises like :meth:`send` on a closed or broken stream.  The caller waits for ``stream_writable``.
        """
        self._check_writable()
        if self._lite is not None:
            return self._lite.from_local(data)
        tunnel = self._conn.tunnel
        try:
            window = tunnel.send_window(self.stream_id)
            n = min(window, len(data))
            if n <= 0:
                return 0
            tunnel.send_data(self.stream_id, data if n == len(data) else data[:n])
        except VTunnelError as exc:
            raise anyio.BrokenResourceError(str(exc)) from exc
        self._conn.transmit()
        return n

    @property
    def outbound_congested(self) -> bool:
        """More than the high-water mark waits for the transport: a relay stops reading its source."""
        return self._conn.outbound_congested

    async def wait_outbound_room(self) -> None:
        await self._conn.wait_outbound_room()

    # ---------------------------------------------------------------- ByteStream
    async def receive(self, max_bytes: int = 65536) -> bytes:
        while not self._buffer:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._eof:  # everything the peer sent arrived, whatever happened after its FIN
                raise anyio.EndOfStream
            if self._broken is not None:
                if not self._syn_acked or self._broken == "refused":
                    raise StreamRefused(self.reset_error)
                raise anyio.BrokenResourceError(f"stream {self.stream_id}: {self._broken}")
            ev = self._readable = anyio.Event()
            await ev.wait()
        chunk = self._take(max_bytes)
        self.acknowledge(len(chunk))
        return chunk

    def _take(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` from the buffer (one datagram on a ``udp`` stream), copying as little as it can.

        A chunk that fits is handed out as it is; small chunks are joined (up to ``JOIN_BELOW`` bytes) so many
        small frames do not become many small writes; a chunk larger than ``max_bytes`` is read through an
        offset, so the rest of it is never copied.
        """
        buf = self._buffer
        assert buf
        chunk = buf[0]
        start = self._offset
        if self.datagrams:
            buf.popleft()
            return chunk
        size = len(chunk) - start
        if size > max_bytes:
            self._offset = start + max_bytes
            return chunk[start : start + max_bytes]
        buf.popleft()
        if start:
            self._offset = 0
            chunk = chunk[start:]
        if size >= JOIN_BELOW or not buf or size + len(buf[0]) > max_bytes:
            return chunk
        parts = [chunk]
        total = size
        while buf and total < JOIN_BELOW and total + len(buf[0]) <= max_bytes:
            nxt = buf.popleft()
            parts.append(nxt)
            total += len(nxt)
        return b"".join(parts)

    async def send(self, item: bytes) -> None:
        if self._lite is not None:
            while True:
                self._check_writable()
                if self._lite.from_local(item):
                    await self._conn.wait_outbound_room()
                    return
                wev = self._writable = anyio.Event()
                await wev.wait()
        conn = self._conn
        tunnel = conn.tunnel
        view = memoryview(item)
        if self.datagrams and len(item) > tunnel_max_datagram(conn):
            raise ValueError(f"datagram of {len(item)} bytes is larger than the tunnel's frame size")
        while True:
            self._check_writable()
            try:
                window = tunnel.send_window(self.stream_id)
            except VTunnelError as exc:
                raise anyio.BrokenResourceError(str(exc)) from exc
            need = len(view) if self.datagrams else 1
            if window >= need and len(view) > 0:
                n = len(view) if self.datagrams else min(window, len(view))
                try:
                    # bytes are immutable, so the core queues slices of them without copying
                    whole = n == len(item) and len(view) == n
                    tunnel.send_data(self.stream_id, item if whole else view[:n])
                except VTunnelError as exc:
                    raise anyio.BrokenResourceError(str(exc)) from exc
                conn.transmit()
                view = view[n:]
                await conn.wait_outbound_room()
                if not view:
                    return
                continue
            if len(view) == 0:
                return
            wev = self._writable = anyio.Event()
            # re-check after arming the event: the window may have opened meanwhile
            if tunnel.send_window(self.stream_id) >= need:
                self._writable = None
                continue
            await wev.wait()

    def _check_writable(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._broken is not None:
            raise anyio.BrokenResourceError(f"stream {self.stream_id}: {self._broken}")
        if self._sent_eof:
            raise anyio.ClosedResourceError("send_eof() was called on this stream")

    async def send_eof(self) -> None:
        self.send_eof_nowait()

    def send_eof_nowait(self) -> None:
        """FIN (half-close); nothing if already sent, closed or broken."""
        if self._sent_eof or self._closed or self._broken is not None:
            return
        if self._lite is not None and not self._lite.local_ended():
            return  # the FIN follows what the tracker queued (LiteTls.flush)
        self._sent_eof = True
        try:
            self._conn.tunnel.end_stream(self.stream_id)
        except VTunnelError:
            return
        self._conn.transmit()

    async def aclose(self) -> None:
        self.close_nowait()
        await anyio.lowlevel.checkpoint()

    def close_nowait(self) -> None:
        """Free the stream (RST if it is still open both ways); wakes any waiting task."""
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        lite = self._lite
        if lite is not None and lite.session.left:
            log.debug(
                "lite_tls.closed",
                tunnel=conn.name,
                stream=self.stream_id,
                passthrough_bytes=lite.passthrough_bytes,
                protected_bytes=lite.protected_bytes,
            )
        if not conn.closed:
            with contextlib.suppress(VTunnelError):
                conn.tunnel.close_stream(self.stream_id)
            conn.transmit()
        conn.forget_stream(self.stream_id)
        self._wake_reader()
        self._wake_writer()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return {
            TunnelStreamAttribute.metadata: lambda: self.metadata,
            TunnelStreamAttribute.stream_id: lambda: self.stream_id,
        }

    # ---------------------------------------------------------------- lite-tls
    def _writable_again(self) -> None:
        if self._consumer is not None:
            self._consumer.stream_writable()
        else:
            self._wake_writer()

    def _lite_violation(self, unread: int, reason: str) -> None:
        """The peer broke the lite-tls rules on this stream: reset it (the tunnel and its other streams go on)."""
        conn = self._conn
        log.info("lite_tls.violation", tunnel=conn.name, stream=self.stream_id, reason=reason)
        with contextlib.suppress(VTunnelError):
            conn.tunnel.acknowledge_received_data(self.stream_id, unread)
            conn.tunnel.reset_stream(self.stream_id, error=f"protocol: lite-tls {reason}")
        conn.transmit()
        self.deliver_reset(f"protocol: lite-tls {reason}")


class _LiteTls:
    """A lite-tls stream's session and its queue of pieces to send (waiting for stream credit)."""

    __slots__ = ("_eof", "_queue", "_refused", "_stream", "passthrough_bytes", "protected_bytes", "session")

    def __init__(self, stream: TunnelStream) -> None:
        self._stream = stream
        self.session = LiteTlsSession(stream._conn.tunnel.role)
        # (views of a piece whose start went already: the rest is never copied)
        self._queue: deque[tuple[bytes | memoryview, bool]] = deque()
        self._eof = False  # the user ended its side: FIN once the queue is empty
        self._refused = False  # from_local took nothing: the writer waits to be told
        #: bytes sent in PASSTHROUGH frames and in ordinary ones (statistics)
        self.passthrough_bytes = 0
        self.protected_bytes = 0

    def from_local(self, data: bytes | memoryview) -> int:
        """Take all of ``data`` (0: none, the queue or the held bytes must go first)."""
        session = self.session
        if self._queue or session.awaiting_answer:
            self._refused = True
            return 0
        self._act(session.from_local(bytes(data)))
        return len(data)

    def local_ended(self) -> bool:
        """The user's FIN: True if it may go now."""
        self._eof = True
        self._act(self.session.local_ended())
        return not self._queue

    def from_peer(self, data: bytes, passthrough: bool) -> None:
        self._act(self.session.from_peer(data, passthrough))

    def _act(self, step: LiteTlsStep) -> None:
        stream = self._stream
        conn = stream._conn
        if step.left is not None:
            log.info(
                "lite_tls.left_tunnel",
                tunnel=conn.name,
                stream=stream.stream_id,
                mode="muxed",
                role=step.left.value,
            )
        elif step.fell_back is not None:
            log.debug(
                "lite_tls.fell_back",
                tunnel=conn.name,
                stream=stream.stream_id,
                reason=step.fell_back.reason,
                by_peer=step.fell_back.by_peer,
            )
        if step.violation is not None:
            self._queue.clear()
            stream._lite_violation(step.consumed, step.violation)
            return
        if step.consumed:
            with contextlib.suppress(VTunnelError):
                conn.tunnel.acknowledge_received_data(stream.stream_id, step.consumed)
        for data in step.deliver:
            stream._deliver(data)
        self._queue.extend(step.send)
        if self.flush() and self._refused and not self.session.awaiting_answer:
            self._refused = False
            stream._writable_again()

    def writable(self) -> bool:
        """Credit came: send what is queued; True if the writer may go on."""
        if not self.flush() or self.session.awaiting_answer:
            return False
        self._refused = False
        return True

    def flush(self) -> bool:
        """Send what the stream's credit allows; True once the queue is empty (then a pending FIN goes)."""
        stream = self._stream
        conn = stream._conn
        tunnel = conn.tunnel
        queue = self._queue
        sid = stream.stream_id
        try:
            while queue:
                window = tunnel.send_window(sid)
                if window <= 0:
                    break
                data, passthrough = queue[0]
                if len(data) > window:
                    data = memoryview(data)
                    fits = whole_records(data, window) if passthrough else 0
                    if fits:  # the records that fit now go, the others when credit comes
                        tunnel.send_data(sid, data[:fits], passthrough=True)
                        self.passthrough_bytes += fits
                        queue[0] = (data[fits:], True)
                    else:  # a record passes through only whole: what fits goes protected
                        tunnel.send_data(sid, data[:window])
                        self.protected_bytes += window
                        queue[0] = (data[window:], False)
                    break
                queue.popleft()
                tunnel.send_data(sid, data, passthrough=passthrough)
                if passthrough:
                    self.passthrough_bytes += len(data)
                else:
                    self.protected_bytes += len(data)
        except VTunnelError as exc:
            queue.clear()
            stream.deliver_reset(str(exc))
            return True
        if not queue and self._eof and not stream._sent_eof and not stream._closed:
            self._eof = False
            conn.transmit()
            stream.send_eof_nowait()
        conn.transmit()
        return not queue


def tunnel_max_datagram(conn: StreamCarrier) -> int:
    return conn.tunnel.config.max_frame_size
