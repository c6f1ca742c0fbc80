"""What a passive observer sees of a secured byte stream: the bytes of records and of handshake messages are
indistinguishable from random by their byte distribution.

For each kind of unit, the first 64 bytes of 10,000 of them go through Pearson's chi-squared test of uniform
byte values (255 degrees of freedom), over all 640,000 bytes together and at each of the 64 offsets (10,000
bytes each, Bonferroni-corrected), at the significance level ``ALPHA`` (see :mod:`tests.security.randomness`).
Every random byte comes from one seeded generator (the ``entropy`` the sans-IO classes take), so each statistic
is a fixed number and the test is deterministic: it cannot flake. What stays visible (sizes, timing) is in
docs/security.md.
"""

from __future__ import annotations

import random
import struct

import pytest

from tests.security.randomness import PREFIX, SEED, UNITS, failures, seeded
from vtunnel.security.records import SecureStreamClient, SecureStreamServer
from vtunnel.security.replay import ReplayCache

PSK = bytes(range(32))
NOW = 1_700_000_000.0


def handshakes() -> tuple[list[bytes], list[bytes]]:
    """``UNITS`` first messages and as many replies, as sent on the wire."""
    entropy = seeded()
    replay = ReplayCache(max_entries=2 * UNITS)
    firsts, replies = [], []
    for _ in range(UNITS):
        c = SecureStreamClient(PSK, now=NOW, entropy=entropy)
        s = SecureStreamServer(PSK, replay=replay, entropy=entropy)
        first = c.data_to_send()
        s.receive_data(first, NOW)
        firsts.append(first)
        replies.append(s.data_to_send())
    return firsts, replies


def records() -> list[bytes]:
    """``UNITS`` records of zeros (varied sizes, at least 64 bytes on the wire) from one client."""
    entropy = seeded()
    c = SecureStreamClient(PSK, now=NOW, entropy=entropy)
    s = SecureStreamServer(PSK, replay=ReplayCache(), entropy=entropy)
    s.receive_data(c.data_to_send(), NOW)
    c.receive_data(s.data_to_send(), NOW)
    rng = random.Random(SEED)
    out = []
    for _ in range(UNITS):
        c.send(bytes(rng.randrange(PREFIX, 1500)))
        out.append(c.data_to_send())
    return out


def test_the_check_sees_a_clear_length_prefix() -> None:
    """The test has the power to fail: random bodies behind a clear u16 length (the v2 layout) are caught."""
    rng = random.Random(SEED)
    samples = []
    for _ in range(UNITS):
        body = rng.randbytes(rng.randrange(PREFIX, 1500))
        samples.append(struct.pack(">H", len(body)) + body)
    assert any("offset 0" in f for f in failures(samples))
    assert failures([rng.randbytes(PREFIX) for _ in range(UNITS)]) == []


@pytest.mark.timeout(120)
def test_handshake_messages_look_random() -> None:
    firsts, replies = handshakes()
    assert failures(firsts) == []
    assert failures(replies) == []
    # and their sizes are not fixed
    assert len({len(m) for m in firsts}) > 400
    assert len({len(m) for m in replies}) > 200


def test_records_look_random() -> None:
    samples = records()
    assert len(samples) == UNITS
    assert failures(samples) == []
