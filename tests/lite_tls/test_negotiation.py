"""The lite-tls extension bit and PASSTHROUGH DATA frames in the tunnel core (in memory)."""

from __future__ import annotations

import dataclasses

import pytest

from tests.protocol.helpers import VPROXY, Side, handshake, pump
from tests.protocol.test_errors import goaway_reason
from vtunnel.protocol import Role, StreamMetadata, Tunnel, TunnelConfig
from vtunnel.protocol import events as ev
from vtunnel.protocol import frames as fr
from vtunnel.protocol.errors import ConfigError, LocalProtocolError
from vtunnel.protocol.settings import ExtensionBits, SettingId, local_settings, offered_bits

ON = TunnelConfig()
OFF = TunnelConfig(lite_tls=False)
RECORD = b"\x17\x03\x03" + (16401).to_bytes(2, "big") + bytes(range(256)) * 64 + bytes(17)


SINGLE = TunnelConfig(lite_tls_runs=False)
#: what the runtime offers over a link without passthrough records in splice mode (kcp://, rudp:// with splice=)
SPLICED = TunnelConfig(lite_tls_spliced=True)


@pytest.mark.parametrize(
    ("client", "server", "lite", "runs"),
    [
        (ON, ON, True, True),
        (ON, OFF, False, False),
        (OFF, ON, False, False),
        (OFF, OFF, False, False),
        (ON, SINGLE, True, False),
        (SINGLE, ON, True, False),
        (SPLICED, SPLICED, True, False),
        # an end that would send passthrough records over a datagram link (an older kcp:// passthrough=on)
        # offers plain lite-tls there: it never agrees with lite-tls-spliced
        (ON, SPLICED, False, False),
        (SPLICED, ON, False, False),
        (SPLICED, OFF, False, False),
    ],
)
def test_both_ends_must_offer_it(client: TunnelConfig, server: TunnelConfig, lite: bool, runs: bool) -> None:
    """lite-tls needs both ends' bit; lite-tls-runs needs both ends' bit and lite-tls."""
    c, s = handshake(client, server)
    for side in (c, s):
        assert side.tunnel.extensions.lite_tls is lite
        assert ("lite-tls" in side.tunnel.extensions) is lite
        assert side.tunnel.extensions.lite_tls_runs is runs
        assert ("lite-tls-runs" in side.tunnel.extensions) is runs


def test_a_vproxy_peer_never_negotiates_it() -> None:
    c, s = handshake(ON, VPROXY)
    assert not c.tunnel.extensions.lite_tls
    assert not s.tunnel.extensions.lite_tls
    c, s = handshake(VPROXY, ON)
    assert not c.tunnel.extensions.lite_tls


def _open(c: Side, s: Side) -> int:
    sid = c.tunnel.open_stream(metadata=StreamMetadata(authority="example.com:443", kind="lite-tls"))
    pump(c, s)
    (opened,) = s.of(ev.StreamOpened)
    assert opened.metadata is not None
    assert opened.metadata.kind == "lite-tls"
    s.tunnel.accept_stream(sid)
    pump(c, s)
    return sid


def test_passthrough_frames_are_never_joined_with_ordinary_ones_and_may_exceed_the_frame_size() -> None:
    c, s = handshake(ON, ON)
    sid = _open(c, s)
    assert len(RECORD) > ON.max_frame_size
    c.tunnel.send_data(sid, b"sealed ")
    c.tunnel.send_data(sid, RECORD, passthrough=True)
    c.tunnel.send_data(sid, RECORD * 2, passthrough=True)  # whole records: one frame each
    c.tunnel.send_data(sid, b"after")
    pump(c, s)
    got = [(e.data, e.passthrough) for e in s.of(ev.DataReceived)]
    assert got == [(b"sealed ", False), (RECORD * 3, True), (b"after", False)]


def test_passthrough_needs_the_extension_on_the_sending_side() -> None:
    c, s = handshake(ON, OFF)
    sid = _open(c, s)
    with pytest.raises(LocalProtocolError):
        c.tunnel.send_data(sid, RECORD, passthrough=True)
    c, s = handshake(ON, ON)
    sid = _open(c, s)
    too_long = b"\x17\x03\x03\xff\xff" + bytes(0xFFFF)
    for bad in (b"", bytes(fr.MAX_PASSTHROUGH_PAYLOAD + 1), RECORD[:-1], RECORD + b"\x17\x03", too_long):
        with pytest.raises(LocalProtocolError):
            c.tunnel.send_data(sid, bad, passthrough=True)
    with pytest.raises(LocalProtocolError):
        c.tunnel.send_data(sid, RECORD, passthrough=True, end_stream=True)


def test_a_passthrough_frame_without_the_extension_closes_the_tunnel() -> None:
    c, s = handshake(ON, OFF)
    sid = _open(c, s)
    s.events.clear()
    s.events.extend(
        s.tunnel.receive_data(fr.frame_header(fr.FrameType.DATA, fr.PASSTHROUGH, sid, 5) + RECORD[:5], 0.0)
    )
    (closed,) = s.of(ev.TunnelClosed)
    assert "lite-tls" in closed.reason


def test_an_oversized_ordinary_frame_is_still_refused() -> None:
    c, s = handshake(ON, ON)
    sid = _open(c, s)
    s.events.clear()
    big = bytes(ON.max_frame_size + 1)
    s.events.extend(s.tunnel.receive_data(fr.frame_header(fr.FrameType.DATA, 0, sid, len(big)) + big, 0.0))
    assert s.of(ev.TunnelClosed)


def test_with_runs_consecutive_records_are_one_frame_up_to_the_cap() -> None:
    wide = TunnelConfig(initial_stream_window=1 << 20)
    c, s = handshake(wide, wide)
    sid = _open(c, s)
    small = b"\x17\x03\x03\x00\x03abc"
    records = [RECORD, small, RECORD] + [RECORD] * 9 + [small] * 300
    c.tunnel.send_data(sid, b"".join(records), passthrough=True)
    wire = c.tunnel.data_to_send()
    frames, error = fr.FrameDecoder(max_payload=fr.MAX_PASSTHROUGH_RUN).feed(wire)
    assert error is None
    assert all(f.flags == fr.PASSTHROUGH for f in frames)
    assert b"".join(f.payload for f in frames) == b"".join(records)
    assert all(len(f.payload) <= fr.MAX_PASSTHROUGH_RUN for f in frames)
    # every frame is whole records, as many as fit: the next record would pass a cap
    sizes = [len(r) for r in records]
    at = 0
    for f in frames:
        count = 0
        size = 0
        while at + count < len(sizes) and size + sizes[at + count] <= len(f.payload):
            size += sizes[at + count]
            count += 1
        assert size == len(f.payload)
        assert count <= fr.MAX_RUN_RECORDS
        at += count
        if at < len(sizes):
            assert count == fr.MAX_RUN_RECORDS or size + sizes[at] > fr.MAX_PASSTHROUGH_RUN
    assert at == len(sizes)
    s.events.extend(s.tunnel.receive_data(wire, 0.0))
    got = [(e.data, e.passthrough) for e in s.of(ev.DataReceived)]
    assert got == [(b"".join(records), True)]


def test_a_record_longer_than_the_run_cap_is_never_refused_alone() -> None:
    c, s = handshake(ON, ON)
    sid = _open(c, s)
    longest = b"\x17\x03\x03" + (2**14 + 2048).to_bytes(2, "big") + bytes(2**14 + 2048)
    c.tunnel.send_data(sid, longest, passthrough=True)
    pump(c, s)
    assert [(e.data, e.passthrough) for e in s.of(ev.DataReceived)] == [(longest, True)]


def test_several_records_are_one_frame_each_without_runs() -> None:
    c, s = handshake(SINGLE, SINGLE)
    sid = _open(c, s)
    small = b"\x17\x03\x03\x00\x03abc"
    c.tunnel.send_data(sid, RECORD + small + RECORD, passthrough=True)
    wire = c.tunnel.data_to_send()
    decoder = fr.FrameDecoder(max_payload=fr.MAX_PASSTHROUGH_PAYLOAD)
    frames, error = decoder.feed(wire)
    assert error is None
    assert [(f.flags, f.payload) for f in frames] == [
        (fr.PASSTHROUGH, RECORD),
        (fr.PASSTHROUGH, small),
        (fr.PASSTHROUGH, RECORD),
    ]


def test_lite_tls_spliced_is_its_own_bit() -> None:
    bits = offered_bits(SPLICED)
    assert bits & ExtensionBits.LITE_TLS_SPLICED
    assert not bits & (ExtensionBits.LITE_TLS | ExtensionBits.LITE_TLS_RUNS)
    assert (
        not offered_bits(TunnelConfig(lite_tls=False, lite_tls_spliced=True)) & ExtensionBits.LITE_TLS_SPLICED
    )


def _announced(client: TunnelConfig, server: TunnelConfig) -> tuple[int | None, int | None]:
    """The splice port each end's HandshakeCompleted carries (client's, server's)."""
    c = Side(Tunnel(role=Role.CLIENT, config=client))
    s = Side(Tunnel(role=Role.SERVER, config=server))
    c.tunnel.initiate(0.0)
    s.tunnel.initiate(0.0)
    pump(c, s)
    (done_c,), (done_s,) = c.of(ev.HandshakeCompleted), s.of(ev.HandshakeCompleted)
    return done_c.splice_port, done_s.splice_port


@pytest.mark.parametrize(
    ("client", "server", "seen"),
    [
        (ON, dataclasses.replace(ON, splice_port=4001), 4001),  # tcp:// with a key
        (SPLICED, dataclasses.replace(SPLICED, splice_port=4001), 4001),  # kcp://, rudp://
        (OFF, dataclasses.replace(ON, splice_port=4001), None),  # lite-tls not agreed: no port
        (ON, dataclasses.replace(OFF, splice_port=4001), None),  # nor offered: not even sent
        (ON, ON, None),
    ],
)
def test_a_server_in_splice_mode_announces_its_splice_port(
    client: TunnelConfig, server: TunnelConfig, seen: int | None
) -> None:
    assert _announced(client, server) == (seen, None)


def test_the_splice_port_is_sent_only_with_a_lite_tls_offer() -> None:
    def entries(config: TunnelConfig) -> dict[int, int]:
        return dict(local_settings(config))

    assert entries(dataclasses.replace(ON, splice_port=4001))[SettingId.SPLICE_PORT] == 4001
    assert entries(dataclasses.replace(SPLICED, splice_port=4001))[SettingId.SPLICE_PORT] == 4001
    assert SettingId.SPLICE_PORT not in entries(dataclasses.replace(OFF, splice_port=4001))
    assert SettingId.SPLICE_PORT not in entries(ON)
    with pytest.raises(ConfigError):
        TunnelConfig(splice_port=0)


@pytest.mark.parametrize("port", [0, 65536, 0xFFFFFFFF])
def test_a_splice_port_out_of_range_fails_the_handshake(port: int) -> None:
    client = Tunnel(role=Role.CLIENT, config=ON)
    client.initiate(0.0)
    client.data_to_send()
    answer = fr.encode_settings([*local_settings(ON), (SettingId.SPLICE_PORT, port)])
    evs = client.receive_data(answer, 0.0)
    assert len(evs) == 1, evs
    closed = evs[0]
    assert isinstance(closed, ev.TunnelClosed)
    assert closed.error is not None
    assert "splice port" in closed.error.reason
    assert "splice port" in goaway_reason(client.data_to_send())
