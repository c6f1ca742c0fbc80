"""An agent tracker and a server tracker connected to each other in memory, as the runtime will connect them:
real TLS 1.2 and 1.3 endpoints (Python's ssl module) and scripted ones that are not TLS, every interleaving and
chunking (hypothesis). Each TLS endpoint must get exactly the bytes the other one wrote, in order, and the
stream must leave the tunnel exactly when both ends spoke TLS application data."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.lite_tls.tlsutil import End, ScriptEnd, connect, record_flights, scripts, tls_pair
from vtunnel.protocol.lite_tls import MARKER, NOTICE, DeliverToLocal, FellBack, LiteTlsRole, LiteTlsState

REQUEST = b"GET /big HTTP/1.1\r\nHost: lite-tls.test\r\n\r\n"


def delivered(end: End) -> bytes:
    return b"".join(e.data for e in end.log if isinstance(e, DeliverToLocal))


def check_exact(result_agent: End, result_server: End) -> None:
    """Every byte each local endpoint wrote reached the other one, in order, and nothing else did."""
    assert delivered(result_server) == bytes(result_agent.local.written)
    assert delivered(result_agent) == bytes(result_server.local.written)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    version=st.sampled_from(["1.2", "1.3"]),
    max_chunk=st.sampled_from([1, 2, 5, 6, 7, 64, 1500, 20000]),
    size=st.sampled_from([1, 3000, 70000]),
    server_waits=st.booleans(),
)
def test_real_tls_through_both_trackers_leaves_and_loses_nothing(
    seed: int, version: str, max_chunk: int, size: int, server_waits: bool
) -> None:
    response = random.Random(seed).randbytes(size)
    user, target = tls_pair(version, REQUEST, response, server_waits=server_waits)
    rng = random.Random(seed)
    result = connect(user, target, rng, max_chunk=max_chunk if size < 10000 or max_chunk > 2 else 64)
    assert bytes(user.received) == response
    assert bytes(target.received) == REQUEST
    check_exact(result.agent, result.server)
    if version == "1.2" and not server_waits:
        # both sides may send their first 0x17 before either sees the other's: then nobody is second, no end
        # goes active and the stream simply stays in the tunnel
        assert result.left or {result.agent.tracker.state, result.server.tracker.state} == {
            LiteTlsState.TRACKING
        }
        return
    assert result.left, (result.agent.tracker, result.server.tracker)
    if (
        version == "1.3"
    ):  # the server's encrypted handshake is the first 0x17: the user's Finished makes the agent active
        assert result.agent.tracker.role is LiteTlsRole.ACTIVE
    elif server_waits:  # 1.2: the request is the first 0x17, the response makes the server active
        assert result.server.tracker.role is LiteTlsRole.ACTIVE
        assert result.agent.tracker.role is LiteTlsRole.PASSIVE


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_one_way_application_data_never_leaves_and_loses_nothing(version: str) -> None:
    """Only the client speaks after the handshake: no end ever sees application data coming back, so nobody
    goes active; the stream stays in the tunnel and every byte arrives."""
    flights = record_flights(version, REQUEST, b"r")
    client = [data for side, data in flights if side == "client"]
    server = [data for side, data in flights if side == "server"]
    # replay the recording: the server's last flight (the answer) is dropped; the client sends its request twice
    user = ScriptEnd([(0, client[0])] + [(1, data) for data in client[1:]] + [(1, client[-1])])
    target = ScriptEnd([(1, data) for data in server[:-1]])
    user.expect = sum(map(len, server[:-1]))
    target.expect = sum(map(len, client)) + len(client[-1])
    for seed in range(30):
        u, t = ScriptEnd(list(user.script)), ScriptEnd(list(target.script))
        u.expect, t.expect = user.expect, target.expect
        result = connect(u, t, random.Random(seed), max_chunk=1 + seed * 37)
        check_exact(result.agent, result.server)
        if version == "1.2":  # TLS 1.2: only the client sent 0x17
            assert result.agent.tracker.state is LiteTlsState.TRACKING
            assert result.server.tracker.state is LiteTlsState.TRACKING


def hello(n: int = 200) -> bytes:
    body = b"\x01" + bytes(n - 1)
    return b"\x16\x03\x01" + n.to_bytes(2, "big") + body


def record(kind: int, n: int, fill: int = 0x41) -> bytes:
    return bytes([kind, 3, 3]) + n.to_bytes(2, "big") + bytes([fill]) * n


@pytest.mark.parametrize(
    ("name", "user_script", "target_script"),
    [
        # a ClientHello, then plain HTTP: starts like TLS and then is not
        (
            "http-after-hello",
            [hello(), b"GET / HTTP/1.1\r\n\r\n"],
            [record(0x16, 90), b"HTTP/1.1 200 OK\r\n\r\nhi"],
        ),
        # a target that is not TLS at all answers the ClientHello
        ("plain-target", [hello()], [b"HTTP/1.1 400 Bad Request\r\n\r\n"]),
        # the user's bytes contain the marker itself, at a record boundary (the origin would take it for one)
        ("marker-in-user-bytes", [hello(), record(0x17, 3), MARKER, NOTICE, b"x"], [record(0x17, 9)]),
        # the target's bytes contain the marker at a record boundary after application data both ways
        ("marker-in-target-bytes", [hello(), record(0x17, 3)], [record(0x17, 9), MARKER + b"!"]),
        # a first record that is not a ClientHello (16 03 03)
        ("not-a-hello", [b"\x16\x03\x03\x00\x02\x01\x00", record(0x17, 5)], [record(0x17, 5)]),
        # after leaving, the user sends bytes that are not TLS: passthrough, never parsed
        (
            "garbage-after-leaving",
            [hello(), record(0x17, 5), record(0x17, 7), b"\x99\x99"],
            [record(0x17, 5)],
        ),
    ],
)
def test_streams_that_are_not_tls_all_along_fall_back_with_every_byte_in_order(
    name: str, user_script: list[bytes], target_script: list[bytes]
) -> None:
    for seed in range(40):
        rng = random.Random(seed)
        pieces = [(-1.0, "user", user_script[0])]
        pieces += [(rng.random(), "user", p) for p in user_script[1:]]
        pieces += [(rng.random(), "target", p) for p in target_script]
        user, target = scripts(pieces)
        result = connect(user, target, rng, max_chunk=rng.choice([1, 3, 6, 50]))
        check_exact(result.agent, result.server)
        if name in ("http-after-hello", "plain-target", "not-a-hello"):
            assert not result.left
            assert result.fell_back
        # the others may leave before the marker-like bytes (then they go in passthrough) or fall back at them


PIECES = st.one_of(
    st.builds(record, st.sampled_from([0x14, 0x15, 0x16, 0x17]), st.integers(0, 400), st.integers(0, 255)),
    st.builds(record, st.just(0x17), st.integers(0, 3000), st.integers(0, 255)),
    st.sampled_from([b"\x99 not tls", MARKER, NOTICE, b"\xff\x03\x03\x00\x01\x02", b"\x17\x09\x09\x00\x00"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    first=st.one_of(st.just(hello()), PIECES),
    user_pieces=st.lists(st.tuples(st.floats(0, 1), PIECES), max_size=8),
    target_pieces=st.lists(st.tuples(st.floats(0, 1), PIECES), max_size=8),
    seed=st.integers(0, 2**32),
    max_chunk=st.sampled_from([1, 5, 6, 7, 100, 5000]),
)
def test_any_two_scripts_in_any_interleaving_deliver_every_byte_in_order(
    first: bytes,
    user_pieces: list[tuple[float, bytes]],
    target_pieces: list[tuple[float, bytes]],
    seed: int,
    max_chunk: int,
) -> None:
    """Whole records of the four types, records that are not TLS, the marker and the notice themselves as
    user data, in any order and at any time: neither end ever reports a violation, nothing hangs, and each side
    gets exactly what the other wrote."""
    pieces = [(-1.0, "user", first)]
    pieces += [(key, "user", p) for key, p in user_pieces] + [(key, "target", p) for key, p in target_pieces]
    user, target = scripts(pieces)
    result = connect(user, target, random.Random(seed), max_chunk=max_chunk)
    check_exact(result.agent, result.server)
    states = {result.agent.tracker.state, result.server.tracker.state}
    assert LiteTlsState.BROKEN not in states
    assert states <= {
        LiteTlsState.TRACKING,
        LiteTlsState.LEFT,
        LiteTlsState.FALLBACK,
        LiteTlsState.AWAITING_ANSWER,
        LiteTlsState.ANSWERING,
    }
    if result.left:
        assert not any(isinstance(e, FellBack) for e in result.agent.log + result.server.log)
