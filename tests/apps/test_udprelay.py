"""UDP exit relay: real UDP sockets on 127.0.0.1 behind an in-memory message stream."""

from __future__ import annotations

import functools
import socket

import anyio
import pytest
from anyio.abc import UDPSocket
from hypothesis import given
from hypothesis import strategies as st

from vtunnel.apps.dialer import Dialer
from vtunnel.apps.policy import ExitPolicy
from vtunnel.apps.socks5 import encode_address, parse_address
from vtunnel.apps.udprelay import serve_udp_stream

from .conftest import datagram_pair, loopback_dialer

pytestmark = pytest.mark.anyio


async def _udp() -> UDPSocket:
    return await anyio.create_udp_socket(family=socket.AF_INET, local_host="127.0.0.1")


async def test_round_trip_and_unsolicited_replies_dropped() -> None:
    async with await _udp() as echo, await _udp() as stranger:
        echo_port = echo.extra(anyio.abc.SocketAttribute.local_port)
        near, far = datagram_pair()
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve_udp_stream, far, loopback_dialer())
            with anyio.fail_after(20):
                header = encode_address("127.0.0.1", echo_port)
                await near.send(b"\x07garbage")  # unknown address type: dropped
                await near.send(header[:3])  # truncated: dropped
                await near.send(header + b"ping")
                data, relay_addr = await echo.receive()
                assert data == b"ping"
                await echo.sendto(b"pong", *relay_addr)
                assert await near.receive() == header + b"pong"
                # someone the stream never sent to: not passed back
                await stranger.sendto(b"injected", *relay_addr)
                await echo.sendto(b"second", *relay_addr)
                assert await near.receive() == header + b"second"
            await near.aclose()


async def test_forbidden_destination_dropped_and_stream_goes_on() -> None:
    async with await _udp() as echo:
        echo_port = echo.extra(anyio.abc.SocketAttribute.local_port)
        near, far = datagram_pair()
        strict = Dialer(ExitPolicy(allow=["127.0.0.1/32"], deny=["127.0.0.2"]), connect_timeout=5)
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve_udp_stream, far, strict)
            with anyio.fail_after(20):
                await near.send(encode_address("127.0.0.2", echo_port) + b"denied")
                await near.send(encode_address("localhost", echo_port) + b"by-name")  # name not allowed
                await near.send(encode_address("127.0.0.1", echo_port) + b"allowed")
                data, _ = await echo.receive()
                assert data == b"allowed"
            await near.aclose()


async def test_idle_timeout_ends_the_relay() -> None:
    near, far = datagram_pair()
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(serve_udp_stream, far, loopback_dialer(), idle_timeout=0.2))
            with pytest.raises(anyio.EndOfStream):
                await near.receive()
    await near.aclose()


async def test_invalid_idle_timeout() -> None:
    near, far = datagram_pair()
    with pytest.raises(ValueError, match="idle_timeout"):
        await serve_udp_stream(far, loopback_dialer(), idle_timeout=0)
    await near.aclose()
    await far.aclose()


@given(
    st.one_of(st.ip_addresses().map(str), st.from_regex(r"[a-z]{1,20}(\.[a-z]{1,10}){0,3}", fullmatch=True)),
    st.integers(0, 65535),
    st.binary(max_size=64),
)
def test_datagram_header_round_trip(host: str, port: int, payload: bytes) -> None:
    wire = encode_address(host, port) + payload
    parsed = parse_address(wire)
    assert parsed is not None
    _, parsed_host, parsed_port, end = parsed
    assert (parsed_host, parsed_port, wire[end:]) == (host, port, payload)
