"""The ``kcp://`` listener: one UDP socket, its datagram codec, the session router and the accept queue."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from typing import Any, Generic, TypeVar

import anyio
import structlog
from anyio.abc import Listener, SocketAttribute, TaskGroup

from vtunnel.arq.kcp_engine import KCPEngine
from vtunnel.arq.kcp_options import KCPOptions
from vtunnel.arq.kcp_wire import conv_of, is_new_session
from vtunnel.io.datagrams import Address, CoalescingSocket
from vtunnel.transports.kcp.codec import Datagram, ListenerCodec, Sealer, transmitter
from vtunnel.transports.kcp.link import KCPLink
from vtunnel.transports.kcp.routing import SessionRouter
from vtunnel.transports.link import Link

__all__ = ["KCPListener"]

log = structlog.get_logger("vtunnel.transports.kcp")

C = TypeVar("C", bound=ListenerCodec[Any])


class KCPListener(Listener[Link], Generic[C]):
    """Accepts KCP sessions on one UDP socket, its datagrams read by ``codec``; each accepted session is one
    :class:`KCPLink`.

    Closing the listener closes its socket, so every session it accepted fails too.
    """

    def __init__(self, sock: Any, options: KCPOptions, codec: C) -> None:
        self._options = options
        self._loop = asyncio.get_running_loop()
        self._pending: list[KCPLink] = []
        self._acceptor: asyncio.Future[None] | None = None
        self._closed = False
        self._codec = codec
        self._router: SessionRouter[Any, KCPLink] = SessionRouter(
            codec,
            opens=is_new_session,
            create=self._create_link,
            limit=options.sessions,
            tombstone=2.0 * options.timeout,
            clock=self._loop.time,
        )
        self._udp = CoalescingSocket(sock, self._router.on_runs)
        codec.attach(self._udp.sendto, sessions=options.sessions)

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
    def dropped(self) -> int:
        """Datagrams dropped unanswered: not KCP, not a known session's, or over the session limit."""
        return self._router.dropped

    @property
    def session_count(self) -> int:
        return len(self._router.sessions)

    @property
    def sessions(self) -> Mapping[Any, KCPLink]:
        """The live sessions by key (read-only): conv or source address (plain), connection ID (sealed)."""
        return self._router.sessions

    def _create_link(self, key: Any, first: Datagram, address: Address, seal: Sealer | None) -> KCPLink:
        """A new session's link, in the accept queue (its first datagram is fed by the router)."""
        options = self._options
        conv = conv_of(first)
        engine = KCPEngine(
            conv=conv, options=options, mtu=options.mtu - self._codec.overhead, now=self._loop.time()
        )
        udp = self._udp
        link = KCPLink(
            engine=engine,
            options=options,
            transmit=transmitter(udp.sendto_many, seal),
            local_address=udp.local_address,
            remote_address=address,
            on_close=lambda closed: self._forget(key, closed),
        )
        self._pending.append(link)
        log.debug("kcp session opened", conv=conv, peer=address, sessions=self.session_count + 1)
        fut = self._acceptor
        if fut is not None and not fut.done():
            fut.set_result(None)
        return link

    def _forget(self, key: Any, link: KCPLink) -> None:
        self._router.forget(key, link)
        if link in self._pending:
            self._pending.remove(link)

    # --- Listener -------------------------------------------------------------------------------------------

    async def accept(self) -> KCPLink:
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
        self._router.close("the listener was closed")
        self._pending.clear()
        self._udp.close()
        fut = self._acceptor
        if fut is not None and not fut.done():
            fut.set_result(None)
        await anyio.lowlevel.checkpoint()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return {SocketAttribute.local_address: lambda: self.local_address}
