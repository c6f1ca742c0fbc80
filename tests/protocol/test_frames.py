"""The codec: whole input, byte by byte, trailing data; round trips; limits; gzip bounds."""

from __future__ import annotations

import gzip
import struct

import pytest
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given
from hypothesis import strategies as st

from vtunnel.protocol import TunnelConfig
from vtunnel.protocol import frames as fr

raw_frames = st.builds(
    fr.RawFrame,
    type=st.integers(0, 255),
    flags=st.integers(0, 255),
    stream_id=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=300),
)


def encode(f: fr.RawFrame) -> bytes:
    return fr.encode_frame(f.type, f.flags, f.stream_id, f.payload)


@given(st.lists(raw_frames, max_size=8), st.binary(max_size=8))
def test_whole_bytewise_and_trailing(frames: list[fr.RawFrame], trailing: bytes) -> None:
    data = b"".join(encode(f) for f in frames)
    whole, err = fr.FrameDecoder().feed(data)
    assert err is None
    assert whole == frames
    dec = fr.FrameDecoder()
    bytewise: list[fr.RawFrame] = []
    for i in range(len(data)):
        got, err = dec.feed(data[i : i + 1])
        assert err is None
        bytewise.extend(got)
    assert bytewise == frames
    dec = fr.FrameDecoder()
    got, err = dec.feed(data + trailing[: min(len(trailing), 8)])
    assert got == frames
    assert err is None
    assert dec.buffered == min(len(trailing), 8)  # a partial header waits for more


@given(st.lists(raw_frames, min_size=1, max_size=5), st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_any_chunking_and_input_types(frames: list[fr.RawFrame], cuts: list[int]) -> None:
    data = b"".join(encode(f) for f in frames)
    dec = fr.FrameDecoder()
    out: list[fr.RawFrame] = []
    i = 0
    k = 0
    while i < len(data):
        n = cuts[k % len(cuts)]
        piece = data[i : i + n]
        kind = k % 3
        chunk: bytes | bytearray | memoryview = (
            piece if kind == 0 else bytearray(piece) if kind == 1 else memoryview(piece)
        )
        got, err = dec.feed(chunk)
        assert err is None
        out.extend(got)
        i += n
        k += 1
    assert out == frames
    assert all(isinstance(f.payload, bytes) for f in out)


def test_oversized_header_is_an_error_at_once() -> None:
    dec = fr.FrameDecoder(max_payload=100)
    ok = fr.encode_frame(0, 0, 1, b"x")
    got, err = dec.feed(ok + struct.pack(">I", 101 << 8)[:3] + bytes(6))
    assert got == [fr.RawFrame(0, 0, 1, b"x")]
    assert err is not None
    assert err.frame_size


def test_our_frames_match_hyperframe() -> None:
    cases: list[tuple[bytes, Frame]] = [
        (
            fr.encode_frame(fr.FrameType.DATA, fr.END_STREAM, 3, b"abc"),
            DataFrame(3, b"abc", flags=["END_STREAM"]),
        ),
        (fr.encode_frame(fr.FrameType.HEADERS, 0, 5), HeadersFrame(5)),
        (fr.encode_ping(7), PingFrame(0, struct.pack(">Q", 7))),
        (fr.encode_ping(7, ack=True), PingFrame(0, struct.pack(">Q", 7), flags=["ACK"])),
        (fr.encode_settings([]), SettingsFrame(0)),
        (fr.encode_window_update(3, 1000), WindowUpdateFrame(3, 1000)),
        (
            fr.encode_goaway("bye", last_stream_id=9, code=0),
            GoAwayFrame(0, last_stream_id=9, error_code=0, additional_data=b"bye"),
        ),
    ]
    for ours, theirs in cases:
        assert ours == theirs.serialize()


@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1)), max_size=10))
def test_settings_round_trip(entries: list[tuple[int, int]]) -> None:
    data = fr.encode_settings(entries)
    [frame], err = fr.FrameDecoder().feed(data)
    assert err is None
    assert fr.decode_settings(frame.payload) == list(
        dict(entries).items()
    )  # an id given twice: its last value


def test_settings_payload_must_be_whole_entries() -> None:
    with pytest.raises(fr.FrameError):
        fr.decode_settings(b"\x00" * 7)


@given(st.integers(0, 2**64 - 1))
def test_ping_round_trip(counter: int) -> None:
    assert fr.decode_ping(fr.encode_ping(counter)[9:]) == counter


@given(st.text(max_size=50), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_goaway_round_trip(reason: str, last: int, code: int) -> None:
    payload = fr.encode_goaway(reason, last_stream_id=last, code=code)[9:]
    assert fr.decode_goaway(payload) == (
        last,
        code,
        reason.encode("utf-8", "replace").decode("utf-8", "replace"),
    )


def test_short_goaway_and_window_update_are_errors() -> None:
    with pytest.raises(fr.FrameError):
        fr.decode_goaway(b"\0" * 7)
    with pytest.raises(fr.FrameError):
        fr.decode_window_update(b"\0" * 3)


@given(st.binary(max_size=5000))
def test_gzip_round_trip(data: bytes) -> None:
    assert fr.gzip_decompress(fr.gzip_compress(data), len(data)) == data
    assert fr.gzip_decompress(gzip.compress(data), max(len(data), 1)) == data


def test_gzip_limits() -> None:
    packed = gzip.compress(b"a" * 10_000)
    with pytest.raises(fr.FrameError, match="inflates past"):
        fr.gzip_decompress(packed, 9_999)
    with pytest.raises(fr.FrameError):
        fr.gzip_decompress(packed[:-4], 10_000)
    with pytest.raises(fr.FrameError):
        fr.gzip_decompress(packed + b"junk", 10_000)
    with pytest.raises(fr.FrameError):
        fr.gzip_decompress(b"not gzip", 10_000)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keepalive_interval": 0},
        {"keepalive_timeout": -1.0},
        {"handshake_timeout": float("nan")},
        {"keepalive_max_missed": 0},
        {"initial_stream_window": 10},
        {"initial_tunnel_window": 2**31},
        {"max_frame_size": 100},
        {"max_frame_size": 2**24},
        {"max_concurrent_streams": 0},
        {"drain_timeout": 0},
    ],
)
def test_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        TunnelConfig(**kwargs)  # type: ignore[arg-type]


def test_stream_metadata_kind_is_checked() -> None:
    from vtunnel.protocol import StreamMetadata

    with pytest.raises(ValueError, match="kind"):
        StreamMetadata(kind="sctp")


def test_config_error_is_ours_and_a_value_error() -> None:
    from vtunnel.protocol import ConfigError, VTunnelError

    with pytest.raises(ConfigError) as info:
        TunnelConfig(gzip="yes")  # type: ignore[arg-type]
    assert isinstance(info.value, VTunnelError)
    assert isinstance(info.value, ValueError)


@given(
    st.lists(raw_frames, max_size=8),
    st.lists(st.integers(1, 400), max_size=12),
    st.integers(10, 300),
)
def test_views_give_the_same_frames_for_any_chunking(
    frames: list[fr.RawFrame], cuts: list[int], limit: int
) -> None:
    data = b"".join(encode(f) for f in frames)
    copying, viewing = fr.FrameDecoder(max_payload=limit), fr.FrameDecoder(max_payload=limit)
    got: list[fr.RawFrame] = []
    seen: list[tuple[int, int, int, bytes]] = []
    errors: list[tuple[str | None, str | None]] = []
    pieces, i = [], 0
    for n in cuts:
        pieces.append(data[i : i + n])
        i += n
    pieces.append(data[i:])
    for piece in pieces:
        a, err_a = copying.feed(piece)
        b, err_b = viewing.feed_views(bytearray(piece))  # a mutable input works too
        got += a
        seen += [(f.type, f.flags, f.stream_id, bytes(f.payload)) for f in b]
        errors.append((err_a.reason if err_a else None, err_b.reason if err_b else None))
        if err_a or err_b:
            break
    assert [tuple(f) for f in got] == seen
    assert all(x == y for x, y in errors)
    assert copying.buffered == viewing.buffered


def test_views_are_slices_of_the_input_and_only_a_split_frame_is_copied() -> None:
    one = fr.encode_frame(fr.FrameType.DATA, 0, 1, b"a" * 100)
    two = fr.encode_frame(fr.FrameType.DATA, 0, 3, b"b" * 100)
    data = one + two
    dec = fr.FrameDecoder()
    first = data[:150]
    frames, err = dec.feed_views(first)
    assert err is None
    assert len(frames) == 1
    assert isinstance(frames[0].payload, memoryview)
    assert frames[0].payload.obj is first  # a view of the input, not a copy
    assert dec.buffered == 41  # only the started frame waits
    second = data[150:] + one
    frames, err = dec.feed_views(second)
    assert err is None
    assert [(f.stream_id, bytes(f.payload)) for f in frames] == [(3, b"b" * 100), (1, b"a" * 100)]
    assembled, whole = frames[0].payload, frames[1].payload
    assert isinstance(assembled, memoryview)
    assert isinstance(assembled.obj, bytearray)  # the decoder's buffer, handed out
    assert isinstance(whole, memoryview)
    assert whole.obj is second
    assert dec.buffered == 0
    frames, err = dec.feed_views(data[:150])  # a new partial frame does not touch the handed-out one
    assert bytes(assembled) == b"b" * 100


def test_split_header_over_the_limit_is_an_error_once_complete() -> None:
    dec = fr.FrameDecoder(max_payload=100)
    ok = fr.encode_frame(fr.FrameType.PING, 0, 0, bytes(8))
    bad = struct.pack(">I", 101 << 8)[:3] + bytes(6)
    frames, err = dec.feed_views(ok + bad[:4])
    assert err is None
    assert len(frames) == 1
    frames, err = dec.feed_views(bad[4:] + b"more")
    assert frames == []
    assert err is not None
    assert err.frame_size
