"""Random bytes into each front over a real socket pair (anyio's stream and the agent's lean one): it answers or
closes, and never raises."""

from __future__ import annotations

import socket
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from anyio.abc import SocketStream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtunnel.apps.httpproxy import serve_http_proxy
from vtunnel.apps.pipe import Leg, SocketLeg, StreamLeg
from vtunnel.apps.socks5 import serve_socks5
from vtunnel.apps.websocks import classify_websocks, serve_websocks
from vtunnel.io.stream_sockets import LeanSocketStream, attach_socket
from vtunnel.protocol import StreamMetadata
from vtunnel.runtime.errors import StreamRefused

from .conftest import loopback_dialer

Handler = Callable[[Leg], Coroutine[Any, Any, None]]


async def _refusing_opener(metadata: StreamMetadata) -> Leg:
    raise StreamRefused("refused")


async def _feed(handler: Handler, data: bytes, lean: bool = False) -> bytes:
    """Run ``handler`` on one end of a socket pair, write ``data`` and EOF on the other; return the answer.

    ``lean``: the handler's end is the agent's own stream (a LeanSocketStream), else anyio's socket stream."""
    left, right = socket.socketpair()
    server: Leg
    if lean:
        lean_stream = LeanSocketStream()
        attach_socket(left, lean_stream)
        server = SocketLeg(lean_stream)
    else:
        server = StreamLeg(await SocketStream.from_socket(left))
    client = await SocketStream.from_socket(right)
    answer = b""
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(handler, server)
            async with client:
                await client.send(data)
                await client.send_eof()
                try:
                    while True:
                        answer += await client.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
    return answer


_inputs = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.binary(max_size=300).map(lambda b: b"\x05" + b),
    st.binary(max_size=300).map(lambda b: b"\x05\x01\x00\x05" + b),
    st.binary(max_size=300).map(lambda b: b"GET http://" + b),
    st.binary(max_size=300).map(lambda b: b"CONNECT " + b),
)

_settings = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(_inputs, st.booleans())
def test_socks5_front_survives_any_input(data: bytes, lean: bool) -> None:
    async def handler(stream: Leg) -> None:
        await serve_socks5(stream, _refusing_opener, handshake_timeout=5)

    answer = anyio.run(_feed, handler, data, lean)
    assert len(answer) <= 2 + 22  # at most a method choice and one reply


@_settings
@given(_inputs, st.booleans())
def test_http_front_survives_any_input(data: bytes, lean: bool) -> None:
    async def handler(stream: Leg) -> None:
        await serve_http_proxy(stream, _refusing_opener, idle_timeout=5)

    answer = anyio.run(_feed, handler, data, lean)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 ")


_upgrade = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Protocol: socks5\r\nAuthorization: Basic "
)


@_settings
@given(st.binary(max_size=300))
def test_websocks_survives_any_input(tail: bytes) -> None:
    data = _upgrade + tail

    async def handler(stream: Leg) -> None:
        first = data[: len(data) // 2]
        if classify_websocks(first) is False:
            await stream.stream.aclose()
            return
        await serve_websocks(
            stream, b"", users={"u": "p"}, dialer=loopback_dialer(), now_ms=lambda: 0, handshake_timeout=5
        )

    answer = anyio.run(_feed, handler, data)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4")
