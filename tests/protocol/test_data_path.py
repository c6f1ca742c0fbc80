"""The DATA hot path: one DataReceived per run of DATA, copies that protect the caller, frame splitting."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vtunnel.protocol import StreamMetadata, TunnelConfig
from vtunnel.protocol import events as ev
from vtunnel.protocol import frames as fr

from .helpers import EXTENDED, VPROXY, Side, handshake, pump


def opened(
    config: TunnelConfig = EXTENDED, kind: str = "tcp", count: int = 1
) -> tuple[Side, Side, list[int]]:
    client, server = handshake(config)
    meta = StreamMetadata(authority="x:1", kind=kind) if config.extensions else None
    sids = [client.tunnel.open_stream(metadata=meta) for _ in range(count)]
    pump(client, server)
    for sid in sids:
        server.tunnel.accept_stream(sid)
    pump(client, server)
    client.events.clear()
    server.events.clear()
    return client, server, sids


def data_frame(sid: int, payload: bytes, flags: int = 0) -> bytes:
    return fr.encode_frame(fr.FrameType.DATA, flags, sid, payload)


def test_consecutive_data_of_one_stream_is_one_event() -> None:
    _client, server, [sid] = opened()
    wire = b"".join(data_frame(sid, bytes([i]) * 1000) for i in range(5))
    evs = server.tunnel.receive_data(wire, 0)
    assert evs == [ev.DataReceived(stream_id=sid, data=b"".join(bytes([i]) * 1000 for i in range(5)))]
    assert isinstance(evs[0], ev.DataReceived)
    assert type(evs[0].data) is bytes


def test_runs_end_at_another_stream_and_keep_the_order() -> None:
    _client, server, [a, b] = opened(count=2)
    wire = data_frame(a, b"1") + data_frame(a, b"2") + data_frame(b, b"3") + data_frame(a, b"4")
    assert server.tunnel.receive_data(wire, 0) == [
        ev.DataReceived(stream_id=a, data=b"12"),
        ev.DataReceived(stream_id=b, data=b"3"),
        ev.DataReceived(stream_id=a, data=b"4"),
    ]


def test_fin_and_reset_come_after_the_data_before_them() -> None:
    _client, server, [a, b] = opened(count=2)
    wire = data_frame(a, b"x") + data_frame(a, b"y", fr.END_STREAM) + data_frame(b, b"z")
    wire += fr.encode_frame(fr.FrameType.HEADERS, fr.END_STREAM, b)  # RST
    assert server.tunnel.receive_data(wire, 0) == [
        ev.DataReceived(stream_id=a, data=b"xy"),
        ev.StreamEnded(stream_id=a),
        ev.DataReceived(stream_id=b, data=b"z"),
        ev.StreamReset(stream_id=b, error=None, by_peer=True),
    ]


def test_a_tunnel_fault_after_data_delivers_the_data_first() -> None:
    _client, server, [sid] = opened()
    wire = data_frame(sid, b"kept") + data_frame(sid, b"too") + fr.encode_frame(0x3, 0, sid, bytes(4))
    evs = server.tunnel.receive_data(wire, 0)
    assert evs[0] == ev.DataReceived(stream_id=sid, data=b"kepttoo")
    assert isinstance(evs[1], ev.TunnelClosed)
    assert evs[1].error is not None
    assert len(evs) == 2


def test_datagrams_stay_one_event_each() -> None:
    _client, server, [sid] = opened(kind="udp")
    wire = data_frame(sid, b"one") + data_frame(sid, b"") + data_frame(sid, b"three")
    evs = server.tunnel.receive_data(wire, 0)
    assert [e.data for e in evs if isinstance(e, ev.DataReceived)] == [b"one", b"", b"three"]


def test_a_run_never_waits_for_the_next_input() -> None:
    _client, server, [sid] = opened(VPROXY)
    wire = data_frame(sid, b"a" * 50) + data_frame(sid, b"b" * 50)
    first = server.tunnel.receive_data(wire[:70], 0)
    assert first == [ev.DataReceived(stream_id=sid, data=b"a" * 50)]
    assert server.tunnel.receive_data(wire[70:], 0) == [ev.DataReceived(stream_id=sid, data=b"b" * 50)]


def test_a_mutable_buffer_is_copied_when_queued() -> None:
    client, server, [sid] = opened()
    buf = bytearray(b"original" * 5000)
    client.tunnel.send_data(sid, buf)
    client.tunnel.send_data(sid, memoryview(buf)[:8])
    buf[:] = bytes(len(buf))  # the caller reuses its buffer before the tunnel's output is written
    pump(client, server)
    assert server.data(sid) == b"original" * 5000 + b"original"


def test_bytes_and_views_of_bytes_give_the_same_wire() -> None:
    payload = bytes(range(256)) * 200
    wires = []
    strided = memoryview(bytes(b for b in payload for _ in (0, 1)))[::2]  # not contiguous
    inputs: list[bytes | bytearray | memoryview] = [payload, memoryview(payload), bytearray(payload), strided]
    for data in inputs:
        client, _server, [sid] = opened()
        client.tunnel.send_data(sid, data)
        wires.append(client.tunnel.data_to_send())
    assert all(w == wires[0] for w in wires)
    frames, err = fr.FrameDecoder().feed(wires[0])
    assert err is None
    assert [len(f.payload) for f in frames] == [16384] * 3 + [len(payload) - 3 * 16384]
    assert b"".join(f.payload for f in frames) == payload


def test_bytes_to_send_counts_what_data_to_send_returns() -> None:
    client, _server, [sid] = opened()
    assert client.tunnel.bytes_to_send == 0
    assert not client.tunnel.has_data_to_send
    client.tunnel.send_data(sid, b"z" * 40000)
    assert client.tunnel.has_data_to_send
    client.tunnel.end_stream(sid)
    n = client.tunnel.bytes_to_send
    assert n == len(client.tunnel.data_to_send()) == 40000 + 4 * 9
    assert client.tunnel.bytes_to_send == 0
    assert not client.tunnel.has_data_to_send


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40000)), min_size=1, max_size=12),
    st.integers(1, 70000),
)
def test_any_interleaving_and_chunking_delivers_every_byte_in_order(
    writes: list[tuple[int, int]], chunk: int
) -> None:
    # every write fits in the first window: nothing is read back here
    client, server, sids = opened(TunnelConfig(initial_stream_window=1 << 20), count=3)
    sent: dict[int, bytearray] = {sid: bytearray() for sid in sids}
    for i, (which, size) in enumerate(writes):
        sid = sids[which]
        data = bytes([i % 251]) * size
        client.tunnel.send_data(sid, data)
        sent[sid] += data
    wire = client.tunnel.data_to_send()
    events: list[ev.Event] = []
    for i in range(0, len(wire), chunk):
        events += server.tunnel.receive_data(wire[i : i + chunk], 0)
    got = {
        sid: b"".join(e.data for e in events if isinstance(e, ev.DataReceived) and e.stream_id == sid)
        for sid in sids
    }
    assert got == {sid: bytes(v) for sid, v in sent.items()}
    runs = [e.stream_id for e in events if isinstance(e, ev.DataReceived)]
    assert all(e.data for e in events if isinstance(e, ev.DataReceived))
    assert len(runs) <= len(wire) // chunk + 1 + len(
        writes
    )  # coalesced: at most one event per write and read


def test_a_peer_that_leaves_out_the_stream_window_gets_the_old_default() -> None:
    from vtunnel.protocol.settings import ABSENT_STREAM_WINDOW, SettingId, parse_peer_settings

    peer = parse_peer_settings([(SettingId.MAGIC, 0x7674756E), (SettingId.VERSION, 1)])
    assert peer.initial_stream_window == ABSENT_STREAM_WINDOW == 256 * 1024
    # our own streams start at the same size and grow to max_stream_window as they are read
    assert TunnelConfig().initial_stream_window == 64 * 1024
    assert TunnelConfig().max_stream_window == 8 * 1024 * 1024


@settings(max_examples=60, deadline=None)
@given(
    writes=st.lists(st.integers(min_value=1, max_value=8_000), min_size=1, max_size=7),  # within the window
    limits=st.lists(st.integers(min_value=0, max_value=20_000), min_size=1, max_size=30),
)
def test_output_taken_in_limited_parts_is_the_same_byte_stream(writes: list[int], limits: list[int]) -> None:
    """``data_to_send(limit)`` cuts the output anywhere (frames split across parts), ``bytes_to_send`` follows,
    and the parts together are what one ``data_to_send()`` returns: the peer decodes the same data."""
    reference, _, [sid] = opened()
    limited, peer, [sid2] = opened()
    assert sid == sid2
    payloads = [bytes([i % 251]) * n for i, n in enumerate(writes)]
    for payload in payloads:
        reference.tunnel.send_data(sid, payload)
        limited.tunnel.send_data(sid, payload)
    whole = reference.tunnel.data_to_send()
    parts: list[bytes] = []
    for limit in limits:
        before = limited.tunnel.bytes_to_send
        part = limited.tunnel.data_to_send(limit)
        assert len(part) == min(limit, before)
        assert limited.tunnel.bytes_to_send == before - len(part)
        parts.append(part)
    parts.append(limited.tunnel.data_to_send())
    assert limited.tunnel.bytes_to_send == 0
    assert b"".join(parts) == whole
    for part in parts:
        peer.events += peer.tunnel.receive_data(part, 0)
    assert peer.data(sid) == b"".join(payloads)


def test_a_peer_that_leaves_out_the_tunnel_window_gets_the_old_default() -> None:
    from vtunnel.protocol.settings import ABSENT_TUNNEL_WINDOW, SettingId, parse_peer_settings

    peer = parse_peer_settings([(SettingId.MAGIC, 0x7674756E), (SettingId.VERSION, 1)])
    assert peer.initial_tunnel_window == ABSENT_TUNNEL_WINDOW == 16 * 1024 * 1024
    # ours holds more than the stream windows of 1,024 streams may (the budget and their floors)
    config = TunnelConfig()
    assert config.initial_tunnel_window > config.receive_budget + 1024 * config.min_stream_window
