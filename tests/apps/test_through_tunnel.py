"""The fronts and the exit side joined by a real tunnel (agent and server in-process, TCP transport, PSK)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from python_socks import ProxyType
from python_socks.async_.anyio import Proxy

from vtunnel.apps.agent import Agent, AgentSettings, Forward
from vtunnel.apps.policy import ExitPolicy
from vtunnel.apps.server import Server, ServerSettings
from vtunnel.apps.socks5 import Command, Reply, encode_address, encode_request, parse_reply
from vtunnel.runtime.byte_stream import TunnelByteStream
from vtunnel.transports.base import Endpoint, SecurityConfig

from .conftest import Origin, body_for, serve_front
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
                servers=[Endpoint.parse(addresses[0])],
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
            stream = TunnelByteStream(await pair.agent.open(None))
            async with stream:
                rest = await websocks_connect(stream, "bob", "pw", "localhost", origin.port)
                await stream.send(b"GET /bytes/54321 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                response = await read_all(stream, rest)
    assert response.endswith(b"\r\n\r\n" + body_for("/bytes/54321", 54321))


# ------------------------------------------------------------------------------------------------ --forward
# Forwarded connections are relayed by callbacks on both sides (SocketRelay): byte-exact, half-close, refusals,
# the exit's idle timeout and the agent's drain behave as with the task-based pipe.


async def _echo_until_eof(stream: SocketStream) -> None:
    """An origin that answers everything it read only after the request ended (tests the half-close)."""
    async with stream:
        got = bytearray()
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            while True:
                got += await stream.receive()
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await stream.send(bytes(got[::-1]))
            await stream.send_eof()


@asynccontextmanager
async def forwarding(
    destination: str | None, *, target: str | None = None, idle_timeout: float | None = None
) -> AsyncIterator[tuple[Agent, int, anyio.abc.TaskGroup]]:
    security = SecurityConfig(psk=os.urandom(32))
    server = Server(
        ServerSettings(
            listen=[Endpoint.parse("tcp://127.0.0.1:0")],
            security=security,
            policy=ExitPolicy(allow_private=True),
            target=target,
            drain_timeout=5.0,
            idle_timeout=idle_timeout,
        )
    )
    async with anyio.create_task_group() as tg:
        addresses = await tg.start(server.serve)
        spec = "127.0.0.1:0" + (f"={destination}" if destination else "")
        agent = Agent(
            AgentSettings(
                servers=[Endpoint.parse(addresses[0])],
                security=security,
                forwards=[Forward.parse(spec)],
                drain_timeout=5.0,
            )
        )
        fronts = await tg.start(agent.serve)
        yield agent, _port(next(iter(fronts.values()))), tg
        agent.shutdown()
        server.shutdown()


async def _request(port: int, payload: bytes) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(payload)
        await stream.send_eof()
        out = bytearray()
        with contextlib.suppress(anyio.EndOfStream):
            while True:
                out += await stream.receive()
        return bytes(out)


@pytest.mark.parametrize("by_target", [False, True])
async def test_forward_relays_byte_exact_with_half_close(by_target: bool) -> None:
    async with serve_front(_echo_until_eof) as origin:
        dest = f"127.0.0.1:{origin}"
        async with forwarding(None if by_target else dest, target=dest if by_target else None) as (
            _,
            port,
            _,
        ):
            payloads = [os.urandom(n) for n in (1, 70_000, 3_000_000)]
            with anyio.fail_after(30):
                for payload in payloads:
                    assert await _request(port, payload) == payload[::-1]


@pytest.mark.parametrize("by_target", [False, True])
async def test_forwarded_streams_open_and_dial_without_a_task(by_target: bool) -> None:
    """With the tunnel up, a forwarded connection's stream is opened by the agent's accept callback and dialed
    and relayed by the server's handler in the tunnel's input step: no task on either side, however many."""
    async with serve_front(_echo_until_eof) as origin:
        dest = f"127.0.0.1:{origin}"
        async with forwarding(None if by_target else dest, target=dest if by_target else None) as (
            _,
            port,
            _,
        ):
            with anyio.fail_after(30):
                assert await _request(port, b"up") == b"pu"  # the tunnel is up
                loop = asyncio.get_running_loop()
                started: list[str] = []

                def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
                    started.append(getattr(coro, "__qualname__", repr(coro)))
                    return asyncio.Task(coro, loop=loop, **kwargs)

                loop.set_task_factory(factory)
                try:
                    payloads = [os.urandom(1000 + i) for i in range(64)]
                    answers: dict[int, bytes] = {}

                    async def one(i: int) -> None:
                        answers[i] = await _request(port, payloads[i])

                    async with anyio.create_task_group() as clients:
                        for i in range(len(payloads)):
                            clients.start_soon(one, i)
                finally:
                    loop.set_task_factory(None)
                assert [answers[i] for i in range(len(payloads))] == [p[::-1] for p in payloads]
                # three per connection are the test's own (the client, its connect, the origin's handler) and none
                # the tunnel's: a task per stream on the agent and on the server would make it five
                assert len(started) <= 3 * len(payloads) + 8, len(started)


async def test_forward_to_a_refused_destination_closes_the_connection_and_serves_on() -> None:
    async with forwarding(f"127.0.0.1:{_closed_port()}") as (agent, port, _):
        with anyio.fail_after(10):
            for _ in range(3):  # each one is refused on its own; the front keeps accepting
                async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                    await stream.send(b"hello")  # 0-RTT: sent before the refusal comes back
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                        await stream.receive()
            while agent._active:  # every refused connection's relay ended
                await anyio.sleep(0.01)


async def test_the_exit_idle_timeout_ends_a_quiet_forwarded_connection() -> None:
    async def hold(stream: SocketStream) -> None:
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    await stream.receive()

    async with (
        serve_front(hold) as origin,
        forwarding(f"127.0.0.1:{origin}", idle_timeout=0.3) as (_, port, _),
    ):
        with anyio.fail_after(10):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"x")
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await stream.receive()


async def _refuses_connections(port: int) -> bool:
    for _ in range(200):  # the listener closes as soon as serve() sees the shutdown
        try:
            probe = await anyio.connect_tcp("127.0.0.1", port)
        except OSError:
            return True
        await probe.aclose()
        await anyio.sleep(0.01)
    return False


async def test_agent_drain_lets_an_open_forwarded_transfer_finish() -> None:
    payload = os.urandom(2_000_000)
    async with (
        serve_front(_echo_until_eof) as origin,
        forwarding(f"127.0.0.1:{origin}") as (agent, port, _),
    ):
        with anyio.fail_after(30):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(payload[:1000])
                while not agent._active:  # the relay exists: the connection was accepted
                    await anyio.sleep(0.01)
                agent.shutdown()  # stops accepting; the open connection drains
                assert await _refuses_connections(port)
                await stream.send(payload[1000:])
                await stream.send_eof()
                out = bytearray()
                with contextlib.suppress(anyio.EndOfStream):
                    while True:
                        out += await stream.receive()
                assert bytes(out) == payload[::-1]


# ------------------------------------------------------------------------------------------------ hand-off
# A SOCKS5 or HTTP CONNECT client is read as a stream until its header is done, then its socket is handed to a
# SocketRelay: what the client sent early still arrives first, half-close works, no task stays per connection,
# and the agent's drain accounting ends with the relay.


async def _socks_connect(port: int, origin: int, early: bytes) -> SocketStream:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    # greeting, request and the first bytes of the payload in one write (the client does not wait for replies)
    await stream.send(b"\x05\x01\x00" + encode_request(Command.CONNECT, "127.0.0.1", origin) + early)
    data = b""
    while (reply := parse_reply(data[2:])) is None:
        data += await stream.receive()
    assert reply[0][0] == Reply.SUCCEEDED
    assert data[2 + reply[1] :] == b""  # nothing of the answer yet: the origin answers after our FIN
    return stream


async def _http_connect(port: int, origin: int, early: bytes) -> SocketStream:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(f"CONNECT 127.0.0.1:{origin} HTTP/1.1\r\nHost: x\r\n\r\n".encode() + early)
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive()
    assert head.startswith(b"HTTP/1.1 200"), head
    assert head.endswith(b"\r\n\r\n")
    return stream


@pytest.mark.parametrize("front", ["socks", "http"])
async def test_fronts_hand_the_socket_to_a_relay_with_early_bytes_first(front: str) -> None:
    async with (
        serve_front(_echo_until_eof) as origin,
        agent_and_server(ExitPolicy(allow_private=True)) as pair,
    ):
        connect = _socks_connect if front == "socks" else _http_connect
        port = pair.socks_port if front == "socks" else pair.http_port
        with anyio.fail_after(30):
            clients = []
            payloads = []
            for i in range(20):
                early = os.urandom(100 + i)
                clients.append(await connect(port, origin, early))
                payloads.append(early)
                if i == 0:  # the tunnel is up now: count its tasks
                    while pair.agent._active != 1:
                        await anyio.sleep(0.01)
                    await anyio.sleep(0.1)
                    before = len(_tunnel_tasks())
            while pair.agent._active != 20:
                await anyio.sleep(0.01)
            await anyio.sleep(0.1)
            # the handler tasks ended at the hand-off: nothing more per open connection
            now = _tunnel_tasks()
            assert len(now) <= before, "\n".join(sorted(now))
            for i, stream in enumerate(clients):
                rest = os.urandom(200_000 + i)
                await stream.send(rest)
                await stream.send_eof()
                payloads[i] += rest
            for stream, payload in zip(clients, payloads, strict=True):
                out = bytearray()
                with contextlib.suppress(anyio.EndOfStream):
                    while True:
                        out += await stream.receive()
                assert bytes(out) == payload[::-1]
                await stream.aclose()
            while pair.agent._active:  # each relay's end was counted
                await anyio.sleep(0.01)


def _tunnel_tasks() -> list[str]:
    """The tasks of this loop other than the test origin's (one per connection), as their await chains."""
    chains = []
    for task in asyncio.all_tasks():
        names = []
        coro: Any = task.get_coro()
        while coro is not None and hasattr(coro, "cr_code"):
            names.append(coro.cr_code.co_qualname)
            coro = coro.cr_await
        if "_echo_until_eof" not in names:
            chains.append("/".join(names))
    return chains


async def test_websocks_streams_become_relays_on_the_server() -> None:
    """After the upgrade and the SOCKS5 exchange, the exit joins the stream and its socket with a relay."""
    async with (
        serve_front(_echo_until_eof) as origin,
        agent_and_server(ExitPolicy(allow_private=True), users={"bob": "pw"}) as pair,
    ):
        with anyio.fail_after(30):
            streams = []
            for i in range(12):
                stream = TunnelByteStream(await pair.agent.open(None))
                rest = await websocks_connect(stream, "bob", "pw", "127.0.0.1", origin)
                assert rest == b""
                streams.append(stream)
                if i == 1:  # the tunnel and the first relay are up: count the tasks
                    await anyio.sleep(0.1)
                    before = len(_tunnel_tasks())
            await anyio.sleep(0.1)
            now = _tunnel_tasks()
            assert len(now) <= before, "\n".join(sorted(now))
            for i, stream in enumerate(streams):
                payload = os.urandom(50_000 + i)
                await stream.send(payload)
                await stream.send_eof()
                out = bytearray()
                with contextlib.suppress(anyio.EndOfStream):
                    while True:
                        out += await stream.receive()
                assert bytes(out) == payload[::-1]
                await stream.aclose()
