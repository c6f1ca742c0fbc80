"""WebSocks (vproxy's agent/server protocol): the server side (:func:`serve_websocks`, inside a tunnel stream or
on a ``websocks://`` / ``websockss://`` listener's own connection) and the agent side (:func:`websocks_connect`,
inside a stream to a server that cannot be told a destination in the SYN; :func:`websocks_dial`, one connection of
its own per destination to a ``websocks://`` / ``websockss://`` server).

The exchange, in order:

1. the client sends ``GET / HTTP/1.1`` with ``Upgrade: websocket``, ``Connection: Upgrade``,
   ``Sec-WebSocket-Version: 13``, ``Sec-WebSocket-Protocol: socks5`` and
   ``Authorization: Basic base64(user ":" pass')``, where
   ``pass' = base64(sha256(base64(sha256(password)) + str(m)))`` and ``m`` is the current epoch time in
   milliseconds rounded down to the minute;
2. the server answers ``400`` when the protocol is not ``socks5`` (or the upgrade is malformed), ``401`` when
   the user is unknown or ``pass'`` matches none of ``m - 60000``, ``m``, ``m + 60000`` (compared in
   constant time), else ``101 Switching Protocols``;
3. each side sends the same 10 bytes, ``82 7f 7f ff ff ff ff ff ff ff``: the header of one unmasked binary
   frame of length 2^63 - 1, after which raw bytes flow without any further framing;
4. RFC 1928 SOCKS5 (no authentication, ``CONNECT``) names the destination, which is dialled through the
   exit policy; the reply code comes from the dial result;
5. raw relay.

A request that is not HTTP at all is answered ``400`` too. The server gives a client ``handshake_timeout``
seconds to send its upgrade and its SOCKS5 request (the dial after it has the dialer's own timeout).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import os
import time
from collections.abc import Callable, Mapping

import anyio
import h11
import structlog
from anyio.abc import ByteStream

from vtunnel.apps.dialer import Dialer, DialError, parse_authority
from vtunnel.apps.pipe import HeaderTooLarge, Leg, SocketLeg, StreamBuffer, join
from vtunnel.apps.socks5 import (
    SOCKS_VERSION,
    Command,
    Method,
    Reply,
    Socks5Error,
    Socks5Request,
    encode_address,
    encode_reply,
    parse_greeting,
    parse_request,
    reply_for_refusal,
)
from vtunnel.io.stream_sockets import LeanSocketStream, attach_socket
from vtunnel.runtime.errors import StreamRefused, TunnelUnavailable
from vtunnel.transports.base import (
    ByteStreamTransport,
    Endpoint,
    TransportError,
    get_transport,
)

__all__ = [
    "FRAME_HEADER",
    "HANDSHAKE_TIMEOUT",
    "MINUTE_MS",
    "WEBSOCKS_SCHEMES",
    "carrier_endpoint",
    "carrier_transport",
    "classify_websocks",
    "password_token",
    "serve_websocks",
    "upgrade_request",
    "websocket_accept",
    "websocks_connect",
    "websocks_dial",
]

log = structlog.get_logger(__name__)

#: The header of the one endless, unmasked binary frame each side sends after the upgrade.
FRAME_HEADER = bytes.fromhex("827f7fffffffffffffff")
MINUTE_MS = 60_000
MAX_REQUEST = 16384
HANDSHAKE_TIMEOUT = 30.0
_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: WebSocks on a connection of its own: the URL scheme -> the transport that carries the connection
#: (``websockss://`` takes ``tls://``'s options: ``ca``, ``servername``, ``cert``, ``key``)
WEBSOCKS_SCHEMES = {"websocks": "tcp", "websockss": "tls"}

_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, StreamRefused)


def password_token(password: str, minute_ms: int) -> str:
    """``pass'`` for ``password`` at ``minute_ms`` (epoch milliseconds, a multiple of 60000)."""
    inner = base64.b64encode(hashlib.sha256(password.encode("utf-8")).digest()).decode("ascii")
    outer = hashlib.sha256((inner + str(minute_ms)).encode("utf-8")).digest()
    return base64.b64encode(outer).decode("ascii")


def websocket_accept(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip() + _WEBSOCKET_GUID).digest())


def _header_block_end(data: bytes) -> int:
    return data.find(b"\r\n\r\n")


def classify_websocks(first: bytes) -> bool | None:
    """Is ``first`` the start of a WebSocket upgrade?  ``None`` while the request head is incomplete.

    True once a complete ``GET`` request head carries ``Upgrade: websocket`` (the protocol and the
    password are checked later, by ``serve_websocks``, which answers 400/401); False as soon as the bytes
    cannot be one.
    """
    if len(first) < 4:
        return None if b"GET "[: len(first)] == first else False
    if not first.startswith(b"GET "):
        return False
    end = _header_block_end(first)
    if end < 0:
        return None if len(first) < MAX_REQUEST else False
    conn = h11.Connection(h11.SERVER)
    try:
        conn.receive_data(first[: end + 4])
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return False
    if not isinstance(event, h11.Request):
        return False
    return any(n == b"upgrade" and v.lower() == b"websocket" for n, v in event.headers)


def carrier_endpoint(endpoint: Endpoint) -> Endpoint:
    """The ``tcp://`` or ``tls://`` endpoint a ``websocks://`` or ``websockss://`` URL's connections go over.

    Raises ``TransportError`` naming the option a URL cannot take.
    """
    carrier = dataclasses.replace(endpoint, scheme=WEBSOCKS_SCHEMES[endpoint.scheme])
    if carrier.scheme == "tcp" and endpoint.params:
        raise TransportError(f"websocks:// takes no options, got {', '.join(sorted(endpoint.params))}")
    carrier_transport(carrier).check(carrier)
    return carrier


def carrier_transport(carrier: Endpoint) -> ByteStreamTransport:
    """The byte-stream transport (``tcp`` or ``tls``) that carries WebSocks connections to or from ``carrier``."""
    transport = get_transport(carrier.scheme)
    if not isinstance(transport, ByteStreamTransport):
        raise TransportError(f"{carrier.scheme}:// does not carry byte streams")
    return transport


def _default_now_ms() -> int:
    return int(time.time() * 1000)


class _Rejected(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _header(request: h11.Request, name: bytes) -> bytes | None:
    for n, v in request.headers:
        if n == name:
            return v
    return None


def _check_upgrade(request: h11.Request, users: Mapping[str, str], now_ms: int) -> str:
    """Validate the upgrade request; return the user name or raise ``_Rejected``."""
    upgrade = _header(request, b"upgrade")
    if request.method != b"GET" or upgrade is None or upgrade.lower() != b"websocket":
        raise _Rejected(400, "not a WebSocket upgrade")
    protocols = {p.strip().lower() for p in (_header(request, b"sec-websocket-protocol") or b"").split(b",")}
    if b"socks5" not in protocols:
        raise _Rejected(400, "unknown protocol")
    authorization = _header(request, b"authorization") or b""
    scheme, _, encoded = authorization.partition(b" ")
    if scheme.lower() != b"basic":
        raise _Rejected(401, "no basic authorization")
    try:
        user, sep, token = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise _Rejected(401, "malformed authorization") from None
    password = users.get(user) if sep else None
    minute = now_ms - now_ms % MINUTE_MS
    candidates = (minute - MINUTE_MS, minute, minute + MINUTE_MS)
    # the same amount of work whether or not the user exists
    secret = password if password is not None else "\x00unknown user"
    matched = False
    for m in candidates:
        matched |= hmac.compare_digest(password_token(secret, m).encode(), token.encode("utf-8"))
    if password is None or not matched:
        raise _Rejected(401, "bad user or password")
    return user


async def _read_exactly(buffer: StreamBuffer, n: int) -> bytes:
    def take(data: bytes) -> tuple[bytes, int] | None:
        return (data[:n], n) if len(data) >= n else None

    return await buffer.parse(take)


async def serve_websocks(
    leg: Leg,
    first: bytes,
    *,
    users: Mapping[str, str],
    dialer: Dialer,
    now_ms: Callable[[], int] | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> None:
    """Serve one WebSocks client whose first bytes (already read, maybe none) are ``first``; its connection is
    closed on return, or relayed."""
    stream = leg.stream
    clock = now_ms or _default_now_ms
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    buffer = StreamBuffer(stream, limit=MAX_REQUEST, initial=first)
    relayed = False
    try:
        with anyio.fail_after(handshake_timeout):
            try:
                request = await _read_request(conn, buffer)
                user = _check_upgrade(request, users, clock())
            except (h11.RemoteProtocolError, HeaderTooLarge) as exc:
                raise _Rejected(400, f"malformed request: {exc}") from None
            headers = [
                (b"upgrade", b"websocket"),
                (b"connection", b"Upgrade"),
                (b"sec-websocket-protocol", b"socks5"),
            ]
            key = _header(request, b"sec-websocket-key")
            if key is not None:
                headers.append((b"sec-websocket-accept", websocket_accept(key)))
            await stream.send(conn.send(h11.InformationalResponse(status_code=101, headers=headers)) or b"")
            await stream.send(FRAME_HEADER)
            if await _read_exactly(buffer, len(FRAME_HEADER)) != FRAME_HEADER:
                log.info("websocks.bad_frame_header", user=user)
                return
            socks_request = await _socks5_request(stream, buffer)
        if socks_request is None:
            return
        remote = await _dial(stream, dialer, socks_request.authority)
        if remote is None:
            return
        try:
            early = buffer.take_pending()
            if early:
                await remote.stream.send(early)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(remote.stream)
            raise
        log.debug("websocks.relaying", user=user, destination=socks_request.authority)
        relay = join(leg, remote)
        relayed = True  # the relay owns both ends now: nothing to close here
        await relay.run()
    except _Rejected as exc:
        log.info("websocks.rejected", status=exc.status, reason=str(exc))
        await _send_quietly(stream, _rejection(exc.status, str(exc)))
    except (h11.LocalProtocolError, HeaderTooLarge, Socks5Error) as exc:
        log.info("websocks.bad_request", error=str(exc))
    except TimeoutError:
        log.info("websocks.handshake_timeout", timeout=handshake_timeout)
    except _GONE as exc:
        log.debug("websocks.client_gone", error=type(exc).__name__)
    except Exception as exc:  # never take the server down with one stream
        log.exception("websocks.internal_error", error=repr(exc))
    finally:
        if not relayed:
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(stream)


def _rejection(status: int, reason: str) -> bytes:
    """The whole answer to a refused upgrade: ``status``, a one-line body, and the connection closes."""
    body = f"{status} {reason}\n".encode()
    title = {400: "Bad Request", 401: "Unauthorized"}.get(status, "Error")
    return (
        f"HTTP/1.1 {status} {title}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        + body
    )


async def _send_quietly(stream: ByteStream, data: bytes) -> None:
    try:
        await stream.send(data)
    except _GONE as exc:
        log.debug("websocks.client_gone", error=type(exc).__name__)


async def _read_request(conn: h11.Connection, buffer: StreamBuffer) -> h11.Request:
    """Feed h11 until the whole request is in; the bytes after it go back into ``buffer``."""
    first = buffer.take_pending()
    if first:  # h11 takes b"" for the end of the connection
        conn.receive_data(first)
    request: h11.Request | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if len(conn.trailing_data[0]) >= MAX_REQUEST:
                raise HeaderTooLarge("upgrade request too large")
            try:
                conn.receive_data(await buffer.stream.receive())
            except anyio.EndOfStream:
                conn.receive_data(b"")
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            buffer.pending += conn.trailing_data[0]
            return request
        elif isinstance(event, h11.ConnectionClosed):
            raise anyio.EndOfStream
        elif not isinstance(event, h11.Data):
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}", 400)


async def _socks5_request(stream: ByteStream, buffer: StreamBuffer) -> Socks5Request | None:
    """Serve the SOCKS5 exchange (no authentication, CONNECT) up to the request; ``None`` after a refusal."""
    methods = await buffer.parse(parse_greeting)
    if Method.NO_AUTH not in methods:
        await stream.send(bytes([SOCKS_VERSION, Method.NO_ACCEPTABLE]))
        return None
    await stream.send(bytes([SOCKS_VERSION, Method.NO_AUTH]))
    try:
        request = await buffer.parse(parse_request)
    except Socks5Error as exc:
        if exc.reply is not None:
            await stream.send(encode_reply(exc.reply))
        raise
    if request.command != Command.CONNECT:
        await stream.send(encode_reply(Reply.COMMAND_NOT_SUPPORTED))
        return None
    return request


async def _dial(stream: ByteStream, dialer: Dialer, authority: str) -> SocketLeg | None:
    """Dial ``authority`` through the exit policy and send the SOCKS5 reply; ``None`` after a failure reply."""
    try:
        # a lean socket stream, so that the relay takes its socket once the exchange is over
        remote = LeanSocketStream()
        attach_socket(await dialer.dial_socket(authority), remote)
    except DialError as exc:
        log.info("websocks.dial_failed", authority=authority, error=exc.error)
        await stream.send(encode_reply(reply_for_refusal(exc.error)))
        return None
    try:
        await stream.send(encode_reply(Reply.SUCCEEDED))
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.aclose_forcefully(remote)
        raise
    return SocketLeg(remote)


# ------------------------------------------------------------------------------------------ the client side

#: the most a server's answer to the upgrade may take
MAX_RESPONSE = 16384
#: a SOCKS5 reply code (RFC 1928) -> the refusal reason it reports
_REFUSAL_OF_REPLY = {
    0x02: "forbidden",
    0x03: "unreachable",
    0x04: "unreachable",
    0x05: "refused",
    0x06: "timeout",
}
#: the status of a refused upgrade -> why, for the log
_UPGRADE_REFUSALS = {
    b"401": "the server refused the user or password",
    b"400": "the server did not take the upgrade request",
}


class _ExactReader:
    """Reads a stream in exactly the pieces asked for, so that nothing past the exchange is taken from it."""

    __slots__ = ("buffer", "stream")

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self.buffer += await self.stream.receive(n - len(self.buffer))
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    async def head(self) -> bytes:
        """An HTTP response head through its empty line, read a few bytes at a time (its end is not known)."""
        while (end := _header_block_end(self.buffer)) < 0:
            if len(self.buffer) > MAX_RESPONSE:
                raise StreamRefused("failed")
            self.buffer += await self.stream.receive(256)
        out, self.buffer = self.buffer[: end + 4], self.buffer[end + 4 :]
        return out


def upgrade_request(user: str, password: str, now_ms: int, key: bytes) -> bytes:
    """The client's WebSocket upgrade with vproxy's ``Authorization`` (the password as ``pass'``)."""
    token = password_token(password, now_ms // MINUTE_MS * MINUTE_MS)
    credentials = base64.b64encode(f"{user}:{token}".encode()).decode("ascii")
    return (
        "GET / HTTP/1.1\r\n"
        "Host: websocks\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {key.decode('ascii')}\r\n"
        "Sec-WebSocket-Protocol: socks5\r\n"
        f"Authorization: Basic {credentials}\r\n"
        "\r\n"
    ).encode("ascii")


async def websocks_connect(
    stream: ByteStream, authority: str, *, user: str, password: str, now_ms: int | None = None
) -> None:
    """Run vproxy's agent side of WebSocks on ``stream`` (a tunnel stream to a server with no metadata, or a
    connection of its own to a WebSocks server) so that it leads to ``authority`` (``host:port``): the upgrade,
    the frame header, then SOCKS5 ``CONNECT``.

    Reads exactly what the exchange is made of, so the destination's first bytes stay in ``stream``. Raises
    ``StreamRefused`` with ``"forbidden"`` (the server refused the user or password: 401), ``"unsupported"``
    (400 or any other answer), ``"failed"`` (the server ended the exchange), or the reason the SOCKS5 reply code
    stands for.
    """
    try:
        await _websocks_exchange(stream, authority, user, password, now_ms)
    except StreamRefused:
        raise
    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
        log.info("websocks.exchange_failed", destination=authority, error=str(exc) or type(exc).__name__)
        raise StreamRefused("failed") from None


async def _websocks_exchange(
    stream: ByteStream, authority: str, user: str, password: str, now_ms: int | None
) -> None:
    host, port = parse_authority(authority)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    key = base64.b64encode(os.urandom(16))
    reader = _ExactReader(stream)
    await stream.send(upgrade_request(user, password, now, key))
    status_line = (await reader.head()).split(b"\r\n", 1)[0]
    parts = status_line.split(b" ", 2)
    status = parts[1] if len(parts) > 1 else b""
    if status != b"101":
        log.info(
            "websocks.upgrade_refused",
            status=status.decode("ascii", "replace"),
            reason=_UPGRADE_REFUSALS.get(status, "the server did not upgrade"),
            destination=authority,
        )
        raise StreamRefused("forbidden" if status == b"401" else "unsupported")
    await stream.send(FRAME_HEADER + bytes((SOCKS_VERSION, 1, Method.NO_AUTH)))
    if await reader.exactly(len(FRAME_HEADER)) != FRAME_HEADER:
        raise StreamRefused("unsupported")
    if await reader.exactly(2) != bytes((SOCKS_VERSION, Method.NO_AUTH)):
        raise StreamRefused("unsupported")
    await stream.send(bytes((SOCKS_VERSION, Command.CONNECT, 0)) + encode_address(host, port))
    version, reply, _rsv, atyp = await reader.exactly(4)
    address_len = {1: 4, 4: 16}.get(atyp)
    if address_len is None:
        address_len = (await reader.exactly(1))[0] if atyp == 3 else 0
    await reader.exactly(address_len + 2)
    if version != SOCKS_VERSION or reply != Reply.SUCCEEDED:
        log.info("websocks.destination_refused", destination=authority, reply=reply)
        raise StreamRefused(_REFUSAL_OF_REPLY.get(reply, "failed"))


async def websocks_dial(server: Endpoint, authority: str, *, user: str, password: str) -> ByteStream:
    """A connection of its own to the WebSocks server ``server`` (``websocks://`` or ``websockss://``) that leads
    to ``authority``, once the server said it reached it.

    Raises ``TunnelUnavailable`` when the server cannot be reached (the TCP connection or the TLS handshake
    failed), else what :func:`websocks_connect` raises.
    """
    carrier = carrier_endpoint(server)
    try:
        stream = await carrier_transport(carrier).open_stream(carrier)
    except (OSError, anyio.BrokenResourceError, TransportError) as exc:
        log.warning("websocks.server_unreachable", server=str(server), error=str(exc) or type(exc).__name__)
        raise TunnelUnavailable(f"cannot reach the WebSocks server {server}: {exc}") from None
    try:
        await websocks_connect(stream, authority, user=user, password=password)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.aclose_forcefully(stream)
        raise
    return stream
