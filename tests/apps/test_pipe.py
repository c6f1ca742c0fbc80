"""pipe(): byte-exact copy both ways over real TCP, half-close, broken sides, idle timeout."""

from __future__ import annotations

import functools
import os

import anyio
import pytest
from anyio.abc import SocketStream

from vtunnel.apps.pipe import pipe

from .conftest import tcp_pair

pytestmark = pytest.mark.anyio


async def _receive_all(stream: SocketStream) -> bytes:
    chunks = []
    while True:
        try:
            chunks.append(await stream.receive())
        except anyio.EndOfStream:
            return b"".join(chunks)


async def test_copies_both_ways_with_half_close() -> None:
    up = os.urandom(300_000)
    down = os.urandom(200_000)
    async with tcp_pair() as (client, front), tcp_pair() as (back, origin):
        result: dict[str, object] = {}

        async def run_pipe() -> None:
            result["counts"] = await pipe(front, back)

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
            await pipe(front, back)
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
            counts = await pipe(front, back)
            assert counts == (0, 0)
            await client.send(b"data")
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await client.receive()
        del origin


async def test_idle_timeout_closes_both() -> None:
    async with tcp_pair() as (client, front), tcp_pair() as (back, origin):
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(functools.partial(pipe, front, back, idle_timeout=0.2))
                await client.send(b"a")
                assert await origin.receive() == b"a"
                with pytest.raises(anyio.EndOfStream):
                    await client.receive()
                with pytest.raises(anyio.EndOfStream):
                    await origin.receive()


async def test_invalid_idle_timeout() -> None:
    async with tcp_pair() as (_, front), tcp_pair() as (back, _):
        with pytest.raises(ValueError, match="idle_timeout"):
            await pipe(front, back, idle_timeout=0)
