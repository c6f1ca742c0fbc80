"""Fast batched UDP I/O on the asyncio event loop (asyncio or uvloop; not trio).

asyncio's ``DatagramProtocol`` costs a callback and an object per datagram and tops out near 50k datagrams/s.
Here a readiness callback (``loop.add_reader``) drains up to a batch of datagrams with non-blocking
``recvfrom_into`` and hands the whole batch to one callback, so the layer above can process every datagram of
the batch and answer (ACK) once. Sends are non-blocking ``sendto``; a full socket buffer drops the datagram,
exactly as a congested link would (the ARQ above retransmits). Socket buffers are enlarged (4 MiB by default).

Two readers: :class:`DatagramSocket` hands over one ``(datagram, source)`` per datagram (what a relay needs);
:class:`CoalescingSocket` asks Linux for UDP generic receive offload, so one ``recvmsg`` returns a run of
equal-size datagrams from one source in one buffer, handed over as ``(buffer, segment size, source)``. On
loopback a run sent with segmentation offload arrives whole, so neither kernel splits it. Where GRO is not
available every run is a single datagram. A lone small datagram read first in a wakeup (an exchange's next
message, typically) is handed over on its own before the socket is read again (:data:`LONE_BYTES`): its answer
leaves before any further read. If nothing was sent for it, the wakeup ends there (readiness is level-triggered:
the loop calls again for anything that arrived meanwhile), which saves a read that finds the socket empty per
message; otherwise reading goes on until the socket is empty, as in every wakeup.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from itertools import groupby
from typing import Final, TypeAlias

import structlog

from vtunnel.io.listening import given

__all__ = [
    "DONT_FRAGMENT",
    "Address",
    "BatchHandler",
    "CoalescingSocket",
    "DatagramSocket",
    "Run",
    "RunHandler",
    "Segments",
    "forbid_fragmentation",
    "open_client_socket",
    "open_udp_listener",
    "open_udp_socket",
    "resolve_udp",
    "segment_runs",
    "split_run",
]

log = structlog.get_logger("vtunnel.io.datagrams")

Address: TypeAlias = tuple[str, int]
#: receives one batch of ``(datagram, source address)``
BatchHandler: TypeAlias = Callable[[list[tuple[bytes, Address]]], None]
#: datagrams received together: ``(buffer, segment, source)``; ``buffer`` holds datagrams of ``segment`` bytes
#: each, back to back, the last possibly shorter (``segment >= len(buffer)``: exactly one datagram)
Run: TypeAlias = tuple[bytes, int, Address]
#: receives one batch of runs
RunHandler: TypeAlias = Callable[[list[Run]], None]
#: datagrams sent together: ``(buffer, segment)``, datagrams of ``segment`` bytes each back to back, the last
#: possibly shorter (``segment >= len(buffer)``: exactly one datagram); what :meth:`CoalescingSocket.send_runs`
#: takes, as :func:`segment_runs` cuts a batch
Segments: TypeAlias = tuple[bytes, int]

MAX_DATAGRAM: Final = 65535
DEFAULT_BATCH: Final = 256
#: what a send may fail with and only lose its datagrams, whatever they are: a full buffer, or an ICMP error
#: for an earlier one
_BUSY_SEND_ERRORS: Final = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.ECONNREFUSED})
#: ... and a datagram larger than the link takes with the don't-fragment bit set (a path MTU probe: see
#: :func:`forbid_fragmentation`), which a segmented send refuses for its whole run (see ``_send_segments``)
_SOFT_SEND_ERRORS: Final = _BUSY_SEND_ERRORS | {errno.EMSGSIZE}
#: whether :func:`forbid_fragmentation` can work here (Linux's IP_MTU_DISCOVER)
DONT_FRAGMENT: Final = sys.platform == "linux"
#: Linux's IP_MTU_DISCOVER / IPV6_MTU_DISCOVER and their PROBE mode (the socket module names not all of them)
_IP_MTU_DISCOVER: Final = 10
_IPV6_MTU_DISCOVER: Final = 23
_PMTUDISC_PROBE: Final = 3
#: Linux UDP generic segmentation offload: one sendmsg carries many equal-size datagrams
SOL_UDP: Final = 17
UDP_SEGMENT: Final = 103
GSO_MAX_SEGMENTS: Final = 64
GSO_MAX_BYTES: Final = 65000
_gso_usable = hasattr(socket.socket, "sendmsg") and sys.platform == "linux"
#: Linux UDP generic receive offload: one recvmsg returns a run of equal-size datagrams
UDP_GRO: Final = 104
_GRO_SIZE = struct.Struct("=i")
_SEGMENT = struct.Struct("=H")
_GRO_ANCILLARY: Final = socket.CMSG_SPACE(_GRO_SIZE.size) if hasattr(socket, "CMSG_SPACE") else 0
#: a plain int: ``&`` on the IntFlag member is a Python-level call per datagram
_MSG_TRUNC: Final = int(socket.MSG_TRUNC)
#: one coalescing read callback stops after this many bytes (it also stops at ``batch`` system calls)
RUN_BATCH_BYTES: Final = 1024 * 1024
#: a lone datagram up to this size read first in a wakeup is handed over before the socket is read again: the
#: answer of a request/response exchange goes on at once, and the read that would find the socket empty is
#: skipped when nothing was sent for it (``_UDPSocket._lone``)
LONE_BYTES: Final = 512


def split_run(buffer: bytes, segment: int) -> list[bytes | memoryview]:
    """The datagrams of one run: ``buffer`` itself when it holds one, else views into it."""
    size = len(buffer)
    if segment <= 0 or segment >= size:
        return [buffer]
    view = memoryview(buffer)
    return [view[offset : offset + segment] for offset in range(0, size, segment)]


def segment_runs(sizes: Sequence[int], grow: int = 0) -> list[tuple[int, int]]:
    """How a batch of datagrams of ``sizes`` (in order) goes out in as few segmented sends as Linux allows:
    ``(start, end)`` index ranges, in order, covering the batch, each a run one UDP GSO send takes (datagrams of
    equal size, the last possibly shorter; at most :data:`GSO_MAX_SEGMENTS` datagrams and :data:`GSO_MAX_BYTES`
    bytes), once each datagram has grown by ``grow`` bytes (a sealer's overhead). Equal sizes are counted in C
    (``list.count``, ``groupby``): a bulk batch is one run or a few groups, not a loop per datagram."""
    count = len(sizes)
    if count <= 1:
        return [(0, count)] if count else []
    size = sizes[0]
    if count <= GSO_MAX_SEGMENTS and 0 < size + grow <= GSO_MAX_BYTES // count:
        equal = sizes.count(size)
        if equal == count or (equal == count - 1 and sizes[-1] < size):  # one run: the common batch
            return [(0, count)]
    if grow:
        sizes = [n + grow for n in sizes]
    runs: list[tuple[int, int]] = []
    start = 0
    room = 0  # how many more bytes the last run may take as a shorter tail (0: none, it has one or is full)
    for size, group in groupby(sizes):
        end = start + len(list(group))
        if 0 < size <= room and size < sizes[start - 1]:  # the last run takes this group's first as its tail
            runs[-1] = (runs[-1][0], start + 1)
            start += 1
        room = 0
        if start == end:
            continue
        per = max(1, min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size)) if size else 1
        runs.extend((first, min(first + per, end)) for first in range(start, end, per))
        last = runs[-1][1] - runs[-1][0]
        if size and last < GSO_MAX_SEGMENTS:
            room = GSO_MAX_BYTES - last * size
        start = end
    return runs


def _enable_gro(sock: socket.socket) -> bool:
    if sys.platform != "linux" or not _GRO_ANCILLARY or not hasattr(sock, "recvmsg_into"):
        return False
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def resolve_udp(host: str, port: int) -> tuple[socket.AddressFamily, Address]:
    """The first UDP address for ``host:port`` (numeric hosts do not touch DNS)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"no address for {host}:{port}")
    family, _type, _proto, _name, sockaddr = infos[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


def forbid_fragmentation(sock: socket.socket) -> None:
    """Send every datagram of ``sock`` whole, with the IP don't-fragment bit, whatever the kernel believes the
    path's MTU to be (Linux's ``IP_PMTUDISC_PROBE``): a datagram the path cannot carry is lost, or refused at
    once (EMSGSIZE, dropped like a full buffer's) if the first link cannot, instead of being cut into
    fragments. What packetization-layer path MTU discovery (rudp's) needs; raises :class:`OSError` where it
    cannot be set (see :data:`DONT_FRAGMENT`)."""
    if not DONT_FRAGMENT:
        raise OSError(errno.ENOPROTOOPT, "the don't-fragment bit cannot be set on this platform")
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER, _PMTUDISC_PROBE)
        with contextlib.suppress(OSError):  # (IPv4 peers of a dual-stack socket)
            sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _PMTUDISC_PROBE)
    else:
        sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _PMTUDISC_PROBE)


def open_udp_socket(
    family: socket.AddressFamily, *, bind: Address | None = None, sockbuf: int = 4 * 1024 * 1024
) -> socket.socket:
    """A non-blocking UDP socket with large buffers, bound to ``bind`` (or an ephemeral port)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):  # capped by the system: keep what we got
                sock.setsockopt(socket.SOL_SOCKET, option, sockbuf)
        if bind is not None:
            sock.bind(bind)
        else:
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
    except BaseException:
        sock.close()
        raise
    return sock


def open_udp_listener(
    family: socket.AddressFamily, address: Address, *, sockbuf: int = 4 * 1024 * 1024
) -> socket.socket:
    """A listener's UDP socket on ``address``: :func:`open_udp_socket`, or the socket this process was given for
    it (:func:`vtunnel.io.listening.given`: a worker's, bound by its supervisor)."""
    sock = given(socket.SOCK_DGRAM, family, address)
    if sock is None:
        return open_udp_socket(family, bind=address, sockbuf=sockbuf)
    sock.setblocking(False)
    return sock


def open_client_socket(
    family: socket.AddressFamily, server: Address, *, sockbuf: int = 4 * 1024 * 1024
) -> socket.socket:
    """A socket for talking to ``server``, bound where ``connect()`` would bind it, but not connected.

    A connected UDP socket takes an ICMP error (a port unreachable while the server is not up yet) as a socket
    error, and libuv (so uvloop) stops watching a socket that reports one, for good: the session would never
    hear the server once it came up. Unconnected, the kernel keeps such errors to itself. The caller sends with
    ``sendto(server)`` and drops what comes from anywhere else.
    """
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(server)
        local = probe.getsockname()
    return open_udp_socket(family, bind=(str(local[0]), 0), sockbuf=sockbuf)


class _UDPSocket:
    """One UDP socket driven by readiness callbacks on the running asyncio loop: the send side and closing."""

    __slots__ = ("_batch", "_buffer", "_closed", "_gso", "_loop", "_view", "dropped_sends", "sent", "sock")

    def __init__(self, sock: socket.socket, *, batch: int) -> None:
        self.sock = sock
        self._batch = batch
        self._buffer = bytearray(MAX_DATAGRAM)
        self._view = memoryview(self._buffer)
        self._closed = False
        self._loop = asyncio.get_running_loop()
        #: datagrams dropped because the socket buffer was full
        self.dropped_sends = 0
        #: datagrams handed to the kernel
        self.sent = 0
        self._gso = _gso_usable

    def _start_reading(self) -> None:
        self._loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        raise NotImplementedError

    def _read_failed(self, exc: OSError) -> bool:
        """What a failed non-blocking read means: ``True`` to read on, ``False`` to stop this wakeup.

        Nothing waiting (EAGAIN) or a signal stops quietly; an ICMP error for an earlier send (refused) is only
        that, so reading goes on; anything else is logged, unless the socket is being closed.
        """
        if isinstance(exc, ConnectionRefusedError):
            return True
        if not isinstance(exc, BlockingIOError | InterruptedError) and not self._closed:
            log.warning("udp receive failed", error=repr(exc))
        return False

    @property
    def local_address(self) -> Address:
        name = self.sock.getsockname()
        return str(name[0]), int(name[1])

    def sendto(self, data: bytes, address: Address) -> None:
        if self._closed:
            return
        try:
            self.sock.sendto(data, address)
            self.sent += 1
        except OSError as exc:
            self._send_failed(exc, address)

    def _send_failed(self, exc: OSError, address: Address) -> None:
        if exc.errno not in _SOFT_SEND_ERRORS:
            log.warning("udp send failed", error=repr(exc), peer=address)
        self.dropped_sends += 1

    def send(self, data: bytes) -> None:
        """Send on a connected socket."""
        if self._closed:
            return
        try:
            self.sock.send(data)
            self.sent += 1
        except OSError as exc:
            if exc.errno not in _SOFT_SEND_ERRORS:
                log.warning("udp send failed", error=repr(exc))
            self.dropped_sends += 1

    def sendto_many(self, datagrams: list[bytes], address: Address) -> None:
        """Send a batch; runs of equal-size datagrams go out in one system call (UDP GSO) where Linux allows
        (:func:`segment_runs`)."""
        if len(datagrams) == 1:  # (sendto inline: a message of an exchange is one datagram)
            if self._closed:
                return
            try:
                self.sock.sendto(datagrams[0], address)
                self.sent += 1
            except OSError as exc:
                self._send_failed(exc, address)
            return
        if not self._gso:
            for data in datagrams:
                self.sendto(data, address)
            return
        sizes = list(map(len, datagrams))
        for start, end in segment_runs(sizes):
            if end - start == 1:
                self.sendto(datagrams[start], address)
            else:
                self._send_segments(b"".join(datagrams[start:end]), sizes[start], end - start, address)

    def send_runs(self, runs: Sequence[Segments], address: Address) -> None:
        """Send runs of datagrams, each ``(buffer, segment)``: datagrams of ``segment`` bytes back to back, the last
        possibly shorter, as :func:`segment_runs` cuts a batch (``segment >= len(buffer)``: one datagram); each
        run in one system call (UDP GSO) where Linux allows."""
        for buffer, segment in runs:
            size = len(buffer)
            if segment >= size:
                self.sendto(buffer, address)
            elif self._gso:
                self._send_segments(buffer, segment, -(-size // segment), address)
            else:
                for offset in range(0, size, segment):
                    self.sendto(buffer[offset : offset + segment], address)

    def _send_segments(self, buffer: bytes, size: int, count: int, address: Address) -> None:
        if self._closed:
            return
        try:
            self.sock.sendmsg([buffer], [(SOL_UDP, UDP_SEGMENT, _SEGMENT.pack(size))], 0, address)
            self.sent += count
        except OSError as exc:
            if exc.errno in _BUSY_SEND_ERRORS:
                self.dropped_sends += count
                return
            # the run goes datagram by datagram. If its first (full-size) datagram then leaves, segmentation is
            # what the kernel refused (an old kernel, another OS, a device without it): plain sends from now on.
            # If that one is refused too, it was larger than the link takes with the don't-fragment bit (a path
            # MTU probe, which Linux refuses in a segmented send with EINVAL): only it is lost
            sent = self.sent
            self.sendto(buffer[:size], address)
            if self.sent > sent:
                log.info(
                    "udp segmentation offload unavailable, sending datagrams one by one", error=repr(exc)
                )
                self._gso = False
            for offset in range(size, len(buffer), size):
                self.sendto(buffer[offset : offset + size], address)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ValueError, RuntimeError):  # the loop is already closed
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


class DatagramSocket(_UDPSocket):
    """Hands every received datagram over on its own, with its source: ``handler([(datagram, source), ...])``."""

    __slots__ = ("_handler",)

    def __init__(self, sock: socket.socket, handler: BatchHandler, *, batch: int = DEFAULT_BATCH) -> None:
        super().__init__(sock, batch=batch)
        self._handler = handler
        self._start_reading()

    def _on_readable(self) -> None:
        recv = self.sock.recvfrom_into
        view = self._view
        batch: list[tuple[bytes, Address]] = []
        for _ in range(self._batch):
            try:
                size, source = recv(view)
            except BlockingIOError:  # read empty: the common end of a wakeup, without a further call
                break
            except OSError as exc:
                if self._read_failed(exc):
                    continue
                break
            batch.append((view[:size].tobytes(), source if len(source) == 2 else (source[0], source[1])))
        if batch and not self._closed:
            self._handler(batch)


class CoalescingSocket(_UDPSocket):
    """Hands received datagrams over in runs: ``handler([(buffer, segment, source), ...])`` (see :data:`Run`).

    With Linux UDP GRO a run holds up to 64 datagrams of one source read with one system call; without it every
    run is one datagram. :attr:`coalescing` says which.
    """

    __slots__ = ("_handler", "coalescing")

    def __init__(
        self, sock: socket.socket, handler: RunHandler, *, batch: int = DEFAULT_BATCH, gro: bool = True
    ) -> None:
        super().__init__(sock, batch=batch)
        self._handler = handler
        #: whether the kernel coalesces received datagrams (UDP GRO; ``gro=False`` never asks for it)
        self.coalescing = gro and _enable_gro(sock)
        self._start_reading()

    def _on_readable(self) -> None:
        if not self.coalescing:
            self._read_single()
            return
        recv = self.sock.recvmsg_into
        buffers = [self._view]
        view = self._view
        runs: list[Run] = []
        budget = RUN_BATCH_BYTES
        first = True
        for _ in range(self._batch):
            try:
                size, ancillary, flags, source = recv(buffers, _GRO_ANCILLARY)
            except BlockingIOError:  # read empty: the common end of a wakeup, without a further call
                break
            except OSError as exc:
                if self._read_failed(exc):
                    continue
                break
            if flags & _MSG_TRUNC:  # larger than any UDP datagram: cannot happen, drop it if it does
                continue
            segment = size
            for level, kind, data in ancillary:
                if level == SOL_UDP and kind == UDP_GRO and len(data) >= _GRO_SIZE.size:
                    segment = int(_GRO_SIZE.unpack_from(data)[0])
            runs.append(
                (view[:size].tobytes(), segment, source if len(source) == 2 else (source[0], source[1]))
            )
            if first:
                first = False
                if segment >= size and size <= LONE_BYTES:  # a lone small datagram goes up before reading on
                    if self._lone(runs):
                        return
                    runs = []
            budget -= size
            if budget <= 0:
                break
        if runs and not self._closed:
            self._handler(runs)

    def _lone(self, runs: list[Run]) -> bool:
        """Hand over a lone small datagram read first in a wakeup; whether the wakeup ends there.

        It ends when the socket is closed, and when nothing was sent for the datagram (a request or an answer of
        an exchange, whose ACK waits to ride on the next message): the socket is then most likely empty, and the
        read that would find it so is saved, since readiness is level-triggered (the loop calls again at once
        for anything that did arrive). A datagram that made the handler send (an ACK that let a bulk sender
        send on) keeps the wakeup reading until the socket is empty, so such a sender's ACKs are still taken in
        batches."""
        sent = self.sent
        self._handler(runs)
        return self._closed or self.sent == sent

    def _read_single(self) -> None:
        recv = self.sock.recvfrom_into
        view = self._view
        runs: list[Run] = []
        first = True
        for _ in range(self._batch):
            try:
                size, source = recv(view)
            except BlockingIOError:  # read empty: the common end of a wakeup, without a further call
                break
            except OSError as exc:
                if self._read_failed(exc):
                    continue
                break
            runs.append((view[:size].tobytes(), size, source if len(source) == 2 else (source[0], source[1])))
            if first:
                first = False
                if size <= LONE_BYTES:  # a lone small datagram goes up before reading on
                    if self._lone(runs):
                        return
                    runs = []
        if runs and not self._closed:
            self._handler(runs)
