"""tcp:// and tls:// transports with real sockets on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from tests.linkutil import stream_of
from tests.streams import echo
from vtunnel.transports.base import (
    ByteStreamTransport,
    Endpoint,
    SecurityConfig,
    TransportError,
    get_transport,
)
from vtunnel.transports.link import Link, LinkStream
from vtunnel.transports.tcp import SecuredListener

pytestmark = pytest.mark.anyio

KEY = SecurityConfig(psk=os.urandom(32))


async def echo_link(link: Link) -> None:
    await echo(stream_of(link))


@pytest.mark.parametrize("security", [SecurityConfig(), KEY], ids=["insecure", "psk"])
async def test_tcp_round_trip(security: SecurityConfig) -> None:
    transport = get_transport("tcp")
    assert isinstance(transport, ByteStreamTransport)
    listener = await transport.listen(Endpoint.parse("tcp://127.0.0.1:0"), security=security)
    assert isinstance(listener, SecuredListener)
    port = int(listener.local_address.rsplit(":", 1)[1])
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo_link)
        stream = stream_of(
            await transport.connect(Endpoint.parse(f"tcp://127.0.0.1:{port}"), security=security)
        )
        async with stream:
            await stream.send(b"x" * 100_000)
            got = b""
            with anyio.fail_after(10):
                while len(got) < 100_000:
                    got += await stream.receive()
            assert got == b"x" * 100_000
        tg.cancel_scope.cancel()
    await listener.aclose()


async def test_tls_round_trip_with_certificates(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "s.pem"))
    transport = get_transport("tls")
    assert isinstance(transport, ByteStreamTransport)
    listener = await transport.listen(
        Endpoint.parse(f"tls://127.0.0.1:0?cert={tmp_path / 's.pem'}&key={tmp_path / 's.pem'}"), security=KEY
    )
    assert isinstance(listener, SecuredListener)
    port = int(listener.local_address.rsplit(":", 1)[1])
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo_link)
        url = f"tls://127.0.0.1:{port}?ca={tmp_path / 'ca.pem'}&servername=localhost"
        async with LinkStream(await transport.connect(Endpoint.parse(url), security=KEY)) as stream:
            await stream.send(b"over tls")
            with anyio.fail_after(10):
                assert await stream.receive() == b"over tls"
        # a client that does not trust the server's CA is refused
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            await transport.connect(
                Endpoint.parse(f"tls://127.0.0.1:{port}?servername=localhost"), security=KEY
            )
        tg.cancel_scope.cancel()
    await listener.aclose()


async def test_tls_server_needs_cert_and_key() -> None:
    with pytest.raises(TransportError, match="cert=FILE and key=FILE"):
        await get_transport("tls").listen(Endpoint.parse("tls://127.0.0.1:0"), security=KEY)


async def test_at_the_handshake_cap_the_oldest_pending_connection_makes_room() -> None:
    transport = get_transport("tcp")
    assert isinstance(transport, ByteStreamTransport)
    listener = await transport.listen(Endpoint.parse("tcp://127.0.0.1:0"), security=KEY)
    assert isinstance(listener, SecuredListener)
    listener.max_pending = 2
    port = int(listener.local_address.rsplit(":", 1)[1])
    served: list[Link] = []

    async def handler(link: Link) -> None:
        served.append(link)

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        held = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(2)]
        for h in held:
            await h.send(b"GET / HTTP/1.1\r\n\r\n")  # fails authentication: held silently
        with anyio.fail_after(10):
            while listener.pending < 2:
                await anyio.sleep(0.01)
        # a key holder arriving now gets in: the oldest unauthenticated connection is closed for it
        client = await transport.connect(Endpoint.parse(f"tcp://127.0.0.1:{port}"), security=KEY)
        with anyio.fail_after(5), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await held[0].receive()  # closed, nothing sent
        with anyio.move_on_after(0.2):
            assert await held[1].receive() == b"never"  # silence: still held, nothing arrives
        with anyio.fail_after(5):
            while not served:
                await anyio.sleep(0.01)
        assert listener.shed == 1
        for s in [*held, client, *served]:
            await s.aclose()
        tg.cancel_scope.cancel()
    await listener.aclose()
