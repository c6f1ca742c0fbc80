"""Flow control: a stopped reader holds only its own window; other streams keep moving."""

from __future__ import annotations

import time

import pytest

from tests.protocol.helpers import EXTENDED, Side, handshake, pump
from vtunnel.protocol import FlowControlError, StreamState, TunnelConfig, events
from vtunnel.protocol import frames as fr

MIB = 1 << 20


def open_pair(config: TunnelConfig) -> tuple[Side, Side, int, int]:
    client, server = handshake(config)
    stalled = client.tunnel.open_stream()
    moving = client.tunnel.open_stream()
    pump(client, server)
    server.tunnel.accept_stream(stalled)
    server.tunnel.accept_stream(moving)
    pump(client, server)
    server.events.clear()
    client.events.clear()
    return client, server, stalled, moving


def test_stalled_reader_does_not_stop_a_64_mib_transfer() -> None:
    config = EXTENDED
    client, server, stalled, moving = open_pair(config)
    # the stalled stream's reader never consumes: the sender fills its window, then must stop
    client.tunnel.send_data(stalled, b"s" * client.tunnel.send_window(stalled))
    assert client.tunnel.send_window(stalled) == 0
    with pytest.raises(FlowControlError):
        client.tunnel.send_data(stalled, b"!")
    total = 64 * MIB
    block = bytes(range(256)) * 1024  # 256 KiB
    sent = received = 0
    stalled_buffered = 0
    peak_moving_buffered = 0
    give_up = time.monotonic() + 60  # bounded in count and in time
    for _ in range(100_000):
        assert time.monotonic() < give_up
        window = client.tunnel.send_window(moving)
        if sent < total and window:
            n = min(window, len(block), total - sent)
            client.tunnel.send_data(moving, block[:n])
            sent += n
        evs = server.tunnel.receive_data(client.tunnel.data_to_send(), 0)
        moving_buffered = 0
        for ev in evs:
            if isinstance(ev, events.DataReceived):
                if ev.stream_id == stalled:
                    stalled_buffered += len(ev.data)
                else:
                    moving_buffered += len(ev.data)
                    received += len(ev.data)
        peak_moving_buffered = max(peak_moving_buffered, moving_buffered)
        assert stalled_buffered <= config.initial_stream_window
        assert moving_buffered <= config.max_stream_window
        server.tunnel.acknowledge_received_data(moving, moving_buffered)
        client.tunnel.receive_data(server.tunnel.data_to_send(), 0)
        if received == total:
            break
    assert received == total
    assert stalled_buffered == config.initial_stream_window
    assert peak_moving_buffered > 0
    assert client.tunnel.send_window(stalled) == 0
    # the reader wakes up: credit comes back and the stalled stream moves again
    server.tunnel.acknowledge_received_data(stalled, stalled_buffered)
    client.events.extend(client.tunnel.receive_data(server.tunnel.data_to_send(), 0))
    assert events.WindowUpdated(stream_id=stalled) in client.events
    # the window it kept was never read: it returns whole, grown fourfold since the stream is now being read
    assert client.tunnel.send_window(stalled) == 4 * config.initial_stream_window


def test_closing_a_stream_gives_its_window_back_to_the_budget() -> None:
    # half of this budget grants one first window: `stalled` gets 64 KiB, `moving` only the 16 KiB floor
    config = TunnelConfig(
        min_stream_window=16 * 1024,
        initial_stream_window=64 * 1024,
        max_stream_window=64 * 1024,
        receive_budget=96 * 1024,
    )
    client, server, stalled, moving = open_pair(config)
    assert client.tunnel.send_window(stalled) == 64 * 1024
    assert client.tunnel.send_window(moving) == 16 * 1024
    client.tunnel.send_data(stalled, b"a" * 64 * 1024)
    pump(client, server)
    server.tunnel.close_stream(stalled)  # unread data is dropped, its window returns to the budget
    pump(client, server)
    assert client.tunnel.stream_state(stalled) is StreamState.DEAD
    assert server.tunnel.received_unread == 0
    later = client.tunnel.open_stream()
    pump(client, server)
    assert client.tunnel.send_window(later) == 64 * 1024


def test_data_for_a_reset_stream_does_not_leak_tunnel_credit() -> None:
    config = TunnelConfig(initial_stream_window=64 * 1024, initial_tunnel_window=64 * 1024)
    client, server, stalled, moving = open_pair(config)
    server.tunnel.reset_stream(stalled)  # the RST crosses the client's DATA
    client.tunnel.send_data(stalled, b"a" * 64 * 1024)
    pump(client, server)
    assert client.tunnel.send_window(moving) == 64 * 1024


def test_window_update_is_sent_at_half_the_window() -> None:
    config = TunnelConfig(initial_stream_window=4096, max_stream_window=4096, initial_tunnel_window=1 << 20)
    client, server, _stalled, moving = open_pair(config)
    client.tunnel.send_data(moving, b"x" * 4096)
    pump(client, server)
    server.tunnel.acknowledge_received_data(moving, 2047)
    assert server.tunnel.data_to_send() == b""
    server.tunnel.acknowledge_received_data(moving, 1)
    assert server.tunnel.data_to_send() == bytes.fromhex("000004 08 00 00000003 00000800".replace(" ", ""))


def test_vproxy_mode_has_no_window_once_established() -> None:
    client, server = handshake(TunnelConfig(extensions=False))
    sid = client.tunnel.open_stream()
    pump(client, server)
    server.tunnel.accept_stream(sid)
    pump(client, server)
    assert client.tunnel.send_window(sid) == 2**31 - 1


def test_tunnel_wide_credit_tells_only_the_streams_its_window_held_back() -> None:
    # each stream's window is 32 KiB, the tunnel's 48 KiB: two streams' windows hold more than the tunnel's
    config = TunnelConfig(
        min_stream_window=16 * 1024,
        initial_stream_window=32 * 1024,
        max_stream_window=32 * 1024,
        initial_tunnel_window=48 * 1024,
    )
    client, server, stalled, moving = open_pair(config)
    client.tunnel.send_data(stalled, b"s" * 32 * 1024)
    assert client.tunnel.send_window(moving) == 16 * 1024  # the tunnel's window is the limit
    server.tunnel.receive_data(client.tunnel.data_to_send(), 0)  # tunnel credit is due at half its window
    evs = client.tunnel.receive_data(server.tunnel.data_to_send(), 0)
    assert events.WindowUpdated(stream_id=moving) in evs  # the tunnel's window had held it back
    assert events.WindowUpdated(stream_id=stalled) not in evs  # its own window was its limit
    # the stream's own window is the limit now: the next tunnel-wide credit tells nobody
    assert client.tunnel.send_window(moving) == 32 * 1024
    client.tunnel.send_data(moving, b"m" * 32 * 1024)
    server.tunnel.receive_data(client.tunnel.data_to_send(), 0)
    credit = server.tunnel.data_to_send()
    assert credit == fr.encode_window_update(0, 32 * 1024)  # (the stalled stream's reader is away)
    evs = client.tunnel.receive_data(credit, 0)
    assert not [ev for ev in evs if isinstance(ev, events.WindowUpdated)]
