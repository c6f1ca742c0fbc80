"""Shared fixtures: the anyio backend, free loopback ports, and vtunnel processes that are always cleaned up."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from hypothesis import HealthCheck, settings

from vtunnel.testing.ports import free_port as free_port  # the tests' one way to pick a port

# Property tests check behaviour, never speed: no per-example deadline and no health check that times how fast
# examples are made, both of which fail at random on a loaded machine.
settings.register_profile("vtunnel", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("vtunnel")

ROOT = Path(__file__).resolve().parent.parent
VTUNNEL = [sys.executable, "-m", "vtunnel"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


#: asyncio's own loop and uvloop, the runtime's loop when it is installed: for an ``anyio_backend`` fixture of
#: modules whose code must work on both
BOTH_LOOPS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
]


def wait_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


class Processes:
    """Start vtunnel commands; every one is killed at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[IO[bytes]] = []

    def start(
        self, *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
    ) -> subprocess.Popen[bytes]:
        """``vtunnel ARGS`` (``prefix`` before it: ``ip netns exec NS``)."""
        log = open(self.tmp / f"proc{len(self.procs)}.log", "wb")  # noqa: SIM115 - closed in stop_all
        self.logs.append(log)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(
            [*prefix, *VTUNNEL, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=ROOT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        return (self.tmp / f"proc{self.procs.index(proc)}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for log in self.logs:
            log.close()


def wait_log(procs: Processes, proc: subprocess.Popen[bytes], text: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in procs.output(proc):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{text!r} not logged within {timeout} s")


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


@pytest.fixture
def psk_file(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    subprocess.run([*VTUNNEL, "keygen", "-o", str(path)], capture_output=True, check=True, cwd=ROOT)
    return path


@pytest.fixture
def mtu_netns() -> Iterator[str]:
    """A network namespace of the test's own (root, iproute2), its loopback up: its name (tests set the
    loopback's MTU in it)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    name = f"vtt-mtu-{os.getpid()}"
    try:
        subprocess.run(["ip", "netns", "add", name], capture_output=True, timeout=20, check=True)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"network namespaces are not permitted here: {exc.stderr.decode().strip()}")
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], timeout=20, check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20, check=False)
