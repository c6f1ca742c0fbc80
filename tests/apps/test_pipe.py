"""The relay: byte-exact copy both ways over real TCP, half-close, broken sides, back-pressure, idle timeout, for
every kind of end (a lean socket, a tunnel stream, any other anyio byte stream: TCP and TLS)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import pytest
import trustme
from anyio.abc import ByteStream, SocketAttribute, SocketStream, TaskGroup
from anyio.streams.tls import TLSStream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.runtime.test_connection import Handler, tunnel_pair
from vtunnel.apps.pipe import (
    CHUNK_SIZE,
    READ_FLOOR,
    Relay,
    RelayEnd,
    SocketEnd,
    SocketLeg,
    StreamEnd,
    StreamLeg,
    TunnelEnd,
    TunnelLeg,
    join,
    pipe,
)
from vtunnel.io.stream_sockets import LeanSocketStream, attach_socket
from vtunnel.protocol import Role, StreamMetadata, Tunnel, TunnelConfig, events
from vtunnel.runtime.byte_stream import TunnelByteStream
from vtunnel.runtime.connection import OUTBOUND_HIGH_WATER, TunnelConnection
from vtunnel.runtime.tunnel_stream import TunnelStream
from vtunnel.transports.link import StreamLink

from .conftest import tcp_pair

pytestmark = pytest.mark.anyio


async def _receive_all(stream: ByteStream) -> bytes:
    chunks = []
    while True:
        try:
            chunks.append(await stream.receive())
        except anyio.EndOfStream:
            return b"".join(chunks)


async def _receive_into(stream: ByteStream, got: bytearray) -> None:
    """Append what ``stream`` receives to ``got`` until it ends (``EndOfStream``) or fails."""
    while True:
        got += await stream.receive()


async def test_copies_both_ways_with_half_close() -> None:
    up = os.urandom(300_000)
    down = os.urandom(200_000)
    async with tcp_pair() as (client, front), tcp_pair() as (back, origin):
        result: dict[str, object] = {}

        async def run_pipe() -> None:
            result["counts"] = await pipe(StreamLeg(front), StreamLeg(back))

        async def origin_side() -> None:
            # The origin reads the whole request (until the half-close) and only then answers.
            result["origin_got"] = await _receive_all(origin)
            await origin.send(down)
            await origin.send_eof()

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_pipe)
                tg.start_soon(origin_side)
                await client.send(up)
                await client.send_eof()
                result["client_got"] = await _receive_all(client)
    assert result["origin_got"] == up
    assert result["client_got"] == down
    assert result["counts"] == (len(up), len(down))


async def test_reset_side_closes_both() -> None:
    async with tcp_pair() as (client, front), tcp_pair() as (back, origin):
        done = anyio.Event()

        async def run_pipe() -> None:
            await pipe(StreamLeg(front), StreamLeg(back))
            done.set()

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_pipe)
                await client.send(b"hello")
                assert await origin.receive() == b"hello"
                await client.aclose()  # the other direction is still open: the origin sees EOF only
                with pytest.raises(anyio.EndOfStream):
                    await origin.receive()
                for _ in range(1000):  # the client socket is gone: a write soon finds the reset
                    if done.is_set():
                        break
                    await origin.send(b"late")
                    await anyio.sleep(0.01)
            assert done.is_set()
            # pipe returned: both of its streams are closed
            with pytest.raises(anyio.ClosedResourceError):
                await front.send(b"x")
            with pytest.raises(anyio.ClosedResourceError):
                await back.send(b"x")


async def test_broken_destination_ends_pipe() -> None:
    async with tcp_pair() as (client, front), tcp_pair() as (back, origin):
        await back.aclose()  # writing to it fails at once
        with anyio.fail_after(20):
            counts = await pipe(StreamLeg(front), StreamLeg(back))
            assert counts == (0, 0)
            await client.send(b"data")
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await client.receive()
        del origin


def answer_in_two(answer: bytes, head: int, release: anyio.Event) -> Handler:
    """A far end that sends ``answer[:head]``, waits for ``release``, then sends the rest and its end."""

    async def far(tunnel_stream: TunnelStream) -> None:
        async with TunnelByteStream(tunnel_stream) as stream:
            tunnel_stream.accept()
            await stream.send(answer[:head])
            await release.wait()
            await stream.send(answer[head:])
            await stream.send_eof()

    return far


async def test_a_tunnel_dying_under_a_piped_stream_resets_the_socket() -> None:
    """pipe() follows the relay's rule: the client gets a prefix of the answer and a reset, not a clean end."""
    answer = os.urandom(1_000_000)
    head = 100_000
    release = anyio.Event()

    far = answer_in_two(answer, head, release)

    async with tunnel_pair(far) as (conn, server), tcp_pair() as (client, front):
        remote = await conn.open_stream(wait_accepted=False)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(pipe, StreamLeg(front), TunnelLeg(TunnelByteStream(remote)))
                await client.send_eof()
                got = bytearray()
                while len(got) < head:
                    got += await client.receive()
                await anyio.aclose_forcefully(server.link)
                release.set()
                with pytest.raises(anyio.BrokenResourceError):
                    await _receive_into(client, got)
    assert bytes(got) == answer[: len(got)]
    assert len(got) < len(answer)


async def test_idle_timeout_closes_both() -> None:
    async with tcp_pair() as (client, front), tcp_pair() as (back, origin):
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(functools.partial(pipe, StreamLeg(front), StreamLeg(back), idle_timeout=0.2))
                await client.send(b"a")
                assert await origin.receive() == b"a"
                with pytest.raises(anyio.EndOfStream):
                    await client.receive()
                with pytest.raises(anyio.EndOfStream):
                    await origin.receive()


async def test_invalid_idle_timeout() -> None:
    async with tcp_pair() as (_, front), tcp_pair() as (back, _):
        with pytest.raises(ValueError, match="idle_timeout"):
            await pipe(StreamLeg(front), StreamLeg(back), idle_timeout=0)


async def _connected_socket() -> tuple[SocketStream, socket.socket]:
    """One real TCP connection on 127.0.0.1: our end as anyio's socket stream, the relay's as a bare socket."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        client = await anyio.connect_tcp("127.0.0.1", lsock.getsockname()[1])
        accepted, _addr = lsock.accept()
    return client, accepted


# ------------------------------------------------------------------------------------------------ socket ends
# One real TCP connection on 127.0.0.1 (the "client" end is ours, the other end is the relay's) relayed to one
# stream of a real tunnel over TCP; the far end of the stream is the tunnel server's handler. The relay's end of
# the connection is a lean socket (SocketEnd) or anyio's socket stream (StreamEnd, with its tasks).

ENDS = ["socket", "stream"]


@dataclass
class Relayed:
    client: SocketStream
    stream: TunnelStream
    server: TunnelConnection  # the tunnel's far end
    end: RelayEnd
    tg: TaskGroup
    idle_timeout: float | None
    relay: Relay | None = None

    def start(self) -> Relay:
        """Join the connection's end and the tunnel stream (the relay's tasks, if any, run in ``tg``)."""
        self.relay = Relay(self.end, TunnelEnd(self.stream), idle_timeout=self.idle_timeout)
        self.tg.start_soon(self.relay.run)
        return self.relay


@asynccontextmanager
async def relayed(
    handler: Handler,
    *,
    end: str = "socket",
    extensions: bool = True,
    idle_timeout: float | None = None,
    start: bool = True,
) -> AsyncIterator[Relayed]:
    cfg = TunnelConfig(extensions=extensions)
    async with tunnel_pair(handler, client_config=cfg, server_config=cfg) as (conn, server):
        client, accepted = await _connected_socket()
        accepted.setblocking(False)
        relay_end: RelayEnd
        if end == "socket":
            relay_end = SocketEnd()
            attach_socket(accepted, relay_end)
        else:
            relay_end = StreamEnd(await SocketStream.from_socket(accepted))
        stream = await conn.open_stream(wait_accepted=False)
        async with anyio.create_task_group() as tg:
            r = Relayed(client, stream, server, relay_end, tg, idle_timeout)
            if start:
                r.start()
            try:
                async with client:
                    yield r
            finally:
                if r.relay is not None:
                    r.relay.close()


async def _far_read_all(stream: ByteStream) -> bytes:
    out = bytearray()
    with contextlib.suppress(anyio.EndOfStream):
        while True:
            out += await stream.receive()
    return bytes(out)


@pytest.mark.parametrize("end", ENDS)
@pytest.mark.parametrize("extensions", [True, False])
async def test_relay_copies_8_mib_both_ways_with_half_close(end: str, extensions: bool) -> None:
    up = os.urandom(8 << 20)  # larger than a stream window: the socket waits for credit
    down = os.urandom(8 << 20)
    got: dict[str, bytes] = {}

    async def far(tunnel_stream: TunnelStream) -> None:
        async with TunnelByteStream(tunnel_stream) as stream:
            tunnel_stream.accept()
            got["far"] = await _far_read_all(
                stream
            )  # the whole request (until the half-close), then the answer
            await stream.send(down)
            await stream.send_eof()

    async with relayed(far, end=end, extensions=extensions) as r:
        with anyio.fail_after(30):
            await r.client.send(up)
            await r.client.send_eof()
            got["client"] = await _receive_all(r.client)
            assert r.relay is not None
            assert await r.relay.wait() == (len(up), len(down))
            assert r.relay.finished
    assert got["far"] == up
    assert got["client"] == down


@pytest.mark.parametrize("end", ENDS)
@pytest.mark.parametrize("extensions", [True, False])
async def test_relay_holds_the_sender_while_the_socket_is_not_read(end: str, extensions: bool) -> None:
    """The far end sends far more than any buffer on the way; it is held back until the client reads."""
    total = 64 * 1024 * 1024
    block = os.urandom(1024 * 1024)
    sent = [0]

    async def far(tunnel_stream: TunnelStream) -> None:
        async with TunnelByteStream(tunnel_stream) as stream:
            tunnel_stream.accept()
            for _ in range(total // len(block)):
                await stream.send(block)
                sent[0] += len(block)
            await stream.send_eof()

    async with relayed(far, end=end, extensions=extensions) as r:
        with anyio.fail_after(60):
            last = -1
            for _ in range(200):  # until the sender stalls (bounded: 20 s at most)
                await anyio.sleep(0.1)
                if sent[0] == last:
                    break
                last = sent[0]
            assert sent[0] == last < total  # held back: nothing moves while the client does not read
            twice = block * 2
            received = 0
            with contextlib.suppress(anyio.EndOfStream):
                while True:
                    chunk = await r.client.receive(len(block))
                    start = received % len(block)
                    assert chunk == twice[start : start + len(chunk)]
                    received += len(chunk)
            assert received == total
            await r.client.send_eof()
            assert r.relay is not None
            assert await r.relay.wait() == (0, total)


@pytest.mark.parametrize("end", ENDS)
async def test_a_reset_stream_resets_the_socket(end: str) -> None:
    async def far(tunnel_stream: TunnelStream) -> None:
        async with TunnelByteStream(tunnel_stream) as stream:
            tunnel_stream.accept()
            assert await stream.receive() == b"hello"
            tunnel_stream.refuse("failed")  # RST

    async with relayed(far, end=end) as r:
        with anyio.fail_after(10):
            await r.client.send(b"hello")
            with pytest.raises(anyio.BrokenResourceError):  # reset: an end of stream would look complete
                await r.client.receive()
            assert r.relay is not None
            await r.relay.wait()


@pytest.mark.parametrize("end", ENDS)
async def test_a_refused_stream_resets_the_socket(end: str) -> None:
    async def far(stream: TunnelStream) -> None:
        stream.refuse("refused")

    async with relayed(far, end=end) as r:
        with anyio.fail_after(10):
            with pytest.raises(anyio.BrokenResourceError):
                await r.client.receive()
            assert r.relay is not None
            await r.relay.wait()


@pytest.mark.parametrize("end", ENDS)
@pytest.mark.parametrize("death", ["transport lost", "tunnel aborted"])
async def test_a_tunnel_dying_under_the_stream_resets_the_socket(end: str, death: str) -> None:
    """The client gets a byte-exact prefix of the answer and then a reset, never a clean end of stream that
    would pass the short answer off as the whole of it."""
    answer = os.urandom(3_000_000)
    head = 200_000
    release = anyio.Event()

    async with relayed(answer_in_two(answer, head, release), end=end) as r:
        with anyio.fail_after(10):
            await r.client.send_eof()  # the request is complete: only the answer is awaited
            got = bytearray()
            while len(got) < head:
                got += await r.client.receive()
            if death == "transport lost":
                await anyio.aclose_forcefully(r.server.link)
            else:
                r.server.shutdown("gone", graceful=False)
            release.set()
            with pytest.raises(anyio.BrokenResourceError):
                await _receive_into(r.client, got)
            assert r.relay is not None
            await r.relay.wait()
    assert bytes(got) == answer[: len(got)]
    assert len(got) < len(answer)


def reads_until_broken() -> tuple[Handler, list[type[BaseException]], anyio.Event]:
    """A far end that reads until its stream breaks; what broke it, and an event set once it is done."""
    seen: list[type[BaseException]] = []
    done = anyio.Event()

    async def far(tunnel_stream: TunnelStream) -> None:
        async with TunnelByteStream(tunnel_stream) as stream:
            tunnel_stream.accept()
            try:
                await _far_read_all(stream)
            except anyio.BrokenResourceError as exc:
                seen.append(type(exc))
            done.set()

    return far, seen, done


@pytest.mark.parametrize("end", ENDS)
async def test_a_reset_socket_resets_the_stream(end: str) -> None:
    far, seen, done = reads_until_broken()
    async with relayed(far, end=end) as r:
        with anyio.fail_after(10):
            await r.client.send(b"x")
            raw = r.client.extra(SocketAttribute.raw_socket)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await r.client.aclose()  # RST, not FIN
            assert r.relay is not None
            await r.relay.wait()
            await done.wait()
    assert seen == [anyio.BrokenResourceError]


@pytest.mark.parametrize("end", ENDS)
async def test_bytes_before_the_relay_are_delivered(end: str) -> None:
    async def far(tunnel_stream: TunnelStream) -> None:
        async with TunnelByteStream(tunnel_stream) as stream:
            tunnel_stream.accept()
            await stream.send(b"early")  # arrives while nobody consumes the stream yet
            await stream.send_eof()
            assert await _far_read_all(stream) == b"up"

    async with relayed(far, end=end, start=False) as r:
        with anyio.fail_after(10):
            await r.client.send(b"up")  # read only once the relay starts
            while not r.stream.unacknowledged:
                await anyio.sleep(0.01)
            relay = r.start()
            assert await _receive_all(r.client) == b"early"
            await r.client.send_eof()
            assert await relay.wait() == (2, 5)


async def test_bytes_waiting_on_a_stream_reach_a_lean_socket_the_relay_has_not_read_yet() -> None:
    """The exit's WebSocks case: the tunnel stream (``a``) holds bytes when the relay starts and reports them at
    once, while the socket (``b``) is still a lean stream the relay takes over when it first reads it: the bytes
    are written to the socket, not lost."""
    far_got: list[bytes] = []

    async def far(tunnel_stream: TunnelStream) -> None:
        tunnel_stream.accept()
        async with TunnelByteStream(tunnel_stream) as stream:
            await stream.send(b"early")  # arrives while nobody consumes the stream yet
            await stream.send_eof()
            far_got.append(await _far_read_all(stream))

    async with tunnel_pair(far) as (conn, _):
        stream = await conn.open_stream()
        client, accepted = await _connected_socket()
        lean = LeanSocketStream()
        attach_socket(accepted, lean)
        async with client:
            with anyio.fail_after(10):
                while stream.unacknowledged < len(b"early"):
                    await anyio.sleep(0.01)
                relay = Relay(TunnelEnd(stream), SocketLeg(lean).relay_end())
                assert await _receive_all(client) == b"early"
                await client.send(b"up")
                await client.send_eof()
                assert await relay.wait() == (5, 2)
                while not far_got:
                    await anyio.sleep(0.01)
    assert far_got == [b"up"]


async def test_a_socket_closed_before_the_relay_resets_the_stream() -> None:
    gone = anyio.Event()

    async def far(tunnel_stream: TunnelStream) -> None:
        async with TunnelByteStream(tunnel_stream) as stream:
            try:  # the RST may be here before this handler runs: accept() itself fails then
                tunnel_stream.accept()
                await _far_read_all(stream)
            except anyio.BrokenResourceError:
                gone.set()

    async with relayed(far, start=False) as r:
        with anyio.fail_after(10):
            r.end.close()  # the socket side ended before a stream was there
            await r.start().wait()
            await gone.wait()
            with pytest.raises(anyio.ClosedResourceError):
                r.stream.write(b"x")


@pytest.mark.parametrize("end", ENDS)
async def test_relay_idle_timeout_closes_both(end: str) -> None:
    ended = anyio.Event()

    async def far(tunnel_stream: TunnelStream) -> None:
        async with TunnelByteStream(tunnel_stream) as stream:
            tunnel_stream.accept()
            assert await stream.receive() == b"a"
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                await stream.receive()
            ended.set()

    async with relayed(far, end=end, idle_timeout=0.2) as r:
        with anyio.fail_after(10):
            await r.client.send(b"a")
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await r.client.receive()
            await ended.wait()
            assert r.relay is not None
            assert r.relay.finished


def test_relay_invalid_idle_timeout() -> None:
    with pytest.raises(ValueError, match="idle_timeout"):
        Relay(SocketEnd(), SocketEnd(), idle_timeout=0)


# ------------------------------------------------------------------------------------------------ TLS stream ends
# A TLS stream cannot half-close: as the client, the end of the answer closes it; as the end reached, the end of
# the request waits for the answer.


@asynccontextmanager
async def tls_pair() -> AsyncIterator[tuple[TLSStream, TLSStream]]:
    """The client and server ends of one TLS connection over real TCP on 127.0.0.1."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with tcp_pair() as (raw_client, raw_server):
        servers: list[TLSStream] = []

        async def handshake() -> None:
            servers.append(await TLSStream.wrap(raw_server, server_side=True, ssl_context=server_context))

        async with anyio.create_task_group() as tg:
            tg.start_soon(handshake)
            client = await TLSStream.wrap(raw_client, hostname="localhost", ssl_context=client_context)
        yield client, servers[0]


@asynccontextmanager
async def tls_relayed(far: Handler, *, tls_asked: bool) -> AsyncIterator[tuple[TLSStream, Relay]]:
    """A TLS connection's server end and a tunnel stream to ``far`` joined by a relay, whose tasks run meanwhile;
    ``tls_asked``: the TLS end is the relay's client (``a``). Yields the TLS peer and the relay."""
    async with tunnel_pair(far) as (conn, _), tls_pair() as (peer, served):
        remote = await conn.open_stream(wait_accepted=False)
        async with anyio.create_task_group() as tg:
            tunnel_leg = TunnelLeg(TunnelByteStream(remote))
            relay = join(StreamLeg(served), tunnel_leg) if tls_asked else join(tunnel_leg, StreamLeg(served))
            tg.start_soon(relay.run)
            yield peer, relay


async def _read_exactly(stream: ByteStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += await stream.receive()
    return bytes(out)


async def test_a_tls_client_relayed_to_a_tunnel_stream_8_mib_each_way() -> None:
    """The TLS client's upload arrives whole; the end of the answer closes the TLS stream cleanly."""
    up = os.urandom(8 << 20)
    down = os.urandom(8 << 20)
    got: dict[str, bytes] = {}

    async def far(tunnel_stream: TunnelStream) -> None:
        async with TunnelByteStream(tunnel_stream) as stream:
            tunnel_stream.accept()
            got["far"] = await _read_exactly(stream, len(up))
            await stream.send(down)
            await stream.send_eof()

    async with tls_relayed(far, tls_asked=True) as (client, relay):
        with anyio.fail_after(30):
            await client.send(up)
            got["client"] = await _receive_all(client)  # EndOfStream: the relay closed it cleanly
            await client.aclose()
            assert await relay.wait() == (len(up), len(down))
    assert got["far"] == up
    assert got["client"] == down


async def test_a_tunnel_stream_relayed_to_a_tls_origin_waits_for_the_answer() -> None:
    """The request's end cannot be passed on to a TLS origin: the relay waits for the origin's answer, whose end
    ends the relay."""
    up = os.urandom(8 << 20)
    down = os.urandom(8 << 20)
    got: dict[str, bytes] = {}

    async def far(tunnel_stream: TunnelStream) -> None:
        async with TunnelByteStream(tunnel_stream) as stream:
            tunnel_stream.accept()
            await stream.send(up)
            await stream.send_eof()
            got["far"] = await _far_read_all(stream)

    async with tls_relayed(far, tls_asked=False) as (origin, relay):
        with anyio.fail_after(30):
            got["origin"] = await _read_exactly(origin, len(up))
            await origin.send(down)
            await origin.aclose()  # close_notify: the end of the answer
            assert await relay.wait() == (len(up), len(down))
            while "far" not in got:
                await anyio.sleep(0.01)
    assert got["origin"] == up
    assert got["far"] == down


async def test_a_broken_tls_side_resets_the_tunnel_stream() -> None:
    far, seen, done = reads_until_broken()
    async with tls_relayed(far, tls_asked=True) as (client, relay):
        with anyio.fail_after(10):
            await client.send(b"x" * 1000)
            raw = client.extra(SocketAttribute.raw_socket)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await client.transport_stream.aclose()  # a TCP reset under the TLS stream, no close_notify
            await relay.wait()
            await done.wait()
    assert seen == [anyio.BrokenResourceError]


chunkings = st.lists(st.integers(min_value=1, max_value=200_000), min_size=0, max_size=6)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    up=chunkings,
    down=chunkings,
    far_ends_first=st.booleans(),
    extensions=st.booleans(),
    end=st.sampled_from(ENDS),
)
async def test_relay_is_byte_exact_for_any_chunking_and_end_order(
    up: list[int], down: list[int], far_ends_first: bool, extensions: bool, end: str
) -> None:
    """Whatever the write sizes each way and whichever side ends first, both directions arrive whole."""
    up_data = [os.urandom(n) for n in up]
    down_data = [os.urandom(n) for n in down]
    got: dict[str, bytes] = {}
    client_ended = anyio.Event()
    far_done = anyio.Event()

    async def far(tunnel_stream: TunnelStream) -> None:
        async with TunnelByteStream(tunnel_stream) as stream:
            tunnel_stream.accept()
            for chunk in down_data:
                await stream.send(chunk)
            if not far_ends_first:
                await client_ended.wait()
            await stream.send_eof()
            got["far"] = await _far_read_all(stream)
            far_done.set()

    async with relayed(far, end=end, extensions=extensions) as r:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:

                async def read_side() -> None:
                    got["client"] = await _receive_all(r.client)

                tg.start_soon(read_side)
                for chunk in up_data:
                    await r.client.send(chunk)
                await r.client.send_eof()
                client_ended.set()
            assert r.relay is not None
            assert await r.relay.wait() == (sum(up), sum(down))
            await far_done.wait()  # the far end may still be reading what the relay passed on
    assert got["client"] == b"".join(down_data)
    assert got["far"] == b"".join(up_data)


# ------------------------------------------------------------------------------------------------ tunnel output
# A tunnel whose transport the peer stops reading: the relay stops reading its socket while the tunnel's output is
# over its high-water mark (no task waits for the room: the connection tells the stream's consumer), and goes on,
# byte-exact, once the peer reads again.


async def test_a_backed_up_tunnel_pauses_the_socket_until_its_output_drained() -> None:
    big = TunnelConfig(
        min_stream_window=256 << 20, initial_stream_window=256 << 20, initial_tunnel_window=256 << 20
    )
    total = 32 << 20
    block = os.urandom(1 << 20)
    release = anyio.Event()
    arrived = hashlib.sha256()
    ended = anyio.Event()

    async def slow_peer(sock: ByteStream) -> None:
        async with sock:
            await serve_slowly(sock)

    async def serve_slowly(sock: ByteStream) -> None:
        peer = Tunnel(role=Role.SERVER, config=big)
        peer.initiate(time.monotonic())
        peer.receive_data(await sock.receive(), time.monotonic())  # the client's SETTINGS
        await sock.send(peer.data_to_send())
        await release.wait()  # reads nothing meanwhile
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            while not ended.is_set():
                for ev in peer.receive_data(await sock.receive(), time.monotonic()):
                    if isinstance(ev, events.StreamOpened):
                        peer.accept_stream(ev.stream_id)
                    elif isinstance(ev, events.DataReceived):
                        arrived.update(ev.data)
                    elif isinstance(ev, events.StreamEnded):
                        ended.set()
                out = peer.data_to_send()
                if out:
                    await sock.send(out)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, slow_peer)
        conn = TunnelConnection(
            StreamLink(await anyio.connect_tcp("127.0.0.1", port)), role=Role.CLIENT, config=big, name="c"
        )
        tg.start_soon(conn.run)
        client, accepted = await _connected_socket()
        end = SocketEnd()
        attach_socket(accepted, end)
        async with client:
            with anyio.fail_after(10):
                await conn.wait_ready()
            stream = await conn.open_stream(StreamMetadata(authority="a:1"), wait_accepted=False)
            relay = Relay(end, TunnelEnd(stream))
            sent = [0]

            async def upload() -> None:
                for _ in range(total // len(block)):
                    await client.send(block)
                    sent[0] += len(block)
                await client.send_eof()

            with anyio.fail_after(60):
                async with anyio.create_task_group() as up:
                    up.start_soon(upload)
                    last = -1
                    for _ in range(100):  # until the upload stalls (bounded: 10 s)
                        await anyio.sleep(0.1)
                        if sent[0] == last:
                            break
                        last = sent[0]
                    assert sent[0] == last < total  # held back
                    assert conn.outbound_congested
                    assert conn.outbound_bytes <= OUTBOUND_HIGH_WATER + CHUNK_SIZE  # one read past the mark
                    release.set()
                await ended.wait()
            assert relay.a_to_b == total
            relay.close()
        assert arrived.digest() == hashlib.sha256(block * (total // len(block))).digest()
        conn.shutdown("test over", graceful=False)
        tg.cancel_scope.cancel()


async def test_a_socket_is_read_no_further_ahead_than_its_stream_can_send() -> None:
    """One stream's far end reads nothing: its client keeps sending, and the relay holds no more for that stream
    than its window plus one read (the rest stays in the client's socket), while a second stream in the same
    tunnel carries 8 MiB byte-exact meanwhile."""
    window = 64 * 1024
    cfg = TunnelConfig(initial_stream_window=window, min_stream_window=16 * 1024)
    stalled_open = anyio.Event()
    moving = hashlib.sha256()
    moved = anyio.Event()

    async def far(tunnel_stream: TunnelStream) -> None:
        tunnel_stream.accept()
        metadata = tunnel_stream.metadata
        if metadata is not None and metadata.authority == "stalled:1":
            stalled_open.set()
            await anyio.sleep_forever()  # reads nothing: no credit goes back
        async with TunnelByteStream(tunnel_stream) as stream:
            with contextlib.suppress(anyio.EndOfStream):
                while True:
                    moving.update(await stream.receive())
            moved.set()

    async def relay_one(conn: TunnelConnection, authority: str) -> tuple[SocketStream, Relay, TunnelEnd]:
        client, accepted = await _connected_socket()
        end = SocketEnd()
        attach_socket(accepted, end)
        stream = await conn.open_stream(StreamMetadata(authority=authority), wait_accepted=False)
        tunnel_end = TunnelEnd(stream)
        return client, Relay(end, tunnel_end), tunnel_end

    async with tunnel_pair(far, client_config=cfg, server_config=cfg) as (conn, _server):
        stalled, stalled_relay, stalled_end = await relay_one(conn, "stalled:1")
        other, other_relay, _ = await relay_one(conn, "moving:1")
        block = os.urandom(256 * 1024)
        sent = [0]

        async def flood() -> None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                for _ in range(64):  # 16 MiB at most: far more than every buffer on the way
                    await stalled.send(block)
                    sent[0] += len(block)

        async with stalled, other, anyio.create_task_group() as tg:
            with anyio.fail_after(30):
                await stalled_open.wait()
                tg.start_soon(flood)
                last = -1
                for _ in range(100):  # until the relay stops reading the stalled socket (bounded: 10 s)
                    await anyio.sleep(0.1)
                    if stalled_relay.a_to_b == last:
                        break
                    last = stalled_relay.a_to_b
                held = stalled_relay.a_to_b
                assert stalled_end.pending <= READ_FLOOR  # one read beyond the window, at most
                assert held <= window + READ_FLOOR
                assert sent[0] > held  # the client did send more: it waits in the sockets, not in the relay

                upload = os.urandom(8 << 20)
                await other.send(upload)
                await other.send_eof()
                await moved.wait()
                assert moving.digest() == hashlib.sha256(upload).digest()
                assert other_relay.a_to_b == len(upload)
                assert stalled_relay.a_to_b == held  # still held back, still bounded
                assert stalled_end.pending <= READ_FLOOR
            tg.cancel_scope.cancel()
        stalled_relay.close()
        other_relay.close()


async def test_room_told_during_the_ends_own_write_sends_nothing_twice() -> None:
    """A stream still listed as waiting for room (a has_room() that said no before its window opened) is told of
    room by the transmit of its own write: the bytes being written go once."""
    got = hashlib.sha256()
    done = anyio.Event()

    async def far(tunnel_stream: TunnelStream) -> None:
        async with TunnelByteStream(tunnel_stream) as stream:
            tunnel_stream.accept()
            with contextlib.suppress(anyio.EndOfStream):
                while True:
                    got.update(await stream.receive())
            done.set()

    async with tunnel_pair(far) as (conn, _server):
        client, accepted = await _connected_socket()
        end = SocketEnd()
        attach_socket(accepted, end)
        stream = await conn.open_stream(StreamMetadata(authority="a:1"), wait_accepted=False)
        relay = Relay(end, TunnelEnd(stream))
        upload = os.urandom(64 * 1024)
        async with client:
            with anyio.fail_after(10):
                for i in range(0, len(upload), 16 * 1024):
                    conn.notify_room(stream)  # listed as waiting when the next read is written
                    await client.send(upload[i : i + 16 * 1024])
                    await anyio.sleep(0.05)  # (each piece is one read of the relay)
                await client.send_eof()
                await done.wait()
        relay.close()
    assert got.digest() == hashlib.sha256(upload).digest()
