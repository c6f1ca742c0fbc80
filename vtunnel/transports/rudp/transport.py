"""``rudp://``, the transport the registry names: one listener or one client, keyless (rudp's own connection ID
keys sessions: :mod:`.plain`) or, when a key is configured, sealed by the same codec as ``kcp://``
(:mod:`vtunnel.transports.kcp.sealed`)."""

from __future__ import annotations

from typing import Any, ClassVar

from anyio.abc import Listener

from vtunnel.io.datagrams import open_udp_socket
from vtunnel.transports.base import Endpoint, SecurityConfig, Transport, TransportError
from vtunnel.transports.kcp.codec import ClientCodec, ListenerCodec
from vtunnel.transports.kcp.plain import PlainClientCodec
from vtunnel.transports.kcp.sealed import SealedClientCodec, SealedListenerCodec
from vtunnel.transports.kcp.transport import resolve
from vtunnel.transports.link import Link
from vtunnel.transports.rudp.client import connect
from vtunnel.transports.rudp.listener import RudpListener
from vtunnel.transports.rudp.options import parse_options
from vtunnel.transports.rudp.plain import rudp_plain_codec

__all__ = ["RudpTransport"]


class RudpTransport(Transport):
    """``rudp://host:port?cc=bbr&mtu=1350`` (see ``docs/transports.md``)."""

    schemes: ClassVar[tuple[str, ...]] = ("rudp",)
    description: ClassVar[str] = (
        "rudp, vtunnel's own reliable UDP (SACK, RFC 9002 recovery, bbr / cubic / newreno, pacing)"
    )

    def check(self, endpoint: Endpoint) -> None:
        parse_options(endpoint.params)

    async def connect(self, endpoint: Endpoint, *, security: SecurityConfig) -> Link:
        options = parse_options(endpoint.params)
        family, server = await resolve(endpoint)
        codec: ClientCodec = (
            PlainClientCodec()
            if security.psk is None
            else SealedClientCodec(security.psk, cipher=security.cipher)
        )
        return await connect(family, server, options, codec)

    async def listen(self, endpoint: Endpoint, *, security: SecurityConfig) -> Listener[Link]:
        options = parse_options(endpoint.params)
        family, address = await resolve(endpoint)
        codec: ListenerCodec[Any] = (
            rudp_plain_codec()
            if security.psk is None
            else SealedListenerCodec(security.psk, cipher=security.cipher)
        )
        options.packet_config(codec.overhead)  # (raises before the socket is opened)
        try:
            sock = open_udp_socket(family, bind=address, sockbuf=options.sockbuf)
        except OSError as exc:
            raise TransportError(f"cannot listen on udp {endpoint.hostport}: {exc}") from None
        return RudpListener(sock, options, codec)
