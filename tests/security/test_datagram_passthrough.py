"""DATA-PT datagrams (sealed datagram v4): clear runs of lite-tls passthrough bodies after the tag.

Round trips at any run layout, the documented layout, a flipped bit in the sealed part, the table or the trailer
fails like a bad tag, a flipped bit in a run arrives as it is, and whatever arrives on the wire (a fuzz of
mutated and random DATA-PT datagrams) never raises and never opens into anything but a payload the sender made
or that payload with only its run bytes changed.
"""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from vtunnel.security.datagram import (
    CID_LEN,
    DATAGRAM_OVERHEAD,
    DATAGRAM_PROLOGUE,
    HEADER_KEY_LABEL,
    PT_OVERHEAD,
    RUN_ENTRY,
    DatagramClient,
    DatagramServer,
    DatagramSession,
    DatagramType,
)
from vtunnel.security.errors import SecurityError
from vtunnel.security.replay import ReplayCache

PSK = bytes(range(32))
NOW = 1_700_000_000.0
SRC = ("127.0.0.1", 40000)


def established() -> tuple[DatagramClient, DatagramSession]:
    c = DatagramClient(PSK, now=NOW)
    got = DatagramServer(PSK, replay=ReplayCache()).accept(c.initial_datagram(), SRC, NOW)
    assert got is not None
    session, reply = got
    assert c.receive(reply, NOW) is None
    assert c.established
    return c, session


def client_session(c: DatagramClient) -> DatagramSession:
    session = c.session
    assert session is not None
    return session


@st.composite
def payload_and_runs(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int]]]:
    payload = draw(st.binary(min_size=0, max_size=1400))
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=12, unique=True)))
    runs: list[tuple[int, int]] = []
    # consecutive pairs of cut points are runs (some dropped): ordered, apart or touching, some empty
    for start, end in zip(cuts[::2], cuts[1::2], strict=False):
        if draw(st.booleans()):
            runs.append((start, end - start))
    return payload, runs


def test_the_prologue_is_v4() -> None:
    assert DATAGRAM_PROLOGUE == b"vtunnel datagram v4"


@given(st.lists(payload_and_runs(), min_size=1, max_size=6))
def test_round_trip_at_any_run_layout(batch: list[tuple[bytes, list[tuple[int, int]]]]) -> None:
    c, server_session = established()
    payloads = [p for p, _ in batch]
    runs = [r for _, r in batch]
    sealed = client_session(c).seal_many(payloads, runs)
    for datagram, (payload, clear) in zip(sealed, batch, strict=True):
        extra = PT_OVERHEAD + RUN_ENTRY * len(clear) if clear else 0
        assert len(datagram) == len(payload) + DATAGRAM_OVERHEAD + extra
        # the runs are in the clear, in order, right before the 2-byte trailer
        if clear:
            tail = b"".join(payload[o : o + n] for o, n in clear)
            assert datagram[len(datagram) - 2 - len(tail) : -2] == tail
    assert server_session.open_many(sealed) == payloads
    # and the other way, one at a time
    for payload, clear in batch:
        d = server_session.seal_many([payload], [clear])[0]
        assert c.receive(d, NOW) == payload


def test_the_layout_is_as_documented() -> None:
    c, server_session = established()
    payload = bytes(range(200))
    d = client_session(c).seal_many([payload], [[(10, 70), (100, 64)]])[0]
    keys = c._hs.keys
    assert keys is not None
    key = keys.derive(HEADER_KEY_LABEL)[0]
    mask = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(d[13:29])
    kind, _counter = struct.unpack(">BI", bytes(a ^ b for a, b in zip(d[8:13], mask, strict=False)))
    assert d[:CID_LEN] == c.connection_id
    assert kind == 0x05
    assert DatagramType.DATA_PT.value == kind
    (clear_len,) = struct.unpack(">H", bytes(a ^ b for a, b in zip(d[-2:], mask[5:7], strict=True)))
    assert clear_len == 134
    assert d[-2 - 134 : -2] == payload[10:80] + payload[100:164]
    # sealed part: count 1 + table 8 + the 66 bytes left, then the tag
    assert len(d) == 13 + (1 + 8 + 66) + 16 + 134 + 2
    assert server_session.open(d) == payload


def test_empty_runs_pad_a_table_to_a_fixed_size() -> None:
    c, server_session = established()
    payload = bytes(range(200))
    one = client_session(c).seal_many([payload], [[(10, 100), (200, 0)]])[0]
    two = client_session(c).seal_many([payload], [[(10, 50), (100, 60)]])[0]
    assert len(one) == len(two) == len(payload) + DATAGRAM_OVERHEAD + PT_OVERHEAD + 2 * RUN_ENTRY
    assert server_session.open_many([one, two]) == [payload, payload]


@given(st.binary(min_size=1, max_size=1400), st.data())
def test_one_run_and_a_padding_entry_round_trips(payload: bytes, data: st.DataObject) -> None:
    c, server_session = established()
    offset = data.draw(st.integers(0, len(payload)))
    length = data.draw(st.integers(0, len(payload) - offset))
    d = client_session(c).seal_many([payload], [[(offset, length), (len(payload), 0)]])[0]
    assert server_session.open(d) == payload


def test_a_payload_without_runs_is_an_ordinary_data_datagram() -> None:
    c, server_session = established()
    plain, pt = client_session(c).seal_many([b"abc" * 30, b"x" * 100], [(), [(0, 100)]])
    assert len(plain) == 90 + DATAGRAM_OVERHEAD
    assert server_session.open_many([plain, pt]) == [b"abc" * 30, b"x" * 100]


@pytest.mark.parametrize(
    "runs",
    [
        [(0, 10), (5, 10)],  # overlapping
        [(20, 5), (0, 5)],  # not ordered
        [(95, 10)],  # leaves the payload
        [(0, 1)] * 256,  # more than a table holds
    ],
)
def test_bad_runs_are_refused_when_sealing(runs: list[tuple[int, int]]) -> None:
    c, _ = established()
    with pytest.raises(SecurityError):
        client_session(c).seal_many([bytes(100)], [runs])


def test_a_flipped_bit_in_the_sealed_part_table_or_trailer_fails_like_a_bad_tag() -> None:
    c, server_session = established()
    payload = bytes(range(256)) * 2
    runs = [(30, 200), (300, 100)]
    clear_len = 300
    # every bit outside the runs: header, sealed part (table included), tag, trailer
    template = client_session(c).seal_many([payload], [runs])[0]
    size = len(template)
    outside = [i for i in range(CID_LEN, size) if not size - 2 - clear_len <= i < size - 2]
    for i in outside:
        for bit in (0, 7):
            d = client_session(c).seal_many([payload], [runs])[0]
            assert server_session.open(d[:i] + bytes((d[i] ^ (1 << bit),)) + d[i + 1 :]) is None, i
            assert server_session.open(d) == payload  # the genuine one still opens after the forgery


def test_a_flipped_bit_in_a_run_arrives_as_it_is() -> None:
    c, server_session = established()
    payload = bytes(range(256))
    d = bytearray(client_session(c).seal_many([payload], [[(16, 100)]])[0])
    at = len(d) - 2 - 100 + 42  # byte 42 of the run, payload offset 58
    d[at] ^= 0x20
    want = bytearray(payload)
    want[58] ^= 0x20
    assert server_session.open(bytes(d)) == bytes(want)


def test_a_truncated_or_extended_datagram_is_dropped() -> None:
    c, server_session = established()
    d = client_session(c).seal_many([bytes(300)], [[(100, 100)]])[0]
    for cut in (1, 2, 3, 50, 101, 102):
        assert server_session.open(d[:-cut]) is None
    assert server_session.open(d + b"\x00") is None
    assert server_session.open(d[:120] + d[121:]) is None


def _forged_tables(session: DatagramSession, payload: bytes) -> list[bytes]:
    """DATA-PT datagrams sealed with the session's own keys (what only a key holder can make) whose run tables
    break the rules: each must be dropped like a forgery."""
    from vtunnel.security import datagram as dg

    out = []
    bad_tables = [
        [(10, 20), (15, 20)],  # overlap
        [(40, 5), (10, 5)],  # disorder
        [(len(payload) + 1, 5)],  # outside: the datagram is len(payload) + 5 bytes long
    ]
    for table in bad_tables:
        clear_total = sum(n for _, n in table)
        sealed_plain = bytes((len(table),)) + b"".join(struct.pack(">HH", o, n) for o, n in table) + payload
        n = session._send_counter
        session._send_counter += 1
        header = dg._HEADER.pack(session.connection_id, dg._PT_KIND, n & 0xFFFFFFFF)
        body = session._encrypt(session._nonce(n), sealed_plain, header + struct.pack(">H", clear_total))
        masks = session._send_mask(body[:16])
        kind_mask, low_mask = dg._MASK.unpack_from(masks)
        (clear_mask,) = dg._CLEAR_MASK.unpack_from(masks)
        wire = dg._HEADER.pack(session.connection_id, dg._PT_KIND ^ kind_mask, (n & 0xFFFFFFFF) ^ low_mask)
        out.append(wire + body + bytes(clear_total) + struct.pack(">H", clear_total ^ clear_mask))
    return out


def test_runs_that_overlap_disorder_or_leave_the_datagram_are_dropped_like_forgeries() -> None:
    c, server_session = established()
    for d in _forged_tables(client_session(c), bytes(64)):
        assert server_session.open(d) is None
    # the session goes on
    assert server_session.open(client_session(c).seal_many([bytes(80)], [[(0, 80)]])[0]) == bytes(80)


@given(
    st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    ),
    st.binary(max_size=64),
    st.integers(0, 200),
)
def test_fuzz_open_never_raises_and_never_makes_up_a_payload(
    flips: list[tuple[int, int]], junk: bytes, cut: int
) -> None:
    c, server_session = established()
    payload = bytes(range(256)) + bytes(300)
    runs = [(20, 150), (200, 250)]
    d = bytearray(client_session(c).seal_many([payload], [runs])[0])
    for at, value in flips:
        d[at % len(d)] ^= value
    for candidate in (bytes(d), bytes(d[: len(d) - cut]) + junk):
        got = server_session.open(candidate)
        if got is None:
            continue
        # it opened: only run bytes may differ from what was sent
        assert isinstance(got, bytes)
        assert len(got) == len(payload)
        run_bytes = {i for o, n in runs for i in range(o, o + n)}
        assert all(got[i] == payload[i] for i in range(len(payload)) if i not in run_bytes)


@given(st.binary(min_size=0, max_size=400))
def test_fuzz_random_datagrams_under_the_session_id_never_open(data: bytes) -> None:
    c, server_session = established()
    assert server_session.open(c.connection_id + data) is None
