"""LiteTlsSession after leaving: what the user writes is cut at TLS record boundaries, whatever the reads."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from vtunnel.protocol import Role
from vtunnel.protocol.lite_tls import LiteTlsSession, whole_records


def record(kind: int, body: bytes) -> bytes:
    return bytes((kind, 3, 3)) + len(body).to_bytes(2, "big") + body


records = st.lists(
    st.tuples(st.sampled_from([0x17, 0x17, 0x17, 0x15]), st.binary(max_size=2000)).map(lambda t: record(*t)),
    max_size=12,
)


def left_session() -> LiteTlsSession:
    session = LiteTlsSession(Role.SERVER)
    session._left = True  # (as after the marker exchange; the tracker then passes everything on)
    session.tracker._out.tracked = False
    session.tracker._in.tracked = False
    return session


def cuts(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=200, deadline=None)
@given(records, st.binary(max_size=40), st.lists(st.integers(0, 30000), max_size=10))
def test_every_byte_goes_once_in_order_and_passthrough_pieces_are_whole_application_records(
    parts: list[bytes], garbage: bytes, points: list[int]
) -> None:
    stream = b"".join(parts) + (b"\x47" + garbage if garbage else b"")
    session = left_session()
    sent: list[tuple[bytes, bool]] = []
    for piece in cuts(stream, points):
        sent += [(bytes(d), p) for d, p in session.from_local(piece).send]
    sent += [(bytes(d), p) for d, p in session.local_ended().send]
    assert b"".join(d for d, _ in sent) == stream
    for data, passthrough in sent:
        if passthrough:
            assert whole_records(data, len(data)) == len(data)
            pos = 0
            while pos < len(data):
                assert data[pos : pos + 3] == b"\x17\x03\x03"
                pos += 5 + int.from_bytes(data[pos + 3 : pos + 5], "big")
    # application-data records that arrived whole in one read before any garbage pass through
    if not garbage and len(points) == 0:
        assert sum(len(d) for d, p in sent if p) == sum(len(r) for r in parts if r[0] == 0x17)


def test_passthrough_before_leaving_is_a_violation_and_stripped_markers_give_their_credit_back() -> None:
    session = LiteTlsSession(Role.SERVER)
    step = session.from_peer(record(0x16, b"hello"), passthrough=False)
    assert step.deliver == [record(0x16, b"hello")]
    assert step.consumed == 0
    step = session.from_peer(record(0x17, b"early"), passthrough=True)
    assert step.violation is not None
    assert "before the stream left" in step.violation
    assert step.deliver == []
    assert session.broken
    # a broken session takes no more and asks for nothing but the credit of what it dropped
    later = session.from_peer(b"more", passthrough=False)
    assert later.consumed == 4
    assert later.deliver == []


def test_the_peers_notice_is_stripped_and_its_credit_returned() -> None:
    session = LiteTlsSession(Role.SERVER)
    notice = b"\xff\x03\x03\x00\x01\x00"
    step = session.from_peer(notice + b"plain bytes", passthrough=False)
    assert step.deliver == [b"plain bytes"]
    assert step.consumed == len(notice)
    assert step.fell_back is not None


def test_a_header_begun_goes_before_the_end_of_stream() -> None:
    """The user writes the start of something like a ClientHello and ends its side: those bytes go (the stream
    falls back) before the FIN, never stay behind it."""
    for first in (b"\x16", b"\x16\x03\x01", b"\x16\x03\x01\x00\x05"):
        session = LiteTlsSession(Role.CLIENT)
        assert session.from_local(first).send == []
        assert session.tracker.header_begun
        step = session.local_ended()
        assert [(bytes(d), p) for d, p in step.send] == [(b"\xff\x03\x03\x00\x01\x00" + first, False)]
        assert step.fell_back is not None
        assert "then the end of the stream" in step.fell_back.reason
        assert not session.tracker.header_begun
    assert LiteTlsSession(Role.CLIENT).local_ended().send == []


@settings(max_examples=100, deadline=None)
@given(records, st.binary(max_size=40), st.lists(st.integers(0, 30000), max_size=10))
def test_cut_sends_what_from_local_sends_after_leaving(
    parts: list[bytes], garbage: bytes, points: list[int]
) -> None:
    """The runtime's path after leaving (``cut``, no step) and ``from_local`` give the same pieces."""
    stream = b"".join(parts) + (b"\x47" + garbage if garbage else b"")
    by_step, by_cut = left_session(), left_session()
    for piece in cuts(stream, points):
        assert [(bytes(d), p) for d, p in by_cut.cut(piece)] == [
            (bytes(d), p) for d, p in by_step.from_local(piece).send
        ]
