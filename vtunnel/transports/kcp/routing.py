"""A listener on one UDP socket, whatever its datagram codec and its ARQ: the session routing and the accept queue.

:class:`DatagramListener` finds the session each datagram belongs to, starts one when a datagram may start it,
forgets one when it ends (a tombstone keeps its key from starting another at once), holds the session limit,
and moves a session to the address its codec says the peer is at now. The codec
(:class:`~vtunnel.transports.kcp.codec.ListenerCodec`) decides everything about the bytes, the ARQ's links
(:class:`~vtunnel.transports.kcp.codec.RoutedLink`) vet their own datagrams: this is written once for plain and
sealed datagrams, and for any ARQ (``rudp://`` gives it its own ``new_link`` and ``opens``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from functools import partial
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import anyio
import structlog
from anyio.abc import Listener, SocketAttribute, TaskGroup

from vtunnel.io.datagrams import Address, CoalescingSocket, Run, split_run
from vtunnel.transports.kcp.codec import Datagram, ListenerCodec, RoutedLink, Runs, Transmit, transmitter
from vtunnel.transports.link import Link, ListenerAttribute

__all__ = ["DatagramListener", "NewLink"]

log = structlog.get_logger("vtunnel.transports.kcp")

C = TypeVar("C", bound=ListenerCodec[Any])
#: makes a new session's link: (first payload, peer address, its output, what it calls when it closes)
NewLink = Callable[[Datagram, Address, Transmit, Callable[[RoutedLink], None]], RoutedLink]


class DatagramListener(Listener[Link], Generic[C]):
    """Accepts sessions on one UDP socket whose datagrams ``codec`` reads; each accepted session is one link.

    ``opens`` tells whether a payload may be a session's first (the ARQ's rule); ``new_link`` makes its link. At
    most ``limit`` sessions live at once; a forgotten key cannot start a session again for ``tombstone`` seconds.
    Closing the listener closes its socket, so every session it accepted fails too.
    """

    def __init__(
        self,
        sock: Any,
        codec: C,
        *,
        limit: int,
        tombstone: float,
        opens: Callable[[Datagram], bool],
        new_link: NewLink,
    ) -> None:
        self._codec = codec
        self._limit = limit
        self._tombstone = tombstone
        self._opens = opens
        self._new_link = new_link
        self._loop = asyncio.get_running_loop()
        self._links: dict[Any, RoutedLink] = {}
        self._tombstones: dict[Any, float] = {}
        self._pending: list[RoutedLink] = []
        self._acceptor: asyncio.Future[None] | None = None
        self._closed = False
        self._accepting = True
        #: datagrams dropped unanswered: not the ARQ's, not a known session's, or over the session limit
        self.dropped = 0
        self._udp = CoalescingSocket(sock, self._on_runs)
        codec.attach(self._udp.sendto, sessions=limit)

    @property
    def codec(self) -> C:
        """How this listener reads its datagrams (plain or sealed: its own counters and tables are there)."""
        return self._codec

    @property
    def local_address(self) -> Address:
        return self._udp.local_address

    @property
    def datagrams_sent(self) -> int:
        """Datagrams this listener's socket handed to the kernel (all sessions)."""
        return self._udp.sent

    @property
    def session_count(self) -> int:
        return len(self._links)

    @property
    def sessions(self) -> Mapping[Any, RoutedLink]:
        """The live sessions by key (read-only): conv or source address (plain), connection ID (sealed)."""
        return MappingProxyType(self._links)

    # --- datagram path --------------------------------------------------------------------------------------

    def _on_runs(self, runs: list[Run]) -> None:
        """Route what arrived: each live session's runs from its current address go to the codec as one batch;
        everything else, one datagram at a time. A batch is opened before any datagram that goes the
        one-at-a-time way, so nothing that arrived after a session's datagrams is handled before them."""
        codec, links = self._codec, self._links
        groups: dict[RoutedLink, list[Datagram]] = {}
        routed = False
        if len(runs) == 1:  # (a message of an exchange, typically: its batch is opened without building one)
            buffer, segment, source = runs[0]
            key = codec.key_of(buffer, source)
            link = links.get(key) if key is not None else None
            if link is not None and link.remote_address == source:
                stray = partial(self._route, source=source, groups=groups)
                dropped = codec.open_run(key, link, [(buffer, segment)], groups.setdefault(link, []), stray)
                self.dropped += dropped  # (after the strays, which count their own)
                routed = True
        if not routed:
            batches: dict[RoutedLink, tuple[Any, Address, Runs]] = {}
            for buffer, segment, source in runs:
                key = codec.key_of(buffer, source)
                link = links.get(key) if key is not None else None
                if link is not None and link.remote_address == source:
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
        self,
        batches: dict[RoutedLink, tuple[Any, Address, Runs]],
        groups: dict[RoutedLink, list[Datagram]],
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

    def _route(self, datagram: Datagram, source: Address, groups: dict[RoutedLink, list[Datagram]]) -> None:
        """Open one datagram and add what it carries to its session's group (which it may start, or move)."""
        codec = self._codec
        now = self._loop.time()
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

    def _start(self, key: Any, payload: Datagram, address: Address) -> RoutedLink | None:
        """A new session for ``key`` in the table and the accept queue, if ``payload`` may start one and there is
        room."""
        if self._closed or not self._accepting or not self._opens(payload):
            return None
        if self._tombstones:
            expiry = self._tombstones.get(key)
            if expiry is not None:
                if expiry > self._loop.time():
                    return None
                del self._tombstones[key]
        if len(self._links) >= self._limit:
            log.warning("kcp session limit reached; new session dropped", limit=self._limit)
            return None
        transmit = transmitter(self._udp, self._codec.session_started(key, payload, address))
        link = self._new_link(payload, address, transmit, partial(self._forget, key))
        link.peer_user = self._codec.user_of(key)
        self._links[key] = link
        self._pending.append(link)
        fut = self._acceptor
        if fut is not None and not fut.done():
            fut.set_result(None)
        return link

    def _forget(self, key: Any, link: RoutedLink) -> None:
        """Session ``key`` ended; its key is a tombstone for a while (at most ``4 * limit`` of them)."""
        if self._links.get(key) is link:
            del self._links[key]
        if link in self._pending:
            self._pending.remove(link)
        self._codec.forget(key)
        now = self._loop.time()
        tombstones, most = self._tombstones, 4 * self._limit
        if len(tombstones) >= most:
            self._tombstones = tombstones = {k: t for k, t in tombstones.items() if t > now}
        if len(tombstones) < most:
            tombstones[key] = now + self._tombstone

    def stop_accepting(self) -> None:
        """Start no session any more (the codec answers no handshake); the live ones go on
        (:attr:`~vtunnel.transports.link.ListenerAttribute.stop_accepting`)."""
        self._accepting = False
        self._codec.attach(self._udp.sendto, sessions=0)

    # --- Listener -------------------------------------------------------------------------------------------

    async def accept(self) -> RoutedLink:
        """The next new session."""
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._pending:
                return self._pending.pop(0)
            if self._acceptor is not None:
                raise anyio.BusyResourceError("accepting")
            fut = self._loop.create_future()
            self._acceptor = fut
            try:
                await fut
            finally:
                self._acceptor = None

    async def serve(self, handler: Callable[[Link], Any], task_group: TaskGroup | None = None) -> None:
        async with AsyncExitStack() as stack:
            if task_group is None:
                task_group = await stack.enter_async_context(anyio.create_task_group())
            while True:
                try:
                    link = await self.accept()
                except anyio.ClosedResourceError:
                    if self._closed:
                        return  # closed by aclose(): serving ends quietly
                    raise
                task_group.start_soon(handler, link)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for link in list(self._links.values()):
            link.fail("the listener was closed")
        self._links.clear()
        self._pending.clear()
        self._codec.close()
        self._udp.close()
        fut = self._acceptor
        if fut is not None and not fut.done():
            fut.set_result(None)
        await anyio.lowlevel.checkpoint()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        refusals = self._codec.refusals
        attributes: dict[Any, Callable[[], Any]] = {
            SocketAttribute.local_address: lambda: self.local_address,
            ListenerAttribute.stop_accepting: lambda: self.stop_accepting,
        }
        if refusals is not None:
            attributes[ListenerAttribute.refusals] = lambda: refusals
        return attributes
