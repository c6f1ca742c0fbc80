"""Metrics of a server run as workers (``vtunnel server --workers N --metrics ADDR``): one endpoint, the supervisor's.

Each worker process keeps its own counters (:class:`~vtunnel.apps.stats.ProcessStats`, read at scrape time by
:class:`~vtunnel.apps.metrics.TunnelCollector`) and serves them to its supervisor only, over a private channel:
a connected UNIX socket pair made for that one process (:meth:`WorkerMetrics.channel`), whose other end the
worker inherits. The supervisor writes one byte (``?``) and the worker answers with one frame: a 4-byte length,
then its registry in the OpenMetrics text format (:func:`report_to_supervisor`); a worker that stops gracefully
(SIGTERM, a reload's replacement once it drained) sends one last frame, unasked, just before it exits.

The supervisor serves the one ``/metrics`` endpoint (:func:`vtunnel.apps.metrics.serve_metrics`, on a thread of
its own) with :class:`WorkerMetrics` as its collector: at each scrape it asks every live worker process, parses
the answers (prometheus_client's OpenMetrics parser) and merges them, every sample labelled ``worker="K"``:

* **Counters** of worker K are the sum over its live processes (the serving one, and a replaced one while it
  drains) plus what its ended processes counted last (carried), so they never go back: not when a worker dies
  and is started again, not when a reload replaces it. What an ended process counted after the supervisor last
  heard from it is lost (after a ``kill -9``: since the last scrape; a graceful end reports its final counts).
* **Gauges** of worker K are the sum over its live processes (tunnels and streams open now, memory, open
  descriptors), except those that describe one process (``vtunnel_process_start_time_seconds``,
  ``vtunnel_process_max_fds``), which are its serving process's, and the build info, one series per version
  running. The per-tunnel gauges' ``tunnel`` label is the supervisor's own serial number of the tunnel (a
  worker's numbers start again from 1 in each process), so the tunnels of a replaced process and of its
  successor never share one.
* ``vtunnel_worker_up`` (1 when worker K's serving process answered this scrape) and
  ``vtunnel_worker_restarts_total`` (how often worker K was started again after it ended unasked) are the
  supervisor's own.

prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) does not fit: it shares values that are
set as they change, while a tunnel's counts are read from the tunnel when Prometheus scrapes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import socket
import struct
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable
from typing import Final

import anyio
import anyio.abc
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from vtunnel.io.blocking import read_within

__all__ = ["ASK", "WorkerMetrics", "encode_frame", "report_to_supervisor"]

#: the supervisor's request: one byte
ASK: Final = b"?"
_LENGTH: Final = struct.Struct("!I")
#: the longest a worker's answer may be (a worker with very many tunnels: one series each per-tunnel gauge)
MAX_FRAME: Final = 64 * 1024 * 1024
#: how long the supervisor waits for one worker's answer at a scrape
ANSWER_TIMEOUT: Final = 5.0

#: gauges that describe one process: worker K's are its serving process's, not a sum
_ONE_PROCESS: Final = frozenset({"vtunnel_process_start_time_seconds", "vtunnel_process_max_fds"})
_TUNNEL_LABEL: Final = "tunnel"
_WORKER_LABEL: Final = "worker"


# --- the worker's side ----------------------------------------------------------------------------------------


_encode, _ = choose_encoder(OPENMETRICS)


def encode_frame(registry: CollectorRegistry) -> bytes:
    """One answer to the supervisor: the length, then ``registry`` in the OpenMetrics text format."""
    body = _encode(registry)
    return _LENGTH.pack(len(body)) + body


@contextlib.asynccontextmanager
async def report_to_supervisor(registry: CollectorRegistry, sock: socket.socket) -> AsyncIterator[None]:
    """Answer the supervisor's requests on ``sock`` (this worker's channel) with ``registry`` while the block runs,
    and send it a last frame when the block ends (the counts this process ends with)."""
    stream = await anyio.abc.UNIXSocketStream.from_socket(sock)

    async def answer() -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            while True:
                asked = await stream.receive()
                for _ in range(asked.count(ASK)):
                    await stream.send(encode_frame(registry))

    async with stream, anyio.create_task_group() as tg:
        tg.start_soon(answer)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(ANSWER_TIMEOUT),
                contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError),
            ):
                await stream.send(encode_frame(registry))


# --- the supervisor's side -------------------------------------------------------------------------------------

#: a counter's sample across scrapes: family, sample name, labels
_Labels = tuple[tuple[str, str], ...]
_Key = tuple[str, str, _Labels]


@dataclasses.dataclass(frozen=True)
class _Family:
    name: str
    documentation: str
    type: str
    unit: str


class _Channel:
    """One worker process's channel (the supervisor's end) and the last families it sent."""

    def __init__(self, index: int, pid: int, sock: socket.socket, order: int) -> None:
        self.index = index
        self.pid = pid
        self.order = order
        self.lock = threading.Lock()
        self.last: list[Metric] = []
        self.answered = False
        self._sock = sock
        self._buffer = bytearray()
        self._pending = 0
        self._open = True

    def ask(self) -> None:
        """Ask for the process's metrics (:meth:`take_answer` reads them)."""
        with self.lock:
            self.answered = False
            if not self._open:
                return
            try:
                self._sock.sendall(ASK)
            except OSError:
                self._open = False
                return
            self._pending += 1

    def take_answer(self, deadline: float) -> None:
        """Wait until ``deadline`` (monotonic) at most for the answer; ``answered`` tells whether it came (else
        ``last`` stays as it was)."""
        with self.lock:
            if self._open:
                self._read(deadline)

    def finish(self) -> None:
        """The process ended: take what it sent last (its final frame, if it had the time) and close."""
        with self.lock:
            if self._open:
                self._read(time.monotonic(), drain=True)
            self._open = False
            self._sock.close()

    def _read(self, deadline: float, *, drain: bool = False) -> None:
        """Read frames until none is pending (``drain``: until none is there), each replacing ``last``, or the
        deadline passes, or the channel ends."""
        while self._open:
            self._take_frames()
            if not self._open or (self._pending <= 0 and not drain):
                return
            wait = max(0.0, deadline - time.monotonic())
            data = read_within(self._sock, 1 << 20, wait)
            if data is None:
                return
            if not data:
                self._take_frames()
                self._open = False
                return
            self._buffer += data

    def _take_frames(self) -> None:
        while len(self._buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self._buffer)
            if size > MAX_FRAME:
                self._open = False  # not a worker's answer: never read from it again
                self._buffer.clear()
                return
            if len(self._buffer) < _LENGTH.size + size:
                return
            body = bytes(self._buffer[_LENGTH.size : _LENGTH.size + size])
            del self._buffer[: _LENGTH.size + size]
            self._pending = max(0, self._pending - 1)
            try:
                parsed: Iterable[Metric] = text_string_to_metric_families(  # type: ignore[no-untyped-call]
                    body.decode("utf-8")
                )
                self.last = list(parsed)
            except ValueError:
                continue  # a frame that does not parse changes nothing
            self.answered = True


class WorkerMetrics(Collector):
    """The supervisor's collector: its workers' metrics merged, labelled ``worker`` (see the module's
    description). Thread-safe: the supervisor tells it of processes from its main thread while the endpoint's
    thread scrapes."""

    def __init__(self, *, timeout: float = ANSWER_TIMEOUT) -> None:
        self._timeout = timeout
        self._lock = threading.Lock()
        self._channels: dict[int, _Channel] = {}
        self._order = itertools.count()
        #: per worker: the counters of its ended processes, and every family's description seen
        self._carried: defaultdict[int, defaultdict[_Key, float]] = defaultdict(lambda: defaultdict(float))
        self._families: dict[str, _Family] = {}
        self._restarts: Counter[int] = Counter()
        self._workers: set[int] = set()
        #: (pid, a process's tunnel serial) -> the supervisor's serial of that tunnel
        self._tunnels: dict[tuple[int, str], int] = {}
        self._serial = itertools.count(1)

    # told by the supervisor ---------------------------------------------------------------------------------

    @staticmethod
    def channel() -> tuple[socket.socket, socket.socket]:
        """A new channel: the supervisor's end and the end to pass to the worker process."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.set_inheritable(True)
        return ours, theirs

    def started(self, index: int, pid: int, sock: socket.socket) -> None:
        """Worker ``index`` runs in process ``pid`` now, ``sock`` its channel's end."""
        with self._lock:
            self._workers.add(index)
            self._channels[pid] = _Channel(index, pid, sock, next(self._order))

    def restarted(self, index: int) -> None:
        """Worker ``index`` ended unasked and is started again."""
        with self._lock:
            self._restarts[index] += 1

    def ended(self, pid: int) -> None:
        """Process ``pid`` ended: its last counts are carried into its worker's."""
        with self._lock:
            channel = self._channels.get(pid)
        if channel is None:
            return
        channel.finish()
        with self._lock:
            del self._channels[pid]
            carried = self._carried[channel.index]
            for family in channel.last:
                self._remember(family)
                if family.type == "counter":
                    for sample in family.samples:
                        if not sample.name.endswith("_created"):
                            carried[_key(family.name, sample)] += sample.value
            self._tunnels = {key: serial for key, serial in self._tunnels.items() if key[0] != pid}

    def close(self) -> None:
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
        for channel in channels:
            channel.finish()

    # read by the endpoint -----------------------------------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            channels = sorted(self._channels.values(), key=lambda c: c.order)
        for channel in channels:  # all asked at once: a slow worker holds the scrape up once, not once each
            channel.ask()
        deadline = time.monotonic() + self._timeout
        for channel in channels:
            channel.take_answer(deadline)
        with self._lock:
            return self._merge([c for c in channels if c.pid in self._channels])

    def _remember(self, family: Metric) -> None:
        self._families.setdefault(
            family.name, _Family(family.name, family.documentation, family.type, family.unit)
        )

    def _merge(self, channels: list[_Channel]) -> list[Metric]:
        """Every family of the workers' processes, labelled by worker (the lock held)."""
        values: defaultdict[str, defaultdict[tuple[str, _Labels], float]] = defaultdict(
            lambda: defaultdict(float)
        )
        for index, carried in self._carried.items():
            for (family_name, sample_name, sample_labels), count in carried.items():
                values[family_name][sample_name, (*sample_labels, (_WORKER_LABEL, str(index)))] += count
        serving = {c.index: c for c in channels}  # the newest process of each worker
        seen: set[tuple[int, str]] = set()
        for channel in channels:
            worker = (_WORKER_LABEL, str(channel.index))
            for metric in channel.last:
                self._remember(metric)
                if metric.type == "counter":
                    samples = [s for s in metric.samples if not s.name.endswith("_created")]
                elif metric.name in _ONE_PROCESS and serving[channel.index] is not channel:
                    continue
                else:
                    samples = metric.samples
                for sample in samples:
                    labels = dict(sample.labels)
                    if _TUNNEL_LABEL in labels:
                        key = (channel.pid, labels[_TUNNEL_LABEL])
                        seen.add(key)
                        if key not in self._tunnels:
                            self._tunnels[key] = next(self._serial)
                        labels[_TUNNEL_LABEL] = str(self._tunnels[key])
                    labelled = (*sorted(labels.items()), worker)
                    if metric.type == "info":
                        values[metric.name][sample.name, labelled] = sample.value
                    else:
                        values[metric.name][sample.name, labelled] += sample.value
        self._tunnels = {key: serial for key, serial in self._tunnels.items() if key in seen}
        out: list[Metric] = []
        for name in sorted(values):
            described = self._families[name]
            metric = Metric(described.name, described.documentation, described.type, described.unit)
            metric.samples = [
                Sample(sample, dict(labels), value)
                for (sample, labels), value in sorted(values[name].items())
            ]
            out.append(metric)
        up = GaugeMetricFamily(
            "vtunnel_worker_up",
            "1 when the worker's serving process answered the supervisor at this scrape.",
            labels=[_WORKER_LABEL],
        )
        restarts = CounterMetricFamily(
            "vtunnel_worker_restarts",
            "Times the worker was started again after it ended unasked (a crash, a kill).",
            labels=[_WORKER_LABEL],
        )
        for index in sorted(self._workers):
            current = serving.get(index)
            up.add_metric([str(index)], 1 if current is not None and current.answered else 0)
            restarts.add_metric([str(index)], self._restarts[index])
        out += [up, restarts]
        return out


def _key(family: str, sample: Sample) -> _Key:
    return family, sample.name, tuple(sorted(sample.labels.items()))
