"""Passthrough records (lite-tls, docs/security.md): a PASSTHROUGH DATA frame carrying one whole TLS record goes
with only its 14 header bytes sealed and its body in the clear; everything else is sealed as before."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.security.test_records import NOW, connect
from vtunnel.security.errors import AuthenticationFailed
from vtunnel.security.records import MAX_RUN_BYTES, MAX_RUN_RECORDS, SecureStreamClient, SecureStreamServer

_HEADER = struct.Struct(">IBI")


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return _HEADER.pack(len(payload) << 8 | ftype, flags, sid) + payload


def tls_record(body: bytes) -> bytes:
    return b"\x17\x03\x03" + len(body).to_bytes(2, "big") + body


def passthrough(sid: int, body: bytes) -> bytes:
    return frame(0, 0x10, sid, tls_record(body))


def enabled() -> tuple[SecureStreamClient, SecureStreamServer]:
    c, s = connect()
    c.enable_passthrough()
    s.enable_passthrough()
    return c, s


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def run_frame(sid: int, bodies: list[bytes]) -> bytes:
    """A PASSTHROUGH frame carrying a run of TLS records (lite-tls-runs)."""
    return frame(0, 0x10, sid, b"".join(tls_record(body) for body in bodies))


frames = st.one_of(
    st.binary(max_size=300).map(lambda b: frame(0, 0, 1, b)),  # ordinary DATA
    st.binary(max_size=3000).map(lambda b: passthrough(3, b)),  # one TLS record, in passthrough
    st.lists(st.binary(max_size=2000), min_size=2, max_size=6).map(lambda bs: run_frame(9, bs)),  # a run
    st.lists(st.binary(max_size=2), min_size=250, max_size=260).map(lambda bs: run_frame(11, bs)),  # ~the cap
    st.binary(min_size=1, max_size=40).map(lambda b: frame(0, 0x10, 5, b)),  # flagged, not a TLS record
    st.binary(max_size=30).map(lambda b: frame(8, 0, 0, b)),  # a control frame
    st.binary(max_size=20).map(lambda b: frame(0, 0x10, 7, b"\x17\x03\x03\x00\x09" + b)),  # length mismatch
)


@settings(max_examples=150, deadline=None)
@given(st.lists(frames, max_size=12), st.lists(st.integers(0, 40_000), max_size=6), st.data())
def test_round_trip_with_any_chunking(parts: list[bytes], send_cuts: list[int], data: st.DataObject) -> None:
    c, s = enabled()
    stream = b"".join(parts)
    for piece in cut(stream, send_cuts):
        c.send(piece)
    wire = c.data_to_send()
    recv_cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    got = b"".join(s.receive_data(piece, NOW) for piece in cut(wire, recv_cuts))
    assert got == stream
    assert not s.incomplete_record


def test_a_passthrough_body_travels_in_the_clear_and_its_header_does_not() -> None:
    c, s = enabled()
    body = bytes(range(256)) * 60
    frames_ = frame(0, 0, 1, b"before") + passthrough(3, body) + frame(0, 0, 1, b"after")
    c.send(frames_)
    wire = c.data_to_send()
    assert body in wire
    assert tls_record(body)[:5] not in wire  # the inner header is sealed
    # a passthrough record is as long as the sealed record of the same frame: 2 + 14 + 16 + body
    sealed = connect()[0]
    sealed.send(passthrough(3, body))
    assert len(c_wire_of(passthrough(3, body))) == len(sealed.data_to_send())
    assert s.receive_data(wire, NOW) == frames_


def c_wire_of(frames_: bytes) -> bytes:
    c, _ = enabled()
    c.send(frames_)
    return c.data_to_send()


def test_without_enable_nothing_is_in_the_clear() -> None:
    c, s = connect()
    body = bytes(range(256)) * 60
    c.send(passthrough(3, body))
    wire = c.data_to_send()
    assert body[:64] not in wire
    assert s.receive_data(wire, NOW) == passthrough(3, body)


def test_a_frame_split_across_sends_is_sealed() -> None:
    c, s = enabled()
    body = bytes(range(256)) * 8
    whole = passthrough(3, body)
    c.send(whole[:100])
    c.send(whole[100:] + passthrough(3, body))
    wire = c.data_to_send()
    assert wire.count(body) == 1  # only the second one, whole in its send, is in the clear
    assert s.receive_data(wire, NOW) == whole * 2


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2 + 14 + 16 - 1), st.integers(0, 7))
def test_a_flipped_bit_in_the_sealed_part_fails_the_channel(index: int, bit: int) -> None:
    c, s = enabled()
    c.send(frame(0, 0, 1, b"x" * 50))
    first = c.data_to_send()
    assert s.receive_data(first, NOW) == frame(0, 0, 1, b"x" * 50)
    c.send(passthrough(3, b"b" * 1000))
    wire = bytearray(c.data_to_send())
    wire[index] ^= 1 << bit
    with pytest.raises(AuthenticationFailed):
        s.receive_data(bytes(wire), NOW)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 999), st.integers(0, 7))
def test_a_flipped_bit_in_the_body_is_delivered_as_is(index: int, bit: int) -> None:
    c, s = enabled()
    body = bytes(range(250)) * 4
    stream = passthrough(3, body) + frame(0, 0, 1, b"next stream's bytes")
    c.send(stream)
    wire = bytearray(c.data_to_send())
    at = wire.index(body)
    wire[at + index] ^= 1 << bit
    expected = bytearray(stream)
    expected[9 + 5 + index] ^= 1 << bit
    assert s.receive_data(bytes(wire), NOW) == bytes(expected)
    c.send(frame(0, 0, 1, b"later"))
    assert s.receive_data(c.data_to_send(), NOW) == frame(0, 0, 1, b"later")


def test_the_largest_tls_record_passes() -> None:
    c, s = enabled()
    body = b"z" * (2**14 + 2048)
    c.send(passthrough(3, body))
    wire = c.data_to_send()
    assert body in wire
    assert s.receive_data(wire, NOW) == passthrough(3, body)


def test_a_run_is_one_passthrough_record_its_headers_sealed() -> None:
    c, s = enabled()
    bodies = [bytes([i]) * 16384 for i in range(1, 8)] + [b"tail" * 100]
    run = run_frame(3, bodies)
    c.send(frame(0, 0, 1, b"before") + run)
    pieces = c.pieces_to_send()
    wire = b"".join(pieces)
    for body in bodies:
        assert body in wire  # each body in the clear, as a view of what was sent (never joined)
        assert any(isinstance(p, memoryview) and p.obj is not None and bytes(p) == body for p in pieces)
    for body in bodies:
        assert tls_record(body)[:5] not in wire  # no record header in the clear
    # one sealed part for the run: the frame header and 8 record headers, the tag, the masked length
    assert len(wire) == len(c_wire_of(frame(0, 0, 1, b"before"))) + 2 + 9 + 5 * len(bodies) + 16 + sum(
        map(len, bodies)
    )
    assert s.receive_data(wire, NOW) == frame(0, 0, 1, b"before") + run


def test_runs_past_the_caps_are_sealed_whole() -> None:
    c, s = enabled()
    too_many = run_frame(3, [b"a"] * (MAX_RUN_RECORDS + 1))
    too_long = run_frame(3, [b"b" * 16384] * 8 + [b"c"])  # 8 x 16389 + 6 bytes > 128 KiB
    assert len(too_long) - 9 > MAX_RUN_BYTES
    for whole in (too_many, too_long):
        c.send(whole)
        wire = c.data_to_send()
        assert len(wire) == len(whole) + 18 * -(-len(whole) // 16384)  # sealed records only
        assert s.receive_data(wire, NOW) == whole


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 12), st.data())
def test_a_flipped_bit_in_a_runs_sealed_part_fails_the_channel(count: int, data: st.DataObject) -> None:
    c, s = enabled()
    c.send(frame(0, 0, 1, b"x" * 50))
    assert s.receive_data(c.data_to_send(), NOW) == frame(0, 0, 1, b"x" * 50)
    c.send(run_frame(3, [bytes([i]) * 100 for i in range(count)]))
    wire = bytearray(c.data_to_send())
    index = data.draw(st.integers(0, 2 + 9 + 5 * count + 16 - 1))
    wire[index] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(AuthenticationFailed):
        s.receive_data(bytes(wire), NOW)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 5 * 700 - 1), st.integers(0, 7))
def test_a_flipped_bit_in_a_runs_body_is_delivered_as_is(index: int, bit: int) -> None:
    c, s = enabled()
    bodies = [bytes([i]) * 700 for i in range(5)]
    stream = run_frame(3, bodies) + frame(0, 0, 1, b"next stream's bytes")
    c.send(stream)
    wire = bytearray(c.data_to_send())
    at = 2 + 9 + 5 * len(bodies) + 16  # the masked length, the sealed part and its tag, then the bodies
    assert wire[at : at + 5 * 700] == b"".join(bodies)
    wire[at + index] ^= 1 << bit
    expected = bytearray(stream)
    expected[9 + 5 * (index // 700 + 1) + index] ^= 1 << bit  # the bodies come after their record headers
    assert s.receive_data(bytes(wire), NOW) == bytes(expected)
    c.send(frame(0, 0, 1, b"later"))
    assert s.receive_data(c.data_to_send(), NOW) == frame(0, 0, 1, b"later")


def test_a_single_record_passthrough_record_is_unchanged() -> None:
    """A run of one record is the passthrough record of peers without runs, byte for byte in length and layout."""
    body = b"q" * 1000
    wire = c_wire_of(passthrough(3, body))
    assert len(wire) == 2 + 14 + 16 + len(body)
    assert wire.endswith(body)
