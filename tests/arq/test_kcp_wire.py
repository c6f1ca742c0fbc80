"""Vetting of KCP datagrams before ikcp sees them."""

from __future__ import annotations

import struct

from hypothesis import event, given, settings
from hypothesis import strategies as st

from vtunnel.arq.kcp_wire import (
    HEADER_LEN,
    Command,
    RunVerdict,
    first_header,
    is_new_session,
    valid_datagram,
    vet_run,
)


def segment(
    conv: int,
    cmd: int = Command.PUSH,
    sn: int = 0,
    una: int = 0,
    data: bytes = b"",
    length: int | None = None,
) -> bytes:
    n = len(data) if length is None else length
    return struct.pack("<IBBHIIII", conv, cmd, 0, 128, 0, sn, una, n) + data


def test_single_and_packed_segments_are_valid() -> None:
    assert valid_datagram(segment(7, data=b"hello"), 7)
    packed = segment(7, Command.ACK, sn=3) + segment(7, data=b"abc", sn=4) + segment(7, Command.WINS)
    assert valid_datagram(packed, 7)
    header = first_header(packed)
    assert header is not None
    assert (header.conv, header.cmd, header.sn) == (7, Command.ACK, 3)


def test_invalid_datagrams() -> None:
    good = segment(7, data=b"hello")
    assert not valid_datagram(good, 8)  # another session
    assert not valid_datagram(good[:-1], 7)  # data shorter than its length field
    assert not valid_datagram(good + b"x", 7)  # trailing bytes that are not a segment
    assert not valid_datagram(good[: HEADER_LEN - 1], 7)
    assert not valid_datagram(b"", 7)
    assert not valid_datagram(segment(7, cmd=80), 7)
    assert not valid_datagram(segment(7, cmd=85), 7)
    assert not valid_datagram(segment(7, Command.ACK, data=b"xx"), 7)  # only PUSH carries data
    assert not valid_datagram(segment(7, data=b"x" * 10), 7, max_data=5)
    assert not valid_datagram(segment(7, length=0xFFFFFFFF), 7)
    assert first_header(b"short") is None


def test_new_session_needs_push_sn_zero() -> None:
    assert is_new_session(segment(9, data=b"x"))
    assert is_new_session(segment(0, data=b"x"))  # vproxy's conv 0
    assert not is_new_session(segment(9, data=b"x", sn=5))
    assert not is_new_session(segment(9, data=b"x", una=2))
    assert not is_new_session(segment(9, Command.ACK))
    assert not is_new_session(segment(9, Command.WASK))
    assert not is_new_session(b"\x00" * 10)
    assert not is_new_session(segment(9, data=b"x") + b"junk")


@given(st.binary(max_size=200), st.integers(0, 0xFFFFFFFF))
def test_any_bytes_are_judged_without_error(data: bytes, conv: int) -> None:
    assert valid_datagram(data, conv) in (True, False)
    assert is_new_session(data) in (True, False)


@given(st.lists(st.tuples(st.sampled_from(list(Command)), st.binary(max_size=64)), min_size=1, max_size=6))
def test_well_formed_datagrams_are_valid_and_any_truncation_is_not(
    parts: list[tuple[Command, bytes]],
) -> None:
    datagram = b"".join(segment(42, cmd, data=data if cmd == Command.PUSH else b"") for cmd, data in parts)
    assert valid_datagram(datagram, 42)
    for cut in range(1, len(datagram)):
        prefix = datagram[:cut]
        # a prefix is valid only when it ends exactly on a segment boundary
        assert valid_datagram(prefix, 42) == _ends_on_boundary(datagram, cut)


def _ends_on_boundary(datagram: bytes, cut: int) -> bool:
    offset = 0
    while offset < cut:
        (length,) = struct.unpack_from("<I", datagram, offset + 20)
        offset += HEADER_LEN + length
    return offset == cut


@given(st.lists(st.binary(min_size=0, max_size=120), max_size=30), st.integers(0, 2**32 - 1))
def test_mutated_segments_never_break_vetting(noise: list[bytes], conv: int) -> None:
    base = segment(conv, data=b"payload")
    for chunk in noise:
        mutated = (
            bytes(a ^ b for a, b in zip(base, chunk.ljust(len(base), b"\x00"), strict=False))
            + chunk[len(base) :]
        )
        verdict = valid_datagram(mutated, conv)
        if verdict:
            header = first_header(mutated)
            assert header is not None
            assert header.conv == conv
            assert header.cmd in set(Command)


def _walk(datagram: bytes, conv: int) -> bool:
    """The vetting rule spelled out segment by segment (the reference for the one-unpack path)."""
    offset = 0
    if len(datagram) < HEADER_LEN:
        return False
    while offset < len(datagram):
        if len(datagram) - offset < HEADER_LEN:
            return False
        seg_conv, cmd, _frg, _wnd, _ts, _sn, _una, length = struct.unpack_from("<IBBHIIII", datagram, offset)
        if seg_conv != conv or not Command.PUSH <= cmd <= Command.WINS or (length and cmd != Command.PUSH):
            return False
        offset += HEADER_LEN
        if length > len(datagram) - offset:
            return False
        offset += length
    return True


def test_a_datagram_of_acks_is_valid_and_one_foreign_header_spoils_it() -> None:
    acks = [segment(7, Command.ACK, sn=n) for n in range(56)]
    assert valid_datagram(b"".join(acks), 7)
    assert valid_datagram(b"".join(acks[:2]), 7)
    for bad in (segment(8, Command.ACK), segment(7, 85), segment(7, 80), segment(7, Command.ACK, length=3)):
        spoiled = b"".join([*acks[:30], bad, *acks[31:]])
        assert not valid_datagram(spoiled, 7)
    # 24-byte multiples that are not bare headers are still walked: a PUSH with 24 bytes of data is fine
    assert valid_datagram(segment(7, data=b"y" * HEADER_LEN), 7)


_SEGMENTS = st.lists(
    st.tuples(
        st.sampled_from([7, 7, 7, 8]),
        st.integers(min_value=79, max_value=86),
        st.sampled_from([0, 0, 0, 1, 24, 48]),
        st.integers(min_value=-30, max_value=30),
    ),
    min_size=1,
    max_size=40,
)


@given(_SEGMENTS)
def test_vetting_agrees_with_the_segment_walk(parts: list[tuple[int, int, int, int]]) -> None:
    datagram = b"".join(segment(conv, cmd, data=b"d" * size) for conv, cmd, size, _cut in parts)
    cut = parts[-1][3]
    if cut < 0:
        datagram = datagram[:cut]
    elif cut > 25:
        datagram += b"\0" * HEADER_LEN  # a stray all-zero header (conv 0, cmd 0)
    assert valid_datagram(datagram, 7) == _walk(datagram, 7)


def _reference_verdict(datagrams: list[bytes], conv: int) -> RunVerdict:
    if not all(valid_datagram(d, conv) for d in datagrams):
        return RunVerdict.INVALID
    for d in datagrams:
        offset = 0
        while offset < len(d):
            _conv, cmd, length = struct.unpack_from("<IB15xI", d, offset)
            if cmd == Command.ACK:
                return RunVerdict.ACKS
            offset += HEADER_LEN + length
    return RunVerdict.NO_ACKS


_DATAGRAM = st.lists(
    st.tuples(st.sampled_from([7] * 15 + [8]), st.sampled_from([81, 81, 81, 82, 82, 83, 84] * 3 + [85])),
    min_size=1,
    max_size=4,
)


@settings(max_examples=300)
@given(
    st.lists(_DATAGRAM, min_size=1, max_size=8),
    st.integers(min_value=0, max_value=3),
    st.integers(min_value=-30, max_value=2),
)
def test_vetting_a_run_agrees_with_vetting_each_datagram(
    shapes: list[list[tuple[int, int]]], spread: int, cut: int
) -> None:
    """Datagrams padded to one size (the last shorter) as a GRO run: same verdict as one by one."""
    bodies: list[bytes] = []
    for shape in shapes:
        parts = [segment(conv, cmd, data=b"p" * 10 if cmd == Command.PUSH else b"") for conv, cmd in shape]
        bodies.append(b"".join(parts))
    size = max(len(b) for b in bodies) + spread * 5
    datagrams = []
    for body in bodies[:-1]:  # pad with PUSH data so every datagram but the last has the run's size
        pad = size - len(body)
        datagrams.append(body + segment(7, data=b"q" * (pad - HEADER_LEN)) if pad >= HEADER_LEN else body)
    datagrams.append(bodies[-1])
    if any(len(d) != size for d in datagrams[:-1]) or len(datagrams[-1]) > size:
        event("skipped")
        return  # not a shape the kernel would coalesce
    if cut < 0 and len(datagrams[-1]) + cut > 0:
        datagrams[-1] = datagrams[-1][:cut]
    run = b"".join(datagrams)
    verdict = _reference_verdict(datagrams, 7)
    event(verdict.name)
    assert vet_run(run, size, 7) == verdict


def test_a_segment_crossing_a_datagram_boundary_spoils_the_run() -> None:
    one = segment(7, data=b"a" * 26)  # 50 bytes
    two = segment(7, data=b"b" * 26)
    assert vet_run(one + two, 50, 7) == RunVerdict.NO_ACKS
    joined = segment(
        7, data=b"c" * 76
    )  # the same 100 bytes as one segment: valid alone, not as two datagrams
    assert valid_datagram(joined, 7)
    assert vet_run(joined, 50, 7) == RunVerdict.INVALID
    assert vet_run(one + segment(7, Command.ACK) * 2, 50, 7) == RunVerdict.ACKS
    assert vet_run(b"", 50, 7) == RunVerdict.INVALID


@settings(max_examples=400)
@given(
    kind=st.sampled_from(["push", "bare"]),
    count=st.integers(min_value=2, max_value=64),
    width=st.integers(min_value=1, max_value=60),
    last_cut=st.integers(min_value=0, max_value=59),
    commands=st.lists(
        st.sampled_from([Command.ACK, Command.ACK, Command.PUSH, Command.WASK, Command.WINS]), min_size=1
    ),
    flip=st.one_of(
        st.none(),
        st.tuples(st.integers(min_value=0), st.sampled_from([0, 3, 4, 20, 23]), st.integers(1, 255)),
    ),
)
def test_the_runs_of_a_bulk_transfer_get_the_verdict_of_each_datagram(
    kind: str, count: int, width: int, last_cut: int, commands: list[int], flip: tuple[int, int, int] | None
) -> None:
    """Runs made the way a bulk transfer makes them, which vetting reads without a walk: one PUSH segment filling
    each datagram (the data), or data-less segments only (the ACKs), the last datagram shorter or not, and any
    one header byte of conv, cmd or len flipped: the same verdict as each datagram vetted on its own."""
    if kind == "push":
        step = HEADER_LEN + width * 20
        sizes = [step] * (count - 1) + [step - min(last_cut * 20, step - HEADER_LEN)]
        datagrams = [segment(7, sn=i, data=bytes([i]) * (size - HEADER_LEN)) for i, size in enumerate(sizes)]
    else:
        per = 1 + width % 8
        step = per * HEADER_LEN
        last = per - min(last_cut % 8, per - 1)
        datagrams = [
            b"".join(
                segment(7, commands[(i + j) % len(commands)], sn=i)
                for j in range(per if i < count - 1 else last)
            )
            for i in range(count)
        ]
    if flip is not None:
        which, field, xor = flip
        d = bytearray(datagrams[which % count])
        d[field] ^= xor
        datagrams[which % count] = bytes(d)
        if len(datagrams[which % count]) != len(datagrams[0]) and which % count != count - 1:
            return
    verdict = _reference_verdict(datagrams, 7)
    event(f"{kind} {verdict.name}")
    run = b"".join(datagrams)
    assert vet_run(run, step, 7) == verdict
    assert vet_run(memoryview(b"x" + run)[1:], step, 7) == verdict
