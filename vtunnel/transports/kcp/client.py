"""The ``kcp://`` client: one UDP socket to one server, its datagram codec, and the session's link."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from vtunnel.arq.kcp_engine import KCPEngine, KCPEngineError
from vtunnel.arq.kcp_options import KCPOptions
from vtunnel.io.datagrams import Address, CoalescingSocket, Run, open_client_socket, split_run
from vtunnel.transports.base import TransportError
from vtunnel.transports.kcp.codec import ClientCodec, Datagram, transmitter
from vtunnel.transports.kcp.link import KCPLink

__all__ = ["KCPClient", "connect", "random_conv"]


def random_conv() -> int:
    return secrets.randbits(32) or 1


class KCPClient:
    """The client side of one session: a UDP socket whose datagrams ``codec`` reads, feeding one link.

    The link starts once the codec is established (at once for plain datagrams, after the handshake for sealed
    ones); :meth:`connect` waits for it.
    """

    def __init__(self, sock: Any, server: Address, options: KCPOptions, codec: ClientCodec) -> None:
        self._server = server
        self._options = options
        self._codec = codec
        self._conv = options.conv if options.conv is not None else random_conv()
        self.link: KCPLink | None = None
        self._udp = CoalescingSocket(sock, self._on_runs)
        codec.attach(self._udp.sendto, server)
        if codec.established:
            self._start()

    async def connect(self) -> KCPLink:
        """The session's link, once the codec's handshake (if any) completed."""
        await self._codec.handshake(self._options.connect_timeout)
        assert self.link is not None
        return self.link

    def close(self) -> None:
        self._udp.close()

    def _start(self) -> None:
        options, udp = self._options, self._udp
        engine = KCPEngine(
            conv=self._conv,
            options=options,
            mtu=options.mtu - self._codec.overhead,
            now=asyncio.get_running_loop().time(),
        )
        self.link = KCPLink(
            engine=engine,
            options=options,
            transmit=transmitter(udp.sendto_many, self._codec.sealer()),
            local_address=udp.local_address,
            remote_address=self._server,
            on_close=lambda _link: udp.close(),
        )

    def _on_runs(self, runs: list[Run]) -> None:
        if self.link is None:
            runs = self._handshake(runs)
        link = self.link
        if link is None or not runs:
            return
        good: list[Datagram] = []
        ended = self._codec.open(runs, link, good)
        if good:
            link.feed(good)  # what arrived before the end is delivered first
        if ended is not None:
            link.fail(ended)

    def _handshake(self, runs: list[Run]) -> list[Run]:
        """Give the codec datagrams one at a time until it is established (the link starts then); what is left."""
        codec = self._codec
        for i, (buffer, segment, source) in enumerate(runs):
            datagrams = split_run(buffer, segment)
            for j, datagram in enumerate(datagrams):
                codec.receive_handshake(datagram)
                if codec.established:
                    self._start()
                    rest = [(bytes(d), len(d), source) for d in datagrams[j + 1 :]]
                    return rest + runs[i + 1 :]
        return []


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
    try:
        client = KCPClient(sock, server, options, codec)
    except KCPEngineError as exc:
        sock.close()
        raise TransportError(str(exc)) from None
    try:
        return await client.connect()
    except BaseException:
        client.close()  # (and the socket)
        raise
