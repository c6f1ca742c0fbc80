"""Replay cache, handshake limiter and datagram replay window: semantics and bounded memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtunnel.security.replay import HandshakeLimiter, ReplayCache, ReplayWindow

T0 = 1_700_000_000.0


def test_replay_cache_accepts_once_within_the_window() -> None:
    c = ReplayCache(window=60.0)
    assert c.check_and_remember(b"a", T0, T0)
    assert not c.check_and_remember(b"a", T0, T0 + 1)
    assert c.check_and_remember(b"b", T0 - 59.0, T0)
    assert c.check_and_remember(b"c", T0 + 59.0, T0)
    assert not c.check_and_remember(b"d", T0 - 61.0, T0)
    assert not c.check_and_remember(b"e", T0 + 61.0, T0)


def test_replay_cache_remembers_as_long_as_the_timestamp_is_acceptable() -> None:
    c = ReplayCache(window=60.0)
    assert c.check_and_remember(b"a", T0 + 30.0, T0)  # a client clock 30 s ahead
    # still refused at every moment the timestamp alone would pass
    for dt in (0.0, 30.0, 60.0, 89.9):
        assert not c.check_and_remember(b"a", T0 + 30.0, T0 + dt)
    assert c.seen(b"a", T0 + 89.9)
    assert not c.seen(b"a", T0 + 90.1)  # forgotten only once the timestamp is stale
    assert len(c) == 0


def test_replay_cache_is_bounded_and_fails_closed() -> None:
    c = ReplayCache(window=10.0, max_entries=100)
    for i in range(100):
        assert c.check_and_remember(i.to_bytes(4, "big"), T0, T0)
    assert not c.check_and_remember(b"new", T0, T0)  # full: refuse rather than forget a live token
    assert len(c) == 100
    assert c.check_and_remember(b"new", T0 + 11.0, T0 + 11.0)  # old ones expired
    assert len(c) == 1


def test_replay_cache_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="window"):
        ReplayCache(window=0)
    with pytest.raises(ValueError, match="max_entries"):
        ReplayCache(max_entries=0)


def test_limiter_is_a_token_bucket_per_key() -> None:
    lim = HandshakeLimiter(rate=2.0, burst=3)
    assert [lim.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert lim.allow("b", 0.0)  # other sources are not affected
    assert not lim.allow("a", 0.2)
    assert lim.allow("a", 0.5)  # one token back after 1/rate seconds
    assert not lim.allow("a", 0.5)
    assert [lim.allow("a", 100.0) for _ in range(4)] == [True, True, True, False]  # never more than burst


def test_limiter_memory_is_bounded() -> None:
    lim = HandshakeLimiter(rate=1.0, burst=1, max_keys=50)
    for i in range(1000):
        assert lim.allow(f"10.0.{i // 256}.{i % 256}", float(i) / 1000.0)
        assert len(lim) <= 50
    with pytest.raises(ValueError, match="rate"):
        HandshakeLimiter(rate=0.0, burst=1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=3000), max_size=300), st.sampled_from([64, 128, 1024]))
def test_replay_window_matches_a_model(counters: list[int], size: int) -> None:
    w = ReplayWindow(size)
    seen: set[int] = set()
    highest = -1
    for n in counters:
        expected = n not in seen and n > highest - size
        assert w.check(n) == expected
        if expected:
            w.update(n)
            seen.add(n)
            highest = max(highest, n)


def test_replay_window_unauthenticated_checks_do_not_move_it() -> None:
    w = ReplayWindow(64)
    w.update(10)
    assert w.check(2**63)  # a forged huge counter passes the cheap check ...
    assert w.check(5)  # ... but until update() it moves nothing
    with pytest.raises(ValueError, match="64"):
        ReplayWindow(8)


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(st.integers(min_value=-5000, max_value=9000), max_size=200),
    size=st.sampled_from([64, 100, 4096]),
)
def test_replay_window_ring_matches_a_model_across_laps(steps: list[int], size: int) -> None:
    """Counters jumping forward by more than the window, crossing word boundaries and wrapping the ring."""
    w = ReplayWindow(size)
    seen: set[int] = set()
    highest = -1
    base = 0
    for step in steps:
        n = max(0, base + step)
        base = max(base, n)
        expected = n not in seen and n > highest - size
        assert w.check(n) == expected
        if expected:
            w.update(n)
            seen.add(n)
            highest = max(highest, n)
            assert not w.check(n)
        assert w.highest == highest


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(min_value=-300, max_value=5000), st.integers(min_value=1, max_value=300)),
        max_size=60,
    ),
    size=st.sampled_from([64, 100, 4096]),
)
def test_replay_window_runs_above_the_highest_match_updates_one_by_one(
    steps: list[tuple[int, int]], size: int
) -> None:
    """``update_above`` (a run in order) leaves the window answering every check as ``update`` of each counter of
    the run in turn does, across word boundaries, jumps longer than the window and laps of the ring; single
    counters below the highest are mixed in."""
    runs, singles = ReplayWindow(size), ReplayWindow(size)
    for gap, length in steps:
        if gap < 0:  # an older counter arriving late
            n = max(0, singles.highest + gap)
            if singles.check(n):
                singles.update(n)
                runs.update(n)
            continue
        first = singles.highest + 1 + gap
        last = first + length - 1
        for n in range(first, last + 1):
            singles.update(n)
        runs.update_above(first, last)
        assert runs.highest == singles.highest == last
        for n in range(max(0, last - 2 * size - 70), last + 70):
            assert runs.check(n) == singles.check(n), n


def test_replay_window_update_above_takes_only_a_range_above_the_highest() -> None:
    w = ReplayWindow(64)
    w.update(10)
    for first, last in ((10, 12), (5, 20), (12, 11)):
        with pytest.raises(ValueError, match="above the highest"):
            w.update_above(first, last)
    w.update_above(11, 11)
    assert not w.check(11)
    assert w.check(12)


def test_replay_window_update_of_a_counter_too_old_changes_nothing() -> None:
    w = ReplayWindow(64)
    w.update(1000)
    w.update(818)  # refused by check(); its ring slot is that of live counter 946, which must stay unmarked
    for n in range(1000 - 63, 1000):
        assert w.check(n)
    assert not w.check(1000)
    assert not w.check(1000 - 64)


def test_replay_cache_fresh_is_the_timestamp_check_alone_and_remembers_nothing() -> None:
    c = ReplayCache(window=60.0)
    assert c.fresh(T0 - 60.0, T0)
    assert c.fresh(T0 + 60.0, T0)
    assert not c.fresh(T0 - 60.5, T0)
    assert not c.fresh(T0 + 60.5, T0)
    assert len(c) == 0
