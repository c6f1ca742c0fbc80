"""lite-tls over the datagram transports (kcp://, rudp:// with a key): their links do not carry passthrough
records, so the extension is not offered and a lite-tls stream is relayed as an ordinary sealed one. HTTPS
through agent and server (curl, SOCKS5) is byte-exact and no stream leaves the tunnel."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from vtunnel.apps.agent import Agent, AgentSettings
from vtunnel.apps.policy import ExitPolicy
from vtunnel.apps.server import Server, ServerSettings
from vtunnel.transports.base import Endpoint, SecurityConfig

from .test_muxed import body_for, ca_file, curl, origin

__all__ = ["ca_file"]

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]


@pytest.mark.parametrize("scheme", ["kcp", "rudp"])
async def test_https_over_a_datagram_transport_stays_sealed_and_is_byte_exact(
    scheme: str, ca_file: str, tmp_path: Path
) -> None:
    size = 4 * 1024 * 1024
    security = SecurityConfig(psk=os.urandom(32))
    with capture_logs() as logs:
        async with origin("1.3") as https, anyio.create_task_group() as tg:
            server = Server(
                ServerSettings(
                    listen=[Endpoint.parse(f"{scheme}://127.0.0.1:0")],
                    security=security,
                    policy=ExitPolicy(allow_private=True),
                    drain_timeout=1.0,
                )
            )
            addresses = await tg.start(server.serve)
            port = int(addresses[0].rsplit(":", 1)[1])
            agent = Agent(
                AgentSettings(
                    server=Endpoint.parse(f"{scheme}://127.0.0.1:{port}"),
                    security=security,
                    socks=("127.0.0.1", 0),
                    drain_timeout=1.0,
                    lite_tls_ports=frozenset({https}),
                )
            )
            fronts = await tg.start(agent.serve)
            socks = int(fronts["socks"].rsplit(":", 1)[1])
            out = tmp_path / "body"
            with anyio.fail_after(120):
                assert await curl(socks, f"https://127.0.0.1:{https}/bytes/{size}", out, ca=ca_file) == 0
            assert out.read_bytes() == body_for(size)
            agent.shutdown()
            server.shutdown()
    assert not [e for e in logs if e["event"] == "lite_tls.left_tunnel"]
