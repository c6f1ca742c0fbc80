"""WebSocks on the outside, both directions: no tunnel, one TCP (or TLS) connection per destination.

* ``vtunnel agent --server websocks://`` (and ``websockss://``) against a vproxy WebSocks server written from the
  wire facts (``fake_vproxy.FakeWebSocksServer``): curl through the SOCKS5 and HTTP fronts and a ``--forward``
  reaches the destination it named; a wrong password fails curl and reaches nothing.
* ``vtunnel server --listen websocks://`` (and ``websockss://``) against a WebSocks client written from the facts
  (``tests/apps/websocks_client.py``): the right login reaches a local web server, a wrong one gets 401, a
  malformed request 400, a destination the exit policy forbids a SOCKS5 refusal; garbage, truncated and slowloris
  requests never take the listener down. And curl through a vtunnel agent to a vtunnel server, both over WebSocks.

Real processes, real sockets, real TLS (a test CA) and real curl on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
import trustme
from anyio.abc import ByteStream
from anyio.streams.tls import TLSStream

from tests.apps.websocks_client import (
    SocksRejected,
    WebSocksRejected,
    read_all,
    websocks_connect,
)
from tests.conftest import Processes, free_port, wait_log, wait_port
from tests.e2e.fake_vproxy import fake_websocks_server
from tests.netutil import curl, echo_roundtrip, web_server

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")

LOGIN = "alice:correct horse\n"
SITE = b"the real site"


@dataclass(frozen=True)
class Certs:
    ca: Path
    #: the server's certificate chain and private key, one PEM file (mode 0600)
    server: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.server)
        return ctx


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    tmp = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(tmp / "server.pem")
    )
    (tmp / "server.pem").chmod(0o600)  # it holds the private key: vtunnel refuses it readable by others
    return Certs(ca=tmp / "ca.pem", server=tmp / "server.pem")


@pytest.fixture(params=["websocks", "websockss"])
def scheme(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def real_site() -> Iterator[tuple[int, list[bytes]]]:
    with web_server(SITE) as site:
        yield site


def private_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def start_agent(
    procs: Processes, tmp_path: Path, server_url: str, login: str, forward_to: int
) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ports = {"socks": free_port(), "http": free_port(), "forward": free_port()}
    agent = procs.start(
        "agent",
        "--server",
        server_url,
        "--websocks-user-file",
        str(private_file(tmp_path / "login", login)),
        "--socks",
        f"127.0.0.1:{ports['socks']}",
        "--http",
        f"127.0.0.1:{ports['http']}",
        "--forward",
        f"127.0.0.1:{ports['forward']}=127.0.0.1:{forward_to}",
    )
    for port in ports.values():
        wait_port(port)
    return agent, ports


def url_for(scheme: str, port: int, certs: Certs, *, server: bool) -> str:
    if scheme == "websocks":
        return f"websocks://127.0.0.1:{port}"
    query = f"cert={certs.server}&key={certs.server}" if server else f"ca={certs.ca}"
    return f"websockss://127.0.0.1:{port}?{query}"


# ------------------------------------------------------------------------------ vtunnel agent -> vproxy server


def test_agent_reaches_the_destination_it_named_through_a_vproxy_websocks_server(
    procs: Processes, tmp_path: Path, scheme: str, certs: Certs, real_site: tuple[int, list[bytes]]
) -> None:
    site, _seen = real_site
    tls = certs.server_context() if scheme == "websockss" else None
    with fake_websocks_server({"alice": "correct horse"}, tls) as vproxy:
        agent, ports = start_agent(
            procs, tmp_path, url_for(scheme, vproxy.port, certs, server=False), LOGIN, site
        )
        url = f"http://127.0.0.1:{site}/"
        assert curl("--socks5-hostname", f"127.0.0.1:{ports['socks']}", url).stdout == SITE.decode()
        assert curl("-p", "-x", f"http://127.0.0.1:{ports['http']}", url).stdout == SITE.decode()
        assert curl("-x", f"http://127.0.0.1:{ports['http']}", url).stdout == SITE.decode()
        got = echo_roundtrip(ports["forward"], b"GET / HTTP/1.0\r\n\r\n", timeout=10)
        assert got.endswith(SITE)
        assert vproxy.faults == []
        assert vproxy.refused_logins == 0
        # (waiting for the forward's port opened one more)
        assert set(vproxy.destinations) == {f"127.0.0.1:{site}"}
        assert len(vproxy.destinations) >= 4
        assert agent.poll() is None


def test_agent_with_a_wrong_password_reports_failure_and_reaches_nothing(
    procs: Processes, tmp_path: Path, scheme: str, certs: Certs, real_site: tuple[int, list[bytes]]
) -> None:
    site, seen = real_site
    tls = certs.server_context() if scheme == "websockss" else None
    with fake_websocks_server({"alice": "correct horse"}, tls) as vproxy:
        agent, ports = start_agent(
            procs, tmp_path, url_for(scheme, vproxy.port, certs, server=False), "alice:battery staple\n", site
        )
        url = f"http://127.0.0.1:{site}/"
        out = curl("--socks5-hostname", f"127.0.0.1:{ports['socks']}", url)
        assert out.returncode != 0
        assert SITE.decode() not in out.stdout
        out = curl(
            "-p", "-x", f"http://127.0.0.1:{ports['http']}", "-o", "/dev/null", "-w", "%{http_connect}", url
        )
        assert out.stdout.strip() == "403"
        with contextlib.suppress(
            ConnectionResetError
        ):  # reset: an end of stream would pass for an empty answer
            assert echo_roundtrip(ports["forward"], b"GET / HTTP/1.0\r\n\r\n", timeout=10) == b""
        assert vproxy.refused_logins >= 3
        assert vproxy.destinations == []
        assert seen == []
        assert "the server refused the user or password" in procs.output(agent)


def test_agent_verifies_the_websockss_server_against_its_ca(
    procs: Processes, tmp_path: Path, certs: Certs, real_site: tuple[int, list[bytes]]
) -> None:
    site, seen = real_site
    with fake_websocks_server({"alice": "correct horse"}, certs.server_context()) as vproxy:
        # no ca=: the system store, which does not know the test CA
        agent, ports = start_agent(procs, tmp_path, f"websockss://127.0.0.1:{vproxy.port}", LOGIN, site)
        out = curl("--socks5-hostname", f"127.0.0.1:{ports['socks']}", f"http://127.0.0.1:{site}/")
        assert out.returncode != 0
        assert seen == []
        assert "websocks.server_unreachable" in procs.output(agent)


# ------------------------------------------------------------------------------ WebSocks client -> vtunnel server


def start_server(
    procs: Processes, tmp_path: Path, url: str, *extra: str, config: str = ""
) -> subprocess.Popen[bytes]:
    users = private_file(tmp_path / "users", "# who may use this exit\n" + LOGIN)
    args = ["server", "--listen", url, "--websocks-user-file", str(users), *extra]
    if config:
        args += ["--config", str(tmp_path / "server.toml")]
        (tmp_path / "server.toml").write_text(config)
    server = procs.start(*args)
    wait_log(procs, server, "listening")
    return server


async def _connect(port: int, certs: Certs | None) -> ByteStream:
    stream: ByteStream = await anyio.connect_tcp("127.0.0.1", port)
    if certs is not None:
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        stream = await TLSStream.wrap(
            stream, hostname="127.0.0.1", ssl_context=ctx, standard_compatible=False
        )
    return stream


def fetch(
    port: int, site: int, password: str, certs: Certs | None = None, *, protocol: str = "socks5"
) -> bytes:
    """The page at ``127.0.0.1:site`` through the WebSocks server on ``port``."""

    async def go() -> bytes:
        stream = await _connect(port, certs)
        async with stream:
            rest = await websocks_connect(stream, "alice", password, "127.0.0.1", site, protocol=protocol)
            await stream.send(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            return await read_all(stream, rest)

    return anyio.run(go)


def raw_exchange(
    port: int, data: bytes, *, keep_open: bool = False, timeout: float = 10.0
) -> tuple[bytes, float]:
    """Send ``data`` (then half-close unless ``keep_open``); what came back until the server closed, and when."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if not keep_open:
            s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer, time.monotonic() - started


def test_server_serves_a_websocks_client_and_refuses_bad_logins(
    procs: Processes, tmp_path: Path, scheme: str, certs: Certs, real_site: tuple[int, list[bytes]]
) -> None:
    site, seen = real_site
    port = free_port()
    server = start_server(procs, tmp_path, url_for(scheme, port, certs, server=True), "--allow-private")
    client_certs = certs if scheme == "websockss" else None
    assert fetch(port, site, "correct horse", client_certs).endswith(SITE)
    with pytest.raises(WebSocksRejected) as refused:
        fetch(port, site, "battery staple", client_certs)
    assert refused.value.status == 401
    with pytest.raises(WebSocksRejected) as refused:
        fetch(port, site, "correct horse", client_certs, protocol="chat")
    assert refused.value.status == 400
    assert len(seen) == 1
    assert server.poll() is None


def test_server_applies_the_exit_policy(
    procs: Processes, tmp_path: Path, real_site: tuple[int, list[bytes]]
) -> None:
    site, seen = real_site
    port = free_port()
    start_server(procs, tmp_path, f"websocks://127.0.0.1:{port}")  # no --allow-private: loopback is forbidden
    with pytest.raises(SocksRejected) as refused:
        fetch(port, site, "correct horse")
    assert refused.value.reply == 0x02  # connection not allowed by ruleset
    assert seen == []


def test_bad_input_never_takes_the_listener_down(
    procs: Processes, tmp_path: Path, real_site: tuple[int, list[bytes]]
) -> None:
    site, _seen = real_site
    port = free_port()
    server = start_server(
        procs,
        tmp_path,
        f"websocks://127.0.0.1:{port}",
        "--allow-private",
        config="[server]\nhandshake_timeout = 1.0\n",
    )
    answer, _ = raw_exchange(port, b"\x16\x03\x01\x00\xff garbage \x00\xff\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    answer, _ = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: webso")  # truncated, then closed
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400 ")
    answer, took = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n", keep_open=True)  # slowloris
    assert answer == b""
    assert took < 5
    assert fetch(port, site, "correct horse").endswith(SITE)
    assert server.poll() is None
    output = procs.output(server)
    assert "websocks.handshake_timeout" in output
    assert "internal_error" not in output


# ------------------------------------------------------------------------------ curl -> vtunnel agent -> vtunnel server


def test_curl_through_a_vtunnel_agent_and_server_over_websocks(
    procs: Processes, tmp_path: Path, scheme: str, certs: Certs, real_site: tuple[int, list[bytes]]
) -> None:
    site, _seen = real_site
    port = free_port()
    server = start_server(procs, tmp_path, url_for(scheme, port, certs, server=True), "--allow-private")
    agent, ports = start_agent(procs, tmp_path, url_for(scheme, port, certs, server=False), LOGIN, site)
    url = f"http://127.0.0.1:{site}/"
    assert curl("--socks5-hostname", f"127.0.0.1:{ports['socks']}", url).stdout == SITE.decode()
    assert curl("-p", "-x", f"http://127.0.0.1:{ports['http']}", url).stdout == SITE.decode()
    assert server.poll() is None
    assert agent.poll() is None


# ------------------------------------------------------------------------------ configuration errors


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    from tests.conftest import ROOT, VTUNNEL

    return subprocess.run(
        [*VTUNNEL, *args], capture_output=True, text=True, cwd=ROOT, timeout=30, env={"PATH": "/usr/bin"}
    )


def test_what_a_websocks_end_cannot_do_is_refused_at_start(tmp_path: Path, psk_file: Path) -> None:
    login = str(private_file(tmp_path / "login", LOGIN))
    out = run_cli("server", "--listen", "websocks://127.0.0.1:0")
    assert out.returncode != 0
    assert "needs WebSocks users" in out.stderr
    out = run_cli(
        "server",
        "--listen",
        "websocks://127.0.0.1:0",
        "--websocks-user-file",
        login,
        "--psk-file",
        str(psk_file),
    )
    assert out.returncode != 0
    assert "has no key" in out.stderr
    out = run_cli("agent", "--server", "websocks://127.0.0.1:9", "--forward", "127.0.0.1:0")
    assert out.returncode != 0
    assert "exactly one WebSocks login" in out.stderr
    out = run_cli(
        "agent",
        "--server",
        "websocks://127.0.0.1:9",
        "--websocks-user-file",
        login,
        "--forward",
        "127.0.0.1:0",
    )
    assert out.returncode != 0
    assert "give every --forward a destination" in out.stderr
    out = run_cli("agent", "--server", "websocks://127.0.0.1:9?ca=x", "--websocks-user-file", login)
    assert out.returncode != 0
    assert "websocks:// takes no options" in out.stderr
