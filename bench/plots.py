"""PNG plots of a result document (matplotlib, Agg backend): goodput vs loss, latency CDFs, bulk goodput."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from bench.stats import cdf_points

__all__ = ["plot_all"]

_DPI = 90


def _systems(doc: Mapping[str, Any]) -> list[str]:
    return [s["name"] for s in doc["systems"]]


def _loss_series(
    ax: Any, doc: Mapping[str, Any], series: Mapping[str, list[tuple[float, float, float, float]]]
) -> None:
    """One line per system (report order) of (loss, median, min, max) points, with min-max error bars."""
    for system in _systems(doc):
        points = sorted(series.get(system, []))
        if not points:
            continue
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        err = [[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=system)
    ax.set_xlabel("packet loss each way (%)")


def _goodput_vs_loss(doc: Mapping[str, Any], path: Path) -> bool:
    series: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    for scen, systems in doc["summary"].items():
        if not scen.startswith("bulk-loss@"):
            continue
        loss = float(scen.split("@")[1].rstrip("%"))
        for system, metrics in systems.items():
            g = metrics.get("goodput_MBps")
            if g:
                series[system].append((loss, g["median"], g["min"], g["max"]))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    _loss_series(ax, doc, series)
    ax.set_ylabel("goodput (MB/s, median, min-max)")
    ax.set_title("Bulk goodput vs loss (veth between namespaces, nftables drop)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return True


def _rudp_vs_loss(doc: Mapping[str, Any], path: Path, prefix: str, link: str) -> bool:
    """The rudp comparison (the ``PREFIX-N`` scenarios: ``rudp-loss-N`` through the relay, ``rudp-veth-N`` on
    the veth link): goodput, and the wire bytes beyond the payload per payload byte, against loss."""
    series: dict[str, dict[str, list[tuple[float, float, float, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for scen, systems in doc["summary"].items():
        if not scen.startswith(prefix):
            continue
        loss = float(scen.removeprefix(prefix))
        for system, metrics in systems.items():
            for metric in ("goodput_MBps", "wire_excess"):
                m = metrics.get(metric)
                if m:
                    series[metric][system].append((loss, m["median"], m["min"], m["max"]))
    if not series:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    titles = {
        "goodput_MBps": ("goodput (MB/s, median, min-max)", f"Bulk goodput vs loss, {link}"),
        "wire_excess": (
            "wire bytes beyond the payload per payload byte",
            "Resends, headers and ACKs (both ways) vs loss",
        ),
    }
    for ax, (metric, (label, title)) in zip(axes, titles.items(), strict=True):
        _loss_series(ax, doc, series[metric])
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return True


def _latency_cdf(doc: Mapping[str, Any], scenario: str, path: Path, title: str) -> bool:
    pooled: dict[str, list[float]] = defaultdict(list)
    for s in doc["samples"]:
        if s["scenario"] == scenario and s["ok"]:
            pooled[s["system"]].extend(v / 1e3 for v in s["raw"].get("samples_ns", []))
    if not pooled:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for system in _systems(doc):
        values = pooled.get(system)
        if not values:
            continue
        xs, ys = cdf_points(values, max_points=300)
        ax.plot(xs, ys, label=system)
    ax.set_xscale("log")
    ax.set_xlabel("latency (us, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return True


def _bulk_bars(doc: Mapping[str, Any], path: Path) -> bool:
    scens = [s for s in ("bulk-1", "bulk-16") if s in doc["summary"]]
    if not scens:
        return False
    systems = [s for s in _systems(doc) if any(s in doc["summary"][sc] for sc in scens)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / len(scens)
    for i, scen in enumerate(scens):
        xs, ys, lo, hi = [], [], [], []
        for j, system in enumerate(systems):
            g = doc["summary"][scen].get(system, {}).get("goodput_MBps")
            if g is None:
                continue
            xs.append(j + i * width)
            ys.append(g["median"])
            lo.append(g["median"] - g["min"])
            hi.append(g["max"] - g["median"])
        ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=3, label=scen)
    ax.set_xticks([j + width * (len(scens) - 1) / 2 for j in range(len(systems))])
    ax.set_xticklabels(systems, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("goodput (MB/s, median, min-max)")
    ax.set_title("Bulk goodput on loopback")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return True


def plot_all(doc: Mapping[str, Any], out_dir: Path, *, prefix: str = "") -> list[str]:
    """Write every plot the document has data for (file names start with ``prefix``); returns the paths
    written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    jobs: list[tuple[str, Callable[[Path], bool]]] = [
        ("goodput-vs-loss.png", lambda p: _goodput_vs_loss(doc, p)),
        ("bulk-goodput.png", lambda p: _bulk_bars(doc, p)),
        ("rudp-vs-loss.png", lambda p: _rudp_vs_loss(doc, p, "rudp-loss-", "relay, 20 ms RTT")),
        ("rudp-veth-vs-loss.png", lambda p: _rudp_vs_loss(doc, p, "rudp-veth-", "veth, 25 MB/s")),
        ("latency-cdf-rr.png", lambda p: _latency_cdf(doc, "rr-64", p, "64 B request/response latency CDF")),
        (
            "latency-cdf-rr-impaired.png",
            lambda p: _latency_cdf(
                doc, "rr-impaired", p, "64 B request/response through the impaired UDP relay"
            ),
        ),
        (
            "latency-cdf-ttfb.png",
            lambda p: _latency_cdf(doc, "ttfb", p, "Time to first byte CDF (new connection)"),
        ),
    ]
    for name, make in jobs:
        path = out_dir / f"{prefix}{name}"
        if make(path):
            written.append(str(path))
        elif path.exists():
            path.unlink()
    return written
