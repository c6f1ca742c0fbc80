"""A sealed kcp:// (or rudp://) server restarts: its stateless reset tells the agent at once, and the agent reconnects.

Real processes and sockets on 127.0.0.1: `vtunnel server` over kcp:// with a key, an agent with a forward, an
echo target. The server is killed (SIGKILL: it forgets every session) and started again on the same port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Processes, free_port, wait_log, wait_port
from tests.netutil import echo_roundtrip, echo_server, first_echo_after, pattern

#: what the test allows between the restarted server listening and a working stream; the reset makes it about
#: the agent's reconnect backoff plus one handshake (without it: the keepalive, 10-15 s). Generous because the
#: machine may be loaded; the measured time is printed.
BUDGET = 8.0


@pytest.fixture
def echo() -> Iterator[int]:
    with echo_server() as port:
        yield port


def start_server(procs: Processes, url: str, key: Path, echo: int) -> subprocess.Popen[bytes]:
    server = procs.start(
        "server",
        "--listen",
        url,
        "--psk-file",
        str(key),
        "--target",
        f"127.0.0.1:{echo}",
        "--log-level",
        "debug",
    )
    wait_log(procs, server, "listening")
    return server


def start_agent(procs: Processes, url: str, key: Path) -> tuple[subprocess.Popen[bytes], int]:
    """An agent forwarding a fresh local port to the echo target through ``url``; the agent and the port."""
    front = free_port()
    agent = procs.start(
        "agent",
        "--server",
        url,
        "--psk-file",
        str(key),
        "--forward",
        f"127.0.0.1:{front}",
        "--log-level",
        "debug",
    )
    wait_port(front)
    return agent, front


def first_working_stream(front: int, since: float) -> float:
    return first_echo_after(front, since, BUDGET)


@pytest.mark.parametrize(("scheme", "budget"), [("kcp", BUDGET), ("rudp", 3.0)])
def test_agent_reconnects_at_once_after_a_sealed_datagram_server_restart(
    procs: Processes, psk_file: Path, echo: int, scheme: str, budget: float
) -> None:
    """kcp:// and rudp:// share the sealed codec's stateless reset; rudp:// promises the agent back within 3 s."""
    url = f"{scheme}://127.0.0.1:{free_port()}"
    server = start_server(procs, url, psk_file, echo)
    agent, front = start_agent(procs, url, psk_file)
    payload = pattern(256 * 1024, seed=5)
    assert echo_roundtrip(front, payload, timeout=30) == payload

    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=10)
    # a stream while nothing listens: the agent's datagrams draw ICMP port unreachable errors, which must not
    # stop it from hearing the next server
    with contextlib.suppress(OSError):
        echo_roundtrip(front, b"nobody home", timeout=1)
    restarted_server = start_server(procs, url, psk_file, echo)
    restarted = time.monotonic()
    elapsed = first_echo_after(front, restarted, budget)
    print(f"{scheme}:// server restart: first working stream {elapsed:.2f} s after the new server listened")

    # it was the reset, not the keepalive, that ended the old tunnel
    wait_log(procs, restarted_server, "stateless reset sent", timeout=5)
    wait_log(procs, agent, "server lost the session: reset", timeout=5)
    assert echo_roundtrip(front, payload, timeout=30) == payload
    assert agent.poll() is None
    assert restarted_server.poll() is None


def test_a_restart_while_idle_is_found_by_the_first_new_stream(
    procs: Processes, psk_file: Path, echo: int
) -> None:
    """Several restarts in a row, each followed by a new stream: each old tunnel ends on a reset, and the agent
    never needs its keepalive to notice."""
    url = f"kcp://127.0.0.1:{free_port()}"
    server = start_server(procs, url, psk_file, echo)
    agent, front = start_agent(procs, url, psk_file)
    assert echo_roundtrip(front, b"first", timeout=30) == b"first"
    times: list[float] = []
    for _ in range(3):
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        server = start_server(procs, url, psk_file, echo)
        times.append(first_working_stream(front, time.monotonic()))
    print("kcp:// restarts: first working stream after", ", ".join(f"{t:.2f} s" for t in times))
    failed_on_reset = [
        line
        for line in procs.output(agent).splitlines()
        if "kcp session failed" in line and "server lost the session: reset" in line
    ]
    assert len(failed_on_reset) >= 3
    assert agent.poll() is None
