"""Request smuggling through the agent's HTTP front: every head with more than one reading is refused.

A real agent and server joined by a tunnel on loopback, a real origin on loopback that records the raw bytes it
receives and reads them with a strict parser (the one below, written from RFC 9112 and independent of the
front's own check). Each smuggling case is sent as raw bytes: the front answers with an error and
``Connection: close``, logs why, opens nothing through the tunnel, and a normal request (curl) through the same
agent right after comes back byte-exact. A property test throws random orderings, duplicates, whitespace and
line endings of ``Content-Length`` and ``Transfer-Encoding`` at the front: what reaches the origin is always
exactly what the strict parser reads from the client's bytes, and nothing when it refuses them.
"""

from __future__ import annotations

import functools
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import anyio
import pytest
from anyio.abc import ByteStream, SocketStream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from tests.apps.conftest import body_for, direct_opener, loopback_dialer, on_leg, serve_front
from tests.apps.test_through_tunnel import agent_and_server
from vtunnel.apps.httpproxy import serve_http_proxy
from vtunnel.apps.policy import ExitPolicy

CURL = shutil.which("curl") or "/usr/bin/curl"

# ---------------------------------------------------------------------------------------------- strict reader

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_START = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.([01])")
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,8})\r\n")


@dataclass(frozen=True, slots=True)
class Message:
    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class Reading:
    """The requests read from some bytes, the bytes they took, and why reading stopped (None: it did not, or
    only because the rest is incomplete)."""

    messages: list[Message]
    used: int
    refused: str | None = None


class _Refused(Exception):
    pass


def _dechunk(data: bytes, at: int) -> tuple[bytes, int] | None:
    """A chunked body without extensions or trailers from ``data[at:]``: (body, end), None while incomplete."""
    parts: list[bytes] = []
    while True:
        line_end = data.find(b"\r\n", at)
        if line_end < 0:
            return None
        size_line = _CHUNK_SIZE.fullmatch(data, at, line_end + 2)
        if size_line is None:
            raise _Refused("bad chunk size line")
        size = int(size_line.group(1), 16)
        at = line_end + 2
        if len(data) < at + size + 2:
            return None
        if data[at + size : at + size + 2] != b"\r\n":
            raise _Refused("chunk not followed by CRLF")
        if size == 0:
            return b"".join(parts), at + 2
        parts.append(data[at : at + size])
        at += size + 2


def _read_one(data: bytes, start: int) -> tuple[Message, int] | None:
    end = data.find(b"\r\n\r\n", start)
    head = data[start:] if end < 0 else data[start:end]
    if head.count(b"\n") != head.count(b"\r\n") or head.count(b"\r") != head.count(b"\r\n"):
        raise _Refused("line not ended by CRLF")
    if end < 0:
        return None
    start_line, *lines = head.split(b"\r\n")
    request_line = _START.fullmatch(start_line)
    if request_line is None:
        raise _Refused("request line")
    headers = []
    for line in lines:
        match = _FIELD.fullmatch(line)
        if match is None:
            raise _Refused(f"field line {line!r}")
        headers.append((match.group(1).lower(), match.group(2)))
    lengths = [v for n, v in headers if n == b"content-length"]
    codings = [v for n, v in headers if n == b"transfer-encoding"]
    if (lengths and codings) or len(lengths) > 1 or len(codings) > 1:
        raise _Refused("framing fields")
    at = end + 4
    if codings:
        if codings[0].lower() != b"chunked" or request_line.group(3) == b"0":
            raise _Refused("transfer coding")
        body_end = _dechunk(data, at)
        if body_end is None:
            return None
        body, at = body_end
    elif lengths:
        if re.fullmatch(rb"[0-9]+", lengths[0]) is None:
            raise _Refused("content length")
        size = int(lengths[0])
        if len(data) < at + size:
            return None
        body, at = data[at : at + size], at + size
    else:
        body = b""
    return Message(request_line.group(1), request_line.group(2), tuple(headers), body), at


def read_messages(data: bytes) -> Reading:
    """Every complete request in ``data``, read the strictest way RFC 9112 (sections 2, 5 and 6) allows, up
    to the first one whose framing is not unambiguous."""
    messages: list[Message] = []
    at = 0
    while at < len(data):
        try:
            one = _read_one(data, at)
        except _Refused as exc:
            return Reading(messages, at, str(exc))
        if one is None:
            break
        message, at = one
        messages.append(message)
    return Reading(messages, at)


# ---------------------------------------------------------------------------------------------- origin


@dataclass
class RecordingOrigin:
    """An HTTP/1.1 origin that records the raw bytes it receives and reads them with ``read_messages``:
    ``/bytes/N`` answers ``body_for(path, N)``, anything else echoes the request body."""

    port: int = 0
    connections: int = 0
    received: bytearray = field(default_factory=bytearray)
    requests: list[Message] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    async def handle(self, stream: SocketStream) -> None:
        self.connections += 1
        buffer = b""
        async with stream:
            while True:
                try:
                    data = await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                self.received += data
                buffer += data
                reading = read_messages(buffer)
                buffer = buffer[reading.used :]
                for message in reading.messages:
                    self.requests.append(message)
                    path = message.target.decode()
                    body = body_for(path, int(path[7:])) if path.startswith("/bytes/") else message.body
                    await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                if reading.refused is not None:
                    self.refused.append(reading.refused)
                    return


@asynccontextmanager
async def recording_origin() -> AsyncIterator[RecordingOrigin]:
    origin = RecordingOrigin()
    async with serve_front(origin.handle) as port:
        origin.port = port
        yield origin


async def _exchange(client: ByteStream, request: bytes) -> bytes:
    """Send ``request`` and the end of stream; everything the front answers until it closes."""
    answer = b""
    async with client:
        await client.send(request)
        await client.send_eof()
        try:
            while True:
                answer += await client.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
    return answer


def _statuses(answer: bytes) -> list[int]:
    """The status of each response in ``answer`` (the front frames every one with Content-Length here)."""
    statuses = []
    while answer:
        head, _, rest = answer.partition(b"\r\n\r\n")
        status_line, *fields = head.split(b"\r\n")
        statuses.append(int(status_line.split(b" ")[1]))
        length = [
            int(v) for n, _, v in (f.partition(b": ") for f in fields) if n.lower() == b"content-length"
        ]
        answer = rest[length[0] if length else len(rest) :]
    return statuses


# ---------------------------------------------------------------------------------------------- cases

_A = b"{a}"
_SMUGGLED = b"GET http://{a}/smuggled HTTP/1.1\r\nHost: {a}\r\n\r\n"
_CHUNKED_END_THEN_SMUGGLED = b"0\r\n\r\n" + _SMUGGLED


def _post(fields: bytes, body: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"POST http://{a}/echo HTTP/" + version + b"\r\nHost: {a}\r\n" + fields + b"\r\n" + body


SMUGGLING_CASES: dict[str, tuple[bytes, int]] = {
    "content-length then transfer-encoding": (
        _post(
            b"Content-Length: 30\r\nTransfer-Encoding: chunked\r\n",
            _CHUNKED_END_THEN_SMUGGLED,
        ),
        400,
    ),
    "transfer-encoding then content-length": (
        _post(b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", _CHUNKED_END_THEN_SMUGGLED),
        400,
    ),
    "transfer-encoding with odd case and whitespace beside content-length": (
        _post(b"Transfer-Encoding:  CHUNKED \r\nContent-Length: 3\r\n", _CHUNKED_END_THEN_SMUGGLED),
        400,
    ),
    "two equal content-lengths": (_post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"), 400),
    "two different content-lengths": (_post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"), 400),
    "content-length list": (_post(b"Content-Length: 5, 5\r\n", b"hello"), 400),
    "content-length with a sign": (_post(b"Content-Length: +5\r\n", b"hello"), 400),
    "content-length in hex": (_post(b"Content-Length: 0x5\r\n", b"hello"), 400),
    "final coding not chunked": (_post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"), 400),
    "unknown coding": (_post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"), 400),
    "chunked twice": (
        _post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        400,
    ),
    "coding before chunked": (_post(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"), 501),
    "transfer-encoding in HTTP/1.0": (
        _post(b"Transfer-Encoding: chunked\r\n", _CHUNKED_END_THEN_SMUGGLED, b"1.0"),
        400,
    ),
    "obs-fold": (_post(b"X-Folded: a\r\n b\r\nContent-Length: 5\r\n", b"hello"), 400),
    "obs-fold hiding transfer-encoding": (
        _post(b"X-Folded: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"hello"),
        400,
    ),
    "whitespace before the first field line": (
        b"GET http://{a}/echo HTTP/1.1\r\n Host: {a}\r\nHost: {a}\r\n\r\n",
        400,
    ),
    "bare LF everywhere": (
        b"POST http://{a}/echo HTTP/1.1\nHost: {a}\nContent-Length: 5\n\nhello",
        400,
    ),
    "bare LF after one field": (
        _post(b"X-A: 1\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"hello"),
        400,
    ),
    "bare LF ending the head": (
        b"POST http://{a}/echo HTTP/1.1\r\nHost: {a}\r\nContent-Length: 5\r\n\nhello",
        400,
    ),
    "space between field name and colon": (_post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"), 400),
    "tab between field name and colon": (_post(b"Content-Length\t: 5\r\n", b"hello"), 400),
    "NUL in a field name": (_post(b"Content\x00Length: 5\r\n", b"hello"), 400),
    "NUL in a value": (_post(b"X-A: a\x00b\r\n"), 400),
    "control character in a value": (_post(b"X-A: a\x01b\r\nContent-Length: 5\r\n", b"hello"), 400),
    "DEL in a value": (_post(b"X-A: a\x7fb\r\n"), 400),
    "CR inside a value": (_post(b"X-A: a\rTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"), 400),
    "two Host fields": (_post(b"Host: example.com\r\n"), 400),
    "fragment in the target": (b"GET http://{a}/echo#x HTTP/1.1\r\nHost: {a}\r\n\r\n", 400),
    "HTTP/2.0 request line": (b"GET http://{a}/echo HTTP/2.0\r\nHost: {a}\r\n\r\n", 505),
    "CONNECT with a body": (b"CONNECT {a} HTTP/1.1\r\nHost: {a}\r\nContent-Length: 5\r\n\r\nhello", 400),
    "CONNECT with transfer-encoding": (
        b"CONNECT {a} HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize(("request_bytes", "status"), SMUGGLING_CASES.values(), ids=SMUGGLING_CASES.keys())
async def test_smuggling_attempt_is_refused_and_the_agent_keeps_serving(
    request_bytes: bytes, status: int
) -> None:
    async with agent_and_server(ExitPolicy(allow_private=True)) as pair, recording_origin() as origin:
        authority = f"127.0.0.1:{origin.port}".encode()
        with anyio.fail_after(30):
            with capture_logs() as logs:
                client = await anyio.connect_tcp("127.0.0.1", pair.http_port)
                answer = await _exchange(client, request_bytes.replace(_A, authority))
            head = answer.partition(b"\r\n\r\n")[0].lower()
            assert _statuses(answer) == [status], answer
            assert b"\r\nconnection: close" in head
            # nothing of the request went through the tunnel
            assert (origin.connections, bytes(origin.received)) == (0, b"")
            errors = [entry for entry in logs if entry["event"] == "http.error"]
            assert [entry["status"] for entry in errors] == [status]
            assert "hello" not in repr(errors)
            result = await anyio.run_process(
                [
                    CURL,
                    "-sS",
                    "--max-time",
                    "20",
                    "-x",
                    f"http://127.0.0.1:{pair.http_port}",
                    f"http://127.0.0.1:{origin.port}/bytes/54321",
                ]
            )
    assert result.stdout == body_for("/bytes/54321", 54321)
    assert [m.target for m in origin.requests] == [b"/bytes/54321"]


@pytest.mark.anyio
async def test_pipelined_smuggling_attempt_after_a_good_request() -> None:
    """The first request is served; the second one, in the same write, is refused before it reaches the
    origin, and the connection is closed."""
    async with agent_and_server(ExitPolicy(allow_private=True)) as pair, recording_origin() as origin:
        first = b"POST http://{a}/echo HTTP/1.1\r\nHost: {a}\r\nContent-Length: 5\r\n\r\nhello"
        second = _post(b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", _CHUNKED_END_THEN_SMUGGLED)
        authority = f"127.0.0.1:{origin.port}".encode()
        with anyio.fail_after(30):
            client = await anyio.connect_tcp("127.0.0.1", pair.http_port)
            answer = await _exchange(client, (first + second).replace(_A, authority))
    assert _statuses(answer) == [200, 400]
    assert answer.split(b"\r\n\r\n")[1].startswith(b"hello")
    assert [(m.target, m.body) for m in origin.requests] == [(b"/echo", b"hello")]
    assert origin.refused == []


# ---------------------------------------------------------------------------------------------- property

#: ``{n}``: the body's length once the origin's address is in it (``{x}``: the same in hex)
_LENGTH_VALUES = ["{n}", " {n}", "{n} ", "0{n}", "+{n}", "-{n}", "{n}, {n}", "{n},", "{n}.0", "", "0x{x}"]
_CODINGS = ["chunked", "Chunked", "CHUNKED", "gzip, chunked", "chunked, gzip", "identity", "chunked;x=1", ""]
_SEPARATORS = [":", ": ", ":\t", ":  ", " :", "\t:", " : "]

_framing_field = st.tuples(
    st.sampled_from(
        ["Content-Length", "content-length", "CONTENT-LENGTH", "Transfer-Encoding", "transfer-encoding"]
    ),
    st.sampled_from(_SEPARATORS),
    st.integers(0, max(len(_LENGTH_VALUES), len(_CODINGS)) - 1),
    st.sampled_from(["\r\n", "\r\n", "\r\n", "\n"]),  # line end
    st.sampled_from([False, False, False, True]),  # the value folded onto a continuation line
)


@st.composite
def _requests(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(head, body), both with ``{a}`` for the origin's address, the head with ``{n}`` and ``{x}``."""
    framing = draw(st.lists(_framing_field, max_size=3))
    payload = draw(st.binary(max_size=200))
    has_coding = any(name.lower() == "transfer-encoding" for name, *_ in framing)
    kind = draw(st.sampled_from(["chunked", "smuggle"] if has_coding else ["raw", "chunked", "smuggle"]))
    if not framing:  # no body: bytes after the head would be the next request
        body = b""
    elif kind == "raw":
        body = payload
    elif kind == "chunked":
        body = (b"%x\r\n%s\r\n" % (len(payload), payload) if payload else b"") + b"0\r\n\r\n"
    else:
        body = _CHUNKED_END_THEN_SMUGGLED
    lines = []
    for name, separator, choice, line_end, folded in framing:
        if name.lower() == "content-length":
            value = _LENGTH_VALUES[choice % len(_LENGTH_VALUES)]
        else:
            value = _CODINGS[choice % len(_CODINGS)]
        fold = "\r\n " if folded else ""
        lines.append(f"{name}{separator}{fold}{value}{line_end}".encode())
    lines.append(b"Host: {a}\r\n")
    lines.append(b"X-Pad: " + bytes(draw(st.sampled_from(["1", "a b", "\t"])), "ascii") + b"\r\n")
    order = draw(st.permutations(range(len(lines))))
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    head = b"POST http://{a}/echo HTTP/" + version + b"\r\n" + b"".join(lines[i] for i in order) + b"\r\n"
    return head, body


async def _through_front(head: bytes, body: bytes) -> tuple[bytes, bytes, RecordingOrigin]:
    async with recording_origin() as origin:
        authority = f"127.0.0.1:{origin.port}".encode()
        body = body.replace(_A, authority)
        head = (
            head.replace(_A, authority).replace(b"{n}", b"%d" % len(body)).replace(b"{x}", b"%x" % len(body))
        )
        request = head + body
        opener = direct_opener(loopback_dialer())
        async with serve_front(on_leg(functools.partial(serve_http_proxy, opener=opener))) as port:
            with anyio.fail_after(20):
                answer = await _exchange(await anyio.connect_tcp("127.0.0.1", port), request)
    return request, answer, origin


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_requests())
def test_forwarded_framing_is_the_strict_reading(head_and_body: tuple[bytes, bytes]) -> None:
    request, answer, origin = anyio.run(_through_front, *head_and_body)
    expected = read_messages(request)
    assert expected.refused is not None or expected.used == len(request)
    # the origin never sees a message it cannot read one way, and sees exactly the strict reading
    assert origin.refused == []
    assert [(m.method, m.target, m.body) for m in origin.requests] == [
        (m.method, urlsplit(m.target.decode()).path.encode(), m.body) for m in expected.messages
    ]
    for message in origin.requests:
        assert len([n for n, _ in message.headers if n in (b"content-length", b"transfer-encoding")]) <= 1
    statuses = _statuses(answer)
    assert statuses[: len(expected.messages)] == [200] * len(expected.messages)
    if expected.refused is None:
        assert len(statuses) == len(expected.messages)
    else:
        assert statuses[len(expected.messages) :] in ([400], [501], [505])
        assert b"\r\nconnection: close\r\n" in answer.lower().rpartition(b"http/1.1 ")[2]


def test_strict_reader_reads_one_way() -> None:
    """The reference reader itself: what it reads, and where it stops."""
    data = b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nabGET"
    message = Message(b"GET", b"/", ((b"host", b"x"), (b"content-length", b"2")), b"ab")
    assert read_messages(data) == Reading([message], len(data) - 3)
    chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n"
    assert read_messages(chunked).messages[0].body == b"ab"
    for bad in (
        b"GET / HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\nHost: x\n\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    ):
        assert read_messages(bad) == Reading([], 0, read_messages(bad).refused)
        assert read_messages(bad).refused is not None
