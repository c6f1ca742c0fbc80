"""TunnelByteStream, the anyio adapter over a tunnel stream's callbacks, between two real tunnel runtimes over TCP
on 127.0.0.1: order under any chunking, the end-of-stream / reset / close semantics, the hand-off to another
consumer, datagram boundaries, and the memory bound a reader that stops keeps."""

from __future__ import annotations

import os
import socket

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtunnel.protocol import StreamMetadata, TunnelConfig
from vtunnel.runtime.byte_stream import TunnelByteStream
from vtunnel.runtime.errors import StreamRefused
from vtunnel.runtime.tunnel_stream import TunnelStream

from .test_connection import Handler, read_all, tunnel_pair

pytestmark = pytest.mark.anyio


class Collector:
    """A consumer with no task: records what it is told and returns the credit at once."""

    def __init__(self, stream: TunnelStream) -> None:
        self.stream = stream
        self.data = bytearray()
        self.eof = anyio.Event()
        self.broken = False

    def stream_data(self, data: bytes) -> None:
        self.data += data
        self.stream.acknowledge(len(data))

    def stream_eof(self) -> None:
        self.eof.set()

    def stream_broken(self) -> None:
        self.broken = True
        self.eof.set()

    def stream_writable(self) -> None:
        pass

    def stream_spliced(self, dedicated: socket.socket, to_peer: bytes, ended: bool) -> bool:
        return False


def sender(chunks: list[bytes], *, end: bool = True) -> Handler:
    """A far end that accepts, sends ``chunks`` one by one, then its end of stream (and waits for the peer's)."""

    async def far(tunnel_stream: TunnelStream) -> None:
        tunnel_stream.accept()
        async with TunnelByteStream(tunnel_stream) as stream:
            for chunk in chunks:
                await stream.send(chunk)
            if end:
                await stream.send_eof()
            await read_all(stream)

    return far


async def _chunked_transfer(writes: list[int], reads: list[int], hand_off_after: int | None) -> None:
    data = os.urandom(sum(writes))
    chunks, at = [], 0
    for n in writes:
        chunks.append(data[at : at + n])
        at += n
    async with tunnel_pair(sender(chunks)) as (client, _):
        stream = TunnelByteStream(await client.open_stream(StreamMetadata(authority="a:1")))
        got = bytearray()
        with anyio.fail_after(30):
            await anyio.sleep(
                0.05
            )  # let some arrive before the first read: reads cut through buffered chunks
            i = 0
            while hand_off_after is None or i < hand_off_after:
                size = reads[i % len(reads)]
                try:
                    chunk = await stream.receive(size)
                except anyio.EndOfStream:
                    break
                assert 0 < len(chunk) <= size
                got += chunk
                i += 1
            else:  # the rest, and what the adapter held, goes to a consumer without a task
                tunnel_stream = stream.hand_off()
                collector = Collector(tunnel_stream)
                tunnel_stream.attach(collector)
                await collector.eof.wait()
                got += collector.data
                assert not collector.broken
                tunnel_stream.write_eof()
                tunnel_stream.close()
        assert bytes(got) == data


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    writes=st.lists(st.integers(1, 300_000), min_size=0, max_size=8),
    reads=st.lists(st.sampled_from([1, 7, 1000, 65536, 70000, 1 << 20]), min_size=1, max_size=5),
    hand_off_after=st.one_of(st.none(), st.integers(0, 6)),
)
def test_any_chunking_arrives_whole_and_in_order(
    writes: list[int], reads: list[int], hand_off_after: int | None
) -> None:
    anyio.run(_chunked_transfer, writes, reads, hand_off_after)


async def _datagrams(sizes: list[int]) -> None:
    datagrams = [os.urandom(n) for n in sizes]
    received: list[bytes] = []
    done = anyio.Event()

    async def far(tunnel_stream: TunnelStream) -> None:
        tunnel_stream.accept()
        async with TunnelByteStream(tunnel_stream) as stream:
            try:
                while True:
                    received.append(await stream.receive(1))  # max_bytes does not cut a datagram
            except anyio.EndOfStream:
                done.set()

    async with tunnel_pair(far) as (client, _):
        stream = TunnelByteStream(await client.open_stream(StreamMetadata(authority="a:1", kind="udp")))
        with anyio.fail_after(20):
            for datagram in datagrams:
                await stream.send(datagram)
            await stream.send_eof()
            await done.wait()
    assert received == [d for d in datagrams if d]  # an empty datagram is not sent


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(0, 16000), min_size=1, max_size=40))
def test_udp_streams_keep_message_boundaries(sizes: list[int]) -> None:
    anyio.run(_datagrams, sizes)


async def test_a_datagram_larger_than_a_frame_is_refused_and_the_stream_goes_on() -> None:
    async with tunnel_pair(sender([b"ok"])) as (client, _):
        tunnel_stream = await client.open_stream(StreamMetadata(authority="a:1", kind="udp"))
        stream = TunnelByteStream(tunnel_stream)
        too_large = b"x" * (client.tunnel.config.max_frame_size + 1)
        with pytest.raises(ValueError, match="frame size"):
            await stream.send(too_large)
        with pytest.raises(ValueError, match="frame size"):
            tunnel_stream.write(too_large)
        with anyio.fail_after(10):
            assert await stream.receive() == b"ok"
            await stream.send(b"still open")


async def test_end_of_stream_after_everything_before_it_even_when_a_reset_follows() -> None:
    payload = os.urandom(TunnelConfig().initial_stream_window // 2)  # fits the window: no reader needed
    closed = anyio.Event()

    async def far(tunnel_stream: TunnelStream) -> None:
        tunnel_stream.accept()
        async with TunnelByteStream(tunnel_stream) as stream:
            await stream.send(payload)
            await stream.send_eof()
        closed.set()  # closed while the peer's direction is open: an RST follows the FIN

    async with tunnel_pair(far) as (client, _):
        stream = TunnelByteStream(await client.open_stream(StreamMetadata(authority="a:1")))
        with anyio.fail_after(10):
            await closed.wait()
            await anyio.sleep(0.1)
            assert await read_all(stream) == payload
            with pytest.raises(anyio.EndOfStream):
                await stream.receive()
        assert stream.stream.broken  # the RST came: it changes nothing for the reader


async def test_half_close_keeps_the_other_direction() -> None:
    got: list[bytes] = []

    async def far(tunnel_stream: TunnelStream) -> None:
        tunnel_stream.accept()
        async with TunnelByteStream(tunnel_stream) as stream:
            got.append(await read_all(stream))
            await stream.send(b"answer after your end")
            await stream.send_eof()

    async with tunnel_pair(far) as (client, _):
        stream = TunnelByteStream(await client.open_stream(StreamMetadata(authority="a:1")))
        with anyio.fail_after(10):
            await stream.send(b"request")
            await stream.send_eof()
            with pytest.raises(anyio.ClosedResourceError):
                await stream.send(b"after the end")
            assert await read_all(stream) == b"answer after your end"
    assert got == [b"request"]


async def test_a_reset_breaks_receive_and_send_with_its_reason() -> None:
    async def far(tunnel_stream: TunnelStream) -> None:
        tunnel_stream.accept()
        async with TunnelByteStream(tunnel_stream) as stream:
            assert await stream.receive() == b"hello"
            tunnel_stream.refuse("failed")  # an RST after the SYN-ACK

    async with tunnel_pair(far) as (client, _):
        stream = TunnelByteStream(await client.open_stream(StreamMetadata(authority="a:1")))
        with anyio.fail_after(10):
            await stream.send(b"hello")
            with pytest.raises(anyio.BrokenResourceError) as info:
                await stream.receive()
            assert not isinstance(info.value, StreamRefused)  # it was accepted: a reset, not a refusal
            assert stream.stream.reset_error == "failed"
            with pytest.raises(anyio.BrokenResourceError):
                await stream.send(b"more")
            await stream.send_eof()  # nothing to end on a broken stream: no error


async def test_a_refusal_surfaces_on_the_first_receive_without_waiting_for_the_syn_ack() -> None:
    async def far(tunnel_stream: TunnelStream) -> None:
        tunnel_stream.refuse("unreachable")

    async with tunnel_pair(far) as (client, _):
        stream = TunnelByteStream(
            await client.open_stream(StreamMetadata(authority="a:1"), wait_accepted=False)
        )
        await stream.send(b"0-rtt bytes")
        with anyio.fail_after(10), pytest.raises(StreamRefused) as info:
            await stream.receive()
        assert info.value.error == "unreachable"


async def test_a_dead_tunnel_breaks_a_waiting_reader_and_sender() -> None:
    async def far(tunnel_stream: TunnelStream) -> None:
        tunnel_stream.accept()
        await anyio.sleep(30)  # never reads, never answers

    async with tunnel_pair(far) as (client, server):
        reader = TunnelByteStream(await client.open_stream(StreamMetadata(authority="a:1")))
        writer = TunnelByteStream(await client.open_stream(StreamMetadata(authority="b:1")))
        seen: list[str] = []

        async def receive() -> None:
            with pytest.raises(anyio.BrokenResourceError):
                await reader.receive()
            seen.append("reader")

        async def send() -> None:
            try:
                while True:  # until the window is shut, then the wait is broken
                    await writer.send(b"w" * 65536)
            except anyio.BrokenResourceError:
                seen.append("writer")

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(receive)
                tg.start_soon(send)
                await anyio.sleep(0.3)
                await anyio.aclose_forcefully(server.link)
        assert sorted(seen) == ["reader", "writer"]
        assert reader.stream.reset_error == "tunnel closed"


async def test_own_aclose_closes_and_wakes_a_waiting_reader() -> None:
    async with tunnel_pair(sender([], end=False)) as (client, _):
        stream = TunnelByteStream(await client.open_stream(StreamMetadata(authority="a:1")))
        stream_id = stream.stream.stream_id

        async def receive() -> None:
            with pytest.raises(anyio.ClosedResourceError):
                await stream.receive()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(receive)
                await anyio.sleep(0.05)
                await stream.aclose()
        assert stream_id not in client.streams  # freed
        for call in (stream.receive(), stream.send(b"x"), stream.send_eof()):
            with pytest.raises(anyio.ClosedResourceError):
                await call
        await stream.aclose()  # a second close does nothing


async def test_hand_off_passes_what_was_not_received_and_leaves_the_stream_open() -> None:
    async with tunnel_pair(sender([b"first", b"second"])) as (client, _):
        stream = TunnelByteStream(await client.open_stream(StreamMetadata(authority="a:1")))
        with anyio.fail_after(10):
            assert await stream.receive(2) == b"fi"
            while stream.stream.unacknowledged < len(b"rstsecond"):
                await anyio.sleep(0.01)  # all of it is in, unread
            tunnel_stream = stream.hand_off()
            with pytest.raises(anyio.ClosedResourceError):
                await stream.receive()
            await stream.aclose()  # after the hand-off: leaves the stream alone
            assert tunnel_stream.stream_id in client.streams
            collector = Collector(tunnel_stream)
            tunnel_stream.attach(collector)
            await collector.eof.wait()
        assert bytes(collector.data) == b"rstsecond"
        assert tunnel_stream.unacknowledged == 0
        tunnel_stream.close()


async def test_a_reader_that_stops_holds_no_more_than_its_window() -> None:
    """The peer sends far more than the stream window; nobody receives: the sender is held back and the adapter
    holds at most the window, all of it received whole once the reader goes on."""
    config = TunnelConfig()
    window = config.initial_stream_window
    total = 32 * window
    block = os.urandom(window // 4)
    sent = [0]

    async def far(tunnel_stream: TunnelStream) -> None:
        tunnel_stream.accept()
        async with TunnelByteStream(tunnel_stream) as stream:
            for _ in range(total // len(block)):
                await stream.send(block)
                sent[0] += len(block)
            await stream.send_eof()
            await read_all(stream)

    async with tunnel_pair(far, client_config=config, server_config=config) as (client, _):
        stream = TunnelByteStream(await client.open_stream(StreamMetadata(authority="a:1")))
        with anyio.fail_after(60):
            last = -1
            for _ in range(100):  # until the sender stalls (bounded: 10 s)
                await anyio.sleep(0.1)
                if sent[0] == last:
                    break
                last = sent[0]
            assert sent[0] == last < total
            held = stream.stream.unacknowledged
            assert 0 < held <= window
            received = await read_all(stream)
        assert len(received) == total
        assert received == block * (total // len(block))
