"""Congestion control for rudp behind one small interface, and the pacer that spreads packets out.

:class:`CongestionController` is all the connection knows of an algorithm: it reports packets sent,
acknowledged and lost, and reads a congestion window (bytes in flight) and a pacing rate (bytes per second).
Three algorithms, chosen by name (:func:`make_controller`; the ``cc=`` option of the future ``rudp://`` URL):

- ``newreno``: RFC 9002 section 7: slow start, congestion avoidance of one datagram per window, halving once
  per round trip on loss (a recovery period), the minimum window after persistent congestion.
- ``cubic``: RFC 9438: the window grows as a cubic function of the time since the last reduction, around the
  window at which it happened (``W_max``), shrinks by ``beta`` = 0.7, with fast convergence and the
  Reno-friendly estimate.
- ``bbr``: a delivery-rate model in the manner of BBR: :class:`vtunnel.arq.pacing.Pacer` (the one kcp:// uses),
  measuring how fast the peer acknowledges and sending at about that rate, with about two round trips of it in
  flight. Random loss does not slow it; a startup round that lost much ends startup.

:class:`Pacer` is a token bucket: the loss-based controllers pace at 1.25 times ``cwnd / smoothed RTT`` (twice
that in slow start), ``bbr`` at its model's rate; bursts are capped at about a millisecond of the rate.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import ClassVar, Final

from vtunnel.arq.pacing import Pacer as RatePacer
from vtunnel.arq.pacing import PacerConfig

from .recovery import RttEstimator, SentPacket

__all__ = [
    "CONTROLLERS",
    "BbrController",
    "CongestionController",
    "CubicController",
    "NewRenoController",
    "Pacer",
    "make_controller",
]

#: RFC 9002's initial window: ten datagrams, at most 14720 bytes unless two datagrams are more
_INITIAL_DATAGRAMS: Final = 10
_INITIAL_CAP: Final = 14720
_MIN_DATAGRAMS: Final = 2
_LOSS_REDUCTION: Final = 0.5
#: RFC 9438's constants
_CUBIC_C: Final = 0.4
_CUBIC_BETA: Final = 0.7
_CUBIC_ALPHA: Final = 3 * (1 - _CUBIC_BETA) / (1 + _CUBIC_BETA)


class CongestionController(abc.ABC):
    """One algorithm's state; all sizes in bytes, times in seconds."""

    name: ClassVar[str]

    def __init__(self, *, max_datagram_size: int, now: float) -> None:
        self.max_datagram_size = max_datagram_size
        #: bytes that may be in flight
        self.congestion_window = max(
            _MIN_DATAGRAMS * max_datagram_size, min(_INITIAL_DATAGRAMS * max_datagram_size, _INITIAL_CAP)
        )
        self.min_window = _MIN_DATAGRAMS * max_datagram_size

    def set_max_datagram_size(self, size: int) -> None:
        """The packets' size changed (path MTU discovery): what the window counts in packets follows it."""
        self.max_datagram_size = size
        self.min_window = _MIN_DATAGRAMS * size
        if self.congestion_window < self.min_window:
            self.congestion_window = self.min_window

    def on_packet_sent(self, now: float, packet: SentPacket) -> None:  # noqa: B027 (optional hook)
        """An ack-eliciting packet left."""

    def on_packets_sent(self, now: float, packets: Sequence[SentPacket]) -> None:
        """Ack-eliciting packets left together: a run of new stream data (each of them carries stream data,
        none of it sent before)."""
        for packet in packets:
            self.on_packet_sent(now, packet)

    @abc.abstractmethod
    def on_packets_acked(
        self, now: float, packets: Sequence[SentPacket], rtt: RttEstimator, *, app_limited: bool
    ) -> None:
        """``packets`` were acknowledged; ``app_limited``: the sender had less to send than the window allowed."""

    @abc.abstractmethod
    def on_packets_lost(self, now: float, packets: Sequence[SentPacket], *, persistent: bool) -> None:
        """``packets`` were declared lost; ``persistent``: RFC 9002's persistent congestion."""

    @abc.abstractmethod
    def pacing_rate(self, rtt: RttEstimator) -> float:
        """Bytes per second to pace at (0: no pacing)."""

    def stats(self) -> dict[str, float | int | str]:
        return {"cc": self.name, "cwnd": self.congestion_window}


class _LossBased(CongestionController):
    """What NewReno and CUBIC share: slow start, a recovery period per congestion event, cwnd-based pacing."""

    def __init__(self, *, max_datagram_size: int, now: float) -> None:
        super().__init__(max_datagram_size=max_datagram_size, now=now)
        self.ssthresh = math.inf
        #: packets sent before this time belong to the congestion event already reacted to
        self.recovery_start: float | None = None

    def in_recovery(self, sent_time: float) -> bool:
        return self.recovery_start is not None and sent_time <= self.recovery_start

    def on_packets_acked(
        self, now: float, packets: Sequence[SentPacket], rtt: RttEstimator, *, app_limited: bool
    ) -> None:
        for packet in packets:
            if self.in_recovery(packet.sent_time) or app_limited:
                continue  # RFC 9002 7.8: a window the sender does not fill is not grown
            if self.congestion_window < self.ssthresh:
                self.congestion_window += packet.size
            else:
                self._avoid(now, packet, rtt)

    @abc.abstractmethod
    def _avoid(self, now: float, packet: SentPacket, rtt: RttEstimator) -> None:
        """Congestion avoidance: grow on one acknowledged packet."""

    @abc.abstractmethod
    def _reduce(self, now: float) -> None:
        """A new congestion event: shrink the window."""

    def on_packets_lost(self, now: float, packets: Sequence[SentPacket], *, persistent: bool) -> None:
        if not packets:
            return
        newest = max(packet.sent_time for packet in packets)
        if not self.in_recovery(newest):
            self.recovery_start = now
            self._reduce(now)
        if persistent:
            self.congestion_window = self.min_window
            self.recovery_start = None
            self._collapse()

    def _collapse(self) -> None:
        """Persistent congestion: forget what the algorithm learnt of the path."""

    def pacing_rate(self, rtt: RttEstimator) -> float:
        if not rtt.has_sample:
            return 0.0
        gain = 2.0 if self.congestion_window < self.ssthresh else 1.25
        return gain * self.congestion_window / max(rtt.smoothed, 0.001)


class NewRenoController(_LossBased):
    name = "newreno"

    def __init__(self, *, max_datagram_size: int, now: float) -> None:
        super().__init__(max_datagram_size=max_datagram_size, now=now)
        self._acked = 0

    def _avoid(self, now: float, packet: SentPacket, rtt: RttEstimator) -> None:
        self._acked += packet.size
        if self._acked >= self.congestion_window:
            self._acked -= self.congestion_window
            self.congestion_window += self.max_datagram_size

    def _reduce(self, now: float) -> None:
        self.ssthresh = max(self.congestion_window * _LOSS_REDUCTION, self.min_window)
        self.congestion_window = int(self.ssthresh)
        self._acked = 0


class CubicController(_LossBased):
    """RFC 9438, windows counted in bytes (the RFC counts segments: ``C`` is scaled by the datagram size)."""

    name = "cubic"

    def __init__(self, *, max_datagram_size: int, now: float) -> None:
        super().__init__(max_datagram_size=max_datagram_size, now=now)
        self.w_max = 0.0
        self._w_last_max = 0.0
        self._k = 0.0
        self._epoch: float | None = None
        self._w_est = 0.0
        self._cwnd_epoch = 0.0

    def _w_cubic(self, t: float) -> float:
        return _CUBIC_C * self.max_datagram_size * (t - self._k) ** 3 + self.w_max

    def _avoid(self, now: float, packet: SentPacket, rtt: RttEstimator) -> None:
        cwnd = float(self.congestion_window)
        mss = self.max_datagram_size
        if self._epoch is None:
            # congestion avoidance without a reduction before it (slow start ended at ssthresh): start here
            self._epoch = now
            self.w_max = cwnd
            self._k = 0.0
            self._w_est = cwnd
            self._cwnd_epoch = cwnd
        t = now - self._epoch
        self._w_est += _CUBIC_ALPHA * mss * packet.size / cwnd
        cubic = self._w_cubic(t)
        if cubic < self._w_est:
            target = self._w_est  # the Reno-friendly region
            grow = target - cwnd
        else:
            target = min(max(self._w_cubic(t + rtt.smoothed), cwnd), 1.5 * cwnd)
            grow = (target - cwnd) * packet.size / cwnd
        if grow > 0:
            self.congestion_window = int(cwnd + grow)

    def _reduce(self, now: float) -> None:
        cwnd = float(self.congestion_window)
        mss = self.max_datagram_size
        # fast convergence: a flow whose window peaked lower than last time gives up more of it
        if cwnd < self._w_last_max:
            self._w_last_max = cwnd
            self.w_max = cwnd * (1 + _CUBIC_BETA) / 2
        else:
            self._w_last_max = cwnd
            self.w_max = cwnd
        reduced = max(cwnd * _CUBIC_BETA, float(self.min_window))
        self.ssthresh = reduced
        self.congestion_window = int(reduced)
        self._epoch = now
        self._cwnd_epoch = reduced
        self._w_est = reduced
        self._k = ((self.w_max - reduced) / (_CUBIC_C * mss)) ** (1 / 3) if self.w_max > reduced else 0.0

    def _collapse(self) -> None:
        self._epoch = None
        self.w_max = 0.0
        self._w_last_max = 0.0


class BbrController(CongestionController):
    """The delivery-rate model of :mod:`vtunnel.arq.pacing`, counted in units of the first ``max_datagram_size``.

    A packet up to that size counts as one unit sent or lost. Larger ones (once path MTU discovery allows them)
    count by their bytes, as deliveries always do: ``size / unit``, the remainders carried over to the next, so
    that what the model hears sent and lost adds up to what it hears delivered (counted whole, a 1472-byte
    packet in units of 1350 would be two units sent and lost, and 1.09 delivered: startup would end on a loss
    share twice the real one)."""

    name = "bbr"

    def __init__(self, *, max_datagram_size: int, now: float, max_window: int = 1 << 16) -> None:
        super().__init__(max_datagram_size=max_datagram_size, now=now)
        self._model = RatePacer(max_window=max_window, now=now, config=PacerConfig(initial_rtt=0.1))
        self._acked_bytes = 0
        #: the model's unit, in bytes: the packet size the connection started with
        self._unit = max_datagram_size
        #: bytes of larger packets sent, and lost, not yet counted as a whole unit
        self._sent_rest = 0
        self._lost_rest = 0
        self.congestion_window = self._model.window * max_datagram_size

    def _tally(self, packets: Iterable[SentPacket], rest: int) -> tuple[int, int]:
        """The units ``packets`` count for, and the bytes then left over (``rest``: those left before)."""
        unit = self._unit
        units = 0
        for packet in packets:
            size = packet.size
            if size <= unit:
                units += 1
            else:
                whole, rest = divmod(rest + size, unit)
                units += whole
        return units, rest

    def set_max_datagram_size(self, size: int) -> None:
        super().set_max_datagram_size(size)
        self.congestion_window = max(self._model.window * self._unit, self.min_window)

    def on_packet_sent(self, now: float, packet: SentPacket) -> None:
        if packet.stream:
            units, self._sent_rest = self._tally((packet,), self._sent_rest)
            if units:
                self._model.on_sent(units, 0 if packet.retransmission else units)

    def on_packets_sent(self, now: float, packets: Sequence[SentPacket]) -> None:
        # (new stream data, every one of them: what on_packet_sent of each would count; a lone packet no larger
        # than the unit, a conversation's message, is one)
        unit = self._unit
        if self.max_datagram_size > unit and (len(packets) > 1 or packets[0].size > unit):
            count, self._sent_rest = self._tally(packets, self._sent_rest)
        else:
            count = len(packets)
        if count:
            self._model.on_sent(count, count)

    def on_packets_acked(
        self, now: float, packets: Sequence[SentPacket], rtt: RttEstimator, *, app_limited: bool
    ) -> None:
        size = self._acked_bytes
        for packet in packets:
            size += packet.size
        delivered, self._acked_bytes = divmod(size, self._unit)
        if delivered:
            self._model.on_acked(
                now, delivered, rtt.smoothed if rtt.has_sample else 0.0, app_limited=app_limited
            )
            window = self._model.window * self._unit
            self.congestion_window = window if window > self.min_window else self.min_window

    def on_packets_lost(self, now: float, packets: Sequence[SentPacket], *, persistent: bool) -> None:
        # random loss does not slow the model; a burst of it in startup ends startup (the queue overflowed)
        lost, self._lost_rest = self._tally((packet for packet in packets if packet.stream), self._lost_rest)
        if lost:
            self._model.on_lost(now, lost)

    def pacing_rate(self, rtt: RttEstimator) -> float:
        return self._model.pacing_rate * self._unit

    def stats(self) -> dict[str, float | int | str]:
        out = super().stats()
        out["phase"] = self._model.phase.value
        out["rate_estimate_Bps"] = round(self._model.bandwidth * self._unit)
        return out


CONTROLLERS: Final[Mapping[str, Callable[..., CongestionController]]] = {
    NewRenoController.name: NewRenoController,
    CubicController.name: CubicController,
    BbrController.name: BbrController,
}


def make_controller(name: str, *, max_datagram_size: int, now: float) -> CongestionController:
    """The controller called ``name`` (``newreno``, ``cubic``, ``bbr``); ``ValueError`` for any other."""
    factory = CONTROLLERS.get(name.lower())
    if factory is None:
        raise ValueError(f"unknown congestion controller {name!r} (one of {', '.join(CONTROLLERS)})")
    return factory(max_datagram_size=max_datagram_size, now=now)


class Pacer:
    """A token bucket of bytes: a packet may leave when the bucket holds its size."""

    __slots__ = ("_last", "_tokens", "max_burst", "min_burst")

    #: the bucket holds at most this many seconds of the rate ... (an event loop's timers wake about a millisecond
    #: late: with less, a paced sender would send one packet per wake-up and never reach its rate)
    BURST_TIME: Final = 0.004
    #: a sender held back by pacing comes back once the bucket holds this share of itself (:meth:`wake_time`)
    WAKE_SHARE: Final = 0.25

    def __init__(self, *, max_datagram_size: int, initial_burst: int) -> None:
        #: ... and never less than this many bytes
        self.min_burst = 10 * max_datagram_size
        self.max_burst = float(max(initial_burst, self.min_burst))
        self._tokens = self.max_burst
        self._last: float | None = None

    def release_time(self, now: float, rate: float, size: int) -> float:
        """When a packet of ``size`` bytes may leave (``now`` or later) at ``rate`` bytes/s (0: at once)."""
        if rate <= 0:
            self._last = now
            return now
        tokens = self.tokens(now, rate)
        if tokens >= size:
            return now
        return now + (size - tokens) / rate

    def tokens(self, now: float, rate: float) -> float:
        """The bytes that may leave now at ``rate`` (> 0), the bucket refilled for the time since it was last
        asked: a run of packets goes while they last, and is then told to :meth:`on_sent` in one sum."""
        burst = rate * self.BURST_TIME
        if burst < self.min_burst:
            burst = float(self.min_burst)
        self.max_burst = burst
        last = self._last
        self._last = now
        if last is not None and now > last:
            tokens = self._tokens + (now - last) * rate
            self._tokens = tokens = tokens if tokens < burst else burst
            return tokens
        return self._tokens

    def wake_time(self, now: float, rate: float, size: int, queued: int) -> float:
        """When to come back to send (after :meth:`release_time` said later than ``now``): once the bucket holds a
        quarter of itself (a millisecond of the rate, at least a few packets), or ``queued`` bytes if fewer, or
        one packet of ``size`` if more. Coming back for every packet's worth of tokens costs a loop timer, a
        wake-up and a ``sendmsg`` per packet; a quarter of the bucket goes out as one batch, still well inside
        the burst the bucket allows."""
        want = min(self.max_burst * self.WAKE_SHARE, float(queued))
        if want < size:
            want = size
        return now + (want - self._tokens) / rate

    def on_sent(self, size: int) -> None:
        self._tokens -= size
