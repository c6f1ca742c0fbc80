"""Splice mode with the dedicated connection dialed only once the ClientHello is seen, in memory: two
LiteTlsSessions, the tunnel's DATA each way (protected or passthrough), and the dial modelled as the runtime
runs it: both ends go pending at ``step.hello``; the connection reaches the server at any later moment, which
binds it (``may_splice``) or refuses it; the agent learns the outcome at any moment after that; the server's
wait for it may run out first. Real TLS 1.2 and 1.3 endpoints and scripted ones, every interleaving and chunking
(hypothesis): each end gets exactly the bytes the other wrote, in order, both ends leave in the same mode, and
nothing comes in the tunnel to an end after it switched to its dedicated connection."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.lite_tls.test_spliced_session import HELLO, REQUEST, record
from tests.lite_tls.tlsutil import Endpoint, scripts, tls_pair
from vtunnel.protocol import Role
from vtunnel.protocol.lite_tls import LiteTlsRole, LiteTlsSession, LiteTlsStep


@dataclass
class End:
    name: str
    session: LiteTlsSession
    local: Endpoint
    switched: bool = False
    role: LiteTlsRole | None = None
    delivered: bytearray = field(default_factory=bytearray)
    hello: bool = False


@dataclass
class Dial:
    dialed: bool = False  # the agent connected and wrote its ticket
    arrived: bool = False  # the server took or refused it
    acked: bool | None = None  # what the server answered
    timed_out: bool = False  # the server's wait ran out


def run(user: Endpoint, target: Endpoint, rng: random.Random, *, max_chunk: int) -> tuple[End, End, Dial]:
    agent = End("agent", LiteTlsSession(Role.CLIENT), user)
    server = End("server", LiteTlsSession(Role.SERVER), target)
    tunnel: dict[str, deque[tuple[bytes, bool]]] = {"agent": deque(), "server": deque()}  # towards that end
    dedicated: dict[str, deque[bytes]] = {"agent": deque(), "server": deque()}
    peer = {"agent": server, "server": agent}
    dial = Dial()

    def act(end: End, step: LiteTlsStep) -> None:
        assert step.violation is None, (end.name, step.violation)
        if step.left is not None:
            end.role = step.left
        if step.hello:
            assert not end.hello
            end.hello = True
            if end is agent:
                end.session.splice_pending()
                dial.dialed = True
            elif end.session.may_splice:  # (not when the connection came first and is bound already)
                end.session.splice_pending()
        other = peer[end.name].name
        for data, passthrough in step.send:
            if passthrough and end.session.spliced:
                dedicated[other].append(bytes(data))
            else:
                tunnel[other].append((bytes(data), passthrough))
        for data in step.deliver:
            end.delivered += data
            end.local.feed(data)
        if end.session.left and end.session.spliced and not end.switched:
            end.switched = True  # the hand-over: nothing may come in the tunnel to this end from here on
            assert not tunnel[end.name], (end.name, list(tunnel[end.name]))

    def from_local(end: End) -> bool:
        if end.session.holds_local:
            return False
        data = end.local.step()
        if not data:
            return False
        if end.switched:
            dedicated[peer[end.name].name].append(data)
        else:
            act(end, end.session.from_local(data))
        return True

    def from_tunnel(end: End) -> bool:
        queue = tunnel[end.name]
        if not queue:
            return False
        assert not end.switched, f"{end.name}: tunnel bytes after the switch"
        data, passthrough = queue.popleft()
        cut = rng.randint(1, min(max_chunk, len(data))) if not passthrough else len(data)
        if cut < len(data):
            queue.appendleft((data[cut:], passthrough))
        act(end, end.session.from_peer(data[:cut], passthrough))
        return True

    def from_dedicated(end: End) -> bool:
        queue = dedicated[end.name]
        if not queue or not end.switched:
            return False
        data = queue.popleft()
        end.delivered += data
        end.local.feed(data)
        return True

    def arrive() -> bool:  # the agent's connection reaches the server, which binds it or refuses it
        if not dial.dialed or dial.arrived:
            return False
        dial.arrived = True
        session = server.session
        dial.acked = session.may_splice
        if not dial.acked:
            return True
        if session.splice_is_pending:
            act(server, session.splice_settled(True))
        else:
            session.splice()
        return True

    def answer() -> bool:  # the agent reads the ACK, or the end of the refused connection
        if dial.acked is None or not agent.session.splice_is_pending:
            return False
        act(agent, agent.session.splice_settled(dial.acked))
        return True

    def server_wait_ends() -> bool:
        if not server.session.splice_is_pending or rng.random() < 0.9:
            return False
        dial.timed_out = True
        act(server, server.session.splice_settled(False))
        return True

    actions: list[Callable[[], bool]] = [
        lambda: from_local(agent),
        lambda: from_local(server),
        lambda: from_tunnel(agent),
        lambda: from_tunnel(server),
        lambda: from_dedicated(agent),
        lambda: from_dedicated(server),
        arrive,
        answer,
        server_wait_ends,
    ]
    steps = idle = 0
    while not (
        user.done
        and target.done
        and not any(tunnel.values())
        and not any(dedicated.values())
        and not agent.session.splice_is_pending
    ):
        steps += 1
        assert steps < 200_000, "no progress"
        if rng.choice(actions)():
            idle = 0
            continue
        idle += 1
        if idle > 200:
            assert any(action() for action in actions), f"stuck: {agent} {server} {dial}"
            idle = 0
    return agent, server, dial


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
