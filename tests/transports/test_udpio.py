"""Batched UDP I/O: what goes out through segmentation offload arrives as the same datagrams, in order."""

from __future__ import annotations

import socket

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtunnel.transports.udpio import Address, DatagramSocket, open_udp_socket

pytestmark = pytest.mark.anyio


async def _exchange(sizes: list[int]) -> list[bytes]:
    received: list[bytes] = []
    done = anyio.Event()
    want = len(sizes)

    def on_batch(batch: list[tuple[bytes, Address]]) -> None:
        received.extend(d for d, _ in batch)
        if len(received) >= want:
            done.set()

    rx = DatagramSocket(open_udp_socket(socket.AF_INET, bind=("127.0.0.1", 0)), on_batch)
    tx = DatagramSocket(open_udp_socket(socket.AF_INET), lambda batch: None)
    try:
        datagrams = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
        tx.sendto_many(datagrams, rx.local_address)
        with anyio.fail_after(5):
            await done.wait()
        assert received == datagrams
        return received
    finally:
        rx.close()
        tx.close()


async def test_runs_of_equal_datagrams_and_a_short_tail() -> None:
    await _exchange([1350] * 100 + [700] + [1350] * 3 + [24, 24, 24, 1000])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([24, 100, 1300, 1350, 1400]), min_size=1, max_size=150))
def test_any_mix_arrives_intact(sizes: list[int]) -> None:
    anyio.run(_exchange, sizes)
