"""lite-tls splice mode for an agent with several servers: each stream's dedicated connection goes to the splice
port of the server whose tunnel carries it, the only one that knows its ticket (a connection to any other would
be refused, and the stream would leave muxed). Real curl through SOCKS5 to a real HTTPS origin, an agent and the
servers in-process, with a key."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from vtunnel.apps.agent import Agent
from vtunnel.apps.server import Server
from vtunnel.testing.ports import free_port

from .test_muxed import SPLICE_MARKS, body_for, ca_file, curl, left_tunnel, origin, servers_and_agent
from .test_splice_discovery import DIAL_FAILURES

__all__ = ["ca_file"]

pytestmark = SPLICE_MARKS

SIZE = 4 * 1024 * 1024


async def _download(socks: int, https: int, out: Path, ca: str) -> None:
    with anyio.fail_after(120):
        assert await curl(socks, f"https://127.0.0.1:{https}/bytes/{SIZE}", out, ca=ca, version="1.3") == 0
    assert await anyio.Path(out).read_bytes() == body_for(SIZE)


async def _download_over_both(agent: Agent, socks: int, https: int, directory: Path, ca: str) -> None:
    """Four downloads once the agent's two tunnels are up (its streams take them in turn)."""
    assert agent.pool is not None
    with anyio.fail_after(20):
        while len(agent.pool.connections) < 2:
            await anyio.sleep(0.05)
    for n in range(4):
        await _download(socks, https, directory / f"body{n}", ca)


def _carried(server: Server) -> int:
    """Bytes the server's tunnels (their spliced streams' dedicated connections included) have sent."""
    return sum(conn.bytes_out for conn in server.tunnels)


@pytest.mark.parametrize("scheme", ["tcp", "kcp"])
async def test_each_servers_streams_dial_that_servers_splice_port(
    scheme: str, ca_file: str, tmp_path: Path
) -> None:
    """Two servers, each with a splice port of its own that the agent was not told, and a tunnel to each: the
    streams go to both in turn, and every one leaves spliced at both ends, none refused."""
    with capture_logs() as logs:
        async with (
            origin("1.3") as https,
            servers_and_agent(
                [f"{scheme}://127.0.0.1:0?splice=0"] * 2,
                lambda ports: [f"{scheme}://127.0.0.1:{port}" for port in ports],
                connections=2,
            ) as (socks, agent, servers),
        ):
            await _download_over_both(agent, socks, https, tmp_path, ca_file)
            assert all(_carried(server) >= 2 * SIZE for server in servers), [_carried(s) for s in servers]
    left = left_tunnel(logs)
    assert sorted(str(e["role"]) for e in left) == ["active"] * 4 + ["passive"] * 4, left
    assert all(e["mode"] == "spliced" for e in left), left
    assert not [
        e for e in logs if e["event"] in DIAL_FAILURES or e["event"] == "lite_tls.dedicated_refused"
    ], logs


async def test_after_failing_over_the_streams_dial_the_server_that_answers(
    ca_file: str, tmp_path: Path
) -> None:
    """The first server given does not answer (its URL names a splice port, where nothing listens either): the
    tunnel goes to the second, and its streams dial the splice port the second announced."""
    dead = free_port()
    with capture_logs() as logs:
        async with (
            origin("1.3") as https,
            servers_and_agent(
                ["tcp://127.0.0.1:0?splice=0"],
                lambda ports: [f"tcp://127.0.0.1:{dead}?splice={dead}", f"tcp://127.0.0.1:{ports[0]}"],
            ) as (socks, _agent, _servers),
        ):
            for n in range(2):
                await _download(socks, https, tmp_path / f"body{n}", ca_file)
    left = left_tunnel(logs)
    assert sorted(str(e["role"]) for e in left) == ["active", "active", "passive", "passive"], left
    assert all(e["mode"] == "spliced" for e in left), left
    assert not [e for e in logs if e["event"] in DIAL_FAILURES], logs


async def test_a_server_whose_url_says_splice_off_keeps_its_streams_muxed(
    ca_file: str, tmp_path: Path
) -> None:
    """Two servers with splice ports; the agent's URL of the second says ``splice=off``: its streams name no
    ticket and leave muxed, while the first server's leave spliced."""
    with capture_logs() as logs:
        async with (
            origin("1.3") as https,
            servers_and_agent(
                ["tcp://127.0.0.1:0?splice=0"] * 2,
                lambda ports: [f"tcp://127.0.0.1:{ports[0]}", f"tcp://127.0.0.1:{ports[1]}?splice=off"],
                connections=2,
            ) as (socks, agent, _servers),
        ):
            await _download_over_both(agent, socks, https, tmp_path, ca_file)
    left = left_tunnel(logs)
    assert sorted(str(e["mode"]) for e in left) == ["muxed"] * 4 + ["spliced"] * 4, left
    assert not [
        e for e in logs if e["event"] in DIAL_FAILURES or e["event"] == "lite_tls.dedicated_refused"
    ], logs
