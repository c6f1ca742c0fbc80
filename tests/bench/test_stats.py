"""Percentile math and summaries of the benchmark harness."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.stats import cdf_points, median, percentile, ratio, summarize

finite = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False)


def test_percentile_known_values() -> None:
    data = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert percentile(data, 0) == 15.0
    assert percentile(data, 100) == 50.0
    assert percentile(data, 50) == 35.0
    assert percentile(data, 40) == pytest.approx(29.0)  # 0.4 * 4 = 1.6 -> 20 + 0.6 * 15
    assert percentile(list(range(1, 1001)), 99.9) == pytest.approx(999.001)


def test_median_of_even_count_is_mean_of_middle_pair() -> None:
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median([7.0]) == 7.0


@pytest.mark.parametrize("bad", [-0.1, 100.1, math.nan])
def test_percentile_rejects_out_of_range(bad: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0, 2.0], bad)


def test_empty_inputs_are_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match="empty"):
        summarize([])


@given(st.lists(finite, min_size=1, max_size=200), st.floats(min_value=0, max_value=100))
def test_percentile_within_range_and_matches_sorted_rank(data: list[float], q: float) -> None:
    value = percentile(data, q)
    assert min(data) <= value <= max(data)
    ordered = sorted(data)
    position = (len(ordered) - 1) * q / 100
    assert ordered[math.floor(position)] <= value <= ordered[math.ceil(position)]


@given(st.lists(finite, min_size=1, max_size=200), st.floats(0, 100), st.floats(0, 100))
def test_percentile_is_monotonic_in_q(data: list[float], a: float, b: float) -> None:
    low, high = sorted((a, b))
    assert percentile(data, low) <= percentile(data, high)


@given(st.lists(finite, min_size=1, max_size=100))
def test_summary_orders_min_median_max(data: list[float]) -> None:
    s = summarize(data)
    assert s.n == len(data)
    assert s.minimum == min(data)
    assert s.maximum == max(data)
    assert s.minimum <= s.median <= s.maximum
    assert s.as_dict() == {"n": s.n, "median": s.median, "min": s.minimum, "max": s.maximum}


def test_ratio_handles_missing_and_zero_reference() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(3.0, None) is None
    assert ratio(3.0, 0.0) is None


@given(st.lists(finite, min_size=1, max_size=2000), st.integers(min_value=2, max_value=50))
def test_cdf_points_are_thinned_sorted_and_end_at_one(data: list[float], max_points: int) -> None:
    xs, ys = cdf_points(data, max_points=max_points)
    assert len(xs) == len(ys) <= max(max_points, 1)
    assert xs == sorted(xs)
    assert ys == sorted(ys)
    assert xs[0] == min(data)
    assert xs[-1] == max(data)
    assert ys[-1] == 1.0
