"""The one adapter around the C ikcp binding (``siokcp``): sans-IO, replaceable.

Nothing here touches a socket or reads a clock. Times come in as ``now`` (seconds, monotonic); datagrams KCP
wants sent are collected and drained with :meth:`KCPEngine.datagrams_to_send`; :meth:`KCPEngine.next_deadline`
says when :meth:`KCPEngine.handle_timer` must run next (``None``: nothing to do until input or a send).

``siokcp``'s sharp edges are handled here: its output callback must return an int and must never raise (ours
only appends to a list); its objects are not garbage-collected, so :meth:`close` breaks the callback cycle;
its ``log()`` is never called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import siokcp

from vtunnel.transports.kcp_options import KCPOptions

__all__ = ["KCPEngine", "KCPEngineError"]

_MASK32: Final = 0xFFFFFFFF
#: largest slice handed to one ``ikcp_send`` call, in segments (ikcp refuses a call needing >= 128 segments)
_SEGMENTS_PER_SEND: Final = 96
#: the receive buffer a session keeps between reads (larger reads use a buffer of their own)
_SCRATCH_KEPT: Final = 256 * 1024


class KCPEngineError(Exception):
    """Misuse of the engine (sending after close); never raised for anything the peer sends."""


def _ms(now: float) -> int:
    return int(now * 1000.0) & _MASK32


def _no_log(_text: str) -> None:
    return None


class KCPEngine:
    """One KCP control block in stream mode."""

    __slots__ = (
        "_closed",
        "_kcp",
        "_leftover",
        "_out",
        "_scratch",
        "conv",
        "max_data",
        "send_window",
        "whole_runs",
    )

    def __init__(self, *, conv: int, options: KCPOptions, mtu: int, now: float) -> None:
        self._out: list[bytes] = []
        self._leftover = b""
        self._scratch = bytearray()
        self._closed = False
        self.conv = conv
        kcp = siokcp.KCPConnection(conv, self._output, _no_log)
        kcp.stream = 1
        nd = options.nodelay_args
        kcp.nodelay(nd.nodelay, nd.interval, nd.resend, nd.nc)
        kcp.wndsize(options.sndwnd, options.rcvwnd)
        if kcp.setmtu(mtu) < 0:
            kcp.send_cb = None
            raise KCPEngineError(f"ikcp rejected mtu {mtu}")
        kcp.update(_ms(now))  # marks the block "updated" so flush works from now on
        self._kcp = kcp
        #: segments that may wait in the send queue + buffer before a writer must wait
        self.send_window: int = options.sndwnd
        #: the most data bytes one segment may carry
        self.max_data: int = int(kcp.mss)
        #: whether a run of datagrams without ACK segments may be input as one: ikcp grows its congestion
        #: window once per input call, which matters only when the window is in use (nc=0)
        self.whole_runs: bool = bool(nd.nc)

    def _output(self, data: bytes) -> int:
        self._out.append(data)
        return 0

    # --- input ----------------------------------------------------------------------------------------------

    def receive_datagram(self, datagram: bytes | memoryview, now: float) -> bool:
        """Feed one datagram (already vetted by :mod:`kcp_wire`); ``False`` when ikcp refused it."""
        if self._closed:
            return False
        kcp = self._kcp
        kcp.current = _ms(now)
        return bool(kcp.receive_data(datagram) >= 0)

    def receive_datagrams(self, datagrams: Sequence[bytes | memoryview], now: float) -> bool:
        """Feed a batch of vetted datagrams; ``True`` when ikcp accepted at least one.

        An entry may also be a whole run of datagrams without ACK segments when :attr:`whole_runs` allows.
        """
        if self._closed:
            return False
        kcp = self._kcp
        kcp.current = _ms(now)
        accept = kcp.receive_data
        accepted = False
        for datagram in datagrams:
            if accept(datagram) >= 0:
                accepted = True
        return accepted

    def flush(self, now: float) -> None:
        """Send what is due now: ACKs for the input so far, new data within the window, retransmissions."""
        if self._closed:
            return
        kcp = self._kcp
        kcp.current = _ms(now)
        kcp.flush()

    def handle_timer(self, now: float) -> None:
        if not self._closed:
            self._kcp.update(_ms(now))

    def next_deadline(self, now: float) -> float | None:
        """When :meth:`handle_timer` must run, or ``None`` when the session is quiet.

        Quiet means nothing in flight, nothing queued, no window probe pending and an open peer window: then
        ikcp's timer has nothing to do, so an idle session costs no wakeups at all.
        """
        if self._closed:
            return None
        kcp = self._kcp
        if kcp.nsnd_buf == 0 and kcp.nsnd_que == 0 and kcp.probe == 0 and kcp.rmt_wnd != 0:
            return None
        current = _ms(now)
        delay = (kcp.check(current) - current) & _MASK32
        return now + int(delay) / 1000.0

    # --- data -----------------------------------------------------------------------------------------------

    def send(self, data: bytes | memoryview) -> None:
        """Queue ``data`` (any size: sliced into ikcp-sized calls)."""
        if self._closed:
            raise KCPEngineError("the KCP session is closed")
        step = self.max_data * _SEGMENTS_PER_SEND
        view = memoryview(data)
        for start in range(0, len(view), step):
            self._kcp.send(view[start : start + step])

    def receive_into(self, buffer: bytearray | memoryview) -> int:
        """Copy received stream bytes into ``buffer`` (whole segments only); 0 when none are ready."""
        if self._closed:
            return 0
        receive = self._kcp.next_event_into
        view = memoryview(buffer)
        size = len(view)
        total = 0
        while total < size:
            # ikcp_recv: one segment per call in stream mode; < 0 when none is ready or it does not fit
            got = receive(view[total:])
            if got <= 0:
                break
            total += got
        return total

    def receive(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of received stream bytes (``b""`` when none are ready)."""
        if self._leftover:
            chunk, self._leftover = self._leftover[:max_bytes], self._leftover[max_bytes:]
            return chunk
        kcp = self._kcp
        if self._closed or kcp.peeksize() < 0:
            return b""
        # at most every queued or buffered segment's worth: a large max_bytes costs nothing when little is here
        want = min(max_bytes, (int(kcp.nrcv_que) + int(kcp.nrcv_buf) + 1) * self.max_data)
        if len(self._scratch) < want:
            buffer = bytearray(want)
            if want <= _SCRATCH_KEPT:
                self._scratch = buffer
        else:
            buffer = self._scratch
        view = memoryview(buffer)
        got = self.receive_into(view[:want])
        if got == 0:  # the next segment is larger than max_bytes: keep its tail for the next call
            segment = kcp.next_event() or b""
            self._leftover = segment[max_bytes:]
            return segment[:max_bytes]
        return view[:got].tobytes()

    @property
    def probe_pending(self) -> bool:
        """A window probe or announcement waits for the next flush (e.g. reading reopened the window)."""
        return not self._closed and self._kcp.probe != 0

    def readable(self) -> bool:
        return bool(self._leftover) or (not self._closed and self._kcp.peeksize() >= 0)

    def waiting(self) -> int:
        """Segments queued or in flight (not yet acknowledged)."""
        return 0 if self._closed else int(self._kcp.waitsnd())

    def writable(self) -> bool:
        """Whether a writer may queue more: fewer than a window of segments wait."""
        return self.waiting() < self.send_window

    @property
    def dead(self) -> bool:
        """ikcp gave up on a segment (retransmitted ``dead_link`` times)."""
        return not self._closed and int(self._kcp.state) == -1

    def datagrams_to_send(self) -> list[bytes]:
        out = self._out
        if not out:
            return out
        self._out = []
        return out

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Drop the output callback: siokcp objects are not garbage-collected, so a cycle would leak."""
        if self._closed:
            return
        self._closed = True
        self._kcp.send_cb = None
        self._out = []
