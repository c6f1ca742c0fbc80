"""One KCP session as a :class:`~vtunnel.transports.link.Link`: the thin driver around :class:`KCPEngine`.

The owner (client or listener) vets plaintext KCP datagrams with :meth:`KCPLink.accepts` and
:meth:`KCPLink.take_run` and hands them in with :meth:`KCPLink.feed`; the link gives what they carry to its
consumer in the same step, and sends what KCP emits through ``transmit``, to its ``remote_address``. Everything the session sends leaves through one point, :meth:`KCPLink._service`, run after
each input, each write and each timer; it also re-arms the session's one timer, at the earliest of ikcp's next
deadline (``ikcp_check``: a quiet session has none), a delayed ACK and a slow watchdog for dead links and idle
expiry.

Asyncio only (the loop's ``call_at`` and futures): ``kcp://`` is not supported on trio.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from typing import Final

import anyio
import anyio.lowlevel
import structlog

from vtunnel.arq.kcp_engine import KCPEngine
from vtunnel.arq.kcp_options import KCPOptions
from vtunnel.arq.kcp_wire import RunVerdict, valid_datagram, vet_run
from vtunnel.io.datagrams import Address, split_run
from vtunnel.transports.kcp.codec import TIMER_SLACK, ArqLink, Datagram, Transmit
from vtunnel.transports.link import ANY_SIZE, READ_SIZE, LinkConsumer, LinkStats

__all__ = ["ACK_DELAY", "ACK_HOLD", "ACK_NOW_SEGMENTS", "KCPLink"]

log = structlog.get_logger("vtunnel.transports.kcp")

#: how long an ACK waits for an answer to ride on, unless the session's timer is armed within KCP's interval
#: anyway (then until it fires, as kcp-go holds ACKs for up to its interval). Below ikcp's smallest
#: retransmission timeout (30 ms with nodelay) either way, so the peer never resends for it
ACK_DELAY: Final = 0.002
#: the longest an ACK is held for the session's armed timer (KCP's interval when shorter: 10 ms in fast3)
ACK_HOLD: Final = 0.010
#: from this many segments' worth of input since the last ACK, the ACK goes out at once (a stream of data is
#: acknowledged as fast as before; only small exchanges wait)
ACK_NOW_SEGMENTS: Final = 2


class KCPLink(ArqLink):
    """A reliable ordered link over one KCP session (one tunnel).

    ``send_nowait`` takes all of its data while the session's send window has room (ikcp queues it in
    segments) and sends what the window allows at once; with the window full it raises ``WouldBlock`` and calls
    ``link_writable`` when ACKs open it. The link fails (``link_ended`` with :class:`anyio.BrokenResourceError`)
    when ikcp gives up on a segment, when the peer stays silent past ``timeout`` with data outstanding, or past
    ``idle``. KCP has no half-close: ``send_eof`` closes the whole session, like ``aclose``.
    """

    def __init__(
        self,
        *,
        engine: KCPEngine,
        options: KCPOptions,
        transmit: Transmit,
        local_address: Address,
        remote_address: Address,
        on_close: Callable[[KCPLink], None] | None = None,
    ) -> None:
        super().__init__(
            transmit=transmit,
            local_address=local_address,
            remote_address=remote_address,
            period=max(0.05, min(options.timeout, options.idle) / 4.0),
            now=asyncio.get_running_loop().time(),
        )
        self._engine = engine
        self._conv = engine.conv
        self._options = options
        self._on_close = on_close
        self._flush_due = False  # reading reopened a full receive window: the next service flushes
        self._ack_due: float | None = None  # a delayed ACK's deadline
        self._unacked = 0  # bytes fed since the last flush (so since the last ACK went out)
        #: the longest a held ACK waits for the armed timer: ikcp's flush tick, at most ACK_HOLD
        self._ack_hold = min(options.interval / 1000.0, ACK_HOLD)
        self._last_stats = LinkStats()  # what stats() gives once the engine is closed
        self._arm(self._watchdog_due)

    @property
    def engine(self) -> KCPEngine:
        return self._engine

    @property
    def options(self) -> KCPOptions:
        return self._options

    def stats(self) -> LinkStats:
        raw = self._engine.stats()
        if not raw:
            return self._last_stats
        rate = raw.get("rate_estimate_MBps")
        return LinkStats(
            rtt=float(raw["srtt_ms"]) / 1000.0,
            delivery_rate=float(rate) * 1e6 if rate is not None else None,
            retransmitted_packets=int(raw["retransmits"]),
        )

    # --- from the owner -------------------------------------------------------------------------------------

    def accepts(self, datagram: Datagram) -> bool:
        """Whether ``datagram`` is a valid KCP datagram of this session (its conv, known commands, exact
        lengths)."""
        return valid_datagram(datagram, self._conv)

    def take_run(self, buffer: bytes, segment: int, into: list[Datagram]) -> bool:
        """Add a run of datagrams (``segment`` bytes each) to ``into`` as ikcp may take them: the whole run as
        one input when none carries an ACK, else one by one. False, adding nothing, when one is not valid."""
        engine = self._engine
        if segment >= len(buffer):
            if not valid_datagram(buffer, engine.conv):
                return False
            into.append(buffer)
            return True
        verdict = vet_run(buffer, segment, engine.conv)
        if verdict == RunVerdict.INVALID:
            return False
        if verdict == RunVerdict.NO_ACKS and engine.whole_runs:
            into.append(buffer)
        else:
            into.extend(split_run(buffer, segment))
        return True

    def feed(self, datagrams: Sequence[Datagram]) -> None:
        """Input one batch of vetted plaintext KCP datagrams: deliver what they carry, ACK, send.

        The bytes go up before the ACK goes out: whatever the consumer answers at once (a window update, a reply)
        leaves in the same flush as the ACK. A small exchange with nothing of ours in flight holds its ACK for the
        answer to carry it: until the session's timer fires when it is armed for a time from :data:`ACK_DELAY` up
        to KCP's interval (at most :data:`ACK_HOLD`) ahead, so no timer moves for it (in a request/response
        exchange that is ikcp's flush tick, and the timer stays put over many messages), else for
        :data:`ACK_DELAY`.
        """
        engine = self._engine
        if engine.closed:
            return
        now = self._loop.time()
        if not engine.receive_datagrams(datagrams, now):
            return
        self.last_receive = now
        self._unacked += sum(map(len, datagrams))
        self._deliver()
        if engine.closed:
            return
        # the pacer hears of the ACKs after the bytes went up: an answer to them is on its way meanwhile
        waiting = engine.note_acks(now)
        if self._consumer is not None and self._unacked < ACK_NOW_SEGMENTS * engine.max_data and not waiting:
            if self._ack_due is None:
                armed = self._timer_when
                if now + ACK_DELAY <= armed <= now + self._ack_hold:
                    self._ack_due = armed
                    if not (self._flush_due or self._blocked or self._drain_waiters):
                        return  # nothing to send, no writer to wake, and the timer stays where it is
                else:
                    self._ack_due = now + ACK_DELAY
        else:
            self._flush(now)
        self._service(now)

    def fail(self, reason: str) -> None:
        """The link is gone: the consumer gets ``link_ended`` with :class:`anyio.BrokenResourceError`."""
        if self._error is not None or self._closed:
            return
        log.info("kcp session failed", conv=self._engine.conv, peer=self.remote_address, reason=reason)
        self._error = anyio.BrokenResourceError(reason)
        self._teardown()
        consumer = self._consumer
        if consumer is not None:
            consumer.link_ended(self._error)

    # --- Link -----------------------------------------------------------------------------------------------

    async def run(self, consumer: LinkConsumer) -> None:
        if self._consumer is not None:
            raise anyio.BusyResourceError("running")
        self._consumer = consumer
        try:
            if self._error is not None:
                consumer.link_ended(self._error)
            elif not self._closed:
                self._deliver()  # what arrived before (a server session's first datagram)
                self._service(self._loop.time())
            await asyncio.shield(self._ended)
        finally:
            self._consumer = None

    def send_nowait(self, data: bytes) -> None:
        if self._closed or self._error is not None:
            self._check_usable()
        engine = self._engine
        now = self._loop.time()
        # queued and flushed in one call: the ACKs still owed leave with the data
        waited = engine.write(data, now)
        if waited < 0:
            self._blocked = True
            raise anyio.WouldBlock
        if waited == 0:
            self._busy_since = now
        self._unacked = 0  # (what _flush resets, inline)
        self._ack_due = None
        self._flush_due = False
        self._service(now)

    def send_room(self) -> int:
        """Any write while KCP's send window has room (ikcp queues all of it in segments); 0 while it is full."""
        if self._closed or self._error is not None:
            return ANY_SIZE
        if self._engine.room() <= 0:
            self._blocked = True
            return 0
        return ANY_SIZE

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._consumer is not None and not self._closed and self._error is None:
            self._deliver()
            self._service(self._loop.time())

    async def send_eof(self) -> None:
        """KCP cannot half-close: this closes the whole session (as :meth:`aclose` does)."""
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        engine = self._engine
        if self._error is None and engine.waiting():
            await self._linger(lambda: not engine.waiting())
        if self._closed:
            return
        self._closed = True
        if self._error is None:
            # the ACKs still owed go out first: the peer's last segment (a GOAWAY, say) is often what made us
            # close, and unacknowledged it would be resent until the peer gives up on it
            now = self._loop.time()
            self._flush(now)
            out = self._engine.datagrams_to_send()
            if out:
                self._transmit(out, self.remote_address)
            self._teardown()
        await anyio.lowlevel.checkpoint()

    # --- internals ------------------------------------------------------------------------------------------

    def _deliver(self) -> None:
        """Hand what ikcp has reassembled to the consumer, unless paused. Re-entry only asks for another pass."""
        if self._delivering:
            self._deliver_again = True
            return
        engine = self._engine
        self._delivering = True
        try:
            while True:
                self._deliver_again = False
                consumer = self._consumer
                while consumer is not None and not self._paused:
                    data = engine.receive(READ_SIZE)
                    if not data:
                        break
                    if engine.reopened:  # reading reopened a full receive window: tell the peer
                        self._flush_due = True
                    consumer.link_data(data)
                    if engine.drained:  # (no further call to find nothing: more input asks for a pass)
                        break
                    consumer = self._consumer
                if not self._deliver_again:
                    return
        finally:
            self._delivering = False

    def _flush(self, now: float) -> None:
        """ikcp's flush: ACKs for everything input so far, new data, retransmissions (sent by ``_service``)."""
        self._unacked = 0
        self._ack_due = None
        self._flush_due = False
        self._engine.flush(now)

    def _service(self, now: float) -> None:
        """The one output point: send what KCP produced, check the link, re-arm the timer, wake the writer."""
        engine = self._engine
        if engine.closed:
            return
        if self._flush_due:
            self._flush(now)
        out = engine.datagrams_to_send()
        if out:
            self._transmit(out, self.remote_address)
        if engine.dead:
            self.fail("dead link: a segment was retransmitted too often")
            return
        deadline = engine.next_deadline(now)
        due = self._watchdog_due if deadline is None or deadline > self._watchdog_due else deadline
        ack_due = self._ack_due
        if ack_due is not None and ack_due < due:
            due = ack_due
        if self._timer is None or abs(due - self._timer_when) > TIMER_SLACK:  # (else _arm has nothing to do)
            self._arm(due)
        if (self._blocked or self._drain_waiters) and engine.writable():
            if self._blocked:
                self._blocked = False
                consumer = self._consumer
                if consumer is not None:
                    consumer.link_writable()
            if self._drain_waiters and not engine.waiting():
                self._wake_drain_waiters()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = math.inf
        engine = self._engine
        if engine.closed:
            return
        now = self._loop.time()
        if now >= self._watchdog_due and not self._watchdog(now):
            return
        if self._ack_due is not None and now >= self._ack_due:
            if self._unacked:
                self._flush(now)
            self._ack_due = None
        engine.handle_timer(now)
        self._service(now)

    def _watchdog(self, now: float) -> bool:
        """Fail the link if it is dead or idle; whether it lives on."""
        self._watchdog_due = now + self._watchdog_period
        silent = now - self.last_receive
        if self._engine.waiting() and now - max(self.last_receive, self._busy_since) >= self._options.timeout:
            self.fail(f"dead link: no answer for {silent:.1f} s")
            return False
        if silent >= self._options.idle:
            self.fail(f"idle for {silent:.1f} s")
            return False
        return True

    def _teardown(self) -> None:
        log.debug(
            "kcp session closed", conv=self._engine.conv, peer=self.remote_address, **self._engine.stats()
        )
        self._last_stats = self.stats()
        self._engine.close()
        self._stop()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(self)
