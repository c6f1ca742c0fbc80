"""WebSocks server side: upgrade, time-based password, frame header exchange, SOCKS5, relay."""

from __future__ import annotations

import functools
import socket
import time
from collections.abc import Callable

import anyio
import pytest
from anyio.abc import ByteStream
from hypothesis import given
from hypothesis import strategies as st

from vtunnel.apps.dialer import Dialer
from vtunnel.apps.pipe import StreamLeg
from vtunnel.apps.policy import ExitPolicy
from vtunnel.apps.websocks import (
    FRAME_HEADER,
    classify_websocks,
    password_token,
    serve_websocks,
    websocket_accept,
)

from .conftest import Origin, body_for, loopback_dialer, serve_front
from .websocks_client import (
    SocksRejected,
    WebSocksRejected,
    hashed_password,
    read_all,
    upgrade_request,
    websocks_connect,
)

pytestmark = pytest.mark.anyio

USERS = {"alice": "correct horse"}
NOW = 1_700_000_123_456  # a fixed clock for the server


async def _serve(
    stream: ByteStream, *, dialer: Dialer | None = None, now_ms: Callable[[], int] | None = None
) -> None:
    """What the exit side does with a stream that has no destination: classify, then serve WebSocks."""
    first = b""
    while True:
        try:
            first += await stream.receive()
        except anyio.EndOfStream:
            await stream.aclose()
            return
        verdict = classify_websocks(first)
        if verdict is None:
            continue
        if not verdict:
            await stream.aclose()
            return
        await serve_websocks(
            StreamLeg(stream),
            first,
            users=USERS,
            dialer=dialer or loopback_dialer(),
            now_ms=now_ms or (lambda: NOW),
        )
        return


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _fetch(
    port: int, origin_port: int, path: str, *, now_ms: int = NOW, password: str = "correct horse"
) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        rest = await websocks_connect(stream, "alice", password, "localhost", origin_port, now_ms=now_ms)
        await stream.send(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        response = await read_all(stream, rest)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    return body


async def test_fetch_through_websocks(origin: Origin) -> None:
    async with serve_front(_serve) as port:
        with anyio.fail_after(30):
            assert await _fetch(port, origin.port, "/bytes/100000") == body_for("/bytes/100000", 100000)


@pytest.mark.parametrize("skew", [-60_000, 0, 59_999, 60_000])
async def test_adjacent_minutes_accepted(origin: Origin, skew: int) -> None:
    async with serve_front(_serve) as port:
        with anyio.fail_after(30):
            assert await _fetch(port, origin.port, "/bytes/10", now_ms=NOW + skew) == body_for(
                "/bytes/10", 10
            )


@pytest.mark.parametrize("skew", [-180_000, -120_001, 120_000, 3_600_000])
async def test_stale_minutes_rejected(origin: Origin, skew: int) -> None:
    async with serve_front(_serve) as port:
        with anyio.fail_after(30), pytest.raises(WebSocksRejected) as info:
            await _fetch(port, origin.port, "/", now_ms=NOW + skew)
    assert info.value.status == 401


@pytest.mark.parametrize(("user", "password"), [("alice", "wrong"), ("mallory", "correct horse")])
async def test_bad_credentials_get_401(origin: Origin, user: str, password: str) -> None:
    async with serve_front(_serve) as port:
        with anyio.fail_after(30):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                with pytest.raises(WebSocksRejected) as info:
                    await websocks_connect(stream, user, password, "localhost", origin.port, now_ms=NOW)
    assert info.value.status == 401


async def test_unknown_protocol_gets_400(origin: Origin) -> None:
    async with serve_front(_serve) as port:
        with anyio.fail_after(30):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                with pytest.raises(WebSocksRejected) as info:
                    await websocks_connect(
                        stream,
                        "alice",
                        "correct horse",
                        "localhost",
                        origin.port,
                        now_ms=NOW,
                        protocol="chat",
                    )
    assert info.value.status == 400


@pytest.mark.parametrize(
    "authorization",
    [
        "",
        "Authorization: Bearer abc\r\n",
        "Authorization: Basic !!!notbase64\r\n",
        "Authorization: Basic YWxpY2U=\r\n",
    ],
)
async def test_malformed_authorization_gets_401(authorization: str) -> None:
    request = (
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: socks5\r\n{authorization}\r\n"
    ).encode()
    async with serve_front(_serve) as port:
        with anyio.fail_after(30):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(request)
                answer = await read_all(stream)
    assert answer.startswith(b"HTTP/1.1 401 ")


async def test_refused_and_forbidden_destinations() -> None:
    async with serve_front(_serve) as port:
        with anyio.fail_after(30):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                with pytest.raises(SocksRejected) as info:
                    await websocks_connect(
                        stream, "alice", "correct horse", "127.0.0.1", _closed_port(), now_ms=NOW
                    )
            assert info.value.reply == 0x05
    strict = Dialer(ExitPolicy(), connect_timeout=5)
    async with serve_front(functools.partial(_serve, dialer=strict)) as port:
        with anyio.fail_after(30):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                with pytest.raises(SocksRejected) as info:
                    await websocks_connect(stream, "alice", "correct horse", "localhost", 80, now_ms=NOW)
            assert info.value.reply == 0x02


async def test_bad_frame_header_closes(origin: Origin) -> None:
    async with serve_front(_serve) as port:
        with anyio.fail_after(30):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(
                    upgrade_request("alice", "correct horse", now_ms=NOW) + b"\x81\x05hello!!!!"
                )
                answer = await read_all(stream)
    assert answer.startswith(b"HTTP/1.1 101 ")
    assert answer.endswith(FRAME_HEADER)


async def test_everything_pipelined_in_one_write(origin: Origin) -> None:
    """Upgrade, frame header, SOCKS5 and the first request bytes all sent before any answer."""
    from vtunnel.apps.socks5 import Command, encode_request

    http = b"GET /bytes/4321 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    blob = (
        upgrade_request("alice", "correct horse", now_ms=NOW)
        + FRAME_HEADER
        + b"\x05\x01\x00"
        + encode_request(Command.CONNECT, "127.0.0.1", origin.port)
        + http
    )
    async with serve_front(_serve) as port:
        with anyio.fail_after(30):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(blob)
                answer = await read_all(stream)
    assert answer.endswith(b"\r\n\r\n" + body_for("/bytes/4321", 4321))


async def test_garbage_is_not_websocks_and_front_keeps_serving(origin: Origin) -> None:
    async with serve_front(_serve) as port:
        with anyio.fail_after(30):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"\x16\x03\x01\x00\x05hello")
                assert await read_all(stream) == b""
            assert await _fetch(port, origin.port, "/bytes/3") == body_for("/bytes/3", 3)


# ---------------------------------------------------------------------------------------------- pure parts


def test_token_matches_the_independent_client() -> None:
    now = int(time.time() * 1000)
    assert password_token("pw", now - now % 60000) == hashed_password("pw", now)


def test_websocket_accept_rfc6455_example() -> None:
    assert websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_classify_byte_by_byte() -> None:
    request = upgrade_request("alice", "pw", now_ms=NOW)
    for i in range(len(request)):
        assert classify_websocks(request[:i]) is None, i
    assert classify_websocks(request) is True
    assert classify_websocks(request + FRAME_HEADER) is True


@pytest.mark.parametrize(
    "data",
    [
        b"POST / HTTP/1.1\r\n",
        b"\x05\x01\x00",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
        b"GET " + b"a" * 20000,
    ],
)
def test_classify_rejects(data: bytes) -> None:
    assert classify_websocks(data) is False


@given(st.binary(max_size=200))
def test_classify_never_raises(data: bytes) -> None:
    assert classify_websocks(data) in (True, False, None)
