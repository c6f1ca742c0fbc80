"""quic://'s stateless answers: resets (their shape, their tokens, the listener's budget) and Retry tokens (a
client let in through a Retry is in test_quic_transport.py; a restarted server process resetting an agent is
tests/plugins/test_quic_restart.py)."""

from __future__ import annotations

import os
import socket

import anyio
import anyio.to_thread
import pytest
from anyio.abc import SocketAttribute
from hypothesis import given
from hypothesis import strategies as st
from vtunnel_quic.stateless import (
    MAX_RESET_DATAGRAM,
    MIN_RESET_DATAGRAM,
    ResetBudget,
    RetryTokens,
    is_reset,
    keys_secret,
    reset_datagram,
    reset_key,
    reset_token,
)
from vtunnel_quic.transport import QuicTransport

from vtunnel.transports.base import Endpoint, SecurityConfig

KEY = reset_key(keys_secret([b"k" * 32]))


@given(cid=st.binary(min_size=8, max_size=8), answered=st.integers(min_value=1, max_value=1500))
def test_a_reset_is_shorter_than_what_it_answers_and_carries_the_ids_token(cid: bytes, answered: int) -> None:
    reset = reset_datagram(KEY, cid, answered)
    if answered - 1 < MIN_RESET_DATAGRAM:
        assert reset is None
        return
    assert reset is not None
    assert MIN_RESET_DATAGRAM <= len(reset) < answered
    assert len(reset) <= MAX_RESET_DATAGRAM
    assert reset[0] & 0xC0 == 0x40  # a short header's first bits
    assert is_reset(reset, reset_token(KEY, cid))
    assert not is_reset(reset, reset_token(reset_key(keys_secret([b"o" * 32])), cid))
    assert not is_reset(reset, None)


def test_the_reset_key_is_the_keys_and_only_theirs() -> None:
    assert reset_key(keys_secret([b"a" * 32, b"b" * 32])) == reset_key(keys_secret([b"b" * 32, b"a" * 32]))
    assert reset_key(keys_secret([b"a" * 32])) != reset_key(keys_secret([b"b" * 32]))
    assert reset_key(None) != reset_key(None)  # without keys: random, good while the process runs


def test_the_reset_budget_refills_at_its_rate() -> None:
    budget = ResetBudget(rate=10.0, burst=3)
    assert [budget.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert budget.take(0.1)
    assert not budget.take(0.1)


def test_retry_tokens_are_bound_to_the_address_and_expire() -> None:
    now = [100.0]
    tokens = RetryTokens(lambda: now[0], lifetime=10.0)
    client = ("127.0.0.1", 4000)
    token = tokens.create(client, b"original", b"retrycid")
    assert tokens.validate(client, token) == (b"original", b"retrycid")
    for address in (("127.0.0.1", 4001), ("127.0.0.2", 4000), ("::1", 4000)):
        with pytest.raises(ValueError, match="not a Retry token"):
            tokens.validate(address, token)
    with pytest.raises(ValueError, match="not a Retry token"):
        tokens.validate(client, token[:-1] + bytes([token[-1] ^ 1]))
    with pytest.raises(ValueError, match="not a Retry token"):
        RetryTokens(lambda: now[0]).validate(client, token)  # another listener's
    with pytest.raises(ValueError, match="not a Retry token"):
        tokens.validate(client, b"short")
    now[0] += 10.5
    with pytest.raises(ValueError, match="expired"):
        tokens.validate(client, token)


@pytest.mark.anyio
async def test_a_listener_resets_packets_for_connections_it_does_not_have() -> None:
    """A short-header packet for an unknown ID: a reset under the key of the server's keys (what a restarted
    server computes again), within the budget; one too short to answer with a shorter one gets nothing."""
    psk = os.urandom(32)
    listener = await QuicTransport().listen(
        Endpoint.parse("quic://127.0.0.1:0"), security=SecurityConfig(psk=psk)
    )
    port = listener.extra(SocketAttribute.local_address)[1]
    key = reset_key(keys_secret([psk]))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            cid = os.urandom(8)
            sock.sendto(bytes([0x41]) + cid + os.urandom(1190), ("127.0.0.1", port))
            reset, _ = await anyio.to_thread.run_sync(sock.recvfrom, 2048)
            assert len(reset) <= MAX_RESET_DATAGRAM
            assert is_reset(reset, reset_token(key, cid))
            sock.sendto(bytes([0x41]) + cid + os.urandom(MIN_RESET_DATAGRAM - 9), ("127.0.0.1", port))
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                await anyio.to_thread.run_sync(sock.recvfrom, 2048)
    finally:
        await listener.aclose()
