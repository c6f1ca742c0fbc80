"""Result JSON schema, targets, markdown and plots of the benchmark harness (from synthetic samples)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from bench.plots import plot_all
from bench.report import (
    build_document,
    render_markdown,
    source_text,
    validate_document,
    vtunnel_source,
    write_results,
)
from bench.runner import Sample
from bench.scenarios import SCENARIOS
from bench.systems import SystemSpec

SYSTEMS = [
    SystemSpec(kind="direct"),
    SystemSpec(kind="kcptun"),
    SystemSpec(kind="shadowsocks"),
    SystemSpec(kind="vtunnel", transport="kcp"),
    SystemSpec(kind="vtunnel", transport="tcp", keyed=True),
]


def _samples() -> list[dict[str, Any]]:
    out: list[Sample] = []
    goodput = {"direct": 300.0, "kcptun": 50.0, "vtunnel-kcp": 120.0, "vtunnel-tcp+psk": 200.0}
    p50 = {"direct": 20.0, "kcptun": 400.0, "vtunnel-kcp": 300.0, "vtunnel-tcp+psk": 100.0}
    for r in range(2):
        for name, g in goodput.items():
            for scen in ("bulk-1", "bulk-16"):
                out.append(
                    Sample(
                        scenario=scen,
                        system=name,
                        round=r,
                        metrics={"goodput_MBps": g + r},
                        raw={
                            "cpu": {"agent": {"pct": 95.0 if name == "kcptun" else 40.0}},
                            "machine_busy_pct": 97.0 if name == "vtunnel-kcp" else 60.0,
                        },
                    )
                )
            samples = [int((p50[name] + i) * 1000) for i in range(100)]
            out.append(
                Sample(
                    scenario="rr-64",
                    system=name,
                    round=r,
                    metrics={"p50_us": p50[name], "p99_us": p50[name] * 2, "p999_us": p50[name] * 3},
                    raw={"samples_ns": samples},
                )
            )
            for loss in (0.0, 0.01):
                out.append(
                    Sample(
                        scenario="bulk-loss",
                        system=name,
                        round=r,
                        loss=loss,
                        metrics={"goodput_MBps": g * (1 - loss)},
                    )
                )
    out.append(
        Sample(
            scenario="idle-cpu", system="vtunnel-kcp", round=0, metrics={"agent_pct": 0.1, "server_pct": 0.5}
        )
    )
    out.append(
        Sample(scenario="idle-streams", system="vtunnel-kcp", round=0, metrics={"per_stream_bytes": 3000.0})
    )
    out.append(
        Sample(scenario="ttfb", system="vtunnel-kcp", round=0, error="vtunnel-kcp did not carry an echo")
    )
    for r in range(2):
        out.append(
            Sample(scenario="bulk-1024", system="vtunnel-kcp", round=r, metrics={"goodput_MBps": 84.35 + r})
        )
        for name, g, cpu in (("shadowsocks", 400.0, 2.0), ("vtunnel-tcp+psk", 300.0, 3.0)):
            out.append(
                Sample(
                    scenario="socks5-bulk",
                    system=name,
                    round=r,
                    metrics={"goodput_MBps": g + r, "cpu_s_per_GB": cpu},
                )
            )
    relay = {"up": {"received": 900, "queue_dropped": 9}, "down": {"received": 100, "queue_dropped": 1}}
    out.append(
        Sample(
            scenario="bulk-impaired",
            system="kcptun",
            round=0,
            metrics={"goodput_MBps": 9.0},
            raw={"relay": relay},
        )
    )
    return [s.as_dict() for s in out]


def _doc() -> dict[str, Any]:
    now = time.time()
    return build_document(
        mode="quick",
        started=now - 10,
        finished=now,
        rounds=2,
        loss_levels=[0.0, 0.01],
        systems=SYSTEMS,
        skipped={"vtunnel-rudp": "transport rudp:// is not installed"},
        scenarios=SCENARIOS,
        quick=True,
        notes=["a note"],
        samples=_samples(),
    )


def test_document_has_the_schema_and_survives_json() -> None:
    doc = json.loads(json.dumps(_doc()))
    assert validate_document(doc) == []
    assert doc["machine"]["cores"] >= 1
    assert set(doc["machine"]["versions"]) >= {"vtunnel", "kcptun"}
    assert len(doc["samples"]) == len(_samples())
    bulk = doc["summary"]["bulk-1"]["vtunnel-kcp"]["goodput_MBps"]
    assert bulk == {"n": 2, "median": 120.5, "min": 120.0, "max": 121.0}
    assert doc["ratios"]["bulk-1"]["vtunnel-kcp"]["goodput_MBps"]["vs_kcptun"] == pytest.approx(120.5 / 50.5)
    assert "bulk-loss@1%" in doc["summary"]
    assert "ttfb" not in doc["summary"]  # the only ttfb sample failed


def test_validation_finds_broken_documents() -> None:
    doc = _doc()
    del doc["machine"]["kernel"]
    doc["samples"][0]["ok"] = False
    doc["samples"][0]["error"] = None
    problems = validate_document(doc)
    assert any("kernel" in p for p in problems)
    assert any("without an error" in p for p in problems)
    assert validate_document({"schema": 1}) != []


def test_targets_are_ratios_or_absolute_bounds() -> None:
    targets = {(t["target"], t["system"]): t for t in _doc()["targets"]}
    kcp_bulk = targets[("bulk over kcp:// >= 4x kcptun (1 stream)", "vtunnel-kcp")]
    assert kcp_bulk["value"] == pytest.approx(120.5 / 50.5)
    assert kcp_bulk["met"] is False
    assert ("bulk over kcp:// >= 4x kcptun (1 stream)", "vtunnel-tcp+psk") not in targets
    tcp_mux = targets[
        ("bulk over tcp:// multiplexed (16 streams) with the key >= 0.5x direct", "vtunnel-tcp+psk")
    ]
    assert tcp_mux["value"] == pytest.approx(200.5 / 300.5)
    assert tcp_mux["met"] is True
    # a ratio to another scenario of the same system
    many = targets[
        ("1,024 concurrent bulk streams in one kcp:// tunnel >= 0.8x 16 streams (aggregate)", "vtunnel-kcp")
    ]
    assert many["value"] == pytest.approx(84.85 / 120.5)
    assert many["met"] is False
    # a ratio to the SOCKS5 baseline, higher and lower being better
    socks = "SOCKS5 bulk over tcp:// with the key"
    assert targets[(f"{socks} >= shadowsocks-libev aes-256-gcm", "vtunnel-tcp+psk")][
        "value"
    ] == pytest.approx(300.5 / 400.5)
    cpu = targets[(f"{socks}: CPU per GB <= shadowsocks-libev aes-256-gcm", "vtunnel-tcp+psk")]
    assert cpu["value"] == pytest.approx(1.5)
    assert cpu["met"] is False
    p50 = targets[("64 B request/response over kcp:// p50 <= 0.8x kcptun", "vtunnel-kcp")]
    assert p50["value"] == pytest.approx(0.75)
    assert p50["met"] is True
    assert targets[("idle, one open stream: agent <= 0.2% of a core", "vtunnel-kcp")]["met"] is True
    assert targets[("idle, one open stream: server <= 0.2% of a core", "vtunnel-kcp")]["met"] is False
    assert targets[("idle streams in one tunnel <= 4 KiB each", "vtunnel-kcp")]["met"] is True
    assert targets[("idle streams in one tunnel <= 4 KiB each", "vtunnel-tcp+psk")]["met"] is None


def test_saturation_notes_name_cpu_bound_processes() -> None:
    notes = _doc()["saturation"]
    assert any("kcptun" in n and "CPU-bound" in n for n in notes)
    full = [n for n in notes if "cores were" in n]
    assert full == [
        f"{scenario} vtunnel-kcp: the machine's cores were up to 97% busy (the system's processes, the relay "
        "where there is one, the load generator and its sink together): they shared the cores, so goodput reads "
        "what all of them cost"
        for scenario in ("bulk-1", "bulk-16")
    ]
    assert any(
        n.startswith("bulk-impaired kcptun round 1") and "10 of 1000 datagrams (1.00%)" in n for n in notes
    )


def test_markdown_plots_and_files(tmp_path: Path) -> None:
    doc = _doc()
    plots = plot_all(doc, tmp_path)
    names = {Path(p).name for p in plots}
    assert {"goodput-vs-loss.png", "bulk-goodput.png", "latency-cdf-rr.png"} <= names
    for p in plots:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json_path, md_path = write_results(doc, tmp_path, plots=plots)
    assert validate_document(json.loads(json_path.read_text())) == []
    md = md_path.read_text()
    assert md == render_markdown(doc, plots=plots)
    assert "| vtunnel-kcp | 120.5 (120.0-121.0) | 2.39x | 0.40x |" in md
    assert "Link: loopback, not shaped" in md
    assert "| system | 0%: MB/s | 1%: MB/s | 0%: vs kcptun | 1%: vs kcptun |" in md
    # the SOCKS5 scenario compares with shadowsocks-libev, on goodput and on CPU per GB
    assert "| vtunnel-tcp+psk | 300.5 (300.0-301.0) | 0.75x | 3 (3-3) | 1.50x |" in md
    assert md.index("## Targets") < md.index("## bulk-1")
    assert "vtunnel-rudp skipped" in md
    assert "ttfb vtunnel-kcp round 1 failed" in md
    assert "![goodput-vs-loss](goodput-vs-loss.png)" in md


def test_rudp_is_held_to_kcp_on_the_lossless_links_of_the_loss_comparison() -> None:
    now = time.time()
    goodput = {
        ("rudp-loss-0", "vtunnel-kcp"): 39.0,
        ("rudp-loss-0", "vtunnel-rudp"): 40.5,
        ("rudp-veth-0", "vtunnel-kcp"): 23.3,
        ("rudp-veth-0", "vtunnel-rudp"): 22.1,
    }
    samples = [
        Sample(
            scenario=scenario, system=system, round=0, metrics={"goodput_MBps": g, "wire_excess": 0.1}
        ).as_dict()
        for (scenario, system), g in goodput.items()
    ]
    doc = build_document(
        mode="quick",
        started=now - 10,
        finished=now,
        rounds=1,
        loss_levels=[],
        systems=[SystemSpec(kind="vtunnel", transport="kcp"), SystemSpec(kind="vtunnel", transport="rudp")],
        skipped={},
        scenarios=SCENARIOS,
        quick=True,
        notes=[],
        samples=samples,
    )
    targets = {t["target"]: t for t in doc["targets"] if t["system"] == "vtunnel-rudp"}
    relay = targets["bulk over rudp:// at 0% loss (relay, 20 ms RTT) >= kcp://"]
    assert relay["value"] == pytest.approx(40.5 / 39.0)
    assert relay["met"] is True
    veth = targets["bulk over rudp:// at 0% loss (veth, rate-limited) >= kcp://"]
    assert veth["value"] == pytest.approx(22.1 / 23.3)
    assert veth["met"] is False


def test_the_source_of_a_tree_names_its_commit_and_its_local_edits(tmp_path: Path) -> None:
    """What a result file says of the code it measured (a development tool's ``--code DIR`` too)."""
    package = tmp_path / "vtunnel"
    package.mkdir()
    (package / "__init__.py").write_text("")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    clean = vtunnel_source(package)
    assert clean == {"path": str(package), "commit": head, "local_edits": False}
    assert source_text(clean) == f" (commit {head[:10]})"
    (package / "__init__.py").write_text("x = 1\n")
    assert source_text(vtunnel_source(package)) == f" (commit {head[:10]}, with local edits)"
    # an exported tree (``--compare-ref``) is no repository: nothing is claimed
    exported = tmp_path.parent / (tmp_path.name + "-export") / "vtunnel"
    exported.mkdir(parents=True)
    assert source_text(vtunnel_source(exported)) == ""
