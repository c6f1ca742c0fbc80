"""One rudp connection as a :class:`~vtunnel.transports.link.Link`: the thin driver around
:class:`~vtunnel.arq.rudp.Connection`.

The owner (client or listener) vets plaintext rudp packets with :meth:`RudpLink.accepts` and
:meth:`RudpLink.take_run` and hands them in with :meth:`RudpLink.feed`; the link gives what they carry to its
consumer in the same step, and sends what the connection emits through ``transmit``, to its
``remote_address``. Everything the connection sends leaves through one point, :meth:`RudpLink._service`, run
after each input, each write and each timer; it also arms the link's one timer, at the earliest of the
connection's deadline (loss detection, PTO, delayed ACK, pacing, idle) and a slow watchdog for dead links,
when that is earlier than the timer already armed (one armed earlier fires, and re-arms for what is due).

``send_nowait`` is all or nothing: it takes ``data`` while the connection's send buffer has room (what does not
fit waits in a one-write backlog, fed to the connection as ACKs open room) and raises ``WouldBlock`` while that
backlog is not empty; ``link_writable`` follows when it is. rudp half-closes: ``send_eof`` ends our stream
(FIN) after what is queued, and the peer's FIN ends our input (``link_ended(None)``) once it was all read.

The link carries rudp's unreliable DATAGRAM frames (``max_datagram``, ``send_datagram_nowait``,
``link_datagram``): congestion controlled, sent once, never retransmitted; the connection's bounded queue drops
the oldest when the window holds them back too long. Of what one input brought, the in-order bytes go to the
consumer before its datagrams, so a datagram that rode in the same packet as its stream's opening finds it open.

Asyncio only (the loop's ``call_at`` and futures): ``rudp://`` is not supported on trio.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from typing import Final

import anyio
import anyio.lowlevel
import structlog

from vtunnel.arq.rudp.connection import (
    Connection,
    ConnectionClosed,
    ConnectionState,
    DatagramReceived,
    ErrorCode,
    Event,
    RudpLocalError,
    StreamEnded,
    StreamReadable,
)
from vtunnel.io.datagrams import Address, split_run
from vtunnel.transports.kcp.codec import ArqLink, Datagram, Transmit
from vtunnel.transports.link import ANY_SIZE, READ_SIZE, LinkConsumer, LinkStats

__all__ = ["RudpLink", "clock"]

log = structlog.get_logger("vtunnel.transports.rudp")

#: the clock of rudp connections (their links, the listener's and the client's new ones). Not the loop's: uvloop's keeps whole milliseconds, read once per pass of the loop, so
#: round trips measured by it were off by a millisecond or two either way (on a 20 ms path, more than the
#: queueing delay the congestion controller watches for); the loop's timers run on the same monotonic clock
clock: Final = time.monotonic

#: the first byte of a packet: ``01`` and the reserved bit 0, then the length of the destination CID
_FIXED: Final = 0x40


class RudpLink(ArqLink):
    """A reliable ordered link over one rudp connection (one tunnel).

    The link fails (``link_ended`` with :class:`anyio.BrokenResourceError`) when the peer stays silent past
    ``timeout`` with data outstanding, when the connection's idle timeout ends it, when the peer closes it with
    an error, or when either end breaks the protocol. A peer that closes without error ends our input
    (``link_ended(None)``) after what it sent was read. ``validate_on_ack``: the peer's address is taken as proven
    once it acknowledged one of our packets (a keyless server; with a key the handshake proves it at once).
    """

    def __init__(
        self,
        *,
        connection: Connection,
        timeout: float,
        transmit: Transmit,
        local_address: Address,
        remote_address: Address,
        on_close: Callable[[RudpLink], None] | None = None,
        validate_on_ack: bool = False,
    ) -> None:
        super().__init__(
            transmit=transmit,
            local_address=local_address,
            remote_address=remote_address,
            period=max(0.05, timeout / 4.0),
            now=clock(),
        )
        self._conn = connection
        self._cid = connection.local_cid
        #: what every packet to this connection starts with: its first byte and our connection ID
        self._prefix = bytes((_FIXED | len(self._cid),)) + self._cid
        self._timeout = timeout
        self._on_close = on_close
        self._validate_on_ack = validate_on_ack
        self._backlog = b""  # what the last send_nowait gave beyond the send buffer's room
        self._eof = False  # send_eof was called: the FIN follows the backlog
        self._input_ended = False  # link_ended(None) was given
        self._peer_closed = False  # the peer sent CLOSE without error: input ends after what is unread
        self._end_seen = False  # the connection reported StreamEnded: input ends once all of it was read
        self._failure: str | None = None  # the connection closed itself on a fault: fail after sending CLOSE
        #: unreliable datagrams given to the consumer, and dropped on arrival (no consumer yet, or paused)
        self.datagrams_received = 0
        self.datagrams_dropped = 0
        self._torn_down = False
        self._arm(self._watchdog_due)

    @property
    def connection(self) -> Connection:
        return self._conn

    def stats(self) -> LinkStats:
        raw = self._conn.stats()
        rate = raw.get("rate_estimate_Bps")  # the bbr controller's model only
        return LinkStats(
            rtt=float(raw["srtt_ms"]) / 1000.0,
            delivery_rate=float(rate) if rate is not None else None,
            retransmitted_bytes=int(raw["stream_bytes_retransmitted"]),
            lost_packets=int(raw["packets_lost"]),
        )

    # --- from the owner -------------------------------------------------------------------------------------

    def accepts(self, datagram: Datagram) -> bool:
        """Whether ``datagram`` looks like an rudp packet for this connection (its first byte and connection ID;
        the connection parses the rest, and drops what does not parse)."""
        prefix = self._prefix
        return len(datagram) > len(prefix) and datagram[: len(prefix)] == prefix

    def take_run(self, buffer: bytes, segment: int, into: list[Datagram]) -> bool:
        """Add a run of datagrams (``segment`` bytes each) to ``into``, one by one; False, adding nothing, when
        one is not this connection's."""
        if segment >= len(buffer):
            if not self.accepts(buffer):
                return False
            into.append(buffer)
            return True
        prefix = self._prefix
        end = len(prefix)
        if segment <= end:
            return False  # (no datagram but the last could hold more than the prefix)
        datagrams = split_run(buffer, segment)
        if len(datagrams[-1]) <= end:
            return False
        for datagram in datagrams:  # (accepts() of each, without a call per datagram)
            if datagram[:end] != prefix:
                return False
        into.extend(datagrams)
        return True

    def feed(self, datagrams: Sequence[Datagram]) -> None:
        """Input one batch of vetted rudp packets: deliver what they carry, then send (ACKs, data) once."""
        conn = self._conn
        if self._torn_down:
            return
        now = clock()
        # (a conversation's every input is one datagram: without the bookkeeping of a run)
        events = (
            conn.receive_datagram(datagrams[0], now)
            if len(datagrams) == 1
            else conn.receive_datagrams(datagrams, now)
        )
        self.last_receive = now
        self._handle(events)
        self._service(now)

    def fail(self, reason: str) -> None:
        """The link is gone: the consumer gets ``link_ended`` with :class:`anyio.BrokenResourceError`."""
        if self._error is not None or self._closed:
            return
        log.info("rudp connection failed", peer=self.remote_address, reason=reason)
        self._error = anyio.BrokenResourceError(reason)
        self._teardown()
        consumer = self._consumer
        if consumer is not None and not self._input_ended:
            self._input_ended = True
            consumer.link_ended(self._error)

    # --- Link -----------------------------------------------------------------------------------------------

    @property
    def max_datagram(self) -> int:
        return self._conn.max_datagram_payload()

    def send_datagram_nowait(self, data: bytes) -> None:
        self._check_sendable()
        conn = self._conn
        if len(data) > conn.max_datagram_payload():
            raise ValueError(f"a {len(data)}-byte datagram exceeds the link's {conn.max_datagram_payload()}")
        if conn.closed or self._failure is not None:
            raise anyio.BrokenResourceError(self._failure or "the connection closed")
        try:
            conn.send_datagram(data)
        except RudpLocalError as exc:  # closing (the failure is reported by the next service)
            raise anyio.BrokenResourceError(str(exc)) from exc
        self._service(clock())

    async def run(self, consumer: LinkConsumer) -> None:
        if self._consumer is not None:
            raise anyio.BusyResourceError("running")
        self._consumer = consumer
        try:
            if self._error is not None and not self._input_ended:
                self._input_ended = True
                consumer.link_ended(self._error)
            elif not self._torn_down:
                self._deliver()  # what arrived before (a server connection's first packet)
                self._service(clock())
            await asyncio.shield(self._ended)
        finally:
            self._consumer = None

    def send_nowait(self, data: bytes) -> None:
        if self._closed or self._eof or self._peer_closed or self._error is not None:
            self._check_sendable()  # (asked only then: two calls less per write)
        conn = self._conn
        if self._backlog or conn.send_room() <= 0:
            self._blocked = True
            raise anyio.WouldBlock
        now = clock()
        if conn.all_acknowledged:
            self._busy_since = now
        taken = conn.send(data)
        if taken < len(data):
            self._backlog = bytes(data[taken:])
        self._service(now)

    def send_room(self) -> int:
        """Any write while the connection's send buffer has room and nothing waits for it (what the buffer does
        not take waits in the link); 0 else."""
        if self._closed or self._eof or self._peer_closed or self._error is not None or self._torn_down:
            return ANY_SIZE
        if self._backlog or self._conn.send_room() <= 0:
            self._blocked = True
            return 0
        return ANY_SIZE

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._consumer is not None and not self._torn_down:
            self._deliver()
            self._service(clock())

    async def send_eof(self) -> None:
        """End our stream after what is queued (the peer's input ends; ours goes on)."""
        if self._closed or self._eof or self._error is not None or self._peer_closed:
            return
        self._eof = True
        if not self._backlog:
            self._conn.end_stream()
        self._service(clock())
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if self._closed:
            return
        if self._error is None and not self._torn_down and not self._sent_everything():
            await self._linger(lambda: self._torn_down or self._sent_everything())
        if self._closed:
            return
        self._closed = True
        if self._error is None and not self._torn_down:
            conn = self._conn
            conn.close(ErrorCode.NO_ERROR)
            out = conn.datagrams_to_send(clock())
            if out:
                self._transmit(out, self.remote_address)
            self._teardown()
        await anyio.lowlevel.checkpoint()

    # --- internals ------------------------------------------------------------------------------------------

    def _check_sendable(self) -> None:
        """Raise what a write raises on a link that cannot send any more (closed, ended by us or by the peer)."""
        self._check_usable()
        if self._eof:
            raise anyio.ClosedResourceError
        if self._peer_closed:
            raise anyio.BrokenResourceError("the peer closed the link")

    def _sent_everything(self) -> bool:
        return not self._backlog and self._conn.all_acknowledged

    def _handle(self, events: list[Event]) -> None:
        """What the connection reported: bytes to deliver, the end of input, a close."""
        deliver = False
        datagrams: list[bytes] = []
        for event in events:
            if isinstance(event, StreamReadable):
                deliver = True
            elif isinstance(event, StreamEnded):
                self._end_seen = True
                deliver = True
            elif isinstance(event, DatagramReceived):
                datagrams.append(event.data)
            elif isinstance(event, ConnectionClosed):
                if event.by_peer and event.code == ErrorCode.NO_ERROR:
                    self._peer_closed = True
                    deliver = True
                elif event.by_peer:
                    self._failure = f"the peer closed the connection: {event.reason or event.code}"
                else:
                    self._failure = f"the connection closed: {event.reason or event.code}"
        if deliver:
            self._deliver()
        for data in datagrams:  # after the bytes: a stream opened in this input takes its datagrams
            consumer = self._consumer
            if consumer is None or self._paused or self._torn_down:
                self.datagrams_dropped += 1
                continue
            self.datagrams_received += 1
            consumer.link_datagram(data)

    def _deliver(self) -> None:
        """Hand the in-order bytes to the consumer, unless paused, then the end of input if it came.
        Re-entry only asks for another pass."""
        if self._delivering:
            self._deliver_again = True
            return
        conn = self._conn
        self._delivering = True
        try:
            while True:
                self._deliver_again = False
                consumer = self._consumer
                drained = False  # (the consumer is there, not paused, and nothing is left to read)
                while consumer is not None and not self._paused:
                    if not conn.readable:
                        drained = True
                        break
                    consumer.link_data(conn.receive(READ_SIZE))
                    consumer = self._consumer
                if (
                    drained
                    and consumer is not None
                    and not self._input_ended
                    and (self._peer_closed or (self._end_seen and conn.stream_ended))
                ):
                    self._input_ended = True
                    consumer.link_ended(None)
                if not self._deliver_again:
                    break
        finally:
            self._delivering = False
        if self._peer_closed and self._input_ended and not self._torn_down:
            # the peer is gone and all it sent was read: nothing more can move on this link
            self._error = anyio.BrokenResourceError("the peer closed the link")
            self._teardown()

    def _service(self, now: float) -> None:
        """The one output point: feed the backlog, send what the connection built, re-arm the timer, wake the
        writer; a connection that closed itself on a fault fails the link once its CLOSE is out."""
        if self._torn_down:
            return
        conn = self._conn
        backlog = self._backlog
        if backlog and conn.send_room() > 0:
            taken = conn.send(backlog)
            self._backlog = backlog = backlog[taken:]
            if not backlog and self._eof:
                conn.end_stream()
        if self._validate_on_ack and conn.rtt.has_sample:
            self._validate_on_ack = False
            conn.address_validated()  # it acknowledged a packet it could only have received there
        out = conn.datagrams_to_send(now)
        if out:
            self._transmit(out, self.remote_address)
        if self._failure is not None or conn.state is ConnectionState.CLOSED:
            self.fail(self._failure or "the connection closed")
            return
        deadline = conn.next_deadline()
        due = self._watchdog_due
        if deadline is not None and deadline < due:
            due = deadline
        # only ever earlier: rudp's deadline moves later with nearly every message (the PTO after each send, the
        # held ACK after each receipt); a timer armed earlier stays and, firing, finds little or nothing due and
        # re-arms, instead of a loop timer cancelled and made anew for each message (3.7 per request/response,
        # 0.03 so)
        if due < self._timer_when:
            self._arm(due)
        if self._blocked and not backlog and conn.send_room() > 0:
            self._blocked = False
            consumer = self._consumer
            if consumer is not None:
                consumer.link_writable()
        if self._drain_waiters and self._sent_everything():
            self._wake_drain_waiters()

    def _on_timer(self) -> None:
        due = self._timer_when
        self._timer = None
        self._timer_when = math.inf
        if self._torn_down:
            return
        now = clock()
        if now < due:
            now = due  # (the loop's timers keep whole milliseconds: one may fire a little before its time)
        if now >= self._watchdog_due and not self._watchdog(now):
            return
        self._handle(self._conn.handle_timer(now))
        self._service(now)

    def _watchdog(self, now: float) -> bool:
        """Fail the link if the peer went silent with data of ours outstanding; whether it lives on."""
        self._watchdog_due = now + self._watchdog_period
        if self._conn.bytes_in_flight and now - max(self.last_receive, self._busy_since) >= self._timeout:
            self.fail(f"dead link: no answer for {now - self.last_receive:.1f} s")
            return False
        return True

    def _teardown(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        log.debug("rudp connection closed", peer=self.remote_address, **self._conn.stats())
        self._stop()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(self)
