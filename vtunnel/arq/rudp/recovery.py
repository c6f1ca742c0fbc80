"""Loss recovery for rudp, after RFC 9002: round-trip estimation, loss detection, the probe timeout, and the
receiver's side of acknowledgement (which packets it has, and when an ACK is due).

Sender side (:class:`LossDetector`): every packet sent is remembered by number until it is acknowledged or
declared lost. A packet is lost once a packet sent at least :data:`PACKET_THRESHOLD` numbers after it has been
acknowledged, or once it is older than 9/8 of the round trip while a later one was acknowledged: reordering
shorter than both never declares a loss. When no acknowledgement arrives at all, the probe timeout (PTO) fires:
it declares nothing lost, it asks the sender for one or two probe packets, and doubles on each expiry until an
ACK arrives. Lost packets are never resent as such: their data goes out again in new packets with new numbers.

Receiver side (:class:`AckTracker`): the numbers received, as ranges (at most :data:`MAX_TRACKED_RANGES`; the
oldest are forgotten and anything below them counts as a duplicate), and when to acknowledge: after every
second ack-eliciting packet, within ``max_ack_delay`` of the first one otherwise, and at once when a packet
arrives out of order or leaves a gap.

Times are seconds (floats) the caller passes in as ``now``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from .ranges import RangeSet

__all__ = [
    "GRANULARITY",
    "MAX_TRACKED_RANGES",
    "PACKET_THRESHOLD",
    "TIME_THRESHOLD",
    "AckResult",
    "AckTracker",
    "LossDetector",
    "RttEstimator",
    "SentPacket",
]

#: a packet is lost once this many later-sent packets are acknowledged
PACKET_THRESHOLD: Final = 3
#: ... or once it is older than this many round trips while a later one was acknowledged
TIME_THRESHOLD: Final = 9 / 8
#: the timer granularity (seconds): no loss delay or PTO variance below it
GRANULARITY: Final = 0.001
#: the most ranges of received packet numbers a receiver keeps
MAX_TRACKED_RANGES: Final = 64
#: the most ranges one ACK frame reports
MAX_ACK_RANGES: Final = 32


@dataclass(slots=True, eq=False)
class SentPacket:
    """What the sender remembers of one packet until it is acknowledged or lost."""

    number: int
    sent_time: float
    size: int
    #: carries a frame other than ACK and PADDING: the peer acknowledges it, and it counts against the window
    ack_eliciting: bool
    #: stream data carried: ``(offset, length, fin)``
    stream: list[tuple[int, int, bool]] = field(default_factory=list)
    #: the largest packet number an ACK frame in this packet acknowledged (-1: none)
    ack_largest: int = -1
    #: a DATA_BLOCKED frame was in it
    blocked: bool = False
    #: some of the stream data had been sent before
    retransmission: bool = False
    #: DATAGRAM frames carried (never sent again)
    datagrams: int = 0


class RttEstimator:
    """RFC 9002 section 5: the minimum, the smoothed round trip and its variation, adjusted for ACK delay."""

    __slots__ = ("has_sample", "latest", "max_ack_delay", "min", "pto_period", "smoothed", "variance")

    def __init__(self, *, initial_rtt: float, max_ack_delay: float) -> None:
        self.has_sample = False
        self.latest = 0.0
        self.min = 0.0
        self.smoothed = initial_rtt
        self.variance = initial_rtt / 2
        #: the peer's promise: it never holds an ACK for an ack-eliciting packet longer than this (seconds)
        self.max_ack_delay = max_ack_delay
        #: :meth:`pto`, kept up to date (the loss detector's timer reads it after every packet)
        self.pto_period = initial_rtt + max(4 * self.variance, GRANULARITY) + max_ack_delay

    def update(self, latest: float, ack_delay: float) -> None:
        """A sample: ``latest`` seconds from sending the largest newly acknowledged packet to its ACK, of which
        the peer says it held the ACK for ``ack_delay``."""
        if latest < 0.0:
            latest = 0.0
        self.latest = latest
        if not self.has_sample:
            self.has_sample = True
            self.min = latest
            self.smoothed = latest
            self.variance = latest / 2
            self.pto_period = latest + max(latest * 2, GRANULARITY) + self.max_ack_delay
            return
        if latest < self.min:
            self.min = latest
        if ack_delay > self.max_ack_delay:
            ack_delay = self.max_ack_delay
        adjusted = latest - ack_delay if latest >= self.min + ack_delay else latest
        smoothed = self.smoothed
        self.variance = variance = 0.75 * self.variance + 0.25 * (
            smoothed - adjusted if smoothed > adjusted else adjusted - smoothed
        )
        self.smoothed = smoothed = 0.875 * smoothed + 0.125 * adjusted
        variance *= 4
        self.pto_period = (
            smoothed + (variance if variance > GRANULARITY else GRANULARITY) + self.max_ack_delay
        )

    def pto(self) -> float:
        """The probe timeout's base period (before backoff)."""
        return self.pto_period


class AckResult:
    """What one ACK frame did."""

    __slots__ = ("acked", "late", "lost", "persistent_congestion", "rtt_updated")

    def __init__(self) -> None:
        self.acked: list[SentPacket] = []
        self.lost: list[SentPacket] = []
        #: packets declared lost earlier that this ACK shows did arrive (their data need not be sent again)
        self.late: list[SentPacket] = []
        #: the lost packets span more than the persistent congestion period with nothing acknowledged in between
        self.persistent_congestion = False
        self.rtt_updated = False


class LossDetector:
    """The sender's record of packets in flight, and its timers (RFC 9002 section 6 and appendix A)."""

    __slots__ = (
        "_declared_lost",
        "_last_ack_eliciting",
        "_loss_time",
        "_lost_numbers",
        "ack_eliciting_in_flight",
        "bytes_in_flight",
        "largest_acked",
        "largest_sent",
        "pto_count",
        "rtt",
        "sent",
    )

    #: packets declared lost are remembered this long (in packets) so that a late ACK still frees their data
    LOST_MEMORY: Final = 1024

    def __init__(self, rtt: RttEstimator) -> None:
        self.rtt = rtt
        #: packets sent and neither acknowledged nor lost, by number (numbers ascend in insertion order)
        self.sent: dict[int, SentPacket] = {}
        self._declared_lost: dict[int, SentPacket] = {}
        self._lost_numbers: list[int] = []
        self.largest_acked = -1
        self.largest_sent = -1
        self.bytes_in_flight = 0
        self.ack_eliciting_in_flight = 0
        self.pto_count = 0
        self._loss_time: float | None = None
        self._last_ack_eliciting: float | None = None

    # --- sending ---------------------------------------------------------------------------------------------

    def on_sent(self, packet: SentPacket) -> None:
        self.largest_sent = packet.number
        if not packet.ack_eliciting:
            return  # an ACK-only packet is neither in flight nor awaited
        self.sent[packet.number] = packet
        self.bytes_in_flight += packet.size
        self.ack_eliciting_in_flight += 1
        self._last_ack_eliciting = packet.sent_time

    def on_sent_run(self, packets: list[SentPacket], size: int) -> None:
        """:meth:`on_sent` of ack-eliciting packets sent together (numbers ascending, ``size`` their bytes)."""
        sent = self.sent
        for packet in packets:
            sent[packet.number] = packet
        last = packets[-1]
        self.largest_sent = last.number
        self.bytes_in_flight += size
        self.ack_eliciting_in_flight += len(packets)
        self._last_ack_eliciting = last.sent_time

    def _forget(self, packet: SentPacket) -> None:
        self.bytes_in_flight -= packet.size
        self.ack_eliciting_in_flight -= 1

    # --- acknowledgements ------------------------------------------------------------------------------------

    def on_ack(self, ranges: Sequence[tuple[int, int]], ack_delay: float, now: float) -> AckResult:
        """Apply one ACK frame (``ranges``: inclusive, highest first, as :class:`~.wire.Ack` has them).

        The caller has checked that no range goes past :attr:`largest_sent`."""
        result = AckResult()
        if not ranges:
            return result
        largest = ranges[0][1]
        sent = self.sent
        pop = sent.pop
        acked = result.acked
        keep = acked.append
        size = 0
        if sent:
            oldest = next(iter(sent))
            for low, high in reversed(ranges):
                if high < oldest:
                    continue
                start = low if low > oldest else oldest
                if high - start > len(sent):  # a wide range over few packets: walk the packets instead
                    walked: list[int] = []
                    for number in sent:  # (ascending)
                        if number > high:
                            break
                        if number >= start:
                            walked.append(number)
                    numbers: Iterable[int] = walked
                else:
                    numbers = range(start, high + 1)
                for number in numbers:
                    packet = pop(number, None)
                    if packet is not None:
                        keep(packet)
                        size += packet.size
        if self._lost_numbers:
            self._find_late(ranges, result)
        if not acked:
            return result
        self.bytes_in_flight -= size
        self.ack_eliciting_in_flight -= len(acked)
        if largest > self.largest_acked:
            self.largest_acked = largest
        newest = acked[-1]
        if newest.number == largest:
            self.rtt.update(now - newest.sent_time, ack_delay)
            result.rtt_updated = True
        self.pto_count = 0
        if sent:
            lost = result.lost = self.detect_lost(now)
            if len(lost) >= 2:
                result.persistent_congestion = self._persistent(lost)
        else:
            self._loss_time = None  # (what detect_lost finds with nothing in flight)
        return result

    def detect_lost(self, now: float) -> list[SentPacket]:
        """Declare lost what the thresholds say is lost; sets the time-threshold timer for the rest."""
        self._loss_time = None
        largest = self.largest_acked
        if largest < 0:
            return []
        rtt = self.rtt
        # the loss delay: 9/8 of the larger of the latest and the smoothed round trip, at least the granularity
        delay = TIME_THRESHOLD * (rtt.latest if rtt.latest > rtt.smoothed else rtt.smoothed)
        if delay < GRANULARITY:
            delay = GRANULARITY
        lost: list[SentPacket] = []
        for number, packet in self.sent.items():
            if number > largest:
                break
            due = packet.sent_time + delay  # the same sum the timer was set from: no rounding gap
            if due <= now or largest - number >= PACKET_THRESHOLD:
                lost.append(packet)
            elif self._loss_time is None or due < self._loss_time:
                self._loss_time = due
        memory = self._declared_lost
        numbers = self._lost_numbers
        for packet in lost:
            del self.sent[packet.number]
            self._forget(packet)
            if packet.stream:
                memory[packet.number] = packet
                numbers.append(packet.number)  # ascending: nothing older can be declared lost later
        if len(numbers) > self.LOST_MEMORY:
            for number in numbers[: -self.LOST_MEMORY]:
                memory.pop(number, None)
            del numbers[: -self.LOST_MEMORY]
        return lost

    def _find_late(self, ranges: Sequence[tuple[int, int]], result: AckResult) -> None:
        numbers = self._lost_numbers
        found: list[int] = []
        for low, high in ranges:
            i = bisect_left(numbers, low)
            while i < len(numbers) and numbers[i] <= high:
                found.append(numbers[i])
                i += 1
        if not found:
            return
        late: list[SentPacket] = []
        for number in sorted(found):
            packet = self._declared_lost.pop(number, None)
            if packet is not None:
                late.append(packet)
        result.late = late
        gone = set(found)
        self._lost_numbers = [n for n in numbers if n not in gone]

    def _persistent(self, lost: list[SentPacket]) -> bool:
        """RFC 9002 section 7.6: ack-eliciting packets lost over longer than three PTOs, none acknowledged
        between them (their numbers are consecutive: every number is one packet), after a first RTT sample."""
        if len(lost) < 2 or not self.rtt.has_sample:
            return False
        first, last = lost[0], lost[-1]
        if last.number - first.number + 1 != len(lost):
            return False
        period = self.rtt.pto_period * 3
        return last.sent_time - first.sent_time >= period

    # --- timers ----------------------------------------------------------------------------------------------

    def deadline(self) -> float | None:
        """The loss detection timer: the time threshold of a packet not yet lost, else the PTO."""
        if self._loss_time is not None:
            return self._loss_time
        if self.ack_eliciting_in_flight == 0 or self._last_ack_eliciting is None:
            return None
        return self._last_ack_eliciting + self.rtt.pto_period * (1 << min(self.pto_count, 16))

    def on_timeout(self, now: float) -> tuple[list[SentPacket], bool]:
        """The timer fired: ``(lost, False)`` for the time threshold, ``([], True)`` when probes must be sent."""
        if self._loss_time is not None:
            if now >= self._loss_time:
                return self.detect_lost(now), False
            return [], False
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return [], False
        self.pto_count += 1
        return [], True

    def oldest_unacked(self) -> SentPacket | None:
        for packet in self.sent.values():
            if packet.stream:
                return packet
        return None


class AckTracker:
    """The receiver's view: which packet numbers arrived, and when an ACK must go out."""

    __slots__ = (
        "_eliciting_since_ack",
        "ack_deadline",
        "floor",
        "immediate",
        "largest",
        "largest_time",
        "max_ack_delay",
        "received",
        "report_floor",
        "threshold",
    )

    def __init__(self, *, max_ack_delay: float, threshold: int = 2) -> None:
        self.received = RangeSet()
        #: numbers below this count as already received (their ranges were forgotten)
        self.floor = 0
        #: numbers below this are no longer reported (an ACK reporting them was acknowledged)
        self.report_floor = 0
        self.largest = -1
        self.largest_time = 0.0
        self.max_ack_delay = max_ack_delay
        self.threshold = threshold
        #: when the ACK held for an ack-eliciting packet is due (None: none held, or one is due at once)
        self.ack_deadline: float | None = None
        #: an ACK is due at once (with the next datagram)
        self.immediate = False
        self._eliciting_since_ack = 0

    def is_duplicate(self, number: int) -> bool:
        if number > self.largest:
            return False  # (the next packet, the usual case: no search)
        return number < self.floor or number in self.received

    def on_packet(self, number: int, ack_eliciting: bool, now: float) -> None:
        """Record a packet that was accepted (not a duplicate)."""
        previous = self.largest
        self.received.add(number, number + 1)
        if number != previous + 1 and len(self.received) > MAX_TRACKED_RANGES:  # (else no range was added)
            _, end = self.received.pop_first()
            self.floor = max(self.floor, end)
        if number > previous:
            self.largest = number
            self.largest_time = now
        if not ack_eliciting:
            return
        self._eliciting_since_ack += 1
        if number != previous + 1 or self._eliciting_since_ack >= self.threshold:
            # reordered, a new gap, or the second ack-eliciting packet since the last ACK
            self.immediate = True
        elif self.ack_deadline is None:
            self.ack_deadline = now + self.max_ack_delay

    def on_run(self, first: int, last: int, now: float) -> None:
        """:meth:`on_packet` of the ack-eliciting packets ``first..last``, all new, ``first`` the one after the
        largest so far (a run of a transfer taken at once): the same state as one call for each of them."""
        self.received.add(first, last + 1)  # (it extends the last range: no range is added)
        self.largest = last
        self.largest_time = now
        before = self._eliciting_since_ack
        self._eliciting_since_ack = count = before + last - first + 1
        if before + 1 < self.threshold and self.ack_deadline is None:
            self.ack_deadline = now + self.max_ack_delay  # (the first of them set it)
        if count >= self.threshold:
            self.immediate = True

    def request_immediate(self) -> None:
        """An ACK should go out with the next datagram (e.g. the receive window opened)."""
        if self.largest >= 0:
            self.immediate = True

    def ack_due(self, now: float) -> bool:
        return self.immediate or (self.ack_deadline is not None and now >= self.ack_deadline)

    @property
    def pending(self) -> bool:
        """Something arrived that no ACK has reported yet."""
        return self.immediate or self.ack_deadline is not None

    def deadline(self) -> float | None:
        return None if self.immediate else self.ack_deadline

    def ranges(self) -> list[tuple[int, int]]:
        """The ranges an ACK reports now: inclusive, highest first."""
        return self.received.descending(self.report_floor, MAX_ACK_RANGES)

    def on_ack_sent(self) -> None:
        self.immediate = False
        self.ack_deadline = None
        self._eliciting_since_ack = 0

    def on_ack_acknowledged(self, largest: int) -> None:
        """The peer received an ACK of ours that reported up to ``largest``: stop reporting what is below the
        range holding it (the peer knows), but keep remembering it for duplicate detection."""
        start = self.received.start_of(largest)
        if start > self.report_floor:
            self.report_floor = start
