"""Quick loopback measurements of ``kcp://`` and the impairment relay (a development tool, not a test).

    python -m bench.kcp_measure bulk [--mib 256] [--mode fast3] [--sealed]
    python -m bench.kcp_measure idle [--seconds 20]
    python -m bench.kcp_measure relay [--seconds 3] [--loss 0.1]

``bulk``: one client ByteStream sends to a server ByteStream in another process (no tunnel protocol on top);
prints MB/s. ``idle``: one open, idle session (client and server in this process); prints the CPU used.
``relay``: a sender process blasts 1200-byte datagrams through the relay to a sink process; prints the
datagrams/s that arrived and the relay's CPU-bound ceiling (datagrams forwarded per CPU second it used).
Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import anyio

from vtunnel.transports.base import Endpoint, SecurityConfig
from vtunnel.transports.kcp.link import KCPLink
from vtunnel.transports.kcp.listener import KCPListener
from vtunnel.transports.kcp.transport import KCPTransport
from vtunnel.transports.link import LinkStream

_KEY = SecurityConfig(psk=bytes(range(32)))


def _security(sealed: bool) -> SecurityConfig:
    return _KEY if sealed else SecurityConfig()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run(main: Any, *args: Any) -> None:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        anyio.run(main, *args)
    else:
        anyio.run(main, *args, backend_options={"use_uvloop": True})


# --- bulk --------------------------------------------------------------------------------------------------


async def _serve_sink(query: str, sealed: bool) -> None:
    listener = await KCPTransport().listen(
        Endpoint.parse(f"kcp://127.0.0.1:0{query}"), security=_security(sealed)
    )
    assert isinstance(listener, KCPListener)
    print(json.dumps({"port": listener.local_address[1]}), flush=True)
    async with LinkStream(await listener.accept()) as stream:
        header = await stream.receive(8)
        total = int.from_bytes(header[:8], "big")
        got = len(header) - 8
        while got < total:
            got += len(await stream.receive())
        await stream.send(b"done")
        await anyio.sleep(0.5)
    await listener.aclose()


async def _bulk(mib: int, query: str, sealed: bool) -> None:
    command = [sys.executable, "-m", "bench.kcp_measure", "serve", "--query", query]
    if sealed:
        command.append("--sealed")
    with subprocess.Popen(command, stdout=subprocess.PIPE) as proc:  # noqa: ASYNC220
        assert proc.stdout is not None
        port = json.loads(proc.stdout.readline())["port"]
        link = await KCPTransport().connect(
            Endpoint.parse(f"kcp://127.0.0.1:{port}{query}"), security=_security(sealed)
        )
        total = mib * 1024 * 1024
        block = os.urandom(256 * 1024)
        async with LinkStream(link) as client:
            start = time.perf_counter()
            cpu = _cpu_seconds()
            await client.send(total.to_bytes(8, "big"))
            sent = 0
            while sent < total:
                await client.send(block)
                sent += len(block)
            assert await client.receive() == b"done"
            elapsed = time.perf_counter() - start
            cpu = _cpu_seconds() - cpu
            engine_stats = link.engine.stats() if isinstance(link, KCPLink) else {}
        proc.wait(timeout=30)
    print(
        json.dumps(
            {
                "bulk_MBps": round(total / elapsed / 1e6, 1),
                "seconds": round(elapsed, 2),
                "client_cpu_s": round(cpu, 2),
                **engine_stats,
            }
        )
    )


# --- idle --------------------------------------------------------------------------------------------------


async def _idle(seconds: float, query: str) -> None:
    transport = KCPTransport()
    listener = await transport.listen(Endpoint.parse(f"kcp://127.0.0.1:0{query}"), security=SecurityConfig())
    assert isinstance(listener, KCPListener)
    link = await transport.connect(
        Endpoint.parse(f"kcp://127.0.0.1:{listener.local_address[1]}{query}"), security=SecurityConfig()
    )
    async with LinkStream(link) as client:
        await client.send(b"hello")
        async with LinkStream(await listener.accept()) as server:
            await server.receive()
            await server.send(b"hi")
            await client.receive()
            await anyio.sleep(1.0)  # let the last ACKs settle
            cpu, wall = _cpu_seconds(), time.perf_counter()
            await anyio.sleep(seconds)
            cpu, wall = _cpu_seconds() - cpu, time.perf_counter() - wall
            print(
                json.dumps(
                    {
                        "idle_seconds": round(wall, 1),
                        "cpu_s": round(cpu, 4),
                        "cpu_percent": round(100 * cpu / wall, 3),
                    }
                )
            )
    await listener.aclose()


# --- relay -------------------------------------------------------------------------------------------------

_SINK = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("127.0.0.1", 0)); s.settimeout(5.0)
print(s.getsockname()[1], flush=True)
n, first, last = 0, None, None
try:
    while True:
        s.recv(2048); n += 1
        last = time.perf_counter()
        first = first or last
except socket.timeout:
    pass
print(n, (last or 0) - (first or 0), flush=True)
"""

_BLAST = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
s.connect(("127.0.0.1", int(sys.argv[1]))); d = b"x" * 1200; end = time.time() + float(sys.argv[2])
while time.time() < end:
    for _ in range(1000):
        try:
            s.send(d)
        except OSError:
            pass
"""


async def _relay(seconds: float, loss: float) -> None:
    from vtunnel.testing.relay import Impairment, ImpairmentRelay

    with subprocess.Popen([sys.executable, "-c", _SINK], stdout=subprocess.PIPE, text=True) as sink:  # noqa: ASYNC220
        assert sink.stdout is not None
        sink_port = int(sink.stdout.readline())
        async with ImpairmentRelay(("127.0.0.1", sink_port), up=Impairment(loss=loss)) as relay:
            cpu = _cpu_seconds()
            blast = subprocess.Popen([sys.executable, "-c", _BLAST, str(relay.address[1]), str(seconds)])  # noqa: ASYNC220
            await anyio.to_thread.run_sync(blast.wait)
            await anyio.sleep(0.5)
            stats = relay.stats()
            cpu = _cpu_seconds() - cpu
        count, span = sink.stdout.readline().split()
        sink.wait(timeout=30)
    rate = int(count) / float(span) if float(span) > 0 else 0.0
    forwarded = stats["up"]["received"]
    # the relay's own CPU per datagram bounds what it can forward on one free core
    ceiling = forwarded / cpu if cpu > 0 else 0.0
    print(
        json.dumps(
            {"relay_datagrams_per_s": round(rate), "cpu_bound_ceiling": round(ceiling), "relay_stats": stats}
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kcp_measure")
    parser.add_argument("what", choices=["bulk", "idle", "relay", "serve"])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--query", default="?mode=fast3&sndwnd=1024&rcvwnd=1024")
    parser.add_argument("--sealed", action="store_true")
    parser.add_argument("--loss", type=float, default=0.0, help="relay: loss to apply")
    args = parser.parse_args(argv)
    if args.what == "serve":
        _run(_serve_sink, args.query, args.sealed)
    elif args.what == "bulk":
        _run(_bulk, args.mib, args.query, args.sealed)
    elif args.what == "idle":
        _run(_idle, args.seconds, args.query)
    else:
        _run(_relay, min(args.seconds, 10.0), args.loss)
    return 0


if __name__ == "__main__":
    sys.exit(main())
