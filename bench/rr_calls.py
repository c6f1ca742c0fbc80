"""Python calls per 64-byte request/response through a ``--forward`` agent and a ``--target`` server (a
development tool, not a test).

    python -m bench.rr_calls [--transport kcp|rudp|tcp] [--key] [--rounds 2000] [--top 40] [--callers] [--no-profile]

The agent and the server run in this process, on one event loop (uvloop when installed); the client and the
echo server run in a thread of their own with blocking sockets, so only the tunnel's work is on the loop's
thread. After a warm-up, ``sys.setprofile`` counts the calls the loop's thread makes (Python functions and the
C functions they call) over ``--rounds`` round trips; the counts are of both ends of the tunnel together.
Prints the calls per round trip, and with ``--top`` the functions called most; ``--no-profile`` counts nothing and
prints the wall and CPU time per round trip (of the whole process: agent, server, client and echo, without the
profiler's cost); ``--callers`` prints the most frequent caller -> callee pairs instead of the functions (C functions too: which Python function calls ``len`` most). Loopback
only. ``--key``: both ends share a fresh pre-shared key (the sealed tunnel).
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import sys
import threading
import time
from types import FrameType
from typing import Any

import anyio

from vtunnel.apps.agent import Agent, AgentSettings, Forward
from vtunnel.apps.server import Server, ServerSettings
from vtunnel.runtime.process import run_async
from vtunnel.testing.ports import free_port
from vtunnel.transports.base import Endpoint, SecurityConfig

URLS = {
    "kcp": "kcp://127.0.0.1:0?mode=fast3&mtu=1350",
    "rudp": "rudp://127.0.0.1:0",
    "tcp": "tcp://127.0.0.1:0",
}
MESSAGE = bytes(64)
WARMUP = 300


def _echo(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def _name(frame: FrameType | None) -> str:
    if frame is None:
        return "-"
    code = frame.f_code
    return "/".join(code.co_filename.rsplit("/", 2)[-2:]) + ":" + code.co_qualname


class Counter:
    def __init__(self) -> None:
        self.python: collections.Counter[str] = collections.Counter()
        self.native: collections.Counter[str] = collections.Counter()
        self.pairs: collections.Counter[str] = collections.Counter()

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            name = _name(frame)
            self.python[name] += 1
            self.pairs[f"{_name(frame.f_back)} -> {name}"] += 1
        elif event == "c_call":
            name = getattr(arg, "__qualname__", repr(arg))
            self.native[name] += 1
            self.pairs[f"{_name(frame)} -> {name}"] += 1


async def _main(transport: str, rounds: int, top: int, profile: bool, callers: bool, key: bool) -> None:
    echo = socket.create_server(("127.0.0.1", 0))
    echo_port = echo.getsockname()[1]
    threading.Thread(target=_echo, args=(echo,), daemon=True).start()
    security = SecurityConfig(psk=os.urandom(32) if key else None)
    server = Server(
        ServerSettings(
            listen=[Endpoint.parse(URLS[transport])], security=security, target=f"127.0.0.1:{echo_port}"
        )
    )
    forward_port = free_port()
    counter = Counter()
    done = threading.Event()
    timings: list[float] = []
    cpu: list[float] = []

    def client() -> None:
        with socket.create_connection(("127.0.0.1", forward_port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(WARMUP + rounds):
                if i == WARMUP:
                    started.set()
                    time.sleep(0.2)
                    timings.append(time.perf_counter())
                    cpu.append(time.process_time())
                s.sendall(MESSAGE)
                got = 0
                while got < len(MESSAGE):
                    got += len(s.recv(65536))
            timings.append(time.perf_counter())
            cpu.append(time.process_time())
        done.set()

    started = threading.Event()
    async with anyio.create_task_group() as tg:
        addresses = await tg.start(server.serve)
        agent = Agent(
            AgentSettings(
                servers=[Endpoint.parse(addresses[0])],
                security=security,
                forwards=[Forward(listen=("127.0.0.1", forward_port))],
            )
        )
        await tg.start(agent.serve)
        threading.Thread(target=client, daemon=True).start()
        await anyio.to_thread.run_sync(started.wait)
        await anyio.sleep(0.1)
        if profile:
            sys.setprofile(counter)
        await anyio.to_thread.run_sync(done.wait)
        sys.setprofile(None)
        agent.shutdown()
        server.shutdown()
    wall = (timings[1] - timings[0]) / rounds * 1e6
    if not profile:
        used = (cpu[1] - cpu[0]) / rounds * 1e6
        print(
            f"{transport}{'+key' if key else ''}: {rounds} round trips, {wall:.0f} us wall and {used:.0f} us CPU per round trip "
            "(the process: tunnel, client and echo; not profiled)"
        )
        return
    python = sum(counter.python.values())
    native = sum(counter.native.values())
    print(
        f"{transport}: {rounds} round trips, {python / rounds:.1f} Python calls and {native / rounds:.1f} C calls per round trip (agent + server)"
    )
    print(f"profiled wall time per round trip: {wall:.0f} us")
    for name, n in (counter.pairs if callers else counter.python).most_common(top):
        print(f"  {n / rounds:6.2f}  {name}")
    if top:
        print("  -- C --")
        for name, n in counter.native.most_common(top // 2):
            print(f"  {n / rounds:6.2f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=sorted(URLS), default="kcp")
    parser.add_argument("--key", action="store_true", help="seal the tunnel with a fresh pre-shared key")
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--callers", action="store_true")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    args = parser.parse_args()
    run_async(lambda: _main(args.transport, args.rounds, args.top, args.profile, args.callers, args.key))


if __name__ == "__main__":
    main()
