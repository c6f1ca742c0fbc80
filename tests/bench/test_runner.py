"""The runner's plan, and whole runs of the harness as a user starts them (direct connection only, tiny sizes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.report import validate_document
from bench.runner import Runner, RunOptions
from bench.scenarios import SCENARIOS, all_systems

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def test_rounds_alternate_the_systems() -> None:
    runner = Runner(RunOptions(quick=True, scenarios=("bulk-1", "rr-64"), rounds=3))
    runner.systems = [s for s in all_systems() if s.name in ("direct", "kcptun", "vtunnel-tcp")]
    jobs = runner.plan()
    order = [(j.round, j.system.name) for j in jobs]
    assert order == [(r, name) for r in range(3) for name in ("direct", "kcptun", "vtunnel-tcp")]
    assert all(tuple(s.name for s in j.scenarios) == ("bulk-1", "rr-64") for j in jobs)
    assert runner.total_steps(jobs) == 18


def test_once_scenarios_skip_the_direct_connection_and_udp_only_ones_skip_tcp() -> None:
    runner = Runner(RunOptions(quick=True, scenarios=("idle-cpu", "rr-impaired")))
    runner.systems = [
        s for s in all_systems() if s.name in ("direct", "kcptun", "vtunnel-tcp", "vtunnel-kcp")
    ]
    jobs = runner.plan()
    impaired = [j.system.name for j in jobs if j.scenarios[0].name == "rr-impaired"]
    idle = [s.name for j in jobs if j.scenarios[0].name == "idle-cpu" for s in j.together]
    assert sum(j.scenarios[0].name == "idle-cpu" for j in jobs) == 1  # one shared quiet window
    assert impaired == ["kcptun", "vtunnel-kcp"]  # one quick round
    assert idle == ["kcptun", "vtunnel-tcp", "vtunnel-kcp"]


def test_fec_scenarios_run_the_kcp_systems_alone_and_only_they_run_the_fec_ones() -> None:
    from bench.systems import tunnel_url

    runner = Runner(RunOptions(quick=True, scenarios=("bulk-1", "bulk-fec-2", "bulk-fec-5"), rounds=1))
    runner.systems = all_systems()
    jobs = runner.plan()
    ran = {(sc.name, j.system.name) for j in jobs for sc in j.scenarios}
    kcp = ["vtunnel-kcp", "vtunnel-kcp+psk", "vtunnel-kcp+fec", "vtunnel-kcp+psk+fec"]
    for name in ("bulk-fec-2", "bulk-fec-5"):
        assert sorted(system for scenario, system in ran if scenario == name) == sorted(kcp)
    assert not any(system.endswith("+fec") for scenario, system in ran if scenario == "bulk-1")
    fec = next(s for s in all_systems() if s.name == "vtunnel-kcp+psk+fec")
    assert tunnel_url(fec, "127.0.0.1:9") == "kcp://127.0.0.1:9?mode=fast3&mtu=1350&fec=10/3"


def test_the_vtunnel_kcptun_system_runs_beside_kcptuns_pair_in_its_scenarios_only() -> None:
    from bench.systems import KCPTUN_ARGS, agent_argv, kcptun_query, server_argv

    runner = Runner(RunOptions(quick=True, rounds=1))
    runner.systems = all_systems()
    jobs = runner.plan()
    peer = sorted({sc.name for j in jobs for sc in j.scenarios if j.system.name == "vtunnel-kcptun"})
    assert peer == ["bulk-1", "bulk-16", "rr-64"]
    assert all(
        "kcptun" in {j.system.name for j in jobs if sc.name in {s.name for s in j.scenarios}}
        for sc in SCENARIOS
        if sc.name in peer
    )
    system = next(s for s in all_systems() if s.name == "vtunnel-kcptun")
    assert system.udp
    assert system.tunnel
    # the same kcptun-server command line as kcptun's own pair, and its options as the agent's kcp:// query
    kcptun = next(s for s in all_systems() if s.name == "kcptun")
    assert server_argv(system, "h:1", "h:2", None) == server_argv(kcptun, "h:1", "h:2", None)
    query, key = kcptun_query()
    assert key == KCPTUN_ARGS[KCPTUN_ARGS.index("--key") + 1]
    assert query == "mode=fast3&sndwnd=1024&rcvwnd=1024&crypt=none&nocomp&datashard=0&parityshard=0"
    argv = agent_argv(system, "127.0.0.1:9", "127.0.0.1:8", Path("/k"), conns=3)
    assert argv[argv.index("--server") + 1] == f"kcp://127.0.0.1:9?{query}&conn=3"
    assert argv[argv.index("--peer") + 1] == "kcptun"
    assert argv[argv.index("--psk-file") + 1] == "/k"


def test_unknown_scenario_is_a_clear_error() -> None:
    from bench.procs import HarnessError

    with pytest.raises(HarnessError, match="unknown scenario"):
        Runner(RunOptions(scenarios=("warp-speed",)))


def test_every_scenario_has_quick_settings_no_larger_than_full() -> None:
    for sc in SCENARIOS:
        full, quick = sc.settings(quick=False), sc.settings(quick=True)
        assert set(full) == set(quick)
        for key in full:
            assert quick[key] <= full[key], (sc.name, key)


def _bench(out: Path, *args: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "bench", "run", "--quick", "--system", "direct", "--out", str(out), *args]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_a_whole_run_writes_a_valid_document(tmp_path: Path) -> None:
    proc = _bench(tmp_path, "--scenario", "rr-64", "--scenario", "ttfb", "--rounds", "2")
    out, _ = proc.communicate(timeout=100)
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    doc = json.loads((tmp_path / "latest.json").read_text())
    assert validate_document(doc) == []
    assert [(s["scenario"], s["round"]) for s in doc["samples"]] == [
        ("rr-64", 0),
        ("ttfb", 0),
        ("rr-64", 1),
        ("ttfb", 1),
    ]
    assert all(s["ok"] for s in doc["samples"])
    assert len(doc["samples"][0]["raw"]["samples_ns"]) == 2000
    assert (tmp_path / "latest.md").read_text().startswith("# vtunnel benchmark results")
    assert (tmp_path / "latency-cdf-rr.png").exists()


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ctrl_c_stops_every_process_and_keeps_partial_results(tmp_path: Path) -> None:
    # far more rounds than the run gets through before the interrupt (about 0.7 s each here)
    proc = _bench(tmp_path, "--scenario", "rr-64", "--rounds", "1000")
    try:
        seen: set[int] = set()
        deadline = time.monotonic() + 20
        # the workload server and one client; a short-lived client may slip between two looks, so give up
        # waiting for it well before the run could end by itself
        while len(seen) < 2 and time.monotonic() < deadline:
            seen |= _descendants(proc.pid)
            time.sleep(0.05)
        assert seen, "the run never started its processes"
        time.sleep(1.0)
        seen |= _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out.decode(errors="replace")[-2000:]
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in seen if _alive(p)]
    doc = json.loads((tmp_path / "latest.json").read_text())
    assert doc["interrupted"] is True
    assert validate_document(doc) == []


def test_plugin_transports_join_full_runs_and_quick_runs_only_by_name() -> None:
    from bench.systems import installed_transports

    plugins = sorted(installed_transports() - {"tcp", "kcp", "rudp", "tls"})
    if not plugins:
        pytest.skip("no plugin transport installed")
    name = f"vtunnel-{plugins[0]}"
    assert name in {s.name for s in Runner(RunOptions(quick=False)).systems}
    quick = Runner(RunOptions(quick=True))
    assert name not in {s.name for s in quick.systems}
    assert "plugin transport" in quick.skipped[name]
    assert [s.name for s in Runner(RunOptions(quick=True, systems=(name,))).systems] == [name]


def test_systems_not_asked_for_are_left_out_silently() -> None:
    runner = Runner(RunOptions(quick=True, systems=("direct",)))
    assert [s.name for s in runner.systems] == ["direct"]
    assert runner.skipped == {}
