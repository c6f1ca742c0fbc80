"""The fronts and the exit side joined by a real tunnel (agent and server in-process, TCP transport, PSK)."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import pytest
from python_socks import ProxyType
from python_socks.async_.anyio import Proxy

from vtunnel.apps.agent import Agent, AgentSettings
from vtunnel.apps.policy import ExitPolicy
from vtunnel.apps.server import Server, ServerSettings
from vtunnel.apps.socks5 import Command, Reply, encode_address, encode_request, parse_reply
from vtunnel.transports.base import Endpoint, SecurityConfig

from .conftest import Origin, body_for
from .websocks_client import read_all, websocks_connect

pytestmark = pytest.mark.anyio


@dataclass(frozen=True, slots=True)
class Pair:
    agent: Agent
    socks_port: int
    http_port: int


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@asynccontextmanager
async def agent_and_server(policy: ExitPolicy, users: dict[str, str] | None = None) -> AsyncIterator[Pair]:
    security = SecurityConfig(psk=os.urandom(32))
    server = Server(
        ServerSettings(
            listen=[Endpoint.parse("tcp://127.0.0.1:0")],
            security=security,
            policy=policy,
            websocks_users=users or {},
            drain_timeout=1.0,
        )
    )
    async with anyio.create_task_group() as tg:
        addresses = await tg.start(server.serve)
        agent = Agent(
            AgentSettings(
                server=Endpoint.parse(addresses[0]),
                security=security,
                socks=("127.0.0.1", 0),
                http=("127.0.0.1", 0),
                drain_timeout=1.0,
            )
        )
        fronts = await tg.start(agent.serve)
        yield Pair(agent, _port(fronts["socks"]), _port(fronts["http"]))
        agent.shutdown()
        server.shutdown()


async def _socks_reply(port: int, request: bytes) -> int:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(b"\x05\x01\x00" + request)
        data = b""
        while (reply := parse_reply(data[2:])) is None:
            data += await stream.receive()
    return reply[0][0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_socks5_fetch_and_reply_codes(origin: Origin) -> None:
    async with agent_and_server(ExitPolicy(allow_private=True)) as pair:
        with anyio.fail_after(60):
            stream = await Proxy(ProxyType.SOCKS5, "127.0.0.1", pair.socks_port, rdns=True).connect(
                "localhost", origin.port
            )
            async with stream:
                await stream.send(b"GET /bytes/250000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                response = await read_all(stream)
            assert response.endswith(b"\r\n\r\n" + body_for("/bytes/250000", 250000))
            request = encode_request(Command.CONNECT, "127.0.0.1", _closed_port())
            assert await _socks_reply(pair.socks_port, request) == Reply.CONNECTION_REFUSED


async def test_forbidden_through_the_tunnel(origin: Origin) -> None:
    async with agent_and_server(ExitPolicy()) as pair:
        with anyio.fail_after(60):
            request = encode_request(Command.CONNECT, "localhost", origin.port)
            assert await _socks_reply(pair.socks_port, request) == Reply.NOT_ALLOWED
            async with await anyio.connect_tcp("127.0.0.1", pair.http_port) as stream:
                await stream.send(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                answer = await read_all(stream)
            assert answer.startswith(b"HTTP/1.1 403 ")


async def test_http_proxy_through_the_tunnel(origin: Origin) -> None:
    async with agent_and_server(ExitPolicy(allow_private=True)) as pair:
        with anyio.fail_after(60):
            result = await anyio.run_process(
                [
                    "curl",
                    "-sS",
                    "--max-time",
                    "30",
                    "-x",
                    f"http://127.0.0.1:{pair.http_port}",
                    f"http://localhost:{origin.port}/chunked/99999",
                    f"http://127.0.0.1:{origin.port}/bytes/12345",
                ]
            )
    assert result.stdout == body_for("/chunked/99999", 99999) + body_for("/bytes/12345", 12345)


async def test_udp_associate_through_the_tunnel() -> None:
    async with await anyio.create_udp_socket(family=socket.AF_INET, local_host="127.0.0.1") as echo:
        echo_port = echo.extra(anyio.abc.SocketAttribute.local_port)

        async def serve_echo() -> None:
            async for data, (host, port) in echo:
                await echo.sendto(data[::-1], host, port)

        async with agent_and_server(ExitPolicy(allow_private=True)) as pair, anyio.create_task_group() as tg:
            tg.start_soon(serve_echo)
            with anyio.fail_after(60):
                control = await anyio.connect_tcp("127.0.0.1", pair.socks_port)
                await control.send(b"\x05\x01\x00" + encode_request(Command.UDP_ASSOCIATE, "0.0.0.0", 0))
                data = b""
                while (reply := parse_reply(data[2:])) is None:
                    data += await control.receive()
                code, relay_host, relay_port = reply[0]
                assert code == Reply.SUCCEEDED
                header = b"\x00\x00\x00" + encode_address("127.0.0.1", echo_port)
                async with await anyio.create_udp_socket(
                    family=socket.AF_INET, local_host="127.0.0.1"
                ) as udp:
                    for i in range(20):
                        payload = os.urandom(100 + i * 50)
                        await udp.sendto(header + payload, relay_host, relay_port)
                        answer, _ = await udp.receive()
                        assert answer == header + payload[::-1]
                await control.aclose()
            tg.cancel_scope.cancel()


async def test_websocks_inside_a_tunnel_stream(origin: Origin) -> None:
    async with agent_and_server(ExitPolicy(allow_private=True), users={"bob": "pw"}) as pair:
        with anyio.fail_after(60):
            stream = await pair.agent.open(None)
            async with stream:
                rest = await websocks_connect(stream, "bob", "pw", "localhost", origin.port)
                await stream.send(b"GET /bytes/54321 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                response = await read_all(stream, rest)
    assert response.endswith(b"\r\n\r\n" + body_for("/bytes/54321", 54321))
