"""``vtunnel.testing.ports.free_port``: the ports the tests and the harness start processes on."""

from __future__ import annotations

import socket
from pathlib import Path

from vtunnel.testing.ports import free_port


def ephemeral_low() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_ports_lie_below_the_range_outgoing_connections_take_their_source_ports_from() -> None:
    low = ephemeral_low()
    ports = [free_port(), free_port(socket.SOCK_DGRAM)]
    assert all(1024 <= port < low for port in ports)


def test_a_port_is_never_handed_out_twice_and_is_free_for_tcp_and_udp() -> None:
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    for port in ports[:20]:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind(("127.0.0.1", port))


def test_a_port_another_socket_holds_is_skipped() -> None:
    # 800 of the 12,000 ports it draws from held by UDP sockets: 300 draws that did not check would hit one
    # with a probability of 1 - (1 - 800/12000) ** 300, more than 1 - 1e-8
    low = ephemeral_low()
    held: list[socket.socket] = []
    try:
        for port in range(low - 800, low):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
        busy = {s.getsockname()[1] for s in held}
        assert len(busy) > 700
        assert not busy & {free_port() for _ in range(300)}
    finally:
        for s in held:
            s.close()
