"""The SOCKS5 comparison of the benchmark harness: which systems run it, and real transfers through vtunnel's
``--socks`` front and shadowsocks-libev's ss-local (installed by ``.ci/run`` and ``bench/setup.sh``)."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from bench.measure import measure_bulk
from bench.netem import LOOPBACK
from bench.procs import ProcessGroup, python_argv
from bench.runner import Runner, RunOptions
from bench.scenarios import all_systems
from bench.systems import make_psk_file, start_stack

pytestmark = pytest.mark.timeout(120)

SIZES = {"streams": 2, "bytes": 8 * 1024 * 1024, "timeout": 60}


def test_only_socks5_scenarios_run_shadowsocks_and_they_run_only_socks5_proxies() -> None:
    runner = Runner(RunOptions(quick=True, scenarios=("bulk-1", "socks5-bulk"), rounds=1))
    runner.systems = all_systems()
    ran = {(sc.name, j.system.name) for j in runner.plan() for sc in j.scenarios}
    assert sorted(system for scenario, system in ran if scenario == "socks5-bulk") == [
        "shadowsocks",
        "vtunnel-tcp",
        "vtunnel-tcp+psk",
    ]
    assert ("bulk-1", "shadowsocks") not in ran
    assert ("bulk-1", "vtunnel-tcp") in ran
    # the SOCKS5 scenario gets a stack of its own (a SOCKS5 front instead of a forward)
    socks_jobs = [j for j in runner.plan() if any(sc.name == "socks5-bulk" for sc in j.scenarios)]
    assert all(len(j.scenarios) == 1 for j in socks_jobs)


@pytest.mark.parametrize("name", ["vtunnel-tcp+psk", "shadowsocks"])
def test_a_socks5_transfer_is_validated_and_costed(name: str, tmp_path: Path) -> None:
    if name == "shadowsocks" and shutil.which("ss-local") is None:
        pytest.fail("shadowsocks-libev is missing: .ci/run and bench/setup.sh install it")
    system = next(s for s in all_systems() if s.name == name)
    with ProcessGroup(log_dir=tmp_path) as group:
        psk = make_psk_file(tmp_path)
        stack = start_stack(system, group, LOOPBACK, psk_file=psk, socks=True)
        assert stack.socks_target is not None
        assert stack.client_args()[:2] == ["--socks5", stack.entry]
        metrics, raw = measure_bulk(stack, SIZES, group)
    assert metrics["goodput_MBps"] > 0
    assert raw["bytes"] == SIZES["bytes"]
    # both ends of the tunnel were busy, and their CPU time is charged per GB delivered
    assert 0 < metrics["cpu_s_per_GB"] < 1000
    # and so were the load generator and its sink, on the same cores: counted apart, never as the system's
    workload = raw["workload_cpu"]
    assert isinstance(workload, dict)
    assert set(workload) == {"client", "sink"}
    assert all(0 < seconds < 60 for seconds in workload.values())
    assert metrics["workload_cpu_s_per_GB"] == pytest.approx(sum(workload.values()) / (SIZES["bytes"] / 1e9))
    assert "sink" not in raw["cpu"]  # type: ignore[operator]
    assert 0 < raw["machine_busy_pct"] <= 100  # type: ignore[operator]


def test_a_proxy_refusal_is_an_error_not_a_transfer(tmp_path: Path) -> None:
    """The workload's SOCKS5 client reports the proxy's refusal (vtunnel answers an error for a destination it
    did not reach) instead of sending into it."""
    system = next(s for s in all_systems() if s.name == "vtunnel-tcp")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening: connection refused
        with ProcessGroup(log_dir=tmp_path) as group:
            stack = start_stack(system, group, LOOPBACK, socks=True)
            out = subprocess.run(
                python_argv(
                    "bench.workload", "bulk", "--socks5", stack.entry, "--connect", nowhere, "--bytes", "1000"
                ),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
    assert out.returncode == 1
    assert "the SOCKS5 proxy answered" in out.stdout
    assert nowhere in out.stdout
