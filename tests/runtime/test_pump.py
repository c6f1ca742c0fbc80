"""The anyio pump over real TCP sockets on 127.0.0.1: streams, half-close, resets, back-pressure, shutdown."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.abc import ByteStream

from vtunnel.protocol import Role, StreamMetadata, TunnelConfig
from vtunnel.runtime.errors import StreamRefused
from vtunnel.runtime.pump import TunnelConnection
from vtunnel.runtime.stream import TunnelStream, TunnelStreamAttribute

pytestmark = pytest.mark.anyio

Handler = Callable[[TunnelStream], Awaitable[None]]


@asynccontextmanager
async def tunnel_pair(
    handler: Handler, *, client_config: TunnelConfig | None = None, server_config: TunnelConfig | None = None
) -> AsyncIterator[tuple[TunnelConnection, TunnelConnection]]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    servers: list[TunnelConnection] = []
    async with anyio.create_task_group() as tg:

        async def on_accept(stream: ByteStream) -> None:
            conn = TunnelConnection(stream, role=Role.SERVER, config=server_config, handler=handler, name="s")
            servers.append(conn)
            await conn.run()

        tg.start_soon(listener.serve, on_accept)
        raw = await anyio.connect_tcp("127.0.0.1", port)
        client = TunnelConnection(raw, role=Role.CLIENT, config=client_config, name="c")
        tg.start_soon(client.run)
        with anyio.fail_after(10):
            await client.wait_ready()
            while not servers:
                await anyio.sleep(0.01)
        try:
            yield client, servers[0]
        finally:
            client.shutdown("test over", graceful=False)
            tg.cancel_scope.cancel()
    await listener.aclose()


async def echo_handler(stream: TunnelStream) -> None:
    stream.accept()
    try:
        while True:
            data = await stream.receive()
            await stream.send(data)
    except anyio.EndOfStream:
        await stream.send_eof()


async def read_all(stream: ByteStream) -> bytes:
    out = bytearray()
    try:
        while True:
            out += await stream.receive()
    except anyio.EndOfStream:
        return bytes(out)


@pytest.mark.parametrize("extensions", [True, False])
async def test_echo_with_half_close(extensions: bool) -> None:
    cfg = TunnelConfig(extensions=extensions)
    async with tunnel_pair(echo_handler, client_config=cfg, server_config=cfg) as (client, _):
        stream = await client.open_stream(StreamMetadata(authority="x:1") if extensions else None)
        payload = hashlib.sha256(b"x").digest() * 40000  # 1.25 MiB
        async with anyio.create_task_group() as tg:

            async def write() -> None:
                await stream.send(payload)
                await stream.send_eof()

            tg.start_soon(write)
            with anyio.fail_after(30):
                got = await read_all(stream)
        assert got == payload
        await stream.aclose()


async def test_metadata_reaches_the_server() -> None:
    seen: list[StreamMetadata | None] = []

    async def handler(stream: TunnelStream) -> None:
        seen.append(stream.extra(TunnelStreamAttribute.metadata))
        stream.accept()
        await stream.send(b"ok")
        await stream.send_eof()

    async with tunnel_pair(handler) as (client, _):
        md = StreamMetadata(authority="example.com:443", kind="tcp")
        stream = await client.open_stream(md)
        with anyio.fail_after(10):
            assert await read_all(stream) == b"ok"
    assert seen == [md]


async def test_refusal_reaches_the_opener_with_its_reason() -> None:
    async def handler(stream: TunnelStream) -> None:
        stream.refuse("forbidden")

    async with tunnel_pair(handler) as (client, _):
        with anyio.fail_after(10), pytest.raises(StreamRefused) as info:
            await client.open_stream(StreamMetadata(authority="10.0.0.1:80"))
        assert info.value.error == "forbidden"
        # the tunnel goes on serving
        assert client.accepting_streams


async def test_a_stalled_reader_does_not_stall_other_streams() -> None:
    stalled = anyio.Event()

    async def handler(stream: TunnelStream) -> None:
        stream.accept()
        md = stream.metadata
        if md is not None and md.authority == "stall:1":
            await stalled.wait()  # never reads
            return
        total = 0
        try:
            while True:
                total += len(await stream.receive())
        except anyio.EndOfStream:
            await stream.send(str(total).encode())
            await stream.send_eof()

    async with tunnel_pair(handler) as (client, server):
        slow = await client.open_stream(StreamMetadata(authority="stall:1"))
        fast = await client.open_stream(StreamMetadata(authority="fast:1"))
        window = client.tunnel.config.initial_stream_window
        # fill the stalled stream's window: the send must not complete
        with anyio.move_on_after(1):
            await slow.send(b"s" * (window * 4))
        size = 16 * 1024 * 1024
        chunk = b"f" * 65536
        with anyio.fail_after(60):
            for _ in range(size // len(chunk)):
                await fast.send(chunk)
            await fast.send_eof()
            assert await read_all(fast) == str(size).encode()
        stalled_server = [
            s for s in server.streams.values() if s.metadata and s.metadata.authority == "stall:1"
        ]
        assert stalled_server
        assert stalled_server[0].buffered <= window
        stalled.set()


async def test_tunnel_death_breaks_streams() -> None:
    async def handler(stream: TunnelStream) -> None:
        stream.accept()
        await anyio.sleep(30)

    async with tunnel_pair(handler) as (client, server):
        stream = await client.open_stream(StreamMetadata(authority="a:1"))
        await anyio.aclose_forcefully(server.transport)
        with anyio.fail_after(10), pytest.raises(anyio.BrokenResourceError):
            await stream.receive()
        assert client.closed


async def test_graceful_shutdown_lets_open_streams_finish() -> None:
    release = anyio.Event()

    async def handler(stream: TunnelStream) -> None:
        stream.accept()
        await release.wait()
        await stream.send(b"late answer")
        await stream.send_eof()

    async with tunnel_pair(handler) as (client, server):
        stream = await client.open_stream(StreamMetadata(authority="a:1"))
        server.shutdown("maintenance", graceful=True)
        await anyio.sleep(0.2)
        assert not client.accepting_streams  # GOAWAY received: no new streams
        release.set()
        with anyio.fail_after(10):
            assert await read_all(stream) == b"late answer"
