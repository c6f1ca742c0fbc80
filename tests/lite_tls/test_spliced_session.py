"""Two spliced LiteTlsSessions connected in memory as the splice runtime connects them: the stream's DATA in a
tunnel queue each way until the end leaves, then a dedicated queue each way that no session sees (the kernel
relay). Real TLS 1.2 and 1.3 endpoints and scripted ones, every interleaving and chunking (hypothesis): each end
gets exactly the bytes the other wrote, in order, and nothing is left in the tunnel after an end switched."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.lite_tls.harness import HELLO, REQUEST, End, record
from tests.lite_tls.harness import run as run_bound
from tests.lite_tls.tlsutil import Endpoint, scripts, tls_pair
from vtunnel.protocol import Role
from vtunnel.protocol.lite_tls import LiteTlsRole, LiteTlsSession, TrackerBrokenError


def run(user: Endpoint, target: Endpoint, rng: random.Random, *, max_chunk: int) -> tuple[End, End]:
    """Both ends spliced (the connection bound) from the start."""
    agent, server, _ = run_bound(user, target, rng, max_chunk=max_chunk, bind="start")
    return agent, server


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    version=st.sampled_from(["1.2", "1.3"]),
    max_chunk=st.sampled_from([1, 5, 6, 7, 64, 1500, 20000]),
    size=st.sampled_from([1, 3000, 70000]),
)
def test_real_tls_through_spliced_sessions_switches_and_loses_nothing(
    seed: int, version: str, max_chunk: int, size: int
) -> None:
    response = random.Random(seed).randbytes(size)
    user, target = tls_pair(version, REQUEST, response)
    agent, server = run(user, target, random.Random(seed), max_chunk=max_chunk if size < 10000 else 1500)
    assert bytes(user.received) == response
    assert bytes(target.received) == REQUEST
    assert bytes(server.delivered) == bytes(user.written)
    assert bytes(agent.delivered) == bytes(target.written)
    assert agent.switched
    assert server.switched
    assert {agent.role, server.role} == {LiteTlsRole.ACTIVE, LiteTlsRole.PASSIVE}


@pytest.mark.parametrize("seed", range(30))
def test_a_stream_that_falls_back_never_switches(seed: int) -> None:
    rng = random.Random(seed)
    pieces = [(-1.0, "user", HELLO), (rng.random(), "user", b"GET / HTTP/1.1\r\n\r\n")]
    pieces += [
        (rng.random(), "target", record(0x16, 40)),
        (rng.random(), "target", b"HTTP/1.1 200 OK\r\n\r\n"),
    ]
    user, target = scripts(pieces)
    agent, server = run(user, target, rng, max_chunk=rng.choice([1, 6, 50]))
    assert bytes(server.delivered) == bytes(user.written)
    assert bytes(agent.delivered) == bytes(target.written)
    assert not agent.switched
    assert not server.switched


def test_splice_after_leaving_is_refused() -> None:
    session = LiteTlsSession(Role.SERVER)
    session._left = True  # (as after the marker exchange)
    with pytest.raises(TrackerBrokenError):
        session.splice()
