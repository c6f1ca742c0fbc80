"""Byte-exact vectors for every vproxy message (wire-facts section 1)."""

from __future__ import annotations

import gzip

import pytest
from hyperframe.frame import Frame

from tests.protocol.helpers import EXTENDED, VPROXY, Side, handshake, pump, state_of
from vtunnel.protocol import ErrorCode, Role, StreamState, Tunnel, TunnelConfig, TunnelState, events

HANDSHAKE = bytes.fromhex("000000040000000000")


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def test_client_handshake_is_the_empty_settings() -> None:
    client = Tunnel(role=Role.CLIENT, config=VPROXY)
    client.initiate(0.0)
    assert client.data_to_send() == HANDSHAKE
    assert client.state is TunnelState.HANDSHAKE_SENT


@pytest.mark.parametrize("config", [VPROXY, EXTENDED])
def test_server_echoes_the_identical_nine_bytes(config: object) -> None:
    server = Tunnel(role=Role.SERVER, config=config)  # type: ignore[arg-type]
    evs = server.receive_data(HANDSHAKE, 0.0)
    assert server.data_to_send() == HANDSHAKE
    assert [type(e) for e in evs] == [events.HandshakeCompleted]
    assert server.extensions.names == frozenset()
    assert server.state is TunnelState.READY


def test_keepalive_ping_and_ack_bytes() -> None:
    client, server = handshake(VPROXY)
    assert client.tunnel.next_deadline() == 5.0
    assert client.tunnel.handle_timer(4.9) == []
    assert client.tunnel.data_to_send() == b""
    client.tunnel.handle_timer(5.0)
    ping = client.tunnel.data_to_send()
    assert ping == h("000008 06 00 00000000 0000000000000001")
    server.tunnel.receive_data(ping, 5.0)
    ack = server.tunnel.data_to_send()
    assert ack == h("000008 06 01 00000000 0000000000000001")
    evs = client.tunnel.receive_data(ack, 5.1)
    assert evs == [events.PingAcknowledged(counter=1)]
    client.tunnel.handle_timer(10.1)
    assert client.tunnel.data_to_send() == h("000008 06 00 00000000 0000000000000002")


def test_syn_synack_psh_fin_bytes() -> None:
    client, server = handshake(VPROXY)
    sid = client.tunnel.open_stream()
    assert sid == 1
    assert client.tunnel.data_to_send() == h("000000 01 00 00000001")
    assert client.tunnel.stream_state(1) is StreamState.SYN_SENT
    evs = server.tunnel.receive_data(h("000000 01 00 00000001"), 0.0)
    assert evs == [events.StreamOpened(stream_id=1, metadata=None)]
    server.tunnel.accept_stream(1)
    assert server.tunnel.data_to_send() == h("000000 01 00 00000001")
    assert client.tunnel.receive_data(h("000000 01 00 00000001"), 0) == [events.StreamAccepted(stream_id=1)]
    client.tunnel.send_data(1, b"hi")
    assert client.tunnel.data_to_send() == h("000002 00 00 00000001 6869")
    client.tunnel.end_stream(1)
    assert client.tunnel.data_to_send() == h("000000 00 01 00000001")
    assert client.tunnel.stream_state(1) is StreamState.FIN_SENT
    assert client.tunnel.open_stream() == 3


def test_psh_fin_is_accepted_on_receive() -> None:
    client, server = handshake(VPROXY)
    client.tunnel.open_stream()
    pump(client, server)
    server.tunnel.accept_stream(1)
    pump(client, server)
    evs = server.tunnel.receive_data(h("000003 00 01 00000001 616263"), 0)
    assert evs == [events.DataReceived(stream_id=1, data=b"abc"), events.StreamEnded(stream_id=1)]
    assert server.tunnel.stream_state(1) is StreamState.FIN_RECV


def test_rst_is_headers_end_stream_and_is_answered_with_rst() -> None:
    client, server = handshake(VPROXY)
    client.tunnel.open_stream()
    pump(client, server)
    server.tunnel.accept_stream(1)
    pump(client, server)
    client.tunnel.reset_stream(1, error="refused")  # no metadata extension: the text does not travel
    rst = client.tunnel.data_to_send()
    assert rst == h("000000 01 01 00000001")
    evs = server.tunnel.receive_data(rst, 0)
    assert evs == [events.StreamReset(stream_id=1, error=None)]
    assert server.tunnel.data_to_send() == rst
    assert client.tunnel.receive_data(rst, 0) == []
    assert client.tunnel.data_to_send() == b""
    assert client.tunnel.stream_state(1) is StreamState.DEAD


def test_shutdown_goaway_bytes() -> None:
    client, server = handshake(VPROXY)
    client.tunnel.shutdown("bye", graceful=False)
    frame = client.tunnel.data_to_send()
    assert frame == h("00000b 07 00 00000000 ffffffff ffffffff 627965")
    evs = server.tunnel.receive_data(frame, 0)
    assert evs == [events.TunnelClosed(reason="bye", by_peer=True)]
    assert server.tunnel.state is TunnelState.CLOSED


def test_graceful_shutdown_without_extension_drains_locally_then_sends_vproxy_goaway() -> None:
    client, server = handshake(VPROXY)
    client.tunnel.open_stream()
    pump(client, server)
    server.tunnel.accept_stream(1)
    pump(client, server)
    server.tunnel.shutdown("maintenance")
    assert server.tunnel.data_to_send() == b""
    assert server.tunnel.state is TunnelState.DRAINING
    client.tunnel.open_stream()
    pump(client, server)  # the new SYN is refused with an RST
    assert client.tunnel.stream_state(3) is StreamState.DEAD
    client.tunnel.end_stream(1)
    server.tunnel.end_stream(1)
    pump(client, server)
    assert state_of(server.tunnel) is TunnelState.CLOSED
    assert state_of(client.tunnel) is TunnelState.CLOSED
    assert isinstance(client.events[-1], events.TunnelClosed)
    assert client.events[-1].reason == "maintenance"


def test_gzip_flag_is_read_from_the_raw_flags_byte() -> None:
    client, server = handshake(VPROXY)
    client.tunnel.open_stream()
    pump(client, server)
    server.tunnel.accept_stream(1)
    pump(client, server)
    body = b"x" * 5000
    packed = gzip.compress(body)
    frame = len(packed).to_bytes(3, "big") + h("00 04 00000001") + packed
    evs = server.tunnel.receive_data(frame, 0)
    assert evs == [events.DataReceived(stream_id=1, data=body)]


def test_gzip_bomb_is_refused_without_inflating_it() -> None:
    client, server = handshake(VPROXY)
    client.tunnel.open_stream()
    pump(client, server)
    server.tunnel.accept_stream(1)
    pump(client, server)
    bomb = gzip.compress(b"\0" * (16 << 20), compresslevel=9)  # 16 MiB of zeros in ~16 KiB
    frame = len(bomb).to_bytes(3, "big") + h("00 04 00000001") + bomb
    evs = server.tunnel.receive_data(frame, 0)
    closed = evs[-1]
    assert isinstance(closed, events.TunnelClosed)
    assert closed.error is not None
    assert closed.error.code is ErrorCode.COMPRESSION_ERROR
    assert "gzip" in closed.reason
    assert [f[0] for f in _frames(server.tunnel.data_to_send())] == [0x7]  # a GOAWAY went out


def test_gzip_is_sent_only_when_negotiated() -> None:
    zipped = EXTENDED.__class__(gzip=True)
    client, server = handshake(zipped)
    assert "gzip" in client.tunnel.extensions
    sid = client.tunnel.open_stream()
    client.tunnel.send_data(sid, b"a" * 10000)
    out = client.tunnel.data_to_send()
    data_frames = [f for f in _frames(out) if f[0] == 0]
    assert data_frames
    assert all(flags & 0x4 for _, flags, _ in data_frames)
    server.events.extend(server.tunnel.receive_data(out, 0))
    assert server.data(sid) == b"a" * 10000
    plain_client, _ = handshake(EXTENDED.__class__(gzip=True), EXTENDED)
    assert "gzip" not in plain_client.tunnel.extensions
    sid = plain_client.tunnel.open_stream()
    plain_client.tunnel.send_data(sid, b"a" * 10000)
    assert not any(f[1] & 0x4 for f in _frames(plain_client.tunnel.data_to_send()) if f[0] == 0)


def _frames(data: bytes) -> list[tuple[int, int, int]]:
    out = []
    i = 0
    while i < len(data):
        length = int.from_bytes(data[i : i + 3], "big")
        out.append((data[i + 3], data[i + 4], int.from_bytes(data[i + 5 : i + 9], "big")))
        i += 9 + length
    return out


def test_every_frame_we_send_parses_with_hyperframe() -> None:
    """Our struct codec writes standard HTTP/2: a generic parser reads the same fields."""
    # a first window of 64 KiB from SETTINGS: the 40,000 bytes may follow the SYN before any grant
    client, _server = handshake(EXTENDED.__class__(gzip=False, min_stream_window=64 * 1024))
    sid = client.tunnel.open_stream()
    client.tunnel.send_data(sid, b"z" * 40000, end_stream=True)
    client.tunnel.handle_timer(100.0)
    client.tunnel.shutdown("done", graceful=False)
    out = client.tunnel.data_to_send()
    seen = []
    i = 0
    while i < len(out):
        frame, length = Frame.parse_frame_header(memoryview(out[i : i + 9]))
        frame.parse_body(memoryview(out[i + 9 : i + 9 + length]))
        seen.append(type(frame).__name__)
        i += 9 + length
    assert seen[0] == "HeadersFrame"
    assert seen.count("DataFrame") == 4  # three PSH and a separate FIN, as vproxy sends them
    assert "PingFrame" in seen
    assert seen[-1] == "GoAwayFrame"


def test_side_helper_types() -> None:
    client, _ = handshake(VPROXY)
    assert isinstance(client, Side)


def test_vtunnel_handshake_bytes_match_the_document() -> None:
    client = Tunnel(role=Role.CLIENT, config=TunnelConfig(lite_tls=False))
    client.initiate(0)
    hello = client.data_to_send()
    assert hello == h(
        "000024 04 00 00000000 f000 7674756e f001 00000001 f002 0000000b"
        " f003 00004000 f004 04000000 f005 00004000"
    )
    lite = Tunnel(
        role=Role.CLIENT
    )  # the core offers lite-tls (0x10) and lite-tls-runs (0x80) unless told not to
    lite.initiate(0)
    assert lite.data_to_send() == hello.replace(h("f002 0000000b"), h("f002 0000009b"))
    single = Tunnel(role=Role.CLIENT, config=TunnelConfig(lite_tls_runs=False))
    single.initiate(0)
    assert single.data_to_send() == hello.replace(h("f002 0000000b"), h("f002 0000001b"))
    server = Tunnel(role=Role.SERVER, config=TunnelConfig(lite_tls=False))
    server.receive_data(hello, 0)
    assert server.data_to_send() == hello


def test_pinned_control_vectors_decode_alike_with_the_codec_and_hyperframe() -> None:
    """The pinned bytes above, read by the codec's control-frame decoders and by hyperframe on its own."""
    from hyperframe.frame import GoAwayFrame, HeadersFrame, PingFrame, SettingsFrame

    from vtunnel.protocol import frames as fr

    def parse(data: bytes) -> tuple[Frame, fr.RawFrame]:
        theirs, _ = Frame.parse_frame_header(memoryview(data[:9]))
        theirs.parse_body(memoryview(data[9:]))
        [ours], err = fr.FrameDecoder().feed(data)
        assert err is None
        return theirs, ours

    settings, raw = parse(HANDSHAKE)
    assert isinstance(settings, SettingsFrame)
    assert settings.settings == {} == dict(fr.decode_settings(raw.payload))
    for flags, ack in ((0, False), (1, True)):
        ping, raw = parse(h(f"000008 06 0{flags} 00000000 0000000000000001"))
        assert isinstance(ping, PingFrame)
        assert ("ACK" in ping.flags, int.from_bytes(ping.opaque_data, "big")) == (
            ack,
            fr.decode_ping(raw.payload),
        )
    for flags, end in ((0, False), (1, True)):  # SYN / SYN-ACK, RST
        headers, raw = parse(h(f"000000 01 0{flags} 00000001"))
        assert isinstance(headers, HeadersFrame)
        decoded = fr.decode_headers(1, raw.flags, raw.payload)
        assert ("END_STREAM" in headers.flags, headers.data) == decoded == (end, b"")
    goaway, raw = parse(h("00000b 07 00 00000000 ffffffff ffffffff 627965"))
    assert isinstance(goaway, GoAwayFrame)
    assert (goaway.last_stream_id, goaway.error_code, goaway.additional_data.decode()) == fr.decode_goaway(
        raw.payload
    )
    assert fr.decode_goaway(raw.payload) == (fr.VPROXY_GOAWAY_ID, 0xFFFFFFFF, "bye")
