"""RFC 9002 recovery: the RTT estimator, loss detection (hypothesis: reordering within the thresholds never
declares a loss), the probe timeout and its backoff, and the receiver's ACK timing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtunnel.arq.rudp.recovery import (
    MAX_TRACKED_RANGES,
    PACKET_THRESHOLD,
    AckTracker,
    LossDetector,
    RttEstimator,
    SentPacket,
)
from vtunnel.arq.rudp.wire import ack_ranges

RTT = 0.1
SPACING = 0.001


def detector() -> LossDetector:
    return LossDetector(RttEstimator(initial_rtt=0.333, max_ack_delay=0.025))


def sent(loss: LossDetector, count: int, start: float = 0.0) -> None:
    for n in range(count):
        number = loss.largest_sent + 1
        loss.on_sent(SentPacket(number=number, sent_time=start + n * SPACING, size=1200, ack_eliciting=True))


def test_rtt_first_sample_then_smoothing_with_ack_delay() -> None:
    rtt = RttEstimator(initial_rtt=0.333, max_ack_delay=0.025)
    assert rtt.pto() == pytest.approx(0.333 + 4 * 0.1665 + 0.025)
    rtt.update(0.1, 0.0)
    assert (rtt.min, rtt.smoothed, rtt.variance) == (0.1, 0.1, 0.05)
    rtt.update(0.12, 0.01)  # 10 ms of it the peer held the ACK: 0.11 counts
    assert rtt.min == 0.1
    assert rtt.smoothed == pytest.approx(0.875 * 0.1 + 0.125 * 0.11)
    assert rtt.variance == pytest.approx(0.75 * 0.05 + 0.25 * 0.01)
    rtt.update(0.105, 0.05)  # an ACK delay that would take the sample under the minimum is ignored
    assert rtt.latest == 0.105
    rtt.update(0.2, 1.0)  # the ACK delay is capped at max_ack_delay
    assert rtt.smoothed < 0.2


def test_packet_threshold_declares_loss() -> None:
    loss = detector()
    sent(loss, 5)
    result = loss.on_ack(ack_ranges({1, 2}), 0.0, RTT)
    assert [p.number for p in result.acked] == [1, 2]
    assert result.lost == []  # 0 is only two behind the largest acknowledged
    assert loss.deadline() is not None
    result = loss.on_ack(ack_ranges({1, 2, 3}), 0.0, RTT + 0.001)
    assert [p.number for p in result.lost] == [0]
    assert loss.bytes_in_flight == 1200  # packet 4


def test_time_threshold_declares_loss_after_nine_eighths_of_the_rtt() -> None:
    loss = detector()
    sent(loss, 2)
    result = loss.on_ack(ack_ranges({1}), 0.0, RTT)
    assert result.lost == []
    deadline = loss.deadline()
    assert deadline is not None
    assert deadline == pytest.approx(0.0 + 9 / 8 * (RTT - SPACING))
    assert loss.on_timeout(deadline - 0.001) == ([], False)
    lost, probe = loss.on_timeout(deadline)
    assert [p.number for p in lost] == [0]
    assert not probe


def test_pto_asks_for_probes_and_backs_off() -> None:
    loss = detector()
    sent(loss, 1)
    first = loss.deadline()
    assert first is not None
    lost, probe = loss.on_timeout(first)
    assert lost == []
    assert probe
    assert loss.bytes_in_flight == 1200  # a PTO declares nothing lost
    second = loss.deadline()
    assert second is not None
    assert second - 0.0 == pytest.approx(2 * (first - 0.0))
    loss.on_timeout(second)
    assert loss.deadline() == pytest.approx(4 * first)
    loss.on_ack(ack_ranges({0}), 0.0, second + 0.01)
    assert loss.pto_count == 0


def test_persistent_congestion() -> None:
    loss = detector()
    sent(loss, 1)
    loss.on_ack(ack_ranges({0}), 0.0, RTT)
    for t in (1.0, 2.0, 3.0, 4.0):
        loss.on_sent(SentPacket(number=loss.largest_sent + 1, sent_time=t, size=1200, ack_eliciting=True))
    sent(loss, 1, start=4.5)
    result = loss.on_ack(ack_ranges({0, 5}), 0.0, 4.6)
    assert [p.number for p in result.lost] == [1, 2, 3, 4]
    assert result.persistent_congestion


def test_late_ack_of_a_packet_declared_lost_is_reported() -> None:
    loss = detector()
    sent(loss, 5)
    result = loss.on_ack(ack_ranges({1, 2, 3, 4}), 0.0, RTT)
    assert [p.number for p in result.lost] == [0]
    result = loss.on_ack(ack_ranges({0, 1, 2, 3, 4}), 0.0, RTT + 0.01)
    assert result.acked == []
    assert result.late == []  # a packet without stream data is not remembered


@st.composite
def reordered_arrivals(draw: st.DrawFn) -> tuple[int, list[int]]:
    """A number of packets and an arrival order where each packet arrives at most two places late."""
    count = draw(st.integers(min_value=1, max_value=120))
    slack = [draw(st.floats(min_value=0.0, max_value=PACKET_THRESHOLD - 1)) for _ in range(count)]
    order = sorted(range(count), key=lambda n: (n + slack[n], n))
    return count, order


@settings(max_examples=300, deadline=None)
@given(reordered_arrivals(), st.integers(min_value=1, max_value=4))
def test_reordering_within_the_thresholds_never_declares_loss(
    arrivals: tuple[int, list[int]], ack_every: int
) -> None:
    count, order = arrivals
    loss = detector()
    sent(loss, count)
    received: set[int] = set()
    for index, number in enumerate(order):
        received.add(number)
        now = number * SPACING + RTT + index * 1e-5  # each arrives about an RTT after it left
        if index % ack_every == ack_every - 1 or index == count - 1:
            result = loss.on_ack(ack_ranges(received), 0.0, now)
            assert result.lost == []
        deadline = loss.deadline()
        if deadline is not None and deadline <= now:
            lost, _ = loss.on_timeout(now)
            assert lost == []
    assert loss.bytes_in_flight == 0


def test_ack_tracker_delays_then_acknowledges_every_second_packet() -> None:
    acks = AckTracker(max_ack_delay=0.025)
    acks.on_packet(0, True, 1.0)
    assert not acks.ack_due(1.0)
    assert acks.deadline() == pytest.approx(1.025)
    assert acks.ack_due(1.025)
    acks.on_packet(1, True, 1.001)
    assert acks.ack_due(1.001)
    assert acks.ranges() == [(0, 1)]
    acks.on_ack_sent()
    assert not acks.pending
    acks.on_packet(2, False, 1.002)  # not ack-eliciting: no ACK of its own
    assert not acks.pending


def test_ack_tracker_acknowledges_a_gap_or_reordering_at_once() -> None:
    acks = AckTracker(max_ack_delay=0.025)
    acks.on_packet(0, True, 1.0)
    acks.on_ack_sent()
    acks.on_packet(2, True, 1.01)  # 1 is missing
    assert acks.ack_due(1.01)
    acks.on_ack_sent()
    acks.on_packet(1, True, 1.02)  # the missing one, late
    assert acks.ack_due(1.02)
    assert acks.ranges() == [(0, 2)]
    assert acks.is_duplicate(1)


def test_ack_tracker_bounds_its_ranges_and_counts_older_numbers_as_duplicates() -> None:
    acks = AckTracker(max_ack_delay=0.025)
    for n in range(0, 4 * MAX_TRACKED_RANGES, 2):
        acks.on_packet(n, True, 0.0)
    assert len(acks.received) == MAX_TRACKED_RANGES
    assert acks.is_duplicate(1)  # below what is remembered
    assert not acks.is_duplicate(4 * MAX_TRACKED_RANGES - 1)
    acks.on_ack_acknowledged(4 * MAX_TRACKED_RANGES - 2)
    assert acks.ranges() == [(4 * MAX_TRACKED_RANGES - 2, 4 * MAX_TRACKED_RANGES - 2)]
