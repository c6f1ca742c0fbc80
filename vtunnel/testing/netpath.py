"""The emulated path the virtual-time simulators share (:mod:`.kcpsim`, :mod:`.rudpsim`).

It is the impairment relay's model (:mod:`vtunnel.testing.relay`) without sockets: each direction drops a
fraction of datagrams at random, then serialises the rest at ``rate`` bytes/s through a drop-tail queue of
``queue`` bytes, then delays them by ``delay`` seconds; some may be held back (``reorder``), jittered or
duplicated. Two flows that share one :class:`Wire` share its bottleneck queue.
"""

from __future__ import annotations

import argparse
import enum
import random
from dataclasses import dataclass, field

__all__ = [
    "Fate",
    "Path",
    "PathStats",
    "SimResult",
    "Wire",
    "add_path_arguments",
    "parse_rate",
    "path_from_arguments",
]


class Fate(enum.Enum):
    """What became of one datagram offered to a :class:`Wire`."""

    DELIVERED = "delivered"  # it arrives (once, or twice when duplicated)
    LOST = "lost"  # dropped at random (the path's loss)
    QUEUE_DROPPED = "queue_dropped"  # dropped because the bottleneck's queue was full (the senders' doing)
    TOO_LARGE = "too_large"  # larger than the path's MTU, and not fragmented (the don't-fragment bit)


@dataclass(frozen=True, kw_only=True, slots=True)
class Path:
    """One direction of the emulated path."""

    rate: float | None = None  # bytes/s; None: no bottleneck
    queue: int = 256 * 1024  # bytes the bottleneck queues before it drops
    delay: float = 0.0  # seconds, one way
    loss: float = 0.0  # fraction dropped at random
    jitter: float = 0.0  # seconds: the delay varies uniformly by up to this much either way
    jitter_reorders: bool = False  # True: each datagram's delay is drawn alone, so jitter reorders
    reorder: float = 0.0  # fraction held back by ``reorder_delay`` so later ones overtake them
    reorder_delay: float = 0.005
    duplicate: float = 0.0  # fraction delivered twice, the copy ``duplicate_delay`` after the original
    duplicate_delay: float = 0.001
    mtu: int | None = None  # the largest datagram (UDP payload) the path carries; None: any


@dataclass(kw_only=True, slots=True)
class PathStats:
    sent: int = 0
    bytes: int = 0  # bytes offered to the path (every datagram, lost or not)
    lost: int = 0
    queue_dropped: int = 0
    max_queue: int = 0
    duplicated: int = 0
    too_large: int = 0


@dataclass(kw_only=True, slots=True)
class SimResult:
    delivered: int  # payload bytes the receiver read, in order
    seconds: float  # virtual time from the first send to the last byte read (or the limit)
    complete: bool
    exact: bool  # what arrived is the payload, byte for byte (and all of it)
    forward: PathStats = field(default_factory=PathStats)
    backward: PathStats = field(default_factory=PathStats)
    sender: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def goodput(self) -> float:
        """Payload bytes per virtual second."""
        return self.delivered / self.seconds if self.seconds > 0 else 0.0


class Wire:
    """One direction of a path: where each datagram offered to it arrives, and when."""

    __slots__ = ("busy_until", "last_due", "last_fate", "path", "rng", "stats")

    def __init__(self, path: Path, rng: random.Random) -> None:
        self.path = path
        self.rng = rng
        self.busy_until = 0.0
        self.last_due = 0.0
        #: what became of the datagram offered last
        self.last_fate = Fate.DELIVERED
        self.stats = PathStats()

    def admit(self, now: float, datagram: bytes) -> float | None:
        """When ``datagram`` arrives at the far end, or ``None`` when the path drops it."""
        path = self.path
        self.stats.sent += 1
        self.stats.bytes += len(datagram)
        if path.mtu is not None and len(datagram) > path.mtu:
            self.stats.too_large += 1
            self.last_fate = Fate.TOO_LARGE
            return None
        if path.loss and self.rng.random() < path.loss:
            self.stats.lost += 1
            self.last_fate = Fate.LOST
            return None
        due = now
        if path.rate is not None:
            start = max(now, self.busy_until)
            backlog = (start - now) * path.rate
            if backlog > path.queue:
                self.stats.queue_dropped += 1
                self.last_fate = Fate.QUEUE_DROPPED
                return None
            self.stats.max_queue = max(self.stats.max_queue, int(backlog))
            self.busy_until = due = start + len(datagram) / path.rate
        self.last_fate = Fate.DELIVERED
        due += path.delay
        if path.reorder and self.rng.random() < path.reorder:
            return due + path.reorder_delay
        if path.jitter:
            due = max(due - path.delay, due + self.rng.uniform(-path.jitter, path.jitter))
            if not path.jitter_reorders:
                due = max(due, self.last_due)
        self.last_due = max(self.last_due, due)
        return due

    def arrivals(self, now: float, datagram: bytes) -> list[float]:
        """Every arrival of ``datagram``: none (dropped), one, or two (duplicated)."""
        due = self.admit(now, datagram)
        if due is None:
            return []
        path = self.path
        if path.duplicate and self.rng.random() < path.duplicate:
            self.stats.duplicated += 1
            return [due, due + path.duplicate_delay]
        return [due]


def parse_rate(text: str) -> float:
    """A rate in bytes/s, with an optional suffix k, m or g (``50m``)."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:].lower(), 1.0)
    return float(text[:-1] if scale != 1.0 else text) * scale


def add_path_arguments(parser: argparse.ArgumentParser, *, mib: float) -> None:
    """The command-line options of a simulator: the path, the transfer size and the seed."""
    parser.add_argument("--rate", type=parse_rate, default=None, help="bottleneck bytes/s (suffix k, m, g)")
    parser.add_argument("--queue", type=int, default=256 * 1024, help="bottleneck queue in bytes")
    parser.add_argument("--delay", type=float, default=0.005, help="one-way delay in seconds")
    parser.add_argument("--loss", type=float, default=0.0, help="random loss each way")
    parser.add_argument("--mib", type=float, default=mib, help="MiB to send")
    parser.add_argument("--jitter", type=float, default=0.0, help="delay varies by up to this, seconds")
    parser.add_argument("--jitter-reorders", action="store_true", help="jitter reorders datagrams")
    parser.add_argument("--reorder", type=float, default=0.0, help="fraction held back 5 ms")
    parser.add_argument("--duplicate", type=float, default=0.0, help="fraction delivered twice")
    parser.add_argument("--mtu", type=int, default=None, help="largest datagram the path carries (bytes)")
    parser.add_argument("--seed", type=int, default=1)


def path_from_arguments(args: argparse.Namespace) -> Path:
    return Path(
        rate=args.rate,
        queue=args.queue,
        delay=args.delay,
        loss=args.loss,
        jitter=args.jitter,
        jitter_reorders=args.jitter_reorders,
        reorder=args.reorder,
        duplicate=args.duplicate,
        mtu=args.mtu,
    )
