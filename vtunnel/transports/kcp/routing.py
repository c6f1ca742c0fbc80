"""Session routing for a listener on one UDP socket, whatever its datagram codec.

:class:`SessionRouter` finds the session each datagram belongs to, creates one when a datagram may start it,
forgets one when it ends (a tombstone keeps its key from starting another at once), holds the session limit,
and moves a session to the address its codec says the peer is at now. The codec
(:class:`~vtunnel.transports.kcp.codec.ListenerCodec`) decides everything about the bytes; the router, written
once, is the same for plain and sealed datagrams, and for any ARQ whose link is a
:class:`~vtunnel.transports.kcp.codec.RoutedLink` (``rudp://`` reuses it).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from functools import partial
from types import MappingProxyType
from typing import Generic, TypeVar

import structlog

from vtunnel.io.datagrams import Address, Run, split_run
from vtunnel.transports.kcp.codec import Datagram, ListenerCodec, RoutedLink, Sealer

__all__ = ["SessionRouter"]

log = structlog.get_logger("vtunnel.transports.kcp")

K = TypeVar("K", bound=Hashable)
L = TypeVar("L", bound=RoutedLink)


class SessionRouter(Generic[K, L]):
    """The sessions of one listener by key, and the routing of its datagrams to them.

    ``opens`` tells whether a payload may be a session's first (the ARQ's rule); ``create`` makes the link of a
    new session (key, first payload, peer address, what seals its output). At most ``limit`` sessions live at
    once; a forgotten key cannot start a session again for ``tombstone`` seconds. ``clock`` is the loop's.
    """

    def __init__(
        self,
        codec: ListenerCodec[K],
        *,
        opens: Callable[[Datagram], bool],
        create: Callable[[K, Datagram, Address, Sealer | None], L],
        limit: int,
        tombstone: float,
        clock: Callable[[], float],
    ) -> None:
        self._codec = codec
        self._opens = opens
        self._create = create
        self._limit = limit
        self._tombstone = tombstone
        self._clock = clock
        self._links: dict[K, L] = {}
        self._tombstones: dict[K, float] = {}
        self._closed = False
        #: datagrams dropped unanswered: not the ARQ's, not a known session's, or over the session limit
        self.dropped = 0

    @property
    def sessions(self) -> Mapping[K, L]:
        """The live sessions by key (read-only)."""
        return MappingProxyType(self._links)

    def on_runs(self, runs: list[Run]) -> None:
        """Route what arrived: each live session's runs from its current address go to the codec as one batch;
        everything else, one datagram at a time. A batch is opened before any datagram that goes the
        one-at-a-time way, so nothing that arrived after a session's datagrams is handled before them."""
        codec, links = self._codec, self._links
        groups: dict[L, list[Datagram]] = {}
        batches: dict[L, tuple[K, Address, list[tuple[bytes, int]]]] = {}
        for buffer, segment, source in runs:
            key = codec.key_of(buffer, source)
            link = links.get(key) if key is not None else None
            if key is not None and link is not None and link.remote_address == source:
                batch = batches.get(link)
                if batch is None:
                    batches[link] = key, source, [(buffer, segment)]
                else:
                    batch[2].append((buffer, segment))
                continue
            if batches:
                self._open_batches(batches, groups)
            for datagram in split_run(buffer, segment):
                self._route(datagram, source, groups)
        if batches:
            self._open_batches(batches, groups)
        for link, payloads in groups.items():
            if payloads:
                link.feed(payloads)

    def _open_batches(
        self, batches: dict[L, tuple[K, Address, list[tuple[bytes, int]]]], groups: dict[L, list[Datagram]]
    ) -> None:
        """Have the codec open each session's batch, and empty ``batches``."""
        for link, (key, source, runs) in batches.items():
            group = groups.get(link)
            if group is None:
                group = groups[link] = []
            dropped = self._codec.open_run(
                key, link, runs, group, partial(self._route, source=source, groups=groups)
            )
            self.dropped += dropped  # (after the strays, which count their own)
        batches.clear()

    def _route(self, datagram: Datagram, source: Address, groups: dict[L, list[Datagram]]) -> None:
        """Open one datagram and add what it carries to its session's group (which it may start, or move)."""
        codec = self._codec
        now = self._clock()
        key = codec.key_of(datagram, source)
        if key is None:
            if not codec.stranger(datagram, source, now):
                self.dropped += 1
            return
        link = self._links.get(key)
        payload, address = codec.open(key, link, datagram, source, now)
        if link is not None and link.remote_address != address:
            log.info("kcp peer moved", session=key, old=link.remote_address, new=address)
            link.remote_address = address
        if payload is None:
            self.dropped += 1
            return
        if link is None:
            link = self._start(key, payload, address)
            if link is None:
                self.dropped += 1
                return
        group = groups.get(link)
        if group is None:
            groups[link] = [payload]
        else:
            group.append(payload)

    def _start(self, key: K, payload: Datagram, address: Address) -> L | None:
        """A new session for ``key``, if ``payload`` may start one and there is room."""
        if self._closed or not self._opens(payload):
            return None
        if self._tombstones:
            expiry = self._tombstones.get(key)
            if expiry is not None:
                if expiry > self._clock():
                    return None
                del self._tombstones[key]
        if len(self._links) >= self._limit:
            log.warning("kcp session limit reached; new session dropped", limit=self._limit)
            return None
        link = self._create(key, payload, address, self._codec.session_started(key))
        self._links[key] = link
        return link

    def forget(self, key: K, link: L) -> None:
        """Session ``key`` ended; its key is a tombstone for a while (at most ``4 * limit`` of them)."""
        if self._links.get(key) is link:
            del self._links[key]
        self._codec.forget(key)
        now = self._clock()
        tombstones, most = self._tombstones, 4 * self._limit
        if len(tombstones) >= most:
            self._tombstones = tombstones = {k: t for k, t in tombstones.items() if t > now}
        if len(tombstones) < most:
            tombstones[key] = now + self._tombstone

    def close(self, reason: str) -> None:
        """Fail every session with ``reason``, forget them all and start no more."""
        self._closed = True
        for link in list(self._links.values()):
            link.fail(reason)
        self._links.clear()
        self._codec.close()
