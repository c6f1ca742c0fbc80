"""The ``rudp://`` client: one UDP socket to one server, its datagram codec, and the connection's link."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any, Final

from vtunnel.arq.rudp.connection import Connection, Role
from vtunnel.io.datagrams import Address, CoalescingSocket, Run, open_client_socket
from vtunnel.transports.base import TransportError
from vtunnel.transports.kcp.codec import ClientCodec, Datagram, transmitter
from vtunnel.transports.rudp.link import RudpLink
from vtunnel.transports.rudp.options import RudpOptions

__all__ = ["RudpClient", "connect"]

#: the length of the server's connection ID a keyless client chooses
SERVER_CID_LEN: Final = 8


class RudpClient:
    """The client side of one connection: a UDP socket whose datagrams ``codec`` reads, feeding one link, which
    :meth:`connect` starts once the codec's handshake (if any) is done."""

    def __init__(self, sock: Any, server: Address, options: RudpOptions, codec: ClientCodec) -> None:
        self._server = server
        self._options = options
        self._codec = codec
        self.link: RudpLink | None = None
        self._udp = CoalescingSocket(sock, self._on_runs)
        codec.attach(self._udp.sendto, server)

    async def connect(self) -> RudpLink:
        options, udp, codec = self._options, self._udp, self._codec
        seal = await codec.handshake(options.connect_timeout)
        config = options.packet_config(codec.overhead)
        connection = Connection(
            role=Role.CLIENT,
            local_cid=b"",  # one socket, one connection: nothing to tell apart
            # sealed, the sealed header's connection ID routes; keyless, the server is known by this one
            peer_cid=b"" if seal is not None else secrets.token_bytes(SERVER_CID_LEN),
            config=config,
            now=asyncio.get_running_loop().time(),
        )
        self.link = RudpLink(
            connection=connection,
            timeout=options.timeout,
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


async def connect(family: Any, server: Address, options: RudpOptions, codec: ClientCodec) -> RudpLink:
    """An rudp connection to ``server`` whose datagrams ``codec`` reads; raises what the codec's handshake raises
    and :class:`TransportError` when the connection cannot start."""
    options.packet_config(codec.overhead)  # (raises before anything is opened)
    try:
        # not connected (see open_client_socket): the kernel does not filter by source, the codec does
        sock = open_client_socket(family, server, sockbuf=options.sockbuf)
    except OSError as exc:
        raise TransportError(f"cannot open a UDP socket to {server[0]}:{server[1]}: {exc}") from None
    client = RudpClient(sock, server, options, codec)
    try:
        return await client.connect()
    except BaseException:
        client.close()
        raise
