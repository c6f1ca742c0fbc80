"""rudp's path MTU discovery: the search's state machine alone, and two connections in virtual time on paths
whose MTU is known (and changes mid-transfer)."""

from __future__ import annotations

import heapq

from hypothesis import given, settings
from hypothesis import strategies as st

from vtunnel.arq.rudp.connection import Connection, RudpConfig
from vtunnel.arq.rudp.connection import Role as ConnRole
from vtunnel.arq.rudp.pmtu import BLACK_HOLE_EVENTS, MAX_PROBES, QUIC_MIN_SIZE, RAISE_INTERVAL, PathMtu
from vtunnel.testing.netpath import Path
from vtunnel.testing.rudpsim import simulate_bulk

#: what the transport tries over IPv4 without a key (LINK_MTUS less 28 bytes of headers, up to 65000)
PROBES = (1392, 1464, 1472, 8972, 65000)
PMTUD = RudpConfig(path_mtu_discovery=True, probe_sizes=PROBES)


# --- the search alone ---------------------------------------------------------------------------------------


def climb(pmtu: PathMtu, path_mtu: int, now: float = 0.0) -> None:
    """Probe until the search ends: a probe arrives when the path carries it."""
    for _ in range(100):
        size = pmtu.probe_due(now)
        if not size:
            return
        pmtu.on_probe_sent(size)
        if size <= path_mtu:
            pmtu.on_probe_acked(now)
        else:
            pmtu.on_probe_lost(now)
    raise AssertionError("the search never ended")


def test_the_search_climbs_to_the_largest_size_the_path_carries() -> None:
    pmtu = PathMtu(base=1350, candidates=PROBES, now=0.0)
    climb(pmtu, 1472)
    assert pmtu.size == 1472
    assert not pmtu.searching
    assert pmtu.probe_due(RAISE_INTERVAL - 1) == 0


def test_a_size_is_given_up_only_after_max_probes_losses_in_a_row() -> None:
    pmtu = PathMtu(base=1350, candidates=(8972,), now=0.0)
    for _ in range(MAX_PROBES - 1):
        assert pmtu.probe_due(0.0) == 8972
        pmtu.on_probe_sent(8972)
        pmtu.on_probe_lost(0.0)
        assert pmtu.searching
    assert pmtu.probe_due(0.0) == 8972
    pmtu.on_probe_sent(8972)
    assert pmtu.probe_due(0.0) == 0  # one probe in flight at a time
    pmtu.on_probe_lost(0.0)
    assert not pmtu.searching
    assert pmtu.size == 1350


def test_the_raise_timer_tries_the_failed_size_again() -> None:
    pmtu = PathMtu(base=1350, candidates=(8972,), now=0.0)
    climb(pmtu, 1500)
    assert pmtu.size == 1350
    assert pmtu.next_search() == RAISE_INTERVAL
    assert pmtu.probe_due(RAISE_INTERVAL) == 8972  # the path may carry it now
    climb(pmtu, 9000, RAISE_INTERVAL)
    assert pmtu.size == 8972


def test_a_black_hole_falls_to_the_floor_and_the_search_climbs_again() -> None:
    pmtu = PathMtu(base=1350, candidates=PROBES, now=0.0)
    climb(pmtu, 65535)
    assert pmtu.size == 65000
    for event in range(BLACK_HOLE_EVENTS):
        fell = pmtu.on_lost(65000, 1.0 + event, 1.0)
        assert fell == (event == BLACK_HOLE_EVENTS - 1)
    assert pmtu.size == pmtu.floor == QUIC_MIN_SIZE
    climb(pmtu, 1400, 1.0)  # the new path's MTU
    assert pmtu.size == 1392


def test_losses_of_large_packets_within_a_short_span_are_no_black_hole() -> None:
    """A queue that overflowed drops a run of full packets, declared lost in several events within a round
    trip: not a black hole until the events span the time the caller names."""
    pmtu = PathMtu(base=1350, candidates=(), now=0.0)
    for event in range(10):
        assert not pmtu.on_lost(1350, 1.0 + event * 0.01, 0.5)
    assert pmtu.on_lost(1350, 1.5, 0.5)
    assert pmtu.size == pmtu.floor


def test_a_large_packet_acknowledged_between_losses_is_no_black_hole() -> None:
    pmtu = PathMtu(base=1350, candidates=(), now=0.0)
    for _ in range(10 * BLACK_HOLE_EVENTS):
        assert not pmtu.on_lost(1350, 1.0, 0.0)
        assert not pmtu.on_lost(1350, 1.0, 0.0)
        pmtu.on_acked(1350)
    assert pmtu.size == 1350


def test_a_loss_that_took_small_packets_too_is_the_paths_not_the_mtus() -> None:
    pmtu = PathMtu(base=1350, candidates=(), now=0.0)
    for _ in range(10 * BLACK_HOLE_EVENTS):
        assert not pmtu.on_lost(80, 1.0, 0.0)
    assert pmtu.size == 1350


@settings(max_examples=300, deadline=None)
@given(
    base=st.integers(256, 9000),
    candidates=st.lists(st.integers(256, 65000), max_size=6),
    events=st.lists(
        st.tuples(
            st.sampled_from(["probe", "acked", "lost", "ack", "loss", "wait"]), st.integers(256, 65000)
        ),
        max_size=60,
    ),
)
def test_the_search_keeps_its_invariants(
    base: int, candidates: list[int], events: list[tuple[str, int]]
) -> None:
    """Whatever happens: the size in use is the floor, the base or a candidate; a probe is larger than it and a
    candidate; a probe is due only with none in flight; the size grows only by an acknowledged probe."""
    pmtu = PathMtu(base=base, candidates=candidates, now=0.0)
    allowed = {pmtu.floor, base, *candidates}
    now = 0.0
    for kind, value in events:
        before = pmtu.size
        if kind == "probe":
            size = pmtu.probe_due(now)
            if size:
                assert size > pmtu.size
                assert size in allowed
                pmtu.on_probe_sent(size)
                assert pmtu.probe_due(now) == 0
        elif kind == "acked" and pmtu.probe_size:
            probe = pmtu.probe_size
            assert pmtu.on_probe_acked(now) == probe
        elif kind == "lost":
            pmtu.on_probe_lost(now)
        elif kind == "ack":
            pmtu.on_acked(value)
        elif kind == "loss":
            pmtu.on_lost(value, now, 0.5)
        else:
            now += value / 100
        assert pmtu.size in allowed
        assert pmtu.size >= pmtu.floor
        if pmtu.size > before:
            assert kind == "acked"


# --- two connections ------------------------------------------------------------------------------------------


def test_a_transfer_finds_each_paths_mtu_and_stays_byte_exact() -> None:
    for path_mtu, expected in ((1472, 1472), (1500, 1472), (9000, 8972), (None, 65000)):
        result = simulate_bulk(
            size=4 << 20, forward=Path(delay=0.005, rate=50e6, mtu=path_mtu), config=PMTUD, seed=3
        )
        assert result.complete, path_mtu
        assert result.exact, path_mtu
        stats = result.sender
        assert stats["packet_size"] == expected, path_mtu
        assert stats["pmtu_black_holes"] == 0, path_mtu  # (the queue's overflow in startup is none)
        # the largest size that does not fit is tried MAX_PROBES times (and a probe may also meet a full queue)
        assert result.forward.too_large == (0 if path_mtu is None else MAX_PROBES)
        assert int(stats["pmtu_probes_lost"]) >= result.forward.too_large


def test_without_discovery_the_packets_stay_the_configured_size() -> None:
    result = simulate_bulk(size=1 << 20, forward=Path(delay=0.005, rate=50e6), config=RudpConfig(), seed=3)
    assert result.complete
    assert result.exact
    assert result.sender["packet_size"] == 1350
    assert result.sender["pmtu_probes"] == 0


def test_a_path_narrower_than_the_base_still_connects_at_the_floor() -> None:
    result = simulate_bulk(
        size=1 << 20, forward=Path(delay=0.005, rate=50e6, mtu=1300), config=PMTUD, seed=3, time_limit=60
    )
    assert result.complete
    assert result.exact
    assert result.sender["packet_size"] == QUIC_MIN_SIZE
    assert result.sender["pmtu_black_holes"] == 1


def shrinking_path_transfer(size: int, *, first_mtu: int, then_mtu: int, at: int) -> tuple[bytes, Connection]:
    """``size`` bytes client -> server over a 2 ms path whose MTU drops from ``first_mtu`` to ``then_mtu``
    once the server has read ``at`` bytes; returns what the server read, and the client."""
    payload = bytes(range(256)) * (size // 256)
    client = Connection(role=ConnRole.CLIENT, local_cid=b"", peer_cid=b"s", config=PMTUD, now=0.0)
    server = Connection(role=ConnRole.SERVER, local_cid=b"s", peer_cid=b"", config=PMTUD, now=0.0)
    ends = (client, server)
    heap: list[tuple[float, int, int, bytes]] = []
    received = bytearray()
    written = 0
    seq = 0
    now = 0.0
    mtu = first_mtu

    def transmit(index: int) -> None:
        nonlocal seq
        for datagram in ends[index].datagrams_to_send(now):
            if len(datagram) <= mtu:
                seq += 1
                heapq.heappush(heap, (now + 0.001, seq, 1 - index, datagram))

    for _ in range(2_000_000):
        if len(received) >= size or now > 60:
            break
        if written < size:
            written += client.send(payload[written : written + 65536])
            if written == size:
                client.end_stream()
        transmit(0)
        transmit(1)
        deadlines = [d for d in (client.next_deadline(), server.next_deadline()) if d is not None]
        step = min([*deadlines, heap[0][0]] if heap else deadlines)
        now = max(now, step)
        while heap and heap[0][0] <= now:
            _, _, to, datagram = heapq.heappop(heap)
            ends[to].receive_datagram(datagram, now)
        for end in ends:
            deadline = end.next_deadline()
            if deadline is not None and deadline <= now:
                end.handle_timer(now)
        received += server.receive()
        if len(received) >= at:
            mtu = then_mtu
    return bytes(received), client


def test_an_mtu_that_shrinks_mid_transfer_is_a_black_hole_and_loses_nothing() -> None:
    size = 4 << 20
    data, client = shrinking_path_transfer(size, first_mtu=65535, then_mtu=1400, at=size // 4)
    assert data == bytes(range(256)) * (size // 256)
    stats = client.stats()
    assert stats["pmtu_black_holes"] == 1
    assert stats["packet_size"] == 1392  # the floor, then the base, then WireGuard's size: 1464 does not fit
    # the datagrams the layer above was promised keep their size through it all
    fixed = Connection(role=ConnRole.CLIENT, local_cid=b"", peer_cid=b"s", config=RudpConfig(), now=0.0)
    assert client.max_datagram_payload() == fixed.max_datagram_payload()
