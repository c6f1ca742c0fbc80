"""One measurement of one scenario kind on a running stack.

Each function returns ``(metrics, raw)``: ``metrics`` are the few numbers the report summarises (medians over
the rounds), ``raw`` keeps every sample. Units are in the metric names (``_MBps`` = 10^6 bytes/s, ``_us``,
``_ms``, ``_pct`` of one core, ``_bytes``).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from bench.netem import LOOPBACK, Placement
from bench.procs import (
    CLK_TCK,
    HarnessError,
    Proc,
    ProcessGroup,
    cpu_seconds,
    free_port,
    python_argv,
    rss_bytes,
    tcp_queues,
    thread_cpu_ns,
)
from bench.stats import percentile
from bench.systems import (
    Stack,
    SystemSpec,
    agent_argv,
    check_code,
    code_env,
    run_client,
    server_argv,
    tunnel_url,
    wait_log,
)

__all__ = [
    "Metrics",
    "cpu_usage",
    "hold_connections",
    "machine_busy_pct",
    "measure_bulk",
    "measure_https_lite",
    "measure_idle_cpu",
    "measure_idle_streams",
    "measure_rr",
    "measure_stalled",
    "measure_ttfb",
    "measure_ttfb_spliced",
    "relay_counters",
    "start_stall_sink",
    "start_tls_sources",
]

Metrics = tuple[dict[str, float], dict[str, object]]


class CpuWatch:
    """CPU time of some processes between :meth:`start` and :meth:`stop`.

    Each thread's exact run time (``schedstat``) where every thread the watch began with is still there and the
    sum agrees with ``/proc/PID/stat`` to a clock tick: a short transfer of a fast peer (shadowsocks-libev moves
    8 MiB in a few ms) would otherwise read as no CPU at all. Where a thread ended, the tick count of ``stat``,
    which keeps the time of ended threads."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self._t0 = 0.0
        self._cpu0: dict[str, float] = {}
        self._threads0: dict[str, dict[int, int]] = {}

    def start(self) -> None:
        self._cpu0 = {role: cpu_seconds(pid) for role, pid in self.pids.items()}
        self._threads0 = {role: thread_cpu_ns(pid) for role, pid in self.pids.items()}
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, dict[str, float]]:
        wall = time.monotonic() - self._t0
        out: dict[str, dict[str, float]] = {}
        for role, pid in self.pids.items():
            ticks = cpu_seconds(pid) - self._cpu0[role]
            threads, threads0 = thread_cpu_ns(pid), self._threads0[role]
            exact = (sum(threads.values()) - sum(threads0.values())) / 1e9
            # a tick count differs from the exact time by less than a tick at each end
            whole = threads0.keys() <= threads.keys() and exact > ticks - 2.0 / CLK_TCK
            cpu = exact if whole else ticks
            out[role] = {
                "cpu_s": cpu,
                "pct": 100.0 * cpu / wall if wall > 0 else 0.0,
                "sched_pct": 100.0 * exact / wall if wall > 0 else 0.0,
                "wall_s": wall,
            }
        return out


def machine_busy_pct(cpu_s: float, wall_s: float) -> float:
    """``cpu_s`` of CPU time over ``wall_s`` seconds as a share of all the machine's cores (100: all were busy
    throughout)."""
    cores = os.cpu_count() or 1
    return 100.0 * cpu_s / (wall_s * cores) if wall_s > 0 else 0.0


def cpu_usage(pids: Mapping[str, int], action: Callable[[], None]) -> dict[str, dict[str, float]]:
    watch = CpuWatch(pids)
    watch.start()
    action()
    return watch.stop()


def relay_counters(stack: Stack) -> dict[str, dict[str, int]]:
    """The relay's last counters line (it prints JSON counters every second), or an empty dict."""
    proc = stack.procs.get("relay")
    if proc is None or proc.log_path is None:
        return {}
    try:
        lines = proc.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        if line.startswith('{"up"'):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return {
                    direction: {k: int(v) for k, v in counts.items() if isinstance(v, int)}
                    for direction, counts in value.items()
                    if isinstance(counts, dict)
                }
    return {}


class RelayWatch:
    """The relay's counters over one measurement: the counters line is printed every second, so the end
    reading waits for the line that follows the measurement."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.before = relay_counters(stack)

    def delta(self) -> dict[str, dict[str, int]]:
        if "relay" not in self.stack.procs:
            return {}
        time.sleep(1.2)
        after = relay_counters(self.stack)
        return {
            direction: {k: v - self.before.get(direction, {}).get(k, 0) for k, v in counts.items()}
            for direction, counts in after.items()
        }


def measure_bulk(stack: Stack, settings: Mapping[str, float], group: ProcessGroup) -> Metrics:
    """Goodput of one validated transfer, and the CPU of the system's processes during the transfer alone."""
    limit = float(settings["timeout"])
    client = group.spawn(
        "bulk",
        [
            *stack.placement.client_prefix,
            *python_argv(
                "bench.workload",
                "bulk",
                *stack.client_args(),
                "--streams",
                str(int(settings["streams"])),
                "--bytes",
                str(int(settings["bytes"])),
                "--timeout",
                str(limit),
            ),
        ],
        pipe=True,
    )
    try:
        first = json.loads(client.read_line(30.0))
        if not first.get("started"):
            raise HarnessError(f"bulk client failed: {first.get('error', first)}")
        relay = RelayWatch(stack)
        sink = stack.procs["sink"]
        watch = CpuWatch({**stack.pids(), "sink": sink.pid})
        watch.start()
        result = json.loads(client.read_line(limit + 15))
        cpu = watch.stop()
    except json.JSONDecodeError as exc:
        raise HarnessError(f"bulk client said something unreadable: {exc}") from None
    finally:
        group.stop(client)
    if not result.get("ok"):
        raise HarnessError(f"workload bulk failed: {result.get('error', result)}")
    sink_cpu = cpu.pop("sink")
    workload_cpu = {"client": float(result["cpu_s"]), "sink": sink_cpu["cpu_s"]}
    raw: dict[str, object] = {
        "bytes": result["bytes"],
        "seconds": result["seconds"],
        "stream_seconds": result["stream_seconds"],
        "cpu": cpu,
        "workload_cpu": workload_cpu,
        "machine_busy_pct": machine_busy_pct(
            sum(usage["cpu_s"] for usage in cpu.values()) + sum(workload_cpu.values()), sink_cpu["wall_s"]
        ),
    }
    counters = relay.delta()
    metrics = {"goodput_MBps": float(result["goodput"]) / 1e6}
    gigabytes = float(result["bytes"]) / 1e9
    tunnel_cpu = [usage["cpu_s"] for role, usage in cpu.items() if role in ("agent", "server")]
    if tunnel_cpu and gigabytes > 0:
        # both ends of the tunnel (the relay and the workload are not the system's own work)
        metrics["cpu_s_per_GB"] = sum(tunnel_cpu) / gigabytes
    if gigabytes > 0:
        metrics["workload_cpu_s_per_GB"] = sum(workload_cpu.values()) / gigabytes
    if counters:
        raw["relay"] = counters
        sent = sum(direction.get("received_bytes", 0) for direction in counters.values())
        if sent and result["bytes"]:
            metrics["wire_per_payload"] = sent / float(result["bytes"])
            metrics["wire_excess"] = metrics["wire_per_payload"] - 1.0
    return metrics, raw


def _latency(samples_ns: list[int], scale: float, unit: str) -> dict[str, float]:
    values = [s / scale for s in samples_ns]
    return {
        f"p50_{unit}": percentile(values, 50),
        f"p99_{unit}": percentile(values, 99),
        f"p999_{unit}": percentile(values, 99.9),
        f"mean_{unit}": sum(values) / len(values),
    }


def _samples(result: Mapping[str, object]) -> list[int]:
    samples = result.get("samples_ns")
    if not isinstance(samples, list) or not samples:
        raise HarnessError("the workload returned no samples")
    return [int(s) for s in samples]


def measure_rr(stack: Stack, settings: Mapping[str, float]) -> Metrics:
    count = int(settings["count"])
    relay = RelayWatch(stack)
    result = run_client(
        stack.placement,
        ["rr", *stack.client_args(), "--count", str(count), "--timeout", str(settings["timeout"])],
        timeout=float(settings["timeout"]),
    )
    samples = _samples(result)
    raw: dict[str, object] = {"samples_ns": samples}
    counters = relay.delta()
    if counters:
        raw["relay"] = counters
    return _latency(samples, 1e3, "us"), raw


def measure_ttfb(stack: Stack, settings: Mapping[str, float]) -> Metrics:
    count = int(settings["count"])
    result = run_client(
        stack.placement,
        ["ttfb", *stack.client_args(), "--count", str(count), "--timeout", str(settings["timeout"])],
        timeout=float(settings["timeout"]),
    )
    samples = _samples(result)
    return _latency(samples, 1e6, "ms"), {"samples_ns": samples}


def measure_ttfb_spliced(stack: Stack, settings: Mapping[str, float], round_index: int) -> Metrics:
    """Time to first byte of plain connections through an agent in lite-tls splice mode (``agent-plain-spliced``,
    entry ``side_entries["plain-spliced"]``, forwarding to the workload server) and through the stack's own agent
    (muxed), in alternating order; the CPU of the spliced agent and the server per connection."""
    spliced = stack.side_entries.get("plain-spliced")
    if spliced is None:
        raise HarnessError("the ttfb-spliced scenario needs a stack with an agent in splice mode")
    count = int(settings["count"])
    timeout = float(settings["timeout"])
    ends = {"agent": stack.procs["agent-plain-spliced"].pid, "server": stack.pids()["server"]}
    rows = [("spliced", spliced), ("muxed", stack.entry)]
    if round_index % 2:
        rows.reverse()
    metrics: dict[str, float] = {}
    raw: dict[str, object] = {"order": [name for name, _ in rows]}
    for name, entry in rows:
        got: dict[str, object] = {}

        def run(entry: str = entry, got: dict[str, object] = got) -> None:
            got.update(
                run_client(
                    stack.placement,
                    ["ttfb", "--connect", entry, "--count", str(count), "--timeout", str(timeout)],
                    timeout=timeout,
                )
            )

        if name == "spliced":
            cpu = cpu_usage(ends, run)
            metrics["spliced_cpu_ms_per_conn"] = sum(r["cpu_s"] for r in cpu.values()) * 1e3 / count
        else:
            run()
        samples = _samples(got)
        for key, value in _latency(samples, 1e6, "ms").items():
            metrics[f"{name}_{key}"] = value
        raw[name] = {"samples_ns": samples}
        stack.check_alive()
    metrics["p50_ms"] = metrics["spliced_p50_ms"]
    metrics["p99_ms"] = metrics["spliced_p99_ms"]
    return metrics, raw


def hold_connections(
    group: ProcessGroup, placement: Placement, entry: str, count: int, timeout: float, concurrency: int = 16
) -> Proc:
    """A client holding ``count`` idle, echo-proven connections to ``entry``; return once all are up."""
    proc = group.spawn(
        "hold",
        [
            *placement.client_prefix,
            *python_argv(
                "bench.workload",
                "hold",
                "--connect",
                entry,
                "--connections",
                str(count),
                "--timeout",
                str(timeout),
                "--concurrency",
                str(concurrency),
            ),
        ],
        pipe=True,
    )
    line = proc.read_line(timeout + 15)
    try:
        answer = json.loads(line)
    except json.JSONDecodeError:
        raise HarnessError(f"hold client said: {line[-300:]!r}") from None
    if answer.get("opened") != count:
        raise HarnessError(f"hold client failed: {answer.get('error', answer)}")
    return proc


def release(group: ProcessGroup, proc: Proc) -> None:
    stdin = proc.popen.stdin
    if stdin is not None:
        try:
            stdin.write(b"close\n")
            stdin.flush()
        except OSError:
            pass
    with contextlib.suppress(Exception):
        proc.popen.wait(10)
    group.stop(proc)


def measure_idle_cpu(
    stacks: Sequence[Stack], group: ProcessGroup, settings: Mapping[str, float]
) -> list[Metrics | HarnessError]:
    """CPU of quiet stacks, each with one open idle stream, over one shared window.

    The stacks are idle, so measuring them side by side does not make them compete, and every system sees the
    same background noise of the machine. Returns one result per stack, in order (an error for a stack that
    could not hold its stream or died during the window).
    """
    seconds = float(settings["seconds"])
    holders: list[Proc | HarnessError] = []
    for stack in stacks:
        try:
            holders.append(hold_connections(group, stack.placement, stack.entry, 1, 30.0))
        except HarnessError as exc:
            holders.append(exc)
    try:
        time.sleep(1.0)  # let the opens settle: the quiet window starts after them
        pids = {
            f"{i}:{role}": pid
            for i, (stack, holder) in enumerate(zip(stacks, holders, strict=True))
            if not isinstance(holder, HarnessError)
            for role, pid in stack.pids().items()
            if role in ("agent", "server")
        }
        cpu = cpu_usage(pids, lambda: time.sleep(seconds))
    finally:
        for holder in holders:
            if not isinstance(holder, HarnessError):
                release(group, holder)
    results: list[Metrics | HarnessError] = []
    for i, (stack, holder) in enumerate(zip(stacks, holders, strict=True)):
        if isinstance(holder, HarnessError):
            results.append(holder)
            continue
        try:
            stack.check_alive()
        except HarnessError as exc:
            results.append(exc)
            continue
        mine = {key.split(":", 1)[1]: value for key, value in cpu.items() if key.startswith(f"{i}:")}
        metrics = {f"{role}_pct": v["pct"] for role, v in mine.items()}
        metrics.update({f"{role}_sched_pct": v["sched_pct"] for role, v in mine.items()})
        metrics["max_pct"] = max(v["pct"] for v in mine.values())
        results.append((metrics, {"cpu": mine, "seconds": seconds, "side_by_side": len(stacks)}))
    return results


def measure_idle_streams(stack: Stack, group: ProcessGroup, settings: Mapping[str, float]) -> Metrics:
    count = int(settings["streams"])
    timeout = float(settings["timeout"])
    pids = {role: pid for role, pid in stack.pids().items() if role in ("agent", "server")}
    time.sleep(0.5)
    before = {role: rss_bytes(pid) for role, pid in pids.items()}
    t0 = time.monotonic()
    concurrency = int(settings.get("concurrency", 16))
    holder = hold_connections(group, stack.placement, stack.entry, count, timeout, concurrency)
    try:
        opened = time.monotonic() - t0
        time.sleep(1.0)
        after = {role: rss_bytes(pid) for role, pid in pids.items()}
        stack.check_alive()
    finally:
        release(group, holder)
    delta = {role: after[role] - before[role] for role in pids}
    metrics = {
        "per_stream_bytes": sum(delta.values()) / count,
        **{f"{role}_delta_bytes": float(v) for role, v in delta.items()},
        "open_seconds": opened,
    }
    return metrics, {"streams": count, "concurrency": concurrency, "rss_before": before, "rss_after": after}


def psk_args(psk_file: Path | None) -> list[str]:
    return ["--psk-file", str(psk_file)] if psk_file is not None else []


def _settle_rss(pid: int, *, limit: float = 5.0) -> int:
    """RSS of ``pid`` once two readings 0.3 s apart agree within 1% (or after ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    last = rss_bytes(pid)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = rss_bytes(pid)
        if abs(now - last) <= last // 100:
            return now
        last = now
    return last


def _ask(proc: Proc, command: str | None, timeout: float) -> dict[str, object]:
    """Optionally send ``command`` to a piped helper, then read its JSON answer."""
    if command is not None and proc.popen.stdin is not None:
        proc.popen.stdin.write(command.encode() + b"\n")
        proc.popen.stdin.flush()
    line = proc.read_line(timeout)
    try:
        answer = json.loads(line)
    except json.JSONDecodeError:
        raise HarnessError(f"{proc.name} said: {line[-300:]!r}") from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        raise HarnessError(
            f"{proc.name} failed: {answer.get('error') if isinstance(answer, dict) else answer}"
        )
    return answer


def measure_tunnels(
    system: SystemSpec, group: ProcessGroup, psk_file: Path | None, count: int, timeout: float
) -> Metrics:
    """Server RSS growth over ``count`` tunnels from one client process, each carrying one idle stream.

    kcptun (``--conn N``) creates a session when a connection is first given to it, round robin, so its N
    sessions exist once N connections are open: the comparable figure is therefore "a tunnel with one idle
    stream" (``per_tunnel_bytes``). For vtunnel the bare tunnels, before any stream, are measured too
    (``bare_per_tunnel_bytes``).
    """
    target_port = free_port()
    group.spawn("workload", python_argv("bench.workload", "serve", "--listen", f"127.0.0.1:{target_port}"))
    listen = f"127.0.0.1:{free_port()}"
    server = group.spawn(
        "server", server_argv(system, listen, f"127.0.0.1:{target_port}", psk_file), env=code_env(system)
    )
    wait_log(server, "listening", 25.0)
    if system.kind == "vtunnel":
        check_code(server, system)
    before = _settle_rss(server.pid)
    t0 = time.monotonic()
    metrics: dict[str, float] = {}
    raw: dict[str, object] = {"tunnels": count, "rss_before": before}
    if system.kind == "kcptun":
        entry = f"127.0.0.1:{free_port()}"
        client = group.spawn("client", agent_argv(system, listen, entry, psk_file, conns=count))
        wait_log(client, "listening", 25.0)
        holder = hold_connections(group, LOOPBACK, entry, count, timeout)
    else:
        args = ["--server", tunnel_url(system, listen), "--count", str(count), "--timeout", str(timeout)]
        if system.keyed and psk_file is not None:
            args += ["--psk-file", str(psk_file)]
        # A twin's client runs the exported tree too: -P keeps the working directory's vtunnel off the path.
        argv = python_argv("bench.tunnels", *args)
        if system.ref is not None:
            argv.insert(1, "-P")
        holder = group.spawn("tunnels", argv, pipe=True, env=code_env(system, with_bench=True))
        _ask(holder, None, timeout + 15)
        bare = _settle_rss(server.pid)
        raw["rss_bare"] = bare
        metrics["bare_per_tunnel_bytes"] = (bare - before) / count
        _ask(holder, "streams", timeout + 15)
    try:
        opened = time.monotonic() - t0
        after = _settle_rss(server.pid)
        if not server.alive():
            raise HarnessError(f"{system.name} server exited: {server.last_words()}")
    finally:
        release(group, holder)
    raw["rss_after"] = after
    metrics.update(
        {
            "per_tunnel_bytes": (after - before) / count,
            "server_delta_bytes": float(after - before),
            "open_seconds": opened,
        }
    )
    return metrics, raw


class RssPeak:
    """The highest RSS of some processes, read every ``interval`` seconds from a thread while it runs."""

    def __init__(self, pids: Mapping[str, int], interval: float = 0.05) -> None:
        self.pids = dict(pids)
        self.peak = {role: rss_bytes(pid) for role, pid in self.pids.items()}
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-peak", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            for role, pid in self.pids.items():
                with contextlib.suppress(HarnessError):
                    self.peak[role] = max(self.peak[role], rss_bytes(pid))

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)
        for role, pid in self.pids.items():  # one last reading at the end
            with contextlib.suppress(HarnessError):
                self.peak[role] = max(self.peak[role], rss_bytes(pid))


def start_stall_sink(group: ProcessGroup, settings: Mapping[str, float]) -> tuple[Proc, str]:
    """Start the workload's stalled sink (accepts, never reads) on loopback; return it and its address."""
    proc = group.spawn(
        "stall-sink",
        python_argv(
            "bench.workload",
            "stall-sink",
            "--listen",
            "127.0.0.1:0",
            "--rcvbuf",
            str(int(settings["rcvbuf"])),
        ),
        pipe=True,
    )
    return proc, f"127.0.0.1:{_ready_port(proc, 'stalled sink')}"


def _ready_port(proc: Proc, what: str) -> int:
    """The port a workload server says it listens on in its first line."""
    line = proc.read_line(30.0)
    try:
        return int(json.loads(line)["port"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise HarnessError(f"{what} said: {line[-300:]!r}") from None


def start_tls_sources(group: ProcessGroup, count: int) -> list[tuple[Proc, str]]:
    """Start ``count`` TLS sources (the workload's ``tls-serve``) on loopback; return them and their addresses."""
    sources: list[tuple[Proc, str]] = []
    for i in range(count):
        proc = group.spawn(
            f"tls-source-{i}",
            python_argv("bench.workload", "tls-serve", "--listen", "127.0.0.1:0"),
            pipe=True,
        )
        sources.append((proc, f"127.0.0.1:{_ready_port(proc, 'TLS source')}"))
    return sources


def measure_https_lite(stack: Stack, settings: Mapping[str, float], round_index: int) -> Metrics:
    """HTTPS-like bulk download goodput, side by side: lite-tls muxed, lite-tls spliced, lite-tls off, direct.

    The stack's agent forwards to a TLS source (``lite``: a lite-tls stream, chosen by its ClientHello, that
    leaves the tunnel's encryption once TLS is up, in PASSTHROUGH frames; over kcp://, whose links carry no
    passthrough records, the agent without splice mode is not offered lite-tls and the stream stays sealed). A
    second agent (``agent-spliced``, entry ``side_entries["spliced"]``) reaches the same source in splice mode (``spliced``: after the marker
    exchange a dedicated connection relayed by ``os.splice`` at both ends), a third one (``agent-off``, entry
    ``side_entries["off"]``) with ``--no-lite-tls`` (``off``: an ordinary stream, the TLS is encrypted again by
    the tunnel); ``keyless`` (entry ``side_entries["keyless"]``, keyed systems) goes through a second server and
    agent of the same transport with no key (no cipher at all: the most muxed mode can reach); ``direct``
    downloads from the source itself. One download each, the order rotated by the round,
    after one download of an eighth of the size from each that is not counted (the first transfer on a fresh
    stack pays for warming the tunnel's connection); the bytes are checked by the client. CPU: the row's agent and
    the server, in seconds per GB carried, each end and both.
    """
    entries = dict(stack.side_entries)
    spliced = entries.pop("spliced", None)
    off = entries.pop("off", None)
    keyless = entries.pop("keyless", None)
    if len(entries) != 1 or off is None:
        raise HarnessError(
            "the https-lite scenario needs a stack with a TLS source as its side destination and an agent with "
            "lite-tls off (and a spliced agent where the transport splices)"
        )
    ((source, lite),) = entries.items()
    size = str(int(settings["bytes"]))
    timeout = float(settings["timeout"])
    metrics: dict[str, float] = {}
    pids = stack.pids()
    ends = {
        "lite": {"agent": pids["agent"], "server": pids["server"]},
        "off": {"agent": stack.procs["agent-off"].pid, "server": pids["server"]},
        "direct": {},
    }
    rows = [("lite", lite), ("off", off), ("direct", source)]
    if spliced is not None:  # (over kcp://: a keyless KCP conversation per stream)
        ends["spliced"] = {"agent": stack.procs["agent-spliced"].pid, "server": pids["server"]}
        rows.insert(1, ("spliced", spliced))
    if keyless is not None:  # a keyed system: the same transport with no key, muxed mode's ceiling
        ends["keyless"] = {
            "agent": stack.procs["agent-keyless"].pid,
            "server": stack.procs["server-keyless"].pid,
        }
        rows.append(("keyless", keyless))
    shift = round_index % len(rows)
    rows = rows[shift:] + rows[:shift]
    raw: dict[str, object] = {"order": [name for name, _ in rows]}

    def download(name: str, entry: str) -> None:
        got: dict[str, object] = {}

        def run() -> None:
            got.update(
                run_client(
                    stack.placement,
                    ["tls-bulk", "--connect", entry, "--bytes", size, "--timeout", str(timeout)],
                    timeout=timeout,
                )
            )

        cpu: dict[str, dict[str, float]] = {}
        if ends[name]:
            cpu = cpu_usage(ends[name], run)
        else:  # no tunnel: nothing of ours to count
            run()
        metrics[f"{name}_goodput_MBps"] = float(str(got["goodput"])) / 1e6
        gb = int(size) / 1e9
        for role in ("agent", "server"):
            if role in cpu:
                metrics[f"{name}_{role}_cpu_s_per_GB"] = cpu[role]["cpu_s"] / gb
        # CPU of the tunnel's two processes per MB carried: what lite-tls saves, less sensitive than goodput to
        # the other processes of a shared machine
        if cpu:
            metrics[f"{name}_cpu_ms_per_MB"] = (
                sum(role["cpu_s"] for role in cpu.values()) * 1e3 / (int(size) / 1e6)
            )
        raw[name] = {**got, "cpu": cpu}

    # one short download each first, not counted: the tunnel's connections and windows are warm for all
    warm = str(max(1, int(size) // 8))
    for _, entry in rows:
        run_client(
            stack.placement,
            ["tls-bulk", "--connect", entry, "--bytes", warm, "--timeout", str(timeout)],
            timeout=timeout,
        )
    for name, entry in rows:
        download(name, entry)
        stack.check_alive()
    metrics["goodput_MBps"] = metrics["lite_goodput_MBps"]
    metrics["lite_over_off"] = metrics["lite_goodput_MBps"] / metrics["off_goodput_MBps"]
    if spliced is not None:
        metrics["spliced_over_direct"] = metrics["spliced_goodput_MBps"] / metrics["direct_goodput_MBps"]
        metrics["spliced_over_off"] = metrics["spliced_goodput_MBps"] / metrics["off_goodput_MBps"]
    metrics["off_cpu_over_lite"] = metrics["off_cpu_ms_per_MB"] / metrics["lite_cpu_ms_per_MB"]
    if keyless is not None:
        # muxed mode removes the tunnel's cipher from the TLS bytes: it cannot beat a tunnel with no cipher at all,
        # so keyless / off bounds what muxed / off can reach on this link and machine
        metrics["keyless_over_off"] = metrics["keyless_goodput_MBps"] / metrics["off_goodput_MBps"]
        metrics["lite_over_keyless"] = metrics["lite_goodput_MBps"] / metrics["keyless_goodput_MBps"]
    return metrics, raw


def _goodput(
    stack: Stack, settings: Mapping[str, float], group: ProcessGroup
) -> tuple[float, dict[str, object]]:
    metrics, raw = measure_bulk(
        stack, {"streams": 1, "bytes": settings["bytes"], "timeout": settings["timeout"]}, group
    )
    return metrics["goodput_MBps"], raw


def _stalled_queues(entry: str, sink: str) -> dict[str, int]:
    """Where the kernel holds the stalled streams' bytes (``/proc/net/tcp``): the client's send queues and the
    agent's receive queues on the agent's entry port, the server's send queues and the sink's receive queues
    on the sink's port. What the client pushed less these is what the tunnel itself holds."""
    entry_port = int(entry.rsplit(":", 1)[1])
    sink_port = int(sink.rsplit(":", 1)[1])
    out = {"client_send": 0, "agent_receive": 0, "server_send": 0, "sink_receive": 0}
    for local, remote, tx, rx in tcp_queues():
        if remote == entry_port:
            out["client_send"] += tx
        elif local == entry_port:
            out["agent_receive"] += rx
        elif remote == sink_port:
            out["server_send"] += tx
        elif local == sink_port:
            out["sink_receive"] += rx
    return out


def measure_stalled(
    stack: Stack, settings: Mapping[str, float], group: ProcessGroup, round_index: int
) -> Metrics:
    """One stream's goodput while ``stalled`` streams of the same tunnel stall, against the same transfer with
    none stalled, on one stack; the two run in alternating order (clean first in even rounds).

    The stalled streams go to the stack's stalled sink (``stack.procs["stall-sink"]``, reached through the
    agent's second forward); each is pushed until it takes nothing more for ``quiet`` seconds. The RSS of the
    agent and the server is read from the fresh stack (before anything ran on it) to the peak while the streams
    stall and the transfer runs: what stalling costs, or more when the clean transfer ran first and its buffers
    stayed in the heap.
    """
    sink = stack.procs.get("stall-sink")
    entries = list(stack.side_entries.values())
    sink_address = next(iter(stack.side_entries), "")
    if sink is None or len(entries) != 1:
        raise HarnessError(
            "the stalled scenario needs a stack with the stalled sink as its second destination"
        )
    pids = {role: pid for role, pid in stack.pids().items() if role in ("agent", "server")}
    fresh = {role: rss_bytes(pid) for role, pid in pids.items()}
    count = int(settings["stalled"])
    timeout = float(settings["timeout"])
    raw: dict[str, object] = {"rss_fresh": fresh, "stalled_first": round_index % 2 == 1}
    metrics: dict[str, float] = {}

    def clean() -> None:
        goodput, bulk_raw = _goodput(stack, settings, group)
        metrics["clean_goodput_MBps"] = goodput
        raw["clean"] = bulk_raw

    def stalled() -> None:
        client = group.spawn(
            "stall",
            python_argv(
                "bench.workload",
                "stall",
                "--connect",
                entries[0],
                "--streams",
                str(count),
                "--quiet",
                str(settings["quiet"]),
                "--max-bytes",
                str(int(settings["max_push"])),
                "--timeout",
                str(timeout),
            ),
            pipe=True,
        )
        try:
            with RssPeak(pids) as peak:
                stall = _ask(client, None, timeout + 15)
                listed = stall.get("pushed_bytes")
                if not isinstance(listed, list):
                    raise HarnessError(f"stall client answered without pushed_bytes: {stall}")
                pushed = [int(n) for n in listed]
                raw["pushed_bytes"] = pushed
                raw["stall_seconds"] = stall.get("seconds")
                raw["rss_stalled"] = {role: rss_bytes(pid) for role, pid in pids.items()}
                raw["kernel_queues"] = kernel = _stalled_queues(entries[0], sink_address)
                goodput, bulk_raw = _goodput(stack, settings, group)
                raw["sink"] = _ask(sink, "status", 10.0)
            stack.check_alive()
        finally:
            release(group, client)
        metrics["goodput_MBps"] = goodput
        raw["stalled"] = bulk_raw
        raw["rss_peak"] = dict(peak.peak)
        metrics["stalled_streams"] = float(len(pushed))
        metrics["pushed_per_stream_bytes"] = sum(pushed) / len(pushed) if pushed else 0.0
        if pushed:
            in_kernel = sum(kernel.values())
            metrics["kernel_per_stream_bytes"] = in_kernel / len(pushed)
            metrics["tunnel_per_stream_bytes"] = (sum(pushed) - in_kernel) / len(pushed)
        for role in pids:
            metrics[f"{role}_rss_growth_bytes"] = float(peak.peak[role] - fresh[role])

    for phase in (stalled, clean) if raw["stalled_first"] else (clean, stalled):
        phase()
    metrics["goodput_ratio"] = metrics["goodput_MBps"] / metrics["clean_goodput_MBps"]
    return metrics, raw
