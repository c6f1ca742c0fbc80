"""A raw-bytes vproxy client, written from the wire facts alone, against a real `vtunnel server --insecure`."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from tests.conftest import Processes, free_port, wait_port
from tests.netutil import echo_server

SETTINGS = bytes.fromhex("000000040000000000")


def frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


def read_frame(s: socket.socket) -> tuple[int, int, int, bytes]:
    head = read_exact(s, 9)
    length = int.from_bytes(head[:3], "big")
    return head[3], head[4], struct.unpack(">I", head[5:9])[0], read_exact(s, length)


def read_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


@pytest.fixture
def server(procs: Processes) -> Iterator[int]:
    with echo_server() as echo:
        port = free_port()
        procs.start(
            "server", "--listen", f"tcp://127.0.0.1:{port}", "--insecure", "--target", f"127.0.0.1:{echo}"
        )
        wait_port(port)
        yield port


def handshake(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(SETTINGS)
    assert read_exact(s, 9) == SETTINGS  # the identical 9 bytes, no ACK flag
    return s


def test_vproxy_session_gets_exact_answers(server: int) -> None:
    with handshake(server) as s:
        s.sendall(frame(1, 0, 1))  # SYN
        assert read_frame(s) == (1, 0, 1, b"")  # SYN-ACK: empty HEADERS, no flags
        s.sendall(frame(0, 0, 1, b"hello vproxy"))  # PSH
        got = b""
        while len(got) < 12:
            ftype, flags, sid, payload = read_frame(s)
            assert (ftype, flags, sid) == (0, 0, 1)
            got += payload
        assert got == b"hello vproxy"
        s.sendall(frame(6, 0, 0, struct.pack(">Q", 1)))  # keepalive
        assert read_frame(s) == (6, 1, 0, struct.pack(">Q", 1))
        s.sendall(frame(0, 1, 1))  # FIN
        assert read_frame(s) == (0, 1, 1, b"")  # the echo server half-closed in turn: FIN


def test_rst_is_answered_with_rst(server: int) -> None:
    with handshake(server) as s:
        s.sendall(frame(1, 0, 3))
        assert read_frame(s) == (1, 0, 3, b"")
        s.sendall(frame(1, 1, 3))  # RST
        assert read_frame(s) == (1, 1, 3, b"")


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (frame(9, 0, 1, b"x"), "type"),  # unknown frame type (CONTINUATION is not used)
        (frame(1, 0, 5, b"\x00\x01"), "headers"),  # HEADERS with a payload (extensions not negotiated)
        (SETTINGS, "settings"),  # SETTINGS after the handshake
    ],
)
def test_faults_get_goaway_with_a_reason_and_others_keep_working(server: int, bad: bytes, words: str) -> None:
    with handshake(server) as good, handshake(server) as s:
        good.sendall(frame(1, 0, 1))
        assert read_frame(good) == (1, 0, 1, b"")
        s.sendall(bad)
        ftype, _flags, sid, payload = read_frame(s)
        assert (ftype, sid) == (7, 0)
        assert payload[:8] == b"\xff" * 8
        assert words in payload[8:].decode().lower()
        # the other tunnel still moves bytes
        good.sendall(frame(0, 0, 1, b"still here"))
        got = b""
        while len(got) < 10:
            got += read_frame(good)[3]
        assert got == b"still here"


def test_garbage_instead_of_handshake_is_not_served(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(10)
        try:
            data = s.recv(4096)
        except (ConnectionResetError, TimeoutError):
            data = b""
        # vproxy answers a bad handshake with a GOAWAY or closes; it never serves the connection
        assert data == b"" or data[3] == 7
    # and the server still serves a proper client
    with handshake(server) as s2:
        s2.sendall(frame(1, 0, 1))
        assert read_frame(s2) == (1, 0, 1, b"")
