"""``kcp://``, the transport the registry names: one listener or one client, with the plain codec
(:mod:`~vtunnel.transports.kcp.plain`) or, when a key is configured, the sealed one
(:mod:`~vtunnel.transports.kcp.sealed`); and :class:`DatagramTransport`, what it shares with ``rudp://``."""

from __future__ import annotations

import secrets
import socket
from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, TypeVar

import anyio
from anyio.abc import Listener

from vtunnel.arq.kcp_engine import KCPEngineError
from vtunnel.arq.kcp_options import KCPOptions
from vtunnel.io.datagrams import Address, open_udp_listener
from vtunnel.transports.base import Endpoint, SecurityConfig, SharedListening, Transport, TransportError
from vtunnel.transports.kcp.client import SocketOptions, open_client
from vtunnel.transports.kcp.codec import ClientCodec, ListenerCodec, RoutedLink, Transmit
from vtunnel.transports.kcp.fec import FECPlainListenerCodec
from vtunnel.transports.kcp.link import KCPLink
from vtunnel.transports.kcp.listener import KCPListener, kcp_link
from vtunnel.transports.kcp.options import parse_options
from vtunnel.transports.kcp.plain import PlainClientCodec, PlainListenerCodec
from vtunnel.transports.kcp.sealed import SealedClientCodec, SealedListenerCodec
from vtunnel.transports.link import Link

__all__ = ["DatagramTransport", "KCPTransport", "resolve"]


Opts = TypeVar("Opts", bound=SocketOptions)


async def resolve(endpoint: Endpoint) -> tuple[Any, Address]:
    """The UDP address of ``endpoint`` (its first), with its address family."""
    try:
        infos = await anyio.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise TransportError(f"cannot resolve {endpoint.hostport}: {exc}") from None
    family, _type, _proto, _name, sockaddr = infos[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


class DatagramTransport(Transport, Generic[Opts]):
    """A transport of ARQ sessions over UDP (``kcp://``, ``rudp://``), the codec chosen by whether a key is set
    (sealed with one; without, the ARQ's plain codec). A subclass reads its URL options (``Opts``), names its
    plain listener codec, and builds its listener and its client's session (:meth:`dial`; raises what
    :func:`~vtunnel.transports.kcp.client.open_client` raises)."""

    over_udp: ClassVar[bool] = True

    @abstractmethod
    def parse(self, params: Mapping[str, str]) -> Opts: ...
    @abstractmethod
    def plain_codec(self, options: Opts, admit: Callable[[str], bool] | None) -> ListenerCodec[Any]: ...
    @abstractmethod
    def listener(self, sock: Any, options: Opts, codec: ListenerCodec[Any]) -> Listener[Link]: ...
    @abstractmethod
    async def dial(self, family: Any, server: Address, options: Opts, codec: ClientCodec) -> Link: ...

    def check(self, endpoint: Endpoint) -> None:
        self.parse(endpoint.params)

    def shared_listening(self, endpoint: Endpoint) -> SharedListening:
        options = self.parse(endpoint.params)
        return SharedListening(
            datagram=True, sockbuf=options.sockbuf, session_bytes=self.session_bytes(options)
        )

    def session_bytes(self, options: Opts) -> tuple[int, int] | None:
        """Where a keyless datagram names its session (see :class:`SharedListening`)."""
        return None

    async def connect(self, endpoint: Endpoint, *, security: SecurityConfig) -> Link:
        options = self.parse(endpoint.params)
        family, server = await resolve(endpoint)
        psk, cipher = security.psk, security.cipher
        codec = PlainClientCodec() if psk is None else SealedClientCodec(psk, cipher=cipher)
        return await self.dial(family, server, options, codec)

    async def listen(self, endpoint: Endpoint, *, security: SecurityConfig) -> Listener[Link]:
        options = self.parse(endpoint.params)
        family, address = await resolve(endpoint)
        ring = security.server_keys()
        codec = (
            self.plain_codec(options, security.admit)
            if ring is None
            else SealedListenerCodec(ring, cipher=security.cipher, layout=security.connection_ids)
        )
        try:
            sock = open_udp_listener(family, address, sockbuf=options.sockbuf)
        except OSError as exc:
            raise TransportError(f"cannot listen on udp {endpoint.hostport}: {exc}") from None
        try:
            return self.listener(sock, options, codec)
        except BaseException:
            sock.close()
            raise


class KCPTransport(DatagramTransport[KCPOptions]):
    """``kcp://host:port?mode=fast3&sndwnd=1024&rcvwnd=1024&mtu=1350`` (see ``docs/transports.md``)."""

    schemes: ClassVar[tuple[str, ...]] = ("kcp",)
    description: ClassVar[str] = "KCP (ikcp via siokcp) over UDP; presets normal, fast, fast2, fast3, fast4"

    def parse(self, params: Mapping[str, str]) -> KCPOptions:
        return parse_options(params)

    def plain_codec(self, options: KCPOptions, admit: Callable[[str], bool] | None) -> ListenerCodec[Any]:
        return PlainListenerCodec(admit) if options.fec is None else FECPlainListenerCodec(admit)

    def session_bytes(self, options: KCPOptions) -> tuple[int, int] | None:
        # the conv; with fec= a parity packet names no session (its source address keys it)
        return (0, 4) if options.fec is None else None

    def listener(self, sock: Any, options: KCPOptions, codec: ListenerCodec[Any]) -> Listener[Link]:
        return KCPListener(sock, options, codec)

    async def dial(self, family: Any, server: Address, options: KCPOptions, codec: ClientCodec) -> KCPLink:
        if options.mtu - codec.overhead < 64:
            raise TransportError(f"kcp option 'mtu' is too small for sealed datagrams: {options.mtu}")

        def new_link(
            transmit: Transmit, local: Address, peer: Address, on_close: Callable[[RoutedLink], None], _: bool
        ) -> KCPLink:
            conv = options.conv if options.conv is not None else secrets.randbits(32) or 1
            try:
                return kcp_link(options, conv, codec.overhead, transmit, local, peer, on_close)
            except KCPEngineError as exc:
                raise TransportError(str(exc)) from None

        return await open_client(family, server, codec, new_link, options)
