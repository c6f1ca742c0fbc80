r"""``tcp://HOST:PORT`` and ``tls://HOST:PORT``: tunnels over TCP, optionally inside standard TLS.

``tls://`` options (URL query): on the server ``cert`` and ``key`` (PEM files, required) and ``ca`` (to require and
verify client certificates); on the client ``ca`` (trust anchors; the system store when absent), ``servername``
(SNI and the name verified; the URL host by default), ``cert``/``key`` for a client certificate.

Both take ``splice=PORT`` (docs/lite-tls.md, splice mode): on the server, the port of the same host where
dedicated connections of spliced lite-tls streams are accepted; on the agent, that port, which turns splice mode
on. ``splice=0`` on a server takes any free port (the server logs it). The transport itself only checks the value; the applications act on it.

A server's listen URL may take ``proxy=1``: every connection begins with a PROXY protocol header from the balancer
in front (:mod:`vtunnel.transports.proxied`); a client's URL may not.

Both are :class:`~vtunnel.transports.base.ByteStreamTransport`\ s: when a pre-shared key is configured, the base
runs the PSK handshake and AEAD records on top of the byte stream (inside TLS for ``tls://``), so a peer without
the key never reaches the tunnel protocol.
"""

from __future__ import annotations

import ssl
from typing import ClassVar

import anyio
from anyio.abc import ByteStream, Listener
from anyio.streams.tls import TLSStream

from vtunnel.io.stream_sockets import LeanSocketStream, connect_lean, open_lean_listener
from vtunnel.transports.base import (
    ByteStreamTransport,
    Endpoint,
    SharedListening,
    TransportError,
    proxy_protocol,
)
from vtunnel.transports.link import Link, SocketLink
from vtunnel.transports.secure import SecuredListener
from vtunnel.transports.urloptions import check_splice

__all__ = ["SecuredListener", "TCPTransport", "TLSTransport", "tls_client_context", "tls_server_context"]

CONNECT_TIMEOUT = 10.0


class TCPTransport(ByteStreamTransport):
    schemes: ClassVar[tuple[str, ...]] = ("tcp",)
    description: ClassVar[str] = "TCP (TCP_NODELAY, 4 MiB buffers)"

    def check(self, endpoint: Endpoint) -> None:
        other = set(endpoint.params) - {"splice", "proxy"}
        if other:
            raise TransportError(
                f"tcp:// takes no options but splice and proxy, got {', '.join(sorted(other))}"
            )
        check_splice(f"{endpoint.scheme}://", endpoint.params)
        proxy_protocol(endpoint)

    async def connect_stream(self, endpoint: Endpoint) -> ByteStream:
        self.check(endpoint)
        _not_proxied(endpoint)
        with anyio.fail_after(CONNECT_TIMEOUT):
            return await connect_lean(endpoint.host, endpoint.port)

    async def listen_streams(self, endpoint: Endpoint) -> Listener[ByteStream]:
        self.check(endpoint)
        return await open_lean_listener(endpoint.host, endpoint.port)

    def shared_listening(self, endpoint: Endpoint) -> SharedListening:
        return SharedListening(datagram=False)

    def link_for(self, stream: ByteStream) -> Link:
        # every stream of this transport is one of its own lean socket streams (connect_stream, listen_streams)
        if not isinstance(stream, LeanSocketStream):
            raise TransportError(
                f"tcp:// links are made from its own socket streams, not {type(stream).__name__}"
            )
        return SocketLink(stream)


_TLS_CLIENT_OPTS = {"ca", "servername", "cert", "key", "splice", "proxy"}


def _not_proxied(endpoint: Endpoint) -> None:
    if "proxy" in endpoint.params:
        raise TransportError(
            f"{endpoint.scheme}:// option 'proxy' is a listener's (a server behind a balancer that sends the "
            "PROXY protocol), not a client's"
        )


class TLSTransport(ByteStreamTransport):
    schemes: ClassVar[tuple[str, ...]] = ("tls",)
    description: ClassVar[str] = "TCP inside standard TLS (certificates from cert=/key=/ca= options)"

    def check(self, endpoint: Endpoint) -> None:
        unknown = set(endpoint.params) - _TLS_CLIENT_OPTS
        if unknown:
            raise TransportError(f"unknown tls:// option(s): {', '.join(sorted(unknown))}")
        check_splice(f"{endpoint.scheme}://", endpoint.params)
        proxy_protocol(endpoint)

    def __init__(self) -> None:
        self._server_contexts: dict[str, ssl.SSLContext] = {}

    async def connect_stream(self, endpoint: Endpoint) -> ByteStream:
        self.check(endpoint)
        _not_proxied(endpoint)
        ctx = tls_client_context(endpoint)
        with anyio.fail_after(CONNECT_TIMEOUT):
            raw = await connect_lean(endpoint.host, endpoint.port)
        try:
            with anyio.fail_after(CONNECT_TIMEOUT):
                return await TLSStream.wrap(
                    raw,
                    hostname=endpoint.params.get("servername", endpoint.host),
                    ssl_context=ctx,
                    standard_compatible=False,
                )
        except BaseException:
            await anyio.aclose_forcefully(raw)
            raise

    async def listen_streams(self, endpoint: Endpoint) -> Listener[ByteStream]:
        check_splice(f"{endpoint.scheme}://", endpoint.params)
        proxy_protocol(endpoint)
        self._server_contexts[str(endpoint)] = tls_server_context(
            endpoint, allowed=frozenset({"ca", "cert", "key", "splice", "proxy"})
        )
        return await open_lean_listener(endpoint.host, endpoint.port)

    def shared_listening(self, endpoint: Endpoint) -> SharedListening:
        return SharedListening(datagram=False)

    async def accept_stream(self, stream: ByteStream, endpoint: Endpoint) -> ByteStream | None:
        ctx = self._server_contexts[str(endpoint)]
        return await TLSStream.wrap(stream, server_side=True, ssl_context=ctx, standard_compatible=False)


def tls_client_context(endpoint: Endpoint) -> ssl.SSLContext:
    """A TLS client context from a URL's options: ``ca`` (trust anchors; the system's when absent) and a client
    certificate from ``cert``/``key``. Public: plugins that speak TLS (wss://) take the same options."""
    ca = endpoint.params.get("ca")
    try:
        ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
        if "cert" in endpoint.params:
            ctx.load_cert_chain(endpoint.params["cert"], endpoint.params.get("key"))
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"{endpoint.scheme}:// client certificate set-up failed: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def tls_server_context(
    endpoint: Endpoint, *, allowed: frozenset[str] = frozenset({"ca", "cert", "key"})
) -> ssl.SSLContext:
    """A TLS server context from a URL's options: ``cert`` and ``key`` (required) and ``ca`` (to require and
    verify client certificates); any option outside ``allowed`` is refused by name."""
    unknown = set(endpoint.params) - allowed
    if unknown:
        raise TransportError(f"unknown {endpoint.scheme}:// server option(s): {', '.join(sorted(unknown))}")
    if "cert" not in endpoint.params or "key" not in endpoint.params:
        raise TransportError(f"a {endpoint.scheme}:// server needs cert=FILE and key=FILE options")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(endpoint.params["cert"], endpoint.params["key"])
        if "ca" in endpoint.params:
            ctx.load_verify_locations(endpoint.params["ca"])
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"{endpoint.scheme}:// server certificate set-up failed: {exc}") from None
    return ctx
