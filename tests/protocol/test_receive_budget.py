"""The receive budget (docs/protocol.md, "Flow control"): tunnel credit returns as the bytes arrive; every stream
has at least ``min_stream_window``; a new stream is granted up to ``initial_stream_window`` from at most half of
``receive_budget`` and a stream being read grows from the rest, and from what of the first half grants do not hold
beyond a quarter kept for new streams. However many streams stall, no other stream freezes, and what the receiver
holds stays within ``receive_budget`` + open streams x ``min_stream_window``."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.protocol.helpers import VPROXY, Side, handshake, pump
from vtunnel.protocol import StreamState, TunnelConfig, TunnelState, events
from vtunnel.protocol import frames as fr

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


def fill(client: Side, server: Side, sids: list[int]) -> None:
    """The client pushes into every stream until nothing more can be sent; the server reads none of it."""
    moved = True
    while moved:
        moved = False
        for sid in sids:
            window = client.tunnel.send_window(sid)
            if window:
                client.tunnel.send_data(sid, b"s" * window)
                moved = True
        pump(client, server)
        delivered(server)


def bound(config: TunnelConfig, open_streams: int) -> int:
    return config.receive_budget + open_streams * config.min_stream_window


def test_a_stream_read_as_it_arrives_grows_its_window_fourfold_up_to_the_maximum() -> None:
    config = TunnelConfig(initial_stream_window=16 * KIB, max_stream_window=512 * KIB)
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
    assert seen[:4] == [16 * KIB, 64 * KIB, 256 * KIB, 512 * KIB]
    assert max(seen) == 512 * KIB


def read_as_it_arrives(client: Side, server: Side, sid: int, rounds: int) -> None:
    for _ in range(rounds):
        client.tunnel.send_data(sid, b"x" * client.tunnel.send_window(sid))
        pump(client, server)
        server.tunnel.acknowledge_received_data(sid, delivered(server)[sid])
        pump(client, server)


def test_growth_stops_where_the_budget_less_the_new_streams_quarter_is_used_up() -> None:
    config = TunnelConfig(
        initial_stream_window=16 * KIB, max_stream_window=1024 * KIB, receive_budget=96 * KIB
    )
    client, server = handshake(config)
    (sid,) = streams(client, server, 1)
    read_as_it_arrives(client, server, sid, 10)
    # 16 -> 32 (+16) -> 64 (+32) -> 88 (+24 more: growth may take 72 KiB, the budget less the quarter kept for
    # the first grants of new streams); no further growth
    assert client.tunnel.send_window(sid) == 88 * KIB


def budget_of_256_kib(max_stream_window: int) -> TunnelConfig:
    """16 KiB floors and 64 KiB first windows in a 256 KiB budget: first grants hold 128 KiB (two and a third)."""
    return TunnelConfig(
        min_stream_window=16 * KIB,
        initial_stream_window=64 * KIB,
        max_stream_window=max_stream_window,
        receive_budget=256 * KIB,
    )


def test_a_moving_stream_is_lent_what_first_grants_do_not_hold_and_new_streams_keep_their_quarter() -> None:
    config = budget_of_256_kib(1024 * KIB)
    client, server = handshake(config)
    burst = streams(client, server, 3)  # first grants: 48 + 48 + 32 KiB, the whole first half
    assert [client.tunnel.send_window(sid) for sid in burst] == [64 * KIB, 64 * KIB, 48 * KIB]
    (moving,) = streams(client, server, 1)
    read_as_it_arrives(client, server, moving, 10)
    # the second half only, while the grants hold the first
    assert client.tunnel.send_window(moving) == (16 + 128) * KIB
    for sid in burst:  # the burst is over: its grants come back
        server.tunnel.close_stream(sid)
        client.tunnel.close_stream(sid)
    pump(client, server)
    read_as_it_arrives(client, server, moving, 10)
    # now lent all but the quarter of the budget kept for new streams' first grants
    assert client.tunnel.send_window(moving) == (16 + 192) * KIB
    assert server.tunnel.received_unread == 0
    late = streams(client, server, 2)  # a new stream still gets its full first window, the next what is left
    assert [client.tunnel.send_window(sid) for sid in late] == [64 * KIB, 32 * KIB]


def test_tunnel_credit_returns_on_arrival() -> None:
    config = TunnelConfig(initial_stream_window=64 * KIB, initial_tunnel_window=128 * KIB)
    client, server = handshake(config)
    a, b, c = streams(client, server, 3)
    client.tunnel.send_data(a, b"a" * 64 * KIB)
    client.tunnel.send_data(b, b"b" * 64 * KIB)
    pump(client, server)
    # nothing was read, yet the tunnel window is whole again: a third stream may use all of its own window
    assert client.tunnel.send_window(c) == 64 * KIB


def test_the_first_grant_leaves_in_the_same_batch_as_the_syn_and_the_syn_ack() -> None:
    config = TunnelConfig()
    grant = config.initial_stream_window - config.min_stream_window
    client, server = handshake(config)
    sid = client.tunnel.open_stream()
    wire = client.tunnel.data_to_send()
    assert wire == fr.encode_headers(sid) + fr.encode_window_update(sid, grant)
    server.events.extend(server.tunnel.receive_data(wire, 0))
    server.tunnel.accept_stream(sid)
    answer = server.tunnel.data_to_send()
    assert answer == fr.encode_window_update(sid, grant) + fr.encode_headers(sid)
    assert client.tunnel.send_window(sid) == config.min_stream_window  # what SETTINGS promised
    client.tunnel.receive_data(answer, 0)
    assert client.tunnel.send_window(sid) == config.initial_stream_window  # one round trip, no more


def test_a_vproxy_peer_never_sees_a_window_update() -> None:
    client, server = handshake(TunnelConfig(), VPROXY)
    sid = client.tunnel.open_stream()
    syn = client.tunnel.data_to_send()
    assert syn == fr.encode_headers(sid)
    server.events.extend(server.tunnel.receive_data(syn, 0))
    server.tunnel.accept_stream(sid)
    assert server.tunnel.data_to_send() == fr.encode_headers(sid)


def test_two_thousand_stalled_streams_never_freeze_another_and_stay_within_the_bound() -> None:
    config = TunnelConfig()
    client, server = handshake(config)
    stuck = streams(client, server, 2000)
    fill(client, server, stuck)
    (moving,) = streams(client, server, 1)
    sent = bytearray()
    windows = []
    for i in range(24):
        window = client.tunnel.send_window(moving)
        assert window > 0, f"frozen in round {i}"
        windows.append(window)
        data = bytes([i]) * window
        client.tunnel.send_data(moving, data)
        sent += data
        pump(client, server)
        server.tunnel.acknowledge_received_data(moving, len(server.data(moving)))
        assert server.data(moving) == data
        server.events.clear()
        assert server.tunnel.received_unread <= bound(config, 2001)
        pump(client, server)
    # the first-window half is full of stalled streams: the new one starts at its floor, and grows while it is
    # read (the growth half is untouched by streams that were never read)
    assert windows[0] == config.min_stream_window
    assert max(windows) == config.max_stream_window
    assert len(sent) > 64 * 1024 * 1024
    assert client.tunnel.state is TunnelState.READY
    # the stalled readers wake up: each stream gets its credit back and moves again
    for sid in stuck:
        server.tunnel.acknowledge_received_data(sid, server.tunnel.unacknowledged(sid))
    pump(client, server)
    assert server.tunnel.received_unread == 0
    assert all(client.tunnel.send_window(sid) >= config.min_stream_window for sid in stuck)


def test_first_windows_shrink_under_pressure_and_come_back_when_stalled_streams_close() -> None:
    config = budget_of_256_kib(256 * KIB)
    client, server = handshake(config)
    stuck = streams(client, server, 6)
    # the first-window half (128 KiB) holds two full grants (48 KiB each) and 32 KiB for the third
    windows = [client.tunnel.send_window(sid) for sid in stuck]
    assert windows == [64 * KIB, 64 * KIB, 48 * KIB, 16 * KIB, 16 * KIB, 16 * KIB]
    fill(client, server, stuck)
    assert server.tunnel.received_unread == sum(windows) <= bound(config, 6)
    (late,) = streams(client, server, 1)
    assert client.tunnel.send_window(late) == config.min_stream_window
    # the floor still moves, and a stream being read grows from the other half
    client.tunnel.send_data(late, b"l" * config.min_stream_window)
    pump(client, server)
    server.tunnel.acknowledge_received_data(late, delivered(server)[late])
    pump(client, server)
    assert client.tunnel.send_window(late) == 4 * config.min_stream_window
    # two stalled streams are given up: their windows return to the budget, new streams get full grants again
    for sid in stuck[:2]:
        server.tunnel.close_stream(sid)
    pump(client, server)
    for sid in stuck[:2]:
        assert client.tunnel.stream_state(sid) is StreamState.DEAD
        client.tunnel.close_stream(sid)
    again = streams(client, server, 2)
    assert [client.tunnel.send_window(sid) for sid in again] == [64 * KIB, 64 * KIB]


def test_a_peer_past_its_stream_window_loses_that_stream_only() -> None:
    # the first-window half holds one grant: `full` gets 64 KiB, `floor` and `other` only 16 KiB
    config = TunnelConfig(receive_budget=96 * KIB)
    client, server = handshake(config)
    full, floor, other = streams(client, server, 3)
    frame = 16 * KIB
    # a peer that ignores the window: its 16 KiB floor, then one byte more
    overrun = fr.frame_header(fr.FrameType.DATA, 0, floor, frame) + b"f" * frame
    overrun += fr.frame_header(fr.FrameType.DATA, 0, floor, 1) + b"!"
    evs = server.tunnel.receive_data(overrun, 0)
    assert evs == [
        events.DataReceived(stream_id=floor, data=b"f" * frame),
        events.StreamReset(stream_id=floor, error="flow-control", by_peer=False),
    ]
    assert server.tunnel.state is TunnelState.READY
    assert server.tunnel.stream_state(floor) is StreamState.DEAD
    rst = server.tunnel.data_to_send()  # one frame: the RST of that stream, no GOAWAY
    assert len(rst) == 9 + int.from_bytes(rst[:3], "big")
    assert rst[3] == fr.FrameType.HEADERS
    assert rst[4] & fr.END_STREAM
    assert int.from_bytes(rst[5:9], "big") == floor
    # the tunnel and the other streams go on
    for sid in (full, other):
        window = client.tunnel.send_window(sid)
        client.tunnel.send_data(sid, bytes([sid]) * window)
    pump(client, server)
    assert server.data(full) == bytes([full]) * 64 * KIB
    assert server.data(other) == bytes([other]) * 16 * KIB


@settings(max_examples=30, deadline=None)
@given(
    stalled=st.integers(min_value=1, max_value=300),
    position=st.integers(min_value=0, max_value=300),
    floor_kib=st.integers(min_value=1, max_value=32),
    initial_kib=st.integers(min_value=1, max_value=128),
    budget_kib=st.integers(min_value=1, max_value=512),
    tunnel_kib=st.integers(min_value=256, max_value=1024),
)
def test_any_number_of_stalled_streams_is_bounded_and_never_freezes_another(
    stalled: int, position: int, floor_kib: int, initial_kib: int, budget_kib: int, tunnel_kib: int
) -> None:
    config = TunnelConfig(
        min_stream_window=floor_kib * KIB,
        initial_stream_window=initial_kib * KIB,
        max_stream_window=256 * KIB,
        initial_tunnel_window=tunnel_kib * KIB,
        receive_budget=budget_kib * KIB,
    )
    client, server = handshake(config)
    sids = streams(client, server, stalled + 1)
    moving = sids.pop(position % len(sids))
    fill(client, server, sids)
    assert server.tunnel.received_unread <= bound(config, stalled + 1)
    for _ in range(30):  # never stuck: at least its floor in every round, whatever the others hold
        window = client.tunnel.send_window(moving)
        assert window >= config.min_stream_window
        client.tunnel.send_data(moving, b"m" * window)
        pump(client, server)
        server.tunnel.acknowledge_received_data(moving, delivered(server)[moving])
        assert server.tunnel.received_unread <= bound(config, stalled + 1)
        pump(client, server)
    # the stalled readers wake up: every byte of credit comes back, nothing is lost or created
    for sid in sids:
        server.tunnel.acknowledge_received_data(sid, server.tunnel.unacknowledged(sid))
    pump(client, server)
    assert server.tunnel.received_unread == 0
    assert all(client.tunnel.send_window(sid) >= config.min_stream_window for sid in sids)
    # every stream closes: the whole budget is back, a new stream gets its full first window
    for sid in [*sids, moving]:
        server.tunnel.close_stream(sid)
        client.tunnel.close_stream(sid)
    pump(client, server)
    (fresh,) = streams(client, server, 1)
    first = min(config.initial_stream_window, config.min_stream_window + config.receive_budget // 2)
    assert client.tunnel.send_window(fresh) == first
