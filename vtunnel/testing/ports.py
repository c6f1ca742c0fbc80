"""Loopback ports for the tests and the benchmark harness: free now, and out of the way of outgoing connections.

A port found by binding port 0 comes from the kernel's ephemeral range, the same range every outgoing
connection and every unbound UDP socket takes its source port from. Between the probe and the moment the
process under test binds it (a second or more while that process starts), any connect on the machine may take
the port as its source port, and the bind then fails with ``EADDRINUSE``. :func:`free_port` hands out ports
just below that range instead: only an explicit bind takes them. It checks that the port is free for both TCP
and UDP on the host right now, and never hands the same port out twice in one process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Final

__all__ = ["free_port", "free_port_range"]

#: Linux's ``ip_local_port_range``, where the ephemeral ports are
_RANGE_FILE: Final = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: the range when that file cannot be read (Linux's default)
_DEFAULT_EPHEMERAL: Final = (32768, 60999)
#: how many ports below the ephemeral range are handed out (fewer when the range starts low)
_SPAN: Final = 12000
_LOWEST: Final = 1024

_given: set[int] = set()
_rng = random.Random()


def _ephemeral_low() -> int:
    try:
        return int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _DEFAULT_EPHEMERAL[0]


def _free_both(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(family, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def _kernel_port(kind: int, host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port of ``host`` that is free for TCP and UDP now, below the ephemeral range, not given out before.

    ``kind`` only matters where the ephemeral range leaves no room below it: then the kernel picks a port for a
    socket of that kind, as binding port 0 does."""
    top = _ephemeral_low() - 1
    bottom = max(_LOWEST, top - _SPAN)
    if top - bottom >= 256:
        for _ in range(500):
            port = _rng.randint(bottom, top)
            if port not in _given and _free_both(host, port):
                _given.add(port)
                return port
    for _ in range(50):
        port = _kernel_port(kind, host)
        if port not in _given and _free_both(host, port):
            _given.add(port)
            return port
    raise OSError(f"no free port found on {host}")


def free_port_range(count: int, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive ports of ``host`` that :func:`free_port` could each hand out now (free
    for TCP and UDP, below the ephemeral range, not given out before); all ``count`` are given out."""
    top = _ephemeral_low() - 1
    bottom = max(_LOWEST, top - _SPAN)
    if top - bottom >= 256 + count:
        for _ in range(500):
            first = _rng.randint(bottom, top - count + 1)
            ports = range(first, first + count)
            if not _given.intersection(ports) and all(_free_both(host, port) for port in ports):
                _given.update(ports)
                return first
    raise OSError(f"no {count} consecutive free ports found on {host} below the ephemeral range")
