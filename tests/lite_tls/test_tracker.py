"""The lite-tls tracker on its own: records from real TLS 1.2 and 1.3 connections (Python's ssl module),
split into reads anywhere; both roles of the marker exchange; markers split across reads; bad markers, garbage
after the marker and bytes that are not TLS."""

from __future__ import annotations

import itertools
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.lite_tls.tlsutil import record_flights, records
from vtunnel.protocol import Role
from vtunnel.protocol.lite_tls import (
    HOLD_LIMIT,
    MARKER,
    MAX_RECORD_LENGTH,
    NOTICE,
    DeliverToLocal,
    FellBack,
    LeftTunnel,
    LiteTlsEvent,
    LiteTlsRole,
    LiteTlsState,
    LiteTlsTracker,
    PeerViolation,
    SendToPeer,
    TrackerBrokenError,
    header_problem,
)

REQUEST = b"GET / HTTP/1.1\r\nHost: lite-tls.test\r\n\r\n"
RESPONSE = bytes(range(256)) * 200  # 51,200 bytes: several full records


@cache
def flights(version: str) -> tuple[tuple[str, bytes], ...]:
    return tuple(record_flights(version, REQUEST, RESPONSE))


def written(version: str, side: str) -> bytes:
    return b"".join(data for name, data in flights(version) if name == side)


def sent(events: list[LiteTlsEvent]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, SendToPeer))


def delivered(events: list[LiteTlsEvent]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DeliverToLocal))


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


APP_RECORD = b"\x17\x03\x03\x00\x05hello"


def test_recorded_handshakes_have_the_expected_record_types() -> None:
    """The recordings are real: TLS 1.3 shows its ChangeCipherSpec and its encrypted handshake typed 0x17."""
    first = {v: [r[0] for r in records(written(v, "server"))] for v in ("1.2", "1.3")}
    assert first["1.2"][:1] == [0x16]
    assert 0x14 in first["1.2"]
    assert first["1.2"][-1] == 0x17
    assert first["1.3"][:2] == [0x16, 0x14]
    assert first["1.3"][2] == 0x17
    for v in ("1.2", "1.3"):
        hello = flights(v)[0][1]
        assert flights(v)[0][0] == "client"
        assert LiteTlsTracker(Role.CLIENT).from_local(hello) == [SendToPeer(data=hello)]


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("side", [Role.CLIENT, Role.SERVER])
@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=40))
def test_any_chunking_of_a_peer_that_never_sends_a_marker_is_delivered_as_is(
    version: str, side: Role, cuts: list[int]
) -> None:
    """Records split across reads and many records per read; no marker: everything is delivered, in order, and
    the tracker stays in the tunnel."""
    stream = written(version, "server" if side is Role.CLIENT else "client")
    tracker = LiteTlsTracker(side)
    out: list[LiteTlsEvent] = []
    for chunk in chunks(stream, cuts):
        out += tracker.from_peer(chunk)
    assert delivered(out) == stream
    assert all(isinstance(e, DeliverToLocal) for e in out)
    assert tracker.state is LiteTlsState.TRACKING
    assert not tracker.left


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=40))
def test_any_chunking_of_the_local_side_is_sent_as_is_until_the_active_point(
    version: str, cuts: list[int]
) -> None:
    """A client tracker that has seen no application data from the peer passes every first-hand byte on."""
    stream = written(version, "client")
    tracker = LiteTlsTracker(Role.CLIENT)
    out: list[LiteTlsEvent] = []
    for chunk in chunks(stream, cuts):
        out += tracker.from_local(chunk)
    assert sent(out) == stream
    assert tracker.state is LiteTlsState.TRACKING


def drive_active_tls13(cuts: list[int]) -> tuple[LiteTlsTracker, list[LiteTlsEvent], bytes]:
    """TLS 1.3 at the agent: the server's flight (with its 0x17 handshake records) comes in, then the user's
    ChangeCipherSpec + Finished (0x17) + request go out in arbitrary reads."""
    fl = flights("1.3")
    tracker = LiteTlsTracker(Role.CLIENT)
    out = tracker.from_local(fl[0][1])
    assert sent(out) == fl[0][1]
    assert delivered(tracker.from_peer(fl[1][1])) == fl[1][1]
    rest = b"".join(data for name, data in fl[2:] if name == "client")
    out = []
    for chunk in chunks(rest, cuts):
        out += tracker.from_local(chunk)
    return tracker, out, rest


@settings(max_examples=80, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=20))
def test_the_active_side_sends_its_pending_records_and_the_marker_and_holds_its_first_application_data(
    cuts: list[int],
) -> None:
    tracker, out, rest = drive_active_tls13(cuts)
    ccs = records(rest)[0]
    assert ccs[0] == 0x14  # TLS 1.3's compatibility ChangeCipherSpec is the pending record
    assert sent(out) == ccs + MARKER
    assert isinstance(out[-1], SendToPeer)
    assert out[-1].data.endswith(MARKER)
    assert tracker.state is LiteTlsState.AWAITING_ANSWER
    assert tracker.role is LiteTlsRole.ACTIVE
    assert tracker.awaiting_answer
    assert tracker.held == len(rest) - len(ccs)
    assert tracker.from_local(b"more") == []
    assert tracker.held == len(rest) - len(ccs) + 4


@pytest.mark.parametrize("cut", range(len(MARKER) + 1))
def test_the_active_side_leaves_on_the_answer_even_split_across_reads(cut: int) -> None:
    tracker, _, rest = drive_active_tls13([])
    before = b"\x17\x03\x03\x00\x02hi"  # the peer's records ahead of its answer are delivered, protected
    first = tracker.from_peer(before + MARKER[:cut])
    assert first[0] == DeliverToLocal(data=before)
    if cut < len(MARKER):
        assert first == [DeliverToLocal(data=before)]
        assert tracker.state is LiteTlsState.AWAITING_ANSWER
    events = first + tracker.from_peer(MARKER[cut:] + b"\x17\x03\x03\x00\x01!")
    held = rest[len(records(rest)[0]) :]
    assert events == [
        DeliverToLocal(data=before),
        LeftTunnel(role=LiteTlsRole.ACTIVE),
        SendToPeer(data=held),  # passthrough: after LeftTunnel
        DeliverToLocal(data=b"\x17\x03\x03\x00\x01!"),
    ]
    assert tracker.left
    assert tracker.transparent
    assert tracker.held == 0
    assert tracker.from_local(b"x") == [SendToPeer(data=b"x")]
    assert tracker.from_peer(b"\xffanything") == [DeliverToLocal(data=b"\xffanything")]


def passive_server(version: str = "1.3") -> LiteTlsTracker:
    """A server tracker that has relayed the client's records and its target's whole handshake."""
    tracker = LiteTlsTracker(Role.SERVER)
    fl = flights(version)
    tracker.from_peer(fl[0][1])
    tracker.from_local(fl[1][1])
    return tracker


@settings(max_examples=100, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 10), max_size=12),
    version=st.sampled_from(["1.2", "1.3"]),
)
def test_the_passive_side_answers_holds_and_hands_over_with_the_first_application_data(
    cuts: list[int], version: str
) -> None:
    """Pending records + marker (split anywhere, the marker too), then the held 0x17 through passthrough: the
    passive side answers once, leaves, and gives its target the records that came with the marker and the whole
    first 0x17 at once."""
    tracker = passive_server(version)
    pending = b"\x14\x03\x03\x00\x01\x01"
    first_app = b"\x17\x03\x03\x00\x20" + bytes(range(32))
    stream = pending + MARKER + first_app + b"\x17\x03\x03\x00\x01z"
    out: list[LiteTlsEvent] = []
    for chunk in chunks(stream, cuts):
        out += tracker.from_peer(chunk)
    answer = out.index(SendToPeer(data=MARKER))
    assert out[answer + 1] == LeftTunnel(role=LiteTlsRole.PASSIVE)
    assert delivered(out) == pending + first_app + b"\x17\x03\x03\x00\x01z"
    # what came in the same read as the marker is held until the first 0x17 is whole, then handed over at once
    after = [e.data for e in out[answer:] if isinstance(e, DeliverToLocal)]
    assert (delivered(out[:answer]) + after[0]).startswith(pending + first_app)
    assert tracker.left
    assert tracker.role is LiteTlsRole.PASSIVE
    assert tracker.transparent


def test_the_passive_answer_waits_for_the_end_of_a_half_sent_local_record() -> None:
    """The marker may only go at a record boundary of our own direction: mid-record, the answer is deferred."""
    tracker = passive_server()
    record = b"\x17\x03\x03\x00\x0a" + b"0123456789"
    assert tracker.from_local(record[:8]) == [SendToPeer(data=record[:8])]
    assert tracker.from_peer(MARKER) == []
    assert tracker.state is LiteTlsState.ANSWERING
    out = tracker.from_local(record[8:] + b"\x17\x03")
    assert out == [
        SendToPeer(data=record[8:] + MARKER),
        LeftTunnel(role=LiteTlsRole.PASSIVE),
        SendToPeer(data=b"\x17\x03"),  # passthrough from here on
    ]
    assert tracker.from_local(b"\x03\x00") == [SendToPeer(data=b"\x03\x00")]


def test_a_half_gathered_local_header_goes_after_the_answer() -> None:
    tracker = passive_server()
    assert tracker.from_local(b"\x17\x03") == []  # a header is sent once it is whole
    out = tracker.from_peer(MARKER)
    assert out == [
        SendToPeer(data=MARKER),
        LeftTunnel(role=LiteTlsRole.PASSIVE),
        SendToPeer(data=b"\x17\x03"),
    ]


def test_both_ends_active_at_once_take_each_others_marker_as_the_answer() -> None:
    tracker, _, _rest = drive_active_tls13([])
    out = tracker.from_peer(MARKER)
    assert out[0] == LeftTunnel(role=LiteTlsRole.ACTIVE)
    assert tracker.left


@pytest.mark.parametrize(
    "bad",
    [
        b"\xff\x03\x03\x00\x01\x03",  # the payload byte: the origin never checked it
        b"\xff\x03\x01\x00\x01\x01",  # the version
        b"\xff\x02\x03\x00\x01\x01",
        b"\xff\x03\x03\x00\x02\x01",  # the length
        b"\xff\x03\x03\x01\x01\x01",
    ],
)
@pytest.mark.parametrize("cut", [1, 3, 5])
def test_every_byte_of_the_marker_is_checked(bad: bytes, cut: int) -> None:
    tracker = passive_server()
    first = tracker.from_peer(bad[:cut])
    assert first == []  # a control record is gathered whole before anything is decided
    out = tracker.from_peer(bad[cut:] + APP_RECORD)
    assert len(out) == 1
    assert isinstance(out[0], PeerViolation)
    assert tracker.state is LiteTlsState.BROKEN
    assert tracker.reason == out[0].reason
    with pytest.raises(TrackerBrokenError):
        tracker.from_peer(b"x")
    with pytest.raises(TrackerBrokenError):
        tracker.from_local(b"x")


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n",
        b"\x16\x03\x03\x00\x04abcd",
        b"\x17\x03\x07\x00\x01x",
        b"\xff\x03\x03\x00\x01\x01",
    ],
)
def test_garbage_after_the_marker_breaks_only_this_stream(garbage: bytes) -> None:
    """After the marker the passive side expects application data; anything else is never handed to its target
    (nor the records it held): the stream is reset."""
    tracker = passive_server()
    out = tracker.from_peer(b"\x14\x03\x03\x00\x01\x01" + MARKER)
    assert out == [SendToPeer(data=MARKER), LeftTunnel(role=LiteTlsRole.PASSIVE)]
    out = tracker.from_peer(garbage)
    assert len(out) == 1
    assert isinstance(out[0], PeerViolation)
    assert "after the marker" in out[0].reason
    assert tracker.held == 0


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (b"\x18\x03\x03\x00\x01x", "record type 0x18"),
        (b"\x13\x03\x03\x00\x01x", "record type 0x13"),
        (b"\xff\x03\x03\x00\x01\x01", "record type 0xff"),  # the user's bytes are exactly the marker
        (b"\x17\x04\x03\x00\x01x", "version 04 03"),
        (b"\x17\x03\x04\x00\x01x", "version 03 04"),
        (b"\x17\x03\x00\x00\x01x", "version 03 00"),
        (b"\x17\x03\x03\x48\x01x", "length 18433"),
    ],
)
@pytest.mark.parametrize("side", [Role.CLIENT, Role.SERVER])
def test_a_local_record_that_is_not_tls_falls_back_behind_the_notice(
    record: bytes, why: str, side: Role
) -> None:
    hello = flights("1.3")[0][1]
    local, peer = LiteTlsTracker(side), LiteTlsTracker(Role.SERVER if side is Role.CLIENT else Role.CLIENT)
    if side is Role.CLIENT:
        assert sent(local.from_local(hello)) == hello
        peer.from_peer(hello)
    else:
        local.from_peer(hello)
        assert delivered(peer.from_local(hello)) == b""
    out = local.from_local(APP_RECORD + record + b"tail")
    assert out[0] == SendToPeer(data=APP_RECORD + NOTICE + record + b"tail")
    assert isinstance(out[1], FellBack)
    assert why in out[1].reason
    assert not out[1].by_peer
    assert local.state is LiteTlsState.FALLBACK
    assert local.reason == out[1].reason
    assert local.from_local(MARKER) == [SendToPeer(data=MARKER)]  # never parsed again
    # the peer strips the notice, delivers every byte, falls back and sends its own notice at its next boundary
    got = peer.from_peer(out[0].data[:7]) + peer.from_peer(out[0].data[7:] + MARKER)
    assert delivered(got) == APP_RECORD + record + b"tail" + MARKER
    assert got[-3:-1] == [FellBack(reason="the peer fell back", by_peer=True), SendToPeer(data=NOTICE)] or (
        FellBack(reason="the peer fell back", by_peer=True) in got and SendToPeer(data=NOTICE) in got
    )
    assert local.from_peer(NOTICE + b"abc") == [DeliverToLocal(data=b"abc")]
    assert local.transparent
    assert peer.transparent


def test_the_agent_falls_back_when_the_first_record_is_not_a_client_hello() -> None:
    tracker = LiteTlsTracker(Role.CLIENT)
    out = tracker.from_local(b"\x16\x03\x03\x00\x01\x01")
    assert out[0] == SendToPeer(data=NOTICE + b"\x16\x03\x03\x00\x01\x01")
    assert isinstance(out[1], FellBack)
    assert "ClientHello" in out[1].reason
    tracker = LiteTlsTracker(Role.CLIENT)
    out = tracker.from_local(b"SSH-2.0-OpenSSH_9.6\r\n")
    assert out[0] == SendToPeer(data=NOTICE + b"SSH-2.0-OpenSSH_9.6\r\n")
    assert isinstance(out[1], FellBack)


def test_the_peer_falling_back_while_we_await_the_answer_releases_what_we_held_protected() -> None:
    tracker, _, rest = drive_active_tls13([])
    held = rest[len(records(rest)[0]) :]
    out = tracker.from_peer(APP_RECORD + NOTICE + b"not tls")
    assert out == [
        DeliverToLocal(data=APP_RECORD),
        FellBack(reason="the peer fell back", by_peer=True),
        SendToPeer(data=held),
        DeliverToLocal(data=b"not tls"),
    ]
    assert tracker.state is LiteTlsState.FALLBACK
    assert tracker.transparent
    assert tracker.from_local(b"x") == [SendToPeer(data=b"x")]


def test_a_fallen_back_end_drops_a_marker_sent_before_the_peer_saw_its_notice() -> None:
    tracker = passive_server()
    out = tracker.from_local(b"\x99 not tls")
    assert out[0] == SendToPeer(data=NOTICE + b"\x99 not tls")
    out = tracker.from_peer(b"\x14\x03\x03\x00\x01\x01" + MARKER + APP_RECORD)
    assert out == [DeliverToLocal(data=b"\x14\x03\x03\x00\x01\x01"), DeliverToLocal(data=APP_RECORD)]
    assert tracker.state is LiteTlsState.FALLBACK
    assert tracker.transparent


@pytest.mark.parametrize("record", [b"\x18\x03\x03\x00\x01x", b"\x17\x03\x03\x48\x01"])
def test_a_peer_passing_on_what_is_not_tls_without_the_notice_is_a_violation(record: bytes) -> None:
    tracker = passive_server()
    out = tracker.from_peer(APP_RECORD + record)
    assert out[0] == DeliverToLocal(data=APP_RECORD) or isinstance(out[0], PeerViolation)
    assert isinstance(out[-1], PeerViolation)
    assert "without the notice" in out[-1].reason
    assert out[:-1] in ([], [DeliverToLocal(data=APP_RECORD)])


def test_the_agent_tracker_takes_a_clienthello_record_and_nothing_else_first() -> None:
    """The agent's user must begin with a ClientHello record (16 03 01, handshake type 1), judged byte by byte:
    anything else falls back at the first byte that rules it out, with the notice before it."""
    hello = flights("1.2")[0][1]
    tracker = LiteTlsTracker(Role.CLIENT)
    assert tracker.from_local(hello[:5]) == []  # a header alone: the handshake type is not known yet
    assert tracker.header_begun
    assert tracker.from_local(hello[5:]) == [SendToPeer(data=hello)]
    assert not tracker.header_begun
    for first, reason in [
        (b"\x16\x03\x03" + hello[3:], "not a ClientHello record"),
        (hello[:5] + b"\x02" + hello[6:], "handshake type 2"),
        (b"\x16\x03\x01\x00\x00" + hello, "empty"),
        (b"GET / HTTP/1.1\r\n\r\n", "0x47"),
        (b"\x17\x03\x03\x00\x01x", "not a ClientHello record"),
    ]:
        tracker = LiteTlsTracker(Role.CLIENT)
        out = tracker.from_local(first)
        assert out[0] == SendToPeer(data=NOTICE + first)
        assert isinstance(out[1], FellBack)
        assert reason in out[1].reason
        assert tracker.state is LiteTlsState.FALLBACK


@pytest.mark.parametrize("first", [b"SSH-2.0-OpenSSH_9.6\r\n", b"\x16\x03\x03\x00\x04abcd", APP_RECORD])
def test_a_server_that_speaks_first_falls_back_at_once(first: bytes) -> None:
    """At the server end, bytes from the target before the client sent a record header are a protocol where
    the server speaks first (SSH, SMTP): the stream is plain for good, even when those bytes look like TLS."""
    tracker = LiteTlsTracker(Role.SERVER)
    out = tracker.from_local(first)
    assert out == [
        SendToPeer(data=NOTICE + first),
        FellBack(reason="the server spoke first", by_peer=False),
    ]
    assert not tracker.header_begun
    # the agent answers with its own notice, and both directions are unparsed from then on
    agent = LiteTlsTracker(Role.CLIENT)
    got = agent.from_peer(NOTICE + first)
    assert got[0] == DeliverToLocal(data=first) or got[-1] == DeliverToLocal(data=first)
    assert SendToPeer(data=NOTICE) in got
    assert tracker.from_peer(NOTICE + b"hello") == [DeliverToLocal(data=b"hello")]
    assert tracker.transparent
    assert agent.transparent


def test_header_problem() -> None:
    for kind in (0x14, 0x15, 0x16, 0x17):
        for minor in (1, 2, 3):
            assert header_problem(bytes([kind, 3, minor]) + MAX_RECORD_LENGTH.to_bytes(2, "big")) is None
    assert header_problem(b"\x17\x03\x03" + (MAX_RECORD_LENGTH + 1).to_bytes(2, "big")) is not None


def test_empty_input_changes_nothing() -> None:
    tracker = LiteTlsTracker(Role.SERVER)
    assert tracker.from_local(b"") == []
    assert tracker.from_peer(b"") == []
    assert tracker.state is LiteTlsState.TRACKING
    assert "tracking" in repr(tracker)


def test_a_header_begun_and_never_finished_falls_back_when_the_local_side_goes_quiet() -> None:
    tracker = passive_server()
    assert tracker.from_local(b"\x17\x03") == []  # could still be a TLS record
    assert tracker.local_stalled() == [
        SendToPeer(data=NOTICE + b"\x17\x03"),
        FellBack(reason="2 bytes of a record header, then nothing", by_peer=False),
    ]
    assert tracker.local_stalled() == []
    assert tracker.from_local(b"\x03") == [SendToPeer(data=b"\x03")]


def test_a_passive_end_holds_at_most_hold_limit_bytes() -> None:
    """What came with the marker and the start of the first application-data record after it are held; more
    than HOLD_LIMIT of them is a violation (nothing held reaches the endpoint), and up to it is not."""
    handshake = b"\x16\x03\x03\x40\x00" + b"h" * 0x4000
    count = HOLD_LIMIT // len(handshake) + 1
    tracker = passive_server()
    out = tracker.from_peer(handshake * count + MARKER)
    assert len(out) == 1
    assert isinstance(out[0], PeerViolation)
    assert "held before the first application data" in out[0].reason
    assert tracker.state is LiteTlsState.BROKEN
    assert not tracker.holding

    tracker = passive_server()
    fits = HOLD_LIMIT // len(handshake)
    out = tracker.from_peer(handshake * fits + MARKER + APP_RECORD[:7])
    assert out == [SendToPeer(data=MARKER), LeftTunnel(role=LiteTlsRole.PASSIVE)]
    assert tracker.holding
    out = tracker.from_peer(APP_RECORD[7:])
    assert out == [DeliverToLocal(data=handshake * fits + APP_RECORD)]
    assert not tracker.holding


def test_the_passive_hold_counts_the_bytes_after_the_marker_too() -> None:
    """A peer that passes many partial bytes after its marker without finishing the first record cannot make the
    passive end hold more than HOLD_LIMIT: the first record is at most 2^14 + 2048 bytes long, so the bytes held
    are the handshake records that came with the marker plus at most one record."""
    handshake = b"\x16\x03\x03\x40\x00" + b"h" * 0x4000
    tracker = passive_server()
    fits = HOLD_LIMIT // len(handshake)
    tracker.from_peer(handshake * fits + MARKER)
    big = b"\x17\x03\x03" + MAX_RECORD_LENGTH.to_bytes(2, "big")
    out = tracker.from_peer(big + b"x" * (MAX_RECORD_LENGTH - 1))
    assert len(out) == 1
    assert isinstance(out[0], PeerViolation)
    assert tracker.held == 0
