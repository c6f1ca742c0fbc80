"""The service files: systemd units verified by systemd-analyze (when installed), the Containerfile read for its
non-root user and its health check."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

UNITS = ["vtunnel-server.service", "vtunnel-agent.service"]
INSTALLED = "/usr/local/bin/vtunnel"
#: what every unit must say, as (key, value) pairs of its [Service] section
HARDENING = [
    ("DynamicUser", "yes"),
    ("NoNewPrivileges", "yes"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"),
    ("CapabilityBoundingSet", ""),
    ("AmbientCapabilities", ""),
    ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ("SystemCallFilter", "@system-service"),
    ("SystemCallArchitectures", "native"),
    ("RestrictNamespaces", "yes"),
    ("LockPersonality", "yes"),
    ("UMask", "0077"),
]


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every setting of a unit file, in order (keys may repeat)."""
    section = ""
    out: list[tuple[str, str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a setting: {raw!r}"
        out.append((section, key.strip(), value.strip()))
    return out


@pytest.mark.parametrize("name", UNITS)
def test_unit_is_hardened_and_runs_its_role(name: str) -> None:
    entries = unit_entries((ROOT / "packaging" / name).read_text())
    service = [(k, v) for s, k, v in entries if s == "Service"]
    for setting in HARDENING:
        assert setting in service, setting
    role = name.removeprefix("vtunnel-").removesuffix(".service")
    starts = {k: shlex.split(v) for k, v in service if k in ("ExecStart", "ExecStartPre")}
    assert starts["ExecStart"][:4] == [INSTALLED, role, "--config", f"/etc/vtunnel/{role}.toml"]
    assert starts["ExecStartPre"] == [INSTALLED, "check-config", f"/etc/vtunnel/{role}.toml"]
    assert ("LoadCredential", "psk:/etc/vtunnel/key") in service
    assert ("Install", "WantedBy", "multi-user.target") in entries


@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verifies_the_unit(name: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # verify checks that the commands exist: point them at this checkout's vtunnel
    here = str(Path(sys.executable).parent / "vtunnel")
    unit = tmp_path / name
    unit.write_text((ROOT / "packaging" / name).read_text().replace(INSTALLED, here))
    out = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr  # no unknown or ignored setting


def containerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    assert not pending, "a continuation runs off the end"
    return out


def test_containerfile_runs_as_non_root_with_a_health_check() -> None:
    instructions = containerfile_instructions((ROOT / "Containerfile").read_text())
    starts = [i for i, (name, _) in enumerate(instructions) if name == "FROM"]
    assert starts, "no FROM"
    final = instructions[starts[-1] :]
    users = [args for name, args in final if name == "USER"]
    assert users, "the final stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    checks = [args for name, args in final if name == "HEALTHCHECK"]
    assert len(checks) == 1
    assert " CMD " in f" {checks[0]} "
    assert not checks[0].upper().startswith("NONE")
    # the health check reads the metrics endpoint the default command serves (its URL in the environment, so an
    # agent's container with its metrics elsewhere can name its own)
    assert "VTUNNEL_HEALTH_URL" in checks[0]
    env = " ".join(args for name, args in final if name == "ENV")
    checked = re.search(r"VTUNNEL_HEALTH_URL=http://127\.0\.0\.1:(\d+)/metrics", env)
    assert checked is not None, env
    command = [args for name, args in final if name == "CMD"]
    assert command
    assert f'"127.0.0.1:{checked.group(1)}"' in command[-1]
    assert [args for name, args in final if name == "ENTRYPOINT"] == ['["vtunnel"]']


CONTAINER_TOOLS = ("podman", "debootstrap", "curl")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_container_image_builds_runs_as_non_root_and_carries_a_tunnel() -> None:
    """packaging/container-test.sh: a bookworm base made with debootstrap, the Containerfile built on it, a server
    and an agent container (host network, loopback only), curl --socks5-hostname through them, the health checks
    and the processes' user; everything removed after. Needs root and the tools (.ci/run installs them)."""
    missing = [
        tool for tool in CONTAINER_TOOLS if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None
    ]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (.ci/run installs them)")
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, podman's storage)")
    done = subprocess.run(
        ["sh", str(ROOT / "packaging" / "container-test.sh")],
        capture_output=True,
        text=True,
        timeout=1700,
        check=False,
    )
    if done.returncode == 77:
        pytest.skip(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "container-test: ok" in done.stdout
