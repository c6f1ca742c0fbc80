"""The conformance kit (vtunnel.testing.conformance) run on every built-in transport and the ws:// and quic://
plugins, and on
a deliberately broken toy transport that it must catch, naming the contract."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest
from anyio.abc import ByteStream, Listener

from vtunnel.testing.conformance import ContractBroken, TransportConformance
from vtunnel.transports.base import ByteStreamTransport, Endpoint, SecurityConfig, Transport


class TestTCP(TransportConformance):
    scheme = "tcp"
    security = SecurityConfig()
    other_security: ClassVar[SecurityConfig | None] = None


class TestTCPWithKey(TransportConformance):
    scheme = "tcp"
    handshake_rate, handshake_burst = 50.0, 100


def certificates(directory: Path) -> str:
    """A test CA (``ca.pem``) and a server certificate for ``localhost`` (``s.pem``) in ``directory``; the
    server's URL options."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(directory / "s.pem"))
    return f"cert={directory / 's.pem'}&key={directory / 's.pem'}"


class TestTLSWithKey(TransportConformance):
    scheme = "tls"
    handshake_rate, handshake_burst = 50.0, 100

    def listen_url(self, directory: Path) -> str:
        return f"tls://127.0.0.1:0?{certificates(directory)}"

    def connect_url(self, port: int, directory: Path) -> str:
        return f"tls://127.0.0.1:{port}?ca={directory / 'ca.pem'}&servername=localhost"


class TestKCP(TransportConformance):
    scheme = "kcp"
    security = SecurityConfig()
    other_security: ClassVar[SecurityConfig | None] = None
    half_close = False
    datagram = True

    def listen_url(self, directory: Path) -> str:
        return "kcp://127.0.0.1:0?timeout=2"  # a closed peer is found by the dead-link timeout


class TestKCPWithKey(TestKCP):
    security = TransportConformance.security
    other_security = TransportConformance.other_security
    handshake_rate, handshake_burst = 20.0, 40


class TestRudp(TransportConformance):
    scheme = "rudp"
    security = SecurityConfig()
    other_security: ClassVar[SecurityConfig | None] = None
    datagram = True  # half-closes (FIN), and an aborted peer sends CLOSE: the kit's defaults hold


class TestRudpWithKey(TestRudp):
    security = TransportConformance.security
    other_security = TransportConformance.other_security
    handshake_rate, handshake_burst = 20.0, 40


class TestWebSocketPlugin(TransportConformance):
    scheme = "ws"
    handshake_rate, handshake_burst = 50.0, 100
    half_close = False  # a WebSocket close frame ends both directions

    def listen_url(self, directory: Path) -> str:
        pytest.importorskip("vtunnel_websocket")
        return "ws://127.0.0.1:0?path=/t"

    def connect_url(self, port: int, directory: Path) -> str:
        return f"ws://127.0.0.1:{port}?path=/t"


class TestSecureWebSocketPlugin(TransportConformance):
    """wss://: the WebSocket inside TLS, the key inside that."""

    scheme = "wss"
    half_close = False
    handshake_rate, handshake_burst = 50.0, 100

    def listen_url(self, directory: Path) -> str:
        pytest.importorskip("vtunnel_websocket")
        return f"wss://127.0.0.1:0?path=/t&{certificates(directory)}"

    def connect_url(self, port: int, directory: Path) -> str:
        return f"wss://127.0.0.1:{port}?path=/t&host=tunnel.example&ca={directory / 'ca.pem'}&servername=localhost"


class TestQuicPlugin(TransportConformance):
    """quic://: the tunnel on one QUIC stream, the key inside it; garbage datagrams and the loss check go through
    the impairment relay (QUIC is carried in UDP)."""

    scheme = "quic"
    datagram = True
    handshake_rate, handshake_burst = 50.0, 100

    def listen_url(self, directory: Path) -> str:
        pytest.importorskip("vtunnel_quic")
        return "quic://127.0.0.1:0"


class _FlipsOneByte(ByteStream):
    """A byte stream that corrupts the 100,000th byte it sends: what a buggy transport does."""

    def __init__(self, inner: ByteStream) -> None:
        self.inner = inner
        self.sent = 0

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        at = 100_000 - self.sent
        if 0 <= at < len(item):
            item = item[:at] + bytes([item[at] ^ 1]) + item[at + 1 :]
        self.sent += len(item)
        await self.inner.send(item)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self) -> Any:
        return self.inner.extra_attributes


class _BrokenTransport(ByteStreamTransport):
    schemes: ClassVar[tuple[str, ...]] = ("broken",)

    async def connect_stream(self, endpoint: Endpoint) -> ByteStream:
        return _FlipsOneByte(await anyio.connect_tcp(endpoint.host, endpoint.port))

    async def listen_streams(self, endpoint: Endpoint) -> Listener[ByteStream]:
        return await anyio.create_tcp_listener(local_host=endpoint.host, local_port=endpoint.port)


class _BrokenKit(TransportConformance):  # not collected: run by the test below
    scheme = "broken"
    security = SecurityConfig()
    bulk_bytes = 4 * 1024 * 1024

    def transport(self) -> Transport:
        return _BrokenTransport()


@pytest.mark.anyio
async def test_the_kit_names_the_contract_a_broken_transport_breaks(tmp_path: Path) -> None:
    with pytest.raises(
        ContractBroken, match=r"^ordered byte-exact delivery: the bytes sent up differ"
    ) as caught:
        await _BrokenKit().test_connect_listen_and_deliver_in_order_both_ways(tmp_path)
    assert caught.value.contract == "ordered byte-exact delivery"
    # what it does right still passes
    await _BrokenKit().test_half_close_both_ways(tmp_path)
    await anyio.lowlevel.checkpoint()
