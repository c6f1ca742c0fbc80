"""quic:// beyond the kit: its options, certificates, a client that moves, the cap on handshaking connections, a
client let in through a Retry (retry=1), and the kit without a key (the kit with one runs in tests/transports/test_link_contract.py)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.to_thread
import pytest
from aioquic.quic.connection import QuicConnection
from anyio.abc import SocketAttribute
from vtunnel_quic.options import client_configuration
from vtunnel_quic.transport import QuicListener, QuicTransport

from vtunnel.testing.conformance import TransportConformance
from vtunnel.transports.base import Endpoint, SecurityConfig, TransportError, get_transport
from vtunnel.transports.link import Link, LinkStream

pytestmark = pytest.mark.anyio


class TestQuicWithoutKey(TransportConformance):
    scheme = "quic"
    datagram = True
    security = SecurityConfig()
    other_security: ClassVar[SecurityConfig | None] = None


@pytest.mark.parametrize(
    ("query", "complaint"),
    [
        ("path=/x", "unknown quic:// option"),
        ("mtu=9000", "mtu="),
        ("idle=0", "idle="),
        ("cc=bbr", "cc="),
        ("key=/k", "key= needs cert="),
        ("retry=yes", "retry="),
    ],
)
def test_bad_options_are_named(query: str, complaint: str) -> None:
    with pytest.raises(TransportError, match=complaint):
        QuicTransport().check(Endpoint.parse(f"quic://127.0.0.1:1?{query}"))


async def _exchange(listener: QuicListener, url: str) -> bytes:
    client = await QuicTransport().connect_stream(Endpoint.parse(url))
    try:
        await client.send(b"ping")
        with anyio.fail_after(10):
            server = await listener.accept()
            data = await server.receive()
        await server.aclose()
        return data
    finally:
        await client.aclose()


async def test_certificates_from_options_are_verified_with_ca(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca, other = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    other.cert_pem.write_to_path(str(tmp_path / "other.pem"))
    listener = await QuicTransport().listen_streams(
        Endpoint.parse(f"quic://127.0.0.1:0?cert={tmp_path / 'cert.pem'}&key={tmp_path / 'key.pem'}")
    )
    assert isinstance(listener, QuicListener)
    port = listener.extra(SocketAttribute.local_address)[1]
    try:
        good = f"quic://127.0.0.1:{port}?ca={tmp_path / 'ca.pem'}&servername=localhost"
        assert await _exchange(listener, good) == b"ping"
        with pytest.raises(TransportError, match="QUIC handshake"):
            await QuicTransport().connect_stream(
                Endpoint.parse(f"quic://127.0.0.1:{port}?ca={tmp_path / 'other.pem'}&servername=localhost")
            )
        # without ca= the client does not verify (the key decides who may use the tunnel)
        assert await _exchange(listener, f"quic://127.0.0.1:{port}") == b"ping"
    finally:
        await listener.aclose()


async def test_handshaking_connections_are_capped_the_oldest_closed_first() -> None:
    listener = await QuicTransport().listen_streams(Endpoint.parse("quic://127.0.0.1:0"))
    assert isinstance(listener, QuicListener)
    listener.max_handshaking = 3
    port = listener.extra(SocketAttribute.local_address)[1]
    loop = asyncio.get_running_loop()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _ in range(5):  # clients that send their first flight and never finish
                config = client_configuration(Endpoint.parse(f"quic://127.0.0.1:{port}"))
                quic = QuicConnection(configuration=config)
                quic.connect(("127.0.0.1", port), now=loop.time())
                for data, address in quic.datagrams_to_send(now=loop.time()):
                    sock.sendto(data, address)
            await anyio.sleep(0.3)
        assert listener.shed == 2
        assert listener.handshaking == 3
        # a real client still gets in
        assert await _exchange(listener, f"quic://127.0.0.1:{port}") == b"ping"
    finally:
        await listener.aclose()


async def test_with_retry_a_client_is_let_in_after_its_address_is_validated() -> None:
    listener = await QuicTransport().listen_streams(Endpoint.parse("quic://127.0.0.1:0?retry=1"))
    assert isinstance(listener, QuicListener)
    port = listener.extra(SocketAttribute.local_address)[1]
    loop = asyncio.get_running_loop()
    try:
        assert await _exchange(listener, f"quic://127.0.0.1:{port}") == b"ping"
        assert listener.retries == 1
        # an Initial with a token this listener never made keeps no state and gets no answer
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            config = client_configuration(Endpoint.parse(f"quic://127.0.0.1:{port}"))
            config.token = os.urandom(60)
            quic = QuicConnection(configuration=config)
            quic.connect(("127.0.0.1", port), now=loop.time())
            for data, address in quic.datagrams_to_send(now=loop.time()):
                sock.sendto(data, address)
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                await anyio.to_thread.run_sync(sock.recvfrom, 2048)
        assert listener.bad_tokens == 1
        assert listener.handshaking == 0
        assert listener.retries == 1
    finally:
        await listener.aclose()


class _Relay(asyncio.DatagramProtocol):
    """Client <-> relay <-> server; :meth:`rebind` sends on from a new socket, as after a NAT rebinding."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.client: Any = None
        self.front: asyncio.DatagramTransport | None = None
        self.upstream: asyncio.DatagramTransport | None = None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.client = addr
        if self.upstream is not None:
            self.upstream.sendto(data, self.server)

    async def rebind(self) -> None:
        loop = asyncio.get_running_loop()
        relay = self

        class Upstream(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                if relay.front is not None and relay.client is not None:
                    relay.front.sendto(data, relay.client)

        old = self.upstream
        self.upstream, _ = await loop.create_datagram_endpoint(Upstream, local_addr=("127.0.0.1", 0))
        if old is not None:
            old.close()


@asynccontextmanager
async def _relay(server: tuple[str, int]) -> AsyncIterator[_Relay]:
    relay = _Relay(server)
    relay.front, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: relay, local_addr=("127.0.0.1", 0)
    )
    await relay.rebind()
    try:
        yield relay
    finally:
        relay.front.close()
        if relay.upstream is not None:
            relay.upstream.close()


async def test_a_client_that_moves_keeps_its_tunnel() -> None:
    transport = get_transport("quic")
    security = SecurityConfig()
    listener = await transport.listen(Endpoint.parse("quic://127.0.0.1:0"), security=security)
    port = int(listener.extra(SocketAttribute.local_address)[1])
    accepted: list[Link] = []
    arrived = anyio.Event()

    async def keep(link: Link) -> None:
        accepted.append(link)
        arrived.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg, _relay(("127.0.0.1", port)) as relay:
        tg.start_soon(listener.serve, keep)
        assert relay.front is not None
        front = relay.front.get_extra_info("sockname")[1]
        link = await transport.connect(Endpoint.parse(f"quic://127.0.0.1:{front}"), security=security)
        async with LinkStream(link) as client:
            await client.send(b"before")
            with anyio.fail_after(10):
                await arrived.wait()
            async with LinkStream(accepted[0]) as server:
                with anyio.fail_after(10):
                    assert await server.receive() == b"before"
                before = accepted[0].extra(SocketAttribute.remote_address)
                await relay.rebind()
                payload = bytes(range(256)) * 4096
                with anyio.fail_after(30):
                    await client.send(payload)
                    got = b""
                    while len(got) < len(payload):
                        got += await server.receive()
                    assert got == payload
                    await server.send(b"after")
                    assert await client.receive() == b"after"
                assert accepted[0].extra(SocketAttribute.remote_address) != before
        await listener.aclose()
        tg.cancel_scope.cancel()
