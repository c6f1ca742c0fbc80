"""SpliceRelay between real TCP connections on loopback, on both loops: both directions at once and byte-exact,
what an earlier relay had not sent goes first, half-closes pass through in either order, a reset ends both, and
the relay reports what it moved once both sockets are closed."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from vtunnel.io.splice import SPLICE_AVAILABLE, SpliceRelay

pytestmark = [pytest.mark.anyio, pytest.mark.skipif(not SPLICE_AVAILABLE, reason="no os.splice")]


def data(size: int, salt: bytes) -> bytes:
    seed = hashlib.sha256(salt).digest()
    return (seed * (size // len(seed) + 1))[:size]


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        client = socket.create_connection(lsock.getsockname())
        server, _ = lsock.accept()
    for s in (client, server):
        s.setblocking(False)
    return client, server


async def send_all(sock: socket.socket, payload: bytes, *, eof: bool = True) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, payload)
    if eof:
        sock.shutdown(socket.SHUT_WR)


async def read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 20):
        got += chunk
    return bytes(got)


@asynccontextmanager
async def spliced(
    **kwargs: object,
) -> AsyncIterator[tuple[socket.socket, socket.socket, SpliceRelay, asyncio.Future[tuple[int, int]]]]:
    """x <-> a ==splice== b <-> y: yields the outer ends x and y, the relay and what it reports when done."""
    x, a = tcp_pair()
    b, y = tcp_pair()
    done: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
    relay = SpliceRelay(a, b, on_done=done.set_result, **kwargs)  # type: ignore[arg-type]
    try:
        yield x, y, relay, done
    finally:
        relay.close()
        x.close()
        y.close()


async def test_both_directions_at_once_are_byte_exact_and_the_relay_reports_when_both_ended() -> None:
    up, down = data(8 << 20, b"up"), data(24 << 20, b"down")
    async with spliced() as (x, y, relay, done):
        got: dict[str, bytes] = {}

        async def side(name: str, sock: socket.socket, payload: bytes) -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(send_all, sock, payload)
                got[name] = await read_all(sock)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(side, "x", x, up)
                tg.start_soon(side, "y", y, down)
            assert got == {"x": down, "y": up}
            assert await done == (len(up), len(down))
        assert relay.finished


async def test_what_was_not_sent_goes_first_then_the_spliced_bytes() -> None:
    async with spliced(to_a=b"held for x|", to_b=b"held for y|") as (x, y, _, done):
        with anyio.fail_after(20):
            await send_all(x, b"from x")
            await send_all(y, b"from y")
            assert await read_all(y) == b"held for y|from x"
            assert await read_all(x) == b"held for x|from y"
            assert await done == (len(b"held for y|from x"), len(b"held for x|from y"))


async def test_the_bytes_written_to_and_read_from_b_are_counted_as_they_move() -> None:
    """``count_b`` sees what goes to ``b`` (its prefix included) and what comes from it, not ``a``'s prefix (bytes
    an earlier relay had, counted where they came from)."""
    written: list[int] = []
    read: list[int] = []

    def count(to_b: int, from_b: int) -> None:
        written.append(to_b)
        read.append(from_b)

    up, down = data(3 << 20, b"up"), data(5 << 20, b"down")
    async with spliced(to_a=b"old|", to_b=b"new|", count_b=count) as (x, y, _, done):
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(send_all, x, up)
                tg.start_soon(send_all, y, down)
                got_y = await read_all(y)
                got_x = await read_all(x)
            assert await done == (len(got_y), len(got_x))
    assert got_y == b"new|" + up
    assert got_x == b"old|" + down
    assert sum(written) == len(b"new|") + len(up)
    assert sum(read) == len(down)
    assert len(written) > 1  # (told as the bytes moved, not once at the end)


async def test_a_half_close_passes_through_and_the_other_way_goes_on() -> None:
    async with spliced() as (x, y, _, done):
        loop = asyncio.get_running_loop()
        with anyio.fail_after(20):
            await send_all(x, b"request")
            assert await read_all(y) == b"request"  # x's FIN reached y
            await loop.sock_sendall(y, b"answer after the request ended")
            assert await loop.sock_recv(x, 100) == b"answer after the request ended"
            y.shutdown(socket.SHUT_WR)
            assert await read_all(x) == b""
            await done


async def test_an_input_that_had_ended_before_is_passed_on_after_the_prefix() -> None:
    x, a = tcp_pair()
    b, y = tcp_pair()
    done: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
    x.shutdown(socket.SHUT_WR)
    with anyio.fail_after(20):
        while await asyncio.get_running_loop().sock_recv(a, 10):  # (a saw x's FIN, as a relay would have)
            pass
        SpliceRelay(a, b, to_b=b"last words", a_ended=True, on_done=done.set_result)
        assert await read_all(y) == b"last words"
        await send_all(y, b"still answered")
        assert await read_all(x) == b"still answered"
        await done
    x.close()
    y.close()


async def test_a_reset_ends_both_sides() -> None:
    async with spliced() as (x, y, _, done):
        loop = asyncio.get_running_loop()
        with anyio.fail_after(20):
            await loop.sock_sendall(x, b"ping")
            assert await loop.sock_recv(y, 10) == b"ping"
            y.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            y.close()
            await loop.sock_sendall(x, b"into a reset connection")
            await done  # the relay saw the reset and closed both
            with pytest.raises(ConnectionResetError):
                await read_all(x)


async def test_an_output_to_shut_gets_its_prefix_then_its_fin() -> None:
    """(as a relay that had been asked to half-close a socket whose buffer had not drained yet)"""
    async with spliced(to_a=b"the rest of the answer", a_shut=True) as (x, y, _, done):
        with anyio.fail_after(20):
            assert await read_all(x) == b"the rest of the answer"
            await send_all(x, b"the client still talks")
            assert await read_all(y) == b"the client still talks"
            y.shutdown(socket.SHUT_WR)
            await done
