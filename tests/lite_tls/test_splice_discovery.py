"""lite-tls splice mode without telling the agent the port: a server in splice mode announces its splice port in
its SETTINGS (``SPLICE_PORT``), and an agent whose server URL names none uses it. Real curl through SOCKS5 to a
real HTTPS origin, an agent and a server in-process, with a key; ``splice=off`` on the agent keeps every stream
in the tunnel."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from .test_muxed import SPLICE_MARKS, agent_and_server, body_for, ca_file, curl, left_tunnel, origin

__all__ = ["ca_file"]

pytestmark = SPLICE_MARKS

SIZE = 8 * 1024 * 1024
#: what the agent logs when a dedicated connection could not be had
DIAL_FAILURES = frozenset(
    {"lite_tls.splice_dial_failed", "lite_tls.splice_no_ack", "lite_tls.splice_bad_answer"}
)


def pair(listen: str, agent_options: str = "") -> AbstractAsyncContextManager[int]:
    """A server on ``listen`` (port 0) and an agent whose server URL carries only ``agent_options`` (no splice
    port); yields the agent's SOCKS5 port."""
    scheme = listen.partition("://")[0]
    query = f"?{agent_options}" if agent_options else ""
    return agent_and_server(listen, lambda port: f"{scheme}://127.0.0.1:{port}{query}")


async def _download(socks: int, https: int, out: Path, ca: str) -> None:
    with anyio.fail_after(120):
        assert await curl(socks, f"https://127.0.0.1:{https}/bytes/{SIZE}", out, ca=ca, version="1.3") == 0
    assert await anyio.Path(out).read_bytes() == body_for(SIZE)


@pytest.mark.parametrize("scheme", ["tcp", "kcp", "rudp"])
async def test_an_agent_told_no_port_splices_at_the_one_the_server_announces(
    scheme: str, ca_file: str, tmp_path: Path
) -> None:
    """``splice=0``: the server's splice port is one the system chose, which no agent could have been told."""
    with capture_logs() as logs:
        async with origin("1.3") as https, pair(f"{scheme}://127.0.0.1:0?splice=0") as socks:
            await _download(socks, https, tmp_path / "body", ca_file)
    left = left_tunnel(logs)
    assert sorted(str(e["role"]) for e in left) == ["active", "passive"], left
    assert all(e["mode"] == "spliced" for e in left), left
    assert not [e for e in logs if e["event"] in DIAL_FAILURES], logs


@pytest.mark.parametrize("scheme", ["tcp", "kcp"])
async def test_splice_off_on_the_agent_keeps_streams_in_the_tunnel(
    scheme: str, ca_file: str, tmp_path: Path
) -> None:
    with capture_logs() as logs:
        async with (
            origin("1.3") as https,
            pair(f"{scheme}://127.0.0.1:0?splice=0", "splice=off") as socks,
        ):
            await _download(socks, https, tmp_path / "body", ca_file)
    left = left_tunnel(logs)
    if scheme == "tcp":  # muxed: the link carries passthrough records
        assert left, logs
        assert all(e["mode"] == "muxed" for e in left), left
    else:  # kcp:// has no muxed mode: without splice the agent does not offer lite-tls, and every byte is sealed
        assert left == [], left


async def test_a_server_without_a_splice_port_announces_none_and_the_agent_never_dials(
    ca_file: str, tmp_path: Path
) -> None:
    with capture_logs() as logs:
        async with origin("1.3") as https, pair("tcp://127.0.0.1:0") as socks:
            for n in range(3):
                await _download(socks, https, tmp_path / f"body{n}", ca_file)
    left = left_tunnel(logs)
    assert len(left) == 6, left
    assert all(e["mode"] == "muxed" for e in left), left
    assert not [e for e in logs if e["event"] in DIAL_FAILURES], logs
