"""Prometheus metrics of an agent or a server: ``--metrics HOST:PORT`` serves them at ``/metrics``.

Nothing here runs on the data path. What the tunnels already count (a :class:`TunnelConnection`'s bytes, its
streams, its link's :meth:`~vtunnel.transports.link.Link.stats`, a listener's
:class:`~vtunnel.transports.link.Refusals`, a dialer's failures) is read when Prometheus scrapes, by one custom
collector (:class:`TunnelCollector`) from the :class:`~vtunnel.apps.stats.ProcessStats` the agent or server
keeps (its live tunnels, the totals of ended ones, the streams opened by kind).

Each process has its own :class:`~prometheus_client.CollectorRegistry` (:func:`make_registry`), never the global
one, so several agents and servers can live in one process (tests). No label carries a key, an address or a
destination: labels are the transport's scheme, a stream's kind, a fixed reason word, the process's own serial
number of a tunnel, a server's tunnel's user (a name the operator gave a key: ``--user-keys``), the role and the
version.

The endpoint (:func:`serve_metrics`) is a small HTTP/1.1 server (h11) on the process's event loop, bound to the
address given: a bare port or a host name other than ``localhost`` is not taken as a wish to serve the network
(:func:`parse_metrics_address`), only a literal IP address is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from typing import Final

import anyio
import h11
import structlog
from anyio.abc import ByteStream, SocketAttribute
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from vtunnel import __version__
from vtunnel.apps.agent import parse_hostport
from vtunnel.apps.stats import NO_KIND, ProcessStats, TransportTotals
from vtunnel.io.listening import open_stream_listener

__all__ = [
    "METRICS_PATH",
    "MetricsAddressError",
    "TunnelCollector",
    "make_registry",
    "parse_metrics_address",
    "serve_metrics",
]

log = structlog.get_logger("vtunnel.metrics")

METRICS_PATH = "/metrics"
#: how long one scrape connection may take, and how many may be open at once
_REQUEST_TIMEOUT = 10.0
_MAX_CONNECTIONS = 16
_MAX_REQUEST_HEAD = 16 * 1024


class MetricsAddressError(ValueError):
    """The ``--metrics`` address is unusable; the message says why."""


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or a bare ``PORT`` (127.0.0.1) as the metrics endpoint's bind address.

    Loopback is the default and ``localhost`` means 127.0.0.1. Any other place must be a literal IP address
    (``0.0.0.0:9090``, ``[::]:9090``, ``10.0.0.5:9090``): a host name is refused, since what it resolves to,
    and so who can read the metrics, is not written where the operator can see it.
    """
    try:
        host, port = parse_hostport(text, default_host="127.0.0.1")
    except ValueError as exc:
        raise MetricsAddressError(f"metrics address: {exc}") from None
    if host.lower() == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise MetricsAddressError(
            f"metrics address {text!r}: give an IP address (127.0.0.1:PORT for this host only, or the address "
            "of the interface to serve, such as 0.0.0.0:PORT), not a host name"
        ) from None
    return host, port


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


#: the per-transport counters, in the order of :class:`TransportTotals`'s fields: name and help
_TRANSPORT_COUNTERS: Final = (
    ("vtunnel_received_bytes", "Tunnel bytes the transport delivered (frames)."),
    ("vtunnel_sent_bytes", "Tunnel bytes given to the transport (frames)."),
    ("vtunnel_retransmitted_packets", "Packets sent again by the ARQ (KCP segments)."),
    ("vtunnel_retransmitted_bytes", "Stream bytes sent again by the ARQ (rudp)."),
    ("vtunnel_lost_packets", "Packets the ARQ declared lost (rudp)."),
)


class TunnelCollector(Collector):
    """Builds every ``vtunnel_*`` family from a :class:`ProcessStats` when Prometheus scrapes."""

    def __init__(self, stats: ProcessStats, *, role: str) -> None:
        self._stats = stats
        self._role = role

    def collect(self) -> Iterable[Metric]:
        stats = self._stats
        info = InfoMetricFamily("vtunnel_build", "The vtunnel version and the role of this process.")
        info.add_metric([], {"version": __version__, "role": self._role})
        yield info

        tunnels = GaugeMetricFamily("vtunnel_tunnels", "Tunnels open now.", labels=["transport"])
        opened = CounterMetricFamily(
            "vtunnel_tunnels_opened", "Tunnels started (connected or accepted).", labels=["transport"]
        )
        streams = GaugeMetricFamily("vtunnel_streams", "Tunnel streams open now.", labels=["kind"])
        streams_total = CounterMetricFamily(
            "vtunnel_streams_opened", "Tunnel streams opened.", labels=["kind"]
        )
        counters = [CounterMetricFamily(name, doc, labels=["transport"]) for name, doc in _TRANSPORT_COUNTERS]
        rtt = GaugeMetricFamily(
            "vtunnel_tunnel_rtt_seconds",
            "Smoothed round-trip time of each tunnel's path, where the transport measures it.",
            labels=["transport", "tunnel", "user"],
        )
        rate = GaugeMetricFamily(
            "vtunnel_tunnel_delivery_rate_bytes_per_second",
            "Delivery-rate estimate of each tunnel's path, where the transport's pacer models it.",
            labels=["transport", "tunnel", "user"],
        )

        per_transport: dict[str, TransportTotals] = {}
        live_count: Counter[str] = Counter()
        kinds: Counter[str] = Counter()
        for transport in stats.transports:
            ended = stats.ended(transport)
            per_transport[transport] = dataclasses.replace(ended)
        for conn, transport, serial in stats.live:
            live_count[transport] += 1
            link = per_transport.setdefault(transport, TransportTotals()).add(conn)
            labels = [transport, str(serial), conn.user or ""]  # (no user: an agent's, or a keyless tunnel)
            if link.rtt is not None:
                rtt.add_metric(labels, link.rtt)
            if link.delivery_rate is not None:
                rate.add_metric(labels, link.delivery_rate)
            for stream in list(conn.streams.values()):
                md = stream.metadata
                kinds[md.kind if md is not None and md.kind else NO_KIND] += 1
        for transport in sorted(per_transport):
            totals = per_transport[transport]
            tunnels.add_metric([transport], live_count[transport])
            opened.add_metric([transport], stats.tunnels_opened[transport])
            for family, count in zip(counters, dataclasses.astuple(totals), strict=True):
                family.add_metric([transport], count)
        for kind in sorted(set(kinds) | set(stats.streams_opened)):
            streams.add_metric([kind], kinds[kind])
            streams_total.add_metric([kind], stats.streams_opened[kind])
        yield from (tunnels, opened, streams, streams_total, *counters, rtt, rate)

        failures = CounterMetricFamily(
            "vtunnel_handshake_failures",
            "Peers that began a handshake with a listener and failed it, by reason.",
            labels=["transport", "reason"],
        )
        probes = CounterMetricFamily(
            "vtunnel_probes_refused",
            "Connections and datagrams a listener answered with nothing (or a stateless reset), by reason.",
            labels=["transport", "reason"],
        )
        failed: Counter[tuple[str, str]] = Counter()
        refused: Counter[tuple[str, str]] = Counter()
        for transport, refusals in stats.refusals():  # listeners of one transport add up
            for reason, count in refusals.handshake_failures.items():
                failed[transport, reason] += count
            for reason, count in refusals.probes.items():
                refused[transport, reason] += count
        for family, by_label in ((failures, failed), (probes, refused)):
            for (transport, reason), count in sorted(by_label.items()):
                family.add_metric([transport, reason], count)
        yield failures
        yield probes
        yield from _server_families(stats)

        exits = CounterMetricFamily(
            "vtunnel_exit_refusals",
            "Streams the server did not connect to their destination, by reason (forbidden: the exit policy).",
            labels=["reason"],
        )
        for reason, count in sorted(stats.dial_failures().items()):
            exits.add_metric([reason], count)
        yield exits


def _server_families(stats: ProcessStats) -> Iterable[Metric]:
    """The agent's servers, labelled by their position in its list (never their address) and transport."""
    servers = list(stats.servers())
    if not servers:
        return
    labels = ["server", "transport"]
    up = GaugeMetricFamily(
        "vtunnel_server_up",
        "1 while the agent's last connect and handshake with the server succeeded and no tunnel to it died since.",
        labels=labels,
    )
    held = GaugeMetricFamily(
        "vtunnel_server_tunnels", "Tunnels the agent's pool holds to the server now.", labels=labels
    )
    failed = CounterMetricFamily(
        "vtunnel_server_failures",
        "Connects and handshakes with the server that failed, and tunnels to it that died without a GOAWAY.",
        labels=labels,
    )
    for index, transport, answers, tunnels, failures in servers:
        key = [str(index), transport]
        up.add_metric(key, 1 if answers else 0)
        held.add_metric(key, tunnels)
        failed.add_metric(key, failures)
    yield from (up, held, failed)


def make_registry(stats: ProcessStats, *, role: str) -> CollectorRegistry:
    """A registry of this process's own: the tunnel collector and the process's CPU, memory and descriptors
    (``vtunnel_process_*``). A server's workers each have theirs; their supervisor serves them merged, labelled
    ``worker`` (:mod:`vtunnel.apps.worker_metrics`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TunnelCollector(stats, role=role))
    ProcessCollector(namespace="vtunnel", registry=registry)
    return registry


# --- the endpoint ---------------------------------------------------------------------------------------------


def _response(status: int, body: bytes, content_type: str, *, head: bool) -> list[h11.Event]:
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    reason = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed"}.get(status, b"")
    out: list[h11.Event] = [h11.Response(status_code=status, headers=headers, reason=reason)]
    if body and not head:
        out.append(h11.Data(data=body))
    out.append(h11.EndOfMessage())
    return out


async def _serve_one(stream: ByteStream, registry: CollectorRegistry) -> None:
    """One scrape: one request, one answer, then the connection is closed."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_HEAD)
    request: h11.Request | None = None
    with anyio.move_on_after(_REQUEST_TIMEOUT):
        while request is None:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    conn.receive_data(await stream.receive())
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    conn.receive_data(b"")
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
        method = request.method.decode("ascii", "replace").upper()
        target = request.target.decode("ascii", "replace").split("?", 1)[0]
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            events = _response(405, b"GET /metrics\n", "text/plain; charset=utf-8", head=head)
        elif target != METRICS_PATH:
            events = _response(404, b"not found: GET /metrics\n", "text/plain; charset=utf-8", head=head)
        else:
            accept = ",".join(v.decode("latin-1") for k, v in request.headers if k == b"accept")
            encoder, content_type = choose_encoder(accept)
            events = _response(200, encoder(registry), content_type, head=head)
        await stream.send(b"".join(conn.send(e) or b"" for e in events))


async def _handle(stream: ByteStream, registry: CollectorRegistry, slots: anyio.CapacityLimiter) -> None:
    async with stream:
        try:
            slots.acquire_nowait()
        except anyio.WouldBlock:
            return  # over the cap: closed at once
        try:
            await _serve_one(stream, registry)
        except (
            h11.RemoteProtocolError,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            OSError,
        ) as exc:
            log.debug("metrics request dropped", error=str(exc) or repr(exc))
        except Exception as exc:  # a scrape must never take the process down
            log.warning("metrics request failed", error=repr(exc))
        finally:
            slots.release()


@contextlib.asynccontextmanager
async def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> AsyncIterator[str]:
    """Serve ``registry`` at ``http://HOST:PORT/metrics`` while the block runs; yields the bound address.

    A bind failure (the port in use) raises ``OSError`` before the block starts.
    """
    listener = await open_stream_listener(host, port)  # a supervisor's: the one it bound (io.listening)
    addr = listener.extra(SocketAttribute.local_address)
    shown = f"[{addr[0]}]:{addr[1]}" if ":" in str(addr[0]) else f"{addr[0]}:{addr[1]}"
    if is_loopback(host):
        log.info("metrics", url=f"http://{shown}{METRICS_PATH}")
    else:
        log.warning(
            "metrics served beyond loopback: whoever reaches this address can read them",
            url=f"http://{shown}{METRICS_PATH}",
        )
    slots = anyio.CapacityLimiter(_MAX_CONNECTIONS)

    async def handle(stream: ByteStream) -> None:
        await _handle(stream, registry, slots)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield shown
        finally:
            tg.cancel_scope.cancel()
