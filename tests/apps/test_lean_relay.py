"""A relay between two lean socket streams that both read past their headers: what each read but did not return
reaches the other side, whichever end the relay starts first."""

from __future__ import annotations

import socket

import anyio
import pytest

from vtunnel.apps.pipe import SocketLeg, join
from vtunnel.io.stream_sockets import LeanSocketStream, attach_socket

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    return client, accepted


async def _lean_after_header(payload: bytes) -> tuple[socket.socket, LeanSocketStream]:
    """A peer socket and a lean stream on the other end that received ``payload``'s first 2 bytes only."""
    peer, mine = _tcp_pair()
    stream = LeanSocketStream()
    attach_socket(mine, stream)
    peer.sendall(payload)
    assert await stream.receive(2) == payload[:2]  # the rest stays read but not returned
    return peer, stream


def _read_until_eof(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    return bytes(out)


async def test_bytes_both_lean_ends_read_early_reach_the_other_side() -> None:
    client, a = await _lean_after_header(b"HDfrom the client")
    origin, b = await _lean_after_header(b"HDfrom the origin")
    relay = join(SocketLeg(a), SocketLeg(b))
    await relay.run()
    for sock in (client, origin):
        sock.shutdown(socket.SHUT_WR)
    with anyio.fail_after(10):
        got_client = await anyio.to_thread.run_sync(_read_until_eof, client)
        got_origin = await anyio.to_thread.run_sync(_read_until_eof, origin)
        assert await relay.wait() == (len(b"from the client"), len(b"from the origin"))
    assert got_client == b"from the origin"
    assert got_origin == b"from the client"
    client.close()
    origin.close()
