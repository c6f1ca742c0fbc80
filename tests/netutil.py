"""Plain-socket helpers for end-to-end tests: an echo server, a tiny web server, curl, and byte-exact transfers
(threads, no event loop)."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def pattern(size: int, seed: int = 1) -> bytes:
    """Deterministic incompressible-looking bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d:%d" % (seed, counter)).digest() * 32
        counter += 1
    return bytes(out[:size])


@contextmanager
def threaded_server(
    handle: Callable[[socket.socket], None], host: str = "127.0.0.1"
) -> Iterator[tuple[int, list[int]]]:
    """A TCP server running ``handle(conn)`` in a thread of its own for each connection (which it then closes):
    yields its port and a one-item list counting the connections accepted."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, 0))
    srv.listen(512)
    stop = threading.Event()
    accepted = [0]

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                handle(conn)
            except OSError:
                return

    def accept_loop() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted[0] += 1
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept_loop, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], accepted
    finally:
        stop.set()
        srv.close()
        t.join(timeout=2)


def _echo(conn: socket.socket) -> None:
    while True:
        data = conn.recv(262144)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(data)


@contextmanager
def echo_server(host: str = "127.0.0.1") -> Iterator[int]:
    """A threaded TCP echo server that passes half-closes on: yields its port."""
    with threaded_server(_echo, host) as (port, _):
        yield port


def echo_roundtrip(port: int, payload: bytes, *, timeout: float = 60.0, host: str = "127.0.0.1") -> bytes:
    """Send ``payload`` through ``host:port``, half-close, and return everything read back until EOF."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        err: list[BaseException] = []

        def writer() -> None:
            try:
                view = memoryview(payload)
                for i in range(0, len(view), 65536):
                    s.sendall(view[i : i + 65536])
                s.shutdown(socket.SHUT_WR)
            except BaseException as exc:
                err.append(exc)

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        received = bytearray()
        while True:
            chunk = s.recv(262144)
            if not chunk:
                break
            received += chunk
        t.join(timeout=timeout)
        if err:
            raise err[0]
        return bytes(received)


def first_echo_after(front: int, since: float, budget: float) -> float:
    """Seconds from ``since`` (``time.monotonic()``) until a stream through ``front`` echoes; fails the test
    when none does within ``budget`` seconds (a deadline the behaviour promises, not a speed measurement)."""
    import pytest  # only the tests import this module

    last_error: Exception | None = None
    while time.monotonic() - since < budget:
        try:
            if echo_roundtrip(front, b"are you there", timeout=2) == b"are you there":
                return time.monotonic() - since
        except OSError as exc:
            last_error = exc
        time.sleep(0.05)
    pytest.fail(f"no working stream {budget} s after the server restart (last error: {last_error!r})")


@contextmanager
def web_server(body: bytes) -> Iterator[tuple[int, list[bytes]]]:
    """A tiny HTTP/1.0 server answering every request with ``body``; yields its port and what it received."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    srv.settimeout(0.2)
    seen: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    seen.append(data)
                    conn.sendall(
                        b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                        % (len(body), body)
                    )
                except OSError:
                    seen.append(data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], seen
    finally:
        stop.set()
        srv.close()
        t.join(timeout=2)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True, timeout=30, check=False
    )
