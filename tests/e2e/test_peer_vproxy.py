"""``--peer vproxy``: an agent whose fronts carry every destination the way vproxy's agent does.

No key, vproxy's empty SETTINGS, and each destination inside its stream: the WebSocks upgrade with the login's
minute-hashed password, the 10-byte frame header, then SOCKS5 ``CONNECT``. Real processes and real curl on
127.0.0.1, over tcp:// and kcp:// (conv 0): a ``vtunnel server --peer vproxy`` (which serves WebSocks inside
streams, as a vproxy server does) with a users file, and a web server the clients name.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Processes, free_port, wait_log, wait_port
from tests.netutil import curl, echo_roundtrip, web_server

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def private_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture(params=["tcp", "kcp"])
def scheme(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


def start_pair(
    procs: Processes, tmp_path: Path, scheme: str, real: int, login: str
) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    tport = free_port(socket.SOCK_DGRAM if scheme == "kcp" else socket.SOCK_STREAM)
    users = private_file(tmp_path / "users", "# who may use this exit\nalice:correct horse\n")
    server = procs.start(
        "server",
        "--listen",
        f"{scheme}://127.0.0.1:{tport}",
        "--peer",
        "vproxy",
        "--websocks-user-file",
        str(users),
        "--allow-private",
    )
    wait_log(procs, server, "listening")
    ports = {"socks": free_port(), "http": free_port(), "forward": free_port()}
    agent = procs.start(
        "agent",
        "--server",
        f"{scheme}://127.0.0.1:{tport}",
        "--peer",
        "vproxy",
        "--websocks-user-file",
        str(private_file(tmp_path / "login", login)),
        "--socks",
        f"127.0.0.1:{ports['socks']}",
        "--http",
        f"127.0.0.1:{ports['http']}",
        "--forward",
        f"127.0.0.1:{ports['forward']}=127.0.0.1:{real}",
        "--log-level",
        "debug",
    )
    for port in ports.values():
        wait_port(port)
    return agent, ports


@pytest.fixture
def real_site() -> Iterator[int]:
    with web_server(b"the real site") as (port, _seen):
        yield port


def test_every_front_reaches_the_destination_it_named(
    procs: Processes, tmp_path: Path, scheme: str, real_site: int
) -> None:
    agent, ports = start_pair(procs, tmp_path, scheme, real_site, "alice:correct horse\n")
    url = f"http://127.0.0.1:{real_site}/"
    assert curl("--socks5-hostname", f"127.0.0.1:{ports['socks']}", url).stdout == "the real site"
    assert curl("-p", "-x", f"http://127.0.0.1:{ports['http']}", url).stdout == "the real site"
    assert curl("-x", f"http://127.0.0.1:{ports['http']}", url).stdout == "the real site"
    got = echo_roundtrip(ports["forward"], b"GET / HTTP/1.0\r\n\r\n", timeout=10)
    assert got.endswith(b"the real site")
    assert agent.poll() is None


def test_a_wrong_password_is_refused_and_reported(
    procs: Processes, tmp_path: Path, scheme: str, real_site: int
) -> None:
    agent, ports = start_pair(procs, tmp_path, scheme, real_site, "alice:battery staple\n")
    url = f"http://127.0.0.1:{real_site}/"
    out = curl("--socks5-hostname", f"127.0.0.1:{ports['socks']}", url)
    assert out.returncode != 0
    assert "the real site" not in out.stdout
    out = curl(
        "-p", "-x", f"http://127.0.0.1:{ports['http']}", "-o", "/dev/null", "-w", "%{http_connect}", url
    )
    assert out.stdout.strip() == "403"
    assert "websocks.upgrade_refused" in procs.output(agent)


def test_peer_vproxy_needs_exactly_one_login_and_no_key(tmp_path: Path, psk_file: Path) -> None:
    from tests.conftest import ROOT, VTUNNEL

    base = [
        *VTUNNEL,
        "agent",
        "--server",
        "tcp://127.0.0.1:9",
        "--peer",
        "vproxy",
        "--forward",
        "127.0.0.1:0",
    ]
    out = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, timeout=30, env={"PATH": "/usr/bin"})
    assert out.returncode != 0
    assert "exactly one WebSocks login" in out.stderr
    login = private_file(tmp_path / "login", "alice:x\n")
    out = subprocess.run(
        [*base, "--websocks-user-file", str(login), "--psk-file", str(psk_file)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert out.returncode != 0
    assert "has no key" in out.stderr


def test_a_vtunnel_agent_uses_a_vproxy_server_written_from_the_wire_facts(
    procs: Processes, tmp_path: Path, real_site: int
) -> None:
    from tests.e2e.fake_vproxy import fake_vproxy_server

    with fake_vproxy_server({"alice": "correct horse"}) as vproxy:
        socks, http = free_port(), free_port()
        procs.start(
            "agent",
            "--server",
            f"tcp://127.0.0.1:{vproxy.port}",
            "--peer",
            "vproxy",
            "--websocks-user-file",
            str(private_file(tmp_path / "login", "alice:correct horse\n")),
            "--socks",
            f"127.0.0.1:{socks}",
            "--http",
            f"127.0.0.1:{http}",
        )
        wait_port(socks)
        wait_port(http)
        url = f"http://127.0.0.1:{real_site}/"
        assert curl("--socks5-hostname", f"127.0.0.1:{socks}", url).stdout == "the real site"
        assert curl("-p", "-x", f"http://127.0.0.1:{http}", url).stdout == "the real site"
        assert vproxy.faults == []
        assert vproxy.refused_logins == 0


def test_text_goes_to_a_vproxy_server_gzipped_as_vproxy_sends_it(procs: Processes, tmp_path: Path) -> None:
    """vproxy gzips DATA over 1 KiB when that makes it smaller, and inflates what it is sent: in vproxy mode the
    agent does the same for text-like payloads, and the server gets every byte."""
    from tests.e2e.fake_vproxy import fake_vproxy_server
    from tests.netutil import echo_server

    text = b"".join(
        b"line %d of a plain text upload, the kind that compresses well\n" % i for i in range(3000)
    )
    with echo_server() as echo, fake_vproxy_server({"alice": "correct horse"}) as vproxy:
        forward = free_port()
        procs.start(
            "agent",
            "--server",
            f"tcp://127.0.0.1:{vproxy.port}",
            "--peer",
            "vproxy",
            "--websocks-user-file",
            str(private_file(tmp_path / "login", "alice:correct horse\n")),
            "--forward",
            f"127.0.0.1:{forward}=127.0.0.1:{echo}",
        )
        wait_port(forward)
        assert echo_roundtrip(forward, text, timeout=20) == text
        assert vproxy.gzipped_frames > 0
        assert vproxy.faults == []
