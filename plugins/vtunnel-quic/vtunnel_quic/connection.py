"""One QUIC connection carrying one tunnel: aioquic's sans-IO ``QuicConnection`` driven on a UDP socket with one
timer, and the tunnel's QUIC stream as an anyio byte stream.

:class:`QuicSession` owns the connection: it feeds it datagrams (:meth:`QuicSession.datagram_received`, called by
the socket's owner), sends what it has to send after every input, timer and write (:meth:`QuicSession.transmit`),
and keeps one event-loop timer armed at the earliest of aioquic's own deadline, the next keep-alive PING and (for a
server connection not yet handed over) the handshake deadline. :class:`QuicByteStream` is the tunnel's stream, the
first bidirectional one the client opens (ID 0); any other stream a peer opens is refused (STOP_SENDING and
RESET_STREAM) and its bytes dropped.

Flow control follows the application: aioquic grants a peer more credit as soon as bytes *arrive*, so a reader
that stops would let the receive buffer grow without bound. :class:`FlowControlledConnection` grants credit as
the application *reads* instead (at most :data:`~vtunnel_quic.options.STREAM_WINDOW` unread bytes on the tunnel's
stream), which is what makes a paused tunnel hold its peer back. The writer is bounded too: ``send`` waits while
more than :data:`SEND_BUFFER` bytes it gave are not yet on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.lowlevel
import structlog
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    CONNECTION_LIMIT_FRAME_CAPACITY,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    NetworkAddress,
    QuicConnection,
)
from aioquic.quic.packet import QuicErrorCode, QuicFrameType
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream
from anyio.abc import ByteStream, SocketAttribute

from vtunnel_quic.stateless import is_reset, reset_token

__all__ = ["SEND_BUFFER", "TUNNEL_STREAM", "FlowControlledConnection", "QuicByteStream", "QuicSession"]

log = structlog.get_logger("vtunnel.transports.quic")

#: the tunnel's stream: the client's first bidirectional stream
TUNNEL_STREAM = 0
#: bytes given to ``send`` and not yet sent at which ``send`` waits
SEND_BUFFER = 1024 * 1024
#: how long ``aclose`` waits for what was written to be acknowledged before closing the connection
CLOSE_GRACE = 1.0
#: the application error code of a refused stream (the tunnel rides stream 0 only)
STREAM_REFUSED = 1
_ping_ids = itertools.count(1)


class FlowControlledConnection(QuicConnection):
    """aioquic's connection, granting receive credit as the application consumes (see the module docstring).

    It replaces two of aioquic's internal steps, the ones that write MAX_STREAM_DATA and MAX_DATA frames (aioquic
    doubles a limit whenever half of it has arrived, read or not); the package pins the aioquic releases this was
    checked against. Streams other than the tunnel's never get more than their initial credit, and the peer may
    not open more bidirectional or unidirectional streams than the initial limits.
    """

    def __init__(
        self, *, configuration: QuicConfiguration, reset_key: bytes | None = None, **kwargs: Any
    ) -> None:
        super().__init__(configuration=configuration, **kwargs)
        #: a server's: the key of the stateless reset token of every connection ID it issues
        self._reset_key = reset_key
        self._set_reset_tokens()
        self.stream_window = configuration.max_stream_data
        self.connection_window = configuration.max_data
        #: bytes of the tunnel's stream the application read
        self.consumed = 0
        #: bytes of the whole connection read or dropped
        self.consumed_total = 0

    def consume(self, count: int, *, tunnel: bool = True) -> bool:
        """``count`` bytes were read (``tunnel``) or dropped; whether credit worth a frame opened up."""
        if tunnel:
            self.consumed += count
        self.consumed_total += count
        stream = self._streams.get(TUNNEL_STREAM)
        quarter = self.stream_window // 4
        return (
            stream is not None
            and self.consumed + self.stream_window - stream.max_stream_data_local >= quarter
        )

    def _set_reset_tokens(self) -> None:
        """The IDs not given to the peer yet get the tokens a server with the same reset key computes again."""
        if self._reset_key is not None:
            for each in self._host_cids:
                if not each.was_sent or each.sequence_number == 0:
                    each.stateless_reset_token = reset_token(self._reset_key, each.cid)

    def _replenish_connection_ids(self) -> None:
        super()._replenish_connection_ids()
        self._set_reset_tokens()

    def is_stateless_reset(self, datagram: bytes) -> bool:
        """A client's: whether ``datagram`` is the server's stateless reset for the ID this client sends to."""
        return self._is_client and is_reset(datagram, self._peer_cid.stateless_reset_token or None)

    def sent_offset(self, stream_id: int) -> int | None:
        """How far the stream's bytes went on the wire (``None`` once the stream is done and forgotten)."""
        stream = self._streams.get(stream_id)
        return None if stream is None else stream.sender.highest_offset

    def send_done(self, stream_id: int) -> bool:
        """Everything written on the stream, its end included, was acknowledged (or the stream is gone)."""
        stream = self._streams.get(stream_id)
        return stream is None or stream.sender.is_finished

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream
    ) -> None:
        if stream.stream_id == TUNNEL_STREAM and stream.max_stream_data_local:
            target = self.consumed + self.stream_window
            if target - stream.max_stream_data_local >= self.stream_window // 4:
                stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            assert stream.stream_id is not None  # the crypto streams have none, and no limits
            _write_limit(
                builder,
                QuicFrameType.MAX_STREAM_DATA,
                MAX_STREAM_DATA_FRAME_CAPACITY,
                (self._on_max_stream_data_delivery, (stream,)),
                stream.stream_id,
                stream.max_stream_data_local,
            )
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    def _write_connection_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> None:
        limit = self._local_max_data
        target = self.consumed_total + self.connection_window
        if target - limit.value >= self.connection_window // 4:
            limit.value = target
        for each in (limit, self._local_max_streams_bidi, self._local_max_streams_uni):
            if each.value != each.sent:
                _write_limit(
                    builder,
                    each.frame_type,
                    CONNECTION_LIMIT_FRAME_CAPACITY,
                    (self._on_connection_limit_delivery, (each,)),
                    each.value,
                )
                each.sent = each.value


def _write_limit(
    builder: QuicPacketBuilder,
    frame_type: int,
    capacity: int,
    on_delivery: tuple[Callable[..., None], tuple[Any, ...]],
    *values: int,
) -> None:
    """One flow-control frame (MAX_STREAM_DATA, MAX_DATA, MAX_STREAMS): its values, and who hears of its fate."""
    buf = builder.start_frame(
        frame_type, capacity=capacity, handler=on_delivery[0], handler_args=on_delivery[1]
    )
    for value in values:
        buf.push_uint_var(value)


class QuicSession:
    """Drives one :class:`FlowControlledConnection`: datagrams in, datagrams out, one timer.

    ``send(data, address)`` puts a datagram on the socket; ``on_event`` sees each connection event first (the
    listener follows connection IDs with it); ``on_closed`` runs once when the connection is over.
    """

    def __init__(
        self,
        connection: FlowControlledConnection,
        *,
        send: Callable[[bytes, NetworkAddress], None],
        local_address: Any,
        remote_address: NetworkAddress,
        keepalive: float,
        on_event: Callable[[QuicSession, events.QuicEvent], None] | None = None,
        on_closed: Callable[[QuicSession], None] | None = None,
    ) -> None:
        self.connection = connection
        self._send = send
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._keepalive = keepalive
        self._last_sent = self._loop.time()
        self._on_event = on_event
        self._on_closed = on_closed
        self.local_address = local_address
        self.remote_address = remote_address
        #: for a server connection not handed over yet: when it is given up (monotonic loop time)
        self.handshake_deadline: float | None = None
        self.on_handshake_timeout: Callable[[], None] | None = None
        self.handshake_done = False
        self.handshake_waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.error: str | None = None
        self.stream = QuicByteStream(self)
        self._refused: set[int] = set()

    # --- input ----------------------------------------------------------------------------------------------
    def datagram_received(self, data: bytes, address: NetworkAddress) -> None:
        if self.closed:
            return
        if self.connection.is_stateless_reset(data):
            log.info("quic connection reset by the server: it lost the connection", server=address)
            self._terminated("stateless reset: the server lost the connection")
            return
        self.remote_address = address
        try:
            self.connection.receive_datagram(data, address, now=self._loop.time())
        # aioquic closes on protocol errors itself; anything else ends the connection
        except Exception as exc:
            log.warning("quic connection failed on a datagram", error=repr(exc))
            self.connection.close(error_code=QuicErrorCode.INTERNAL_ERROR, reason_phrase="internal error")
        self._process_events()
        self.transmit()

    def _on_timer(self) -> None:
        self._timer = None
        now = self._loop.time()
        if self.handshake_deadline is not None and now >= self.handshake_deadline:
            self.handshake_deadline = None
            if self.on_handshake_timeout is not None:
                self.on_handshake_timeout()
            return
        timer_at = self.connection.get_timer()
        if timer_at is not None and now >= timer_at:
            self.connection.handle_timer(now=now)
        if self.handshake_done and now >= self._last_sent + self._keepalive:
            self.connection.send_ping(next(_ping_ids))
        self._process_events()
        self.transmit()

    def _process_events(self) -> None:
        stream = self.stream
        connection = self.connection
        while (event := connection.next_event()) is not None:
            if self._on_event is not None:
                self._on_event(self, event)
            if isinstance(event, events.StreamDataReceived):
                if event.stream_id == TUNNEL_STREAM:
                    stream.data_received(event.data, event.end_stream)
                else:
                    self._refuse(event.stream_id, len(event.data))
            elif isinstance(event, events.HandshakeCompleted):
                self.handshake_done = True
                waiter = self.handshake_waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            elif isinstance(event, events.StreamReset) and event.stream_id == TUNNEL_STREAM:
                stream.fail(f"the peer reset the tunnel's stream (code {event.error_code})")
            elif isinstance(event, events.StopSendingReceived) and event.stream_id == TUNNEL_STREAM:
                stream.fail(f"the peer stopped reading the tunnel's stream (code {event.error_code})")
            elif isinstance(event, events.ConnectionTerminated):
                reason = event.reason_phrase or QuicErrorCode(event.error_code).name
                self._terminated(f"connection closed: {reason} (code {event.error_code})")

    def _refuse(self, stream_id: int, dropped: int) -> None:
        self.connection.consume(dropped, tunnel=False)
        if stream_id in self._refused:
            return
        self._refused.add(stream_id)
        with contextlib.suppress(ValueError):
            self.connection.stop_stream(stream_id, STREAM_REFUSED)
        if not stream_id & 2:  # bidirectional: our direction too
            with contextlib.suppress(ValueError):
                self.connection.reset_stream(stream_id, STREAM_REFUSED)

    def _terminated(self, reason: str) -> None:
        self.error = self.error or reason
        self.stream.fail(reason, ended=True)
        waiter = self.handshake_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError(reason))
        self.finish()

    # --- output ---------------------------------------------------------------------------------------------
    def transmit(self) -> None:
        """Send what the connection has to send and re-arm the timer."""
        if self.closed:
            return
        now = self._loop.time()
        datagrams = self.connection.datagrams_to_send(now=now)
        for data, address in datagrams:
            self._send(data, address)
        if datagrams:
            self._last_sent = now
        self.stream.progressed()
        deadline = self.connection.get_timer()
        if self.handshake_done:
            keepalive_at = self._last_sent + self._keepalive
            deadline = keepalive_at if deadline is None else min(deadline, keepalive_at)
        if self.handshake_deadline is not None:
            deadline = self.handshake_deadline if deadline is None else min(deadline, self.handshake_deadline)
        if deadline != self._timer_at or self._timer is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = deadline
            if deadline is not None:
                self._timer = self._loop.call_at(deadline, self._on_timer)

    def close(self, reason: str = "") -> None:
        """Close the connection now (CONNECTION_CLOSE goes out) and stop driving it."""
        if self.closed:
            return
        self.connection.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase=reason)
        self.transmit()
        self.stream.fail("the connection was closed", ended=True)
        self.finish()

    def finish(self) -> None:
        """Stop driving the connection (its timer) and tell the owner, once."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._on_closed is not None:
            self._on_closed(self)


class QuicByteStream(ByteStream):
    """The tunnel's QUIC stream as an anyio byte stream; closing it closes the QUIC connection."""

    def __init__(self, session: QuicSession) -> None:
        self._session = session
        self._buffer: deque[bytes] = deque()
        self._eof_received = False
        self._eof_sent = False
        self._written = 0
        self._error: str | None = None
        self._closed = False
        # asyncio's events: they are set from the socket's callbacks, outside any task
        self._readable = asyncio.Event()
        self._progress = asyncio.Event()

    # --- from the session -----------------------------------------------------------------------------------
    def data_received(self, data: bytes, end: bool) -> None:
        if data:
            self._buffer.append(data)
        if end:
            self._eof_received = True
        self._readable.set()

    def fail(self, reason: str, *, ended: bool = False) -> None:
        """The stream failed (or the connection ended: a stream that got its end is not failed by that)."""
        if not (ended and self._eof_received and self._eof_sent):
            self._error = self._error or reason
        self._readable.set()
        self._progress.set()

    def progressed(self) -> None:
        """Datagrams went out or came in: a waiting writer (or close) may look again."""
        self._progress.set()

    # --- ByteStream -----------------------------------------------------------------------------------------
    async def receive(self, max_bytes: int = 65536) -> bytes:
        while not self._buffer:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._eof_received:
                raise anyio.EndOfStream
            if self._error is not None:
                raise anyio.BrokenResourceError(self._error)
            self._readable = asyncio.Event()
            await self._readable.wait()
        buffer = self._buffer
        chunk = buffer.popleft()
        if len(chunk) > max_bytes:
            buffer.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        elif buffer and len(chunk) + len(buffer[0]) <= max_bytes:
            parts = [chunk]
            size = len(chunk)
            while buffer and size + len(buffer[0]) <= max_bytes:
                part = buffer.popleft()
                parts.append(part)
                size += len(part)
            chunk = b"".join(parts)
        if self._session.connection.consume(len(chunk)):
            self._session.transmit()
        return chunk

    def _check_writable(self) -> None:
        if self._closed or self._eof_sent:
            raise anyio.ClosedResourceError
        if self._error is not None:
            raise anyio.BrokenResourceError(self._error)

    def _unsent(self) -> int:
        sent = self._session.connection.sent_offset(TUNNEL_STREAM)
        return 0 if sent is None else self._written - sent

    async def send(self, item: bytes) -> None:
        self._check_writable()
        while self._unsent() >= SEND_BUFFER:
            self._progress = asyncio.Event()
            await self._progress.wait()
            self._check_writable()
        session = self._session
        session.connection.send_stream_data(TUNNEL_STREAM, item)
        self._written += len(item)
        session.transmit()
        await anyio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        self._check_writable()
        self._eof_sent = True
        self._session.connection.send_stream_data(TUNNEL_STREAM, b"", end_stream=True)
        self._session.transmit()
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._readable.set()
        session = self._session
        if not session.closed and self._error is None:
            if not self._eof_sent:
                self._eof_sent = True
                session.connection.send_stream_data(TUNNEL_STREAM, b"", end_stream=True)
                session.transmit()
            # what was written goes out before the connection closes, for a moment at most
            with anyio.move_on_after(CLOSE_GRACE, shield=True):
                while not session.closed and not session.connection.send_done(TUNNEL_STREAM):
                    self._progress = asyncio.Event()
                    await self._progress.wait()
        session.close()
        await anyio.lowlevel.checkpoint()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        session = self._session
        return {
            SocketAttribute.local_address: lambda: session.local_address,
            SocketAttribute.remote_address: lambda: session.remote_address,
        }
