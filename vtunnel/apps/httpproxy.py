"""The agent's HTTP proxy front: ``CONNECT`` tunnels and absolute-URI plain HTTP requests.

``serve_http_proxy(client, opener)`` handles one accepted client connection, parsed with h11:

* ``CONNECT host:port`` opens a tunnel stream to ``host:port`` (the name is resolved by the server), answers
  ``200 Connection established`` and then copies raw bytes both ways (bytes the client sent right after its
  request are kept and forwarded);
* ``GET http://host:port/path`` (any method, absolute URI, scheme ``http``) is sent to the origin in origin
  form (``GET /path``) with the hop-by-hop headers removed (``Connection`` and the headers it names,
  ``Keep-Alive``, ``Proxy-Connection``, ``Proxy-Authorization``, ``Proxy-Authenticate``, ``TE``, ``Trailer``,
  ``Upgrade``) and ``Host`` set from the URI.  Request bodies (``Content-Length`` or chunked) and responses
  (``Content-Length``, chunked or close-delimited) are relayed as they arrive; h11 frames each side for its
  own peer.  The client connection is kept alive across requests, which may go to different hosts; the
  stream to the last origin is reused while the next request goes to the same host and the origin keeps it
  open.

Every request head is checked on its raw bytes by ``check_request_head`` before h11 parses it: a head that
another parser could read differently (both ``Content-Length`` and ``Transfer-Encoding``, a duplicate or
non-numeric ``Content-Length``, a final coding other than ``chunked``, line folding, bare LF, whitespace before
a colon, control characters, ...) is refused before anything is sent through the tunnel, so no request can be
smuggled past the front (docs/agent.md lists the cases).

Failures answer with a status and close the client connection: ``400`` for a request this proxy cannot
parse or serve (origin-form target, bad URI, a head with more than one reading), ``501`` for an absolute URI
with another scheme or a transfer coding other than ``chunked``, ``505`` for an HTTP major version other than 1,
``403`` when the server's exit policy forbids the destination, ``504`` when the destination timed out, ``502``
for any other refusal, an unreachable tunnel, or an origin that broke the HTTP exchange.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

import anyio
import h11
import structlog
from anyio.abc import ByteStream

from vtunnel.apps.dialer import format_authority, parse_authority
from vtunnel.apps.pipe import CHUNK_SIZE, Leg, Opener, join
from vtunnel.protocol import StreamMetadata
from vtunnel.runtime.errors import StreamRefused, TunnelUnavailable

__all__ = [
    "HOP_BY_HOP",
    "MAX_HEAD_SIZE",
    "ProxyHTTPError",
    "check_request_head",
    "request_head_length",
    "serve_http_proxy",
    "status_for_refusal",
]

log = structlog.get_logger(__name__)

#: Headers that concern one connection only and are never forwarded (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
    }
)

#: Seconds to wait for the next request on an idle kept-alive client connection.
IDLE_TIMEOUT = 120.0

#: The largest request head (request line and header section) read before answering ``400`` (h11's own limit).
MAX_HEAD_SIZE = 16384

_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, StreamRefused)

Headers = list[tuple[bytes, bytes]]


class ProxyHTTPError(Exception):
    """A request this proxy answers with an error ``status`` (and then closes the connection)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _UpstreamBroken(Exception):
    """The origin (or the tunnel stream to it) failed during an exchange."""


def status_for_refusal(error: str | None) -> int:
    """The HTTP status for a server refusal reason (``StreamRefused.error``)."""
    if error == "forbidden":
        return 403
    if error == "timeout":
        return 504
    return 502


_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_FIELD_NAME = re.compile(_TOKEN)
#: field-value (RFC 9110 section 5.5): visible ASCII, obs-text, SP and HTAB; no other control character
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_DIGITS = re.compile(rb"[0-9]+")
#: what the start of a request line may hold before the head is complete
_REQUEST_LINE_START = re.compile(rb"[\x21-\x7e][\x20-\x7e]*\r?")


def request_head_length(data: bytes) -> int | None:
    """The length of the request head at the start of ``data`` (through its empty line), ``None`` while no
    empty line has arrived.  Both line endings count here, so that a head ending in a bare LF is found (and
    then refused by ``check_request_head``) rather than waited for."""
    if data.startswith(b"\n"):
        return 1
    if data.startswith(b"\r\n"):
        return 2
    ends = [at + len(end) for end in (b"\n\r\n", b"\n\n") if (at := data.find(end)) >= 0]
    return min(ends) if ends else None


def check_request_head(head: bytes) -> None:
    """Raise ``ProxyHTTPError`` unless ``head`` (a request line, field lines and the empty line) has exactly
    one reading under RFC 9112.

    h11 frames the requests, but it reads some heads leniently (bare LF line ends, line folding, control
    characters in values, both ``Content-Length`` and ``Transfer-Encoding``); another parser on the path may
    read the same bytes differently, which is how requests get smuggled.  This check runs on the raw bytes
    before h11 sees them, so h11 only ever parses heads that every strict parser reads the same way.
    """
    if head.startswith((b"\r\n", b"\n")):
        raise ProxyHTTPError(400, "empty line before the request line")
    if head.count(b"\n") != head.count(b"\r\n"):
        raise ProxyHTTPError(400, "line ending without CR (bare LF)")
    if head.count(b"\r") != head.count(b"\r\n"):
        raise ProxyHTTPError(400, "CR not followed by LF")
    if not head.endswith(b"\r\n\r\n"):
        raise ProxyHTTPError(400, "the head does not end with an empty line")
    request_line, *field_lines = head[:-4].split(b"\r\n")
    match = _REQUEST_LINE.fullmatch(request_line)
    if match is None:
        raise ProxyHTTPError(400, "malformed request line")
    method, target, major, minor = match.groups()
    if major != b"1":
        raise ProxyHTTPError(505, f"HTTP/{major.decode()}.{minor.decode()} is not supported")
    if b"#" in target:
        raise ProxyHTTPError(400, "fragment in the request target")
    fields: Headers = []
    for line in field_lines:
        if line.startswith((b" ", b"\t")):
            raise ProxyHTTPError(400, "line folding (obs-fold)")
        name, colon, value = line.partition(b":")
        if not colon:
            raise ProxyHTTPError(400, "field line without a colon")
        if not name:
            raise ProxyHTTPError(400, "empty field name")
        if name != name.rstrip(b" \t"):
            raise ProxyHTTPError(400, "whitespace between a field name and its colon")
        if _FIELD_NAME.fullmatch(name) is None:
            raise ProxyHTTPError(400, "invalid character in a field name")
        value = value.strip(b" \t")
        if _FIELD_VALUE.fullmatch(value) is None:
            raise ProxyHTTPError(400, f"control character in the value of {name.decode('ascii')}")
        fields.append((name.lower(), value))
    _check_framing(method, minor == b"0", fields)


def _check_framing(method: bytes, http10: bool, fields: Headers) -> None:
    """RFC 9112 section 6: the body's length must follow from one header, read one way."""
    lengths = [value for name, value in fields if name == b"content-length"]
    encodings = [value for name, value in fields if name == b"transfer-encoding"]
    if sum(name == b"host" for name, _ in fields) > 1:
        raise ProxyHTTPError(400, "more than one Host")
    if lengths and encodings:
        raise ProxyHTTPError(400, "both Transfer-Encoding and Content-Length")
    if len(lengths) > 1 or any(b"," in value for value in lengths):
        raise ProxyHTTPError(400, "more than one Content-Length")
    if lengths and _DIGITS.fullmatch(lengths[0]) is None:
        raise ProxyHTTPError(400, "Content-Length is not a decimal number")
    if encodings:
        if http10:
            raise ProxyHTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = [coding.strip(b" \t").lower() for value in encodings for coding in value.split(b",")]
        if codings[-1] != b"chunked":
            raise ProxyHTTPError(400, "the final transfer coding is not chunked")
        if codings.count(b"chunked") > 1:
            raise ProxyHTTPError(400, "chunked applied more than once")
        if len(codings) > 1:
            raise ProxyHTTPError(501, "transfer codings other than chunked are not supported")
    if method == b"CONNECT" and (encodings or lengths not in ([], [b"0"])):
        raise ProxyHTTPError(400, "a CONNECT request has no content")


def _strip_hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    items = list(headers)
    named = {
        token.strip().lower()
        for name, value in items
        if name.lower() in (b"connection", b"proxy-connection")
        for token in value.split(b",")
    }
    return [(n, v) for n, v in items if n.lower() not in HOP_BY_HOP and n.lower() not in named]


def _origin_request(request: h11.Request) -> tuple[str, h11.Request]:
    """``(authority, request in origin form)`` for an absolute-URI request."""
    try:
        target = request.target.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHTTPError(400, "non-ASCII request target") from None
    if target.startswith("/"):
        raise ProxyHTTPError(400, "origin-form target: this is a proxy, send an absolute URI")
    url = urlsplit(target)
    if url.scheme.lower() != "http":
        raise ProxyHTTPError(501, f"unsupported scheme {url.scheme!r}")
    if "@" in url.netloc:
        raise ProxyHTTPError(400, "user information in the URI")
    try:
        host, port = url.hostname, url.port or 80
    except ValueError:
        raise ProxyHTTPError(400, "bad port in the URI") from None
    if not host:
        raise ProxyHTTPError(400, "no host in the URI")
    authority = format_authority(host, port)
    try:
        parse_authority(authority)
    except ValueError as exc:
        raise ProxyHTTPError(400, str(exc)) from None
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    headers = [(n, v) for n, v in _strip_hop_by_hop(request.headers) if n.lower() != b"host"]
    headers.insert(0, (b"host", url.netloc.encode("ascii")))
    return authority, h11.Request(method=request.method, target=path.encode("ascii"), headers=headers)


class _Upstream:
    """One tunnel stream to an origin, with its h11 client state."""

    def __init__(self, authority: str, stream: ByteStream) -> None:
        self.authority = authority
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send(self, event: h11.Event) -> None:
        try:
            data = self.conn.send(event)
            if data:
                await self.stream.send(data)
        except (h11.LocalProtocolError, *_GONE) as exc:
            raise _UpstreamBroken(str(exc)) from exc

    async def next_event(self) -> h11.Event:
        try:
            while True:
                event = self.conn.next_event()
                if event is not h11.NEED_DATA:
                    return event  # type: ignore[return-value]
                try:
                    data = await self.stream.receive(CHUNK_SIZE)
                except anyio.EndOfStream:
                    data = b""
                self.conn.receive_data(data)
        except (h11.RemoteProtocolError, *_GONE) as exc:
            raise _UpstreamBroken(str(exc)) from exc

    def reusable(self) -> bool:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return True
        return False


class _ProxyConnection:
    """One client connection: a loop of requests."""

    def __init__(self, leg: Leg, opener: Opener, idle_timeout: float) -> None:
        self.leg = leg
        self.client = leg.stream
        self.opener = opener
        self.idle_timeout = idle_timeout
        self.conn = h11.Connection(h11.SERVER)
        self.upstream: _Upstream | None = None

    async def send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            await self.client.send(data)

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            if self.conn.their_state is h11.IDLE and not self.head_ready():
                event: h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED] = h11.NEED_DATA
            else:
                event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                data = await self.client.receive(CHUNK_SIZE)
            except anyio.EndOfStream:
                data = b""
            self.conn.receive_data(data)

    def head_ready(self) -> bool:
        """Whether h11 may parse the next request head: it has arrived whole and passed ``check_request_head``
        (or the client closed before sending one, which h11 reports); raises ``ProxyHTTPError`` if not."""
        data, closed = self.conn.trailing_data
        length = request_head_length(data)
        if length is None:
            # TLS or other bytes that cannot start a request line are refused without waiting for more
            line = data.partition(b"\n")[0]
            if line and _REQUEST_LINE_START.fullmatch(line) is None:
                raise ProxyHTTPError(400, "malformed request line")
            if len(data) > MAX_HEAD_SIZE:
                raise ProxyHTTPError(400, "request head too large")
            return closed
        check_request_head(data[:length])
        return True

    async def send_error(self, status: int, message: str) -> None:
        """Answer with ``status`` (and ``Connection: close``) if a response can still be sent."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"{status} {message}\n".encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        with contextlib.suppress(h11.LocalProtocolError, *_GONE):
            if self.conn.our_state is h11.IDLE:  # nothing parsed yet: h11 needs a request first
                await self.client.send(
                    f"HTTP/1.1 {status} Error\r\n".encode()
                    + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
                    + b"\r\n"
                    + body
                )
                return
            await self.send(h11.Response(status_code=status, headers=headers))
            await self.send(h11.Data(data=body))
            await self.send(h11.EndOfMessage())

    async def open(self, authority: str) -> Leg:
        try:
            return await self.opener(StreamMetadata(authority=authority, kind="tcp"))
        except StreamRefused as exc:
            raise ProxyHTTPError(
                status_for_refusal(exc.error), f"{authority}: {exc.error or 'refused'}"
            ) from None
        except TunnelUnavailable as exc:
            raise ProxyHTTPError(502, f"no tunnel: {exc}") from None
        except TimeoutError:
            raise ProxyHTTPError(504, f"{authority}: timeout") from None
        except Exception as exc:  # an opener failing in its own way is still answered
            log.exception("http.open_failed", authority=authority, error=repr(exc))
            raise ProxyHTTPError(502, f"{authority}: failed") from None

    async def close_upstream(self) -> None:
        if self.upstream is not None:
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(self.upstream.stream)
            self.upstream = None

    async def serve(self) -> None:
        """Serve requests until the client or the protocol ends the connection."""
        while True:
            event: h11.Event | type[h11.PAUSED] | None = None
            with anyio.move_on_after(self.idle_timeout):
                event = await self.next_event()
            if event is None or isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                raise ProxyHTTPError(400, f"unexpected {type(event).__name__}")
            if event.method == b"CONNECT":
                await self.connect(event)
                return
            keep_going = await self.forward(event)
            if not keep_going:
                return

    async def connect(self, request: h11.Request) -> None:
        try:
            authority = request.target.decode("ascii")
            parse_authority(authority)
        except (UnicodeDecodeError, ValueError):
            raise ProxyHTTPError(400, "CONNECT target must be host:port") from None
        remote = await self.open(authority)
        try:
            # h11 pauses after a CONNECT request: its end of message is already in.
            while (event := await self.next_event()) is not h11.PAUSED:
                if isinstance(event, h11.ConnectionClosed):
                    return
            await self.send(h11.Response(status_code=200, headers=[], reason=b"Connection established"))
            early, _ = self.conn.trailing_data
            if early:
                await remote.stream.send(early)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(remote.stream)
            raise
        log.debug("http.connect", authority=authority)
        await join(self.leg, remote).run()

    async def forward(self, request: h11.Request) -> bool:
        """Relay one plain request and its response; ``True`` when the client connection may go on."""
        authority, origin_request = _origin_request(request)
        if self.upstream is not None and self.upstream.authority != authority:
            await self.close_upstream()
        if self.upstream is None:
            self.upstream = _Upstream(authority, (await self.open(authority)).stream)
        upstream = self.upstream
        response_started = False

        async def request_body() -> None:
            await upstream.send(origin_request)
            while True:
                event = await self.next_event()
                if isinstance(event, h11.Data):
                    await upstream.send(event)
                elif isinstance(event, h11.EndOfMessage):
                    await upstream.send(h11.EndOfMessage())
                    return
                else:
                    raise ProxyHTTPError(400, "request body ended early")

        async def response() -> None:
            nonlocal response_started
            while True:
                event = await upstream.next_event()
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 100 and self.conn.they_are_waiting_for_100_continue:
                        await self.send(event)
                    continue
                if not isinstance(event, h11.Response):
                    raise _UpstreamBroken(f"unexpected {type(event).__name__} from the origin")
                response_started = True
                await self.send(
                    h11.Response(
                        status_code=event.status_code,
                        headers=_strip_hop_by_hop(event.headers),
                        reason=event.reason,
                    )
                )
                break
            while True:
                event = await upstream.next_event()
                if isinstance(event, h11.Data):
                    await self.send(event)
                elif isinstance(event, h11.EndOfMessage):
                    await self.send(h11.EndOfMessage())
                    return
                else:  # ConnectionClosed in the middle of a framed body
                    raise _UpstreamBroken("origin closed in the middle of the response")

        broken: str | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(request_body)
                await response()
        except* _UpstreamBroken as group:
            broken = str(group.exceptions[0])
        if broken is not None:
            await self.close_upstream()
            if not response_started:
                raise ProxyHTTPError(502, f"the origin broke the exchange: {broken}")
            log.info("http.origin_broken", authority=authority, error=broken)
            return False
        log.debug("http.forwarded", authority=authority, status=self.conn.our_state)
        if not upstream.reusable():
            await self.close_upstream()
        if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is not h11.DONE:
            return False
        self.conn.start_next_cycle()
        return True


async def serve_http_proxy(leg: Leg, opener: Opener, *, idle_timeout: float = IDLE_TIMEOUT) -> None:
    """Serve one accepted HTTP proxy client until it is done; its connection is closed on return, or relayed."""
    proxy = _ProxyConnection(leg, opener, idle_timeout)
    try:
        await proxy.serve()
    except* ProxyHTTPError as group:
        exc = group.exceptions[0]
        assert isinstance(exc, ProxyHTTPError)
        log.info("http.error", status=exc.status, error=str(exc))
        await proxy.send_error(exc.status, str(exc))
    except* h11.RemoteProtocolError as group:
        log.info("http.bad_request", error=str(group.exceptions[0]))
        await proxy.send_error(400, "bad request")
    except* _GONE as group:
        log.debug("http.client_gone", error=type(group.exceptions[0]).__name__)
    except* Exception as group:  # never take the listener down with one client
        log.error("http.internal_error", error=repr(group.exceptions[0]), exc_info=group)
    finally:
        with anyio.CancelScope(shield=True):
            await proxy.close_upstream()
            await anyio.aclose_forcefully(leg.stream)
