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
:func:`open_idle`, :func:`stall_streams`) are bounded in count and in time and raise :class:`WorkloadError` with
a clear message on any failure.

A **TLS source** (:class:`TlsSource`, ``tls-serve``) is HTTPS-like traffic for lite-tls: a TLS server (a
throwaway trustme certificate) that, after the handshake, reads a u64 length and sends that many
pattern bytes as TLS application data; :func:`run_tls_bulk` (``tls-bulk``) downloads and checks them.

A second kind of destination, the **stalled sink** (:class:`StalledSink`), accepts connections and never reads
from them: it never calls ``recv``, and its sockets get a small ``SO_RCVBUF`` (set on the listening socket, so
the accepted ones have it from the handshake on), so the kernel holds only a few KiB per connection for it.
:func:`stall_streams` pushes data into such connections until no more is taken.

``python -m bench.workload serve|stall-sink|bulk|rr|ttfb|hold|stall|probe ...`` runs one of them in its own
process and prints one JSON line with the result (``hold`` and ``stall`` print when their connections are open
or stalled, then wait for a line on stdin to close them; ``stall-sink`` prints when it listens and answers
``status`` on stdin with what the kernel holds for it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import select
import socket
import struct
import sys
import termios
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

__all__ = [
    "ECHO_MAGIC",
    "MESSAGE_SIZE",
    "SINK_MAGIC",
    "BulkResult",
    "StalledSink",
    "TlsSource",
    "WorkloadError",
    "WorkloadServerStats",
    "main",
    "open_idle",
    "pattern_slice",
    "probe",
    "run_bulk",
    "run_rr",
    "run_tls_bulk",
    "run_ttfb",
    "serve",
    "stall_streams",
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


class StalledSink:
    """A TCP server that accepts and never reads (blocking sockets, one accepting thread).

    ``rcvbuf`` is set on the listening socket before ``listen``, so every accepted socket has it from its
    handshake on and the kernel advertises a window that small; Linux doubles the value asked for and keeps a
    floor of about 2 KiB (the socket's actual value is in :meth:`status`). Nothing here ever calls ``recv``.
    """

    def __init__(self, host: str, port: int, *, rcvbuf: int, max_connections: int = 4096) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self._listener.bind((host, port))
        self._listener.listen(128)
        self.port = int(self._listener.getsockname()[1])
        self._max = max_connections
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="stalled-sink", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._listener], [], [], 0.2)
            if not ready:
                continue
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue
            with self._lock:
                if len(self._conns) >= self._max:
                    conn.close()  # bounded: a runaway client cannot pile up descriptors
                    continue
                self._conns.append(conn)

    def status(self) -> dict[str, object]:
        """Connections held, the bytes the kernel queues unread for each (``FIONREAD``), their ``SO_RCVBUF``."""
        with self._lock:
            conns = list(self._conns)
        queued: list[int] = []
        for conn in conns:
            try:
                raw = fcntl.ioctl(conn.fileno(), termios.FIONREAD, b"\0\0\0\0")
            except OSError:
                queued.append(-1)
                continue
            queued.append(int(struct.unpack("i", raw)[0]))
        rcvbuf = conns[0].getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) if conns else None
        return {"ok": True, "connections": len(conns), "queued_bytes": queued, "rcvbuf": rcvbuf}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        self._listener.close()


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


#: The SOCKS5 proxy every client connection goes through (``--socks5``), or ``None`` to connect directly.
_socks5: tuple[str, int] | None = None


def use_socks5(proxy: tuple[str, int] | None) -> None:
    """Send every client connection of this process through the SOCKS5 proxy ``proxy`` (None: directly)."""
    global _socks5
    _socks5 = proxy


async def _connect(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    proxy = _socks5
    try:
        if proxy is None:
            return await asyncio.open_connection(host, port, limit=4 * CHUNK)
        reader, writer = await asyncio.open_connection(*proxy, limit=4 * CHUNK)
    except OSError as exc:
        where = f"{host}:{port}" if proxy is None else f"the SOCKS5 proxy {proxy[0]}:{proxy[1]}"
        raise WorkloadError(f"cannot connect to {where}: {exc}") from None
    try:
        await _socks5_connect(reader, writer, host, port)
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def _socks5_connect(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int
) -> None:
    """RFC 1928 CONNECT to ``host:port`` without authentication; raises WorkloadError unless it succeeds."""
    try:
        address = socket.inet_pton(socket.AF_INET, host)
        kind = b"\x01"
    except OSError:
        try:
            address = socket.inet_pton(socket.AF_INET6, host)
            kind = b"\x04"
        except OSError:
            name = host.encode("idna")
            address, kind = bytes([len(name)]) + name, b"\x03"
    writer.write(b"\x05\x01\x00" + b"\x05\x01\x00" + kind + address + port.to_bytes(2, "big"))
    try:
        method = await reader.readexactly(2)
        head = await reader.readexactly(4)
        if method != b"\x05\x00":
            raise WorkloadError(f"the SOCKS5 proxy refused no-authentication ({method.hex()})")
        if head[:2] != b"\x05\x00":
            raise WorkloadError(f"the SOCKS5 proxy answered {head[1]} to CONNECT {host}:{port}")
        if head[3] == 1:
            await reader.readexactly(4 + 2)
        elif head[3] == 4:
            await reader.readexactly(16 + 2)
        else:
            await reader.readexactly((await reader.readexactly(1))[0] + 2)
    except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
        raise WorkloadError(f"the SOCKS5 proxy closed during CONNECT {host}:{port}: {exc!r}") from None


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


async def _push_until_stalled(
    host: str, port: int, *, quiet: float, max_bytes: int, sndbuf: int
) -> tuple[asyncio.StreamWriter, int]:
    """Connect and write until ``quiet`` seconds pass without the connection taking more; return the writer
    and the bytes it took (written less what is still queued in this process)."""
    _, writer = await _connect(host, port)
    sock = writer.get_extra_info("socket")
    if sock is not None:  # this side's kernel buffer stays small: the bytes it takes are mostly the tunnel's
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    writer.transport.set_write_buffer_limits(high=CHUNK)
    chunk = pattern_slice(0, CHUNK - CHUNK % PATTERN_PERIOD)
    written = 0
    try:
        while True:
            if written - writer.transport.get_write_buffer_size() > max_bytes:
                raise WorkloadError(
                    f"a stream took more than {max_bytes} bytes without stalling: does the destination read?"
                )
            writer.write(chunk)
            written += len(chunk)
            try:
                await asyncio.wait_for(writer.drain(), quiet)
            except TimeoutError:
                return writer, written - writer.transport.get_write_buffer_size()
    except (ConnectionError, OSError) as exc:
        writer.close()
        raise WorkloadError(f"stalling stream failed after {written} bytes: {exc!r}") from None
    except BaseException:
        writer.close()
        raise


async def stall_streams(
    host: str,
    port: int,
    *,
    streams: int,
    time_limit: float,
    quiet: float = 1.0,
    max_bytes: int = 64 * 1024 * 1024,
    sndbuf: int = 16 * 1024,
) -> tuple[list[asyncio.StreamWriter], list[int]]:
    """Open ``streams`` connections to a destination that does not read and push each until it takes nothing
    more for ``quiet`` seconds (at most ``max_bytes`` each, all within ``time_limit``). Returns the open
    writers and the bytes each took. ``sndbuf`` keeps this side's kernel buffer small."""
    tasks = [
        asyncio.ensure_future(
            _push_until_stalled(host, port, quiet=quiet, max_bytes=max_bytes, sndbuf=sndbuf)
        )
        for _ in range(streams)
    ]
    try:
        async with asyncio.timeout(time_limit):
            done = await asyncio.gather(*tasks)
    except BaseException as exc:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for item in results:
            if isinstance(item, tuple):
                item[0].close()
        if isinstance(exc, TimeoutError):
            raise WorkloadError(f"{streams} streams did not all stall within {time_limit} s") from None
        raise
    return [w for w, _ in done], [n for _, n in done]


# ---------------------------------------------------------------------------------------------------------
# CLI


# ---------------------------------------------------------------------------------------------------------
# TLS source and client (lite-tls)

_TLS_REQUEST = struct.Struct(">Q")
_TLS_READ = 256 * 1024


class TlsSource:
    """A TLS server (one thread per connection: OpenSSL does the work outside the GIL) that sends each client the
    number of pattern bytes it asks for."""

    def __init__(self, host: str, port: int) -> None:
        import ssl

        import trustme  # a throwaway CA and certificate: the client does not verify it

        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        trustme.CA().issue_cert("localhost").configure_cert(self.context)
        self.sock = socket.create_server((host, port))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn, self.context.wrap_socket(conn, server_side=True) as tls:
            request = b""
            while len(request) < _TLS_REQUEST.size:
                more = tls.recv(_TLS_REQUEST.size - len(request))
                if not more:
                    return
                request += more
            (size,) = _TLS_REQUEST.unpack(request)
            sent = 0
            while sent < size:
                n = min(4 * CHUNK - PATTERN_PERIOD, size - sent)
                tls.sendall(pattern_slice(sent, n))
                sent += n
            with contextlib.suppress(OSError):
                tls.unwrap()

    def close(self) -> None:
        self.sock.close()


def run_tls_bulk(host: str, port: int, *, size: int, time_limit: float) -> float:
    """Download ``size`` pattern bytes over TLS from a :class:`TlsSource` (through whatever ``host:port`` leads
    there), checking every byte; the seconds from the request to the last byte."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + time_limit
    raw = socket.create_connection((host, port), timeout=time_limit)
    with raw, context.wrap_socket(raw, server_hostname="localhost") as tls:
        buf = bytearray(_TLS_READ)
        view = memoryview(buf)
        t0 = time.perf_counter()
        tls.sendall(_TLS_REQUEST.pack(size))
        got = 0
        while got < size:
            if time.monotonic() > deadline:
                raise WorkloadError(f"tls-bulk: {got} of {size} bytes in {time_limit} s")
            n = tls.recv_into(view, min(_TLS_READ, size - got))
            if not n:
                raise WorkloadError(f"tls-bulk: the stream ended after {got} of {size} bytes")
            if view[:n] != pattern_slice(got, n):
                raise WorkloadError(f"tls-bulk: wrong bytes near offset {got}")
            got += n
        return time.perf_counter() - t0


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


def _tls_serve_main(listen: str, lifetime: float) -> None:
    host, port = _split_hostport(listen)
    source = TlsSource(host, port)
    _emit({"ready": True, "port": source.port, "pid": os.getpid()})
    try:
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(lifetime)
    finally:
        source.close()


def _stall_sink_main(listen: str, rcvbuf: int, lifetime: float) -> None:
    host, port = _split_hostport(listen)
    sink = StalledSink(host, port, rcvbuf=rcvbuf)
    try:
        _emit({"ready": True, "port": sink.port, "pid": os.getpid()})
        deadline = time.monotonic() + lifetime
        while time.monotonic() < deadline:
            ready, _, _ = select.select([sys.stdin], [], [], min(1.0, max(0.0, deadline - time.monotonic())))
            if not ready:
                continue
            command = sys.stdin.readline()
            if command.strip() != "status":
                break  # "close" or end of input
            _emit(sink.status())
    finally:
        sink.close()


async def _stall_main(args: argparse.Namespace) -> None:
    host, port = _split_hostport(args.connect)
    t0 = time.perf_counter()
    writers, pushed = await stall_streams(
        host,
        port,
        streams=args.streams,
        time_limit=args.timeout,
        quiet=args.quiet,
        max_bytes=args.max_bytes,
        sndbuf=args.sndbuf,
    )
    _emit({"ok": True, "stalled": len(writers), "pushed_bytes": pushed, "seconds": time.perf_counter() - t0})
    loop = asyncio.get_running_loop()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.hold):
            await loop.run_in_executor(None, sys.stdin.readline)
    for writer in writers:
        writer.transport.abort()  # unsent bytes are dropped: the stalled streams end at once
    await asyncio.sleep(0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.workload", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="run the sink/echo server")
    srv.add_argument("--listen", required=True, help="HOST:PORT (port 0: any free port)")
    srv.add_argument("--lifetime", type=float, default=3600.0, help="exit after this many seconds")
    stalled = sub.add_parser(
        "stall-sink",
        help="accept connections and never read them; 'status' on stdin prints what the kernel holds unread",
    )
    stalled.add_argument("--listen", required=True, help="HOST:PORT (port 0: any free port)")
    stalled.add_argument(
        "--rcvbuf", type=int, default=4096, help="SO_RCVBUF of the accepted sockets (Linux doubles it)"
    )
    stalled.add_argument("--lifetime", type=float, default=3600.0, help="exit after this many seconds")
    tls_source = sub.add_parser("tls-serve", help="run the TLS source (lite-tls)")
    tls_source.add_argument("--listen", required=True, help="HOST:PORT (port 0: any free port)")
    tls_source.add_argument("--lifetime", type=float, default=3600.0, help="exit after this many seconds")
    tls_bulk = sub.add_parser("tls-bulk", help="download from a TLS source and check the bytes")
    tls_bulk.add_argument("--connect", required=True, help="HOST:PORT")
    tls_bulk.add_argument("--timeout", type=float, default=60.0)
    tls_bulk.add_argument("--bytes", type=int, required=True, dest="total_bytes")
    for name in ("bulk", "rr", "ttfb", "hold", "stall", "probe"):
        p = sub.add_parser(name)
        p.add_argument("--connect", required=True, help="HOST:PORT")
        if name in ("bulk", "rr", "ttfb", "probe"):
            p.add_argument(
                "--socks5",
                metavar="HOST:PORT",
                help="reach --connect through this SOCKS5 proxy (CONNECT, no authentication)",
            )
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
        elif name == "stall":
            p.add_argument("--streams", type=int, required=True, help="connections to push until they stall")
            p.add_argument(
                "--quiet", type=float, default=1.0, help="seconds without progress that count as stalled"
            )
            p.add_argument(
                "--max-bytes",
                type=int,
                default=64 * 1024 * 1024,
                help="a stream that takes more than this without stalling is an error",
            )
            p.add_argument("--sndbuf", type=int, default=16 * 1024, help="SO_SNDBUF of this side's sockets")
            p.add_argument(
                "--hold", type=float, default=600.0, help="close after this long without a line on stdin"
            )
    return parser


async def _client_main(args: argparse.Namespace) -> dict[str, object]:
    host, port = _split_hostport(args.connect)
    use_socks5(_split_hostport(args.socks5) if args.socks5 else None)
    if args.command == "bulk":
        _emit({"started": True})  # lets a watcher time only the transfer, not this process's start
        cpu0 = time.process_time()
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
            # the load generator's own CPU over the transfer: on a machine of few cores it shares them with the
            # system measured
            "cpu_s": time.process_time() - cpu0,
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
        if args.command == "stall-sink":
            _stall_sink_main(args.listen, args.rcvbuf, args.lifetime)
            return 0
        if args.command == "hold":
            asyncio.run(_hold_main(args.connect, args.connections, args.timeout, args.hold, args.concurrency))
            return 0
        if args.command == "stall":
            asyncio.run(_stall_main(args))
            return 0
        if args.command == "tls-serve":
            _tls_serve_main(args.listen, args.lifetime)
            return 0
        if args.command == "tls-bulk":
            host, port = _split_hostport(args.connect)
            seconds = run_tls_bulk(host, port, size=args.total_bytes, time_limit=args.timeout)
            _emit(
                {
                    "ok": True,
                    "bytes": args.total_bytes,
                    "seconds": seconds,
                    "goodput": args.total_bytes / seconds,
                }
            )
            return 0
        result = asyncio.run(_client_main(args))
    except (WorkloadError, ValueError, OSError) as exc:
        _emit({"ok": False, "error": str(exc)})
        return 1
    except KeyboardInterrupt:
        return 130
    _emit(result)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
