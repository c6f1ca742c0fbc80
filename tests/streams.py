"""anyio byte-stream helpers shared by the transport tests."""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
from anyio.abc import ByteStream

from tests.linkutil import stream_of
from vtunnel.security.records import MAX_HANDSHAKE_LEN, SecureStreamClient
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


def wrong_key_hello(psk: bytes) -> bytes:
    """A client's first handshake bytes under ``psk``, followed by filler as long as the longest first message:
    what a server without ``psk`` always refuses at once (``handshake refused``, counted as an authentication
    failure).

    A first message alone is not always refused at once. Under a wrong key the server unmasks a frame length in
    range for about 1 in 64 first messages, and then waits for the rest of that frame, which never comes. It
    stays silent until its own deadline, and a client that gives up and closes first has only closed a
    connection: the server counts that as a probe, not as a refused handshake. A test about refused handshakes
    sends this instead."""
    return SecureStreamClient(psk, now=time.time()).data_to_send() + bytes(MAX_HANDSHAKE_LEN)
