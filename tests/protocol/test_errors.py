"""Malformed input: the protocol's answer (GOAWAY with a reason, RST, or silence), and nothing else lost."""

from __future__ import annotations

import pytest

from tests.protocol.helpers import EXTENDED, VPROXY, Side, handshake, pump
from vtunnel.protocol import (
    ErrorCode,
    FlowControlError,
    LocalProtocolError,
    Role,
    StreamClosedError,
    StreamState,
    Tunnel,
    TunnelConfig,
    TunnelState,
    events,
)
from vtunnel.protocol.frames import decode_goaway


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def established(config: TunnelConfig = VPROXY) -> tuple[Side, Side, int]:
    client, server = handshake(config)
    sid = client.tunnel.open_stream()
    pump(client, server)
    server.tunnel.accept_stream(sid)
    pump(client, server)
    return client, server, sid


def goaway_reason(data: bytes) -> str:
    assert data[3] == 0x7, data.hex()
    return decode_goaway(data[9:])[2]


FAILURES = [
    ("SETTINGS after the handshake", h("000000 04 00 00000000"), "SETTINGS after the handshake"),
    ("unknown frame type", h("000000 09 00 00000000"), "unknown frame type 0x09"),
    ("RST_STREAM is not used", h("000004 03 00 00000001 00000000"), "unknown frame type 0x03"),
    ("HEADERS with a payload", h("000001 01 00 00000003 00"), "HEADERS with non-zero length"),
    ("top bit set", h("000000 01 00 80000003"), "top bit set"),
    ("DATA on stream 0", h("000001 00 00 00000000 41"), "DATA on stream 0"),
    ("HEADERS on stream 0", h("000000 01 00 00000000"), "HEADERS on stream 0"),
    ("SYN with an even id", h("000000 01 00 00000004"), "even stream id"),
    ("bad gzip", h("000004 00 04 00000001 1f8b0000"), "gzip"),
]


@pytest.mark.parametrize(("name", "frame", "reason"), FAILURES, ids=[f[0] for f in FAILURES])
@pytest.mark.parametrize("chunking", ["whole", "bytewise"])
def test_tunnel_failures_send_goaway_and_keep_what_came_before(
    name: str, frame: bytes, reason: str, chunking: str
) -> None:
    _client, server, sid = established()
    data = h("000003 00 00 00000001 616263") + frame + h("000003 00 00 00000001 646566")
    evs: list[events.Event] = []
    pieces = [data] if chunking == "whole" else [data[i : i + 1] for i in range(len(data))]
    for piece in pieces:
        evs.extend(server.tunnel.receive_data(piece, 0))
    assert evs[0] == events.DataReceived(stream_id=sid, data=b"abc")
    closed = evs[-1]
    assert isinstance(closed, events.TunnelClosed)
    assert not closed.by_peer
    assert closed.error is not None
    assert reason in closed.error.reason
    assert len(evs) == 2
    assert reason in goaway_reason(server.tunnel.data_to_send())
    assert server.tunnel.state is TunnelState.CLOSED
    assert server.tunnel.stream_state(sid) is StreamState.DEAD
    assert server.tunnel.receive_data(b"more", 1) == []
    assert server.tunnel.next_deadline() is None


IGNORED = [
    ("DATA for an unknown stream", h("000002 00 00 00000063 6869")),
    ("FIN for an unknown stream", h("000000 00 01 00000063")),
    ("RST for an unknown stream", h("000000 01 01 00000063")),
    ("duplicate SYN", h("000000 01 00 00000001")),
    ("short PING", h("000004 06 00 00000000 00000001")),
    ("empty PING", h("000000 06 00 00000000")),
]


@pytest.mark.parametrize(("name", "frame"), IGNORED, ids=[f[0] for f in IGNORED])
def test_frames_vproxy_ignores_are_ignored(name: str, frame: bytes) -> None:
    _client, server, sid = established()
    evs = server.tunnel.receive_data(frame + h("000002 00 00 00000001 6f6b"), 0)
    assert evs == [events.DataReceived(stream_id=sid, data=b"ok")]
    assert server.tunnel.data_to_send() == b""
    assert server.tunnel.state is TunnelState.READY


def test_synack_for_unknown_stream_is_ignored_by_the_client() -> None:
    client, _server, sid = established()
    assert client.tunnel.receive_data(h("000000 01 00 00000007"), 0) == []
    assert client.tunnel.receive_data(h("000000 01 00 00000001"), 0) == []  # duplicate SYN-ACK
    assert client.tunnel.data_to_send() == b""
    assert client.tunnel.stream_state(sid) is StreamState.ESTABLISHED


def test_frames_before_the_handshake_fail_it() -> None:
    server = Tunnel(role=Role.SERVER, config=VPROXY)
    evs = server.receive_data(h("000000 01 00 00000001"), 0)
    assert isinstance(evs[-1], events.TunnelClosed)
    assert "handshake" in goaway_reason(server.data_to_send())


def test_goaway_instead_of_handshake_answer_is_a_failure() -> None:
    client = Tunnel(role=Role.CLIENT, config=VPROXY)
    client.initiate(0)
    client.data_to_send()
    evs = client.receive_data(h("00000a 07 00 00000000 ffffffff ffffffff 6e6f"), 0)
    assert evs == [events.TunnelClosed(reason="no", by_peer=True)]


def test_vproxy_client_rejects_a_different_handshake_answer() -> None:
    client = Tunnel(role=Role.CLIENT, config=VPROXY)
    client.initiate(0)
    client.data_to_send()
    evs = client.receive_data(h("000000 04 01 00000000"), 0)  # an ACK flag: not the identical 9 bytes
    assert isinstance(evs[-1], events.TunnelClosed)


def test_server_rejects_foreign_settings() -> None:
    server = Tunnel(role=Role.SERVER, config=EXTENDED)
    evs = server.receive_data(h("000006 04 00 00000000 0003 00000064"), 0)  # an HTTP/2 client
    assert isinstance(evs[-1], events.TunnelClosed)
    assert "magic" in goaway_reason(server.data_to_send())


def test_even_stream_id_from_client_is_a_failure() -> None:
    _client, server, _sid = established()
    evs = server.tunnel.receive_data(h("000000 01 00 00000002"), 0)
    assert isinstance(evs[-1], events.TunnelClosed)


def test_stream_ids_going_backwards_are_refused_with_rst() -> None:
    _client, server = handshake(VPROXY)
    server.tunnel.receive_data(h("000000 01 00 00000005"), 0)
    server.tunnel.data_to_send()
    evs = server.tunnel.receive_data(h("000000 01 00 00000003"), 0)
    assert evs == []
    assert server.tunnel.data_to_send() == h("000000 01 01 00000003")
    assert server.tunnel.stream_state(5) is StreamState.ESTABLISHED


def test_data_after_fin_resets_only_that_stream() -> None:
    client, server, _sid = established()
    other = client.tunnel.open_stream()
    pump(client, server)
    server.tunnel.accept_stream(other)
    pump(client, server)
    evs = server.tunnel.receive_data(h("000000 00 01 00000001") + h("000001 00 00 00000001 41"), 0)
    assert evs[0] == events.StreamEnded(stream_id=1)
    assert isinstance(evs[1], events.StreamReset)
    assert not evs[1].by_peer
    assert server.tunnel.data_to_send() == h("000000 01 01 00000001")
    client.tunnel.send_data(other, b"still fine")
    pump(client, server)
    assert server.data(other) == b"still fine"
    assert server.tunnel.state is TunnelState.READY


def test_stream_frame_size_limit_with_extensions() -> None:
    _client, server, _sid = established(EXTENDED)
    big = (20000).to_bytes(3, "big") + h("00 00 00000001") + b"x" * 20000
    # (with lite-tls a frame header may announce a PASSTHROUGH run this long: an ordinary DATA frame is refused
    # once it is whole)
    evs = server.tunnel.receive_data(big, 0)
    closed = evs[-1]
    assert isinstance(closed, events.TunnelClosed)
    assert closed.error is not None
    assert closed.error.code is ErrorCode.FRAME_SIZE_ERROR


def test_local_misuse_raises_and_changes_nothing() -> None:
    client, server, sid = established(EXTENDED)
    with pytest.raises(LocalProtocolError):
        server.tunnel.open_stream()
    with pytest.raises(LocalProtocolError):
        client.tunnel.accept_stream(sid)
    with pytest.raises(StreamClosedError):
        client.tunnel.send_data(99, b"x")
    client.tunnel.end_stream(sid)
    with pytest.raises(StreamClosedError):
        client.tunnel.send_data(sid, b"x")
    with pytest.raises(StreamClosedError):
        client.tunnel.end_stream(sid)
    assert client.tunnel.stream_state(sid) is StreamState.FIN_SENT
    other = client.tunnel.open_stream()
    with pytest.raises(FlowControlError):
        client.tunnel.send_data(other, b"x" * (client.tunnel.send_window(other) + 1))
    with pytest.raises(LocalProtocolError):
        client.tunnel.acknowledge_received_data(sid, 1)
    with pytest.raises(LocalProtocolError):
        client.tunnel.initiate(0)
    assert client.tunnel.state is TunnelState.READY


def test_client_must_initiate_before_receiving() -> None:
    client = Tunnel(role=Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"\0" * 9, 0)


def test_window_update_overflow_and_zero_fail_the_tunnel() -> None:
    for payload in ("00000000", "7fffffff"):
        _client, server, _sid = established(EXTENDED)
        evs = server.tunnel.receive_data(h("000004 08 00 00000000" + payload), 0)
        assert isinstance(evs[-1], events.TunnelClosed)


def test_stream_window_overflow_resets_only_that_stream() -> None:
    _client, server, _sid = established(EXTENDED)
    evs = server.tunnel.receive_data(h("000004 08 00 00000001 7fffffff"), 0)
    assert len(evs) == 1
    assert isinstance(evs[0], events.StreamReset)
    assert server.tunnel.state is TunnelState.READY


def test_window_update_is_unknown_without_flow_control() -> None:
    _client, server, _sid = established(VPROXY)
    evs = server.tunnel.receive_data(h("000004 08 00 00000000 00000010"), 0)
    assert isinstance(evs[-1], events.TunnelClosed)


def test_bad_hpack_block_fails_with_compression_error() -> None:
    _client, server = handshake(EXTENDED)
    evs = server.tunnel.receive_data(h("000002 01 00 00000001 ffff"), 0)
    closed = evs[-1]
    assert isinstance(closed, events.TunnelClosed)
    assert closed.error is not None
    assert closed.error.code is ErrorCode.COMPRESSION_ERROR


def test_receiving_past_the_stream_window_resets_that_stream() -> None:
    config = TunnelConfig(initial_stream_window=1024)
    client, server = handshake(config)
    client.tunnel.open_stream()
    pump(client, server)
    frame = (1025).to_bytes(3, "big") + h("00 00 00000001") + b"y" * 1025
    evs = server.tunnel.receive_data(frame, 0)
    assert len(evs) == 1
    assert isinstance(evs[0], events.StreamReset)
    assert evs[0].error == "flow-control"
    assert server.tunnel.state is TunnelState.READY


def test_short_goaway_closes_the_tunnel() -> None:
    _client, server, _sid = established()
    evs = server.tunnel.receive_data(h("000004 07 00 00000000 ffffffff"), 0)
    closed = evs[-1]
    assert isinstance(closed, events.TunnelClosed)
    assert closed.by_peer
    assert "malformed GOAWAY" in closed.reason


def test_handshake_settings_with_ack_flag_is_refused_by_the_server() -> None:
    server = Tunnel(role=Role.SERVER, config=EXTENDED)
    evs = server.receive_data(h("000000 04 01 00000000"), 0)
    assert isinstance(evs[-1], events.TunnelClosed)
    assert "ACK" in goaway_reason(server.data_to_send())


def test_bad_vtunnel_settings_values_are_refused() -> None:
    from vtunnel.protocol.settings import SettingId

    bad = h("000012 04 00 00000000") + bytes.fromhex(
        f"{SettingId.MAGIC:04x}7674756e{SettingId.VERSION:04x}00000001{SettingId.MAX_FRAME_SIZE:04x}00000010"
    )
    server = Tunnel(role=Role.SERVER, config=EXTENDED)
    evs = server.receive_data(bad, 0)
    assert isinstance(evs[-1], events.TunnelClosed)
    assert "max frame size" in goaway_reason(server.data_to_send())


def test_extension_server_answers_a_vtunnel_client_when_extensions_are_off() -> None:
    client, server = handshake(EXTENDED, VPROXY)
    assert client.tunnel.extensions.names == frozenset()
    assert server.tunnel.extensions.names == frozenset()
    sid = client.tunnel.open_stream()
    client.tunnel.send_data(sid, b"held until the SYN-ACK")
    assert client.tunnel.data_to_send() == h("000000 01 00 00000001")


def test_vproxy_client_fails_on_a_vtunnel_settings_answer() -> None:
    client = Tunnel(role=Role.CLIENT, config=VPROXY)
    client.initiate(0)
    client.data_to_send()
    answer = Tunnel(role=Role.SERVER, config=EXTENDED)
    ext_client = Tunnel(role=Role.CLIENT, config=EXTENDED)
    ext_client.initiate(0)
    answer.receive_data(ext_client.data_to_send(), 0)
    evs = client.receive_data(answer.data_to_send(), 0)
    assert isinstance(evs[-1], events.TunnelClosed)


def test_a_destination_the_syn_cannot_carry_is_refused_and_changes_nothing() -> None:
    from tests.protocol.helpers import handshake
    from vtunnel.protocol import MetadataNotNegotiated, StreamMetadata, TunnelConfig

    client, _server = handshake(TunnelConfig(extensions=False))
    for metadata in (
        StreamMetadata(authority="example.com:443"),
        StreamMetadata(kind="udp"),
        StreamMetadata(headers=(("x-a", "b"),)),
    ):
        with pytest.raises(MetadataNotNegotiated):
            client.tunnel.open_stream(metadata=metadata)
        assert client.tunnel.data_to_send() == b""
        assert client.tunnel.open_stream_count == 0
    # nothing to name: a plain stream opens (vproxy's own kind of stream), with the first id
    assert client.tunnel.open_stream(metadata=StreamMetadata()) == 1
