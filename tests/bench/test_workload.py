"""The harness's sink, source, echo and idle clients over real loopback sockets."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from bench.workload import (
    ECHO_MAGIC,
    MESSAGE_SIZE,
    PATTERN_PERIOD,
    SINK_MAGIC,
    WorkloadError,
    WorkloadServerStats,
    open_idle,
    pattern_slice,
    probe,
    run_bulk,
    run_rr,
    run_ttfb,
    serve,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, WorkloadServerStats]]:
    stats = WorkloadServerStats()
    srv = await serve("127.0.0.1", 0, stats)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield port, stats
    finally:
        srv.close()
        await srv.wait_closed()


def test_pattern_slices_are_consistent_across_offsets() -> None:
    whole = pattern_slice(0, 3000)
    for offset in (0, 1, 250, 251, 1000, 2999):
        assert pattern_slice(offset, 1) == whole[offset : offset + 1]
    assert pattern_slice(PATTERN_PERIOD * 1000 + 7, 10) == whole[7:17]
    with pytest.raises(ValueError, match="256 KiB"):
        pattern_slice(0, 4 * 65536 + 1)


async def _raw_sink(port: int, payload: bytes, declared: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(struct.pack(">4sIQ", SINK_MAGIC, 0, declared) + payload)
    await writer.drain()
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


@pytest.mark.anyio
@pytest.mark.parametrize("streams", [1, 5])
async def test_bulk_is_validated_by_the_sink(server: tuple[int, WorkloadServerStats], streams: int) -> None:
    port, stats = server
    size = 3 * 1024 * 1024 + 17
    result = await run_bulk("127.0.0.1", port, streams=streams, total_bytes=size, time_limit=30)
    assert result.total_bytes == size
    assert result.streams == streams
    assert len(result.stream_seconds) == streams
    assert result.goodput > 0
    assert stats.sink_ok == streams
    assert stats.sink_bytes == size
    assert stats.sink_errors == 0


@pytest.mark.anyio
async def test_sink_reports_the_first_corrupted_byte(server: tuple[int, WorkloadServerStats]) -> None:
    port, stats = server
    payload = bytearray(pattern_slice(0, 5000))
    payload[1234] ^= 0xFF
    answer = await _raw_sink(port, bytes(payload), len(payload))
    assert answer == b"ER" + (1234).to_bytes(8, "big")
    assert stats.sink_errors == 1
    assert stats.sink_ok == 0


@pytest.mark.anyio
async def test_sink_rejects_a_dropped_chunk(server: tuple[int, WorkloadServerStats]) -> None:
    port, _ = server
    data = pattern_slice(0, 4000)
    payload = data[:1000] + data[1100:]  # 100 bytes lost in the middle
    answer = await _raw_sink(port, payload, len(data))
    assert answer[:2] == b"ER"
    assert int.from_bytes(answer[2:], "big") == 1000


@pytest.mark.anyio
async def test_sink_rejects_trailing_bytes_and_short_streams(server: tuple[int, WorkloadServerStats]) -> None:
    port, stats = server
    data = pattern_slice(0, 600)
    assert await _raw_sink(port, data, 500) == b"ER" + (500).to_bytes(8, "big")
    assert await _raw_sink(port, data[:300], 600) == b""  # cut short: no answer at all
    assert stats.sink_ok == 0


@pytest.mark.anyio
async def test_sink_accepts_an_exact_stream_byte_by_byte(server: tuple[int, WorkloadServerStats]) -> None:
    port, stats = server
    data = pattern_slice(100, 300)  # the stream must start at pattern offset 0
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    header = struct.pack(">4sIQ", SINK_MAGIC, 0, 300)
    for b in header + pattern_slice(0, 300):
        writer.write(bytes([b]))
        await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b"OK" + (300).to_bytes(8, "big")
    writer.close()
    assert data != pattern_slice(0, 300)
    assert stats.sink_ok == 1


@pytest.mark.anyio
async def test_unknown_magic_is_closed(server: tuple[int, WorkloadServerStats]) -> None:
    port, stats = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    assert stats.rejected == 1


@pytest.mark.anyio
async def test_echo_request_response_and_first_byte(server: tuple[int, WorkloadServerStats]) -> None:
    port, stats = server
    samples = await run_rr("127.0.0.1", port, count=200, time_limit=30, warmup=5)
    assert len(samples) == 200
    assert all(s > 0 for s in samples)
    assert stats.echo_bytes == 205 * MESSAGE_SIZE
    firsts = await run_ttfb("127.0.0.1", port, count=20, time_limit=30)
    assert len(firsts) == 20
    assert all(s > 0 for s in firsts)
    assert await probe("127.0.0.1", port, time_limit=5)


@pytest.mark.anyio
async def test_echo_sends_back_the_magic_too(server: tuple[int, WorkloadServerStats]) -> None:
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(ECHO_MAGIC[:2])
    await writer.drain()
    writer.write(ECHO_MAGIC[2:] + b"hello")
    assert await asyncio.wait_for(reader.readexactly(9), 10) == ECHO_MAGIC + b"hello"
    writer.close()


@pytest.mark.anyio
async def test_open_idle_holds_proven_connections(server: tuple[int, WorkloadServerStats]) -> None:
    port, stats = server
    writers = await open_idle("127.0.0.1", port, connections=50, time_limit=30, concurrency=8)
    try:
        assert len(writers) == 50
        assert all(not w.is_closing() for w in writers)
        assert stats.connections == 50
    finally:
        for w in writers:
            w.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.anyio
async def test_clients_fail_clearly_when_nothing_listens() -> None:
    port = _closed_port()
    with pytest.raises(WorkloadError, match="cannot connect"):
        await run_bulk("127.0.0.1", port, streams=1, total_bytes=10, time_limit=5)
    with pytest.raises(WorkloadError, match="cannot connect"):
        await run_rr("127.0.0.1", port, count=1, time_limit=5)
    with pytest.raises(WorkloadError):
        await open_idle("127.0.0.1", port, connections=3, time_limit=5)
    assert not await probe("127.0.0.1", port, time_limit=2)


@pytest.mark.anyio
async def test_bulk_times_out_against_a_silent_peer() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        with pytest.raises(WorkloadError, match="did not finish"):
            await run_bulk("127.0.0.1", port, streams=1, total_bytes=1000, time_limit=1)
    finally:
        listener.close()


@pytest.mark.anyio
async def test_echo_to_a_peer_that_never_reads_stays_bounded(server: tuple[int, WorkloadServerStats]) -> None:
    port, stats = server
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    chunk = ECHO_MAGIC + bytes(65536 - 4)
    sent = 0
    try:
        async with asyncio.timeout(3):  # the server stops reading, so our sends stall well before 256 MiB
            while sent < 256 * 1024 * 1024:
                await loop.sock_sendall(sock, chunk)
                chunk = bytes(65536)
                sent += 65536
    except TimeoutError:
        pass
    finally:
        sock.close()
    assert sent < 256 * 1024 * 1024
    assert stats.echo_bytes < 64 * 1024 * 1024
