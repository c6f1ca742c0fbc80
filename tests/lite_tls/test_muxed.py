"""lite-tls muxed mode end to end: an agent and a server in-process over tcp:// with a key, a real HTTPS origin
(Python's ssl, a trustme certificate) and curl through SOCKS5. Between agent and server a relay on loopback sees
(and in one test tampers with) the tunnel's bytes; between the server and the origin another one records the
origin's TLS records, so the test knows which bytes are the user's TLS record bodies."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import itertools
import os
import shutil
import socketserver
import ssl
import threading
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
import trustme
from anyio.abc import SocketStream

from vtunnel.apps.agent import Agent, AgentSettings
from vtunnel.apps.policy import ExitPolicy
from vtunnel.apps.server import Server, ServerSettings
from vtunnel.io.splice import SPLICE_AVAILABLE
from vtunnel.protocol import TunnelConfig
from vtunnel.transports.base import Endpoint, SecurityConfig

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]
#: the marks of the splice-mode tests (curl through a real agent and server, and the kernel's os.splice)
SPLICE_MARKS = [
    *pytestmark,
    pytest.mark.skipif(not SPLICE_AVAILABLE, reason="no os.splice on this platform"),
]

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_CA = trustme.CA()
_CERT = _CA.issue_cert("localhost", "127.0.0.1")


def body_for(size: int) -> bytes:
    seed = hashlib.sha256(str(size).encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


class _Handler(http.server.BaseHTTPRequestHandler):
    """``GET /bytes/N``: N deterministic bytes with a Content-Length."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = body_for(int(self.path.rsplit("/", 1)[1]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Origin(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    context: ssl.SSLContext | None = None

    def finish_request(self, request: object, client_address: object) -> None:
        if self.context is None:
            super().finish_request(request, client_address)  # type: ignore[arg-type]
            return
        try:
            tls = self.context.wrap_socket(request, server_side=True)  # type: ignore[arg-type]
        except (ssl.SSLError, OSError):
            return
        try:
            super().finish_request(tls, client_address)
        except (ssl.SSLError, OSError):
            pass
        finally:
            tls.close()


@asynccontextmanager
async def origin(version: str | None, address: tuple[str, int] = ("127.0.0.1", 0)) -> AsyncIterator[int]:
    """An HTTP origin on ``address`` (HTTPS pinned to ``version`` unless None); yields its port."""
    server = _Origin(address, _Handler)
    if version is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _CERT.configure_cert(ctx)
        ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
        server.context = ctx
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@dataclass
class Tap:
    """What a relay saw flowing from its upstream (the side it connects to) back to the client."""

    downstream: bytearray = field(default_factory=bytearray)
    #: called with each chunk before it is forwarded; may return a changed chunk
    tamper: Callable[[bytes], bytes] | None = None


class BodyFlipper:
    """Flips one byte of one late application-data record body where it shows in the tunnel's traffic, once.

    :meth:`learn` is the tamper of the relay between the origin and the server (the bodies it remembers: of
    records longer than 16,000 bytes, past the first MiB, 64 bytes from their 100th on); :meth:`flip` is the tamper
    of the tunnel's wire (a byte stream's chunks or datagrams alike). ``flipped`` holds where it flipped."""

    def __init__(self, origin_side: Tap, *, kept: int = 32) -> None:
        self.origin_side = origin_side
        self.kept = kept
        self.samples: list[bytes] = []
        self.flipped: list[int] = []
        self._parsed = 0  # how far the origin's records were parsed

    def learn(self, chunk: bytes) -> bytes:
        stream = self.origin_side.downstream + chunk
        pos = self._parsed
        while pos + 5 <= len(stream):
            length = int.from_bytes(stream[pos + 3 : pos + 5], "big")
            if pos + 5 + length > len(stream):
                break
            if stream[pos] == 0x17 and length > 16000 and pos > 1 << 20 and len(self.samples) < self.kept:
                self.samples.append(bytes(stream[pos + 105 : pos + 5 + 100 + 64]))
            pos += 5 + length
        self._parsed = pos
        return chunk

    def flip(self, chunk: bytes) -> bytes:
        if self.flipped:
            return chunk
        for sample in self.samples:
            at = chunk.find(sample)
            if at >= 0:
                changed = bytearray(chunk)
                changed[at + 10] ^= 0x40
                self.flipped.append(at)
                return bytes(changed)
        return chunk


async def _pump(src: SocketStream, dst: SocketStream, tap: Tap | None) -> None:
    try:
        while True:
            data = await src.receive(65536)
            if tap is not None:
                if tap.tamper is not None:
                    data = tap.tamper(data)
                tap.downstream += data
            await dst.send(data)
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass
    finally:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await dst.send_eof()


@asynccontextmanager
async def relay(port: int, tap: Tap, first: list[bytes] | None = None) -> AsyncIterator[int]:
    """A TCP relay on 127.0.0.1 to ``port``: upstream bytes go through ``tap``; with ``first``, each
    connection's first bytes towards ``port`` are read before it connects and appended to it; yields its own
    port."""

    async def handle(client: SocketStream) -> None:
        start = b""
        if first is not None:
            start = await client.receive()
            first.append(start)
        upstream = await anyio.connect_tcp("127.0.0.1", port)
        async with client, upstream, anyio.create_task_group() as tg:
            if start:
                await upstream.send(start)
            tg.start_soon(_pump, client, upstream, None)
            await _pump(upstream, client, tap)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.cancel_scope.cancel()


@dataclass
class Tunnel:
    socks: int
    wire: Tap  # the server -> agent bytes of the tunnel


@asynccontextmanager
async def tunnel(
    *, lite_tls: bool = True, runs: bool = True, wire: Tap | None = None
) -> AsyncIterator[Tunnel]:
    security = SecurityConfig(psk=os.urandom(32))
    config = TunnelConfig(lite_tls=lite_tls, lite_tls_runs=runs)
    server = Server(
        ServerSettings(
            listen=[Endpoint.parse("tcp://127.0.0.1:0")],
            security=security,
            policy=ExitPolicy(allow_private=True),
            tunnel=config,
            drain_timeout=1.0,
        )
    )
    wire = wire or Tap()
    async with anyio.create_task_group() as tg:
        addresses = await tg.start(server.serve)
        server_port = int(addresses[0].rsplit(":", 1)[1])
        async with relay(server_port, wire) as port:
            agent = Agent(
                AgentSettings(
                    servers=[Endpoint.parse(f"tcp://127.0.0.1:{port}")],
                    security=security,
                    socks=("127.0.0.1", 0),
                    tunnel=config,
                    drain_timeout=1.0,
                )
            )
            fronts = await tg.start(agent.serve)
            yield Tunnel(int(fronts["socks"].rsplit(":", 1)[1]), wire)
            agent.shutdown()
            server.shutdown()


@asynccontextmanager
async def agent_and_server(listen: str, server_url: Callable[[int], str]) -> AsyncIterator[int]:
    """A server listening on ``listen`` and an agent whose server URL is ``server_url(port the server got)``,
    sharing a fresh key; yields the agent's SOCKS5 port."""
    async with servers_and_agent([listen], lambda ports: [server_url(ports[0])]) as (socks, _agent, _servers):
        yield socks


@asynccontextmanager
async def servers_and_agent(
    listens: Sequence[str], agent_urls: Callable[[list[int]], list[str]], *, connections: int = 1
) -> AsyncIterator[tuple[int, Agent, list[Server]]]:
    """Servers listening on ``listens`` and an agent with the server URLs ``agent_urls(the ports they got)`` and
    ``connections`` tunnels, all sharing a fresh key; yields the agent's SOCKS5 port, the agent and the servers."""
    security = SecurityConfig(psk=os.urandom(32))
    async with anyio.create_task_group() as tg:
        servers: list[Server] = []
        ports: list[int] = []
        for listen in listens:
            server = Server(
                ServerSettings(
                    listen=[Endpoint.parse(listen)],
                    security=security,
                    policy=ExitPolicy(allow_private=True),
                    drain_timeout=1.0,
                )
            )
            addresses = await tg.start(server.serve)
            servers.append(server)
            ports.append(int(addresses[0].rsplit(":", 1)[1]))
        agent = Agent(
            AgentSettings(
                servers=[Endpoint.parse(url) for url in agent_urls(ports)],
                security=security,
                socks=("127.0.0.1", 0),
                connections=connections,
                drain_timeout=1.0,
            )
        )
        fronts = await tg.start(agent.serve)
        yield int(fronts["socks"].rsplit(":", 1)[1]), agent, servers
        agent.shutdown()
        for server in servers:
            server.shutdown()


def left_tunnel(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    """The ``lite_tls.left_tunnel`` events among captured ``logs``."""
    return [e for e in logs if e["event"] == "lite_tls.left_tunnel"]


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    _CA.cert_pem.write_to_path(str(path))
    return str(path)


async def curl(socks: int, url: str, out: Path, *, ca: str | None = None, version: str | None = None) -> int:
    args = ["curl", "-sS", "--max-time", "120", "--socks5-hostname", f"127.0.0.1:{socks}", "-o", str(out)]
    if ca is not None:
        args += ["--cacert", ca]
    if version == "1.2":
        args += ["--tlsv1.2", "--tls-max", "1.2"]
    elif version == "1.3":
        args += ["--tlsv1.3"]
    result = await anyio.run_process([*args, url], check=False)
    return result.returncode


def records(stream: bytes | bytearray) -> list[tuple[int, bytes]]:
    """The TLS records (type, body) of a byte stream from a TLS endpoint."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos + 5 <= len(stream):
        length = int.from_bytes(stream[pos + 3 : pos + 5], "big")
        out.append((stream[pos], bytes(stream[pos + 5 : pos + 5 + length])))
        pos += 5 + length
    return out


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("size", [1, 64 * 1024, 64 * 1024 * 1024])
async def test_https_through_lite_tls_is_byte_exact(
    version: str, size: int, ca_file: str, tmp_path: Path
) -> None:
    target = Tap()
    async with origin(version) as https, relay(https, target) as tapped, tunnel() as t:
        out = tmp_path / "body"
        with anyio.fail_after(150):
            assert (
                await curl(
                    t.socks, f"https://127.0.0.1:{tapped}/bytes/{size}", out, ca=ca_file, version=version
                )
                == 0
            )
        assert out.read_bytes() == body_for(size)
    wire = bytes(t.wire.downstream)
    recs = records(target.downstream)
    handshake = [body for kind, body in recs if kind == 0x16]
    app = [body for kind, body in recs if kind == 0x17 and len(body) >= 64]
    # before the switch nothing of the user's TLS is in the clear: its handshake records are sealed
    assert handshake
    assert all(body[:48] not in wire for body in handshake if len(body) >= 48)
    # after it, the bodies of its application-data records travel unchanged (the largest ones at least)
    if size >= 64 * 1024:
        big = [body for body in app if len(body) > 16000]
        assert big
        found = sum(body in wire for body in big)
        assert found >= len(big) // 2, (found, len(big))


@pytest.mark.parametrize("runs", [True, False])
async def test_with_runs_consecutive_bodies_lie_side_by_side_on_the_wire(
    runs: bool, ca_file: str, tmp_path: Path
) -> None:
    """A passthrough record of a run carries its records' bodies one after the other (their headers sealed in
    front of them all); without lite-tls-runs every body has its own record, so a sealed part lies between."""
    target = Tap()
    size = 8 << 20
    async with origin("1.3") as https, relay(https, target) as tapped, tunnel(runs=runs) as t:
        out = tmp_path / "body"
        with anyio.fail_after(60):
            assert await curl(t.socks, f"https://127.0.0.1:{tapped}/bytes/{size}", out, ca=ca_file) == 0
        assert out.read_bytes() == body_for(size)
    wire = bytes(t.wire.downstream)
    app = [body for kind, body in records(target.downstream) if kind == 0x17 and len(body) > 16000]
    assert len(app) > 100
    joints = sum(a[-32:] + b[:32] in wire for a, b in itertools.pairwise(app))
    clear = sum(body[-32:] in wire for body in app)  # (a record cut by the credit goes sealed)
    assert clear >= len(app) // 2, (clear, len(app))
    if (
        runs
    ):  # (the relay in front of the server reads 64 KiB at a time: a run is the whole records of a read)
        assert joints >= clear // 4, (joints, clear)
    else:
        assert joints == 0


async def test_without_lite_tls_nothing_of_the_users_tls_is_in_the_clear(
    ca_file: str, tmp_path: Path
) -> None:
    target = Tap()
    async with (
        origin("1.3") as https,
        relay(https, target) as tapped,
        tunnel(lite_tls=False) as t,
    ):
        out = tmp_path / "body"
        with anyio.fail_after(60):
            assert await curl(t.socks, f"https://127.0.0.1:{tapped}/bytes/{1 << 20}", out, ca=ca_file) == 0
        assert out.read_bytes() == body_for(1 << 20)
    wire = bytes(t.wire.downstream)
    assert not any(body[:48] in wire for kind, body in records(target.downstream) if len(body) >= 48)


async def test_a_stream_that_is_not_tls_falls_back_and_works(tmp_path: Path) -> None:
    async with origin(None) as plain, tunnel() as t:
        out = tmp_path / "body"
        with anyio.fail_after(60):
            assert await curl(t.socks, f"http://127.0.0.1:{plain}/bytes/{3 << 20}", out) == 0
        assert out.read_bytes() == body_for(3 << 20)


async def test_a_flipped_byte_in_a_passthrough_body_breaks_only_that_stream(
    ca_file: str, tmp_path: Path
) -> None:
    target = Tap()
    flipper = BodyFlipper(target)
    target.tamper = flipper.learn
    size = 32 * 1024 * 1024
    async with (
        origin("1.3") as https,
        origin("1.2") as other,
        relay(https, target) as tapped,
        tunnel(wire=Tap(tamper=flipper.flip)) as t,
    ):
        codes: dict[str, int] = {}

        async def fetch(name: str, port: int) -> None:
            codes[name] = await curl(
                t.socks, f"https://127.0.0.1:{port}/bytes/{size}", tmp_path / name, ca=ca_file
            )

        with anyio.fail_after(150):
            async with anyio.create_task_group() as tg:
                tg.start_soon(fetch, "tampered", tapped)
                tg.start_soon(fetch, "parallel", other)
    assert flipper.flipped, "no passthrough body was seen on the wire"
    assert codes["tampered"] != 0  # the user's TLS caught it: bad record MAC
    assert codes["parallel"] == 0
    assert (tmp_path / "parallel").read_bytes() == body_for(size)


async def test_a_half_close_through_a_lite_tls_stream_reaches_the_destination() -> None:
    """The user's FIN on a lite-tls stream goes after what the session queued, once (the destination reads to its
    end of stream and still answers over the other direction)."""
    seen: dict[str, int] = {}

    async def answer_after_eof(conn: SocketStream) -> None:
        async with conn:
            got = bytearray()
            with contextlib.suppress(anyio.EndOfStream):
                while True:
                    got += await conn.receive()
            seen["bytes"] = len(got)
            await conn.send(b"read %d bytes to the end" % len(got))

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, answer_after_eof)
        async with tunnel() as t:
            with anyio.fail_after(30):
                client = await anyio.connect_tcp("127.0.0.1", t.socks)
                async with client:
                    await client.send(b"\x05\x01\x00")
                    assert await client.receive(2) == b"\x05\x00"
                    await client.send(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big"))
                    assert (await client.receive(10))[:2] == b"\x05\x00"
                    await client.send(b"not TLS, so the session falls back")
                    await client.send_eof()
                    reply = bytearray()
                    with contextlib.suppress(anyio.EndOfStream):
                        while True:
                            reply += await client.receive()
            assert reply == b"read 34 bytes to the end"
            assert seen == {"bytes": 34}
        tg.cancel_scope.cancel()
