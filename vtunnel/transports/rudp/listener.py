"""The ``rudp://`` listener: a :class:`~vtunnel.transports.kcp.routing.DatagramListener` whose sessions are rudp
links."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import structlog

from vtunnel.arq.rudp.connection import Connection, Role
from vtunnel.arq.rudp.wire import Stream, WireError, decode_packet, peek_dcid
from vtunnel.io.datagrams import Address, forbid_fragmentation
from vtunnel.transports.kcp.codec import Datagram, ListenerCodec, RoutedLink, Transmit
from vtunnel.transports.kcp.routing import DatagramListener
from vtunnel.transports.rudp.link import RudpLink, clock
from vtunnel.transports.rudp.options import RudpOptions

__all__ = ["RudpListener", "opens_connection"]

log = structlog.get_logger("vtunnel.transports.rudp")

C = TypeVar("C", bound=ListenerCodec[Any])


def opens_connection(datagram: Datagram) -> bool:
    """Whether a packet may start a server connection: it carries the client's first stream bytes (offset 0;
    whatever packet number: a lost first packet is sent again under a new one)."""
    try:
        packet = decode_packet(datagram)
    except WireError:
        return False
    return any(isinstance(frame, Stream) and frame.offset == 0 for frame in packet.frames)


class RudpListener(DatagramListener[C]):
    """Accepts rudp connections on one UDP socket, its datagrams read by ``codec``; each accepted connection is
    one :class:`RudpLink`, started by a packet carrying the start of the client's stream."""

    def __init__(self, sock: Any, options: RudpOptions, codec: C) -> None:
        self._options = options
        self._config = options.packet_config(codec.overhead, family=sock.family)
        if self._config.path_mtu_discovery:
            forbid_fragmentation(sock)
        super().__init__(
            sock,
            codec,
            limit=options.sessions,
            tombstone=2.0 * options.timeout,
            opens=opens_connection,
            new_link=self._new_link,
        )

    def _new_link(
        self, first: Datagram, address: Address, transmit: Transmit, on_close: Callable[[RoutedLink], None]
    ) -> RudpLink:
        now = clock()
        validated = self.codec.validates_paths
        connection = Connection(
            role=Role.SERVER,
            local_cid=peek_dcid(first),  # keyless: the ID its client chose for it; sealed: none
            peer_cid=b"",
            config=self._config,
            now=now,
            address_validated=validated,
        )
        log.debug("rudp connection opened", peer=address, sessions=self.session_count + 1)
        return RudpLink(
            connection=connection,
            timeout=self._options.timeout,
            transmit=transmit,
            local_address=self.local_address,
            remote_address=address,
            on_close=on_close,
            validate_on_ack=not validated,
        )
