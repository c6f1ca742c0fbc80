"""The one transport contract, checked the same way for every transport: tcp, tls, kcp (plain and sealed) and the
ws:// plugin, over real sockets on loopback. Each link is driven through its :class:`Link` methods only."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import Listener, SocketAttribute

from tests.streams import wait_until
from vtunnel.transports.base import Endpoint, SecurityConfig, get_transport
from vtunnel.transports.link import Link, LinkStream

pytestmark = pytest.mark.anyio

KEY = SecurityConfig(psk=os.urandom(32))
PLAIN = SecurityConfig()


@dataclass(frozen=True)
class Case:
    scheme: str
    security: SecurityConfig
    #: (server query, client query) given the directory for certificates
    queries: Callable[[Path], tuple[str, str]] = lambda _d: ("", "")
    half_close: bool = True  # KCP cannot half-close: its send_eof closes the link


def _tls_queries(directory: Path) -> tuple[str, str]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(directory / "s.pem"))
    return (
        f"?cert={directory / 's.pem'}&key={directory / 's.pem'}",
        f"?ca={directory / 'ca.pem'}&servername=localhost",
    )


CASES = {
    "tcp": Case("tcp", PLAIN),
    "tcp+psk": Case("tcp", KEY),
    "tls+psk": Case("tls", KEY, _tls_queries),
    "kcp": Case("kcp", PLAIN, half_close=False),
    "kcp+psk": Case("kcp", KEY, half_close=False),
    "ws+psk": Case("ws", KEY, lambda _d: ("?path=/t", "?path=/t"), half_close=False),
}


class Recorder:
    """A link consumer that records what its link calls."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writable = 0
        self.ended: list[BaseException | None] = []

    def link_data(self, data: bytes) -> None:
        self.data += data

    def link_writable(self) -> None:
        self.writable += 1

    def link_ended(self, error: BaseException | None) -> None:
        self.ended.append(error)


@asynccontextmanager
async def link_pair(case: Case, directory: Path) -> AsyncIterator[tuple[Link, Link]]:
    """A connected (client, server) pair of links of ``case``'s transport; neither is running yet."""
    if case.scheme == "ws":
        pytest.importorskip("vtunnel_websocket")
    server_query, client_query = case.queries(directory)
    transport = get_transport(case.scheme)
    listener: Listener[Link] = await transport.listen(
        Endpoint.parse(f"{case.scheme}://127.0.0.1:0{server_query}"), security=case.security
    )
    port = listener.extra(SocketAttribute.local_address)[1]
    accepted: list[Link] = []
    hold = anyio.Event()

    async def on_accept(link: Link) -> None:
        accepted.append(link)
        await hold.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, on_accept)
        with anyio.fail_after(10):
            client = await transport.connect(
                Endpoint.parse(f"{case.scheme}://127.0.0.1:{port}{client_query}"), security=case.security
            )
            if case.scheme == "kcp":  # a KCP session exists on the server from the client's first datagram
                client.send_nowait(b"\0")
            await wait_until(lambda: bool(accepted))
        server = accepted[0]
        try:
            yield client, server
        finally:
            hold.set()
            await client.aclose()
            await server.aclose()
            tg.cancel_scope.cancel()
    await listener.aclose()


async def read_n(stream: LinkStream[Link], n: int) -> bytes:
    """Exactly ``n`` bytes (never more: what follows stays in the stream)."""
    buf = bytearray()
    while len(buf) < n:
        buf += await stream.receive(n - len(buf))
    return bytes(buf)


async def skip_opening_byte(case: Case, stream: LinkStream[Link]) -> None:
    if case.scheme == "kcp":
        assert await read_n(stream, 1) == b"\0"


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


async def test_bytes_arrive_exact_and_in_order_both_ways(case: Case, tmp_path: Path) -> None:
    size = 8 * 1024 * 1024
    up, down = os.urandom(size), os.urandom(size // 2)
    async with (
        link_pair(case, tmp_path) as (client_link, server_link),
        LinkStream(client_link) as client,
        LinkStream(server_link) as server,
    ):
        await skip_opening_byte(case, server)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.send, up)
                tg.start_soon(server.send, down)
                got_up = await read_n(server, size)
                got_down = await read_n(client, size // 2)
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
    assert got_down == down


@asynccontextmanager
async def running(
    case: Case, client_link: Link, server_link: Link
) -> AsyncIterator[tuple[Recorder, Recorder]]:
    """Both links running for recorders, the opening byte through (and taken off the server's record)."""
    client, server = Recorder(), Recorder()
    async with anyio.create_task_group() as tg:
        tg.start_soon(client_link.run, client)
        tg.start_soon(server_link.run, server)
        if case.scheme != "kcp":  # a kcp pair sent it already
            client_link.send_nowait(b"\0")
        await wait_until(lambda: bytes(server.data) == b"\0")
        server.data.clear()
        yield client, server
        tg.cancel_scope.cancel()


async def test_a_write_is_taken_whole_or_refused_with_would_block_then_the_link_calls_back(
    case: Case, tmp_path: Path
) -> None:
    """A peer that does not read: writes are refused with WouldBlock (nothing taken) after a bounded amount,
    and once the peer reads, the consumer hears ``link_writable`` and the refused write goes through."""
    chunk = os.urandom(64 * 1024)
    async with (
        link_pair(case, tmp_path) as (client_link, server_link),
        running(case, client_link, server_link) as (client, server),
    ):
        server_link.pause_reading()
        taken = 0
        with anyio.fail_after(30):
            while True:
                try:
                    client_link.send_nowait(chunk)
                except anyio.WouldBlock:
                    break
                taken += len(chunk)
                await anyio.lowlevel.checkpoint()  # let the link's own work run (its writer, its timers)
                assert taken < 256 * 1024 * 1024, "the link never pushed back"
        assert client.writable == 0
        server_link.resume_reading()
        await wait_until(lambda: len(server.data) == taken, 60)
        await wait_until(lambda: client.writable > 0, 30)
        client_link.send_nowait(b"after")
        await wait_until(lambda: len(server.data) == taken + 5, 30)
        assert server.data.endswith(b"after")


async def test_a_paused_link_delivers_nothing_until_resumed(case: Case, tmp_path: Path) -> None:
    async with (
        link_pair(case, tmp_path) as (client_link, server_link),
        running(case, client_link, server_link) as (_client, server),
    ):
        server_link.pause_reading()
        client_link.send_nowait(b"abc")
        await anyio.sleep(0.3)
        assert server.data == b""
        server_link.resume_reading()
        await wait_until(lambda: bytes(server.data) == b"abc")


async def test_end_of_stream_and_close(case: Case, tmp_path: Path) -> None:
    """send_eof after queued bytes: the peer gets them, then ``link_ended(None)`` (byte streams); a closed link
    raises ClosedResourceError from ``send_nowait``."""
    async with (
        link_pair(case, tmp_path) as (client_link, server_link),
        running(case, client_link, server_link) as (client, server),
    ):
        client_link.send_nowait(b"last words")
        await client_link.send_eof()
        if case.half_close:
            await wait_until(lambda: server.ended == [None])
            assert bytes(server.data) == b"last words"
            server_link.send_nowait(b"still heard")  # the other direction stays open
            await wait_until(lambda: bytes(client.data) == b"still heard")
        await client_link.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            client_link.send_nowait(b"late")
