"""rudp against KCP on the same emulated path, in virtual time (a development tool, not a test).

    python -m bench.rudp_sim [--loss 0.02] [--delay 0.01] [--rate 12.5m] [--mib 8] [--seed 1] [--cc bbr]

Both run over :mod:`vtunnel.testing.netpath` with the same path and seed: ``kcp://``'s engine (fast3, its
delivery-rate pacer and repeated ACKs, as vtunnel ships it) through :mod:`vtunnel.testing.kcpsim`, and rudp with
each congestion controller through :mod:`vtunnel.testing.rudpsim`. For each it prints the goodput (payload
bytes per virtual second), the wire bytes sent forward and back (ACKs) per payload byte, and per payload byte:
*resent*, payload bytes put on the wire again (a KCP segment number, or an rudp stream offset, already sent),
and *waste*, the bytes a better sender would not have sent: copies of payload a copy of which that arrives was
already sent (*unneeded*), plus payload the sender pushed into the full bottleneck queue (*queue*); what the
path loses at random must be sent again by any sender and is shown beside it (:class:`Waste`). Virtual time:
the numbers describe the algorithms on this path model, not the speed of the Python that runs them.
"""

from __future__ import annotations

import argparse
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vtunnel.arq.rudp.connection import RudpConfig
from vtunnel.arq.rudp.ranges import RangeSet
from vtunnel.arq.rudp.wire import Stream, WireError, decode_packet
from vtunnel.testing import kcpsim, rudpsim
from vtunnel.testing.netpath import Fate, Path, SimResult, parse_rate

MiB = 1024 * 1024
_KCP_SEGMENT = struct.Struct("<IBBHIIII")
_KCP_PUSH = 81


@dataclass(slots=True)
class Waste:
    """Where the forward payload bytes a sender put on the path went, beyond the payload itself (bytes).

    The same for both systems: a KCP segment number and an rudp stream offset both name payload bytes, and each
    datagram's fate is the path model's (delivered, lost at random, dropped by the full bottleneck queue)."""

    #: payload bytes whose segment number (kcp) or offsets (rudp) had been sent before: every copy after the
    #: first, needed or not
    resent: int = 0
    #: payload bytes sent while a copy of them that arrives had already been sent (a spurious retransmission,
    #: a probe or a repeat that the receiver did not need)
    unneeded: int = 0
    #: payload bytes (not already unneeded) the bottleneck's full queue dropped: the sender overran the path
    queue_dropped: int = 0
    #: payload bytes the path lost at random (sending them again is needed: no sender can avoid it)
    lost: int = 0

    @property
    def wasted(self) -> int:
        """Bytes a better sender would not have sent: unneeded copies and what it pushed into a full queue."""
        return self.unneeded + self.queue_dropped

    def account(self, fate: Fate, length: int, resent: int, unneeded: int) -> None:
        self.resent += resent
        self.unneeded += unneeded
        if fate is Fate.QUEUE_DROPPED:
            self.queue_dropped += length - unneeded
        elif fate is Fate.LOST:
            self.lost += length - unneeded


@dataclass(slots=True)
class Row:
    name: str
    result: SimResult
    waste: Waste

    def cells(self, size: int) -> str:
        r, w = self.result, self.waste
        return (
            f"{self.name:<14} {r.goodput / 1e6:8.2f} MB/s  {r.seconds:7.3f} s  complete={r.complete!s:<5} "
            f"exact={r.exact!s:<5}  wire/payload {r.forward.bytes / size:5.3f} + acks {r.backward.bytes / size:5.3f}  "
            f"resent {w.resent / size:6.4f}  waste {w.wasted / size:6.4f} (unneeded {w.unneeded / size:6.4f}, "
            f"queue {w.queue_dropped / size:6.4f}; lost at random {w.lost / size:6.4f})"
        )


def _kcp_counter() -> tuple[Callable[[int, bytes, Fate], None], Waste]:
    """Forward PUSH segments, by segment number."""
    sent: set[int] = set()
    arrives: set[int] = set()  # numbers of which a copy that arrives was sent
    waste = Waste()

    def tap(direction: int, datagram: bytes, fate: Fate) -> None:
        if direction:
            return
        offset = 0
        while offset + _KCP_SEGMENT.size <= len(datagram):
            _conv, cmd, _frg, _wnd, _ts, sn, _una, length = _KCP_SEGMENT.unpack_from(datagram, offset)
            if cmd == _KCP_PUSH:
                unneeded = length if sn in arrives else 0
                waste.account(fate, length, length if sn in sent else 0, unneeded)
                sent.add(sn)
                if fate is Fate.DELIVERED:
                    arrives.add(sn)
            offset += _KCP_SEGMENT.size + length

    return tap, waste


def _rudp_counter() -> tuple[Callable[[int, bytes, Fate], None], Waste]:
    """Forward STREAM frames, by stream offset."""
    sent = RangeSet()
    arrives = RangeSet()  # offsets of which a copy that arrives was sent
    waste = Waste()

    def tap(direction: int, datagram: bytes, fate: Fate) -> None:
        if direction:
            return
        try:
            packet = decode_packet(datagram)
        except WireError:
            return
        for frame in packet.frames:
            if isinstance(frame, Stream) and frame.data:
                start, length = frame.offset, len(frame.data)
                end = start + length
                unneeded = length - sum(b - a for a, b in arrives.missing(start, end))
                waste.account(fate, length, length - sent.add(start, end), unneeded)
                if fate is Fate.DELIVERED:
                    arrives.add(start, end)

    return tap, waste


def compare(
    *, path: Path, size: int, seed: int, controllers: Sequence[str] = ("bbr", "cubic", "newreno")
) -> list[Row]:
    rows = []
    tap, waste = _kcp_counter()
    rows.append(Row("kcp:// fast3", kcpsim.simulate_bulk(size=size, forward=path, seed=seed, tap=tap), waste))
    for cc in controllers:
        tap, waste = _rudp_counter()
        result = rudpsim.simulate_bulk(size=size, forward=path, config=RudpConfig(cc=cc), seed=seed, tap=tap)
        rows.append(Row(f"rudp cc={cc}", result, waste))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rudp_sim", description=__doc__)
    parser.add_argument("--rate", type=parse_rate, default=12.5e6, help="bottleneck bytes/s (suffix k, m, g)")
    parser.add_argument("--queue", type=int, default=256 * 1024, help="bottleneck queue in bytes")
    parser.add_argument("--delay", type=float, default=0.01, help="one-way delay in seconds")
    parser.add_argument("--loss", type=float, nargs="+", default=[0.02], help="random loss each way")
    parser.add_argument("--mib", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--cc", nargs="+", default=["bbr", "cubic", "newreno"], help="rudp's congestion controllers to run"
    )
    args = parser.parse_args(argv)
    size = int(args.mib * MiB)
    for loss in args.loss:
        path = Path(rate=args.rate, queue=args.queue, delay=args.delay, loss=loss)
        print(
            f"# {args.mib:g} MiB, rate {args.rate / 1e6:g} MB/s, queue {args.queue} B, RTT {2 * args.delay * 1e3:g} ms, "
            f"loss {loss:.0%} each way, seed {args.seed}"
        )
        for row in compare(path=path, size=size, seed=args.seed, controllers=args.cc):
            print(row.cells(size))


if __name__ == "__main__":
    main()
