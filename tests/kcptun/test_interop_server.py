"""vtunnel's kcptun client stack against the real ``kcptun-server`` (Debian's build), bytes checked end to end.

Our session (KCP + crypt + FEC + snappy + smux) talks over UDP to kcptun-server, whose target is a TCP echo
server: what we send must come back byte for byte. With FEC on, the parity kcptun-server sends is recomputed
from its data packets with our codec and must match, and some of its data packets are dropped on purpose so
that our decoder has to rebuild them.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from tests.kcptun.peers import (
    KCPTUN_SERVER,
    KEY,
    Driver,
    ParityCheck,
    damage_allowed,
    echo_server,
    free_port,
    kcptun_args,
    kcptun_process,
    needs_kcptun,
    payload,
    udp_socket,
)
from vtunnel.arq.fec import TYPE_DATA, is_fec_packet
from vtunnel.arq.reedsolomon import ReedSolomon
from vtunnel.kcptun import CryptError, DataReceived, KcptunConfig, KcptunSession, SessionClosed
from vtunnel.kcptun.crypt import CIPHERS

pytestmark = [needs_kcptun, pytest.mark.timeout(120)]

CHUNK = 65536


def echo_through_kcptun_server(config: KcptunConfig, size: int, tmp_path: Path, *, lossy: bool) -> Driver:
    assert KCPTUN_SERVER is not None
    port = free_port(2)  # SOCK_DGRAM
    with (
        echo_server() as echo_port,
        kcptun_process(
            KCPTUN_SERVER,
            ["--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{echo_port}", *kcptun_args(config)],
            tmp_path / "kcptun-server.log",
        ),
    ):
        sock = udp_socket()
        session = KcptunSession.client(config, now=time.monotonic())
        crypt = config.packet_crypt()
        counter = itertools.count()
        damaged = 0

        def drop(datagram: bytes) -> bool:
            nonlocal damaged
            try:
                plain = crypt.open(datagram)
            except CryptError:
                damaged += 1
                return True  # as the session would
            # with FEC: lose one data packet in 13 (at most one per group of 13), so parity must rebuild it
            return lossy and is_fec_packet(plain) and plain[4] == TYPE_DATA and next(counter) % 13 == 5

        parity = ParityCheck(ReedSolomon(config.datashard, config.parityshard)) if config.fec else None
        driver = Driver(sock, session, ("127.0.0.1", port), drop=drop, parity=parity)
        data = payload(size)
        sid = session.open_stream()
        sent = 0
        got = bytearray()
        deadline = time.monotonic() + 60
        try:
            while len(got) < size:
                assert time.monotonic() < deadline, f"stalled: sent {sent}, got back {len(got)} of {size}"
                if sent < size and session.writable():
                    sent += session.send(sid, data[sent : sent + CHUNK])
                for event in driver.pump():
                    assert not isinstance(event, SessionClosed), event
                    if isinstance(event, DataReceived):
                        got += event.data
                        session.acknowledge(sid, len(event.data))
            assert bytes(got) == data
            assert damaged <= damage_allowed(config.crypt, driver.received), (damaged, driver.received)
            session.end_stream(sid)
            driver.pump(0)
        finally:
            session.close()
            sock.close()
        if parity is not None:
            assert parity.checked > 0
            assert parity.mismatched == 0, parity
            if lossy:
                assert session.fec_recovered > 0
    return driver


COMBINATIONS = [
    pytest.param(crypt, ds, ps, nocomp, smuxver, id=f"{crypt}-fec{ds}.{ps}-{'nocomp' if nocomp else 'snappy'}-smux{smuxver}")
    for crypt in ("none", "aes")
    for ds, ps in ((0, 0), (10, 3))
    for nocomp in (True, False)
    for smuxver in (1, 2)
]  # fmt: skip


@pytest.mark.parametrize(("crypt", "ds", "ps", "nocomp", "smuxver"), COMBINATIONS)
def test_echo_through_kcptun_server(
    crypt: str, ds: int, ps: int, nocomp: bool, smuxver: int, tmp_path: Path
) -> None:
    config = KcptunConfig.client(
        key=KEY, crypt=crypt, datashard=ds, parityshard=ps, nocomp=nocomp, smuxver=smuxver, mode="fast3"
    )
    echo_through_kcptun_server(config, 2 * 1024 * 1024, tmp_path, lossy=ds > 0)


OTHER_CIPHERS = sorted(set(CIPHERS) - {"aes", "none"})


@pytest.mark.parametrize("crypt", OTHER_CIPHERS)
def test_other_ciphers_through_kcptun_server(crypt: str, tmp_path: Path) -> None:
    config = KcptunConfig.client(key=KEY, crypt=crypt, mode="fast3")
    echo_through_kcptun_server(config, 1024 * 1024, tmp_path, lossy=True)


@pytest.mark.parametrize("mode", ["fast", "fast2", "normal"])
def test_kcptun_defaults_8_mib(mode: str, tmp_path: Path) -> None:
    """kcptun's own defaults (aes, 10/3, snappy, smux v1) in its other modes, 8 MiB."""
    config = KcptunConfig.client(key=KEY, mode=mode)
    echo_through_kcptun_server(config, 8 * 1024 * 1024, tmp_path, lossy=True)


def test_mtu_and_windows_other_than_kcptuns_defaults(tmp_path: Path) -> None:
    """mtu 1000, windows 64/256, mode normal on both ends: every datagram either way within the mtu."""
    config = KcptunConfig.client(key=KEY, mtu=1000, sndwnd=64, rcvwnd=256, mode="normal")
    driver = echo_through_kcptun_server(config, 2 * 1024 * 1024, tmp_path, lossy=True)
    assert 900 < driver.largest_in <= 1000
    assert 900 < driver.largest_out <= 1000
