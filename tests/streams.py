"""anyio byte-stream helpers shared by the transport tests."""

from __future__ import annotations

from collections.abc import Callable

import anyio
from anyio.abc import ByteStream

from tests.linkutil import stream_of
from vtunnel.transports.link import Link


async def echo(stream: ByteStream | Link) -> None:
    """Send back everything received until the peer ends or breaks the stream (or link), then close it."""
    if isinstance(stream, Link):
        stream = stream_of(stream)
    try:
        while True:
            await stream.send(await stream.receive())
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def read_exactly(stream: ByteStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        buf += await stream.receive()
    return bytes(buf)


async def wait_until(condition: Callable[[], bool], limit: float = 10.0) -> None:
    """Poll ``condition`` every 5 ms until it holds; fail after ``limit`` seconds."""
    with anyio.fail_after(limit):
        while not condition():
            await anyio.sleep(0.005)
