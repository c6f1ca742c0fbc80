"""Microseconds per sealed datagram: ``DatagramSession.seal_many`` / ``open_many`` over batches (a development
tool, not a test).

    python -m bench.seal_micro [--rounds 15] [--batch 64] [--size 1321] [--ref DIR]

Each figure is the minimum over ``rounds`` interleaved rounds of 40 batches of ``batch`` payloads of ``size``
bytes (1321: a full kcp:// datagram, 1350 on the wire), for each cipher. ``--ref DIR``: a directory holding
``vtunnel_ref/``, another tree's ``vtunnel/`` renamed (``git archive main vtunnel``), measured in the same
process, interleaved with this one, so that both see the same machine.
"""

from __future__ import annotations

import argparse
import importlib
import os
import timeit
from types import ModuleType
from typing import Any

from bench.refs import add_ref_option, micro_packages

ROUNDS_OF = 40


def _pair(datagram: ModuleType, noise: ModuleType, cipher: Any) -> tuple[Any, Any]:
    k1, k2, ck = os.urandom(32), os.urandom(32), os.urandom(32)
    cid = os.urandom(8)

    def keys(send: bytes, receive: bytes, initiator: bool) -> Any:
        return noise.TransportKeys(
            send=send, receive=receive, handshake_hash=bytes(32), chaining_key=ck, initiator=initiator
        )

    a = datagram.DatagramSession(cid, keys(k1, k2, True), cipher=cipher)
    b = datagram.DatagramSession(cid, keys(k2, k1, False), cipher=cipher)
    return a, b


def _measure(package: str, cipher_name: str, batch: int, size: int) -> tuple[float, float, float]:
    datagram = importlib.import_module(f"{package}.security.datagram")
    noise = importlib.import_module(f"{package}.security.noise")
    ciphers = importlib.import_module(f"{package}.security.ciphers")
    cipher = getattr(ciphers.Cipher, cipher_name)
    payloads = [os.urandom(size) for _ in range(batch)]
    a, _ = _pair(datagram, noise, cipher)
    seal_s = timeit.timeit(lambda: a.seal_many(payloads), number=ROUNDS_OF)
    a, b = _pair(datagram, noise, cipher)
    sealed = [a.seal_many(payloads) for _ in range(ROUNDS_OF)]
    open_many = b.open_many
    chunks = iter(sealed)
    open_s = timeit.timeit(lambda: open_many(next(chunks)), number=ROUNDS_OF)
    # as a GRO read hands them over: views of one buffer (``vtunnel.io.datagrams.split_run``)
    a, b = _pair(datagram, noise, cipher)
    views = []
    for _ in range(ROUNDS_OF):
        whole = memoryview(b"".join(a.seal_many(payloads)))
        step = size + datagram.DATAGRAM_OVERHEAD
        views.append([whole[i : i + step] for i in range(0, len(whole), step)])
    open_many = b.open_many
    chunks = iter(views)
    views_s = timeit.timeit(lambda: open_many(next(chunks)), number=ROUNDS_OF)
    per = 1e6 / ROUNDS_OF / batch
    return seal_s * per, open_s * per, views_s * per


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.seal_micro")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=1321)
    add_ref_option(parser)
    args = parser.parse_args(argv)
    packages = micro_packages(args.ref)
    print(f"us per datagram, batches of {args.batch} x {args.size} bytes, min of {args.rounds} rounds")
    print("| cipher | code | seal_many | open_many | open_many (views of a run) |")
    print("|---|---|---|---|---|")
    for cipher in ("AES_256_GCM", "CHACHA20_POLY1305"):
        best: dict[str, tuple[float, ...]] = {}
        for _ in range(args.rounds):
            for package in packages:
                got = _measure(package, cipher, args.batch, args.size)
                best[package] = tuple(map(min, zip(best.get(package, got), got, strict=True)))
        for package, figures in best.items():
            name = cipher.lower().replace("_", "-")
            code = "ref" if package == "vtunnel_ref" else "this"
            print(f"| {name} | {code} | " + " | ".join(f"{f:.3f}" for f in figures) + " |")


if __name__ == "__main__":
    main()
