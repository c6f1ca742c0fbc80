"""``python -m bench.rr_cpu``: what one 64-byte request/response costs each end of a tunnel, on the CPU and in
wakeups, with the variants alternated (a development tool, not a test).

    python -m bench.rr_cpu [--rounds 4] [--count 3000] [--code DIR] VARIANT ...

A variant is ``kcp`` (``kcp://...?mode=fast3&mtu=1350``), ``kcp:QUERY`` (that URL with ``&QUERY`` added, say
``kcp:pacing=off``), ``rudp`` (``rudp:QUERY`` likewise), ``tcp``, each with ``@DIR`` to run the vtunnel package in ``DIR`` instead of ``--code``
(``kcp@/tmp/old/vtunnel``: another commit's tree, alternated with this one), ``floor`` (two ``bench.floor`` relays: the least a Python relay chain of the same
hops costs) or ``kcptun`` (the harness's reference configuration). For each round and variant it starts the
echo server (``bench.workload serve``), the tunnel's server and client, warms them up and runs ``bench.workload
rr`` through them, and reads, per round trip and process: the on-CPU microseconds of all its threads and the
times they were put on a CPU (``/proc/PID/task/*/schedstat``: exact, where ``/proc/PID/stat`` counts 10 ms
ticks; a process woken twice per round trip and never preempted reads 2.0). Prints the medians over the rounds
(p50 and p99 of the client, agent and server), and with ``--markdown FILE`` writes them as a table. vtunnel runs
the package under ``--code`` (default: the one this interpreter imports), by path with ``-P`` as the harness runs
it. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.procs import free_port, wait_tcp
from bench.report import source_text, vtunnel_source
from bench.systems import KCPTUN_ARGS, LAUNCHER

WARMUP = 300


def _sched(pid: int) -> tuple[int, int]:
    """On-CPU nanoseconds and timeslices of all threads of ``pid`` (``/proc/PID/task/*/schedstat``)."""
    ns = slices = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:
            continue
        ns += int(fields[0])
        slices += int(fields[2])
    return ns, slices


def _commands(variant: str, echo: int, tunnel: int, entry: int) -> tuple[list[str], list[str]]:
    py = sys.executable
    if variant == "floor":
        return (
            [py, "-m", "bench.floor", "--listen", f"127.0.0.1:{tunnel}", "--to", f"127.0.0.1:{echo}"],
            [py, "-m", "bench.floor", "--listen", f"127.0.0.1:{entry}", "--to", f"127.0.0.1:{tunnel}"],
        )
    if variant == "kcptun":
        return (
            ["kcptun-server", "-l", f"127.0.0.1:{tunnel}", "-t", f"127.0.0.1:{echo}", *KCPTUN_ARGS],
            [
                "kcptun-client",
                "-l",
                f"127.0.0.1:{entry}",
                "-r",
                f"127.0.0.1:{tunnel}",
                "--conn",
                "1",
                *KCPTUN_ARGS,
            ],
        )
    kind, _, query = variant.partition(":")
    if kind == "tcp":
        url = f"tcp://127.0.0.1:{tunnel}"
    elif kind == "kcp":
        url = f"kcp://127.0.0.1:{tunnel}?mode=fast3&mtu=1350" + (f"&{query}" if query else "")
    elif kind == "rudp":
        url = f"rudp://127.0.0.1:{tunnel}" + (f"?{query}" if query else "")
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    vt = [py, "-P", str(LAUNCHER)]
    return (
        [*vt, "server", "--listen", url, "--target", f"127.0.0.1:{echo}", "--allow-private", "--insecure"],
        [*vt, "agent", "--server", url, "--forward", f"127.0.0.1:{entry}", "--insecure"],
    )


def measure(variant: str, code: Path, count: int) -> dict[str, float]:
    """One run of ``variant``: p50/p99 (us) and, per round trip, each end's on-CPU us and timeslices."""
    py = sys.executable
    echo, entry = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    variant, _, other = variant.partition("@")
    if other:
        code = Path(other).resolve()
    tunnel = free_port(socket.SOCK_STREAM if variant in ("tcp", "floor") else socket.SOCK_DGRAM)
    server_cmd, agent_cmd = _commands(variant, echo, tunnel, entry)
    env = {**os.environ, "PYTHONPATH": str(code.parent), "VTUNNEL_LOG_LEVEL": "warning"}
    procs: list[subprocess.Popen[bytes]] = []
    quiet = subprocess.DEVNULL
    try:
        procs.append(
            subprocess.Popen(
                [py, "-m", "bench.workload", "serve", "--listen", f"127.0.0.1:{echo}"], stdout=quiet
            )
        )
        wait_tcp("127.0.0.1", echo, timeout=15.0)
        server = subprocess.Popen(server_cmd, env=env, stdout=quiet, stderr=quiet)
        procs.append(server)
        if variant in ("tcp", "floor"):
            wait_tcp("127.0.0.1", tunnel, timeout=15.0)
        else:
            time.sleep(1.0)
        agent = subprocess.Popen(agent_cmd, env=env, stdout=quiet, stderr=quiet)
        procs.append(agent)
        wait_tcp("127.0.0.1", entry, timeout=15.0)
        rr = [py, "-m", "bench.workload", "rr", "--connect", f"127.0.0.1:{entry}", "--timeout", "120"]
        subprocess.run([*rr, "--count", str(WARMUP)], check=True, stdout=quiet)
        before = {role: _sched(p.pid) for role, p in (("agent", agent), ("server", server))}
        out = subprocess.run([*rr, "--count", str(count)], check=True, capture_output=True, text=True).stdout
        after = {role: _sched(p.pid) for role, p in (("agent", agent), ("server", server))}
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    samples = sorted(json.loads(out.strip().splitlines()[-1])["samples_ns"])
    result = {"p50": samples[len(samples) // 2] / 1e3, "p99": samples[int(len(samples) * 0.99)] / 1e3}
    for role in ("agent", "server"):
        result[f"{role}_cpu"] = (after[role][0] - before[role][0]) / count / 1e3
        result[f"{role}_slices"] = (after[role][1] - before[role][1]) / count
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rr_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--code", type=Path, default=None, help="the vtunnel package directory to run")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    if "kcptun" in args.variants and shutil.which("kcptun-server") is None:
        raise SystemExit("kcptun is not installed (bench/setup.sh)")
    if args.code is None:
        import vtunnel

        code = Path(vtunnel.__file__).resolve().parent
    else:
        code = args.code.resolve()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for variant in args.variants:
            runs[variant].append(measure(variant, code, args.count))
    keys = ("p50", "p99", "agent_cpu", "server_cpu", "agent_slices", "server_slices")
    lines = [
        f"`python -m bench.rr_cpu --rounds {args.rounds} --count {args.count} {' '.join(args.variants)}` "
        f"(code: {code}{source_text(vtunnel_source(code))}; {started}); medians over the rounds, per round trip.",
        "",
        "| variant | p50 us | p99 us | agent on-CPU us | server on-CPU us | agent timeslices | server timeslices |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, results in runs.items():
        med: dict[str, Any] = {k: statistics.median(r[k] for r in results) for k in keys}
        lines.append(
            f"| {variant} | {med['p50']:.0f} | {med['p99']:.0f} | {med['agent_cpu']:.1f} | {med['server_cpu']:.1f} "
            f"| {med['agent_slices']:.2f} | {med['server_slices']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
