"""Which bytes of a KCP session's outgoing datagrams are bodies of lite-tls PASSTHROUGH frames: the clear runs of
sealed datagram v4 (docs/security.md, "lite-tls passthrough records").

The sender's link gives :meth:`ClearRunTracker.sent` every byte it hands to KCP, which is a stream of tunnel
frames: the tracker follows their 9-byte headers and keeps, in stream offsets, the range of each PASSTHROUGH
DATA frame's TLS record body (its payload after the 5-byte TLS record header, which stays sealed).

ikcp in stream mode cuts that byte stream into segments of consecutive sequence numbers, so a segment's stream
offset is the sum of the lengths of the segments before it; and it emits every new segment in sequence order
before any retransmission of it. :meth:`ClearRunTracker.runs` therefore reads each outgoing datagram's segment
headers, gives a new segment (the next sequence number) the next offset, finds a retransmitted one's among the
last ``window`` segments, and answers the datagram's ranges that are passthrough body bytes, in datagram
offsets. A segment it cannot place (older than the window it remembers) gets no runs, and a sequence number
beyond the next one (which ikcp never emits) turns the tracker off for good: a datagram without runs is sealed
whole, so a wrong guess can only cost CPU, never put a byte in the clear that is not a passthrough body.

Short runs stay sealed: a run costs 4 bytes of run table, and one under :data:`MIN_RUN` bytes saves less in
the cipher than it adds in Python; at most ``max_runs`` (the longest) go clear per datagram, as many as the
room the link keeps for the table holds. With ``fixed_table`` a datagram that has runs gets exactly ``max_runs``
entries, the missing ones empty runs at its end, so that all full datagrams with runs have one size: the sockets
send and receive runs of equal-size datagrams in one system call (UDP GSO and GRO), which datagrams of two or
three sizes in turn would break up.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections import deque
from functools import lru_cache
from typing import Final

from vtunnel.protocol.frames import FRAME_HEADER_SIZE, PASSTHROUGH, FrameType

__all__ = ["MAX_RUNS", "MIN_RUN", "ClearRunTracker"]

#: the shortest run that goes in the clear
MIN_RUN: Final = 64
#: the most runs one datagram carries by default: a full segment holds the end of one TLS record's body and the
#: start of the next
MAX_RUNS: Final = 2
_TLS_HEADER: Final = 5
_DATA: Final = int(FrameType.DATA)
_SEGMENT: Final = struct.Struct("<4xB7xIII")  # cmd, sn, una, len (conv, frg, wnd, ts skipped)
_SEGMENT_HEADER: Final = 24
_PUSH: Final = 81
_MASK32: Final = 0xFFFFFFFF
#: bodies behind the cursor before the ones no remembered segment reaches are dropped
_PRUNE_AT: Final = 4096


@lru_cache(maxsize=128)
def _lengths(count: int) -> struct.Struct:
    """The data lengths of ``count`` back-to-back segment headers."""
    return struct.Struct("<" + "20xI" * count)


class ClearRunTracker:
    """The passthrough bodies of one KCP session's outgoing byte stream, and each outgoing datagram's share of
    them (see the module's description). ``window``: how many of the newest segments' offsets are remembered
    (at least the session's send window, the most segments ikcp has in flight)."""

    __slots__ = (
        "_cursor",
        "_ends",
        "_fixed_table",
        "_head",
        "_max_runs",
        "_min_run",
        "_next_offset",
        "_next_sn",
        "_offset",
        "_offsets",
        "_skip",
        "_starts",
        "broken",
    )

    def __init__(
        self, *, window: int, min_run: int = MIN_RUN, max_runs: int = MAX_RUNS, fixed_table: bool = False
    ) -> None:
        self._min_run = max(1, min_run)
        self._max_runs = max_runs
        self._fixed_table = fixed_table
        self._offset = 0  # stream bytes given to sent()
        self._skip = 0  # bytes of the current frame still to come after the last call
        self._head = b""  # the first bytes of a frame header cut by the last call
        # passthrough bodies [start, end), in stream order; those before the cursor end before the newest segment
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._cursor = 0
        self._next_sn = 0
        self._next_offset = 0
        self._offsets: deque[int] = deque(
            maxlen=max(1, window)
        )  # offsets of segments next_sn - len .. next_sn - 1
        #: a segment came out of order (not ikcp's behaviour): no runs from now on
        self.broken = False

    def sent(self, data: bytes | memoryview) -> None:
        """``data`` was handed to KCP, after everything before."""
        view = memoryview(data)
        size = len(view)
        base = self._offset
        self._offset = base + size
        pos = self._skip
        if self._head:
            need = FRAME_HEADER_SIZE - len(self._head)
            if size < need:
                self._head += bytes(view)
                return
            pos = need + self._frame(self._head + bytes(view[:need]), base + need)
            self._head = b""
        while pos + FRAME_HEADER_SIZE <= size:
            pos += FRAME_HEADER_SIZE + self._frame(
                view[pos : pos + FRAME_HEADER_SIZE], base + pos + FRAME_HEADER_SIZE
            )
        if pos >= size:
            self._skip = pos - size
        else:
            self._skip = 0
            self._head = bytes(view[pos:])

    def _frame(self, header: bytes | memoryview, payload_at: int) -> int:
        """Note the frame whose ``header`` this is (its payload at stream offset ``payload_at``); its length."""
        length = (header[0] << 16) | (header[1] << 8) | header[2]
        if header[3] == _DATA and header[4] == PASSTHROUGH and length - _TLS_HEADER >= self._min_run:
            self._starts.append(payload_at + _TLS_HEADER)
            self._ends.append(payload_at + length)
        return length

    def runs(self, datagram: bytes | memoryview) -> list[tuple[int, int]]:
        """The ``(offset, length)`` ranges of ``datagram`` (one KCP output datagram, in the order ikcp emitted
        them) that are passthrough body bytes, ordered; ``[]`` for none."""
        found: list[tuple[int, int]] = []
        size = len(datagram)
        if size % _SEGMENT_HEADER == 0 and not any(_lengths(size // _SEGMENT_HEADER).unpack_from(datagram)):
            return found  # data-less segments only (ACKs, window probes): nothing to place
        unpack = _SEGMENT.unpack_from
        starts, ends = self._starts, self._ends
        count = len(ends)
        pos = 0
        while pos + _SEGMENT_HEADER <= size:
            cmd, sn, _una, length = unpack(datagram, pos)
            data_at = pos + _SEGMENT_HEADER
            pos = data_at + length
            if cmd != _PUSH or not length or self.broken:
                continue
            if (
                sn == self._next_sn
            ):  # a new segment: the next offset; the bodies before it are behind the cursor
                offset = self._next_offset
                self._offsets.append(offset)
                self._next_sn = (sn + 1) & _MASK32
                self._next_offset = offset + length
                i = self._cursor
                while i < count and ends[i] <= offset:
                    i += 1
                self._cursor = i
            else:  # a retransmission, or a sequence number ikcp would never emit
                back = (self._next_sn - sn) & _MASK32
                offsets = self._offsets
                if back > len(offsets):
                    if back > _MASK32 // 2:  # ahead of the next one: the order ikcp keeps did not hold
                        self.broken = True
                    continue
                offset = offsets[-back]
                i = bisect_right(ends, offset)
            end = offset + length
            while i < count and starts[i] < end:
                lo = starts[i] if starts[i] > offset else offset
                hi = ends[i] if ends[i] < end else end
                if hi - lo >= self._min_run:
                    found.append((data_at + lo - offset, hi - lo))
                i += 1
        if self._cursor > _PRUNE_AT:
            self._prune()
        if len(found) > self._max_runs:
            found = sorted(sorted(found, key=lambda run: run[1], reverse=True)[: self._max_runs])
        elif found and self._fixed_table and len(found) < self._max_runs:
            # empty runs at the end: every datagram with runs has a table of max_runs entries, so the full ones
            # are all of one size (a run of equal sizes is one system call: UDP GSO and GRO)
            found += [(size, 0)] * (self._max_runs - len(found))
        return found

    def _prune(self) -> None:
        """Forget the bodies that end before the oldest remembered segment (no datagram can carry them again)."""
        gone = bisect_right(self._ends, self._offsets[0], 0, self._cursor)
        del self._ends[:gone]
        del self._starts[:gone]
        self._cursor -= gone
