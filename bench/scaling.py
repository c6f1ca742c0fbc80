"""The ``scaling`` scenario: aggregate bulk goodput of one server run as 1 and as 2 worker processes
(``vtunnel server --workers``), each time with 4 agents (one tunnel each) sending at once, and the server's CPU
seconds per GB carried (the supervisor and every worker together) beside it.

The configurations alternate (1, 2, 1, 2, ...) so a shared machine's drift hits both alike. On a 2-core machine
the 4 agents, the 4 bulk clients and the sink compete with the workers for the same cores: throughput is bounded
by the whole machine, so the server's CPU per GB (how much of a core it pays per byte) is the figure that says
whether a second worker costs or saves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

from bench.measure import CpuWatch, Metrics
from bench.procs import HarnessError, Proc, ProcessGroup, free_port, python_argv
from bench.systems import SystemSpec, agent_argv, code_env, server_argv, wait_log

__all__ = ["measure_scaling"]

AGENTS = 4


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _server_pids(server: Proc) -> dict[str, int]:
    pids = {"server": server.pid}
    for i, child in enumerate(_children(server.pid)):
        pids[f"worker{i}"] = child
    return pids


def _one(
    system: SystemSpec,
    group: ProcessGroup,
    psk_file: Path | None,
    workers: int,
    size: int,
    timeout: float,
) -> dict[str, object]:
    with group.scope() as scope:
        target = free_port()
        scope.spawn("workload", python_argv("bench.workload", "serve", "--listen", f"127.0.0.1:{target}"))
        listen = f"127.0.0.1:{free_port()}"
        extra = ["--workers", str(workers)] if workers > 1 else []
        server = scope.spawn(
            f"server-{workers}w",
            server_argv(system, listen, f"127.0.0.1:{target}", psk_file, extra),
            env=code_env(system),
        )
        wait_log(server, "workers serving" if workers > 1 else "listening", 60.0)
        entries: list[str] = []
        for i in range(AGENTS):
            entry = f"127.0.0.1:{free_port()}"
            agent = scope.spawn(
                f"agent{i}", agent_argv(system, listen, entry, psk_file), env=code_env(system)
            )
            wait_log(agent, "tunnel up", 30.0)
            entries.append(entry)
        clients = [
            scope.spawn(
                f"bulk{i}",
                python_argv(
                    "bench.workload",
                    "bulk",
                    "--connect",
                    entry,
                    "--streams",
                    "1",
                    "--bytes",
                    str(size),
                    "--timeout",
                    str(timeout),
                ),
                pipe=True,
            )
            for i, entry in enumerate(entries)
        ]
        for client in clients:
            first = json.loads(client.read_line(30.0))
            if not first.get("started"):
                raise HarnessError(f"bulk client failed: {first.get('error', first)}")
        pids = _server_pids(server)
        watch = CpuWatch(pids)
        watch.start()
        t0 = time.monotonic()
        results = [json.loads(client.read_line(timeout + 15)) for client in clients]
        wall = time.monotonic() - t0
        cpu = watch.stop()
        for result in results:
            if not result.get("ok"):
                raise HarnessError(f"workload bulk failed: {result.get('error', result)}")
        carried = sum(int(r["bytes"]) for r in results)
        server_cpu = sum(c["cpu_s"] for c in cpu.values())
        return {
            "workers": workers,
            "bytes": carried,
            "seconds": wall,
            "goodput_MBps": carried / wall / 1e6,
            "server_cpu_s": server_cpu,
            "server_cpu_s_per_GB": server_cpu / (carried / 1e9),
            "cpu": cpu,
        }


def measure_scaling(
    system: SystemSpec, group: ProcessGroup, psk_file: Path | None, settings: Mapping[str, float]
) -> Metrics:
    """1 worker against 2, ``rounds`` alternations; the medians of each, and every run in ``raw``."""
    size, timeout, rounds = int(settings["bytes"]), float(settings["timeout"]), int(settings["rounds"])
    runs: list[dict[str, object]] = []
    for _ in range(rounds):
        for workers in (1, 2):
            runs.append(_one(system, group, psk_file, workers, size, timeout))
    metrics: dict[str, float] = {}
    for workers in (1, 2):
        mine = [r for r in runs if r["workers"] == workers]
        for key in ("goodput_MBps", "server_cpu_s_per_GB"):
            values = sorted(float(r[key]) for r in mine)  # type: ignore[arg-type]
            metrics[f"{key}_{workers}w"] = values[len(values) // 2]
    metrics["goodput_2w_over_1w"] = metrics["goodput_MBps_2w"] / metrics["goodput_MBps_1w"]
    return metrics, {"agents": AGENTS, "bytes_per_agent": size, "runs": runs}
