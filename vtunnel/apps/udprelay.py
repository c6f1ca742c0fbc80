"""The exit side of a ``"udp"`` tunnel stream: datagrams out to their destinations, replies back.

Each message on the stream is one datagram, ``ATYP | DST.ADDR | DST.PORT | DATA`` (the SOCKS5 UDP request
header without RSV and FRAG).  ``serve_udp_stream`` sends ``DATA`` from a UDP socket of its own to the
destination, after checking it against the dialer's exit policy (names are resolved through the dialer, so
every resolved address is checked too), and sends every reply back as ``ATYP | SRC.ADDR | SRC.PORT | DATA``.

Only replies from a destination this stream has sent to are accepted (address and port restricted), so no
third party can inject datagrams through an open association.  Malformed, refused and oversized datagrams are
dropped (logged at debug level): UDP promises nothing, and the stream goes on.  The relay ends when the stream
ends or when no datagram moved either way for ``idle_timeout`` seconds.
"""

from __future__ import annotations

import socket
from collections import OrderedDict

import anyio
import structlog
from anyio.abc import ByteStream, UDPSocket

from vtunnel.apps.dialer import Dialer, DialError
from vtunnel.apps.pipe import IdleTimer
from vtunnel.apps.policy import IPAddress, PolicyDenied, normalize_address
from vtunnel.apps.socks5 import Socks5Error, encode_address, parse_address
from vtunnel.runtime.errors import StreamRefused

__all__ = ["MAX_PEERS", "serve_udp_stream"]

log = structlog.get_logger(__name__)

#: How many destinations (and resolved names) one stream remembers.
MAX_PEERS = 256

_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, StreamRefused)


class _UdpExit:
    def __init__(self, stream: ByteStream, dialer: Dialer, tg: anyio.abc.TaskGroup) -> None:
        self.stream = stream
        self.dialer = dialer
        self.tg = tg
        self.sockets: dict[int, UDPSocket] = {}
        self.names: OrderedDict[tuple[str, int], IPAddress] = OrderedDict()
        self.peers: OrderedDict[tuple[IPAddress, int], None] = OrderedDict()
        self.moved = 0

    async def _socket_for(self, addr: IPAddress) -> UDPSocket:
        udp = self.sockets.get(addr.version)
        if udp is None:
            if addr.version == 4:
                udp = await anyio.create_udp_socket(family=socket.AF_INET)
            else:
                udp = await anyio.create_udp_socket(family=socket.AF_INET6)
            self.sockets[addr.version] = udp
            self.tg.start_soon(self._replies, udp)
        return udp

    async def _destination(self, host: str, port: int) -> IPAddress:
        try:
            literal: IPAddress | None = normalize_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            self.dialer.policy.check_address(literal)
            return literal
        key = (host.lower(), port)
        cached = self.names.get(key)
        if cached is not None:
            self.names.move_to_end(key)
            return cached
        addresses = await self.dialer.resolve(host, port, udp=True)
        self.names[key] = addresses[0]
        if len(self.names) > MAX_PEERS:
            self.names.popitem(last=False)
        return addresses[0]

    async def outbound(self) -> None:
        """Stream -> destinations, until the stream ends."""
        while True:
            try:
                data = await self.stream.receive()
            except _GONE:
                return
            try:
                parsed = parse_address(data)
                if parsed is None:
                    raise Socks5Error("truncated datagram header")
                _, host, port, end = parsed
                if port == 0:
                    raise Socks5Error("destination port 0")
                addr = await self._destination(host, port)
            except (Socks5Error, PolicyDenied, DialError) as exc:
                log.debug("udp.dropped", reason=str(exc))
                continue
            udp = await self._socket_for(addr)
            peer = (addr, port)
            self.peers[peer] = None
            self.peers.move_to_end(peer)
            if len(self.peers) > MAX_PEERS:
                self.peers.popitem(last=False)
            try:
                await udp.sendto(data[end:], str(addr), port)
            except OSError as exc:
                log.debug("udp.send_failed", error=type(exc).__name__)
                continue
            self.moved += 1

    async def _replies(self, udp: UDPSocket) -> None:
        """One socket's replies -> stream."""
        async for data, (host, port, *_) in udp:
            try:
                addr = normalize_address(str(host))
            except ValueError:
                continue
            if (addr, port) not in self.peers:
                log.debug("udp.unsolicited", source=str(addr))
                continue
            try:
                await self.stream.send(encode_address(str(addr), int(port)) + data)
            except ValueError:  # larger than the stream's datagram limit
                log.debug("udp.reply_too_large", size=len(data))
                continue
            self.moved += 1


async def serve_udp_stream(stream: ByteStream, dialer: Dialer, *, idle_timeout: float = 60.0) -> None:
    """Relay one ``"udp"`` stream's datagrams until it ends or idles out; closes the stream on return."""
    if idle_timeout <= 0:
        raise ValueError("idle_timeout must be positive")
    relay: _UdpExit | None = None
    idle: IdleTimer | None = None
    try:
        async with anyio.create_task_group() as tg:
            relay = _UdpExit(stream, dialer, tg)
            idle = IdleTimer(idle_timeout, lambda: relay.moved if relay else 0, tg.cancel_scope.cancel)
            idle.start()
            try:
                await relay.outbound()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, StreamRefused) as exc:
                log.debug("udp.stream_gone", error=type(exc).__name__)
            tg.cancel_scope.cancel()
    except* (anyio.BrokenResourceError, anyio.ClosedResourceError, StreamRefused) as group:
        log.debug("udp.stream_gone", error=repr(group.exceptions[0]))
    except* Exception as group:  # never take the server down with one stream
        log.error("udp.internal_error", error=repr(group.exceptions[0]), exc_info=group)
    finally:
        if idle is not None:
            idle.stop()
        with anyio.CancelScope(shield=True):
            if relay is not None:
                for udp in relay.sockets.values():
                    await udp.aclose()
            await anyio.aclose_forcefully(stream)
