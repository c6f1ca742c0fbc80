"""A tunnel pool over several servers: tiers, spreading, a GOAWAY that frees a slot, the way back from the fallback.

Real servers (`vtunnel.apps.server.Server`) in-process on loopback, over tcp:// and kcp:// with a key; the pool is
the agent's (`vtunnel.runtime.session.TunnelPool`). Waits are bounded; nothing here times how fast.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream, TaskGroup

from tests.conftest import free_port
from vtunnel.apps.policy import ExitPolicy
from vtunnel.apps.server import Server, ServerSettings
from vtunnel.protocol import StreamMetadata
from vtunnel.runtime.byte_stream import TunnelByteStream
from vtunnel.runtime.session import TunnelPool
from vtunnel.transports.base import Endpoint, SecurityConfig

pytestmark = pytest.mark.anyio

SECURITY = SecurityConfig(psk=os.urandom(32))


@asynccontextmanager
async def server_at(url: str, *, drain_timeout: float = 2.0) -> AsyncIterator[tuple[Server, Endpoint]]:
    server = Server(
        ServerSettings(
            listen=[Endpoint.parse(url)],
            security=SECURITY,
            policy=ExitPolicy(allow_private=True),
            drain_timeout=drain_timeout,
        )
    )
    async with anyio.create_task_group() as tg:
        addresses = await tg.start(server.serve)
        yield server, Endpoint.parse(addresses[0])
        server.shutdown()


@asynccontextmanager
async def pool_of(servers: list[Endpoint], **kwargs: object) -> AsyncIterator[TunnelPool]:
    pool = TunnelPool(servers, security=SECURITY, **kwargs)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await pool.run(tg)
        yield pool
        pool.shutdown("test done")
        tg.cancel_scope.cancel()


async def until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.05)


def held(pool: TunnelPool) -> list[int]:
    """Tunnels the pool holds to each server, in the order given."""
    return [pool.tunnels_to(s) for s in pool.servers]


async def test_tunnels_spread_over_the_servers_of_a_tier() -> None:
    async with server_at("tcp://127.0.0.1:0") as (_, a), server_at("tcp://127.0.0.1:0") as (_, b):
        async with pool_of([a, b], size=4) as pool:
            await until(lambda: len(pool.connections) == 4, "four tunnels")
            assert held(pool) == [2, 2]
        async with pool_of([a, b], size=1) as pool:
            await until(lambda: len(pool.connections) == 1, "one tunnel")
            assert held(pool) == [1, 0]  # one tunnel: the first server given


async def test_udp_servers_come_first_whatever_the_list_order() -> None:
    async with (
        server_at("tcp://127.0.0.1:0") as (_, tcp),
        server_at("kcp://127.0.0.1:0") as (_, kcp),
        pool_of([tcp, kcp], size=2) as pool,
    ):
        await until(lambda: len(pool.connections) == 2, "two tunnels")
        assert held(pool) == [0, 2]
        assert [s.tier for s in pool.servers] == [1, 0]


async def test_a_fallback_slot_moves_back_once_the_udp_server_answers() -> None:
    kcp_port = free_port(socket.SOCK_DGRAM)
    kcp = Endpoint.parse(f"kcp://127.0.0.1:{kcp_port}?connect_timeout=0.5")
    async with (
        server_at("tcp://127.0.0.1:0") as (_, tcp),
        pool_of([kcp, tcp], size=1, probe_interval=0.3, backoff_cap=0.5) as pool,
    ):
        # nothing answers on the kcp:// port: the slot takes the tcp:// server
        await until(lambda: held(pool) == [0, 1], "a tunnel on the fallback")
        fallback = pool.connections[0]
        assert pool.servers[0].failures_total >= 1
        assert pool.servers[0].answered is False
        async with server_at(f"kcp://127.0.0.1:{kcp_port}"):
            await until(lambda: held(pool) == [1, 0], "the tunnel back on kcp://")
            assert pool.connections[0] is not fallback
            # the fallback tunnel was retired with a GOAWAY (no streams: it closes)
            await until(lambda: fallback.closed, "the fallback tunnel closed")
            assert fallback.close_reason != ""


async def _hold_connections(task_group: TaskGroup) -> int:
    """A destination that accepts and keeps its connections open until the task group is cancelled."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")

    async def keep(stream: SocketStream) -> None:
        async with stream:
            await anyio.sleep_forever()

    async def serve() -> None:
        async with listener:
            await listener.serve(keep)

    task_group.start_soon(serve)
    return listener.extra(SocketAttribute.local_port)


async def test_a_goaway_frees_the_slot_while_the_old_tunnel_drains() -> None:
    async with anyio.create_task_group() as dest_tg:
        port = await _hold_connections(dest_tg)
        async with (
            server_at("tcp://127.0.0.1:0", drain_timeout=30.0) as (first, a),
            server_at("tcp://127.0.0.1:0") as (_, b),
            pool_of([a, b], size=1) as pool,
        ):
            await until(lambda: held(pool) == [1, 0], "a tunnel to the first server")
            old = pool.connections[0]
            stream = TunnelByteStream(
                await pool.open_stream(StreamMetadata(authority=f"127.0.0.1:{port}", kind="tcp"))
            )
            first.shutdown()  # GOAWAY: the open stream may finish, no new ones
            await until(lambda: held(pool) == [0, 1], "a new tunnel to the second server")
            assert not old.closed  # still draining: the slot did not wait for it
            assert pool.servers[0].failures_total == 0  # a GOAWAY is no failure
            await stream.send(b"still there")  # the old stream goes on
            await stream.aclose()
            await until(lambda: old.closed, "the drained tunnel closed")
        dest_tg.cancel_scope.cancel()
