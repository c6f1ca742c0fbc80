"""Two spliced LiteTlsSessions connected in memory as the splice runtime connects them: the stream's DATA in a
tunnel queue each way until the end leaves, then a dedicated queue each way that no session sees (the kernel
relay). Real TLS 1.2 and 1.3 endpoints and scripted ones, every interleaving and chunking (hypothesis): each end
gets exactly the bytes the other wrote, in order, and nothing is left in the tunnel after an end switched."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.lite_tls.tlsutil import Endpoint, scripts, tls_pair
from vtunnel.protocol import Role
from vtunnel.protocol.lite_tls import LiteTlsRole, LiteTlsSession, TrackerBrokenError

REQUEST = b"GET /big HTTP/1.1\r\nHost: lite-tls.test\r\n\r\n"


@dataclass
class SplicedEnd:
    name: str
    session: LiteTlsSession
    local: Endpoint
    #: the hand-over happened: local bytes go to the dedicated queue as they are, the peer's come from it
    switched: bool = False
    role: LiteTlsRole | None = None
    delivered: bytearray = field(default_factory=bytearray)


def run(
    user: Endpoint, target: Endpoint, rng: random.Random, *, max_chunk: int
) -> tuple[SplicedEnd, SplicedEnd]:
    agent = SplicedEnd("agent", LiteTlsSession(Role.CLIENT), user)
    server = SplicedEnd("server", LiteTlsSession(Role.SERVER), target)
    for end in (agent, server):
        end.session.splice()
    tunnel: dict[str, deque[bytes]] = {"agent": deque(), "server": deque()}  # towards that end
    dedicated: dict[str, deque[bytes]] = {"agent": deque(), "server": deque()}
    peer = {"agent": server, "server": agent}

    def deliver(end: SplicedEnd, data: bytes) -> None:
        end.delivered += data
        end.local.feed(data)

    def act(
        end: SplicedEnd, step_send: list[tuple[bytes | memoryview, bool]], step_deliver: list[bytes]
    ) -> None:
        other = peer[end.name].name
        for data, after_leaving in step_send:
            (dedicated if after_leaving else tunnel)[other].append(bytes(data))
        for data in step_deliver:
            deliver(end, data)
        if end.session.left and not end.switched:
            # the runtime hands over once it left: nothing may come in the tunnel from here on
            end.switched = True
            assert not tunnel[end.name], (end.name, list(tunnel[end.name]))

    def from_local(end: SplicedEnd) -> bool:
        data = end.local.step()
        if not data:
            return False
        if end.switched:
            dedicated[peer[end.name].name].append(data)
            return True
        step = end.session.from_local(data)
        assert step.violation is None
        if step.left is not None:
            end.role = step.left
        act(end, step.send, step.deliver)
        return True

    def from_tunnel(end: SplicedEnd) -> bool:
        queue = tunnel[end.name]
        if not queue:
            return False
        assert not end.switched, f"{end.name}: tunnel bytes after the switch"
        data = queue.popleft()
        cut = rng.randint(1, min(max_chunk, len(data)))
        if cut < len(data):
            queue.appendleft(data[cut:])
        step = end.session.from_peer(data[:cut], False)
        assert step.violation is None, step.violation
        if step.left is not None:
            end.role = step.left
        act(end, step.send, step.deliver)
        return True

    def from_dedicated(end: SplicedEnd) -> bool:
        queue = dedicated[end.name]
        if not queue or not end.switched:  # the kernel relay exists once this end switched
            return False
        deliver(end, queue.popleft())
        return True

    actions: list[Callable[[], bool]] = [
        lambda: from_local(agent),
        lambda: from_local(server),
        lambda: from_tunnel(agent),
        lambda: from_tunnel(server),
        lambda: from_dedicated(agent),
        lambda: from_dedicated(server),
    ]
    steps = idle = 0
    while not (user.done and target.done and not any(tunnel.values()) and not any(dedicated.values())):
        steps += 1
        assert steps < 200_000, "no progress"
        if rng.choice(actions)():
            idle = 0
            continue
        idle += 1
        if idle > 200:
            assert any(action() for action in actions), f"stuck: {agent} {server}"
            idle = 0
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


def record(kind: int, n: int) -> bytes:
    return bytes([kind, 3, 3]) + n.to_bytes(2, "big") + b"A" * n


HELLO = b"\x16\x03\x01\x00\x04\x01\x00\x00\x00"


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
