"""Blocking reads with a time limit, for the threads and start-up code that run outside any event loop.

A server's supervisor (:mod:`vtunnel.apps.workers`) waits for each worker's readiness byte on a pipe, and its
metrics endpoint's thread reads the workers' answers from their channels (:mod:`vtunnel.apps.worker_metrics`);
neither has an event loop to wait in. :func:`read_within` is that wait, the only ``select`` of the program.
"""

from __future__ import annotations

import os
import select
import socket

__all__ = ["read_within"]


def read_within(source: socket.socket | int, size: int, timeout: float) -> bytes | None:
    """Up to ``size`` bytes from ``source`` (a socket or a pipe's descriptor) as soon as it is readable, waiting
    ``timeout`` seconds at most: None when nothing came in time, ``b""`` at its end or when reading it fails."""
    readable, _, _ = select.select([source], [], [], max(0.0, timeout))
    if not readable:
        return None
    try:
        return source.recv(size) if isinstance(source, socket.socket) else os.read(source, size)
    except OSError:
        return b""
