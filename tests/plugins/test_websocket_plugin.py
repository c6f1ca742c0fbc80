"""The example plugin transport (plugins/vtunnel-websocket) beyond tests/plugins/test_plugin_tunnels.py: a request
for another path is turned away, and ws:// and wss:// pass a real reverse proxy that routes by Host header."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Processes, free_port, wait_port
from tests.netutil import echo_roundtrip, echo_server, pattern
from tests.plugins.tunnel import PluginUrls, plugin_urls, start_agent, start_server, start_tunnel
from vtunnel.transports.base import Endpoint

pytest.importorskip("vtunnel_websocket")


def test_tunnel_over_websocket_with_key(procs: Processes, psk_file: Path, tmp_path: Path) -> None:
    urls = plugin_urls("ws", tmp_path)
    with echo_server() as echo:
        front = start_tunnel(procs, urls, psk_file, "--forward", "--target", f"127.0.0.1:{echo}")
        payload = pattern(4 * 1024 * 1024, seed=5)
        assert echo_roundtrip(front, payload) == payload
        # a plain HTTP request for another path is turned away without reaching the tunnel
        with socket.create_connection(("127.0.0.1", Endpoint.parse(urls.server).port), timeout=10) as s:
            s.sendall(
                b"GET /other HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            assert s.recv(100).startswith(b"HTTP/1.1 404")
        assert echo_roundtrip(front, b"still serving") == b"still serving"


HAPROXY_CONFIG = """\
global
    maxconn 256
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout tunnel 120s
frontend web
    bind 127.0.0.1:{front}{tls}
    use_backend tunnel if {{ hdr(host) -i tunnel.example }}
    default_backend site
backend tunnel
    server exit 127.0.0.1:{tunnel}
backend site
    http-request return status 404 content-type text/plain string "no such site"
"""


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (.ci/run installs it)")
@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_a_tunnel_passes_a_real_reverse_proxy_that_routes_by_host(
    procs: Processes, psk_file: Path, tmp_path: Path, tls: bool
) -> None:
    """HAProxy in HTTP mode in front of the server, routing WebSocket upgrades by Host header (what a CDN or a
    shared front does): with wss:// HAProxy ends the TLS and the server behind it speaks ws://."""
    front, tunnel = free_port(), free_port()
    tls_option, client_tls = "", ""
    if tls:
        trustme = pytest.importorskip("trustme")
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "front.pem"))
        tls_option = f" ssl crt {tmp_path / 'front.pem'}"
        client_tls = f"&ca={tmp_path / 'ca.pem'}&servername=localhost"
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(front=front, tunnel=tunnel, tls=tls_option))
    log = (tmp_path / "haproxy.log").open("wb")
    proxy = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(front)
        with echo_server() as echo:
            scheme = "wss" if tls else "ws"
            urls = PluginUrls(
                server=f"ws://127.0.0.1:{tunnel}?path=/t",
                agent=f"{scheme}://127.0.0.1:{front}?path=/t&host=tunnel.example{client_tls}",
            )
            start_server(procs, urls, psk_file, "--target", f"127.0.0.1:{echo}")
            _agent, forward = start_agent(procs, urls, psk_file, "--forward")
            payload = pattern(8 * 1024 * 1024, seed=9)
            assert echo_roundtrip(forward, payload) == payload
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
        log.close()
