"""Delivery-rate pacing for a KCP sender: how many new segments may leave now, and when the next may.

ikcp's own congestion window (``nc=0``) halves on every loss, which random loss on a long path punishes hard;
without it (``nc=1``, every fast preset) a sender puts a whole window on the wire in one burst, and a bottleneck
with a shallow queue drops the tail of every burst. This module sits between the two, in the manner of BBR: it
measures the rate at which the peer acknowledges data, sends at about that rate (a token bucket, so bursts stay
small), and keeps no more than about two round trips' worth of that rate in flight. Random loss does not slow it
down; only a lower delivery rate does.

It is sans-IO: :class:`Pacer` is told what was acknowledged and sent and when (``now``, seconds), and answers with
a number of segments and a deadline. :class:`~vtunnel.arq.kcp_engine.KCPEngine` applies the answer by
setting ikcp's send window just before each flush, so ikcp keeps stamping segments with the time they really
leave (its retransmission timers stay right) and retransmissions are never held back.

The phases:

- *startup*: the rate estimate grows by sending at 2/ln 2 times it, until three rounds in a row bring less than
  a quarter more, or until a round in which a large share of what was sent were retransmissions (startup
  overflowed the bottleneck's queue: carrying on for two more rounds would only lose more); a sender that
  reports its losses as they are declared (:meth:`Pacer.on_lost`, rudp's) ends it as soon as 40% of what a
  round acknowledged and lost was lost, a round sooner, or 10% once the round's rate stopped growing.
  Then one round of *drain* sends at the inverse of that gain, to empty the queue startup built.
- *cruise*: eight-round cycles, one round at 5/4 of the estimate (to find a higher rate), one at 3/4 (to drain
  what that probe queued), six at the estimate. A probe whose extra fifth or more all arrived means the path has
  room the estimate does not know of (startup was cut short, or the path got faster): startup again. A sender
  that reports its losses (rudp's) also learns how hard to probe: a probe that lost well above what the rounds
  at the estimate lose overflowed the bottleneck's queue, and the next one asks for half as much more; one that
  did not may ask a quarter more than it did (twice as much if it found room), up to 5/4
  (:meth:`Pacer._learn_probe`).

A round ends once everything sent before it began has been acknowledged, so each round measures the data sent
at one gain. Everything that leaves counts against the pacing rate, retransmissions included.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Final

__all__ = ["Pacer", "PacerConfig", "Phase"]

#: 2 / ln 2: the smallest gain that doubles the delivery rate every round (BBR's startup gain)
_STARTUP_GAIN: Final = 2.885
#: the cruise cycle of pacing gains, one per round
_CYCLE: Final = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
#: cruise goes back to startup when the round measuring a probe (sent at 5/4) delivered this much more
_PROBE_FOUND: Final = 1.2
#: a sender that reports its losses: the probe's extra share (over 1) halves after a probe that overflowed the
#: queue, and grows by this factor after one that did not, back up to the cycle's 1/4
_PROBE_SHRINK: Final = 0.5
_PROBE_GROW: Final = 1.25
#: ... and by this factor after one that came back faster than the estimate by half of its extra (room found)
_PROBE_ROOM_GROW: Final = 2.0
#: the smallest extra share a probe keeps
_PROBE_MIN: Final = 0.03
#: a probe overflowed when the round after it (which declares its losses) lost more than this many times the
#: share the cruise rounds lose, plus this much, and at least _STARTUP_LOSS_EVENTS segments
_OVERFLOW_FACTOR: Final = 1.5
_OVERFLOW_MARGIN: Final = 0.02
#: startup ends after this many rounds without this much growth
_FULL_ROUNDS: Final = 3
_FULL_GROWTH: Final = 1.25
#: startup ends on losses declared within a round only once there are at least this many (a few random losses
#: in a small round are not an overflowing queue)
_STARTUP_LOSS_EVENTS: Final = 8
#: slack for float rounding in token counts and release times
_EPSILON: Final = 1e-6


class Phase(enum.Enum):
    STARTUP = "startup"
    DRAIN = "drain"
    CRUISE = "cruise"


@dataclass(frozen=True, kw_only=True, slots=True)
class PacerConfig:
    """Tuning; the defaults suit links from loopback to long fat paths."""

    #: segments a new session may send before the first rate sample
    initial_window: int = 32
    #: the in-flight cap never goes below this (segments)
    min_window: int = 32
    #: in-flight cap, in round trips of the estimated rate
    window_gain: float = 2.0
    #: the shortest round the estimate is taken over (seconds): ikcp measures round trips in whole ms
    min_round: float = 0.002
    #: the round trip assumed before ikcp has measured one (seconds)
    initial_rtt: float = 0.1
    #: how many rounds the bandwidth estimate remembers its maximum over
    bandwidth_rounds: int = 10
    #: seconds the smallest round trip is remembered
    min_rtt_window: float = 10.0
    #: startup ends early after a round in which more than this share of what was sent were retransmissions
    #: (well above the random loss of a poor path: startup's overshoot loses most of its excess)
    startup_loss: float = 0.15
    #: startup ends at once when the losses a sender reports (:meth:`Pacer.on_lost`) reach this share of what
    #: was acknowledged and lost since the round began, over at least half the last round's deliveries (random
    #: loss of a poor path stays well below it in a sample that size; a queue startup overflows at 2.885 times
    #: the link's rate loses more). Not lower: a flow starting beside a busy one meets a full queue, and 0.25
    #: or 0.3 ended its startup at a third of its share (two flows at 12.5 MB/s: Jain's index 0.82)
    startup_burst_loss: float = 0.4
    #: ... or this share once the round's delivery rate stopped growing (the path is full: a flow that meets
    #: another's full queue still grows, and is not cut short)
    startup_full_loss: float = 0.1
    #: the largest burst (seconds of the pacing rate), and the smallest (segments)
    burst_time: float = 0.002
    min_burst: int = 8


class Pacer:
    """Pacing and an in-flight cap for one sender; counts are in segments, times in seconds."""

    __slots__ = (
        "_app_limited",
        "_burst",
        "_bw_samples",
        "_cfg",
        "_cruise_loss",
        "_cycle_index",
        "_delivered",
        "_full_bw",
        "_full_count",
        "_last_refill",
        "_last_round_delivered",
        "_last_sent_rate",
        "_max_window",
        "_min_rtt",
        "_min_rtt_at",
        "_probe_extra",
        "_reports_losses",
        "_round_delivered",
        "_round_length",
        "_round_lost",
        "_round_new",
        "_round_peak",
        "_round_sent",
        "_round_start",
        "_round_target",
        "_sent_new",
        "_tokens",
        "bandwidth",
        "pacing_rate",
        "phase",
        "window",
    )

    def __init__(self, *, max_window: int, now: float, config: PacerConfig | None = None) -> None:
        cfg = config or PacerConfig()
        self._cfg = cfg
        self._max_window = max_window
        #: the estimated bottleneck rate in segments per second (0 until the first sample)
        self.bandwidth = 0.0
        self.phase = Phase.STARTUP
        #: (rate, whether the sender was app-limited) of the last rounds
        self._bw_samples: deque[tuple[float, bool]] = deque(maxlen=cfg.bandwidth_rounds)
        self._min_rtt = 0.0
        self._min_rtt_at = now
        self._round_start = now
        self._round_delivered = 0
        #: segments the last round that ended acknowledged
        self._last_round_delivered = 0
        self._round_sent = 0
        #: segments sent for the first time, and segments acknowledged, since the start
        self._sent_new = 0
        self._delivered = 0
        #: the round ends once ``_delivered`` reaches this (what had been sent when it began)
        self._round_target = 0
        self._round_new = 0
        #: segments declared lost since the round began (only a sender that reports losses: :meth:`on_lost`)
        self._round_lost = 0
        self._last_sent_rate = 0.0
        self._app_limited = False
        self._full_bw = 0.0
        self._full_count = 0
        self._cycle_index = 0
        #: the probe round's gain less 1 (a sender that reports losses learns it: :meth:`_learn_probe`)
        self._probe_extra = _CYCLE[0] - 1.0
        #: the share of segments the rounds of cruise at gain 1 lose (a moving average)
        self._cruise_loss = 0.0
        self._reports_losses = False
        #: the estimate startup took from part of the round under way (:meth:`_startup_early`; 0: none)
        self._round_peak = 0.0
        self._tokens = float(cfg.initial_window)
        self._last_refill = now
        #: segments per second the sender may send at now (0: not yet measured, no pacing)
        self.pacing_rate = 0.0
        #: the in-flight cap in segments
        self.window = max(cfg.min_window, min(max_window, cfg.initial_window))
        #: the most tokens (segments) the bucket holds
        self._burst = float(cfg.min_burst)
        self._round_length = max(cfg.min_round, cfg.initial_rtt)

    # --- what the sender reports --------------------------------------------------------------------------

    def on_acked(self, now: float, delivered: int, srtt: float, *, app_limited: bool) -> None:
        """``delivered`` segments left the send buffer since the last call; ``srtt``: ikcp's smoothed round
        trip in seconds (0 before its first sample); ``app_limited``: the sender had nothing more to send."""
        if srtt > 0 and (
            self._min_rtt == 0 or srtt <= self._min_rtt or now - self._min_rtt_at > self._cfg.min_rtt_window
        ):
            self._min_rtt = srtt
            self._min_rtt_at = now
        if srtt > 0:
            self._round_length = max(self._cfg.min_round, srtt)
        self._round_delivered += delivered
        self._delivered += delivered
        if app_limited:
            self._app_limited = True
        elapsed = now - self._round_start
        # a round ends once everything sent before it began has been acknowledged (BBR's packet-timed round),
        # so the data of one pacing gain is measured in the next round and no other; time bounds it both ways
        if elapsed < self._cfg.min_round or (
            self._delivered < self._round_target and elapsed < 2 * self._round_length
        ):
            if self.phase is Phase.STARTUP and not self._app_limited and elapsed * 2 >= self._round_length:
                self._startup_early(elapsed)
            return
        sample = self._round_delivered / elapsed
        # nothing is delivered faster than it was sent: ACKs that arrive bunched (a busy receiver, a queue that
        # let go at once) would otherwise read as a faster path, and the rate sent next would overrun it
        sent_rate = self._round_sent / elapsed
        bound = self._last_sent_rate or sent_rate
        if bound > 0:
            sample = min(sample, bound)
        self._last_sent_rate = sent_rate
        if self._round_peak > sample:
            # startup raised the estimate from part of this round: the round measured at least that, and the
            # filter below must keep it (else the estimate would fall back to last round's at the round's end)
            sample = self._round_peak
        self._round_peak = 0.0
        limited = self._app_limited
        resent = self._round_sent - self._round_new
        overflowed = (
            self._round_sent >= self._cfg.min_window and resent > self._cfg.startup_loss * self._round_sent
        )
        if self._reports_losses and self.phase is Phase.CRUISE and not limited:
            self._learn_probe(self._round_lost, self._round_delivered, sample)
        self._round_new = 0
        self._round_lost = 0
        self._round_start = now
        self._round_target = self._sent_new
        self._last_round_delivered = self._round_delivered
        self._round_delivered = 0
        self._round_sent = 0
        self._app_limited = False
        if sample <= 0:
            return
        if limited and sample < self.bandwidth:
            # a sender with nothing to send says nothing about the path's rate: keep the old estimate
            self._end_round(now, informative=False)
            return
        if (
            not limited
            and self.phase is Phase.CRUISE
            and (
                all(was_limited for _, was_limited in self._bw_samples)
                or (self._cycle_index == 1 and sample >= self.bandwidth * _PROBE_FOUND)
            )
        ):
            # busy after a quiet spell whose rate was all the estimate knew (requests and answers, say), or a
            # probe that came back at a fifth or more above the estimate (the path has room the estimate does
            # not know of, as after a startup cut short by a slow receiver): look for the path's rate again
            # instead of creeping up a quarter per cycle
            self.phase = Phase.STARTUP
            self._full_bw = 0.0
            self._full_count = 0
        self._bw_samples.append((sample, limited))
        self.bandwidth = max(rate for rate, _ in self._bw_samples)
        self._end_round(now, informative=not limited, overflowed=overflowed)

    def on_sent(self, segments: int, new: int | None = None) -> None:
        """``segments`` went on the wire (new data and retransmissions alike) since :meth:`allowance`, ``new``
        of them for the first time (default: all)."""
        self._tokens -= segments
        self._round_sent += segments
        fresh = segments if new is None else new
        self._sent_new += fresh
        self._round_new += fresh

    def on_lost(self, now: float, segments: int) -> None:
        """``segments`` were declared lost (a sender whose loss detection says so at once; without these calls
        startup ends on the retransmissions it sees at the end of a round instead). A sender reports an ACK's
        outcome in its order: :meth:`on_acked` for what it acknowledged, then this for what it showed lost (told
        of the losses first, the round's share would count them against deliveries not yet added).

        In startup, a round whose losses reach ``startup_burst_loss`` of what it acknowledged and lost (over at
        least half of what the last round acknowledged, and at least :data:`_STARTUP_LOSS_EVENTS` losses)
        overflowed the bottleneck's queue: drain starts now, a round earlier than the share of retransmissions
        would show it, and lasts a whole round from here. Startup sends at 2.885 times what it measured, so most
        of a round sent at that rate into a full queue is lost: ending it a round early halves startup's loss.
        Once the round's delivery rate no longer grows, ``startup_full_loss`` of losses is enough: a path with
        room delivers more each round whatever its random loss, while a full one loses what startup sends
        beyond it (ending there cut startup's loss on a 50 MB/s path with a 256 KiB queue by two fifths)."""
        if now == self._round_start and self._round_delivered == 0:
            # declared by the ACK that just ended a round: they belong with its deliveries, in the round that
            # ended, not at the head of a new round that has nothing delivered to weigh them against
            return
        self._round_lost += segments
        self._reports_losses = True
        if self.phase is not Phase.STARTUP or self.bandwidth <= 0:
            return
        lost = self._round_lost
        seen = lost + self._round_delivered
        if lost < _STARTUP_LOSS_EVENTS or seen < max(self._cfg.min_window, self._last_round_delivered // 2):
            return
        if lost <= self._cfg.startup_burst_loss * seen:
            # fewer losses end it too once the rate stopped growing (what the round delivered so far is less
            # than a quarter above the rate startup last grew to): the path is full, and the queue now
            # overflowing loses what startup sends beyond it. A flow that meets another's full queue still
            # grows, and goes on
            elapsed = now - self._round_start
            if (
                lost <= self._cfg.startup_full_loss * seen
                or self._app_limited
                or elapsed * 2 < self._round_length  # (half a round trip at least: a rate, not a burst)
                or self._round_delivered / elapsed > self._full_bw * _FULL_GROWTH
            ):
                return
        self.phase = Phase.DRAIN
        if self._round_peak > 0:  # (what startup measured of the round it cut short stays in the filter)
            self._bw_samples.append((self._round_peak, False))
            self._round_peak = 0.0
        self._round_start = now
        self._round_target = self._sent_new
        self._round_delivered = 0
        self._round_sent = 0
        self._round_new = 0
        self._round_lost = 0
        self._app_limited = False
        self._refill(now)
        self._update_model()

    # --- what the sender asks -----------------------------------------------------------------------------

    @property
    def min_rtt(self) -> float:
        return self._min_rtt

    def allowance(self, now: float, in_flight: int) -> int:
        """How many new segments may be sent now, given ``in_flight`` unacknowledged ones."""
        room = self.window - in_flight
        if room <= 0:
            return 0
        if self.pacing_rate <= 0:
            return room
        self._refill(now)
        allowed = int(self._tokens + _EPSILON)
        if allowed <= 0:
            return 0
        return allowed if allowed < room else room

    def next_release(self, now: float, in_flight: int, queued: int) -> float | None:
        """When :meth:`allowance` will next allow a useful burst, or ``None`` when only an ACK can change it
        (nothing queued, the window is full, or there is no pacing)."""
        rate = self.pacing_rate
        if queued <= 0 or rate <= 0 or in_flight >= self.window:
            return None
        self._refill(now)
        # wake when half a burst is due, not a whole one: a timer that fires late then still finds the tokens
        # it was woken for, where a full bucket would have spilled the excess
        want = min(queued, max(1.0, self._burst / 2), self.window - in_flight)
        if self._tokens + _EPSILON >= want:
            return now
        return now + (want - self._tokens) / rate + _EPSILON

    # --- internals ----------------------------------------------------------------------------------------

    def _startup_early(self, elapsed: float) -> None:
        """Startup: raise the estimate from the half of the round seen so far, as BBR does per ACK.

        Waiting for the round's end would grow the rate by only the square root of the gain each round: a round
        measures what was sent in the round before, which was paced by the estimate of the round before that."""
        sample = self._round_delivered / elapsed
        if self._last_sent_rate:
            sample = min(sample, self._last_sent_rate)
        if sample > self.bandwidth * _FULL_GROWTH:
            self.bandwidth = self._round_peak = sample
            self._update_model()

    def _learn_probe(self, lost: int, delivered: int, sample: float) -> None:
        """A round of cruise ended (a sender that reports its losses, busy all round): learn from its losses.

        A round declares the losses of the round before it. Those of a round at gain 1 make the share this path
        loses anyway (random loss, and a queue the estimate overfills); the round after a probe declares the
        probe's. A probe that lost well above that share overflowed the bottleneck's queue: the next probe asks
        for half as much more. One that did not may ask a quarter more than it did, and one that also came back
        faster than the estimate by half of what it asked (``sample``: the path has room) twice as much, up to the
        cycle's 1/4 (from which a probe can send cruise back to startup). So a shallow queue is probed by as much
        as it holds, a deep one as BBR probes it, and a path that got faster is found within a few cycles."""
        seen = lost + delivered
        if seen <= 0:
            return
        share = lost / seen
        index = self._cycle_index
        if index == 1:
            overflowed = lost >= _STARTUP_LOSS_EVENTS and share > (
                _OVERFLOW_FACTOR * self._cruise_loss + _OVERFLOW_MARGIN
            )
            extra = self._probe_extra
            if overflowed:
                extra *= _PROBE_SHRINK
            elif sample >= self.bandwidth * (1.0 + extra / 2):
                extra *= _PROBE_ROOM_GROW
            else:
                extra *= _PROBE_GROW
            self._probe_extra = min(_CYCLE[0] - 1.0, max(_PROBE_MIN, extra))
        elif index != 2:  # (round 2 declares the losses of the drain round, paced below the estimate)
            self._cruise_loss += (share - self._cruise_loss) / len(_CYCLE)

    def _refill(self, now: float) -> None:
        rate = self.pacing_rate
        if rate <= 0:
            self._last_refill = now
            return
        elapsed = now - self._last_refill
        self._last_refill = now
        if elapsed > 0:
            self._tokens = min(self._burst, self._tokens + elapsed * rate)

    def _end_round(self, now: float, *, informative: bool, overflowed: bool = False) -> None:
        """``informative``: a busy sender measured the round (an app-limited one tells startup nothing about
        whether the path is full)."""
        self._refill(now)
        if self.phase is Phase.STARTUP:
            if not informative:
                pass
            elif overflowed:
                self.phase = Phase.DRAIN
            elif self.bandwidth >= self._full_bw * _FULL_GROWTH:
                self._full_bw = self.bandwidth
                self._full_count = 0
            else:
                self._full_count += 1
                if self._full_count >= _FULL_ROUNDS:
                    self.phase = Phase.DRAIN
        elif self.phase is Phase.DRAIN:
            self.phase = Phase.CRUISE
            self._cycle_index = 0
        else:
            self._cycle_index = (self._cycle_index + 1) % len(_CYCLE)
        self._update_model()

    def _update_model(self) -> None:
        """Recompute the pacing rate and the in-flight cap (once a round: the per-flush path only reads them)."""
        cfg = self._cfg
        bandwidth = self.bandwidth
        if bandwidth <= 0:
            return
        rtt = max(self._min_rtt, cfg.min_round)
        if self.phase is Phase.STARTUP:
            # never slower than the smallest window's worth per round trip: an estimate taken while the sender
            # had little to send (a handshake, a few requests) would otherwise start a bulk transfer at a
            # crawl, and startup would spend many rounds doubling up to where the initial window begins
            self.pacing_rate = max(bandwidth, cfg.min_window / rtt) * _STARTUP_GAIN
            gain = _STARTUP_GAIN
        elif self.phase is Phase.DRAIN:
            self.pacing_rate = bandwidth / _STARTUP_GAIN
            gain = cfg.window_gain
        else:
            index = self._cycle_index  # (the probe's gain is learnt: _learn_probe)
            self.pacing_rate = bandwidth * (1.0 + self._probe_extra if index == 0 else _CYCLE[index])
            gain = cfg.window_gain
        want = int(gain * bandwidth * rtt) + 1
        self.window = min(self._max_window, max(cfg.min_window, want))
        self._burst = max(float(cfg.min_burst), self.pacing_rate * cfg.burst_time)
