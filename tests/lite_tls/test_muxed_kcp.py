"""lite-tls muxed mode over kcp:// with a key and ``passthrough=on`` (sealed datagram v4): agent and server in-process, a real HTTPS
origin and curl through SOCKS5. Between agent and server a UDP relay on loopback sees (and in one test tampers
with) the server's datagrams; between the server and the origin a TCP relay records the origin's TLS records,
so the test knows which bytes are the user's TLS record bodies and can look for them on the wire."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from vtunnel.apps.agent import Agent, AgentSettings
from vtunnel.apps.policy import ExitPolicy
from vtunnel.apps.server import Server, ServerSettings
from vtunnel.protocol import TunnelConfig
from vtunnel.transports.base import Endpoint, SecurityConfig

from .test_muxed import BodyFlipper, Tap, body_for, ca_file, curl, left_tunnel, origin, records, relay

__all__ = ["ca_file"]

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]

Address = tuple[str, int]


class UdpTap:
    """A UDP relay on 127.0.0.1 for one client: datagrams from the target go through ``down`` (which may change
    them) and are kept in ``wire`` when ``keep``."""

    def __init__(
        self, target: Address, down: Callable[[bytes], bytes] | None = None, *, keep: bool = False
    ) -> None:
        self.target = target
        self.down = down
        self.keep = keep
        self.wire = bytearray()
        self.datagrams = 0
        self._loop = asyncio.get_running_loop()
        self._sock = self._socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self._client: Address | None = None
        self._up: socket.socket | None = None
        self._loop.add_reader(self._sock.fileno(), self._from_client)

    @staticmethod
    def _socket() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.setblocking(False)
        return sock

    def _from_client(self) -> None:
        for _ in range(256):
            try:
                data, source = self._sock.recvfrom(65536)
            except BlockingIOError:
                return
            if self._up is None:
                self._client = (str(source[0]), int(source[1]))
                self._up = self._socket()
                self._loop.add_reader(self._up.fileno(), self._from_target)
            with suppress(BlockingIOError):  # dropped, as a full queue does
                self._up.sendto(data, self.target)

    def _from_target(self) -> None:
        assert self._up is not None
        assert self._client is not None
        for _ in range(256):
            try:
                data = self._up.recv(65536)
            except BlockingIOError:
                return
            if self.down is not None:
                data = self.down(data)
            self.datagrams += 1
            if self.keep:
                self.wire += data
            with suppress(BlockingIOError):
                self._sock.sendto(data, self._client)

    def close(self) -> None:
        for sock in (self._sock, self._up):
            if sock is not None:
                self._loop.remove_reader(sock.fileno())
                sock.close()


@asynccontextmanager
async def kcp_tunnel(
    tap: Callable[[Address], UdpTap], *, lite_tls: bool = True
) -> AsyncIterator[tuple[int, UdpTap]]:
    """A server on kcp:// with a fresh key and an agent reaching it through the UDP relay ``tap(server)`` makes;
    yields the agent's SOCKS5 port and the relay."""
    security = SecurityConfig(psk=os.urandom(32))
    config = TunnelConfig(lite_tls=lite_tls)
    async with anyio.create_task_group() as tg:
        server = Server(
            ServerSettings(
                listen=[Endpoint.parse("kcp://127.0.0.1:0?passthrough=on")],
                security=security,
                policy=ExitPolicy(allow_private=True),
                tunnel=config,
                drain_timeout=1.0,
            )
        )
        addresses = await tg.start(server.serve)
        udp = tap(("127.0.0.1", int(addresses[0].rsplit(":", 1)[1])))
        try:
            agent = Agent(
                AgentSettings(
                    servers=[Endpoint.parse(f"kcp://127.0.0.1:{udp.port}?passthrough=on")],
                    security=security,
                    socks=("127.0.0.1", 0),
                    tunnel=config,
                    drain_timeout=1.0,
                )
            )
            fronts = await tg.start(agent.serve)
            yield int(fronts["socks"].rsplit(":", 1)[1]), udp
            agent.shutdown()
            server.shutdown()
        finally:
            udp.close()


@pytest.mark.parametrize("version", ["1.3", "1.2"])
async def test_https_over_kcp_leaves_muxed_and_is_byte_exact(
    version: str, ca_file: str, tmp_path: Path
) -> None:
    size = 64 * 1024 * 1024 if version == "1.3" else 4 * 1024 * 1024
    target = Tap()
    with capture_logs() as logs:
        async with (
            origin(version) as https,
            relay(https, target) as tapped,
            kcp_tunnel(lambda server: UdpTap(server, keep=True)) as (socks, udp),
        ):
            out = tmp_path / "body"
            with anyio.fail_after(300):
                url = f"https://127.0.0.1:{tapped}/bytes/{size}"
                assert await curl(socks, url, out, ca=ca_file, version=version) == 0
            assert out.read_bytes() == body_for(size)
    ends = left_tunnel(logs)
    assert sorted(str(e["role"]) for e in ends) == ["active", "passive"], ends
    assert all(e["mode"] == "muxed" for e in ends)
    wire = bytes(udp.wire)
    recs = records(target.downstream)
    # the user's handshake crossed sealed; after the switch its record bodies are in the clear, in runs
    handshake = [body for kind, body in recs if kind == 0x16 and len(body) >= 48]
    assert handshake
    assert not any(body[:48] in wire for body in handshake)
    big = [body for kind, body in recs if kind == 0x17 and len(body) > 16000][-40:]
    assert big
    found = sum(body[100:164] in wire for body in big)
    assert found >= len(big) // 2, (found, len(big))


async def test_without_lite_tls_nothing_of_the_users_tls_is_in_the_clear_over_kcp(
    ca_file: str, tmp_path: Path
) -> None:
    target = Tap()
    with capture_logs() as logs:
        async with (
            origin("1.3") as https,
            relay(https, target) as tapped,
            kcp_tunnel(lambda server: UdpTap(server, keep=True), lite_tls=False) as (socks, udp),
        ):
            out = tmp_path / "body"
            with anyio.fail_after(120):
                assert await curl(socks, f"https://127.0.0.1:{tapped}/bytes/{4 << 20}", out, ca=ca_file) == 0
            assert out.read_bytes() == body_for(4 << 20)
    assert not left_tunnel(logs)
    wire = bytes(udp.wire)
    assert not any(body[100:164] in wire for kind, body in records(target.downstream) if len(body) >= 164)


async def test_a_flipped_byte_in_a_clear_run_breaks_only_that_stream(ca_file: str, tmp_path: Path) -> None:
    target = Tap()
    flipper = BodyFlipper(target)  # over kcp:// its flip sees datagrams, and flips inside a clear run
    target.tamper = flipper.learn
    size = 32 * 1024 * 1024
    async with (
        origin("1.3") as https,
        origin("1.2") as other,
        relay(https, target) as tapped,
        kcp_tunnel(lambda server: UdpTap(server, flipper.flip)) as (socks, _udp),
    ):
        codes: dict[str, int] = {}

        async def fetch(name: str, port: int) -> None:
            codes[name] = await curl(
                socks, f"https://127.0.0.1:{port}/bytes/{size}", tmp_path / name, ca=ca_file
            )

        with anyio.fail_after(300):
            async with anyio.create_task_group() as tg:
                tg.start_soon(fetch, "tampered", tapped)
                tg.start_soon(fetch, "parallel", other)
    assert flipper.flipped, "no passthrough body was seen in the clear on the wire"
    assert codes["tampered"] != 0  # the user's TLS caught it: bad record MAC
    assert codes["parallel"] == 0
    assert (tmp_path / "parallel").read_bytes() == body_for(size)
