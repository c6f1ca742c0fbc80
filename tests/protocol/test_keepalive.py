"""The keepalive rule on its own, with hypothesis over arbitrary timelines."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vtunnel.protocol.keepalive import Keepalive, KeepaliveAction

steps = st.lists(
    st.tuples(st.sampled_from(["wait", "receive", "ack"]), st.floats(0.0, 7.0, allow_nan=False)), max_size=40
)


@given(steps)
def test_keepalive_invariants(timeline: list[tuple[str, float]]) -> None:
    k = Keepalive(interval=5.0, timeout=5.0, max_missed=2)
    now = 0.0
    last_counter = 0
    silent_since = 0.0
    for kind, dt in timeline:
        now += dt
        if kind == "receive":
            k.received(now)
            silent_since = now
        elif kind == "ack":
            k.acknowledged(k.counter)
        assert k.deadline() >= 0
        action = k.poll(now)
        if action is KeepaliveAction.SEND_PING:
            assert k.counter == last_counter + 1
            last_counter = k.counter
        if action is KeepaliveAction.DEAD:
            # dead only after at least interval + max_missed timeouts without a byte from the peer
            assert now - silent_since >= 5.0 + 2 * 5.0
            return


def test_a_talking_peer_is_never_declared_dead() -> None:
    k = Keepalive(interval=5.0, timeout=5.0, max_missed=2)
    for i in range(1, 1000):
        now = i * 4.9
        k.received(now)
        assert k.poll(now) is KeepaliveAction.NOTHING


def test_exact_schedule() -> None:
    k = Keepalive(interval=5.0, timeout=5.0, max_missed=2)
    assert k.poll(4.9) is KeepaliveAction.NOTHING
    assert k.poll(5.0) is KeepaliveAction.SEND_PING
    assert k.deadline() == 10.0
    assert k.poll(10.0) is KeepaliveAction.SEND_PING  # one miss, ping again
    assert k.counter == 2
    assert not k.acknowledged(1)  # a stale ack does not count
    assert k.poll(15.0) is KeepaliveAction.DEAD


def test_a_byte_at_the_instant_of_a_repeated_ping_proves_the_peer_alive() -> None:
    k = Keepalive(interval=5.0, timeout=5.0, max_missed=2)
    assert k.poll(5.0) is KeepaliveAction.SEND_PING
    assert k.poll(10.0) is KeepaliveAction.SEND_PING  # one miss
    k.received(10.0)  # the peer talks at that very instant
    assert k.poll(15.0) is KeepaliveAction.SEND_PING  # alive: a fresh first PING, not the second miss
    assert k.poll(20.0) is KeepaliveAction.SEND_PING
    assert k.poll(25.0) is KeepaliveAction.DEAD  # 15 s after the last byte
