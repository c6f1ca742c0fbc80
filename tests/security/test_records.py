"""The sans-IO secure stream: handshake, records, end of stream, and every kind of bad input."""

from __future__ import annotations

import os
import random
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st

from vtunnel.security.errors import AuthenticationFailed, SecurityError
from vtunnel.security.records import (
    LENGTH_KEY_LABEL,
    MAX_HANDSHAKE_LEN,
    MAX_RECORD_PLAINTEXT,
    RECORD_OVERHEAD,
    SecureStreamClient,
    SecureStreamServer,
)
from vtunnel.security.replay import ReplayCache

PSK = bytes(range(32))
NOW = 1_700_000_000.0


def length_masks(c: SecureStreamClient, count: int) -> list[int]:
    """The masks of the first ``count`` record lengths the client sends, computed as docs/security.md says:
    mask(n) = bytes 2n, 2n+1 (big endian) of ChaCha20 under the sender's length key, 4096 bytes per nonce
    (4 zero bytes | chunk index u64 little endian | 4 zero bytes)."""
    keys = c._hs.keys
    assert keys is not None
    key, _ = keys.derive(LENGTH_KEY_LABEL)
    stream_bytes = b""
    for chunk in range(-(-count // 2048)):
        nonce = bytes(4) + chunk.to_bytes(8, "little") + bytes(4)
        stream_bytes += Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(4096))
    return [int.from_bytes(stream_bytes[2 * n : 2 * n + 2], "big") for n in range(count)]


def record_lengths(c: SecureStreamClient, wire: bytes) -> list[int]:
    """The clear lengths of the client's records in ``wire`` (its first records since the handshake)."""
    masks = length_masks(c, len(wire) // RECORD_OVERHEAD)
    lengths: list[int] = []
    pos = 0
    while pos < len(wire):
        (n,) = struct.unpack_from(">H", wire, pos)
        lengths.append(n ^ masks[len(lengths)])
        pos += 2 + lengths[-1]
    return lengths


def pair(
    psk_client: bytes = PSK, replay: ReplayCache | None = None
) -> tuple[SecureStreamClient, SecureStreamServer]:
    return SecureStreamClient(psk_client, now=NOW), SecureStreamServer(PSK, replay=replay or ReplayCache())


def connect() -> tuple[SecureStreamClient, SecureStreamServer]:
    c, s = pair()
    assert s.receive_data(c.data_to_send(), NOW) == b""
    assert s.handshake_complete
    assert c.receive_data(s.data_to_send(), NOW) == b""
    assert c.handshake_complete
    return c, s


def test_handshake_and_records_both_ways() -> None:
    c, s = connect()
    c.send(b"ping")
    assert s.receive_data(c.data_to_send(), NOW) == b"ping"
    s.send(b"pong")
    assert c.receive_data(s.data_to_send(), NOW) == b"pong"
    assert c.data_to_send() == b""


def test_data_sent_before_the_reply_is_held_then_delivered() -> None:
    c, s = pair()
    c.send(b"early ")
    c.send(b"bird")
    m1 = c.data_to_send()
    s.receive_data(m1, NOW)
    s.send(b"hello")
    assert c.receive_data(s.data_to_send(), NOW) == b"hello"  # reply and a record in one read
    assert s.receive_data(c.data_to_send(), NOW) == b"early bird"


def test_byte_by_byte_delivery() -> None:
    c, s = pair()
    c.send(b"x" * 1000)
    m1 = c.data_to_send()
    for i in range(len(m1)):
        s.receive_data(m1[i : i + 1], NOW)
    reply = s.data_to_send()
    s.send(b"abc" * 7000)
    stream = reply + s.data_to_send()
    got = b"".join(c.receive_data(stream[i : i + 1], NOW) for i in range(len(stream)))
    assert got == b"abc" * 7000
    got = b"".join(s.receive_data(bytes([b]), NOW) for b in c.data_to_send())
    assert got == b"x" * 1000


def test_records_are_at_most_16_kib() -> None:
    c, s = connect()
    payload = os.urandom(3 * MAX_RECORD_PLAINTEXT + 5)
    c.send(payload)
    wire = c.data_to_send()
    assert len(wire) == len(payload) + 4 * RECORD_OVERHEAD
    assert record_lengths(c, wire) == [MAX_RECORD_PLAINTEXT + 16] * 3 + [5 + 16]
    assert s.receive_data(wire, NOW) == payload
    c.send(b"")
    assert c.data_to_send() == b""  # an empty send is not an end of stream


def test_length_masks_go_on_across_keystream_chunks() -> None:
    c, s = connect()
    for i in range(5000):  # the masks of 2048 records come from one keystream chunk
        c.send(bytes([i % 256]))
    c.send_eof()
    wire = c.data_to_send()
    assert record_lengths(c, wire) == [17] * 5000 + [16]
    assert s.receive_data(wire, NOW) == bytes(i % 256 for i in range(5000))
    assert s.eof_received


def test_authenticated_end_of_stream() -> None:
    c, s = connect()
    c.send(b"last")
    c.send_eof()
    assert c.eof_sent
    with pytest.raises(SecurityError):
        c.send(b"more")
    assert s.receive_data(c.data_to_send(), NOW) == b"last"
    assert s.eof_received
    s.send(b"still talking")  # half-close: the other direction goes on
    assert c.receive_data(s.data_to_send(), NOW) == b"still talking"


def test_record_after_end_of_stream_fails() -> None:
    c, s = connect()
    c.send_eof()
    assert c._records is not None
    c._records.eof_sent = False  # a misbehaving peer goes on sending after its end of stream
    c.send(b"more")
    with pytest.raises(AuthenticationFailed, match="after the end"):
        s.receive_data(c.data_to_send(), NOW)
    assert s.data_to_send() == b""


def test_server_reply_never_larger_than_the_first_message_and_sizes_vary() -> None:
    sizes1, sizes2 = set(), set()
    for _ in range(200):
        c, s = pair()
        m1 = c.data_to_send()
        s.receive_data(m1, NOW)
        m2 = s.data_to_send()
        assert len(m2) <= len(m1)
        sizes1.add(len(m1))
        sizes2.add(len(m2))
    assert len(sizes1) > 50
    assert len(sizes2) > 30


@pytest.mark.parametrize("attempt", range(20))  # the salts differ: many draws of both cases
def test_wrong_key_fails_and_nothing_is_sent(attempt: int) -> None:
    c, s = pair(psk_client=bytes(32))
    # unmasked under the wrong key the frame length is random: out of range it fails at once, in range it fails
    # as soon as that many bytes have come; nothing is answered either way
    try:
        s.receive_data(c.data_to_send(), NOW)
    except AuthenticationFailed:
        pass
    else:
        assert s.data_to_send() == b""
        with pytest.raises(AuthenticationFailed):
            s.receive_data(bytes(MAX_HANDSHAKE_LEN), NOW)
    assert s.data_to_send() == b""
    assert not s.handshake_complete
    with pytest.raises(AuthenticationFailed):  # dead for good
        s.receive_data(b"", NOW)


def test_replayed_first_message_fails_silently() -> None:
    replay = ReplayCache()
    c = SecureStreamClient(PSK, now=NOW)
    m1 = c.data_to_send()
    s1 = SecureStreamServer(PSK, replay=replay)
    s1.receive_data(m1, NOW)
    assert s1.data_to_send()
    s2 = SecureStreamServer(PSK, replay=replay)
    with pytest.raises(AuthenticationFailed, match="replay"):
        s2.receive_data(m1, NOW + 5)
    assert s2.data_to_send() == b""


@pytest.mark.parametrize("skew", [-61.0, 61.0, -3600.0])
def test_stale_or_future_timestamp_fails(skew: float) -> None:
    c = SecureStreamClient(PSK, now=NOW + skew)
    s = SecureStreamServer(PSK, replay=ReplayCache())
    with pytest.raises(AuthenticationFailed):
        s.receive_data(c.data_to_send(), NOW)
    assert s.data_to_send() == b""


@pytest.mark.parametrize("skew", [-59.0, 59.0])
def test_clock_skew_within_the_window_is_fine(skew: float) -> None:
    c = SecureStreamClient(PSK, now=NOW + skew)
    s = SecureStreamServer(PSK, replay=ReplayCache())
    s.receive_data(c.data_to_send(), NOW)
    assert s.handshake_complete


def test_monotonic_time_is_refused_clearly() -> None:
    with pytest.raises(SecurityError, match="wall-clock"):
        SecureStreamClient(PSK, now=12345.6)


@pytest.mark.parametrize(
    "probe",
    [
        bytes.fromhex("000000040000000000"),  # a vproxy client's empty SETTINGS
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200),  # a TLS ClientHello's start
        b"SSH-2.0-OpenSSH_9.6\r\n",
    ],
)
def test_probes_fail_with_nothing_sent(probe: bytes) -> None:
    s = SecureStreamServer(PSK, replay=ReplayCache())
    try:
        s.receive_data(probe, NOW)
        failed = False
    except AuthenticationFailed:
        failed = True
    assert s.data_to_send() == b""
    assert not s.handshake_complete
    if not failed:  # a length prefix that asks for more: whatever follows cannot authenticate
        with pytest.raises(AuthenticationFailed):
            s.receive_data(os.urandom(2000), NOW)
        assert s.data_to_send() == b""


@settings(max_examples=300, deadline=None)
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_any_tampered_first_message_fails(position: int, flip: int) -> None:
    c, s = pair()
    m1 = bytearray(c.data_to_send())
    m1[position % len(m1)] ^= flip
    try:
        s.receive_data(bytes(m1), NOW)
    except AuthenticationFailed:
        pass
    else:  # a length grown past the data: the message is still incomplete
        assert not s.handshake_complete
    assert s.data_to_send() == b""


@settings(max_examples=300, deadline=None)
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_any_tampered_record_fails(position: int, flip: int) -> None:
    c, s = connect()
    c.send(b"a" * 100)
    c.send(b"b" * 100)
    wire = bytearray(c.data_to_send())
    wire[position % len(wire)] ^= flip
    try:
        got = s.receive_data(bytes(wire), NOW)
    except AuthenticationFailed:
        return
    # only a grown length field can leave it waiting; nothing forged is ever delivered
    assert got in (b"", b"a" * 100)


def fails_now_or_at_the_next_record(s: SecureStreamServer, data: bytes) -> None:
    """A record out of place fails: at once, or (when its length, unmasked with the wrong mask, still looks
    valid) as soon as the bytes that length asks for have come, without a byte delivered meanwhile."""
    try:
        delivered = s.receive_data(data, NOW)
    except AuthenticationFailed:
        return
    assert delivered == b""
    assert s.incomplete_record
    with pytest.raises(AuthenticationFailed):
        s.receive_data(bytes(16400), NOW)


@pytest.mark.parametrize("attempt", range(20))  # the masks differ per connection: many draws of both cases
def test_reordered_and_duplicated_records_fail(attempt: int) -> None:
    c, s = connect()
    c.send(b"one")
    r1 = c.data_to_send()
    c.send(b"two")
    r2 = c.data_to_send()
    fails_now_or_at_the_next_record(s, r2 + r1)
    c, s = connect()
    c.send(b"one")
    r1 = c.data_to_send()
    assert s.receive_data(r1, NOW) == b"one"
    fails_now_or_at_the_next_record(s, r1)


def test_truncated_records_wait_and_bad_lengths_fail() -> None:
    c, s = connect()
    c.send(b"hello")
    wire = c.data_to_send()
    assert s.receive_data(wire[:-1], NOW) == b""
    assert s.receive_data(wire[-1:], NOW) == b"hello"
    for bad in (0, 15, 16401, 0xFFFF):
        c2, s2 = connect()
        with pytest.raises(AuthenticationFailed, match="length"):
            s2.receive_data(struct.pack(">H", bad ^ length_masks(c2, 1)[0]), NOW)


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=300), max_size=8))
def test_fuzz_server_before_handshake(chunks: list[bytes]) -> None:
    s = SecureStreamServer(PSK, replay=ReplayCache())
    try:
        for chunk in chunks:
            assert s.receive_data(chunk, NOW) == b""
    except AuthenticationFailed:
        pass
    assert s.data_to_send() == b""
    assert not s.handshake_complete


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=300), max_size=8))
def test_fuzz_client_after_message_one(chunks: list[bytes]) -> None:
    c = SecureStreamClient(PSK, now=NOW)
    c.data_to_send()
    try:
        for chunk in chunks:
            assert c.receive_data(chunk, NOW) == b""
    except AuthenticationFailed:
        pass
    assert not c.handshake_complete


def test_mutation_fuzz_of_a_whole_session() -> None:
    rng = random.Random(1234)
    c, s = pair()
    m1 = c.data_to_send()
    s.receive_data(m1, NOW)
    s.send(os.urandom(5000))
    server_wire = s.data_to_send()
    for _ in range(2000):
        c2 = SecureStreamClient(PSK, now=NOW)
        wire = bytearray(server_wire)
        for _ in range(rng.randint(1, 4)):
            wire[rng.randrange(len(wire))] = rng.randrange(256)
        try:
            c2.receive_data(bytes(wire), NOW)  # another client's reply: never valid for c2
        except AuthenticationFailed:
            continue
        raise AssertionError("a reply for another handshake was accepted")


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(st.binary(max_size=40_000), max_size=6),
    cuts=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=20),
    eof=st.booleans(),
)
def test_any_messages_any_splits_arrive_intact(messages: list[bytes], cuts: list[int], eof: bool) -> None:
    c, s = connect()
    for m in messages:
        c.send(m)
    if eof:
        c.send_eof()
    wire = c.data_to_send()
    got = bytearray()
    pos = 0
    i = 0
    while pos < len(wire):
        step = cuts[i % len(cuts)]
        got += s.receive_data(wire[pos : pos + step], NOW)
        pos += step
        i += 1
    assert bytes(got) == b"".join(messages)
    assert s.eof_received == eof


def test_records_are_noise_transport_messages() -> None:
    """Each record is ChaCha20-Poly1305 under the sender's key, nonce = record counter, ad = its length bytes
    as sent (masked)."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    from vtunnel.security.noise import chacha_nonce

    c, s = connect()
    keys = c._hs.keys
    assert keys is not None
    c.send(b"first")
    c.send(os.urandom(MAX_RECORD_PLAINTEXT + 1))
    c.send_eof()
    wire = c.data_to_send()
    aead = ChaCha20Poly1305(keys.send)
    masks = length_masks(c, 4)
    pos = 0
    plain = []
    counter = 0
    while pos < len(wire):
        (length,) = struct.unpack_from(">H", wire, pos)
        length ^= masks[counter]
        header = wire[pos : pos + 2]
        plain.append(aead.decrypt(chacha_nonce(counter), wire[pos + 2 : pos + 2 + length], header))
        counter += 1
        pos += 2 + length
    assert [len(p) for p in plain] == [5, MAX_RECORD_PLAINTEXT, 1, 0]
    assert plain[0] == b"first"
    assert s.receive_data(wire, NOW) == b"first" + plain[1] + plain[2]
    assert s.eof_received


def test_output_is_never_a_view_of_a_reused_buffer() -> None:
    c, s = connect()
    c.send(b"a" * 1000)
    first = c.data_to_send()
    c.send(b"b" * 1000)
    second = c.data_to_send()
    assert type(first) is bytes
    assert type(second) is bytes
    got_first = s.receive_data(first, NOW)
    got_second = s.receive_data(second, NOW)
    assert type(got_first) is bytes
    assert got_first == b"a" * 1000  # still intact after the next record was sealed and opened
    assert got_second == b"b" * 1000


def test_sends_and_reads_larger_than_the_kept_work_buffer() -> None:
    from vtunnel.security.records import WORK_BUFFER_MAX

    c, s = connect()
    big = os.urandom(WORK_BUFFER_MAX + 3 * MAX_RECORD_PLAINTEXT + 7)
    small = os.urandom(100)
    c.send(small)
    c.send(big)
    c.send(small)
    wire = c.data_to_send()
    assert s.receive_data(wire, NOW) == small + big + small
    records = c._records
    assert records is not None
    # the kept buffers stay bounded, whatever went through
    assert len(records._seal_work) <= WORK_BUFFER_MAX
    assert s._records is not None
    assert len(s._records._open_work) <= WORK_BUFFER_MAX


def test_a_bad_record_behind_good_ones_delivers_nothing_and_fails() -> None:
    c, s = connect()
    c.send(b"good one")
    c.send(b"good two")
    c.send(b"bad")
    wire = bytearray(c.data_to_send())
    wire[-1] ^= 1
    with pytest.raises(AuthenticationFailed):
        s.receive_data(bytes(wire), NOW)
    with pytest.raises(AuthenticationFailed):
        s.receive_data(b"", NOW)
    assert s.data_to_send() == b""


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=70_000), min_size=1, max_size=5),
    split=st.integers(min_value=1, max_value=40_000),
)
def test_partial_record_kept_between_reads(sizes: list[int], split: int) -> None:
    """Reads that end inside a record (the usual case off a socket) keep the tail and finish it later."""
    c, s = connect()
    messages = [os.urandom(n) for n in sizes]
    got = bytearray()
    for m in messages:
        c.send(m)
        wire = c.data_to_send()
        cut = min(split, len(wire))
        got += s.receive_data(wire[:cut], NOW)
        got += s.receive_data(wire[cut:], NOW)
    assert bytes(got) == b"".join(messages)


@settings(max_examples=300, deadline=None)
@given(
    messages=st.lists(st.binary(min_size=0, max_size=3000), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=1, max_value=4000), min_size=1, max_size=10),
)
def test_any_chunking_of_valid_records_parses_identically(messages: list[bytes], cuts: list[int]) -> None:
    """Records fed in any chunks give, after each chunk, exactly the records it completed, and
    ``incomplete_record`` says whether the bytes so far end inside one."""
    c, s = connect()
    ends = [0]  # where each record ends on the wire
    done = [0]  # the plaintext bytes up to there
    wire = b""
    for m in messages:
        c.send(m)
        wire += c.data_to_send()
        if m:  # an empty send makes no record
            ends.append(len(wire))
            done.append(done[-1] + len(m))
    plain = b"".join(messages)
    got = bytearray()
    fed, i = 0, 0
    while fed < len(wire):
        step = cuts[i % len(cuts)]
        got += s.receive_data(wire[fed : fed + step], NOW)
        fed = min(len(wire), fed + step)
        i += 1
        complete = max(k for k, end in enumerate(ends) if end <= fed)
        assert bytes(got) == plain[: done[complete]]
        assert s.incomplete_record == (fed != ends[complete])
    assert bytes(got) == plain
    assert not s.incomplete_record


_CORRUPTIONS = ("flip", "insert", "delete", "replace")


@settings(max_examples=400, deadline=None)
@given(
    messages=st.lists(st.binary(min_size=1, max_size=2000), min_size=1, max_size=5),
    kind=st.sampled_from(_CORRUPTIONS),
    where=st.integers(min_value=0),
    size=st.integers(min_value=1, max_value=40),
    cuts=st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=6),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_corruption_never_delivers_forged_bytes_and_never_waits_unbounded(
    messages: list[bytes], kind: str, where: int, size: int, cuts: list[int], seed: int
) -> None:
    """Any corruption of a record stream (a changed byte, bytes inserted, deleted or replaced), fed in any
    chunks: only records wholly before the damage are ever delivered; the parser either fails or is waiting
    inside a record (``incomplete_record``, which the I/O layer bounds in time), and at most one record's worth
    of further bytes always ends it with a failure."""
    rng = random.Random(seed)
    c, s = connect()
    wire = b""
    clean = []  # (end of record on the wire, plaintext up to there)
    for i, m in enumerate(messages):
        c.send(m)
        wire += c.data_to_send()
        clean.append((len(wire), len(b"".join(messages[: i + 1]))))
    at = where % len(wire)
    bad = bytearray(wire)
    if kind == "flip":
        bad[at] ^= rng.randrange(1, 256)
    elif kind == "insert":
        bad[at:at] = rng.randbytes(size)
    elif kind == "delete":
        del bad[at : at + size]
    else:
        old = bytes(bad[at : at + size])
        new = rng.randbytes(len(old))
        if new == old:
            new = bytes([new[0] ^ 1]) + new[1:]
        bad[at : at + size] = new
    plain = b"".join(messages)
    # the damage begins where the bytes first differ: a deleted or inserted byte may be followed by the same
    # byte it displaced (1 in 256), and then the record it ends is still the sender's, whole and authentic
    differs = next(
        (i for i, (x, y) in enumerate(zip(wire, bad, strict=False)) if x != y), min(len(wire), len(bad))
    )
    intact = max(
        [upto for end, upto in clean if end <= differs], default=0
    )  # records wholly before the damage
    got = bytearray()
    fed, i = 0, 0
    try:
        while fed < len(bad):
            step = cuts[i % len(cuts)]
            got += s.receive_data(bytes(bad[fed : fed + step]), NOW)
            fed += step
            i += 1
        # nothing failed yet: the parser waits inside a record, or the damage removed whole records at the end
        assert s.incomplete_record or kind == "delete"
        s.receive_data(rng.randbytes(RECORD_OVERHEAD + MAX_RECORD_PLAINTEXT), NOW)
        raise AssertionError("a corrupted stream went on being accepted")
    except AuthenticationFailed:
        pass
    assert len(got) <= intact
    assert bytes(got) == plain[: len(got)]
    with pytest.raises(AuthenticationFailed):  # dead for good
        s.receive_data(b"", NOW)


def test_a_split_record_is_completed_from_the_next_read_and_the_rest_opened_with_it() -> None:
    """A read that ends inside a record, then one that holds its tail and whole records after it: both come out
    in order in one result; the caller's buffer is free to change once the call returned."""
    for size in (1, 16383, 16384, 16385, 40_000):
        first, second = os.urandom(size), os.urandom(size + 7)
        for cut in (1, 2, 3, 17, size // 2 + 1, size + 17):
            c, s = connect()
            c.send(first)
            c.send(second)
            wire = c.data_to_send()
            head = bytearray(wire[:cut])
            got = s.receive_data(head, NOW)
            head.clear()  # no view of the caller's buffer outlives the call
            tail = bytearray(wire[cut:])
            got += s.receive_data(tail, NOW)
            tail.clear()
            assert got == first + second
            assert not s.incomplete_record
