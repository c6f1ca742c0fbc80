"""``python -m bench.stream_counts``: what one bulk run costs per MB, counted inside the agent and the server.

Starts the sink, a ``vtunnel server --target`` and a ``vtunnel agent --forward`` (as the harness does:
``kcp://...?mode=fast3&mtu=1350`` or ``tcp://``), runs ``bench.workload bulk`` through them and prints, for each
process, its CPU seconds per GB and what it counted per MB delivered: deliveries (a tunnel stream handing bytes
to its consumer: one destination write each), WINDOW_UPDATE frames built and received (stream and tunnel), SYN /
SYN-ACK HEADERS, destination ``send`` calls and link writes. The counts come from a few wrappers installed in
each vtunnel process before its command runs (``--count-child``, used by this tool only); they change nothing
the processes do. Counts do not depend on the machine's load the way goodput does.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

MiB = 1024 * 1024


def _bucket(size: int) -> str:
    """The power-of-two KiB bucket of ``size`` bytes (``<1K``, ``<2K``, ... ``<1024K``, ``big``)."""
    kib = 1
    while kib <= 1024:
        if size < kib * 1024:
            return f"<{kib}K"
        kib *= 2
    return "big"


def _install_counters(out: Path, sizes: bool) -> None:
    """Wrap the functions counted; write the counts to ``out`` when the process exits."""
    from vtunnel.io import stream_sockets
    from vtunnel.protocol import frames, tunnel
    from vtunnel.protocol.events import DataReceived
    from vtunnel.runtime import connection, tunnel_stream

    counts: Counter[str] = Counter()

    def wrap(owner: Any, name: str, key: str, *, by_first: bool = False, size_of: int = -1) -> None:
        original = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[key] += 1
            if by_first and args and args[0] == 0:
                counts[key + "_tunnel"] += 1
            result = original(*args, **kwargs)
            if size_of >= 0 and sizes:
                size = args[size_of] if size_of < len(args) else result
                size = size if isinstance(size, int) else len(size)
                if not (by_first and args[0] == 0):
                    counts[f"{key}:{_bucket(size)}"] += 1
            return result

        setattr(owner, name, counted)

    wrap(frames, "encode_window_update", "wu_built", by_first=True, size_of=1)
    wrap(frames, "encode_headers", "headers_built")
    wrap(tunnel.Tunnel, "_on_window_update", "wu_received")
    wrap(tunnel.Tunnel, "_on_headers", "headers_received")
    wrap(tunnel.Tunnel, "receive_data", "tunnel_inputs")
    receive = tunnel.Tunnel.receive_data

    def receive_counted(self: Any, data: Any, now: float) -> Any:
        evs = receive(self, data, now)
        sids = [ev.stream_id for ev in evs if isinstance(ev, DataReceived)]
        counts["data_events_repeating_a_stream"] += len(sids) - len(set(sids))
        return evs

    tunnel.Tunnel.receive_data = receive_counted  # type: ignore[method-assign]
    wrap(tunnel_stream.TunnelStream, "deliver_data", "deliveries", size_of=1)
    wrap(tunnel_stream.TunnelStream, "write", "stream_writes", size_of=9)
    wrap(stream_sockets.SocketTransport, "write", "socket_writes")
    wrap(stream_sockets.SocketTransport, "_read_ready", "socket_reads")
    from vtunnel.apps import pipe

    wrap(pipe.SocketEnd, "data_received", "relay_reads", size_of=1)
    asked: dict[int, int] = {}
    read_size = pipe.SocketEnd._read_size
    data_received = pipe.SocketEnd.data_received

    def read_size_noted(self: Any) -> int:
        size: int = read_size(self)
        asked[id(self)] = size
        return size

    def data_received_noted(self: Any, data: bytes) -> None:
        if len(data) < asked.get(id(self), 0):
            counts["relay_reads_short"] += 1  # the socket had less than the other end could take
        data_received(self, data)

    pipe.SocketEnd._read_size = read_size_noted  # type: ignore[method-assign]
    pipe.SocketEnd.data_received = data_received_noted  # type: ignore[method-assign]
    wrap(connection.TunnelConnection, "_send", "link_writes")

    profile_to = os.environ.get("STREAM_COUNTS_PROFILE")
    profiler = None
    if profile_to:
        import cProfile

        profiler = cProfile.Profile(time.thread_time)  # CPU, not wall: a loopback send may yield the core
        profiler.enable()

    def dump() -> None:
        out.write_text(json.dumps(dict(counts)))
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(f"{profile_to}.{out.stem}")

    atexit.register(dump)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def _user_system(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` (``/proc/PID/stat``)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    rest = text[text.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")  # (not bench.procs.CLK_TCK: this module runs in the children by path)
    return int(rest[11]) / tick, int(rest[12]) / tick


def run(
    transport: str, streams: int, total: int, workdir: Path, code: Path, trace: bool = False
) -> dict[str, Any]:
    from bench.procs import cpu_seconds, free_port, wait_tcp

    sink_port = free_port(socket.SOCK_STREAM)
    tunnel_port = free_port(socket.SOCK_DGRAM if transport == "kcp" else socket.SOCK_STREAM)
    entry_port = free_port(socket.SOCK_STREAM)
    url = (
        f"kcp://127.0.0.1:{tunnel_port}?mode=fast3&mtu=1350"
        if transport == "kcp"
        else f"tcp://127.0.0.1:{tunnel_port}"
    )
    py = sys.executable
    # by path, with -P: the import path is ``code`` (the vtunnel tree measured) and nothing else of this one
    me = [py, "-P", str(Path(__file__).resolve()), "--count-child"]
    env = {**os.environ, "VTUNNEL_LOG_LEVEL": "warning"}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sink = subprocess.Popen(
            [py, "-m", "bench.workload", "serve", "--listen", f"127.0.0.1:{sink_port}"],
            stdout=subprocess.DEVNULL,
        )
        procs.append(sink)
        wait_tcp("127.0.0.1", sink_port, timeout=15.0)
        server = subprocess.Popen(
            [*me, str(workdir / "server.json"), str(code), "server", "--listen", url, "--target",
             f"127.0.0.1:{sink_port}", "--allow-private", "--insecure"],
            env=env, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(server)
        time.sleep(1.0)
        agent = subprocess.Popen(
            [*me, str(workdir / "agent.json"), str(code), "agent", "--server", url, "--forward", f"127.0.0.1:{entry_port}",
             "--insecure"],
            env=env, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(agent)
        wait_tcp("127.0.0.1", entry_port, timeout=15.0)
        time.sleep(1.0)
        pids = {"agent": agent.pid, "server": server.pid}
        tracers = {
            role: subprocess.Popen(
                ["strace", "-c", "-f", "-o", str(workdir / f"{role}.strace"), "-p", str(pid)],
                stderr=subprocess.DEVNULL,
            )
            for role, pid in pids.items()
            if trace
        }
        if tracers:
            time.sleep(1.0)
        cpu0 = {role: cpu_seconds(pid) for role, pid in pids.items()}
        split0 = {role: _user_system(pid) for role, pid in pids.items()}
        start = time.monotonic()
        subprocess.run(
            [py, "-m", "bench.workload", "bulk", "--connect", f"127.0.0.1:{entry_port}", "--streams",
             str(streams), "--bytes", str(total), "--timeout", "300"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wall = time.monotonic() - start
        cpu = {role: cpu_seconds(pid) - cpu0[role] for role, pid in pids.items()}
        split = {
            role: [
                round((b - a) / (total / 1e9), 2)
                for a, b in zip(split0[role], _user_system(pid), strict=True)
            ]
            for role, pid in pids.items()
        }
        for tracer in tracers.values():
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=10)
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    mb = total / 1e6
    result: dict[str, Any] = {
        "transport": transport,
        "streams": streams,
        "bytes": total,
        "wall_s": wall,
        "MBps": mb / wall,
        "cpu_s_per_GB": {role: c / (total / 1e9) for role, c in cpu.items()},
        "user_system_s_per_GB": split,
    }
    for role in ("agent", "server"):
        path = workdir / f"{role}.json"
        counts = json.loads(path.read_text()) if path.exists() else {}
        result[role] = {k: round(v / mb, 2) for k, v in sorted(counts.items())}
        traced = workdir / f"{role}.strace"
        if traced.exists():
            calls = {}
            for line in traced.read_text().splitlines():
                fields = line.split()
                if len(fields) >= 5 and fields[3].isdigit():
                    calls[fields[-1]] = round(int(fields[3]) / mb, 2)
            result[role + "_syscalls"] = calls
    return result


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == "--count-child":
        out = Path(sys.argv[2])
        sys.path.insert(0, sys.argv[3])
        _install_counters(out, bool(os.environ.get("STREAM_COUNTS_SIZES")))
        from vtunnel.cli import main as vtunnel_main

        sys.argv = ["vtunnel", *sys.argv[4:]]
        vtunnel_main()
        return
    parser = argparse.ArgumentParser(prog="python -m bench.stream_counts", description=__doc__.split("\n")[0])
    parser.add_argument("--transport", choices=("kcp", "tcp"), default="kcp")
    parser.add_argument("--streams", type=int, action="append", help="default: 16 and 1024")
    parser.add_argument("--per-stream", type=int, default=0, help="bytes a stream (default: 64 MiB in all)")
    parser.add_argument("--bytes", type=int, default=64 * MiB, dest="total")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--strace", action="store_true", help="count system calls (strace -c) during the run")
    parser.add_argument(
        "--code",
        type=Path,
        action="append",
        help="the directory holding the vtunnel package to run (repeatable: alternated run by run; default: "
        "this tree)",
    )
    args = parser.parse_args()
    codes = args.code or [Path(__file__).resolve().parent.parent]
    for _ in range(args.runs):
        for streams in args.streams or (16, 1024):
            for code in codes:
                total = args.per_stream * streams if args.per_stream else args.total
                with tempfile.TemporaryDirectory() as tmp:
                    result = run(args.transport, streams, total, Path(tmp), code.resolve(), args.strace)
                    print(json.dumps({"code": str(code), **result}), flush=True)


if __name__ == "__main__":
    main()
