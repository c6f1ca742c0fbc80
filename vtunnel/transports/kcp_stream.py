"""One KCP session as an anyio :class:`~anyio.abc.ByteStream`: the thin pump around :class:`KCPEngine`.

The owner (client connection or server listener) hands in vetted plaintext KCP datagrams with
:meth:`KCPStream.feed`; the stream seals and sends what KCP emits through ``transmit``. Timers come from
``ikcp_check`` (no fixed tick; a quiet session has no timer at all) plus one slow watchdog for dead links and
idle expiry.

Asyncio only (the loop's ``call_at`` and futures): ``kcp://`` is not supported on trio.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import anyio
import structlog
from anyio.abc import ByteStream, SocketAttribute

from vtunnel.arq.kcp_engine import KCPEngine
from vtunnel.arq.kcp_options import KCPOptions
from vtunnel.io.datagrams import Address

__all__ = ["ACK_DELAY", "ACK_NOW_SEGMENTS", "KCPStream"]

log = structlog.get_logger("vtunnel.transports.kcp")

#: seconds ``aclose`` waits for queued data to be acknowledged before tearing the session down
LINGER: Final = 1.0
#: push mode: the longest an ACK waits for an answer to ride on. Far below ikcp's smallest retransmission
#: timeout (30 ms with nodelay), so the peer never resends for it; kcp-go holds ACKs for up to its interval
ACK_DELAY: Final = 0.002
#: push mode: from this many segments' worth of input since the last ACK, the ACK goes out at once (a stream
#: of data is acknowledged as fast as before; only small exchanges wait)
ACK_NOW_SEGMENTS: Final = 2


class KCPStream(ByteStream):
    """A reliable ordered byte stream over one KCP session (one tunnel).

    ``send`` waits while a window's worth of segments is queued or unacknowledged (back-pressure);
    ``receive`` returns bytes as they arrive and raises :class:`anyio.BrokenResourceError` once the link is
    dead (ikcp gave up, or the peer stayed silent past ``timeout`` with data outstanding, or past ``idle``).
    KCP has no half-close: ``send_eof`` closes the whole session, like ``aclose``.

    It also has a synchronous side for the tunnel pump: :meth:`send_nowait`, :meth:`receive_nowait` and
    :meth:`set_on_readable` (push mode). The pump writes a frame straight from the task or callback that
    produced it, and ikcp sends it in the same step; received bytes are pushed to the pump from the datagram
    callback that brought them. Through ``send`` and ``receive`` each message would wait for the pump's writer
    or reader task and for the deferred flush: two or three event-loop iterations per message, each side.
    """

    def __init__(
        self,
        *,
        engine: KCPEngine,
        options: KCPOptions,
        transmit: Callable[[list[bytes]], None],
        local_address: Address,
        remote_address: Address,
        on_close: Callable[[KCPStream], None] | None = None,
    ) -> None:
        self._engine = engine
        self._options = options
        self._transmit = transmit
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self.local_address = local_address
        self.remote_address = remote_address
        self._reader: asyncio.Future[None] | None = None
        self._writer: asyncio.Future[None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._timer: asyncio.Handle | None = None
        self._timer_when = 0.0
        self._flush_scheduled = False
        #: push mode (see :meth:`set_on_readable`)
        self._readable_callback: Callable[[], None] | None = None
        self._ack_timer: asyncio.TimerHandle | None = None
        #: bytes fed since the last flush (so since the last ACK went out), in push mode
        self._unacked = 0
        self._error: BaseException | None = None
        self._closed = False
        now = self._loop.time()
        self.last_receive = now
        self._busy_since = now
        period = max(0.05, min(options.timeout, options.idle) / 4.0)
        self._watchdog: asyncio.TimerHandle | None = self._loop.call_later(period, self._on_watchdog, period)

    # --- from the owner -------------------------------------------------------------------------------------

    def feed(self, datagrams: Sequence[bytes | memoryview]) -> None:
        """Input one batch of vetted plaintext KCP datagrams, then ACK and wake the reader/writer.

        In push mode the bytes go up before the ACK goes out: the reader sees them one ``sendto`` earlier, and
        whatever it answers at once (a window update, a reply) leaves in the same flush as the ACK.
        """
        engine = self._engine
        if engine.closed:
            return
        now = self._loop.time()
        if not engine.receive_datagrams(datagrams, now):
            return
        self.last_receive = now
        callback = self._readable_callback
        if callback is None:
            engine.flush(now)
            self._pump(now)
            if engine.readable():
                self._wake_reader()
            return
        for datagram in datagrams:
            self._unacked += len(datagram)
        if engine.readable():
            callback()
            if engine.closed:
                return
        if self._unacked and self._unacked < ACK_NOW_SEGMENTS * engine.max_data and not engine.waiting():
            # a small exchange with nothing of ours in flight: the answer, if one comes soon, carries the ACK
            if self._ack_timer is None:
                self._ack_timer = self._loop.call_later(ACK_DELAY, self._on_ack_delay)
        else:
            self._flush_now(now)
        self._pump(now)

    def fail(self, reason: str) -> None:
        """The link is gone: every later ``receive``/``send`` raises :class:`anyio.BrokenResourceError`.

        In push mode the callback runs once more, so the pump learns of it from :meth:`receive_nowait`.
        """
        if self._error is not None or self._closed:
            return
        log.info("kcp session failed", conv=self._engine.conv, peer=self.remote_address, reason=reason)
        self._error = anyio.BrokenResourceError(reason)
        self._teardown()
        callback = self._readable_callback
        if callback is not None:
            callback()

    # --- the synchronous side (the tunnel pump) -------------------------------------------------------------

    def set_on_readable(self, callback: Callable[[], None] | None) -> None:
        """Push mode: ``callback()`` runs when received bytes wait and when the session fails (``None``: off).

        The callback takes the bytes with :meth:`receive_nowait`, which raises once the session has failed.
        """
        self._readable_callback = callback

    def receive_nowait(self, max_bytes: int = 65536) -> bytes:
        """What ``receive`` would return now, without waiting: ``b""`` when no bytes wait.

        Raises like ``receive`` on a closed (:class:`anyio.ClosedResourceError`) or failed
        (:class:`anyio.BrokenResourceError`) session.
        """
        self._check_usable()
        engine = self._engine
        data = engine.receive(max_bytes)
        if data and engine.probe_pending:  # reading reopened a full receive window: tell the peer soon
            self._schedule_flush()
        return data

    def send_nowait(self, data: bytes) -> bool:
        """Queue ``data`` into KCP and flush it now if the send window has room for all of it.

        ``False`` (nothing taken) when the session is closed or broken or the window is too full: the caller
        then uses ``send``, which waits for room and raises the session's error. Never raises, never waits.
        """
        engine = self._engine
        if self._closed or self._error is not None or engine.closed:
            return False
        if engine.room() * engine.max_data < len(data):
            return False
        now = self._loop.time()
        if engine.waiting() == 0:
            self._busy_since = now
        engine.send(data)
        self._flush_now(now)  # the ACKs still owed leave with the data
        self._pump(now)
        return True

    def _flush_now(self, now: float) -> None:
        """ikcp's flush: ACKs for everything input so far, new data, retransmissions (sent by ``_pump``)."""
        self._unacked = 0
        timer = self._ack_timer
        if timer is not None:
            self._ack_timer = None
            timer.cancel()
        self._engine.flush(now)

    def _on_ack_delay(self) -> None:
        self._ack_timer = None
        if self._engine.closed or not self._unacked:
            return
        now = self._loop.time()
        self._flush_now(now)
        self._pump(now)

    @property
    def engine(self) -> KCPEngine:
        return self._engine

    # --- internals ------------------------------------------------------------------------------------------

    def _pump(self, now: float) -> None:
        """Send what KCP produced, check the link, re-arm the timer and wake a waiting writer."""
        engine = self._engine
        out = engine.datagrams_to_send()
        if out:
            self._transmit(out)
        if engine.dead:
            self.fail("dead link: a segment was retransmitted too often")
            return
        deadline = engine.next_deadline(now)
        timer = self._timer
        if deadline is None:
            if timer is not None:
                timer.cancel()
                self._timer = None
        elif timer is None or abs(self._timer_when - deadline) > 0.0005:
            # uvloop hands back a plain Handle (no when()) for a deadline already past: remember it ourselves
            if timer is not None:
                timer.cancel()
            self._timer_when = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)
        if engine.writable():
            self._wake_writer()

    def _on_timer(self) -> None:
        self._timer = None
        now = self._loop.time()
        self._engine.handle_timer(now)
        self._pump(now)

    def _on_flush(self) -> None:
        self._flush_scheduled = False
        if self._engine.closed:
            return
        now = self._loop.time()
        self._engine.flush(now)
        self._pump(now)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._on_flush)

    def _on_watchdog(self, period: float) -> None:
        self._watchdog = None
        if self._engine.closed:
            return
        now = self._loop.time()
        silent = now - self.last_receive
        if self._engine.waiting() and now - max(self.last_receive, self._busy_since) >= self._options.timeout:
            self.fail(f"dead link: no answer for {silent:.1f} s")
            return
        if silent >= self._options.idle:
            self.fail(f"idle for {silent:.1f} s")
            return
        self._watchdog = self._loop.call_later(period, self._on_watchdog, period)

    def _wake_reader(self) -> None:
        fut = self._reader
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _wake_writer(self) -> None:
        fut = self._writer
        if fut is not None and not fut.done():
            fut.set_result(None)
        if self._drain_waiters:
            for waiter in self._drain_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._drain_waiters.clear()

    def _check_usable(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._error is not None:
            raise anyio.BrokenResourceError(str(self._error)) from self._error

    def _teardown(self) -> None:
        log.debug(
            "kcp session closed", conv=self._engine.conv, peer=self.remote_address, **self._engine.stats()
        )
        for handle in (self._timer, self._watchdog, self._ack_timer):
            if handle is not None:
                handle.cancel()
        self._timer = self._watchdog = self._ack_timer = None
        self._engine.close()
        self._wake_reader()
        self._wake_writer()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(self)

    # --- ByteStream -----------------------------------------------------------------------------------------

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        while True:
            self._check_usable()
            engine = self._engine
            data = engine.receive(max_bytes)
            if data:
                if engine.probe_pending:  # reading reopened a full receive window: tell the peer now
                    self._schedule_flush()
                return data
            if self._reader is not None:
                raise anyio.BusyResourceError("receiving")
            fut = self._loop.create_future()
            self._reader = fut
            try:
                await fut
            finally:
                self._reader = None

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        if not view:
            self._check_usable()
            await anyio.lowlevel.checkpoint()
            return
        while True:
            self._check_usable()
            engine = self._engine
            room = engine.room()
            if room > 0:
                if engine.waiting() == 0:
                    self._busy_since = self._loop.time()
                take = max(room, 1) * engine.max_data
                engine.send(view[:take])
                view = view[take:]
                self._schedule_flush()
                if not view:
                    await anyio.lowlevel.checkpoint()
                    return
                continue
            if self._writer is not None:
                raise anyio.BusyResourceError("sending")
            fut = self._loop.create_future()
            self._writer = fut
            try:
                await fut
            finally:
                self._writer = None

    async def send_eof(self) -> None:
        """KCP cannot half-close: this closes the whole session (as :meth:`aclose` does)."""
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        if self._error is None and self._engine.waiting():
            with anyio.move_on_after(LINGER, shield=True):
                while self._error is None and self._engine.waiting():
                    fut = self._loop.create_future()
                    self._drain_waiters.append(fut)
                    await fut
        self._closed = True
        if self._error is None:
            # the ACKs still owed go out first: the peer's last segment (a GOAWAY, say) is often what made us
            # close, and unacknowledged it would be resent until the peer gives up on it
            now = self._loop.time()
            self._flush_now(now)
            out = self._engine.datagrams_to_send()
            if out:
                self._transmit(out)
            self._teardown()
        await anyio.lowlevel.checkpoint()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return {
            SocketAttribute.local_address: lambda: self.local_address,
            SocketAttribute.remote_address: lambda: self.remote_address,
        }
