"""The lean relay transport and listener (vtunnel.io.stream_sockets) on real loopback sockets.

Every test runs on asyncio's loop and on uvloop, with the watcher's epoll set and with its per-socket fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.abc import SocketAttribute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtunnel.io.stream_sockets import (
    HIGH_WATER,
    LeanSocketStream,
    SocketTransport,
    SocketWatcher,
    attach_socket,
    open_relay_listener,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["epoll", "loop"])
def use_epoll(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "epoll")


class Recorder(asyncio.Protocol):
    """Keeps what the transport reports; optionally echoes what it receives."""

    def __init__(self, *, echo: bool = False, keep_open_on_eof: bool = True) -> None:
        self.echo = echo
        self.keep_open_on_eof = keep_open_on_eof
        self.transport: SocketTransport | None = None
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.lost_with: Exception | None = None
        self.pauses = 0
        self.resumes = 0
        self.changed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, SocketTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.changed.set()
        if self.echo:
            assert self.transport is not None
            self.transport.write(data)

    def eof_received(self) -> bool:
        self.eof.set()
        return self.keep_open_on_eof

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_with = exc
        self.lost.set()

    def pause_writing(self) -> None:
        self.pauses += 1

    def resume_writing(self) -> None:
        self.resumes += 1

    async def wait_for(self, size: int) -> None:
        while len(self.data) < size:
            self.changed.clear()
            await self.changed.wait()


@asynccontextmanager
async def attached(
    use_epoll: bool, protocol: asyncio.Protocol, *, sndbuf: int | None = None
) -> AsyncIterator[tuple[socket.socket, SocketTransport, SocketWatcher]]:
    """A real TCP connection on 127.0.0.1: ours is a blocking-free peer socket, the other end is attached."""
    loop = asyncio.get_running_loop()
    watcher = SocketWatcher(loop, use_epoll=use_epoll)
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        peer = socket.create_connection(lsock.getsockname())
        accepted, _ = lsock.accept()
    if sndbuf is not None:
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    peer.setblocking(False)
    transport = attach_socket(accepted, protocol, watcher)
    try:
        yield peer, transport, watcher
    finally:
        transport.abort()
        peer.close()
        await asyncio.sleep(0)
        watcher.close()


async def peer_send(peer: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(peer, data)


async def peer_read(peer: socket.socket, size: int | None = None, *, timeout: float = 20.0) -> bytes:
    """Read until ``size`` bytes (or end of stream when ``None``)."""
    loop = asyncio.get_running_loop()
    out = bytearray()
    async with asyncio.timeout(timeout):
        while size is None or len(out) < size:
            chunk = await loop.sock_recv(peer, 1 << 20)
            if not chunk:
                break
            out += chunk
    return bytes(out)


async def test_echo_both_ways_byte_exact(use_epoll: bool) -> None:
    proto = Recorder(echo=True)
    payload = os.urandom(4 * 1024 * 1024)
    async with attached(use_epoll, proto) as (peer, transport, _):
        assert transport.get_extra_info("peername") == peer.getsockname()
        sender = asyncio.ensure_future(peer_send(peer, payload))
        echoed = await peer_read(peer, len(payload))
        await sender
        assert echoed == payload
        assert bytes(proto.data) == payload


async def test_a_stalled_reader_pauses_the_writer_then_everything_arrives(use_epoll: bool) -> None:
    proto = Recorder()
    block = os.urandom(1 << 20)
    async with attached(use_epoll, proto, sndbuf=64 * 1024) as (peer, transport, _):
        for _ in range(4):
            transport.write(block)
        # the kernel took a little: the rest waits in the transport, and the protocol was told to stop writing
        assert transport.get_write_buffer_size() > HIGH_WATER
        assert (proto.pauses, proto.resumes) == (1, 0)
        got = await peer_read(peer, 4 * len(block))
        assert got == block * 4
        for _ in range(100):
            if transport.get_write_buffer_size() == 0:
                break
            await asyncio.sleep(0.01)
        assert transport.get_write_buffer_size() == 0
        assert (proto.pauses, proto.resumes) == (1, 1)


async def test_write_eof_waits_for_the_buffer_and_reading_goes_on(use_epoll: bool) -> None:
    proto = Recorder()
    data = os.urandom(3 * 1024 * 1024)
    async with attached(use_epoll, proto, sndbuf=64 * 1024) as (peer, transport, _):
        transport.write(data)
        transport.write_eof()
        transport.write(b"after eof is dropped")
        assert await peer_read(peer) == data  # all of it, then the FIN
        await peer_send(peer, b"still reading")
        await proto.wait_for(13)
        assert bytes(proto.data) == b"still reading"
        assert not transport.is_closing()


async def test_attach_leaves_the_socket_options_to_its_caller(use_epoll: bool) -> None:
    async with attached(use_epoll, Recorder()) as (_peer, transport, _):
        sock = transport.get_extra_info("socket")
        assert sock.gettimeout() == 0.0  # made non-blocking
        assert not sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # not set a second time here


async def test_peer_eof_is_reported_and_false_closes(use_epoll: bool) -> None:
    proto = Recorder(keep_open_on_eof=False)
    async with attached(use_epoll, proto) as (peer, transport, _):
        await peer_send(peer, b"last words")
        peer.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(10):
            await proto.eof.wait()
            await proto.lost.wait()
        assert bytes(proto.data) == b"last words"
        assert proto.lost_with is None
        assert transport.is_closing()
        assert await peer_read(peer) == b""


async def test_peer_eof_keeps_the_socket_open_for_writing(use_epoll: bool) -> None:
    proto = Recorder(keep_open_on_eof=True)
    async with attached(use_epoll, proto) as (peer, transport, _):
        peer.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(10):
            await proto.eof.wait()
        transport.write(b"answer")
        transport.write_eof()
        assert await peer_read(peer) == b"answer"
        assert not proto.lost.is_set()


async def test_a_reset_is_reported_with_its_error(use_epoll: bool) -> None:
    proto = Recorder()
    async with attached(use_epoll, proto) as (peer, _, _w):
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # RST
        async with asyncio.timeout(10):
            await proto.lost.wait()
        assert isinstance(proto.lost_with, ConnectionResetError)


async def test_close_sends_what_is_buffered_first(use_epoll: bool) -> None:
    proto = Recorder()
    data = os.urandom(2 * 1024 * 1024)
    async with attached(use_epoll, proto, sndbuf=64 * 1024) as (peer, transport, _):
        transport.write(data)
        transport.close()
        assert transport.is_closing()
        assert not proto.lost.is_set()
        assert await peer_read(peer) == data
        async with asyncio.timeout(10):
            await proto.lost.wait()
        assert proto.lost_with is None


async def test_abort_drops_what_is_buffered(use_epoll: bool) -> None:
    proto = Recorder()
    async with attached(use_epoll, proto, sndbuf=64 * 1024) as (peer, transport, watcher):
        transport.write(os.urandom(2 * 1024 * 1024))
        transport.abort()
        async with asyncio.timeout(10):
            await proto.lost.wait()
        got = await peer_read(peer)
        assert len(got) < 2 * 1024 * 1024
        assert len(watcher) == 0


async def test_a_paused_socket_whose_peer_hung_up_does_not_wake_the_loop(use_epoll: bool) -> None:
    proto = Recorder()
    async with attached(use_epoll, proto) as (peer, transport, watcher):
        transport.pause_reading()
        assert not transport.is_reading()
        peer.shutdown(socket.SHUT_RDWR)
        await asyncio.sleep(0.05)
        if watcher.uses_epoll:
            assert watcher._epoll.poll(0) == []  # the hang-up is not reported over and over
        assert not proto.eof.is_set()
        transport.resume_reading()
        async with asyncio.timeout(10):
            await proto.eof.wait()


async def test_pause_reading_holds_the_bytes_in_the_kernel(use_epoll: bool) -> None:
    proto = Recorder()
    async with attached(use_epoll, proto) as (peer, transport, _):
        transport.pause_reading()
        await peer_send(peer, b"x" * 1000)
        await asyncio.sleep(0.05)
        assert proto.data == b""
        transport.resume_reading()
        await asyncio.wait_for(proto.wait_for(1000), 10)


async def test_a_pause_is_applied_lazily_and_input_while_paused_drops_the_registration() -> None:
    """Stopping reading leaves the epoll registration (a pause and resume with nothing read between costs no
    system call); input that arrives while paused wakes the loop once, which drops it, and waits in the kernel."""
    proto = Recorder()
    async with attached(True, proto) as (peer, transport, watcher):
        registered = transport._watched
        assert registered
        transport.pause_reading()
        transport.resume_reading()
        transport.pause_reading()
        assert transport._watched == registered  # nothing changed in the set yet
        await peer_send(peer, b"x" * 1000)
        await asyncio.sleep(0.05)
        assert transport._watched == 0
        assert watcher._epoll.poll(0) == []  # not reported over and over
        assert proto.data == b""
        transport.resume_reading()
        await asyncio.wait_for(proto.wait_for(1000), 10)


async def test_a_resume_reads_what_waited_without_registering_again() -> None:
    """Input that came while paused dropped the registration: the resume reads it in the watcher's next pass,
    without registering first, and registers for input again only because reading goes on after a read that
    emptied the socket."""
    proto = Recorder()
    async with attached(True, proto) as (peer, transport, _):
        transport.pause_reading()
        await peer_send(peer, b"x" * 1000)
        await asyncio.sleep(0.05)
        assert transport._watched == 0
        transport.resume_reading()
        assert transport._watched == 0  # no registration at the resume
        await asyncio.wait_for(proto.wait_for(1000), 10)
        assert transport._watched  # the read emptied the socket: epoll reports what comes next
        await peer_send(peer, b"y" * 10)
        await asyncio.wait_for(proto.wait_for(1010), 10)


async def test_what_a_protocol_defers_to_the_end_of_a_pass_runs_after_it() -> None:
    """While the watcher hands several sockets their input in one pass (the ready ones, or resumed ones whose input
    waited), at_pass_end runs a callback once the pass is over, in the same callback. A pass over one socket is
    none: at_pass_end says no (act now), as it does outside a pass, so a lone message's output is not held back
    behind its reader's bookkeeping."""
    seen: list[str] = []
    loop = asyncio.get_running_loop()
    watcher = SocketWatcher(loop, use_epoll=True)

    class Deferring(Recorder):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            deferred = watcher.at_pass_end(lambda: seen.append("end"))
            seen.append("read" if deferred else "read now")

    protos = [Deferring(), Deferring()]
    peers: list[socket.socket] = []
    transports: list[SocketTransport] = []
    try:
        for proto in protos:
            with socket.socket() as lsock:
                lsock.bind(("127.0.0.1", 0))
                lsock.listen(1)
                peer = socket.create_connection(lsock.getsockname())
                accepted, _ = lsock.accept()
            peers.append(peer)
            transports.append(attach_socket(accepted, proto, watcher))
        assert not watcher.at_pass_end(lambda: seen.append("never"))

        # both sockets ready in one pass: their reads first, then the pass's end, once per call
        for peer in peers:
            peer.sendall(b"x" * 100)
        await asyncio.sleep(0.05)
        await asyncio.wait_for(protos[0].wait_for(100), 10)
        await asyncio.wait_for(protos[1].wait_for(100), 10)
        assert seen == ["read", "read", "end", "end"]

        # one socket ready: no pass
        seen.clear()
        peers[0].sendall(b"y" * 100)
        await asyncio.wait_for(protos[0].wait_for(200), 10)
        await asyncio.sleep(0)
        assert seen == ["read now"]

        # resumed together: one pass of resumed sockets
        seen.clear()
        for transport in transports:
            transport.pause_reading()
        for peer in peers:
            peer.sendall(b"z" * 100)
        await asyncio.sleep(0.05)
        for transport in transports:
            transport.resume_reading()
        await asyncio.wait_for(protos[0].wait_for(300), 10)
        await asyncio.wait_for(protos[1].wait_for(200), 10)
        await asyncio.sleep(0)
        assert seen == ["read", "read", "end", "end"]

        # one resumed alone: no pass
        seen.clear()
        transports[1].pause_reading()
        peers[1].sendall(b"w" * 100)
        await asyncio.sleep(0.05)
        transports[1].resume_reading()
        await asyncio.wait_for(protos[1].wait_for(300), 10)
        await asyncio.sleep(0)
        assert seen == ["read now"]
    finally:
        for transport in transports:
            transport.abort()
        for peer in peers:
            peer.close()
        await asyncio.sleep(0)
        watcher.close()


async def test_a_failing_protocol_closes_only_its_own_socket(use_epoll: bool) -> None:
    class Broken(Recorder):
        def data_received(self, data: bytes) -> None:
            raise RuntimeError("boom")

    broken, healthy = Broken(), Recorder(echo=True)
    async with (
        attached(use_epoll, broken) as (peer1, _t1, _w1),
        attached(use_epoll, healthy) as (peer2, _t2, _w2),
    ):
        await peer_send(peer1, b"trigger")
        async with asyncio.timeout(10):
            await broken.lost.wait()
        assert isinstance(broken.lost_with, RuntimeError)
        await peer_send(peer2, b"ping")
        assert await peer_read(peer2, 4) == b"ping"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chunks=st.lists(st.integers(min_value=1, max_value=200_000), min_size=1, max_size=30),
    reads=st.lists(st.integers(min_value=1, max_value=300_000), min_size=1, max_size=10),
)
def test_any_writes_and_reads_arrive_in_order(chunks: list[int], reads: list[int]) -> None:
    """Writes of any sizes, read back in any sizes with pauses between, arrive whole and in order."""
    payload = os.urandom(sum(chunks))

    async def main() -> None:
        proto = Recorder()
        async with attached(True, proto, sndbuf=32 * 1024) as (peer, transport, _):
            pos = 0
            for size in chunks:
                transport.write(payload[pos : pos + size])
                pos += size
            transport.write_eof()
            got = bytearray()
            loop = asyncio.get_running_loop()
            for size in reads:
                await asyncio.sleep(0)
                with contextlib.suppress(TimeoutError):
                    got += await asyncio.wait_for(loop.sock_recv(peer, size), 0.05)
            got += await peer_read(peer)
            assert bytes(got) == payload

    asyncio.run(main())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    writes=st.lists(
        st.lists(st.integers(min_value=0, max_value=70_000), min_size=1, max_size=80), min_size=1, max_size=12
    ),
    views=st.booleans(),
)
def test_scatter_gather_writes_arrive_whole_and_in_order(writes: list[list[int]], views: bool) -> None:
    """``writelines`` (one ``sendmsg`` of the pieces, what the kernel leaves kept as views, more than the vector
    limit in one call too) mixed with ``write``, under a small send buffer: every byte arrives, in order."""
    payload = os.urandom(sum(map(sum, writes)))

    async def main() -> None:
        proto = Recorder()
        async with attached(True, proto, sndbuf=32 * 1024) as (peer, transport, _):
            pos = 0
            for i, sizes in enumerate(writes):
                pieces: list[bytes | memoryview] = []
                for size in sizes:
                    piece = payload[pos : pos + size]
                    pieces.append(memoryview(piece) if views else piece)
                    pos += size
                if i % 3 == 2:
                    transport.write(b"".join(pieces))
                else:
                    transport.writelines(pieces)
            transport.write_eof()
            assert await peer_read(peer) == payload

    asyncio.run(main())


async def test_listener_accepts_many_and_stops_when_closed(use_epoll: bool) -> None:
    made: list[Recorder] = []

    def factory() -> Recorder:
        proto = Recorder(echo=True)
        made.append(proto)
        return proto

    listener = await open_relay_listener("127.0.0.1", 0, factory)
    port = listener.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    clients = []
    try:
        for i in range(100):
            c = socket.socket()
            c.setblocking(False)
            await loop.sock_connect(c, ("127.0.0.1", port))
            clients.append(c)
            await peer_send(c, b"%03d" % i)
        for i, c in enumerate(clients):
            assert await peer_read(c, 3) == b"%03d" % i
        assert len(made) == 100
        for proto in made:  # tuned once, by the listener (attach_socket leaves the options as they are)
            assert proto.transport is not None
            sock = proto.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert sock.gettimeout() == 0.0
    finally:
        listener.close()
        for c in clients:
            c.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


async def test_listener_binds_every_address_of_a_name_on_one_port() -> None:
    listener = await open_relay_listener("localhost", 0, Recorder)
    try:
        ports = {s.getsockname()[1] for s in listener.sockets}
        assert len(ports) == 1
        assert {s.family for s in listener.sockets} <= {socket.AF_INET, socket.AF_INET6}
    finally:
        listener.close()


async def test_listener_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(OSError, match="address"):
            await open_relay_listener("127.0.0.1", taken.getsockname()[1], Recorder)


def test_running_out_of_descriptors_pauses_accepting_and_loses_no_connection() -> None:
    """With the descriptor limit reached, waiting connections stay in the backlog and are served later."""
    script = textwrap.dedent(
        """
        import asyncio, resource, socket, sys
        from vtunnel.io.stream_sockets import open_relay_listener

        class Echo(asyncio.Protocol):
            def connection_made(self, t): self.t = t
            def data_received(self, d): self.t.write(d)

        async def main():
            listener = await open_relay_listener("127.0.0.1", 0, Echo)
            port = listener.sockets[0].getsockname()[1]
            loop = asyncio.get_running_loop()
            clients = [socket.socket() for _ in range(6)]
            # room for about three accepted sockets, no more
            spare = []
            try:
                while True: spare.append(socket.socket())
            except OSError:
                pass
            for s in spare[:3]: s.close()
            del spare[:3]
            for c in clients:
                c.setblocking(False)
                await loop.sock_connect(c, ("127.0.0.1", port))  # the backlog completes the handshake
            for i, c in enumerate(clients[:3]):
                await loop.sock_sendall(c, b"%d" % i)
            await asyncio.sleep(0.5)
            for s in spare: s.close()  # descriptors free again: the rest are accepted on the next try
            for i, c in enumerate(clients):
                if i >= 3:
                    await loop.sock_sendall(c, b"%d" % i)
            for i, c in enumerate(clients):
                got = await asyncio.wait_for(loop.sock_recv(c, 10), 10)
                assert got == b"%d" % i, (i, got)
            print("ok")

        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")
    assert "cannot accept connections for now" in done.stdout + done.stderr


# ------------------------------------------------------------------------------------------------ LeanSocketStream


async def test_stream_receives_in_order_within_max_bytes_and_bounds_its_buffer(use_epoll: bool) -> None:
    stream = LeanSocketStream()
    payload = os.urandom(2 * 1024 * 1024)
    async with attached(use_epoll, stream) as (peer, transport, _):
        sender = asyncio.ensure_future(peer_send(peer, payload))
        await asyncio.sleep(0.2)
        # nobody received yet: the stream stopped reading near its limit, the rest waits in the kernel
        assert not transport.is_reading()
        assert stream._buffered <= LeanSocketStream.READ_LIMIT + 64 * 1024
        got = bytearray()
        while len(got) < len(payload):
            chunk = await asyncio.wait_for(stream.receive(1000), 10)
            assert 0 < len(chunk) <= 1000
            got += chunk
        await sender
        assert bytes(got) == payload
        peer.shutdown(socket.SHUT_WR)
        with pytest.raises(anyio.EndOfStream):
            await asyncio.wait_for(stream.receive(), 10)


async def test_stream_send_waits_for_a_slow_reader_and_send_eof_ends_it(use_epoll: bool) -> None:
    stream = LeanSocketStream()
    block = os.urandom(1 << 20)
    async with attached(use_epoll, stream, sndbuf=64 * 1024) as (peer, _t, _w):
        sending = asyncio.ensure_future(stream.send(block * 3))
        await asyncio.sleep(0.1)
        assert not sending.done()  # over the high-water mark: the send waits for the reader
        reading = asyncio.ensure_future(peer_read(peer))
        await asyncio.wait_for(sending, 10)
        await stream.send_eof()
        assert await asyncio.wait_for(reading, 20) == block * 3
        assert stream.extra(SocketAttribute.remote_address) == peer.getsockname()
        assert stream.extra(SocketAttribute.raw_socket).fileno() >= 0


async def test_stream_reset_breaks_receive_and_aclose_ends_use(use_epoll: bool) -> None:
    stream = LeanSocketStream()
    async with attached(use_epoll, stream) as (peer, _t, _w):
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        with pytest.raises(anyio.BrokenResourceError):
            await asyncio.wait_for(stream.receive(), 10)
        await stream.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await stream.receive()
        with pytest.raises(anyio.ClosedResourceError):
            await stream.send(b"x")


async def test_hand_off_replays_unread_bytes_and_eof_and_leaves_the_socket_open(use_epoll: bool) -> None:
    stream = LeanSocketStream()
    async with attached(use_epoll, stream) as (peer, transport, _):
        await peer_send(peer, b"header|early bytes")
        assert await asyncio.wait_for(stream.receive(7), 10) == b"header|"  # as a front reads a header
        peer.shutdown(socket.SHUT_WR)
        for _ in range(200):
            if stream._eof:
                break
            await asyncio.sleep(0.01)
        echo = Recorder()
        stream.hand_off(
            echo
        )  # the new protocol is told what the stream read but did not return, then the EOF
        assert (bytes(echo.data), echo.eof.is_set()) == (b"early bytes", True)
        assert echo.transport is transport
        await stream.aclose()  # the front's cleanup: leaves the socket to its new protocol
        assert not transport.is_closing()
        with pytest.raises(anyio.ClosedResourceError):
            await stream.receive()
        transport.write(b"answer")
        transport.write_eof()
        assert await peer_read(peer) == b"answer"


async def test_a_socket_closed_behind_its_transport_fails_it_cleanly(use_epoll: bool) -> None:
    """The kernel drops a closed descriptor's registration by itself: the watcher's next change for it must not
    raise into the loop (modify: ENOENT, register: EBADF), and the transport's next write ends it with the error."""
    proto = Recorder()
    async with attached(use_epoll, proto) as (_peer, transport, _watcher):
        sock = transport.get_extra_info("socket")
        sock.close()  # behind the transport's back
        transport.pause_reading()
        transport.resume_reading()
        transport.write(b"x")
        async with asyncio.timeout(10):
            await proto.lost.wait()
        assert isinstance(proto.lost_with, OSError)


async def test_a_registration_nobody_can_name_is_dropped_with_a_new_set() -> None:
    """A watched socket closed behind its transport while a duplicate descriptor keeps it open stays in the epoll
    set under a number that is closed: it cannot be unregistered, and level-triggered it would wake the loop on
    every pass. The watcher replaces the set; the loop goes quiet and the other sockets keep working."""
    loop = asyncio.get_running_loop()
    watcher = SocketWatcher(loop, use_epoll=True)
    pairs = [socket.socketpair() for _ in range(2)]
    for a, _b in pairs:
        a.setblocking(False)
    live = Recorder(echo=True)
    attach_socket(pairs[0][0], live, watcher)
    doomed = Recorder()
    doomed_transport = attach_socket(pairs[1][0], doomed, watcher)
    duplicate = os.dup(pairs[1][0].fileno())
    try:
        doomed_transport.get_extra_info(
            "socket"
        ).close()  # the duplicate keeps the socket, and its epoll entry
        pairs[1][1].send(b"wake up")
        async with asyncio.timeout(10):
            while watcher.rebuilds == 0:
                await asyncio.sleep(0.01)
        assert watcher._epoll is not None
        await asyncio.sleep(0.05)
        assert watcher._epoll.poll(0) == []  # nothing left that is reported for ever
        pairs[0][1].send(b"still served")
        async with asyncio.timeout(10):
            await live.wait_for(len(b"still served"))
        assert bytes(live.data) == b"still served"
    finally:
        os.close(duplicate)
        for a, b in pairs:
            a.close()
            b.close()
        await asyncio.sleep(0)
        watcher.close()


async def test_an_anyio_tcp_listener_gives_its_sockets_to_the_lean_listener() -> None:
    """A plugin may listen with anyio's TCP listener: its sockets (every address of a multi-listener) are then
    accepted from by the relay listener's loop, and the anyio object is left with nothing to close."""
    from vtunnel.io.stream_sockets import LeanStreamListener, adopt_socket_listener

    plain = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = plain.extra(SocketAttribute.local_port)
    lean = adopt_socket_listener(plain)
    assert isinstance(lean, LeanStreamListener)
    assert adopt_socket_listener(lean) is lean
    assert lean.extra(SocketAttribute.local_port) == port
    await plain.aclose()  # harmless: the socket is the lean listener's now
    got: list[bytes] = []

    async def handler(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            assert isinstance(stream, LeanSocketStream)
            got.append(await stream.receive())
            await stream.send(b"pong")

    async with anyio.create_task_group() as tg:
        tg.start_soon(lean.serve, handler, tg)
        for _ in range(3):
            with anyio.fail_after(10):
                async with await anyio.connect_tcp("127.0.0.1", port) as client:
                    await client.send(b"ping")
                    assert await client.receive() == b"pong"
        await lean.aclose()
        tg.cancel_scope.cancel()
    assert got == [b"ping"] * 3


async def test_a_listener_that_is_not_on_sockets_is_not_adopted() -> None:
    from vtunnel.io.stream_sockets import adopt_socket_listener

    class Own(
        anyio.abc.Listener[anyio.abc.ByteStream]
    ):  # a transport that makes its own connections (QUIC's)
        async def serve(self, handler: object, task_group: object = None) -> None:
            await anyio.sleep_forever()

        async def aclose(self) -> None:
            pass

    assert adopt_socket_listener(Own()) is None
