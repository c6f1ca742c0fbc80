"""Running out of descriptors never stops the server, and a real agent still gets in.

Real processes on 127.0.0.1: a ``vtunnel server`` whose descriptor limit is 1024 (soft and hard, so it cannot
raise it), thousands of idle TCP connections to its ``tcp://`` listener, then a real agent forwarding to an echo
target. With a key the idle connections never authenticate: the listener keeps at most a quarter of the limit of
them and closes the oldest first, so the agent's connection gets in at once. Without a key every idle connection is
a tunnel waiting for its handshake: the process runs out of descriptors, stops accepting for a moment, and is
serving again once the handshake timeout has closed the idle ones.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, VTUNNEL, Processes, free_port, wait_log, wait_port
from tests.netutil import echo_roundtrip, echo_server, first_echo_after, pattern

#: the soft and hard descriptor limit of the server under attack: the usual default soft limit
LIMIT = 1024
IDLE_CONNECTIONS = 3000
PAYLOAD = 8 * 1024 * 1024


def _limit_descriptors() -> None:  # runs in the child between fork and exec
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def start_limited(procs: Processes, *args: str) -> subprocess.Popen[bytes]:
    """``vtunnel ARGS`` with the descriptor limit at :data:`LIMIT`, cleaned up with the other processes."""
    log = open(procs.tmp / f"proc{len(procs.procs)}.log", "wb")  # noqa: SIM115 - closed by procs.stop_all
    procs.logs.append(log)
    proc = subprocess.Popen(
        [*VTUNNEL, *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=ROOT,
        start_new_session=True,
        preexec_fn=_limit_descriptors,
    )
    procs.procs.append(proc)
    return proc


@pytest.fixture(autouse=True)
def room_for_the_attacker() -> Iterator[None]:
    """This process opens thousands of sockets: lift its own soft limit while the test runs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = IDLE_CONNECTIONS + 512
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the hard descriptor limit ({hard}) is below the {need} this test opens")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.contextmanager
def idle_connections(port: int, count: int, budget: float = 20.0) -> Iterator[list[socket.socket]]:
    """``count`` TCP connections to ``port`` that never send a byte (the kernel completes them from the backlog
    even while the server does not accept); all closed on exit."""
    socks: list[socket.socket] = []
    deadline = time.monotonic() + budget
    try:
        for _ in range(count):
            if time.monotonic() > deadline:
                pytest.fail(f"only {len(socks)} of {count} idle connections within {budget} s")
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.settimeout(5.0)
            s.connect(("127.0.0.1", port))
        yield socks
    finally:
        for s in socks:
            s.close()


def backlog(port: int) -> int | None:
    """Connections waiting in the kernel's accept queue of the listener on ``port`` (``ss``), or None."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=False
    )
    fields = out.stdout.split()
    return int(fields[1]) if out.returncode == 0 and len(fields) > 1 else None


def wait_backlog_drained(port: int, budget: float = 20.0) -> None:
    """Until the server has taken every waiting connection off its accept queue."""
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        if not backlog(port):  # 0, or no ss to ask
            return
        time.sleep(0.05)
    pytest.fail(f"the server did not drain its accept queue within {budget} s")


def start_server(procs: Processes, port: int, echo: int, *security: str) -> subprocess.Popen[bytes]:
    server = start_limited(
        procs,
        "server",
        "--listen",
        f"tcp://127.0.0.1:{port}",
        *security,
        "--target",
        f"127.0.0.1:{echo}",
        "--log-level",
        "debug",
    )
    wait_log(procs, server, "listening")
    return server


def start_agent(procs: Processes, port: int, *security: str) -> int:
    front = free_port()
    procs.start("agent", "--server", f"tcp://127.0.0.1:{port}", *security, "--forward", f"127.0.0.1:{front}")
    wait_port(front)
    return front


def test_idle_connections_cannot_keep_an_agent_out_of_a_keyed_server(
    procs: Processes, psk_file: Path
) -> None:
    key = ("--psk-file", str(psk_file))
    port = free_port()
    with echo_server() as echo:
        server = start_server(procs, port, echo, *key)
        with idle_connections(port, IDLE_CONNECTIONS):
            # the flood has been taken in: the listener has had to close its oldest unauthenticated connections
            wait_log(procs, server, "closing the oldest ones")
            wait_backlog_drained(port)
            front = start_agent(procs, port, *key)
            took = first_echo_after(front, time.monotonic(), budget=2.0)
            print(f"first stream through the agent {took:.2f} s after its port opened")
            data = pattern(PAYLOAD, seed=7)
            assert echo_roundtrip(front, data) == data
            assert server.poll() is None, procs.output(server)
    log = procs.output(server)
    assert "Too many open files" not in log
    # the warning is throttled: one per interval, not one per connection
    assert log.count("closing the oldest ones") <= 3, log


def test_a_server_out_of_descriptors_pauses_and_recovers(procs: Processes) -> None:
    """No key: each idle connection is a tunnel until the handshake timeout (5 s), so the process does run out."""
    insecure = ("--insecure",)
    port = free_port()
    with echo_server() as echo:
        server = start_server(procs, port, echo, *insecure)
        with idle_connections(port, IDLE_CONNECTIONS):
            wait_log(procs, server, "out of resources")
            front = start_agent(procs, port, *insecure)
            # the idle tunnels time out after 5 s; the listener then drains its backlog on its own
            first_echo_after(front, time.monotonic(), budget=30.0)
            data = pattern(PAYLOAD, seed=8)
            assert echo_roundtrip(front, data) == data
            assert server.poll() is None, procs.output(server)
    log = procs.output(server)
    assert log.count("out of resources") <= 5, log
