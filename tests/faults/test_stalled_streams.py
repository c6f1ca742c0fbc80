"""A storm of stalled streams cannot freeze the tunnel, and what they make the receiver hold stays bounded.

Real TCP on 127.0.0.1 between two tunnel runtimes. The server's handler never reads the stalled streams (a
destination that stopped reading); the client pushes into each of them until their windows shut. Another stream
of the same tunnel must still move its bytes byte-exact, and everything the server holds for the stalled ones
together must stay within the documented receive bound (``docs/protocol.md``, "Flow control"): the receive
budget plus ``min_stream_window`` per stream.

All the streams share the tunnel's one loopback TCP connection (the handler opens no destination), so 2,000 of
them cost no descriptors. On 4d8ff3d (tunnel credit held back past the receive budget) the 2,000 case froze: the
stalled streams' held credit used up the 16 MiB tunnel window and the parallel stream moved nothing.
"""

from __future__ import annotations

import hashlib
import os

import anyio
import pytest

from tests.runtime.test_connection import read_all, stalling_handler, tunnel_pair
from vtunnel.protocol import StreamMetadata, TunnelConfig
from vtunnel.runtime.byte_stream import TunnelByteStream
from vtunnel.runtime.tunnel_stream import TunnelStream

pytestmark = pytest.mark.anyio

CHUNK = b"s" * 65536  # shared by every pushing task


async def digest_or_stall(stream: TunnelStream, release: anyio.Event) -> None:
    """``fast`` streams are answered with the SHA-256 of what they carried; the others as ``stalling_handler``."""
    md = stream.metadata
    if md is None or md.authority != "fast:1":
        await stalling_handler(stream, release)
        return
    stream.accept()
    digest = hashlib.sha256()
    async with TunnelByteStream(stream) as reader:
        try:
            while True:
                digest.update(await reader.receive())
        except anyio.EndOfStream:
            await reader.send(digest.hexdigest().encode())
            await reader.send_eof()


@pytest.mark.parametrize("stalled", [4, 32, 400, 2000])
async def test_stalled_streams_never_freeze_the_others(stalled: int) -> None:
    release = anyio.Event()
    config = TunnelConfig()

    async def handler(stream: TunnelStream) -> None:
        await digest_or_stall(stream, release)

    async with tunnel_pair(handler, client_config=config, server_config=config) as (client, server):

        async def push(stream: TunnelByteStream) -> None:
            while True:  # until cancelled below, once every stalled stream's window is full
                await stream.send(CHUNK)

        def held() -> int:
            return sum(s.unacknowledged for s in server.streams.values())

        async with anyio.create_task_group() as tg:
            for i in range(stalled):
                slow = await client.open_stream(StreamMetadata(authority=f"stall{i}:1"), wait_accepted=False)
                tg.start_soon(push, TunnelByteStream(slow))
            # they stall with their windows full (however slow the machine): a tunnel that never lets them fill
            # them fails here
            with anyio.fail_after(60):
                while held() < stalled * config.min_stream_window:
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        # every stalled stream has filled what it was allowed: now another stream must still get through
        fast = TunnelByteStream(await client.open_stream(StreamMetadata(authority="fast:1")))
        data = os.urandom(64 * 1024 * 1024)
        with anyio.fail_after(60):
            view = memoryview(data)
            for offset in range(0, len(data), 1 << 20):
                await fast.send(bytes(view[offset : offset + (1 << 20)]))
            await fast.send_eof()
            assert await read_all(fast) == hashlib.sha256(data).hexdigest().encode()
        total = held()
        bound = config.receive_budget + (stalled + 1) * config.min_stream_window
        print(f"{stalled} stalled streams: {total / 2**20:.1f} MiB held (bound {bound / 2**20:.1f} MiB)")
        assert total <= bound, (total, bound)
        assert total >= stalled * config.min_stream_window  # still stalled: nothing read them meanwhile
        release.set()
