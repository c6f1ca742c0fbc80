"""rudp in the virtual-time simulator: byte-exact delivery under loss, duplication and reordering; a fuzz run of
mutated datagrams that disturbs nothing; two flows on one bottleneck converge to a fair share."""

from __future__ import annotations

import random

import pytest

from vtunnel.arq.rudp.connection import Connection, Role, RudpConfig
from vtunnel.arq.rudp.wire import WireError, decode_packet
from vtunnel.testing.netpath import Fate, Path
from vtunnel.testing.rudpsim import simulate_bulk, simulate_flows

KiB = 1024
MiB = 1024 * KiB


def lossy(loss: float) -> Path:
    return Path(rate=5e6, queue=128 * KiB, delay=0.01, loss=loss, duplicate=0.02, reorder=0.02, jitter=0.002)


@pytest.mark.parametrize("loss", [0.0, 0.02, 0.05, 0.10, 0.20])
@pytest.mark.parametrize("cc", ["bbr", "cubic", "newreno"])
def test_byte_exact_under_loss_duplication_and_reordering(loss: float, cc: str) -> None:
    size = 256 * KiB if loss >= 0.1 and cc != "bbr" else MiB
    result = simulate_bulk(size=size, forward=lossy(loss), config=RudpConfig(cc=cc), seed=7, time_limit=120.0)
    assert result.complete, result
    assert result.exact, result
    assert result.forward.duplicated > 0


def test_a_send_buffer_full_of_unacknowledged_data_does_not_read_as_an_idle_sender() -> None:
    """bbr at 50 MB/s and 20 ms RTT: the send buffer fills with data in flight, which is the path's doing, not an
    idle application's; the model must still take those rounds, leave startup and stop overrunning the
    bottleneck's queue (it once stayed in startup and lost 43% of its packets there)."""
    path = Path(rate=50e6, queue=256 * KiB, delay=0.01)
    result = simulate_bulk(size=16 * MiB, forward=path, config=RudpConfig(cc="bbr"), seed=1)
    assert result.exact
    assert result.sender["phase"] != "startup"
    assert result.forward.queue_dropped < 0.2 * result.forward.sent


def test_datagrams_and_the_stream_share_the_path() -> None:
    result = simulate_bulk(size=MiB, forward=lossy(0.05), config=RudpConfig(datagram_queue=8), seed=3)
    assert result.exact


def _corpus(seed: int) -> list[bytes]:
    captured: list[bytes] = []

    def tap(direction: int, datagram: bytes, fate: Fate) -> None:
        if len(captured) < 2000:
            captured.append(datagram)

    simulate_bulk(size=256 * KiB, forward=lossy(0.05), seed=seed, tap=tap)
    return captured


def _mutate(rng: random.Random, datagram: bytes) -> bytes:
    data = bytearray(datagram)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.4 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif choice < 0.6 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice < 0.75:
            del data[rng.randrange(len(data) + 1) :]
        elif choice < 0.9:
            position = rng.randrange(len(data) + 1)
            data[position:position] = rng.randbytes(rng.randint(1, 16))
        else:
            cut = rng.randrange(len(data) + 1)
            data[cut:] = rng.randbytes(rng.randint(0, 40))
    return bytes(data)


def test_fuzz_mutated_datagrams_raise_only_wire_error_and_disturb_no_session() -> None:
    """20k mutations of real datagrams: parsing raises WireError or nothing; a live transfer that receives every
    mutant that does not parse, or parses with another connection ID (one by one, or in a run with its own
    packets), stays byte-exact; connections that are fed the mutants that do parse never raise."""
    rng = random.Random(20240)
    corpus = _corpus(5)
    unparsable: list[bytes] = []
    parsable: list[bytes] = []
    for _ in range(20_000):
        mutant = _mutate(rng, rng.choice(corpus))
        try:
            packet = decode_packet(mutant)
        except WireError:
            unparsable.append(mutant)
            continue
        (parsable if packet.dcid in (b"\xc0\x00", b"\x5e\x00") else unparsable).append(mutant)
    assert len(unparsable) > 1000
    assert len(parsable) > 1000

    # a live transfer with the garbage injected on both sides
    injected = iter(unparsable)
    victims: list[Connection] = []

    def tap(direction: int, datagram: bytes, fate: Fate) -> None:
        return None

    size = 512 * KiB
    client = Connection(role=Role.CLIENT, local_cid=b"\xc0\x00", peer_cid=b"\x5e\x00", now=0.0)
    server = Connection(role=Role.SERVER, local_cid=b"\x5e\x00", peer_cid=b"\xc0\x00", now=0.0)
    payload = random.Random(1).randbytes(size)
    client.send(payload)
    received = bytearray()
    now = 0.0
    for _ in range(20_000):
        moved = False
        for source, sink in ((client, server), (server, client)):
            for datagram in source.datagrams_to_send(now):
                moved = True
                if rng.random() < 0.05:
                    continue  # lost
                junks = [junk for junk in (next(injected, None) for _ in range(3)) if junk is not None]
                if rng.random() < 0.5:  # one by one, or as the link hands over a run it read at once
                    for junk in junks:
                        assert sink.receive_datagram(junk, now) == []
                    sink.receive_datagram(datagram, now)
                else:
                    junks.insert(rng.randrange(len(junks) + 1), datagram)
                    sink.receive_datagrams(junks, now)
        received += server.receive()
        if len(received) == size:
            break
        if not moved:
            deadlines = [d for d in (client.next_deadline(), server.next_deadline()) if d is not None]
            now = max(now + 0.001, min(deadlines))
            client.handle_timer(now)
            server.handle_timer(now)
        else:
            now += 0.0005
    assert bytes(received) == payload
    assert int(server.stats()["packets_dropped"]) > 0

    # mutants that parse, against throwaway connections, one by one and in runs of 8 (as a GRO read hands them
    # over): faults close them, nothing raises
    for index, mutant in enumerate(parsable):
        if index % 200 == 0:
            victims = [
                Connection(role=Role.CLIENT, local_cid=b"\xc0\x00", peer_cid=b"\x5e\x00", now=0.0),
                Connection(role=Role.SERVER, local_cid=b"\x5e\x00", peer_cid=b"\xc0\x00", now=0.0),
            ]
            victims[0].send(b"x" * 5000)
            victims[0].datagrams_to_send(0.0)
        run = parsable[index : index + 8] if index % 8 == 0 else []
        for victim in victims:
            victim.receive_datagram(mutant, 0.01 * index)
            if run:
                victim.receive_datagrams(run, 0.01 * index)
            victim.datagrams_to_send(0.01 * index)
            victim.handle_timer(0.01 * index)
            victim.receive()


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


@pytest.mark.parametrize(
    ("cc", "rate", "queue"),
    [
        ("newreno", 1.25e6, 48 * KiB),
        ("cubic", 1.25e6, 48 * KiB),
        ("bbr", 1.25e6, 48 * KiB),
        ("bbr", 12.5e6, 256 * KiB),
    ],
)
def test_two_flows_on_one_bottleneck_converge_to_a_fair_share(cc: str, rate: float, queue: int) -> None:
    bottleneck = Path(rate=rate, queue=queue, delay=0.01)
    duration = 12.0
    flows, _, _ = simulate_flows(
        sizes=[1 << 40, 1 << 40],
        starts=[0.0, 1.0],
        forward=bottleneck,
        configs=[RudpConfig(cc=cc)] * 2,
        time_limit=duration,
        seed=11,
    )
    shares = [flow.delivered_between(4.0, duration) for flow in flows]
    assert all(flow.exact for flow in flows)
    assert sum(shares) > 0.8 * rate * (duration - 4.0)  # the bottleneck stays busy
    assert jain([float(s) for s in shares]) >= 0.95, shares
