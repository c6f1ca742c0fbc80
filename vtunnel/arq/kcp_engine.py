"""The one adapter around the C ikcp binding (``siokcp``): sans-IO, replaceable.

Nothing here touches a socket or reads a clock. Times come in as ``now`` (seconds, monotonic); datagrams KCP
wants sent are collected and drained with :meth:`KCPEngine.datagrams_to_send`; :meth:`KCPEngine.next_deadline`
says when :meth:`KCPEngine.handle_timer` must run next (``None``: nothing to do until input or a send).

``siokcp``'s sharp edges are handled here: its output callback must return an int and must never raise (ours
only appends to a list); its objects are not garbage-collected, so :meth:`close` breaks the callback cycle;
its ``log()`` is never called.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from itertools import repeat
from operator import floordiv
from typing import Final

import siokcp

from vtunnel.arq.kcp_options import KCPOptions
from vtunnel.arq.pacing import Pacer

__all__ = ["KCPEngine", "KCPEngineError"]

_MASK32: Final = 0xFFFFFFFF
#: largest slice handed to one ``ikcp_send`` call, in segments (ikcp refuses a call needing >= 128 segments)
_SEGMENTS_PER_SEND: Final = 96
#: the receive buffer a session keeps between reads (larger reads use a buffer of their own)
_SCRATCH_KEPT: Final = 256 * 1024
#: with pacing, a writer may always queue this many segments beyond those in flight
_MIN_QUEUE: Final = 256
#: ikcp's segment header (conv, cmd, frg, wnd, ts, sn, una, len)
_SEGMENT: Final = struct.Struct("<IBBHIIII")
_SEGMENT_HEADER: Final = _SEGMENT.size
_CMD_ACK: Final = 82


class KCPEngineError(Exception):
    """Misuse of the engine (sending after close); never raised for anything the peer sends."""


def _ms(now: float) -> int:
    return int(now * 1000.0) & _MASK32


def _no_log(_text: str) -> None:
    return None


class KCPEngine:
    """One KCP control block in stream mode."""

    __slots__ = (
        "_ack_room",
        "_kcp",
        "_last_acks",
        "_last_acks_ms",
        "_leftover",
        "_out",
        "_pacer",
        "_repeat_acks",
        "_scratch",
        "_seen_buf",
        "_segment_bytes",
        "closed",
        "conv",
        "dead",
        "drained",
        "max_data",
        "reopened",
        "send_window",
        "whole_runs",
    )

    def __init__(self, *, conv: int, options: KCPOptions, mtu: int, now: float) -> None:
        self._out: list[bytes] = []
        self._repeat_acks = options.ackrepeat
        self._last_acks = b""
        self._last_acks_ms = 0
        self._ack_room = mtu - _SEGMENT_HEADER
        self._leftover = b""
        self._scratch = bytearray()
        #: :meth:`close` was called (a plain attribute: the link reads it on every message)
        self.closed = False
        #: ikcp gave up on a segment (retransmitted ``dead_link`` times); only ikcp's flush sets its state, so
        #: this is read after each flush and timer
        self.dead = False
        #: after :meth:`receive`: nothing more is ready (another call would return ``b""`` until more input)
        self.drained = True
        #: after :meth:`receive`: reading reopened a full receive window, and ikcp's next flush tells the peer
        self.reopened = False
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
        #: delivery-rate pacing (``None``: ikcp sends whatever its window allows, at once)
        self._pacer: Pacer | None = Pacer(max_window=options.sndwnd, now=now) if options.pacing else None
        self._seen_buf = 0
        #: segments that may wait in the send queue + buffer before a writer must wait
        self.send_window: int = options.sndwnd
        #: the most data bytes one segment may carry
        self.max_data: int = int(kcp.mss)
        #: a full data segment on the wire, header included: the pacer's unit
        self._segment_bytes = self.max_data + _SEGMENT_HEADER
        #: whether a run of datagrams without ACK segments may be input as one: ikcp grows its congestion
        #: window once per input call, which matters only when the window is in use (nc=0)
        self.whole_runs: bool = bool(nd.nc)

    def _output(self, data: bytes) -> int:
        size = len(data)
        if (
            self._repeat_acks
            and size <= self._ack_room
            and not size % _SEGMENT_HEADER
            and data[4] == _CMD_ACK
        ):
            data = self._with_repeated_acks(data)
        self._out.append(data)
        return 0

    def _with_repeated_acks(self, data: bytes) -> bytes:
        """A datagram of ACKs (headers only: one with data never comes here) also carries the ACKs of the one
        before, once (what room allows).

        KCP acknowledges each segment once, and its cumulative ``una`` stays behind the oldest hole, which on
        a lossy path is most of the time: every lost datagram of ACKs made the sender resend all the data it
        acknowledged, through the fast-resend count, though that data had arrived. Each ACK is now sent twice,
        in consecutive ACK datagrams, as QUIC repeats its ACK ranges; the repeat's timestamp is moved on by
        the time in between so that the peer's round-trip samples stay true. The repeat takes the window and
        ``una`` of the datagram it rides in. Any KCP takes a duplicate ACK as a no-op.
        """
        size = len(data)
        for offset in range(_SEGMENT_HEADER + 4, size, _SEGMENT_HEADER):
            if data[offset] != _CMD_ACK:
                return data  # a window probe or answer rides along: leave the datagram as ikcp made it
        now = int(self._kcp.current)
        previous, previous_ms = self._last_acks, self._last_acks_ms
        self._last_acks, self._last_acks_ms = data, now
        if not previous:
            return data
        room = (self._ack_room + _SEGMENT_HEADER - size) // _SEGMENT_HEADER
        if room <= 0:
            return data
        conv, _cmd, _frg, wnd, _ts, _sn, una, _len = _SEGMENT.unpack_from(data, 0)
        shift = (now - previous_ms) & _MASK32
        parts = [data]
        for _conv, _c, _f, _w, ts, sn, _u, _l in _SEGMENT.iter_unpack(previous[-room * _SEGMENT_HEADER :]):
            parts.append(_SEGMENT.pack(conv, _CMD_ACK, 0, wnd, (ts + shift) & _MASK32, sn, una, 0))
        return b"".join(parts)

    # --- input ----------------------------------------------------------------------------------------------

    def receive_datagram(self, datagram: bytes | memoryview, now: float) -> bool:
        """Feed one datagram (already vetted by :mod:`kcp_wire`); ``False`` when ikcp refused it."""
        if self.closed:
            return False
        kcp = self._kcp
        kcp.current = int(now * 1000.0) & _MASK32
        return bool(kcp.receive_data(datagram) >= 0)

    def receive_datagrams(self, datagrams: Sequence[bytes | memoryview], now: float) -> bool:
        """Feed a batch of vetted datagrams; ``True`` when ikcp accepted at least one.

        An entry may also be a whole run of datagrams without ACK segments when :attr:`whole_runs` allows.
        """
        if self.closed:
            return False
        kcp = self._kcp
        kcp.current = int(now * 1000.0) & _MASK32
        accept = kcp.receive_data
        if len(datagrams) == 1:
            return bool(accept(datagrams[0]) >= 0)
        accepted = False
        for datagram in datagrams:
            if accept(datagram) >= 0:
                accepted = True
        return accepted

    def flush(self, now: float) -> None:
        """Send what is due now: ACKs for the input so far, new data within the window, retransmissions."""
        if self.closed:
            return
        self._flush(self._kcp, now)

    def _flush(self, kcp: siokcp.KCPConnection, now: float, *, tick: bool = False) -> None:
        """ikcp's flush (``tick``: its update, which flushes only once its interval is up), paced: the pacer hears
        of what was acknowledged, opens ikcp's send window by what it allows, and counts what was sent."""
        current = int(now * 1000.0) & _MASK32
        pacer = self._pacer
        if pacer is None:
            if tick:
                kcp.update(current)
            else:
                kcp.current = current
                kcp.flush()
        else:
            in_flight: int = kcp.nsnd_buf
            if self._seen_buf > in_flight:
                self.note_acks(now)
            queued: int = kcp.nsnd_que
            if queued:  # with nothing queued this flush moves no new segment: the window does not matter
                span = (kcp.snd_nxt - kcp.snd_una) & _MASK32
                wnd = span + pacer.allowance(now, in_flight)
                kcp.snd_wnd = wnd if wnd < self.send_window else self.send_window
            nxt_before: int = kcp.snd_nxt
            out = self._out
            before = len(out)
            if tick:
                kcp.update(current)
            else:
                kcp.current = current
                kcp.flush()
            if len(out) > before:
                # full data segments, from the datagrams themselves: ikcp's counters miss fast retransmissions,
                # which then went out unpaced. ikcp never lets a datagram pass the MTU, so a full segment rides
                # alone and a datagram of ACKs (or of a short tail) counts nothing
                sent = sum(map(floordiv, map(len, out[before:]), repeat(self._segment_bytes)))
                if sent:
                    pacer.on_sent(sent, (kcp.snd_nxt - nxt_before) & _MASK32)
            self._seen_buf = kcp.nsnd_buf
        if kcp.state == -1:
            self.dead = True

    def write(self, data: bytes | memoryview, now: float) -> int:
        """Queue ``data`` and flush (:meth:`send` then :meth:`flush`, for a writer that sends at once): how many
        segments were waiting before it (:meth:`waiting`), or -1, doing nothing, when :meth:`room` is 0 or less.
        One call per message where there were four."""
        if self.closed:
            raise KCPEngineError("the KCP session is closed")
        if self.room() <= 0:
            return -1
        kcp = self._kcp
        waiting: int = kcp.waitsnd()
        if len(data) <= self.max_data * _SEGMENTS_PER_SEND:
            kcp.send(data)
        else:
            self.send(data)
        self._flush(kcp, now)
        return waiting

    def handle_timer(self, now: float) -> None:
        if self.closed:
            return
        kcp = self._kcp
        pacer = self._pacer
        tick = True  # ikcp's update: a flush once its interval is up
        if pacer is not None:
            release = pacer.next_release(now, kcp.nsnd_buf, kcp.nsnd_que)
            if release is not None and release <= now and self._span_room(kcp) > 0:
                tick = False  # the pacer's release is due: flush now
        self._flush(kcp, now, tick=tick)

    def note_acks(self, now: float) -> int:
        """Tell the pacer what the input so far acknowledged (else the next flush does); returns :meth:`waiting`,
        what a driver asks next. A driver calls it once an input's bytes went up, so the pacer's bookkeeping is
        not on the way from a request to its answer."""
        if self.closed:
            return 0
        kcp = self._kcp
        in_flight: int = kcp.nsnd_buf
        pacer = self._pacer
        if pacer is not None and self._seen_buf > in_flight:  # something left the send buffer since the last
            srtt: float = kcp.rx_srtt
            srtt = srtt / 1000.0 if srtt > 0 else 0.0005  # ikcp counts whole ms: under one reads as 0
            pacer.on_acked(now, self._seen_buf - in_flight, srtt, app_limited=kcp.nsnd_que == 0)
            self._seen_buf = in_flight
        return int(in_flight + kcp.nsnd_que)

    def next_deadline(self, now: float) -> float | None:
        """When :meth:`handle_timer` must run, or ``None`` when the session is quiet.

        Quiet means nothing in flight, nothing queued, no window probe pending and an open peer window: then
        ikcp's timer has nothing to do, so an idle session costs no wakeups at all.
        """
        if self.closed:
            return None
        kcp = self._kcp
        in_flight: int = kcp.nsnd_buf
        queued: int = kcp.nsnd_que
        if in_flight == 0 and queued == 0 and kcp.probe == 0 and kcp.rmt_wnd != 0:
            return None
        current = int(now * 1000.0) & _MASK32
        delay: int = (kcp.check(current) - current) & _MASK32
        deadline = now + delay / 1000.0
        pacer = self._pacer
        if pacer is not None and queued and self._span_room(kcp) > 0:
            release = pacer.next_release(now, in_flight, queued)
            if release is not None and release < deadline:
                return release
        return deadline

    def _span_room(self, kcp: siokcp.KCPConnection) -> int:
        """New segments ikcp's own window admits: it counts from the oldest unacknowledged one."""
        span: int = (kcp.snd_nxt - kcp.snd_una) & _MASK32
        peer: int = kcp.rmt_wnd
        return min(self.send_window, peer) - span

    def stats(self) -> dict[str, float | int | str]:
        """Counters for logs: round trip, retransmissions and, with pacing, the rate estimate."""
        if self.closed:
            return {}
        kcp = self._kcp
        out: dict[str, float | int | str] = {
            "srtt_ms": int(kcp.rx_srtt),
            "rto_ms": int(kcp.rx_rto),
            "sent_segments": int(kcp.snd_nxt),
            "retransmits": int(kcp.xmit),
        }
        pacer = self._pacer
        if pacer is not None:
            out["pacing_phase"] = pacer.phase.value
            out["rate_estimate_MBps"] = round(pacer.bandwidth * self.max_data / 1e6, 2)
            out["min_rtt_ms"] = round(pacer.min_rtt * 1000, 2)
        return out

    # --- data -----------------------------------------------------------------------------------------------

    def send(self, data: bytes | memoryview) -> None:
        """Queue ``data`` (any size: sliced into ikcp-sized calls)."""
        if self.closed:
            raise KCPEngineError("the KCP session is closed")
        step = self.max_data * _SEGMENTS_PER_SEND
        if len(data) <= step:
            self._kcp.send(data)
            return
        view = memoryview(data)
        for start in range(0, len(view), step):
            self._kcp.send(view[start : start + step])

    def receive_into(self, buffer: bytearray | memoryview) -> int:
        """Copy received stream bytes into ``buffer`` (whole segments only); 0 when none are ready."""
        if self.closed:
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
        """Up to ``max_bytes`` of received stream bytes (``b""`` when none are ready). Sets :attr:`drained` and
        :attr:`reopened` (plain attributes: a driver reads them for every message)."""
        if self._leftover:
            chunk, self._leftover = self._leftover[:max_bytes], self._leftover[max_bytes:]
            self.drained = False  # (the leftover's end, or what follows it, is for the next call)
            self.reopened = False
            return chunk
        if self.closed:
            self.drained = True
            self.reopened = False
            return b""
        kcp = self._kcp
        if kcp.nrcv_que == 1:  # one segment ready (a message of an exchange, say): it is the whole read
            size: int = kcp.peeksize()
            if 0 <= size <= max_bytes:
                data = kcp.next_event() or b""
                # ikcp_recv moved what was in order into the queue: an empty queue is nothing ready
                self.drained = kcp.nrcv_que == 0
                self.reopened = kcp.probe != 0
                return data
        if kcp.peeksize() < 0:
            self.drained = True
            self.reopened = kcp.probe != 0
            return b""
        data = self._receive_segments(kcp, max_bytes)
        self.drained = not self._leftover and kcp.nrcv_que == 0
        self.reopened = kcp.probe != 0
        return data

    def _receive_segments(self, kcp: siokcp.KCPConnection, max_bytes: int) -> bytes:
        """What :meth:`receive` reads when more than one segment, or a large one, is ready."""
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

    def readable(self) -> bool:
        return bool(self._leftover) or (not self.closed and self._kcp.peeksize() >= 0)

    def waiting(self) -> int:
        """Segments queued or in flight (not yet acknowledged)."""
        return 0 if self.closed else int(self._kcp.waitsnd())

    def room(self) -> int:
        """Segments a writer may queue now.

        Queued plus unacknowledged segments stay under the send window. With pacing, the segments not yet sent
        also stay under about the pacer's window (two round trips at the measured rate): a send window sized for
        a long lossy path would otherwise let one writer queue seconds of data ahead of everything else that
        shares the session.
        """
        if self.closed:
            return 0
        kcp = self._kcp
        room: int = self.send_window - kcp.waitsnd()
        pacer = self._pacer
        if pacer is not None:
            queued: int = kcp.nsnd_que
            paced = max(pacer.window, _MIN_QUEUE) - queued
            if paced < room:
                return paced
        return room

    def writable(self) -> bool:
        """Whether a writer may queue more (see :meth:`room`)."""
        return self.room() > 0

    def datagrams_to_send(self) -> list[bytes]:
        out = self._out
        if not out:
            return out
        self._out = []
        return out

    def close(self) -> None:
        """Drop the output callback: siokcp objects are not garbage-collected, so a cycle would leak."""
        if self.closed:
            return
        self.closed = True
        self._kcp.send_cb = None
        self._out = []
