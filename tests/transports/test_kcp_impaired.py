"""kcp:// through the impairment relay: loss, duplicates, reordering, delay, NAT rebinding."""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any

import anyio
import pytest
from anyio.abc import ByteStream

from tests.linkutil import stream_of
from tests.streams import wait_until
from vtunnel.testing import Impairment, ImpairmentRelay
from vtunnel.transports.base import Endpoint, SecurityConfig
from vtunnel.transports.kcp.link import KCPLink
from vtunnel.transports.kcp.listener import KCPListener
from vtunnel.transports.kcp.plain import PlainListenerCodec
from vtunnel.transports.kcp.routing import DatagramListener
from vtunnel.transports.kcp.transport import KCPTransport
from vtunnel.transports.link import LinkStream

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    """uvloop, the runtime's loop when installed (test_kcp.py covers both loops)."""
    return ("asyncio", {"use_uvloop": True})


PLAIN = SecurityConfig()
FAST = "?mode=fast3&sndwnd=1024&rcvwnd=1024"


async def listen(query: str = FAST) -> KCPListener[PlainListenerCodec]:
    listener = await KCPTransport().listen(Endpoint.parse(f"kcp://127.0.0.1:0{query}"), security=PLAIN)
    assert isinstance(listener, KCPListener)
    return listener


async def connect(port: int, query: str = FAST) -> LinkStream[KCPLink]:
    link = await KCPTransport().connect(Endpoint.parse(f"kcp://127.0.0.1:{port}{query}"), security=PLAIN)
    assert isinstance(link, KCPLink)
    return stream_of(link)


async def sink_digest(stream: ByteStream, size: int) -> str:
    """Read exactly ``size`` bytes and answer with their SHA-256."""
    digest = hashlib.sha256()
    got = 0
    while got < size:
        chunk = await stream.receive()
        digest.update(chunk)
        got += len(chunk)
    await stream.send(digest.hexdigest().encode())
    return digest.hexdigest()


async def send_pattern(stream: ByteStream, size: int, seed: int) -> str:
    rng = random.Random(seed)
    digest = hashlib.sha256()
    block = rng.randbytes(1 << 20)
    sent = 0
    while sent < size:
        piece = block[: min(len(block), size - sent)]
        # vary the content so a misplaced block would be noticed
        piece = bytes([sent >> 20 & 0xFF]) + piece[1:]
        await stream.send(piece)
        digest.update(piece)
        sent += len(piece)
    return digest.hexdigest()


async def transfer(
    client: LinkStream[Any], listener: DatagramListener[Any], size: int, *, limit: float = 110.0
) -> tuple[str, str, str]:
    """client -> server ``size`` bytes; returns (sent digest, server digest, digest echoed to the client) (any
    datagram transport's link and listener: rudp:// runs it too)."""
    results: dict[str, str] = {}

    async def server_side() -> None:
        server = stream_of(await listener.accept())
        results["server"] = await sink_digest(server, size)
        with anyio.move_on_after(30):
            await anyio.sleep_forever()

    with anyio.fail_after(limit):
        async with anyio.create_task_group() as tg:
            tg.start_soon(server_side)
            results["sent"] = await send_pattern(client, size, seed=size)
            answer = await client.receive()
            while len(answer) < 64:
                answer += await client.receive()
            results["echo"] = answer.decode()
            tg.cancel_scope.cancel()
    return results["sent"], results["server"], results["echo"]


async def test_mixed_impairments_both_ways_byte_exact() -> None:
    imp = Impairment(loss=0.05, duplicate=0.05, reorder=0.05, delay=0.002, jitter=0.001)
    listener = await listen()
    async with ImpairmentRelay(listener.local_address, up=imp, down=imp, seed=7) as relay:
        client = await connect(relay.address[1])
        sent, server, echo = await transfer(client, listener, 4 * 1024 * 1024)
        assert sent == server == echo
        for stats in (relay.up_stats, relay.down_stats):
            assert stats.dropped > 0
            assert stats.duplicated > 0
            assert stats.reordered > 0
        await client.aclose()
    await listener.aclose()


@pytest.mark.slow
async def test_64_mib_at_ten_percent_loss_byte_exact() -> None:
    loss = Impairment(loss=0.10)
    listener = await listen()
    async with ImpairmentRelay(listener.local_address, up=loss, down=loss, seed=10) as relay:
        client = await connect(relay.address[1])
        sent, server, echo = await transfer(client, listener, 64 * 1024 * 1024, limit=170.0)
        assert sent == server == echo
        assert relay.up_stats.dropped > 0.05 * relay.up_stats.received
        await client.aclose()
    await listener.aclose()


async def test_client_rebinding_mid_transfer_keeps_the_session() -> None:
    """The relay moves the client to a new source port twice; the server follows it by conv."""
    size = 24 * 1024 * 1024
    listener = await listen()
    async with ImpairmentRelay(listener.local_address, seed=3) as relay:
        client = await connect(relay.address[1])
        seen_ports: set[int] = set()

        async def rebind_twice() -> None:
            for _ in range(2):
                mark = size // 3 * (len(seen_ports) + 1)
                await wait_until(lambda: relay.up_stats.bytes >= mark, limit=60)  # noqa: B023
                seen_ports.update(port for _host, port in relay.upstream_addresses)
                relay.rebind()
            seen_ports.update(port for _host, port in relay.upstream_addresses)

        async with anyio.create_task_group() as tg:
            tg.start_soon(rebind_twice)
            sent, server, echo = await transfer(client, listener, size)
        assert sent == server == echo
        assert len(seen_ports) == 3
        assert listener.session_count == 1
        await client.aclose()
    await listener.aclose()


async def test_conv_zero_clients_behind_one_relay_each_get_their_session() -> None:
    listener = await listen()
    imp = Impairment(loss=0.05, reorder=0.05)
    async with ImpairmentRelay(listener.local_address, up=imp, down=imp, seed=5) as relay:
        a = await connect(relay.address[1], FAST + "&conv=0")
        b = await connect(relay.address[1], FAST + "&conv=0")
        results: dict[str, bytes] = {}

        async def serve_two() -> None:
            for _ in range(2):
                server = stream_of(await listener.accept())
                tg.start_soon(echo_all, server)

        async def echo_all(server: ByteStream) -> None:
            while True:
                await server.send(await server.receive())

        async def round_trip(name: str, client: LinkStream[KCPLink], payload: bytes) -> None:
            await client.send(payload)
            got = bytearray()
            while len(got) < len(payload):
                got += await client.receive()
            results[name] = bytes(got)

        pa, pb = os.urandom(300_000), os.urandom(300_000)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(serve_two)
                async with anyio.create_task_group() as clients:
                    clients.start_soon(round_trip, "a", a, pa)
                    clients.start_soon(round_trip, "b", b, pb)
                tg.cancel_scope.cancel()
        assert results == {"a": pa, "b": pb}
        assert listener.session_count == 2
        await a.aclose()
        await b.aclose()
    await listener.aclose()


async def test_server_behind_a_relay_that_goes_silent_is_detected() -> None:
    listener = await listen()
    async with ImpairmentRelay(listener.local_address, seed=1) as relay:
        client = await connect(relay.address[1], FAST + "&timeout=1")
        with anyio.fail_after(20):
            await client.send(b"ping")
            server = stream_of(await listener.accept())
            assert await server.receive() == b"ping"
        relay.up = relay.down = Impairment(loss=1.0)  # the path dies
        with anyio.fail_after(20):
            await client.send(b"still there?")
            with pytest.raises(anyio.BrokenResourceError):
                await client.receive()
        await client.aclose()
        await server.aclose()
    await listener.aclose()
