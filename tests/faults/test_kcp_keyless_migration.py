"""Keyless kcp://: a copy of a client's datagram sent from another address does not move its session.

A real KCP client (the transport's own engine, driven here) talks to a real keyless listener over UDP on
127.0.0.1 from socket A. A copy of one of its datagrams, replayed from socket B, must be dropped and leave the
session on A; the client's next (newer) datagram sent from B moves it, as NAT rebinding needs. Property tests of
``NewestMarks``, the rule behind it: a copy of a datagram taken is never newer; a later time stamp or una is.
"""

from __future__ import annotations

import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.abc import UDPSocket
from hypothesis import given
from hypothesis import strategies as st

from tests.kcputil import kcp_server
from tests.linkutil import stream_of
from tests.streams import read_exactly
from vtunnel.arq.kcp_engine import KCPEngine
from vtunnel.arq.kcp_wire import NewestMarks
from vtunnel.transports.base import Endpoint
from vtunnel.transports.kcp.codec import RoutedLink
from vtunnel.transports.kcp.listener import KCPListener
from vtunnel.transports.kcp.options import parse_options
from vtunnel.transports.kcp.plain import PlainListenerCodec
from vtunnel.transports.link import LinkStream

CONV = 0x5EED
HALF = 1 << 31


class Client:
    """A KCP engine whose datagrams go out of whichever UDP socket the test names."""

    def __init__(self, server: tuple[str, int]) -> None:
        options = parse_options(Endpoint.parse("kcp://127.0.0.1:1").params)
        self.engine = KCPEngine(conv=CONV, options=options, mtu=options.mtu, now=time.monotonic())
        self.server = server
        self.sent: list[bytes] = []

    async def send(self, data: bytes, sock: UDPSocket) -> None:
        self.engine.send(data)
        self.engine.flush(time.monotonic())
        for datagram in self.engine.datagrams_to_send():
            self.sent.append(datagram)
            await sock.sendto(datagram, *self.server)

    async def retransmit_until(self, done: anyio.Event, sock: UDPSocket) -> None:
        """Run the client's timer (retransmissions) until ``done``, sending from ``sock``."""
        while not done.is_set():
            await anyio.sleep(0.005)
            self.engine.handle_timer(time.monotonic())
            for datagram in self.engine.datagrams_to_send():
                self.sent.append(datagram)
                await sock.sendto(datagram, *self.server)

    async def receive(self, n: int, sock: UDPSocket) -> bytes:
        out = bytearray()
        while len(out) < n:
            datagram, _ = await sock.receive()
            self.engine.receive_datagram(datagram, time.monotonic())
            out += self.engine.receive(n - len(out))
        self.engine.flush(time.monotonic())  # the ACKs
        for datagram in self.engine.datagrams_to_send():
            self.sent.append(datagram)
            await sock.sendto(datagram, *self.server)
        return bytes(out)


def segment(cmd: int, ts: int, una: int, data: bytes = b"") -> bytes:
    return struct.pack("<IBBHIIII", CONV, cmd, 0, 128, ts, 7, una, len(data)) + data


#: datagrams as (command, ts, una) whose marks lie within less than half the serial space from a random start
#: (any order, wrapping past 2**32): what a session sees in its first 24 days
marks = st.integers(0, 2**32 - 1).flatmap(
    lambda start: st.lists(
        st.tuples(
            st.sampled_from([81, 82, 83, 84]),
            st.integers(0, HALF - 1).map(lambda d: (start + d) % 2**32),
            st.integers(0, HALF - 1).map(lambda d: (start + d) % 2**32),
        ),
        min_size=1,
        max_size=40,
    )
)


@given(seen=marks, pick=st.integers(0, 39))
def test_a_copy_of_a_datagram_taken_is_never_newer(seen: list[tuple[int, int, int]], pick: int) -> None:
    newest = NewestMarks()
    datagrams = [segment(cmd, ts, una, b"x" if cmd == 81 else b"") for cmd, ts, una in seen]
    for datagram in datagrams:
        newest.note(datagram)
    copy = datagrams[pick % len(datagrams)]
    assert not newest.note(copy)
    assert not newest.note(b"pad" + copy, 3)  # the same datagram inside a run


@given(seen=marks, step=st.integers(1, HALF - 1), cmd=st.sampled_from([81, 82]))
def test_a_later_time_stamp_or_una_is_newer(seen: list[tuple[int, int, int]], step: int, cmd: int) -> None:
    newest = NewestMarks()
    for c, ts, una in seen:
        newest.note(segment(c, ts, una))
    highest_una = newest.una
    assert highest_una is not None  # (seen is never empty)
    stamp = newest.push_ts if cmd == 81 else newest.ack_ts
    if stamp is not None:
        assert newest.note(segment(cmd, (stamp + step) % 2**32, highest_una))
    assert newest.note(segment(83, 0, (highest_una + step) % 2**32))


@asynccontextmanager
async def greeted() -> AsyncIterator[
    tuple[KCPListener[PlainListenerCodec], Client, UDPSocket, UDPSocket, LinkStream[RoutedLink]]
]:
    """A keyless listener, the client's sockets A and B, and a session the client opened from A with b"hello"
    (read by the server side): ``(listener, client, a, b, server side)``."""
    async with (
        kcp_server() as (listener, _url),
        await anyio.create_udp_socket(local_host="127.0.0.1") as a,
        await anyio.create_udp_socket(local_host="127.0.0.1") as b,
    ):
        client = Client(listener.local_address)
        with anyio.fail_after(10):
            await client.send(b"hello", a)
            server = stream_of(await listener.accept())
            assert await read_exactly(server, 5) == b"hello"
        yield listener, client, a, b, server
        await server.aclose()


@pytest.mark.anyio
async def test_a_replayed_datagram_from_another_address_does_not_move_the_session() -> None:
    async with greeted() as (listener, client, a, b, server):
        a_address = a.extra(anyio.abc.SocketAttribute.local_address)
        b_address = b.extra(anyio.abc.SocketAttribute.local_address)
        with anyio.fail_after(10):
            await server.send(b"hi")
            assert await client.receive(2, a) == b"hi"
            await client.send(b"again", a)
            assert await read_exactly(server, 5) == b"again"
            session = listener.sessions[CONV]
            assert session.remote_address == a_address

            dropped = listener.dropped
            copies = list(client.sent)  # every datagram the client sent so far, copied, sent from elsewhere
            for datagram in copies:
                await b.sendto(datagram, *listener.local_address)
            # a datagram from A after the copies: once it is through, the copies were handled
            await client.send(b"still", a)
            assert await read_exactly(server, 5) == b"still"
            assert session.remote_address == a_address
            assert listener.dropped == dropped + len(copies)
            await server.send(b"to a")
            assert await client.receive(4, a) == b"to a"

            # the client itself moves (NAT rebinding): its next datagram that is newer than any before (a new
            # time stamp: at once, or with a retransmission when the clock has not moved on) moves the session
            arrived = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.retransmit_until, arrived, b)
                await client.send(b"moved", b)
                assert await read_exactly(server, 5) == b"moved"
                arrived.set()
            assert session.remote_address == b_address
            await server.send(b"to b")
            assert await client.receive(4, b) == b"to b"


@pytest.mark.anyio
async def test_a_copy_of_a_new_sessions_first_datagram_does_not_move_it() -> None:
    """The marks of the datagram that started a session count: its copy, the only other thing to arrive, is not
    newer."""
    async with greeted() as (listener, client, a, b, _server):
        session = listener.sessions[CONV]
        dropped = listener.dropped
        await b.sendto(client.sent[0], *listener.local_address)
        with anyio.fail_after(10):
            while listener.dropped == dropped:
                await anyio.sleep(0.005)
        assert session.remote_address == a.extra(anyio.abc.SocketAttribute.local_address)
