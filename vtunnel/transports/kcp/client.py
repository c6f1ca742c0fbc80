"""The client of a datagram transport (``kcp://``, ``rudp://``): one UDP socket to one server, its datagram codec,
and the one link of its session, which the ARQ's ``new_link`` builds once the codec's handshake (if any) is done.
Everything but the link is the same for every ARQ."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeAlias, TypeVar

from vtunnel.io.datagrams import Address, CoalescingSocket, Run, forbid_fragmentation, open_client_socket
from vtunnel.transports.base import TransportError
from vtunnel.transports.kcp.codec import ClientCodec, Datagram, RoutedLink, Transmit, transmitter

__all__ = ["DatagramClient", "NewClientLink", "SocketOptions", "open_client"]

L = TypeVar("L", bound=RoutedLink)


class SocketOptions(Protocol):
    """What a datagram transport's options say of its socket and its handshake."""

    @property
    def sockbuf(self) -> int: ...
    @property
    def connect_timeout(self) -> float: ...


#: builds a client's link, the ARQ's part: (its output, the socket's address, the server's, what it calls when it
#: closes, whether the codec seals); raises :class:`TransportError` when the session cannot start
NewClientLink: TypeAlias = Callable[[Transmit, Address, Address, Callable[[RoutedLink], None], bool], L]


class DatagramClient(Generic[L]):
    """The client side of one session: a UDP socket whose datagrams ``codec`` reads, feeding one link, which
    :meth:`connect` starts once the codec's handshake (if any) is done."""

    def __init__(self, sock: Any, server: Address, codec: ClientCodec, new_link: NewClientLink[L]) -> None:
        self._server = server
        self._codec = codec
        self._new_link = new_link
        self.link: L | None = None
        self._udp = CoalescingSocket(sock, self._on_runs)
        codec.attach(self._udp.sendto, server)

    async def connect(self, timeout: float) -> L:
        udp = self._udp
        seal = await self._codec.handshake(timeout)
        transmit = transmitter(udp, seal)
        self.link = self._new_link(
            transmit, udp.local_address, self._server, lambda _link: udp.close(), seal is not None
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


async def open_client(
    family: Any,
    server: Address,
    codec: ClientCodec,
    new_link: NewClientLink[L],
    options: SocketOptions,
    *,
    dont_fragment: bool = False,
) -> L:
    """A session to ``server`` whose datagrams ``codec`` reads, its link built by ``new_link``; raises what the
    codec's handshake raises (sealed: :class:`~vtunnel.security.errors.HandshakeTimeout` if the server never
    answers, :class:`~vtunnel.security.errors.AuthenticationFailed` if it answers, authentically, with a cipher
    this client did not offer) and :class:`TransportError` when the session cannot start. ``dont_fragment``:
    datagrams leave whole or not at all (:func:`~vtunnel.io.datagrams.forbid_fragmentation`)."""
    try:
        # not connected (see open_client_socket): the kernel does not filter by source, the codec does
        sock = open_client_socket(family, server, sockbuf=options.sockbuf)
        if dont_fragment:
            try:
                forbid_fragmentation(sock)
            except OSError:
                sock.close()
                raise
    except OSError as exc:
        raise TransportError(f"cannot open a UDP socket to {server[0]}:{server[1]}: {exc}") from None
    client = DatagramClient(sock, server, codec, new_link)
    try:
        return await client.connect(options.connect_timeout)
    except BaseException:
        client.close()  # (and the socket)
        raise
