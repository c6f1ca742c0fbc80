"""Test-only plumbing for the kcptun interop tests: the real kcptun binaries as subprocesses, a TCP echo
server, and a driver that moves datagrams between a UDP socket and a sans-IO :class:`KcptunSession`."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vtunnel.arq.fec import FECPacket, is_fec_packet, parse_fec_packet
from vtunnel.arq.reedsolomon import ReedSolomon
from vtunnel.kcptun import KcptunConfig, KcptunSession
from vtunnel.kcptun.smux import Event
from vtunnel.testing.ports import free_port as free_port

KCPTUN_SERVER = shutil.which("kcptun-server")
KCPTUN_CLIENT = shutil.which("kcptun-client")

needs_kcptun = pytest.mark.skipif(
    KCPTUN_SERVER is None or KCPTUN_CLIENT is None,
    reason="kcptun-server / kcptun-client not installed (Debian package kcptun; .ci/run installs it)",
)

KEY = "vtunnel kcptun interop"

#: the share of its datagrams a kcptun binary sends damaged with a cipher (failing the CRC at the other end).
#: Debian's kcptun 20210922 does so with sm4 between two kcptun processes too (about 1.5% of the datagrams each
#: way, InCsumErrors in both SNMP logs, 8 MiB echoed), never with its other ciphers: it is the binary's own, and
#: KCP resends what was dropped. Every other cipher must arrive whole.
PEER_DAMAGE = {"sm4": 0.10}


def damage_allowed(crypt: str, received: int) -> int:
    """How many of ``received`` datagrams may fail the CRC with ``crypt`` (:data:`PEER_DAMAGE`)."""
    return int(PEER_DAMAGE.get(crypt, 0.0) * received)


def kcptun_args(config: KcptunConfig) -> list[str]:
    """kcptun's command-line options for ``config`` (the wire ones, the mode and the windows)."""
    args = [
        "--key", config.key, "--crypt", config.crypt, "--mode", config.mode, "--mtu", str(config.mtu),
        "--sndwnd", str(config.sndwnd), "--rcvwnd", str(config.rcvwnd),
        "--datashard", str(config.datashard), "--parityshard", str(config.parityshard),
        "--smuxver", str(config.smuxver), "--keepalive", str(config.keepalive), "--quiet",
    ]  # fmt: skip
    if config.nocomp:
        args.append("--nocomp")
    return args


@contextlib.contextmanager
def kcptun_process(binary: str, args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        time.sleep(0.2)
        assert proc.poll() is None, log.read_text(errors="replace")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """A TCP echo server on loopback (one thread per connection); yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            with contextlib.suppress(OSError):
                while data := conn.recv(65536):
                    conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()
        thread.join(5)


def payload(size: int) -> bytes:
    """Random and repetitive 4 KiB blocks in turn: snappy compresses some chunks and stores others."""
    noise = os.urandom(size)
    text = (b"kcptun interop " * (size // 15 + 1))[:size]
    step = 4096
    return b"".join((noise if (i // step) % 2 else text)[i : i + step] for i in range(0, size, step))


@dataclass
class ParityCheck:
    """Recomputes each complete FEC group's parity from its data packets and compares it with what came."""

    codec: ReedSolomon
    groups: dict[int, dict[int, FECPacket]] = field(default_factory=dict)
    checked: int = 0
    mismatched: int = 0

    def add(self, packet: FECPacket) -> None:
        total = self.codec.data_shards + self.codec.parity_shards
        begin = packet.seqid - packet.seqid % total
        group = self.groups.setdefault(begin, {})
        group[packet.seqid % total] = packet
        if len(group) == total:
            del self.groups[begin]
            data = [group[i].body for i in range(self.codec.data_shards)]
            longest = max(map(len, data))
            parity = self.codec.encode([d.ljust(longest, b"\0") for d in data])
            for i, expected in enumerate(parity):
                self.checked += 1
                if group[self.codec.data_shards + i].body != expected:
                    self.mismatched += 1


class Driver:
    """Moves one session's datagrams over a UDP socket; ``drop`` decides, per incoming datagram, to lose it."""

    def __init__(
        self,
        sock: socket.socket,
        session: KcptunSession,
        peer: tuple[str, int],
        *,
        drop: Callable[[bytes], bool] | None = None,
        drop_out: Callable[[bytes], bool] | None = None,
        parity: ParityCheck | None = None,
    ) -> None:
        self.sock = sock
        self.session = session
        self.peer = peer
        self.drop = drop
        self.drop_out = drop_out
        self.parity = parity
        self.crypt = session.config.packet_crypt()
        self.received = 0
        #: the longest datagram each way
        self.largest_in = 0
        self.largest_out = 0

    def flush(self) -> None:
        for datagram in self.session.datagrams_to_send(time.monotonic()):
            self.largest_out = max(self.largest_out, len(datagram))
            if self.drop_out is None or not self.drop_out(datagram):
                self.sock.sendto(datagram, self.peer)

    def pump(self, timeout: float = 0.01) -> list[Event]:
        """Send what is due, wait for datagrams (at most ``timeout``), feed them, run the timers."""
        self.flush()
        now = time.monotonic()
        deadline = self.session.next_deadline(now)
        wait = timeout if deadline is None else max(0.0, min(timeout, deadline - now))
        events: list[Event] = []
        readable, _, _ = select.select([self.sock], [], [], wait)
        if readable:
            for _ in range(512):
                try:
                    datagram, _addr = self.sock.recvfrom(2048)
                except BlockingIOError:
                    break
                self.received += 1
                self.largest_in = max(self.largest_in, len(datagram))
                if self.parity is not None:
                    self._note_parity(datagram)
                if self.drop is not None and self.drop(datagram):
                    continue
                events += self.session.receive_datagram(datagram, time.monotonic())
        events += self.session.handle_timer(time.monotonic())
        self.flush()
        return events

    def _note_parity(self, datagram: bytes) -> None:
        assert self.parity is not None
        with contextlib.suppress(Exception):
            plain = self.crypt.open(datagram)
            if is_fec_packet(plain):
                self.parity.add(parse_fec_packet(plain))


def udp_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * 1024 * 1024)
    sock.bind(("127.0.0.1", port))
    sock.setblocking(False)
    return sock
