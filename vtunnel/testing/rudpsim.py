"""rudp connections on an emulated path, in virtual time: for tests and for tuning, never for timing claims.

The path is :mod:`vtunnel.testing.netpath`, the one :mod:`.kcpsim` drives KCP over. Each flow is a client
connection sending a byte stream to a server connection; every flow's datagrams share the same two
:class:`~vtunnel.testing.netpath.Wire` directions, so several flows compete for one bottleneck queue.
Connections are driven as a transport drives them: every datagram that arrives is input, then what the
connection has to send is taken at once; timers fire at the connections' deadlines. Nothing reads a clock, so a
run is a pure function of its arguments (and seed).

    python -m vtunnel.testing.rudpsim --rate 12.5m --delay 0.01 --loss 0.02 --duplicate 0.01 --mib 8 --cc cubic
"""

from __future__ import annotations

import argparse
import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from vtunnel.arq.rudp.connection import Connection, Role, RudpConfig
from vtunnel.testing.netpath import (
    Fate,
    Path,
    PathStats,
    SimResult,
    Wire,
    add_path_arguments,
    path_from_arguments,
)
from vtunnel.transports.rudp.options import RudpOptions

__all__ = ["FlowResult", "simulate_bulk", "simulate_flows"]

MiB = 1024 * 1024
#: how many bytes a sender offers per call
_CHUNK = 256 * 1024


@dataclass(kw_only=True, slots=True)
class FlowResult:
    delivered: int = 0
    #: (virtual time, bytes delivered so far), sampled at every read
    samples: list[tuple[float, int]] = field(default_factory=list)
    exact: bool = True
    sender: dict[str, float | int | str] = field(default_factory=dict)

    def delivered_between(self, start: float, end: float) -> int:
        """Bytes delivered in ``[start, end)`` of virtual time."""

        def at(when: float) -> int:
            last = 0
            for time, total in self.samples:
                if time > when:
                    break
                last = total
            return last

        return at(end) - at(start)


class _Flow:
    __slots__ = ("client", "payload", "received", "remaining", "result", "server", "size", "start", "started")

    def __init__(self, index: int, size: int, start: float, config: RudpConfig, seed: int) -> None:
        cid_client = bytes((0xC0, index))
        cid_server = bytes((0x5E, index))
        self.client = Connection(
            role=Role.CLIENT, local_cid=cid_client, peer_cid=cid_server, config=config, now=start
        )
        self.server = Connection(
            role=Role.SERVER, local_cid=cid_server, peer_cid=cid_client, config=config, now=start
        )
        self.size = size
        self.remaining = size
        self.start = start
        self.started = False
        self.payload = random.Random(seed * 1000 + index).randbytes(min(size, 4 * MiB))
        self.received = 0
        self.result = FlowResult()

    def feed(self) -> None:
        """Offer the sender what its buffer takes (the payload repeats past its first 4 MiB)."""
        client = self.client
        payload = self.payload
        while self.remaining > 0 and client.send_room() > 0:
            offset = (self.size - self.remaining) % len(payload)
            chunk = payload[offset : offset + min(_CHUNK, self.remaining)]
            taken = client.send(chunk)
            self.remaining -= taken
            if taken < len(chunk):
                break

    def drain(self, now: float) -> None:
        data = self.server.receive()
        if not data:
            return
        payload = self.payload
        offset = self.received % len(payload)
        view = memoryview(data)
        # compare against the payload, which may wrap around
        position = 0
        while position < len(view):
            take = min(len(view) - position, len(payload) - offset)
            if view[position : position + take] != payload[offset : offset + take]:
                self.result.exact = False
            position += take
            offset = 0
        self.received += len(data)
        self.result.delivered = self.received
        self.result.samples.append((now, self.received))


def simulate_flows(
    *,
    sizes: Sequence[int],
    forward: Path,
    backward: Path | None = None,
    configs: Sequence[RudpConfig] | None = None,
    starts: Sequence[float] | None = None,
    seed: int = 1,
    time_limit: float = 60.0,
    max_events: int = 5_000_000,
    tap: Callable[[int, bytes, Fate], None] | None = None,
) -> tuple[list[FlowResult], float, tuple[PathStats, PathStats]]:
    """Run one flow per entry of ``sizes`` (flow ``i`` starts at ``starts[i]``) over one shared path until every
    flow delivered its bytes or ``time_limit``; returns the flows, the virtual time reached and the path's
    stats. ``tap(direction, datagram, fate)`` sees every datagram offered to the path (0: client to server) and
    what became of it."""
    count = len(sizes)
    cfgs = list(configs) if configs is not None else [RudpConfig()] * count
    begin = list(starts) if starts is not None else [0.0] * count
    rng = random.Random(seed)
    wires = (Wire(forward, rng), Wire(backward or forward, rng))
    flows = [_Flow(i, sizes[i], begin[i], cfgs[i], seed) for i in range(count)]
    # endpoints: 2i is flow i's client (sends on wire 0), 2i + 1 its server (sends on wire 1)
    endpoints = [conn for flow in flows for conn in (flow.client, flow.server)]
    heap: list[tuple[float, int, int, bytes]] = []  # (arrival, seq, endpoint, datagram)
    seq = 0
    now = 0.0

    def transmit(index: int) -> None:
        nonlocal seq
        direction = index % 2
        wire = wires[direction]
        for datagram in endpoints[index].datagrams_to_send(now):
            for due in wire.arrivals(now, datagram):
                seq += 1
                heapq.heappush(heap, (due, seq, index ^ 1, datagram))
            if tap is not None:
                tap(direction, datagram, wire.last_fate)

    def service(index: int) -> None:
        flow = flows[index // 2]
        if index % 2:
            flow.drain(now)
        else:
            flow.feed()
        transmit(index)
        if index % 2:
            transmit(index - 1)  # a read may reopen the window: ACKs leave with the reader's side
        else:
            transmit(index + 1)

    def done() -> bool:
        return all(flow.received >= flow.size for flow in flows)

    events = 0
    while not done() and now < time_limit and events < max_events:
        events += 1
        for i, flow in enumerate(flows):
            if not flow.started and flow.start <= now:
                flow.started = True
                service(2 * i)
        timer: tuple[float, int] | None = None
        for i, conn in enumerate(endpoints):
            if not flows[i // 2].started:
                continue
            deadline = conn.next_deadline()
            if deadline is not None and (timer is None or deadline < timer[0]):
                timer = (deadline, i)
        pending_start = min((flow.start for flow in flows if not flow.started), default=None)
        arrival = heap[0][0] if heap else None
        candidates = [t for t in (arrival, timer[0] if timer else None, pending_start) if t is not None]
        if not candidates:
            break  # nothing in flight, no timer: stuck
        step = min(candidates)
        now = max(now, step)
        if timer is not None and timer[0] == step and (arrival is None or timer[0] < arrival):
            endpoints[timer[1]].handle_timer(now)
            service(timer[1])
            continue
        if arrival is None or arrival > now:
            continue
        touched: set[int] = set()
        while heap and heap[0][0] <= now:
            _, _, to, datagram = heapq.heappop(heap)
            endpoints[to].receive_datagram(datagram, now)
            touched.add(to)
        for index in sorted(touched):
            service(index)
    for flow in flows:
        flow.result.sender = flow.client.stats()
    return [flow.result for flow in flows], now, (wires[0].stats, wires[1].stats)


def simulate_bulk(
    *,
    size: int,
    forward: Path,
    backward: Path | None = None,
    config: RudpConfig | None = None,
    seed: int = 1,
    time_limit: float = 60.0,
    max_events: int = 5_000_000,
    tap: Callable[[int, bytes, Fate], None] | None = None,
) -> SimResult:
    """Send ``size`` random bytes from a client connection to a server connection; the reader drains at once."""
    flows, seconds, (fwd, back) = simulate_flows(
        sizes=[size],
        forward=forward,
        backward=backward,
        configs=[config or RudpConfig()],
        seed=seed,
        time_limit=time_limit,
        max_events=max_events,
        tap=tap,
    )
    flow = flows[0]
    return SimResult(
        delivered=flow.delivered,
        seconds=seconds,
        complete=flow.delivered >= size,
        exact=flow.exact and flow.delivered == size,
        forward=fwd,
        backward=back,
        sender=flow.sender,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_path_arguments(parser, mib=8.0)
    parser.add_argument("--cc", default="bbr", help="newreno, cubic or bbr")
    parser.add_argument(
        "--pmtud", action="store_true", help="path MTU discovery, with the sizes rudp:// tries over IPv4"
    )
    args = parser.parse_args(argv)
    path = path_from_arguments(args)
    config = RudpOptions(pmtud=args.pmtud).packet_config(0) if args.pmtud else RudpConfig()
    result = simulate_bulk(
        size=int(args.mib * MiB), forward=path, config=replace(config, cc=args.cc), seed=args.seed
    )
    f, b = result.forward, result.backward
    print(
        f"goodput {result.goodput / 1e6:.2f} MB/s in {result.seconds:.3f} s (complete={result.complete}, "
        f"exact={result.exact}); forward: sent {f.sent} ({f.bytes} B) lost {f.lost} queue-dropped "
        f"{f.queue_dropped} duplicated {f.duplicated}; backward: sent {b.sent} lost {b.lost}; sender {result.sender}"
    )


if __name__ == "__main__":
    main()
