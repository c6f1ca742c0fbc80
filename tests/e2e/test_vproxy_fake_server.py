"""vproxy's KCP (wire facts §2) both ways, and a vtunnel agent in vproxy mode against the vproxy tunnel server
written from the wire facts, over tcp:// and kcp://.

The server is :class:`tests.e2e.fake_vproxy.FakeVproxyServer` (the empty SETTINGS and nothing else, WebSocks
required inside every stream). Over kcp:// a :class:`KcpFront` stands in front of it: vproxy's KCP from the wire
facts (§2: plain ikcp segments, no header of their own, conversation 0, stream mode, fast3-like settings, windows
1024, mtu 1250), each client's byte stream relayed to the fake server's TCP port. It notes every datagram that
is not conversation 0 or is longer than 1250 bytes. Every front that names a destination (SOCKS5, HTTP CONNECT,
plain HTTP, ``--forward LISTEN=DEST``) must reach that destination, never anything else, with real curl; 512 KiB
echoed each way through a forward fills the datagrams. The other way, :class:`KcpClient` is vproxy's KCP client
side, carrying the raw vproxy client of ``test_vproxy_wire.py`` to a ``vtunnel server --listen kcp://``. And
the misrouting this mode was made for: without it, an agent with ``extensions = false`` refuses every named
destination against the same server.
"""

from __future__ import annotations

import contextlib
import random
import select
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import siokcp

from tests.conftest import Processes, free_port, wait_log, wait_port
from tests.e2e.fake_vproxy import FakeVproxyServer, fake_vproxy_server
from tests.e2e.test_vproxy_wire import frame, handshake, read_frame
from tests.netutil import curl, echo_roundtrip, echo_server, web_server

pytestmark = [
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
    pytest.mark.timeout(60),
]

#: vproxy's KCP (wire facts §2)
VPROXY_CONV = 0
VPROXY_MTU = 1250


class _Session:
    """One peer's KCP control block, and the TCP connection its stream is relayed to."""

    def __init__(self, udp: socket.socket, peer: tuple[str, int], tcp: socket.socket) -> None:
        def output(data: bytes) -> int:
            with contextlib.suppress(OSError):
                udp.sendto(data, peer)
            return 0

        self.kcp = siokcp.KCPConnection(VPROXY_CONV, output, lambda _data: 0)
        self.kcp.stream = 1
        self.kcp.nodelay(1, 10, 2, 1)
        self.kcp.wndsize(1024, 1024)
        self.kcp.setmtu(VPROXY_MTU)
        self.tcp = tcp
        self.tcp.setblocking(False)
        self.outbox = b""  # for the TCP side

    def close(self) -> None:
        self.kcp.send_cb = None  # siokcp blocks are not garbage-collected: break the cycle
        self.tcp.close()


class _KcpRelay:
    """vproxy's KCP on one UDP socket, each session's stream relayed to a TCP connection; ``faults`` lists the
    datagrams that broke vproxy's KCP rules (another conversation than 0, longer than 1250 bytes)."""

    def __init__(self) -> None:
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self.faults: list[str] = []
        self.datagrams = 0
        self.largest = 0
        self.sessions: dict[tuple[str, int], _Session] = {}
        self.stop = threading.Event()

    def _watched(self) -> list[socket.socket]:
        return [self.udp, *(s.tcp for s in self.sessions.values())]

    def _readable(self, readable: list[socket.socket]) -> None:
        """Hook: sockets of the subclass's own that are readable."""

    def _new_session(self, peer: tuple[str, int]) -> _Session | None:
        """Hook: the session for a datagram from a peer without one (``None``: the datagram is dropped)."""
        return None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                readable, _, _ = select.select(self._watched(), [], [], 0.005)
                self._readable(readable)
                if self.udp in readable:
                    self._datagrams()
                for session in list(self.sessions.values()):
                    if session.tcp in readable:
                        self._from_tcp(session)
                    self._to_tcp(session)
                    session.kcp.update(int(time.monotonic() * 1000) & 0xFFFFFFFF)
        finally:
            for session in self.sessions.values():
                session.close()
            self.udp.close()

    def _datagrams(self) -> None:
        for _ in range(256):
            try:
                data, peer = self.udp.recvfrom(65536)
            except BlockingIOError:
                return
            self.datagrams += 1
            self.largest = max(self.largest, len(data))
            if len(data) > VPROXY_MTU:
                self.faults.append(f"a datagram of {len(data)} bytes (vproxy's mtu is {VPROXY_MTU})")
            if len(data) < 4 or struct.unpack_from("<I", data)[0] != VPROXY_CONV:
                self.faults.append(f"a datagram not of conversation {VPROXY_CONV}: {data[:4].hex()}")
                continue
            session = self.sessions.get(peer) or self._new_session(peer)
            if session is not None:
                self.sessions[peer] = session
                session.kcp.receive_data(data)

    def _from_tcp(self, session: _Session) -> None:
        try:
            data = session.tcp.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            session.kcp.send(data)
            session.kcp.flush()

    def _to_tcp(self, session: _Session) -> None:
        while (segment := session.kcp.next_event()) is not None:
            session.outbox += segment
        if session.outbox:
            with contextlib.suppress(BlockingIOError):
                sent = session.tcp.send(session.outbox)
                session.outbox = session.outbox[sent:]


class KcpFront(_KcpRelay):
    """vproxy's KCP listener in front of a TCP tunnel server: each client's stream to ``tcp_port``."""

    def __init__(self, tcp_port: int) -> None:
        super().__init__()
        self.tcp_port = tcp_port
        self.port: int = self.udp.getsockname()[1]

    def _new_session(self, peer: tuple[str, int]) -> _Session:
        return _Session(self.udp, peer, socket.create_connection(("127.0.0.1", self.tcp_port)))


class KcpClient(_KcpRelay):
    """vproxy's KCP client side for one tunnel: the first TCP connection to ``port`` is a KCP session
    (conversation 0) to ``127.0.0.1:server``; a later one is closed (vproxy opens a UDP port per tunnel)."""

    def __init__(self, server: int) -> None:
        super().__init__()
        self.server = ("127.0.0.1", server)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]

    def _watched(self) -> list[socket.socket]:
        return [self.listener, *super()._watched()]

    def _readable(self, readable: list[socket.socket]) -> None:
        if self.listener not in readable:
            return
        conn, _ = self.listener.accept()
        if self.server in self.sessions:
            conn.close()
        else:
            self.sessions[self.server] = _Session(self.udp, self.server, conn)

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.listener.close()


@contextlib.contextmanager
def relaying(relay: _KcpRelay) -> Iterator[None]:
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        relay.stop.set()
        thread.join(timeout=5)


@pytest.fixture
def real_site() -> Iterator[int]:
    with web_server(b"the real site") as (port, _seen):
        yield port


def login_file(tmp_path: Path) -> Path:
    path = tmp_path / "login"
    path.write_text("alice:correct horse\n")
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def vproxy_server(scheme: str) -> Iterator[tuple[FakeVproxyServer, str, KcpFront | None]]:
    """The fake vproxy server, reached over ``scheme``: its URL, and the KCP front when there is one."""
    with fake_vproxy_server({"alice": "correct horse"}) as vproxy:
        if scheme == "tcp":
            yield vproxy, f"tcp://127.0.0.1:{vproxy.port}", None
            return
        front = KcpFront(vproxy.port)
        with relaying(front):
            yield vproxy, f"kcp://127.0.0.1:{front.port}", front


@pytest.mark.parametrize("scheme", ["tcp", "kcp"])
def test_every_front_reaches_the_destination_it_named_through_a_vproxy_server(
    procs: Processes, tmp_path: Path, scheme: str, real_site: int
) -> None:
    socks, http, forward, bulk = free_port(), free_port(), free_port(), free_port()
    with echo_server() as echo, vproxy_server(scheme) as (vproxy, url, front):
        procs.start(
            "agent",
            "--server",
            url,
            "--peer",
            "vproxy",
            "--websocks-user-file",
            str(login_file(tmp_path)),
            "--socks",
            f"127.0.0.1:{socks}",
            "--http",
            f"127.0.0.1:{http}",
            "--forward",
            f"127.0.0.1:{forward}=127.0.0.1:{real_site}",
            "--forward",
            f"127.0.0.1:{bulk}=127.0.0.1:{echo}",
        )
        for port in (socks, http, forward, bulk):
            wait_port(port)
        site = f"http://127.0.0.1:{real_site}/"
        assert curl("--socks5-hostname", f"127.0.0.1:{socks}", site).stdout == "the real site"
        assert curl("-p", "-x", f"http://127.0.0.1:{http}", site).stdout == "the real site"
        assert curl("-x", f"http://127.0.0.1:{http}", site).stdout == "the real site"
        got = echo_roundtrip(forward, b"GET / HTTP/1.0\r\n\r\n", timeout=10)
        assert got.endswith(b"the real site")
        data = random.Random(14).randbytes(512 * 1024)  # full datagrams, each way
        assert echo_roundtrip(bulk, data, timeout=30) == data
        assert vproxy.faults == []
        assert vproxy.refused_logins == 0
        if front is not None:
            assert front.faults == []
            assert front.largest > VPROXY_MTU - 100  # the agent filled its datagrams, and no more


def test_a_vproxy_client_over_kcp_uses_a_vtunnel_server(procs: Processes) -> None:
    """The raw vproxy client of ``test_vproxy_wire.py`` over vproxy's KCP (conversation 0, mtu 1250) to
    ``vtunnel server --listen kcp://...?mtu=1250 --insecure --target``: the same exact answers, and 512 KiB
    echoed in full datagrams, every datagram of the server's conversation 0 and within 1250 bytes."""
    with echo_server() as echo:
        port = free_port(socket.SOCK_DGRAM)
        target = ["--target", f"127.0.0.1:{echo}"]
        server = procs.start("server", "--listen", f"kcp://127.0.0.1:{port}?mtu=1250", "--insecure", *target)
        wait_log(procs, server, "listening")
        client = KcpClient(port)
        with relaying(client), handshake(client.port) as s:
            s.sendall(frame(1, 0, 1))  # SYN
            assert read_frame(s) == (1, 0, 1, b"")  # SYN-ACK
            data = random.Random(14).randbytes(512 * 1024)

            def write() -> None:
                for at in range(0, len(data), 16384):
                    s.sendall(frame(0, 0, 1, data[at : at + 16384]))

            writer = threading.Thread(target=write)
            writer.start()
            got = b""
            while len(got) < len(data):
                ftype, flags, sid, payload = read_frame(s)
                assert (ftype, flags, sid) == (0, 0, 1)
                got += payload
            writer.join(10)
            assert got == data
            s.sendall(frame(6, 0, 0, struct.pack(">Q", 7)))  # keepalive
            assert read_frame(s) == (6, 1, 0, struct.pack(">Q", 7))
            s.sendall(frame(0, 1, 1))  # FIN
            assert read_frame(s) == (0, 1, 1, b"")  # the echo server half-closed in turn
        assert client.faults == []
        assert client.largest > VPROXY_MTU - 100


def test_without_the_vproxy_switch_no_named_destination_is_misrouted(
    procs: Processes, tmp_path: Path, real_site: int
) -> None:
    """The misrouting this mode was made for: an agent with only ``[tunnel] extensions = false`` (vproxy's empty
    SETTINGS, no WebSocks) against the vproxy server. It cannot carry a destination, so every front that names
    one refuses with its own error; none answers success with what the server sent instead."""
    socks, http, forward = free_port(), free_port(), free_port()
    config = tmp_path / "tunnel.toml"
    config.write_text("[tunnel]\nextensions = false\n")
    with vproxy_server("tcp") as (vproxy, url, _front):
        procs.start(
            "agent",
            "--server",
            url,
            "--insecure",
            "--config",
            str(config),
            "--socks",
            f"127.0.0.1:{socks}",
            "--http",
            f"127.0.0.1:{http}",
            "--forward",
            f"127.0.0.1:{forward}=127.0.0.1:{real_site}",
        )
        for port in (socks, http, forward):
            wait_port(port)
        site = f"http://127.0.0.1:{real_site}/"
        out = curl("--socks5-hostname", f"127.0.0.1:{socks}", site)
        assert out.returncode != 0, out.stdout
        assert out.stdout == ""
        code = curl("-p", "-x", f"http://127.0.0.1:{http}", "-o", "/dev/null", "-w", "%{http_connect}", site)
        assert code.stdout.strip() == "502"
        code = curl("-x", f"http://127.0.0.1:{http}", "-o", "/dev/null", "-w", "%{http_code}", site)
        assert code.stdout.strip() == "502"
        try:
            got = echo_roundtrip(forward, b"GET / HTTP/1.0\r\n\r\n", timeout=10)
        except OSError:  # reset: the agent refused it (a write or the half-close may see the reset first)
            got = b""
        assert got == b""
        assert vproxy.faults == []


def test_peer_vproxy_from_the_toml_config(procs: Processes, tmp_path: Path, real_site: int) -> None:
    """``peer = "vproxy"`` and ``websocks_user_file`` in ``[agent]`` do what the flags do."""
    socks = free_port()
    with vproxy_server("kcp") as (vproxy, url, front):
        config = tmp_path / "agent.toml"
        config.write_text(
            f'[agent]\npeer = "vproxy"\nserver = "{url}"\nwebsocks_user_file = "{login_file(tmp_path)}"\n'
            f'socks = "127.0.0.1:{socks}"\n'
        )
        procs.start("agent", "--config", str(config))
        wait_port(socks)
        site = f"http://127.0.0.1:{real_site}/"
        assert curl("--socks5-hostname", f"127.0.0.1:{socks}", site).stdout == "the real site"
        assert vproxy.faults == []
        assert front is not None
        assert front.faults == []
