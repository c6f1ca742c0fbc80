"""ClearRunTracker against a real ikcp pair: any frame stream, any chunking of the writes, any losses (so
retransmissions), and every outgoing datagram's runs are exactly the passthrough body bytes it carries."""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from vtunnel.arq.clear_runs import ClearRunTracker
from vtunnel.arq.kcp_engine import KCPEngine
from vtunnel.arq.kcp_options import KCPOptions
from vtunnel.protocol.frames import PASSTHROUGH

_SEGMENT = struct.Struct("<IBBHIIII")
MIN_RUN = 64


@st.composite
def frame_streams(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int]]]:
    """A stream of tunnel frames and the [start, end) of each passthrough body in it."""
    rnd = random.Random(draw(st.integers(0, 2**32)))
    out = bytearray()
    bodies: list[tuple[int, int]] = []
    for _ in range(draw(st.integers(1, 40))):
        kind = draw(st.sampled_from(["pt", "pt", "data", "control"]))
        if kind == "pt":
            body = draw(st.integers(0, 3000))
            payload = b"\x17\x03\x03" + body.to_bytes(2, "big") + rnd.randbytes(body)
            flags, ftype = PASSTHROUGH, 0
        elif kind == "data":
            payload = rnd.randbytes(draw(st.integers(0, 3000)))
            flags, ftype = 0, 0
        else:
            payload = rnd.randbytes(draw(st.integers(0, 40)))
            flags, ftype = 0, 8
        start = len(out) + 9
        out += struct.pack(">IBI", (len(payload) << 8) | ftype, flags, rnd.randrange(1, 100)) + payload
        if kind == "pt" and len(payload) - 5 >= MIN_RUN:
            bodies.append((start + 5, start + len(payload)))
    return bytes(out), bodies


def expected_runs(
    datagram: bytes, stream: bytes, offsets: dict[int, int], next_sn: list[int], bodies: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """What the runs must be, from the stream itself: each segment's data is found at its offset."""
    runs: list[tuple[int, int]] = []
    pos = 0
    while pos + 24 <= len(datagram):
        _conv, cmd, _frg, _wnd, _ts, sn, _una, length = _SEGMENT.unpack_from(datagram, pos)
        at = pos + 24
        pos = at + length
        if cmd != 81 or not length:
            continue
        if sn == next_sn[0]:
            offsets[sn] = next_sn[1]
            next_sn[0] += 1
            next_sn[1] += length
        offset = offsets[sn]
        assert datagram[at : at + length] == stream[offset : offset + length]  # ikcp's order, as assumed
        for start, end in bodies:
            lo, hi = max(start, offset), min(end, offset + length)
            if hi - lo >= MIN_RUN:
                runs.append((at + lo - offset, hi - lo))
    return runs


@settings(max_examples=60)
@given(frame_streams(), st.integers(0, 2**32), st.floats(0.0, 0.3))
def test_runs_are_exactly_the_passthrough_body_bytes(
    frames: tuple[bytes, list[tuple[int, int]]], seed: int, loss: float
) -> None:
    stream, bodies = frames
    rnd = random.Random(seed)
    options = KCPOptions(sndwnd=128, rcvwnd=128, pacing=False)
    now = 1000.0
    a = KCPEngine(conv=7, options=options, mtu=1300, now=now)
    b = KCPEngine(conv=7, options=options, mtu=1300, now=now)
    tracker = ClearRunTracker(window=options.sndwnd, max_runs=1000)
    offsets: dict[int, int] = {}
    next_sn = [0, 0]
    pos = 0
    received = bytearray()
    checked = 0
    for _ in range(2000):
        if pos < len(stream) and a.writable():
            n = rnd.randint(1, 5000)
            chunk = stream[pos : pos + n]
            tracker.sent(chunk)
            a.send(chunk)
            pos += len(chunk)
        now += rnd.choice([0.001, 0.01, 0.05])
        a.handle_timer(now)
        a.flush(now)
        for datagram in a.datagrams_to_send():
            assert tracker.runs(datagram) == expected_runs(datagram, stream, offsets, next_sn, bodies)
            checked += 1
            if rnd.random() >= loss:
                b.receive_datagram(datagram, now)
        b.flush(now)
        while b.readable():
            received += b.receive(1 << 20)
        for ack in b.datagrams_to_send():
            if rnd.random() >= loss:
                a.receive_datagram(ack, now)
        if pos == len(stream) and len(received) == len(stream):
            break
    assert bytes(received) == stream
    assert not tracker.broken
    assert checked


def test_a_frame_header_cut_across_writes_is_followed() -> None:
    body = bytes(range(200))
    payload = b"\x17\x03\x03" + len(body).to_bytes(2, "big") + body
    frame = struct.pack(">IBI", (len(payload) << 8) | 0, PASSTHROUGH, 3) + payload
    stream = b"\x00\x00\x02\x08\x00\x00\x00\x00\x01ab" + frame * 3
    for cut in range(1, 40):
        tracker = ClearRunTracker(window=16, max_runs=10)
        for i in range(0, len(stream), cut):
            tracker.sent(stream[i : i + cut])
        # one segment holding the whole stream: three runs, the bodies
        segment = _SEGMENT.pack(1, 81, 0, 32, 0, 0, 0, len(stream)) + stream
        runs = tracker.runs(segment)
        assert [segment[o : o + n] for o, n in runs] == [body] * 3


def test_short_runs_stay_sealed_and_only_the_longest_go_clear() -> None:
    def pt(size: int) -> bytes:
        payload = b"\x17\x03\x03" + size.to_bytes(2, "big") + bytes(size)
        return struct.pack(">IBI", len(payload) << 8, PASSTHROUGH, 1) + payload

    stream = pt(63) + pt(64) + pt(100) + pt(80)
    tracker = ClearRunTracker(window=4)
    tracker.sent(stream)
    segment = _SEGMENT.pack(1, 81, 0, 32, 0, 0, 0, len(stream)) + stream
    runs = tracker.runs(segment)
    assert [n for _, n in runs] == [100, 80]  # the two longest, in datagram order; 63 never counted


def test_a_segment_out_of_order_turns_the_tracker_off() -> None:
    tracker = ClearRunTracker(window=4)
    stream = struct.pack(">IBI", 205 << 8, PASSTHROUGH, 1) + b"\x17\x03\x03\x00\xc8" + bytes(200)
    tracker.sent(stream)
    later = _SEGMENT.pack(1, 81, 0, 32, 0, 5, 0, 100) + bytes(100)
    assert tracker.runs(later) == []
    assert tracker.broken
    first = _SEGMENT.pack(1, 81, 0, 32, 0, 0, 0, len(stream)) + stream
    assert tracker.runs(first) == []


def test_a_fixed_table_pads_with_empty_runs_at_the_end() -> None:
    body = bytes(300)
    payload = b"\x17\x03\x03" + len(body).to_bytes(2, "big") + body
    stream = struct.pack(">IBI", len(payload) << 8, PASSTHROUGH, 1) + payload
    tracker = ClearRunTracker(window=4, fixed_table=True)
    tracker.sent(stream)
    segment = _SEGMENT.pack(1, 81, 0, 32, 0, 0, 0, len(stream)) + stream
    assert tracker.runs(segment) == [(24 + 14, 300), (len(segment), 0)]
    ack = _SEGMENT.pack(1, 82, 0, 32, 0, 0, 0, 0)
    assert tracker.runs(ack) == []  # no runs, no table
