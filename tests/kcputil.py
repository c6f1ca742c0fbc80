"""kcp:// sessions on loopback for the transport tests: a listener and a client, both without a key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from tests.linkutil import stream_of
from vtunnel.transports.base import Endpoint, SecurityConfig
from vtunnel.transports.kcp.link import KCPLink
from vtunnel.transports.kcp.listener import KCPListener
from vtunnel.transports.kcp.plain import PlainListenerCodec
from vtunnel.transports.kcp.transport import KCPTransport
from vtunnel.transports.link import LinkStream

PLAIN = SecurityConfig()


@asynccontextmanager
async def kcp_server(query: str = "") -> AsyncIterator[tuple[KCPListener[PlainListenerCodec], str]]:
    """A plain kcp:// listener on 127.0.0.1 with URL options ``query``; yields it and its URL (without them)."""
    listener = await KCPTransport().listen(Endpoint.parse(f"kcp://127.0.0.1:0{query}"), security=PLAIN)
    assert isinstance(listener, KCPListener)
    try:
        yield listener, f"kcp://127.0.0.1:{listener.local_address[1]}"
    finally:
        await listener.aclose()


async def connect(url: str) -> LinkStream[KCPLink]:
    """A plain kcp:// client session to ``url``, as a byte stream (its link is ``.link``)."""
    link = await KCPTransport().connect(Endpoint.parse(url), security=PLAIN)
    assert isinstance(link, KCPLink)
    return stream_of(link)
