"""anyio byte-stream helpers shared by the transport tests."""

from __future__ import annotations

from collections.abc import Callable

import anyio
from anyio.abc import ByteStream


async def echo(stream: ByteStream) -> None:
    """Send back everything received until the peer ends or breaks the stream, then close it."""
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
