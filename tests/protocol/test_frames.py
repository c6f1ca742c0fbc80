"""The codec: whole input, byte by byte, trailing data; round trips; limits; gzip bounds."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable

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


# ---------------------------------------------------------------- the two paths against hyperframe

stream_ids = st.integers(1, 2**31 - 1)


def hyper(data: bytes) -> Frame:
    """Parse one whole frame with hyperframe."""
    frame, length = Frame.parse_frame_header(memoryview(data[:9]))
    assert length == len(data) - 9
    frame.parse_body(memoryview(data[9:]))
    return frame


def ours(data: bytes) -> fr.RawFrame:
    """Parse one whole frame with our decoder."""
    [frame], err = fr.FrameDecoder().feed(data)
    assert err is None
    return frame


@given(stream_ids, st.booleans(), st.binary(max_size=3000))
def test_data_fast_path_writes_what_hyperframe_writes(sid: int, end: bool, payload: bytes) -> None:
    flags = fr.END_STREAM if end else 0
    theirs = DataFrame(sid, payload, flags=["END_STREAM"] if end else []).serialize()
    assert fr.encode_frame(fr.FrameType.DATA, flags, sid, payload) == theirs
    assert fr.frame_header(fr.FrameType.DATA, flags, sid, len(payload)) + payload == theirs
    assert ours(theirs) == fr.RawFrame(0, flags, sid, payload)
    parsed = hyper(theirs)
    assert isinstance(parsed, DataFrame)
    assert (parsed.stream_id, parsed.data, "END_STREAM" in parsed.flags) == (sid, payload, end)


@given(stream_ids, st.booleans(), st.binary(max_size=300))
def test_gzip_flag_is_kept_by_our_decoder_and_dropped_by_hyperframe(
    sid: int, end: bool, payload: bytes
) -> None:
    flags = fr.GZIP | (fr.END_STREAM if end else 0)
    data = fr.encode_frame(fr.FrameType.DATA, flags, sid, payload)
    assert ours(data).flags == flags
    parsed = hyper(data)
    assert isinstance(parsed, DataFrame)
    assert set(parsed.flags) == ({"END_STREAM"} if end else set())
    assert parsed.data == payload


@given(st.integers(0, 2**64 - 1), st.booleans())
def test_ping_is_hyperframes(counter: int, ack: bool) -> None:
    data = fr.encode_ping(counter, ack=ack)
    assert data == PingFrame(0, counter.to_bytes(8, "big"), flags=["ACK"] if ack else []).serialize()
    parsed = hyper(data)
    assert isinstance(parsed, PingFrame)
    assert (parsed.opaque_data, "ACK" in parsed.flags) == (counter.to_bytes(8, "big"), ack)
    raw = ours(data)
    assert (raw.type, raw.flags, raw.stream_id) == (fr.FrameType.PING, fr.ACK if ack else 0, 0)
    assert fr.decode_ping(raw.payload) == counter


@given(st.dictionaries(st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1), max_size=10))
def test_settings_parse_identically_with_hyperframe(entries: dict[int, int]) -> None:
    data = fr.encode_settings(entries.items())
    parsed = hyper(data)
    assert isinstance(parsed, SettingsFrame)
    assert list(parsed.settings.items()) == list(entries.items())  # vtunnel's 0xF000.. ids whole
    assert fr.decode_settings(ours(data).payload) == list(entries.items())
    small = {k & 0xFF: v for k, v in entries.items()}  # the ids hyperframe 6.1 itself can write
    theirs = SettingsFrame(0, settings=small).serialize()
    assert fr.encode_settings(small.items()) == theirs
    assert fr.decode_settings(theirs[9:]) == list(small.items())


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.text(max_size=40))
def test_goaway_parses_identically_with_hyperframe(last: int, code: int, reason: str) -> None:
    data = fr.encode_goaway(reason, last_stream_id=last, code=code)
    body = reason.encode("utf-8", "replace")
    parsed = hyper(data)
    assert isinstance(parsed, GoAwayFrame)
    assert (parsed.last_stream_id, parsed.error_code, parsed.additional_data) == (last, code, body)
    assert fr.decode_goaway(ours(data).payload) == (last, code, body.decode("utf-8", "replace"))
    if last < 2**31:  # hyperframe clears the reserved bit vproxy sets in 0xFFFFFFFF
        theirs = GoAwayFrame(0, last_stream_id=last, error_code=code, additional_data=body).serialize()
        assert data == theirs


@given(st.integers(0, 2**31 - 1), st.integers(1, 2**31 - 1), st.booleans())
def test_window_update_is_hyperframes(sid: int, increment: int, reserved: bool) -> None:
    data = fr.encode_window_update(sid, increment)
    assert data == WindowUpdateFrame(sid, increment).serialize()
    parsed = hyper(data)
    assert isinstance(parsed, WindowUpdateFrame)
    assert (parsed.stream_id, parsed.window_increment) == (sid, increment)
    payload = (increment | (0x80000000 if reserved else 0)).to_bytes(4, "big")
    assert fr.decode_window_update(payload) == increment  # the reserved bit is ignored


def test_zero_window_update_is_left_to_the_tunnel() -> None:
    assert fr.decode_window_update(bytes(4)) == 0
    assert fr.decode_window_update(b"\x80\0\0\0") == 0


@given(stream_ids, st.booleans(), st.binary(max_size=200))
def test_headers_are_hyperframes(sid: int, end: bool, block: bytes) -> None:
    data = fr.encode_headers(sid, block, end_stream=end)
    assert data == HeadersFrame(sid, block, flags=["END_STREAM"] if end else []).serialize()
    assert data[4] == (fr.END_STREAM if end else 0)  # never END_HEADERS: vproxy's bytes
    parsed = hyper(data)
    assert isinstance(parsed, HeadersFrame)
    assert (parsed.stream_id, parsed.data, set(parsed.flags)) == (
        sid,
        block,
        {"END_STREAM"} if end else set(),
    )
    raw = ours(data)
    assert fr.decode_headers(raw.stream_id, raw.flags, raw.payload) == (end, block)


@given(stream_ids, st.integers(0, 255), st.binary(max_size=50))
def test_headers_read_only_end_stream_from_the_flags(sid: int, flags: int, block: bytes) -> None:
    """PADDED (0x8) or PRIORITY (0x20) from a peer do not reinterpret the block: other bits are ignored."""
    assert fr.decode_headers(sid, flags, block) == (bool(flags & fr.END_STREAM), block)


def test_headers_need_a_stream() -> None:
    with pytest.raises(ValueError, match="stream id"):
        fr.encode_headers(0)
    with pytest.raises(fr.FrameError, match="stream 0"):
        fr.decode_headers(0, 0, b"")


def test_the_vproxy_messages_are_built_by_the_codec() -> None:
    def h(text: str) -> bytes:
        return bytes.fromhex(text.replace(" ", ""))

    assert fr.encode_settings(()) == h("000000 04 00 00000000")
    assert fr.encode_headers(1) == h("000000 01 00 00000001")  # SYN, SYN-ACK
    assert fr.encode_headers(1, end_stream=True) == h("000000 01 01 00000001")  # RST
    assert fr.encode_ping(1, ack=True) == h("000008 06 01 00000000 0000000000000001")
    assert fr.encode_goaway("bye") == h("00000b 07 00 00000000 ffffffff ffffffff 627965")


def test_short_ping_is_a_frame_error_and_extra_bytes_are_ignored() -> None:
    with pytest.raises(fr.FrameError) as info:
        fr.decode_ping(bytes(7))
    assert info.value.frame_size
    assert fr.decode_ping(bytes(7) + b"\x05" + b"extra") == 5


def decode_any_headers(payload: bytes) -> tuple[bool, bytes]:
    return fr.decode_headers(1, 0xFF, payload)


DECODERS: dict[str, Callable[[bytes], object]] = {
    "settings": fr.decode_settings,
    "ping": fr.decode_ping,
    "goaway": fr.decode_goaway,
    "window_update": fr.decode_window_update,
    "headers": decode_any_headers,
}


@pytest.mark.parametrize("name", list(DECODERS))
@given(payload=st.binary(max_size=40))
def test_control_payloads_give_a_value_or_a_frame_error(name: str, payload: bytes) -> None:
    """No hyperframe exception (nor struct.error) leaves the codec, whatever the payload."""
    try:
        DECODERS[name](payload)
    except fr.FrameError as exc:
        reason = exc.reason
    else:
        reason = "decoded"
    assert reason
