"""``vtunnel server --workers N``: one supervisor process and N worker processes sharing the listening ports.

The supervisor binds every listening socket itself, with ``SO_REUSEPORT``, in a fixed order, before any worker
starts, and keeps them open for as long as it runs; each worker is a fresh ``vtunnel server`` process (the same
command line, its config read again) that inherits its own sockets (:mod:`vtunnel.io.listening`) and binds none.

* A TCP listen address (``tcp://``, ``tls://``, ``websocks://``) gets N sockets: worker *k* accepts on socket
  *k*, and the kernel spreads new connections over the group by their addresses.
* A UDP listen address (``kcp://``, ``rudp://``) gets 2N sockets, two banks of N: worker *k* reads the socket
  of its *slot*, ``bank * N + k``, and a replacement of it takes the other bank's, so an old worker draining its
  sessions and its replacement never read the same socket. A classic BPF program on the group
  (:mod:`vtunnel.io.steering`) sends each datagram to the slot it names. With a key, the slot is in the
  connection ID every worker mints (:class:`~vtunnel.security.datagram.ConnectionIdLayout`: the sum of its random
  bytes modulo 2N), so a session's datagrams reach the worker that holds it whatever address they come from; a
  handshake's first datagram (random bytes there) lands on a random slot, and a slot nobody reads is routed to
  the current slot of the worker it names modulo N. Without a key sessions are keyed by what the client chose,
  so they are steered by a sum of those bytes modulo N: kcp://'s conv (conv 0, vproxy's, always to worker 0;
  kcp:// with fec= sends every datagram to worker 0, since its parity packets name no session), rudp://'s
  connection ID.

A worker that dies is started again on the same sockets (same slot). SIGHUP replaces the workers one by one:
the new process starts on the other bank, and once it listens the old one is sent SIGHUP (it may reload what it
reloads) and then SIGTERM, the graceful stop (GOAWAY, open streams finish, up to the drain timeout), while the
steering still sends its sessions' datagrams to it. SIGTERM or SIGINT stop every worker that way; a second one
is passed on too (the workers then stop at once).

A worker learns what it is from ``VTUNNEL_WORKER`` (JSON: its index, the worker count, its slot, the descriptors
of its sockets, of the pipe it reports readiness on and of its metrics channel): :func:`worker_from_environment`.

With ``--metrics`` the supervisor serves the one metrics endpoint, on a thread of its own: at each scrape it asks
every worker process for its metrics over that process's channel and merges them, labelled ``worker``
(:mod:`vtunnel.apps.worker_metrics`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Final

import anyio
import structlog
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry

from vtunnel.apps.lite_tls_splice import splice_port
from vtunnel.apps.websocks import WEBSOCKS_SCHEMES
from vtunnel.apps.worker_metrics import WorkerMetrics
from vtunnel.io import listening
from vtunnel.io.blocking import read_within
from vtunnel.io.steering import attach_program, sum_program
from vtunnel.security.datagram import CID_CHECK_LEN, CID_LEN, MAX_SERVER_ID, MAX_SLOTS, ConnectionIdLayout
from vtunnel.transports.base import Endpoint, SharedListening, TransportError, get_transport

__all__ = [
    "WORKER_ENV",
    "Supervisor",
    "Worker",
    "listen_plan",
    "parse_server_id",
    "parse_workers",
    "serve_ready",
    "supervise",
    "worker_from_environment",
]

log = structlog.get_logger("vtunnel.workers")

#: the environment variable that makes a ``vtunnel server`` process one of a supervisor's workers
WORKER_ENV: Final = "VTUNNEL_WORKER"
#: how long a new worker may take to listen before it is given up
READY_TIMEOUT: Final = 30.0
#: the longest pause before a worker that keeps dying is started again
LONGEST_RESTART_PAUSE: Final = 5.0
TCP_BACKLOG: Final = 1024
#: the most workers: two slots each must fit a connection ID's steering
MAX_WORKERS: Final = MAX_SLOTS // 2

_LAST_PORT: Final = 65535

_SIGNALS: Final = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}


# --- the worker's side --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Worker:
    """What a worker process was told by its supervisor."""

    index: int
    workers: int
    #: its datagram sockets' slot in their SO_REUSEPORT groups (``bank * workers + index``) and their number
    slot: int
    slots: int
    ready_fd: int
    #: the worker's end of its metrics channel (``--metrics``), or None
    metrics_fd: int | None = None

    def layout(self, server_id: bytes) -> ConnectionIdLayout:
        """The connection IDs this worker mints: the server id, then its slot."""
        return ConnectionIdLayout(server_id=server_id, slot=self.slot, slots=self.slots)

    def splice_endpoint(self, endpoint: Endpoint) -> Endpoint:
        """``endpoint`` as this worker listens on it: a fixed lite-tls splice port (``splice=PORT``) becomes this
        worker's own, ``PORT + slot``, which its supervisor bound for it; anything else as it is."""
        first = splice_port(endpoint)
        if not first:
            return endpoint
        return dataclasses.replace(endpoint, params={**endpoint.params, "splice": str(first + self.slot)})

    def ready(self) -> None:
        """Tell the supervisor this worker listens (once)."""
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, b"r")
            os.close(self.ready_fd)


def worker_from_environment(environ: Mapping[str, str] = os.environ) -> Worker | None:
    """This process's :class:`Worker` when a supervisor started it (its given sockets adopted: from now on its
    listeners take them), else None."""
    text = environ.get(WORKER_ENV)
    if not text:
        return None
    try:
        spec = json.loads(text)
        worker = Worker(
            index=int(spec["index"]),
            workers=int(spec["workers"]),
            slot=int(spec["slot"]),
            slots=int(spec["slots"]),
            ready_fd=int(spec["ready"]),
            metrics_fd=None if spec.get("metrics") is None else int(spec["metrics"]),
        )
        fds = [int(fd) for fd in spec["fds"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{WORKER_ENV} is not a worker's description: {exc}") from None
    listening.adopt([socket.socket(fileno=fd) for fd in fds])
    structlog.contextvars.bind_contextvars(worker=worker.index)
    # the supervisor forwards SIGHUP before a reload's graceful stop: it must never end the worker by itself
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return worker


async def serve_ready(
    serve: Callable[..., Coroutine[Any, Any, None]],
    ready: Callable[[], None],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``serve`` (a server's, taking ``task_status``) and call ``ready`` once it listens."""
    async with anyio.create_task_group() as tg:
        await tg.start(serve)
        leftover = listening.unclaimed()
        if leftover:
            log.warning(
                "the supervisor listens on addresses this worker does not (its config changed?)",
                addresses=[str(sock.getsockname()) for sock in leftover],
            )
        ready()
        task_status.started()


# --- the supervisor's side ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Steering:
    """How a UDP group's program finds a datagram's slot: a sum of ``length`` bytes from ``offset`` modulo
    ``values``; ``by_slot``: the values are slots (a key's connection IDs), else worker indexes."""

    offset: int
    length: int
    values: int
    by_slot: bool


@dataclasses.dataclass(kw_only=True)
class _Group:
    endpoint: Endpoint
    #: one socket per worker index (shared by its two slots), else one per slot
    stream: bool
    #: stream: ``[address][worker]``; otherwise ``[address][slot]``: a datagram listener's (one address, one
    #: ``SO_REUSEPORT`` group), or a fixed lite-tls splice port's (``PORT + slot``: TCP on every address, UDP on one)
    sockets: list[list[socket.socket]]
    steering: _Steering | None = None


def listen_plan(
    endpoints: Sequence[Endpoint], *, workers: int, keyed: bool, server_id: bytes
) -> list[tuple[Endpoint, SharedListening, _Steering | None]]:
    """Per listen URL: how it is shared (TCP or UDP) and how its datagrams are steered. Raises ValueError for a
    transport that cannot be shared (a plugin's)."""
    plan: list[tuple[Endpoint, SharedListening, _Steering | None]] = []
    for endpoint in endpoints:
        if endpoint.scheme in WEBSOCKS_SCHEMES:
            plan.append((endpoint, SharedListening(datagram=False), None))
            continue
        first = splice_port(endpoint)
        if first and first + 2 * workers - 1 > _LAST_PORT:
            # a dedicated connection must reach the worker that holds its ticket: each worker slot has a splice
            # port of its own, PORT + slot, and announces it to its tunnels (agents dial the one announced)
            raise ValueError(
                f"--workers {workers} with splice={first}: the workers' splice ports would be {first} to "
                f"{first + 2 * workers - 1} (one per worker slot, two slots a worker), past {_LAST_PORT}: give a "
                "lower port, or splice=0 (each worker opens a free port)"
            )
        shared = get_transport(endpoint.scheme).shared_listening(endpoint)
        if shared is None:
            raise ValueError(
                f"--workers cannot share {endpoint.scheme}:// listeners (its transport binds its own)"
            )
        steering: _Steering | None = None
        if shared.datagram:
            if keyed:
                sid = len(server_id)
                steering = _Steering(
                    offset=sid, length=CID_LEN - CID_CHECK_LEN - sid, values=2 * workers, by_slot=True
                )
            elif shared.session_bytes is not None:
                offset, length = shared.session_bytes
                steering = _Steering(offset=offset, length=length, values=workers, by_slot=False)
            else:  # keyed by address: one worker takes them all
                steering = _Steering(offset=0, length=1, values=1, by_slot=False)
        plan.append((endpoint, shared, steering))
    return plan


def _stream_sockets(endpoint: Endpoint, workers: int) -> list[list[socket.socket]]:
    return listening.reuseport_stream_groups(endpoint.host, endpoint.port, workers, backlog=TCP_BACKLOG)


def _datagram_sockets(endpoint: Endpoint, slots: int, sockbuf: int) -> list[socket.socket]:
    return listening.reuseport_datagram_group(endpoint.host, endpoint.port, slots, sockbuf=sockbuf)


@dataclasses.dataclass(kw_only=True)
class _Process:
    index: int
    slot: int
    popen: subprocess.Popen[bytes]
    started: float


class Supervisor:
    """Binds the listening sockets, runs ``workers`` worker processes on them and keeps them running (see the
    module's description). ``command`` starts one worker (``vtunnel server ...``, the same options);
    ``drain_timeout`` is the workers' own, how long a replaced one may take to finish."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        workers: int,
        keyed: bool,
        server_id: bytes,
        command: Sequence[str],
        drain_timeout: float,
        metrics: tuple[str, int] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("--workers is at least 1")
        self.workers = workers
        self.slots = 2 * workers
        self.command = list(command)
        self.drain_timeout = drain_timeout
        self._environ = dict(os.environ if environ is None else environ)
        self._plan = listen_plan(endpoints, workers=workers, keyed=keyed, server_id=server_id)
        self._groups: list[_Group] = []
        self._metrics_address = metrics
        #: the one metrics endpoint's listening socket, and what it serves: every worker's metrics
        self._metrics: socket.socket | None = None
        self.collector = WorkerMetrics() if metrics is not None else None
        #: the serving process of each worker index, and the replaced ones still draining
        self._current: dict[int, _Process] = {}
        self._draining: list[_Process] = []
        self._failures: dict[int, int] = {}
        self._stopping = False

    # the listening sockets ------------------------------------------------------------------------------------

    def bind(self) -> list[str]:
        """Bind every listening socket (raises OSError, TransportError); the URLs as bound."""
        urls: list[str] = []
        try:
            for endpoint, shared, steering in self._plan:
                if not shared.datagram:
                    group = _Group(
                        endpoint=endpoint, stream=True, sockets=_stream_sockets(endpoint, self.workers)
                    )
                else:
                    group = _Group(
                        endpoint=endpoint,
                        stream=False,
                        sockets=[_datagram_sockets(endpoint, self.slots, shared.sockbuf)],
                        steering=steering,
                    )
                self._groups.append(group)
                host, port = group.sockets[0][0].getsockname()[:2]
                shown = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
                urls.append(f"{endpoint.scheme}://{shown}")
                first = splice_port(endpoint)
                if first:  # a fixed lite-tls splice port: one per slot, PORT + slot (Worker.splice_endpoint)
                    sockets = listening.port_range_sockets(
                        endpoint.host,
                        first,
                        self.slots,
                        datagram=shared.datagram,
                        backlog=TCP_BACKLOG,
                        sockbuf=shared.sockbuf,
                    )
                    self._groups.append(_Group(endpoint=endpoint, stream=False, sockets=sockets))
            if self._metrics_address is not None:
                host, port = self._metrics_address
                ((self._metrics,),) = _stream_sockets(Endpoint(scheme="tcp", host=host, port=port), 1)
        except BaseException:
            self.close()
            raise
        return urls

    def close(self) -> None:
        if self.collector is not None:
            self.collector.close()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        for group in self._groups:
            for sockets in group.sockets:
                for sock in sockets:
                    sock.close()
        self._groups.clear()

    def routes(self, steering: _Steering) -> list[int]:
        """Where each value of ``steering``'s sum goes now: a slot of the group."""
        current = {p.index: p.slot for p in self._current.values()}
        draining = {p.index: p.slot for p in self._draining}
        live = set(current.values()) | set(draining.values())
        if steering.by_slot:
            return [v if v in live else current.get(v % self.workers, v) for v in range(steering.values)]
        # keyless: a worker's sessions stay with its draining process until it is gone
        return [draining.get(v, current.get(v, v)) for v in range(steering.values)]

    def _steer(self) -> None:
        for group in self._groups:
            if group.steering is not None:
                steering = group.steering
                attach_program(
                    group.sockets[0][0],
                    sum_program(steering.offset, steering.length, self.routes(steering)),
                )

    # the workers ----------------------------------------------------------------------------------------------

    def _fds(self, index: int, slot: int) -> list[int]:
        fds: list[int] = []
        for group in self._groups:
            if group.stream:
                fds += [sockets[index].fileno() for sockets in group.sockets]
            else:
                fds += [sockets[slot].fileno() for sockets in group.sockets]
        return fds

    def _spawn(self, index: int, slot: int) -> tuple[_Process, int]:
        """Start worker ``index`` on ``slot``; the read end of its readiness pipe."""
        ready_read, ready_write = os.pipe()
        fds = self._fds(index, slot)
        channel = WorkerMetrics.channel() if self.collector is not None else None
        spec = {
            "index": index,
            "workers": self.workers,
            "slot": slot,
            "slots": self.slots,
            "ready": ready_write,
            "fds": fds,
            "metrics": None if channel is None else channel[1].fileno(),
        }
        env = {**self._environ, WORKER_ENV: json.dumps(spec)}
        passed = [*fds, ready_write] + ([] if channel is None else [channel[1].fileno()])
        try:
            popen = subprocess.Popen(self.command, env=env, pass_fds=passed, preexec_fn=_unblock_signals)
        except BaseException:
            if channel is not None:
                channel[0].close()
            raise
        finally:
            os.close(ready_write)
            if channel is not None:
                channel[1].close()
        if self.collector is not None and channel is not None:
            self.collector.started(index, popen.pid, channel[0])
        log.info("worker started", worker=index, slot=slot, pid=popen.pid)
        return _Process(index=index, slot=slot, popen=popen, started=time.monotonic()), ready_read

    def _wait_ready(self, process: _Process, ready_read: int) -> bool:
        try:
            ok = read_within(ready_read, 1, READY_TIMEOUT) == b"r"
        finally:
            os.close(ready_read)
        if not ok:
            log.error("worker did not start listening", worker=process.index, pid=process.popen.pid)
        return ok

    def _start(self, index: int, slot: int) -> bool:
        process, ready_read = self._spawn(index, slot)
        self._current[index] = process
        return self._wait_ready(process, ready_read)

    def _replace(self, index: int) -> None:
        """A fresh process for worker ``index`` on its other slot; the old one drains."""
        old = self._current[index]
        slot = (old.slot + self.workers) % self.slots
        for proc in [p for p in self._draining if p.slot == slot]:  # a replacement of an earlier reload
            self._wait_gone(proc, self.drain_timeout + 5.0)
        process, ready_read = self._spawn(index, slot)
        if not self._wait_ready(process, ready_read):
            _end(process.popen)
            self._ended(process)
            log.error("reload of a worker failed: the old one keeps serving", worker=index)
            return
        self._current[index] = process
        self._draining.append(old)
        self._steer()
        with contextlib.suppress(ProcessLookupError):
            old.popen.send_signal(signal.SIGHUP)
            old.popen.send_signal(signal.SIGTERM)
        log.info(
            "worker replaced: the old one drains", worker=index, old_pid=old.popen.pid, pid=process.popen.pid
        )

    def _wait_gone(self, process: _Process, timeout: float) -> None:
        try:
            process.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("a draining worker outlived its drain timeout: killed", pid=process.popen.pid)
            process.popen.kill()
            process.popen.wait()
        self._reap()

    def _reap(self) -> None:
        """Take note of the workers that ended: a replaced one is forgotten, a serving one started again."""
        for process in list(self._draining):
            if process.popen.poll() is not None:
                self._draining.remove(process)
                self._ended(process)
                log.info("replaced worker ended", worker=process.index, pid=process.popen.pid)
                self._steer()
        for index, process in list(self._current.items()):
            code = process.popen.poll()
            if code is None or self._stopping:
                continue
            quick = time.monotonic() - process.started < 1.0
            self._failures[index] = self._failures.get(index, 0) + 1 if quick else 0
            pause = min(LONGEST_RESTART_PAUSE, 0.1 * 2 ** self._failures[index]) if quick else 0.0
            log.warning("worker ended: starting it again", worker=index, pid=process.popen.pid, status=code)
            self._ended(process)
            if self.collector is not None:
                self.collector.restarted(index)
            time.sleep(pause)
            self._start(index, process.slot)

    def _ended(self, process: _Process) -> None:
        if self.collector is not None:
            self.collector.ended(process.popen.pid)

    def _serve_metrics(self) -> None:
        """The metrics endpoint, on a thread of its own (the signals stay blocked there: the main thread takes
        them); it ends with the process."""
        from vtunnel.apps.metrics import serve_metrics

        assert self.collector is not None
        assert self._metrics is not None
        assert self._metrics_address is not None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        listening.adopt([self._metrics])  # the supervisor's only listener: it takes the socket bound above
        host, port = self._metrics_address

        async def serve() -> None:
            async with serve_metrics(registry, host, port):
                await anyio.sleep_forever()

        try:
            anyio.run(serve)
        except Exception as exc:  # the workers serve on without it
            log.error("metrics endpoint failed", error=str(exc) or repr(exc))

    def run(self) -> int:
        """Start the workers and supervise them until SIGTERM or SIGINT; the exit status."""
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        if self.collector is not None:
            threading.Thread(target=self._serve_metrics, name="metrics", daemon=True).start()
        try:
            for index in range(self.workers):
                self._start(index, index)
            self._steer()
            log.info("workers serving", workers=self.workers)
            while True:
                info = signal.sigtimedwait(list(_SIGNALS), 1.0)
                self._reap()
                if info is None or info.si_signo == signal.SIGCHLD:
                    continue
                if info.si_signo == signal.SIGHUP:
                    log.info("SIGHUP: replacing the workers one by one")
                    for index in range(self.workers):
                        self._replace(index)
                    continue
                return self._stop(signal.Signals(info.si_signo))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            self.close()

    def _stop(self, signum: signal.Signals) -> int:
        log.info("signal received: stopping the workers", signal=signum.name)
        self._stopping = True
        processes = [*self._current.values(), *self._draining]
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.popen.send_signal(signal.SIGTERM)
        while any(p.popen.poll() is None for p in processes):
            info = signal.sigtimedwait([signal.SIGTERM, signal.SIGINT, signal.SIGCHLD], 1.0)
            if info is not None and info.si_signo != signal.SIGCHLD:
                log.warning("second signal: the workers stop now")
                for process in processes:
                    with contextlib.suppress(ProcessLookupError):
                        process.popen.send_signal(signal.SIGTERM)
        for process in processes:
            self._ended(process)
        log.info("workers stopped")
        return 0


_PR_SET_PDEATHSIG: Final = 1


def _unblock_signals() -> None:
    """In a new worker, before it runs: the supervisor's blocked signals unblocked, and SIGTERM (its graceful
    stop) sent to it should the supervisor die without stopping it."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _end(popen: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        popen.kill()
    popen.wait()


def parse_workers(value: object) -> int:
    """``--workers``: a number of 1 or more, or ``auto`` (as many as this machine has cores)."""
    text = str(value).strip().lower()
    if text == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"--workers takes a number or auto, not {value!r}") from None
    if not 1 <= count <= MAX_WORKERS:
        raise ValueError(f"--workers is 1..{MAX_WORKERS}, not {count}")
    return count


def parse_server_id(value: object) -> bytes:
    """``--server-id``: 0 to 2 bytes in hex (``""``: none), at the start of every connection ID in clear."""
    text = "" if value is None else str(value).strip().lower().removeprefix("0x")
    try:
        server_id = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"--server-id takes hex digits (up to {2 * MAX_SERVER_ID}), not {value!r}") from None
    if len(server_id) > MAX_SERVER_ID:
        raise ValueError(f"--server-id is at most {MAX_SERVER_ID} bytes ({2 * MAX_SERVER_ID} hex digits)")
    return server_id


def supervise(
    endpoints: Sequence[Endpoint],
    *,
    workers: int,
    keyed: bool,
    server_id: bytes,
    drain_timeout: float,
    metrics: tuple[str, int] | None,
) -> None:
    """Run ``vtunnel server`` (this process's own command line) as ``workers`` workers; exits when they stop.
    ``metrics``: the ``--metrics`` address, where the supervisor serves every worker's metrics."""
    try:
        supervisor = Supervisor(
            endpoints,
            workers=workers,
            keyed=keyed,
            server_id=server_id,
            command=[sys.executable, "-m", "vtunnel", *sys.argv[1:]],
            drain_timeout=drain_timeout,
            metrics=metrics,
        )
        urls = supervisor.bind()
    except (OSError, TransportError, ValueError) as exc:
        log.error("cannot start", error=str(exc) or repr(exc))
        sys.exit(1)
    for url in urls:
        log.info("listening", url=url, workers=workers)
    sys.exit(supervisor.run())
