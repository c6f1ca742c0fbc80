"""The `vtunnel` command end to end: real processes, real sockets on 127.0.0.1, real curl."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import ROOT, VTUNNEL, Processes, free_port, wait_log, wait_port
from tests.netutil import echo_roundtrip, echo_server, first_echo_after, pattern

BODY = pattern(200_000, seed=7)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def web() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def echo() -> Iterator[int]:
    with echo_server() as port:
        yield port


def start_pair(
    procs: Processes,
    scheme: str,
    key: Path,
    *,
    target: int | None = None,
    socks: bool = False,
    url_query: str = "",
    extra_server: tuple[str, ...] = (),
    tunnel_port: int | None = None,
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], int]:
    tport = tunnel_port or free_port()
    url = f"{scheme}://127.0.0.1:{tport}{url_query}"
    server_args = ["server", "--listen", url, "--psk-file", str(key), "--log-level", "debug", *extra_server]
    if target is not None:
        server_args += ["--target", f"127.0.0.1:{target}"]
    if socks:
        server_args += ["--allow-private"]
    server = procs.start(*server_args)
    if scheme in ("tcp", "tls"):
        wait_port(tport)
    else:
        wait_log(procs, server, "listening")
    front = free_port()
    client_url = url
    if scheme == "tls":
        client_url = f"tls://127.0.0.1:{tport}?ca={key.parent / 'ca.pem'}&servername=localhost"
    agent_args = ["agent", "--server", client_url, "--psk-file", str(key), "--log-level", "debug"]
    agent_args += ["--socks", f"127.0.0.1:{front}"] if socks else ["--forward", f"127.0.0.1:{front}"]
    agent = procs.start(*agent_args)
    wait_port(front)
    return server, agent, front


def tls_query(tmp: Path) -> str:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "server.pem"))
    (tmp / "server.pem").chmod(0o600)  # it holds the private key: the server refuses it readable by others
    return f"?cert={tmp / 'server.pem'}&key={tmp / 'server.pem'}"


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["tcp", "tls"])
def test_forward_moves_64_mib_byte_exact(
    procs: Processes, psk_file: Path, echo: int, scheme: str, tmp_path: Path
) -> None:
    query = tls_query(tmp_path) if scheme == "tls" else ""
    _, _, front = start_pair(procs, scheme, psk_file, target=echo, url_query=query)
    payload = pattern(64 * 1024 * 1024, seed=3)
    assert echo_roundtrip(front, payload, timeout=120) == payload


@pytest.mark.parametrize("scheme", ["tcp", "kcp"])
def test_200_concurrent_streams_in_one_tunnel(
    procs: Processes, psk_file: Path, echo: int, scheme: str
) -> None:
    _, _, front = start_pair(procs, scheme, psk_file, target=echo)
    payloads = [pattern(32 * 1024 + i * 97, seed=i) for i in range(200)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=200) as pool:
        results = list(pool.map(lambda p: echo_roundtrip(front, p, timeout=60), payloads))
    assert [len(r) for r in results] == [len(p) for p in payloads]
    assert results == payloads


@pytest.mark.parametrize("scheme", ["tcp", "kcp"])
def test_curl_socks5_through_agent_and_server(
    procs: Processes, psk_file: Path, web: int, scheme: str
) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed (.ci/run installs it)")
    _, _, front = start_pair(procs, scheme, psk_file, socks=True)
    out = subprocess.run(
        [
            curl,
            "-sS",
            "--max-time",
            "20",
            "--socks5-hostname",
            f"127.0.0.1:{front}",
            f"http://127.0.0.1:{web}/",
        ],
        capture_output=True,
        check=True,
    )
    assert out.stdout == BODY


@pytest.mark.parametrize("scheme", ["tcp", "kcp"])
def test_server_restart_is_followed_by_reconnection(
    procs: Processes, psk_file: Path, echo: int, scheme: str
) -> None:
    server, _, front = start_pair(procs, scheme, psk_file, target=echo)
    assert echo_roundtrip(front, b"before restart") == b"before restart"
    args = list(server.args)  # type: ignore[arg-type]
    tunnel_url = str(args[args.index("--listen") + 1])
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=10)
    procs.start(
        "server", "--listen", tunnel_url, "--psk-file", str(psk_file), "--target", f"127.0.0.1:{echo}"
    )
    restarted = time.monotonic()
    # over TCP the dead tunnel shows at once (the connection is refused/reset); over sealed kcp:// the restarted
    # server answers the old session's datagrams with a stateless reset (its connection ID carries a check
    # only a key holder can mint), so the agent finds out as fast
    first_echo_after(front, restarted, budget=5.0)


@pytest.mark.parametrize("scheme", ["tcp", "kcp"])
def test_sigterm_drains_an_open_transfer_and_exits_zero(
    procs: Processes, psk_file: Path, echo: int, scheme: str
) -> None:
    server, _, front = start_pair(procs, scheme, psk_file, target=echo)
    payload = pattern(8 * 1024 * 1024, seed=11)
    result: dict[str, bytes | BaseException] = {}

    def slow_client() -> None:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", front), timeout=30) as s:
                s.settimeout(30)
                s.sendall(payload[:65536])
                got = bytearray(s.recv(65536))
                result["started"] = b"1"
                s.sendall(payload[65536:])
                s.shutdown(socket.SHUT_WR)
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                    time.sleep(0.002)  # a slow reader keeps the transfer going past the signal
                result["data"] = bytes(got)
        except BaseException as exc:
            result["error"] = exc

    t = threading.Thread(target=slow_client)
    t.start()
    deadline = time.monotonic() + 20
    while "started" not in result and "error" not in result and time.monotonic() < deadline:
        time.sleep(0.01)
    server.send_signal(signal.SIGTERM)
    t.join(timeout=60)
    assert "error" not in result, result.get("error")
    assert result.get("data") == payload
    assert server.wait(timeout=30) == 0


def test_unknown_transport_scheme_names_what_to_install(tmp_path: Path) -> None:
    out = subprocess.run(
        [*VTUNNEL, "agent", "--server", "sctp://127.0.0.1:4000", "--insecure", "--socks", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert out.returncode == 2
    assert "no transport for scheme 'sctp'" in out.stderr
    assert "pip install" in out.stderr


def test_server_without_key_refuses_to_start() -> None:
    out = subprocess.run(
        [*VTUNNEL, "server", "--listen", "tcp://127.0.0.1:0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        env={k: v for k, v in os.environ.items() if k != "VTUNNEL_PSK"},
    )
    assert out.returncode == 2
    assert "--insecure" in out.stderr
    assert "vtunnel keygen" in out.stderr


def test_transports_lists_the_builtins() -> None:
    out = subprocess.run(
        [*VTUNNEL, "transports"], capture_output=True, text=True, cwd=ROOT, timeout=30, check=True
    )
    for scheme in ("tcp", "tls", "kcp"):
        assert any(line.startswith(scheme) for line in out.stdout.splitlines()), out.stdout


def test_help_explains_each_command() -> None:
    for cmd in ("server", "agent", "keygen", "transports", "demo"):
        out = subprocess.run(
            [sys.executable, "-m", "vtunnel", cmd, "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        assert "Usage:" in out.stdout


@pytest.mark.parametrize("command", ["server", "agent"])
def test_a_port_in_use_is_one_clear_line_and_exit_1(command: str) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        if command == "server":
            args = ["server", "--listen", f"tcp://127.0.0.1:{port}", "--insecure"]
        else:
            args = ["agent", "--server", "tcp://127.0.0.1:9", "--socks", f"127.0.0.1:{port}", "--insecure"]
        out = subprocess.run([*VTUNNEL, *args], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 1
    assert "cannot start" in out.stderr
    assert "Address already in use" in out.stderr
    assert "Traceback" not in out.stderr
