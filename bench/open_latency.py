"""Time to first byte of a new stream: the destination in the SYN (0-RTT) against SOCKS5 inside the stream.

Two ways to open a stream to the same echo server through one agent/server pair, alternated in one run:

* ``0-rtt``: ``vtunnel agent --forward L=HOST:PORT`` puts the destination in the SYN's metadata, and the client's
  first bytes follow the SYN without waiting for the answer;
* ``socks5-in-stream``: vproxy's way (WebSocks): the stream carries no destination, and the client runs the
  WebSocket upgrade, the 10-byte frame header and a SOCKS5 CONNECT inside it before its first byte, each step a
  round trip through the tunnel.

Each sample: connect to the agent, open, send 64 bytes, read the 64 echoed bytes. Prints a table and writes
``bench/results/open-latency.json``. Run: ``python -m bench.open_latency [--count N] [--scheme kcp|tcp]``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import anyio
from anyio.abc import ByteStream

from bench.stats import percentile
from vtunnel.testing.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
FRAME_HEADER = b"\x82\x7f\x7f\xff\xff\xff\xff\xff\xff\xff"
USER, PASSWORD = "bench", "bench-password"


def _upgrade() -> bytes:
    minute = int(time.time() * 1000) // 60000 * 60000
    first = base64.b64encode(hashlib.sha256(PASSWORD.encode()).digest()).decode()
    hashed = base64.b64encode(hashlib.sha256(f"{first}{minute}".encode()).digest()).decode()
    credentials = base64.b64encode(f"{USER}:{hashed}".encode()).decode()
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        "GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: socks5\r\n"
        f"Authorization: Basic {credentials}\r\n\r\n"
    ).encode()


async def _read(stream: ByteStream, buffer: bytearray, n: int) -> bytes:
    while len(buffer) < n:
        buffer += await stream.receive()
    data = bytes(buffer[:n])
    del buffer[:n]
    return data


async def _read_until(stream: ByteStream, buffer: bytearray, marker: bytes) -> bytes:
    while marker not in buffer:
        buffer += await stream.receive()
    end = buffer.index(marker) + len(marker)
    data = bytes(buffer[:end])
    del buffer[:end]
    return data


async def _sample_0rtt(port: int, payload: bytes) -> float:
    start = time.perf_counter()
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(payload)
        await _read(stream, bytearray(), len(payload))
    return time.perf_counter() - start


async def _sample_socks5_in_stream(port: int, echo_port: int, payload: bytes) -> float:
    start = time.perf_counter()
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        buf = bytearray()
        await stream.send(_upgrade())
        head = await _read_until(stream, buf, b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"upgrade refused: {head[:40]!r}")
        await stream.send(FRAME_HEADER)
        await _read(stream, buf, len(FRAME_HEADER))
        await stream.send(b"\x05\x01\x00")
        if await _read(stream, buf, 2) != b"\x05\x00":
            raise RuntimeError("socks5 greeting refused")
        await stream.send(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", echo_port))
        reply = await _read(stream, buf, 10)
        if reply[1] != 0:
            raise RuntimeError(f"socks5 connect refused: {reply[1]:#x}")
        await stream.send(payload)
        await _read(stream, buf, len(payload))
    return time.perf_counter() - start


def _start_echo() -> tuple[socket.socket, int]:
    """A threaded echo server on 127.0.0.1 (the destination both ways reach)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(256)

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    port: int = server.getsockname()[1]
    return server, port


async def _measure(count: int, zero_port: int, socks_port: int, echo_port: int) -> dict[str, list[float]]:
    payload = os.urandom(64)
    samples: dict[str, list[float]] = {"0-rtt": [], "socks5-in-stream": []}
    for _ in range(5):  # warm up the tunnel and both paths
        await _sample_0rtt(zero_port, payload)
        await _sample_socks5_in_stream(socks_port, echo_port, payload)
    with anyio.fail_after(max(60.0, count * 0.2)):
        for _ in range(count):  # alternated, so both see the same machine
            samples["0-rtt"].append(await _sample_0rtt(zero_port, payload))
            samples["socks5-in-stream"].append(await _sample_socks5_in_stream(socks_port, echo_port, payload))
    return samples


def _wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.open_latency", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--count", type=int, default=200, help="samples per way (default 200)")
    parser.add_argument("--scheme", choices=("kcp", "tcp"), default="kcp", help="transport (default kcp)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "open-latency.json")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 100_000:
        parser.error("--count must be between 1 and 100000")
    vtunnel = [sys.executable, "-m", "vtunnel"]
    procs: list[subprocess.Popen[bytes]] = []

    echo, echo_port = _start_echo()
    try:
        tunnel_port = free_port(socket.SOCK_DGRAM if args.scheme == "kcp" else socket.SOCK_STREAM)
        url = f"{args.scheme}://127.0.0.1:{tunnel_port}" + ("?mode=fast3" if args.scheme == "kcp" else "")
        key = Path(tempfile.mkdtemp(prefix="vtunnel-bench-")) / "key"
        subprocess.run([*vtunnel, "keygen", "-o", str(key)], capture_output=True, check=True)
        quiet = ["--log-level", "warning"]
        server_argv = [*vtunnel, "server", "--listen", url, "--psk-file", str(key), "--allow-private"]
        procs.append(
            subprocess.Popen(
                [*server_argv, *quiet],
                env={**os.environ, "VTUNNEL_WEBSOCKS_USER": f"{USER}:{PASSWORD}"},
                start_new_session=True,
            )
        )
        time.sleep(1.0)
        zero_port, socks_port = free_port(), free_port()
        forwards = [
            "--forward",
            f"127.0.0.1:{zero_port}=127.0.0.1:{echo_port}",
            "--forward",
            f"127.0.0.1:{socks_port}",
        ]
        agent_argv = [*vtunnel, "agent", "--server", url, "--psk-file", str(key), *forwards, *quiet]
        procs.append(subprocess.Popen(agent_argv, start_new_session=True))
        _wait_port(zero_port)
        time.sleep(0.5)
        samples = anyio.run(_measure, args.count, zero_port, socks_port, echo_port)
    finally:
        echo.close()
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    rows: dict[str, dict[str, object]] = {}
    print(
        f"time to first byte of a new stream over {args.scheme}:// with a key, {args.count} samples each (ms)"
    )
    print(f"{'open':<18} {'p50':>8} {'p99':>8}")
    for name, values in samples.items():
        ms = [v * 1000 for v in values]
        p50, p99 = percentile(ms, 50), percentile(ms, 99)
        rows[name] = {"p50_ms": p50, "p99_ms": p99, "samples_ms": ms}
        print(f"{name:<18} {p50:8.2f} {p99:8.2f}")
    ratio = percentile(samples["0-rtt"], 50) / percentile(samples["socks5-in-stream"], 50)
    print(f"0-rtt / socks5-in-stream (p50): {ratio:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"scheme": args.scheme, "count": args.count, "ways": rows, "ratio_p50": ratio})
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
