"""Microseconds of rudp's sans-IO core per 64-byte request/response exchange (a development tool, not a test).

    python -m bench.rudp_rr_micro [--rounds 8] [--exchanges 10000] [--ref DIR]

Two :class:`~vtunnel.arq.rudp.Connection` objects in one process, no sockets, the clock advanced by hand by
0.1 ms a message: one end writes a message (73 bytes: a tunnel frame of 64 bytes of payload), builds its packet
(``datagrams_to_send``), the other takes it (``receive_datagrams``), reads it, asks what to send (nothing: the
ACK waits for the answer) and when its timer is due, then answers the same way. Each figure is the time of
``--exchanges`` exchanges over their number, the minimum over ``--rounds`` rounds. ``--ref DIR``: a directory
holding ``vtunnel_ref/``, another tree's ``vtunnel/`` renamed (``git archive REF vtunnel``), measured in the
same process, alternated round by round with this one; the datagrams both put on the wire are compared first.
"""

from __future__ import annotations

import argparse
import importlib
import time
from types import ModuleType

from bench.refs import add_ref_option, micro_packages

MESSAGE = bytes(73)


def _exchanges(rudp: ModuleType, count: int, record: list[bytes] | None = None) -> float:
    """``count`` exchanges; microseconds per exchange. ``record``: every datagram sent is added to it."""
    client = rudp.Connection(role=rudp.Role.CLIENT, local_cid=b"", peer_cid=b"", now=0.0)
    server = rudp.Connection(role=rudp.Role.SERVER, local_cid=b"", peer_cid=b"", now=0.0)
    now = 0.0
    clock = time.perf_counter
    start = clock()
    for _ in range(count):
        for sender, receiver in ((client, server), (server, client)):
            sender.send(MESSAGE)
            out = sender.datagrams_to_send(now)
            sender.next_deadline()
            if record is not None:
                record.extend(out)
            now += 0.0001
            receiver.receive_datagrams(out, now)
            receiver.receive()
            receiver.datagrams_to_send(now)
            receiver.next_deadline()
    return (clock() - start) / count * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rudp_rr_micro", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--exchanges", type=int, default=10_000)
    add_ref_option(parser)
    args = parser.parse_args(argv)
    packages = micro_packages(args.ref)
    modules = {p: importlib.import_module(f"{p}.arq.rudp.connection") for p in packages}
    if args.ref:
        wires: list[list[bytes]] = [[], []]
        for module, wire in zip(modules.values(), wires, strict=True):
            _exchanges(module, 2000, wire)
        print(f"the same datagrams on the wire: {wires[0] == wires[1]}")
    times: dict[str, list[float]] = {p: [] for p in packages}
    for _ in range(args.rounds):
        for package in reversed(packages):
            times[package].append(_exchanges(modules[package], args.exchanges))
    print(f"rudp core, us per request/response exchange ({args.exchanges} a round, {args.rounds} rounds)")
    for package in packages:
        rounds = " ".join(f"{t:.1f}" for t in times[package])
        print(f"{package:12s} min {min(times[package]):.1f}  ({rounds})")


if __name__ == "__main__":
    main()
