"""The per-source handshake budget of byte-stream servers is spent only by peers that hold the key.

A first message is authenticated without any Diffie-Hellman (Noise NNpsk0's ``psk, e``); the reply's DH is the
work the budget protects, so the budget is charged between the two. Anyone can make connections from a
legitimate client's address (a shared NAT, the same host); without the key they must not use up its budget.
"""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtunnel.security.errors import AuthenticationFailed
from vtunnel.security.records import SecureStreamClient, SecureStreamServer
from vtunnel.security.replay import HandshakeLimiter, ReplayCache

PSK = bytes(range(32))
NOW = 1_700_000_000.0
SOURCE = "192.0.2.7"


def server(replay: ReplayCache, limiter: HandshakeLimiter) -> SecureStreamServer:
    return SecureStreamServer(PSK, replay=replay, limiter=limiter, source=SOURCE)


def handshake(replay: ReplayCache, limiter: HandshakeLimiter, psk: bytes = PSK) -> bool:
    s = server(replay, limiter)
    try:
        s.receive_data(SecureStreamClient(psk, now=NOW).data_to_send(), NOW)
    except AuthenticationFailed:
        assert s.data_to_send() == b""  # a refused peer gets nothing
        return False
    return s.handshake_complete


@settings(max_examples=30, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=700), min_size=1, max_size=40))
def test_garbage_from_a_source_never_spends_its_budget(junk: list[bytes]) -> None:
    replay, limiter = ReplayCache(), HandshakeLimiter(rate=0.001, burst=1)
    for blob in junk:
        s = server(replay, limiter)
        with contextlib.suppress(AuthenticationFailed):
            s.receive_data(blob, NOW)
        assert not s.handshake_complete
    assert handshake(replay, limiter)


def test_wrong_keys_never_spend_the_budget() -> None:
    replay, limiter = ReplayCache(), HandshakeLimiter(rate=0.001, burst=1)
    for _ in range(50):
        assert not handshake(replay, limiter, psk=os.urandom(32))
    assert handshake(replay, limiter)


def test_key_holders_are_limited_per_source() -> None:
    replay, limiter = ReplayCache(), HandshakeLimiter(rate=0.001, burst=2)
    assert handshake(replay, limiter)
    assert handshake(replay, limiter)
    s = server(replay, limiter)
    first = SecureStreamClient(PSK, now=NOW).data_to_send()
    with pytest.raises(AuthenticationFailed, match="too many handshakes"):
        s.receive_data(first, NOW)
