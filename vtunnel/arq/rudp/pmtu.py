"""Packetization-layer path MTU discovery for rudp (RFC 8899's DPLPMTUD, as QUIC does it: RFC 9000 section 14.3).

rudp starts with packets of the configured size (the *base*, which every path is assumed to carry) and, once the
connection has something to send, tries larger ones: a *probe* is a packet of exactly the size tried, a PING
padded out, sent with the IP don't-fragment bit (the transport sets it), so a path that cannot carry it drops it
instead of cutting it into fragments. An acknowledged probe proves the size: later packets are that large. A
size whose probe is lost :data:`MAX_PROBES` times in a row is taken for too large, and the search ends at the
largest size proven; it starts again after :data:`RAISE_INTERVAL`, in case the path changed. Probes carry no data,
so a lost one costs no retransmission, and the congestion controller never hears of them (the loss of a packet
too large for the path says nothing of congestion).

The sizes tried are the caller's (``candidates``, ascending): the transport derives them from the links' common
MTUs (1500, 9000, loopback's 65536), less the IP and UDP headers and a sealing layer's overhead, so a search
costs a handful of probes and no bisection.

A path whose MTU shrinks below the size in use (a route change, a tunnel added on the way) drops every full
packet, while small ones (ACKs) still get through: a *black hole*. It shows as loss events in which only
packets larger than the floor were lost, with no such packet acknowledged in between: after
:data:`BLACK_HOLE_EVENTS` of them, spread over at least the span the caller names (three probe timeouts: a
queue that overflowed drops a run of full packets too, but full packets sent after the run are acknowledged
within a round trip), packets fall back to the floor (``min(base, 1200)``, the size QUIC requires of
every path) and the search climbs again from there. Probe timeouts count as such events too (the packets then
unacknowledged all large): so a path that cannot carry even the base, where nothing is ever acknowledged,
still gets a connection, at the floor, after three of them.

Sans-IO like the rest of the layer: sizes, events and ``now`` in; the size to use, and the probe to send, out.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Final

__all__ = ["BLACK_HOLE_EVENTS", "MAX_PROBES", "QUIC_MIN_SIZE", "RAISE_INTERVAL", "PathMtu", "SearchState"]

#: probes of one size lost in a row before the size is taken for too large (RFC 8899's MAX_PROBES)
MAX_PROBES: Final = 3
#: seconds after a search ended before it is tried again (RFC 8899's PMTU_RAISE_TIMER)
RAISE_INTERVAL: Final = 600.0
#: loss events of only large packets, with none acknowledged in between, that make a black hole
BLACK_HOLE_EVENTS: Final = 3
#: the smallest UDP payload every QUIC path must carry: the floor a black hole falls back to
QUIC_MIN_SIZE: Final = 1200


class SearchState(enum.Enum):
    SEARCHING = "searching"  # a larger size is still to be tried
    DONE = "done"  # the largest size that works is known, until the raise timer


class PathMtu:
    """The packet size a connection uses now, and the search for a larger one.

    ``base``: the first size; ``candidates``: larger sizes to try, in any order (those not above ``base`` are
    ignored); ``now``: the search may start at once. With no candidates the size stays ``base`` (except that a
    black hole still lowers it to the floor, and the search then climbs back to ``base``).
    """

    __slots__ = (
        "_candidates",
        "_failed",
        "_lost_in_row",
        "_next_search",
        "_suspect_since",
        "base",
        "floor",
        "probe_size",
        "size",
        "state",
        "suspicious",
    )

    def __init__(self, *, base: int, candidates: Sequence[int] = (), now: float) -> None:
        self.base = base
        self.floor = min(base, QUIC_MIN_SIZE)
        #: every size this path may be tried at, ascending (the base among them, for a climb after a black hole)
        self._candidates = sorted({size for size in candidates if size > base} | {base})
        #: the packet size in use: proven by an acknowledged packet (or the base, assumed)
        self.size = base
        #: the size of the probe in flight (0: none)
        self.probe_size = 0
        self._lost_in_row = 0
        #: the smallest size found too large (0: none): the search does not go there until the raise timer
        self._failed = 0
        #: loss events of only large packets since a large one was acknowledged (towards a black hole)
        self.suspicious = 0
        #: when the first of them was
        self._suspect_since = now
        self.state = SearchState.SEARCHING
        self._next_search = now
        self._settle(now)

    def _next_candidate(self) -> int:
        """The next size to try (0: none left)."""
        for size in self._candidates:
            if size > self.size and (not self._failed or size < self._failed):
                return size
        return 0

    def _settle(self, now: float) -> None:
        if self.state is SearchState.SEARCHING and not self._next_candidate():
            self.state = SearchState.DONE
            self._next_search = now + RAISE_INTERVAL

    @property
    def searching(self) -> bool:
        return self.state is SearchState.SEARCHING

    def probe_due(self, now: float) -> int:
        """The size of the probe to send now (0: none): while searching, one probe in flight at a time. After
        the raise timer, a search that had ended starts again (from the size in use, the failed size allowed
        again)."""
        if self.probe_size:
            return 0
        if self.state is SearchState.DONE:
            if now < self._next_search:
                return 0
            self.state = SearchState.SEARCHING
            self._failed = 0
            self._lost_in_row = 0
            self._settle(now)
            if self.state is SearchState.DONE:
                return 0
        return self._next_candidate()

    def next_search(self) -> float | None:
        """When :meth:`probe_due` may say more than now (None: while a search runs, any time)."""
        return self._next_search if self.state is SearchState.DONE else None

    def on_probe_sent(self, size: int) -> None:
        self.probe_size = size

    def on_probe_acked(self, now: float) -> int:
        """The probe in flight arrived: its size is the path's from now on (returned)."""
        size = self.probe_size
        self.probe_size = 0
        if size > self.size:
            self.size = size
        self._lost_in_row = 0
        self.suspicious = 0
        self._settle(now)
        return self.size

    def on_probe_lost(self, now: float) -> None:
        """The probe in flight was declared lost."""
        size = self.probe_size
        self.probe_size = 0
        if not size:
            return
        self._lost_in_row += 1
        if self._lost_in_row >= MAX_PROBES:
            self._lost_in_row = 0
            self._failed = size
            self._settle(now)

    def on_acked(self, largest_size: int) -> None:
        """Packets were acknowledged, the largest of them ``largest_size`` bytes (probes are told apart)."""
        if largest_size > self.floor:
            self.suspicious = 0

    def on_lost(self, smallest_size: int, now: float, span: float) -> bool:
        """A loss event (packets declared lost together, probes apart; or a probe timeout, with the packets it
        found unacknowledged), the smallest of them ``smallest_size`` bytes; returns whether the size in use
        just fell back to the floor (a black hole: the events since a large packet was last acknowledged number
        :data:`BLACK_HOLE_EVENTS` and span at least ``span`` seconds)."""
        if self.size <= self.floor or smallest_size <= self.floor:
            return False  # a small packet was lost too: the path, not its MTU
        if not self.suspicious:
            self._suspect_since = now
        self.suspicious += 1
        if self.suspicious < BLACK_HOLE_EVENTS or now - self._suspect_since < span:
            return False
        self.suspicious = 0
        self._failed = 0  # the climb back tries every size again (a lost probe costs no data)
        self.size = self.floor
        self.probe_size = 0
        self._lost_in_row = 0
        self.state = SearchState.SEARCHING
        self._settle(now)
        return True
