"""Two flows on one bottleneck (``rudp-fair``): what share of the link each tunnel gets.

The stack's agent and a second agent of the same system (its own tunnel: its own UDP socket and ARQ
connection) each carry one bulk stream to the workload server through the veth link, whose rate limit is the
one bottleneck both cross. The second starts ``delay`` seconds after the first, so it has to win its share
from a flow that already fills the link. The harness reads, every 0.2 s, the bytes each tunnel's UDP flow
brought into the server's namespace (:meth:`bench.netem.NetnsLink.flows`: after the bottleneck, so the shares
of the link as it delivered them) and computes Jain's index, ``(a + b)^2 / (2 (a^2 + b^2))``, over the span
from ``settle`` seconds after the second flow began until the first of the two transfers ended.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

from bench.measure import Metrics
from bench.netem import NetnsLink
from bench.procs import HarnessError, Proc, ProcessGroup, python_argv
from bench.systems import Stack, start_side_agent

__all__ = ["jain", "measure_fairness"]

#: how often the flows' counters are read
POLL = 0.2
#: the bytes after which a UDP source port counts as a transfer's flow
FLOW_BYTES = 1_000_000


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when all shares are equal, 1/n when one flow has everything."""
    square = sum(v * v for v in values)
    return sum(values) ** 2 / (len(values) * square) if square else 0.0


def _bulk(group: ProcessGroup, stack: Stack, name: str, entry: str, size: int, limit: float) -> Proc:
    host, _, port = entry.rpartition(":")
    argv = python_argv("bench.workload", "bulk", "--connect", f"{host}:{port}", "--streams", "1")
    argv += ["--bytes", str(size), "--timeout", str(limit)]
    return group.spawn(name, [*stack.placement.client_prefix, *argv], pipe=True)


def _result(proc: Proc, limit: float) -> dict[str, object]:
    while True:
        line = json.loads(proc.read_line(limit))
        if not isinstance(line, dict):
            raise HarnessError(f"{proc.name} said something unreadable: {line!r}")
        if not line.get("started"):
            return line


def measure_fairness(
    stack: Stack, link: NetnsLink, settings: Mapping[str, float], group: ProcessGroup, psk_file: Path | None
) -> Metrics:
    size, limit = int(settings["bytes"]), float(settings["timeout"])
    delay, settle = float(settings["delay"]), float(settings["settle"])
    second_entry = start_side_agent(stack, group, psk_file, "agent-2", stack.target)
    first = _bulk(group, stack, "bulk-a", f"{stack.entry_host}:{stack.entry_port}", size, limit)
    began = time.monotonic()
    second: Proc | None = None
    second_began = 0.0
    readings: list[tuple[float, dict[int, int]]] = []
    ports: list[int] = []
    try:
        while first.alive() and (second is None or second.alive()):
            now = time.monotonic() - began
            if now > limit:
                raise HarnessError(f"the two transfers did not end within {limit:g} s")
            if second is None and now >= delay:
                second = _bulk(group, stack, "bulk-b", second_entry, size, limit)
                second_began = now
            flows = link.flows()
            # a tunnel's flow is the port that carried a transfer's first MB (not a keepalive or handshake)
            for port, count in sorted(flows.items(), key=lambda item: -item[1]):
                if port not in ports and count >= FLOW_BYTES:
                    ports.append(port)
            readings.append((now, flows))
            time.sleep(POLL)
        results = [_result(first, limit)] + ([_result(second, limit)] if second is not None else [])
    finally:
        group.stop(first)
        if second is not None:
            group.stop(second)
    for result in results:
        if not result.get("ok"):
            raise HarnessError(f"workload bulk failed: {result.get('error', result)}")
    if second is None or len(ports) < 2:
        raise HarnessError(f"two flows were not seen at the bottleneck (ports {ports})")
    start = second_began + settle
    window = [(t, flows) for t, flows in readings if t >= start]
    if len(window) < 2:
        raise HarnessError(
            f"the transfers ended within {settle:g} s of the second one's start: make them longer"
        )
    (t0, at_start), (t1, at_end) = window[0], window[-1]
    shares = [float(at_end.get(port, 0) - at_start.get(port, 0)) for port in ports[:2]]
    span = t1 - t0
    metrics = {
        "jain": jain(shares),
        "first_MBps": shares[0] / span / 1e6,
        "second_MBps": shares[1] / span / 1e6,
        "link_MBps": sum(shares) / span / 1e6,
    }
    raw: dict[str, object] = {
        "window_s": [t0, t1],
        "shares_bytes": shares,
        "ports": ports[:2],
        "goodput_MBps": [float(str(r["goodput"])) / 1e6 for r in results],
        "readings": [[t, {str(p): flows.get(p, 0) for p in ports[:2]}] for t, flows in readings],
    }
    return metrics, raw
