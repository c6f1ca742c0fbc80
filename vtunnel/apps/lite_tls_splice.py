"""lite-tls splice mode: the dedicated connection of a spliced lite-tls stream (docs/lite-tls.md, "Splice mode").

The agent draws a ticket (32 random bytes) per lite-tls stream and names it in the stream's SYN (header
``vt-splice``, inside the tunnel's authenticated encryption). Only once the user's first record is a ClientHello
record does it connect to the server's splice port and write the ticket (a stream that is not TLS never dials).
The server's :class:`TicketBook` pairs the two: the connection that presents a stream's ticket is bound to it
if it comes while no marker or notice has gone either way on the stream (the server writes one byte,
:data:`ACK`, and splices the stream over it), and closed otherwise; each ticket once. The agent's stream does
not leave before it knows which: the ACK (spliced at both ends), or anything else (the connection closed without
it, no answer within :data:`ACK_TIMEOUT`, another byte): the agent then leaves muxed and its marker says so
(``MUXED_MARKER``), so that a server that bound the connection all the same leaves muxed too. A connection whose ticket no open stream
named gets nothing and is closed.

Over ``kcp://`` and ``rudp://`` the dedicated connection is a keyless conversation of the same transport (a
one-stream tunnel without a key, to the server's ``splice`` UDP port) instead of a TCP connection: each end bridges it to one socket of a
socket pair (:func:`_bridge`), so the ticket, the ACK and the kernel relay of the user's socket are the same as
over TCP, and the conversation's stream carries what the pair's other socket reads. A forged or altered datagram
of a conversation reaches that one stream only (its TLS fails); no other stream and no tunnel has its keys.

This module is I/O glue for ``apps.agent`` and ``apps.server``; the switch itself is the runtime's
(``TunnelStream.splice_over``) and the relay's (``Relay.splice``, ``io.splice``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import anyio
import structlog
from anyio.abc import SocketAttribute

from vtunnel.apps.pipe import Relay, SocketEnd, TunnelEnd
from vtunnel.io import listening
from vtunnel.io.splice import SPLICE_AVAILABLE
from vtunnel.io.stream_sockets import attach_socket
from vtunnel.io.tuning import tune_tcp
from vtunnel.protocol import Role, StreamMetadata, TunnelConfig
from vtunnel.runtime.connection import TunnelConnection
from vtunnel.runtime.tunnel_stream import TunnelStream
from vtunnel.transports.base import Endpoint, Link, SecurityConfig, get_transport

__all__ = [
    "ACK",
    "ACK_TIMEOUT",
    "CLAIM_TIMEOUT",
    "SPLICE_HEADER",
    "TICKET_LEN",
    "SpliceDialer",
    "TicketBook",
    "conversation_endpoint",
    "may_splice",
    "offer_dedicated",
    "serve_splice_port",
    "splice_port",
    "ticket_of",
]

log = structlog.get_logger("vtunnel.lite_tls")

#: the SYN header naming a stream's ticket (hex)
SPLICE_HEADER: Final = "vt-splice"
TICKET_LEN: Final = 32
#: what the server writes on a dedicated connection it bound to a stream
ACK: Final = b"\x01"
#: how long the server waits for a ticket's connection (and keeps a connection whose ticket no SYN named yet)
CLAIM_TIMEOUT: Final = 2.0
#: how long the agent waits for the ACK once the stream was accepted (the server wrote it before accepting)
ACK_TIMEOUT: Final = 2.0
#: how long a new dedicated connection has to present its ticket
TICKET_TIMEOUT: Final = 5.0
#: dedicated connections waiting for their ticket or its SYN, at most (more are closed at once)
MAX_PARKED: Final = 256
#: after a failed dial of the splice port (or a tunnel without lite-tls), the agent opens streams without a
#: dedicated connection for this long
DIAL_BACKOFF: Final = 30.0


#: the schemes whose dedicated connections are TCP connections to the splice port
_TCP_SCHEMES: Final = ("tcp", "tls")
#: the schemes whose dedicated connections are keyless conversations of their own transport to the splice port
#: (UDP)
_CONVERSATION_SCHEMES: Final = ("kcp", "rudp")
#: a dedicated conversation's URL takes the server URL's transport options but these
_NOT_CONVERSATION_OPTIONS: Final = frozenset({"splice"})
#: the tunnel a dedicated conversation carries: one stream, no lite-tls of its own
_CONVERSATION_CONFIG: Final = TunnelConfig(lite_tls=False)


def splice_port(endpoint: Endpoint) -> int | None:
    """The ``splice=PORT`` option of a ``tcp://``, ``tls://``, ``kcp://`` or ``rudp://`` URL (checked by the
    transport), or None (left out, or ``off``); None too where the platform cannot splice."""
    text = endpoint.params.get("splice")
    if text is None or not may_splice(endpoint):
        return None
    return int(text)


def may_splice(endpoint: Endpoint) -> bool:
    """Whether lite-tls streams of a tunnel to ``endpoint`` may leave over dedicated connections: the platform
    can splice, the transport has splice mode, and the URL does not say ``splice=off``. An agent whose server URL
    names no port uses the one the server announces (``SPLICE_PORT`` in its SETTINGS)."""
    return (
        SPLICE_AVAILABLE
        and endpoint.scheme in (*_TCP_SCHEMES, *_CONVERSATION_SCHEMES)
        and endpoint.params.get("splice") != "off"
    )


def conversation_endpoint(endpoint: Endpoint, port: int) -> Endpoint:
    """The endpoint of ``endpoint``'s dedicated conversations (``kcp://``, ``rudp://``): its scheme and host,
    ``port``, and its options but ``splice``."""
    params = {k: v for k, v in endpoint.params.items() if k not in _NOT_CONVERSATION_OPTIONS}
    return dataclasses.replace(endpoint, port=port, params=params)


def _bridge(
    stream: TunnelStream, over: Callable[[], None], tasks: set[asyncio.Task[object]]
) -> socket.socket:
    """A socket whose peer is ``stream``: one socket of a pair, the other relayed to the stream from now on.
    ``over`` is called once that relay is over (its task is kept in ``tasks`` meanwhile)."""
    near, far = socket.socketpair()
    for sock in (near, far):  # the default buffers (about 200 KiB) cost a sixth more CPU per MB at both ends
        tune_tcp(sock)
    near.setblocking(False)
    end = SocketEnd()
    try:
        attach_socket(far, end)
    except BaseException:
        near.close()
        far.close()
        raise
    relay = Relay(end, TunnelEnd(stream))
    task: asyncio.Task[object] = asyncio.get_running_loop().create_task(relay.wait())
    tasks.add(task)

    def done(task: asyncio.Task[object]) -> None:
        tasks.discard(task)
        over()

    task.add_done_callback(done)
    return near


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def ticket_of(metadata: StreamMetadata | None) -> bytes | None:
    """The ticket a SYN names, or None (absent or malformed: the stream is muxed)."""
    if metadata is None or metadata.kind != "lite-tls":
        return None
    for name, value in metadata.headers:
        if name == SPLICE_HEADER:
            try:
                ticket = bytes.fromhex(value)
            except ValueError:
                return None
            return ticket if len(ticket) == TICKET_LEN else None
    return None


class TicketBook:
    """The server's meeting point of tickets named in SYNs and dedicated connections that present them. Each
    ticket binds at most one connection to one stream, once: a presented ticket is forgotten, and a second
    connection with it is closed; a connection whose ticket no open stream named is kept :data:`CLAIM_TIMEOUT`
    (its SYN may still be on its way), then closed."""

    def __init__(self) -> None:
        self._claims: dict[bytes, Callable[[socket.socket], None]] = {}
        self._parked: dict[bytes, tuple[socket.socket, asyncio.TimerHandle]] = {}
        #: connections refused (no SYN named their ticket in time, a ticket twice, too many parked, a stream
        #: that could no longer splice)
        self.refused = 0
        #: connections accepted on the splice port
        self.connections = 0

    def expect(self, ticket: bytes, take: Callable[[socket.socket], None]) -> Callable[[], None]:
        """A stream named ``ticket``: ``take`` gets the connection that presents it (now, if it came first).
        Returns what forgets the ticket (the stream closed)."""
        parked = self._parked.pop(ticket, None)
        if parked is not None:
            parked[1].cancel()
            take(parked[0])
            return _nothing
        self._claims[ticket] = take

        def forget() -> None:
            if self._claims.get(ticket) is take:
                del self._claims[ticket]

        return forget

    def present(self, ticket: bytes, sock: socket.socket) -> None:
        """A dedicated connection sent ``ticket``: hand it to the stream that named it, or keep it a while."""
        take = self._claims.pop(ticket, None)
        if take is not None:
            take(sock)
            return
        if ticket in self._parked or len(self._parked) >= MAX_PARKED:
            self._refuse(sock, "ticket not accepted")
            return
        handle = asyncio.get_running_loop().call_later(CLAIM_TIMEOUT, self._expire, ticket)
        self._parked[ticket] = (sock, handle)

    def _expire(self, ticket: bytes) -> None:
        parked = self._parked.pop(ticket, None)
        if parked is not None:
            self._refuse(parked[0], "no stream named its ticket")

    def _refuse(self, sock: socket.socket, reason: str) -> None:
        self.refused += 1
        log.info("lite_tls.dedicated_refused", reason=reason)
        sock.close()

    def close(self) -> None:
        for sock, handle in self._parked.values():
            handle.cancel()
            sock.close()
        self._parked.clear()
        self._claims.clear()


def _nothing() -> None:
    pass


async def _read_exact(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            break
        data += chunk
    return data


async def _receive_ticket(sock: socket.socket, book: TicketBook) -> None:
    """``sock`` (a dedicated connection) has :data:`TICKET_TIMEOUT` seconds to send its ticket to ``book``."""
    try:
        with anyio.move_on_after(TICKET_TIMEOUT):
            ticket = await _read_exact(sock, TICKET_LEN)
            if len(ticket) == TICKET_LEN:
                book.present(ticket, sock)
                return
        book._refuse(sock, "no ticket")
    except OSError:
        sock.close()


async def serve_splice_port(
    endpoint: Endpoint,
    port: int,
    book: TicketBook,
    *,
    admit: Callable[[str], bool] | None = None,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Accept dedicated connections on ``port`` of ``endpoint``'s host until cancelled (TCP connections for
    ``tcp://`` and ``tls://``, keyless conversations of the same transport for ``kcp://`` and ``rudp://``): each has :data:`TICKET_TIMEOUT`
    seconds to send its ticket, which goes to ``book``. A conversation starts only from a source host ``admit``
    admits (None: any; the server admits the hosts its tunnels came from, so that the keyless port answers no
    stranger's datagram). Reports ``host:port``."""
    try:
        if endpoint.scheme in _CONVERSATION_SCHEMES:
            await _serve_conversations(conversation_endpoint(endpoint, port), book, admit, task_status)
        else:
            await _serve_connections(endpoint.host, port, book, task_status)
    finally:
        book.close()


async def _serve_connections(
    host: str, port: int, book: TicketBook, task_status: anyio.abc.TaskStatus[str]
) -> None:
    loop = asyncio.get_running_loop()
    # every address ``host`` resolves to, as the tunnel's own TCP listener binds them (the agent dials the splice
    # port at the address it reached the tunnel at); a fixed port of a worker's was bound by its supervisor (one
    # per worker slot), port 0 is this process's own
    with listening.own_sockets() if port == 0 else contextlib.nullcontext():
        lsocks = await listening.bind_stream_sockets(host, port, backlog=1024)
    pending = 0

    async def receive_ticket(sock: socket.socket) -> None:
        nonlocal pending
        try:
            await _receive_ticket(sock, book)
        finally:
            pending -= 1

    async def accept(lsock: socket.socket, tg: anyio.abc.TaskGroup) -> None:
        nonlocal pending
        while True:
            try:
                sock, _ = await loop.sock_accept(lsock)
            except OSError as exc:
                log.warning("lite_tls.splice_accept_failed", error=str(exc))
                await anyio.sleep(0.1)
                continue
            if pending >= MAX_PARKED:
                book._refuse(sock, "too many connections without a ticket")
                continue
            book.connections += 1
            sock.setblocking(False)
            tune_tcp(sock)
            pending += 1
            tg.start_soon(receive_ticket, sock)

    try:
        addresses = [_address(*lsock.getsockname()[:2]) for lsock in lsocks]
        task_status.started(addresses[0])
        log.info("lite_tls.splice_listening", address=addresses[0], addresses=addresses)
        async with anyio.create_task_group() as tg:
            for lsock in lsocks:
                tg.start_soon(accept, lsock, tg)
    finally:
        for lsock in lsocks:
            lsock.close()


async def _serve_conversations(
    endpoint: Endpoint,
    book: TicketBook,
    admit: Callable[[str], bool] | None,
    task_status: anyio.abc.TaskStatus[str],
) -> None:
    """Serve keyless conversations (``kcp://``, ``rudp://``) on ``endpoint``: each carries a tunnel of one stream, whose bytes are
    its dedicated connection's (bridged to a socket pair); a conversation with no stream after
    :data:`TICKET_TIMEOUT` seconds, or over :data:`MAX_PARKED` of them waiting for their ticket, is closed."""
    # a fixed port of a worker's was bound by its supervisor (one per worker slot); port 0: this process's own
    with listening.own_sockets() if endpoint.port == 0 else contextlib.nullcontext():
        listener = await get_transport(endpoint.scheme).listen(endpoint, security=SecurityConfig(admit=admit))
    tasks: set[asyncio.Task[object]] = set()
    pending = 0

    async def converse(link: Link) -> None:
        nonlocal pending
        if pending >= MAX_PARKED:
            log.info("lite_tls.dedicated_refused", reason="too many conversations without a ticket")
            book.refused += 1
            await link.aclose()
            return
        book.connections += 1
        pending += 1
        waiting = True
        conn: TunnelConnection

        def on_stream(stream: TunnelStream) -> Awaitable[None] | None:
            nonlocal waiting, pending
            if not waiting:  # one stream per conversation
                stream.refuse("a dedicated conversation carries one stream")
                return None
            waiting = False
            pending -= 1
            came.set()
            stream.accept()
            return _receive_ticket(
                _bridge(stream, lambda: conn.shutdown("dedicated stream over"), tasks), book
            )

        conn = TunnelConnection(link, role=Role.SERVER, config=_CONVERSATION_CONFIG, handler=on_stream)
        came = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(conn.run)
                with anyio.move_on_after(TICKET_TIMEOUT):
                    await came.wait()
                if waiting:
                    conn.shutdown("no stream", graceful=False)
        finally:
            if waiting:
                pending -= 1

    try:
        local = listener.extra(SocketAttribute.local_address)
        address = f"{local[0]}:{local[1]}"
        task_status.started(address)
        log.info("lite_tls.splice_listening", address=address, transport=endpoint.scheme)
        async with anyio.create_task_group() as tg:
            await listener.serve(converse, tg)
    finally:
        await listener.aclose()


def offer_dedicated(book: TicketBook, stream: TunnelStream) -> None:
    """Server: if ``stream``'s SYN names a ticket, the connection that presents it is bound to the stream (the
    ACK written, the stream spliced over it) if it comes while the stream :attr:`~TunnelStream.may_splice`
    (no marker or notice has gone either way), and closed otherwise. The ticket is forgotten when the stream
    closes."""
    ticket = ticket_of(stream.metadata)
    if ticket is None or not stream.lite_tls:
        return

    def take(sock: socket.socket) -> None:
        if not stream.may_splice:
            book._refuse(sock, "the stream can no longer splice")
            return
        try:
            sock.send(ACK)  # one byte into an empty socket buffer: never short
        except OSError:
            sock.close()
            return
        stream.splice_over(sock)

    stream.dedicated_expected(book.expect(ticket, take))


class SpliceDialer:
    """Agent: opens lite-tls streams that name a ticket, and dials their dedicated connection only once the
    user's first record is a ClientHello record (``TunnelStream.splice_when_tls``), to the splice port of the
    server whose tunnel carries the stream: the port its URL names (``splice=PORT``), else the one that server
    announced. With several servers each stream's connection goes to its own tunnel's server, the only one that
    knows its ticket; after a failed dial, streams to that splice port stay muxed for :data:`DIAL_BACKOFF`."""

    def __init__(self) -> None:
        #: "host:port" of a splice port -> until when (monotonic) streams that would dial it stay muxed
        self._backoff_until: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: the conversations' tunnels and bridges
        self._running: set[asyncio.Task[object]] = set()

    @staticmethod
    def port_of(server: Endpoint, announced: int | None) -> int | None:
        """The splice port of a tunnel to ``server`` that announced ``announced``: the URL's, else the one announced,
        None where it has none (or the URL says ``splice=off``)."""
        if not may_splice(server):
            return None
        named = splice_port(server)
        return named if named is not None else announced

    def _backing_off(self, server: Endpoint, port: int) -> bool:
        until = self._backoff_until.get(_address(server.host, port))
        return until is not None and time.monotonic() < until

    def dials(self, tunnels: Sequence[TunnelConnection]) -> bool:
        """Whether a lite-tls stream opened now on one of ``tunnels`` (an agent's tunnels up now) would name a
        ticket, and so must be opened by :meth:`open`: with no tunnel up yet (:meth:`open` finds out), or when one
        of them goes to a server with a splice port (named or announced) that is not backed off."""
        if not tunnels:
            return True
        for conn in tunnels:
            server = conn.server
            if server is None:
                continue
            port = self.port_of(server, conn.peer_splice_port)
            if port is not None and not self._backing_off(server, port):
                return True
        return False

    async def open(
        self, metadata: StreamMetadata, conn: TunnelConnection, *, wait_accepted: bool = True
    ) -> TunnelStream:
        """Open a lite-tls stream on ``conn`` (an agent's tunnel; waiting for the SYN-ACK or not, as the front
        asked), naming a ticket where that tunnel's server has a splice port that is not backed off; its dedicated
        connection is dialed once its ClientHello came. Anywhere else the stream names none and stays muxed."""
        server = conn.server
        port = None if server is None else self.port_of(server, conn.peer_splice_port)
        if server is None or port is None or self._backing_off(server, port):
            return await conn.open_stream(metadata, wait_accepted=wait_accepted)
        ticket = secrets.token_bytes(TICKET_LEN)
        md = dataclasses.replace(metadata, headers=(*metadata.headers, (SPLICE_HEADER, ticket.hex())))
        stream = await conn.open_stream(md, wait_accepted=wait_accepted)
        if not stream.lite_tls:
            # the tunnel did not agree to lite-tls (its server takes no ticket): the next streams to that port name
            # none for a while, so that they open without waiting (0-RTT)
            self._backoff_until[_address(server.host, port)] = time.monotonic() + DIAL_BACKOFF
            return stream
        stream.splice_when_tls(lambda s: self._dial_for(s, server, ticket, port))
        return stream

    def _dial_for(self, stream: TunnelStream, server: Endpoint, ticket: bytes, port: int) -> None:
        loop = asyncio.get_running_loop()
        if self._backing_off(server, port):  # (called from the stream's step: settle after it)
            loop.call_soon(stream.dedicated_settled, None)
            return
        task = loop.create_task(self._connect(stream, server, ticket, port))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, stream: TunnelStream, server: Endpoint, ticket: bytes, port: int) -> None:
        sock = await self._dial(server, ticket, port)
        if sock is None:
            stream.dedicated_settled(None)
            return
        try:
            with anyio.fail_after(ACK_TIMEOUT):
                answer = await _read_exact(sock, len(ACK))
        except (OSError, TimeoutError) as exc:
            # no answer in time: the stream leaves muxed, and its marker tells a server that bound it all the same
            sock.close()
            self._back_off("lite_tls.splice_no_ack", server, port, exc)
            stream.dedicated_settled(None)
            return
        if answer == ACK:
            stream.dedicated_settled(sock)
            return
        sock.close()
        if answer:  # not a vtunnel splice port
            self._back_off("lite_tls.splice_bad_answer", server, port, ValueError(f"answered {answer.hex()}"))
        stream.dedicated_settled(None)  # (closed without the ACK: the server did not bind it)

    def _back_off(self, event: str, server: Endpoint, port: int, exc: BaseException) -> None:
        """Streams that would dial ``server``'s splice ``port`` go muxed for :data:`DIAL_BACKOFF` seconds after a
        dedicated connection to it failed (``event``)."""
        address = _address(server.host, port)
        self._backoff_until[address] = time.monotonic() + DIAL_BACKOFF
        log.warning(event, address=address, error=str(exc) or type(exc).__name__, muxed_for=DIAL_BACKOFF)

    async def _dial(self, server: Endpoint, ticket: bytes, port: int) -> socket.socket | None:
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            with anyio.fail_after(CLAIM_TIMEOUT):
                if server.scheme in _CONVERSATION_SCHEMES:
                    sock = await self._converse(conversation_endpoint(server, port))
                else:
                    infos = await anyio.getaddrinfo(server.host, port, type=socket.SOCK_STREAM)
                    family, _, _, _, address = infos[0]
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    sock.setblocking(False)
                    tune_tcp(sock)
                    await loop.sock_connect(sock, address)
                await loop.sock_sendall(sock, ticket)
            return sock
        except (OSError, TimeoutError) as exc:
            if sock is not None:
                sock.close()
            self._back_off("lite_tls.splice_dial_failed", server, port, exc)
            return None
        except BaseException:
            if sock is not None:
                sock.close()
            raise

    async def _converse(self, endpoint: Endpoint) -> socket.socket:
        """A new keyless conversation (``kcp://``, ``rudp://``) to the splice port at ``endpoint``, its one stream
        bridged to the socket returned; the conversation ends once that stream is over. Raises ``OSError`` (the
        transport's errors included) when it cannot be had."""
        try:
            link = await get_transport(endpoint.scheme).connect(endpoint, security=SecurityConfig())
        except Exception as exc:
            raise OSError(f"no dedicated conversation: {exc}") from exc
        conn = TunnelConnection(
            link, role=Role.CLIENT, config=_CONVERSATION_CONFIG, name=f"{endpoint}#lite-tls"
        )
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(conn.run())
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        try:
            await conn.wait_ready()
            stream = conn.start_stream()
        except BaseException as exc:
            conn.shutdown("dedicated conversation failed", graceful=False)
            if isinstance(exc, Exception):
                raise OSError(f"no dedicated conversation: {exc}") from exc
            raise
        return _bridge(stream, lambda: conn.shutdown("dedicated stream over"), self._running)
