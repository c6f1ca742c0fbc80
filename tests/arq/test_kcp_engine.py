"""The sans-IO KCP adapter, driven with a virtual clock and an in-memory lossy network."""

from __future__ import annotations

import random
import struct
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtunnel.arq.kcp_engine import KCPEngine, KCPEngineError
from vtunnel.arq.kcp_options import KCPOptions
from vtunnel.arq.kcp_wire import RunVerdict, valid_datagram, vet_run
from vtunnel.transports.kcp.options import parse_options

OPTS = parse_options({"sndwnd": "128", "rcvwnd": "128"})


def pair(options: KCPOptions = OPTS, conv: int = 77) -> tuple[KCPEngine, KCPEngine]:
    return (
        KCPEngine(conv=conv, options=options, mtu=options.mtu, now=0.0),
        KCPEngine(conv=conv, options=options, mtu=options.mtu, now=0.0),
    )


def run_transfer(
    payload: bytes, *, loss: float, duplicate: float, reorder: float, seed: int, max_steps: int = 20_000
) -> bytes:
    """Send ``payload`` from a to b through a lossy network in virtual time; return what b received."""
    a, b = pair()
    rng = random.Random(seed)
    received = bytearray()
    now = 0.0
    a.send(payload)
    a.flush(now)
    wires: list[list[bytes]] = [[], []]  # to b, to a

    def carry(datagrams: list[bytes], wire: list[bytes]) -> None:
        for d in datagrams:
            if rng.random() < loss:
                continue
            copies = 2 if rng.random() < duplicate else 1
            for _ in range(copies):
                if wire and rng.random() < reorder:
                    wire.insert(rng.randrange(len(wire)), d)
                else:
                    wire.append(d)

    for _ in range(max_steps):
        carry(a.datagrams_to_send(), wires[0])
        carry(b.datagrams_to_send(), wires[1])
        if wires[0]:
            batch, wires[0] = wires[0], []
            for d in batch:
                assert valid_datagram(d, 77)
                b.receive_datagram(d, now)
            b.flush(now)
        if wires[1]:
            batch, wires[1] = wires[1], []
            for d in batch:
                a.receive_datagram(d, now)
            a.flush(now)
        while chunk := b.receive(4096):
            received += chunk
        if len(received) >= len(payload) and a.waiting() == 0:
            break
        deadlines = [t for t in (a.next_deadline(now), b.next_deadline(now)) if t is not None]
        now = max(now + 0.001, min(deadlines)) if deadlines else now + 0.01
        a.handle_timer(now)
        b.handle_timer(now)
    a.close()
    b.close()
    return bytes(received)


def test_clean_transfer_is_byte_exact() -> None:
    payload = random.Random(1).randbytes(300_000)
    assert run_transfer(payload, loss=0, duplicate=0, reorder=0, seed=1) == payload


@settings(max_examples=15, deadline=None)
@given(
    size=st.integers(1, 60_000),
    loss=st.floats(0, 0.3),
    duplicate=st.floats(0, 0.3),
    reorder=st.floats(0, 0.5),
    seed=st.integers(0, 2**32),
)
def test_impaired_transfer_is_byte_exact(
    size: int, loss: float, duplicate: float, reorder: float, seed: int
) -> None:
    payload = random.Random(seed).randbytes(size)
    assert run_transfer(payload, loss=loss, duplicate=duplicate, reorder=reorder, seed=seed) == payload


def test_quiet_session_has_no_deadline_and_busy_one_has() -> None:
    a, b = pair()
    assert a.next_deadline(0.0) is None
    a.send(b"x" * 5000)
    deadline = a.next_deadline(0.0)
    assert deadline is not None
    assert 0.0 <= deadline <= 0.0 + OPTS.interval / 1000.0 + 1e-9
    a.flush(0.0)
    for d in a.datagrams_to_send():
        b.receive_datagram(d, 0.001)
    b.flush(0.001)
    for d in b.datagrams_to_send():
        a.receive_datagram(d, 0.002)
    assert a.waiting() == 0
    assert a.next_deadline(0.002) is None
    assert b.receive(10_000) == b"x" * 5000
    a.close()
    b.close()


def test_receive_respects_max_bytes() -> None:
    a, b = pair()
    a.send(b"abcdefghij" * 1000)
    a.flush(0.0)
    for d in a.datagrams_to_send():
        b.receive_datagram(d, 0.0)
    got = bytearray()
    while chunk := b.receive(7):
        assert len(chunk) <= 7
        got += chunk
    assert bytes(got) == b"abcdefghij" * 1000
    a.close()
    b.close()


def test_unanswered_data_makes_the_link_dead() -> None:
    a, _b = pair()
    a.send(b"hello")
    now = 0.0
    for _ in range(100_000):  # ikcp backs off to minutes of virtual time before it gives up
        a.flush(now)
        a.datagrams_to_send()  # into the void
        if a.dead:
            break
        deadline = a.next_deadline(now)
        assert deadline is not None
        now = max(deadline, now + 0.001)
        a.handle_timer(now)
    assert a.dead


def test_garbage_input_is_refused_and_harmless() -> None:
    a, b = pair()
    assert not b.receive_datagram(b"\x00" * 3, 0.0)
    assert not b.receive_datagram(b"\xff" * 40, 0.0)
    a.send(b"ok")
    a.flush(0.0)
    for d in a.datagrams_to_send():
        assert b.receive_datagram(d, 0.0)
    assert b.receive(100) == b"ok"
    a.close()
    b.close()


def test_close_is_final() -> None:
    a, _b = pair()
    a.close()
    a.close()
    assert a.closed
    assert not a.dead
    assert a.next_deadline(0.0) is None
    assert a.receive(10) == b""
    assert not a.receive_datagram(b"x" * 30, 0.0)
    with pytest.raises(KCPEngineError):
        a.send(b"late")


def test_bad_mtu_is_an_engine_error() -> None:
    with pytest.raises(KCPEngineError):
        KCPEngine(conv=1, options=OPTS, mtu=10, now=0.0)


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=0, max_value=2**32), st.integers(min_value=1, max_value=60))
def test_a_run_without_acks_input_whole_is_input_one_by_one(seed: int, count: int) -> None:
    """A coalesced run of PUSH datagrams given to ikcp as one input leaves it exactly as one by one would."""
    fast3 = parse_options({"mode": "fast3", "sndwnd": "128", "rcvwnd": "128"})
    sender = KCPEngine(conv=77, options=fast3, mtu=fast3.mtu, now=0.0)
    one_by_one, whole = pair(fast3)
    assert whole.whole_runs
    rng = random.Random(seed)
    sender.send(rng.randbytes(sender.max_data * count))
    sender.flush(0.0)
    datagrams = sender.datagrams_to_send()
    picked = [rng.choice(datagrams) for _ in range(len(datagrams))] + datagrams  # repeats, any order
    rng.shuffle(picked)
    assert vet_run(b"".join(picked), max(len(d) for d in picked), 77) == RunVerdict.NO_ACKS
    one_by_one.receive_datagrams(picked, 0.01)
    whole.receive_datagrams([b"".join(picked)], 0.01)
    for engine in (one_by_one, whole):
        engine.flush(0.01)
    assert one_by_one.datagrams_to_send() == whole.datagrams_to_send()  # the same ACKs, in the same order
    assert one_by_one.receive(1 << 20) == whole.receive(1 << 20)
    for engine in (sender, one_by_one, whole):
        engine.close()


def test_presets_allow_whole_runs_only_without_congestion_window() -> None:
    assert KCPEngine(conv=1, options=parse_options({"mode": "fast3"}), mtu=1350, now=0.0).whole_runs
    assert KCPEngine(conv=1, options=parse_options({"mode": "normal"}), mtu=1350, now=0.0).whole_runs
    assert not KCPEngine(
        conv=1, options=parse_options({"mode": "fast3", "nc": "0"}), mtu=1350, now=0.0
    ).whole_runs


def fill(engine: KCPEngine) -> int:
    """Queue what the engine's room allows (no ACK ever comes) and flush; returns segments waiting."""
    now = 0.0
    for _ in range(64):
        room = engine.room()
        if room <= 0:
            break
        engine.send(bytes(room * engine.max_data))
        now += 0.001
        engine.flush(now)
        engine.datagrams_to_send()
    return engine.waiting()


def test_a_paced_writer_queues_about_the_pacers_window_not_the_whole_send_window() -> None:
    paced = KCPEngine(conv=5, options=parse_options({}), mtu=1350, now=0.0)
    unpaced = KCPEngine(conv=5, options=parse_options({"pacing": "off"}), mtu=1350, now=0.0)
    assert paced.send_window == 4096
    # unpaced, ikcp puts its whole window on the wire at once, so the default stays at kcptun's 1024
    assert unpaced.send_window == 1024
    # a send window sized for long lossy paths must not let one writer queue seconds ahead of the others
    assert fill(paced) <= 512
    assert not paced.writable()
    assert fill(unpaced) == 1024
    assert not unpaced.writable()


@pytest.mark.parametrize("pacing", ["on", "off"])
def test_write_is_send_and_flush_and_refuses_a_full_window(pacing: str) -> None:
    """``write`` queues and flushes at once (the data is on the wire, the owed ACKs with it), says how many
    segments were waiting before it, and does nothing at all where ``room()`` says there is none."""
    a = KCPEngine(conv=77, options=parse_options({"pacing": pacing}), mtu=1350, now=0.0)
    b = KCPEngine(conv=77, options=parse_options({"pacing": pacing}), mtu=1350, now=0.0)
    assert a.write(b"request", 0.001) == 0
    for datagram in a.datagrams_to_send():
        assert b.receive_datagram(datagram, 0.002)
    assert b.receive(100) == b"request"
    assert b.write(b"answer", 0.003) == 0  # the answer carries the ACK of the request
    (answer,) = b.datagrams_to_send()
    assert a.waiting() == 1
    assert a.receive_datagram(answer, 0.004)
    assert a.note_acks(0.004) == 0  # acknowledged by the answer: nothing waits
    assert a.receive(100) == b"answer"
    assert a.write(b"x" * 3000, 0.005) == 0
    assert a.write(b"y", 0.005) == 3
    a.datagrams_to_send()
    fill(a)
    assert a.room() <= 0
    waiting = a.waiting()
    assert a.write(b"refused", 0.5) == -1
    assert a.waiting() == waiting
    assert a.datagrams_to_send() == []
    a.close()
    with pytest.raises(KCPEngineError):
        a.write(b"late", 1.0)


def acks_in(datagram: bytes) -> list[tuple[int, int]]:
    """(sn, ts) of the ACK segments of a datagram made only of ACKs."""
    assert len(datagram) % 24 == 0
    out = []
    for conv, cmd, _frg, _wnd, ts, sn, _una, length in struct.iter_unpack("<IBBHIIII", datagram):
        assert (conv, cmd, length) == (77, 82, 0)
        out.append((sn, ts))
    return out


def deliver(sender: KCPEngine, receiver: KCPEngine, now: float) -> list[bytes]:
    """Data from sender to receiver; returns the receiver's ACK datagrams."""
    for datagram in sender.datagrams_to_send():
        receiver.receive_datagram(datagram, now)
    receiver.flush(now)
    return receiver.datagrams_to_send()


@pytest.mark.parametrize("repeat", [True, False])
def test_each_ack_rides_again_in_the_next_datagram_of_acks(repeat: bool) -> None:
    options = replace(OPTS, ackrepeat=repeat, pacing=False)
    a, b = pair(options)
    a.send(bytes(a.max_data * 3))  # three segments now, three 4 ms later
    a.flush(0.0)
    first = deliver(a, b, 0.010)
    a.send(bytes(a.max_data * 3))
    a.flush(0.004)
    second = deliver(a, b, 0.014)
    assert [sn for sn, _ in acks_in(first[0])] == [0, 1, 2]
    acked = acks_in(second[0])
    if not repeat:
        assert [sn for sn, _ in acked] == [3, 4, 5]
        return
    assert [sn for sn, _ in acked] == [3, 4, 5, 0, 1, 2]
    # the repeat's timestamps move on by the 4 ms in between, so the round trip the sender measures stays true
    assert [ts for _, ts in acked[3:]] == [ts + 4 for _, ts in acks_in(first[0])]
    # the first datagram of ACKs is lost: the second still clears everything, nothing is sent again
    for datagram in second:
        a.receive_datagram(datagram, 0.020)
    a.flush(0.020)
    assert a.waiting() == 0
    assert a.datagrams_to_send() == []


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(st.integers(1, 80), min_size=1, max_size=6), mtu=st.sampled_from([300, 576, 1350]))
def test_repeated_acks_keep_datagrams_valid_and_within_the_mtu(batches: list[int], mtu: int) -> None:
    options = replace(OPTS, mtu=mtu, sndwnd=1024, rcvwnd=1024, pacing=False)
    a = KCPEngine(conv=77, options=options, mtu=mtu, now=0.0)
    b = KCPEngine(conv=77, options=options, mtu=mtu, now=0.0)
    now = 0.0
    for count in batches:
        a.send(bytes(a.max_data * count))
        now += 0.003
        a.flush(now)
        for datagram in deliver(a, b, now):
            assert len(datagram) <= mtu
            assert valid_datagram(datagram, 77)
            a.receive_datagram(datagram, now)
        a.flush(now)
        a.datagrams_to_send()
    assert a.waiting() == 0
