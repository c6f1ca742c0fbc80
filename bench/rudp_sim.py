"""rudp against KCP on the same emulated path, in virtual time (a development tool, not a test).

    python -m bench.rudp_sim [--loss 0.02] [--delay 0.01] [--rate 12.5m] [--mib 8] [--seed 1]

Both run over :mod:`vtunnel.testing.netpath` with the same path and seed: ``kcp://``'s engine (fast3, its
delivery-rate pacer and repeated ACKs, as vtunnel ships it) through :mod:`vtunnel.testing.kcpsim`, and rudp with
each congestion controller through :mod:`vtunnel.testing.rudpsim`. For each it prints the goodput (payload
bytes per virtual second), the wire bytes sent forward per payload byte, and the waste: payload bytes put on the
wire again (a KCP segment number, or an rudp stream offset, already sent) per payload byte. Virtual time: the
numbers describe the algorithms on this path model, not the speed of the Python that runs them.
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
from vtunnel.testing.netpath import Path, SimResult, parse_rate

MiB = 1024 * 1024
_KCP_SEGMENT = struct.Struct("<IBBHIIII")
_KCP_PUSH = 81


@dataclass(slots=True)
class Row:
    name: str
    result: SimResult
    payload_sent_again: int

    def cells(self, size: int) -> str:
        r = self.result
        return (
            f"{self.name:<14} {r.goodput / 1e6:8.2f} MB/s  {r.seconds:7.3f} s  complete={r.complete!s:<5} "
            f"exact={r.exact!s:<5}  wire/payload {r.forward.bytes / size:5.3f}  "
            f"waste {self.payload_sent_again / size:6.4f}"
        )


def _kcp_counter() -> tuple[Callable[[int, bytes], None], list[int]]:
    """Counts PUSH data bytes whose segment number was seen before, forward only."""
    seen: set[int] = set()
    again = [0]

    def tap(direction: int, datagram: bytes) -> None:
        if direction:
            return
        offset = 0
        while offset + _KCP_SEGMENT.size <= len(datagram):
            _conv, cmd, _frg, _wnd, _ts, sn, _una, length = _KCP_SEGMENT.unpack_from(datagram, offset)
            if cmd == _KCP_PUSH:
                if sn in seen:
                    again[0] += length
                seen.add(sn)
            offset += _KCP_SEGMENT.size + length

    return tap, again


def _rudp_counter() -> tuple[Callable[[int, bytes], None], list[int]]:
    """Counts STREAM bytes whose offsets were sent before, forward only."""
    sent = RangeSet()
    again = [0]

    def tap(direction: int, datagram: bytes) -> None:
        if direction:
            return
        try:
            packet = decode_packet(datagram)
        except WireError:
            return
        for frame in packet.frames:
            if isinstance(frame, Stream) and frame.data:
                end = frame.offset + len(frame.data)
                again[0] += len(frame.data) - sent.add(frame.offset, end)

    return tap, again


def compare(
    *, path: Path, size: int, seed: int, controllers: Sequence[str] = ("bbr", "cubic", "newreno")
) -> list[Row]:
    rows = []
    tap, again = _kcp_counter()
    rows.append(
        Row("kcp:// fast3", kcpsim.simulate_bulk(size=size, forward=path, seed=seed, tap=tap), again[0])
    )
    for cc in controllers:
        tap, again = _rudp_counter()
        result = rudpsim.simulate_bulk(size=size, forward=path, config=RudpConfig(cc=cc), seed=seed, tap=tap)
        rows.append(Row(f"rudp cc={cc}", result, again[0]))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rudp_sim", description=__doc__)
    parser.add_argument("--rate", type=parse_rate, default=12.5e6, help="bottleneck bytes/s (suffix k, m, g)")
    parser.add_argument("--queue", type=int, default=256 * 1024, help="bottleneck queue in bytes")
    parser.add_argument("--delay", type=float, default=0.01, help="one-way delay in seconds")
    parser.add_argument("--loss", type=float, nargs="+", default=[0.02], help="random loss each way")
    parser.add_argument("--mib", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    size = int(args.mib * MiB)
    for loss in args.loss:
        path = Path(rate=args.rate, queue=args.queue, delay=args.delay, loss=loss)
        print(
            f"# {args.mib:g} MiB, rate {args.rate / 1e6:g} MB/s, queue {args.queue} B, RTT {2 * args.delay * 1e3:g} ms, "
            f"loss {loss:.0%} each way, seed {args.seed}"
        )
        for row in compare(path=path, size=size, seed=args.seed):
            print(row.cells(size))


if __name__ == "__main__":
    main()
