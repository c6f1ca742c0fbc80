"""Kernel relays: two connected TCP sockets joined with ``os.splice`` through a pipe per direction.

:class:`SpliceRelay` moves bytes from one socket into a pipe and from the pipe into the other socket, both with
``splice(2)`` (``SPLICE_F_MOVE | SPLICE_F_NONBLOCK``): the bytes never enter Python. It is driven by the event
loop's readiness callbacks (``add_reader`` / ``add_writer``), one reader and one writer per socket: a direction
reads its source while its pipe has room and writes its destination while the pipe holds bytes. What a direction
must send before the spliced bytes (``to_a`` / ``to_b``: what an earlier relay had not written yet) goes first,
with ``send``.

``count_b(written, read)`` is told of the bytes written to ``b`` and read from ``b`` as they move (a spliced
lite-tls stream's dedicated connection: its bytes are counted with the tunnel's), the prefix ``to_b`` included.

An end of stream is passed on as a half-close once the pipe is empty; the relay is over when both directions
ended (both sockets are closed then) or at the first error of either socket (both are reset: SO_LINGER 0).
``SPLICE_AVAILABLE`` is False where the platform has no ``os.splice`` (then nobody builds one).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Callable
from typing import Final

__all__ = ["SPLICE_AVAILABLE", "SpliceRelay"]

#: ``os.splice`` exists (Linux, Python 3.10+)
SPLICE_AVAILABLE: Final = hasattr(os, "splice")

#: what one splice call moves at most, and the pipe size asked for (the kernel may give less)
_CHUNK: Final = 1 << 20
_F_SETPIPE_SZ: Final = 1031
_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
_AGAIN: Final = (BlockingIOError, InterruptedError)


class _Direction:
    """``src`` -> pipe -> ``dst``."""

    __slots__ = ("dst", "ended", "in_pipe", "prefix", "r", "src", "w")

    def __init__(self, src: socket.socket, dst: socket.socket, prefix: bytes, ended: bool) -> None:
        self.src = src
        self.dst = dst
        self.prefix = memoryview(prefix) if prefix else None
        self.ended = ended  # the source's end of stream was seen
        self.in_pipe = 0
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.w, _F_SETPIPE_SZ, _CHUNK)

    @property
    def done(self) -> bool:
        """The end of stream went on (or the direction was already over)."""
        return self.ended and not self.in_pipe and self.prefix is None

    def close(self) -> None:
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)


class SpliceRelay:
    """Relays ``a`` <-> ``b`` in the kernel until both directions ended or one socket failed; ``on_done(moved)``
    is called once, after both sockets are closed, with the bytes moved ``(a_to_b, b_to_a)`` (prefixes
    included). ``a_ended`` / ``b_ended``: that socket's input had ended already (its FIN was seen); ``a_shut`` /
    ``b_shut``: that socket's output is to be shut, after its prefix (nothing of the other's input goes to it)."""

    __slots__ = ("_a", "_b", "_count_b", "_dirs", "_done", "_loop", "_moved", "_on_done", "_watch")

    def __init__(
        self,
        a: socket.socket,
        b: socket.socket,
        *,
        to_a: bytes = b"",
        to_b: bytes = b"",
        a_ended: bool = False,
        b_ended: bool = False,
        a_shut: bool = False,
        b_shut: bool = False,
        on_done: Callable[[tuple[int, int]], None] | None = None,
        count_b: Callable[[int, int], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._count_b = count_b
        self._a, self._b = a, b
        a.setblocking(False)
        b.setblocking(False)
        self._on_done = on_done
        self._done = False
        self._moved = [len(to_b), len(to_a)]
        # a socket whose output is to be shut gets its prefix, then its FIN, and nothing of the other's input
        self._dirs = (_Direction(a, b, to_b, a_ended or b_shut), _Direction(b, a, to_a, b_ended or a_shut))
        #: (fd, reading?) -> registered
        self._watch: set[tuple[int, bool]] = set()
        for d in self._dirs:
            if d.ended and not d.in_pipe and d.prefix is None:
                self._shut(d)
        for index in (0, 1):
            self._step(index)

    @property
    def finished(self) -> bool:
        return self._done

    @property
    def moved(self) -> int:
        """Bytes moved so far, both ways (for an idle timer)."""
        return self._moved[0] + self._moved[1]

    def close(self) -> None:
        """End the relay now: both sockets are reset."""
        self._finish(reset=True)

    # ------------------------------------------------------------------ readiness
    def _set(self, fd: int, reading: bool, on: bool, index: int) -> None:
        key = (fd, reading)
        if on == (key in self._watch):
            return
        if on:
            self._watch.add(key)
            if reading:
                self._loop.add_reader(fd, self._step, index)
            else:
                self._loop.add_writer(fd, self._step, index)
        else:
            self._watch.discard(key)
            if reading:
                self._loop.remove_reader(fd)
            else:
                self._loop.remove_writer(fd)

    def _step(self, index: int) -> None:
        """Move what can be moved in direction ``index`` now, then watch for what it waits on."""
        if self._done:
            return
        d = self._dirs[index]
        try:
            want_read, want_write = self._move(d, index)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ETIMEDOUT):
                raise
            self._finish(reset=True)
            return
        if self._done:
            return
        self._set(d.src.fileno(), True, want_read, index)
        self._set(d.dst.fileno(), False, want_write, index)
        if all(x.done for x in self._dirs):
            self._finish(reset=False)

    def _move(self, d: _Direction, index: int) -> tuple[bool, bool]:
        """Returns (wait for the source to be readable, wait for the destination to be writable)."""
        dst = d.dst.fileno()
        while d.prefix is not None:
            try:
                sent = d.dst.send(d.prefix)
            except _AGAIN:
                return False, True
            if index == 0 and self._count_b is not None:
                self._count_b(sent, 0)
            if sent == len(d.prefix):
                d.prefix = None
                if d.ended and not d.in_pipe:
                    self._shut(d)
            else:
                d.prefix = d.prefix[sent:]
        src = d.src.fileno()
        while True:
            progressed = False
            if d.in_pipe:
                try:
                    n = os.splice(d.r, dst, d.in_pipe, flags=_FLAGS)
                except _AGAIN:
                    n = -1
                if n > 0:
                    d.in_pipe -= n
                    self._moved[index] += n
                    progressed = True
                    if index == 0 and self._count_b is not None:
                        self._count_b(n, 0)
                    if not d.in_pipe and d.ended:
                        self._shut(d)
            if not d.ended and d.in_pipe < _CHUNK:
                try:
                    n = os.splice(src, d.w, _CHUNK - d.in_pipe, flags=_FLAGS)
                except _AGAIN:
                    n = -1
                if n == 0:
                    d.ended = True
                    if not d.in_pipe:
                        self._shut(d)
                        return False, False
                elif n > 0:
                    d.in_pipe += n
                    progressed = True
                    if index == 1 and self._count_b is not None:
                        self._count_b(0, n)
            if not progressed:
                break
        # no progress either way: bytes left in the pipe mean the destination is full (wait for it, not for the
        # source, which would wake us with a full pipe); an empty pipe waits for the source
        if d.in_pipe:
            return False, True
        return not d.ended, False

    def _shut(self, d: _Direction) -> None:
        with contextlib.suppress(OSError):
            d.dst.shutdown(socket.SHUT_WR)

    def _finish(self, *, reset: bool) -> None:
        if self._done:
            return
        self._done = True
        for fd, reading in list(self._watch):
            if reading:
                self._loop.remove_reader(fd)
            else:
                self._loop.remove_writer(fd)
        self._watch.clear()
        for d in self._dirs:
            d.close()
        for sock in (self._a, self._b):
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
        if self._on_done is not None:
            self._on_done((self._moved[0], self._moved[1]))
