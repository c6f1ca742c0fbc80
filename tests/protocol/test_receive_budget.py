"""The receive budget: stream windows grow as they are read, tunnel credit returns on arrival within the budget,
and no number of stalled streams freezes the others while what the receiver holds stays bounded."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.protocol.helpers import Side, handshake, pump
from vtunnel.protocol import TunnelConfig, events

KIB = 1024


def delivered(side: Side) -> dict[int, int]:
    out: dict[int, int] = {}
    for ev in side.events:
        if isinstance(ev, events.DataReceived):
            out[ev.stream_id] = out.get(ev.stream_id, 0) + len(ev.data)
    side.events.clear()
    return out


def streams(client: Side, server: Side, n: int) -> list[int]:
    sids = [client.tunnel.open_stream() for _ in range(n)]
    pump(client, server)
    for sid in sids:
        server.tunnel.accept_stream(sid)
    pump(client, server)
    client.events.clear()
    server.events.clear()
    return sids


def test_a_stream_read_as_it_arrives_doubles_its_window_up_to_the_maximum() -> None:
    config = TunnelConfig(initial_stream_window=16 * KIB, max_stream_window=128 * KIB)
    client, server = handshake(config)
    (sid,) = streams(client, server, 1)
    seen = []
    for _ in range(12):
        window = client.tunnel.send_window(sid)
        seen.append(window)
        client.tunnel.send_data(sid, b"x" * window)
        pump(client, server)
        server.tunnel.acknowledge_received_data(sid, delivered(server)[sid])
        pump(client, server)
    assert seen[:4] == [16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB]
    assert max(seen) == 128 * KIB


def test_growth_stops_at_the_receive_budget() -> None:
    config = TunnelConfig(
        initial_stream_window=16 * KIB, max_stream_window=1024 * KIB, receive_budget=48 * KIB
    )
    client, server = handshake(config)
    (sid,) = streams(client, server, 1)
    for _ in range(10):
        client.tunnel.send_data(sid, b"x" * client.tunnel.send_window(sid))
        pump(client, server)
        server.tunnel.acknowledge_received_data(sid, delivered(server)[sid])
        pump(client, server)
    # 16 -> 32 (+16) -> 64 (+32): 48 KiB of growth, the whole budget; no further doubling
    assert client.tunnel.send_window(sid) == 64 * KIB


def test_tunnel_credit_returns_on_arrival_within_the_budget() -> None:
    config = TunnelConfig(initial_stream_window=64 * KIB, initial_tunnel_window=128 * KIB)
    client, server = handshake(config)
    a, b, c = streams(client, server, 3)
    client.tunnel.send_data(a, b"a" * 64 * KIB)
    client.tunnel.send_data(b, b"b" * 64 * KIB)
    pump(client, server)
    # nothing was read, yet the tunnel window is whole again: a third stream may use all of its own window
    assert client.tunnel.send_window(c) == 64 * KIB


@settings(max_examples=25, deadline=None)
@given(
    stalled=st.integers(min_value=1, max_value=64),
    budget_kib=st.integers(min_value=1, max_value=256),
    tunnel_kib=st.integers(min_value=64, max_value=512),
)
def test_any_number_of_stalled_streams_is_bounded_and_credit_is_conserved(
    stalled: int, budget_kib: int, tunnel_kib: int
) -> None:
    config = TunnelConfig(
        initial_stream_window=16 * KIB,
        max_stream_window=64 * KIB,
        initial_tunnel_window=tunnel_kib * KIB,
        receive_budget=budget_kib * KIB,
    )
    client, server = handshake(config)
    sids = streams(client, server, stalled + 1)
    moving, stuck = sids[0], sids[1:]
    held = 0
    for _ in range(3):  # the stalled streams fill whatever they are granted
        for sid in stuck:
            window = client.tunnel.send_window(sid)
            if window:
                client.tunnel.send_data(sid, b"s" * window)
        pump(client, server)
        held += sum(delivered(server).values())
        assert held <= config.receive_budget + config.initial_tunnel_window
    # another stream still moves as long as the stalled windows fit in the bound
    fits = (
        stalled + 1
    ) * config.initial_stream_window <= config.receive_budget + config.initial_tunnel_window
    moved = rounds = 0
    for _ in range(50):
        window = client.tunnel.send_window(moving)
        if not window:
            break
        rounds += 1
        client.tunnel.send_data(moving, b"m" * window)
        pump(client, server)
        got = delivered(server).get(moving, 0)
        moved += got
        server.tunnel.acknowledge_received_data(moving, got)
        pump(client, server)
    if fits:  # never stuck: it could send in every round
        assert rounds == 50
        assert moved >= 50 * 4 * KIB
    # the stalled readers wake up: every byte of credit comes back, nothing is lost or created
    for sid in stuck:
        unread = server.tunnel.unacknowledged(sid)
        server.tunnel.acknowledge_received_data(sid, unread)
    pump(client, server)
    assert server.tunnel.received_unread == 0
    assert server.tunnel.tunnel_credit_held == 0
    for sid in stuck:
        assert client.tunnel.send_window(sid) > 0
