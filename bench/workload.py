"""Workload generators and sinks (asyncio; uvloop when installed).

One TCP port serves every workload; the first four bytes of a connection choose its mode:

* ``VTBS`` + flags u32 + length u64 (big endian, 16 bytes in all): **sink**. The sink reads exactly ``length``
  bytes, checks each against the fixed pattern (:func:`pattern_slice`), then answers ``OK`` + u64 count and
  closes. A wrong byte, trailing bytes or a short stream get ``ER`` + u64 offset of the first bad byte (or
  nothing, when the peer closed early), so a tunnel that corrupts, drops or duplicates data can never pass as
  fast. After an error answer the sink half-closes and drops the rest, so the answer is never lost to a reset.
* ``VTBE``: **echo**. Every byte of the connection, the four magic bytes included, is sent back as it arrives;
  a request/response client sends 64-byte messages whose first one starts with the magic.

Anything else is closed at once. Clients (:func:`run_bulk`, :func:`run_rr`, :func:`run_ttfb`,
:func:`open_idle`) are bounded in count and in time and raise :class:`WorkloadError` with a clear message on
any failure.

``python -m bench.workload serve|bulk|rr|ttfb|hold|probe ...`` runs one of them in its own process and prints
one JSON line with the result (``hold`` prints when its connections are open, then waits for a line on stdin
to close them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

__all__ = [
    "ECHO_MAGIC",
    "MESSAGE_SIZE",
    "SINK_MAGIC",
    "BulkResult",
    "WorkloadError",
    "WorkloadServerStats",
    "main",
    "open_idle",
    "pattern_slice",
    "probe",
    "run_bulk",
    "run_rr",
    "run_ttfb",
    "serve",
]

SINK_MAGIC = b"VTBS"
ECHO_MAGIC = b"VTBE"
MESSAGE_SIZE = 64
_SINK_HEADER = struct.Struct(">4sIQ")
_REPLY = struct.Struct(">2sQ")
#: The pattern's period is prime, so a dropped, duplicated or reordered chunk of any usual size shows.
PATTERN_PERIOD = 251
CHUNK = 64 * 1024
_PATTERN = bytes(i % PATTERN_PERIOD for i in range(PATTERN_PERIOD + 4 * CHUNK))


class WorkloadError(Exception):
    """A workload failed: connection refused or reset, wrong bytes, or out of time."""


def pattern_slice(offset: int, size: int) -> bytes:
    """The ``size`` pattern bytes that start at stream offset ``offset`` (``size`` <= 256 KiB)."""
    if size > 4 * CHUNK:
        raise ValueError("pattern slices are at most 256 KiB")
    start = offset % PATTERN_PERIOD
    return _PATTERN[start : start + size]


def _split_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise WorkloadError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


# ---------------------------------------------------------------------------------------------------------
# server


@dataclass(kw_only=True, slots=True)
class WorkloadServerStats:
    """Counters of a running workload server (all connections since it started)."""

    connections: int = 0
    sink_ok: int = 0
    sink_errors: int = 0
    sink_bytes: int = 0
    echo_bytes: int = 0
    rejected: int = 0


class _WorkloadProtocol(asyncio.Protocol):
    def __init__(self, stats: WorkloadServerStats) -> None:
        self._stats = stats
        self._transport: asyncio.Transport | None = None
        self._head = b""
        self._mode = ""
        self._expected = 0
        self._received = 0
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without inheriting from it.
        self._transport = cast(asyncio.Transport, transport)
        self._stats.connections += 1

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._mode == "echo":
            self._stats.echo_bytes += len(data)
            transport.write(data)
            return
        if self._mode == "sink":
            self._sink(data)
            return
        if self._mode in ("discard", "done"):
            return
        self._head += data
        if len(self._head) < 4:
            return
        magic = self._head[:4]
        if magic == ECHO_MAGIC:
            self._mode = "echo"
            head, self._head = self._head, b""
            self._stats.echo_bytes += len(head)
            transport.write(head)
        elif magic == SINK_MAGIC:
            if len(self._head) < _SINK_HEADER.size:
                return
            _, _flags, self._expected = _SINK_HEADER.unpack_from(self._head)
            rest, self._head = self._head[_SINK_HEADER.size :], b""
            self._mode = "sink"
            if self._expected == 0 or rest:
                self._sink(rest)
        else:
            self._stats.rejected += 1
            transport.abort()

    def _sink(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            offset = self._received
            if offset >= self._expected:
                self._answer(b"ER", offset)
                return
            size = min(len(view) - pos, 4 * CHUNK - PATTERN_PERIOD, self._expected - offset)
            piece = data if pos == 0 and size == len(data) else bytes(view[pos : pos + size])
            if piece != pattern_slice(offset, size):
                bad = next(i for i in range(size) if piece[i] != _PATTERN[(offset + i) % PATTERN_PERIOD])
                self._answer(b"ER", offset + bad)
                return
            pos += size
            self._received += size
            self._stats.sink_bytes += size
        if self._received == self._expected:
            self._answer(b"OK", self._received)

    def _answer(self, status: bytes, value: int) -> None:
        transport = self._transport
        assert transport is not None
        if status == b"OK":
            self._stats.sink_ok += 1
        else:
            self._stats.sink_errors += 1
        transport.write(_REPLY.pack(status, value))
        if status == b"OK":
            self._mode = "done"
            transport.close()
            return
        # Closing with unread input would reset the connection and could destroy the answer before the peer
        # reads it: half-close instead and drop the rest until the peer closes.
        self._mode = "discard"
        if transport.can_write_eof():
            transport.write_eof()

    def eof_received(self) -> bool | None:
        if self._mode == "sink" and self._received < self._expected:
            self._stats.sink_errors += 1
        return None

    def pause_writing(self) -> None:
        # An echo peer that does not read its answers stops being read: memory stays bounded.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


async def serve(host: str, port: int, stats: WorkloadServerStats | None = None) -> asyncio.Server:
    """Start the workload server on ``host:port`` (port 0 picks a free one); the caller closes it."""
    counters = stats if stats is not None else WorkloadServerStats()
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _WorkloadProtocol(counters), host, port, reuse_address=True, backlog=4096
    )


# ---------------------------------------------------------------------------------------------------------
# clients


@dataclass(frozen=True, kw_only=True, slots=True)
class BulkResult:
    """One bulk transfer: ``total_bytes`` over ``streams`` connections, validated by the sink."""

    streams: int
    total_bytes: int
    seconds: float
    stream_seconds: tuple[float, ...]

    @property
    def goodput(self) -> float:
        """Bytes per second delivered and validated."""
        return self.total_bytes / self.seconds if self.seconds > 0 else 0.0


async def _connect(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.open_connection(host, port, limit=4 * CHUNK)
    except OSError as exc:
        raise WorkloadError(f"cannot connect to {host}:{port}: {exc}") from None


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 2.0)


async def _one_bulk(host: str, port: int, size: int, start: float) -> float:
    reader, writer = await _connect(host, port)
    try:
        writer.write(_SINK_HEADER.pack(SINK_MAGIC, 0, size))
        sent = 0
        while sent < size:
            n = min(CHUNK, size - sent)
            writer.write(pattern_slice(sent, n))
            sent += n
            await writer.drain()
        try:
            reply = await reader.readexactly(_REPLY.size)
        except asyncio.IncompleteReadError:
            raise WorkloadError(
                "the sink closed the connection without an answer (stream cut short)"
            ) from None
        status, value = _REPLY.unpack(reply)
        if status != b"OK" or value != size:
            raise WorkloadError(f"the sink found a wrong byte at offset {value} of {size}")
        return time.perf_counter() - start
    except (ConnectionError, OSError) as exc:
        raise WorkloadError(f"bulk stream failed: {exc!r}") from None
    finally:
        await _close(writer)


async def run_bulk(
    host: str,
    port: int,
    *,
    streams: int,
    total_bytes: int,
    time_limit: float,
) -> BulkResult:
    """Send ``total_bytes`` split over ``streams`` parallel connections; time until the sink validated all."""
    if streams < 1 or total_bytes < streams:
        raise ValueError("need at least one stream and one byte per stream")
    per_stream = [total_bytes // streams] * streams
    per_stream[0] += total_bytes - sum(per_stream)
    start = time.perf_counter()
    try:
        async with asyncio.timeout(time_limit):
            times = await asyncio.gather(*(_one_bulk(host, port, size, start) for size in per_stream))
    except TimeoutError:
        raise WorkloadError(
            f"bulk transfer of {total_bytes} bytes did not finish within {time_limit} s "
            f"(goodput below {total_bytes / time_limit / 1e6:.3g} MB/s)"
        ) from None
    return BulkResult(
        streams=streams, total_bytes=total_bytes, seconds=max(times), stream_seconds=tuple(times)
    )


def _message(index: int) -> bytes:
    body = index.to_bytes(8, "big") * (MESSAGE_SIZE // 8)
    return ECHO_MAGIC + body[4:] if index == 0 else body


async def run_rr(host: str, port: int, *, count: int, time_limit: float, warmup: int = 10) -> list[int]:
    """``count`` sequential 64-byte request/responses on one connection; each round trip in nanoseconds."""
    samples: list[int] = []
    try:
        async with asyncio.timeout(time_limit):
            reader, writer = await _connect(host, port)
            try:
                for i in range(warmup + count):
                    msg = _message(i)
                    t0 = time.perf_counter_ns()
                    writer.write(msg)
                    answer = await reader.readexactly(MESSAGE_SIZE)
                    t1 = time.perf_counter_ns()
                    if answer != msg:
                        raise WorkloadError(f"echo {i} came back different")
                    if i >= warmup:
                        samples.append(t1 - t0)
            finally:
                await _close(writer)
    except TimeoutError:
        raise WorkloadError(f"{count} request/responses did not finish within {time_limit} s") from None
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise WorkloadError(f"echo connection failed after {len(samples)} samples: {exc!r}") from None
    return samples


async def _one_ttfb(host: str, port: int) -> int:
    t0 = time.perf_counter_ns()
    reader, writer = await _connect(host, port)
    try:
        msg = _message(0)
        writer.write(msg)
        answer = await reader.readexactly(MESSAGE_SIZE)
        t1 = time.perf_counter_ns()
        if answer != msg:
            raise WorkloadError("first echo came back different")
        return t1 - t0
    finally:
        await _close(writer)


async def run_ttfb(host: str, port: int, *, count: int, time_limit: float) -> list[int]:
    """``count`` fresh connections, one by one: connect, send 64 bytes, time to the whole answer (ns)."""
    samples: list[int] = []
    try:
        async with asyncio.timeout(time_limit):
            for _ in range(count):
                samples.append(await _one_ttfb(host, port))
    except TimeoutError:
        raise WorkloadError(f"{count} first-byte probes did not finish within {time_limit} s") from None
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise WorkloadError(f"first-byte probe failed after {len(samples)} samples: {exc!r}") from None
    return samples


async def probe(host: str, port: int, *, time_limit: float) -> bool:
    """True when one echo round trip through ``host:port`` works within ``time_limit`` seconds."""
    try:
        async with asyncio.timeout(time_limit):
            await _one_ttfb(host, port)
    except (TimeoutError, WorkloadError, asyncio.IncompleteReadError, ConnectionError, OSError):
        return False
    return True


async def _open_one_idle(host: str, port: int, gate: asyncio.Semaphore) -> asyncio.StreamWriter:
    async with gate:
        reader, writer = await _connect(host, port)
        try:
            msg = _message(0)
            writer.write(msg)
            if await reader.readexactly(MESSAGE_SIZE) != msg:
                raise WorkloadError("idle stream's echo came back different")
        except BaseException:
            writer.close()
            raise
        return writer


async def open_idle(
    host: str,
    port: int,
    *,
    connections: int,
    time_limit: float,
    concurrency: int = 16,
) -> list[asyncio.StreamWriter]:
    """Open ``connections`` echo connections, each proven end to end by an echo; keep them open."""
    gate = asyncio.Semaphore(concurrency)
    tasks = [asyncio.ensure_future(_open_one_idle(host, port, gate)) for _ in range(connections)]
    try:
        async with asyncio.timeout(time_limit):
            return list(await asyncio.gather(*tasks))
    except BaseException as exc:
        for task in tasks:
            task.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        for item in done:
            if isinstance(item, asyncio.StreamWriter):
                item.close()
        opened = sum(isinstance(item, asyncio.StreamWriter) for item in done)
        if isinstance(exc, TimeoutError):
            raise WorkloadError(
                f"only {opened} of {connections} idle streams opened within {time_limit} s"
            ) from None
        if isinstance(exc, (asyncio.IncompleteReadError, ConnectionError)):
            raise WorkloadError(f"idle stream failed after {opened} opened: {exc!r}") from None
        raise


# ---------------------------------------------------------------------------------------------------------
# CLI


def _emit(payload: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


async def _serve_main(listen: str, lifetime: float) -> None:
    host, port = _split_hostport(listen)
    stats = WorkloadServerStats()
    server = await serve(host, port, stats)
    sockets = server.sockets
    bound = sockets[0].getsockname()[1] if sockets else port
    _emit({"ready": True, "port": bound, "pid": os.getpid()})
    async with server:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(lifetime):
                await server.serve_forever()


async def _hold_main(
    connect: str, connections: int, time_limit: float, hold: float, concurrency: int
) -> None:
    host, port = _split_hostport(connect)
    t0 = time.perf_counter()
    writers = await open_idle(
        host, port, connections=connections, time_limit=time_limit, concurrency=concurrency
    )
    _emit({"opened": len(writers), "seconds": time.perf_counter() - t0})
    loop = asyncio.get_running_loop()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(hold):
            await loop.run_in_executor(None, sys.stdin.readline)
    for writer in writers:
        writer.close()
    await asyncio.sleep(0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.workload", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="run the sink/echo server")
    srv.add_argument("--listen", required=True, help="HOST:PORT (port 0: any free port)")
    srv.add_argument("--lifetime", type=float, default=3600.0, help="exit after this many seconds")
    for name in ("bulk", "rr", "ttfb", "hold", "probe"):
        p = sub.add_parser(name)
        p.add_argument("--connect", required=True, help="HOST:PORT")
        p.add_argument("--timeout", type=float, default=60.0)
        if name == "bulk":
            p.add_argument("--streams", type=int, default=1)
            p.add_argument("--bytes", type=int, required=True, dest="total_bytes")
        elif name in ("rr", "ttfb"):
            p.add_argument("--count", type=int, required=True)
        elif name == "hold":
            p.add_argument("--connections", type=int, required=True)
            p.add_argument("--concurrency", type=int, default=16, help="connections being opened at once")
            p.add_argument(
                "--hold", type=float, default=600.0, help="close after this long without a command"
            )
    return parser


async def _client_main(args: argparse.Namespace) -> dict[str, object]:
    host, port = _split_hostport(args.connect)
    if args.command == "bulk":
        _emit({"started": True})  # lets a watcher time only the transfer, not this process's start
        res = await run_bulk(
            host, port, streams=args.streams, total_bytes=args.total_bytes, time_limit=args.timeout
        )
        return {
            "ok": True,
            "bytes": res.total_bytes,
            "streams": res.streams,
            "seconds": res.seconds,
            "goodput": res.goodput,
            "stream_seconds": list(res.stream_seconds),
        }
    if args.command == "rr":
        return {"ok": True, "samples_ns": await run_rr(host, port, count=args.count, time_limit=args.timeout)}
    if args.command == "ttfb":
        return {
            "ok": True,
            "samples_ns": await run_ttfb(host, port, count=args.count, time_limit=args.timeout),
        }
    return {"ok": await probe(host, port, time_limit=args.timeout)}


def _install_loop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _install_loop()
    try:
        if args.command == "serve":
            asyncio.run(_serve_main(args.listen, args.lifetime))
            return 0
        if args.command == "hold":
            asyncio.run(_hold_main(args.connect, args.connections, args.timeout, args.hold, args.concurrency))
            return 0
        result = asyncio.run(_client_main(args))
    except (WorkloadError, ValueError) as exc:
        _emit({"ok": False, "error": str(exc)})
        return 1
    except KeyboardInterrupt:
        return 130
    _emit(result)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
