"""A tunnel stream, driven by callbacks: its one API.

A :class:`TunnelStream` pushes everything that happens to it to its :class:`StreamConsumer`, in the connection's
own step (no task, no buffer, no wake-up event: an idle stream with a consumer is one small object):
``stream_data`` as bytes arrive, ``stream_eof`` after the peer's FIN, ``stream_broken`` after a reset or a dead
tunnel, ``stream_writable`` when it may write again (its send window opened, the SYN-ACK came, or the tunnel's
output fell under its high-water mark). Its owner writes with :meth:`TunnelStream.write` (what the send window
takes, now), half-closes with :meth:`~TunnelStream.write_eof` and frees it with :meth:`~TunnelStream.close`.

Back-pressure: bytes handed to the consumer return their flow-control credit to the peer only when the consumer
calls :meth:`~TunnelStream.acknowledge`, so a consumer that stops taking bounds what the peer may send; writes take
no more than the send window, and :meth:`~TunnelStream.has_room` says when the tunnel's output is over its
high-water mark (``stream_writable`` follows once it drained). Streams of kind ``udp`` keep message boundaries:
one ``stream_data`` is one datagram, and one ``write`` sends one whole datagram or nothing.

A ``lite-tls`` stream (when the tunnel negotiated the extension) runs a
:class:`~vtunnel.protocol.lite_tls.LiteTlsSession` on both directions: what the owner writes and what the peer
delivers pass through it, and once the stream left the tunnel its TLS records go as PASSTHROUGH frames
(docs/lite-tls.md). The rest of this module does not see the difference.

What the peer sends before a consumer is attached waits in a list created by the first such chunk, and goes to the
consumer when it attaches, followed by the end of stream or the breakage if they came.

Code that wants to await uses the thin adapter over this API, :class:`vtunnel.runtime.byte_stream.TunnelByteStream`
(an anyio ``ByteStream``), whose exceptions are anyio's: ``EndOfStream`` after the peer's FIN,
``BrokenResourceError`` after a reset or a dead tunnel (``reset_error`` says why; :class:`StreamRefused` when the
stream was never accepted), ``ClosedResourceError`` after its own ``aclose``. :meth:`TunnelStream.write` raises the
last two the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Callable
from typing import Protocol

import anyio
import structlog

from vtunnel.protocol import StreamMetadata, Tunnel
from vtunnel.protocol.errors import VTunnelError
from vtunnel.protocol.lite_tls import LiteTlsRole, LiteTlsSession, LiteTlsState, LiteTlsStep, whole_records
from vtunnel.protocol.metadata import DATAGRAM_KINDS
from vtunnel.runtime.errors import StreamRefused

__all__ = ["StreamCarrier", "StreamConsumer", "TunnelStream"]

log = structlog.get_logger("vtunnel.lite_tls")

#: seconds an active lite-tls end waits for the peer's answer to its marker before it resets the stream (a peer
#: running this code answers within a round trip, unless its endpoint stopped half-way through a record)
ANSWER_TIMEOUT = 10.0
#: seconds of quiet after the local endpoint wrote the start of something like a record header: then it is
#: not TLS (a TLS endpoint writes whole records) and the stream falls back (``LiteTlsSession.local_stalled``)
LOCAL_STALL = 0.2
#: seconds a passive lite-tls end holds the peer's bytes after its marker waiting for the first whole
#: application-data record before it resets the stream (the active end sends that record with the answer; the
#: bytes held are bounded by ``HOLD_LIMIT`` in the tracker)
HOLD_TIMEOUT = 10.0
#: splice mode, server: seconds its marker waits for the agent's dedicated connection once the ClientHello came
#: (the agent dials it then); without it in time the stream leaves muxed
DEDICATED_WAIT = 2.0


class StreamCarrier(Protocol):
    """What a :class:`TunnelStream` needs from the connection that carries it (``TunnelConnection`` is the one
    implementation); a contract, so that this module does not import the connection's."""

    name: str
    tunnel: Tunnel
    #: the peer's user (a server's tunnel under per-user keys), else None
    user: str | None
    #: bytes given to the transport and delivered by it (a spliced stream's dedicated connection counts too)
    bytes_out: int
    bytes_in: int
    #: spliced lite-tls streams whose kernel relay still runs (and counts in ``bytes_out`` / ``bytes_in``)
    spliced_relays: int
    #: the port of the peer's lite-tls splice listener, as the peer announced it, or None
    peer_splice_port: int | None
    #: the streams over the buffer limit of a tunnel without flow control: while any is, an acknowledgement calls
    #: :meth:`resume_reading` (the link is paused only then)
    over_limit: set[int]

    @property
    def closed(self) -> bool: ...

    @property
    def outbound_congested(self) -> bool:
        """More than the high-water mark waits for the transport."""
        ...

    def transmit(self) -> None:
        """Hand what the tunnel queued to the transport (the one output point)."""

    def transmit_soon(self) -> None:
        """:meth:`transmit` at the end of this event-loop turn: small frames of many streams leave together."""

    def notify_room(self, stream: TunnelStream) -> None:
        """Call ``stream.deliver_room()`` once the output is under its high-water mark again."""

    def forget_stream(self, stream_id: int) -> None: ...

    def resume_reading(self, stream: TunnelStream | None = None) -> None: ...


class StreamConsumer(Protocol):
    """Receives a stream's events as they happen (see :meth:`TunnelStream.attach`).

    ``stream_data`` must eventually be matched by ``TunnelStream.acknowledge(len(data))`` (at once, or when the
    bytes left the consumer's hands): that is what returns flow-control credit to the peer.
    """

    def stream_data(self, data: bytes) -> None: ...

    def stream_eof(self) -> None: ...

    def stream_broken(self) -> None: ...

    def stream_writable(self) -> None: ...

    def stream_spliced(self, dedicated: socket.socket, to_peer: bytes, ended: bool) -> bool:
        """A spliced lite-tls stream left the tunnel (docs/lite-tls.md, splice mode): from now on its bytes go
        over ``dedicated``, a plain TCP connection to the peer, first ``to_peer`` (then the FIN if ``ended``).
        Return True when the consumer took ``dedicated`` over (it relays it; the stream is closed after this
        call), False when it cannot (the stream is reset and ``dedicated`` closed)."""
        ...


class TunnelStream:
    """One stream of a tunnel connection (``TunnelConnection.open_stream``, or its handler on the server)."""

    __slots__ = (
        "_accepted",
        "_broken",
        "_carrier",
        "_closed",
        "_consumer",
        "_early",
        "_eof",
        "_lite",
        "_sent_eof",
        "_unacknowledged",
        "accept_headers",
        "datagrams",
        "metadata",
        "reset_error",
        "stream_id",
    )

    def __init__(
        self,
        carrier: StreamCarrier,
        stream_id: int,
        metadata: StreamMetadata | None,
        *,
        accepted: bool,
    ) -> None:
        self._carrier = carrier
        self.stream_id = stream_id
        self.metadata = metadata
        #: a ``udp`` or ``tun`` stream: one ``stream_data`` / one ``write`` is one datagram
        self.datagrams = metadata is not None and metadata.kind in DATAGRAM_KINDS
        #: client: the headers of the server's SYN-ACK (a ``tun`` stream's addresses), once it came
        self.accept_headers: tuple[tuple[str, str], ...] = ()
        self._consumer: StreamConsumer | None = None
        self._early: list[bytes] | None = None  # what arrived before a consumer was attached
        self._unacknowledged = 0
        self._accepted = accepted
        self._eof = False
        self._broken: str | None = None
        #: why the peer reset the stream (its reason, ``"refused"``, ``"tunnel closed"``), else ``None``
        self.reset_error: str | None = None
        self._closed = False
        self._sent_eof = False
        self._lite: _LiteTls | None = None
        if metadata is not None and metadata.kind == "lite-tls" and carrier.tunnel.extensions.lite_tls:
            self._lite = _LiteTls(self)

    # ---------------------------------------------------------------- state
    @property
    def tunnel_name(self) -> str:
        """The name of the tunnel connection carrying this stream (for logs)."""
        return self._carrier.name

    @property
    def tunnel_user(self) -> str | None:
        """Whose key the peer of the tunnel carrying this stream used (a server under per-user keys), or None."""
        return self._carrier.user

    @property
    def attached(self) -> bool:
        """A consumer is attached (:meth:`attach`): it, not the task that opened or accepted the stream, closes it."""
        return self._consumer is not None

    @property
    def accepted(self) -> bool:
        """The SYN-ACK was sent (server) or received (client)."""
        return self._accepted

    @property
    def broken(self) -> bool:
        """Reset, refused or its tunnel dead: nothing more can be written (what arrived before still counts)."""
        return self._broken is not None

    @property
    def max_unreliable_payload(self) -> int:
        """The largest datagram this stream sends as an unreliable datagram of the transport (a larger one goes
        as a DATA frame); 0 when the tunnel has none (no ``datagrams`` extension)."""
        return self._carrier.tunnel.max_unreliable_payload

    @property
    def unacknowledged(self) -> int:
        """Bytes handed to the consumer (or waiting for one) whose credit was not returned yet."""
        return self._unacknowledged

    def failure(self) -> anyio.BrokenResourceError:
        """What a reader of this broken stream is told: :class:`StreamRefused` when the peer never accepted it (or
        we refused it), else :class:`anyio.BrokenResourceError` naming why."""
        if not self._accepted or self._broken == "refused":
            return StreamRefused(self.reset_error)
        return anyio.BrokenResourceError(f"stream {self.stream_id}: {self._broken}")

    # ---------------------------------------------------------------- the consumer
    def attach(self, consumer: StreamConsumer) -> None:
        """Deliver everything from now on to ``consumer`` (what waited for it first, then FIN or breakage)."""
        self._consumer = consumer
        early = self._early
        if early is not None:
            self._early = None
            for chunk in early:
                consumer.stream_data(chunk)
        if self._closed:
            return
        if self._eof:
            consumer.stream_eof()
        if self._broken is not None:
            consumer.stream_broken()

    def detach(self, unread: list[bytes]) -> None:
        """The consumer gives the stream back: ``unread``, bytes it was handed and did not pass on (still
        unacknowledged), waits for the next consumer, ahead of anything that arrives meanwhile."""
        self._consumer = None
        if unread:
            self._early = unread + (self._early or [])

    def acknowledge(self, n: int) -> None:
        """``n`` received bytes left our hands: return their credit to the peer (and let a paused link go on)."""
        self._unacknowledged -= n
        carrier = self._carrier
        if not carrier.closed:
            try:
                queued = carrier.tunnel.acknowledge_received_data(self.stream_id, n)
            except VTunnelError:
                queued = False
            if queued:  # a WINDOW_UPDATE (at half a window): else there is nothing to transmit
                carrier.transmit()
            if carrier.over_limit:
                carrier.resume_reading(self)

    # ---------------------------------------------------------------- writing
    def write(self, data: bytes | memoryview) -> int:
        """Queue as much of ``data`` as the send window takes now and return how many bytes that was (``0`` while
        the window is shut: ``stream_writable`` follows when it opens). A ``udp`` stream takes one whole datagram
        or nothing, and raises ``ValueError`` for one larger than the tunnel's frame size.

        Raises ``anyio.ClosedResourceError`` after :meth:`close` or :meth:`write_eof`, ``anyio.BrokenResourceError``
        on a broken stream.
        """
        tunnel = self._carrier.tunnel
        size = len(data)
        if self.datagrams and size > tunnel.config.max_frame_size:
            raise ValueError(f"datagram of {size} bytes is larger than the tunnel's frame size")
        if self._closed:
            raise anyio.ClosedResourceError
        if self._broken is not None:
            raise anyio.BrokenResourceError(f"stream {self.stream_id}: {self._broken}")
        if self._sent_eof:
            raise anyio.ClosedResourceError("the end of stream was sent on this stream")
        if self._lite is not None:
            return self._lite.from_local(data)
        try:
            window = tunnel.send_window(self.stream_id)
            n = size if window >= size else (0 if self.datagrams else window)
            if n <= 0:
                return 0
            # bytes are immutable, so the core queues views of them without copying
            tunnel.send_data(self.stream_id, data if n == size else memoryview(data)[:n])
        except VTunnelError as exc:
            raise anyio.BrokenResourceError(str(exc)) from exc
        self._carrier.transmit()
        return n

    def send_room(self) -> int:
        """Bytes :meth:`write` would take now: the send window (0 once the stream cannot be written to). A
        relay reads its other end no further ahead than this."""
        if self._closed or self._broken is not None or self._sent_eof:
            return 0
        return self._carrier.tunnel.send_window(self.stream_id)

    def has_room(self) -> bool:
        """Whether the tunnel's output is under its high-water mark. ``False``: stop producing; the consumer gets
        ``stream_writable`` once it drained."""
        carrier = self._carrier
        if not carrier.outbound_congested:
            return True
        carrier.notify_room(self)
        return False

    def write_eof(self) -> None:
        """FIN (half-close: the other direction keeps flowing); nothing if already sent, closed or broken."""
        if self._sent_eof or self._closed or self._broken is not None:
            return
        if self._lite is not None and not self._lite.local_ended():
            return  # the FIN follows what the tracker queued (_LiteTls.flush)
        self._end()

    def _end(self) -> None:
        """Send the FIN (a lite-tls stream's may have gone already, once its queue was empty)."""
        if self._sent_eof:
            return
        self._sent_eof = True
        try:
            self._carrier.tunnel.end_stream(self.stream_id)
        except VTunnelError:
            return
        self._carrier.transmit_soon()

    def close(self) -> None:
        """Free the stream (RST if it is still open both ways). Nothing is reported to the consumer after it."""
        if self._closed:
            return
        self._closed = True
        self._early = None
        carrier = self._carrier
        lite = self._lite
        if lite is not None:
            lite.drop_dedicated()
        if lite is not None and lite.session.left and not lite.off_tunnel:
            lite.log_closed(self, spliced=False)
        if not carrier.closed:
            with contextlib.suppress(VTunnelError):
                carrier.tunnel.close_stream(self.stream_id)
            carrier.transmit_soon()
        carrier.forget_stream(self.stream_id)

    # ---------------------------------------------------------------- lite-tls splice mode
    @property
    def lite_tls(self) -> bool:
        """A lite-tls stream on a tunnel that agreed to the extension (it runs a tracker)."""
        return self._lite is not None

    @property
    def peer_splice_port(self) -> int | None:
        """The port of the peer's lite-tls splice listener, as it announced it in the tunnel's handshake (a
        server in splice mode), or None."""
        return self._carrier.peer_splice_port

    @property
    def may_splice(self) -> bool:
        """A lite-tls stream, open, on which no marker or notice has gone yet (the server binds a dedicated
        connection only then: docs/lite-tls.md, splice mode)."""
        lite = self._lite
        return lite is not None and not self._closed and self._broken is None and lite.session.may_splice

    def splice_over(self, dedicated: socket.socket) -> None:
        """Leave the tunnel over ``dedicated`` (a plain TCP connection to the peer, bound to this stream by a
        ticket) rather than in PASSTHROUGH frames; while :attr:`may_splice`. Raises ``ValueError`` on a stream
        that is not lite-tls."""
        if self._lite is None:
            raise ValueError(f"stream {self.stream_id} is not a lite-tls stream")
        self._lite.splice_over(dedicated)

    def dedicated_expected(self, forget: Callable[[], None]) -> None:
        """Server: this stream's ticket waits for its dedicated connection; ``forget`` runs once the stream can
        take none any more (it closed, or fell back and runs no tracker)."""
        if self._lite is None or self._closed:
            forget()
        else:
            self._lite.forget_ticket = forget

    def splice_when_tls(self, dial: Callable[[TunnelStream], None]) -> None:
        """Agent, splice mode: call ``dial(self)`` once the user's first record is a ClientHello record; the
        stream's leaving then waits for :meth:`dedicated_settled` (no-op on a stream that is not lite-tls)."""
        if self._lite is not None:
            self._lite.dial = dial

    def dedicated_settled(self, dedicated: socket.socket | None) -> None:
        """Agent: the dedicated connection dialed for :meth:`splice_when_tls` is bound at both ends
        (``dedicated``: the server's ACK came), or not used (None: no connection, no ACK in time, or not the
        ACK): the stream leaves muxed, and its marker says so, so that a server that bound the connection all
        the same leaves muxed too. A stream that no longer runs a tracker (it fell back), no longer waits for
        the connection or is closed closes ``dedicated``."""
        lite = self._lite
        if lite is None or self._closed or self._broken is not None or not lite.session.splice_is_pending:
            if dedicated is not None:
                dedicated.close()
            return
        lite.settled(dedicated)

    def count_spliced(self, sent: int, received: int) -> None:
        """Bytes a spliced stream's kernel relay wrote to and read from its dedicated connection (after the
        hand-over, even once the stream is closed): counted with its tunnel's, as a muxed stream's are."""
        carrier = self._carrier
        carrier.bytes_out += sent
        carrier.bytes_in += received
        lite = self._lite
        if lite is not None:
            lite.passthrough_bytes += sent
            lite.passthrough_received += received

    def spliced_relay_ended(self) -> None:
        """The kernel relay of a spliced stream is over (its last bytes counted): log its totals
        (``lite_tls.closed``)."""
        lite = self._lite
        if lite is not None and lite.relaying:
            lite.relaying = False
            self._carrier.spliced_relays -= 1
            lite.log_closed(self, spliced=True)

    # ---------------------------------------------------------------- server side
    def accept(self, headers: tuple[tuple[str, str], ...] = ()) -> None:
        """Server: answer the peer's SYN with a SYN-ACK (carrying ``headers``, with the metadata extension)."""
        if self._broken is not None:
            raise anyio.BrokenResourceError(f"stream {self.stream_id} {self._broken}")
        if self._accepted:
            return
        self._accepted = True
        try:
            self._carrier.tunnel.accept_stream(self.stream_id, headers=headers)
        except VTunnelError as exc:
            raise anyio.BrokenResourceError(str(exc)) from exc
        self._carrier.transmit_soon()

    def refuse(self, error: str | None = None) -> None:
        """Server: answer the peer's SYN with an RST carrying ``error`` (when the peer understands reasons)."""
        if self._broken is None:
            self._broken = "refused"
        with contextlib.suppress(VTunnelError):
            self._carrier.tunnel.reset_stream(self.stream_id, error=error)
        self._carrier.transmit_soon()

    # ---------------------------------------------------------------- events from the connection
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
        self._unacknowledged += len(data)
        consumer = self._consumer
        if consumer is not None:
            consumer.stream_data(data)
        elif self._early is None:
            self._early = [data]
        else:
            self._early.append(data)

    def deliver_eof(self) -> None:
        if self._lite is not None and self._lite.off_tunnel:
            return  # the end of a spliced stream comes on its dedicated connection
        self._eof = True
        consumer = self._consumer
        if consumer is not None and not self._closed:
            consumer.stream_eof()

    def deliver_reset(self, error: str | None) -> None:
        if self._lite is not None and self._lite.off_tunnel:
            return  # the peer closed its side of the stream once it was spliced
        if self._broken is None:
            self._broken = "reset"
            self.reset_error = error
            self._report_broken()

    def deliver_tunnel_closed(self) -> None:
        if self._lite is not None and self._lite.off_tunnel:
            return  # a spliced stream outlives its tunnel
        if self._broken is None and not (self._eof and self._sent_eof):
            self._broken = "tunnel closed"
            self.reset_error = "tunnel closed"
            self._report_broken()

    def _report_broken(self) -> None:
        consumer = self._consumer
        if consumer is not None and not self._closed:
            consumer.stream_broken()

    def deliver_window(self) -> None:
        """The send window opened: the consumer hears of it now, or, while the tunnel's output is over its
        high-water mark, once that drained (it could produce nothing before): one call, not one now that finds the
        output full and asks for room, and a second when the room comes (each window of a busy stream, on a tunnel
        whose link is the bottleneck)."""
        if self._lite is not None and not self._lite.writable():
            return  # what the tracker queued goes first
        carrier = self._carrier
        if carrier.outbound_congested:
            carrier.notify_room(self)
            return
        self.deliver_room()

    def deliver_room(self) -> None:
        """The tunnel's output is under its high-water mark again (after :meth:`has_room` said no)."""
        consumer = self._consumer
        if consumer is not None and not self._closed:
            consumer.stream_writable()

    def deliver_accepted(self, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self._accepted = True
        self.accept_headers = headers
        # the core may have held data until the SYN-ACK (no 0-RTT): the window opens now
        self.deliver_room()

    # ---------------------------------------------------------------- lite-tls
    def _lite_violation(self, unread: int, reason: str) -> None:
        """The peer broke the lite-tls rules on this stream: reset it (the tunnel and its other streams go on)."""
        carrier = self._carrier
        log.info("lite_tls.violation", tunnel=carrier.name, stream=self.stream_id, reason=reason)
        with contextlib.suppress(VTunnelError):
            carrier.tunnel.acknowledge_received_data(self.stream_id, unread)
            carrier.tunnel.reset_stream(self.stream_id, error=f"protocol: lite-tls {reason}")
        carrier.transmit()
        self.deliver_reset(f"protocol: lite-tls {reason}")


class _LiteTls:
    """A lite-tls stream's session and its queue of pieces to send (waiting for stream credit); spliced, the
    dedicated connection until the stream leaves, and what goes on it first."""

    __slots__ = (
        "_answer_timer",
        "_claim_timer",
        "_dedicated",
        "_eof",
        "_hold_timer",
        "_queue",
        "_refused",
        "_stall_timer",
        "_stream",
        "_through",
        "_to_dedicated",
        "dial",
        "forget_ticket",
        "off_tunnel",
        "passthrough_bytes",
        "passthrough_received",
        "protected_bytes",
        "relaying",
        "session",
    )

    def __init__(self, stream: TunnelStream) -> None:
        self._stream = stream
        self.session = LiteTlsSession(stream._carrier.tunnel.role)
        # (views of a piece whose start went already: the rest is never copied)
        self._queue: deque[tuple[bytes | memoryview, bool]] = deque()
        self._eof = False  # the owner ended its side: FIN once the queue is empty
        self._refused = False  # from_local took nothing: the writer waits to be told
        #: bytes sent in PASSTHROUGH frames and in ordinary ones (statistics)
        self.passthrough_bytes = 0
        self.protected_bytes = 0
        #: bytes received in PASSTHROUGH frames, or spliced read from the dedicated connection
        self.passthrough_received = 0
        #: splice mode: the connection the stream leaves over, until the hand-over
        self._dedicated: socket.socket | None = None
        #: splice mode: what the session sent after leaving, before the hand-over
        self._to_dedicated = bytearray()
        #: a spliced stream that left: its bytes and its end go over the dedicated connection, never the tunnel
        self.off_tunnel = False
        #: spliced, handed over: its kernel relay runs (counted in the carrier's ``spliced_relays``)
        self.relaying = False
        #: agent, splice mode: dials the dedicated connection once the ClientHello came (``splice_when_tls``)
        self.dial: Callable[[TunnelStream], None] | None = None
        #: server, splice mode: forgets the stream's ticket (``dedicated_expected``)
        self.forget_ticket: Callable[[], None] | None = None
        #: muxed, left, nothing parsed or held any more: reads go straight to the cut / to the consumer
        self._through = False
        #: the answer's deadline while awaiting it; the local stall check while a header is begun
        self._answer_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        #: passive: the deadline of the hold after the peer's marker
        self._hold_timer: asyncio.TimerHandle | None = None
        #: server, splice pending: how long its marker waits for the agent's dedicated connection
        self._claim_timer: asyncio.TimerHandle | None = None

    def log_closed(self, stream: TunnelStream, *, spliced: bool) -> None:
        log.debug(
            "lite_tls.closed",
            tunnel=stream._carrier.name,
            stream=stream.stream_id,
            mode="spliced" if spliced else "muxed",
            passthrough_bytes=self.passthrough_bytes,
            protected_bytes=self.protected_bytes,
            passthrough_received=self.passthrough_received,
        )

    def splice_over(self, dedicated: socket.socket) -> None:
        if self.session.splice_is_pending:  # the server's marker may be waiting for it
            self.settled(dedicated)
            return
        self.session.splice()
        self._dedicated = dedicated

    def _no_dedicated(self) -> None:
        """Server: the agent's dedicated connection did not come in time: the stream leaves muxed."""
        self._claim_timer = None
        stream = self._stream
        if not stream._closed and stream._broken is None and self.session.splice_is_pending:
            log.info("lite_tls.no_dedicated_connection", tunnel=stream._carrier.name, stream=stream.stream_id)
            self.settled(None)

    def settled(self, dedicated: socket.socket | None) -> None:
        if self._claim_timer is not None:
            self._claim_timer.cancel()
            self._claim_timer = None
        self._dedicated = dedicated
        self._act(self.session.splice_settled(dedicated is not None))

    def drop_dedicated(self) -> None:
        """The stream is closed: a dedicated connection not handed over is closed with it (and no timer runs)."""
        self._stop_timers()
        sock, self._dedicated = self._dedicated, None
        if sock is not None:
            sock.close()
        forget, self.forget_ticket = self.forget_ticket, None
        if forget is not None:
            forget()

    def from_local(self, data: bytes | memoryview) -> int:
        """Take all of ``data`` (0: none, the queue or the held bytes must go first)."""
        session = self.session
        if self._queue or session.holds_local or self.off_tunnel:
            self._refused = True  # (spliced: the consumer hands what it holds over with the socket)
            return 0
        if self._through:  # left, muxed, nothing tracked any more: only the cut at record boundaries
            self._queue.extend(session.cut(bytes(data)))
            self.flush()
            return len(data)
        self._act(session.from_local(bytes(data)))
        return len(data)

    def local_ended(self) -> bool:
        """The owner's FIN: True if it may go now (spliced, after leaving: never, it goes on the dedicated
        connection)."""
        self._eof = True
        self._act(self.session.local_ended())
        # (while the marker awaits its answer the tracker holds bytes that go before the FIN)
        return not self._queue and not self.off_tunnel and not self.session.holds_local

    def from_peer(self, data: bytes, passthrough: bool) -> None:
        if passthrough:
            self.passthrough_received += len(data)
        if self._through:  # both kinds are accepted after leaving, and nothing is parsed or held
            self._stream._deliver(data)
            return
        self._act(self.session.from_peer(data, passthrough))

    def _act(self, step: LiteTlsStep) -> None:
        stream = self._stream
        carrier = stream._carrier
        if step.hello and self.dial is not None:  # agent, splice mode
            self.session.splice_pending()  # before anything else: leaving waits for the dial's outcome
            self.dial(stream)
        elif step.hello and self.forget_ticket is not None and self.session.may_splice:
            # server, the stream named a ticket: the agent dials now; this end's marker waits for it (bounded)
            self.session.splice_pending()
            self._claim_timer = asyncio.get_running_loop().call_later(DEDICATED_WAIT, self._no_dedicated)
        if step.unbound:  # the agent left muxed: the connection bound here is not used
            sock, self._dedicated = self._dedicated, None
            if sock is not None:
                sock.close()
            log.info("lite_tls.dedicated_unused", tunnel=carrier.name, stream=stream.stream_id)
        if step.left is not None and self.session.spliced:
            self.off_tunnel = True
        elif step.left is not None:
            log.info(
                "lite_tls.left_tunnel",
                tunnel=carrier.name,
                stream=stream.stream_id,
                mode="muxed",
                role=step.left.value,
            )
        elif step.fell_back is not None:
            log.debug(
                "lite_tls.fell_back",
                tunnel=carrier.name,
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
                carrier.tunnel.acknowledge_received_data(stream.stream_id, step.consumed)
        for data in step.deliver:
            stream._deliver(data)
        session = self.session
        if session.awaiting_answer:
            if self._answer_timer is None:
                self._answer_timer = asyncio.get_running_loop().call_later(ANSWER_TIMEOUT, self._no_answer)
        elif self._answer_timer is not None:
            self._answer_timer.cancel()
            self._answer_timer = None
        if session.tracker.holding:
            if self._hold_timer is None:
                self._hold_timer = asyncio.get_running_loop().call_later(HOLD_TIMEOUT, self._held_too_long)
        elif self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._claim_timer is not None and not session.splice_is_pending:
            self._claim_timer.cancel()
            self._claim_timer = None
        if session.tracker.header_begun:
            self._stall_timer = asyncio.get_running_loop().call_later(LOCAL_STALL, self._stalled)
        if self.off_tunnel:
            for piece, passthrough in step.send:
                if passthrough:  # after leaving: for the dedicated connection
                    self._to_dedicated += piece
                else:  # the marker answer, before leaving
                    self._queue.append((piece, False))
            self.flush()  # then the hand-over, once the tunnel has everything before the switch
            return
        # left and transparent: from now on reads skip the session's steps (from_local, from_peer)
        self._through = session.left and session.tracker.transparent
        self._queue.extend(step.send)
        if self.flush():
            self._plain_if_settled()
            if self._refused and not self.session.holds_local:
                self._refused = False
                stream.deliver_room()

    def _plain_if_settled(self) -> None:
        """Both ends fell back and nothing waits: the stream is an ordinary one for good, with no tracking cost
        (its dedicated connection, spliced, is closed)."""
        tracker = self.session.tracker
        if tracker.state is LiteTlsState.FALLBACK and tracker.transparent and not self._queue:
            self.drop_dedicated()
            self._stream._lite = None

    def _stop_timers(self) -> None:
        for timer in (self._answer_timer, self._stall_timer, self._hold_timer, self._claim_timer):
            if timer is not None:
                timer.cancel()
        self._answer_timer = self._stall_timer = self._hold_timer = self._claim_timer = None

    def _held_too_long(self) -> None:
        self._hold_timer = None
        tracker = self.session.tracker
        if tracker.holding:
            self._timed_out(
                "lite_tls.hold_timeout",
                HOLD_TIMEOUT,
                "protocol: lite-tls no application data after the marker",
                held=tracker.held_from_peer,
            )

    def _no_answer(self) -> None:
        self._answer_timer = None
        if self.session.awaiting_answer:
            self._timed_out(
                "lite_tls.answer_timeout", ANSWER_TIMEOUT, "protocol: lite-tls no answer to the marker"
            )

    def _timed_out(self, event: str, waited: float, reason: str, **extra: int) -> None:
        """A bounded wait ran out: log it and reset the stream (the tunnel and its other streams go on)."""
        stream = self._stream
        if stream._closed or stream._broken is not None:
            return
        log.info(event, tunnel=stream._carrier.name, stream=stream.stream_id, waited=waited, **extra)
        self._reset(reason)

    def _stalled(self) -> None:
        self._stall_timer = None
        stream = self._stream
        if not stream._closed and stream._broken is None:
            self._act(self.session.local_stalled())

    def _reset(self, reason: str) -> None:
        """Reset the stream (the tunnel and its other streams go on); what was queued or held is dropped."""
        stream = self._stream
        carrier = stream._carrier
        self._queue.clear()
        self.off_tunnel = False
        self._stop_timers()
        with contextlib.suppress(VTunnelError):
            carrier.tunnel.reset_stream(stream.stream_id, error=reason)
        carrier.transmit()
        stream.deliver_reset(reason)

    def _hand_over(self, role: LiteTlsRole) -> None:
        """Spliced, left, and everything for the tunnel sent: the consumer relays the dedicated connection from
        now on (or cannot: then the stream is reset)."""
        stream = self._stream
        carrier = stream._carrier
        sock, self._dedicated = self._dedicated, None
        if sock is None or stream._closed:
            return
        if self._queue:  # the marker still waits for credit: flush() comes back here once it went
            self._dedicated = sock
            return
        consumer = stream._consumer
        to_peer, self._to_dedicated = bytes(self._to_dedicated), bytearray()
        if consumer is not None and stream._broken is None:
            # (counted before: a relay that has nothing to do ends inside stream_spliced)
            self.relaying = True
            carrier.spliced_relays += 1
            if consumer.stream_spliced(sock, to_peer, self._eof):
                log.info(
                    "lite_tls.left_tunnel",
                    tunnel=carrier.name,
                    stream=stream.stream_id,
                    mode="spliced",
                    role=role.value,
                )
                stream.close()
                return
            if self.relaying:
                self.relaying = False
                carrier.spliced_relays -= 1
        sock.close()
        log.info("lite_tls.splice_failed", tunnel=carrier.name, stream=stream.stream_id)
        self._reset("protocol: lite-tls splice failed")

    def writable(self) -> bool:
        """Credit came: send what is queued; True if the writer may go on."""
        if not self.flush() or self.session.holds_local:
            return False
        self._refused = False
        self._plain_if_settled()
        return True

    def flush(self) -> bool:
        """Send what the stream's credit allows; True once the queue is empty (then a pending FIN goes)."""
        stream = self._stream
        carrier = stream._carrier
        tunnel = carrier.tunnel
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
        if not queue and self.off_tunnel and self._dedicated is not None:
            asyncio.get_running_loop().call_soon(
                self._hand_over, self.session.tracker.role or LiteTlsRole.ACTIVE
            )
        elif (
            not queue
            and self._eof
            and not self.session.holds_local
            and not stream._sent_eof
            and not stream._closed
        ):
            self._eof = False
            carrier.transmit()
            stream._end()
        carrier.transmit()
        return not queue
