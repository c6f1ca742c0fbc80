"""Splice mode with the dedicated connection dialed only once the ClientHello is seen, in memory: two
LiteTlsSessions, the tunnel's DATA each way (protected or passthrough), and the dial modelled as the runtime
runs it: both ends go pending at ``step.hello``; the connection reaches the server at any later moment, which
binds it (``may_splice``) or refuses it; the agent learns the outcome at any moment after that; the server's
wait for it may run out first. Real TLS 1.2 and 1.3 endpoints and scripted ones, every interleaving and chunking
(hypothesis): each end gets exactly the bytes the other wrote, in order, both ends leave in the same mode, and
nothing comes in the tunnel to an end after it switched to its dedicated connection."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.lite_tls.harness import HELLO, REQUEST, Dial, End, record
from tests.lite_tls.harness import run as run_bound
from tests.lite_tls.tlsutil import Endpoint, scripts, tls_pair
from vtunnel.protocol.lite_tls import LiteTlsRole


def run(
    user: Endpoint, target: Endpoint, rng: random.Random, *, max_chunk: int, ack_lost: bool = False
) -> tuple[End, End, Dial]:
    """The connection dialed at the hello."""
    return run_bound(user, target, rng, max_chunk=max_chunk, bind="hello", ack_lost=ack_lost)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    version=st.sampled_from(["1.2", "1.3"]),
    max_chunk=st.sampled_from([1, 5, 6, 7, 64, 1500, 20000]),
    size=st.sampled_from([1, 3000, 70000]),
)
def test_real_tls_dials_at_the_hello_and_both_ends_leave_the_same_way(
    seed: int, version: str, max_chunk: int, size: int
) -> None:
    response = random.Random(seed).randbytes(size)
    user, target = tls_pair(version, REQUEST, response)
    agent, server, dial = run(
        user, target, random.Random(seed), max_chunk=max_chunk if size < 10000 else 1500
    )
    assert bytes(user.received) == response
    assert bytes(target.received) == REQUEST
    assert bytes(server.delivered) == bytes(user.written)
    assert bytes(agent.delivered) == bytes(target.written)
    assert agent.hello
    assert server.hello
    assert dial.dialed
    assert agent.session.spliced == server.session.spliced == bool(dial.acked)
    assert agent.switched == server.switched == bool(dial.acked)
    assert agent.session.left
    assert server.session.left
    assert {agent.role, server.role} == {LiteTlsRole.ACTIVE, LiteTlsRole.PASSIVE}
    if not dial.timed_out:  # the server's marker waited for the connection: it was bound
        assert dial.acked


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    version=st.sampled_from(["1.2", "1.3"]),
    max_chunk=st.sampled_from([1, 6, 64, 1500]),
    size=st.sampled_from([1, 3000]),
)
def test_no_ack_in_time_leaves_muxed_at_both_ends_even_when_the_server_bound_it(
    seed: int, version: str, max_chunk: int, size: int
) -> None:
    """The agent's wait for the ACK may run out at any moment, before or after the server bound the connection
    (its ACK late, or a port that is not a vtunnel splice port): the agent leaves muxed, its muxed marker
    tells a server that bound the connection to leave muxed too (and close it), and every byte arrives once,
    in order."""
    response = random.Random(seed).randbytes(size)
    user, target = tls_pair(version, REQUEST, response)
    agent, server, dial = run(user, target, random.Random(seed), max_chunk=max_chunk, ack_lost=True)
    assert bytes(user.received) == response
    assert bytes(target.received) == REQUEST
    assert bytes(server.delivered) == bytes(user.written)
    assert bytes(agent.delivered) == bytes(target.written)
    assert agent.session.left
    assert server.session.left
    assert agent.session.spliced == server.session.spliced
    assert agent.switched == server.switched
    assert {agent.role, server.role} == {LiteTlsRole.ACTIVE, LiteTlsRole.PASSIVE}
    if dial.ack_lost:
        assert not agent.session.spliced
        assert dial.unbound == bool(dial.acked)  # a connection the server bound is closed again
    else:
        assert not dial.unbound


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), version=st.sampled_from(["1.2", "1.3"]))
def test_some_interleavings_bind_at_the_server_and_lose_the_ack(seed: int, version: str) -> None:
    """(The case above that matters most is reached: over a few seeds, the server binds and the agent's wait
    runs out.)"""
    for attempt in range(200):
        rng = random.Random(seed + attempt)
        user, target = tls_pair(version, REQUEST, b"x" * 100)
        _, _, dial = run(user, target, rng, max_chunk=1500, ack_lost=True)
        if dial.unbound:
            return
    raise AssertionError("no interleaving bound the connection and lost its ACK")


@pytest.mark.parametrize("seed", range(30))
def test_a_stream_that_is_not_tls_never_dials(seed: int) -> None:
    rng = random.Random(seed)
    pieces = [(-1.0, "user", b"GET / HTTP/1.1\r\n\r\n"), (rng.random(), "user", b"more")]
    pieces += [
        (rng.random(), "target", b"HTTP/1.1 200 OK\r\n\r\n"),
        (rng.random(), "target", record(0x16, 9)),
    ]
    user, target = scripts(pieces)
    agent, server, dial = run(user, target, rng, max_chunk=rng.choice([1, 6, 50]))
    assert bytes(server.delivered) == bytes(user.written)
    assert bytes(agent.delivered) == bytes(target.written)
    assert not dial.dialed
    assert not agent.hello
    assert not server.hello


@pytest.mark.parametrize("seed", range(30))
def test_a_hello_then_not_tls_never_switches(seed: int) -> None:
    rng = random.Random(seed)
    pieces = [(-1.0, "user", HELLO), (rng.random(), "user", b"GET / HTTP/1.1\r\n\r\n")]
    pieces += [
        (rng.random(), "target", record(0x16, 40)),
        (rng.random(), "target", b"HTTP/1.1 200 OK\r\n\r\n"),
    ]
    user, target = scripts(pieces)
    agent, server, dial = run(user, target, rng, max_chunk=rng.choice([1, 6, 50]))
    assert bytes(server.delivered) == bytes(user.written)
    assert bytes(agent.delivered) == bytes(target.written)
    assert dial.dialed == agent.hello  # (not when the request came in the same read as the hello)
    assert not agent.switched
    assert not server.switched
    assert not agent.session.left
    assert not server.session.left


def test_the_server_speaking_first_never_dials() -> None:
    user, target = scripts([(-1.0, "target", b"SSH-2.0-x\r\n"), (0.5, "user", HELLO)])
    agent, server, dial = run(user, target, random.Random(1), max_chunk=3)
    assert bytes(agent.delivered) == b"SSH-2.0-x\r\n"
    assert bytes(server.delivered) == HELLO
    assert not dial.dialed
