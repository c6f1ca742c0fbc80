"""Fixtures shared by the application tests: loopback servers started inside the test."""

from __future__ import annotations

import hashlib
import http.server
import socketserver
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import cast

import anyio
import pytest
import trustme
from anyio.abc import ByteStream, SocketAttribute, SocketListener, SocketStream

from vtunnel.apps.dialer import Dialer, DialError
from vtunnel.apps.pipe import Leg, Opener, StreamLeg
from vtunnel.apps.policy import ExitPolicy
from vtunnel.protocol import StreamMetadata
from vtunnel.runtime.errors import StreamRefused


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[SocketStream, SocketStream]]:
    """Two ends of one real TCP connection on 127.0.0.1."""
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(SocketAttribute.local_port)
        client = await anyio.connect_tcp("127.0.0.1", port)
        server = await cast(SocketListener, listener.listeners[0]).accept()
        async with client, server:
            yield client, server


def direct_opener(dialer: Dialer) -> Opener:
    """An opener that connects straight to the destination with a real dialer (no tunnel in between)."""

    async def open_stream(metadata: StreamMetadata) -> Leg:
        assert metadata.authority is not None
        try:
            return StreamLeg(await dialer.dial(metadata.authority))
        except DialError as exc:
            raise StreamRefused(exc.error) from None

    return open_stream


def on_leg(front: Callable[[Leg], Awaitable[None]]) -> Callable[[SocketStream], Awaitable[None]]:
    """A front (which serves a leg) as a handler of anyio socket streams, for :func:`serve_front`."""

    async def serve(stream: SocketStream) -> None:
        await front(StreamLeg(stream))

    return serve


def loopback_dialer() -> Dialer:
    return Dialer(ExitPolicy(allow_private=True), connect_timeout=5.0)


@asynccontextmanager
async def serve_front(handler: Callable[[SocketStream], Awaitable[None]]) -> AsyncIterator[int]:
    """Run ``handler`` for every connection to a listener on 127.0.0.1; yield its port."""
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handler)
            yield port
            tg.cancel_scope.cancel()


def body_for(path: str, size: int) -> bytes:
    """Deterministic, path-dependent bytes of the given size."""
    seed = hashlib.sha256(path.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


class _OriginHandler(http.server.BaseHTTPRequestHandler):
    """``/bytes/N``: N bytes with Content-Length; ``/chunked/N``: chunked; ``/close/N``: close-delimited;
    ``POST /echo``: the request body back; ``/headers``: the request line and headers as received."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _size(self) -> int:
        return int(self.path.rsplit("/", 1)[1])

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def do_GET(self) -> None:
        if self.path.startswith("/bytes/"):
            body = body_for(self.path, self._size())
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path.startswith("/chunked/"):
            body = body_for(self.path, self._size())
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 7000):
                piece = body[i : i + 7000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path.startswith("/close/"):
            body = body_for(self.path, self._size())
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        elif self.path.split("?")[0] == "/headers":
            body = (self.requestline + "\n" + str(self.headers)).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(self._size()))
        self.end_headers()

    def do_POST(self) -> None:
        body = self._read_body()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _ThreadingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 256


@dataclass(frozen=True, slots=True)
class Origin:
    port: int
    authority: str
    ca_file: str | None = None


@pytest.fixture
def origin() -> Iterator[Origin]:
    """A plain HTTP/1.1 origin server on 127.0.0.1 (threads; independent of the event loop)."""
    server = _ThreadingServer(("127.0.0.1", 0), _OriginHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        yield Origin(port=port, authority=f"127.0.0.1:{port}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _TLSServer(_ThreadingServer):
    context: ssl.SSLContext

    def finish_request(self, request: object, client_address: object) -> None:
        # The TLS handshake runs in the connection's own thread, not in the accept loop.
        try:
            tls = self.context.wrap_socket(request, server_side=True)  # type: ignore[arg-type]
        except (ssl.SSLError, OSError):
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


@pytest.fixture
def tls_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    """An HTTPS origin on 127.0.0.1 with a certificate for ``localhost`` and 127.0.0.1 from a test CA."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = _TLSServer(("127.0.0.1", 0), _OriginHandler)
    server.context = context
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        yield Origin(port=port, authority=f"127.0.0.1:{port}", ca_file=str(ca_file))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _DatagramEnd(ByteStream):
    """One end of an in-memory message-preserving stream (stands for a ``"udp"`` tunnel stream)."""

    def __init__(
        self,
        send: anyio.abc.ObjectSendStream[bytes],
        receive: anyio.abc.ObjectReceiveStream[bytes],
    ) -> None:
        self._send = send
        self._receive = receive

    async def send(self, item: bytes) -> None:
        if len(item) > 16384 + 262:
            raise ValueError("datagram too large")
        await self._send.send(bytes(item))

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self._receive.receive()

    async def send_eof(self) -> None:
        await self._send.aclose()

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def datagram_pair() -> tuple[ByteStream, ByteStream]:
    a_send, b_receive = anyio.create_memory_object_stream[bytes](64)
    b_send, a_receive = anyio.create_memory_object_stream[bytes](64)
    return _DatagramEnd(a_send, a_receive), _DatagramEnd(b_send, b_receive)


class DirectExit:
    """Opens "tcp" streams with a real dialer and "udp" streams served by the real UDP exit relay."""

    def __init__(self, dialer: Dialer, tg: anyio.abc.TaskGroup) -> None:
        self.dialer = dialer
        self.tg = tg
        self.tcp = direct_opener(dialer)
        self.opened: list[StreamMetadata] = []

    async def open(self, metadata: StreamMetadata) -> Leg:
        from vtunnel.apps.udprelay import serve_udp_stream

        self.opened.append(metadata)
        if metadata.kind == "udp":
            near, far = datagram_pair()
            self.tg.start_soon(serve_udp_stream, far, self.dialer)
            return StreamLeg(near)
        return await self.tcp(metadata)


@asynccontextmanager
async def direct_exit(dialer: Dialer | None = None) -> AsyncIterator[DirectExit]:
    async with anyio.create_task_group() as tg:
        yield DirectExit(dialer or loopback_dialer(), tg)
        tg.cancel_scope.cancel()
