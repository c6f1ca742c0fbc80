"""lite-tls splice mode over kcp:// and rudp:// with a key: an agent and a server in-process, a real HTTPS origin
and curl through SOCKS5. Once a lite-tls stream left the tunnel its bytes go over a keyless conversation of the
same transport to the server's ``splice`` UDP port (docs/lite-tls.md, splice mode); the agent reaches that port
through a UDP relay on loopback that sees (and in one test alters) the conversation's datagrams."""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from vtunnel.apps.agent import Agent, AgentSettings
from vtunnel.apps.lite_tls_splice import TICKET_LEN, conversation_endpoint
from vtunnel.apps.policy import ExitPolicy
from vtunnel.apps.server import MOVED_LOOKUP, Server, ServerSettings
from vtunnel.protocol import Role, TunnelConfig
from vtunnel.runtime.byte_stream import TunnelByteStream
from vtunnel.runtime.connection import TunnelConnection
from vtunnel.testing import ImpairmentRelay
from vtunnel.testing.ports import free_port
from vtunnel.transports.base import Endpoint, SecurityConfig, get_transport

from .test_muxed import SPLICE_MARKS, body_for, ca_file, curl, left_tunnel, origin, servers_and_agent
from .test_muxed_kcp import Address, UdpTap

__all__ = ["ca_file"]

pytestmark = SPLICE_MARKS


@asynccontextmanager
async def spliced_conversations(
    tap: Callable[[Address], UdpTap], *, lite_tls: bool = True, scheme: str = "kcp", direct: bool = False
) -> AsyncIterator[tuple[int, int, UdpTap]]:
    """A server on ``scheme`` (kcp:// or rudp://) with a fresh key and ``splice=0``, and an agent whose dedicated
    conversations reach the splice port through the UDP relay ``tap(splice port)`` makes (one client: one
    conversation at a time), or straight with ``direct``; yields the agent's SOCKS5 port, the server's splice port
    and the relay."""
    security = SecurityConfig(psk=os.urandom(32))
    config = TunnelConfig(lite_tls=lite_tls)
    async with anyio.create_task_group() as tg:
        server = Server(
            ServerSettings(
                listen=[Endpoint.parse(f"{scheme}://127.0.0.1:0?splice=0")],
                security=security,
                policy=ExitPolicy(allow_private=True),
                tunnel=config,
                drain_timeout=1.0,
            )
        )
        addresses = await tg.start(server.serve)
        server_port = int(addresses[0].rsplit(":", 1)[1])
        splice_port = int(server.splice_addresses[0].rsplit(":", 1)[1])
        udp = tap(("127.0.0.1", splice_port))
        try:
            agent = Agent(
                AgentSettings(
                    servers=[
                        Endpoint.parse(
                            f"{scheme}://127.0.0.1:{server_port}?splice={splice_port if direct else udp.port}"
                        )
                    ],
                    security=security,
                    socks=("127.0.0.1", 0),
                    tunnel=config,
                    drain_timeout=1.0,
                )
            )
            fronts = await tg.start(agent.serve)
            yield int(fronts["socks"].rsplit(":", 1)[1]), splice_port, udp
            agent.shutdown()
            server.shutdown()
        finally:
            udp.close()


@pytest.mark.parametrize(("scheme", "version"), [("kcp", "1.3"), ("kcp", "1.2"), ("rudp", "1.3")])
async def test_https_leaves_over_a_keyless_conversation_and_is_byte_exact(
    scheme: str, version: str, ca_file: str, tmp_path: Path
) -> None:
    size = (64 if version == "1.3" else 4) * 1024 * 1024
    with capture_logs() as logs:
        async with (
            origin(version) as https,
            spliced_conversations(lambda t: UdpTap(t, keep=True), scheme=scheme) as (socks, _, udp),
        ):
            out = tmp_path / "body"
            with anyio.fail_after(150):
                assert (
                    await curl(
                        socks, f"https://127.0.0.1:{https}/bytes/{size}", out, ca=ca_file, version=version
                    )
                    == 0
                )
            assert out.read_bytes() == body_for(size)
    left = left_tunnel(logs)
    assert sorted(str(e["role"]) for e in left) == ["active", "passive"], left
    assert all(e["mode"] == "spliced" for e in left)
    # the body came over the conversation (server -> agent), the user's TLS records in it as they were
    assert len(udp.wire) > size
    assert body_for(size)[:4096] not in udp.wire


async def test_plain_http_never_opens_a_conversation(tmp_path: Path) -> None:
    async with origin(None) as http, spliced_conversations(lambda t: UdpTap(t)) as (socks, _, udp):
        out = tmp_path / "body"
        with anyio.fail_after(60):
            assert await curl(socks, f"http://127.0.0.1:{http}/bytes/100000", out) == 0
        assert out.read_bytes() == body_for(100000)
        assert udp.datagrams == 0


async def test_a_conversation_without_a_valid_ticket_gets_nothing_and_is_closed() -> None:
    async with spliced_conversations(lambda t: UdpTap(t)) as (_, splice_port, _udp):
        endpoint = conversation_endpoint(Endpoint.parse("kcp://127.0.0.1:1"), splice_port)
        link = await get_transport("kcp").connect(endpoint, security=SecurityConfig())
        conn = TunnelConnection(link, role=Role.CLIENT, config=TunnelConfig(lite_tls=False))
        async with anyio.create_task_group() as tg:
            tg.start_soon(conn.run)
            await conn.wait_ready()
            stream = TunnelByteStream(await conn.open_stream(None))
            await stream.send(secrets.token_bytes(TICKET_LEN))
            got = b""
            with anyio.fail_after(10):  # parked CLAIM_TIMEOUT seconds for its SYN, then refused
                try:
                    while True:
                        got += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
            assert got == b""  # no ACK
            conn.shutdown("done")


class _Flipper:
    """Flips one byte in the middle of ten large server -> agent datagrams of a conversation, from the 50th on:
    inside a KCP segment's data, so KCP delivers it and only the user's TLS can notice."""

    def __init__(self) -> None:
        self.seen = 0
        self.flipped = 0

    def __call__(self, datagram: bytes) -> bytes:
        if len(datagram) < 1000:
            return datagram
        self.seen += 1
        if self.seen < 50 or self.flipped >= 10:
            return datagram
        self.flipped += 1
        changed = bytearray(datagram)
        changed[700] ^= 0x40
        return bytes(changed)


async def test_a_flipped_byte_on_a_conversation_breaks_only_that_stream(ca_file: str, tmp_path: Path) -> None:
    size = 16 * 1024 * 1024
    flipper = _Flipper()
    async with (
        origin("1.3") as https,
        origin(None) as http,
        spliced_conversations(lambda t: UdpTap(t, flipper)) as (socks, _, _udp),
    ):
        tls_out, plain_out = tmp_path / "tls", tmp_path / "plain"
        codes: dict[str, int] = {}

        async def fetch(name: str, url: str, out: Path, ca: str | None) -> None:
            codes[name] = await curl(socks, url, out, ca=ca)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(fetch, "tls", f"https://127.0.0.1:{https}/bytes/{size}", tls_out, ca_file)
                tg.start_soon(fetch, "plain", f"http://127.0.0.1:{http}/bytes/{size}", plain_out, None)
        assert flipper.flipped > 0
        # the TLS stream fails (its records' MAC), the other stream of the tunnel is untouched
        assert codes["tls"] != 0
        assert codes["plain"] == 0
        assert plain_out.read_bytes() == body_for(size)


async def test_an_agent_whose_conversations_get_no_answer_leaves_muxed_and_is_byte_exact(
    ca_file: str, tmp_path: Path
) -> None:
    """The agent's conversations go to a UDP port nobody serves: after the wait for the ACK the stream leaves
    muxed (its PASSTHROUGH frames sealed in the session's datagrams, kcp:// without passthrough), and the download
    is whole."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        dead = ("127.0.0.1", int(sock.getsockname()[1]))
    size = 4 * 1024 * 1024
    with capture_logs() as logs:
        async with origin("1.3") as https, spliced_conversations(lambda _: UdpTap(dead)) as (socks, _, udp):
            out = tmp_path / "body"
            with anyio.fail_after(60):
                assert await curl(socks, f"https://127.0.0.1:{https}/bytes/{size}", out, ca=ca_file) == 0
            assert out.read_bytes() == body_for(size)
            assert udp.datagrams == 0  # nothing came back
    left = left_tunnel(logs)
    assert sorted(str(e["role"]) for e in left) == ["active", "passive"], left
    assert all(e["mode"] == "muxed" for e in left)
    assert any(e["event"] == "lite_tls.splice_dial_failed" for e in logs)


async def test_a_conversation_ends_at_both_ends_once_its_stream_is_over(ca_file: str, tmp_path: Path) -> None:
    with capture_logs() as logs:
        async with origin("1.3") as https, spliced_conversations(lambda t: UdpTap(t)) as (socks, _, _udp):
            out = tmp_path / "body"
            with anyio.fail_after(60):
                assert await curl(socks, f"https://127.0.0.1:{https}/bytes/100000", out, ca=ca_file) == 0
            # the agent's and the server's KCP session of the conversation close; the tunnel's stay up
            with anyio.fail_after(10):
                while sum(e["event"] == "kcp session closed" for e in logs) < 2:
                    await anyio.sleep(0.05)
            await anyio.sleep(0.5)
            assert sum(e["event"] == "kcp session closed" for e in logs) == 2
    assert len(left_tunnel(logs)) == 2


async def test_parallel_https_streams_each_leave_over_their_own_conversation(
    ca_file: str, tmp_path: Path
) -> None:
    count, size = 6, 2 * 1024 * 1024
    with capture_logs() as logs:
        async with (
            origin("1.3") as https,
            spliced_conversations(lambda t: UdpTap(t), direct=True) as (socks, _, _udp),
        ):
            codes: list[int] = []

            async def fetch(index: int) -> None:
                out = tmp_path / f"body{index}"
                codes.append(await curl(socks, f"https://127.0.0.1:{https}/bytes/{size}", out, ca=ca_file))
                assert out.read_bytes() == body_for(size)

            with anyio.fail_after(90):
                async with anyio.create_task_group() as tg:
                    for index in range(count):
                        tg.start_soon(fetch, index)
            assert codes == [0] * count
    left = left_tunnel(logs)
    assert len(left) == 2 * count
    assert all(e["mode"] == "spliced" for e in left)


async def _garbage_to(port: int, count: int, seed: int) -> int:
    """Send ``count`` datagrams of random bytes, half of them shaped like KCP segments (a random conv, a known
    command byte, a length that may or may not match), to ``127.0.0.1:port`` from one socket; returns how many
    answers came back."""
    rng = random.Random(seed)
    answers = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for index in range(count):
            body = rng.randbytes(rng.randrange(1, 1400))
            if index % 2:
                header = struct.pack(
                    "<IBBHIII", rng.getrandbits(32), rng.choice((81, 82, 83, 84)), 0, 128, 0, index, 0
                ) + struct.pack("<I", rng.choice((len(body), rng.randrange(0, 2000))))
                body = header + body
            with contextlib.suppress(BlockingIOError):
                sock.sendto(body, ("127.0.0.1", port))
            if index % 64 == 0:
                await anyio.sleep(0.001)
                with contextlib.suppress(BlockingIOError):
                    while sock.recv(65536):
                        answers += 1
    return answers


async def test_garbage_at_the_splice_port_disturbs_no_conversation(ca_file: str, tmp_path: Path) -> None:
    size = 16 * 1024 * 1024
    async with (
        origin("1.3") as https,
        spliced_conversations(lambda t: UdpTap(t), direct=True) as (socks, splice_port, _udp),
    ):
        for attempt in range(2):  # while garbage arrives, and after it
            out = tmp_path / f"body{attempt}"
            with anyio.fail_after(90):
                async with anyio.create_task_group() as tg:
                    if attempt == 0:
                        tg.start_soon(_garbage_to, splice_port, 4000, 7)
                    assert await curl(socks, f"https://127.0.0.1:{https}/bytes/{size}", out, ca=ca_file) == 0
            assert out.read_bytes() == body_for(size)


async def _pushes_from(host: str, port: int, count: int) -> int:
    """Send ``count`` well-formed KCP PUSH segments, each of a conversation of its own, from ``host`` to
    ``127.0.0.1:port``; returns how many datagrams came back within a short while after."""
    answers = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        sock.setblocking(False)
        for conv in range(1, count + 1):
            data = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            sock.sendto(
                struct.pack("<IBBHIIII", conv, 81, 0, 128, 0, 0, 0, len(data)) + data, ("127.0.0.1", port)
            )
        with anyio.move_on_after(1.0):
            while True:
                await anyio.sleep(0.05)
                with contextlib.suppress(BlockingIOError):
                    while sock.recv(65536):
                        answers += 1
    return answers


async def test_the_splice_port_answers_no_host_without_a_tunnel(tmp_path: Path) -> None:
    """A keyless conversation starts only from a host the server has a tunnel from: a stranger's datagrams get
    no answer (no reflection), while the same ones from the tunnel's host do start conversations."""
    async with (
        origin(None) as http,
        spliced_conversations(lambda t: UdpTap(t), direct=True) as (socks, splice_port, _udp),
    ):
        with anyio.fail_after(30):  # the tunnel (from 127.0.0.1) is up
            assert await curl(socks, f"http://127.0.0.1:{http}/bytes/1000", tmp_path / "body") == 0
        assert await _pushes_from("127.0.0.2", splice_port, 50) == 0
        assert await _pushes_from("127.0.0.1", splice_port, 50) > 0


async def test_the_splice_port_admits_the_host_a_tunnel_moved_to(tmp_path: Path) -> None:
    """The tunnel's peer moves to another IP address (the relay between agent and server takes a source on
    127.0.0.2: a NAT's other address, a client on another network) and the keyed session follows it: the splice
    port then starts conversations from there too, not only from the host the tunnel came from. (kcp://: the
    conversations the test starts are KCP segments; the admission is the server's, the same for rudp://.)"""
    port = free_port(socket.SOCK_DGRAM)
    async with (
        origin(None) as http,
        ImpairmentRelay(("127.0.0.1", port)) as relay,
        servers_and_agent(
            [f"kcp://127.0.0.1:{port}?splice=0"], lambda _ports: [f"kcp://127.0.0.1:{relay.address[1]}"]
        ) as (socks, _agent, (server,)),
    ):
        splice_port = int(server.splice_addresses[0].rsplit(":", 1)[1])
        with anyio.fail_after(30):
            assert await curl(socks, f"http://127.0.0.1:{http}/bytes/1000", tmp_path / "before") == 0
        assert await _pushes_from("127.0.0.2", splice_port, 20) == 0  # (no tunnel from there yet)
        relay.rebind("127.0.0.2")
        with anyio.fail_after(30):  # the session follows the move
            assert await curl(socks, f"http://127.0.0.1:{http}/bytes/1000", tmp_path / "after") == 0
        (moved,) = relay.upstream_addresses
        assert moved[0] == "127.0.0.2"
        await anyio.sleep(MOVED_LOOKUP)  # (where the peers are is looked up at most once a second)
        assert await _pushes_from("127.0.0.2", splice_port, 20) > 0
