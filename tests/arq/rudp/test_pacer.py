"""rudp's token bucket: when a packet may leave, and when a sender held back comes back."""

from __future__ import annotations

import pytest

from vtunnel.arq.rudp.cc import Pacer

RATE = 10e6  # bytes/s: the bucket holds 4 ms of it, 40 kB


def _drained() -> Pacer:
    pacer = Pacer(max_datagram_size=1000, initial_burst=10_000)
    assert pacer.release_time(0.0, RATE, 1000) == 0.0
    pacer.on_sent(10_000)  # the whole initial bucket went out at once
    return pacer


def test_a_drained_bucket_releases_the_next_packet_after_its_tokens() -> None:
    pacer = _drained()
    assert pacer.release_time(0.0, RATE, 1000) == pytest.approx(1000 / RATE)


def test_a_sender_held_back_comes_back_for_a_quarter_of_the_bucket() -> None:
    """Not for each packet's worth of tokens (a loop timer and a sendmsg per packet): for 10 kB, a batch."""
    pacer = _drained()
    pacer.release_time(0.0, RATE, 1000)
    assert pacer.wake_time(0.0, RATE, 1000, queued=1 << 20) == pytest.approx(10_000 / RATE)
    # with less queued than that, as soon as it can all go; never before one packet may
    assert pacer.wake_time(0.0, RATE, 1000, queued=3000) == pytest.approx(3000 / RATE)
    assert pacer.wake_time(0.0, RATE, 1000, queued=10) == pytest.approx(1000 / RATE)


def test_the_batch_it_comes_back_for_is_released_at_once() -> None:
    pacer = _drained()
    pacer.release_time(0.0, RATE, 1000)
    wake = pacer.wake_time(0.0, RATE, 1000, queued=1 << 20)
    sent = 0
    while pacer.release_time(wake, RATE, 1000) <= wake:
        pacer.on_sent(1000)
        sent += 1
    assert sent == 10
