"""``KCPLink``, the KCP session as a link: all-or-nothing writes, pushed input, delayed ACKs, over real UDP."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest

from tests.kcputil import connect, kcp_server
from tests.linkutil import counting_loop_timers
from tests.streams import echo, read_exactly, wait_until
from vtunnel.transports.base import Endpoint, SecurityConfig
from vtunnel.transports.kcp.link import ACK_DELAY, ACK_NOW_SEGMENTS, KCPLink
from vtunnel.transports.kcp.listener import KCPListener
from vtunnel.transports.kcp.plain import PlainListenerCodec
from vtunnel.transports.kcp.transport import KCPTransport
from vtunnel.transports.link import LinkStream

pytestmark = pytest.mark.anyio


class Recorder:
    """A link consumer that records what the link calls; ``on_data`` may answer from inside the call."""

    def __init__(self, on_data: Callable[[bytes], None] | None = None) -> None:
        self.data = bytearray()
        self.writable = 0
        self.ended: list[BaseException | None] = []
        self.on_data = on_data

    def link_data(self, data: bytes) -> None:
        self.data += data
        if self.on_data is not None:
            self.on_data(data)

    def link_writable(self) -> None:
        self.writable += 1

    def link_ended(self, error: BaseException | None) -> None:
        self.ended.append(error)

    def link_datagram(self, data: bytes) -> None:
        raise AssertionError("a KCP link carries no datagrams")


@asynccontextmanager
async def running(link: KCPLink, consumer: Recorder) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        tg.start_soon(link.run, consumer)
        await anyio.lowlevel.checkpoint()
        yield
        tg.cancel_scope.cancel()


async def accept(listener: KCPListener[PlainListenerCodec]) -> KCPLink:
    with anyio.fail_after(10):
        link = await listener.accept()
    assert isinstance(link, KCPLink)
    return link


async def test_synchronous_writes_arrive_in_order_with_awaited_sends() -> None:
    async with kcp_server() as (listener, url), anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        client = await connect(url)
        expected = bytearray()
        with anyio.fail_after(20):
            for i in range(200):
                piece = i.to_bytes(4, "big") * 16
                if i % 3:
                    client.link.send_nowait(piece)
                else:
                    await client.send(piece)
                expected += piece
            assert await read_exactly(client, len(expected)) == bytes(expected)
        await client.aclose()
        tg.cancel_scope.cancel()


async def test_accepted_sessions_push_input_and_take_synchronous_writes() -> None:
    async with kcp_server() as (listener, url):
        client = await connect(url)
        await client.send(b"hello")
        server = await accept(listener)
        got = Recorder()
        async with running(server, got):
            await wait_until(lambda: bytes(got.data) == b"hello")  # what arrived before run() is delivered
            server.send_nowait(b"world")
            with anyio.fail_after(10):
                assert await read_exactly(client, 5) == b"world"
        await client.aclose()
        await server.aclose()


async def test_a_full_window_refuses_whole_writes_and_calls_back_when_it_opens() -> None:
    query = "?sndwnd=32&rcvwnd=128"
    async with kcp_server(query) as (listener, url):
        client = await connect(url + query)
        link = client.link
        assert isinstance(link, KCPLink)
        engine = link.engine
        payload = os.urandom(40 * engine.max_data)
        link.send_nowait(payload)  # the window had room: all of it is taken (ikcp queues the rest)
        assert not engine.writable()
        waiting = engine.waiting()
        with pytest.raises(anyio.WouldBlock):
            link.send_nowait(b"more")
        assert engine.waiting() == waiting  # nothing was taken
        server = await accept(listener)
        async with LinkStream(server) as server_stream:
            with anyio.fail_after(10):
                assert await read_exactly(server_stream, len(payload)) == payload
            await wait_until(engine.writable)
            link.send_nowait(b"more")  # room again
            with anyio.fail_after(10):
                assert await read_exactly(server_stream, 4) == b"more"
        await client.aclose()
        await server.aclose()


async def test_the_consumer_hears_when_a_refused_write_may_go() -> None:
    query = "?sndwnd=32&rcvwnd=128"
    async with kcp_server(query) as (listener, url):
        client_link = await connect_link(url + query)
        consumer = Recorder()
        async with running(client_link, consumer):
            client_link.send_nowait(os.urandom(40 * client_link.engine.max_data))
            with pytest.raises(anyio.WouldBlock):
                client_link.send_nowait(b"x")
            assert consumer.writable == 0
            async with LinkStream(await accept(listener)) as server_stream:
                with anyio.fail_after(10):
                    await read_exactly(server_stream, 40 * client_link.engine.max_data)
                await wait_until(lambda: consumer.writable == 1)
        await client_link.aclose()


async def connect_link(url: str) -> KCPLink:
    """A plain kcp:// client session as a bare link (no stream around it)."""
    link = await KCPTransport().connect(Endpoint.parse(url), security=SecurityConfig())
    assert isinstance(link, KCPLink)
    return link


async def test_a_closed_or_failed_session_raises_the_named_errors() -> None:
    async with kcp_server() as (listener, url):
        client = await connect(url)
        await client.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            client.link.send_nowait(b"late")

        other = await connect(url)
        await other.send(b"x")
        server = await accept(listener)
        await listener.aclose()  # every accepted session fails with it
        with pytest.raises(anyio.BrokenResourceError):
            server.send_nowait(b"late")
        await other.aclose()


async def test_a_failure_ends_the_input_with_the_reason() -> None:
    async with kcp_server() as (listener, url):
        client = await connect(url)
        await client.send(b"first")
        server = await accept(listener)
        consumer = Recorder()
        async with running(server, consumer):
            client.link.send_nowait(b" pushed")
            await wait_until(lambda: bytes(consumer.data) == b"first pushed")
            server.fail("test: link gone")
            assert len(consumer.ended) == 1
            assert isinstance(consumer.ended[0], anyio.BrokenResourceError)
            assert str(consumer.ended[0]) == "test: link gone"
        await client.aclose()
        await server.aclose()


async def test_a_paused_link_holds_its_input_until_resumed() -> None:
    async with kcp_server() as (listener, url):
        client = await connect(url)
        await client.send(b"a")
        server = await accept(listener)
        consumer = Recorder()
        async with running(server, consumer):
            await wait_until(lambda: bytes(consumer.data) == b"a")
            server.pause_reading()
            client.link.send_nowait(b"bc")
            await wait_until(lambda: server.engine.readable())
            assert bytes(consumer.data) == b"a"
            server.resume_reading()
            assert bytes(consumer.data) == b"abc"  # delivered in the resume call itself
        await client.aclose()
        await server.aclose()


async def pushing(
    listener: KCPListener[PlainListenerCodec], client: LinkStream[KCPLink], recorder: Recorder
) -> KCPLink:
    """Open the session with one byte, accept it and run it for ``recorder`` once that byte's ACK went out."""
    await client.send(b"!")
    server = await accept(listener)
    first = Recorder()
    async with running(server, first):
        await wait_until(lambda: bytes(first.data) == b"!")
        link = client.link
        assert isinstance(link, KCPLink)
        await wait_until(lambda: not link.engine.waiting())  # nothing is owed from here on
    return server


async def test_a_small_message_is_acknowledged_once_the_delay_ran_out() -> None:
    async with kcp_server() as (listener, url):
        client = await connect(url)
        sent_in_callback: list[int] = []
        sent_after_feed: list[int] = []
        loop = asyncio.get_running_loop()

        def on_data(_data: bytes) -> None:
            sent_in_callback.append(listener.datagrams_sent)
            loop.call_soon(lambda: sent_after_feed.append(listener.datagrams_sent))

        consumer = Recorder(on_data)
        server = await pushing(listener, client, consumer)
        async with running(server, consumer):
            client.link.send_nowait(b"ping")
            engine = client.link.engine
            await wait_until(lambda: not engine.waiting())
        assert sent_after_feed == sent_in_callback  # no ACK right after the input: it waited
        assert listener.datagrams_sent == sent_in_callback[0] + 1  # then exactly one ACK
        await client.aclose()
        await server.aclose()


async def test_an_answer_from_the_callback_carries_the_ack() -> None:
    async with kcp_server() as (listener, url):
        client = await connect(url)
        before: list[int] = []
        server: KCPLink | None = None

        def on_data(data: bytes) -> None:
            before.append(listener.datagrams_sent)
            assert server is not None
            server.send_nowait(data.upper())

        consumer = Recorder(on_data)
        server = await pushing(listener, client, consumer)
        async with running(server, consumer):
            client.link.send_nowait(b"ping")
            with anyio.fail_after(10):
                assert await read_exactly(client, 4) == b"PING"
            assert client.link.engine.waiting() == 0  # acked by the answer
            await anyio.sleep(ACK_DELAY * 5)
            assert listener.datagrams_sent == before[0] + 1  # one datagram: the answer with the ACK in it
        await client.aclose()
        await server.aclose()


async def test_an_exchange_does_not_move_the_sessions_timers_for_its_acks() -> None:
    """In request/response, each message's held ACK waits for the timer the session has armed anyway (ikcp's
    flush tick, within KCP's interval) and rides the answer: a loop timer is no longer cancelled and made anew
    twice per message (2 ms ahead for the ACK, back for the answer), and the ACKs do not go alone."""
    loop = asyncio.get_running_loop()
    async with kcp_server() as (listener, url):
        client = await connect(url)
        server: KCPLink | None = None

        def on_data(
            data: bytes,
        ) -> None:  # the answer comes a moment later, as from a process behind the server
            assert server is not None
            answer = server.send_nowait
            loop.call_soon(lambda: answer(data.upper()))

        consumer = Recorder(on_data)
        await client.send(b"hello")
        server = await accept(listener)
        async with running(server, consumer):
            assert await read_exactly(client, 5) == b"HELLO"
            exchanges = 300
            sent_before = listener.datagrams_sent
            start = loop.time()
            with counting_loop_timers() as timers, anyio.fail_after(30):
                for _ in range(exchanges):
                    client.link.send_nowait(b"ping")
                    assert await read_exactly(client, 4) == b"PING"
            ticks = (loop.time() - start) / 0.010  # fast3's interval
            # about one datagram each: the ACK rode the answer (one held past a flush tick goes with the tick)
            assert listener.datagrams_sent - sent_before <= exchanges + ticks
            # the flush ticks' re-arming (each session's, while something is in flight or owed), and a move for
            # the ACK only when the tick is less than ACK_DELAY away (about one exchange in five, per side):
            # before, every message moved the timer twice, about 3.6 timers per exchange here
            assert timers.created <= 1.5 * exchanges + 2 * ticks
        await client.aclose()
        await server.aclose()


async def test_a_stream_of_segments_is_acknowledged_at_once() -> None:
    async with kcp_server() as (listener, url):
        client = await connect(url)
        acked_right_after: list[bool] = []
        loop = asyncio.get_running_loop()

        def on_data(_data: bytes) -> None:
            before = listener.datagrams_sent
            loop.call_soon(lambda: acked_right_after.append(listener.datagrams_sent > before))

        consumer = Recorder(on_data)
        server = await pushing(listener, client, consumer)
        engine = client.link.engine
        async with running(server, consumer):
            client.link.send_nowait(os.urandom(ACK_NOW_SEGMENTS * engine.max_data * 4))
            await wait_until(lambda: not engine.waiting())
        # however the segments were split into inputs, every second one at the latest owes the ACK at once
        assert any(acked_right_after)
        await client.aclose()
        await server.aclose()


async def test_closing_right_after_the_peers_last_segment_still_acknowledges_it() -> None:
    """A session closed while its ACK waits for an answer to ride on sends the ACK before it goes."""
    async with kcp_server() as (listener, url):
        client = await connect(url)
        consumer = Recorder()
        server = await pushing(listener, client, consumer)
        async with running(server, consumer):
            client.link.send_nowait(b"bye")  # a small last message: its ACK is held for an answer
            await wait_until(lambda: bytes(consumer.data) == b"bye")
            await server.aclose()  # before ACK_DELAY is up
        engine = client.link.engine
        await wait_until(lambda: not engine.waiting(), 5)  # never 0 if the ACK was dropped with the session
        await client.aclose()
