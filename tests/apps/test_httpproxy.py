"""HTTP proxy front over real sockets: curl (CONNECT to TLS, absolute URIs), keep-alive, bodies, errors."""

from __future__ import annotations

import contextlib
import functools
import shutil
import socket
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import h11
import pytest
from anyio.abc import ByteStream
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vtunnel.apps.dialer import Dialer
from vtunnel.apps.httpproxy import (
    ProxyHTTPError,
    check_request_head,
    request_head_length,
    serve_http_proxy,
    status_for_refusal,
)
from vtunnel.apps.pipe import Leg
from vtunnel.apps.policy import ExitPolicy
from vtunnel.protocol import StreamMetadata
from vtunnel.runtime.errors import StreamRefused

from .conftest import (
    DirectExit,
    Origin,
    body_for,
    direct_exit,
    direct_opener,
    loopback_dialer,
    on_leg,
    serve_front,
)

pytestmark = pytest.mark.anyio

CURL = shutil.which("curl") or "/usr/bin/curl"


def http_front(exit_: DirectExit, **options: Any) -> AbstractAsyncContextManager[int]:
    return serve_front(on_leg(functools.partial(serve_http_proxy, opener=exit_.open, **options)))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _curl(*args: str) -> bytes:
    result = await anyio.run_process([CURL, "-sS", "--max-time", "30", *args])
    return result.stdout


class _Client:
    """A minimal HTTP/1.1 client (h11) for talking to the proxy over one connection."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: list[bytes] | None = None,
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        await self.stream.send(self.conn.send(h11.Request(method=method, target=target, headers=headers)))
        for chunk in body or []:
            await self.stream.send(self.conn.send(h11.Data(data=chunk)))
        await self.stream.send(self.conn.send(h11.EndOfMessage()))
        status = 0
        response_headers: list[tuple[bytes, bytes]] = []
        parts = []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    self.conn.receive_data(await self.stream.receive())
                except anyio.EndOfStream:
                    self.conn.receive_data(b"")
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                response_headers = list(event.headers)
            elif isinstance(event, h11.Data):
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return status, response_headers, b"".join(parts)


# ---------------------------------------------------------------------------------------------- curl


async def test_curl_absolute_uri(origin: Origin) -> None:
    async with direct_exit() as exit_, http_front(exit_) as port:
        with anyio.fail_after(60):
            body = await _curl(
                "-x", f"http://127.0.0.1:{port}", f"http://localhost:{origin.port}/bytes/300000"
            )
    assert body == body_for("/bytes/300000", 300000)
    assert exit_.opened[0].authority == f"localhost:{origin.port}"


@pytest.mark.parametrize("tunnel_flag", ["-p", "--proxytunnel"])
async def test_curl_connect_to_tls_origin(tls_origin: Origin, tunnel_flag: str) -> None:
    assert tls_origin.ca_file is not None
    async with direct_exit() as exit_, http_front(exit_) as port:
        with anyio.fail_after(60):
            body = await _curl(
                tunnel_flag,
                "--cacert",
                tls_origin.ca_file,
                "-x",
                f"http://127.0.0.1:{port}",
                f"https://localhost:{tls_origin.port}/bytes/200000",
            )
    assert body == body_for("/bytes/200000", 200000)
    assert exit_.opened[0].authority == f"localhost:{tls_origin.port}"


async def test_curl_chunked_close_delimited_and_post(origin: Origin, tmp_path: Any) -> None:
    upload = tmp_path / "upload.bin"
    upload.write_bytes(body_for("upload", 150000))
    async with direct_exit() as exit_, http_front(exit_) as port:
        proxy = f"http://127.0.0.1:{port}"
        with anyio.fail_after(60):
            chunked = await _curl("-x", proxy, f"http://127.0.0.1:{origin.port}/chunked/123456")
            closed = await _curl("-x", proxy, f"http://127.0.0.1:{origin.port}/close/65537")
            posted = await _curl(
                "-x", proxy, "--data-binary", f"@{upload}", f"http://127.0.0.1:{origin.port}/echo"
            )
            posted_chunked = await _curl(
                "-x",
                proxy,
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                f"@{upload}",
                f"http://127.0.0.1:{origin.port}/echo",
            )
    assert chunked == body_for("/chunked/123456", 123456)
    assert closed == body_for("/close/65537", 65537)
    assert posted == upload.read_bytes()
    assert posted_chunked == upload.read_bytes()


# ---------------------------------------------------------------------------------------------- keep-alive


async def test_keep_alive_across_hosts_and_header_rewriting(origin: Origin, tls_origin: Origin) -> None:
    async with direct_exit() as exit_, http_front(exit_) as port:
        with anyio.fail_after(60):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                client = _Client(stream)
                a = f"127.0.0.1:{origin.port}"
                b = f"localhost:{origin.port}"
                steps = [(a, "/bytes/1000"), (a, "/chunked/20000"), (b, "/bytes/5"), (a, "/close/7")]
                for authority, path in steps:
                    status, _, body = await client.request(
                        "GET", f"http://{authority}{path}", [("Host", authority)]
                    )
                    assert status == 200
                    assert body == body_for(path, int(path.rsplit("/", 1)[1]))
                # the close-delimited origin response was re-framed (chunked) for the client, whose
                # connection stays usable
                status, _, body = await client.request(
                    "POST",
                    f"http://{a}/echo",
                    [("Host", a), ("Content-Length", "11")],
                    [b"hello", b" world"],
                )
                assert (status, body) == (200, b"hello world")
                status, _, body = await client.request(
                    "GET",
                    f"http://{b}/headers?x=1",
                    [
                        ("Host", "wrong.example"),
                        ("Proxy-Connection", "keep-alive"),
                        ("Proxy-Authorization", "Basic c2VjcmV0"),
                        ("Connection", "keep-alive, X-Secret-Hop"),
                        ("X-Secret-Hop", "1"),
                        ("X-Kept", "yes"),
                    ],
                )
    assert status == 200
    text = body.decode().lower()
    assert text.startswith("get /headers?x=1 http/1.1")
    assert f"host: {b}" in text
    assert "x-kept: yes" in text
    for gone in ("proxy-connection", "proxy-authorization", "x-secret-hop", "wrong.example"):
        assert gone not in text
    # one client connection, successive streams to two different hosts
    assert {m.authority for m in exit_.opened} == {a, b}


# ---------------------------------------------------------------------------------------------- errors


async def _status_of(port: int, request: bytes) -> tuple[int, bytes]:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        data = b""
        try:
            while True:
                data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data


async def test_closed_port_gives_502() -> None:
    async with direct_exit() as exit_, http_front(exit_) as port:
        closed = _closed_port()
        with anyio.fail_after(30):
            status, _ = await _status_of(
                port, f"CONNECT 127.0.0.1:{closed} HTTP/1.1\r\nHost: 127.0.0.1:{closed}\r\n\r\n".encode()
            )
            assert status == 502
            request = f"GET http://127.0.0.1:{closed}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            status, _ = await _status_of(port, request)
            assert status == 502


async def test_forbidden_gives_403() -> None:
    async with direct_exit(Dialer(ExitPolicy(), connect_timeout=5)) as exit_, http_front(exit_) as port:
        with anyio.fail_after(30):
            status, _ = await _status_of(
                port, b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n\r\n"
            )
            assert status == 403
            status, _ = await _status_of(port, b"GET http://[::1]:80/ HTTP/1.1\r\nHost: [::1]\r\n\r\n")
            assert status == 403


async def test_timeout_gives_504() -> None:
    async def timing_out(metadata: StreamMetadata) -> Leg:
        raise StreamRefused("timeout")

    async with serve_front(on_leg(functools.partial(serve_http_proxy, opener=timing_out))) as port:
        with anyio.fail_after(30):
            status, _ = await _status_of(
                port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
            )
    assert status == 504


@pytest.mark.parametrize(
    ("error", "status"),
    [("forbidden", 403), ("timeout", 504), ("refused", 502), ("failed", 502), (None, 502)],
)
def test_status_mapping(error: str | None, status: int) -> None:
    assert status_for_refusal(error) == status


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(100), 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET https://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", 501),
        (b"GET http://user@example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", 400),
        (b"GET http://example.com:99999/ HTTP/1.1\r\nHost: example.com\r\n\r\n", 400),
        (b"CONNECT example.com HTTP/1.1\r\nHost: example.com\r\n\r\n", 400),
        (b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 requires Host
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET http://x/ HTTP/1.1\r\n" + b"X-Long: " + b"a" * 70000 + b"\r\n\r\n", 400),
    ],
)
async def test_bad_requests_get_an_error_and_listener_keeps_serving(
    origin: Origin, request_bytes: bytes, status: int
) -> None:
    async with direct_exit() as exit_, http_front(exit_) as port:
        with anyio.fail_after(30):
            got, _ = await _status_of(port, request_bytes)
            assert got == status
            body = await _curl("-x", f"http://127.0.0.1:{port}", f"http://127.0.0.1:{origin.port}/bytes/321")
            assert body == body_for("/bytes/321", 321)
    assert len(exit_.opened) == 1


async def test_idle_client_is_closed() -> None:
    async with direct_exit() as exit_, http_front(exit_, idle_timeout=0.3) as port:
        with anyio.fail_after(30):
            got, data = await _status_of(port, b"")
    assert (got, data) == (0, b"")


async def test_100_parallel_connects(origin: Origin) -> None:
    async with direct_exit() as exit_, http_front(exit_) as port:
        results: list[bool] = []

        async def fetch(i: int) -> None:
            path = f"/bytes/{i * 331 + 1}"
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                client = _Client(stream)
                status, _, body = await client.request(
                    "GET", f"http://127.0.0.1:{origin.port}{path}", [("Host", "x")]
                )
                results.append(status == 200 and body == body_for(path, i * 331 + 1))

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(100):
                    tg.start_soon(fetch, i)
    assert len(results) == 100
    assert all(results)


async def test_failing_opener_gives_502_and_listener_keeps_serving(origin: Origin) -> None:
    calls = 0

    async def flaky(metadata: StreamMetadata) -> Leg:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("opener bug")
        return await direct_opener(loopback_dialer())(metadata)

    async with serve_front(on_leg(functools.partial(serve_http_proxy, opener=flaky))) as port:
        with anyio.fail_after(30):
            request = f"GET http://127.0.0.1:{origin.port}/bytes/1 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            status, _ = await _status_of(port, request)
            assert status == 502
            body = await _curl("-x", f"http://127.0.0.1:{port}", f"http://127.0.0.1:{origin.port}/bytes/64")
            assert body == body_for("/bytes/64", 64)


async def test_http10_client_gets_close_delimited_body(origin: Origin) -> None:
    async with direct_exit() as exit_, http_front(exit_) as port:
        with anyio.fail_after(30):
            request = f"GET http://127.0.0.1:{origin.port}/chunked/30000 HTTP/1.0\r\n\r\n".encode()
            status, data = await _status_of(port, request)
    head, _, body = data.partition(b"\r\n\r\n")
    assert status == 200
    assert b"transfer-encoding" not in head.lower()
    assert body == body_for("/chunked/30000", 30000)


async def test_head_request_has_no_body(origin: Origin) -> None:
    async with direct_exit() as exit_, http_front(exit_) as port:
        with anyio.fail_after(30):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                client = _Client(stream)
                status, headers, body = await client.request(
                    "HEAD", f"http://127.0.0.1:{origin.port}/bytes/5000", [("Host", "x")]
                )
                assert (status, body) == (200, b"")
                assert (b"content-length", b"5000") in headers
                status, _, body = await client.request(
                    "GET", f"http://127.0.0.1:{origin.port}/bytes/9", [("Host", "x")]
                )
                assert (status, body) == (200, body_for("/bytes/9", 9))


# ---------------------------------------------------------------------------------------------- head check

_name_values = (
    st.tuples(
        st.sampled_from([b"Content-Length", b"content-length"]),
        st.sampled_from([b"5", b"5", b"5", b"05", b"5, 5", b"+5", b""]),
    )
    | st.tuples(
        st.just(b"Transfer-Encoding"),
        st.sampled_from([b"chunked", b"chunked", b"CHUNKED", b"gzip, chunked", b"gzip"]),
    )
    | st.tuples(
        st.sampled_from([b"X-A", b"X-A", b"X A", b"", b"\xff"]), st.sampled_from([b"a", b"a\x00", b"a\x7f"])
    )
)
_defects: list[tuple[bytes, bytes, bytes, bytes]] = [(b"", b"", b":", b"\r\n")] * 12 + [
    (b" ", b"", b":", b"\r\n"),
    (b"\t", b"", b":", b"\r\n"),
    (b"", b" ", b":", b"\r\n"),
    (b"", b"\t", b":", b"\r\n"),
    (b"", b"", b"", b"\r\n"),
    (b"", b"", b":", b"\n"),
    (b"", b"", b":", b"\r"),
]
_field_lines = st.builds(
    lambda name_value, defect, ws, trail: (
        defect[0] + name_value[0] + defect[1] + defect[2] + ws + name_value[1] + trail + defect[3]
    ),
    _name_values,
    st.sampled_from(_defects),
    st.sampled_from([b"", b"", b" ", b"\t"]),
    st.sampled_from([b"", b"", b" ", b"\t"]),
)
_heads = st.builds(
    lambda line, lines, end: line + b"\r\n" + b"".join(lines) + end,
    st.sampled_from(
        [b"POST http://x/ HTTP/1.1", b"GET http://x/ HTTP/1.0", b"CONNECT x:1 HTTP/1.1"] * 3
        + [b"GET http://x/#f HTTP/1.1", b"GET http://x/ HTTP/2.0", b"G T http://x/ HTTP/1.1"]
    ),
    st.lists(_field_lines, max_size=4).map(lambda lines: [b"Host: x\r\n", *lines]),
    st.sampled_from([b"\r\n"] * 8 + [b"\n"]),
)


@settings(max_examples=1000, deadline=None)
@given(_heads)
@example(b"POST http://x/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
@example(b"POST http://x/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n")
@example(b"POST http://x/ HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tContent-Length: 5\r\n\r\n")
@example(b"POST http://x/ HTTP/1.1\nHost: x\r\nContent-Length: 5\r\n\r\n")
def test_a_head_that_passes_the_check_has_the_same_fields_for_h11(head: bytes) -> None:
    """Whatever the bytes, the check either refuses them with an answer or h11 reads exactly the field lines
    that are there (none folded, merged or collapsed), with one framing field at most."""
    length = request_head_length(head)
    conn = h11.Connection(h11.SERVER)
    if length is None:  # no empty line yet: the front waits, and h11 has no request either
        conn.receive_data(head)
        with contextlib.suppress(h11.RemoteProtocolError):
            assert conn.next_event() is h11.NEED_DATA
        return
    refused: ProxyHTTPError | None = None
    try:
        check_request_head(head[:length])
    except ProxyHTTPError as exc:
        refused = exc
    if refused is not None:
        assert refused.status in (400, 501, 505)
        return
    raw_fields = head[:length].split(b"\r\n")[1:-2]
    conn.receive_data(head[:length])
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:  # what h11 refuses on its own (a missing Host, ...) is answered 400 too
        return
    assert isinstance(event, h11.Request)
    # h11 lowercases names and the Transfer-Encoding value; nothing else may differ
    assert [(name, value.lower()) for name, value in event.headers] == [
        (name.lower(), value.strip(b" \t").lower())
        for name, _, value in (line.partition(b":") for line in raw_fields)
    ]
    framing = [name for name, _ in event.headers if name in (b"content-length", b"transfer-encoding")]
    assert len(framing) <= 1
