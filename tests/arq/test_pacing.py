"""Delivery-rate pacing: the sans-IO pacer alone, and two KCP engines on an emulated path in virtual time."""

from __future__ import annotations

import collections
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtunnel.arq.pacing import Pacer, PacerConfig, Phase
from vtunnel.testing.kcpsim import Path, simulate_bulk
from vtunnel.transports.kcp.options import parse_options

MiB = 1024 * 1024
#: the benchmark's relay profile, less its CPU: 50 MB/s through a 256 KiB queue, 5 ms each way
BOTTLENECK = Path(rate=50e6, queue=256 * 1024, delay=0.005, jitter=0.001, loss=0.02, reorder=0.005)


def drive(pacer: Pacer, *, rate: float, rtt: float, seconds: float, start: float = 0.0) -> float:
    """Acknowledge ``rate`` segments/s for ``seconds`` (a sender that always has data); returns the end time."""
    now = start
    step = 0.001
    while now < start + seconds:
        now += step
        pacer.on_acked(now, int(rate * step), rtt, app_limited=False)
        pacer.on_sent(pacer.allowance(now, 0))
    return now


def test_no_pacing_before_the_first_sample_only_the_initial_window() -> None:
    pacer = Pacer(max_window=1024, now=0.0)
    assert pacer.pacing_rate == 0
    assert pacer.allowance(0.0, 0) == PacerConfig().initial_window
    assert pacer.allowance(0.0, PacerConfig().initial_window) == 0
    assert pacer.next_release(0.0, 0, 100) is None  # nothing to wait for but an ACK


def test_startup_finds_the_rate_then_cruises_at_it() -> None:
    pacer = Pacer(max_window=4096, now=0.0)
    now = drive(pacer, rate=10_000, rtt=0.01, seconds=0.2)
    assert pacer.phase is Phase.CRUISE
    assert pacer.bandwidth == pytest.approx(10_000, rel=0.15)
    # the cap is about two round trips of the rate, the pacing rate cycles around the estimate
    assert 150 <= pacer.window <= 260
    rates = set()
    for _ in range(16):
        now = drive(pacer, rate=10_000, rtt=0.01, seconds=0.01, start=now)
        rates.add(round(pacer.pacing_rate / pacer.bandwidth, 2))
    assert rates == {0.75, 1.0, 1.25}


def test_a_sender_with_nothing_to_send_does_not_lower_the_estimate() -> None:
    pacer = Pacer(max_window=4096, now=0.0)
    now = drive(pacer, rate=10_000, rtt=0.01, seconds=0.2)
    before = pacer.bandwidth
    for _ in range(100):
        now += 0.001
        pacer.on_acked(now, 1, 0.01, app_limited=True)
    assert pacer.bandwidth == before


def test_the_estimate_forgets_a_faster_past() -> None:
    pacer = Pacer(max_window=4096, now=0.0)
    now = drive(pacer, rate=20_000, rtt=0.01, seconds=0.3)
    now = drive(pacer, rate=5_000, rtt=0.01, seconds=0.3, start=now)
    assert pacer.bandwidth == pytest.approx(5_000, rel=0.15)


def test_tokens_limit_a_burst_and_say_when_the_next_one_may_go() -> None:
    pacer = Pacer(max_window=4096, now=0.0)
    now = drive(pacer, rate=10_000, rtt=0.01, seconds=0.2)
    pacer.on_sent(pacer.allowance(now, 0))  # spend what is there
    assert pacer.allowance(now, 0) == 0
    release = pacer.next_release(now, 0, 1000)
    assert release is not None
    assert release > now
    assert pacer.allowance(release, 0) >= 1
    assert pacer.next_release(now, pacer.window, 1000) is None  # a full window waits for an ACK


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.floats(0, 0.05),  # time passing
            st.integers(0, 500),  # segments acknowledged
            st.sampled_from([0.0, 0.0005, 0.001, 0.01, 0.2]),  # srtt
            st.booleans(),  # app-limited
            st.integers(0, 5000),  # in flight
            st.integers(0, 5000),  # queued
        ),
        max_size=80,
    ),
    max_window=st.integers(16, 4096),
)
def test_the_pacer_stays_within_its_bounds(
    steps: list[tuple[float, int, float, bool, int, int]], max_window: int
) -> None:
    pacer = Pacer(max_window=max_window, now=0.0)
    now = 0.0
    for elapsed, acked, srtt, limited, in_flight, queued in steps:
        now += elapsed
        pacer.on_acked(now, acked, srtt, app_limited=limited)
        allowed = pacer.allowance(now, in_flight)
        assert 0 <= allowed <= max(0, pacer.window - in_flight)
        assert pacer.window <= max(max_window, PacerConfig().min_window)
        pacer.on_sent(allowed)
        release = pacer.next_release(now, in_flight, queued)
        assert release is None or release >= now


# --- two engines on an emulated path ------------------------------------------------------------------------


def test_pacing_keeps_a_shallow_bottleneck_queue_from_overflowing() -> None:
    paced = simulate_bulk(size=8 * MiB, forward=BOTTLENECK, seed=3)
    unpaced = simulate_bulk(
        size=8 * MiB, forward=BOTTLENECK, seed=3, options=parse_options({"pacing": "off"})
    )
    assert paced.exact
    assert unpaced.exact
    # a whole window at once overruns the queue all along (~45% here); paced, only startup's probing does
    assert unpaced.forward.queue_dropped > 0.3 * unpaced.forward.sent
    assert paced.forward.queue_dropped < 0.12 * paced.forward.sent
    assert paced.sender["pacing_phase"] == "cruise"
    # and the loss it does not cause, it need not repair: fewer datagrams for the same bytes
    assert paced.forward.sent < unpaced.forward.sent


@settings(max_examples=12, deadline=None)
@given(
    rate=st.sampled_from([None, 2e6, 20e6, 200e6]),
    queue=st.sampled_from([16 * 1024, 256 * 1024, 4 * MiB]),
    delay=st.sampled_from([0.0, 0.001, 0.02, 0.1]),
    loss=st.sampled_from([0.0, 0.01, 0.1]),
    jitter_reorders=st.booleans(),
    size=st.integers(1, 400_000),
    seed=st.integers(0, 2**16),
)
def test_a_paced_transfer_always_completes_byte_exact(
    rate: float | None, queue: int, delay: float, loss: float, jitter_reorders: bool, size: int, seed: int
) -> None:
    path = Path(
        rate=rate, queue=queue, delay=delay, loss=loss, jitter=delay / 4, jitter_reorders=jitter_reorders
    )
    result = simulate_bulk(size=size, forward=path, seed=seed, time_limit=120.0)
    assert result.complete, (result.delivered, result.seconds, result.sender)
    assert result.exact


def fluid(
    pacer: Pacer,
    *,
    link: float | Callable[[float], float],
    rtt: float,
    seconds: float,
    start: float,
    busy: bool,
) -> float:
    """A path of ``link`` segments/s (or ``link(now)``) and ``rtt`` seconds: what the pacer allows is sent (up
    to the link's rate, or one segment per ms when not ``busy``) and acknowledged one round trip later.
    Returns the end time."""
    step = 0.001
    now = start
    in_flight: list[tuple[float, int]] = []
    while now < start + seconds:
        now += step
        due = [n for t, n in in_flight if t <= now]
        in_flight = [(t, n) for t, n in in_flight if t > now]
        pacer.on_acked(now, sum(due), rtt, app_limited=not busy)
        allowed = pacer.allowance(now, sum(n for _, n in in_flight))
        rate = link(now) if callable(link) else link
        sent = min(allowed, int(rate * step)) if busy else min(allowed, 1)
        pacer.on_sent(sent)
        if sent:
            in_flight.append((now + rtt, sent))
    return now


def test_a_busy_sender_after_a_quiet_spell_finds_the_path_rate_quickly() -> None:
    pacer = Pacer(max_window=8192, now=0.0)
    now = fluid(pacer, link=40_000, rtt=0.01, seconds=1.0, start=0.0, busy=False)
    quiet = pacer.bandwidth
    assert quiet < 2_000
    now = fluid(pacer, link=40_000, rtt=0.01, seconds=0.25, start=now, busy=True)
    # startup's doubling, not cruise's quarter-per-cycle creep: most of the link within 25 round trips
    assert pacer.bandwidth > 0.7 * 40_000


def test_a_bulk_sender_settles_near_the_link_rate() -> None:
    pacer = Pacer(max_window=8192, now=0.0)
    fluid(pacer, link=40_000, rtt=0.01, seconds=1.0, start=0.0, busy=True)
    assert pacer.phase is Phase.CRUISE
    assert pacer.bandwidth == pytest.approx(40_000, rel=0.1)


def test_a_path_that_gets_faster_is_found_within_a_few_cycles() -> None:
    """A probe whose extra quarter all arrives sends cruise back to startup: creeping up a quarter per
    eight-round cycle would take about 50 rounds to find four times the rate."""
    slow = Pacer(max_window=8192, now=0.0)
    fluid(slow, link=10_000, rtt=0.01, seconds=0.5, start=0.0, busy=True)
    assert slow.phase is Phase.CRUISE
    assert slow.bandwidth == pytest.approx(10_000, rel=0.15)
    pacer = Pacer(max_window=8192, now=0.0)
    fluid(
        pacer, link=lambda now: 10_000 if now < 0.5 else 40_000, rtt=0.01, seconds=0.8, start=0.0, busy=True
    )
    assert pacer.bandwidth > 0.8 * 40_000


def test_bunched_acks_do_not_read_as_a_faster_path() -> None:
    """ACKs for a steady 10,000 segments/s arriving in bunches (every 4th ms, 4 ms' worth) stay 10,000/s."""
    pacer = Pacer(max_window=8192, now=0.0)
    now = 0.0
    owed = 0
    for ms in range(1, 600):
        now = ms / 1000
        pacer.on_sent(10)  # the sender's steady rate
        owed += 10
        delivered = owed if ms % 4 == 0 else 0
        owed -= delivered
        pacer.on_acked(now, delivered, 0.002, app_limited=False)
        pacer.allowance(now, 0)
    assert pacer.bandwidth <= 10_000 * 1.05


def test_startup_grows_the_rate_by_most_of_its_gain_each_round() -> None:
    """Estimates taken only at a round's end would trail by two rounds and grow by only the square root of
    startup's gain per round (x1.7); raising the estimate mid-round, as BBR does per ACK, keeps it near x1.9."""
    pacer = Pacer(max_window=1 << 20, now=0.0)
    fluid(pacer, link=10_000_000, rtt=0.01, seconds=0.08, start=0.0, busy=True)
    assert pacer.phase is Phase.STARTUP
    first = PacerConfig().initial_window / 0.01  # one initial window per round trip
    assert pacer.bandwidth > first * 1.8**7


def test_a_quiet_start_does_not_pace_below_the_initial_window() -> None:
    """A handshake's few segments give a tiny estimate; the bulk transfer that follows must still be allowed
    its initial window every round trip, not a crawl at 2.9 times a handshake's rate."""
    pacer = Pacer(max_window=4096, now=0.0)
    now = 0.0
    for _ in range(50):  # half a second of a segment now and then
        now += 0.01
        pacer.on_acked(now, 1, 0.01, app_limited=True)
        pacer.on_sent(1)
    assert pacer.phase is Phase.STARTUP
    assert 0 < pacer.bandwidth < 200
    assert pacer.pacing_rate >= PacerConfig().min_window / 0.01


def test_startup_stops_after_a_round_of_heavy_loss() -> None:
    pacer = Pacer(max_window=16384, now=0.0)
    now = fluid(pacer, link=40_000, rtt=0.01, seconds=0.03, start=0.0, busy=True)
    assert pacer.phase is Phase.STARTUP  # a few rounds in
    per_ms = 60
    for _ in range(2):  # rounds whose rate still doubles, but a third of what goes out are retransmissions
        per_ms *= 2
        for _ in range(10):
            now += 0.001
            pacer.on_acked(now, per_ms, 0.01, app_limited=False)
            pacer.on_sent(per_ms * 3 // 2, per_ms)
    assert pacer.phase is not Phase.STARTUP


def _startup_with_losses(share: float, seed: int, *, growing: bool = True) -> list[Phase]:
    """A pacer a few rounds into startup, then acknowledging and losing segments as they are declared, a round
    trip (10 ms) after they were sent: ``share`` of them lost (drawn from ``seed``), reported as a sender reports
    one ACK's outcome (what it acknowledged, then what it declared lost: rudp's order), while it sends twice what
    arrives; ``growing``: all it sends arrives a round trip later, so the rate doubles every round trip (the
    path has room), else no more than 120 a millisecond arrive (the path is full; its queue holds the rest);
    returns its phase after each millisecond."""
    rng = random.Random(seed)
    pacer = Pacer(max_window=16384, now=0.0)
    now = fluid(pacer, link=40_000, rtt=0.01, seconds=0.03, start=0.0, busy=True)
    assert pacer.phase is Phase.STARTUP
    phases: list[Phase] = []
    # what was sent in each of the last 10 milliseconds: twice as much a round trip apart, as startup sends
    sent = collections.deque(int(60 * 2 ** (ms / 10)) for ms in range(10))
    for _ in range(40):
        now += 0.001
        count = sent.popleft() if growing else 120
        lost = sum(1 for _ in range(count) if rng.random() < share)
        pacer.on_acked(now, count - lost, 0.01, app_limited=False)
        pacer.on_lost(now, lost)
        pacer.on_sent(2 * count)
        sent.append(2 * count)
        phases.append(pacer.phase)
    return phases


def test_a_burst_of_declared_losses_ends_startup_within_the_round() -> None:
    """A queue that startup overflows loses most of what startup sends: told of the losses as they are
    declared, the pacer drains at once instead of at the end of the next round."""
    phases = _startup_with_losses(0.6, seed=1)
    assert phases[2] is Phase.DRAIN  # a round lasts 10 ms here


@settings(max_examples=40, deadline=None)
@given(share=st.floats(min_value=0.0, max_value=0.2), seed=st.integers(0, 2**16))
def test_random_loss_declared_as_it_happens_does_not_end_startup(share: float, seed: int) -> None:
    """Up to 20% random loss, reported loss by loss, on a path whose rate still grows, is not an overflowing
    queue."""
    assert set(_startup_with_losses(share, seed)) == {Phase.STARTUP}


@pytest.mark.parametrize("seed", range(5))
def test_losses_once_the_rate_stopped_growing_end_startup(seed: int) -> None:
    """The same losses where the delivery rate no longer grows: the path is full and its queue overflowing, so
    a tenth lost is enough (3% is not)."""
    assert set(_startup_with_losses(0.03, seed, growing=False)[:20]) == {Phase.STARTUP}
    phases = _startup_with_losses(0.15, seed, growing=False)
    assert Phase.STARTUP not in phases[12:]  # (within about a round trip)
    assert set(_startup_with_losses(0.15, seed)) == {Phase.STARTUP}  # (growing: the same share goes on)


def test_paced_windows_larger_than_the_path_needs_do_not_flood_a_shallow_queue() -> None:
    """Fast retransmissions count against the pacing rate too: with room for 4096 segments in flight, a lossy
    path's repairs must not ride on top of the pace and overrun the queue."""
    big = parse_options({"sndwnd": "4096", "rcvwnd": "4096"})
    result = simulate_bulk(size=16 * MiB, forward=BOTTLENECK, seed=3, options=big)
    assert result.exact
    assert result.forward.queue_dropped < 0.08 * result.forward.sent


def test_repeated_acks_spare_the_data_a_lost_ack_would_have_resent() -> None:
    """Through a path that loses a tenth of the ACK datagrams, each ACK sent twice saves resending data that
    arrived, and the round trip the sender measures stays the same."""
    forward = Path(rate=50e6, queue=256 * 1024, delay=0.005, loss=0.02)
    backward = Path(delay=0.005, loss=0.1)
    runs = {
        repeat: simulate_bulk(
            size=8 * MiB,
            forward=forward,
            backward=backward,
            seed=3,
            options=parse_options({"ackrepeat": repeat}),
        )
        for repeat in ("on", "off")
    }
    assert runs["on"].exact
    assert runs["off"].exact
    assert runs["on"].forward.sent < 0.97 * runs["off"].forward.sent
    assert abs(int(runs["on"].sender["srtt_ms"]) - int(runs["off"].sender["srtt_ms"])) <= 1


# --- what a sender that reports its losses teaches the pacer ------------------------------------------------


def bottleneck(
    pacer: Pacer,
    *,
    link: int | Callable[[float], int],
    queue: int,
    rtt: float,
    seconds: float,
    loss: float = 0.0,
    report_losses: bool,
    seed: int = 1,
) -> tuple[int, int, list[float]]:
    """A busy sender through a bottleneck of ``link`` segments/s whose queue holds ``queue`` segments and drops
    what overflows it, ``loss`` of what passes lost at random: each segment is acknowledged one ``rtt`` (plus its
    wait in the queue) after it left, or, lost, declared so at that time (``report_losses``, rudp's order: the
    ACK's deliveries first) or never told, and sent again before new data. Returns the segments delivered,
    those the queue dropped, and the pacing gain (pacing rate over the estimate) of every millisecond."""
    rng = random.Random(seed)
    step = 0.001
    now = 0.0
    backlog = 0.0  # segments waiting in the queue
    events: dict[int, list[int]] = {}  # ms -> [acknowledged, lost]
    in_flight = delivered = dropped = owed = 0
    gains: list[float] = []
    for tick in range(int(seconds / step)):
        now = (tick + 1) * step
        rate = link(now) if callable(link) else link
        acked, lost = events.pop(tick, [0, 0])
        in_flight -= acked + lost
        owed += lost
        delivered += acked
        pacer.on_acked(now, acked, rtt, app_limited=False)
        if lost and report_losses:
            pacer.on_lost(now, lost)
        sent = min(pacer.allowance(now, in_flight), 4 * rate // 1000)
        resent = min(sent, owed)  # what was lost goes again first, as no new data
        owed -= resent
        pacer.on_sent(sent, sent - resent)
        in_flight += sent
        backlog = max(0.0, backlog - rate * step)
        room = max(0, int(queue - backlog))
        passed = min(sent, room)
        dropped += sent - passed
        backlog += passed
        arrives = tick + round((rtt + backlog / rate) / step)
        randomly = sum(1 for _ in range(passed) if rng.random() < loss)
        entry = events.setdefault(arrives, [0, 0])
        entry[0] += passed - randomly
        entry[1] += sent - passed + randomly
        if pacer.bandwidth > 0:
            gains.append(pacer.pacing_rate / pacer.bandwidth)
    return delivered, dropped, gains


def test_a_sender_that_reports_losses_learns_to_probe_a_shallow_queue_gently() -> None:
    """A queue that holds a tenth of the path's round trip overflows under every probe at 5/4 of the rate: the
    sender that is told its losses probes by less, and loses far less to the queue for as much delivered."""
    runs = {
        told: bottleneck(
            Pacer(max_window=8192, now=0.0), link=40_000, queue=40, rtt=0.01, seconds=3.0, report_losses=told
        )
        for told in (True, False)
    }
    (told_delivered, told_dropped, told_gains), (blind_delivered, blind_dropped, blind_gains) = (
        runs[True],
        runs[False],
    )
    assert max(blind_gains[-1000:]) == pytest.approx(1.25)  # a sender that reports nothing probes as BBR does
    assert max(told_gains[-1000:]) < 1.1
    assert told_dropped < 0.5 * blind_dropped
    assert told_delivered >= 0.98 * blind_delivered


def test_a_gentle_prober_still_finds_a_path_that_got_faster() -> None:
    """Probes learnt gentle on a shallow queue; then the path is four times as fast: each probe that finds room
    asks for twice as much next, back to 5/4, and then startup finds the rest (within 40 rounds here)."""
    pacer = Pacer(max_window=8192, now=0.0)
    _, _, gains = bottleneck(
        pacer,
        link=lambda now: 20_000 if now < 3.0 else 80_000,
        queue=100,
        rtt=0.05,
        seconds=5.0,
        report_losses=True,
    )
    assert max(gains[2000:3000]) < 1.1  # (gentle before the change)
    assert pacer.bandwidth > 0.8 * 80_000


def test_random_loss_does_not_make_the_probe_gentler() -> None:
    """5% loss at random through a queue deep enough for every probe: the probes stay at 5/4."""
    _, _, gains = bottleneck(
        Pacer(max_window=8192, now=0.0),
        link=40_000,
        queue=2_000,
        rtt=0.01,
        seconds=3.0,
        loss=0.05,
        report_losses=True,
    )
    assert max(gains[-1000:]) == pytest.approx(1.25)


def phase_of(pacer: Pacer) -> Phase:
    """(read through a call: a test that asserted one phase may assert another after the pacer is told more)"""
    return pacer.phase


def test_what_startup_measured_of_a_round_outlives_the_round() -> None:
    """Startup raises its estimate from half a round: the rounds that end after it (that round itself, or the
    next if losses cut it short and drain began) keep it in the filter, as any round's rate; it must not fall
    back to what the rounds before measured (a cruise at half the link, then a second startup's overshoot)."""
    for cut_by_losses in (False, True):
        pacer = Pacer(max_window=16384, now=0.0)
        now = fluid(pacer, link=1_000_000, rtt=0.01, seconds=0.05, start=0.0, busy=True)
        assert pacer.phase is Phase.STARTUP  # (a link it is far from filling)
        before = pacer.bandwidth
        # the first half of a round at twice the rate measured so far
        per_ms = int(2 * before / 1000)
        for _ in range(6):
            now += 0.001
            pacer.on_acked(now, per_ms, 0.01, app_limited=False)
            pacer.on_sent(per_ms)
        raised = pacer.bandwidth
        assert raised > 1.5 * before
        if cut_by_losses:
            pacer.on_lost(now, 10 * per_ms)
            assert phase_of(pacer) is Phase.DRAIN
        slower = int(before / 1000)
        for _ in range(
            30
        ):  # then rounds at the rate before, busy: each round's end takes the filter's maximum
            now += 0.001
            pacer.on_acked(now, slower, 0.01, app_limited=False)
            pacer.on_sent(slower)
        assert pacer.bandwidth >= raised
