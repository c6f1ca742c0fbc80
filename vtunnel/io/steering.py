"""Steering datagrams between the sockets of one ``SO_REUSEPORT`` group with a classic BPF program.

Linux gives a datagram that arrives on a port shared by several sockets (``SO_REUSEPORT``) to the socket a
program attached with ``SO_ATTACH_REUSEPORT_CBPF`` names: the program sees the UDP payload and returns an index
into the group, in the order the sockets joined it. :func:`sum_program` is the one program vtunnel uses: it adds
up ``length`` bytes of the payload from ``offset``, takes the sum modulo the number of ``routes`` and returns
the route of that value, so a session's datagrams reach the socket its connection ID (or conv) names,
whatever address they come from. A datagram too short to hold those bytes goes to ``routes[0]``. The sum is
what :func:`vtunnel.security.datagram.connection_id_slot` computes, checked against it in the tests.

Replacing the program (attaching another on any socket of the group) is atomic: the kernel runs the old one or
the new one on each datagram.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence
from typing import Final

__all__ = ["MAX_ROUTES", "attach_program", "sum_program"]

#: ``SO_ATTACH_REUSEPORT_CBPF`` (linux/socket.h; Python's socket module does not name it)
SO_ATTACH_REUSEPORT_CBPF: Final = 51
#: the most values a program routes (a classic program has at most 4,096 instructions)
MAX_ROUTES: Final = 1024

# classic BPF opcodes (linux/bpf_common.h, linux/filter.h)
_LD_B_ABS: Final = 0x00 | 0x10 | 0x20  # A = payload[k]
_LD_W_LEN: Final = 0x00 | 0x00 | 0x80  # A = payload length
_TAX: Final = 0x07 | 0x00  # X = A
_ADD_X: Final = 0x04 | 0x00 | 0x08  # A += X
_MOD_K: Final = 0x04 | 0x90 | 0x00  # A %= k
_JGE_K: Final = 0x05 | 0x30  # pc += (A >= k) ? jt : jf
_JEQ_K: Final = 0x05 | 0x10  # pc += (A == k) ? jt : jf
_RET_K: Final = 0x06  # return k

Instruction = tuple[int, int, int, int]  # code, jt, jf, k


def sum_program(offset: int, length: int, routes: Sequence[int]) -> list[Instruction]:
    """``routes[sum(payload[offset:offset + length]) % len(routes)]``; ``routes[0]`` for a shorter payload."""
    if not 1 <= len(routes) <= MAX_ROUTES or length < 1 or offset < 0:
        raise ValueError("a steering program sums 1 or more bytes into 1 to 1,024 routes")
    program: list[Instruction] = [
        (_LD_W_LEN, 0, 0, 0),
        (_JGE_K, 1, 0, offset + length),
        (_RET_K, 0, 0, routes[0]),
        (_LD_B_ABS, 0, 0, offset),
    ]
    for i in range(1, length):
        program += [(_TAX, 0, 0, 0), (_LD_B_ABS, 0, 0, offset + i), (_ADD_X, 0, 0, 0)]
    program.append((_MOD_K, 0, 0, len(routes)))
    for value, route in enumerate(routes[:-1]):
        program += [(_JEQ_K, 0, 1, value), (_RET_K, 0, 0, route)]
    program.append((_RET_K, 0, 0, routes[-1]))
    return program


def attach_program(sock: socket.socket, program: Sequence[Instruction]) -> None:
    """Attach ``program`` to ``sock``'s ``SO_REUSEPORT`` group (replacing the group's program, if any)."""
    filters = (ctypes.c_ubyte * (8 * len(program)))()
    ctypes.memmove(filters, b"".join(struct.pack("=HBBI", *insn) for insn in program), 8 * len(program))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(filters))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
