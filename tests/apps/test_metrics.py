"""apps.metrics without processes: the bind address rule, per-process registries, and the endpoint on a real
loopback socket."""

from __future__ import annotations

import socket

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vtunnel.apps.dialer import Dialer
from vtunnel.apps.metrics import MetricsAddressError, make_registry, parse_metrics_address, serve_metrics
from vtunnel.apps.policy import ExitPolicy
from vtunnel.apps.stats import ProcessStats


@given(st.integers(min_value=0, max_value=65535))
def test_a_bare_port_is_loopback(port: int) -> None:
    assert parse_metrics_address(str(port)) == ("127.0.0.1", port)
    assert parse_metrics_address(f"localhost:{port}") == ("127.0.0.1", port)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9090", ("127.0.0.1", 9090)),
        ("[::1]:9090", ("::1", 9090)),
        ("0.0.0.0:9090", ("0.0.0.0", 9090)),
        ("[::]:9090", ("::", 9090)),
        ("10.0.0.5:1", ("10.0.0.5", 1)),
    ],
)
def test_a_literal_address_is_taken_as_given(text: str, expected: tuple[str, int]) -> None:
    assert parse_metrics_address(text) == expected


@given(st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True))
def test_a_host_name_is_refused(name: str) -> None:
    if name == "localhost":
        return
    with pytest.raises(MetricsAddressError, match="not a host name"):
        parse_metrics_address(f"{name}:9090")


@pytest.mark.parametrize("text", ["", ":", "127.0.0.1:", "127.0.0.1:99999", "[::1:9090", "[::1]9090", "x"])
def test_malformed_addresses_are_refused(text: str) -> None:
    with pytest.raises(MetricsAddressError):
        parse_metrics_address(text)


def test_two_processes_worth_of_registries_live_side_by_side() -> None:
    first, second = ProcessStats(), ProcessStats()
    first.stream_opened("tcp")
    first.stream_opened(None)
    second.stream_opened("udp")
    dialer = Dialer(ExitPolicy())
    dialer.failures["forbidden"] += 2
    second.watch_dialer(dialer)
    texts = [generate_latest(make_registry(s, role="server")).decode() for s in (first, second)]
    samples = [
        {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(t)
            for s in f.samples
        }
        for t in texts
    ]
    assert samples[0][("vtunnel_streams_opened_total", (("kind", "tcp"),))] == 1
    assert samples[0][("vtunnel_streams_opened_total", (("kind", "none"),))] == 1
    assert ("vtunnel_streams_opened_total", (("kind", "udp"),)) not in samples[0]
    assert samples[1][("vtunnel_streams_opened_total", (("kind", "udp"),))] == 1
    assert samples[1][("vtunnel_exit_refusals_total", (("reason", "forbidden"),))] == 2
    assert ("vtunnel_exit_refusals_total", (("reason", "forbidden"),)) not in samples[0]


@pytest.mark.anyio
async def test_the_endpoint_serves_the_registry_until_the_block_ends() -> None:
    stats = ProcessStats()
    stats.stream_opened("lite-tls")
    registry = make_registry(stats, role="agent")
    async with serve_metrics(registry, "127.0.0.1", 0) as address:
        host, port = address.rsplit(":", 1)
        async with await anyio.connect_tcp(host, int(port)) as s:
            await s.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            with anyio.fail_after(10):
                try:
                    while True:
                        answer += await s.receive()
                except anyio.EndOfStream:
                    pass
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b'vtunnel_streams_opened_total{kind="lite-tls"} 1.0' in body
    assert b'vtunnel_build_info{role="agent"' in body
    with pytest.raises(ConnectionRefusedError):  # closed with the block
        socket.create_connection((host, int(port)), timeout=5).close()
