"""Two KCP engines on an emulated path, in virtual time: for tests and for tuning, never for timing claims.

The path is :mod:`vtunnel.testing.netpath` (the impairment relay's model without sockets). Engines are driven
as the runtime drives them: every batch of datagrams that arrives at one instant is input, then flushed; timers
fire at the engines' deadlines.
Nothing reads a clock, so a run is a pure function of its arguments (and seed).

    python -m vtunnel.testing.kcpsim --rate 50m --queue 262144 --delay 0.005 --loss 0.02 --mib 16
"""

from __future__ import annotations

import argparse
import heapq
import random
from collections.abc import Callable, Sequence

from vtunnel.arq.kcp_engine import KCPEngine
from vtunnel.arq.kcp_options import KCPOptions
from vtunnel.testing.netpath import (
    Fate,
    Path,
    PathStats,
    SimResult,
    Wire,
    add_path_arguments,
    path_from_arguments,
)
from vtunnel.transports.kcp.options import parse_options

__all__ = ["Path", "PathStats", "SimResult", "simulate_bulk"]

MiB = 1024 * 1024


def simulate_bulk(
    *,
    size: int,
    forward: Path,
    backward: Path | None = None,
    options: KCPOptions | None = None,
    seed: int = 1,
    time_limit: float = 60.0,
    max_events: int = 5_000_000,
    timer_lag: float = 0.0,
    tap: Callable[[int, bytes, Fate], None] | None = None,
) -> SimResult:
    """Send ``size`` random bytes from engine A to engine B over the path; B's reader drains at once.

    ``timer_lag``: timers fire up to this many seconds late (uniformly), as an event loop's do when its
    process waits for a core or its clock ticks in whole milliseconds. ``tap(direction, datagram, fate)`` sees
    every datagram offered to the path (0: A to B) and what became of it, e.g. to count what was sent twice.
    """
    opts = options or parse_options({})
    back = backward or forward
    rng = random.Random(seed)
    wires = (Wire(forward, rng), Wire(back, rng))
    engines = (
        KCPEngine(conv=7, options=opts, mtu=opts.mtu, now=0.0),
        KCPEngine(conv=7, options=opts, mtu=opts.mtu, now=0.0),
    )
    sender, receiver = engines
    payload = random.Random(seed).randbytes(size)
    received = bytearray()
    heap: list[tuple[float, int, int, bytes]] = []  # (arrival, seq, to_index, datagram)
    seq = 0
    chunk = sender.max_data * 64
    remaining = size
    delivered = 0
    now = 0.0

    def transmit(index: int) -> None:
        nonlocal seq
        wire = wires[index]
        for datagram in engines[index].datagrams_to_send():
            for due in wire.arrivals(now, datagram):
                seq += 1
                heapq.heappush(heap, (due, seq, 1 - index, datagram))
            if tap is not None:
                tap(index, datagram, wire.last_fate)

    def feed_sender() -> None:
        nonlocal remaining
        while remaining > 0 and sender.writable():
            start = size - remaining
            take = min(remaining, chunk)
            sender.send(payload[start : start + take])
            remaining -= take
        sender.flush(now)

    feed_sender()
    transmit(0)
    events = 0
    armed: list[tuple[float, float] | None] = [None, None]  # per engine: (deadline, when it really fires)
    lag_rng = random.Random(seed + 1)
    while delivered < size and now < time_limit and events < max_events:
        events += 1
        deadlines = []
        for i, engine in enumerate(engines):
            deadline = engine.next_deadline(now)
            if deadline is None:
                armed[i] = None
                continue
            timer_state = armed[i]
            if timer_state is None or timer_state[0] != deadline:
                timer_state = (deadline, deadline + (lag_rng.uniform(0, timer_lag) if timer_lag else 0.0))
                armed[i] = timer_state
            deadlines.append((timer_state[1], i))
        arrival = heap[0][0] if heap else None
        timer = min(deadlines) if deadlines else None
        if timer is not None and (arrival is None or timer[0] < arrival):
            now = max(now, timer[0])
            engine = engines[timer[1]]
            engine.handle_timer(now)
            transmit(timer[1])
            if timer[1] == 0:
                feed_sender()
                transmit(0)
            continue
        if arrival is None:
            break  # nothing in flight and no timer: the transfer is stuck
        now = max(now, arrival)
        batches: tuple[list[bytes], list[bytes]] = ([], [])
        while heap and heap[0][0] <= now:
            _, _, to, datagram = heapq.heappop(heap)
            batches[to].append(datagram)
        for index in (0, 1):
            if batches[index]:
                engines[index].receive_datagrams(batches[index], now)
                engines[index].flush(now)
        while data := receiver.receive(1 << 20):
            received += data
        delivered = len(received)
        if batches[1]:
            receiver.flush(now)  # a reopened receive window is announced at once
        if batches[0]:
            feed_sender()
        transmit(0)
        transmit(1)
    stats = sender.stats()
    for engine in engines:
        engine.close()
    return SimResult(
        delivered=delivered,
        seconds=now,
        complete=delivered >= size,
        exact=received == payload,
        forward=wires[0].stats,
        backward=wires[1].stats,
        sender=stats,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_path_arguments(parser, mib=16.0)
    parser.add_argument("--timer-lag", type=float, default=0.0, help="timers fire up to this late, seconds")
    parser.add_argument("--kcp", default="", help="kcp URL options, e.g. 'mode=fast3&pacing=off'")
    args = parser.parse_args(argv)
    params = dict(item.split("=", 1) for item in args.kcp.split("&") if item)
    opts = parse_options(params)
    path = path_from_arguments(args)
    result = simulate_bulk(
        size=int(args.mib * MiB), forward=path, options=opts, seed=args.seed, timer_lag=args.timer_lag
    )
    f, b = result.forward, result.backward
    print(
        f"goodput {result.goodput / 1e6:.1f} MB/s in {result.seconds:.3f} s (complete={result.complete}, exact={result.exact}); "
        f"forward: sent {f.sent} lost {f.lost} queue-dropped {f.queue_dropped} max-queue {f.max_queue}; "
        f"backward: sent {b.sent} lost {b.lost} queue-dropped {b.queue_dropped}; sender {result.sender}"
    )


if __name__ == "__main__":
    main()
