"""Socket options, set in one place: TCP_NODELAY on every TCP socket, large kernel buffers where bulk flows."""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Final

from anyio.abc import ByteStream, SocketAttribute

__all__ = ["SOCKET_BUFFER", "linger_reset", "tune_stream", "tune_tcp"]

#: SO_SNDBUF / SO_RCVBUF of tunnel and relayed TCP sockets (the kernel may cap it)
SOCKET_BUFFER: Final = 4 * 1024 * 1024
#: SO_LINGER on, timeout 0: closing the socket sends a TCP reset and drops what is unsent
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


def tune_tcp(sock: socket.socket, *, buffers: bool = True) -> None:
    """TCP_NODELAY (TCP sockets only) and, with ``buffers``, :data:`SOCKET_BUFFER` both ways; best effort."""
    if buffers:
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def tune_stream(stream: ByteStream) -> None:
    """:func:`tune_tcp` on the socket under an anyio stream (nothing when it has none, e.g. a memory stream)."""
    sock: socket.socket | None = stream.extra(SocketAttribute.raw_socket, None)
    if sock is not None:
        tune_tcp(sock)


def linger_reset(sock: socket.socket | None) -> None:
    """Make closing ``sock`` send a TCP reset, when it is a TCP socket (anything else is left as it is)."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
