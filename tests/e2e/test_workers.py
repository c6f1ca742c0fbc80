"""``vtunnel server --workers 2``: a real supervisor and its worker processes, real agents, real transfers.

Which worker holds what is read from the metrics: the supervisor serves every worker's at the one --metrics
address, each series labelled ``worker``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from prometheus_client.samples import Sample

from tests.conftest import VTUNNEL, Processes, free_port, wait_log, wait_port
from tests.e2e.test_metrics import parse, scrape, value
from tests.netutil import echo_roundtrip, echo_server, pattern
from vtunnel.testing import ImpairmentRelay
from vtunnel.testing.ports import free_port_range

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def echo() -> Iterator[int]:
    with echo_server() as port:
        yield port


def start_workers(
    procs: Processes, scheme: str, key: Path, echo: int, *, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[bytes], str, int]:
    """A supervisor with two workers sending every stream to ``echo``: it, the tunnel URL, the metrics port."""
    config = procs.tmp / "server.toml"
    # the test's transfers outlast the default drain (10 s, at both ends): a replaced worker's all finish
    config.write_text("[server]\ndrain_timeout = 60\n[tunnel]\ndrain_timeout = 60\n")
    port = free_port(socket.SOCK_DGRAM if scheme == "kcp" else socket.SOCK_STREAM)
    metrics = free_port()
    url = f"{scheme}://127.0.0.1:{port}"
    server = procs.start(
        "server",
        "--listen",
        url,
        "--psk-file",
        str(key),
        "--target",
        f"127.0.0.1:{echo}",
        "--workers",
        "2",
        "--metrics",
        f"127.0.0.1:{metrics}",
        "--log-level",
        "info",
        "--config",
        str(config),
        *extra,
    )
    wait_log(procs, server, "workers serving", timeout=60)
    wait_port(metrics)
    return server, url, metrics


def per_worker(metrics: int, name: str) -> list[float]:
    """``name`` summed over each worker's series, from one scrape of the supervisor's endpoint."""
    _, samples = parse(scrape(metrics))
    return [value(samples, name, worker=str(k)) for k in range(2)]


def tunnels(metrics: int) -> list[float]:
    """Each worker's live tunnels."""
    return per_worker(metrics, "vtunnel_tunnels")


def opened(metrics: int) -> list[float]:
    """Each worker's tunnels opened so far."""
    return per_worker(metrics, "vtunnel_tunnels_opened_total")


def wait_tunnels(metrics: int, total: int, timeout: float = 90.0) -> list[float]:
    deadline = time.monotonic() + timeout
    while True:
        counts = tunnels(metrics)
        if sum(counts) >= total:
            return counts
        if time.monotonic() > deadline:
            raise AssertionError(f"{total} tunnels expected, the workers hold {counts}")
        time.sleep(0.2)


def wait_worker_up(metrics: int, worker: int, timeout: float = 30.0) -> list[Sample]:
    """The samples of the first scrape in which ``worker`` answered the supervisor."""
    deadline = time.monotonic() + timeout
    while True:
        _, samples = parse(scrape(metrics))
        if value(samples, "vtunnel_worker_up", worker=str(worker)) == 1:
            return samples
        assert time.monotonic() < deadline, f"worker {worker} did not come back"
        time.sleep(0.2)


def agent(procs: Processes, url: str, key: Path, *, conn: int) -> tuple[subprocess.Popen[bytes], int]:
    front = free_port()
    proc = procs.start(
        "agent",
        "--server",
        url,
        "--psk-file",
        str(key),
        "--forward",
        f"127.0.0.1:{front}",
        "--conn",
        str(conn),
        "--config",
        str(procs.tmp / "server.toml"),
    )
    wait_port(front)
    return proc, front


def transfers(fronts: list[int], count: int, size: int) -> list[bool]:
    """``count`` echo transfers of ``size`` bytes at once, spread over ``fronts``: whether each came back exact."""
    results: list[bool] = [False] * count

    def one(i: int) -> None:
        payload = pattern(size, seed=i)
        try:
            results[i] = echo_roundtrip(fronts[i % len(fronts)], payload, timeout=120) == payload
        except OSError:
            results[i] = False

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return results


def paced_echo(
    port: int, payload: bytes, *, chunk: int, pause: float, halfway: Callable[[], None] | None = None
) -> bytes:
    """Send ``payload`` through ``port`` a chunk at a time with pauses (so that it lasts), half-close, and return
    what came back. ``halfway`` is called once half of it is sent (and may hold the rest back)."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.settimeout(120)

        def writer() -> None:
            try:
                for i in range(0, len(payload), chunk):
                    if halfway is not None and i == len(payload) // 2 // chunk * chunk:
                        halfway()
                    s.sendall(payload[i : i + chunk])
                    time.sleep(pause)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                return  # the reader sees the stream end short

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        received = bytearray()
        while chunk_in := s.recv(262144):
            received += chunk_in
        t.join(120)
        return bytes(received)


@pytest.mark.parametrize("scheme", ["tcp", "kcp"])
def test_two_workers_serve_200_tunnels_byte_exact_and_both_are_used(
    procs: Processes, psk_file: Path, echo: int, scheme: str
) -> None:
    _, url, metrics = start_workers(procs, scheme, psk_file, echo)
    fronts = [agent(procs, url, psk_file, conn=50)[1] for _ in range(4)]
    counts = wait_tunnels(metrics, 200)
    assert sum(counts) == 200
    assert min(counts) > 0, counts  # both workers hold tunnels
    results = transfers(fronts, 200, 64 * 1024)
    assert all(results), results.count(False)
    assert sum(tunnels(metrics)) == 200  # no tunnel was lost on the way


@pytest.mark.anyio
async def test_a_kcp_client_that_rebinds_ten_times_stays_on_its_worker(
    procs: Processes, psk_file: Path, echo: int
) -> None:
    _, url, metrics = start_workers(procs, "kcp", psk_file, echo)
    port = int(url.rsplit(":", 1)[1])
    async with ImpairmentRelay(("127.0.0.1", port), seed=3) as relay:
        _, front = await anyio.to_thread.run_sync(
            lambda: agent(procs, f"kcp://127.0.0.1:{relay.address[1]}", psk_file, conn=1)
        )
        before = await anyio.to_thread.run_sync(wait_tunnels, metrics, 1)
        holder = before.index(1)
        payload = pattern(12 * 1024 * 1024, seed=5)
        result: list[bytes] = []
        moved: list[tuple[str, int]] = []

        def run() -> None:
            result.append(paced_echo(front, payload, chunk=128 * 1024, pause=0.1))

        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, run)
            for _ in range(10):
                await anyio.sleep(0.4)
                (first,) = relay.upstream_addresses
                relay.rebind()
                (now,) = relay.upstream_addresses
                assert now != first
                moved.append(now)
        assert result == [payload]  # the transfer never broke
        assert len(set(moved)) == 10
        assert await anyio.to_thread.run_sync(tunnels, metrics) == before  # on the same worker all along
        assert (await anyio.to_thread.run_sync(opened, metrics))[
            1 - holder
        ] == 0  # never a new tunnel elsewhere


def test_kill_9_of_one_worker_leaves_the_others_tunnels_alone_and_a_new_one_comes_up(
    procs: Processes, psk_file: Path, echo: int
) -> None:
    server, url, metrics = start_workers(procs, "tcp", psk_file, echo)
    # two agents of one tunnel each, one on each worker (the kernel spreads connections by their addresses)
    first, front_a = agent(procs, url, psk_file, conn=1)
    wait_tunnels(metrics, 1)
    holder_a = tunnels(metrics).index(1)
    for _ in range(20):
        second, front_b = agent(procs, url, psk_file, conn=1)
        counts = wait_tunnels(metrics, 2)
        if counts == [1.0, 1.0]:
            break
        second.kill()
        second.wait()
        time.sleep(0.5)  # its tunnel ends on the server
    else:
        pytest.fail("20 agents' tunnels all went to one worker")
    pids = [
        int(line.rsplit("pid=", 1)[1].split()[0])
        for line in procs.output(server).splitlines()
        if "worker started" in line
    ]
    victim = pids[holder_a]  # the worker that holds the first agent's tunnel (started in index order)
    payload = pattern(8 * 1024 * 1024, seed=9)
    result: list[bytes] = []
    t = threading.Thread(
        target=lambda: result.append(paced_echo(front_b, payload, chunk=128 * 1024, pause=0.02))
    )
    t.start()
    time.sleep(0.5)
    os.kill(victim, signal.SIGKILL)
    t.join(120)
    assert result == [payload]  # the other worker's tunnel carried on
    assert "tunnel down" not in procs.output(second)
    wait_log(procs, first, "tunnel down")
    wait_log(procs, server, "worker ended: starting it again")
    wait_worker_up(metrics, holder_a)  # a new worker serves again
    started = [line for line in procs.output(server).splitlines() if "worker started" in line]
    assert len(started) == 3  # the survivor was never started again
    assert f"worker={holder_a}" in started[-1]
    os.kill(pids[1 - holder_a], 0)
    assert echo_roundtrip(front_a, b"back again", timeout=30) == b"back again"


@pytest.mark.parametrize("scheme", ["tcp", "kcp"])
def test_sighup_during_50_transfers_replaces_the_workers_and_every_transfer_finishes_exact(
    procs: Processes, psk_file: Path, echo: int, scheme: str
) -> None:
    server, url, metrics = start_workers(procs, scheme, psk_file, echo)
    fronts = [agent(procs, url, psk_file, conn=8)[1] for _ in range(2)]
    wait_tunnels(metrics, 16)
    results: list[bool] = [False] * 50
    # every transfer sends its first half, then waits for the reload to be over: all 50 span it, on the old workers
    halfway = threading.Semaphore(0)
    reloaded = threading.Event()

    def hold() -> None:
        halfway.release()
        reloaded.wait(120)

    def one(i: int) -> None:
        payload = pattern(1024 * 1024, seed=100 + i)
        try:
            results[i] = (
                paced_echo(fronts[i % 2], payload, chunk=32 * 1024, pause=0.05, halfway=hold) == payload
            )
        except OSError:
            results[i] = False

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for _ in threads:
        assert halfway.acquire(timeout=120), "the transfers did not get halfway"
    server.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 90
    while procs.output(server).count("worker replaced: the old one drains") < 2:
        assert time.monotonic() < deadline, "the workers were not both replaced"
        time.sleep(0.1)
    reloaded.set()
    for t in threads:
        t.join(180)
    assert all(results), results.count(False)
    deadline = time.monotonic() + 60
    while procs.output(server).count("replaced worker ended") < 2:
        assert time.monotonic() < deadline, "the replaced workers did not both end"
        time.sleep(0.1)
    # the replaced workers carried most of the 50 MiB and reported their last counts as they ended: the
    # supervisor's counters hold them (50 MiB came in to be echoed, and went out again)
    _, samples = parse(scrape(metrics))
    for name in ("vtunnel_received_bytes_total", "vtunnel_sent_bytes_total"):
        assert value(samples, name) >= 50 * 1024 * 1024, name
    assert value(samples, "vtunnel_worker_restarts_total") == 0  # a reload restarts nobody
    # and the new workers serve
    assert echo_roundtrip(fronts[0], b"after the reload", timeout=30) == b"after the reload"


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ('workers = 2\nserver_id = "0a01"', None),
        ('workers = "auto"', None),
        ("workers = 0", "--workers is 1.."),
        ('workers = "many"', "--workers takes a number or auto"),
        ('server_id = "0a0102"', "--server-id is at most 2 bytes"),
        ('workers = 2\nlisten = ["ws://127.0.0.1:4000"]', "--workers cannot share ws://"),
        ('workers = 2\nlisten = ["tcp://127.0.0.1:4000?splice=4001"]', None),
        ('workers = 4\nlisten = ["kcp://127.0.0.1:4000?splice=65530"]', "past 65535"),
    ],
)
def test_check_config_reads_workers_and_server_id(
    tmp_path: Path, psk_file: Path, settings: str, error: str | None
) -> None:
    config = tmp_path / "server.toml"
    listen = "" if "listen" in settings else 'listen = ["kcp://127.0.0.1:4000", "tcp://127.0.0.1:4000"]\n'
    config.write_text(f'[server]\n{listen}psk_file = "{psk_file}"\n{settings}\n')
    done = subprocess.run(
        [*VTUNNEL, "check-config", str(config)], capture_output=True, text=True, timeout=60, check=False
    )
    if error is None:
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode == 1
        assert error in done.stderr


def _start_fails(listen: str, psk_file: Path) -> str:
    """``vtunnel server --workers 2 --listen LISTEN``, which must refuse to start with exit status 1 and say
    so; what it printed."""
    done = subprocess.run(
        [*VTUNNEL, "server", "--listen", listen, "--psk-file", str(psk_file), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "cannot start" in done.stdout + done.stderr
    return done.stdout + done.stderr


def test_a_port_in_use_is_one_clear_line_and_exit_status_1(psk_file: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        output = _start_fails(f"tcp://127.0.0.1:{port}", psk_file)
    assert "Address already in use" in output


@pytest.mark.parametrize("scheme", ["tcp", "kcp"])
def test_a_splice_port_in_use_in_the_workers_range_is_one_clear_line_and_exit_status_1(
    scheme: str, psk_file: Path
) -> None:
    """``--workers 2`` with ``splice=PORT`` takes PORT to PORT + 3, one per slot: the last one taken stops the
    start, naming it."""
    first = free_port_range(4)
    kind = socket.SOCK_DGRAM if scheme == "kcp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as taken:
        taken.bind(("127.0.0.1", first + 3))
        output = _start_fails(f"{scheme}://127.0.0.1:{free_port(kind)}?splice={first}", psk_file)
    assert f"('127.0.0.1', {first + 3}): Address already in use" in output


def test_one_metrics_endpoint_shows_both_workers_and_their_counters_survive_a_kill_9(
    procs: Processes, psk_file: Path, echo: int
) -> None:
    server, url, metrics = start_workers(procs, "tcp", psk_file, echo)
    fronts = [agent(procs, url, psk_file, conn=8)[1] for _ in range(2)]
    counts = wait_tunnels(metrics, 16)
    assert min(counts) > 0, counts  # the kernel spread the 16 connections over both workers
    types, before = parse(scrape(metrics))
    assert types["vtunnel_sent_bytes"] == "counter"
    assert types["vtunnel_tunnels"] == "gauge"
    assert types["vtunnel_worker_restarts"] == "counter"
    assert {s.labels.get("worker") for s in before} == {"0", "1"}  # every series names its worker
    assert all(value(before, "vtunnel_worker_up", worker=str(k)) == 1 for k in range(2))

    # traffic over every tunnel of both agents: both workers' byte counters move
    assert all(transfers(fronts, 32, 256 * 1024))
    _, after = parse(scrape(metrics))
    for k in range(2):
        for name in ("vtunnel_received_bytes_total", "vtunnel_sent_bytes_total"):
            grown = value(after, name, worker=str(k)) - value(before, name, worker=str(k))
            assert grown > 0, (name, k)

    # kill -9 of worker 0: the endpoint answers on, worker 0 comes back, its counters never go back
    pids = [
        int(line.rsplit("pid=", 1)[1].split()[0])
        for line in procs.output(server).splitlines()
        if "worker started" in line
    ]
    os.kill(pids[0], signal.SIGKILL)
    wait_log(procs, server, "worker ended: starting it again")
    _, during = parse(scrape(metrics))  # answers while worker 0 is gone or starting
    assert value(during, "vtunnel_worker_restarts_total", worker="0") == 1
    samples = wait_worker_up(metrics, 0)
    assert value(samples, "vtunnel_worker_restarts_total", worker="1") == 0
    for name in ("vtunnel_received_bytes_total", "vtunnel_sent_bytes_total", "vtunnel_tunnels_opened_total"):
        for k in range(2):
            assert value(samples, name, worker=str(k)) >= value(after, name, worker=str(k)), (name, k)
    # and the new worker 0 counts on top of them: the agents' tunnels come back, traffic flows
    wait_tunnels(metrics, 16)
    assert all(transfers(fronts, 16, 64 * 1024))
    _, last = parse(scrape(metrics))
    assert value(last, "vtunnel_sent_bytes_total", worker="0") > value(
        after, "vtunnel_sent_bytes_total", worker="0"
    )
