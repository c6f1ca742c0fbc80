"""Summary statistics for raw samples: percentiles, medians, ranges and ratios.

Percentiles use linear interpolation between closest ranks (the method NumPy calls ``linear``), so p50 of an
even count is the mean of the two middle samples and p0/p100 are the minimum and maximum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Summary", "cdf_points", "median", "percentile", "ratio", "summarize"]


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 <= q <= 100) of ``samples`` by linear interpolation of closest ranks."""
    if not samples:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0 or math.isnan(q):
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def median(samples: Sequence[float]) -> float:
    return percentile(samples, 50.0)


@dataclass(frozen=True, kw_only=True, slots=True)
class Summary:
    """Median and range of one metric over the rounds of a run."""

    n: int
    median: float
    minimum: float
    maximum: float

    def as_dict(self) -> dict[str, float | int]:
        return {"n": self.n, "median": self.median, "min": self.minimum, "max": self.maximum}


def summarize(samples: Iterable[float]) -> Summary:
    values = [float(v) for v in samples]
    if not values:
        raise ValueError("cannot summarize an empty sample")
    return Summary(n=len(values), median=median(values), minimum=min(values), maximum=max(values))


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or ``None`` when either is missing or the reference is zero."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def cdf_points(samples: Sequence[float], *, max_points: int = 400) -> tuple[list[float], list[float]]:
    """Points (x, F(x)) of the empirical CDF, thinned to at most ``max_points`` (keeps both ends)."""
    if max_points < 2:
        raise ValueError("max_points must be at least 2")
    ordered = sorted(samples)
    n = len(ordered)
    if n == 0:
        return [], []
    if n <= max_points:
        indexes = list(range(n))
    else:
        step = (n - 1) / (max_points - 1)
        indexes = sorted({round(i * step) for i in range(max_points)})
    return [ordered[i] for i in indexes], [(i + 1) / n for i in indexes]
