"""lite-tls splice mode end to end: an agent and a server in-process over tcp:// with a key and ``splice=PORT``, a
real HTTPS origin and curl through SOCKS5. Once a lite-tls stream left the tunnel its bytes go over a dedicated
TCP connection per stream, relayed by ``os.splice`` at both ends; a relay on loopback between the agent and the
server's splice port sees (and in one test tampers with) those connections."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketStream
from anyio.streams.tls import TLSStream
from structlog.testing import capture_logs

from vtunnel.apps import lite_tls_splice
from vtunnel.apps.agent import Agent, AgentSettings
from vtunnel.apps.lite_tls_splice import TICKET_LEN
from vtunnel.apps.metrics import make_registry
from vtunnel.apps.policy import ExitPolicy
from vtunnel.apps.server import Server, ServerSettings
from vtunnel.apps.stats import ProcessStats
from vtunnel.protocol import TunnelConfig
from vtunnel.transports.base import Endpoint, SecurityConfig

from .test_muxed import (
    SPLICE_MARKS,
    Tap,
    agent_and_server,
    body_for,
    ca_file,
    curl,
    left_tunnel,
    origin,
    relay,
)
from .test_waits import destination, socks_connect
from .tlsutil import HOST, cert_files

__all__ = ["ca_file"]

pytestmark = SPLICE_MARKS


@dataclass
class Spliced:
    socks: int
    splice: int  # the server's splice port
    server: Server


@asynccontextmanager
async def spliced_tunnel(
    *,
    wire: Tap | None = None,
    first: list[bytes] | None = None,
    tls_files: tuple[str, str, str] | None = None,
    idle_timeout: float | None = None,
    server_lite_tls: bool = True,
    stats: tuple[ProcessStats, ProcessStats] | None = None,
) -> AsyncIterator[Spliced]:
    """Agent and server over tcp:// with a key and splice mode; ``wire`` sees the dedicated connections'
        server -> agent bytes and ``first`` their first agent -> server bytes (the agent reaches the splice port
        through a relay). With ``tls_files`` (chain, key, CA) the tunnel runs over tls:// instead of tcp://; ``stats``:
    the agent's and the server's (what their metrics read)."""
    security = SecurityConfig(psk=os.urandom(32))
    server = Server(
        ServerSettings(
            listen=[
                Endpoint.parse(
                    "tcp://127.0.0.1:0?splice=0"
                    if tls_files is None
                    else f"tls://127.0.0.1:0?cert={tls_files[0]}&key={tls_files[1]}&splice=0"
                )
            ],
            security=security,
            policy=ExitPolicy(allow_private=True),
            drain_timeout=1.0,
            idle_timeout=idle_timeout,
            tunnel=TunnelConfig(lite_tls=server_lite_tls),
        ),
        stats=None if stats is None else stats[1],
    )
    async with anyio.create_task_group() as tg:
        addresses = await tg.start(server.serve)
        server_port = int(addresses[0].rsplit(":", 1)[1])
        splice_port = int(server.splice_addresses[0].rsplit(":", 1)[1])
        async with relay(splice_port, wire or Tap(), first) as relayed:
            agent = Agent(
                AgentSettings(
                    servers=[
                        Endpoint.parse(
                            f"tcp://127.0.0.1:{server_port}?splice={relayed}"
                            if tls_files is None
                            else f"tls://127.0.0.1:{server_port}?ca={tls_files[2]}&servername={HOST}"
                            f"&splice={relayed}"
                        )
                    ],
                    security=security,
                    socks=("127.0.0.1", 0),
                    tunnel=TunnelConfig(),
                    drain_timeout=1.0,
                ),
                stats=None if stats is None else stats[0],
            )
            fronts = await tg.start(agent.serve)
            yield Spliced(int(fronts["socks"].rsplit(":", 1)[1]), splice_port, server)
            agent.shutdown()
            server.shutdown()


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_https_through_a_spliced_stream_is_byte_exact(
    version: str, ca_file: str, tmp_path: Path
) -> None:
    size = 64 * 1024 * 1024
    wire = Tap()
    with capture_logs() as logs:
        async with origin(version) as https, spliced_tunnel(wire=wire) as t:
            out = tmp_path / "body"
            with anyio.fail_after(150):
                assert (
                    await curl(
                        t.socks, f"https://127.0.0.1:{https}/bytes/{size}", out, ca=ca_file, version=version
                    )
                    == 0
                )
            assert out.read_bytes() == body_for(size)
    left = left_tunnel(logs)
    # both ends, spliced, one active and one passive
    assert sorted(str(e["role"]) for e in left) == ["active", "passive"], left
    assert all(e["mode"] == "spliced" for e in left)
    # the body went over the dedicated connection (its server -> agent bytes: the ACK, then the user's records)
    assert len(wire.downstream) > size
    assert wire.downstream[:1] == b"\x01"


def _tunnel_bytes(agent_stats: ProcessStats, server_stats: ProcessStats) -> Callable[[], tuple[float, float]]:
    """What the agent's metrics say it received and the server's that it sent, over tcp://."""
    agent_metrics = make_registry(agent_stats, role="agent")
    server_metrics = make_registry(server_stats, role="server")

    def counted() -> tuple[float, float]:
        received = agent_metrics.get_sample_value("vtunnel_received_bytes_total", {"transport": "tcp"})
        sent = server_metrics.get_sample_value("vtunnel_sent_bytes_total", {"transport": "tcp"})
        return received or 0.0, sent or 0.0

    return counted


async def test_spliced_bytes_count_in_the_tunnels_counters_and_metrics(ca_file: str, tmp_path: Path) -> None:
    """What a spliced stream moves over its dedicated connection counts in the same counters as a muxed stream's
    bytes (the tunnel's, read by --metrics: vtunnel_received_bytes / vtunnel_sent_bytes), at both ends, while the
    kernel relays it; its lite_tls.closed line has the totals once the relay is over."""
    size = 16 << 20
    agent_stats, server_stats = ProcessStats(), ProcessStats()
    counted = _tunnel_bytes(agent_stats, server_stats)

    with capture_logs() as logs:
        async with origin("1.3") as https, spliced_tunnel(stats=(agent_stats, server_stats)) as t:
            out = tmp_path / "body"
            with anyio.fail_after(120):
                assert await curl(t.socks, f"https://127.0.0.1:{https}/bytes/{size}", out, ca=ca_file) == 0
                assert out.read_bytes() == body_for(size)
                while len([e for e in logs if e["event"] == "lite_tls.closed"]) < 2:
                    await anyio.sleep(0.05)  # (the relays end once both sides of each closed)
            received, sent = counted()
    assert [e["mode"] for e in left_tunnel(logs)] == ["spliced", "spliced"]
    assert received >= size
    assert sent >= size
    closed = [e for e in logs if e["event"] == "lite_tls.closed"]
    assert all(e["mode"] == "spliced" for e in closed)
    # the body went from the server's end to the agent's over the dedicated connection
    assert max(e["passthrough_bytes"] for e in closed) >= size
    assert max(e["passthrough_received"] for e in closed) >= size


async def _read_response(tls: anyio.abc.ByteStream, body: bytes) -> None:
    got = bytearray()
    while not got.endswith(body):
        got += await tls.receive()


async def test_spliced_bytes_after_the_tunnel_ended_still_count(ca_file: str) -> None:
    """A spliced stream outlives its tunnel: what its kernel relay moves after the tunnel ended (at both ends)
    still counts in the tunnel byte metrics, and its lite_tls.closed line, logged when the relay is over, has
    it too."""
    size = 8 << 20
    agent_stats, server_stats = ProcessStats(), ProcessStats()
    counted = _tunnel_bytes(agent_stats, server_stats)

    with capture_logs() as logs:
        async with origin("1.3") as https, spliced_tunnel(stats=(agent_stats, server_stats)) as t:
            with anyio.fail_after(60):
                client = await socks_connect(t.socks, https)
                context = ssl.create_default_context(cafile=ca_file)
                tls = await TLSStream.wrap(client, hostname="127.0.0.1", ssl_context=context)
                await tls.send(b"GET /bytes/1000 HTTP/1.1\r\nHost: x\r\n\r\n")
                await _read_response(tls, body_for(1000))
                while len(left_tunnel(logs)) < 2:
                    await anyio.sleep(0.05)
                ((tunnel, _, _),) = agent_stats.live
                server_tunnel = next(conn for conn, _, _ in server_stats.live)
                tunnel.shutdown("the test ends the tunnel", graceful=False)
                await tunnel.wait_closed()
                await server_tunnel.wait_closed()
                while tunnel in [c for c, _, _ in agent_stats.live] or list(server_stats.live):
                    await anyio.sleep(0.05)
                received_before, sent_before = counted()
                await tls.send(f"GET /bytes/{size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                await _read_response(tls, body_for(size))
                await client.aclose()  # (no close_notify: the origin may have closed first)
                while len([e for e in logs if e["event"] == "lite_tls.closed"]) < 2:
                    await anyio.sleep(0.05)  # (the relays end once both sides of each closed)
            received, sent = counted()
    assert [e["mode"] for e in left_tunnel(logs)] == ["spliced", "spliced"]
    assert received - received_before >= size
    assert sent - sent_before >= size
    closed = [e for e in logs if e["event"] == "lite_tls.closed"]
    assert max(e["passthrough_bytes"] for e in closed) >= size
    assert max(e["passthrough_received"] for e in closed) >= size


async def test_over_tls_the_dedicated_connection_carries_the_users_tls_and_nothing_else(
    ca_file: str, tmp_path: Path
) -> None:
    """tls://: the tunnel is inside TLS; a dedicated connection is plain TCP from its first byte (ticket out,
    ACK back, then the user's own TLS records), so there is no outer TLS to end on it."""
    size = 8 * 1024 * 1024
    wire = Tap()
    with capture_logs() as logs:
        async with (
            origin("1.3") as https,
            spliced_tunnel(wire=wire, tls_files=cert_files(tmp_path)) as t,
        ):
            out = tmp_path / "body"
            with anyio.fail_after(120):
                assert await curl(t.socks, f"https://127.0.0.1:{https}/bytes/{size}", out, ca=ca_file) == 0
            assert out.read_bytes() == body_for(size)
    assert [e["mode"] for e in left_tunnel(logs)] == ["spliced", "spliced"]
    stream = bytes(wire.downstream)
    assert stream[:1] == b"\x01"
    pos = 1  # after the ACK: nothing but TLS application-data records (the user's), to the end
    while pos < len(stream):
        assert stream[pos : pos + 3] == b"\x17\x03\x03", pos
        pos += 5 + int.from_bytes(stream[pos + 3 : pos + 5], "big")
    assert pos == len(stream)


async def test_plain_http_falls_back_works_and_never_dials(tmp_path: Path) -> None:
    """Plain HTTP in splice mode: the streams fall back and work, and not one connection reaches the splice
    port (the dedicated connection is dialed only once the user's ClientHello is seen)."""
    with capture_logs() as logs:
        async with origin(None) as plain, spliced_tunnel() as t:
            with anyio.fail_after(60):
                for n in range(3):
                    out = tmp_path / f"body{n}"
                    assert await curl(t.socks, f"http://127.0.0.1:{plain}/bytes/{3 << 20}", out) == 0
                    assert out.read_bytes() == body_for(3 << 20)
            assert t.server.tickets is not None
            assert t.server.tickets.connections == 0
    assert not left_tunnel(logs)
    assert len([e for e in logs if e["event"] == "lite_tls.fell_back"]) == 6  # both ends of each stream


async def test_server_first_streams_never_hang_and_never_dial() -> None:
    """An SSH-like destination speaks first: the banner comes at once, the client's answer gets through, and
    the splice port sees no connection."""
    banner = b"SSH-2.0-vtunnel-test\r\n"

    async def server_first(conn: SocketStream) -> None:
        async with conn:
            await conn.send(banner)
            got = await conn.receive()
            await conn.send(b"echo:" + got)

    async with destination(server_first) as port, spliced_tunnel() as t:
        with anyio.fail_after(10):
            client = await socks_connect(t.socks, port)
            async with client:
                got = bytearray()
                while len(got) < len(banner):
                    got += await client.receive()
                assert bytes(got) == banner
                await client.send(b"\x16\x03\x01\x00\x05hello")  # (TLS-like bytes after the banner)
                reply = bytearray()
                while len(reply) < 15:
                    reply += await client.receive()
                assert bytes(reply) == b"echo:\x16\x03\x01\x00\x05hello"
        assert t.server.tickets is not None
        assert t.server.tickets.connections == 0


async def test_each_tls_stream_dials_once_and_plain_ones_never(ca_file: str, tmp_path: Path) -> None:
    """HTTPS and plain HTTP streams mixed in one tunnel: one dedicated connection per HTTPS stream, each spliced
    at both ends; none for the plain ones."""
    with capture_logs() as logs:
        async with origin("1.3") as https, origin(None) as plain, spliced_tunnel() as t:
            with anyio.fail_after(60):
                for n in range(3):
                    out = tmp_path / f"tls{n}"
                    assert (
                        await curl(t.socks, f"https://127.0.0.1:{https}/bytes/{1 << 20}", out, ca=ca_file)
                        == 0
                    )
                    assert out.read_bytes() == body_for(1 << 20)
                    out = tmp_path / f"plain{n}"
                    assert await curl(t.socks, f"http://127.0.0.1:{plain}/bytes/{1 << 20}", out) == 0
                    assert out.read_bytes() == body_for(1 << 20)
            assert t.server.tickets is not None
            assert t.server.tickets.connections == 3
            assert t.server.tickets.refused == 0
    assert [e["mode"] for e in left_tunnel(logs)] == ["spliced"] * 6


async def test_a_connection_without_a_valid_ticket_gets_nothing(ca_file: str, tmp_path: Path) -> None:
    """Strangers on the splice port: a random ticket, a TLS-looking start, HTTP, the ticket of a stream that
    already used it (a replay): each is closed with nothing relayed, and the tunnel's own streams go on."""
    wire = Tap()
    first: list[bytes] = []
    async with origin("1.3") as https, spliced_tunnel(wire=wire, first=first) as t:
        out = tmp_path / "body"
        with anyio.fail_after(60):
            assert await curl(t.socks, f"https://127.0.0.1:{https}/bytes/1000", out, ca=ca_file) == 0
        assert out.read_bytes() == body_for(1000)
        used = bytes(wire.downstream)
        assert len(first) == 1
        assert len(first[0]) >= TICKET_LEN
        ticket = first[0][:TICKET_LEN]

        def stranger(first: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", t.splice), timeout=10) as sock:
                sock.sendall(first)
                sock.shutdown(socket.SHUT_WR)
                got = b""
                try:
                    while chunk := sock.recv(65536):
                        got += chunk
                except ConnectionResetError:  # closed with bytes it did not read: a reset
                    pass
                return got

        with anyio.fail_after(30):
            assert await anyio.to_thread.run_sync(stranger, secrets.token_bytes(TICKET_LEN)) == b""
            assert await anyio.to_thread.run_sync(stranger, b"\x16\x03\x01\x00\x10" + bytes(16)) == b""
            assert await anyio.to_thread.run_sync(stranger, b"GET / HTTP/1.1\r\n\r\n" * 4) == b""
            assert await anyio.to_thread.run_sync(stranger, ticket + b"\x17\x03\x03\x00\x01x") == b""
        assert t.server.tickets is not None
        assert t.server.tickets.refused == 4
        assert used[:1] == b"\x01"
        with anyio.fail_after(60):
            assert await curl(t.socks, f"https://127.0.0.1:{https}/bytes/2000", out, ca=ca_file) == 0
        assert out.read_bytes() == body_for(2000)


async def test_a_flipped_byte_on_a_dedicated_connection_breaks_only_that_stream(
    ca_file: str, tmp_path: Path
) -> None:
    """Two parallel downloads, each on its own dedicated connection; the relay flips one byte of one of them:
    that curl fails (its TLS), the other finishes byte-exact, and the tunnel carries a new one afterwards."""
    size = 16 * 1024 * 1024
    flipped: list[int] = []
    seen = [0]

    def flip(chunk: bytes) -> bytes:  # one byte, once 4 MiB went through the dedicated connections
        if flipped or seen[0] + len(chunk) < 4 << 20:
            seen[0] += len(chunk)
            return chunk
        changed = bytearray(chunk)
        changed[len(changed) // 2] ^= 0x40
        flipped.append(seen[0])
        return bytes(changed)

    async with origin("1.3") as https, spliced_tunnel(wire=Tap(tamper=flip)) as t:
        codes: dict[str, int] = {}

        async def fetch(name: str) -> None:
            codes[name] = await curl(
                t.socks, f"https://127.0.0.1:{https}/bytes/{size}", tmp_path / name, ca=ca_file
            )

        with anyio.fail_after(150):
            async with anyio.create_task_group() as tg:
                tg.start_soon(fetch, "one")
                tg.start_soon(fetch, "two")
            assert flipped
            assert sorted(codes.values())[0] == 0, codes
            assert sorted(codes.values())[1] != 0, codes
            good = "one" if codes["one"] == 0 else "two"
            assert (tmp_path / good).read_bytes() == body_for(size)
            await fetch("after")
        assert codes["after"] == 0
        assert (tmp_path / "after").read_bytes() == body_for(size)


@pytest.mark.parametrize(
    ("listen", "version"),
    [
        ("tcp://127.0.0.1:0", "1.3"),
        ("tcp://127.0.0.1:0?splice=0", "1.3"),
        ("tcp://127.0.0.1:0?splice=0", "1.2"),
    ],
    ids=["server-without-splice-port", "server-with-one-tls1.3", "server-with-one-tls1.2"],
)
async def test_an_agent_whose_splice_port_does_not_answer_leaves_muxed(
    listen: str, version: str, ca_file: str, tmp_path: Path
) -> None:
    """An agent that names a splice port where nothing listens, to a server without a splice port (it ignores
    the ticket) or with one of its own (it expects the connection): the dial fails, the agent says so once, and
    the streams leave in muxed mode, byte-exact. A server that expects the connection stops waiting when the
    agent's marker comes (TLS 1.3) or after its bounded wait (TLS 1.2, the server's marker), once: the agent
    names no tickets for a while after a failed dial."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nowhere = unused.getsockname()[1]  # (bound, never listening: connections to it are refused)
        with capture_logs() as logs:
            async with (
                origin(version) as https,
                agent_and_server(listen, lambda port: f"tcp://127.0.0.1:{port}?splice={nowhere}") as socks,
            ):
                with anyio.fail_after(60):
                    for size in (1 << 20, 2 << 20):
                        out = tmp_path / f"body{size}"
                        assert (
                            await curl(socks, f"https://127.0.0.1:{https}/bytes/{size}", out, ca=ca_file) == 0
                        )
                        assert out.read_bytes() == body_for(size)
    assert [e["mode"] for e in left_tunnel(logs)] == ["muxed"] * 4
    assert len([e for e in logs if e["event"] == "lite_tls.splice_dial_failed"]) == 1
    waited = [e for e in logs if e["event"] == "lite_tls.no_dedicated_connection"]
    assert len(waited) == (1 if version == "1.2" else 0)


async def _black_hole(conn: SocketStream) -> None:
    async with conn:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            while True:
                await conn.receive()


async def _garbage(conn: SocketStream) -> None:
    async with conn:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            await conn.receive()
            await conn.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            while True:
                await conn.receive()


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("port", ["black-hole", "garbage"])
async def test_a_splice_port_that_never_answers_or_answers_garbage_leaves_muxed(
    port: str, version: str, ca_file: str, tmp_path: Path
) -> None:
    """The agent's splice port accepts but is not a vtunnel splice port: it never answers (the agent's wait for
    the ACK runs out) or answers something else. The stream goes on in muxed mode, byte-exact, and the client
    never sees an error; the agent says so once and names no tickets for a while, so the next streams are
    muxed at once."""
    with capture_logs() as logs:
        async with (
            destination(_black_hole if port == "black-hole" else _garbage) as hole,
            origin(version) as https,
            agent_and_server(
                "tcp://127.0.0.1:0?splice=0", lambda server: f"tcp://127.0.0.1:{server}?splice={hole}"
            ) as socks,
        ):
            with anyio.fail_after(60):
                for size in (1000, 1 << 20, 2 << 20):
                    out = tmp_path / f"body{size}"
                    assert await curl(socks, f"https://127.0.0.1:{https}/bytes/{size}", out, ca=ca_file) == 0
                    assert out.read_bytes() == body_for(size)
    failure = "lite_tls.splice_no_ack" if port == "black-hole" else "lite_tls.splice_bad_answer"
    assert len([e for e in logs if e["event"] == failure]) == 1
    assert not [e for e in logs if e["event"] in ("lite_tls.splice_failed", "lite_tls.violation")]
    assert [e["mode"] for e in left_tunnel(logs)] == ["muxed"] * 6


@asynccontextmanager
async def late_relay(port: int, delay: float) -> AsyncIterator[int]:
    """A TCP relay on 127.0.0.1 to ``port`` that passes the client's bytes at once and holds the first of the
    answer for ``delay`` seconds; yields its own port."""

    async def handle(client: SocketStream) -> None:
        upstream = await anyio.connect_tcp("127.0.0.1", port)
        async with client, upstream, anyio.create_task_group() as tg:

            async def up() -> None:
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    while True:
                        await upstream.send(await client.receive())

            tg.start_soon(up)
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                first = await upstream.receive()
                await anyio.sleep(delay)
                await client.send(first)
                while True:
                    await client.send(await upstream.receive())
            tg.cancel_scope.cancel()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_an_ack_that_comes_too_late_leaves_muxed_at_both_ends(
    version: str, ca_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server binds the dedicated connection and writes its ACK, which reaches the agent only after the
    agent stopped waiting for it: the agent leaves muxed and its marker says so; the server, which had bound
    the connection, leaves muxed too and closes it. The download is byte-exact and nothing is reset."""
    monkeypatch.setattr(lite_tls_splice, "ACK_TIMEOUT", 0.3)
    security = SecurityConfig(psk=os.urandom(32))
    with capture_logs() as logs:
        async with origin(version) as https, anyio.create_task_group() as tg:
            server = Server(
                ServerSettings(
                    listen=[Endpoint.parse("tcp://127.0.0.1:0?splice=0")],
                    security=security,
                    policy=ExitPolicy(allow_private=True),
                    drain_timeout=1.0,
                )
            )
            addresses = await tg.start(server.serve)
            server_port = int(addresses[0].rsplit(":", 1)[1])
            splice_port = int(server.splice_addresses[0].rsplit(":", 1)[1])
            async with late_relay(splice_port, 1.0) as late:
                agent = Agent(
                    AgentSettings(
                        servers=[Endpoint.parse(f"tcp://127.0.0.1:{server_port}?splice={late}")],
                        security=security,
                        socks=("127.0.0.1", 0),
                        drain_timeout=1.0,
                    )
                )
                fronts = await tg.start(agent.serve)
                socks = int(fronts["socks"].rsplit(":", 1)[1])
                with anyio.fail_after(60):
                    out = tmp_path / "body"
                    assert (
                        await curl(socks, f"https://127.0.0.1:{https}/bytes/{4 << 20}", out, ca=ca_file) == 0
                    )
                    assert out.read_bytes() == body_for(4 << 20)
                agent.shutdown()
                server.shutdown()
    assert len([e for e in logs if e["event"] == "lite_tls.splice_no_ack"]) == 1
    assert len([e for e in logs if e["event"] == "lite_tls.dedicated_unused"]) == 1
    assert not [e for e in logs if e["event"] in ("lite_tls.splice_failed", "lite_tls.violation")]
    assert [e["mode"] for e in left_tunnel(logs)] == ["muxed"] * 2


def _https_keepalive(socks: int, port: int, ca: str, idle: float) -> tuple[bytes, bytes]:
    """Blocking: through SOCKS5, one HTTPS request on a kept-alive connection, then ``idle`` seconds of quiet,
    then what the connection gives (b"" once it was closed); returns (first body, after the quiet)."""
    import ssl

    with socket.create_connection(("127.0.0.1", socks), timeout=30) as raw:
        raw.sendall(b"\x05\x01\x00")
        assert raw.recv(2) == b"\x05\x00"
        raw.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big"))
        assert raw.recv(10)[:2] == b"\x05\x00"
        ctx = ssl.create_default_context(cafile=ca)
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /bytes/1000 HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(body_for(1000)):
                answer += tls.recv(65536)
            time.sleep(idle)
            tls.settimeout(5)
            try:
                after = tls.recv(100)
            except TimeoutError:
                after = b"(still open)"
            except (ssl.SSLError, OSError):
                after = b""
            return answer[-1000:], after


async def test_a_spliced_stream_keeps_the_servers_idle_timeout(ca_file: str) -> None:
    with capture_logs() as logs:
        async with origin("1.3") as https, spliced_tunnel(idle_timeout=0.5) as t:
            with anyio.fail_after(30):
                body, after = await anyio.to_thread.run_sync(_https_keepalive, t.socks, https, ca_file, 2.5)
    assert body == body_for(1000)
    assert after == b""  # the server's kernel relay ended the quiet connection
    assert [e["mode"] for e in left_tunnel(logs)] == ["spliced", "spliced"]


async def test_a_tunnel_without_lite_tls_dials_no_dedicated_connection(ca_file: str, tmp_path: Path) -> None:
    """The server has a splice port but does not offer lite-tls: the streams are plain ones (no tracker), so
    the agent never sees a ClientHello as such and never dials the splice port."""
    async with origin("1.3") as https, spliced_tunnel(server_lite_tls=False) as t:
        with anyio.fail_after(60):
            for size in (1000, 2000, 3000):
                out = tmp_path / f"body{size}"
                assert await curl(t.socks, f"https://127.0.0.1:{https}/bytes/{size}", out, ca=ca_file) == 0
                assert out.read_bytes() == body_for(size)
        assert t.server.tickets is not None
        assert t.server.tickets.connections == 0
        assert t.server.tickets.refused == 0
