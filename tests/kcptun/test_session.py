"""Two sans-IO kcptun sessions on an emulated lossy path, options, and garbage datagrams."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtunnel.kcptun import ConfigError, DataReceived, KcptunConfig, KcptunSession, StreamEnded, first_conv


def transfer(config: KcptunConfig, size: int, loss: float, seed: int = 1) -> KcptunSession:
    """Client -> server over a path losing ``loss`` of the datagrams each way, in virtual time (5 ms steps)."""
    rng = random.Random(seed)
    now = 0.0
    client = KcptunSession.client(config, now=now)
    crypt = config.packet_crypt()
    server: KcptunSession | None = None
    sid = client.open_stream()
    data = os.urandom(size // 2) + bytes(size - size // 2)
    sent, got, ended = 0, bytearray(), False
    for _ in range(20000):
        now += 0.005
        if sent < size and client.writable():
            sent += client.send(sid, data[sent : sent + 65536])
            if sent == size:
                client.end_stream(sid)
        for datagram in client.datagrams_to_send(now):
            if rng.random() < loss:
                continue
            if server is None:
                found = first_conv(crypt, datagram)
                assert found is not None
                server = KcptunSession(config, client=False, conv=found[0], now=now, crypt=crypt)
            for event in server.receive_datagram(datagram, now):
                if isinstance(event, DataReceived):
                    got += event.data
                    server.acknowledge(event.stream_id, len(event.data))
                ended = ended or isinstance(event, StreamEnded)
        if server is not None:
            for datagram in server.datagrams_to_send(now):
                if rng.random() >= loss:
                    client.receive_datagram(datagram, now)
            server.handle_timer(now)
        client.handle_timer(now)
        if ended:
            break
    assert server is not None
    assert bytes(got) == data
    return server


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"crypt": "none", "datashard": 0, "parityshard": 0, "nocomp": True, "smuxver": 2},
        {"crypt": "xor", "smuxver": 2, "mode": "fast3"},
        {"crypt": "aes-128", "datashard": 4, "parityshard": 2, "mode": "normal", "mtu": 600},
    ],
)
def test_transfer_over_a_lossy_path(options: dict[str, object]) -> None:
    config = KcptunConfig.client(**options)
    server = transfer(config, 400_000, loss=0.05)
    assert server.fec_recovered > 0 or not config.fec


def test_datagrams_stay_within_the_mtu() -> None:
    config = KcptunConfig(mtu=500)
    client = KcptunSession.client(config, now=0)
    client.send(client.open_stream(), os.urandom(20000))
    sizes = [len(d) for d in client.datagrams_to_send(0)]
    assert max(sizes) == 500


@pytest.mark.parametrize(
    "options",
    [
        {"crypt": "tea"},
        {"crypt": "aes-256"},
        {"conn": 0},
        {"mode": "turbo"},
        {"smuxver": 3},
        {"mtu": 1600},
        {"datashard": 300},
        {"sndwnd": 0},
    ],
)
def test_bad_options(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        KcptunConfig(**options)  # type: ignore[arg-type]


def test_kcp_options_follow_kcptuns_modes() -> None:
    fast = KcptunConfig(mode="fast").kcp_options()
    assert (fast.nodelay, fast.interval, fast.resend, fast.nc) == (0, 30, 2, 1)
    assert not fast.pacing
    manual = KcptunConfig(mode="manual", nodelay=1, interval=15, resend=3, nc=0).kcp_options()
    assert (manual.nodelay, manual.interval, manual.resend, manual.nc) == (1, 15, 3, 0)
    assert KcptunConfig().engine_mtu == 1350 - 20 - 8
    assert KcptunConfig(datashard=0).engine_mtu == 1350 - 20
    assert (KcptunConfig.client().sndwnd, KcptunConfig.client().rcvwnd) == (128, 512)


GARBAGE_CONFIG = KcptunConfig(crypt="none")
GARBAGE_CRYPT = GARBAGE_CONFIG.packet_crypt()


@settings(max_examples=200, deadline=None)  # no wall-clock limit: a loaded machine must not fail it
@given(garbage=st.binary(max_size=400))
def test_garbage_datagrams_are_dropped(garbage: bytes) -> None:
    session = KcptunSession(GARBAGE_CONFIG, client=False, conv=7, now=0, crypt=GARBAGE_CRYPT)
    assert session.receive_datagram(garbage, 0) == []
    first_conv(GARBAGE_CRYPT, garbage)
    session.receive_datagram(GARBAGE_CRYPT.seal(garbage), 0)  # a valid header over garbage: no raise
