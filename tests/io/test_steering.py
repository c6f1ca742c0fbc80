"""The classic BPF steering program on a real SO_REUSEPORT group of UDP sockets on loopback: every datagram
reaches the socket of the route its bytes name, as :func:`connection_id_slot` computes it, whatever source port
it comes from; a connection ID a worker minted always reaches that worker's socket."""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtunnel.io.steering import attach_program, sum_program
from vtunnel.security.datagram import ConnectionIdLayout, connection_id_slot, mint_connection_id, reset_keys

GROUP = 6


@pytest.fixture(scope="module")
def group() -> Iterator[list[socket.socket]]:
    sockets: list[socket.socket] = []
    address = ("127.0.0.1", 0)
    for _ in range(GROUP):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        address = sock.getsockname()
        sockets.append(sock)
    yield sockets
    for sock in sockets:
        sock.close()


def landing(group: list[socket.socket], datagram: bytes, sender: socket.socket) -> int:
    """Which socket of ``group`` receives ``datagram`` sent from ``sender``."""
    sender.sendto(datagram, group[0].getsockname())
    readable, _, _ = select.select(group, [], [], 5.0)
    assert len(readable) == 1
    readable[0].recv(4096)
    return group.index(readable[0])


@settings(max_examples=60, deadline=None)
@given(
    routes=st.lists(st.integers(0, GROUP - 1), min_size=1, max_size=12),
    offset=st.integers(0, 4),
    length=st.integers(1, 8),
    datagrams=st.lists(st.binary(min_size=0, max_size=40), min_size=1, max_size=8),
)
def test_every_datagram_lands_on_the_route_its_bytes_sum_to(
    group: list[socket.socket], routes: list[int], offset: int, length: int, datagrams: list[bytes]
) -> None:
    attach_program(group[0], sum_program(offset, length, routes))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for datagram in datagrams:
            if len(datagram) < offset + length:
                want = routes[0]
            else:
                want = routes[sum(datagram[offset : offset + length]) % len(routes)]
            assert landing(group, datagram, sender) == want


@pytest.mark.parametrize("server_id", [b"", b"\x07", b"\x07\x01"])
def test_a_minted_connection_id_reaches_its_slot_from_any_source_port(
    group: list[socket.socket], server_id: bytes
) -> None:
    slots = GROUP
    sid = len(server_id)
    attach_program(group[0], sum_program(sid, 5 - sid, list(range(slots))))
    key = reset_keys(bytes(range(32)))[1]
    for slot in range(slots):
        layout = ConnectionIdLayout(server_id=server_id, slot=slot, slots=slots)
        for _ in range(5):
            cid = mint_connection_id(key, layout=layout)
            assert cid.startswith(server_id)
            assert connection_id_slot(cid, sid, slots) == slot
            for _ in range(3):  # a new source port each time: a NAT rebinding
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                    assert landing(group, cid + os.urandom(40), sender) == slot
