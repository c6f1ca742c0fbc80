"""What an agent or a server counts for its metrics (``--metrics``): kept here, read by :mod:`vtunnel.apps.metrics`.

:class:`ProcessStats` keeps the list of live tunnels, folds the counters of each tunnel that ends into
per-transport totals (so a counter never goes back), counts the streams opened by kind, and knows the listeners
and dialers whose refusals the collector reads when Prometheus scrapes. Nothing here runs per byte.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from anyio.abc import Listener

from vtunnel.apps.dialer import Dialer
from vtunnel.runtime.connection import TunnelConnection
from vtunnel.runtime.session import TunnelPool
from vtunnel.transports.base import LinkStats, ListenerAttribute, Refusals

__all__ = ["NO_KIND", "ProcessStats", "TransportTotals"]

#: the kind label of a stream whose SYN names nothing (sent to the server's --target, or WebSocks inside it)
NO_KIND = "none"


@dataclass(slots=True)
class TransportTotals:
    """Counters of the tunnels of one transport that have ended."""

    bytes_in: int = 0
    bytes_out: int = 0
    retransmitted_packets: int = 0
    retransmitted_bytes: int = 0
    lost_packets: int = 0

    def add(self, conn: TunnelConnection) -> LinkStats:
        """Add ``conn``'s counters; its link's stats, for what else is wanted of them."""
        self.bytes_in += conn.bytes_in
        self.bytes_out += conn.bytes_out
        stats = conn.link.stats()
        self.retransmitted_packets += stats.retransmitted_packets or 0
        self.retransmitted_bytes += stats.retransmitted_bytes or 0
        self.lost_packets += stats.lost_packets or 0
        return stats


@dataclass(slots=True)
class _AfterEnd:
    """An ended tunnel whose spliced lite-tls streams still relay, and its byte counters as last added."""

    conn: TunnelConnection
    transport: str
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True, slots=True)
class _Live:
    transport: str
    serial: int


class ProcessStats:
    """What an agent or a server keeps for its metrics: its live tunnels, the totals of ended ones, streams
    opened by kind, and the listeners and dialers whose refusals are read at scrape time.

    It is the :class:`~vtunnel.runtime.session.TunnelWatch` of the agent's pool and of the server.
    """

    def __init__(self) -> None:
        self._live: dict[TunnelConnection, _Live] = {}
        self._serial = itertools.count(1)
        self._ended: dict[str, TransportTotals] = {}
        self._after_end: list[_AfterEnd] = []
        self.tunnels_opened: Counter[str] = Counter()
        self.streams_opened: Counter[str] = Counter()
        self._listeners: list[tuple[str, Listener[Any]]] = []
        self._dialers: list[Dialer] = []
        self._pool: TunnelPool | None = None

    # --- told by the agent and the server -------------------------------------------------------------------

    def tunnel_started(self, conn: TunnelConnection, transport: str) -> None:
        self._live[conn] = _Live(transport, next(self._serial))
        self.tunnels_opened[transport] += 1
        self._ended.setdefault(transport, TransportTotals())

    def tunnel_ended(self, conn: TunnelConnection) -> None:
        live = self._live.pop(conn, None)
        if live is None:
            return
        self._ended[live.transport].add(conn)
        if conn.spliced_relays:  # its spliced streams go on counting: what they count later is added too
            self._after_end.append(_AfterEnd(conn, live.transport, conn.bytes_in, conn.bytes_out))
        self._fold_after_end()

    def _fold_after_end(self) -> None:
        """Add what ended tunnels' spliced streams counted since the last call; forget a tunnel once none of
        its kernel relays runs any more (their last bytes were counted before they ended)."""
        still: list[_AfterEnd] = []
        for late in self._after_end:
            conn, totals = late.conn, self._ended[late.transport]
            totals.bytes_in += conn.bytes_in - late.bytes_in
            totals.bytes_out += conn.bytes_out - late.bytes_out
            late.bytes_in, late.bytes_out = conn.bytes_in, conn.bytes_out
            if conn.spliced_relays:
                still.append(late)
        self._after_end = still

    def stream_opened(self, kind: str | None) -> None:
        self.streams_opened[kind or NO_KIND] += 1

    def watch_listener(self, transport: str, listener: Listener[Any]) -> None:
        """Read ``listener``'s refusals (if it counts them) at each scrape, labelled ``transport``."""
        self._listeners.append((transport, listener))

    def watch_dialer(self, dialer: Dialer) -> None:
        """Read ``dialer``'s failures (by reason) at each scrape."""
        self._dialers.append(dialer)

    def watch_pool(self, pool: TunnelPool) -> None:
        """Read the agent's servers (their tunnels, whether they answer, their failures) at each scrape."""
        self._pool = pool

    # --- read by the collector --------------------------------------------------------------------------------

    @property
    def live(self) -> Iterable[tuple[TunnelConnection, str, int]]:
        """Each live tunnel with its transport and its serial number in this process."""
        return [(conn, live.transport, live.serial) for conn, live in self._live.items()]

    def ended(self, transport: str) -> TransportTotals:
        """The totals of ``transport``'s ended tunnels, with what their spliced streams counted since."""
        self._fold_after_end()
        return self._ended.get(transport, TransportTotals())

    @property
    def transports(self) -> set[str]:
        return set(self._ended) | {transport for transport, _ in self._listeners}

    def refusals(self) -> Iterator[tuple[str, Refusals]]:
        for transport, listener in self._listeners:
            found = listener.extra(ListenerAttribute.refusals, None)
            if found is not None:
                yield transport, found

    def servers(self) -> Iterator[tuple[int, str, bool, int, int]]:
        """The agent's servers: position in its list, transport, whether it answers, tunnels held to it now, and
        its failures so far (none for a server process)."""
        pool = self._pool
        if pool is None:
            return
        for server in pool.servers:
            yield (
                server.index,
                server.endpoint.scheme,
                bool(server.answered),
                pool.tunnels_to(server),
                server.failures_total,
            )

    def dial_failures(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for dialer in self._dialers:
            total.update(dialer.failures)
        return total
