"""``tcp://HOST:PORT`` and ``tls://HOST:PORT``: tunnels over TCP, optionally inside standard TLS.

``tls://`` options (URL query): on the server ``cert`` and ``key`` (PEM files, required) and ``ca`` (to require and
verify client certificates); on the client ``ca`` (trust anchors; the system store when absent), ``servername``
(SNI and the name verified; the URL host by default), ``cert``/``key`` for a client certificate.

When a pre-shared key is configured the PSK handshake and AEAD records run on top of the byte stream (inside TLS for
``tls://``), so a peer without the key never reaches the tunnel protocol.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import anyio
import structlog
from anyio.abc import ByteStream, Listener, SocketAttribute, SocketListener, TaskGroup
from anyio.streams.stapled import MultiListener
from anyio.streams.tls import TLSStream

from vtunnel.io.limits import (
    AcceptBackoff,
    ThrottledWarning,
    is_out_of_resources,
    open_file_limit,
    pending_limit,
)
from vtunnel.io.tuning import tune_stream
from vtunnel.transports.base import ByteStreamTransport, Endpoint, SecurityConfig, TransportError

__all__ = ["SecuredListener", "TCPTransport", "TLSTransport"]

log = structlog.get_logger("vtunnel.transports.tcp")

CONNECT_TIMEOUT = 10.0


class SecuredListener(Listener[ByteStream]):
    """Wraps a listener: each accepted stream first passes ``prepare`` (TLS, PSK handshake), else it is dropped.

    Connections still in ``prepare`` are *pending*: unauthenticated, and at most :attr:`max_pending` of them
    (a quarter of the descriptor limit, see :func:`~vtunnel.io.limits.pending_limit`). A new connection
    beyond that closes the oldest pending one, so a flood of idle connections cannot keep a real client out: each
    connection gets at least ``max_pending`` newcomers' worth of time to prove itself. When ``accept`` fails
    because the process is out of descriptors (or the kernel of buffers or memory), the listener closes the
    oldest pending connection if there is one, otherwise waits and tries again; it never stops serving for it.
    """

    def __init__(
        self,
        inner: Listener[Any],
        prepare: Callable[[ByteStream], Awaitable[ByteStream | None]],
        *,
        local: str,
        max_pending: int | None = None,
    ) -> None:
        self._inner = inner
        self._prepare = prepare
        self._local = local
        #: connections in their handshake (or held silent after failing it) at most
        self.max_pending = pending_limit() if max_pending is None else max_pending
        #: pending connections, oldest first: cancelling one's scope closes it
        self._pending: dict[anyio.CancelScope, None] = {}
        #: pending connections closed to make room (a count, for logs and tests)
        self.shed = 0
        self._warn_exhausted = ThrottledWarning(log, "cannot accept connections for now: out of resources")
        self._warn_shedding = ThrottledWarning(
            log, "too many connections in their handshake: closing the oldest ones"
        )

    @property
    def local_address(self) -> str:
        return self._local

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _shed_oldest(self) -> bool:
        for scope in self._pending:
            if not scope.cancel_called:
                scope.cancel()
                self.shed += 1
                return True
        return False

    async def serve(self, handler: Callable[[ByteStream], Any], task_group: TaskGroup | None = None) -> None:
        inner = self._inner
        listeners: list[SocketListener] = []
        for listener in inner.listeners if isinstance(inner, MultiListener) else [inner]:
            if not isinstance(listener, SocketListener):
                raise TypeError(f"a secured listener accepts on sockets, not on {type(listener).__name__}")
            listeners.append(listener)
        async with contextlib.AsyncExitStack() as stack:
            if task_group is None:
                task_group = await stack.enter_async_context(anyio.create_task_group())
            async with anyio.create_task_group() as accepting:
                for listener in listeners:
                    accepting.start_soon(self._accept_loop, listener, handler, task_group)

    async def _accept_loop(
        self, listener: SocketListener, handler: Callable[[ByteStream], Any], task_group: TaskGroup
    ) -> None:
        backoff = AcceptBackoff()
        while True:
            try:
                raw = await listener.accept()
            except OSError as exc:
                if is_out_of_resources(exc):
                    freed = self._shed_oldest()
                    self._warn_exhausted(
                        error=exc.strerror, pending=self.pending, closed_oldest=freed, limit=open_file_limit()
                    )
                    # a shed connection's descriptor is closed when its task runs: give it that turn
                    if freed:
                        backoff.reset()
                        await anyio.sleep(0.01)
                    else:
                        await anyio.sleep(backoff.next())
                else:
                    log.warning("accept failed", error=exc.strerror or repr(exc))
                    await anyio.sleep(backoff.next())
                continue
            backoff.reset()
            if len(self._pending) >= self.max_pending:
                self._shed_oldest()
                self._warn_shedding(limit=self.max_pending)
            scope = anyio.CancelScope()
            self._pending[scope] = None
            task_group.start_soon(self._serve_one, raw, scope, handler)

    async def _serve_one(
        self, raw: ByteStream, scope: anyio.CancelScope, handler: Callable[[ByteStream], Any]
    ) -> None:
        stream: ByteStream | None = None
        try:
            with scope:
                tune_stream(raw)
                try:
                    stream = await self._prepare(raw)
                except Exception as exc:
                    log.debug("transport handshake failed", error=repr(exc))
        finally:
            self._pending.pop(scope, None)
            if stream is None:
                with anyio.CancelScope(shield=True):
                    await anyio.aclose_forcefully(raw)
        if stream is not None:
            await handler(stream)

    async def aclose(self) -> None:
        await self._inner.aclose()

    @property
    def extra_attributes(self) -> Any:
        return self._inner.extra_attributes


async def _secure_client(stream: ByteStream, security: SecurityConfig) -> ByteStream:
    if security.psk is None:
        return stream
    from vtunnel.transports.secure import secure_client

    return await secure_client(stream, security.psk, cipher=security.cipher)


def _server_preparer(
    security: SecurityConfig, tls: ssl.SSLContext | None
) -> Callable[[ByteStream], Awaitable[ByteStream | None]]:
    replay: Any = None
    limiter: Any = None
    if security.psk is not None:
        from vtunnel.security.replay import HandshakeLimiter, ReplayCache

        replay = ReplayCache()
        limiter = HandshakeLimiter(rate=50.0, burst=100)

    async def prepare(raw: ByteStream) -> ByteStream | None:
        stream: ByteStream = raw
        source = ""
        try:
            peer = raw.extra(SocketAttribute.remote_address)
            source = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        except Exception:
            pass
        if tls is not None:
            with anyio.fail_after(CONNECT_TIMEOUT):
                stream = await TLSStream.wrap(
                    raw, server_side=True, ssl_context=tls, standard_compatible=False
                )
        if security.psk is None:
            return stream
        from vtunnel.transports.secure import secure_server

        return await secure_server(
            stream, security.psk, replay=replay, limiter=limiter, source=source, cipher=security.cipher
        )

    return prepare


def _local_name(listener: Listener[Any]) -> str:
    try:
        addr = listener.extra(SocketAttribute.local_address)
    except Exception:
        return "?"
    if isinstance(addr, tuple):
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


class TCPTransport(ByteStreamTransport):
    schemes: ClassVar[tuple[str, ...]] = ("tcp",)
    description: ClassVar[str] = "TCP (TCP_NODELAY, 4 MiB buffers)"

    def check(self, endpoint: Endpoint) -> None:
        if endpoint.params:
            raise TransportError(f"tcp:// takes no options, got {', '.join(sorted(endpoint.params))}")

    async def connect_stream(self, endpoint: Endpoint, *, security: SecurityConfig) -> ByteStream:
        self.check(endpoint)
        with anyio.fail_after(CONNECT_TIMEOUT):
            raw = await anyio.connect_tcp(endpoint.host, endpoint.port)
        tune_stream(raw)
        try:
            return await _secure_client(raw, security)
        except BaseException:
            await anyio.aclose_forcefully(raw)
            raise

    async def listen_streams(self, endpoint: Endpoint, *, security: SecurityConfig) -> Listener[ByteStream]:
        self.check(endpoint)
        inner = await anyio.create_tcp_listener(local_host=endpoint.host, local_port=endpoint.port)
        return SecuredListener(inner, _server_preparer(security, None), local=_local_name(inner))


_TLS_CLIENT_OPTS = {"ca", "servername", "cert", "key"}
_TLS_SERVER_OPTS = {"ca", "cert", "key"}


class TLSTransport(ByteStreamTransport):
    schemes: ClassVar[tuple[str, ...]] = ("tls",)
    description: ClassVar[str] = "TCP inside standard TLS (certificates from cert=/key=/ca= options)"

    def check(self, endpoint: Endpoint) -> None:
        unknown = set(endpoint.params) - _TLS_CLIENT_OPTS
        if unknown:
            raise TransportError(f"unknown tls:// option(s): {', '.join(sorted(unknown))}")

    def _client_context(self, endpoint: Endpoint) -> ssl.SSLContext:
        ca = endpoint.params.get("ca")
        try:
            ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
            if "cert" in endpoint.params:
                ctx.load_cert_chain(endpoint.params["cert"], endpoint.params.get("key"))
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"tls:// client certificate set-up failed: {exc}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def _server_context(self, endpoint: Endpoint) -> ssl.SSLContext:
        unknown = set(endpoint.params) - _TLS_SERVER_OPTS
        if unknown:
            raise TransportError(f"unknown tls:// server option(s): {', '.join(sorted(unknown))}")
        if "cert" not in endpoint.params or "key" not in endpoint.params:
            raise TransportError("a tls:// server needs cert=FILE and key=FILE options")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(endpoint.params["cert"], endpoint.params["key"])
            if "ca" in endpoint.params:
                ctx.load_verify_locations(endpoint.params["ca"])
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"tls:// server certificate set-up failed: {exc}") from None
        return ctx

    async def connect_stream(self, endpoint: Endpoint, *, security: SecurityConfig) -> ByteStream:
        self.check(endpoint)
        ctx = self._client_context(endpoint)
        with anyio.fail_after(CONNECT_TIMEOUT):
            raw = await anyio.connect_tcp(endpoint.host, endpoint.port)
        tune_stream(raw)
        try:
            with anyio.fail_after(CONNECT_TIMEOUT):
                stream: ByteStream = await TLSStream.wrap(
                    raw,
                    hostname=endpoint.params.get("servername", endpoint.host),
                    ssl_context=ctx,
                    standard_compatible=False,
                )
            return await _secure_client(stream, security)
        except BaseException:
            await anyio.aclose_forcefully(raw)
            raise

    async def listen_streams(self, endpoint: Endpoint, *, security: SecurityConfig) -> Listener[ByteStream]:
        ctx = self._server_context(endpoint)
        inner = await anyio.create_tcp_listener(local_host=endpoint.host, local_port=endpoint.port)
        return SecuredListener(inner, _server_preparer(security, ctx), local=_local_name(inner))
