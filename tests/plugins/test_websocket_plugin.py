"""The example plugin transport (plugins/vtunnel-websocket), installed through its entry point like any third party."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.conftest import Processes, free_port, wait_port
from tests.netutil import echo_roundtrip, echo_server, pattern
from vtunnel.transports.base import available_transports

pytest.importorskip("vtunnel_websocket")


def test_plugin_is_found_through_its_entry_point() -> None:
    cls = available_transports()["ws"]
    assert isinstance(cls, type), cls


def test_tunnel_over_websocket_with_key(procs: Processes, psk_file: Path) -> None:
    with echo_server() as echo:
        port = free_port()
        url = f"ws://127.0.0.1:{port}?path=/t"
        procs.start("server", "--listen", url, "--psk-file", str(psk_file), "--target", f"127.0.0.1:{echo}")
        wait_port(port)
        front = free_port()
        procs.start("agent", "--server", url, "--psk-file", str(psk_file), "--forward", f"127.0.0.1:{front}")
        wait_port(front)
        payload = pattern(4 * 1024 * 1024, seed=5)
        assert echo_roundtrip(front, payload) == payload
        # a plain HTTP request for another path is turned away without reaching the tunnel
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                b"GET /other HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            assert s.recv(100).startswith(b"HTTP/1.1 404")
        assert echo_roundtrip(front, b"still serving") == b"still serving"
