"""``proxy=1`` on a tcp:// listener, on real loopback sockets: the PROXY header (v1 and v2) is read before the key
handshake and names the source the server logs and limits by; a connection without one is refused and counted,
and the listener serves on. HAProxy itself: tests/e2e/test_several_servers.py."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable

import anyio
import pytest
import structlog
from anyio.abc import SocketAttribute

from tests.linkutil import stream_of
from tests.streams import echo, wait_until, wrong_key_hello
from tests.transports.test_kcp_sealed import KEY, OTHER_KEY
from vtunnel.security.errors import AuthenticationFailed, HandshakeTimeout
from vtunnel.security.proxy_header import V2_SIGNATURE
from vtunnel.transports.base import Endpoint, ListenerAttribute, TransportError
from vtunnel.transports.link import StreamLink
from vtunnel.transports.secure import secure_client
from vtunnel.transports.tcp import TCPTransport, TLSTransport

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


def v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    return f"PROXY TCP4 {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def v2(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    body = (
        ipaddress.IPv4Address(source[0]).packed
        + ipaddress.IPv4Address(destination[0]).packed
        + struct.pack("!HH", source[1], destination[1])
    )
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


async def echo_behind(port: int, header: bytes, message: bytes) -> bytes:
    """``message`` sent through a tunnel whose connection begins with ``header`` (as a balancer's does) to an echo
    server: what came back."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(header)
    channel = await secure_client(stream, KEY.psk or b"")
    link = stream_of(channel.link(StreamLink(channel.stream)))
    try:
        await link.send(message)
        return await link.receive()
    finally:
        await link.aclose()


@pytest.mark.parametrize("header", [v1, v2], ids=["v1", "v2"])
async def test_the_header_names_the_source_and_the_tunnel_runs_after_it(
    header: Callable[[tuple[str, int], tuple[str, int]], bytes],
) -> None:
    listener = await TCPTransport().listen(Endpoint.parse("tcp://127.0.0.1:0?proxy=1"), security=KEY)
    port = int(listener.extra(SocketAttribute.local_address)[1])
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        said = await echo_behind(port, header(("192.0.2.10", 40000), ("127.0.0.1", port)), b"through it")
        assert said == b"through it"

        # a wrong key behind the balancer: refused, and logged under the client's address the header names
        with structlog.testing.capture_logs() as logs:
            stream = await anyio.connect_tcp("127.0.0.1", port)
            await stream.send(header(("192.0.2.77", 40001), ("127.0.0.1", port)))
            await stream.send(wrong_key_hello(OTHER_KEY.psk or b""))
            with anyio.fail_after(10):
                await wait_until(lambda: any(e["event"] == "handshake refused" for e in logs))
            await stream.aclose()
        refused = [e for e in logs if e["event"] == "handshake refused"]
        assert [e["source"] for e in refused] == ["192.0.2.77"]
        tg.cancel_scope.cancel()
    await listener.aclose()


async def test_a_connection_without_a_header_is_refused_and_the_listener_serves_on() -> None:
    listener = await TCPTransport().listen(Endpoint.parse("tcp://127.0.0.1:0?proxy=1"), security=KEY)
    port = int(listener.extra(SocketAttribute.local_address)[1])
    refusals = listener.extra(ListenerAttribute.refusals)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        with structlog.testing.capture_logs() as logs:
            stream = await anyio.connect_tcp("127.0.0.1", port)  # straight to the server, no header
            with pytest.raises((AuthenticationFailed, HandshakeTimeout, anyio.BrokenResourceError)):
                await secure_client(stream, KEY.psk or b"", handshake_timeout=5)
            with anyio.fail_after(10):
                await wait_until(lambda: refusals.probes["proxy"] >= 1)
        said = [e for e in logs if e["event"] == "connection refused: no valid PROXY header"]
        assert len(said) == 1
        assert said[0]["peer"] == "127.0.0.1"
        assert "does not begin with a PROXY protocol header" in said[0]["reason"]
        # and the next one, with its header, gets its tunnel
        assert await echo_behind(port, v1(("192.0.2.10", 1), ("127.0.0.1", port)), b"serving") == b"serving"
        tg.cancel_scope.cancel()
    await listener.aclose()
    assert refusals.probes["proxy"] == 1


@pytest.mark.parametrize("scheme", ["tcp", "tls"])
async def test_proxy_is_a_listeners_option_and_takes_1_or_0(scheme: str) -> None:
    transport = TCPTransport() if scheme == "tcp" else TLSTransport()
    with pytest.raises(TransportError, match="a listener's"):
        await transport.connect(Endpoint.parse(f"{scheme}://127.0.0.1:1?proxy=1"), security=KEY)
    with pytest.raises(TransportError, match="'proxy' is 1 or 0"):
        transport.check(Endpoint.parse(f"{scheme}://127.0.0.1:1?proxy=yes"))
