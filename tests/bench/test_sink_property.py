"""Property tests of the sink's parser: any split of a good stream passes, any corruption is found where it is."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.workload import SINK_MAGIC, WorkloadServerStats, pattern_slice, serve

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def sink_port() -> Iterator[int]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, object] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(serve("127.0.0.1", 0, WorkloadServerStats()))
        holder["server"] = server
        holder["port"] = server.sockets[0].getsockname()[1]
        ready.set()
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    port = holder["port"]
    assert isinstance(port, int)
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _send_in_pieces(port: int, data: bytes, cuts: list[int]) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = 0
        for cut in [*sorted(set(cuts)), len(data)]:
            if start < cut <= len(data):
                sock.sendall(data[start:cut])
                start = cut
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(64):
            answer += chunk
        return answer


def _stream(size: int) -> bytes:
    return struct.pack(">4sIQ", SINK_MAGIC, 0, size) + pattern_slice(0, size)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(min_value=0, max_value=20000), cuts=st.lists(st.integers(0, 20016), max_size=12))
def test_any_split_of_a_good_stream_is_accepted(sink_port: int, size: int, cuts: list[int]) -> None:
    assert _send_in_pieces(sink_port, _stream(size), cuts) == b"OK" + size.to_bytes(8, "big")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.integers(min_value=1, max_value=20000),
    where=st.floats(min_value=0, max_value=1, exclude_max=True),
    flip=st.integers(min_value=1, max_value=255),
    cuts=st.lists(st.integers(0, 20016), max_size=8),
)
def test_a_corrupted_byte_is_reported_at_its_offset(
    sink_port: int, size: int, where: float, flip: int, cuts: list[int]
) -> None:
    offset = int(where * size)
    data = bytearray(_stream(size))
    data[16 + offset] ^= flip
    assert _send_in_pieces(sink_port, bytes(data), cuts) == b"ER" + offset.to_bytes(8, "big")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(min_value=1, max_value=5000), short=st.integers(min_value=1, max_value=5000))
def test_a_short_stream_never_gets_ok(sink_port: int, size: int, short: int) -> None:
    short = min(short, size)
    assert _send_in_pieces(sink_port, _stream(size)[: 16 + size - short], []) == b""
