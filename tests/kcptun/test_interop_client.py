"""The real ``kcptun-client`` (Debian's build) against vtunnel's kcptun server stack, bytes checked end to end.

A TCP client writes through kcptun-client to our session, which echoes every stream back; what it reads must be
what it wrote. With FEC on, one in 13 of our data packets is never sent, and kcptun-client's own counters
(its SNMP log) must show that it rebuilt them from our parity.
"""

from __future__ import annotations

import csv
import itertools
import select
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.kcptun.peers import (
    KCPTUN_CLIENT,
    KEY,
    Driver,
    damage_allowed,
    free_port,
    kcptun_args,
    kcptun_process,
    needs_kcptun,
    payload,
    udp_socket,
)
from vtunnel.arq.fec import TYPE_DATA, is_fec_packet
from vtunnel.kcptun import (
    DataReceived,
    Event,
    KcptunConfig,
    KcptunSession,
    SessionClosed,
    StreamEnded,
    StreamOpened,
    first_conv,
)
from vtunnel.kcptun.crypt import CIPHERS

pytestmark = [needs_kcptun, pytest.mark.timeout(120)]


class TCPEcho:
    """Writes ``data`` to the port in one thread and reads the answer in another."""

    def __init__(self, port: int, data: bytes) -> None:
        self.data = data
        self.got = bytearray()
        self.error: BaseException | None = None
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.threads = [threading.Thread(target=self._write), threading.Thread(target=self._read)]
        for thread in self.threads:
            thread.start()

    def _write(self) -> None:
        try:
            self.sock.sendall(self.data)
        except OSError as exc:
            self.error = exc

    def _read(self) -> None:
        try:
            while len(self.got) < len(self.data):
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                self.got += chunk
        except OSError as exc:
            self.error = exc

    @property
    def done(self) -> bool:
        return not any(thread.is_alive() for thread in self.threads)

    def close(self) -> None:
        self.sock.close()
        for thread in self.threads:
            thread.join(5)


def serve_echo(driver: Driver, client: TCPEcho, first: list[Event], deadline: float) -> None:
    """Our server side: echo each stream's bytes back as the peer's window allows, until the client is done."""
    session = driver.session
    pending: dict[int, bytearray] = {}
    events = first
    while not client.done:
        assert time.monotonic() < deadline, f"stalled: echoed {len(client.got)} of {len(client.data)}"
        for event in events:
            assert not isinstance(event, SessionClosed), event
            if isinstance(event, StreamOpened):
                pending[event.stream_id] = bytearray()
            elif isinstance(event, DataReceived):
                pending[event.stream_id] += event.data
                session.acknowledge(event.stream_id, len(event.data))
            elif isinstance(event, StreamEnded):
                pending.pop(event.stream_id, None)
        for sid, buffer in pending.items():
            if buffer and session.writable():
                taken = session.send(sid, bytes(buffer[:65536]))
                del buffer[:taken]
        events = driver.pump()


def fec_recovered(snmp_log: Path) -> int:
    with snmp_log.open() as f:
        rows = list(csv.DictReader(f))
    return max((int(row["FECRecovered"]) for row in rows), default=0)


def echo_through_kcptun_client(config: KcptunConfig, size: int, tmp_path: Path, *, lossy: bool) -> Driver:
    assert KCPTUN_CLIENT is not None
    sock = udp_socket()
    port = sock.getsockname()[1]
    local = free_port(socket.SOCK_STREAM)
    snmp = tmp_path / "snmp.csv"
    args = ["--localaddr", f"127.0.0.1:{local}", "--remoteaddr", f"127.0.0.1:{port}", *kcptun_args(config)]
    if lossy:
        args += ["--snmplog", str(snmp), "--snmpperiod", "1"]
    crypt = config.packet_crypt()
    counter = itertools.count()

    def drop_out(datagram: bytes) -> bool:
        # lose one of our data packets in 13 (at most one per group): kcptun must rebuild it from our parity
        if not lossy:
            return False
        plain = crypt.open(datagram)
        return is_fec_packet(plain) and plain[4] == TYPE_DATA and next(counter) % 13 == 5

    with kcptun_process(KCPTUN_CLIENT, args, tmp_path / "kcptun-client.log"):
        client = TCPEcho(local, payload(size))
        try:
            readable, _, _ = select.select([sock], [], [], 10)
            assert readable, "kcptun-client sent nothing"
            first, peer = sock.recvfrom(2048)
            found = first_conv(crypt, first)
            assert found is not None
            session = KcptunSession(config, client=False, conv=found[0], now=time.monotonic(), crypt=crypt)
            driver = Driver(sock, session, peer, drop_out=drop_out)
            events = session.receive_datagram(first, time.monotonic())
            serve_echo(driver, client, events, time.monotonic() + 60)
            assert client.error is None
            assert bytes(client.got) == client.data
            assert session.dropped <= damage_allowed(config.crypt, driver.received), (
                session.dropped,
                driver.received,
            )
            if lossy:
                time.sleep(1.5)  # one more SNMP period
                assert fec_recovered(snmp) > 0
        finally:
            client.close()
            sock.close()
    return driver


CASES = (
    ("none", 0, 0, True, 1),
    ("none", 10, 3, False, 2),
    ("aes", 0, 0, False, 1),
    ("aes", 10, 3, True, 2),
    ("aes", 10, 3, False, 1),
    ("aes-128", 0, 0, True, 2),
    ("aes-192", 10, 3, True, 1),
    ("xor", 0, 0, False, 2),
    ("sm4", 10, 3, False, 1),
    ("blowfish", 0, 0, True, 2),
    ("cast5", 10, 3, True, 1),
    ("3des", 0, 0, False, 1),
    ("salsa20", 10, 3, False, 2),
)  # fmt: skip
COMBINATIONS = [
    pytest.param(crypt, ds, ps, nocomp, smuxver, id=f"{crypt}-fec{ds}.{ps}-{'nocomp' if nocomp else 'snappy'}-smux{smuxver}")
    for crypt, ds, ps, nocomp, smuxver in CASES
]  # fmt: skip


def test_every_offered_cipher_is_tested_against_kcptun_client() -> None:
    assert {case[0] for case in CASES} == set(CIPHERS)


@pytest.mark.parametrize(("crypt", "ds", "ps", "nocomp", "smuxver"), COMBINATIONS)
def test_echo_from_kcptun_client(
    crypt: str, ds: int, ps: int, nocomp: bool, smuxver: int, tmp_path: Path
) -> None:
    config = KcptunConfig(
        key=KEY, crypt=crypt, datashard=ds, parityshard=ps, nocomp=nocomp, smuxver=smuxver, mode="fast3"
    )
    echo_through_kcptun_client(config, 2 * 1024 * 1024, tmp_path, lossy=ds > 0)


def test_mtu_and_windows_other_than_kcptuns_defaults(tmp_path: Path) -> None:
    """mtu 1000, windows 64/256, mode normal on both ends: every datagram either way within the mtu."""
    config = KcptunConfig(key=KEY, mtu=1000, sndwnd=64, rcvwnd=256, mode="normal")
    driver = echo_through_kcptun_client(config, 2 * 1024 * 1024, tmp_path, lossy=True)
    assert 900 < driver.largest_in <= 1000
    assert 900 < driver.largest_out <= 1000
