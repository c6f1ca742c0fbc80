"""``--metrics``: real server and agent processes on loopback, a real transfer through them (curl through SOCKS5,
or sockets through a forward), and their /metrics read with a real HTTP client and Prometheus's own parser."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.conftest import Processes, free_port, wait_log, wait_port
from tests.e2e.test_cli import BODY, web  # noqa: F401 - the fixture
from tests.netutil import echo_roundtrip, echo_server, pattern

pytestmark = pytest.mark.timeout(120)

#: every family an agent and a server expose, with its type
FAMILIES = {
    "vtunnel_build_info": "gauge",  # an info family, as the text format gives it
    "vtunnel_tunnels": "gauge",
    "vtunnel_tunnels_opened": "counter",
    "vtunnel_streams": "gauge",
    "vtunnel_streams_opened": "counter",
    "vtunnel_received_bytes": "counter",
    "vtunnel_sent_bytes": "counter",
    "vtunnel_retransmitted_packets": "counter",
    "vtunnel_retransmitted_bytes": "counter",
    "vtunnel_lost_packets": "counter",
    "vtunnel_tunnel_rtt_seconds": "gauge",
    "vtunnel_tunnel_delivery_rate_bytes_per_second": "gauge",
    "vtunnel_handshake_failures": "counter",
    "vtunnel_probes_refused": "counter",
    "vtunnel_exit_refusals": "counter",
    "vtunnel_process_cpu_seconds": "counter",
    "vtunnel_process_resident_memory_bytes": "gauge",
    "vtunnel_process_open_fds": "gauge",
}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        body: bytes = response.read()
        return body.decode()


def parse(text: str) -> tuple[dict[str, str], list[Sample]]:
    """The families' types by name, and every sample."""
    types: dict[str, str] = {}
    samples: list[Sample] = []
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        samples.extend(family.samples)
    return types, samples


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 when there are none)."""
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def wait_metric(port: int, name: str, at_least: float, timeout: float = 15.0, **labels: str) -> list[Sample]:
    deadline = time.monotonic() + timeout
    while True:
        _, samples = parse(scrape(port))
        if value(samples, name, **labels) >= at_least:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} stayed under {at_least}: {value(samples, name, **labels)}")
        time.sleep(0.1)


def start_pair(
    procs: Processes,
    scheme: str,
    key: Path,
    *,
    front: list[str],
    server_extra: tuple[str, ...] = (),
) -> tuple[int, int, int]:
    """A server and an agent, each with --metrics; their metrics ports and the tunnel port."""
    tport = free_port(socket.SOCK_DGRAM if scheme == "kcp" else socket.SOCK_STREAM)
    smetrics, ametrics = free_port(), free_port()
    url = f"{scheme}://127.0.0.1:{tport}"
    server = procs.start(
        "server", "--listen", url, "--psk-file", str(key), "--metrics", f"127.0.0.1:{smetrics}", *server_extra
    )
    wait_log(procs, server, "listening")
    wait_port(smetrics)
    procs.start("agent", "--server", url, "--psk-file", str(key), "--metrics", str(ametrics), *front)
    wait_port(ametrics)
    return smetrics, ametrics, tport


@pytest.fixture
def echo() -> Iterator[int]:
    with echo_server() as port:
        yield port


@pytest.mark.parametrize("scheme", ["tcp", "kcp"])
def test_metrics_of_a_curl_transfer_through_socks5(
    procs: Processes,
    psk_file: Path,
    web: int,  # noqa: F811 - the fixture
    scheme: str,
) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed (.ci/run installs it)")
    front = free_port()
    smetrics, ametrics, _ = start_pair(
        procs, scheme, psk_file, front=["--socks", f"127.0.0.1:{front}"], server_extra=("--allow-private",)
    )
    wait_port(front)
    wait_metric(ametrics, "vtunnel_tunnels", 1, transport=scheme)
    out = subprocess.run(
        [
            curl,
            "-sS",
            "--max-time",
            "20",
            "--socks5-hostname",
            f"127.0.0.1:{front}",
            f"http://127.0.0.1:{web}/",
        ],
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert out.stdout == BODY

    for port, role in ((smetrics, "server"), (ametrics, "agent")):
        types, samples = parse(scrape(port))
        for name, kind in FAMILIES.items():
            assert types.get(name) == kind, (role, name, types.get(name))
        assert all(name.startswith("vtunnel_") for name in types)
        assert value(samples, "vtunnel_build_info", role=role) == 1
        assert value(samples, "vtunnel_tunnels", transport=scheme) == 1
        assert value(samples, "vtunnel_tunnels_opened_total", transport=scheme) == 1
        assert value(samples, "vtunnel_streams_opened_total", kind="tcp") == 1
        assert value(samples, "vtunnel_sent_bytes_total", transport=scheme) > 0
        assert value(samples, "vtunnel_received_bytes_total", transport=scheme) > 0
    _, server_samples = parse(scrape(smetrics))
    _, agent_samples = parse(scrape(ametrics))
    # the page went from the server to the agent, framed: at least its bytes, each way counted the same
    assert value(server_samples, "vtunnel_sent_bytes_total") >= len(BODY)
    assert value(agent_samples, "vtunnel_received_bytes_total") >= len(BODY)
    if scheme == "kcp":  # KCP measures its path; a TCP link has no such numbers
        for samples in (server_samples, agent_samples):
            assert [s.labels["tunnel"] for s in samples if s.name == "vtunnel_tunnel_rtt_seconds"] == ["1"]
            assert value(samples, "vtunnel_tunnel_rtt_seconds") >= 0
    else:
        assert not [s for s in server_samples if s.name == "vtunnel_tunnel_rtt_seconds"]


def test_scrapes_during_a_transfer_see_the_counters_grow_and_the_streams_open(
    procs: Processes, psk_file: Path, echo: int
) -> None:
    front = free_port()
    smetrics, ametrics, _ = start_pair(
        procs,
        "kcp",
        psk_file,
        front=["--forward", f"127.0.0.1:{front}"],
        server_extra=("--target", f"127.0.0.1:{echo}"),
    )
    wait_port(front)
    payload = pattern(8 * 1024 * 1024, seed=11)
    result: list[bytes] = []
    transfer = threading.Thread(target=lambda: result.append(echo_roundtrip(front, payload, timeout=60)))
    transfer.start()
    seen: list[float] = []
    open_seen = 0.0
    deadline = time.monotonic() + 60
    while transfer.is_alive() and time.monotonic() < deadline:
        _, samples = parse(scrape(ametrics))
        seen.append(value(samples, "vtunnel_sent_bytes_total"))
        open_seen = max(open_seen, value(samples, "vtunnel_streams", kind="none"))
        time.sleep(0.05)
    transfer.join(timeout=60)
    assert result == [payload]
    assert seen == sorted(seen)  # a counter never goes back
    _, samples = parse(scrape(ametrics))
    assert value(samples, "vtunnel_sent_bytes_total") >= len(payload)
    # wait_port's connection to the forward was a stream too
    assert value(samples, "vtunnel_streams_opened_total", kind="none") == 2
    if len(seen) > 1:  # scraped while the transfer's stream was open
        assert open_seen >= 1
    _, server_samples = parse(scrape(smetrics))
    assert value(server_samples, "vtunnel_received_bytes_total", transport="kcp") >= len(payload)
    assert value(server_samples, "vtunnel_streams_opened_total", kind="none") == 2


def test_no_label_and_no_line_carries_the_key_or_a_destination(
    procs: Processes,
    psk_file: Path,
    web: int,  # noqa: F811 - the fixture
) -> None:
    """A server that refuses a private destination (no --allow-private) counts the refusal by reason only."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed (.ci/run installs it)")
    front = free_port()
    smetrics, ametrics, tport = start_pair(procs, "kcp", psk_file, front=["--socks", f"127.0.0.1:{front}"])
    wait_port(front)
    wait_metric(ametrics, "vtunnel_tunnels", 1)
    destination = f"127.0.0.1:{web}"
    out = subprocess.run(
        [
            curl,
            "-sS",
            "--max-time",
            "10",
            "--socks5-hostname",
            f"127.0.0.1:{front}",
            f"http://{destination}/",
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert out.returncode != 0  # the exit policy refused it
    wait_metric(smetrics, "vtunnel_exit_refusals_total", 1, reason="forbidden")
    # a stranger's datagrams to the sealed listener: refused without an answer, counted as probes
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _ in range(3):
            probe.sendto(b"\x00" * 64, ("127.0.0.1", tport))
    wait_metric(smetrics, "vtunnel_probes_refused_total", 3, transport="kcp")

    key = psk_file.read_text().strip()
    for port in (smetrics, ametrics):
        text = scrape(port)
        assert key not in text
        assert destination not in text
        assert str(web) not in text
        _, samples = parse(text)
        labels = {v for s in samples for v in s.labels.values()}
        assert all(key not in v and "127.0.0.1" not in v and str(web) != v for v in labels), labels


def test_the_endpoint_answers_only_get_metrics_and_survives_garbage(procs: Processes, psk_file: Path) -> None:
    smetrics, _, _ = start_pair(procs, "tcp", psk_file, front=["--forward", f"127.0.0.1:{free_port()}"])
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{smetrics}/", timeout=10)
    assert missing.value.code == 404
    missing.value.close()
    with pytest.raises(urllib.error.HTTPError) as posted:
        urllib.request.urlopen(f"http://127.0.0.1:{smetrics}/metrics", data=b"x", timeout=10)
    assert posted.value.code == 405
    posted.value.close()
    for garbage in (
        b"\x16\x03\x01\x00\xff" + b"\x00" * 300,
        b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 5000,
    ):
        with socket.create_connection(("127.0.0.1", smetrics), timeout=10) as s:
            s.sendall(garbage)
            s.settimeout(10)
            with contextlib.suppress(OSError):
                s.recv(1024)
    request = urllib.request.Request(f"http://127.0.0.1:{smetrics}/metrics", method="HEAD")
    with urllib.request.urlopen(request, timeout=10) as head:
        assert head.status == 200
        assert head.read() == b""
    types, _ = parse(scrape(smetrics))
    assert types["vtunnel_tunnels"] == "gauge"


def test_a_metrics_host_name_is_refused_at_start(procs: Processes, psk_file: Path) -> None:
    proc = procs.start(
        "server", "--listen", f"tcp://127.0.0.1:{free_port()}", "--psk-file", str(psk_file),
        "--metrics", "example.com:9090",
    )  # fmt: skip
    assert proc.wait(timeout=30) == 2
    assert "give an IP address" in procs.output(proc)


def test_a_metrics_port_in_use_stops_the_start_with_one_line(procs: Processes, psk_file: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = procs.start(
            "server", "--listen", f"tcp://127.0.0.1:{free_port()}", "--psk-file", str(psk_file),
            "--metrics", f"127.0.0.1:{port}",
        )  # fmt: skip
        assert proc.wait(timeout=30) == 1
    assert "cannot start" in procs.output(proc)
