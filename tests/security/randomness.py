"""Pearson's chi-squared test of uniform byte values, shared by the tests of what a passive observer sees.

For a set of samples (wire units: records, handshake messages, datagrams), the bytes at the offsets tested in
the first ``PREFIX`` (64) bytes are checked over all those offsets together and at each offset on its own
(Bonferroni-corrected), at the significance level ``ALPHA`` (255 degrees of freedom). Every random byte of the
samples comes from one seeded generator (:func:`seeded`, given to the sans-IO classes as ``entropy``), so each
statistic is a fixed number and a test built on this is deterministic: it cannot flake.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Container, Sequence
from statistics import NormalDist

SEED = 20_240_611
UNITS = 10_000
PREFIX = 64
ALPHA = 1e-3
#: The fewest bytes an offset needs to be tested on its own (20 expected per value).
MIN_BYTES = 20 * 256


def critical_value(df: int, alpha: float) -> float:
    """The chi-squared quantile of ``1 - alpha`` (Wilson and Hilferty's approximation: within 0.1% at 255 df)."""
    z = NormalDist().inv_cdf(1.0 - alpha)
    h = 2.0 / (9.0 * df)
    return float(df * (1.0 - h + z * h**0.5) ** 3)


def chi_squared(data: bytes) -> float:
    counts = Counter(data)
    expected = len(data) / 256
    return sum((counts.get(b, 0) - expected) ** 2 for b in range(256)) / expected


def failures(samples: Sequence[bytes], *, skip: Container[int] = (), prefix: int = PREFIX) -> list[str]:
    """Where the first ``prefix`` bytes of ``samples``, but for the offsets in ``skip``, are not uniform at
    ``ALPHA``: empty if nowhere. A sample shorter than ``prefix`` counts at the offsets it has."""
    offsets = [i for i in range(prefix) if i not in skip]
    columns = [bytes(s[i] for s in samples if len(s) > i) for i in offsets]
    found = []
    stat = chi_squared(b"".join(columns))
    limit = critical_value(255, ALPHA)
    if stat > limit:
        found.append(f"all offsets: chi2 = {stat:.1f} > {limit:.1f}")
    limit = critical_value(255, ALPHA / len(offsets))
    for offset, column in zip(offsets, columns, strict=True):
        assert len(column) >= MIN_BYTES, f"offset {offset}: too few samples reach it"
        stat = chi_squared(column)
        if stat > limit:
            found.append(f"offset {offset}: chi2 = {stat:.1f} > {limit:.1f}")
    return found


def seeded(seed: int = SEED) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes
