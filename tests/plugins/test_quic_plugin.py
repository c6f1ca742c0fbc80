"""The quic:// plugin (plugins/vtunnel-quic), installed through its entry point like any third party: a server and
an agent as real processes, 64 MiB byte-exact through a --forward, and curl through the agent's SOCKS5 front."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from tests.conftest import Processes, free_port, wait_log, wait_port
from tests.netutil import curl, echo_roundtrip, echo_server, pattern, web_server
from vtunnel.transports.base import available_transports

pytest.importorskip("vtunnel_quic")


def test_plugin_is_found_through_its_entry_point() -> None:
    cls = available_transports()["quic"]
    assert isinstance(cls, type), cls


def _start(procs: Processes, psk_file: Path, *front_args: str, server_args: tuple[str, ...] = ()) -> int:
    port = free_port(socket.SOCK_DGRAM)
    url = f"quic://127.0.0.1:{port}"
    server = procs.start("server", "--listen", url, "--psk-file", str(psk_file), *server_args)
    wait_log(procs, server, "listening")
    front = free_port()
    procs.start("agent", "--server", url, "--psk-file", str(psk_file), *front_args, f"127.0.0.1:{front}")
    wait_port(front)
    return front


@pytest.mark.slow
def test_forward_moves_64_mib_byte_exact_over_quic(procs: Processes, psk_file: Path) -> None:
    with echo_server() as echo:
        front = _start(procs, psk_file, "--forward", server_args=("--target", f"127.0.0.1:{echo}"))
        payload = pattern(64 * 1024 * 1024, seed=17)
        assert echo_roundtrip(front, payload, timeout=240) == payload
        assert echo_roundtrip(front, b"still serving") == b"still serving"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (.ci/run installs it)")
def test_curl_through_socks5_over_quic(procs: Processes, psk_file: Path) -> None:
    body = b"served through a quic:// tunnel\n" * 4096
    with web_server(body) as (web, seen):
        front = _start(procs, psk_file, "--socks", server_args=("--allow-private",))
        out = curl("--socks5-hostname", f"127.0.0.1:{front}", "-o", "-", f"http://127.0.0.1:{web}/")
        assert out.returncode == 0, out.stderr
        assert out.stdout == body.decode()
        assert seen
        assert seen[0].startswith(b"GET / HTTP/1.1")
