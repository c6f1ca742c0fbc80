"""Batched UDP I/O: what goes out through segmentation offload arrives as the same datagrams, in order."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtunnel.io.datagrams import (
    GSO_MAX_BYTES,
    GSO_MAX_SEGMENTS,
    LONE_BYTES,
    Address,
    CoalescingSocket,
    DatagramSocket,
    Run,
    forbid_fragmentation,
    open_udp_socket,
    segment_runs,
    split_run,
)

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


async def _exchange_runs(
    sizes: list[int], senders: int = 1, *, gro: bool = True, family: socket.AddressFamily = socket.AF_INET
) -> list[list[tuple[bytes, Address]]]:
    """Send ``sizes`` from each of ``senders`` sockets to a coalescing socket; per sender, what arrived."""
    arrived: list[tuple[bytes, Address]] = []
    runs_seen: list[Run] = []
    done = anyio.Event()
    want = len(sizes) * senders

    def on_runs(runs: list[Run]) -> None:
        for buffer, segment, source in runs:
            runs_seen.append((buffer, segment, source))
            arrived.extend((bytes(datagram), source) for datagram in split_run(buffer, segment))
        if len(arrived) >= want:
            done.set()

    loopback = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    rx = CoalescingSocket(open_udp_socket(family, bind=(loopback, 0)), on_runs, gro=gro)
    txs = [DatagramSocket(open_udp_socket(family), lambda batch: None) for _ in range(senders)]
    try:
        sent: list[list[bytes]] = []
        for k, tx in enumerate(txs):
            datagrams = [bytes([(i + k) % 251]) * size for i, size in enumerate(sizes)]
            sent.append(datagrams)
            tx.sendto_many(datagrams, rx.local_address)
        with anyio.fail_after(5):
            await done.wait()
        assert len(arrived) == want
        per_sender = [[(d, src) for d, src in arrived if src[1] == tx.local_address[1]] for tx in txs]
        for datagrams, got in zip(sent, per_sender, strict=True):
            assert [d for d, _ in got] == datagrams
        if sys.platform == "linux":
            assert rx.coalescing == gro
        if not gro:
            assert all(len(buffer) == segment for buffer, segment, _ in runs_seen)
        if rx.coalescing and len(sizes) > 1 and len(set(sizes)) == 1:
            assert any(len(buffer) > segment for buffer, segment, _ in runs_seen)  # a run came in one read
        return per_sender
    finally:
        rx.close()
        for tx in txs:
            tx.close()


async def test_coalesced_runs_split_back_into_the_datagrams_sent() -> None:
    await _exchange_runs([1350] * 100 + [700] + [1350] * 3 + [24, 24, 24, 1000])


async def test_a_run_of_equal_datagrams_is_read_at_once() -> None:
    await _exchange_runs([1200] * 40)


async def test_runs_from_several_sources_keep_their_source() -> None:
    await _exchange_runs([1000] * 20 + [300], senders=3)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([24, 100, 1300, 1350, 1400]), min_size=1, max_size=150))
def test_any_mix_arrives_intact_through_a_coalescing_socket(sizes: list[int]) -> None:
    anyio.run(_exchange_runs, sizes)


async def test_without_gro_every_run_is_one_datagram() -> None:
    await _exchange_runs([1350] * 30 + [24], senders=2, gro=False)


async def test_coalescing_over_ipv6_loopback() -> None:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
    except OSError:
        pytest.skip("no IPv6 on this host")
    await _exchange_runs([1200] * 30 + [100], family=socket.AF_INET6)


@pytest.mark.parametrize("answer", [True, False])
@pytest.mark.parametrize("gro", [True, False])
async def test_a_lone_small_datagram_first_is_handed_over_alone(gro: bool, answer: bool) -> None:
    """The first datagram of a wakeup, lone and small (a request's answer), goes up in a batch of its own
    before the socket is read on. When the handler sent something for it, what was queued behind it follows in
    the next batch of the same wakeup; when it sent nothing, the wakeup ends there and the next wakeup (the
    socket is still readable) takes the rest, in order, nothing lost. A large one first does not: the whole
    wakeup is one batch."""
    batches: list[list[bytes]] = []

    def on_runs(runs: list[Run]) -> None:
        batches.append([bytes(d) for buffer, segment, _ in runs for d in split_run(buffer, segment)])
        if answer:
            rx.sendto(b"ack", tx.local_address)

    rx = CoalescingSocket(open_udp_socket(socket.AF_INET, bind=("127.0.0.1", 0)), on_runs, gro=gro)
    tx = DatagramSocket(open_udp_socket(socket.AF_INET, bind=("127.0.0.1", 0)), lambda batch: None)
    try:
        for first in (100, LONE_BYTES + 1):
            batches.clear()
            sent = [b"a" * first, b"b" * 300, b"c" * 700]
            for datagram in sent:  # all queued before the loop looks at the socket
                tx.sendto(datagram, rx.local_address)
            with anyio.fail_after(5):
                while sum(map(len, batches)) < len(sent):
                    await anyio.sleep(0.01)
            if first > LONE_BYTES:
                assert batches == [sent]
            elif answer:
                assert batches == [sent[:1], sent[1:]]
            else:  # (the second is lone and small too when its wakeup reads it first)
                assert batches == [sent[:1], sent[1:2], sent[2:]]
    finally:
        rx.close()
        tx.close()


def test_split_run() -> None:
    data = bytes(range(250))
    assert [bytes(d) for d in split_run(data, 100)] == [data[:100], data[100:200], data[200:]]
    assert [bytes(d) for d in split_run(data, 250)] == [data]
    assert [bytes(d) for d in split_run(data, 0)] == [data]


def greedy_runs(sizes: list[int]) -> list[tuple[int, int]]:
    """The kernel's rule applied datagram by datagram: each run as long as it may be."""
    runs: list[tuple[int, int]] = []
    i, n = 0, len(sizes)
    while i < n:
        size, j, total = sizes[i], i + 1, sizes[i]
        while j < n and j - i < GSO_MAX_SEGMENTS and total + sizes[j] <= GSO_MAX_BYTES and sizes[j] <= size:
            total += sizes[j]
            j += 1
            if sizes[j - 1] < size:
                break
        runs.append((i, j))
        i = j
    return runs


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(
        st.lists(
            st.one_of(st.sampled_from([24, 100, 1000, 1300, 1321, 1350, 1400]), st.integers(1, 65000)),
            max_size=300,
        ),
        st.tuples(st.integers(1, 100), st.sampled_from([1321, 1350]), st.integers(1, 1350)).map(
            lambda t: [t[1]] * t[0] + [t[2]]  # a bulk batch: full datagrams, then a tail
        ),
    ),
    st.sampled_from([0, 0, 29]),
)
def test_segment_runs_cut_a_batch_as_the_kernel_takes_it(given_sizes: list[int], grow: int) -> None:
    """Runs cover the batch in order; each is equal sizes but a shorter last one, within the segment and byte
    limits once each datagram grew by ``grow`` bytes (a sealer's); and they are the longest runs the rule
    allows, as taken datagram by datagram."""
    runs = segment_runs(given_sizes, grow)
    sizes = [size + grow for size in given_sizes]
    assert [i for start, end in runs for i in range(start, end)] == list(range(len(sizes)))
    for start, end in runs:
        run = sizes[start:end]
        assert len(run) <= GSO_MAX_SEGMENTS
        assert len(run) == 1 or sum(run) <= GSO_MAX_BYTES
        assert all(size == run[0] for size in run[:-1])
        assert run[-1] <= run[0]
    assert runs == greedy_runs(sizes)


async def _send_runs(sizes: list[int], *, gso: bool) -> None:
    received: list[bytes] = []
    done = anyio.Event()

    def on_runs(runs: list[Run]) -> None:
        received.extend(bytes(d) for buffer, segment, _ in runs for d in split_run(buffer, segment))
        if len(received) >= len(sizes):
            done.set()

    rx = CoalescingSocket(open_udp_socket(socket.AF_INET, bind=("127.0.0.1", 0)), on_runs)
    tx = DatagramSocket(open_udp_socket(socket.AF_INET), lambda batch: None)
    if not gso:
        tx._gso = False  # as where Linux has no segmentation offload: each datagram sent on its own
    try:
        datagrams = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
        runs = [(b"".join(datagrams[start:end]), sizes[start]) for start, end in segment_runs(sizes)]
        tx.send_runs(runs, rx.local_address)
        with anyio.fail_after(5):
            await done.wait()
        assert received == datagrams
        assert tx.sent == len(sizes)
    finally:
        rx.close()
        tx.close()


@pytest.mark.parametrize("gso", [True, False])
async def test_runs_sent_as_they_are_arrive_as_their_datagrams(gso: bool) -> None:
    await _send_runs([1350] * 100 + [700] + [1350] * 3 + [24, 24, 24, 1000, 5], gso=gso)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([24, 100, 1300, 1350, 1400]), min_size=1, max_size=150))
def test_any_mix_sent_in_runs_arrives_intact(sizes: list[int]) -> None:
    anyio.run(partial(_send_runs, sizes, gso=True))


@pytest.mark.skipif(sys.platform != "linux", reason="Linux's IP_MTU_DISCOVER")
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_forbidding_fragmentation_sets_the_probe_mode(family: socket.AddressFamily) -> None:
    """IP_PMTUDISC_PROBE (3): the don't-fragment bit on every datagram, whatever the kernel's path MTU cache says;
    the default (IP_PMTUDISC_WANT, 1) would cut a datagram larger than the link into fragments."""
    level, option = (socket.IPPROTO_IP, 10) if family == socket.AF_INET else (socket.IPPROTO_IPV6, 23)
    with open_udp_socket(family) as sock:
        assert sock.getsockopt(level, option) != 3
        forbid_fragmentation(sock)
        assert sock.getsockopt(level, option) == 3


def test_a_probe_larger_than_the_link_in_a_segmented_send_loses_only_itself(mtu_netns: str) -> None:
    """A batch led by a datagram larger than the link's MTU (a path MTU probe) is one segmented send, which Linux
    refuses whole (EINVAL): the probe alone is lost, the rest leave, and segmentation offload stays in use."""
    out = subprocess.run(
        ["ip", "netns", "exec", mtu_netns, sys.executable, "-m", "tests.io.gso_mtu_run"],
        capture_output=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    result = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert sorted(result["received"]) == [1472] * 10
    assert result["sent"] == 10
    assert result["dropped"] == 1
    assert not result["gave_up_gso"]
