"""A storm of stalled streams cannot freeze the tunnel, and what they make the receiver hold stays bounded.

Real TCP on 127.0.0.1 between two tunnel runtimes. The server's handler never reads the stalled streams (a
destination that stopped reading); the client pushes into each of them until their windows shut. Another stream
of the same tunnel must still move its bytes, and everything the server holds for the stalled ones together must
stay within the documented receive bound (``docs/protocol.md``, "Flow control").
"""

from __future__ import annotations

import anyio
import pytest

from tests.runtime.test_connection import read_all, stalling_handler, tunnel_pair
from vtunnel.protocol import StreamMetadata, TunnelConfig
from vtunnel.runtime.tunnel_stream import TunnelStream

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("stalled", [4, 32, 400])
async def test_stalled_streams_never_freeze_the_others(stalled: int) -> None:
    release = anyio.Event()
    config = TunnelConfig()

    async def handler(stream: TunnelStream) -> None:
        await stalling_handler(stream, release)

    async with tunnel_pair(handler, client_config=config, server_config=config) as (client, server):
        pushed = 0

        async def push(stream: TunnelStream) -> None:
            nonlocal pushed
            chunk = b"s" * 65536
            with anyio.move_on_after(3):
                while True:
                    await stream.send(chunk)
                    pushed += len(chunk)

        async with anyio.create_task_group() as tg:
            for i in range(stalled):
                slow = await client.open_stream(StreamMetadata(authority=f"stall{i}:1"))
                tg.start_soon(push, slow)
        # every stalled stream has filled what it was allowed: now another stream must still get through
        fast = await client.open_stream(StreamMetadata(authority="fast:1"))
        size = 64 * 1024 * 1024
        chunk = b"f" * 65536
        with anyio.fail_after(120):
            for _ in range(size // len(chunk)):
                await fast.send(chunk)
            await fast.send_eof()
            assert await read_all(fast) == str(size).encode()
        held = sum(s.buffered for s in server.streams.values())
        bound = config.receive_budget + config.initial_tunnel_window
        print(f"{stalled} stalled streams: {pushed / 2**20:.1f} MiB pushed, {held / 2**20:.1f} MiB held")
        assert held <= bound, (held, bound)
        assert pushed <= bound + stalled * 65536
        release.set()
