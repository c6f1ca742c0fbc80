"""What a passive observer sees of sealed datagrams (kcp:// with a key): but for a session's connection ID, the
bytes of DATA, CONTROL, INIT, REPLY and stateless reset datagrams are indistinguishable from random by their
byte distribution, and so are the connection IDs a server mints.

For each kind, the first 64 bytes of 10,000 datagrams, without the connection ID's 8 where there is one, go
through Pearson's chi-squared test of uniform byte values (:mod:`tests.security.randomness`): over all those
bytes together and at each offset on its own, Bonferroni-corrected. Every random byte comes from one seeded
generator (the ``entropy`` the sans-IO classes take), so each statistic is a fixed number and the test is
deterministic: it cannot flake. What stays visible (sizes, timing, the connection ID) is in docs/security.md.
"""

from __future__ import annotations

import random
import struct

import pytest

from tests.security.randomness import PREFIX, SEED, UNITS, failures, seeded
from vtunnel.security.datagram import (
    CID_LEN,
    DATAGRAM_OVERHEAD,
    MAX_CONTROL_DATAGRAM,
    MIN_CONTROL_DATAGRAM,
    ConnectionIdLayout,
    DatagramClient,
    DatagramServer,
    DatagramSession,
    PathChallenge,
    PathResponse,
    PeerPath,
    StatelessReset,
    mint_connection_id,
    reset_keys,
)
from vtunnel.security.replay import ReplayCache

PSK = bytes(range(32))
NOW = 1_700_000_000.0
CID = range(CID_LEN)  # the offsets of a DATA-shaped datagram's connection ID


def established(entropy: random.Random) -> tuple[DatagramClient, DatagramSession]:
    c = DatagramClient(PSK, now=NOW, entropy=entropy.randbytes)
    got = DatagramServer(PSK, replay=ReplayCache(), entropy=entropy.randbytes).accept(
        c.initial_datagram(), ("127.0.0.1", 1), NOW
    )
    assert got is not None
    assert c.receive(got[1], NOW) is None
    return c, got[0]


def handshakes() -> tuple[list[bytes], list[bytes], list[bytes]]:
    """``UNITS`` first datagrams, their replies and the connection IDs assigned, as one server makes them."""
    entropy = seeded()
    server = DatagramServer(PSK, replay=ReplayCache(max_entries=2 * UNITS), entropy=entropy)
    inits, replies, cids = [], [], []
    for _ in range(UNITS):
        init = DatagramClient(PSK, now=NOW, entropy=entropy).initial_datagram()
        got = server.accept(init, ("127.0.0.1", 1), NOW)
        assert got is not None
        inits.append(init)
        replies.append(got[1])
        cids.append(got[0].connection_id)
    return inits, replies, cids


def test_the_check_sees_a_clear_type_and_counter() -> None:
    """The test has the power to fail: v2's layout (type byte, CID, clear u64 counter, then ciphertext) is
    caught with the CID's offsets left out, and random bytes are not."""
    rng = random.Random(SEED)
    samples = [
        b"\x03" + rng.randbytes(CID_LEN) + struct.pack(">Q", n) + rng.randbytes(rng.randrange(PREFIX, 1400))
        for n in range(UNITS)
    ]
    found = failures(samples, skip=range(1, 1 + CID_LEN))
    assert any("offset 0" in f for f in found)
    assert any("offset 9" in f for f in found)
    assert failures([rng.randbytes(rng.randrange(40, 200)) for _ in range(UNITS)]) == []


def test_data_datagrams_look_random_but_for_the_connection_id() -> None:
    """One session's DATA datagrams (payloads of zeros, varied sizes), both ways."""
    rng = random.Random(SEED)
    c, session = established(rng)
    samples = []
    for i in range(UNITS):
        payload = bytes(rng.randrange(PREFIX - DATAGRAM_OVERHEAD, 1400))
        samples.append(c.seal(payload) if i % 2 else session.seal(payload))
    assert failures(samples, skip=CID) == []


def test_control_datagrams_look_random_and_their_sizes_vary() -> None:
    """Path challenges, as a server sends them to a new address, and the client's responses."""
    rng = random.Random(SEED)
    c, session = established(rng)
    client = c.session
    assert client is not None
    path = PeerPath(session, ("127.0.0.1", 1))
    samples = []
    for i in range(UNITS // 2):
        path.receive(c.seal(bytes(100)), ("127.0.0.1", 2 + i), float(i))  # a new address each time
        ((challenge, _),) = path.datagrams_to_send()
        message = c.receive(challenge, NOW)
        assert isinstance(message, PathChallenge)
        samples += [challenge, client.seal_control(PathResponse(message.data))]
    assert failures(samples, skip=CID) == []
    sizes = {len(s) for s in samples}
    assert min(sizes) == MIN_CONTROL_DATAGRAM
    assert max(sizes) == MAX_CONTROL_DATAGRAM
    assert len(sizes) == MAX_CONTROL_DATAGRAM - MIN_CONTROL_DATAGRAM + 1


@pytest.mark.timeout(180)
def test_handshake_datagrams_and_connection_ids_look_random() -> None:
    inits, replies, cids = handshakes()
    assert failures(inits) == []
    assert failures(replies) == []
    # their sizes are not fixed either
    assert len({len(m) for m in inits}) > 350
    assert len({len(m) for m in replies}) > 200
    # the connection IDs a server mints without a server id: 5 random bytes and 3 of a MAC
    assert failures(cids, prefix=CID_LEN) == []


def test_stateless_resets_look_like_data() -> None:
    """Each for another lost session (a connection ID's token is the same in all its resets)."""
    rng = random.Random(SEED)
    resets = StatelessReset(PSK, entropy=rng.randbytes)
    cid_key = reset_keys(PSK)[1]
    samples = []
    for _ in range(UNITS):
        cid = mint_connection_id(cid_key, entropy=rng.randbytes)
        reset = resets.answer(cid + rng.randbytes(rng.randrange(300, 1400)), ("127.0.0.1", 1), 0.0)
        assert reset is not None
        samples.append(reset)
    assert failures(samples, skip=CID) == []


@pytest.mark.parametrize("slots", [2, 6, 256])
def test_connection_ids_steered_to_a_worker_slot_look_random_byte_by_byte(slots: int) -> None:
    """A worker's connection IDs: their random bytes sum to its slot modulo the slots, yet each byte on its own
    is uniform (docs/security.md says what the sum tells an observer)."""
    rng = random.Random(SEED)
    cid_key = reset_keys(PSK)[1]
    layout = ConnectionIdLayout(slot=slots // 2, slots=slots)
    cids = [mint_connection_id(cid_key, layout=layout, entropy=rng.randbytes) for _ in range(UNITS)]
    assert failures(cids, prefix=CID_LEN) == []
