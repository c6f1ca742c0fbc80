"""IP mode against tunnel streams: TCP bulk goodput and round trips through the TUN path and through a SOCKS5
stream, over rudp:// and kcp://, on a clean and a lossy link (docs/tun.md).

``python -m bench.tun [--quick] [--loss 0,0.02] [--transport rudp --transport kcp] [--out FILE]``

Two namespaces joined by a veth pair (:class:`bench.netem.NetnsLink`, its nftables drop rule for loss): the server
(``--tun 10.77.0.0/24``, a key, ``--allow-private``) and the workload server in one, the agent (``--tun`` and a
SOCKS5 front) and the workload clients in the other. Per transport and loss level:

* ``bulk``: one TCP connection's goodput, every byte checked by the sink (``bench.workload bulk``), to the server's
  tunnel address (TUN) and through the agent's SOCKS5 front to the server's own address (a tunnel stream);
* ``rr``: 64-byte request/response round trips on one TCP connection, both paths;
* ``ping``: ICMP echo to the server's tunnel address, one every 10 ms (TUN only: ICMP has no stream);
* ``ping+bulk`` and ``rr+bulk``: the same while a bulk transfer runs on the same path: over the reliable path a
  packet of the bulk flow lost on the link holds everything behind it (head-of-line blocking); over rudp:// the
  packets of IP mode are unreliable datagrams and wait for nothing.

Round trips are reported as p50 / p90 / p99 / max and the share lost; timings on a shared 2-core machine are noisy,
so compare within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench.netem import NetnsLink, netns_supported
from bench.stats import percentile

POOL = "10.77.0.0/24"
SERVER_TUN = "10.77.0.1"
WORK_PORT = 5201
SOCKS_PORT = 1080
MiB = 1024 * 1024
_TIME = re.compile(r"time=([0-9.]+) ms")


class BenchError(Exception):
    pass


class Stack:
    """The server, the workload server and the agent of one transport on one link."""

    def __init__(self, link: NetnsLink, transport: str, key: Path) -> None:
        self.link = link
        self.transport = transport
        self.key = key
        self.procs: list[subprocess.Popen[bytes]] = []

    def _spawn(self, ns: str, *argv: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def up(self) -> None:
        link, vt = self.link, [sys.executable, "-m", "vtunnel"]
        self._spawn(
            link.server_ns,
            sys.executable,
            "-m",
            "bench.workload",
            "serve",
            "--listen",
            f"0.0.0.0:{WORK_PORT}",
        )
        self._spawn(
            link.server_ns, *vt, "server", "--listen", f"{self.transport}://0.0.0.0:4000", "--psk-file",
            str(self.key), "--tun", POOL, "--allow-private", "--log-level", "warning",
        )  # fmt: skip
        self._spawn(
            link.client_ns, *vt, "agent", "--server", f"{self.transport}://{link.server_addr}:4000", "--psk-file",
            str(self.key), "--tun", "--socks", f"127.0.0.1:{SOCKS_PORT}", "--log-level", "warning",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = _run(link.client_ns, "ip", "-4", "addr", "show", "dev", "vtun0", check=False)
            if (
                "10.77.0." in done.stdout
                and _run(link.client_ns, "ping", "-c1", "-W1", SERVER_TUN, check=False).returncode == 0
            ):
                return
            time.sleep(0.2)
        raise BenchError(f"{self.transport}: the agent's device did not come up")

    def down(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def _run(ns: str, *argv: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


def _workload(ns: str, *argv: str, timeout: float) -> dict[str, object]:
    done = _run(ns, sys.executable, "-m", "bench.workload", *argv, check=False, timeout=timeout + 30)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result: dict[str, object] = (
        json.loads(lines[-1]) if lines else {"ok": False, "error": done.stderr.strip()}
    )
    if not result.get("ok"):
        raise BenchError(f"workload {argv[0]}: {result.get('error')}")
    return result


def _ping(ns: str, count: int) -> tuple[list[float], int]:
    done = _run(
        ns,
        "ping",
        "-c",
        str(count),
        "-i",
        "0.01",
        "-W",
        "2",
        SERVER_TUN,
        check=False,
        timeout=count * 0.1 + 30,
    )
    times = [float(m) for m in _TIME.findall(done.stdout)]
    return times, count - len(times)


def _summary(samples_ms: Sequence[float], lost: int = 0) -> dict[str, float]:
    total = len(samples_ms) + lost
    if not samples_ms:
        return {"lost": 1.0}
    return {
        "p50": percentile(samples_ms, 50),
        "p90": percentile(samples_ms, 90),
        "p99": percentile(samples_ms, 99),
        "max": max(samples_ms),
        "lost": lost / total if total else 0.0,
        "n": float(len(samples_ms)),
    }


@contextlib.contextmanager
def _background_bulk(ns: str, target: list[str], size: int) -> Iterator[None]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "bench.workload", "bulk", *target,
         "--bytes", str(size), "--timeout", "120"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # under way
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def measure(stack: Stack, *, bulk_bytes: int, count: int) -> dict[str, dict[str, float]]:
    """Every measure of one stack; one that fails is reported as such (``failed``) and the others go on."""
    ns = stack.link.client_ns
    paths = {
        "tun": ["--connect", f"{SERVER_TUN}:{WORK_PORT}"],
        "socks5": [
            "--connect",
            f"{stack.link.server_addr}:{WORK_PORT}",
            "--socks5",
            f"127.0.0.1:{SOCKS_PORT}",
        ],
    }
    out: dict[str, dict[str, float]] = {}

    def rr(name: str, target: list[str]) -> None:
        try:
            res = _workload(ns, "rr", *target, "--count", str(count), "--timeout", "120", timeout=120)
        except BenchError as exc:
            print(f"{stack.transport} {name}: {exc}", file=sys.stderr)
            out[name] = {"failed": 1.0}
            return
        samples = res["samples_ns"]
        assert isinstance(samples, list)
        out[name] = _summary([float(x) / 1e6 for x in samples])

    for name, target in paths.items():
        try:
            res = _workload(ns, "bulk", *target, "--bytes", str(bulk_bytes), "--timeout", "120", timeout=120)
            out[f"bulk {name}"] = {"MB/s": float(str(res["goodput"])) / 1e6}
        except BenchError as exc:
            print(f"{stack.transport} bulk {name}: {exc}", file=sys.stderr)
            out[f"bulk {name}"] = {"failed": 1.0}
        rr(f"rr {name}", target)
    out["ping tun"] = _summary(*_ping(ns, count))
    for name, target in paths.items():
        with _background_bulk(ns, target, 1024 * MiB):
            rr(f"rr+bulk {name}", target)
            if name == "tun":
                out["ping+bulk tun"] = _summary(*_ping(ns, count))
    return out


def _table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| transport, loss | measure | MB/s | p50 ms | p90 ms | p99 ms | max ms | lost |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for setup, rows in results.items():
        for measure_name, row in rows.items():
            cells = [f"{row[k]:.1f}" if k in row else "" for k in ("MB/s",)]
            cells += [f"{row[k]:.2f}" if k in row else "" for k in ("p50", "p90", "p99", "max")]
            cells.append(f"{row['lost']:.1%}" if "lost" in row else ("failed" if "failed" in row else ""))
            lines.append(f"| {setup} | {measure_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tun", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 MiB bulk, 300 round trips")
    parser.add_argument("--loss", default="0,0.02", help="loss levels each way, comma-separated")
    parser.add_argument("--transport", action="append", choices=("rudp", "kcp", "tcp"), default=None)
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the table (markdown) and JSON here"
    )
    args = parser.parse_args(argv)
    reason = netns_supported()
    if reason is not None:
        print(f"bench.tun: skipped: {reason}", file=sys.stderr)
        return 0
    bulk_bytes, count = (16 * MiB, 300) if args.quick else (64 * MiB, 1000)
    results: dict[str, dict[str, dict[str, float]]] = {}
    key = Path(f"/tmp/vtunnel-bench-tun-{os.getpid()}.key")
    subprocess.run(
        [sys.executable, "-m", "vtunnel", "keygen", "-o", str(key), "--force"],
        check=True,
        capture_output=True,
    )
    try:
        for transport in args.transport or ["rudp", "kcp"]:
            for loss in (float(x) for x in args.loss.split(",")):
                link = NetnsLink(tag=f"t{os.getpid() % 10000}", loss=loss)
                stack = Stack(link, transport, key)
                try:
                    link.up()
                    stack.up()
                    setup = f"{transport}://, {loss:.0%}"
                    print(f"measuring {setup}", file=sys.stderr)
                    results[setup] = measure(stack, bulk_bytes=bulk_bytes, count=count)
                except BenchError as exc:
                    print(f"{transport} {loss:.0%}: {exc}", file=sys.stderr)
                finally:
                    stack.down()
                    link.down()
    finally:
        key.unlink(missing_ok=True)
    table = _table(results)
    sys.stdout.write(table)
    if args.out is not None:
        args.out.with_suffix(".md").write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
