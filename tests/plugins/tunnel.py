"""A server and an agent as real processes (`vtunnel server`, `vtunnel agent`) over a plugin's URL, for the plugins'
end-to-end tests: the URLs each side uses, starting both, and curl through the agent's SOCKS5 front."""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Processes, free_port, wait_log, wait_port
from tests.netutil import curl, web_server
from tests.transports.test_link_contract import certificates


@dataclass(frozen=True, slots=True)
class PluginUrls:
    """What ``vtunnel server --listen`` and ``vtunnel agent --server`` are given."""

    server: str
    agent: str


def plugin_urls(scheme: str, directory: Path) -> PluginUrls:
    """A free loopback port and each side's URL for ``scheme``: ``quic://`` with the server's ephemeral
    certificate; ``wss://`` with a test CA's certificate (made in ``directory``), a path and a Host header of
    its own, verified by the agent; ``ws://`` with a path."""
    if scheme == "quic":
        pytest.importorskip("vtunnel_quic")
        url = f"quic://127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
        return PluginUrls(server=url, agent=url)
    pytest.importorskip("vtunnel_websocket")
    base = f"{scheme}://127.0.0.1:{free_port()}?path=/tunnel/v1"
    if scheme == "ws":
        return PluginUrls(server=base, agent=f"{base}&host=tunnel.example")
    if scheme == "wss":
        server_options = certificates(directory)
        (directory / "s.pem").chmod(0o600)  # a key file others may read is refused
        return PluginUrls(
            server=f"{base}&{server_options}",
            agent=f"{base}&host=tunnel.example&ca={directory / 'ca.pem'}&servername=localhost",
        )
    raise ValueError(f"no URLs for {scheme}://")


def start_server(
    procs: Processes, urls: PluginUrls, psk_file: Path, *server_args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    server = procs.start(
        "server", "--listen", urls.server, "--psk-file", str(psk_file), *server_args, env=env
    )
    wait_log(procs, server, "listening")
    return server


def start_agent(
    procs: Processes, urls: PluginUrls, psk_file: Path, front: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """An agent with one front (``--forward`` or ``--socks``) on a free port; the agent and that port."""
    port = free_port()
    agent = procs.start(
        "agent", "--server", urls.agent, "--psk-file", str(psk_file), front, f"127.0.0.1:{port}", env=env
    )
    wait_port(port)
    return agent, port


def start_tunnel(
    procs: Processes,
    urls: PluginUrls,
    psk_file: Path,
    front: str,
    *server_args: str,
    env: dict[str, str] | None = None,
) -> int:
    """A server (with ``server_args``) and an agent with one ``front`` (both with ``env`` added to theirs); the
    front's port."""
    start_server(procs, urls, psk_file, *server_args, env=env)
    return start_agent(procs, urls, psk_file, front, env=env)[1]


def check_curl_through_socks5(procs: Processes, urls: PluginUrls, psk_file: Path) -> None:
    """curl --socks5-hostname through the agent fetches a page from a local web server, byte-exact."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (.ci/run installs it)")
    body = b"served through the tunnel\n" * 4096
    with web_server(body) as (web, seen):
        front = start_tunnel(procs, urls, psk_file, "--socks", "--allow-private")
        out = curl("--socks5-hostname", f"127.0.0.1:{front}", "-o", "-", f"http://127.0.0.1:{web}/")
        assert out.returncode == 0, out.stderr
        assert out.stdout == body.decode()
        assert seen
        assert seen[0].startswith(b"GET / HTTP/1.1")
