"""What per-user keys cost a server: the CPU time of a first message against a key set of N users.

A first message names no user, so the server tries each key (docs/security.md, Users). Measured in one process on
the sans-IO cores, CPU time (``time.process_time``), median of ``--rounds`` rounds of ``--count`` messages each:

* ``stream stranger`` / ``datagram stranger``: a first message under a key the server does not hold (what a probe
  or a revoked agent costs): every key is tried;
* ``stream user`` / ``datagram user``: a whole server handshake of the last user of the set (the worst placed),
  Diffie-Hellman and reply included.

Prints a table and writes ``bench/results/key-trial.json``. Run: ``python -m bench.key_trial [--users 1,16,64,256]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from vtunnel.security.datagram import DatagramClient, DatagramServer
from vtunnel.security.errors import AuthenticationFailed
from vtunnel.security.keys import KEY_LEN, KeySet, UserKey
from vtunnel.security.records import SecureStreamClient, SecureStreamServer
from vtunnel.security.replay import ReplayCache

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ("192.0.2.1", 4000)


def _per_message(messages: list[bytes], handle: Callable[[bytes], object], rounds: int) -> float:
    """Median over ``rounds`` of the CPU seconds per message of ``handle`` over ``messages``."""
    samples = []
    for _ in range(rounds):
        start = time.process_time()
        for message in messages:
            handle(message)
        samples.append((time.process_time() - start) / len(messages))
    return statistics.median(samples)


def measure(users: int, count: int, rounds: int) -> dict[str, float]:
    keys = KeySet(UserKey(f"u{i}", os.urandom(KEY_LEN)) for i in range(users))
    last = list(keys)[-1].key
    stranger = os.urandom(KEY_LEN)
    now = time.time()

    def stream(message: bytes) -> None:
        server = SecureStreamServer(keys, replay=ReplayCache())
        with contextlib.suppress(AuthenticationFailed):
            server.receive_data(message, now)

    datagrams = DatagramServer(keys, replay=ReplayCache(max_entries=10 * count * rounds))

    def datagram(message: bytes) -> None:
        datagrams.accept(message, SOURCE, now)

    return {
        "stream stranger": _per_message(
            [SecureStreamClient(stranger, now=now).data_to_send() for _ in range(count)], stream, rounds
        ),
        "stream user": _per_message(  # (each server has a replay cache of its own)
            [SecureStreamClient(last, now=now).data_to_send() for _ in range(count)], stream, rounds
        ),
        "datagram stranger": _per_message(
            [DatagramClient(stranger, now=now).initial_datagram() for _ in range(count)], datagram, rounds
        ),
        "datagram user": _per_message(  # (one server: every INIT is new to its replay cache)
            [DatagramClient(last, now=now).initial_datagram() for _ in range(count * rounds)], datagram, 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.key_trial", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", default="1,16,64,256", help="key set sizes, comma separated")
    parser.add_argument("--count", type=int, default=200, help="messages per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "key-trial.json")
    args = parser.parse_args()
    results = {}
    print(
        f"{'users':>6} {'stream stranger':>16} {'stream user':>12} {'datagram stranger':>18} {'datagram user':>14}"
    )
    for n in (int(part) for part in args.users.split(",")):
        row = measure(n, args.count, args.rounds)
        results[n] = row
        print(
            f"{n:>6} {row['stream stranger'] * 1e6:>13.0f} us {row['stream user'] * 1e6:>9.0f} us "
            f"{row['datagram stranger'] * 1e6:>15.0f} us {row['datagram user'] * 1e6:>11.0f} us"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu_seconds_per_message": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
