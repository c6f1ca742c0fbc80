"""A quic:// server restarts (SIGKILL: it forgets every connection) and starts again on the same port: its
stateless reset tells the agent at once, and the agent reconnects, instead of waiting for its keepalive (10-15 s)
or QUIC's idle timeout (30 s). With ``retry=1`` the reconnection goes through the Retry that validates the
agent's address first. Real processes and sockets on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Processes, wait_log
from tests.netutil import echo_roundtrip, echo_server, first_echo_after, pattern
from tests.plugins.tunnel import PluginUrls, plugin_urls, start_agent, start_server

#: what the test allows between the restarted server listening and a working stream: the agent's reconnect
#: backoff plus one handshake, where without the reset it is the keepalive's 10-15 s. Generous because the machine
#: may be loaded; the measured time is printed.
BUDGET = 6.0


@pytest.mark.parametrize("retry", [False, True], ids=["reset", "reset+retry"])
def test_agent_reconnects_at_once_after_a_quic_server_restart(
    procs: Processes, psk_file: Path, tmp_path: Path, retry: bool
) -> None:
    base = plugin_urls("quic", tmp_path)
    urls = PluginUrls(server=base.server + ("?retry=1" if retry else ""), agent=base.agent)
    with echo_server() as echo:
        server_args = ("--target", f"127.0.0.1:{echo}", "--log-level", "debug")
        server = start_server(procs, urls, psk_file, *server_args)
        agent, front = start_agent(procs, urls, psk_file, "--forward")
        payload = pattern(256 * 1024, seed=5)
        assert echo_roundtrip(front, payload, timeout=30) == payload

        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        restarted_server = start_server(procs, urls, psk_file, *server_args)
        elapsed = first_echo_after(front, time.monotonic(), BUDGET)
        print(
            f"quic:// server restart (retry={int(retry)}): first working stream {elapsed:.2f} s after it listened"
        )

        # it was the reset, not the keepalive, that ended the old tunnel
        wait_log(procs, restarted_server, "quic stateless reset sent", timeout=5)
        wait_log(procs, agent, "quic connection reset by the server", timeout=5)
        assert "keepalive timeout" not in procs.output(agent)
        if retry:  # the new tunnel's address was validated first
            wait_log(procs, restarted_server, "quic retry sent", timeout=5)
        assert echo_roundtrip(front, payload, timeout=30) == payload
        assert agent.poll() is None
        assert restarted_server.poll() is None
