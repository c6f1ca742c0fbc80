"""A set of integers kept as sorted, disjoint, half-open ``[start, end)`` intervals.

One structure for the three places rudp needs it: the packet numbers a receiver has seen (its ACK ranges), the
stream bytes a sender has had acknowledged, and the stream bytes a receiver holds beyond the in-order point.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator

__all__ = ["RangeSet"]


class RangeSet:
    """Sorted disjoint intervals; adjacent ones are merged."""

    __slots__ = ("_ends", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._starts, self._ends, strict=True)

    def __repr__(self) -> str:
        return f"RangeSet({list(self)})"

    def reversed(self) -> Iterator[tuple[int, int]]:
        return zip(reversed(self._starts), reversed(self._ends), strict=True)

    def descending(self, floor: int, most: int) -> list[tuple[int, int]]:
        """The intervals above ``floor`` as inclusive ``(first, last)`` pairs, highest first, the lowest cut at
        ``floor``, at most ``most`` of them (what an ACK reports)."""
        starts, ends = self._starts, self._ends
        i = len(starts) - 1
        out: list[tuple[int, int]] = []
        while i >= 0 and len(out) < most:
            end = ends[i]
            if end <= floor:
                break
            start = starts[i]
            if start <= floor:
                out.append((floor, end - 1))
                break
            out.append((start, end - 1))
            i -= 1
        return out

    def start_of(self, value: int) -> int:
        """The start of the interval holding ``value``, -1 when none does (the last one is looked at first)."""
        starts = self._starts
        if not starts:
            return -1
        start = starts[-1]
        if start <= value:
            return start if value < self._ends[-1] else -1
        i = bisect_right(starts, value) - 1
        return starts[i] if i >= 0 and value < self._ends[i] else -1

    @property
    def first(self) -> tuple[int, int]:
        return self._starts[0], self._ends[0]

    @property
    def last(self) -> tuple[int, int]:
        return self._starts[-1], self._ends[-1]

    def add(self, start: int, end: int) -> int:
        """Add ``[start, end)``; returns how many of its integers were not in the set before."""
        if end <= start:
            return 0
        starts, ends = self._starts, self._ends
        if ends and start >= starts[-1]:
            # at or after the last interval: the usual case (the next packet number, the next stream bytes)
            last_end = ends[-1]
            if start > last_end:
                starts.append(start)
                ends.append(end)
                return end - start
            if end > last_end:
                ends[-1] = end
                return end - last_end
            return 0
        # the intervals that touch or overlap [start, end): those with end >= start and start <= end
        lo = bisect_left(ends, start)
        hi = bisect_right(starts, end)
        if lo == hi:
            starts.insert(lo, start)
            ends.insert(lo, end)
            return end - start
        covered = 0
        for i in range(lo, hi):
            covered += min(ends[i], end) - max(starts[i], start) if ends[i] > start and starts[i] < end else 0
        new_start = min(start, starts[lo])
        new_end = max(end, ends[hi - 1])
        starts[lo:hi] = [new_start]
        ends[lo:hi] = [new_end]
        return end - start - covered

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int):
            return False
        i = bisect_right(self._starts, value) - 1
        return i >= 0 and value < self._ends[i]

    def covers(self, start: int, end: int) -> bool:
        """Whether every integer of ``[start, end)`` is in the set."""
        if end <= start:
            return True
        i = bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` not in the set, in order."""
        out: list[tuple[int, int]] = []
        starts, ends = self._starts, self._ends
        i = max(0, bisect_right(starts, start) - 1)
        position = start
        while position < end and i < len(starts):
            if ends[i] <= position:
                i += 1
                continue
            if starts[i] >= end:
                break
            if starts[i] > position:
                out.append((position, starts[i]))
            position = max(position, ends[i])
            i += 1
        if position < end:
            out.append((position, end))
        return out

    def remove_below(self, value: int) -> None:
        """Forget every integer below ``value``."""
        starts, ends = self._starts, self._ends
        i = bisect_right(ends, value)
        del starts[:i]
        del ends[:i]
        if starts and starts[0] < value:
            starts[0] = value

    def pop_first(self) -> tuple[int, int]:
        return self._starts.pop(0), self._ends.pop(0)
