"""rudp's wire format: varints, every frame, ACK ranges (hypothesis), and garbage raising only WireError."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtunnel.arq.rudp.ranges import RangeSet
from vtunnel.arq.rudp.wire import (
    MAX_VARINT,
    Ack,
    Close,
    DataBlocked,
    Datagram,
    Padding,
    Ping,
    Stream,
    WireError,
    ack_ranges,
    decode_packet,
    encode_ack,
    encode_close,
    encode_data_blocked,
    encode_datagram,
    encode_header,
    encode_stream,
    encode_varint,
    peek_dcid,
    peek_number,
    stream_head,
    stream_header,
    stream_overhead,
    stream_packet,
    varint_size,
)


@given(st.integers(min_value=0, max_value=MAX_VARINT))
def test_varint_round_trip(value: int) -> None:
    encoded = encode_varint(value)
    assert len(encoded) == varint_size(value)
    packet = decode_packet(encode_header(b"", value) + b"\x01")
    assert packet.number == value


def test_varint_bounds() -> None:
    assert encode_varint(63) == b"\x3f"
    assert encode_varint(64) == b"\x40\x40"
    assert encode_varint(15293) == bytes.fromhex("7bbd")  # RFC 9000 appendix A.1's example
    with pytest.raises(ValueError, match="varint"):
        encode_varint(MAX_VARINT + 1)


def test_every_frame_round_trips() -> None:
    frames = [
        encode_stream(0, b"hello"),
        encode_stream(5, b"", fin=True),
        encode_ack([(7, 9), (2, 4), (0, 0)], 1234, 1 << 22),
        encode_datagram(b"udp"),
        encode_data_blocked(65536),
        b"\x01",
        encode_close(4, "protocol violation"),
        b"\x00\x00\x00",
        encode_datagram(b"tail", with_length=False),
    ]
    packet = decode_packet(encode_header(b"\xaa\xbb", 42) + b"".join(frames))
    assert packet.dcid == b"\xaa\xbb"
    assert packet.number == 42
    assert packet.frames == (
        Stream(0, b"hello", False),
        Stream(5, b"", True),
        Ack(((7, 9), (2, 4), (0, 0)), 1234, 1 << 22),
        Datagram(b"udp"),
        DataBlocked(65536),
        Ping(),
        Close(4, "protocol violation"),
        Padding(3),
        Datagram(b"tail"),
    )
    assert Ack(((7, 9),), 0, 0).largest == 9


def test_stream_without_length_runs_to_the_end() -> None:
    packet = decode_packet(encode_header(b"", 1) + encode_stream(10, b"abc", with_length=False))
    assert packet.frames == (Stream(10, b"abc", False),)


@given(st.sets(st.integers(min_value=0, max_value=5000), min_size=1, max_size=200))
def test_ack_ranges_round_trip(numbers: set[int]) -> None:
    ranges = ack_ranges(numbers)
    # highest first, disjoint and not adjacent, covering exactly the numbers
    assert all(low <= high for low, high in ranges)
    assert all(ranges[i][0] > ranges[i + 1][1] + 1 for i in range(len(ranges) - 1))
    assert {n for low, high in ranges for n in range(low, high + 1)} == numbers
    frame = decode_packet(encode_header(b"", 0) + encode_ack(ranges, 0, 0)).frames[0]
    assert isinstance(frame, Ack)
    assert list(frame.ranges) == ranges


_ANY_VARINT = st.one_of(
    st.integers(min_value=0, max_value=0x3F),
    st.integers(min_value=0x40, max_value=0x3FFF),
    st.integers(min_value=0x4000, max_value=0x3FFF_FFFF),
    st.integers(min_value=0x4000_0000, max_value=MAX_VARINT),
)


@given(_ANY_VARINT, _ANY_VARINT, _ANY_VARINT, _ANY_VARINT)
def test_an_ack_of_one_range_is_the_varints_of_its_fields(
    largest: int, span: int, delay: int, max_data: int
) -> None:
    # an ACK of one range is packed by one struct of its fields' sizes: the same bytes as the fields' varints
    span = min(span, largest)
    frame = encode_ack([(largest - span, largest)], delay, max_data)
    assert frame == b"\x02" + b"".join(encode_varint(v) for v in (largest, delay, max_data, 0, span))
    decoded = decode_packet(encode_header(b"", 0) + frame).frames[0]
    assert decoded == Ack(((largest - span, largest),), delay, max_data)


@given(st.binary(max_size=40))
def test_an_ack_frame_of_garbage_reads_as_its_varints_read(tail: bytes) -> None:
    # the ACK's fields read by one struct of their sizes, or one by one when the frame is short or has more
    # ranges: the same frame or the same refusal
    raw = encode_header(b"", 0) + b"\x02" + tail
    try:
        frame = decode_packet(raw).frames[0]
    except WireError:
        frame = None
    varints = []
    pos = 0
    try:
        for _ in range(5):
            if pos >= len(tail):
                raise WireError("truncated")
            size = 1 << (tail[pos] >> 6)
            if pos + size > len(tail):
                raise WireError("truncated")
            varints.append(int.from_bytes(tail[pos : pos + size], "big") & (2 ** (8 * size - 2) - 1))
            pos += size
    except WireError:
        assert frame is None
        return
    largest, delay, max_data, count, first = varints
    if frame is not None:  # (else refused for what follows the fields: more ranges, the frames after it)
        assert isinstance(frame, Ack)
        assert (frame.ranges[0], frame.delay, frame.max_data, len(frame.ranges) - 1) == (
            (largest - first, largest),
            delay,
            max_data,
            count,
        )
    elif first <= largest and count == 0 and pos == len(tail):
        raise AssertionError("a whole ACK of one range, refused")


@given(st.sets(st.integers(min_value=0, max_value=300), max_size=100))
def test_range_set_matches_a_set(numbers: set[int]) -> None:
    ranges = RangeSet()
    for n in numbers:
        ranges.add(n, n + 1)
    assert {n for start, end in ranges for n in range(start, end)} == numbers
    assert [(low, high + 1) for low, high in reversed(ack_ranges(numbers))] == list(ranges)
    assert ranges.missing(0, 301) == [(a, b + 1) for a, b in reversed(ack_ranges(set(range(301)) - numbers))]


@given(st.lists(st.tuples(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=40))))
def test_range_set_intervals_match_a_set(intervals: list[tuple[int, int]]) -> None:
    """Intervals added in any order (in order, overlapping, touching the last one: the fast path) give the set
    of their integers, and ``add`` counts the new ones."""
    ranges = RangeSet()
    numbers: set[int] = set()
    for start, length in intervals:
        new = set(range(start, start + length)) - numbers
        assert ranges.add(start, start + length) == len(new)
        numbers |= new
        spans = list(ranges)
        assert all(a < b for a, b in spans)
        assert all(spans[i][1] < spans[i + 1][0] for i in range(len(spans) - 1))  # disjoint, not adjacent
        assert {n for a, b in spans for n in range(a, b)} == numbers


@given(st.binary(max_size=20), st.integers(min_value=0, max_value=MAX_VARINT))
def test_peek_number_reads_the_header_alone(dcid: bytes, number: int) -> None:
    datagram = encode_header(dcid, number) + b"\x01"
    assert peek_number(datagram) == number
    assert peek_number(memoryview(b"xy" + datagram)[2:]) == number
    assert peek_number(b"xy" + datagram, 2) == number  # (a datagram of a run, by its offset in the buffer)
    assert peek_dcid(datagram) == dcid


@settings(max_examples=300)
@given(st.binary(max_size=40))
def test_peek_number_of_garbage_raises_only_wire_error(raw: bytes) -> None:
    with contextlib.suppress(WireError):
        peek_number(raw)
    with contextlib.suppress(WireError):
        peek_number(raw, len(raw) // 2)


@given(st.integers(min_value=0, max_value=MAX_VARINT - 2000), st.binary(max_size=1500), st.booleans())
def test_a_stream_header_and_its_data_make_the_frame(offset: int, data: bytes, fin: bool) -> None:
    frame = stream_header(offset, len(data), fin=fin) + data
    assert frame == encode_stream(offset, data, fin=fin)
    assert decode_packet(encode_header(b"", 0) + frame).frames == (Stream(offset, data, fin),)


def test_peek_dcid() -> None:
    assert peek_dcid(encode_header(b"12345678", 3) + b"\x01") == b"12345678"
    for bad in (b"", b"\x00", b"\x80", b"\x48abc"):
        with pytest.raises(WireError):
            peek_dcid(bad)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x40\x00",  # no frames
        b"\x40\x00\xff",  # unknown frame type
        b"\x40\x00\x02\x05\x00\x00\x00\x06",  # first ACK range below 0
        b"\x40\x00\x02\x05\x00\x00\x01\x01\x05\x00",  # second ACK range below 0
        b"\x40\x00\x02\x05\x00\x00\x3f\x00",  # range count past the packet
        b"\x40\x00\x0a\x00\x05ab",  # STREAM length past the packet
        b"\x40\x00\x1c\x00\x02\xff\xfe",  # CLOSE reason not UTF-8
        b"\x40\x00\x0a\xff\xff\xff\xff\xff\xff\xff\xff\x01a",  # STREAM beyond the largest offset
        b"\x40\xc0",  # truncated packet number
    ],
)
def test_malformed_packets_raise_wire_error(raw: bytes) -> None:
    with pytest.raises(WireError):
        decode_packet(raw)


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_garbage_raises_only_wire_error(raw: bytes) -> None:
    with contextlib.suppress(WireError):
        decode_packet(raw)


@settings(max_examples=300)
@given(st.binary(max_size=120))
def test_garbage_after_a_valid_header_raises_only_wire_error(tail: bytes) -> None:
    with contextlib.suppress(WireError):
        decode_packet(encode_header(b"\x01\x02", 5) + tail)


def _agrees_with_the_decoder(datagram: bytes, dcid: bytes) -> None:
    """``stream_packet`` reads a packet as the full decoder does, or leaves it to it."""
    lone = stream_packet(datagram, dcid)
    assert stream_packet(memoryview(datagram), dcid) == lone  # (a run's datagrams are views into its buffer)
    try:
        packet = decode_packet(datagram)
    except WireError:
        assert lone is None
        return
    frames = packet.frames
    ack = None
    if len(frames) == 2 and isinstance(frames[0], Ack):
        ack = (frames[0].ranges, frames[0].delay, frames[0].max_data)
        frames = frames[1:]
    if packet.dcid == dcid and len(frames) == 1 and isinstance(frames[0], Stream) and not frames[0].fin:
        assert lone == (packet.number, frames[0].offset, len(datagram) - len(frames[0].data), ack)
        assert datagram[lone[2] :] == frames[0].data
    else:
        assert lone is None


@given(
    st.binary(max_size=20),
    st.integers(min_value=0, max_value=MAX_VARINT),
    st.integers(min_value=0, max_value=MAX_VARINT),
    st.binary(max_size=64),
    st.booleans(),
    st.booleans(),
    st.sampled_from([b"", b"\x01", b"\x00\x00", encode_data_blocked(9)]),
    st.sampled_from(
        [b"", encode_ack([(3, 7)], 900, 1 << 23), encode_ack([(90, 100), (20, 40), (0, 5)], 70000, 300)]
    ),
)
def test_a_lone_stream_frame_is_read_as_the_decoder_reads_it(
    dcid: bytes, number: int, offset: int, data: bytes, fin: bool, with_length: bool, after: bytes, ack: bytes
) -> None:
    if offset + len(data) > MAX_VARINT:
        offset = MAX_VARINT - len(data)
    frame = encode_stream(offset, data, fin=fin, with_length=with_length or bool(after))
    datagram = encode_header(dcid, number) + ack + frame + after
    _agrees_with_the_decoder(datagram, dcid)
    _agrees_with_the_decoder(datagram, dcid + b"x")  # another connection's
    _agrees_with_the_decoder(datagram[:-1], dcid)  # cut short


@settings(max_examples=500)
@given(st.binary(max_size=80), st.binary(max_size=4))
def test_lone_stream_of_garbage_returns_none_or_what_the_decoder_reads(raw: bytes, dcid: bytes) -> None:
    _agrees_with_the_decoder(raw, dcid)
    _agrees_with_the_decoder(encode_header(dcid, 5) + raw, dcid)


@settings(max_examples=500)
@given(
    st.integers(min_value=0, max_value=MAX_VARINT // 2),
    st.integers(min_value=0, max_value=MAX_VARINT // 2),
    st.integers(min_value=-2, max_value=70000),
    st.booleans(),
)
def test_stream_head_is_the_header_of_as_much_data_as_fits(
    offset: int, available: int, room: int, fin: bool
) -> None:
    """One call's STREAM header: the bytes :func:`stream_header` writes for the length that fits ``room`` (the
    length field sized for ``available``, as :func:`stream_overhead` counts it)."""
    take = min(available, room - stream_overhead(offset, available))
    fin_at = offset + take if fin else -1
    head = stream_head(offset, available, room, fin_at)
    if take < 0 or (take == 0 and available):
        assert head is None
        return
    assert head == (stream_header(offset, take, fin=fin), take)
    frame = decode_packet(encode_header(b"", 0) + head[0] + bytes(take)).frames[0]
    assert frame == Stream(offset, bytes(take), fin)
