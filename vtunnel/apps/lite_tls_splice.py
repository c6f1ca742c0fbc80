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

This module is I/O glue for ``apps.agent`` and ``apps.server``; the switch itself is the runtime's
(``TunnelStream.splice_over``) and the relay's (``Relay.splice``, ``io.splice``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Final

import anyio
import structlog

from vtunnel.io.splice import SPLICE_AVAILABLE
from vtunnel.io.tuning import tune_tcp
from vtunnel.protocol import StreamMetadata
from vtunnel.runtime.tunnel_stream import TunnelStream
from vtunnel.transports.base import Endpoint

__all__ = [
    "ACK",
    "ACK_TIMEOUT",
    "CLAIM_TIMEOUT",
    "SPLICE_HEADER",
    "TICKET_LEN",
    "SpliceDialer",
    "TicketBook",
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


def splice_port(endpoint: Endpoint) -> int | None:
    """The ``splice=PORT`` option of a ``tcp://`` or ``tls://`` URL (checked by the transport), or None; None
    too where the platform cannot splice."""
    text = endpoint.params.get("splice")
    if text is None or not SPLICE_AVAILABLE or endpoint.scheme not in ("tcp", "tls"):
        return None
    return int(text)


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


async def serve_splice_port(
    host: str,
    port: int,
    book: TicketBook,
    *,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Accept dedicated connections on ``host:port`` until cancelled: each has :data:`TICKET_TIMEOUT` seconds
    to send its ticket, which goes to ``book``."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    lsock = socket.create_server((host, port), family=family, backlog=1024, reuse_port=False)
    lsock.setblocking(False)
    pending = 0

    async def receive_ticket(sock: socket.socket) -> None:
        nonlocal pending
        try:
            with anyio.move_on_after(TICKET_TIMEOUT):
                ticket = await _read_exact(sock, TICKET_LEN)
                if len(ticket) == TICKET_LEN:
                    book.present(ticket, sock)
                    return
            book._refuse(sock, "no ticket")
        except OSError:
            sock.close()
        finally:
            pending -= 1

    try:
        local = lsock.getsockname()
        task_status.started(f"{local[0]}:{local[1]}")
        log.info("lite_tls.splice_listening", address=f"{local[0]}:{local[1]}")
        async with anyio.create_task_group() as tg:
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
    finally:
        lsock.close()
        book.close()


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
    user's first record is a ClientHello record (``TunnelStream.splice_when_tls``)."""

    def __init__(self, server: Endpoint, port: int) -> None:
        self.host = server.host
        self.port = port
        self._backoff_until = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    async def open(
        self, metadata: StreamMetadata, open_stream: Callable[[StreamMetadata], Awaitable[TunnelStream]]
    ) -> TunnelStream:
        """Open a lite-tls stream with ``open_stream`` (waiting for the SYN-ACK or not, as the front asked), naming a ticket; its
        dedicated connection is dialed once its ClientHello came."""
        if time.monotonic() < self._backoff_until:
            return await open_stream(metadata)
        ticket = secrets.token_bytes(TICKET_LEN)
        md = dataclasses.replace(metadata, headers=(*metadata.headers, (SPLICE_HEADER, ticket.hex())))
        stream = await open_stream(md)
        if not stream.lite_tls:  # the tunnel did not agree to lite-tls: no tickets for a while
            self._backoff_until = time.monotonic() + DIAL_BACKOFF
            return stream
        stream.splice_when_tls(lambda s: self._dial_for(s, ticket))
        return stream

    def _dial_for(self, stream: TunnelStream, ticket: bytes) -> None:
        loop = asyncio.get_running_loop()
        if time.monotonic() < self._backoff_until:  # (called from the stream's step: settle after it)
            loop.call_soon(stream.dedicated_settled, None)
            return
        task = loop.create_task(self._connect(stream, ticket))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, stream: TunnelStream, ticket: bytes) -> None:
        sock = await self._dial(ticket)
        if sock is None:
            stream.dedicated_settled(None)
            return
        try:
            with anyio.fail_after(ACK_TIMEOUT):
                answer = await _read_exact(sock, len(ACK))
        except (OSError, TimeoutError) as exc:
            # no answer in time: the stream leaves muxed, and its marker tells a server that bound it all the same
            sock.close()
            self._back_off("lite_tls.splice_no_ack", exc)
            stream.dedicated_settled(None)
            return
        if answer == ACK:
            stream.dedicated_settled(sock)
            return
        sock.close()
        if answer:  # not a vtunnel splice port
            self._back_off("lite_tls.splice_bad_answer", ValueError(f"answered {answer.hex()}"))
        stream.dedicated_settled(None)  # (closed without the ACK: the server did not bind it)

    def _back_off(self, event: str, exc: BaseException) -> None:
        """Streams go muxed for :data:`DIAL_BACKOFF` seconds after a dedicated connection failed (``event``)."""
        self._backoff_until = time.monotonic() + DIAL_BACKOFF
        log.warning(
            event,
            address=f"{self.host}:{self.port}",
            error=str(exc) or type(exc).__name__,
            muxed_for=DIAL_BACKOFF,
        )

    async def _dial(self, ticket: bytes) -> socket.socket | None:
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            with anyio.fail_after(CLAIM_TIMEOUT):
                infos = await anyio.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
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
            self._back_off("lite_tls.splice_dial_failed", exc)
            return None
        except BaseException:
            if sock is not None:
                sock.close()
            raise
