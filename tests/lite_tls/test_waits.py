"""The waits of a lite-tls stream are bounded, end to end (agent and server in-process over tcp:// with a key, a
scripted destination on loopback, a raw SOCKS5 client): an active end whose marker is never answered resets the
stream after ANSWER_TIMEOUT (with a log line), so does a passive end that holds the bytes after the peer's marker
for HOLD_TIMEOUT without the first application-data record coming whole, and a client that writes the start of something like a record
header and then waits for the server falls back after LOCAL_STALL instead of hanging."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketStream
from structlog.testing import capture_logs

from vtunnel.runtime import tunnel_stream

from .test_muxed import left_tunnel, tunnel

pytestmark = pytest.mark.anyio


def record(kind: int, n: int) -> bytes:
    return bytes([kind, 3, 3]) + n.to_bytes(2, "big") + b"B" * n


HELLO = b"\x16\x03\x01\x00\x04\x01\x00\x00\x00"


@asynccontextmanager
async def destination(serve: Callable[[SocketStream], Awaitable[None]]) -> AsyncIterator[int]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        yield listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.cancel_scope.cancel()


async def socks_connect(socks: int, port: int, host: str = "127.0.0.1") -> SocketStream:
    client = await anyio.connect_tcp("127.0.0.1", socks)
    await client.send(b"\x05\x01\x00")
    assert await client.receive(2) == b"\x05\x00"
    await client.send(b"\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big"))
    assert (await client.receive(10))[:2] == b"\x05\x00"
    return client


async def hello_then(client: SocketStream, first: bytes) -> bytearray:
    """The user's ClientHello, then the destination's ``first`` bytes back."""
    await client.send(HELLO)
    got = bytearray()
    while len(got) < len(first):
        got += await client.receive()
    return got


async def read_until_closed(client: SocketStream) -> bytes:
    got = bytearray()
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
        while True:
            got += await client.receive()
    return bytes(got)


async def test_a_marker_never_answered_resets_the_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tunnel_stream, "ANSWER_TIMEOUT", 0.5)
    first = record(0x16, 40) + record(0x17, 30)

    async def half_a_record(conn: SocketStream) -> None:  # then never the rest: its server end cannot answer
        async with conn:
            await conn.receive()
            await conn.send(first + record(0x17, 100)[:15])
            await anyio.sleep(30)

    with capture_logs() as logs:
        async with destination(half_a_record) as port, tunnel() as t:
            with anyio.fail_after(20):
                client = await socks_connect(t.socks, port)
                async with client:
                    got = await hello_then(client, first)
                    await client.send(record(0x17, 20))  # the agent goes active: marker, then it holds
                    got += await read_until_closed(client)
    assert bytes(got[: len(first)]) == first
    timeouts = [e for e in logs if e["event"] == "lite_tls.answer_timeout"]
    assert len(timeouts) == 1


async def test_a_passive_end_that_never_gets_the_first_application_data_resets_the_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The user goes active with half an application-data record and then goes quiet: the server end, passive,
    answered and holds what follows the marker until that record is whole; after HOLD_TIMEOUT it resets the
    stream (with a log line) instead of holding for ever, and the destination never got the half record."""
    monkeypatch.setattr(tunnel_stream, "HOLD_TIMEOUT", 0.5)
    first = record(0x16, 40) + record(0x17, 30)
    got_by_destination = bytearray()

    async def answer_then_read(conn: SocketStream) -> None:
        async with conn:
            got_by_destination.extend(await conn.receive())
            await conn.send(first)
            got_by_destination.extend(await read_until_closed(conn))

    with capture_logs() as logs:
        async with destination(answer_then_read) as port, tunnel() as t:
            with anyio.fail_after(20):
                client = await socks_connect(t.socks, port)
                async with client:
                    got = await hello_then(client, first)
                    await client.send(record(0x17, 100)[:15])  # the agent goes active; the rest never comes
                    got += await read_until_closed(client)
    assert bytes(got) == first
    assert bytes(got_by_destination) == HELLO
    holds = [e for e in logs if e["event"] == "lite_tls.hold_timeout"]
    assert len(holds) == 1
    assert holds[0]["held"] == 0  # (the agent keeps a partial record until its rest: nothing came to hold)
    left = left_tunnel(logs)
    assert sorted(str(e["role"]) for e in left) == ["active", "passive"]


async def test_the_fin_waits_for_what_the_active_end_holds() -> None:
    """The user goes active and ends its side at once (a request, then its FIN): the agent holds the request
    until the server end's answer, and the FIN goes after it, so the destination reads the whole request to its
    end of stream and still answers."""
    first = record(0x16, 40) + record(0x17, 30)
    request = record(0x17, 300) + record(0x15, 2)

    async def answer_after_eof(conn: SocketStream) -> None:
        async with conn:
            got = bytearray(await conn.receive())
            await conn.send(first)
            got += await read_until_closed(conn)
            await conn.send(record(0x17, len(got)))

    with capture_logs() as logs:
        async with destination(answer_after_eof) as port, tunnel() as t:
            with anyio.fail_after(20):
                client = await socks_connect(t.socks, port)
                async with client:
                    got = await hello_then(client, first)
                    await client.send(request)
                    await client.send_eof()
                    got += await read_until_closed(client)
    assert bytes(got) == first + record(0x17, len(HELLO) + len(request))
    assert sorted(str(e["role"]) for e in left_tunnel(logs)) == [
        "active",
        "passive",
    ]


async def test_a_header_begun_and_then_quiet_falls_back_instead_of_hanging() -> None:
    async def echo(conn: SocketStream) -> None:
        async with conn:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    await conn.send(await conn.receive())

    async with destination(echo) as port, tunnel() as t:
        with anyio.fail_after(20):
            client = await socks_connect(t.socks, port)
            async with client:
                await client.send(b"\x16\x03")  # could be a ClientHello's header, then nothing
                assert await client.receive() == b"\x16\x03"
                await client.send(b" and more")
                assert await client.receive() == b" and more"
