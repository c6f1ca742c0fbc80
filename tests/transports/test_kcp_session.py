"""``KCPStream.send_nowait``: the synchronous write the tunnel pump uses, over real UDP on loopback."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import anyio
import pytest

from tests.kcputil import connect, kcp_server
from tests.streams import echo, read_exactly
from vtunnel.transports.kcp import KCPListener
from vtunnel.transports.kcp_stream import ACK_DELAY, ACK_NOW_SEGMENTS, KCPStream

pytestmark = pytest.mark.anyio


async def test_send_nowait_bytes_arrive_in_order_with_awaited_sends() -> None:
    async with kcp_server() as (listener, url), anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        client = await connect(url)
        expected = bytearray()
        with anyio.fail_after(20):
            for i in range(200):
                piece = i.to_bytes(4, "big") * 16
                if i % 3:
                    assert client.send_nowait(piece)
                else:
                    await client.send(piece)
                expected += piece
            assert await read_exactly(client, len(expected)) == bytes(expected)
        await client.aclose()
        tg.cancel_scope.cancel()


async def test_accepted_sessions_take_synchronous_writes_too() -> None:
    async with kcp_server() as (listener, url):
        client = await connect(url)
        await client.send(b"hello")
        with anyio.fail_after(10):
            server = await listener.accept()
            assert isinstance(server, KCPStream)
            assert await read_exactly(server, 5) == b"hello"
            assert server.send_nowait(b"world")
            assert await read_exactly(client, 5) == b"world"
        await client.aclose()
        await server.aclose()


async def test_a_write_larger_than_the_free_window_is_refused_whole() -> None:
    query = "?sndwnd=32&rcvwnd=128"
    async with kcp_server(query) as (listener, url):
        client = await connect(url + query)
        engine = client.engine
        too_big = os.urandom(33 * engine.max_data)
        assert not client.send_nowait(too_big)
        assert engine.waiting() == 0  # nothing was taken
        fits = os.urandom(32 * engine.max_data)
        assert client.send_nowait(fits)
        assert engine.waiting() > 0
        with anyio.fail_after(10):
            server = await listener.accept()
            assert await read_exactly(server, len(fits)) == fits
        await client.aclose()
        await server.aclose()


async def test_a_closed_or_failed_session_refuses_and_send_reports_why() -> None:
    async with kcp_server() as (listener, url):
        client = await connect(url)
        await client.aclose()
        assert not client.send_nowait(b"late")
        with pytest.raises(anyio.ClosedResourceError):
            await client.send(b"late")

        other = await connect(url)
        await other.send(b"x")
        with anyio.fail_after(10):
            server = await listener.accept()
        assert isinstance(server, KCPStream)
        await listener.aclose()  # every accepted session fails with it
        assert not server.send_nowait(b"late")
        with pytest.raises(anyio.BrokenResourceError):
            await server.send(b"late")
        await other.aclose()


async def test_pushed_bytes_come_through_the_callback_and_a_failure_calls_it_too() -> None:
    async with kcp_server() as (listener, url):
        client = await connect(url)
        await client.send(b"first")
        with anyio.fail_after(10):
            server = await listener.accept()
        assert isinstance(server, KCPStream)
        got = bytearray()
        calls: list[int] = []

        failures: list[str] = []

        def on_readable() -> None:
            calls.append(1)
            try:
                while data := server.receive_nowait(4):
                    got.extend(data)
            except anyio.BrokenResourceError as exc:
                failures.append(str(exc))

        assert server.receive_nowait() in (b"", b"first")  # the first datagram may already be here
        got.clear()
        server.set_on_readable(on_readable)
        client.send_nowait(b"pushed bytes")
        with anyio.fail_after(10):
            while bytes(got) != b"pushed bytes":
                await anyio.sleep(0.005)
        before = len(calls)
        server.fail("test: link gone")
        assert len(calls) == before + 1
        assert failures == ["test: link gone"]
        server.set_on_readable(None)
        await client.aclose()
        await server.aclose()


async def test_receive_nowait_on_a_closed_session_raises_closed() -> None:
    async with kcp_server() as (_listener, url):
        client = await connect(url)
        assert client.receive_nowait() == b""
        await client.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            client.receive_nowait()


async def accepted_with_callback(
    listener: KCPListener, client: KCPStream, on_readable: Callable[[KCPStream], None]
) -> KCPStream:
    """Open the session with one byte, accept it, drain that byte and switch the server side to push mode."""
    await client.send(b"!")
    with anyio.fail_after(10):
        server = await listener.accept()
        assert isinstance(server, KCPStream)
        assert await read_exactly(server, 1) == b"!"
        while client.engine.waiting():  # that byte's ACK went out: nothing is owed from here on
            await anyio.sleep(0.005)
    server.set_on_readable(lambda: on_readable(server))
    return server


async def test_a_small_message_is_acknowledged_once_the_delay_ran_out() -> None:
    async with kcp_server() as (listener, url):
        client = await connect(url)
        sent_in_callback: list[int] = []
        sent_after_feed: list[int] = []
        loop = asyncio.get_running_loop()

        def on_readable(server: KCPStream) -> None:
            server.receive_nowait()
            sent_in_callback.append(listener.datagrams_sent)
            loop.call_soon(lambda: sent_after_feed.append(listener.datagrams_sent))

        server = await accepted_with_callback(listener, client, on_readable)
        assert client.send_nowait(b"ping")
        with anyio.fail_after(10):
            while client.engine.waiting():
                await anyio.sleep(0.001)
        assert sent_after_feed == sent_in_callback  # no ACK right after the input: it waited
        assert listener.datagrams_sent == sent_in_callback[0] + 1  # then exactly one ACK
        await client.aclose()
        await server.aclose()


async def test_an_answer_from_the_callback_carries_the_ack() -> None:
    async with kcp_server() as (listener, url):
        client = await connect(url)
        before: list[int] = []

        def on_readable(server: KCPStream) -> None:
            before.append(listener.datagrams_sent)
            assert server.send_nowait(server.receive_nowait().upper())

        server = await accepted_with_callback(listener, client, on_readable)
        assert client.send_nowait(b"ping")
        with anyio.fail_after(10):
            assert await read_exactly(client, 4) == b"PING"
            assert client.engine.waiting() == 0  # acknowledged by the answer itself
        await anyio.sleep(ACK_DELAY * 5)
        assert listener.datagrams_sent == before[0] + 1  # one datagram: the answer with the ACK in it
        await client.aclose()
        await server.aclose()


async def test_a_stream_of_segments_is_acknowledged_at_once() -> None:
    async with kcp_server() as (listener, url):
        client = await connect(url)
        acked_right_after: list[bool] = []
        loop = asyncio.get_running_loop()

        def on_readable(server: KCPStream) -> None:
            before = listener.datagrams_sent
            while server.receive_nowait():
                pass
            loop.call_soon(lambda: acked_right_after.append(listener.datagrams_sent > before))

        server = await accepted_with_callback(listener, client, on_readable)
        payload = os.urandom(ACK_NOW_SEGMENTS * client.engine.max_data * 4)
        assert client.send_nowait(payload)
        with anyio.fail_after(10):
            while client.engine.waiting():
                await anyio.sleep(0.001)
        # however the segments were split into inputs, every second one at the latest owes the ACK at once
        assert any(acked_right_after)
        await client.aclose()
        await server.aclose()


async def test_closing_right_after_the_peers_last_segment_still_acknowledges_it() -> None:
    """A session closed while its ACK waits for an answer to ride on sends the ACK before it goes."""
    async with kcp_server() as (listener, url):
        client = await connect(url)
        await client.send(b"first")
        server = await listener.accept()
        assert isinstance(server, KCPStream)
        assert await read_exactly(server, 5) == b"first"
        got = asyncio.Event()
        server.set_on_readable(lambda: got.set() if server.receive_nowait() else None)
        assert client.send_nowait(b"bye")  # a small last message: its ACK is held for an answer
        with anyio.fail_after(10):
            await got.wait()
        await server.aclose()  # before ACK_DELAY is up
        with anyio.fail_after(5):
            while client.engine.waiting():  # never 0 if the ACK was dropped with the session
                await anyio.sleep(0.005)
        await client.aclose()
