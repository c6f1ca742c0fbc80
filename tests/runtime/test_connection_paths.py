"""The pump's cheap paths over real TCP on 127.0.0.1: timer wake-ups, partial reads, writes, back-pressure."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import ByteStream

from vtunnel.protocol import Role, StreamMetadata, Tunnel, TunnelConfig
from vtunnel.runtime.byte_stream import TunnelByteStream
from vtunnel.runtime.connection import (
    OUTBOUND_HIGH_WATER,
    ROOM_PER_STREAM,
    UNCONTROLLED_BUFFER_LIMIT,
    TunnelConnection,
)
from vtunnel.runtime.tunnel_stream import TunnelStream
from vtunnel.transports.link import READ_SIZE, StreamLink

from .test_connection import read_all, tunnel_pair

pytestmark = pytest.mark.anyio


async def test_an_earlier_deadline_wakes_the_sleeping_timer() -> None:
    """The timers sleep for half a minute or more; a drain deadline set meanwhile must still fire."""
    cfg = TunnelConfig(keepalive_interval=60, keepalive_timeout=60, handshake_timeout=30, drain_timeout=0.3)

    async def handler(stream: TunnelStream) -> None:
        stream.accept()
        await anyio.sleep(30)  # never finishes: only the drain timeout can close the tunnel

    async with tunnel_pair(handler, client_config=cfg, server_config=cfg) as (client, server):
        await client.open_stream(StreamMetadata(authority="a:1"))
        await anyio.sleep(0.1)  # the timers are asleep until the keepalive now
        server.shutdown("maintenance", graceful=True)
        with anyio.fail_after(10):
            await server.wait_closed()
        assert server.close_reason == "maintenance"


async def test_small_reads_of_large_chunks_are_byte_exact() -> None:
    payload = hashlib.sha256(b"p").digest() * 30000  # 960 KB, arrives in large runs

    async def handler(tunnel_stream: TunnelStream) -> None:
        async with TunnelByteStream(tunnel_stream) as stream:
            tunnel_stream.accept()
            await stream.send(payload)
            await stream.send_eof()

    async with tunnel_pair(handler) as (client, _):
        stream = TunnelByteStream(await client.open_stream(StreamMetadata(authority="a:1")))
        got = bytearray()
        sizes = (1, 1000, 70000, 7, 300000)
        with anyio.fail_after(20):
            await anyio.sleep(0.2)  # let a lot arrive, so that reads cut through buffered chunks
            i = 0
            while True:
                try:
                    chunk = await stream.receive(sizes[i % len(sizes)])
                except anyio.EndOfStream:
                    break
                assert 0 < len(chunk) <= sizes[i % len(sizes)]
                got += chunk
                i += 1
        assert bytes(got) == payload


async def test_many_small_sends_arrive_joined_and_exact() -> None:
    pieces = [bytes([i % 256]) * (i % 50 + 1) for i in range(3000)]

    async def handler(tunnel_stream: TunnelStream) -> None:
        async with TunnelByteStream(tunnel_stream) as stream:
            tunnel_stream.accept()
            await anyio.sleep(0.3)  # let the pieces pile up in the receive buffer
            chunks = []
            try:
                while True:
                    chunks.append(await stream.receive(1 << 20))
            except anyio.EndOfStream:
                pass
            await stream.send(str(len(chunks)).encode() + b" " + hashlib.sha256(b"".join(chunks)).digest())
            await stream.send_eof()

    async with tunnel_pair(handler) as (client, _):
        stream = TunnelByteStream(await client.open_stream(StreamMetadata(authority="a:1")))
        with anyio.fail_after(20):
            for piece in pieces:
                await stream.send(piece)
            await stream.send_eof()
            answer = await read_all(stream)
        count, digest = answer.split(b" ", 1)
        assert digest == hashlib.sha256(b"".join(pieces)).digest()
        assert int(count) < len(pieces)  # buffered pieces were joined into fewer chunks


#: a peer that never reads never grants more than the window it advertised: make that window big
BIG = TunnelConfig(
    min_stream_window=256 << 20, initial_stream_window=256 << 20, initial_tunnel_window=256 << 20
)


@asynccontextmanager
async def backed_up_client() -> AsyncIterator[tuple[TunnelConnection, anyio.Event]]:
    """A client tunnel over TCP on 127.0.0.1 to a peer that answers its SETTINGS, then reads nothing until the
    event is set (then everything); shut down on the way out."""
    drain = anyio.Event()

    async def slow_peer(sock: ByteStream) -> None:
        async with sock:
            peer = Tunnel(role=Role.SERVER, config=BIG)
            peer.initiate(0)
            peer.receive_data(await sock.receive(), 0)  # the client's SETTINGS
            await sock.send(peer.data_to_send())
            await drain.wait()
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    await sock.receive(1 << 20)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, slow_peer)
        async with await anyio.connect_tcp("127.0.0.1", port) as raw:
            client = TunnelConnection(StreamLink(raw), role=Role.CLIENT, config=BIG, name="c")
            tg.start_soon(client.run)
            try:
                with anyio.fail_after(10):
                    await client.wait_ready()
                yield client, drain
            finally:
                client.shutdown("test over", graceful=False)
        tg.cancel_scope.cancel()  # (not in a finally: closing raw in a cancelled scope would hide a failure)


class _RoomWatcher:
    """A stream consumer that notes when it is told there is room and, if ``fill``, then writes
    :data:`ROOM_PER_STREAM` bytes at once (what a relay end with bytes waiting does)."""

    def __init__(self, stream: TunnelStream, told: list[int], *, fill: bool) -> None:
        self.stream = stream
        self.told = told
        self.fill = fill

    def stream_data(self, data: bytes) -> None:
        pass

    def stream_eof(self) -> None:
        pass

    def stream_broken(self) -> None:
        pass

    def stream_spliced(self, dedicated: socket.socket, to_peer: bytes, ended: bool) -> bool:
        return False

    def stream_writable(self) -> None:
        self.told.append(self.stream.stream_id)
        if self.fill:
            assert self.stream.write(b"r" * ROOM_PER_STREAM) == ROOM_PER_STREAM


@pytest.mark.parametrize("fill", [True, False], ids=["told-streams-write", "told-streams-idle"])
async def test_room_is_told_to_the_longest_waiting_streams_while_there_is_room(fill: bool) -> None:
    """A thousand streams waiting for the output to drain are told in the order they asked, each once: a few at a
    time when those told add nothing (the event loop turns between the groups, not all told in one go), and also
    when those told write at once (each write runs ``transmit`` inside the telling)."""
    waiting = 1000
    told: list[int] = []
    async with backed_up_client() as (client, drain):
        filler = await client.open_stream(StreamMetadata(authority="a:1"), wait_accepted=False)
        while not client.outbound_congested:  # the peer reads nothing: the output backs up
            assert filler.write(b"x" * (256 << 10)) > 0
        order = []
        for _ in range(waiting):
            stream = await client.open_stream(StreamMetadata(authority="a:1"), wait_accepted=False)
            stream.attach(_RoomWatcher(stream, told, fill=fill))
            assert not stream.has_room()  # asks to be told
            order.append(stream.stream_id)
        drain.set()
        seen = [0]  # how many were told, at each turn of the event loop
        with anyio.fail_after(20):
            while len(told) < waiting:
                await anyio.lowlevel.checkpoint()
                seen.append(len(told))
        assert told == order  # the longest waiting first, each once
        if not fill:
            # a pass tells OUTBOUND_HIGH_WATER // ROOM_PER_STREAM of them; a turn of the loop runs a few passes at
            # most (the retry timer, the link's callbacks), never all of them
            most = max(b - a for a, b in itertools.pairwise(seen))
            assert most <= 4 * (OUTBOUND_HIGH_WATER // ROOM_PER_STREAM)


async def test_a_sender_waits_while_the_transport_is_backed_up() -> None:
    """A peer that stops reading: sends block once the outbound queue is past the high-water mark."""
    async with backed_up_client() as (client, _):
        stream = TunnelByteStream(
            await client.open_stream(StreamMetadata(authority="a:1"), wait_accepted=False)
        )
        sent = 0
        chunk = b"x" * (256 << 10)
        with anyio.move_on_after(1.5):
            while sent < 200 << 20:  # far more than the kernel's socket buffers hold
                await stream.send(chunk)
                sent += len(chunk)
        assert sent < 200 << 20  # the sender was held back
        assert 0 < client.outbound_bytes <= OUTBOUND_HIGH_WATER + len(chunk)
        # the link's queue filled: its room said 0, and it was waited on with nothing built for it
        assert client.link_full > 0
        assert client.link_refusals == 0


async def test_without_flow_control_a_full_buffer_pauses_the_reader_until_it_is_read() -> None:
    """vproxy's rule: the pump stops reading the transport while a stream buffers past the limit."""
    vproxy = TunnelConfig(extensions=False)
    release = anyio.Event()
    size = 4 * UNCONTROLLED_BUFFER_LIMIT
    peak: list[int] = []

    async def handler(tunnel_stream: TunnelStream) -> None:
        async with TunnelByteStream(tunnel_stream) as stream:
            tunnel_stream.accept()
            await release.wait()
            got = 0
            try:
                while True:
                    got += len(await stream.receive())
            except anyio.EndOfStream:
                await stream.send(str(got).encode())
                await stream.send_eof()

    async with tunnel_pair(handler, client_config=vproxy, server_config=vproxy) as (client, server):
        stream = TunnelByteStream(await client.open_stream())
        payload = b"v" * size
        async with anyio.create_task_group() as tg:

            async def write() -> None:
                await stream.send(payload)
                await stream.send_eof()

            tg.start_soon(write)
            with anyio.fail_after(20):
                while not server.streams or max(s.unacknowledged for s in server.streams.values()) == 0:
                    await anyio.sleep(0.01)
                await anyio.sleep(0.5)  # the writer goes on; the server must have stopped reading
                peak.append(max(s.unacknowledged for s in server.streams.values()))
                release.set()
                assert await read_all(stream) == str(size).encode()
        assert UNCONTROLLED_BUFFER_LIMIT < peak[0] <= UNCONTROLLED_BUFFER_LIMIT + READ_SIZE


async def test_a_sender_held_until_the_syn_ack_goes_on_after_it() -> None:
    """Without 0-RTT (a vproxy peer) the core holds a window's worth before the SYN-ACK; the SYN-ACK (there is no
    WINDOW_UPDATE without flow control) must wake the sender for the rest."""
    vproxy = TunnelConfig(extensions=False)
    accept = anyio.Event()
    size = 3 * TunnelConfig().initial_stream_window

    async def handler(tunnel_stream: TunnelStream) -> None:
        async with TunnelByteStream(tunnel_stream) as stream:
            await accept.wait()
            tunnel_stream.accept()
            got = 0
            try:
                while True:
                    got += len(await stream.receive())
            except anyio.EndOfStream:
                await stream.send(str(got).encode())
                await stream.send_eof()

    async with tunnel_pair(handler, client_config=vproxy, server_config=vproxy) as (client, _):
        stream = TunnelByteStream(await client.open_stream(wait_accepted=False))
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:

                async def write() -> None:
                    await stream.send(b"s" * size)
                    await stream.send_eof()

                tg.start_soon(write)
                while client.tunnel.send_window(stream.stream.stream_id):  # the held window is used up
                    await anyio.sleep(0.01)
                accept.set()
                assert await read_all(stream) == str(size).encode()
