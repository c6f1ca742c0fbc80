"""Sealed datagrams: handshake, header protection, retransmission, replay, NAT rebinding, tampering, stateless
resets, and a 100k datagram fuzz."""

from __future__ import annotations

import hmac
import os
import random
import struct
import time

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vtunnel.security.ciphers import ALL_CIPHERS
from vtunnel.security.ciphers import Cipher as TransportCipher
from vtunnel.security.datagram import (
    _RESET_LABEL,
    AMPLIFICATION_FACTOR,
    CHALLENGE_INTERVAL,
    CID_CHECK_LEN,
    CID_LEN,
    DATAGRAM_OVERHEAD,
    DATAGRAM_PROLOGUE,
    HEADER_KEY_LABEL,
    MAX_CONNECTION_IDS,
    MAX_CONTROL_DATAGRAM,
    MAX_COUNTER,
    MAX_RESET_DATAGRAM,
    MAX_SERVER_ID,
    MIN_CONTROL_DATAGRAM,
    MIN_RESET_DATAGRAM,
    REPLY_REPEAT_LIMIT,
    RESET_TOKEN_LEN,
    RETRANSMIT_PERIOD,
    ConnectionIdLayout,
    ConnectionIdSeen,
    DatagramClient,
    DatagramServer,
    DatagramSession,
    DatagramType,
    NewConnectionId,
    PathChallenge,
    PathResponse,
    PeerPath,
    StatelessReset,
    connection_id_slot,
    is_minted,
    mint_connection_id,
    peek_connection_id,
    read_handshake_datagram,
    reset_keys,
    reset_token,
)
from vtunnel.security.errors import SecurityError
from vtunnel.security.noise import TransportKeys
from vtunnel.security.replay import HandshakeLimiter, ReplayCache, ResetLimiter

PSK = bytes(range(32))
NOW = 1_700_000_000.0
SRC = ("127.0.0.1", 40000)


def server(**kw: object) -> DatagramServer:
    return DatagramServer(PSK, replay=ReplayCache(), **kw)  # type: ignore[arg-type]


def established(srv: DatagramServer | None = None) -> tuple[DatagramClient, DatagramSession, DatagramServer]:
    srv = srv or server()
    c = DatagramClient(PSK, now=NOW)
    got = srv.accept(c.initial_datagram(), SRC, NOW)
    assert got is not None
    session, reply = got
    assert c.receive(reply, NOW) is None
    assert c.established
    return c, session, srv


def test_handshake_then_data_both_ways() -> None:
    c, session, _ = established()
    assert c.connection_id == session.connection_id
    d = c.seal(b"hello")
    assert len(d) == 5 + DATAGRAM_OVERHEAD
    assert peek_connection_id(d) == session.connection_id
    assert session.open(d) == b"hello"
    assert c.receive(session.seal(b"world"), NOW) == b"world"
    assert session.open(c.seal(b"")) == b""  # empty payloads are fine


def unprotect(keys_of: DatagramClient, datagram: bytes) -> tuple[bytes, int, int]:
    """``(CID, kind, low 32 bits of the counter)`` of a datagram the client sealed, its header protection
    removed as documented: XOR with AES-256-ECB(the client's sending header key, ciphertext[0:16])[0:5]."""
    keys = keys_of._hs.keys
    assert keys is not None
    key = keys.derive(HEADER_KEY_LABEL)[0]
    mask = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(datagram[13:29])
    kind, counter = struct.unpack(">BI", bytes(a ^ b for a, b in zip(datagram[8:13], mask, strict=False)))
    return datagram[:CID_LEN], kind, counter


def test_overhead_is_29_bytes_and_the_layout_is_as_documented() -> None:
    c, session, _ = established()
    client = c.session
    assert client is not None
    d = c.seal(b"x" * 1000)
    assert unprotect(c, d) == (session.connection_id, DatagramType.DATA, 0)
    assert unprotect(c, c.seal(b""))[1:] == (DatagramType.DATA, 1)
    assert unprotect(c, client.seal_control(PathResponse(b"12345678")))[1:] == (DatagramType.CONTROL, 2)
    assert DATAGRAM_OVERHEAD == CID_LEN + 1 + 4 + 16
    # the associated data is the header before protection: the unprotected bytes decrypt
    keys = c._hs.keys
    assert keys is not None
    clear = d[:8] + struct.pack(">BI", DatagramType.DATA, 0)
    assert ChaCha20Poly1305(keys.send).decrypt(bytes(12), d[13:], clear) == b"x" * 1000


@settings(max_examples=200, deadline=None)
@given(
    start=st.integers(0, 2**31 - 1),
    gaps=st.lists(st.integers(-1, 2**31 - 2), min_size=1, max_size=12),
)
@example(start=2**31 - 1, gaps=[2**31 - 2, 0, 2**31 - 2, 4094, 4095, 2**31 - 2])
def test_the_full_counter_is_rebuilt_from_its_low_32_bits(start: int, gaps: list[int]) -> None:
    """Across 2**32 boundaries, after losses of up to 2**31 datagrams and with reordering: each datagram opens
    once, under its full counter (the nonce would not match otherwise), and the window works on full counters."""
    c, session, _ = established()
    client = c.session
    assert client is not None
    client._send_counter = start
    assert session.open(client.seal(b"first")) == b"first"
    for gap in gaps:
        late = client.seal(b"late")  # sent before the gap, delivered after the next one
        client._send_counter += max(0, gap)
        assert session.open(client.seal(b"%d" % gap)) == b"%d" % gap
        assert session.open(late) == (b"late" if max(0, gap) < 4095 else None)  # inside the window or not
        assert session.open(late) is None
    assert session.highest_received == client._send_counter - 1


def test_the_reply_is_never_larger_than_the_first_datagram_and_sizes_vary() -> None:
    srv = server()
    init_sizes, reply_sizes = set(), set()
    for _ in range(200):
        c = DatagramClient(PSK, now=NOW)
        init = c.initial_datagram()
        got = srv.accept(init, SRC, NOW)
        assert got is not None
        assert len(got[1]) <= len(init)
        init_sizes.add(len(init))
        reply_sizes.add(len(got[1]))
    assert len(init_sizes) > 50
    assert len(reply_sizes) > 30


def test_server_id_starts_every_connection_id() -> None:
    srv = server(server_id=b"\x07\x01")
    for _ in range(20):
        _, session, _ = established(srv)
        assert session.connection_id[:2] == b"\x07\x01"
    with pytest.raises(SecurityError):
        server(server_id=b"123")


def test_a_captured_first_datagram_replayed_gets_nothing() -> None:
    srv = server()
    c = DatagramClient(PSK, now=NOW)
    init = c.initial_datagram()
    got = srv.accept(init, SRC, NOW)
    assert got is not None
    session, reply = got
    c.receive(reply, NOW)
    assert session.open(c.seal(b"first data")) == b"first data"  # the session is confirmed
    # an observer replays the captured datagram: from its own address, from the client's, now and later
    for dt in (0.1, 1.0, 5.0, 30.0, 59.0, 70.0):
        for src in [("127.0.0.9", 5555), SRC]:
            assert srv.accept(init, src, NOW + dt) is None


def test_replay_from_another_source_before_confirmation_gets_nothing() -> None:
    srv = server()
    c = DatagramClient(PSK, now=NOW)
    init = c.initial_datagram()
    assert srv.accept(init, SRC, NOW) is not None
    assert srv.accept(init, ("127.0.0.2", 40000), NOW + 0.5) is None
    assert srv.accept(init, ("127.0.0.1", 40001), NOW + 0.5) is None


def test_retransmission_gets_the_same_reply_and_the_same_session() -> None:
    srv = server()
    c = DatagramClient(PSK, now=NOW)
    first = c.initial_datagram()
    got1 = srv.accept(first, SRC, NOW)
    assert got1 is not None  # ... and the reply is lost
    again = c.initial_datagram(NOW + 1.0)
    assert again == first
    got2 = srv.accept(again, SRC, NOW + 1.0)
    assert got2 is not None
    assert got2[0] is got1[0]
    assert got2[1] == got1[1]
    assert c.receive(got2[1], NOW + 1.1) is None
    assert c.established
    assert got1[0].open(c.seal(b"ok")) == b"ok"
    # a late duplicate of the reply is ignored by the client
    assert c.receive(got1[1], NOW + 1.2) is None
    assert c.receive(got1[0].seal(b"after"), NOW + 1.3) == b"after"


def test_retransmissions_are_answered_a_bounded_number_of_times_within_the_period() -> None:
    srv = server()
    c = DatagramClient(PSK, now=NOW)
    init = c.initial_datagram()
    assert srv.accept(init, SRC, NOW) is not None
    answers = [srv.accept(init, SRC, NOW + 0.1 * i) for i in range(1, 20)]
    assert sum(a is not None for a in answers) == REPLY_REPEAT_LIMIT
    c2 = DatagramClient(PSK, now=NOW)
    init2 = c2.initial_datagram()
    assert srv.accept(init2, SRC, NOW) is not None
    assert srv.accept(init2, SRC, NOW + RETRANSMIT_PERIOD + 0.1) is None


def test_after_the_retransmit_period_the_client_starts_over() -> None:
    srv = server()
    c = DatagramClient(PSK, now=NOW)
    first = c.initial_datagram()
    first_cid = c.connection_id
    assert srv.accept(first, SRC, NOW) is not None  # reply lost
    fresh = c.initial_datagram(NOW + RETRANSMIT_PERIOD)
    assert fresh != first
    assert c.connection_id != first_cid
    got = srv.accept(fresh, SRC, NOW + RETRANSMIT_PERIOD)
    assert got is not None
    c.receive(got[1], NOW + RETRANSMIT_PERIOD)
    assert got[0].open(c.seal(b"x")) == b"x"
    with pytest.raises(SecurityError):
        c.initial_datagram()


def test_a_reply_to_an_abandoned_attempt_is_ignored() -> None:
    srv = server()
    c = DatagramClient(PSK, now=NOW)
    old = srv.accept(c.initial_datagram(), SRC, NOW)
    assert old is not None
    c.initial_datagram(NOW + RETRANSMIT_PERIOD)
    assert c.receive(old[1], NOW + RETRANSMIT_PERIOD) is None
    assert not c.established


def test_nat_rebinding_sessions_are_found_by_connection_id_not_address() -> None:
    c, session, _ = established()
    sessions = {session.connection_id: session}
    for port in (40000, 40001, 50000):  # the client's address changes; nothing in the datagram depends on it
        d = c.seal(f"from {port}".encode())
        cid = peek_connection_id(d)
        assert cid is not None
        assert sessions[cid].open(d) == f"from {port}".encode()


def test_reordered_datagrams_are_accepted_once_and_duplicates_dropped() -> None:
    c, session, _ = established()
    datagrams = [c.seal(i.to_bytes(4, "big")) for i in range(500)]
    order = list(range(500))
    random.Random(7).shuffle(order)
    got = [session.open(datagrams[i]) for i in order]
    assert all(g is not None for g in got)
    assert all(session.open(d) is None for d in datagrams)  # every duplicate dropped


def test_datagrams_older_than_the_window_are_dropped() -> None:
    c, session, _ = established()
    old = c.seal(b"old")
    for _ in range(5000):
        assert session.open(c.seal(b"")) == b""
    assert session.open(old) is None


def test_wrong_key_gets_nothing() -> None:
    srv = server()
    c = DatagramClient(bytes(32), now=NOW)
    assert srv.accept(c.initial_datagram(), SRC, NOW) is None
    # and the server still serves others
    established(srv)


@pytest.mark.parametrize("skew", [-61.0, 61.0])
def test_stale_first_datagram_gets_nothing(skew: float) -> None:
    c = DatagramClient(PSK, now=NOW + skew)
    assert server().accept(c.initial_datagram(), SRC, NOW) is None


def test_data_for_another_session_or_key_is_dropped() -> None:
    srv = server()
    c1, s1, _ = established(srv)
    c2, _, _ = established(srv)
    assert s1.open(c2.seal(b"x")) is None
    forged = bytearray(c2.seal(b"x"))
    forged[:CID_LEN] = s1.connection_id
    assert s1.open(bytes(forged)) is None
    assert s1.open(c1.seal(b"mine")) == b"mine"


def test_limiter_bounds_handshakes_per_source() -> None:
    srv = server(limiter=HandshakeLimiter(rate=1.0, burst=3))
    results = [srv.accept(DatagramClient(PSK, now=NOW).initial_datagram(), SRC, NOW) for _ in range(5)]
    assert [r is not None for r in results] == [True, True, True, False, False]
    assert srv.accept(DatagramClient(PSK, now=NOW).initial_datagram(), ("127.0.0.3", 1), NOW) is not None


def test_misuse_is_a_security_error() -> None:
    c = DatagramClient(PSK, now=NOW)
    with pytest.raises(SecurityError):
        c.seal(b"too early")
    with pytest.raises(SecurityError, match="wall-clock"):
        DatagramClient(PSK, now=time.monotonic() % 1e6)
    with pytest.raises(SecurityError):
        DatagramClient(b"short", now=NOW)


@pytest.mark.parametrize(
    "probe",
    [
        b"",
        b"\x01",
        bytes.fromhex("000000040000000000"),
        b"GET / HTTP/1.1\r\n\r\n",
        bytes(1200),
        os.urandom(1400),
    ],
)
def test_probes_get_nothing(probe: bytes) -> None:
    srv = server()
    assert srv.accept(probe, SRC, NOW) is None
    assert DatagramClient(PSK, now=NOW).receive(probe, NOW) is None


@settings(max_examples=300, deadline=None)
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_any_tampered_handshake_datagram_gets_nothing(position: int, flip: int) -> None:
    srv = server()
    c = DatagramClient(PSK, now=NOW)
    init = bytearray(c.initial_datagram())
    init[position % len(init)] ^= flip
    assert srv.accept(bytes(init), SRC, NOW) is None
    got = srv.accept(c.initial_datagram(), SRC, NOW)
    assert got is not None
    reply = bytearray(got[1])
    reply[position % len(reply)] ^= flip
    assert c.receive(bytes(reply), NOW) is None
    assert not c.established
    c.receive(got[1], NOW)  # the genuine reply still works after the forgery
    assert c.established


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=1500))
def test_peek_never_raises(data: bytes) -> None:
    cid = peek_connection_id(data)
    assert cid is None or len(cid) == CID_LEN


def test_fuzz_100k_random_and_mutated_datagrams() -> None:
    """100,000 random and mutated datagrams at the server, a session and a client: all dropped, nothing sent,
    and every legitimate peer keeps working (bounded in count; a deadline keeps it bounded in time)."""
    rng = random.Random(20240611)
    srv = server()
    c, session, _ = established(srv)
    waiting = DatagramClient(PSK, now=NOW)
    assert srv.accept(waiting.initial_datagram(), ("127.0.0.5", 1), NOW) is not None
    samples = [
        DatagramClient(PSK, now=NOW).initial_datagram(),
        c.seal(os.urandom(1300)),
        session.seal(os.urandom(100)),
        c.seal(b""),
    ]
    deadline = time.monotonic() + 60.0
    for i in range(100_000):
        if i % 1000 == 0:
            assert time.monotonic() < deadline, f"fuzz too slow at {i}"
        kind = i % 4
        if kind == 0:
            d = rng.randbytes(rng.randrange(0, 1500))
            if rng.random() < 0.5:
                d = session.connection_id + d[CID_LEN:]
        else:
            original = rng.choice(samples)
            m = bytearray(original)
            for _ in range(rng.randint(1, 3)):
                m[rng.randrange(len(m))] ^= rng.randrange(1, 256)
            if rng.random() < 0.2:
                m = m[: rng.randrange(len(m) + 1)]
            if m == original:  # two flips of one byte cancelled out
                m = m[:-1]
            d = bytes(m)
        assert srv.accept(d, (f"10.0.{i % 256}.1", i), NOW) is None
        assert session.open(d) is None
        assert waiting.receive(d, NOW) is None
    # everyone still works
    assert session.open(c.seal(b"still here")) == b"still here"
    assert c.receive(session.seal(b"me too"), NOW) == b"me too"
    established(srv)


def test_retransmission_memory_is_bounded() -> None:
    srv = server(max_pending=16)
    for _ in range(100):
        assert srv.accept(DatagramClient(PSK, now=NOW).initial_datagram(), SRC, NOW) is not None
        assert len(srv._pending) <= 16


def test_no_key_material_in_reprs() -> None:
    c, session, srv = established()
    keys = c._hs.keys
    assert keys is not None
    for obj in (keys, session, c, srv):
        text = repr(obj)
        for secret in (PSK, keys.send, keys.receive):
            assert secret.hex() not in text
            assert repr(secret) not in text


# --- stateless reset --------------------------------------------------------------------------------------------

OTHER_PSK = bytes(32)
TOKEN_KEY, CID_KEY = reset_keys(PSK)


def minted() -> bytes:
    """A connection ID as a server holding PSK assigns them."""
    return mint_connection_id(CID_KEY)


def test_the_reset_keys_are_hkdf_sha256_of_the_psk_under_their_own_label() -> None:
    expected = HKDF(algorithm=hashes.SHA256(), length=64, salt=_RESET_LABEL, info=_RESET_LABEL).derive(PSK)
    assert reset_keys(PSK) == (expected[:32], expected[32:])
    assert PSK not in reset_keys(PSK)
    assert reset_keys(OTHER_PSK) != reset_keys(PSK)
    cid = bytes(range(8))
    token = reset_token(TOKEN_KEY, cid)
    assert token == hmac.digest(expected[:32], cid, "sha256")[:RESET_TOKEN_LEN]
    assert token != hmac.digest(PSK, cid, "sha256")[:RESET_TOKEN_LEN]  # the PSK never keys the MAC itself
    with pytest.raises(SecurityError):
        reset_token(TOKEN_KEY, b"short")
    with pytest.raises(SecurityError):
        reset_keys(b"short")


def test_connection_ids_carry_a_check_only_key_holders_can_compute() -> None:
    srv = server(server_id=b"\x09")
    cids = {established(srv)[1].connection_id for _ in range(30)}
    assert len(cids) == 30
    for cid in cids:
        assert cid[:1] == b"\x09"
        assert is_minted(CID_KEY, cid)
        assert not is_minted(reset_keys(OTHER_PSK)[1], cid)
        assert not is_minted(TOKEN_KEY, cid)  # the check and the token use different keys
        for i in range(CID_LEN):
            assert not is_minted(CID_KEY, cid[:i] + bytes([cid[i] ^ 0x01]) + cid[i + 1 :])
    assert CID_CHECK_LEN == 3
    assert not is_minted(CID_KEY, b"short")
    # random guesses: 1 in 2**24 passes
    assert sum(is_minted(CID_KEY, os.urandom(CID_LEN)) for _ in range(20_000)) <= 1
    assert mint_connection_id(CID_KEY, b"\x01\x02")[:2] == b"\x01\x02"
    with pytest.raises(SecurityError):
        mint_connection_id(CID_KEY, bytes(MAX_SERVER_ID + 1))


def test_a_new_connection_id_is_none_of_those_in_use() -> None:
    class Everything:
        def __contains__(self, _item: object) -> bool:
            return True

    srv = server()
    c = DatagramClient(PSK, now=NOW)
    assert srv.accept(c.initial_datagram(), SRC, NOW, in_use=Everything()) is None
    # the attempt was not spent: the same first datagram is answered once an ID is free
    got = srv.accept(c.initial_datagram(), SRC, NOW, in_use={b"x" * CID_LEN})
    assert got is not None
    assert c.receive(got[1], NOW) is None
    assert c.established


def test_any_server_with_the_psk_computes_the_same_token_per_connection_id() -> None:
    a, b, other = StatelessReset(PSK), StatelessReset(PSK), StatelessReset(OTHER_PSK)
    cids = [minted() for _ in range(50)]
    assert [a.token(c) for c in cids] == [b.token(c) for c in cids]
    assert len({a.token(c) for c in cids}) == len(cids)
    assert all(other.token(c) is None for c in cids)  # another key's server minted none of them
    assert all(len(a.token(c) or b"") == RESET_TOKEN_LEN for c in cids)


def test_a_server_that_lost_the_session_resets_the_client() -> None:
    c, session, _ = established()
    assert session.open(c.seal(b"before")) == b"before"
    restarted = StatelessReset(PSK)  # a new server instance: same key, no sessions
    trigger = c.seal(os.urandom(100))
    reset = restarted.answer(trigger, SRC, NOW)
    assert reset is not None
    assert c.is_reset(reset)
    assert not c.reset
    assert c.receive(reset, NOW) is None
    assert c.reset
    # a client that does not know resets sees a DATA datagram that fails authentication: dropped
    assert session.open(reset) is None


def test_a_reset_with_a_wrong_token_changes_nothing() -> None:
    c, session, _ = established()
    cid = c.connection_id
    good = StatelessReset(PSK).answer(c.seal(os.urandom(200)), SRC, NOW)
    assert good is not None
    flipped = good[:-1] + bytes([good[-1] ^ 1])
    other_key = cid + os.urandom(40) + reset_token(reset_keys(OTHER_PSK)[0], cid)
    other_cid = StatelessReset(PSK).answer(minted() + os.urandom(100), SRC, NOW)
    random_token = good[:-RESET_TOKEN_LEN] + os.urandom(RESET_TOKEN_LEN)
    too_short = good[:CID_LEN] + good[-(MIN_RESET_DATAGRAM - CID_LEN - 1) :]
    assert len(too_short) == MIN_RESET_DATAGRAM - 1
    for forged in (flipped, other_key, other_cid, random_token, too_short):
        assert forged is not None
        assert not c.is_reset(forged)
        assert c.receive(forged, NOW) is None
        assert not c.reset
    assert c.connection_id == cid
    assert c.receive(session.seal(b"still up"), NOW) == b"still up"
    assert session.open(c.seal(b"both ways")) == b"both ways"


def test_a_client_before_its_handshake_completes_knows_no_reset() -> None:
    c = DatagramClient(PSK, now=NOW)
    reset = c.connection_id + os.urandom(40) + reset_token(TOKEN_KEY, c.connection_id)
    assert not c.is_reset(reset)
    assert c.receive(reset, NOW) is None
    assert not c.reset


def test_a_reset_is_data_shaped_always_shorter_than_its_trigger_and_its_length_varies() -> None:
    resets = StatelessReset(PSK)
    cid = minted()
    for size in range(MIN_RESET_DATAGRAM + 1, 1501):
        trigger = cid + os.urandom(size - CID_LEN)
        reset = resets.answer(trigger, SRC, NOW)
        assert reset is not None
        assert MIN_RESET_DATAGRAM <= len(reset) < size
        assert len(reset) <= MAX_RESET_DATAGRAM
        assert peek_connection_id(reset) == cid
        assert reset[-RESET_TOKEN_LEN:] == resets.token(cid)
    big = cid + os.urandom(1400)
    lengths = {len(r) for r in (resets.answer(big, SRC, NOW) for _ in range(200)) if r is not None}
    assert len(lengths) > 20
    fillers = {r[CID_LEN:-RESET_TOKEN_LEN] for r in (resets.answer(big, SRC, NOW) for _ in range(20)) if r}
    assert len(fillers) == 20  # random bytes where the protected header and ciphertext would be


def test_no_reset_for_handshakes_or_datagrams_too_short_to_be_more_than_a_reset() -> None:
    """A handshake datagram starts with random salt, not a minted ID (seeded: no 1 in 2**24 chance here)."""
    resets = StatelessReset(PSK)
    entropy = random.Random(5).randbytes
    for _ in range(50):
        c = DatagramClient(PSK, now=NOW, entropy=entropy)
        init = c.initial_datagram()
        got = DatagramServer(PSK, replay=ReplayCache(), entropy=entropy).accept(init, SRC, NOW)
        assert got is not None
        assert resets.answer(init, SRC, NOW) is None
        assert resets.answer(got[1], SRC, NOW) is None
    for size in range(0, MIN_RESET_DATAGRAM + 1):
        assert resets.answer((minted() * 8)[:size], SRC, NOW) is None


def test_a_connection_id_no_key_holder_minted_gets_silence() -> None:
    """A prober's DATA-shaped datagrams are not answered: only an ID with the right check could have been a
    session of a server holding the key."""
    resets = StatelessReset(PSK, limiter=ResetLimiter(1e6, 1_000_000))
    other_key_cid = mint_connection_id(reset_keys(OTHER_PSK)[1])
    assert resets.answer(other_key_cid + os.urandom(200), SRC, NOW) is None
    answered = sum(
        resets.answer(os.urandom(CID_LEN) + os.urandom(100), SRC, NOW) is not None for _ in range(20_000)
    )
    assert answered <= 1  # 1 in 2**24 each


def test_resets_cannot_bounce_for_long_between_two_servers() -> None:
    """Two servers holding the key, neither knowing the ID, a forged source each: every answer is shorter, so
    the exchange ends in silence (the rate limits bound it as well)."""
    a, b = StatelessReset(PSK), StatelessReset(PSK)
    datagram: bytes | None = minted() + os.urandom(1400)
    rounds = 0
    while datagram is not None:
        previous = len(datagram)
        datagram = (a if rounds % 2 else b).answer(datagram, SRC, NOW)
        assert datagram is None or len(datagram) < previous
        rounds += 1
    assert rounds <= MAX_RESET_DATAGRAM - MIN_RESET_DATAGRAM + 2


def test_resets_are_rate_limited_per_source_and_in_total() -> None:
    limiter = ResetLimiter(1.0, 3, total_rate=1.0, total_burst=5)
    resets = StatelessReset(PSK, limiter=limiter)
    trigger = minted() + os.urandom(100)
    a, b, c = ("127.0.0.2", 1), ("127.0.0.3", 1), ("127.0.0.4", 1)
    assert [resets.answer(trigger, a, NOW) is not None for _ in range(5)] == [True] * 3 + [False] * 2
    # a source refused by its own bucket took nothing from the total: 2 of 5 remain
    assert [resets.answer(trigger, b, NOW) is not None for _ in range(3)] == [True, True, False]
    assert resets.answer(trigger, c, NOW) is None  # the total is spent
    assert resets.answer(trigger, c, NOW + 1.0) is not None  # both buckets refill
    assert len(limiter) == 3


def test_the_reset_limiter_keeps_bounded_memory() -> None:
    limiter = ResetLimiter(1.0, 1, max_keys=8)
    for i in range(100):
        limiter.allow(f"10.0.0.{i}", NOW)
        assert len(limiter) <= 8


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=1500), own_cid=st.booleans())
def test_random_datagrams_never_reset_a_client_nor_crash_the_reset_path(data: bytes, own_cid: bool) -> None:
    c, session, _ = established()
    if own_cid and len(data) > CID_LEN:
        data = c.connection_id + data[CID_LEN:]
    assert not c.is_reset(data)
    c.receive(data, NOW)
    assert not c.reset
    reset = StatelessReset(PSK).answer(data, SRC, NOW)
    if reset is not None:
        assert MIN_RESET_DATAGRAM <= len(reset) < len(data)
        assert reset[:CID_LEN] == data[:CID_LEN]
    assert c.receive(session.seal(b"ok"), NOW) == b"ok"


def test_no_key_material_in_the_reset_repr() -> None:
    text = repr(StatelessReset(PSK))
    for secret in (PSK, TOKEN_KEY, CID_KEY):
        assert secret.hex() not in text
        assert repr(secret) not in text


def test_only_authentic_fresh_new_first_datagrams_spend_a_sources_handshake_budget() -> None:
    """Strangers spoofing a client's address cannot lock it out: the budget pays for Diffie-Hellman only."""
    limiter = HandshakeLimiter(rate=1.0, burst=2)
    srv = server(limiter=limiter)
    answered = DatagramClient(PSK, now=NOW).initial_datagram()
    assert srv.accept(answered, ("127.0.0.9", 1), NOW) is not None  # another source's budget
    init = DatagramClient(PSK, now=NOW).initial_datagram()
    garbage = [
        os.urandom(len(init)),  # keyless: right size
        DatagramClient(bytes(32), now=NOW).initial_datagram(),  # another key
        init[:-1] + bytes([init[-1] ^ 1]),  # tampered
        DatagramClient(PSK, now=NOW - 120.0).initial_datagram(),  # authentic but stale
        DatagramClient(PSK, now=NOW + 120.0).initial_datagram(),  # authentic but from the future
        answered,  # a replay of another source's first datagram
    ]
    for _ in range(50):
        for datagram in garbage:
            assert srv.accept(datagram, SRC, NOW) is None
    # the replay of a datagram this source already had answered, after its session was confirmed
    c = DatagramClient(PSK, now=NOW)
    first = c.initial_datagram()
    got = srv.accept(first, SRC, NOW)
    assert got is not None
    c.receive(got[1], NOW)
    assert got[0].open(c.seal(b"confirm")) == b"confirm"
    for _ in range(50):
        assert srv.accept(first, SRC, NOW) is None
    # one of the two handshakes of the burst is left, then the source is refused
    assert srv.accept(DatagramClient(PSK, now=NOW).initial_datagram(), SRC, NOW) is not None
    refused = DatagramClient(PSK, now=NOW).initial_datagram()
    assert srv.accept(refused, SRC, NOW) is None
    # a refused first datagram was not remembered: its retransmission gets in once the budget is back
    assert srv.accept(refused, SRC, NOW + 1.5) is not None


def test_the_amplification_allowance_is_the_one_the_fault_tests_check() -> None:
    from tests.faults.test_path_migration import ALLOWANCE

    assert ALLOWANCE == AMPLIFICATION_FACTOR


# --- path validation ------------------------------------------------------------------------------------------

OLD = ("127.0.0.1", 40000)
NEW = ("127.0.0.1", 40001)
INJECTOR = ("127.0.0.2", 50000)


def test_control_datagrams_are_sealed_padded_share_the_counter_and_open_only_as_control() -> None:
    c, session, _ = established()
    client = c.session
    assert client is not None
    d0 = c.seal(b"data")
    challenge = client.seal_control(PathChallenge(b"12345678"))
    assert MIN_CONTROL_DATAGRAM <= len(challenge) <= MAX_CONTROL_DATAGRAM
    assert unprotect(c, challenge)[1:] == (DatagramType.CONTROL, 1)  # the next counter after d0
    assert peek_connection_id(challenge) == session.connection_id
    assert session.open(challenge) == PathChallenge(b"12345678")
    assert session.open(challenge) is None  # a replay
    assert session.open(d0) == b"data"
    tampered = bytearray(client.seal_control(PathResponse(b"abcdefgh")))
    tampered[-1] ^= 1
    assert session.open(bytes(tampered)) is None
    # the kind is authenticated: turned into DATA under the header mask, it does not open
    retyped = bytearray(client.seal_control(PathResponse(b"abcdefgh")))
    retyped[CID_LEN] ^= DatagramType.DATA ^ DatagramType.CONTROL
    assert session.open(bytes(retyped)) is None
    sizes = {len(client.seal_control(PathResponse(b"abcdefgh"))) for _ in range(400)}
    assert min(sizes) >= MIN_CONTROL_DATAGRAM
    assert max(sizes) <= MAX_CONTROL_DATAGRAM
    assert len(sizes) > 60  # no fixed size
    assert len(client.seal_control(PathResponse(b"abcdefgh"), size=77)) == 77
    with pytest.raises(SecurityError):
        client.seal_control(PathChallenge(b"short"))
    with pytest.raises(SecurityError):
        client.seal_control(PathChallenge(b"12345678"), size=MIN_CONTROL_DATAGRAM - 1)


def answer(c: DatagramClient, challenge: bytes) -> bytes:
    client = c.session
    assert client is not None
    message = c.receive(challenge, NOW)
    assert isinstance(message, PathChallenge)
    return client.seal_control(PathResponse(message.data))


def test_a_late_copy_from_another_address_gets_nothing_and_moves_nothing() -> None:
    c, session, _ = established()
    path = PeerPath(session, OLD)
    d = c.seal(b"x")
    assert path.receive(d, OLD, 0.0) == b"x"
    assert path.receive(d, INJECTOR, 0.0) is None  # a replay
    assert path.receive(c.seal(b"y"), OLD, 0.0) == b"y"
    assert path.datagrams_to_send() == []
    assert path.address == OLD
    assert path.candidate is None


def test_a_copy_that_raced_ahead_is_delivered_and_challenged_but_never_followed() -> None:
    c, session, _ = established()
    path = PeerPath(session, OLD)
    received = sent = 0
    for i in range(200):
        d = c.seal(b"%d" % i)
        assert path.receive(d, INJECTOR, i * 0.01) == b"%d" % i  # authentic: the payload is not lost
        received += len(d)
        assert path.receive(d, OLD, i * 0.01) is None  # the original is now the duplicate
        out = path.datagrams_to_send()
        assert all(address == INJECTOR for _, address in out)
        sent += sum(len(datagram) for datagram, _ in out)
        assert path.address == OLD
    assert 0 < sent <= AMPLIFICATION_FACTOR * received
    assert sent <= (200 * 0.01 / CHALLENGE_INTERVAL + 1) * MAX_CONTROL_DATAGRAM  # paced
    # an answer from the client's own address (the injector passed the challenge on) validates nothing
    challenge = c.seal(b"")
    path.receive(challenge, INJECTOR, 5.0)
    ((sealed, _),) = path.datagrams_to_send()
    assert path.receive(answer(c, sealed), OLD, 5.0) is None
    assert path.address == OLD


def test_a_real_rebinding_moves_after_the_new_address_answers() -> None:
    c, session, _ = established()
    path = PeerPath(session, OLD)
    assert path.receive(c.seal(b"a"), OLD, 0.0) == b"a"
    assert path.receive(c.seal(b"b"), NEW, 0.1) == b"b"
    assert path.address == OLD  # not yet
    ((challenge, to),) = path.datagrams_to_send()
    assert to == NEW
    assert path.receive(answer(c, challenge), NEW, 0.11) is None
    assert path.address == NEW
    assert path.candidate is None
    # the old address, validated before, is followed back at once on a newer datagram (the NAT changed back)
    assert path.receive(c.seal(b"c"), OLD, 0.2) == b"c"
    assert path.address == OLD
    assert path.datagrams_to_send() == []
    # but an older one from there moves nothing
    late = c.seal(b"d")
    assert path.receive(c.seal(b"e"), NEW, 0.3) == b"e"
    assert path.address == NEW
    assert path.receive(late, OLD, 0.3) == b"d"
    assert path.address == NEW


def test_an_answer_counts_only_if_the_clients_newest_datagrams_come_from_there() -> None:
    c, session, _ = established()
    path = PeerPath(session, OLD)
    path.receive(c.seal(b"copy"), INJECTOR, 0.0)
    ((challenge, _),) = path.datagrams_to_send()
    response = answer(c, challenge)  # suppose the injector got the client to answer and captured it
    path.receive(c.seal(b"newer"), OLD, 0.0)  # the client goes on from its own address
    assert path.receive(response, INJECTOR, 0.0) is None
    assert path.address == OLD


@pytest.mark.parametrize("now", [0.0, 1.0, 0.3, 1e9 + 0.7])
def test_a_new_address_is_challenged_at_once_whatever_the_clock_reads(now: float) -> None:
    """(``now - (now - interval)`` is less than the interval for some ``now``: no first challenge then.)"""
    c, session, _ = established()
    path = PeerPath(session, OLD)
    assert path.receive(c.seal(b"moved"), NEW, now) == b"moved"
    ((_, to),) = path.datagrams_to_send()
    assert to == NEW


def test_challenges_are_repeated_paced_and_a_late_answer_to_an_earlier_one_counts() -> None:
    c, session, _ = established()
    path = PeerPath(session, OLD)
    path.receive(c.seal(b"1"), NEW, 0.0)
    ((first, _),) = path.datagrams_to_send()
    path.receive(c.seal(b"2"), NEW, CHALLENGE_INTERVAL / 2)
    assert path.datagrams_to_send() == []  # too soon
    path.receive(c.seal(b"3"), NEW, CHALLENGE_INTERVAL)
    assert len(path.datagrams_to_send()) == 1
    path.receive(answer(c, first), NEW, CHALLENGE_INTERVAL)
    assert path.address == NEW


@settings(max_examples=200, deadline=None)
@given(
    plan=st.lists(
        st.tuples(st.sampled_from(["ahead", "behind", "only-original", "replay"]), st.integers(0, 1400)),
        min_size=1,
        max_size=80,
    )
)
def test_copies_in_any_order_never_move_a_session_nor_get_more_than_the_allowance(
    plan: list[tuple[str, int]],
) -> None:
    c, session, _ = established()
    path = PeerPath(session, OLD)
    received = sent = 0
    seen: list[bytes] = []
    for step, (how, size) in enumerate(plan):
        now = step * 0.03
        d = c.seal(bytes(size))
        if how == "replay" and seen:
            d = seen[size % len(seen)]
        seen.append(d)
        sources = {"ahead": [INJECTOR, OLD], "behind": [OLD, INJECTOR]}.get(how, [OLD])
        if how == "replay":
            sources = [INJECTOR]
        for source in sources:
            path.receive(d, source, now)
            if source == INJECTOR:
                received += len(d)
        for datagram, address in path.datagrams_to_send():
            assert address == INJECTOR
            sent += len(datagram)
        assert path.address == OLD
        assert sent <= AMPLIFICATION_FACTOR * received


def test_garbage_is_refused_before_any_noise_work() -> None:
    """A random datagram of an INIT's size passes the masked length check 1 time in 65,536 (seeded: a fixed
    count); only those are read as Noise message 1."""
    rng = random.Random(11)
    passed = sum(
        read_handshake_datagram(PSK, rng.randbytes(rng.randrange(100, 1123)), from_client=True) is not None
        for _ in range(20_000)
    )
    assert passed <= 2
    c = DatagramClient(PSK, now=NOW, entropy=rng.randbytes)
    assert read_handshake_datagram(PSK, c.initial_datagram(), from_client=True) is not None
    assert read_handshake_datagram(OTHER_PSK, c.initial_datagram(), from_client=True) is None


def session_pair(cipher: TransportCipher, seed: int) -> tuple[DatagramSession, DatagramSession]:
    """A sending and a receiving session keyed from ``seed``: the same seed gives the same keys, so two pairs
    seal the same bytes."""
    rng = random.Random(seed)
    k1, k2, ck = rng.randbytes(32), rng.randbytes(32), rng.randbytes(32)
    cid = rng.randbytes(CID_LEN)
    h = bytes(32)
    a = TransportKeys(send=k1, receive=k2, handshake_hash=h, chaining_key=ck, initiator=True)
    b = TransportKeys(send=k2, receive=k1, handshake_hash=h, chaining_key=ck, initiator=False)
    return DatagramSession(cid, a, cipher=cipher), DatagramSession(cid, b, cipher=cipher)


@settings(max_examples=100, deadline=None)
@given(
    cipher=st.sampled_from(ALL_CIPHERS),
    start=st.sampled_from([0, 2**32 - 3, 2**33 + 2**31]),
    payloads=st.lists(st.binary(max_size=1400), max_size=20),
    control_at=st.integers(0, 20),
)
def test_a_batch_seals_and_opens_exactly_as_one_by_one(
    cipher: TransportCipher, start: int, payloads: list[bytes], control_at: int
) -> None:
    """seal_many is seal for each payload in turn (the same bytes, the same counters), open_many is open for
    each datagram in turn (a CONTROL datagram among DATA ones included), across a 2**32 boundary too."""
    batch_send, batch_receive = session_pair(cipher, 1)
    one_send, one_receive = session_pair(cipher, 1)
    for s in (batch_send, one_send):
        s._send_counter = start
    for r in (batch_receive, one_receive):
        if start:
            r._window.update(start - 1)  # what it received before: the counter is rebuilt near it
    cut = min(control_at, len(payloads))
    challenge = PathChallenge(b"abcdefgh")
    sealed = [
        *batch_send.seal_many(payloads[:cut]),
        batch_send.seal_control(challenge, size=MIN_CONTROL_DATAGRAM),
        *batch_send.seal_many(payloads[cut:]),
    ]
    singles = [
        *(one_send.seal(p) for p in payloads[:cut]),
        one_send.seal_control(challenge, size=MIN_CONTROL_DATAGRAM),
        *(one_send.seal(p) for p in payloads[cut:]),
    ]
    assert sealed == singles
    assert batch_send.seal_many([]) == []
    expected = [*payloads[:cut], challenge, *payloads[cut:]]
    assert batch_receive.open_many(sealed) == expected
    assert [one_receive.open(d) for d in sealed] == expected
    assert batch_receive.open_many(sealed) == [None] * len(sealed)  # every one a replay now
    assert batch_receive.highest_received == one_receive.highest_received == start + len(payloads)
    assert batch_receive.open_many([]) == []


@settings(max_examples=150, deadline=None)
@given(
    cipher=st.sampled_from(ALL_CIPHERS),
    start=st.sampled_from([0, 2**32 - 40, 2**33 + 2**31, MAX_COUNTER - 150]),
    batches=st.lists(
        st.tuples(
            st.integers(1, 64),
            st.sampled_from(["in order", "swap", "copy", "drop", "tamper", "stranger", "control", "late"]),
            st.integers(0, 63),
        ),
        max_size=8,
    ),
    short_last=st.integers(0, 100),
)
def test_a_run_in_order_opens_at_once_and_any_other_one_by_one_as_open_does(
    cipher: TransportCipher, start: int, batches: list[tuple[int, str, int]], short_last: int
) -> None:
    """open_run takes a run as a bulk transfer's read brings it (datagrams of one size back to back, the last
    possibly shorter, in order) and refuses, changing nothing, one that loss, reordering, copies, forgeries,
    another session's datagrams or a control datagram spoil (which open_many then opens one by one): either way
    each datagram gives what open of each in turn gives, and the replay window ends where that leaves it."""
    send, batched = session_pair(cipher, 1)
    _, singles = session_pair(cipher, 1)
    stranger, _ = session_pair(cipher, 2)
    send._send_counter = start
    for r in (batched, singles):
        if start:
            r._window.update(start - 1)
    sent: list[bytes] = []
    for size, spoil, where in batches:
        if (
            send._send_counter + size + (spoil == "control") > MAX_COUNTER
        ):  # (a control datagram takes one more)
            break
        first = send._send_counter
        payloads = [bytes([i]) * (100 if i < size - 1 else 100 - short_last) for i in range(size)]
        batch: list[bytes] = list(send.seal_many(payloads))
        unspoiled = spoil == "in order" or (spoil == "swap" and size == 1) or (spoil == "late" and not sent)
        at = where % size
        if spoil == "swap" and size > 1:
            batch[at], batch[at - 1] = batch[at - 1], batch[at]
        elif spoil == "copy":
            batch.insert(at, batch[at])
        elif spoil == "drop":
            del batch[at]
        elif spoil == "tamper":
            flipped = bytearray(batch[at])
            flipped[-1] ^= 1
            batch[at] = bytes(flipped)
        elif spoil == "stranger":
            batch[at] = stranger.seal(b"x" * 100)
        elif spoil == "control":
            batch.insert(at, send.seal_control(PathChallenge(b"abcdefgh"), size=100 + DATAGRAM_OVERHEAD))
        elif spoil == "late" and sent:
            batch.insert(at, sent[where % len(sent)])
        sent.extend(batch)
        if not batch:  # (its one datagram dropped: nothing arrives)
            continue
        segment = len(batch[0])
        # what one read can bring: one size, the last possibly shorter (else each arrives on its own)
        a_run = all(len(d) == segment for d in batch[:-1]) and len(batch[-1]) <= segment
        highest = batched.highest_received
        run = batched.open_run(b"".join(batch), segment) if a_run else None
        if run is None:  # changed nothing: opened one by one (as views of the run, as they arrive)
            assert batched.highest_received == highest
            whole = memoryview(b"".join(batch))
            views = [whole[i : i + segment] for i in range(0, len(whole), segment)] if a_run else batch
            opened = batched.open_many(views)
        else:
            opened = list(run)
        assert opened == [singles.open(d) for d in batch]
        assert batched.highest_received == singles.highest_received
        if unspoiled and first == highest + 1 and first % 2**32 + size <= 2**32:
            assert (
                run is not None
            )  # a batch in order is opened at once (not one whose low 32 bits wrap: rare)
    for n in range(max(0, singles.highest_received - 4200), singles.highest_received + 70):
        assert batched._window.check(n) == singles._window.check(n)


def test_a_run_too_short_to_hold_its_datagrams_changes_nothing() -> None:
    """open_run of an empty buffer opens nothing; a run whose last datagram (or whose segment) is shorter than a
    datagram's overhead is refused whole, changing nothing, as is a run of another connection ID."""
    send, receive = session_pair(TransportCipher.AES_256_GCM, 1)
    _, twin = session_pair(TransportCipher.AES_256_GCM, 1)
    sealed = send.seal_many([b"a" * 50, b"b" * 50, b"c"])
    assert receive.open_run(b"", 100) == []
    assert receive.open_run(b"".join(sealed[:2]) + bytes(DATAGRAM_OVERHEAD - 1), len(sealed[0])) is None
    assert receive.open_run(bytes(3 * (DATAGRAM_OVERHEAD - 1)), DATAGRAM_OVERHEAD - 1) is None
    stranger, _ = session_pair(TransportCipher.AES_256_GCM, 2)
    assert receive.open_run(b"".join(stranger.seal_many([b"a" * 50] * 2)), len(sealed[0])) is None
    assert receive.highest_received == -1
    assert receive.open_run(b"".join(sealed), len(sealed[0])) == [b"a" * 50, b"b" * 50, b"c"]
    assert twin.open_run(sealed[0], len(sealed[0])) == [b"a" * 50]  # a run of one: the datagram itself
    assert receive.highest_received == 2


def documented_datagram(
    cipher: TransportCipher, keys: TransportKeys, cid: bytes, kind: int, n: int, payload: bytes
) -> bytes:
    """A DATA or CONTROL datagram built from the layout in the module's documentation, step by step."""
    if cipher == TransportCipher.AES_256_GCM:
        aead: AESGCM | ChaCha20Poly1305 = AESGCM(keys.send)
        nonce = bytes(4) + n.to_bytes(8, "big")
    else:
        aead = ChaCha20Poly1305(keys.send)
        nonce = bytes(4) + n.to_bytes(8, "little")
    protected = bytes((kind,)) + (n % 2**32).to_bytes(4, "big")
    body = aead.encrypt(nonce, payload, cid + protected)
    header_key = keys.derive(HEADER_KEY_LABEL)[0]
    mask = Cipher(algorithms.AES(header_key), modes.ECB()).encryptor().update(body[:16])
    return cid + bytes(a ^ b for a, b in zip(protected, mask, strict=False)) + body


@settings(max_examples=60, deadline=None)
@given(
    cipher=st.sampled_from(ALL_CIPHERS),
    start=st.sampled_from([0, 2**32 - 3, 2**33 + 2**31, MAX_COUNTER - 30]),
    payloads=st.lists(st.binary(max_size=1400), max_size=20),
)
def test_a_batch_is_the_documented_layout_byte_for_byte(
    cipher: TransportCipher, start: int, payloads: list[bytes]
) -> None:
    """The wire of seal_many and seal_control, counter by counter (across a 2**32 boundary too), is the
    documented layout built independently; open_many opens such datagrams."""
    rng = random.Random(1)  # session_pair(cipher, 1)'s keys
    k1, k2, ck = rng.randbytes(32), rng.randbytes(32), rng.randbytes(32)
    cid = rng.randbytes(CID_LEN)
    keys = TransportKeys(send=k1, receive=k2, handshake_hash=bytes(32), chaining_key=ck, initiator=True)
    send, receive = session_pair(cipher, 1)
    send._send_counter = start
    if start:
        receive._window.update(start - 1)
    sealed = send.seal_many(payloads)
    control = send.seal_control(PathChallenge(b"abcdefgh"), size=MIN_CONTROL_DATAGRAM)
    documented = [
        documented_datagram(cipher, keys, cid, DatagramType.DATA, start + i, p)
        for i, p in enumerate(payloads)
    ]
    challenge = struct.pack(">B8s", 1, b"abcdefgh")
    n = start + len(payloads)
    assert sealed == documented
    assert control == documented_datagram(cipher, keys, cid, DatagramType.CONTROL, n, challenge)
    twin, _ = session_pair(cipher, 1)
    twin._send_counter = start
    assert twin.seal_run(payloads) == b"".join(documented)  # the same datagrams, back to back in one buffer
    assert twin._send_counter == start + len(payloads)
    assert receive.open_many([*documented, control]) == [*payloads, PathChallenge(b"abcdefgh")]


def test_the_prologue_stays_v4() -> None:
    """Retiring DATA-PT changed nothing a peer checks: the handshake's prologue is still v4's."""
    assert DATAGRAM_PROLOGUE == b"vtunnel datagram v4"


@pytest.mark.parametrize("kind", [0x05, 0x00, 0x06, 0xFF])
@pytest.mark.parametrize("cipher", ALL_CIPHERS)
def test_a_datagram_of_a_retired_or_unknown_kind_is_dropped_silently(
    cipher: TransportCipher, kind: int
) -> None:
    """A datagram sealed under the session's keys with a kind that is neither DATA nor CONTROL (05, DATA-PT,
    retired; or one never defined) opens to nothing, alone or in a batch, and moves nothing: the counter it
    carries still opens as DATA afterwards, and the datagrams around it open as they would without it."""
    rng = random.Random(1)  # session_pair(cipher, 1)'s keys
    k1, k2, ck = rng.randbytes(32), rng.randbytes(32), rng.randbytes(32)
    cid = rng.randbytes(CID_LEN)
    keys = TransportKeys(send=k1, receive=k2, handshake_hash=bytes(32), chaining_key=ck, initiator=True)
    send, receive = session_pair(cipher, 1)
    assert kind not in set(DatagramType)
    odd = documented_datagram(cipher, keys, cid, kind, 0, b"x" * 200)
    assert receive.open(odd) is None
    assert receive.highest_received == -1
    assert not receive.confirmed
    first, second = send.seal_many([b"first", b"second"])
    odd = documented_datagram(cipher, keys, cid, kind, 2, b"y" * 200)
    assert receive.open_many([first, odd, second]) == [b"first", None, b"second"]
    assert receive.open_run(odd, len(odd)) is None
    assert receive.highest_received == 1
    assert receive.open(send.seal(b"third")) == b"third"  # counter 2: the odd datagram did not take it


FATES = ("intact", "flipped", "truncated", "replayed", "duplicated", "other session", "other key", "garbage")


@settings(max_examples=200, deadline=None)
@given(
    cipher=st.sampled_from(ALL_CIPHERS),
    fates=st.lists(st.sampled_from(FATES), min_size=1, max_size=24),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 7)), min_size=24, max_size=24),
    order=st.randoms(use_true_random=False),
)
def test_forged_or_replayed_datagrams_in_a_batch_are_dropped_and_the_others_open(
    cipher: TransportCipher, fates: list[str], flips: list[tuple[int, int]], order: random.Random
) -> None:
    """Whatever subset of a batch is forged (a bit flipped anywhere, cut short, another session's, under
    another key, random bytes), replayed (opened before) or duplicated, and in whatever order the batch comes,
    exactly the authentic new datagrams open, each to its own payload, and the answers are those of opening
    them one by one."""
    send, receive = session_pair(cipher, 2)
    twin_send, twin_receive = session_pair(cipher, 2)
    _, stranger = session_pair(cipher, 3)  # another session: another connection ID and keys
    stranger_send, _ = session_pair(cipher, 3)
    other_key = DatagramSession(
        send.connection_id,
        TransportKeys(
            send=bytes(32),
            receive=bytes(32),
            handshake_hash=bytes(32),
            chaining_key=bytes(32),
            initiator=True,
        ),
        cipher=cipher,
    )
    old = send.seal_many([b"old %d" % i for i in range(3)])
    assert twin_send.seal_many([b"old %d" % i for i in range(3)]) == old
    assert receive.open_many(old) == twin_receive.open_many(old) == [b"old 0", b"old 1", b"old 2"]
    payloads = [b"payload %d" % i + bytes(i * 37 % 300) for i in range(len(fates))]
    sealed = send.seal_many(payloads)
    batch: list[bytes] = []
    authentic: dict[bytes, bytes] = {}  # datagram -> payload, for those that must open
    for i, (fate, d) in enumerate(zip(fates, sealed, strict=True)):
        if fate == "flipped":
            position, bit = flips[i]
            forged = bytearray(d)
            forged[position % len(d)] ^= 1 << bit
            d = bytes(forged)
        elif fate == "truncated":
            d = d[: flips[i][0] % len(d)]
        elif fate == "replayed":
            d = old[i % len(old)]
        elif fate == "other session":
            d = stranger_send.seal(payloads[i])
        elif fate == "other key":
            d = other_key.seal(payloads[i])
        elif fate == "garbage":
            d = send.connection_id + random.Random(i).randbytes(flips[i][0] % 1400 + 21)
        else:
            authentic[d] = payloads[i]
        batch.append(d)
        if fate == "duplicated":
            batch.append(d)
    order.shuffle(batch)
    expected: list[bytes | None] = []
    for d in batch:  # of two copies, the first in the batch opens
        expected.append(authentic.pop(d, None))
    got = receive.open_many(batch)
    assert got == expected
    assert [twin_receive.open(d) for d in batch] == expected
    assert stranger.highest_received == -1
    # nothing refused moved the window: every authentic datagram not yet opened still opens
    missing = [d for d, fate in zip(sealed, fates, strict=True) if fate not in ("intact", "duplicated")]
    assert receive.open_many(missing) == [payloads[sealed.index(d)] for d in missing]


def test_a_batch_that_would_exhaust_the_counter_is_refused_whole() -> None:
    send, receive = session_pair(TransportCipher.AES_256_GCM, 4)
    send._send_counter = MAX_COUNTER - 2
    with pytest.raises(SecurityError, match="exhausted"):
        send.seal_many([b"a", b"b", b"c"])
    last = send.seal_many([b"a", b"b"])  # counters 2**64 - 3 and 2**64 - 2: nothing was spent
    with pytest.raises(SecurityError, match="exhausted"):
        send.seal(b"c")
    receive._window.update(MAX_COUNTER - 3)
    assert receive.open_many(last) == [b"a", b"b"]


@given(
    server_id=st.binary(max_size=2),
    slots=st.integers(1, 256),
    data=st.data(),
)
def test_a_layouts_connection_ids_name_its_slot(server_id: bytes, slots: int, data: st.DataObject) -> None:
    slot = data.draw(st.integers(0, slots - 1))
    layout = ConnectionIdLayout(server_id=server_id, slot=slot, slots=slots)
    srv = server(layout=layout)
    for _ in range(3):
        cid = established(srv)[1].connection_id
        assert cid.startswith(server_id)
        assert connection_id_slot(cid, len(server_id), slots) == slot
        assert is_minted(CID_KEY, cid)


def test_a_layout_is_checked() -> None:
    for bad in (
        {"server_id": b"123"},
        {"slots": 0},
        {"slots": 257},
        {"slot": 4, "slots": 4},
        {"slot": -1, "slots": 4},
    ):
        with pytest.raises(SecurityError):
            ConnectionIdLayout(**bad)


# --- connection ID rotation ---------------------------------------------------------------------------------


def spare_issued() -> tuple[DatagramClient, PeerPath, DatagramServer, bytes]:
    """An established session whose server issued a spare ID, announced it, and had it confirmed."""
    c, session, srv = established()
    path = PeerPath(session, SRC)
    assert path.needs_spare
    assert session.user is not None
    spare = srv.free_connection_id(session.user, {session.connection_id})
    assert spare is not None
    assert spare != session.connection_id
    path.issue(spare)
    assert not path.needs_spare
    ((announcement, to),) = path.announcements(NOW)
    assert to == SRC
    assert path.announcements(NOW + 0.01) == []
    assert len(path.announcements(NOW + 1.0)) == 1
    assert spare not in announcement  # the new ID travels sealed only
    message = c.receive(announcement, NOW)
    assert message == NewConnectionId(spare)
    client_session = c.session
    assert client_session is not None
    client_session.add_connection_id(spare)
    assert path.receive(client_session.seal_control(ConnectionIdSeen(spare)), SRC, NOW) is None
    assert path.spare == spare
    assert path.announcements(NOW + 2.0) == []
    return c, path, srv, spare


def test_a_move_takes_the_session_to_the_spare_and_the_client_follows() -> None:
    c, path, _, spare = spare_issued()
    client = c.session
    assert client is not None
    old = client.connection_id
    moved = ("127.0.0.1", 40001)
    # the client's datagrams from its new address still carry the old ID: it cannot know yet
    assert path.receive(c.seal(b"from the new port"), moved, NOW) == b"from the new port"
    ((challenge, to),) = path.datagrams_to_send()
    assert to == moved
    assert challenge[:CID_LEN] == spare
    message = c.receive(challenge, NOW)
    assert isinstance(message, PathChallenge)
    assert client.follow_newest()
    assert client.connection_id == spare
    response = client.seal_control(PathResponse(message.data))
    assert response[:CID_LEN] == spare
    path.receive(response, moved, NOW)
    assert path.address == moved
    assert path.session.connection_id == spare
    assert path.needs_spare
    data = path.session.seal(b"to the new port")
    assert data[:CID_LEN] == spare
    assert c.receive(data, NOW) == b"to the new port"
    # a late datagram down the old path under the old ID opens, and does not take the client back
    assert old in client.connection_ids
    assert not client.follow_newest()


def test_an_older_id_never_takes_the_client_back() -> None:
    c, path, _, spare = spare_issued()
    client = c.session
    assert client is not None
    old = client.connection_id
    path.session.use_connection_id(spare)
    assert c.receive(path.session.seal(b"new"), NOW) == b"new"
    assert client.follow_newest()
    # a reordered datagram sealed before the switch: opens, changes nothing
    client.newest_connection_id = old
    assert not client.follow_newest()
    assert client.connection_id == spare


def test_each_connection_id_has_its_own_reset_token() -> None:
    c, path, _, spare = spare_issued()
    client = c.session
    assert client is not None
    path.session.use_connection_id(spare)
    assert c.receive(path.session.seal(b"new"), NOW) == b"new"
    assert client.follow_newest()
    trigger = c.seal(os.urandom(100))
    assert trigger[:CID_LEN] == spare
    reset = StatelessReset(PSK).answer(trigger, SRC, NOW)
    assert reset is not None
    assert reset[:CID_LEN] == spare
    assert c.is_reset(reset)
    forged = spare + reset[CID_LEN:-RESET_TOKEN_LEN] + reset_token(reset_keys(PSK)[0], minted())
    assert not c.is_reset(forged)


def test_a_session_holds_a_bounded_number_of_ids_and_never_drops_the_one_in_use() -> None:
    _, session, srv = established()
    assert session.user is not None
    current = session.connection_id
    for _ in range(10):
        cid = srv.free_connection_id(session.user, set(session.connection_ids))
        assert cid is not None
        session.add_connection_id(cid)
        assert len(session.connection_ids) <= MAX_CONNECTION_IDS
        assert current in session.connection_ids
    with pytest.raises(SecurityError):
        session.use_connection_id(os.urandom(CID_LEN))
    with pytest.raises(SecurityError):
        session.seal_control(PathChallenge(bytes(8)), connection_id=os.urandom(CID_LEN))
