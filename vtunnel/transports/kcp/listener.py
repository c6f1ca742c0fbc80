"""The ``kcp://`` listener: a :class:`~vtunnel.transports.kcp.routing.DatagramListener` whose sessions are KCP
links."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import structlog

from vtunnel.arq.kcp_engine import KCPEngine
from vtunnel.arq.kcp_options import KCPOptions
from vtunnel.arq.kcp_wire import conv_of, is_new_session
from vtunnel.io.datagrams import Address
from vtunnel.transports.kcp.codec import Datagram, ListenerCodec, RoutedLink, Transmit
from vtunnel.transports.kcp.link import KCPLink
from vtunnel.transports.kcp.routing import DatagramListener

__all__ = ["KCPListener"]

log = structlog.get_logger("vtunnel.transports.kcp")

C = TypeVar("C", bound=ListenerCodec[Any])


class KCPListener(DatagramListener[C]):
    """Accepts KCP sessions on one UDP socket, its datagrams read by ``codec``; each accepted session is one
    :class:`KCPLink`, started by a PUSH of sequence number 0."""

    def __init__(self, sock: Any, options: KCPOptions, codec: C) -> None:
        self._options = options
        super().__init__(
            sock,
            codec,
            limit=options.sessions,
            tombstone=2.0 * options.timeout,
            opens=is_new_session,
            new_link=self._new_link,
        )

    def _new_link(
        self, first: Datagram, address: Address, transmit: Transmit, on_close: Callable[[RoutedLink], None]
    ) -> KCPLink:
        options, conv = self._options, conv_of(first)
        now = asyncio.get_running_loop().time()
        engine = KCPEngine(conv=conv, options=options, mtu=options.mtu - self.codec.overhead, now=now)
        log.debug("kcp session opened", conv=conv, peer=address, sessions=self.session_count + 1)
        return KCPLink(
            engine=engine,
            options=options,
            transmit=transmit,
            local_address=self.local_address,
            remote_address=address,
            on_close=on_close,
        )
