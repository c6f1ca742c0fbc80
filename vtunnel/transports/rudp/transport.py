"""``rudp://``, the transport the registry names: one listener or one client, keyless (rudp's own connection ID
keys sessions: :mod:`.plain`) or, when a key is configured, sealed by the same codec as ``kcp://``
(:mod:`vtunnel.transports.kcp.sealed`); all but the rudp connection is ``kcp://``'s
(:class:`~vtunnel.transports.kcp.transport.DatagramTransport`, :mod:`vtunnel.transports.kcp.client`)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final

from anyio.abc import Listener

from vtunnel.arq.rudp.connection import Connection, Role
from vtunnel.io.datagrams import Address
from vtunnel.transports.kcp.client import open_client
from vtunnel.transports.kcp.codec import ClientCodec, ListenerCodec, RoutedLink, Transmit
from vtunnel.transports.kcp.transport import DatagramTransport
from vtunnel.transports.link import Link
from vtunnel.transports.rudp.link import RudpLink, clock
from vtunnel.transports.rudp.listener import RudpListener
from vtunnel.transports.rudp.options import RudpOptions, parse_options
from vtunnel.transports.rudp.plain import rudp_plain_codec

__all__ = ["RudpTransport"]

#: the length of the server's connection ID a keyless client chooses
SERVER_CID_LEN: Final = 8


class RudpTransport(DatagramTransport[RudpOptions]):
    """``rudp://host:port?cc=bbr&mtu=1350`` (see ``docs/transports.md``)."""

    schemes: ClassVar[tuple[str, ...]] = ("rudp",)
    description: ClassVar[str] = (
        "rudp, vtunnel's own reliable UDP (SACK, RFC 9002 recovery, bbr / cubic / newreno, pacing)"
    )

    def parse(self, params: Mapping[str, str]) -> RudpOptions:
        return parse_options(params)

    def plain_codec(self, options: RudpOptions, admit: Callable[[str], bool] | None) -> ListenerCodec[Any]:
        return rudp_plain_codec(admit)

    def session_bytes(self, options: RudpOptions) -> tuple[int, int] | None:
        return (1, SERVER_CID_LEN)  # the connection ID the keyless client chose for the server

    def listener(self, sock: Any, options: RudpOptions, codec: ListenerCodec[Any]) -> Listener[Link]:
        return RudpListener(sock, options, codec)

    async def dial(self, family: Any, server: Address, options: RudpOptions, codec: ClientCodec) -> RudpLink:
        config = options.packet_config(codec.overhead, family=family)  # (raises before anything is opened)

        def new_link(
            transmit: Transmit,
            local: Address,
            peer: Address,
            on_close: Callable[[RoutedLink], None],
            sealed: bool,
        ) -> RudpLink:
            connection = Connection(
                role=Role.CLIENT,
                local_cid=b"",  # one socket, one connection: nothing to tell apart
                # sealed, the sealed header's connection ID routes; keyless, the server is known by this one
                peer_cid=b"" if sealed else secrets.token_bytes(SERVER_CID_LEN),
                config=config,
                now=clock(),
            )
            return RudpLink(
                connection=connection,
                timeout=options.timeout,
                transmit=transmit,
                local_address=local,
                remote_address=peer,
                on_close=on_close,
            )

        return await open_client(
            family, server, codec, new_link, options, dont_fragment=config.path_mtu_discovery
        )
