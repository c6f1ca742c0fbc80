"""kcp:// over real UDP sockets on loopback: sessions, back-pressure, bad input, dead links, limits."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import anyio
import pytest
from anyio.abc import SocketAttribute

from tests.kcputil import PLAIN, connect, kcp_server
from tests.linkutil import stream_of
from tests.streams import echo, read_exactly, wait_until
from vtunnel.arq.kcp_engine import KCPEngine
from vtunnel.io.datagrams import DatagramSocket, open_udp_socket
from vtunnel.transports.base import Endpoint
from vtunnel.transports.kcp.listener import KCPListener
from vtunnel.transports.kcp.options import parse_options
from vtunnel.transports.kcp.transport import KCPTransport

pytestmark = pytest.mark.anyio


async def test_echo_both_ways_byte_exact() -> None:
    payload = os.urandom(3 * 1024 * 1024 + 7)
    async with kcp_server() as (listener, url), anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        client = await connect(url)
        with anyio.fail_after(30):
            tg.start_soon(client.send, payload)
            assert await read_exactly(client, len(payload)) == payload
        assert client.extra(SocketAttribute.remote_address) == ("127.0.0.1", listener.local_address[1])
        assert client.extra(SocketAttribute.local_address)[0] == "127.0.0.1"
        await client.aclose()
        tg.cancel_scope.cancel()


async def test_many_small_writes_arrive_in_order() -> None:
    async with kcp_server() as (listener, url), anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        client = await connect(url)
        expected = b"".join(struct.pack("<I", i) for i in range(5000))
        with anyio.fail_after(30):
            for i in range(5000):
                await client.send(struct.pack("<I", i))
            assert await read_exactly(client, len(expected)) == expected
        await client.aclose()
        tg.cancel_scope.cancel()


async def test_receive_max_bytes_is_respected() -> None:
    async with kcp_server() as (listener, url), anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        client = await connect(url)
        with anyio.fail_after(20):
            await client.send(b"0123456789" * 500)
            got = bytearray()
            while len(got) < 5000:
                chunk = await client.receive(3)
                assert 1 <= len(chunk) <= 3
                got += chunk
        assert bytes(got) == b"0123456789" * 500
        await client.aclose()
        tg.cancel_scope.cancel()


async def test_send_applies_back_pressure_when_the_peer_does_not_read() -> None:
    """A reader that never reads: the writer stalls after about two windows instead of queueing everything."""
    query = "?sndwnd=64&rcvwnd=128"
    async with kcp_server(query) as (listener, url):
        client = await connect(url + query)
        accepted = 0
        chunk = b"x" * 16384

        async def writer() -> None:
            nonlocal accepted
            while accepted < 64 * 1024 * 1024:
                await client.send(chunk)
                accepted += len(chunk)

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            server_link = await listener.accept()  # accepted, never run: nothing reads it
            with anyio.fail_after(30):
                last, stable = -1, 0
                while stable < 20:  # progress stopped for 20 polls in a row
                    await anyio.sleep(0.05)
                    stable = stable + 1 if accepted == last else 0
                    last = accepted
            mss = client.link.engine.max_data
            # the peer's receive window, our send window, plus one write that may be in progress
            assert accepted <= (128 + 64 + 2) * mss + len(chunk)
            assert accepted < 64 * 1024 * 1024
            # reading drains it all and the writer finishes its next chunks
            server = stream_of(server_link)
            with anyio.fail_after(30):
                got = 0
                target = accepted + 10 * len(chunk)
                while got < target:
                    got += len(await server.receive())
            tg.cancel_scope.cancel()
        await client.aclose()
        await server.aclose()


async def test_garbage_changes_nothing_and_gets_no_answer() -> None:
    async with kcp_server() as (listener, url), anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        client = await connect(url)
        with anyio.fail_after(20):
            await client.send(b"before")
            assert await read_exactly(client, 6) == b"before"
        conv = client.link.engine.conv
        sessions = listener.session_count
        dropped = listener.dropped
        garbage = [
            b"",
            b"\x00",
            os.urandom(23),
            os.urandom(1400),
            struct.pack("<IBBHIIII", conv, 99, 0, 0, 0, 0, 0, 0),  # known conv, unknown command
            struct.pack("<IBBHIIII", conv, 81, 0, 0, 0, 5, 0, 1000) + b"short",  # length lies
            struct.pack("<IBBHIIII", conv ^ 1, 82, 0, 0, 0, 0, 0, 0),  # ACK for an unknown session
            struct.pack("<IBBHIIII", conv ^ 2, 81, 0, 0, 0, 9, 0, 1) + b"z",  # PUSH sn 9: not a new session
        ]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            raw.bind(("127.0.0.1", 0))
            raw.setblocking(False)
            for datagram in garbage * 20:
                raw.sendto(datagram, listener.local_address)
            # (the empty datagrams may not reach us on every stack)
            await wait_until(lambda: listener.dropped >= dropped + len(garbage) * 20 - 20)
            await anyio.sleep(0.2)
            with pytest.raises(BlockingIOError):
                raw.recv(2048)  # nothing was ever sent back
        assert listener.session_count == sessions
        with anyio.fail_after(20):
            payload = os.urandom(200_000)
            tg.start_soon(client.send, payload)
            assert await read_exactly(client, len(payload)) == payload
        await client.aclose()
        tg.cancel_scope.cancel()


async def test_conv_zero_sessions_are_keyed_by_address() -> None:
    """vproxy always uses conv 0: two such clients get two sessions."""
    async with kcp_server() as (listener, url), anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        a = await connect(url + "?conv=0")
        b = await connect(url + "?conv=0")
        assert a.link.engine.conv == b.link.engine.conv == 0
        with anyio.fail_after(20):
            await a.send(b"from a" * 1000)
            await b.send(b"from b" * 1000)
            assert await read_exactly(b, 6000) == b"from b" * 1000
            assert await read_exactly(a, 6000) == b"from a" * 1000
        assert listener.session_count == 2
        await a.aclose()
        await b.aclose()
        tg.cancel_scope.cancel()


async def test_random_convs_differ_and_sessions_are_counted() -> None:
    async with kcp_server() as (listener, url), anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        clients = [await connect(url) for _ in range(5)]
        assert len({c.link.engine.conv for c in clients}) == 5
        assert all(c.link.engine.conv != 0 for c in clients)
        with anyio.fail_after(20):
            for i, c in enumerate(clients):
                await c.send(bytes([i]) * 100)
            for i, c in enumerate(clients):
                assert await read_exactly(c, 100) == bytes([i]) * 100
        assert listener.session_count == 5
        for c in clients:
            await c.aclose()
        tg.cancel_scope.cancel()


async def test_killed_server_is_detected_as_a_dead_link() -> None:
    async with kcp_server() as (listener, url):
        client = await connect(url + "?timeout=1")
        with anyio.fail_after(20):
            await client.send(b"hello")
            server = stream_of(await listener.accept())
            assert await read_exactly(server, 5) == b"hello"
        await listener.aclose()  # the server is gone: its socket is closed
        with pytest.raises(anyio.BrokenResourceError):
            await server.receive()
        with anyio.fail_after(20):
            await client.send(b"anyone there?")
            with pytest.raises(anyio.BrokenResourceError):
                await client.receive()
        with pytest.raises(anyio.BrokenResourceError):
            await client.send(b"late")
        await client.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await client.receive()


async def test_idle_sessions_expire() -> None:
    async with kcp_server("?idle=0.5") as (listener, url):
        client = await connect(url + "?idle=0.5")
        with anyio.fail_after(20):
            await client.send(b"hi")
            server = stream_of(await listener.accept())
            assert await read_exactly(server, 2) == b"hi"
            with pytest.raises(anyio.BrokenResourceError):
                await server.receive()
            with pytest.raises(anyio.BrokenResourceError):
                await client.receive()
        assert listener.session_count == 0
        await client.aclose()
        await server.aclose()


async def test_session_limit_drops_new_sessions_silently() -> None:
    async with kcp_server("?sessions=1") as (listener, url), anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        first = await connect(url)
        second = await connect(url + "?timeout=0.5")
        with anyio.fail_after(20):
            await first.send(b"1")
            assert await read_exactly(first, 1) == b"1"
            await second.send(b"2")
            with pytest.raises(anyio.BrokenResourceError):
                await second.receive()
        assert listener.session_count == 1
        await first.aclose()
        await second.aclose()
        tg.cancel_scope.cancel()


async def test_close_frees_the_session_and_send_eof_is_a_full_close() -> None:
    async with kcp_server() as (listener, url), anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        client = await connect(url)
        with anyio.fail_after(20):
            await client.send(b"x")
            assert await read_exactly(client, 1) == b"x"
        await client.send_eof()
        assert client.link.engine.closed
        with pytest.raises(anyio.ClosedResourceError):
            await client.send(b"y")
        await client.aclose()  # idempotent
        tg.cancel_scope.cancel()


async def test_closed_listener_refuses_accept_and_serve_returns() -> None:
    listener = await KCPTransport().listen(Endpoint.parse("kcp://127.0.0.1:0"), security=PLAIN)
    assert isinstance(listener, KCPListener)
    assert listener.extra(SocketAttribute.local_address)[0] == "127.0.0.1"
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        await anyio.sleep(0.05)
        await listener.aclose()
    with pytest.raises(anyio.ClosedResourceError):
        stream_of(await listener.accept())


async def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        listener = await KCPTransport().listen(Endpoint.parse("kcp://[::1]:0"), security=PLAIN)
    except Exception as exc:  # no ::1 configured in this environment
        pytest.skip(f"::1 unavailable: {exc}")
    assert isinstance(listener, KCPListener)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        client = await connect(f"kcp://[::1]:{listener.local_address[1]}")
        with anyio.fail_after(20):
            await client.send(b"six")
            assert await read_exactly(client, 3) == b"six"
        await client.aclose()
        await listener.aclose()


async def test_aclose_while_a_writer_waits_ends_the_writer() -> None:
    query = "?sndwnd=32&rcvwnd=128"
    async with kcp_server(query) as (listener, url):
        client = await connect(url + query)
        outcome: list[BaseException] = []

        async def writer() -> None:
            try:
                while True:
                    await client.send(b"y" * 65536)
            except anyio.ClosedResourceError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            server = stream_of(await listener.accept())  # never reads: the writer ends up waiting
            last, stable = -1, 0
            with anyio.fail_after(30):
                while stable < 10:
                    await anyio.sleep(0.05)
                    waiting = client.link.engine.waiting()
                    stable = stable + 1 if waiting == last else 0
                    last = waiting
                await client.aclose()
        assert len(outcome) == 1
        assert client.link.engine.closed
        await server.aclose()


async def test_a_bad_datagram_inside_a_coalesced_run_is_dropped_alone() -> None:
    """Runs of equal-size datagrams (sent with segmentation offload) are vetted datagram by datagram."""
    options = parse_options({"mode": "fast3", "pacing": "off"})  # all 40 segments in the first flush
    async with kcp_server() as (listener, _url):
        loop_time = asyncio.get_running_loop().time
        client = KCPEngine(conv=4321, options=options, mtu=options.mtu, now=loop_time())
        udp = DatagramSocket(open_udp_socket(socket.AF_INET, bind=("127.0.0.1", 0)), lambda batch: None)
        try:
            payload = os.urandom(client.max_data * 40)
            client.send(payload)
            client.flush(loop_time())
            datagrams = client.datagrams_to_send()
            assert len(datagrams) == 40
            assert len({len(d) for d in datagrams}) == 1
            foreign = bytearray(datagrams[3])
            foreign[0:4] = struct.pack("<I", 999)  # another conv, not a session start
            lying = bytearray(datagrams[4])
            lying[20:24] = struct.pack("<I", len(lying))  # a length past the end of the datagram
            first, second = datagrams[:20], datagrams[20:]
            udp.sendto_many([*first[:5], bytes(foreign), *first[5:]], listener.local_address)
            with anyio.fail_after(10):
                stream = stream_of(await listener.accept())
            # the session exists now: its next run takes the one-pass path until the bad datagram
            udp.sendto_many([*second[:7], bytes(lying), *second[7:]], listener.local_address)
            with anyio.fail_after(10):
                assert await read_exactly(stream, len(payload)) == payload
            assert listener.dropped == 2
            assert listener.session_count == 1
            await stream.aclose()
        finally:
            udp.close()
            client.close()


async def test_a_client_started_before_its_server_gets_through_once_the_server_is_up() -> None:
    """The first datagrams meet a closed port (ICMP port unreachable): the session must still hear the server."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    endpoint = Endpoint.parse(f"kcp://127.0.0.1:{port}")
    client = await connect(f"kcp://127.0.0.1:{port}")
    await client.send(b"hello")
    await anyio.sleep(0.3)  # ikcp resends into the closed port meanwhile
    listener = await KCPTransport().listen(endpoint, security=PLAIN)
    assert isinstance(listener, KCPListener)
    try:
        with anyio.fail_after(10):
            server = stream_of(await listener.accept())
            assert await read_exactly(server, 5) == b"hello"
            await server.send(b"world")
            assert await read_exactly(client, 5) == b"world"
    finally:
        await client.aclose()
        await listener.aclose()


async def test_a_client_ignores_datagrams_from_anyone_but_its_server() -> None:
    async with kcp_server() as (listener, url):
        client = await connect(url)
        await client.send(b"x")
        server = stream_of(await listener.accept())
        assert await read_exactly(server, 1) == b"x"
        # a stranger copies the server's conv into a well-formed segment aimed at the client's port
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            conv = client.link.engine.conv
            forged = struct.pack("<IBBHIIII", conv, 81, 0, 1024, 0, 0, 0, 5) + b"forge"
            stranger.sendto(forged, client.extra(SocketAttribute.local_address))
            await server.send(b"truth")
            with anyio.fail_after(10):
                assert await read_exactly(client, 5) == b"truth"
        finally:
            stranger.close()
            await client.aclose()
