"""The anyio pump over real TCP sockets on 127.0.0.1: streams, half-close, resets, back-pressure, shutdown."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.abc import ByteStream
from hypothesis import given, settings
from hypothesis import strategies as st

from vtunnel.protocol import Role, StreamMetadata, TunnelConfig
from vtunnel.runtime.byte_stream import TunnelByteStream, TunnelStreamAttribute
from vtunnel.runtime.connection import TunnelConnection
from vtunnel.runtime.errors import StreamRefused
from vtunnel.runtime.tunnel_stream import TunnelStream
from vtunnel.transports.link import Link, StreamLink

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
            conn = TunnelConnection(
                StreamLink(stream), role=Role.SERVER, config=server_config, handler=handler, name="s"
            )
            servers.append(conn)
            await conn.run()

        tg.start_soon(listener.serve, on_accept)
        raw = await anyio.connect_tcp("127.0.0.1", port)
        client = TunnelConnection(StreamLink(raw), role=Role.CLIENT, config=client_config, name="c")
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


async def open_bytes(conn: TunnelConnection, metadata: StreamMetadata | None = None) -> TunnelByteStream:
    return TunnelByteStream(await conn.open_stream(metadata))


async def echo_handler(tunnel_stream: TunnelStream) -> None:
    tunnel_stream.accept()
    async with TunnelByteStream(tunnel_stream) as stream:
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
        stream = await open_bytes(client, StreamMetadata(authority="x:1") if extensions else None)
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

    async def handler(tunnel_stream: TunnelStream) -> None:
        tunnel_stream.accept()
        async with TunnelByteStream(tunnel_stream) as stream:
            seen.append(stream.extra(TunnelStreamAttribute.metadata))
            await stream.send(b"ok")
            await stream.send_eof()

    async with tunnel_pair(handler) as (client, _):
        md = StreamMetadata(authority="example.com:443", kind="tcp")
        stream = await open_bytes(client, md)
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


async def stalling_handler(tunnel_stream: TunnelStream, release: anyio.Event) -> None:
    """Streams whose authority starts with ``stall`` are never read (until ``release``); the others are read to
    their end and answered with the number of bytes they carried."""
    tunnel_stream.accept()
    md = tunnel_stream.metadata
    async with TunnelByteStream(tunnel_stream) as stream:
        if md is not None and (md.authority or "").startswith("stall"):
            await release.wait()  # never reads
            return
        total = 0
        try:
            while True:
                total += len(await stream.receive())
        except anyio.EndOfStream:
            await stream.send(str(total).encode())
            await stream.send_eof()


async def test_a_stalled_reader_does_not_stall_other_streams() -> None:
    stalled = anyio.Event()

    async def handler(stream: TunnelStream) -> None:
        await stalling_handler(stream, stalled)

    async with tunnel_pair(handler) as (client, server):
        slow = await open_bytes(client, StreamMetadata(authority="stall:1"))
        fast = await open_bytes(client, StreamMetadata(authority="fast:1"))
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
        assert stalled_server[0].unacknowledged <= window
        stalled.set()


async def test_tunnel_death_breaks_streams() -> None:
    async def handler(stream: TunnelStream) -> None:
        stream.accept()
        await anyio.sleep(30)

    async with tunnel_pair(handler) as (client, server):
        stream = await open_bytes(client, StreamMetadata(authority="a:1"))
        await anyio.aclose_forcefully(server.link)
        with anyio.fail_after(10), pytest.raises(anyio.BrokenResourceError):
            await stream.receive()
        assert client.closed


async def test_graceful_shutdown_lets_open_streams_finish() -> None:
    release = anyio.Event()

    async def handler(tunnel_stream: TunnelStream) -> None:
        tunnel_stream.accept()
        async with TunnelByteStream(tunnel_stream) as stream:
            await release.wait()
            await stream.send(b"late answer")
            await stream.send_eof()

    async with tunnel_pair(handler) as (client, server):
        stream = await open_bytes(client, StreamMetadata(authority="a:1"))
        server.shutdown("maintenance", graceful=True)
        await anyio.sleep(0.2)
        assert not client.accepting_streams  # GOAWAY received: no new streams
        release.set()
        with anyio.fail_after(10):
            assert await read_all(stream) == b"late answer"


@asynccontextmanager
async def kcp_tunnel_pair(
    handler: Handler, query: str = "", config: TunnelConfig | None = None, *, key: bytes | None = None
) -> AsyncIterator[tuple[TunnelConnection, TunnelConnection]]:
    """The same pair over kcp://, whose sessions take synchronous writes and push what they receive (sealed with
    ``key``, when given)."""
    from vtunnel.transports.base import Endpoint, SecurityConfig
    from vtunnel.transports.kcp.listener import KCPListener
    from vtunnel.transports.kcp.transport import KCPTransport

    plain = SecurityConfig(psk=key)
    listener = await KCPTransport().listen(Endpoint.parse(f"kcp://127.0.0.1:0{query}"), security=plain)
    assert isinstance(listener, KCPListener)
    url = f"kcp://127.0.0.1:{listener.local_address[1]}{query}"
    servers: list[TunnelConnection] = []
    async with listener, anyio.create_task_group() as tg:

        async def on_accept(link: Link) -> None:
            conn = TunnelConnection(link, role=Role.SERVER, config=config, handler=handler, name="s")
            servers.append(conn)
            await conn.run()

        tg.start_soon(listener.serve, on_accept)
        raw = await KCPTransport().connect(Endpoint.parse(url), security=plain)
        client = TunnelConnection(raw, role=Role.CLIENT, config=config, name="c")
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


async def test_small_messages_go_to_the_link_from_the_sender_and_are_never_refused() -> None:
    async with kcp_tunnel_pair(echo_handler) as (client, server):
        stream = await open_bytes(client, StreamMetadata(authority="rr:1"))
        before = (client.link_writes, server.link_writes)
        with anyio.fail_after(20):
            for i in range(100):
                message = i.to_bytes(8, "big") * 8
                await stream.send(message)
                got = b""
                while len(got) < len(message):
                    got += await stream.receive()
                assert got == message
        assert client.link_writes - before[0] >= 100
        assert server.link_writes - before[1] >= 100
        assert (client.link_refusals, server.link_refusals) == (0, 0)  # nothing waited for room


async def test_a_full_kcp_window_holds_writes_until_the_link_has_room_in_order() -> None:
    """Bulk through a 32-segment window: output waits for ``link_writable`` while the session's room is 0, no write
    is refused (nothing is built for a full window), and every byte of every stream still arrives in order."""
    async with kcp_tunnel_pair(echo_handler, "?sndwnd=32&rcvwnd=128") as (client, _server):
        payloads = [hashlib.sha256(bytes([i])).digest() * (12000 + 997 * i) for i in range(4)]
        results: dict[int, bytes] = {}

        async def one(i: int) -> None:
            stream = await open_bytes(client, StreamMetadata(authority=f"bulk:{i}"))
            async with anyio.create_task_group() as tg:

                async def write() -> None:
                    for start in range(0, len(payloads[i]), 50000):
                        await stream.send(payloads[i][start : start + 50000])
                    await stream.send_eof()

                tg.start_soon(write)
                results[i] = await read_all(stream)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(len(payloads)):
                    tg.start_soon(one, i)
        assert [results[i] == payloads[i] for i in range(len(payloads))] == [True] * len(payloads)
        assert client.link_writes > 0
        assert client.link_full > 0
        assert client.link_refusals == 0


@pytest.mark.parametrize("key", [None, bytes(range(32))], ids=["plain", "sealed"])
async def test_a_kcp_download_offers_the_link_each_byte_once(key: bytes | None) -> None:
    """A bulk download through KCP's full send window: the server's tunnel asks the link's room before taking
    bytes from the tunnel, so no write is refused (none built and given again) and every byte arrives."""
    block = hashlib.sha256(b"download").digest() * (256 << 10 >> 5)  # 256 KiB
    blocks = 64  # 16 MiB

    async def download(tunnel_stream: TunnelStream) -> None:
        tunnel_stream.accept()
        async with TunnelByteStream(tunnel_stream) as stream:
            for _ in range(blocks):
                await stream.send(block)
            await stream.send_eof()

    async with kcp_tunnel_pair(download, key=key) as (client, server):
        with anyio.fail_after(60):
            stream = await open_bytes(client, StreamMetadata(authority="download:1"))
            digest = hashlib.sha256()
            received = 0
            try:
                while True:
                    data = await stream.receive()
                    digest.update(data)
                    received += len(data)
            except anyio.EndOfStream:
                pass
        assert received == len(block) * blocks
        assert digest.digest() == hashlib.sha256(block * blocks).digest()
        assert server.link_refusals == 0
        assert server.link_writes > 0
        assert server.bytes_out >= len(block) * blocks


async def test_a_write_larger_than_a_link_write_reaches_the_link_in_link_write_pieces() -> None:
    """Megabytes queued at once (one stream's 8 MiB window, as a thousand streams' windows do) go to the link in
    writes of at most ``LINK_WRITE``: each is a buffer joined from the frames, and one of the C library's mapping
    threshold or more would be mapped and faulted in afresh for every write. Every byte arrives in order."""
    from vtunnel.runtime.connection import LINK_WRITE

    payload = hashlib.sha256(b"queued").digest() * (3 * LINK_WRITE // 32 + 1000)  # three writes and a bit
    received: list[bytes] = []

    async def sink(tunnel_stream: TunnelStream) -> None:
        tunnel_stream.accept()
        async with TunnelByteStream(tunnel_stream) as stream:
            received.append(await read_all(stream))

    cfg = TunnelConfig(initial_stream_window=8 << 20, receive_budget=16 << 20)
    async with kcp_tunnel_pair(sink, config=cfg) as (client, _server):
        link = client.link
        send_nowait = link.send_nowait
        sizes: list[int] = []

        def recorded(data: bytes) -> None:
            send_nowait(data)  # (a refused write raises before it is recorded)
            sizes.append(len(data))

        link.send_nowait = recorded  # type: ignore[method-assign]
        stream = await open_bytes(client, StreamMetadata(authority="sink:1"))
        with anyio.fail_after(60):
            await stream.send(payload)  # the window takes it whole: one write of the stream
            await stream.send_eof()
            while not received:
                await anyio.sleep(0.01)
        assert received == [payload]
        assert sum(sizes) > len(payload)  # (the frame headers and the FIN too)
        assert max(sizes) == LINK_WRITE  # the queue went in pieces, the largest exactly one LINK_WRITE
        assert client.link_refusals == 0


async def test_kcp_tunnel_death_breaks_streams() -> None:
    async def handler(stream: TunnelStream) -> None:
        stream.accept()
        await anyio.sleep(30)

    async with kcp_tunnel_pair(handler, "?timeout=1") as (client, server):
        stream = await open_bytes(client, StreamMetadata(authority="a:1"))
        await anyio.aclose_forcefully(server.link)

        async def keep_sending() -> None:
            # the server's session is gone: the client's link dies and its stream breaks
            for _ in range(3000):
                await stream.send(b"x" * 1000)
                await anyio.sleep(0.01)

        with anyio.fail_after(30), pytest.raises(anyio.BrokenResourceError):
            await keep_sending()
        assert client.closed


async def test_pushed_input_pauses_for_a_full_buffer_without_flow_control_and_resumes() -> None:
    """A vproxy-style tunnel (no flow control) over kcp://: the input pushed by the session stops while a stream
    holds more than the buffer limit, the data waits in KCP, and reading the stream resumes it; nothing is lost.
    """
    from vtunnel.runtime.connection import UNCONTROLLED_BUFFER_LIMIT

    release = anyio.Event()
    received: list[int] = []

    async def handler(tunnel_stream: TunnelStream) -> None:
        tunnel_stream.accept()
        async with TunnelByteStream(tunnel_stream) as stream:
            await release.wait()
            received.append(len(await read_all(stream)))

    size = 3 * UNCONTROLLED_BUFFER_LIMIT
    cfg = TunnelConfig(extensions=False)
    async with kcp_tunnel_pair(handler, config=cfg) as (client, server):
        stream = await open_bytes(client, None)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:

                async def write() -> None:
                    await stream.send(b"p" * size)
                    await stream.send_eof()

                tg.start_soon(write)
                while not server.reading_paused:
                    await anyio.sleep(0.01)
                held = next(iter(server.streams.values())).unacknowledged
                assert UNCONTROLLED_BUFFER_LIMIT < held < size
                release.set()
            while not received:
                await anyio.sleep(0.01)
        assert received == [size]


async def _interleaved_writes(writes: list[tuple[int, int]], streams: int) -> None:
    """Write ``(stream, size)`` pieces in this order from one task over kcp:// (a 32-segment window, so some
    writes go straight to the session and some wait for the writer) and check every echo byte for byte."""
    async with kcp_tunnel_pair(echo_handler, "?sndwnd=32&rcvwnd=128") as (client, _server):
        opened = [await open_bytes(client, StreamMetadata(authority=f"s:{i}")) for i in range(streams)]
        sent = [bytearray() for _ in range(streams)]
        echoed: dict[int, bytes] = {}
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:

                async def collect(i: int) -> None:
                    echoed[i] = await read_all(opened[i])

                for i in range(streams):
                    tg.start_soon(collect, i)
                for n, (i, size) in enumerate(writes):
                    piece = bytes([n % 251]) * size
                    sent[i] += piece
                    await opened[i].send(piece)
                for stream in opened:
                    await stream.send_eof()
        assert [echoed[i] == bytes(sent[i]) for i in range(streams)] == [True] * streams


@settings(max_examples=12, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.sampled_from([1, 64, 1300, 20000, 200000])), min_size=1, max_size=30
    )
)
def test_any_interleaving_of_direct_and_waiting_writes_keeps_every_stream_in_order(
    writes: list[tuple[int, int]],
) -> None:
    anyio.run(_interleaved_writes, writes, 3)


async def test_a_server_tunnel_whose_peer_never_handshakes_is_closed_after_the_handshake_timeout() -> None:
    """A silent peer must not hold a server's socket (and descriptor) forever."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    closed = anyio.Event()
    async with anyio.create_task_group() as tg:

        async def on_accept(stream: ByteStream) -> None:
            conn = TunnelConnection(
                StreamLink(stream), role=Role.SERVER, config=TunnelConfig(handshake_timeout=0.3), name="s"
            )
            await conn.run()
            closed.set()

        tg.start_soon(listener.serve, on_accept)
        silent = await anyio.connect_tcp("127.0.0.1", port)
        with anyio.fail_after(10):
            await closed.wait()
            # the server closed the transport: the silent peer sees the end (after a GOAWAY)
            ended = False
            while not ended:
                try:
                    await silent.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    ended = True
        await silent.aclose()
        tg.cancel_scope.cancel()
    await listener.aclose()


async def test_streams_opened_and_accepted_in_one_turn_share_link_writes() -> None:
    """SYNs sent and SYN-ACKs answered in one event-loop turn leave together, not one link write each."""
    count = 64
    accepted: list[TunnelStream] = []
    done = anyio.Event()

    async def hold(tunnel_stream: TunnelStream) -> None:
        tunnel_stream.accept()
        accepted.append(tunnel_stream)
        await done.wait()

    async with tunnel_pair(hold) as (client, server):
        client_writes, server_writes = client.link_writes, server.link_writes
        streams = [await client.open_stream(wait_accepted=False) for _ in range(count)]
        with anyio.fail_after(10):
            while len(accepted) < count:
                await anyio.sleep(0.01)
        assert client.link_writes - client_writes < count // 4
        assert server.link_writes - server_writes < count // 4
        for stream in streams:
            stream.close()
        done.set()
