"""``quic://HOST:PORT``: one tunnel per QUIC connection, on the connection's first bidirectional stream.

:class:`QuicTransport` is a :class:`~vtunnel.transports.base.ByteStreamTransport`: it gives vtunnel the tunnel's
QUIC stream as a byte stream, and vtunnel runs its pre-shared-key handshake and AEAD records on it, keeps
connections that have not proved the key under its cap of pending connections, and limits key handshakes per
source address. Before that, :class:`QuicListener` keeps QUIC connections still in their QUIC handshake (or that
have not opened the tunnel's stream) under a cap of its own (:data:`MAX_HANDSHAKING`, the oldest closed first) and
a timeout (:data:`HANDSHAKE_TIMEOUT`).

The server routes datagrams by connection ID, never by address, so a client whose address changes (NAT
rebinding, a new network) keeps its tunnel: aioquic validates the new path and the server follows it. A packet
for an ID it does not know (a restarted server's) is answered with a stateless reset, and with ``retry=1`` a new
client's address is validated by a Retry first (:mod:`vtunnel_quic.stateless`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final

import anyio
import anyio.lowlevel
import anyio.to_thread
import structlog
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import NetworkAddress
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from anyio.abc import ByteStream, Listener, SocketAttribute, TaskGroup

from vtunnel.io.datagrams import Address, open_udp_socket, resolve_udp
from vtunnel.transports.base import ByteStreamTransport, Endpoint, SecurityConfig, TransportError
from vtunnel.transports.link import Link
from vtunnel_quic.connection import TUNNEL_STREAM, FlowControlledConnection, QuicByteStream, QuicSession
from vtunnel_quic.options import client_configuration, parse_options, server_configuration
from vtunnel_quic.stateless import ResetBudget, RetryTokens, keys_secret, reset_datagram, reset_key

__all__ = ["HANDSHAKE_TIMEOUT", "MAX_HANDSHAKING", "QuicListener", "QuicTransport"]

log = structlog.get_logger("vtunnel.transports.quic")

#: how long a client waits for the QUIC handshake
CONNECT_TIMEOUT: Final = 10.0
#: how long a server connection may take to finish its QUIC handshake and open the tunnel's stream
HANDSHAKE_TIMEOUT: Final = 10.0
#: server connections in their QUIC handshake at most; a new one beyond closes the oldest
MAX_HANDSHAKING: Final = 1024
#: kernel buffers of the UDP sockets (the kernel may cap them)
SOCKET_BUFFER: Final = 4 * 1024 * 1024


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, NetworkAddress], None]) -> None:
        self._on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: NetworkAddress) -> None:
        self._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP errors: QUIC's timers deal with loss
        log.debug("quic socket error", error=repr(exc))


async def _open_udp(
    family: socket.AddressFamily, bind: Address | None, on_datagram: Callable[[bytes, NetworkAddress], None]
) -> asyncio.DatagramTransport:
    sock = open_udp_socket(family, bind=bind, sockbuf=SOCKET_BUFFER)
    try:
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Datagrams(on_datagram), sock=sock
        )
    except BaseException:
        sock.close()
        raise
    return transport


async def _resolve(endpoint: Endpoint) -> tuple[socket.AddressFamily, Address]:
    try:
        return await anyio.to_thread.run_sync(resolve_udp, endpoint.host, endpoint.port)
    except OSError as exc:
        raise TransportError(f"cannot resolve {endpoint.hostport}: {exc}") from None


def _keepalive(config: QuicConfiguration) -> float:
    return config.idle_timeout / 3


class QuicTransport(ByteStreamTransport):
    """``quic://host:port`` (options: see :mod:`vtunnel_quic.options`)."""

    schemes: ClassVar[tuple[str, ...]] = ("quic",)
    description: ClassVar[str] = (
        "QUIC on one stream (plugin: vtunnel-quic, aioquic), options cert=, key=, ca=, servername=, idle=, cc=, mtu=, retry="
    )

    def __init__(self) -> None:
        #: the reset key of each URL being listened on, from the server's keys (see :meth:`listen`)
        self._reset_keys: dict[str, bytes] = {}

    def check(self, endpoint: Endpoint) -> None:
        parse_options(endpoint)

    async def listen(self, endpoint: Endpoint, *, security: SecurityConfig) -> Listener[Link]:
        """The base's listener (the key, the caps); the stateless reset key is derived from the server's keys
        first, so a restarted server resets the connections of the one before it."""
        ring = security.server_keys()
        keys = [] if ring is None else [entry.key for entry in ring.current]
        self._reset_keys[str(endpoint)] = reset_key(keys_secret(keys))
        try:
            return await super().listen(endpoint, security=security)
        finally:
            self._reset_keys.pop(str(endpoint), None)

    async def connect_stream(self, endpoint: Endpoint) -> ByteStream:
        config = client_configuration(endpoint)
        family, server = await _resolve(endpoint)
        session: QuicSession | None = None

        def on_datagram(data: bytes, addr: NetworkAddress) -> None:
            if session is not None and addr[:2] == server[:2]:  # the server's only
                session.datagram_received(data, addr)

        try:
            udp = await _open_udp(family, None, on_datagram)
        except OSError as exc:
            raise TransportError(f"cannot open a UDP socket to {endpoint.hostport}: {exc}") from None
        loop = asyncio.get_running_loop()
        session = QuicSession(
            FlowControlledConnection(configuration=config),
            send=lambda data, _addr: udp.sendto(data, server),
            local_address=udp.get_extra_info("sockname"),
            remote_address=server,
            keepalive=_keepalive(config),
            on_closed=lambda _session: udp.close(),
        )
        waiter = session.handshake_waiter = loop.create_future()
        try:
            session.connection.connect(server, now=loop.time())
            session.transmit()
            with anyio.fail_after(CONNECT_TIMEOUT):
                await waiter
        except TimeoutError:
            session.close("handshake timeout")
            raise TransportError(
                f"no QUIC handshake with {endpoint.hostport} within {CONNECT_TIMEOUT:g} s"
            ) from None
        except ConnectionError as exc:
            session.close()
            raise TransportError(f"QUIC handshake with {endpoint.hostport} failed: {exc}") from None
        except BaseException:
            session.close()
            raise
        # the tunnel's stream, opened here: the server hands the connection over when its first bytes arrive
        session.connection.send_stream_data(TUNNEL_STREAM, b"")
        return session.stream

    async def listen_streams(self, endpoint: Endpoint) -> Listener[ByteStream]:
        config = server_configuration(endpoint)
        family, address = await _resolve(endpoint)
        listener = QuicListener(
            config,
            reset_key=self._reset_keys.get(str(endpoint)) or reset_key(None),
            retry=parse_options(endpoint).retry,
        )
        try:
            listener.udp = await _open_udp(family, address, listener.datagram_received)
        except OSError as exc:
            raise TransportError(f"cannot listen on udp {endpoint.hostport}: {exc}") from None
        return listener


class QuicListener(Listener[ByteStream]):
    """QUIC connections on one UDP socket; each yields its tunnel's stream once the client opened it.

    Closing the listener closes every connection it accepted (they share its socket).
    """

    def __init__(
        self,
        config: QuicConfiguration,
        *,
        reset_key: bytes,
        retry: bool = False,
        max_handshaking: int = MAX_HANDSHAKING,
    ) -> None:
        self.udp: asyncio.DatagramTransport | None = None
        self._config = config
        self._loop = asyncio.get_running_loop()
        self._reset_key = reset_key
        self._reset_budget = ResetBudget()
        #: with ``retry=1``: the tokens of the Retry packets that validate new clients' addresses
        self._retry = RetryTokens(self._loop.time) if retry else None
        self._by_cid: dict[bytes, QuicSession] = {}
        self._cids: dict[QuicSession, set[bytes]] = {}
        #: connections not handed over yet, oldest first
        self._handshaking: dict[QuicSession, None] = {}
        self.max_handshaking = max_handshaking
        self._ready: deque[QuicByteStream] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False
        #: datagrams dropped: not QUIC, or not for a connection and not one that may start one
        self.dropped = 0
        #: connections closed in their handshake to make room for newer ones
        self.shed = 0
        #: stateless resets sent (packets for connections this server does not have)
        self.resets = 0
        #: Retry packets sent, and Initials dropped for a missing or bad token (``retry=1``)
        self.retries = 0
        self.bad_tokens = 0

    @property
    def local_address(self) -> Any:
        return None if self.udp is None else self.udp.get_extra_info("sockname")

    @property
    def connection_count(self) -> int:
        return len(self._cids)

    @property
    def handshaking(self) -> int:
        return len(self._handshaking)

    # --- datagram path --------------------------------------------------------------------------------------
    def _send(self, data: bytes, address: NetworkAddress) -> None:
        if not self._closed and self.udp is not None:
            self.udp.sendto(data, address)

    def datagram_received(self, data: bytes, address: NetworkAddress) -> None:
        config = self._config
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=config.connection_id_length)
        except ValueError:
            self.dropped += 1
            return
        session = self._by_cid.get(header.destination_cid)
        if session is None:
            if header.version is not None and header.version not in config.supported_versions:
                if len(data) >= SMALLEST_MAX_DATAGRAM_SIZE:  # never more bytes out than came in
                    self._send(
                        encode_quic_version_negotiation(
                            source_cid=header.destination_cid,
                            destination_cid=header.source_cid,
                            supported_versions=config.supported_versions,
                        ),
                        address,
                    )
                return
            if self._closed:
                self.dropped += 1
                return
            if header.packet_type == QuicPacketType.ONE_RTT:
                self._reset(header.destination_cid, len(data), address)
                return
            if header.packet_type != QuicPacketType.INITIAL or len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
                self.dropped += 1
                return
            original_cid, retry_cid = header.destination_cid, None
            if self._retry is not None:
                if not header.token:
                    self._send_retry(header.version, header.source_cid, header.destination_cid, address)
                    return
                try:
                    original_cid, retry_cid = self._retry.validate(address, header.token)
                except ValueError:
                    self.bad_tokens += 1
                    return
            session = self._new_session(header.destination_cid, original_cid, retry_cid, address)
        session.datagram_received(data, address)

    def _reset(self, connection_id: bytes, answered: int, address: NetworkAddress) -> None:
        """A short-header packet for a connection this server does not have: its stateless reset."""
        reset = reset_datagram(self._reset_key, connection_id, answered)
        if reset is None or not self._reset_budget.take(self._loop.time()):
            self.dropped += 1
            return
        self.resets += 1
        log.debug("quic stateless reset sent", client=address)
        self._send(reset, address)

    def _send_retry(
        self, version: int | None, client_cid: bytes, original_cid: bytes, address: NetworkAddress
    ) -> None:
        """The first Initial of a client while ``retry=1``: a Retry whose token it must bring back."""
        assert self._retry is not None
        assert version is not None  # an Initial's long header has one
        retry_cid = os.urandom(self._config.connection_id_length)
        self.retries += 1
        log.debug("quic retry sent", client=address)
        self._send(
            encode_quic_retry(
                version=version,
                source_cid=retry_cid,
                destination_cid=client_cid,
                original_destination_cid=original_cid,
                retry_token=self._retry.create(address, original_cid, retry_cid),
            ),
            address,
        )

    def _new_session(
        self, routing_cid: bytes, original_cid: bytes, retry_cid: bytes | None, address: NetworkAddress
    ) -> QuicSession:
        if len(self._handshaking) >= self.max_handshaking:
            oldest = next(iter(self._handshaking))
            self.shed += 1
            log.warning(
                "too many QUIC connections in their handshake: closing the oldest", limit=self.max_handshaking
            )
            oldest.close("too many handshakes")
        connection = FlowControlledConnection(
            configuration=self._config,
            original_destination_connection_id=original_cid,
            retry_source_connection_id=retry_cid,
            reset_key=self._reset_key,
        )
        session = QuicSession(
            connection,
            send=self._send,
            local_address=self.local_address,
            remote_address=address,
            keepalive=_keepalive(self._config),
            on_event=self._on_event,
            on_closed=self._forget,
        )
        session.handshake_deadline = self._loop.time() + HANDSHAKE_TIMEOUT
        session.on_handshake_timeout = lambda: session.close("handshake timeout")
        self._cids[session] = {routing_cid, connection.host_cid}
        self._by_cid[routing_cid] = self._by_cid[connection.host_cid] = session
        self._handshaking[session] = None
        return session

    def _on_event(self, session: QuicSession, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionIdIssued):
            self._by_cid[event.connection_id] = session
            self._cids[session].add(event.connection_id)
        elif isinstance(event, events.ConnectionIdRetired):
            if self._by_cid.get(event.connection_id) is session:
                del self._by_cid[event.connection_id]
            self._cids[session].discard(event.connection_id)
        elif (
            isinstance(event, events.StreamDataReceived)
            and event.stream_id == TUNNEL_STREAM
            and session in self._handshaking
        ):
            del self._handshaking[session]
            session.handshake_deadline = None
            self._ready.append(session.stream)
            self._wakeup.set()

    def _forget(self, session: QuicSession) -> None:
        for cid in self._cids.pop(session, ()):
            if self._by_cid.get(cid) is session:
                del self._by_cid[cid]
        self._handshaking.pop(session, None)
        with contextlib.suppress(ValueError):
            self._ready.remove(session.stream)

    # --- Listener -------------------------------------------------------------------------------------------
    async def accept(self) -> ByteStream:
        """The next connection's tunnel stream."""
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._ready:
                return self._ready.popleft()
            self._wakeup = asyncio.Event()
            await self._wakeup.wait()

    async def serve(self, handler: Callable[[ByteStream], Any], task_group: TaskGroup | None = None) -> None:
        """Hand each connection's stream to ``handler`` in a task of its own; returns when the listener closes."""
        async with contextlib.AsyncExitStack() as stack:
            if task_group is None:
                task_group = await stack.enter_async_context(anyio.create_task_group())
            while not self._closed:
                while self._ready:
                    task_group.start_soon(handler, self._ready.popleft())
                self._wakeup = asyncio.Event()
                await self._wakeup.wait()

    async def aclose(self) -> None:
        if self._closed:
            return
        for session in list(self._cids):
            session.close("the server is closing")
        self._closed = True
        self._ready.clear()
        if self.udp is not None:
            self.udp.close()
        self._wakeup.set()
        await anyio.lowlevel.checkpoint()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return {SocketAttribute.local_address: lambda: self.local_address}
