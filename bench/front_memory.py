"""Memory per idle connection through each of the agent's fronts: ``--forward``, SOCKS5 and HTTP ``CONNECT``.

For each front, a fresh server and agent pair (``kcp://`` or ``tcp://``, with a key) and an echo sink; a client
in this process opens N connections through the front, proves each with one echo of the sink and holds them; the
number is the RSS growth of the agent and the server together, per connection. Each front gets its own pair so
that memory freed by one measurement cannot be reused by the next. Prints a table and writes
``bench/results/front-memory.json``. Run: ``python -m bench.front_memory [--connections N] [--scheme kcp|tcp]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.open_latency import ROOT, _wait_port
from bench.procs import rss_bytes
from bench.workload import MESSAGE_SIZE, _message
from vtunnel.testing.ports import free_port

FRONTS = ("forward", "socks5", "http-connect")


async def _open_one(front: str, port: int, sink: int) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if front == "socks5":
            writer.write(
                b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", sink)
            )
            reply = await reader.readexactly(12)
            if reply[:2] != b"\x05\x00" or reply[3] != 0:
                raise RuntimeError(f"socks5 refused: {reply!r}")
        elif front == "http-connect":
            writer.write(f"CONNECT 127.0.0.1:{sink} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"CONNECT refused: {head[:40]!r}")
        message = _message(0)  # the sink's echo request
        writer.write(message)
        if await reader.readexactly(MESSAGE_SIZE) != message:
            raise RuntimeError("the echo came back different")
    except BaseException:
        writer.close()
        raise
    return writer


async def _hold(front: str, port: int, sink: int, count: int, pids: list[int]) -> float:
    gate = asyncio.Semaphore(16)

    async def one() -> asyncio.StreamWriter:
        async with gate:
            return await _open_one(front, port, sink)

    writers = [await one()]  # the tunnel is up and warm before the baseline
    await asyncio.sleep(1.0)
    before = sum(rss_bytes(pid) for pid in pids)
    async with asyncio.timeout(max(60.0, count * 0.02)):
        writers += await asyncio.gather(*(one() for _ in range(count)))
    await asyncio.sleep(1.0)
    after = sum(rss_bytes(pid) for pid in pids)
    for writer in writers:
        writer.close()
    return (after - before) / count


def _measure_front(front: str, scheme: str, count: int, key: Path) -> float:
    vtunnel = [sys.executable, "-m", "vtunnel"]
    quiet = ["--log-level", "warning"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sink = free_port()
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "bench.workload", "serve", "--listen", f"127.0.0.1:{sink}"],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        tunnel_port = free_port(socket.SOCK_DGRAM if scheme == "kcp" else socket.SOCK_STREAM)
        url = f"{scheme}://127.0.0.1:{tunnel_port}" + ("?mode=fast3" if scheme == "kcp" else "")
        server = [*vtunnel, "server", "--listen", url, "--psk-file", str(key), "--allow-private", *quiet]
        procs.append(subprocess.Popen(server, start_new_session=True))
        time.sleep(1.0)
        port = free_port()
        option = {"forward": "--forward", "socks5": "--socks", "http-connect": "--http"}[front]
        value = f"127.0.0.1:{port}" + (f"=127.0.0.1:{sink}" if front == "forward" else "")
        agent = [*vtunnel, "agent", "--server", url, "--psk-file", str(key), option, value, *quiet]
        procs.append(subprocess.Popen(agent, start_new_session=True))
        _wait_port(port)
        _wait_port(sink)
        pids = [procs[1].pid, procs[2].pid]
        return asyncio.run(_hold(front, port, sink, count, pids))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.front_memory", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--connections", type=int, default=5000, help="idle connections per front (default 5000)"
    )
    parser.add_argument("--scheme", choices=("kcp", "tcp"), default="kcp", help="transport (default kcp)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "front-memory.json")
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 20_000:
        parser.error("--connections must be between 1 and 20000")
    key = Path(tempfile.mkdtemp(prefix="vtunnel-bench-")) / "key"
    subprocess.run(
        [sys.executable, "-m", "vtunnel", "keygen", "-o", str(key)], capture_output=True, check=True
    )
    print(
        f"RSS per idle connection, agent + server, {args.connections} connections per front, {args.scheme}://"
    )
    print(f"{'front':<14} {'bytes':>8}")
    rows: dict[str, float] = {}
    for front in FRONTS:
        rows[front] = _measure_front(front, args.scheme, args.connections, key)
        print(f"{front:<14} {rows[front]:8.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"scheme": args.scheme, "connections": args.connections, "per_connection_bytes": rows})
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
