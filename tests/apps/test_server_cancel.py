"""A server whose serve() is cancelled instead of shut down still closes its listening sockets."""

from __future__ import annotations

import socket

import anyio
import pytest

from vtunnel.apps.policy import ExitPolicy
from vtunnel.apps.server import Server, ServerSettings
from vtunnel.transports.base import Endpoint, SecurityConfig

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("scheme", ["tcp", "kcp", "rudp"])
async def test_a_cancelled_server_closes_its_listeners(scheme: str) -> None:
    server = Server(
        ServerSettings(
            listen=[Endpoint.parse(f"{scheme}://127.0.0.1:0")],
            security=SecurityConfig(),
            policy=ExitPolicy(allow_private=True),
            target="127.0.0.1:9",
        )
    )
    async with anyio.create_task_group() as tg:
        addresses = await tg.start(server.serve)
        tg.cancel_scope.cancel()
    port = int(addresses[0].rsplit(":", 1)[1])
    kind = socket.SOCK_STREAM if scheme == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as again:  # the port is free: nothing holds it any more
        again.bind(("127.0.0.1", port))
