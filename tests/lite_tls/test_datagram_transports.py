"""lite-tls over the datagram transports, whose links do not carry passthrough records (rudp:// and kcp:// with a
key, without ``splice=``): the extension is not offered and a lite-tls stream is relayed as an ordinary sealed one.
HTTPS through agent and server (curl, SOCKS5) is byte-exact and no stream leaves the tunnel. (With ``splice=`` they
offer it: test_spliced_conversations.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from .test_muxed import agent_and_server, body_for, ca_file, curl, left_tunnel, origin

__all__ = ["ca_file"]

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]


@pytest.mark.parametrize(("scheme", "query"), [("rudp", ""), ("kcp", ""), ("kcp", "?fec=10/3")])
async def test_https_over_a_datagram_transport_stays_sealed_and_is_byte_exact(
    scheme: str, query: str, ca_file: str, tmp_path: Path
) -> None:
    size = 4 * 1024 * 1024
    with capture_logs() as logs:
        async with (
            origin("1.3") as https,
            agent_and_server(
                f"{scheme}://127.0.0.1:0{query}", lambda port: f"{scheme}://127.0.0.1:{port}{query}"
            ) as socks,
        ):
            out = tmp_path / "body"
            with anyio.fail_after(120):
                assert await curl(socks, f"https://127.0.0.1:{https}/bytes/{size}", out, ca=ca_file) == 0
            assert out.read_bytes() == body_for(size)
    assert not left_tunnel(logs)
