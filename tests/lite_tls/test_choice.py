"""Which streams leave the tunnel: chosen by their first bytes, never by port. With lite-tls on, every TCP stream
the agent opens is lite-tls-capable; HTTPS to any port leaves at both ends, plain HTTP to port 443 never does, a
protocol where the server speaks first (SSH-like) is a plain stream at once and never waits, and
``--no-lite-tls`` turns it all off. Agent and server in-process over tcp:// with a key, curl or a raw SOCKS5
client on loopback."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketStream
from click.testing import CliRunner
from structlog.testing import capture_logs

from vtunnel.apps.agent import Agent, AgentSettings
from vtunnel.cli import main
from vtunnel.protocol import StreamMetadata, TunnelConfig
from vtunnel.transports.base import Endpoint, SecurityConfig

from .test_muxed import body_for, ca_file, curl, left_tunnel, origin, tunnel
from .test_waits import destination, socks_connect

__all__ = ["ca_file"]

pytestmark = pytest.mark.anyio

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")

#: a loopback address of these tests' own, for port 443
HTTPS_PORT_HOST = "127.0.16.1"


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def agent(tunnel: TunnelConfig) -> Agent:
    return Agent(
        AgentSettings(
            servers=[Endpoint.parse("tcp://127.0.0.1:9")],
            security=SecurityConfig(psk=bytes(32)),
            socks=("127.0.0.1", 0),
            tunnel=tunnel,
        )
    )


@pytest.mark.parametrize("authority", ["example.com:443", "example.com:80", "[2001:db8::1]:22", "h:8443"])
def test_every_tcp_stream_is_lite_tls_capable_while_lite_tls_is_on(authority: str) -> None:
    md = StreamMetadata(authority=authority, kind="tcp")
    assert agent(TunnelConfig()).choose_kind(md) == StreamMetadata(authority=authority, kind="lite-tls")
    assert agent(TunnelConfig(lite_tls=False)).choose_kind(md) == md
    udp = StreamMetadata(authority=authority, kind="udp")
    assert agent(TunnelConfig()).choose_kind(udp) == udp


def test_the_cli_has_the_switch_and_no_port_list() -> None:
    result = CliRunner().invoke(main, ["agent", "--help"])
    assert "--no-lite-tls" in result.output
    assert "--lite-tls-ports" not in result.output


@needs_curl
async def test_https_to_a_port_that_is_not_443_leaves_at_both_ends(ca_file: str, tmp_path: Path) -> None:
    size = 4 << 20
    with capture_logs() as logs:
        async with origin("1.3") as https, tunnel() as t:
            assert https != 443
            out = tmp_path / "body"
            with anyio.fail_after(60):
                assert await curl(t.socks, f"https://127.0.0.1:{https}/bytes/{size}", out, ca=ca_file) == 0
            assert out.read_bytes() == body_for(size)
    left = left_tunnel(logs)
    assert sorted(str(e["role"]) for e in left) == ["active", "passive"], left
    assert all(e["mode"] == "muxed" for e in left)


@needs_curl
async def test_without_lite_tls_https_never_leaves(ca_file: str, tmp_path: Path) -> None:
    with capture_logs() as logs:
        async with origin("1.3") as https, tunnel(lite_tls=False) as t:
            out = tmp_path / "body"
            with anyio.fail_after(60):
                assert await curl(t.socks, f"https://127.0.0.1:{https}/bytes/{1 << 20}", out, ca=ca_file) == 0
            assert out.read_bytes() == body_for(1 << 20)
    assert not left_tunnel(logs)
    assert not events(logs, "lite_tls.fell_back")  # no tracker ran at all


@needs_curl
async def test_plain_http_on_port_443_never_leaves(tmp_path: Path) -> None:
    size = 3 << 20
    try:
        opened = origin(None, (HTTPS_PORT_HOST, 443))
        cm = await opened.__aenter__()
    except OSError as exc:  # (the address or port 443 cannot be had here)
        pytest.skip(f"cannot listen on {HTTPS_PORT_HOST}:443: {exc}")
    try:
        assert cm == 443
        with capture_logs() as logs:
            async with tunnel() as t:
                out = tmp_path / "body"
                with anyio.fail_after(60):
                    assert await curl(t.socks, f"http://{HTTPS_PORT_HOST}:443/bytes/{size}", out) == 0
                assert out.read_bytes() == body_for(size)
    finally:
        await opened.__aexit__(None, None, None)
    assert not left_tunnel(logs)
    fell = events(logs, "lite_tls.fell_back")
    assert sorted(e["by_peer"] for e in fell) == [False, True]  # the agent at the request, the server told


async def _read_exactly(client: SocketStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        got += await client.receive()
    return bytes(got)


@pytest.mark.parametrize(
    "banner",
    [b"SSH-2.0-OpenSSH_9.6\r\n", b"\x16\x03\x03\x00\x03abc"],  # (the second looks like a TLS record)
    ids=["ssh", "tls-like"],
)
async def test_a_server_that_speaks_first_is_a_plain_stream_at_once(banner: bytes) -> None:
    """The client sends nothing until it has the banner: the banner comes through (no wait for client bytes),
    both ends settle on a plain stream, and the conversation goes on both ways."""

    async def server_first(conn: SocketStream) -> None:
        async with conn:
            await conn.send(banner)
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    await conn.send(b"echo: " + await conn.receive())

    with capture_logs() as logs:
        async with destination(server_first) as port, tunnel() as t:
            with anyio.fail_after(10):  # (a hang fails here; nothing is timed)
                client = await socks_connect(t.socks, port)
                async with client:
                    assert await _read_exactly(client, len(banner)) == banner
                    said = b"\x16\x03\x01 then not TLS"
                    await client.send(said)
                    assert await _read_exactly(client, 6 + len(said)) == b"echo: " + said
    fell = events(logs, "lite_tls.fell_back")
    assert {(e["reason"], e["by_peer"]) for e in fell} == {
        ("the server spoke first", False),
        ("the peer fell back", True),
    }
    assert not left_tunnel(logs)


async def test_ssh_like_on_port_443_is_plain_too() -> None:
    banner = b"SSH-2.0-vtunnel-test\r\n"

    async def server_first(conn: SocketStream) -> None:
        async with conn:
            await conn.send(banner)
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                await conn.send(await conn.receive())

    try:
        listener = await anyio.create_tcp_listener(local_host=HTTPS_PORT_HOST, local_port=443)
    except OSError as exc:
        pytest.skip(f"cannot listen on {HTTPS_PORT_HOST}:443: {exc}")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, server_first)
        async with tunnel() as t:
            with anyio.fail_after(10):
                client = await socks_connect(t.socks, 443, HTTPS_PORT_HOST)
                async with client:
                    assert await _read_exactly(client, len(banner)) == banner
                    await client.send(b"bye")
                    assert await _read_exactly(client, 3) == b"bye"
        tg.cancel_scope.cancel()
