"""smux frames and sessions, and kcptun's snappy framing: round trips, flow control, keepalive, garbage."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtunnel.kcptun.errors import CompressionError, SmuxError, SmuxProtocolError
from vtunnel.kcptun.smux import (
    INITIAL_PEER_WINDOW,
    Command,
    DataReceived,
    Event,
    Frame,
    FrameParser,
    SessionClosed,
    SmuxConfig,
    SmuxSession,
    StreamEnded,
    StreamOpened,
    WindowUpdated,
    encode_frame,
)
from vtunnel.kcptun.snappy import STREAM_IDENTIFIER, SnappyReader, SnappyWriter

frames = st.one_of(
    st.builds(lambda sid, d: Frame(2, Command.PSH, sid, d), st.integers(0, 2**32 - 1), st.binary(max_size=300)),
    st.builds(lambda c, sid: Frame(2, c, sid), st.sampled_from([Command.SYN, Command.FIN, Command.NOP]), st.integers(0, 2**32 - 1)),
    st.builds(lambda sid, d: Frame(2, Command.UPD, sid, d), st.integers(0, 2**32 - 1), st.binary(min_size=8, max_size=8)),
)  # fmt: skip


@given(batch=st.lists(frames, max_size=20), cut=st.integers(1, 50))
def test_frames_round_trip_through_any_split(batch: list[Frame], cut: int) -> None:
    wire = b"".join(encode_frame(f.version, f.cmd, f.stream_id, f.data) for f in batch)
    parser = FrameParser(2)
    got: list[Frame] = []
    for i in range(0, len(wire), cut):
        got += parser.feed(wire[i : i + cut])
    assert got == batch


def test_header_layout() -> None:
    assert encode_frame(1, Command.PSH, 3, b"hi") == bytes([1, 2, 2, 0, 3, 0, 0, 0]) + b"hi"


@given(garbage=st.binary(max_size=200), version=st.sampled_from([1, 2]))
def test_parser_garbage_raises_only_protocol_errors(garbage: bytes, version: int) -> None:
    with contextlib.suppress(SmuxProtocolError):
        FrameParser(version).feed(garbage)


@pytest.mark.parametrize(
    "wire",
    [
        encode_frame(2, Command.PSH, 1),  # version 2 in a version 1 session
        bytes([1, 9, 0, 0, 1, 0, 0, 0]),  # unknown command
        encode_frame(1, Command.UPD, 1, bytes(8)),  # UPD is version 2 only
        encode_frame(1, Command.SYN, 1, b"x"),  # SYN with data
    ],
)
def test_protocol_faults(wire: bytes) -> None:
    with pytest.raises(SmuxProtocolError):
        FrameParser(1).feed(wire)


def exchange(a: SmuxSession, b: SmuxSession, now: float = 0.0) -> list[Event]:
    return b.receive_data(a.data_to_send(), now)


@pytest.mark.parametrize("version", [1, 2])
def test_open_send_fin(version: int) -> None:
    config = SmuxConfig(version=version)
    client, server = (
        SmuxSession(client=True, config=config, now=0),
        SmuxSession(client=False, config=config, now=0),
    )
    sid = client.open_stream()
    assert sid == 3
    assert client.send(sid, b"x" * 70000) == 70000
    client.end_stream(sid)
    events = exchange(client, server)
    assert events[0] == StreamOpened(stream_id=3)
    assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == b"x" * 70000
    assert events[-1] == StreamEnded(stream_id=3)
    with pytest.raises(SmuxError):
        client.send(sid, b"more")
    assert server.send(sid, b"back") == 4
    server.end_stream(sid)
    assert exchange(server, client) == [DataReceived(stream_id=3, data=b"back"), StreamEnded(stream_id=3)]
    assert client.streams() == server.streams() == []


def test_v2_window() -> None:
    config = SmuxConfig(version=2, max_stream_buffer=1 << 20)
    client, server = (
        SmuxSession(client=True, config=config, now=0),
        SmuxSession(client=False, config=config, now=0),
    )
    sid = client.open_stream()
    assert client.send(sid, bytes(INITIAL_PEER_WINDOW + 10)) == INITIAL_PEER_WINDOW
    assert client.send_window(sid) == 0
    exchange(client, server)
    server.acknowledge(sid, 100)  # the first read announces the real window at once
    assert exchange(server, client) == [WindowUpdated(stream_id=sid)]
    assert client.send_window(sid) == (1 << 20) - INITIAL_PEER_WINDOW + 100
    server.acknowledge(sid, 1000)  # less than half the buffer since the last update: nothing
    assert server.data_to_send() == b""


def test_v1_has_no_window() -> None:
    client = SmuxSession(client=True, config=SmuxConfig(version=1), now=0)
    sid = client.open_stream()
    assert client.send(sid, bytes(INITIAL_PEER_WINDOW * 2)) == INITIAL_PEER_WINDOW * 2


def test_keepalive_and_timeout() -> None:
    config = SmuxConfig(keepalive_interval=10, keepalive_timeout=30)
    session = SmuxSession(client=True, config=config, now=0)
    assert session.next_deadline() == 10
    assert session.handle_timer(10) == []
    assert session.data_to_send() == encode_frame(1, Command.NOP, 0)
    session.receive_data(encode_frame(1, Command.NOP, 0), 25)
    assert session.handle_timer(40) == []
    events = session.handle_timer(55)
    assert isinstance(events[0], SessionClosed)
    assert session.closed


@given(garbage=st.binary(max_size=300))
def test_session_never_raises_on_garbage(garbage: bytes) -> None:
    session = SmuxSession(client=False, config=SmuxConfig(version=2), now=0)
    events = session.receive_data(garbage, 0)
    if session.closed:
        assert isinstance(events[-1], SessionClosed)
        assert events[-1].error is not None


# --- snappy ------------------------------------------------------------------------------------------------


@given(chunks=st.lists(st.binary(max_size=3000), max_size=8), cut=st.integers(1, 4000))
def test_snappy_round_trip_through_any_split(chunks: list[bytes], cut: int) -> None:
    writer, reader = SnappyWriter(), SnappyReader()
    wire = b"".join(writer.compress(c) for c in chunks)
    got = b"".join(reader.feed(wire[i : i + cut]) for i in range(0, len(wire), cut))
    assert got == b"".join(chunks)


def test_snappy_large_writes_are_split_into_blocks() -> None:
    data = os.urandom(200_000)
    wire = SnappyWriter().compress(data)
    assert wire.startswith(STREAM_IDENTIFIER)
    assert SnappyReader().feed(wire) == data


@given(garbage=st.binary(max_size=300), with_header=st.booleans())
def test_snappy_garbage_raises_only_compression_error(garbage: bytes, with_header: bool) -> None:
    reader = SnappyReader()
    try:
        reader.feed((STREAM_IDENTIFIER if with_header else b"") + garbage)
    except CompressionError:
        with pytest.raises(CompressionError):
            reader.feed(b"")  # stays broken


def test_snappy_bad_checksum() -> None:
    wire = bytearray(SnappyWriter().compress(b"hello world" * 20))
    wire[len(STREAM_IDENTIFIER) + 4] ^= 1
    with pytest.raises(CompressionError):
        SnappyReader().feed(bytes(wire))
