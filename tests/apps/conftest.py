"""Fixtures shared by the application tests: loopback servers started inside the test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketListener, SocketStream


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[SocketStream, SocketStream]]:
    """Two ends of one real TCP connection on 127.0.0.1."""
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(SocketAttribute.local_port)
        client = await anyio.connect_tcp("127.0.0.1", port)
        server = await cast(SocketListener, listener.listeners[0]).accept()
        async with client, server:
            yield client, server
