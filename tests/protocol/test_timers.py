"""Time only enters as `now`: handshake timeout, keepalive, drain timeout."""

from __future__ import annotations

from tests.protocol.helpers import EXTENDED, VPROXY, handshake, pump, state_of
from vtunnel.protocol import Role, StreamState, Tunnel, TunnelConfig, TunnelState, events
from vtunnel.protocol.frames import decode_goaway


def reason_of(data: bytes) -> str:
    assert data[3] == 0x7
    return decode_goaway(data[9:])[2]


def test_client_handshake_timeout() -> None:
    client = Tunnel(role=Role.CLIENT, config=VPROXY)
    client.initiate(10.0)
    client.data_to_send()
    assert client.next_deadline() == 15.0
    assert client.handle_timer(14.99) == []
    evs = client.handle_timer(15.0)
    assert evs == [events.TunnelClosed(reason="handshake timeout", by_peer=False)]
    assert reason_of(client.data_to_send()) == "handshake timeout"
    assert client.next_deadline() is None


def test_server_handshake_timeout_starts_at_initiate() -> None:
    server = Tunnel(role=Role.SERVER, config=TunnelConfig(handshake_timeout=2.0))
    server.initiate(1.0)
    assert server.next_deadline() == 3.0
    evs = server.handle_timer(3.5)
    assert isinstance(evs[0], events.TunnelClosed)
    assert state_of(server) is TunnelState.CLOSED


def test_keepalive_dead_after_max_missed() -> None:
    client, _server = handshake(VPROXY)
    t = client.tunnel
    t.handle_timer(5.0)
    assert t.data_to_send()[3] == 0x6  # PING 1
    assert t.next_deadline() == 10.0
    assert t.handle_timer(10.0) == []  # miss 1: another PING
    assert t.data_to_send()[3] == 0x6
    evs = t.handle_timer(15.0)  # miss 2: dead
    assert evs == [events.TunnelClosed(reason="keepalive timeout", by_peer=False)]
    assert reason_of(t.data_to_send()) == "keepalive timeout"
    assert t.stream_state(1) is StreamState.NONE


def test_keepalive_ack_resets_misses_and_any_frame_counts_as_alive() -> None:
    client, server = handshake(VPROXY)
    t = client.tunnel
    t.handle_timer(5.0)
    server.tunnel.receive_data(t.data_to_send(), 5.0)
    client.events.extend(t.receive_data(server.tunnel.data_to_send(), 6.0))
    assert client.events == [events.PingAcknowledged(counter=1)]
    assert t.next_deadline() == 11.0  # idle interval from the last byte received
    t.handle_timer(11.0)
    t.data_to_send()
    sid = t.open_stream()
    t.data_to_send()
    server.tunnel.receive_data(bytes.fromhex("000000010000000001"), 12)  # SYN
    server.tunnel.accept_stream(sid)
    t.receive_data(server.tunnel.data_to_send(), 12.0)  # a SYN-ACK, no PING ack
    assert t.handle_timer(16.5) == []
    assert state_of(t) is TunnelState.READY


def test_both_sides_answer_pings() -> None:
    client, server = handshake(EXTENDED)
    server.tunnel.handle_timer(5.0)
    pump(client, server, 5.0)
    assert server.of(events.PingAcknowledged) == [events.PingAcknowledged(counter=1)]


def test_stale_ping_ack_is_ignored() -> None:
    client, _server = handshake(VPROXY)
    evs = client.tunnel.receive_data(bytes.fromhex("000008060100000000" + "00000000000000ff"), 1.0)
    assert evs == []


def test_graceful_drain_with_extension() -> None:
    client, server = handshake(EXTENDED)
    a = client.tunnel.open_stream()
    pump(client, server)
    server.tunnel.accept_stream(a)
    pump(client, server)
    server.tunnel.shutdown("upgrade")
    goaway = server.tunnel.data_to_send()
    assert goaway[9:17] == bytes.fromhex("0000000100000000")  # last stream id 1, NO_ERROR
    client.events.clear()
    client.events.extend(client.tunnel.receive_data(goaway, 1.0))
    assert client.events == [events.GoAwayReceived(last_stream_id=1, reason="upgrade")]
    assert state_of(client.tunnel) is TunnelState.DRAINING
    # the open stream still works both ways
    client.tunnel.send_data(a, b"last words", end_stream=True)
    server.tunnel.send_data(a, b"reply", end_stream=True)
    pump(client, server, 2.0)
    assert server.data(a) == b"last words"
    assert client.data(a) == b"reply"
    assert state_of(client.tunnel) is TunnelState.CLOSED
    assert state_of(server.tunnel) is TunnelState.CLOSED
    assert client.events[-1] == events.TunnelClosed(reason="upgrade", by_peer=True)
    assert server.events[-1] == events.TunnelClosed(reason="upgrade", by_peer=False)


def test_drain_timeout_closes_the_tunnel() -> None:
    config = TunnelConfig(drain_timeout=3.0)
    client, server = handshake(config)
    a = client.tunnel.open_stream()
    pump(client, server)
    client.tunnel.shutdown("leaving")
    assert state_of(client.tunnel) is TunnelState.DRAINING
    assert client.tunnel.next_deadline() == 3.0
    evs = client.tunnel.handle_timer(3.0)
    assert evs == [events.TunnelClosed(reason="leaving", by_peer=False)]
    assert client.tunnel.stream_state(a) is StreamState.DEAD


def test_shutdown_with_nothing_open_reports_closed_on_the_next_call() -> None:
    client, _server = handshake(EXTENDED)
    client.tunnel.shutdown("bye")
    assert state_of(client.tunnel) is TunnelState.CLOSED
    assert client.tunnel.next_deadline() == 0.0  # an event is waiting
    assert client.tunnel.handle_timer(0.0) == [events.TunnelClosed(reason="bye", by_peer=False)]
    assert client.tunnel.next_deadline() is None


def test_infinite_keepalive_interval_disables_pings() -> None:
    client, _server = handshake(TunnelConfig(keepalive_interval=float("inf")))
    assert client.tunnel.next_deadline() is None
    assert client.tunnel.handle_timer(1e9) == []


def test_client_initiated_graceful_drain() -> None:
    client, server = handshake(EXTENDED)
    a = client.tunnel.open_stream()
    pump(client, server)
    client.tunnel.shutdown("client leaving")
    pump(client, server, 1.0)
    assert server.events[-1] == events.GoAwayReceived(last_stream_id=0, reason="client leaving")
    assert state_of(server.tunnel) is TunnelState.DRAINING
    server.tunnel.accept_stream(a)  # streams already open still work
    server.tunnel.send_data(a, b"done", end_stream=True)
    client.tunnel.end_stream(a)
    pump(client, server, 2.0)
    assert client.data(a) == b"done"
    assert state_of(client.tunnel) is TunnelState.CLOSED
    assert state_of(server.tunnel) is TunnelState.CLOSED
    assert server.events[-1:] == [events.TunnelClosed(reason="client leaving", by_peer=True)]


def test_stream_ids_run_out_cleanly() -> None:
    import pytest

    from vtunnel.protocol import LocalProtocolError

    client, server = handshake(EXTENDED)
    client.tunnel._next_stream_id = 2**31 - 1  # the last odd id
    assert client.tunnel.open_stream() == 2**31 - 1
    with pytest.raises(LocalProtocolError, match="exhausted"):
        client.tunnel.open_stream()
    pump(client, server)
    assert server.tunnel.stream_state(2**31 - 1) is StreamState.ESTABLISHED
