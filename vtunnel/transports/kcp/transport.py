"""``kcp://``, the transport the registry names: one listener or one client, with the plain codec
(:mod:`~vtunnel.transports.kcp.plain`) or, when a key is configured, the sealed one
(:mod:`~vtunnel.transports.kcp.sealed`)."""

from __future__ import annotations

import socket
from typing import Any, ClassVar

import anyio
from anyio.abc import Listener

from vtunnel.io.datagrams import Address, open_udp_socket
from vtunnel.transports.base import Endpoint, SecurityConfig, Transport, TransportError
from vtunnel.transports.kcp.client import connect
from vtunnel.transports.kcp.codec import ClientCodec, ListenerCodec
from vtunnel.transports.kcp.listener import KCPListener
from vtunnel.transports.kcp.options import parse_options
from vtunnel.transports.kcp.plain import PlainClientCodec, PlainListenerCodec
from vtunnel.transports.kcp.sealed import SealedClientCodec, SealedListenerCodec
from vtunnel.transports.link import Link

__all__ = ["KCPTransport", "resolve"]


async def resolve(endpoint: Endpoint) -> tuple[Any, Address]:
    """The UDP address of ``endpoint`` (its first), with its address family."""
    try:
        infos = await anyio.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise TransportError(f"cannot resolve {endpoint.hostport}: {exc}") from None
    family, _type, _proto, _name, sockaddr = infos[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


class KCPTransport(Transport):
    """``kcp://host:port?mode=fast3&sndwnd=1024&rcvwnd=1024&mtu=1350`` (see ``docs/transports.md``)."""

    schemes: ClassVar[tuple[str, ...]] = ("kcp",)
    description: ClassVar[str] = "KCP (ikcp via siokcp) over UDP; presets normal, fast, fast2, fast3, fast4"

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
            PlainListenerCodec()
            if security.psk is None
            else SealedListenerCodec(security.psk, cipher=security.cipher)
        )
        try:
            sock = open_udp_socket(family, bind=address, sockbuf=options.sockbuf)
        except OSError as exc:
            raise TransportError(f"cannot listen on udp {endpoint.hostport}: {exc}") from None
        return KCPListener(sock, options, codec)
