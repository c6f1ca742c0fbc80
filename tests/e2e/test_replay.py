"""A sealed kcp:// server is silent to anything it cannot authenticate, including a captured first datagram."""

from __future__ import annotations

import os
import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import Processes, free_port, wait_port
from tests.netutil import echo_roundtrip, echo_server


@contextmanager
def capturing_forwarder(target: tuple[str, int]) -> Iterator[tuple[int, list[bytes]]]:
    """A UDP forwarder (one client) that records every datagram the client sends, in order."""
    front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    front.bind(("127.0.0.1", 0))
    back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    back.connect(target)
    captured: list[bytes] = []
    stop = threading.Event()
    client: list[tuple[str, int]] = []

    def run() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([front, back], [], [], 0.1)
            for sock in ready:
                try:
                    if sock is front:
                        data, addr = front.recvfrom(65535)
                        client[:] = [addr]
                        captured.append(data)
                        back.send(data)
                    else:
                        data = back.recv(65535)
                        if client:
                            front.sendto(data, client[0])
                except ConnectionRefusedError:  # an ICMP error for an earlier datagram: UDP goes on
                    continue

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield front.getsockname()[1], captured
    finally:
        stop.set()
        t.join(timeout=2)
        front.close()
        back.close()


def silent(port: int, payload: bytes, wait: float = 1.5) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))  # another port than the agent's
        s.sendto(payload, ("127.0.0.1", port))
        ready, _, _ = select.select([s], [], [], wait)
        return not ready


def test_replayed_first_datagram_and_probes_get_silence(procs: Processes, psk_file: Path) -> None:
    with echo_server() as echo:
        port = free_port(socket.SOCK_DGRAM)
        procs.start(
            "server",
            "--listen",
            f"kcp://127.0.0.1:{port}",
            "--psk-file",
            str(psk_file),
            "--target",
            f"127.0.0.1:{echo}",
        )
        with capturing_forwarder(("127.0.0.1", port)) as (relay_port, captured):
            front = free_port()
            procs.start(
                "agent",
                "--server",
                f"kcp://127.0.0.1:{relay_port}",
                "--psk-file",
                str(psk_file),
                "--forward",
                f"127.0.0.1:{front}",
            )
            wait_port(front)
            assert echo_roundtrip(front, b"through the tunnel") == b"through the tunnel"
            first = captured[0]
            for probe in (
                first,  # a captured handshake, replayed from another port
                captured[-1],  # a captured data datagram
                os.urandom(len(first)),
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                bytes.fromhex("000000040000000000"),  # a vproxy handshake
                bytes(24),  # a KCP-shaped header of zeros
            ):
                assert silent(port, probe), f"the server answered {probe[:16].hex()}"
            # and the real agent is still served
            assert echo_roundtrip(front, b"still here") == b"still here"


@pytest.mark.parametrize("size", [1, 58, 200])
def test_no_answer_to_garbage_of_any_size(procs: Processes, psk_file: Path, size: int) -> None:
    port = free_port(socket.SOCK_DGRAM)
    procs.start(
        "server",
        "--listen",
        f"kcp://127.0.0.1:{port}",
        "--psk-file",
        str(psk_file),
        "--target",
        "127.0.0.1:9",
    )
    import time

    time.sleep(1.0)  # the server binds its UDP port
    assert silent(port, os.urandom(size), wait=1.0)
