"""The ``kcp://`` client: one UDP socket to one server, its datagram codec, and the session's link."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from vtunnel.arq.kcp_engine import KCPEngine, KCPEngineError
from vtunnel.arq.kcp_options import KCPOptions
from vtunnel.io.datagrams import Address, CoalescingSocket, Run, open_client_socket
from vtunnel.transports.base import TransportError
from vtunnel.transports.kcp.codec import ClientCodec, Datagram, transmitter
from vtunnel.transports.kcp.link import KCPLink

__all__ = ["KCPClient", "connect", "random_conv"]


def random_conv() -> int:
    return secrets.randbits(32) or 1


class KCPClient:
    """The client side of one session: a UDP socket whose datagrams ``codec`` reads, feeding one link, which
    :meth:`connect` starts once the codec's handshake (if any) is done."""

    def __init__(self, sock: Any, server: Address, options: KCPOptions, codec: ClientCodec) -> None:
        self._server = server
        self._options = options
        self._codec = codec
        self.link: KCPLink | None = None
        self._udp = CoalescingSocket(sock, self._on_runs)
        codec.attach(self._udp.sendto, server)

    async def connect(self) -> KCPLink:
        options, udp, codec = self._options, self._udp, self._codec
        seal = await codec.handshake(options.connect_timeout)
        engine = KCPEngine(
            conv=options.conv if options.conv is not None else random_conv(),
            options=options,
            mtu=options.mtu - codec.overhead,
            now=asyncio.get_running_loop().time(),
        )
        self.link = KCPLink(
            engine=engine,
            options=options,
            transmit=transmitter(udp.sendto_many, seal),
            local_address=udp.local_address,
            remote_address=self._server,
            on_close=lambda _link: udp.close(),
        )
        return self.link

    def close(self) -> None:
        self._udp.close()

    def _on_runs(self, runs: list[Run]) -> None:
        link = self.link
        good: list[Datagram] = []
        ended = self._codec.open(runs, link, good)
        if link is None:
            return
        if good:
            link.feed(good)  # what arrived before the end is delivered first
        if ended is not None:
            link.fail(ended)


async def connect(family: Any, server: Address, options: KCPOptions, codec: ClientCodec) -> KCPLink:
    """A KCP session to ``server`` whose datagrams ``codec`` reads; raises what the codec's handshake raises
    (sealed: :class:`~vtunnel.security.errors.HandshakeTimeout` if the server never answers,
    :class:`~vtunnel.security.errors.AuthenticationFailed` if it answers, authentically, with a cipher this client
    did not offer) and :class:`TransportError` when the session cannot start."""
    if options.mtu - codec.overhead < 64:
        raise TransportError(f"kcp option 'mtu' is too small for sealed datagrams: {options.mtu}")
    try:
        # not connected (see open_client_socket): the kernel does not filter by source, the codec does
        sock = open_client_socket(family, server, sockbuf=options.sockbuf)
    except OSError as exc:
        raise TransportError(f"cannot open a UDP socket to {server[0]}:{server[1]}: {exc}") from None
    client = KCPClient(sock, server, options, codec)
    try:
        return await client.connect()
    except KCPEngineError as exc:
        client.close()  # (and the socket)
        raise TransportError(str(exc)) from None
    except BaseException:
        client.close()
        raise
