"""When DATA goes out gzipped: negotiated between vtunnel peers, configured towards a vproxy peer (which inflates
the flag unasked), and only for text-like payloads over 1 KiB that shrink."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.protocol.helpers import Side, handshake, pump
from vtunnel.protocol import TunnelConfig
from vtunnel.protocol.frames import GZIP

TEXT = b"GET /index.html HTTP/1.1\r\nHost: example.com\r\nAccept: text/html\r\n\r\n" * 100


def data_frame_flags(wire: bytes) -> list[int]:
    """The flags byte of every DATA frame in ``wire`` (whole frames only)."""
    flags, offset = [], 0
    while offset + 9 <= len(wire):
        length = int.from_bytes(wire[offset : offset + 3], "big")
        ftype, fl = wire[offset + 3], wire[offset + 4]
        if ftype == 0:
            flags.append(fl)
        offset += 9 + length
    return flags


def send_and_capture(
    config: TunnelConfig, server_config: TunnelConfig, body: bytes
) -> tuple[list[int], Side]:
    client, server = handshake(config, server_config)
    sid = client.tunnel.open_stream()
    pump(client, server)
    server.tunnel.accept_stream(sid)
    pump(client, server)
    client.tunnel.send_data(sid, body)
    wire = client.tunnel.data_to_send()
    server.events.extend(server.tunnel.receive_data(wire, 0))
    return data_frame_flags(wire), server


@pytest.mark.parametrize(
    ("client", "server", "gzipped"),
    [
        (TunnelConfig(extensions=False, gzip=True), TunnelConfig(extensions=False), True),  # towards vproxy
        (TunnelConfig(extensions=False), TunnelConfig(extensions=False), False),
        (TunnelConfig(gzip=True), TunnelConfig(gzip=True), True),  # negotiated
        (TunnelConfig(gzip=True), TunnelConfig(gzip=False), False),  # offered, not taken
    ],
    ids=["vproxy-peer-configured", "vproxy-peer-off", "negotiated", "not-negotiated"],
)
def test_text_goes_out_gzipped_only_when_negotiated_or_configured_for_a_vproxy_peer(
    client: TunnelConfig, server: TunnelConfig, gzipped: bool
) -> None:
    flags, receiver = send_and_capture(client, server, TEXT)
    assert flags
    assert all(bool(f & GZIP) == gzipped for f in flags)
    assert receiver.data(1) == TEXT  # inflated byte-exact either way


def test_random_bytes_are_never_tried() -> None:
    body = os.urandom(20_000)
    flags, receiver = send_and_capture(
        TunnelConfig(extensions=False, gzip=True), TunnelConfig(extensions=False), body
    )
    assert flags
    assert not any(f & GZIP for f in flags)
    assert receiver.data(1) == body


def test_a_tls_record_stream_is_not_tried() -> None:
    records = b"".join(struct.pack("!BHH", 0x17, 0x0303, 1000) + os.urandom(1000) for _ in range(8))
    flags, _ = send_and_capture(TunnelConfig(gzip=True), TunnelConfig(gzip=True), records)
    assert not any(f & GZIP for f in flags)


def test_small_payloads_go_as_they_are() -> None:
    flags, _ = send_and_capture(TunnelConfig(gzip=True), TunnelConfig(gzip=True), TEXT[:1000])
    assert flags == [0]


@given(st.binary(min_size=0, max_size=6000), st.booleans())
def test_whatever_is_sent_arrives_exact(body: bytes, text_prefix: bool) -> None:
    if text_prefix:
        body = TEXT[:2000] + body
    _, receiver = send_and_capture(
        TunnelConfig(extensions=False, gzip=True), TunnelConfig(extensions=False), body
    )
    assert receiver.data(1) == body
