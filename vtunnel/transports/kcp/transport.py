"""``kcp://``, the transport the registry names: it picks the plain session (:mod:`vtunnel.transports.kcp`) or the
sealed one (:mod:`vtunnel.transports.kcp.sealed`) by whether a key is configured."""

from __future__ import annotations

from typing import ClassVar

from anyio.abc import Listener

from vtunnel.arq.kcp_engine import KCPEngineError
from vtunnel.io.datagrams import open_client_socket, open_udp_socket
from vtunnel.transports.base import Endpoint, SecurityConfig, Transport, TransportError
from vtunnel.transports.kcp.listener import KCPClient, KCPListener, random_conv, resolve_endpoint
from vtunnel.transports.kcp.options import parse_options
from vtunnel.transports.kcp.sealed import SealedKCPListener, connect_sealed
from vtunnel.transports.link import Link

__all__ = ["KCPTransport"]


class KCPTransport(Transport):
    """``kcp://host:port?mode=fast3&sndwnd=1024&rcvwnd=1024&mtu=1350`` (see ``docs/transports.md``)."""

    schemes: ClassVar[tuple[str, ...]] = ("kcp",)
    description: ClassVar[str] = "KCP (ikcp via siokcp) over UDP; presets normal, fast, fast2, fast3, fast4"

    def check(self, endpoint: Endpoint) -> None:
        parse_options(endpoint.params)

    async def connect(self, endpoint: Endpoint, *, security: SecurityConfig) -> Link:
        options = parse_options(endpoint.params)
        family, server = await resolve_endpoint(endpoint)
        if security.psk is not None:
            return await connect_sealed(family, server, options, security.psk, cipher=security.cipher)
        try:
            sock = open_client_socket(family, server, sockbuf=options.sockbuf)
        except OSError as exc:
            raise TransportError(f"cannot open a UDP socket to {endpoint.hostport}: {exc}") from None
        conv = options.conv if options.conv is not None else random_conv()
        try:
            client = KCPClient(sock, server, options, conv)
        except KCPEngineError as exc:
            sock.close()
            raise TransportError(str(exc)) from None
        return client.stream

    async def listen(self, endpoint: Endpoint, *, security: SecurityConfig) -> Listener[Link]:
        options = parse_options(endpoint.params)
        family, address = await resolve_endpoint(endpoint)
        try:
            sock = open_udp_socket(family, bind=address, sockbuf=options.sockbuf)
        except OSError as exc:
            raise TransportError(f"cannot listen on udp {endpoint.hostport}: {exc}") from None
        if security.psk is not None:
            return SealedKCPListener(sock, options, security.psk, cipher=security.cipher)
        return KCPListener(sock, options)
