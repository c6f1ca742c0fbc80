"""A drained tunnel's last bytes reach a peer that is still reading them and still sending.

Real TCP on 127.0.0.1: a server ``TunnelConnection`` drains (GOAWAY) while one stream's answer is on its way to a
client that reads through a small receive buffer and sends a PING after each read, as a peer returning credit
does. Closing the server's socket with those PINGs unread would send a TCP reset, and the reset makes the kernel
drop what it has not delivered yet: the end of the answer, its FIN, the closing GOAWAY.
"""

from __future__ import annotations

import os
import socket
import time

import anyio
import pytest
from anyio.abc import ByteStream, SocketStream

from vtunnel.protocol import Role, Tunnel, TunnelConfig, events
from vtunnel.protocol import frames as fr
from vtunnel.runtime.byte_stream import TunnelByteStream
from vtunnel.runtime.connection import TunnelConnection
from vtunnel.runtime.tunnel_stream import TunnelStream
from vtunnel.transports.link import StreamLink

pytestmark = pytest.mark.anyio

ANSWER = 4 * 1024 * 1024


async def test_a_drained_tunnel_ends_its_transport_without_losing_the_tail() -> None:
    answer = os.urandom(ANSWER)
    started = anyio.Event()
    servers: list[TunnelConnection] = []

    async def handler(tunnel_stream: TunnelStream) -> None:
        async with TunnelByteStream(tunnel_stream) as stream:
            tunnel_stream.accept()
            started.set()
            await stream.send(answer)
            await stream.send_eof()

    async def on_accept(transport: ByteStream) -> None:
        conn = TunnelConnection(StreamLink(transport), role=Role.SERVER, handler=handler, name="s")
        servers.append(conn)
        await conn.run()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, on_accept)
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the answer waits on the server's side
        raw.connect(("127.0.0.1", port))
        client = await SocketStream.from_socket(raw)
        tunnel = Tunnel(role=Role.CLIENT, config=TunnelConfig(initial_stream_window=2 * ANSWER))
        tunnel.initiate(time.monotonic())
        await client.send(tunnel.data_to_send())
        got = bytearray()
        ended = closed = False
        pings = 0
        with anyio.fail_after(30):
            ready = False
            while not ready:
                evs = tunnel.receive_data(await client.receive(), time.monotonic())
                ready = any(isinstance(ev, events.HandshakeCompleted) for ev in evs)
            sid = tunnel.open_stream()
            tunnel.end_stream(sid)  # the request is complete: only the answer is awaited
            await client.send(tunnel.data_to_send())
            await started.wait()
            servers[0].shutdown("draining", graceful=True)
            try:
                while not closed:
                    data = await client.receive(4096)
                    for ev in tunnel.receive_data(data, time.monotonic()):
                        if isinstance(ev, events.DataReceived):
                            got += ev.data
                        elif isinstance(ev, events.StreamEnded):
                            ended = True
                        elif isinstance(ev, events.TunnelClosed):
                            closed = True
                    pings += 1
                    await client.send(tunnel.data_to_send() + fr.encode_ping(pings))
                await client.send_eof()
                while True:
                    await client.receive()
            except anyio.EndOfStream:
                pass
            except anyio.BrokenResourceError as exc:
                pytest.fail(f"reset after {len(got)} of {ANSWER} bytes (stream ended: {ended}): {exc!r}")
            await client.aclose()
            await servers[0].wait_closed()
        tg.cancel_scope.cancel()
    await listener.aclose()
    assert ended
    assert closed
    assert bytes(got) == answer
