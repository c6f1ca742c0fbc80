"""Records of a real `openssl s_client` <-> `openssl s_server` connection on loopback, taken by a recording relay
between them, replayed through two lite-tls trackers in every order the recording allows and split anywhere."""

from __future__ import annotations

import contextlib
import random
import select
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_port
from tests.lite_tls.tlsutil import cert_files, connect, scripts
from vtunnel.protocol import Role
from vtunnel.protocol.lite_tls import DeliverToLocal, LiteTlsRole, LiteTlsTracker, SendToPeer

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
REQUEST = b"GET / HTTP/1.0\r\n\r\n"


def relay_once(
    listener: socket.socket, upstream: int, flights: list[tuple[str, bytes]], deadline: float
) -> None:
    """Accept one connection, relay it to ``upstream`` and record every read as ("user" | "target", bytes)."""
    listener.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        down, _ = listener.accept()
    except OSError:
        return
    up = socket.create_connection(("127.0.0.1", upstream), timeout=5)
    names = {down: "user", up: "target"}
    other = {down: up, up: down}
    open_ = {down, up}
    with down, up:
        while open_ and time.monotonic() < deadline:
            ready, _, _ = select.select(list(open_), [], [], 0.2)
            for sock in ready:
                data = sock.recv(65536)
                if not data:
                    open_.discard(sock)
                    with contextlib.suppress(OSError):
                        other[sock].shutdown(socket.SHUT_WR)
                    continue
                flights.append((names[sock], data))
                other[sock].sendall(data)


def record_openssl(tmp_path: Path, version: str) -> list[tuple[str, bytes]]:
    assert OPENSSL is not None
    chain, key, ca = cert_files(tmp_path)
    server_port = free_port()
    flag = {"1.2": "-tls1_2", "1.3": "-tls1_3"}[version]
    server = subprocess.Popen(
        [
            OPENSSL,
            "s_server",
            "-accept",
            str(server_port),
            "-cert",
            chain,
            "-key",
            key,
            "-www",
            flag,
            "-quiet",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    flights: list[tuple[str, bytes]] = []
    try:
        wait_port(server_port, timeout=10)
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            relay = threading.Thread(
                target=relay_once, args=(listener, server_port, flights, time.monotonic() + 15), daemon=True
            )
            relay.start()
            client = subprocess.run(
                [
                    OPENSSL,
                    "s_client",
                    "-connect",
                    f"127.0.0.1:{listener.getsockname()[1]}",
                    flag,
                    "-quiet",
                    "-servername",
                    "lite-tls.test",
                    "-CAfile",
                    ca,
                    "-verify_return_error",
                ],
                input=REQUEST,
                capture_output=True,
                timeout=15,
                check=False,
            )
            relay.join(timeout=15)
    finally:
        server.kill()
        server.wait()
    assert b"HTTP/1.0 200 ok" in client.stdout, client.stderr[-500:]
    return flights


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_openssl_s_client_and_s_server_through_both_trackers(tmp_path: Path, version: str) -> None:
    flights = record_openssl(tmp_path, version)
    assert flights[0][0] == "user"
    hello = flights[0][1]  # openssl's ClientHello passes the agent's check of its first record
    assert LiteTlsTracker(Role.CLIENT).from_local(hello) == [SendToPeer(data=hello)]
    pieces = [(float(i), side, data) for i, (side, data) in enumerate(flights)]
    for seed in range(25):
        rng = random.Random(seed)
        user, target = scripts(pieces)
        result = connect(user, target, rng, max_chunk=rng.choice([1, 6, 7, 300, 70000]))
        got_by_target = b"".join(e.data for e in result.server.log if isinstance(e, DeliverToLocal))
        got_by_user = b"".join(e.data for e in result.agent.log if isinstance(e, DeliverToLocal))
        assert got_by_target == bytes(user.written)
        assert got_by_user == bytes(target.written)
        assert result.left, (result.agent.tracker, result.server.tracker)
        if version == "1.3":
            assert result.agent.tracker.role is LiteTlsRole.ACTIVE
