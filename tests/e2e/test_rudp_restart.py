"""A sealed rudp:// server restarts: its stateless reset tells the agent at once, and the agent is back within
3 s.

Real processes and sockets on 127.0.0.1: `vtunnel server` over rudp:// with a key, an agent with a forward, an
echo target. The server is killed (SIGKILL: it forgets every session) and started again on the same port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Processes, free_port, wait_log
from tests.e2e.test_kcp_restart import start_agent, start_server
from tests.netutil import echo_roundtrip, echo_server, first_echo_after, pattern

#: the promise: a working stream within this many seconds of the restarted server listening (the reset ends the
#: old tunnel at once; the agent's reconnect backoff and one handshake follow)
BUDGET = 3.0


@pytest.fixture
def echo() -> Iterator[int]:
    with echo_server() as port:
        yield port


def test_agent_is_back_within_three_seconds_of_an_rudp_server_restart(
    procs: Processes, psk_file: Path, echo: int
) -> None:
    url = f"rudp://127.0.0.1:{free_port()}"
    server = start_server(procs, url, psk_file, echo)
    agent, front = start_agent(procs, url, psk_file)
    payload = pattern(256 * 1024, seed=6)
    assert echo_roundtrip(front, payload, timeout=30) == payload

    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=10)
    with contextlib.suppress(
        OSError
    ):  # nothing listens: ICMP errors must not stop the agent hearing the next
        echo_roundtrip(front, b"nobody home", timeout=1)
    restarted_server = start_server(procs, url, psk_file, echo)
    elapsed = first_echo_after(front, time.monotonic(), BUDGET)
    print(f"rudp:// server restart: first working stream {elapsed:.2f} s after the new server listened")

    # it was the reset, not the keepalive, that ended the old tunnel
    wait_log(procs, restarted_server, "stateless reset sent", timeout=5)
    wait_log(procs, agent, "server lost the session: reset", timeout=5)
    assert echo_roundtrip(front, payload, timeout=30) == payload
    assert agent.poll() is None
    assert restarted_server.poll() is None
