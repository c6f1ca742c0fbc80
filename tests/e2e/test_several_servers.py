"""An agent with several servers: failover, the fallback from UDP to TLS, and servers behind HAProxy.

Real processes on loopback: `vtunnel server` processes, one `vtunnel agent` given several ``--server`` URLs, curl
through its SOCKS5 front to a web server. Which server carried a stream is read from the servers' own logs (the
exit logs ``relaying`` for each stream it connects).

* Stopping the server in use (killed, or SIGTERM's graceful GOAWAY) moves new streams to another within 5 s.
* With UDP dropped by an nftables rule inside a network namespace made for the test, the agent falls back from
  ``kcp://`` to ``tls://`` and curl works; once the rule is gone the agent's probe finds the kcp:// server and
  its tunnel moves back.
* HAProxy (TCP mode) in front of two ``tls://`` servers: 200 parallel curls through one agent with a pool of
  tunnels, every body byte-exact, both servers used; when one of them is killed, the agent's tunnels come back
  through HAProxy to the other within 5 s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import Processes, free_port, wait_log, wait_port
from tests.e2e.test_cli import tls_query
from tests.e2e.test_metrics import parse, scrape, value
from tests.netutil import pattern

#: what a failover may take: the promise is "new streams on another server within 5 s"
FAILOVER_BUDGET = 5.0
BODY = 48 * 1024

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None, reason="curl is not installed (.ci/run installs it)"
)


class _Pages(BaseHTTPRequestHandler):
    """``GET /N`` answers ``pattern(BODY, seed=N)``: every request has a body of its own."""

    def do_GET(self) -> None:
        try:
            seed = int(self.path.strip("/") or "0")
        except ValueError:
            self.send_error(404)
            return
        body = pattern(BODY, seed=seed)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def web() -> Iterator[int]:
    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 512

    srv = Server(("127.0.0.1", 0), _Pages)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=5)


@dataclass(frozen=True)
class Tls:
    """A server certificate for ``localhost`` and the CA that signed it."""

    listen_query: str
    connect_query: str


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    return Tls(
        listen_query=tls_query(tmp_path), connect_query=f"?ca={tmp_path / 'ca.pem'}&servername=localhost"
    )


def curl_page(
    socks: int, web: int, page: int, *, timeout: float, prefix: tuple[str, ...] = ()
) -> bytes | str:
    """The body of ``/page`` fetched through the agent's SOCKS5 front, or curl's error when it failed."""
    proc = subprocess.run(
        [
            *prefix,
            "curl",
            "-sS",
            "--max-time",
            f"{timeout:g}",
            "--socks5-hostname",
            f"127.0.0.1:{socks}",
            f"http://127.0.0.1:{web}/{page}",
        ],
        capture_output=True,
        timeout=timeout + 10,
        check=False,
    )
    return (
        proc.stdout
        if proc.returncode == 0
        else proc.stderr.decode(errors="replace") or f"exit {proc.returncode}"
    )


def expect_page(
    procs: Processes,
    agent: subprocess.Popen[bytes],
    socks: int,
    web: int,
    page: int,
    *,
    prefix: tuple[str, ...] = (),
) -> None:
    """``/page`` through the agent is whole, or the test fails with curl's error and the end of the agent's log."""
    got = curl_page(socks, web, page, timeout=10, prefix=prefix)
    if got != pattern(BODY, seed=page):
        said = got if isinstance(got, str) else f"{len(got)} bytes that are not the page"
        tail = "\n".join(procs.output(agent).splitlines()[-40:])
        pytest.fail(f"page {page}: {said}\nthe agent's log ends:\n{tail}")


def start_server(
    procs: Processes, *urls: str, key: Path, prefix: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    args = ["server", "--psk-file", str(key), "--allow-private", "--log-level", "debug"]
    for url in urls:
        args += ["--listen", url]
    proc = procs.start(*args, prefix=prefix)
    wait_log(procs, proc, "listening")
    return proc


def start_agent(
    procs: Processes, *urls: str, key: Path, extra: tuple[str, ...] = (), prefix: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[bytes], int]:
    socks = free_port()
    args = ["agent", "--psk-file", str(key), "--socks", f"127.0.0.1:{socks}", "--log-level", "debug", *extra]
    for url in urls:
        args += ["--server", url]
    proc = procs.start(*args, prefix=prefix)
    wait_log(procs, proc, "listening")
    return proc, socks


def relayed(procs: Processes, server: subprocess.Popen[bytes]) -> int:
    """Streams this server connected to their destination."""
    return procs.output(server).count("relaying")


def first_page_after(
    socks: int, web: int, since: float, budget: float, prefix: tuple[str, ...] = ()
) -> float:
    """Seconds from ``since`` until a curl through the agent gets its page whole; fails the test after
    ``budget`` seconds (a deadline the agent promises, not a speed measurement)."""
    page = 1000
    while time.monotonic() - since < budget:
        page += 1
        if curl_page(socks, web, page, timeout=2, prefix=prefix) == pattern(BODY, seed=page):
            return time.monotonic() - since
        time.sleep(0.05)
    pytest.fail(f"no page through the agent within {budget} s")


# --- failover ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "terminated"])
def test_stopping_the_server_in_use_moves_new_streams_to_another(
    procs: Processes, psk_file: Path, web: int, how: signal.Signals
) -> None:
    ports = [free_port() for _ in range(3)]
    servers = [start_server(procs, f"tcp://127.0.0.1:{port}", key=psk_file) for port in ports]
    metrics = free_port()
    agent, socks = start_agent(
        procs, *(f"tcp://127.0.0.1:{port}" for port in ports), key=psk_file, extra=("--metrics", str(metrics))
    )
    expect_page(procs, agent, socks, web, 1)
    # one tunnel: it went to the first server given, and carried the stream
    assert [relayed(procs, s) for s in servers] == [1, 0, 0]
    _, samples = parse(scrape(metrics))
    assert [value(samples, "vtunnel_server_tunnels", server=str(i)) for i in range(3)] == [1, 0, 0]
    assert value(samples, "vtunnel_server_up", server="0", transport="tcp") == 1

    left = list(servers)
    for round_ in range(2):
        in_use = next(s for s in left if relayed(procs, s))
        before = {id(s): relayed(procs, s) for s in left}
        os.killpg(in_use.pid, how)
        stopped = time.monotonic()
        in_use.wait(timeout=15)
        left.remove(in_use)
        elapsed = first_page_after(socks, web, stopped, FAILOVER_BUDGET)
        print(
            f"failover {round_ + 1} ({how.name}): first whole page {elapsed:.2f} s after the server was stopped"
        )
        moved_to = [s for s in left if relayed(procs, s) > before[id(s)]]
        assert len(moved_to) == 1
        for page in range(2, 6):
            expect_page(procs, agent, socks, web, page)
        # the metrics say where the tunnel is, and which server stopped answering (by place in the list)
        _, samples = parse(scrape(metrics))
        gone, now = servers.index(in_use), servers.index(moved_to[0])
        assert value(samples, "vtunnel_server_tunnels", server=str(now)) == 1
        assert value(samples, "vtunnel_server_tunnels", server=str(gone)) == 0
        if how is signal.SIGKILL:  # a GOAWAY is no failure, a refused connect afterwards is
            assert value(samples, "vtunnel_server_failures_total", server=str(gone)) >= 1
    assert "server unavailable" in procs.output(agent)
    assert agent.poll() is None


def test_a_frozen_server_is_left_within_5_s_with_a_short_keepalive(
    procs: Processes, psk_file: Path, web: int, tmp_path: Path
) -> None:
    """A server that stops answering without closing anything (SIGSTOP: as a host that went down or a path that
    went black) is noticed by the tunnel's keepalive; with ``keepalive_interval = 1``, ``keepalive_timeout = 1``
    (``max_missed`` 2) in the agent's [tunnel] that is within 3 s of its last word, and new streams go on
    another server within 5 s."""
    config = tmp_path / "agent.toml"
    config.write_text(
        "[tunnel]\nkeepalive_interval = 1.0\nkeepalive_timeout = 1.0\nkeepalive_max_missed = 2\n"
    )
    ports = [free_port() for _ in range(2)]
    servers = [start_server(procs, f"tcp://127.0.0.1:{port}", key=psk_file) for port in ports]
    agent, socks = start_agent(
        procs, *(f"tcp://127.0.0.1:{port}" for port in ports), key=psk_file, extra=("--config", str(config))
    )
    expect_page(procs, agent, socks, web, 1)
    assert [relayed(procs, s) for s in servers] == [1, 0]
    os.killpg(servers[0].pid, signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        elapsed = first_page_after(socks, web, frozen, FAILOVER_BUDGET)
        print(f"frozen server: first whole page {elapsed:.2f} s after SIGSTOP (keepalive 1 s x 2)")
        assert relayed(procs, servers[1]) >= 1
        assert "keepalive timeout" in procs.output(agent)
    finally:
        os.killpg(servers[0].pid, signal.SIGCONT)


# --- UDP blocked: the fallback to tls:// --------------------------------------------------------------------------


def _run(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(list(argv), input=stdin, text=True, capture_output=True, timeout=20, check=True)


def _netns_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@dataclass(frozen=True)
class Netns:
    name: str

    @property
    def prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)

    def block_udp(self) -> None:
        rules = "table inet vtt-srv {\n chain input {\n  type filter hook input priority 0; policy accept;\n"
        rules += "  meta l4proto udp drop\n }\n}\n"
        _run(*self.prefix, "nft", "-f", "-", stdin=rules)

    def unblock_udp(self) -> None:
        _run(*self.prefix, "nft", "delete", "table", "inet", "vtt-srv")


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A network namespace of the test's own (only its loopback, up): ``vtt-srv-PID``."""
    reason = _netns_reason()
    if reason is not None:
        pytest.skip(reason)
    ns = Netns(f"vtt-srv-{os.getpid()}")
    try:
        _run("ip", "netns", "add", ns.name)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"network namespaces are not permitted here: {exc.stderr.strip()}")
    try:
        _run("ip", "-n", ns.name, "link", "set", "lo", "up")
        yield ns
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _run("ip", "netns", "del", ns.name)


@pytest.fixture
def web_in(netns: Netns, tmp_path: Path) -> Iterator[int]:
    """A web server inside the namespace: ``/N`` is ``pattern(BODY, seed=N)`` for a few pages."""
    root = tmp_path / "www"
    root.mkdir()
    for page in range(1, 40):
        (root / str(page)).write_bytes(pattern(BODY, seed=page))
    for page in range(1001, 1200):
        (root / str(page)).write_bytes(pattern(BODY, seed=page))
    port = free_port()
    proc = subprocess.Popen(
        [
            *netns.prefix,
            "python3",
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(root),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 15
        while subprocess.run(
            [*netns.prefix, "curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/1"], check=False
        ).returncode:
            assert time.monotonic() < deadline, "the namespace's web server did not start"
            time.sleep(0.1)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_with_udp_blocked_the_agent_falls_back_to_tls_and_returns(
    netns: Netns, web_in: int, procs: Processes, psk_file: Path, tls: Tls
) -> None:
    kcp_port, tls_port = free_port(), free_port()
    server = start_server(
        procs,
        f"kcp://127.0.0.1:{kcp_port}",
        f"tls://127.0.0.1:{tls_port}{tls.listen_query}",
        key=psk_file,
        prefix=netns.prefix,
    )
    netns.block_udp()
    started = time.monotonic()
    # the tls:// URL first: the order of the tiers is the transports', not the list's
    agent, socks = start_agent(
        procs,
        f"tls://127.0.0.1:{tls_port}{tls.connect_query}",
        f"kcp://127.0.0.1:{kcp_port}?connect_timeout=2",
        key=psk_file,
        prefix=netns.prefix,
    )
    wait_log(procs, agent, "using a fallback server", timeout=20)
    elapsed = first_page_after(socks, web_in, started, 20, prefix=netns.prefix)
    print(f"UDP blocked: first whole page {elapsed:.2f} s after the agent started (kcp:// connect_timeout=2)")
    for page in range(1, 11):
        expect_page(procs, agent, socks, web_in, page, prefix=netns.prefix)
    out = procs.output(agent)
    assert "server unavailable" in out
    assert f"kcp://127.0.0.1:{kcp_port}" in out

    netns.unblock_udp()
    unblocked = time.monotonic()
    wait_log(procs, agent, "moved_from", timeout=30)
    print(f"UDP open again: the tunnel moved back to kcp:// after {time.monotonic() - unblocked:.2f} s")
    for page in range(11, 21):
        expect_page(procs, agent, socks, web_in, page, prefix=netns.prefix)
    assert server.poll() is None
    assert agent.poll() is None


# --- HAProxy in front of two tls:// servers -----------------------------------------------------------------------

HAPROXY_CONFIG = """\
global
    maxconn 4096

defaults
    mode tcp
    # a connection to a server that just died goes to the other before the health check has seen it
    retries 2
    option redispatch
    timeout connect 5s
    # above the tunnel's keepalive interval (5 s), so an idle tunnel is never cut
    timeout client 1m
    timeout server 1m

frontend vtunnel
    bind 127.0.0.1:{front}
    default_backend vtunnel_servers

backend vtunnel_servers
    balance roundrobin
{servers}
"""
TWO_SERVERS = """\
    server s1 127.0.0.1:{a} check inter 2s
    server s2 127.0.0.1:{b} check inter 2s"""

CURLS = 200


def agent_behind(
    procs: Processes, front: int, tls: Tls, key: Path, *, conn: int
) -> tuple[subprocess.Popen[bytes], int]:
    """An agent of ``conn`` tunnels to HAProxy's ``front`` (tls://), once they are all up: it and its SOCKS5 port."""
    agent, socks = start_agent(
        procs, f"tls://127.0.0.1:{front}{tls.connect_query}", key=key, extra=("--conn", str(conn))
    )
    deadline = time.monotonic() + 30
    while procs.output(agent).count("tunnel up") < conn:
        assert time.monotonic() < deadline, f"the agent's {conn} tunnels did not come up"
        time.sleep(0.1)
    return agent, socks


@contextlib.contextmanager
def running_haproxy(haproxy_bin: str, config: Path, front: int) -> Iterator[subprocess.Popen[bytes]]:
    """HAProxy on ``config`` until the block ends, its front port open."""
    haproxy = subprocess.Popen(
        [haproxy_bin, "-f", str(config), "-db"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_port(front)
        yield haproxy
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(haproxy.pid, signal.SIGKILL)
        haproxy.wait(timeout=10)


@pytest.fixture
def haproxy_bin() -> str:
    found = shutil.which("haproxy", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if found is None:
        pytest.skip("haproxy is not installed (.ci/run installs it)")
    return found


def test_haproxy_in_front_of_two_tls_servers_carries_200_parallel_curls(
    procs: Processes, psk_file: Path, web: int, tls: Tls, tmp_path: Path, haproxy_bin: str
) -> None:
    a, b, front = free_port(), free_port(), free_port()
    servers = [
        start_server(procs, f"tls://127.0.0.1:{port}{tls.listen_query}", key=psk_file) for port in (a, b)
    ]
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(front=front, servers=TWO_SERVERS.format(a=a, b=b)))
    with running_haproxy(haproxy_bin, config, front):
        agent, socks = agent_behind(procs, front, tls, psk_file, conn=8)

        def fetch(page: int) -> bool:
            return curl_page(socks, web, page, timeout=60) == pattern(BODY, seed=page)

        with ThreadPoolExecutor(max_workers=CURLS) as pool:
            results = list(pool.map(fetch, range(1, CURLS + 1), timeout=120))
        assert results.count(True) == CURLS
        streams = [relayed(procs, s) for s in servers]
        print(f"HAProxy, two tls:// servers: {CURLS} curls, streams per server {streams}")
        assert sum(streams) == CURLS
        assert all(streams), "both servers carry streams"

        # one server dies: its tunnels come back through HAProxy, which redispatches them to the other
        os.killpg(servers[0].pid, signal.SIGKILL)
        killed = time.monotonic()
        servers[0].wait(timeout=10)
        elapsed = first_page_after(socks, web, killed, FAILOVER_BUDGET)
        print(f"HAProxy, one server killed: first whole page {elapsed:.2f} s later")
        # the four tunnels that went to it are made again, all to the other one
        while procs.output(agent).count("tunnel up") < 12:
            assert time.monotonic() - killed < 15, "the agent's pool did not come back to 8 tunnels"
            time.sleep(0.1)
        print(f"HAProxy, one server killed: the pool whole again {time.monotonic() - killed:.2f} s later")
        before = relayed(procs, servers[1])
        with ThreadPoolExecutor(max_workers=20) as pool:
            results = list(pool.map(fetch, range(1, 21), timeout=120))
        assert results.count(True) == 20
        assert relayed(procs, servers[1]) == before + 20
        assert agent.poll() is None


# --- HAProxy's PROXY protocol: the servers see the agents' own addresses ----------------------------------------

SEND_PROXY_SERVERS = """\
    # HAProxy's own address towards the servers: not the agents' (127.0.0.1, 127.0.0.3)
    source 127.0.0.5
    server s1 127.0.0.1:{a} send-proxy check check-send-proxy inter 2s
    server s2 127.0.0.1:{b} send-proxy-v2 check check-send-proxy inter 2s"""


def wrong_key_from(address: str, port: int, tmp_path: Path) -> None:
    """A client on ``address`` that reaches a server through HAProxy (TLS, then the key handshake) with a key the
    servers do not hold."""
    import ssl

    import anyio
    from anyio.streams.tls import TLSStream

    from tests.streams import wrong_key_hello

    async def main() -> None:
        raw = await anyio.connect_tcp("127.0.0.1", port, local_host=address)
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        stream = await TLSStream.wrap(
            raw, hostname="localhost", ssl_context=context, standard_compatible=False
        )
        await stream.send(wrong_key_hello(bytes(32)))
        with anyio.move_on_after(2), contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            assert await stream.receive() == b"", "the server answered a wrong key"
        await anyio.aclose_forcefully(stream)

    anyio.run(main)


def test_haproxy_send_proxy_v1_and_v2_give_the_servers_the_agents_addresses(
    procs: Processes, psk_file: Path, web: int, tls: Tls, tmp_path: Path, haproxy_bin: str
) -> None:
    a, b, front = free_port(), free_port(), free_port()
    servers = [
        start_server(procs, f"tls://127.0.0.1:{port}{tls.listen_query}&proxy=1", key=psk_file)
        for port in (a, b)
    ]
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(front=front, servers=SEND_PROXY_SERVERS.format(a=a, b=b)))
    with running_haproxy(haproxy_bin, config, front):
        agent, socks = agent_behind(procs, front, tls, psk_file, conn=4)
        for page in range(1, 21):
            expect_page(procs, agent, socks, web, page)
        assert all(relayed(procs, s) for s in servers), "both servers (v1 and v2) carry streams"

        # each server took its tunnels' key handshakes from the agent's address, never from HAProxy's
        for server in servers:
            ups = [line for line in procs.output(server).splitlines() if "secure channel up" in line]
            assert ups, "the server logged no tunnel"
            assert all("source=127.0.0.1" in line for line in ups), ups
            assert "127.0.0.5" not in procs.output(server)

        # a client on 127.0.0.3 with a wrong key: refused, and logged under 127.0.0.3, on both servers in turn
        for _ in range(2):
            wrong_key_from("127.0.0.3", front, tmp_path)
        deadline = time.monotonic() + 15
        while not all("source=127.0.0.3" in procs.output(s) for s in servers):
            assert time.monotonic() < deadline, "the refused handshakes were not logged under 127.0.0.3"
            time.sleep(0.1)
        for server in servers:
            refused = [line for line in procs.output(server).splitlines() if "handshake refused" in line]
            assert refused
            assert all("source=127.0.0.3" in line for line in refused), refused

        # straight to a server, around HAProxy: no header, refused; the server serves on
        with socket.create_connection(("127.0.0.1", a), timeout=10) as direct:
            direct.sendall(b"\x16\x03\x01\x00\x05hello")
            direct.settimeout(10)
            with contextlib.suppress(OSError):
                assert direct.recv(100) == b""
        wait_log(procs, servers[0], "connection refused: no valid PROXY header")
        expect_page(procs, agent, socks, web, 100)
