"""Result document (JSON), summaries, ratios, targets and the markdown summary.

The JSON keeps every raw sample; the summary gives the median and min-max range over the rounds of each
headline metric; ratios compare each system with kcptun and with the direct connection; targets say whether
vtunnel's goals are met. Only measured numbers appear: a missing measurement is reported as missing, never
estimated.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import RESULT_SCHEMA_VERSION
from bench.scenarios import Scenario
from bench.stats import Summary, ratio, summarize
from bench.systems import SystemSpec, kcptun_version, shadowsocks_version, vtunnel_version

__all__ = [
    "HEADLINE",
    "REQUIRED_KEYS",
    "Target",
    "build_document",
    "evaluate_targets",
    "machine_description",
    "render_markdown",
    "scenario_key",
    "source_text",
    "validate_document",
    "vtunnel_source",
]

#: Headline metrics per scenario kind: (metric, unit label, True when higher is better).
HEADLINE: Mapping[str, tuple[tuple[str, str, bool], ...]] = {
    "bulk": (
        ("goodput_MBps", "MB/s", True),
        ("cpu_s_per_GB", "CPU s/GB, agent+server", False),
        ("workload_cpu_s_per_GB", "CPU s/GB, load generator + sink", False),
    ),
    "bulk_loss": (("goodput_MBps", "MB/s", True),),
    "bulk_wire": (
        ("goodput_MBps", "MB/s", True),
        ("wire_per_payload", "wire B per payload B", False),
        ("wire_excess", "wire B beyond the payload per payload B", False),
    ),
    "fairness": (
        ("jain", "Jain's index", True),
        ("first_MBps", "MB/s, first flow", True),
        ("second_MBps", "MB/s, second flow", True),
    ),
    "rr": (("p50_us", "us", False), ("p99_us", "us", False), ("p999_us", "us", False)),
    "ttfb": (("p50_ms", "ms", False), ("p99_ms", "ms", False)),
    "idle_cpu": (("agent_pct", "% core", False), ("server_pct", "% core", False)),
    "idle_streams": (("per_stream_bytes", "B/stream", False),),
    "tunnels": (("per_tunnel_bytes", "B/tunnel", False),),
    "scaling": (
        ("goodput_MBps_1w", "MB/s, 1 worker", True),
        ("goodput_MBps_2w", "MB/s, 2 workers", True),
        ("server_cpu_s_per_GB_1w", "server CPU s/GB, 1 worker", False),
        ("server_cpu_s_per_GB_2w", "server CPU s/GB, 2 workers", False),
    ),
    "stalled": (
        ("goodput_ratio", "x of none stalled", True),
        ("goodput_MBps", "MB/s", True),
        ("clean_goodput_MBps", "MB/s, none stalled", True),
        ("server_rss_growth_bytes", "B", False),
        ("agent_rss_growth_bytes", "B", False),
    ),
    "ttfb_spliced": (
        ("spliced_p50_ms", "ms, splice mode", False),
        ("spliced_p99_ms", "ms, splice mode", False),
        ("muxed_p50_ms", "ms, muxed", False),
        ("muxed_p99_ms", "ms, muxed", False),
        ("spliced_cpu_ms_per_conn", "ms CPU/conn, spliced agent+server", False),
    ),
    "https_lite": (
        ("lite_goodput_MBps", "MB/s, lite-tls muxed", True),
        ("spliced_goodput_MBps", "MB/s, lite-tls spliced", True),
        ("off_goodput_MBps", "MB/s, lite-tls off", True),
        ("direct_goodput_MBps", "MB/s, direct", True),
        ("keyless_goodput_MBps", "MB/s, the tunnel with no key", True),
        ("lite_over_off", "x, muxed / off", True),
        ("keyless_over_off", "x, no key / off: the ceiling of muxed / off", True),
        ("lite_over_keyless", "x, muxed / no key", True),
        ("spliced_over_direct", "x, spliced / direct", True),
        ("spliced_over_off", "x, spliced / off", True),
        ("lite_cpu_ms_per_MB", "ms CPU/MB, muxed", False),
        ("spliced_cpu_ms_per_MB", "ms CPU/MB, spliced", False),
        ("off_cpu_ms_per_MB", "ms CPU/MB, off", False),
        ("keyless_cpu_ms_per_MB", "ms CPU/MB, no key", False),
        ("lite_agent_cpu_s_per_GB", "agent CPU s/GB, muxed", False),
        ("lite_server_cpu_s_per_GB", "server CPU s/GB, muxed", False),
        ("spliced_agent_cpu_s_per_GB", "agent CPU s/GB, spliced", False),
        ("spliced_server_cpu_s_per_GB", "server CPU s/GB, spliced", False),
        ("off_agent_cpu_s_per_GB", "agent CPU s/GB, off", False),
        ("off_server_cpu_s_per_GB", "server CPU s/GB, off", False),
    ),
}

#: The systems every other is compared with, in the scenarios that run them.
BASELINES: tuple[str, ...] = ("kcptun", "direct", "shadowsocks")

REQUIRED_KEYS = (
    "schema",
    "mode",
    "started",
    "finished",
    "machine",
    "rounds",
    "systems",
    "skipped_systems",
    "scenarios",
    "notes",
    "samples",
    "summary",
    "ratios",
    "targets",
    "saturation",
)


def scenario_key(scenario: str, loss: float | None) -> str:
    """``bulk-loss@1%`` for a loss level, else the scenario name."""
    return scenario if loss is None else f"{scenario}@{loss * 100:g}%"


def vtunnel_source(where: Path | None = None) -> dict[str, object]:
    """Where the measured vtunnel code comes from (``where``: its package directory; default: the one this
    interpreter imports): the directory, its git commit and whether it has local edits."""
    import subprocess

    if where is None:
        try:
            import vtunnel
        except ImportError:
            return {}
        where = Path(vtunnel.__file__).resolve().parent
    info: dict[str, object] = {"path": str(where)}
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            info["commit"] = commit.stdout.strip()
            status = subprocess.run(
                ["git", "-C", str(where), "status", "--porcelain", "--", "."],
                capture_output=True,
                text=True,
                timeout=10,
            )
            info["local_edits"] = bool(status.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def machine_description() -> dict[str, object]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {
        "vtunnel": vtunnel_version(),
        "kcptun": kcptun_version(),
        "shadowsocks-libev": shadowsocks_version(),
    }
    try:
        from importlib.metadata import PackageNotFoundError, version

        for pkg in ("uvloop", "anyio", "siokcp"):
            try:
                versions[pkg] = version(pkg)
            except PackageNotFoundError:
                versions[pkg] = None
    except ImportError:
        pass
    return {
        "vtunnel_source": vtunnel_source(),
        "cpu_model": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def _summaries(
    samples: Sequence[Mapping[str, Any]],
) -> dict[str, dict[str, dict[str, dict[str, float | int]]]]:
    grouped: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in samples:
        if not s["ok"]:
            continue
        key = (scenario_key(s["scenario"], s["loss"]), s["system"])
        for metric, value in s["metrics"].items():
            grouped[key][metric].append(float(value))
    out: dict[str, dict[str, dict[str, dict[str, float | int]]]] = defaultdict(dict)
    for (scen, system), metrics in grouped.items():
        out[scen][system] = {m: summarize(v).as_dict() for m, v in metrics.items()}
    return dict(out)


def _median(summary: Mapping[str, Any], scen: str, system: str, metric: str) -> float | None:
    try:
        return float(summary[scen][system][metric]["median"])
    except KeyError:
        return None


def _ratios(
    summary: Mapping[str, Any], compare: Mapping[str, str] | None = None
) -> dict[str, dict[str, dict[str, dict[str, float | None]]]]:
    """Each system's medians against kcptun's and the direct connection's; with ``compare``, also each system
    against its twin at the other commit (``vs_ref``: this code / that code; ``None`` on the twins' own rows)."""
    out: dict[str, dict[str, dict[str, dict[str, float | None]]]] = {}
    suffix = f"@{compare['short']}" if compare else None
    for scen, systems in summary.items():
        out[scen] = {}
        for system, metrics in systems.items():
            out[scen][system] = {}
            for metric, values in metrics.items():
                entry = {
                    f"vs_{baseline}": ratio(values["median"], _median(summary, scen, baseline, metric))
                    for baseline in BASELINES
                }
                if suffix is not None:
                    other = None if "@" in system else _median(summary, scen, system + suffix, metric)
                    entry["vs_ref"] = ratio(values["median"], other)
                out[scen][system][metric] = entry
    return out


@dataclass(frozen=True, kw_only=True, slots=True)
class Target:
    """A goal: ``metric`` of ``scenario`` for each of ``systems`` compared with ``reference`` (another system's
    median in the same scenario), with the same system in ``reference_scenario``, or with nothing (an absolute
    bound)."""

    name: str
    scenario: str
    metric: str
    op: str  # ">=" or "<="
    threshold: float
    #: the systems it applies to, by base name (a twin ``SYSTEM@COMMIT`` is measured against it too); a name
    #: ending in ``-`` stands for every system it starts
    systems: tuple[str, ...]
    reference: str | None = None
    reference_scenario: str | None = None

    def applies_to(self, system: str) -> bool:
        base = system.split("@", 1)[0]
        return any(base == s or (s.endswith("-") and base.startswith(s)) for s in self.systems)


def _kcp_vs_kcptun(scenario: str, streams: str) -> tuple[Target, ...]:
    return (
        Target(
            name=f"bulk over kcp:// >= 4x kcptun ({streams})",
            scenario=scenario,
            metric="goodput_MBps",
            reference="kcptun",
            op=">=",
            threshold=4.0,
            systems=("vtunnel-kcp",),
        ),
        Target(
            name=f"bulk over kcp:// with the key >= 3x kcptun ({streams})",
            scenario=scenario,
            metric="goodput_MBps",
            reference="kcptun",
            op=">=",
            threshold=3.0,
            systems=("vtunnel-kcp+psk",),
        ),
    )


def _rudp_targets() -> tuple[Target, ...]:
    """rudp://'s goals against kcp:// in the same run: bulk and round trip on loopback, bulk on the lossless
    links, goodput and wire bytes at 2% loss (relay at 20 ms RTT, veth at its rate limit), and two flows'
    fairness. The wire bytes beyond the
    payload (resends, headers, ACKs) hold the waste and also the resends any sender needs, so the bound is
    stricter than one on waste alone (which only the simulator tells apart: ``python -m bench.rudp_sim``)."""
    rudp = ("vtunnel-rudp",)
    targets = [
        Target(
            name="bulk over rudp:// >= kcp:// (1 stream, loopback)",
            scenario="bulk-1",
            metric="goodput_MBps",
            reference="vtunnel-kcp",
            op=">=",
            threshold=1.0,
            systems=rudp,
        ),
        Target(
            name="64 B request/response over rudp:// p50 <= kcp://'s",
            scenario="rr-64",
            metric="p50_us",
            reference="vtunnel-kcp",
            op="<=",
            threshold=1.0,
            systems=rudp,
        ),
        Target(
            name="two rudp:// flows on one bottleneck: Jain's index >= 0.95",
            scenario="rudp-fair",
            metric="jain",
            op=">=",
            threshold=0.95,
            systems=rudp,
        ),
    ]
    for prefix, link in (("rudp-loss", "relay, 20 ms RTT"), ("rudp-veth", "veth, rate-limited")):
        targets += [
            Target(
                name=f"bulk over rudp:// at 0% loss ({link}) >= kcp://",
                scenario=f"{prefix}-0",
                metric="goodput_MBps",
                reference="vtunnel-kcp",
                op=">=",
                threshold=1.0,
                systems=rudp,
            ),
            Target(
                name=f"bulk over rudp:// at 2% loss ({link}) >= 1.2x kcp://",
                scenario=f"{prefix}-2",
                metric="goodput_MBps",
                reference="vtunnel-kcp",
                op=">=",
                threshold=1.2,
                systems=rudp,
            ),
            Target(
                name=f"rudp:// wire bytes beyond the payload at 2% loss ({link}) <= 0.5x kcp://'s",
                scenario=f"{prefix}-2",
                metric="wire_excess",
                reference="vtunnel-kcp",
                op="<=",
                threshold=0.5,
                systems=rudp,
            ),
        ]
    return tuple(targets)


#: The product's goals (README "Targets"): ratios to a baseline measured in the same run, or absolute bounds.
TARGETS: tuple[Target, ...] = (
    *_kcp_vs_kcptun("bulk-1", "1 stream"),
    *_kcp_vs_kcptun("bulk-16", "16 streams"),
    Target(
        name="bulk over kcp:// at 2% loss through the relay >= 2x kcptun",
        scenario="bulk-impaired",
        metric="goodput_MBps",
        reference="kcptun",
        op=">=",
        threshold=2.0,
        systems=("vtunnel-kcp", "vtunnel-kcp+psk"),
    ),
    Target(
        name="bulk over tcp:// multiplexed (16 streams) >= 0.6x direct",
        scenario="bulk-16",
        metric="goodput_MBps",
        reference="direct",
        op=">=",
        threshold=0.6,
        systems=("vtunnel-tcp",),
    ),
    Target(
        name="bulk over tcp:// multiplexed (16 streams) with the key >= 0.5x direct",
        scenario="bulk-16",
        metric="goodput_MBps",
        reference="direct",
        op=">=",
        threshold=0.5,
        systems=("vtunnel-tcp+psk",),
    ),
    Target(
        name="64 B request/response over kcp:// p50 <= 0.8x kcptun",
        scenario="rr-64",
        metric="p50_us",
        reference="kcptun",
        op="<=",
        threshold=0.8,
        systems=("vtunnel-kcp",),
    ),
    Target(
        name="64 B request/response over kcp:// p99 <= kcptun",
        scenario="rr-64",
        metric="p99_us",
        reference="kcptun",
        op="<=",
        threshold=1.0,
        systems=("vtunnel-kcp",),
    ),
    Target(
        name="SOCKS5 bulk over tcp:// with the key >= shadowsocks-libev aes-256-gcm",
        scenario="socks5-bulk",
        metric="goodput_MBps",
        reference="shadowsocks",
        op=">=",
        threshold=1.0,
        systems=("vtunnel-tcp+psk",),
    ),
    Target(
        name="SOCKS5 bulk over tcp:// with the key: CPU per GB <= shadowsocks-libev aes-256-gcm",
        scenario="socks5-bulk",
        metric="cpu_s_per_GB",
        reference="shadowsocks",
        op="<=",
        threshold=1.0,
        systems=("vtunnel-tcp+psk",),
    ),
    Target(
        name="1,024 concurrent bulk streams in one kcp:// tunnel >= 0.8x 16 streams (aggregate)",
        scenario="bulk-1024",
        metric="goodput_MBps",
        reference_scenario="bulk-16",
        op=">=",
        threshold=0.8,
        systems=("vtunnel-kcp", "vtunnel-kcp+psk"),
    ),
    Target(
        name="idle, one open stream: agent <= 0.2% of a core",
        scenario="idle-cpu",
        metric="agent_pct",
        op="<=",
        threshold=0.2,
        systems=("vtunnel-",),
    ),
    Target(
        name="idle, one open stream: server <= 0.2% of a core",
        scenario="idle-cpu",
        metric="server_pct",
        op="<=",
        threshold=0.2,
        systems=("vtunnel-",),
    ),
    Target(
        name="1 stream while 32 of its tunnel stall >= 0.5x its goodput with none stalled",
        scenario="stalled",
        metric="goodput_ratio",
        op=">=",
        threshold=0.5,
        systems=("vtunnel-",),
    ),
    Target(
        name="server RSS growth while 32 streams stall <= 32 MiB (receive bound 16.5 MiB, and the process)",
        scenario="stalled",
        metric="server_rss_growth_bytes",
        op="<=",
        threshold=32.0 * 1024 * 1024,
        systems=("vtunnel-",),
    ),
    Target(
        name="agent RSS growth while 32 streams stall <= 32 MiB",
        scenario="stalled",
        metric="agent_rss_growth_bytes",
        op="<=",
        threshold=32.0 * 1024 * 1024,
        systems=("vtunnel-",),
    ),
    Target(
        name="HTTPS through lite-tls muxed >= 1.5x lite-tls off",
        scenario="https-lite",
        metric="lite_over_off",
        op=">=",
        threshold=1.5,
        systems=("vtunnel-tcp+psk",),
    ),
    Target(
        name="HTTPS through lite-tls spliced >= 0.8x direct",
        scenario="https-lite",
        metric="spliced_over_direct",
        op=">=",
        threshold=0.8,
        systems=("vtunnel-tcp+psk",),
    ),
    Target(
        name="HTTPS through lite-tls spliced over kcp:// (a keyless conversation) >= 1.5x lite-tls off",
        scenario="https-lite-kcp",
        metric="spliced_over_off",
        op=">=",
        threshold=1.5,
        systems=("vtunnel-kcp+psk",),
    ),
    *_rudp_targets(),
    Target(
        name="idle streams in one tunnel <= 4 KiB each",
        scenario="idle-streams",
        metric="per_stream_bytes",
        op="<=",
        threshold=4096.0,
        systems=("vtunnel-",),
    ),
)


def evaluate_targets(
    summary: Mapping[str, Any], systems: Iterable[str], scenarios: Iterable[str] | None = None
) -> list[dict[str, object]]:
    """Each target for each matching system: the measured value (ratio or absolute) and whether it is met.
    With ``scenarios``, only the targets of those scenarios (the ones a run selected)."""
    rows: list[dict[str, object]] = []
    names = list(systems)
    selected = None if scenarios is None else set(scenarios)
    for target in TARGETS:
        if selected is not None and target.scenario not in selected:
            continue
        for system in (n for n in names if target.applies_to(n)):
            value = _median(summary, target.scenario, system, target.metric)
            if target.reference is not None:
                value = ratio(value, _median(summary, target.scenario, target.reference, target.metric))
            elif target.reference_scenario is not None:
                value = ratio(value, _median(summary, target.reference_scenario, system, target.metric))
            if value is None and target.scenario not in summary:
                continue  # the run measured nothing of this scenario for anyone
            met: bool | None = None
            if value is not None:
                met = value >= target.threshold if target.op == ">=" else value <= target.threshold
            rows.append(
                {
                    "target": target.name,
                    "system": system,
                    "scenario": target.scenario,
                    "metric": target.metric,
                    "reference": target.reference or target.reference_scenario,
                    "value": value,
                    "op": target.op,
                    "threshold": target.threshold,
                    "met": met,
                }
            )
    return rows


def _saturation(samples: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> list[str]:
    """Where the measured link or a process, not the system, may have been the limit."""
    notes: list[str] = []
    busy: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    machine: dict[tuple[str, str], list[float]] = defaultdict(list)
    for s in samples:
        if not s["ok"]:
            continue
        key = scenario_key(s["scenario"], s["loss"])
        for role, cpu in (s["raw"].get("cpu") or {}).items():
            if s["scenario"] != "idle-cpu":
                busy[(key, s["system"], role)].append(float(cpu["pct"]))
        if "machine_busy_pct" in s["raw"]:
            machine[(key, s["system"])].append(float(s["raw"]["machine_busy_pct"]))
        relay = s["raw"].get("relay") or {}
        counts = [d for d in relay.values() if isinstance(d, dict)]
        queue_dropped = sum(int(d.get("queue_dropped", 0)) for d in counts)
        received = sum(int(d.get("received", 0)) for d in counts)
        if queue_dropped:
            share = queue_dropped / received if received else 1.0
            notes.append(
                f"{key} {s['system']} round {s['round'] + 1}: the relay's rate limiter dropped {queue_dropped} "
                f"of {received} datagrams ({share:.2%}): the sender's bursts overran the emulated link's rate "
                "and queue"
            )
    for (key, system, role), values in sorted(busy.items()):
        peak = max(values)
        if peak >= 90.0:
            notes.append(f"{key} {system}: the {role} process used up to {peak:.0f}% of a core (CPU-bound)")
    for (key, system), values in sorted(machine.items()):
        peak = max(values)
        if peak >= 80.0:
            notes.append(
                f"{key} {system}: the machine's cores were up to {peak:.0f}% busy (the system's processes, the "
                "relay where there is one, the load generator and its sink together): they shared the cores, so "
                "goodput reads what all of them cost"
            )
    # Loss does not shrink the link: its capacity is the direct connection's goodput on the loss-free link.
    link = _median(summary, "bulk-loss@0%", "direct", "goodput_MBps")
    for scen, systems in summary.items():
        if not scen.startswith("bulk-loss@"):
            continue
        for system in systems:
            value = _median(summary, scen, system, "goodput_MBps")
            if system != "direct" and link and value and value >= 0.9 * link:
                notes.append(
                    f"{scen} {system}: {value:.1f} MB/s is within 10% of the loss-free link's measured rate "
                    f"({link:.1f} MB/s, direct): the link, not the tunnel, may be the limit"
                )
    return notes


def link_description(scenario: Scenario) -> str:
    """What the scenario's link is and what bounds its rate."""
    if scenario.link == "netns" and scenario.netns_rate is not None:
        return (
            "veth pair between two network namespaces made by the harness, offloads off, no added delay (no "
            f"netem here): tbf {scenario.netns_rate / 1e6:g} MB/s each way through a 256 KiB queue, nftables "
            f"random drop {(scenario.netns_loss or 0) * 100:g}% each way; wire bytes counted by nftables as "
            "each end sends them, less 28 bytes of IP and UDP header a packet"
        )
    if scenario.link == "netns":
        return (
            "veth pair between two network namespaces made by the harness, nftables random drop in each "
            "direction, offloads off, no added delay; its rate is the direct connection's goodput without loss"
        )
    if scenario.link == "relay":
        options = list(scenario.relay_options)
        if "--stats-interval" in options:
            at = options.index("--stats-interval")
            del options[at : at + 2]
        return "vtunnel's userspace UDP impairment relay on loopback, each direction: " + " ".join(options)
    if scenario.socks:
        return "loopback, not shaped; clients connect through the client side's SOCKS5 proxy"
    if scenario.kind in ("idle_cpu", "idle_streams", "tunnels"):
        return "loopback; no traffic to speak of, so the link plays no part"
    return "loopback, not shaped; the direct connection's result is the link's measured rate"


def build_document(
    *,
    mode: str,
    started: float,
    finished: float,
    rounds: int,
    loss_levels: Sequence[float],
    systems: Sequence[SystemSpec],
    skipped: Mapping[str, str],
    scenarios: Sequence[Scenario],
    quick: bool,
    notes: Sequence[str],
    samples: Sequence[Mapping[str, Any]],
    interrupted: bool = False,
    compare: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The result document; ``compare`` (``RefTree.as_dict()``) describes the commit the ``@`` twins ran."""
    summary = _summaries(samples)
    return {
        "schema": RESULT_SCHEMA_VERSION,
        "mode": mode,
        "interrupted": interrupted,
        "started": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="seconds"),
        "finished": dt.datetime.fromtimestamp(finished, dt.UTC).isoformat(timespec="seconds"),
        "duration_s": round(finished - started, 1),
        "machine": machine_description(),
        "rounds": rounds,
        "loss_levels": list(loss_levels),
        "compare": dict(compare) if compare else None,
        "systems": [
            {
                "name": s.name,
                "kind": s.kind,
                "transport": s.transport,
                "keyed": s.keyed,
                "fec": s.fec,
                "commit": s.ref.commit if s.ref is not None else None,
            }
            for s in systems
        ],
        "skipped_systems": dict(skipped),
        "scenarios": [
            {
                "name": sc.name,
                "kind": sc.kind,
                "description": sc.description,
                "settings": sc.settings(quick=quick),
                "link": sc.link,
                "link_description": link_description(sc),
                "schedule": sc.schedule,
            }
            for sc in scenarios
        ],
        "notes": list(notes),
        "samples": list(samples),
        "summary": summary,
        "ratios": _ratios(summary, compare),
        # (the +fec systems run the FEC comparison alone, which has no target)
        "targets": evaluate_targets(
            summary, [s.name for s in systems if not s.fec], [sc.name for sc in scenarios]
        ),
        "saturation": _saturation(samples, summary),
    }


def validate_document(doc: Mapping[str, Any]) -> list[str]:
    """Problems with a result document's shape (empty when it is well-formed)."""
    problems = [f"missing key {k!r}" for k in REQUIRED_KEYS if k not in doc]
    if problems:
        return problems
    if doc["schema"] != RESULT_SCHEMA_VERSION:
        problems.append(f"schema {doc['schema']} is not {RESULT_SCHEMA_VERSION}")
    for key in ("cpu_model", "cores", "kernel", "python", "versions"):
        if key not in doc["machine"]:
            problems.append(f"machine description lacks {key!r}")
    for i, s in enumerate(doc["samples"]):
        for key in ("scenario", "system", "round", "loss", "ok", "error", "metrics", "raw"):
            if key not in s:
                problems.append(f"sample {i} lacks {key!r}")
        if s.get("ok") and not s.get("metrics"):
            problems.append(f"sample {i} is ok but has no metrics")
        if not s.get("ok") and not s.get("error"):
            problems.append(f"sample {i} failed without an error message")
    for scen, systems in doc["summary"].items():
        for system, metrics in systems.items():
            for metric, summ in metrics.items():
                if not summ["min"] <= summ["median"] <= summ["max"]:
                    problems.append(f"summary {scen}/{system}/{metric}: median outside its range")
    return problems


# -----------------------------------------------------------------------------------------------------
# markdown


def _fmt(value: float | None) -> str:
    """Thousands separators for big numbers, one decimal from 100, three significant digits below."""
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _cell(summ: Mapping[str, Any] | None) -> str:
    if not summ:
        return "-"
    s = Summary(n=int(summ["n"]), median=summ["median"], minimum=summ["min"], maximum=summ["max"])
    if s.n == 1:
        return _fmt(s.median)
    return f"{_fmt(s.median)} ({_fmt(s.minimum)}-{_fmt(s.maximum)})"


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def source_text(source: Mapping[str, Any]) -> str:
    """`` (commit 0123456789)``, with ``, with local edits`` where the tree had them; empty without a commit."""
    commit = source.get("commit")
    if not commit:
        return ""
    return f" (commit {str(commit)[:10]}{', with local edits' if source.get('local_edits') else ''})"


def _scenario_table(
    doc: Mapping[str, Any], key: str, headline: Sequence[tuple[str, str, bool]], systems: Sequence[str]
) -> list[str]:
    compare = doc.get("compare")
    present = doc["summary"][key]
    references = [(f"vs_{baseline}", f"vs {baseline}") for baseline in BASELINES if baseline in present]
    if compare:
        references.append(("vs_ref", f"vs @{compare['short']}"))
    header = ["system"]
    for metric, unit, _ in headline:
        header += [f"{metric} ({unit})", *(label for _, label in references)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for system in systems:
        metrics = present.get(system)
        if metrics is None:
            continue
        row = [system]
        for metric, _, _ in headline:
            ratios = doc["ratios"][key][system].get(metric, {})
            row += [_cell(metrics.get(metric)), *(_ratio_text(ratios.get(k)) for k, _ in references)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _levels_table(
    doc: Mapping[str, Any], keys: Sequence[str], metric: str, unit: str, systems: Sequence[str]
) -> list[str]:
    """One row per system, one column per level (``scenario@level``): median (min-max), then vs kcptun."""
    levels = [k.split("@", 1)[1] if "@" in k else "-" for k in keys]
    header = ["system"] + [f"{lvl}: {unit}" for lvl in levels] + [f"{lvl}: vs kcptun" for lvl in levels]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for system in systems:
        if not any(system in doc["summary"][k] for k in keys):
            continue
        cells = [_cell(doc["summary"][k].get(system, {}).get(metric)) for k in keys]
        ratios = [
            _ratio_text(doc["ratios"][k].get(system, {}).get(metric, {}).get("vs_kcptun")) for k in keys
        ]
        lines.append("| " + " | ".join([system, *cells, *ratios]) + " |")
    return lines


def _targets_table(doc: Mapping[str, Any]) -> list[str]:
    lines = ["## Targets", "", "| target | system | measured | goal | met |", "|---|---|---|---|---|"]
    for t in doc["targets"]:
        unit = "x" if t["reference"] else ""
        measured = "-" if t["value"] is None else f"{t['value']:.3g}{unit}"
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(
            f"| {t['target']} | {t['system']} | {measured} | {t['op']} {t['threshold']:g}{unit} | {met} |"
        )
    return [*lines, ""]


def render_markdown(doc: Mapping[str, Any], *, plots: Sequence[str] = ()) -> str:
    m = doc["machine"]
    v = m["versions"]
    lines = [
        "# vtunnel benchmark results",
        "",
        f"Mode **{doc['mode']}**, {doc['rounds']} alternated rounds, {doc['started']} "
        f"({doc['duration_s']} s)."
        + (" **Interrupted: partial results.**" if doc.get("interrupted") else ""),
        f"Machine: {m['cpu_model']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}; "
        f"vtunnel {v.get('vtunnel') or 'not installed'}{source_text(m.get('vtunnel_source') or {})}, "
        f"kcptun {v.get('kcptun') or 'not installed'}, "
        f"shadowsocks-libev {v.get('shadowsocks-libev') or 'not installed'}.",
        "",
        "Cells: median over the rounds (min-max). Ratios compare medians. kcptun runs fast3, windows 1024, "
        "no crypt, no compression, no FEC; vtunnel-kcptun is a vtunnel agent (`--peer kcptun`, the same options "
        "as kcp:// query) in place of kcptun-client, against the same kcptun-server; shadowsocks-libev runs "
        "aes-256-gcm (SOCKS5 scenarios only); `+psk` is "
        "vtunnel with its pre-shared key (authenticated encryption). CPU s/GB is the CPU time of both ends of "
        "the tunnel (agent and server, or ss-local and ss-server) per GB delivered.",
        "",
    ]
    compare = doc.get("compare")
    if compare:
        lines += [
            f"`SYSTEM@{compare['short']}` is the same system running the vtunnel code of commit "
            f"{compare['commit']} (`--compare-ref {compare['ref']}`), same Python and venv, alternated with it "
            f"round by round; `vs @{compare['short']}` is this code's median / that code's.",
            "",
        ]
    system_names = [s["name"] for s in doc["systems"]]
    lines += _targets_table(doc)
    for sc in doc["scenarios"]:
        headline = HEADLINE.get(sc["kind"], ())
        keys = [k for k in doc["summary"] if k == sc["name"] or k.startswith(sc["name"] + "@")]
        if not headline or not keys:
            continue
        lines += [f"## {sc['name']}: {sc['description']}", "", f"Link: {sc.get('link_description', '')}.", ""]
        if len(keys) > 1 or "@" in keys[0]:
            lines += _levels_table(doc, keys, headline[0][0], headline[0][1], system_names)
        else:
            lines += _scenario_table(doc, keys[0], headline, system_names)
        lines.append("")
    failures = [s for s in doc["samples"] if not s["ok"]]
    extra = list(doc["notes"]) + list(doc["saturation"])
    extra += [f"{name} skipped: {why}" for name, why in doc["skipped_systems"].items()]
    extra += [
        f"{scenario_key(s['scenario'], s['loss'])} {s['system']} round {s['round'] + 1} failed: "
        + " ".join(str(s["error"]).split())[:300]
        for s in failures
    ]
    if extra:
        lines += ["## Notes", ""] + [f"- {n}" for n in extra] + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(lines)


def write_results(
    doc: Mapping[str, Any], out_dir: Path, *, plots: Sequence[str] = (), name: str = "latest"
) -> tuple[Path, Path]:
    """``NAME.json`` and ``NAME.md`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    md_path = out_dir / f"{name}.md"
    json_path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    md_path.write_text(render_markdown(doc, plots=plots))
    return json_path, md_path
