"""kcp-go's FEC (``--peer kcptun``, and ``kcp://`` with ``fec``): klauspost/reedsolomon's matrix, rebuilding any lost
data packets up to the parity count."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtunnel.arq.fec import (
    FEC_OVERHEAD,
    TYPE_DATA,
    TYPE_PARITY,
    FECDecoder,
    FECEncoder,
    FECError,
    is_fec_packet,
    parse_fec_packet,
)
from vtunnel.arq.reedsolomon import ReedSolomon, _invert


def test_matrix_inverse_matches_klauspost_vector() -> None:
    # a published test vector of klauspost/reedsolomon's matrix inversion
    assert _invert([[56, 23, 98], [3, 100, 200], [45, 201, 123]]) == [
        [175, 133, 33],
        [130, 13, 245],
        [112, 35, 126],
    ]


def test_encoding_matrix_is_systematic() -> None:
    m = ReedSolomon(10, 3).matrix
    assert [list(row) for row in m[:10]] == [[int(i == j) for j in range(10)] for i in range(10)]
    assert m[10] == (129, 150, 175, 184, 210, 196, 254, 232, 3, 2)


def test_bad_shard_counts() -> None:
    for ds, ps in ((0, 3), (10, 0), (200, 57)):
        with pytest.raises(FECError):
            ReedSolomon(ds, ps)
        with pytest.raises(FECError):
            FECEncoder(ds, ps)


@settings(max_examples=60, deadline=None)
@given(
    shards=st.tuples(st.integers(1, 12), st.integers(1, 5)),
    size=st.integers(1, 64),
    data=st.data(),
)
def test_reed_solomon_rebuilds_any_erasures_up_to_parity(
    shards: tuple[int, int], size: int, data: st.DataObject
) -> None:
    ds, ps = shards
    rs = ReedSolomon(ds, ps)
    original = [data.draw(st.binary(min_size=size, max_size=size)) for _ in range(ds)]
    full = original + rs.encode(original)
    lost = data.draw(st.sets(st.integers(0, ds + ps - 1), max_size=ps))
    assert rs.reconstruct_data([None if i in lost else s for i, s in enumerate(full)]) == original


@settings(max_examples=40, deadline=None)
@given(
    datagrams=st.lists(st.binary(min_size=24, max_size=200), min_size=10, max_size=40),
    data=st.data(),
)
def test_decoder_recovers_every_datagram_with_at_most_parity_losses_per_group(
    datagrams: list[bytes], data: st.DataObject
) -> None:
    encoder, decoder = FECEncoder(4, 2), FECDecoder(4, 2)
    packets = [p for d in datagrams for p in encoder.encode(d)]
    complete = len(datagrams) // 4 * 6
    lost: set[int] = set()
    for begin in range(0, complete, 6):
        lost |= {begin + i for i in data.draw(st.sets(st.integers(0, 5), max_size=2))}
    out = []
    for i, packet in enumerate(packets):
        assert is_fec_packet(packet)
        if i not in lost:
            out += decoder.decode(parse_fec_packet(packet))
    expected = datagrams[: len(datagrams) // 4 * 4]
    for d in expected:
        assert d in out


def test_packet_layout() -> None:
    encoder = FECEncoder(2, 1)
    first = encoder.encode(b"a" * 30)
    second = encoder.encode(b"b" * 40)
    assert len(first) == 1
    assert len(second) == 2
    data = parse_fec_packet(first[0])
    assert (data.seqid, data.flag, data.body[:2]) == (0, TYPE_DATA, (32).to_bytes(2, "little"))
    parity = parse_fec_packet(second[1])
    assert (parity.seqid, parity.flag, len(parity.body)) == (2, TYPE_PARITY, 42)
    assert len(second[0]) == 40 + FEC_OVERHEAD


def test_duplicates_and_late_packets_add_nothing() -> None:
    encoder, decoder = FECEncoder(2, 1), FECDecoder(2, 1)
    packets = encoder.encode(b"x" * 30) + encoder.encode(b"y" * 30)
    assert decoder.decode(parse_fec_packet(packets[0])) == [b"x" * 30]
    assert decoder.decode(parse_fec_packet(packets[2])) == [b"y" * 30]  # rebuilt
    assert decoder.decode(parse_fec_packet(packets[1])) == [b"y" * 30]  # late: only its own datagram
    assert decoder.recovered == 1


@given(garbage=st.binary(max_size=100))
def test_garbage_raises_only_fec_error(garbage: bytes) -> None:
    decoder = FECDecoder(3, 2)
    with contextlib.suppress(FECError):
        decoder.decode(parse_fec_packet(garbage))


@given(packets=st.lists(st.tuples(st.integers(0, 40), st.booleans(), st.binary(min_size=2, max_size=50))))
def test_decoder_never_fails_on_inconsistent_packets(packets: list[tuple[int, bool, bytes]]) -> None:
    decoder = FECDecoder(3, 2)
    for seqid, is_data, body in packets:
        flag = TYPE_DATA if is_data else TYPE_PARITY
        decoder.decode(parse_fec_packet(seqid.to_bytes(4, "little") + flag.to_bytes(2, "little") + body))


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(26, 60),
    shards=st.sampled_from([(10, 3), (4, 2), (1, 1), (20, 5)]),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_any_loss_pattern_within_the_parity_budget_loses_no_datagram(
    count: int, shards: tuple[int, int], seed: int, data: st.DataObject
) -> None:
    """Any pattern of losses, at most ``P`` packets of each group of ``D + P``, data or parity alike, in any order
    of arrival within a group, with copies: every datagram of a complete group comes out, and nothing else."""
    ds, ps = shards
    rng = random.Random(seed)
    datagrams = [rng.randbytes(rng.randint(24, 1342)) for _ in range(count)]
    encoder, decoder = FECEncoder(ds, ps), FECDecoder(ds, ps)
    packets = [packet for datagram in datagrams for packet in encoder.encode(datagram)]
    total = ds + ps
    arriving: list[bytes] = []
    for begin in range(0, len(packets), total):
        group = packets[begin : begin + total]
        budget = ps if len(group) == total else 0
        lost = data.draw(st.sets(st.integers(0, len(group) - 1), max_size=budget), label="lost")
        kept = [packet for i, packet in enumerate(group) if i not in lost]
        kept += rng.choices(kept, k=rng.randint(0, 2)) if kept else []  # copies
        rng.shuffle(kept)  # reordered within the group
        arriving += kept
    out: list[bytes] = []
    for packet in arriving:
        out += decoder.decode(parse_fec_packet(packet))
    complete = len(datagrams) // ds * ds
    assert set(datagrams[:complete]) <= set(out)
    assert set(out) <= set(datagrams)
    assert decoder.misplaced == 0


@pytest.mark.parametrize(("sent", "expected"), [((10, 3), (4, 2)), ((10, 4), (10, 3)), ((4, 2), (10, 3))])
def test_a_peer_with_other_shard_counts_is_noticed(sent: tuple[int, int], expected: tuple[int, int]) -> None:
    """Packets out of place for the receiver's layout are counted, and the data packets still come out."""
    encoder, decoder = FECEncoder(*sent), FECDecoder(*expected)
    datagrams = [bytes([i]) * 40 for i in range(60)]
    out: list[bytes] = []
    for datagram in datagrams:
        for packet in encoder.encode(datagram):
            out += decoder.decode(parse_fec_packet(packet))
    assert decoder.misplaced > 0
    assert set(datagrams) <= set(out)
