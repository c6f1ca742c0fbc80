"""``ws://HOST:PORT?path=/tunnel`` and ``wss://``: a tunnel inside one WebSocket connection (binary messages).

The WebSocket protocol itself is wsproto's (sans-IO); this module only pumps bytes between it and an anyio socket.
A request for another path, or anything that is not a WebSocket upgrade, gets an HTTP 404/400 and is closed.
"""

from __future__ import annotations

import ssl
from collections import deque
from typing import Any, ClassVar

import anyio
from anyio.abc import ByteStream, Listener
from anyio.streams.tls import TLSStream
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from vtunnel.transports.base import ByteStreamTransport, Endpoint, TransportError
from vtunnel.transports.tcp import tls_client_context, tls_server_context

__all__ = ["WebSocketStream", "WebSocketTransport"]

HANDSHAKE_TIMEOUT = 10.0
READ_SIZE = 256 * 1024
SUBPROTOCOL = "vtunnel"
_TLS_OPTIONS = {"cert", "key", "ca", "servername"}
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class WebSocketStream(ByteStream):
    """Binary WebSocket messages as a byte stream (message boundaries carry no meaning)."""

    def __init__(self, sock: ByteStream, ws: WSConnection, pending: list[bytes]) -> None:
        self._sock = sock
        self._ws = ws
        self._buffer: deque[bytes] = deque(pending)
        self._eof = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while not self._buffer:
            if self._eof:
                raise anyio.EndOfStream
            data = await self._sock.receive(READ_SIZE)
            try:
                self._ws.receive_data(data)
                for event in self._ws.events():
                    if isinstance(event, BytesMessage):
                        if event.data:
                            self._buffer.append(bytes(event.data))
                    elif isinstance(event, CloseConnection):
                        self._eof = True
                        out = self._ws.send(event.response())
                        if out:
                            await self._sock.send(out)
                    elif isinstance(event, TextMessage):
                        raise anyio.BrokenResourceError("text message on a binary tunnel")
            except (LocalProtocolError, RemoteProtocolError) as exc:
                raise anyio.BrokenResourceError(f"websocket protocol error: {exc}") from None
        chunk = self._buffer.popleft()
        if len(chunk) > max_bytes:
            self._buffer.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        return chunk

    async def send(self, item: bytes) -> None:
        try:
            out = self._ws.send(BytesMessage(data=item))
        except LocalProtocolError as exc:
            raise anyio.ClosedResourceError(str(exc)) from None
        await self._sock.send(out)

    async def send_eof(self) -> None:
        """WebSocket has no half-close: a close frame ends both directions."""
        await self.aclose()

    async def aclose(self) -> None:
        try:
            out = self._ws.send(CloseConnection(code=1000))
            with anyio.move_on_after(1, shield=True):
                await self._sock.send(out)
        except (LocalProtocolError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        await self._sock.aclose()

    @property
    def extra_attributes(self) -> Any:
        return self._sock.extra_attributes


def _path(endpoint: Endpoint) -> str:
    path = endpoint.params.get("path", "/")
    if not path.startswith("/"):
        raise TransportError(f"ws:// path must start with '/': {path!r}")
    return path


async def _client_handshake(sock: ByteStream, endpoint: Endpoint) -> WebSocketStream:
    ws = WSConnection(ConnectionType.CLIENT)
    host = endpoint.params.get("host", endpoint.hostport)
    await sock.send(ws.send(Request(host=host, target=_path(endpoint), subprotocols=[SUBPROTOCOL])))
    pending: list[bytes] = []
    accepted = False
    with anyio.fail_after(HANDSHAKE_TIMEOUT):
        while not accepted:
            try:
                ws.receive_data(await sock.receive(READ_SIZE))
                for event in ws.events():
                    if isinstance(event, AcceptConnection):
                        accepted = True
                    elif isinstance(event, RejectConnection):
                        raise TransportError(f"websocket upgrade refused with HTTP {event.status_code}")
                    elif isinstance(event, BytesMessage):
                        pending.append(bytes(event.data))
            except RemoteProtocolError as exc:
                raise TransportError(f"not a websocket server: {exc}") from None
    return WebSocketStream(sock, ws, pending)


async def _server_handshake(sock: ByteStream, path: str) -> WebSocketStream | None:
    ws = WSConnection(ConnectionType.SERVER)
    with anyio.fail_after(HANDSHAKE_TIMEOUT):
        while True:
            try:
                ws.receive_data(await sock.receive(READ_SIZE))
                for event in ws.events():
                    if isinstance(event, Request):
                        if event.target != path:
                            await sock.send(ws.send(RejectConnection(status_code=404)))
                            return None
                        proto = SUBPROTOCOL if SUBPROTOCOL in event.subprotocols else None
                        await sock.send(ws.send(AcceptConnection(subprotocol=proto)))
                        return WebSocketStream(sock, ws, [])
            except RemoteProtocolError:
                await sock.send(BAD_REQUEST)
                return None


class WebSocketTransport(ByteStreamTransport):
    """``ws://`` and ``wss://`` (the WebSocket inside TLS, with tls://'s certificate options)."""

    schemes: ClassVar[tuple[str, ...]] = ("ws", "wss")
    description: ClassVar[str] = (
        "WebSocket (plugin: vtunnel-websocket), options path=/p, host=H; wss:// adds TLS (cert=, key=, ca=, servername=)"
    )

    def __init__(self) -> None:
        self._server_contexts: dict[str, ssl.SSLContext] = {}

    def check(self, endpoint: Endpoint) -> None:
        allowed = {"path", "host"} | (_TLS_OPTIONS if endpoint.scheme == "wss" else set())
        unknown = set(endpoint.params) - allowed
        if unknown:
            raise TransportError(f"unknown {endpoint.scheme}:// option(s): {', '.join(sorted(unknown))}")
        _path(endpoint)

    async def connect_stream(self, endpoint: Endpoint) -> ByteStream:
        self.check(endpoint)
        with anyio.fail_after(HANDSHAKE_TIMEOUT):
            sock: ByteStream = await anyio.connect_tcp(endpoint.host, endpoint.port)
        try:
            if endpoint.scheme == "wss":
                with anyio.fail_after(HANDSHAKE_TIMEOUT):
                    sock = await TLSStream.wrap(
                        sock,
                        hostname=endpoint.params.get("servername", endpoint.host),
                        ssl_context=tls_client_context(_tls_part(endpoint)),
                        standard_compatible=False,
                    )
            return await _client_handshake(sock, endpoint)
        except BaseException:
            await anyio.aclose_forcefully(sock)
            raise

    async def listen_streams(self, endpoint: Endpoint) -> Listener[ByteStream]:
        self.check(endpoint)
        if endpoint.scheme == "wss":
            self._server_contexts[str(endpoint)] = tls_server_context(_tls_part(endpoint))
        return await anyio.create_tcp_listener(local_host=endpoint.host, local_port=endpoint.port)

    async def accept_stream(self, stream: ByteStream, endpoint: Endpoint) -> ByteStream | None:
        if endpoint.scheme == "wss":
            stream = await TLSStream.wrap(
                stream,
                server_side=True,
                ssl_context=self._server_contexts[str(endpoint)],
                standard_compatible=False,
            )
        return await _server_handshake(stream, _path(endpoint))


def _tls_part(endpoint: Endpoint) -> Endpoint:
    """The TLS options of a wss:// URL alone (what the tls helpers read)."""
    return Endpoint(
        scheme="wss",
        host=endpoint.host,
        port=endpoint.port,
        params={k: v for k, v in endpoint.params.items() if k in _TLS_OPTIONS},
    )
