"""lite-tls over kcp:// with a key and without ``splice=``: no stream leaves, so every byte of the user's TLS
crosses sealed. Agent and server in-process, a real HTTPS origin and curl through SOCKS5. Between agent and
server a UDP relay on loopback sees the server's datagrams; between the server and the origin a TCP relay
records the origin's TLS records, so the test knows which bytes are the user's TLS record bodies and can look
for them on the wire. (With ``splice=`` lite-tls streams leave over conversations of their own:
test_spliced_conversations.py, which uses :class:`UdpTap` too.)"""

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

from .test_muxed import Tap, body_for, ca_file, curl, left_tunnel, origin, records, relay

__all__ = ["Address", "UdpTap", "ca_file"]

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
                listen=[Endpoint.parse("kcp://127.0.0.1:0")],
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
                    servers=[Endpoint.parse(f"kcp://127.0.0.1:{udp.port}")],
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


@pytest.mark.parametrize("lite_tls", [False, True])
async def test_without_leaving_nothing_of_the_users_tls_is_in_the_clear_over_kcp(
    lite_tls: bool, ca_file: str, tmp_path: Path
) -> None:
    """With lite-tls off, and with it on but no ``splice=`` (kcp:// then does not offer it), no stream leaves
    and no TLS record body of the user's is found on the wire."""
    target = Tap()
    with capture_logs() as logs:
        async with (
            origin("1.3") as https,
            relay(https, target) as tapped,
            kcp_tunnel(lambda server: UdpTap(server, keep=True), lite_tls=lite_tls) as (socks, udp),
        ):
            out = tmp_path / "body"
            with anyio.fail_after(120):
                assert await curl(socks, f"https://127.0.0.1:{tapped}/bytes/{4 << 20}", out, ca=ca_file) == 0
            assert out.read_bytes() == body_for(4 << 20)
    assert not left_tunnel(logs)
    wire = bytes(udp.wire)
    assert not any(body[100:164] in wire for kind, body in records(target.downstream) if len(body) >= 164)
