"""The impairment relay: a UDP middlebox that drops, duplicates, reorders, delays and rate-limits datagrams.

One relay serves tests (in-process, as an async context manager giving its listening address) and the
benchmark (as a process: ``python -m vtunnel.testing.relay --listen 127.0.0.1:P --target 127.0.0.1:Q --loss
0.1``).

Each client address gets its own upstream socket towards the target, like a NAT.
:meth:`ImpairmentRelay.rebind` replaces those sockets with fresh ones (new source ports) to simulate NAT
rebinding. "up" is client -> target, "down" is target -> client. Every random choice comes from a
per-direction RNG seeded from ``seed``.

I/O is batched like the KCP transport (readiness callback + a batch of non-blocking reads), so the relay is
not the bottleneck of what it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import random
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Final

import anyio

from vtunnel.io.datagrams import Address, DatagramSocket, open_client_socket, open_udp_socket

__all__ = ["DirectionStats", "Impairment", "ImpairmentRelay", "main"]

#: the most client flows (upstream sockets) one relay keeps
MAX_FLOWS: Final = 1024
#: Linux's SO_TIMESTAMPNS (the socket module does not name it): receive times as a struct timespec
SO_TIMESTAMPNS: Final = 35
_TIMESPEC: Final = struct.Struct("@qq")
_STAMP_SPACE: Final = socket.CMSG_SPACE(_TIMESPEC.size)


@dataclass(frozen=True, kw_only=True, slots=True)
class Impairment:
    """What happens to the datagrams of one direction. Probabilities are in [0, 1], times in seconds."""

    loss: float = 0.0
    duplicate: float = 0.0
    #: probability that a datagram is held back by ``reorder_delay`` so that later ones overtake it
    reorder: float = 0.0
    reorder_delay: float = 0.005
    delay: float = 0.0
    #: uniform +- jitter added to ``delay`` (never below zero). Jitter keeps the order, as one path's queues do:
    #: a datagram never arrives before the one sent ahead of it; reordering is the ``reorder`` knob's alone
    jitter: float = 0.0
    #: bytes per second; ``None`` = unlimited
    rate: float | None = None
    #: bytes the rate limiter may queue before it drops (a router's buffer)
    queue: int = 256 * 1024
    #: the largest datagram (UDP payload) the link carries: larger ones are dropped, as a link drops an IP
    #: packet too large for it with the don't-fragment bit set (1472: Ethernet's 1500 less IPv4's and UDP's
    #: headers); ``None`` = any
    mtu: int | None = None

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        for name in ("reorder_delay", "delay", "jitter"):
            value = getattr(self, name)
            if not 0.0 <= value <= 3600.0:
                raise ValueError(f"{name} must be between 0 and 3600 seconds, got {value!r}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be positive bytes/s, got {self.rate!r}")
        if self.queue < 0:
            raise ValueError(f"queue must be >= 0 bytes, got {self.queue!r}")
        if self.mtu is not None and not 1 <= self.mtu <= 65535:
            raise ValueError(f"mtu must be between 1 and 65535 bytes, got {self.mtu!r}")

    @property
    def transparent(self) -> bool:
        return (
            self.loss == 0.0
            and self.duplicate == 0.0
            and self.reorder == 0.0
            and self.delay == 0.0
            and self.jitter == 0.0
            and self.rate is None
            and self.mtu is None
        )


@dataclass(kw_only=True, slots=True)
class DirectionStats:
    """Counters of one direction (datagrams unless named ``bytes``)."""

    received: int = 0
    #: bytes of the datagrams received (what the sender put on the wire), before any impairment
    received_bytes: int = 0
    passed: int = 0
    #: bytes of the datagrams passed on
    bytes: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    queue_dropped: int = 0
    #: larger than the link's ``mtu``
    too_large: int = 0


#: what is due within this much of now leaves now: the event loop's clock and timers count whole milliseconds
#: (uvloop's, libuv's), so a timer for less than that ahead fires at once and finds the clock unchanged: the relay
#: would re-arm it and spin, a core busy until the millisecond turns (which starved the processes it measures)
RELEASE_AHEAD: Final = 0.001

#: sends datagrams, in order, to where one flow's direction goes (several at once: one system call per run of
#: equal sizes, as a NIC's segmentation offload hands them over, so the receiver gets them as a GRO run)
Sender = Callable[[list[bytes]], None]


@dataclass(slots=True)
class _Pipe:
    """One direction: applies its :class:`Impairment` and releases datagrams when due."""

    impairment: Impairment
    rng: random.Random
    loop: asyncio.AbstractEventLoop
    stats: DirectionStats = field(default_factory=DirectionStats)
    heap: list[tuple[float, int, bytes, Sender]] = field(default_factory=list)
    seq: int = 0
    busy_until: float = 0.0
    #: when the last datagram not held back for reordering is due (jitter never lets a later one overtake it)
    last_due: float = 0.0
    timer: asyncio.Handle | None = None
    #: the timer's deadline (uvloop gives a plain Handle, without ``when()``, for a deadline already past)
    timer_when: float = 0.0

    def push_many(self, datagrams: list[bytes], send: Sender, arrivals: Sequence[float] = ()) -> None:
        """Push a batch; when nothing is impaired or waiting, forward it straight away.

        ``arrivals``: when each datagram reached this host (loop time, from the kernel's receive timestamps);
        the rate limiter queues by them, so a relay that reads late does not see a burst the sender never sent.
        """
        if self.impairment.transparent and not self.heap:
            stats = self.stats
            size = sum(map(len, datagrams))
            send(datagrams)
            stats.bytes += size
            stats.received_bytes += size
            stats.received += len(datagrams)
            stats.passed += len(datagrams)
            return
        if len(arrivals) == len(datagrams):
            for datagram, arrival in zip(datagrams, arrivals, strict=True):
                self.push(datagram, send, arrival)
            return
        for datagram in datagrams:
            self.push(datagram, send)

    def push(self, datagram: bytes, send: Sender, arrival: float | None = None) -> None:
        stats = self.stats
        stats.received += 1
        stats.received_bytes += len(datagram)
        imp = self.impairment
        if imp.mtu is not None and len(datagram) > imp.mtu:
            stats.too_large += 1
            return
        if imp.transparent:
            if not self.heap:
                stats.passed += 1
                stats.bytes += len(datagram)
                send([datagram])
                return
            self._schedule(self.loop.time(), datagram, send)
            return
        rng = self.rng
        if imp.loss and rng.random() < imp.loss:
            stats.dropped += 1
            return
        copies = 1
        if imp.duplicate and rng.random() < imp.duplicate:
            copies = 2
            stats.duplicated += 1
        now = self.loop.time()
        if arrival is not None and arrival < now:
            now = arrival
        for _ in range(copies):
            due = now
            if imp.rate is not None:
                start = max(now, self.busy_until)
                if (start - now) * imp.rate > imp.queue:
                    stats.queue_dropped += 1
                    continue
                self.busy_until = due = start + len(datagram) / imp.rate
            extra = imp.delay
            if imp.jitter:
                extra = max(0.0, extra + rng.uniform(-imp.jitter, imp.jitter))
            if imp.reorder and rng.random() < imp.reorder:
                stats.reordered += 1
                self._schedule(due + extra + imp.reorder_delay, datagram, send)
                continue
            due = max(due + extra, self.last_due)
            self.last_due = due
            self._schedule(due, datagram, send)

    def _schedule(self, due: float, datagram: bytes, send: Sender) -> None:
        if due <= self.loop.time() + RELEASE_AHEAD and not self.heap:
            self.stats.passed += 1
            self.stats.bytes += len(datagram)
            send([datagram])
            return
        self.seq += 1
        heapq.heappush(self.heap, (due, self.seq, datagram, send))
        if self.timer is None or self.timer_when > due:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_when = due
            self.timer = self.loop.call_at(due, self._release)

    def _release(self) -> None:
        self.timer = None
        heap = self.heap
        horizon = self.loop.time() + RELEASE_AHEAD
        stats = self.stats
        run: list[bytes] = []  # what is due, in order, goes out together while it goes the same way
        run_send: Sender | None = None
        if heap and heap[0][0] <= horizon:
            # what is due within RELEASE_AHEAD after the first goes with it, however early the timer fired: a
            # loop whose timers count whole milliseconds from a clock read at the start of its pass (uvloop) may
            # run this up to a millisecond before the first is due, by the clock that computed the dues
            horizon = max(horizon, heap[0][0] + RELEASE_AHEAD)
        while heap and heap[0][0] <= horizon:
            _due, _seq, datagram, send = heapq.heappop(heap)
            stats.passed += 1
            stats.bytes += len(datagram)
            if send != run_send:  # (bound methods: equal, not the same object)
                if run_send is not None:
                    run_send(run)
                run, run_send = [], send
            run.append(datagram)
        if run_send is not None:
            run_send(run)
        if heap:
            self.timer_when = heap[0][0]
            self.timer = self.loop.call_at(self.timer_when, self._release)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.heap.clear()


class _StampedSocket(DatagramSocket):
    """A :class:`DatagramSocket` that also notes when the kernel received each datagram (``SO_TIMESTAMPNS``).

    A userspace relay reads in batches, and late when its process waits for a core: without the kernel's
    timestamps a datagram's arrival would be when the relay got round to it, and a paced sender would look
    bursty to the rate limiter. :attr:`arrivals` holds the loop times of the batch being handled.
    """

    __slots__ = ("_stamped", "arrivals")

    def __init__(self, sock: socket.socket, handler: Callable[[list[tuple[bytes, Address]]], None]) -> None:
        self.arrivals: list[float] = []
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self._stamped = True
        except OSError:  # not Linux: arrival is when the relay reads it
            self._stamped = False
        super().__init__(sock, handler)

    def _on_readable(self) -> None:
        if not self._stamped:
            self.arrivals = []
            super()._on_readable()
            return
        recv = self.sock.recvmsg_into
        view = self._view
        buffers = [view]
        batch: list[tuple[bytes, Address]] = []
        stamps: list[float] = []
        wall = _realtime()
        offset = self._loop.time() - wall  # kernel stamps are wall-clock time
        for _ in range(self._batch):
            try:
                size, ancillary, _flags, source = recv(buffers, _STAMP_SPACE)
            except OSError as exc:
                if self._read_failed(exc):
                    continue
                break
            stamp = wall
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
                    seconds, nanoseconds = _TIMESPEC.unpack_from(data)
                    stamp = seconds + nanoseconds / 1e9
            batch.append((view[:size].tobytes(), (source[0], source[1])))
            stamps.append(stamp + offset)
        if batch and not self._closed:
            self.arrivals = stamps
            self._handler(batch)
            self.arrivals = []


class _Flow:
    """One client address and its upstream socket towards the target."""

    def __init__(self, relay: ImpairmentRelay, client: Address) -> None:
        self.relay = relay
        self.client = client
        self.upstream = self._open()

    def _open(self, host: str | None = None) -> DatagramSocket:
        relay = self.relay
        # not connect()ed, so a target that is not up yet does not stop the flow under uvloop (see udpio)
        if host is None:
            sock = open_client_socket(relay.family, relay.target, sockbuf=relay.sockbuf)
        else:
            sock = open_udp_socket(relay.family, bind=(host, 0), sockbuf=relay.sockbuf)
        return _StampedSocket(sock, self._on_batch)

    def rebind(self, host: str | None = None) -> None:
        old, self.upstream = self.upstream, self._open(host)
        old.close()

    def send_up(self, datagrams: list[bytes]) -> None:
        self.upstream.sendto_many(datagrams, self.relay.target)

    def send_down(self, datagrams: list[bytes]) -> None:
        self.relay.listener.sendto_many(datagrams, self.client)

    def _on_batch(self, batch: list[tuple[bytes, Address]]) -> None:
        upstream = self.upstream
        arrivals = upstream.arrivals if isinstance(upstream, _StampedSocket) else []
        target = self.relay.target
        if any(source != target for _datagram, source in batch):  # only the target may answer through a flow
            kept = [i for i, (_datagram, source) in enumerate(batch) if source == target]
            arrivals = [arrivals[i] for i in kept] if len(arrivals) == len(batch) else []
            batch = [batch[i] for i in kept]
        self.relay.down_pipe.push_many([datagram for datagram, _source in batch], self.send_down, arrivals)


class ImpairmentRelay:
    """A seeded UDP impairment relay from ``listen`` to ``target``.

    ``async with ImpairmentRelay(target, up=Impairment(loss=0.1)) as relay:`` then point the client at
    ``relay.address``. ``up``/``down`` may be reassigned while running; ``up_stats``/``down_stats`` count.
    """

    def __init__(
        self,
        target: Address,
        *,
        listen: Address = ("127.0.0.1", 0),
        up: Impairment | None = None,
        down: Impairment | None = None,
        seed: int = 0,
        sockbuf: int = 4 * 1024 * 1024,
    ) -> None:
        self.family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        # numeric, so that answers can be matched by their source address
        info = socket.getaddrinfo(target[0], target[1], self.family, socket.SOCK_DGRAM)
        self.target: Address = (str(info[0][4][0]), int(info[0][4][1]))
        self.listen_address = listen
        self.seed = seed
        self.sockbuf = sockbuf
        self._initial = (up or Impairment(), down or Impairment())
        self._flows: dict[Address, _Flow] = {}
        self._listener: DatagramSocket | None = None
        self._up: _Pipe | None = None
        self._down: _Pipe | None = None

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._up = _Pipe(self._initial[0], random.Random(self.seed * 2), loop)
        self._down = _Pipe(self._initial[1], random.Random(self.seed * 2 + 1), loop)
        sock = open_udp_socket(self.family, bind=self.listen_address, sockbuf=self.sockbuf)
        self._listener = _StampedSocket(sock, self._on_client_batch)

    async def aclose(self) -> None:
        for flow in self._flows.values():
            flow.upstream.close()
        self._flows.clear()
        for pipe in (self._up, self._down):
            if pipe is not None:
                pipe.close()
        if self._listener is not None:
            self._listener.close()
        await anyio.lowlevel.checkpoint()

    async def __aenter__(self) -> ImpairmentRelay:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # --- properties -----------------------------------------------------------------------------------------

    @property
    def listener(self) -> DatagramSocket:
        if self._listener is None:
            raise RuntimeError("the relay is not started")
        return self._listener

    @property
    def address(self) -> Address:
        """Where clients send to."""
        return self.listener.local_address

    @property
    def up_pipe(self) -> _Pipe:
        if self._up is None:
            raise RuntimeError("the relay is not started")
        return self._up

    @property
    def down_pipe(self) -> _Pipe:
        if self._down is None:
            raise RuntimeError("the relay is not started")
        return self._down

    @property
    def up(self) -> Impairment:
        return self.up_pipe.impairment

    @up.setter
    def up(self, value: Impairment) -> None:
        self.up_pipe.impairment = value

    @property
    def down(self) -> Impairment:
        return self.down_pipe.impairment

    @down.setter
    def down(self, value: Impairment) -> None:
        self.down_pipe.impairment = value

    @property
    def up_stats(self) -> DirectionStats:
        return self.up_pipe.stats

    @property
    def down_stats(self) -> DirectionStats:
        return self.down_pipe.stats

    @property
    def upstream_addresses(self) -> list[Address]:
        """The relay's current source addresses towards the target (one per client)."""
        return [flow.upstream.local_address for flow in self._flows.values()]

    def stats(self) -> dict[str, dict[str, int]]:
        return {"up": asdict(self.up_stats), "down": asdict(self.down_stats)}

    # --- behaviour ------------------------------------------------------------------------------------------

    def rebind(self, host: str | None = None) -> None:
        """Move every client flow to a fresh upstream socket (a new source port): NAT rebinding; with ``host``, a
        new source address too (a NAT's other address, a client on another network: 127.0.0.2, say)."""
        for flow in self._flows.values():
            flow.rebind(host)

    def _on_client_batch(self, batch: list[tuple[bytes, Address]]) -> None:
        pipe = self.up_pipe
        flows = self._flows
        listener = self._listener
        stamps = listener.arrivals if isinstance(listener, _StampedSocket) else []
        stamped = len(stamps) == len(batch)
        run: list[bytes] = []  # consecutive datagrams of one client go through as one batch
        arrivals: list[float] = []
        run_flow: _Flow | None = None
        for index, (datagram, source) in enumerate(batch):
            flow = flows.get(source)
            if flow is None:
                if len(flows) >= MAX_FLOWS:
                    pipe.stats.received += 1
                    pipe.stats.dropped += 1
                    continue
                flow = flows[source] = _Flow(self, source)
            if flow is not run_flow:
                if run_flow is not None:
                    pipe.push_many(run, run_flow.send_up, arrivals)
                run, arrivals, run_flow = [], [], flow
            run.append(datagram)
            if stamped:
                arrivals.append(stamps[index])
        if run_flow is not None:
            pipe.push_many(run, run_flow.send_up, arrivals)


# --- command line -------------------------------------------------------------------------------------------


def _realtime() -> float:
    return time.time()


def _address(text: str) -> Address:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _rate(text: str) -> float:
    units = {"k": 1e3, "m": 1e6, "g": 1e9}
    factor = units.get(text[-1:].lower(), 1.0)
    number = text[:-1] if factor != 1.0 else text
    try:
        value = float(number) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bytes/s such as 12.5m, got {text!r}") from None
    return value


_KNOBS: Final = (
    ("loss", float, "probability a datagram is dropped"),
    ("duplicate", float, "probability a datagram is sent twice"),
    ("reorder", float, "probability a datagram is held back so later ones overtake it"),
    ("reorder-delay", float, "how long a reordered datagram is held, ms"),
    ("delay", float, "one-way delay, ms"),
    ("jitter", float, "uniform +- jitter on the delay, ms"),
    ("rate", _rate, "rate limit in bytes/s (suffix k, m, g)"),
    ("queue", int, "bytes the rate limiter queues before dropping"),
    ("mtu", int, "largest datagram the link carries (bytes of UDP payload; larger ones are dropped)"),
)
_MS_KNOBS: Final = frozenset({"reorder_delay", "delay", "jitter"})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vtunnel.testing.relay",
        description="UDP impairment relay. Each knob applies both ways; --up-X / --down-X override one.",
    )
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT to receive clients on")
    parser.add_argument("--target", type=_address, required=True, help="HOST:PORT to relay to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stats-interval", type=float, default=0.0, help="print counters every N s (0: at exit)"
    )
    for name, kind, text in _KNOBS:
        parser.add_argument(f"--{name}", type=kind, default=None, help=text)
        parser.add_argument(f"--up-{name}", type=kind, default=None, help=argparse.SUPPRESS)
        parser.add_argument(f"--down-{name}", type=kind, default=None, help=argparse.SUPPRESS)
    return parser


def _impairment(args: argparse.Namespace, direction: str) -> Impairment:
    values: dict[str, float | int] = {}
    for name, _kind, _text in _KNOBS:
        key = name.replace("-", "_")
        value = getattr(args, f"{direction}_{key}")
        if value is None:
            value = getattr(args, key)
        if value is not None:
            values[key] = value / 1000.0 if key in _MS_KNOBS else value
    return Impairment(**values)  # type: ignore[arg-type]


async def _run(args: argparse.Namespace) -> None:
    relay = ImpairmentRelay(
        args.target,
        listen=args.listen,
        up=_impairment(args, "up"),
        down=_impairment(args, "down"),
        seed=args.seed,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with relay:
        print(json.dumps({"listening": list(relay.address)}), flush=True)
        while not stop.is_set():
            if args.stats_interval > 0:
                with anyio.move_on_after(args.stats_interval):
                    await stop.wait()
                print(json.dumps(relay.stats()), flush=True)
            else:
                await stop.wait()
        if args.stats_interval <= 0:
            print(json.dumps(relay.stats()), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _impairment(args, "up")
        _impairment(args, "down")
    except ValueError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop  # noqa: F401
    except ImportError:
        anyio.run(_run, args)
    else:
        anyio.run(_run, args, backend_options={"use_uvloop": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
