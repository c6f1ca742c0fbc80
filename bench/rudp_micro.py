"""Microseconds of rudp's sans-IO core per packet of a bulk transfer: sending, receiving, and taking the ACKs
(a development tool, not a test).

    python -m bench.rudp_micro [--rounds 7] [--mib 8] [--batch 64] [--ref DIR]

Two :class:`~vtunnel.arq.rudp.Connection` objects in one process, no sockets, the clock advanced by hand: the
sender's ``datagrams_to_send`` builds full packets of new stream data (pacing off, so the window alone limits a
burst), the receiver takes them ``--batch`` at a time as a socket's GRO run would hand them in
(``receive_datagrams``), reads the bytes, and answers with its ACKs, which the sender takes. Each figure is the
time of that one step over the packets it handled, the minimum over ``--rounds`` rounds of a ``--mib``
transfer. ``--ref DIR``: a directory holding ``vtunnel_ref/``, another tree's ``vtunnel/`` renamed
(``git archive REF vtunnel``), measured in the same process, interleaved with this one; it is handed its
datagrams one ``receive_datagram`` at a time (as the link did before ``receive_datagrams``).
"""

from __future__ import annotations

import argparse
import importlib
import time

from bench.refs import add_ref_option, micro_packages

STEPS = ("send", "receive", "ack")


def _transfer(package: str, total: int, batch: int, *, one_by_one: bool) -> dict[str, float]:
    """One transfer of ``total`` bytes; microseconds per packet of each step."""
    rudp = importlib.import_module(f"{package}.arq.rudp.connection")
    config = rudp.RudpConfig(pacing=False)
    client = rudp.Connection(
        role=rudp.Role.CLIENT, local_cid=b"c" * 8, peer_cid=b"s" * 8, config=config, now=0.0
    )
    server = rudp.Connection(
        role=rudp.Role.SERVER, local_cid=b"s" * 8, peer_cid=b"c" * 8, config=config, now=0.0
    )
    chunk = bytes(range(256)) * 256
    written = received = packets = 0
    spent = dict.fromkeys(STEPS, 0.0)
    clock = time.perf_counter
    now = 0.0
    for _ in range(1_000_000):  # bounded: a transfer takes a few thousand steps
        if received >= total:
            break
        while written < total and client.send_room() > 0:
            written += client.send(chunk[: min(len(chunk), total - written, client.send_room())])
        start = clock()
        out = client.datagrams_to_send(now)
        spent["send"] += clock() - start
        packets += len(out)
        for i in range(0, len(out), batch):
            run = out[i : i + batch]
            start = clock()
            if one_by_one:
                for datagram in run:
                    server.receive_datagram(datagram, now)
            else:
                server.receive_datagrams(run, now)
            spent["receive"] += clock() - start
            received += len(server.receive())
        now += 0.0005
        acks = server.datagrams_to_send(now)
        start = clock()
        for datagram in acks:
            client.receive_datagram(datagram, now)
        spent["ack"] += clock() - start
        if not out and not acks:
            now = max(now, client.next_deadline() or now)
            client.handle_timer(now)
            server.handle_timer(now)
    else:
        raise RuntimeError("the transfer did not finish")
    if received != total:
        raise RuntimeError(f"received {received} of {total} bytes")
    return {step: spent[step] * 1e6 / packets for step in STEPS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rudp_micro", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--mib", type=float, default=8.0)
    parser.add_argument("--batch", type=int, default=64)
    add_ref_option(parser)
    args = parser.parse_args(argv)
    packages = micro_packages(args.ref)
    total = int(args.mib * 1024 * 1024)
    best: dict[str, dict[str, float]] = {p: dict.fromkeys(STEPS, float("inf")) for p in packages}
    for _ in range(args.rounds):
        for package in packages:
            result = _transfer(package, total, args.batch, one_by_one=package != "vtunnel")
            for step in STEPS:
                best[package][step] = min(best[package][step], result[step])
    print(
        f"rudp core, us per data packet (min of {args.rounds} rounds, {args.mib} MiB, runs of {args.batch})"
    )
    for package in packages:
        figures = "  ".join(f"{step} {best[package][step]:.2f}" for step in STEPS)
        total_us = sum(best[package].values())
        print(f"{package:12s} {figures}  all {total_us:.2f}")


if __name__ == "__main__":
    main()
