"""A vtunnel agent in vproxy mode against a vproxy tunnel server written from the wire facts, over tcp:// and kcp://.

The server is :class:`tests.e2e.fake_vproxy.FakeVproxyServer` (the empty SETTINGS and nothing else, WebSocks
required inside every stream). Over kcp:// a :class:`KcpFront` stands in front of it: vproxy's KCP from the wire
facts (§2: plain ikcp segments, no header of their own, conversation 0, stream mode, fast3-like settings, windows
1024, mtu 1250), each client's byte stream relayed to the fake server's TCP port. It notes every datagram that
is not conversation 0 or is longer than 1250 bytes. Every front that names a destination (SOCKS5, HTTP CONNECT,
plain HTTP, ``--forward LISTEN=DEST``) must reach that destination, never anything else, with real curl; 512 KiB
echoed each way through a forward fills the datagrams.
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

from tests.conftest import Processes, free_port, wait_port
from tests.e2e.fake_vproxy import FakeVproxyServer, fake_vproxy_server
from tests.netutil import curl, echo_roundtrip, echo_server, web_server

pytestmark = [
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
    pytest.mark.timeout(60),
]

#: vproxy's KCP (wire facts §2)
VPROXY_CONV = 0
VPROXY_MTU = 1250


class _Session:
    """One client's KCP control block, and the TCP connection its stream is relayed to."""

    def __init__(self, udp: socket.socket, client: tuple[str, int], tcp_port: int) -> None:
        def output(data: bytes) -> int:
            with contextlib.suppress(OSError):
                udp.sendto(data, client)
            return 0

        self.kcp = siokcp.KCPConnection(VPROXY_CONV, output, lambda _data: 0)
        self.kcp.stream = 1
        self.kcp.nodelay(1, 10, 2, 1)
        self.kcp.wndsize(1024, 1024)
        self.kcp.setmtu(VPROXY_MTU)
        self.tcp = socket.create_connection(("127.0.0.1", tcp_port))
        self.tcp.setblocking(False)
        self.outbox = b""  # for the TCP side

    def close(self) -> None:
        self.kcp.send_cb = None  # siokcp blocks are not garbage-collected: break the cycle
        self.tcp.close()


class KcpFront:
    """vproxy's KCP listener in front of a TCP tunnel server; ``faults`` lists what broke vproxy's KCP rules."""

    def __init__(self, tcp_port: int) -> None:
        self.tcp_port = tcp_port
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self.port: int = self.udp.getsockname()[1]
        self.faults: list[str] = []
        self.datagrams = 0
        self.largest = 0
        self.sessions: dict[tuple[str, int], _Session] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                watched = [self.udp, *(s.tcp for s in self.sessions.values())]
                readable, _, _ = select.select(watched, [], [], 0.005)
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
                data, client = self.udp.recvfrom(65536)
            except BlockingIOError:
                return
            self.datagrams += 1
            self.largest = max(self.largest, len(data))
            if len(data) > VPROXY_MTU:
                self.faults.append(f"a datagram of {len(data)} bytes (vproxy's mtu is {VPROXY_MTU})")
            if len(data) < 4 or struct.unpack_from("<I", data)[0] != VPROXY_CONV:
                self.faults.append(f"a datagram not of conversation {VPROXY_CONV}: {data[:4].hex()}")
                continue
            session = self.sessions.get(client)
            if session is None:
                session = self.sessions[client] = _Session(self.udp, client, self.tcp_port)
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


@contextlib.contextmanager
def kcp_front(tcp_port: int) -> Iterator[KcpFront]:
    front = KcpFront(tcp_port)
    thread = threading.Thread(target=front.run, daemon=True)
    thread.start()
    try:
        yield front
    finally:
        front.stop.set()
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
        with kcp_front(vproxy.port) as front:
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
