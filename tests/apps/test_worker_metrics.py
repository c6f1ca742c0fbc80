"""The supervisor's merge of its workers' metrics (``vtunnel.apps.worker_metrics``): real channels (UNIX socket
pairs), the workers' side run by :func:`report_to_supervisor` on an event loop of its own, the merged families
read through the same text parser Prometheus' clients use."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Iterator

import anyio
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from vtunnel.apps.worker_metrics import WorkerMetrics, encode_frame, report_to_supervisor


class Counts(Collector):
    """A worker's families, set by the test: bytes sent, open tunnels, one RTT per tunnel, its start time."""

    def __init__(self, *, started: float, version: str = "1") -> None:
        self.sent = 0.0
        self.tunnels: list[int] = []
        self.started = started
        self.version = version

    def collect(self) -> Iterable[Metric]:
        info = InfoMetricFamily("vtunnel_build", "build")
        info.add_metric([], {"version": self.version})
        sent = CounterMetricFamily("vtunnel_sent_bytes", "sent", labels=["transport"])
        sent.add_metric(["tcp"], self.sent)
        open_now = GaugeMetricFamily("vtunnel_tunnels", "open", labels=["transport"])
        open_now.add_metric(["tcp"], len(self.tunnels))
        rtt = GaugeMetricFamily("vtunnel_tunnel_rtt_seconds", "rtt", labels=["transport", "tunnel"])
        for serial in self.tunnels:
            rtt.add_metric(["kcp", str(serial)], serial / 1000)
        start = GaugeMetricFamily("vtunnel_process_start_time_seconds", "start")
        start.add_metric([], self.started)
        yield from (info, sent, open_now, rtt, start)


class FakeWorker:
    """One worker process's side of a channel: ``report_to_supervisor`` on a thread's event loop."""

    def __init__(self, sock: socket.socket, counts: Counts) -> None:
        self.counts = counts
        registry = CollectorRegistry(auto_describe=False)
        registry.register(counts)
        self._stop: anyio.Event | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None
        ready = threading.Event()

        async def main() -> None:
            self._stop = anyio.Event()
            self._token = anyio.lowlevel.current_token()
            async with report_to_supervisor(registry, sock):
                ready.set()
                await self._stop.wait()

        self._thread = threading.Thread(target=anyio.run, args=(main,), daemon=True)
        self._thread.start()
        assert ready.wait(10)

    def stop(self) -> None:
        """A graceful end: the last frame is sent."""
        assert self._stop is not None
        anyio.from_thread.run_sync(self._stop.set, token=self._token)
        self._thread.join(10)


@pytest.fixture
def collector() -> Iterator[WorkerMetrics]:
    merged = WorkerMetrics(timeout=5.0)
    yield merged
    merged.close()


def start(collector: WorkerMetrics, index: int, pid: int, counts: Counts) -> FakeWorker:
    ours, theirs = WorkerMetrics.channel()
    collector.started(index, pid, ours)
    return FakeWorker(theirs, counts)


def scrape(collector: WorkerMetrics) -> list[Sample]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def test_every_series_names_its_worker_and_the_workers_are_up(collector: WorkerMetrics) -> None:
    a, b = Counts(started=100), Counts(started=200)
    a.sent, b.sent = 10, 20
    start(collector, 0, 1000, a)
    start(collector, 1, 1001, b)
    samples = scrape(collector)
    assert all("worker" in s.labels for s in samples)
    assert value(samples, "vtunnel_sent_bytes_total", worker="0") == 10
    assert value(samples, "vtunnel_sent_bytes_total", worker="1") == 20
    assert value(samples, "vtunnel_worker_up", worker="0") == 1
    assert value(samples, "vtunnel_worker_restarts_total") == 0


def test_a_replaced_worker_and_its_successor_add_up_and_their_tunnels_keep_apart(
    collector: WorkerMetrics,
) -> None:
    old, new = Counts(started=100, version="1"), Counts(started=300, version="2")
    old.sent, old.tunnels = 1000, [1, 2, 3]
    new.sent, new.tunnels = 5, [1]  # a new process numbers its tunnels from 1 again
    old_worker = start(collector, 0, 1000, old)
    start(collector, 0, 1001, new)
    samples = scrape(collector)
    assert value(samples, "vtunnel_sent_bytes_total", worker="0") == 1005
    assert value(samples, "vtunnel_tunnels", worker="0") == 4  # the draining process's tunnels are open too
    rtts = [s for s in samples if s.name == "vtunnel_tunnel_rtt_seconds"]
    assert len(rtts) == 4
    assert len({s.labels["tunnel"] for s in rtts}) == 4  # one series per tunnel
    assert value(samples, "vtunnel_process_start_time_seconds", worker="0") == 300  # the serving process's
    assert {s.labels["version"] for s in samples if s.name == "vtunnel_build_info"} == {"1", "2"}
    assert all(s.value == 1 for s in samples if s.name == "vtunnel_build_info")
    again = [s for s in scrape(collector) if s.name == "vtunnel_tunnel_rtt_seconds"]
    assert {s.labels["tunnel"] for s in again} == {s.labels["tunnel"] for s in rtts}  # stable across scrapes

    # the old one counts more while draining, then ends gracefully without another scrape: its last frame counts
    old.sent = 1500
    old.tunnels = []
    old_worker.stop()
    collector.ended(1000)
    samples = scrape(collector)
    assert value(samples, "vtunnel_sent_bytes_total", worker="0") == 1505
    assert value(samples, "vtunnel_tunnels", worker="0") == 1
    new.sent = 10
    assert value(scrape(collector), "vtunnel_sent_bytes_total", worker="0") == 1510


def frame(counts: Counts) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(counts)
    return encode_frame(registry)


def test_a_killed_worker_keeps_what_was_last_scraped_and_its_restart_counts_on(
    collector: WorkerMetrics,
) -> None:
    first = Counts(started=100)
    first.sent = 700
    ours, theirs = WorkerMetrics.channel()
    collector.started(0, 1000, ours)
    theirs.sendall(frame(first))  # its answer to the scrape to come
    assert value(scrape(collector), "vtunnel_sent_bytes_total", worker="0") == 700
    # kill -9: the process's end of the channel closes with nothing more said (what it counted since is lost)
    theirs.close()
    collector.ended(1000)
    collector.restarted(0)
    samples = scrape(collector)
    assert value(samples, "vtunnel_sent_bytes_total", worker="0") == 700
    assert value(samples, "vtunnel_worker_up", worker="0") == 0  # nobody serves worker 0 now
    assert value(samples, "vtunnel_worker_restarts_total", worker="0") == 1
    second = Counts(started=200)
    second.sent = 3
    start(collector, 0, 1002, second)
    samples = scrape(collector)
    assert value(samples, "vtunnel_sent_bytes_total", worker="0") == 703  # never went back
    assert value(samples, "vtunnel_worker_up", worker="0") == 1


def test_a_worker_that_does_not_answer_in_time_keeps_its_last_counts() -> None:
    quick = WorkerMetrics(timeout=0.2)
    ours, late = WorkerMetrics.channel()
    try:
        quick.started(0, 1000, ours)
        counts = Counts(started=1)
        counts.sent = 42
        late.sendall(frame(counts))
        assert value(scrape(quick), "vtunnel_sent_bytes_total", worker="0") == 42
        samples = scrape(quick)  # no answer this time
        assert value(samples, "vtunnel_worker_up", worker="0") == 0
        assert value(samples, "vtunnel_sent_bytes_total", worker="0") == 42
        counts.sent = 50
        late.sendall(frame(counts))  # the late answer, then the next one: the newest counts
        late.sendall(frame(counts))
        samples = scrape(quick)
        assert value(samples, "vtunnel_sent_bytes_total", worker="0") == 50
        assert value(samples, "vtunnel_worker_up", worker="0") == 1
    finally:
        late.close()
        quick.close()


def test_a_frame_too_long_closes_the_channel_and_changes_nothing(collector: WorkerMetrics) -> None:
    ours, theirs = WorkerMetrics.channel()
    collector.started(0, 1000, ours)
    with theirs:
        theirs.sendall(b"\xff\xff\xff\xff")
        samples = scrape(collector)
        assert value(samples, "vtunnel_worker_up", worker="0") == 0
        assert value(samples, "vtunnel_sent_bytes_total") == 0
