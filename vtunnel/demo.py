"""``vtunnel demo`` (``make run``): a server and an agent on loopback, a fresh key, and a page to fetch."""

from __future__ import annotations

import contextlib
import os

import anyio
import structlog
from anyio.abc import ByteStream

from vtunnel.apps.agent import Agent, AgentSettings, parse_hostport
from vtunnel.apps.policy import ExitPolicy
from vtunnel.apps.server import Server, ServerSettings
from vtunnel.runtime.process import serve_until_signal
from vtunnel.transports.base import Endpoint, SecurityConfig

__all__ = ["run_demo"]

log = structlog.get_logger("vtunnel.demo")

PAGE = b"<!doctype html><title>vtunnel</title><h1>Hello through vtunnel</h1>\n"


async def _serve_page(client: ByteStream) -> None:
    """A tiny HTTP/1.1 responder: one page, then close."""
    async with client:
        request = b""
        with anyio.move_on_after(10):
            while b"\r\n\r\n" not in request and len(request) < 65536:
                try:
                    request += await client.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(PAGE)
        )
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await client.send(head + PAGE)


async def run_demo(*, transport: str, socks: str, http: str, tunnel_port: int, page_port: int) -> None:
    security = SecurityConfig(psk=os.urandom(32))
    query = "?mode=fast3" if transport == "kcp" else ""
    endpoint = Endpoint.parse(f"{transport}://127.0.0.1:{tunnel_port}{query}")
    server = Server(
        ServerSettings(listen=[endpoint], security=security, policy=ExitPolicy(allow_private=True))
    )
    agent = Agent(
        AgentSettings(
            servers=[endpoint],
            security=security,
            socks=parse_hostport(socks, default_host="127.0.0.1"),
            http=parse_hostport(http, default_host="127.0.0.1"),
        )
    )

    async def start() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            page = None
            if page_port:
                page = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=page_port)
                tg.start_soon(page.serve, _serve_page)
            await tg.start(agent.serve)
            print(
                "\nvtunnel demo is running: a server and an agent on loopback over "
                f"{endpoint} with a fresh pre-shared key.\n\n"
                f"  curl --socks5-hostname {socks} http://127.0.0.1:{page_port or 'PORT'}/\n"
                f"  curl -x http://{http} http://127.0.0.1:{page_port or 'PORT'}/\n\n"
                "Press Ctrl-C to stop.\n",
                flush=True,
            )
            await stopping.wait()
            log.info("stopping the demo")
            agent.shutdown()
            server.shutdown()
            await anyio.sleep(0.3)
            tg.cancel_scope.cancel()

    stopping = anyio.Event()
    await serve_until_signal(start, stopping.set)
