"""Process supervision for the harness, and readers of ``/proc``.

:class:`ProcessGroup` starts every process of a run in its own session and kills them all (TERM, then KILL)
when it closes, on success, error or Ctrl-C alike. :func:`rss_bytes` and :func:`cpu_seconds` read
``/proc/PID/statm`` and ``/proc/PID/stat``; :func:`thread_cpu_ns` reads the per-thread ``schedstat`` run times,
exact to the nanosecond where ``stat`` counts clock ticks.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import structlog

from vtunnel.testing.ports import free_port

__all__ = [
    "CLK_TCK",
    "HarnessError",
    "Proc",
    "ProcessGroup",
    "cpu_seconds",
    "free_port",
    "last_json_line",
    "rss_bytes",
    "tcp_queues",
    "thread_cpu_ns",
    "wait_tcp",
]

log = structlog.get_logger("bench.procs")

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class HarnessError(Exception):
    """The harness could not set up or measure something; the message says what and where."""


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (``/proc/PID/statm``)."""
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError as exc:
        raise HarnessError(f"cannot read the memory of process {pid}: {exc}") from None
    return int(fields[1]) * PAGE_SIZE


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and all its threads, in seconds (``/proc/PID/stat``, clock ticks)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise HarnessError(f"cannot read the CPU time of process {pid}: {exc}") from None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = text[text.rindex(")") + 2 :].split()
    utime, stime = int(rest[11]), int(rest[12])
    return (utime + stime) / CLK_TCK


def tcp_queues() -> list[tuple[int, int, int, int]]:
    """``(local_port, remote_port, send_queue, receive_queue)`` of every connected TCP socket of this network
    namespace (``/proc/net/tcp`` and ``tcp6``; listening sockets left out): the bytes the kernel holds unsent or
    unacknowledged, and received but not yet read by the socket's owner."""
    out: list[tuple[int, int, int, int]] = []
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 5:
                continue
            local, remote, state, queues = fields[1], fields[2], fields[3], fields[4]
            if state == "0A":  # LISTEN: its "queues" are the accept backlog
                continue
            tx, _, rx = queues.partition(":")
            out.append(
                (
                    int(local.rsplit(":", 1)[1], 16),
                    int(remote.rsplit(":", 1)[1], 16),
                    int(tx, 16),
                    int(rx, 16),
                )
            )
    return out


def thread_cpu_ns(pid: int) -> dict[int, int]:
    """The on-CPU nanoseconds of each live thread of ``pid``, by thread id (``/proc/PID/task/*/schedstat``).

    Exact, where ``/proc/PID/stat`` counts in clock ticks (10 ms); but a thread that has ended is not listed."""
    out: dict[int, int] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError as exc:
        raise HarnessError(f"cannot list the threads of process {pid}: {exc}") from None
    for task in tasks:
        with contextlib.suppress(OSError, ValueError, IndexError):
            out[int(task.name)] = int((task / "schedstat").read_text().split()[0])
    return out


def wait_tcp(host: str, port: int, *, timeout: float) -> None:
    """Wait until ``host:port`` accepts a TCP connection, or raise :class:`HarnessError`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise HarnessError(f"nothing listens on {host}:{port} after {timeout} s") from None
            time.sleep(0.05)


def last_json_line(text: str) -> dict[str, object]:
    """The last line of ``text`` that is a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(line)
                if isinstance(value, dict):
                    return value
    raise HarnessError(f"no JSON result in output: {text[-400:]!r}")


@dataclass(kw_only=True, slots=True)
class Proc:
    """One supervised process; its stdout+stderr go to ``log_path`` unless ``pipe`` was asked for."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None
    pending: bytes = b""  # piped output read but not yet returned as a line

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, limit: int = 1200) -> str:
        if self.log_path is None:
            return ""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-limit:]
        return ""

    def last_words(self) -> str:
        """The most telling line of the log: the last one naming an error, else the last line."""
        lines = [line.strip(" |+-") for line in self.log_tail(20000).splitlines() if line.strip(" |+-")]
        for line in reversed(lines):
            if "Error" in line or "error" in line or "panic" in line:
                return line[:300]
        return lines[-1][:300] if lines else "(no output)"

    def read_line(self, timeout: float) -> bytes:
        """One line from the process's piped stdout within ``timeout`` seconds."""
        stream = self.popen.stdout
        if stream is None:
            raise HarnessError(f"{self.name}: stdout is not piped")
        deadline = time.monotonic() + timeout
        fd = stream.fileno()
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"{self.name}: no answer within {timeout} s")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                said = self.pending.decode(errors="replace")
                raise HarnessError(f"{self.name} exited (code {self.popen.wait()}): {said}")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line + b"\n"


class ProcessGroup:
    """Starts processes and guarantees they are all gone when it closes (TERM, a grace period, then KILL)."""

    def __init__(self, *, log_dir: Path | None = None) -> None:
        self._procs: list[Proc] = []
        self._own_dir = log_dir is None
        self.log_dir = log_dir if log_dir is not None else Path(tempfile.mkdtemp(prefix="vtbench-"))

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        pipe: bool = False,
    ) -> Proc:
        """Start ``argv`` in a new session; ``pipe`` gives a stdin/stdout pipe instead of a log file."""
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        log_path: Path | None = None
        try:
            if pipe:
                popen = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    env=full_env,
                    start_new_session=True,
                )
            else:
                safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
                log_path = self.log_dir / f"{safe}-{len(self._procs)}.log"
                with log_path.open("wb") as out:
                    popen = subprocess.Popen(
                        list(argv),
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=full_env,
                        start_new_session=True,
                    )
        except OSError as exc:
            raise HarnessError(f"cannot start {name} ({argv[0]}): {exc}") from None
        proc = Proc(name=name, popen=popen, log_path=log_path)
        self._procs.append(proc)
        log.debug("process started", name=name, pid=popen.pid)
        return proc

    def stop(self, proc: Proc, *, grace: float = 3.0) -> None:
        """Terminate one process (and its session), waiting at most ``grace`` seconds before KILL."""
        _terminate([proc], grace)
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def close(self) -> None:
        procs, self._procs = self._procs, []
        _terminate(procs, 3.0)

    @contextlib.contextmanager
    def scope(self) -> Iterator[ProcessGroup]:
        """A child group whose processes are stopped when the ``with`` block ends."""
        child = ProcessGroup(log_dir=self.log_dir)
        try:
            yield child
        finally:
            child.close()


def _signal_session(proc: Proc, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        proc.popen.send_signal(sig)


def _terminate(procs: Sequence[Proc], grace: float) -> None:
    live = [p for p in procs if p.popen.poll() is None]
    for proc in live:
        _signal_session(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in live:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        # KILL the whole session even when its leader is gone: helpers it started may linger.
        _signal_session(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(2.0)
        for stream in (proc.popen.stdin, proc.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def python_argv(module: str, *args: str) -> list[str]:
    """``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]
