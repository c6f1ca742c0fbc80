"""A front that names a destination never answers success for a destination it did not reach.

Without the metadata extension (``[tunnel] extensions = false``, what a vproxy server needs) a SYN cannot carry a
destination, and a server that is given a stream without one sends it to its default ``--target``. The agent
must then refuse the streams its fronts would name a destination for (SOCKS5, HTTP CONNECT, plain HTTP,
``--forward L=DEST``) with the front's own error and a log line saying why, and never open them. A plain
``--forward L`` names nothing, and the server's target is exactly where it should go.

Real processes on 127.0.0.1, real curl: a vtunnel server whose ``--target`` is a decoy web server, and the
destination the client asks for is another web server. The decoy must never be reached by a named stream.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Processes, free_port, wait_log, wait_port
from tests.netutil import curl, echo_roundtrip, web_server

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@pytest.fixture
def pair(procs: Processes, tmp_path: Path) -> Iterator[dict[str, object]]:
    tport, socks, http, named, plain = (free_port() for _ in range(5))
    with web_server(b"decoy") as (decoy, decoy_seen), web_server(b"real") as (real, real_seen):
        vproxy_like = tmp_path / "tunnel.toml"
        vproxy_like.write_text("[tunnel]\nextensions = false\n")
        server = procs.start(
            "server",
            "--listen",
            f"tcp://127.0.0.1:{tport}",
            "--insecure",
            "--target",
            f"127.0.0.1:{decoy}",
            "--config",
            str(vproxy_like),
        )
        wait_log(procs, server, "listening")
        agent = procs.start(
            "agent",
            "--server",
            f"tcp://127.0.0.1:{tport}",
            "--insecure",
            "--config",
            str(vproxy_like),
            "--socks",
            f"127.0.0.1:{socks}",
            "--http",
            f"127.0.0.1:{http}",
            "--forward",
            f"127.0.0.1:{named}=127.0.0.1:{real}",
            "--forward",
            f"127.0.0.1:{plain}",
        )
        for port in (socks, http, named, plain):
            wait_port(port)
        # waiting for the plain forward's port opened a stream to the decoy: that one is expected
        deadline = time.monotonic() + 10
        while not decoy_seen and time.monotonic() < deadline:
            time.sleep(0.02)
        decoy_seen.clear()
        yield {
            "procs": procs,
            "agent": agent,
            "socks": socks,
            "http": http,
            "named": named,
            "plain": plain,
            "real": real,
            "decoy_seen": decoy_seen,
            "real_seen": real_seen,
        }


def _decoy_untouched(pair: dict[str, object]) -> None:
    assert pair["decoy_seen"] == [], "a named stream reached the server's default target"


def test_socks5_refuses_instead_of_answering_success(pair: dict[str, object]) -> None:
    out = curl("--socks5-hostname", f"127.0.0.1:{pair['socks']}", f"http://127.0.0.1:{pair['real']}/")
    assert out.returncode != 0, out.stdout
    assert "decoy" not in out.stdout
    _decoy_untouched(pair)
    procs = pair["procs"]
    assert isinstance(procs, Processes)
    agent = pair["agent"]
    assert isinstance(agent, subprocess.Popen)
    assert "cannot be told its destination" in procs.output(agent)


def test_http_connect_refuses_with_502(pair: dict[str, object]) -> None:
    out = curl(
        "-p", "-x", f"http://127.0.0.1:{pair['http']}", "-o", "/dev/null", "-w", "%{http_connect}",
        f"http://127.0.0.1:{pair['real']}/",
    )  # fmt: skip
    assert out.returncode != 0
    assert out.stdout.strip() == "502"
    _decoy_untouched(pair)


def test_plain_http_refuses_with_502(pair: dict[str, object]) -> None:
    out = curl(
        "-x", f"http://127.0.0.1:{pair['http']}", "-w", "\n%{http_code}", f"http://127.0.0.1:{pair['real']}/"
    )
    assert out.stdout.rsplit("\n", 1)[-1] == "502", out.stdout
    assert "decoy" not in out.stdout
    _decoy_untouched(pair)


def test_a_forward_with_a_destination_is_closed_unanswered(pair: dict[str, object]) -> None:
    try:
        got = echo_roundtrip(int(str(pair["named"])), b"GET / HTTP/1.0\r\n\r\n", timeout=10)
    except OSError:  # reset: the agent refused it (a write or the half-close may see the reset first)
        got = b""
    assert got == b""
    _decoy_untouched(pair)


def test_a_forward_without_a_destination_still_uses_the_servers_target(pair: dict[str, object]) -> None:
    got = echo_roundtrip(int(str(pair["plain"])), b"GET / HTTP/1.0\r\n\r\n", timeout=10)
    assert got.endswith(b"decoy")
