"""Lean TCP transports for relays: one epoll set watches every relayed socket of an event loop.

An event loop's own TCP transport costs about 1.1 KB per connection under uvloop (its transport object, the libuv
handle, the loop's bookkeeping), and a relay that sits idle needs none of it.  :class:`SocketTransport` is an
:class:`asyncio.Transport` holding only the socket and a few flags; a per-loop :class:`SocketWatcher` puts every
such socket in one epoll set and the loop watches that set's descriptor alone.  An idle relayed connection then
costs its socket object, the transport (~130 bytes) and a dict entry.  Where epoll is missing, the watcher falls
back to the loop's own ``add_reader`` / ``add_writer`` per socket: the same transport, the loop's usual cost.

The transport keeps the semantics the relay's socket end (:class:`vtunnel.apps.pipe.SocketEnd`) relies on, the
same as asyncio's:
``data_received`` / ``eof_received`` (returning true keeps the socket open for writing) / ``connection_lost``;
``pause_reading`` and ``resume_reading`` (and, beyond asyncio, ``limit_reads``: how much the protocol takes per
read); ``write`` sends at once and buffers what the kernel does not take, calling
the protocol's ``pause_writing`` above the high-water mark and ``resume_writing`` once below the low one;
``write_eof`` and ``close`` wait for the buffer to drain; ``abort`` does not.  TCP_NODELAY is set on the TCP sockets
this module accepts and connects, once each (:func:`~vtunnel.io.tuning.tune_tcp`), as asyncio does;
:func:`attach_socket` leaves a socket's options as its caller set them. A pause of reading changes the epoll set
only once the paused socket reports input, so the pause and resume around each window of a relayed stream cost no
system call when nothing came in between.

Epoll's hazards (trio's ``_io_epoll.py`` lists them) are guarded where they can be: a registration is changed with
what the set really holds in mind (modify falls back to register on ENOENT and the other way on EEXIST; a number no
longer open is left for the transport's next read or write to fail on); an event for a descriptor no transport owns
is unregistered, and when that number is closed but a duplicate descriptor keeps the socket in the set (it can then
never be named again, and level-triggered it would be reported on every pass) the set is replaced by a new one
holding the live transports. The rule that keeps all of this rare: a watched socket is closed by its transport only.

:func:`open_relay_listener` is the accepting half: it binds like ``loop.create_server`` and hands each accepted
socket, with a protocol from the factory, to the watcher: no task and no loop transport per connection. Its
``on_accept`` and ``on_close`` callbacks tell the owner when each connection begins and when its socket is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import select
import socket
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from itertools import islice
from typing import Any, Final, Generic, NamedTuple, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.streams.stapled
import structlog
from anyio.abc import ByteStream, SocketAttribute

from vtunnel.io.limits import AcceptBackoff, ThrottledWarning, is_out_of_resources, open_file_limit
from vtunnel.io.listening import bind_stream_sockets
from vtunnel.io.tuning import tune_tcp

__all__ = [
    "DetachedSocket",
    "LeanSocketStream",
    "LeanStreamListener",
    "RelayListener",
    "SocketTransport",
    "SocketWatcher",
    "adopt_socket_listener",
    "attach_socket",
    "connect_lean",
    "connect_tcp",
    "finish_tcp_connect",
    "open_lean_listener",
    "open_relay_listener",
    "start_tcp_connect",
]

log = structlog.get_logger("vtunnel.io.stream_sockets")

#: bytes asked of the kernel per read, into one buffer per watcher, copied out at the size read. Reading
#: straight into a new ``bytes`` (``recv(n)``) allocates n bytes first: at 256 KiB that is above the C
#: library's mmap threshold and cost ~19 us per read of a 64-byte message here (``recv_into`` + copy: ~3 us);
#: smaller reads would call the protocol four times as often in bulk (measured ~8% less throughput at 64 KiB)
READ_SIZE: Final = 256 * 1024
#: seconds before accepting again after a connection was closed to make room (its descriptor is freed when the
#: task that owns it runs)
FREED_RETRY: Final = 0.01
#: buffered chunks handed to one ``sendmsg`` (well under any system's IOV_MAX)
SEND_VECTOR: Final = 64
#: write-buffer marks (asyncio's defaults): pause the protocol above HIGH, resume it at or below LOW
HIGH_WATER: Final = 64 * 1024
LOW_WATER: Final = 16 * 1024
#: readiness events taken from the epoll set per wake-up; more stay pending and wake the loop again at once
EVENTS_PER_WAKEUP: Final = 256
#: connections accepted per wake-up of a listener, and the pause after the process ran out of descriptors
ACCEPT_BATCH: Final = 64

_IN: Final = 1  # want readable
_OUT: Final = 4  # want writable
_HAS_EPOLL: Final = hasattr(select, "epoll")
#: the epoll events that make a socket read, or write (each a hang-up or an error too): plain ints, not three
#: module attribute loads per socket and pass
_READ_EVENTS: Final = int(select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) if _HAS_EPOLL else 0
_WRITE_EVENTS: Final = int(select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR) if _HAS_EPOLL else 0

#: the protocol type a listener's factory makes
P = TypeVar("P", bound=asyncio.Protocol)


class SocketWatcher:
    """Readiness for many sockets with one descriptor in the event loop (epoll), or per socket (fallback)."""

    __slots__ = (
        "__weakref__",
        "_epoll",
        "_loop",
        "_pass_end",
        "_read_view",
        "_resumed",
        "_transports",
        "rebuilds",
        "uses_epoll",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, *, use_epoll: bool = _HAS_EPOLL) -> None:
        self._loop = loop
        self._transports: dict[int, SocketTransport] = {}
        #: every read of this loop's sockets lands here first (reads never overlap: each is copied out at once)
        self._read_view = memoryview(bytearray(READ_SIZE))
        self._epoll: Any = None
        #: one epoll set for every socket (else the loop's own readers and writers, one per socket)
        self.uses_epoll = use_epoll
        #: times the set was replaced because a registration could not be removed (see ``_rebuild``)
        self.rebuilds = 0
        #: while a pass hands readiness to the sockets: what runs once it is over (:meth:`at_pass_end`)
        self._pass_end: list[Callable[[], None]] | None = None
        #: transports to read in the next pass of resumed ones (``SocketTransport._read_waiting``)
        self._resumed: list[SocketTransport] = []
        if use_epoll:
            self._epoll = select.epoll()
            loop.add_reader(self._epoll.fileno(), self._ready)

    def __len__(self) -> int:
        return len(self._transports)

    def at_pass_end(self, callback: Callable[[], None]) -> bool:
        """While a pass hands readiness to several of this watcher's sockets (the ready ones, or the resumed ones
        whose input waited), run ``callback`` once that pass is over and return True, so that what the protocols of
        many sockets read in one pass and wrote on can leave in one write; False outside such a pass (act now). A
        pass over one socket is none: its output has nothing to leave with, and goes at once (a message of an
        exchange leaves before its reader's bookkeeping, not after). Ask once per pass: each call adds a call."""
        pass_end = self._pass_end
        if pass_end is None:
            return False
        pass_end.append(callback)
        return True

    def _end_pass(self) -> None:
        callbacks, self._pass_end = self._pass_end, None
        for callback in callbacks or ():
            try:
                callback()
            except Exception as exc:  # the others still run: each may hold another's output
                log.error("pass-end callback failed", error=repr(exc), exc_info=True)

    def _read_soon(self, transport: SocketTransport) -> None:
        """Read ``transport`` in the next pass of resumed sockets (one callback for all of them)."""
        resumed = self._resumed
        if not resumed:
            self._loop.call_soon(self._read_resumed)
        resumed.append(transport)

    def _read_resumed(self) -> None:
        resumed, self._resumed = self._resumed, []
        if len(resumed) == 1:  # one socket: no pass (see at_pass_end)
            resumed[0]._read_waiting()
            return
        self._pass_end = []
        try:
            for transport in resumed:
                transport._read_waiting()
        finally:
            self._end_pass()

    def close(self) -> None:
        """Stop watching; meant for after the last transport is gone (any left are no longer served)."""
        if self._epoll is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None

    # ------------------------------------------------------------------ registration (used by the transport)
    def _add(self, fd: int, transport: SocketTransport) -> None:
        self._transports[fd] = transport

    def _set(self, fd: int, transport: SocketTransport, old: int, new: int) -> None:
        """Watch ``fd`` for ``new`` instead of ``old`` (0: not watched at all).

        With epoll, a stop of reading alone is lazy: the registration stays as it is (``transport._watched``)
        until the socket reports something (:meth:`_ready` then drops it), so the pause and resume a relay does
        around each window of a stream cost no system call when no input came in between. Input that came while
        paused is read at the resume without registering again (``SocketTransport._update``), so a relay that
        stops at each window of a busy stream costs no system call of epoll either. What is added, and
        writability no longer wanted (a writable socket is reported on every pass), is applied at once."""
        if not self.uses_epoll:
            self._fallback_set(fd, transport, old, new)
            return
        watched = transport._watched
        if new & ~watched or (watched & _OUT and not new & _OUT):
            self._watch(fd, transport, new)

    def _watch(self, fd: int, transport: SocketTransport, mask: int) -> None:
        """Make the epoll set watch ``fd`` for exactly ``mask``."""
        epoll = self._epoll
        if epoll is None:
            return  # closed
        watched, transport._watched = transport._watched, mask
        if not mask:
            # unregistered, not left with an empty mask: epoll reports a hang-up whatever the mask, and a
            # paused socket whose peer hung up would wake the loop for ever
            _unregister(epoll, fd)
        else:
            _register(epoll, fd, _epoll_mask(mask), known=bool(watched))

    def _remove(self, fd: int, transport: SocketTransport, old: int) -> None:
        if self._transports.get(fd) is transport:
            del self._transports[fd]
        if not self.uses_epoll:
            if old:
                self._fallback_set(fd, transport, old, 0)
        elif transport._watched:
            self._watch(fd, transport, 0)

    def _fallback_set(self, fd: int, transport: SocketTransport, old: int, new: int) -> None:
        """The loop's own readers and writers. A descriptor closed behind its transport is refused by the loop
        (EBADF, or not registered any more): left alone, its transport's next read or write fails and closes it."""
        loop = self._loop
        try:
            if (new ^ old) & _IN:
                if new & _IN:
                    loop.add_reader(fd, transport._read_ready)
                else:
                    loop.remove_reader(fd)
            if (new ^ old) & _OUT:
                if new & _OUT:
                    loop.add_writer(fd, transport._write_ready)
                else:
                    loop.remove_writer(fd)
        except (KeyError, ValueError):
            pass
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise

    def _rebuild(self) -> None:
        """Replace the epoll set with a new one holding only the live transports (closing the old set drops
        every registration in it, those that can no longer be named too)."""
        old = self._epoll
        if old is None:
            return
        log.warning("a watched socket was closed behind its transport: rebuilding the epoll set")
        new = select.epoll()
        for fd, transport in self._transports.items():
            transport._watched = transport._mask
            if transport._mask:
                _register(new, fd, _epoll_mask(transport._mask), known=False)
        self._loop.remove_reader(old.fileno())
        old.close()
        self._epoll = new
        self._loop.add_reader(new.fileno(), self._ready)
        self.rebuilds += 1

    # ------------------------------------------------------------------ dispatch
    def _ready(self) -> None:
        epoll = self._epoll
        if epoll is None:
            return
        try:
            ready = epoll.poll(0, EVENTS_PER_WAKEUP)
        except InterruptedError:
            return
        if len(ready) == 1:  # one socket: no pass (see at_pass_end)
            self._dispatch(epoll, ready)
            return
        self._pass_end = []
        try:
            self._dispatch(epoll, ready)
        finally:
            self._end_pass()

    def _dispatch(self, epoll: Any, ready: list[tuple[int, int]]) -> None:
        transports = self._transports
        for fd, events in ready:
            transport = transports.get(fd)
            if transport is None:
                # a registration nobody owns (a socket closed behind its transport's back while another
                # descriptor kept it open): level-triggered, it would be reported on every pass
                if not _unregister(epoll, fd):
                    self._rebuild()  # its number is closed, so only a new set can drop it
                    return
                continue
            unwanted = False  # reported for what it no longer watches for (a lazy stop of reading)
            if events & _READ_EVENTS:
                if transport._mask & _IN:
                    transport._read_ready()
                    if transports.get(fd) is not transport:
                        continue  # it closed while reading
                else:
                    unwanted = True
            if events & _WRITE_EVENTS and transport._mask & _OUT:
                transport._write_ready()
                if transports.get(fd) is not transport:
                    continue
            if unwanted and transport._watched & ~transport._mask:
                transport._waiting = True  # read at the resume, without registering again
                self._watch(fd, transport, transport._mask)  # the lazy stop happens now


def _register(epoll: Any, fd: int, mask: int, *, known: bool) -> None:
    """Watch ``fd`` for ``mask``, registering or modifying as the set really has it.

    The set and our bookkeeping can disagree when a descriptor was closed behind its transport's back (the kernel
    drops a closed descriptor's registration by itself) or its number was reused: modify then fails with ENOENT
    and register with EEXIST; each falls back to the other. A descriptor that is no longer open (EBADF) is left
    alone: its transport's next read or write fails and closes it.
    """
    try:
        if known:
            epoll.modify(fd, mask)
        else:
            epoll.register(fd, mask)
    except FileNotFoundError:
        with contextlib.suppress(OSError):
            epoll.register(fd, mask)
    except FileExistsError:
        with contextlib.suppress(OSError):
            epoll.modify(fd, mask)
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise


def _unregister(epoll: Any, fd: int) -> bool:
    """Stop watching ``fd``; ``False`` when the number is no longer open (EBADF), so the registration, if another
    descriptor keeps the socket open, cannot be named any more (already gone from the set counts as done)."""
    try:
        epoll.unregister(fd)
    except (FileNotFoundError, ValueError):
        pass
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
        return False
    return True


def _epoll_mask(mask: int) -> int:
    return (select.EPOLLIN if mask & _IN else 0) | (select.EPOLLOUT if mask & _OUT else 0)


_watchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SocketWatcher] = weakref.WeakKeyDictionary()


def watcher_for(loop: asyncio.AbstractEventLoop | None = None) -> SocketWatcher:
    """The running (or given) loop's watcher, made on first use."""
    loop = loop or asyncio.get_running_loop()
    watcher = _watchers.get(loop)
    if watcher is None:
        watcher = _watchers[loop] = SocketWatcher(loop)
    return watcher


class DetachedSocket(NamedTuple):
    """A socket a :class:`SocketTransport` gave up (:meth:`SocketTransport.detach`), with its state then."""

    sock: socket.socket
    #: written to the transport, not yet taken by the kernel: send it before anything else
    unsent: bytes
    #: the peer's FIN had arrived (nothing more to read)
    ended: bool
    #: ``write_eof`` had been called: send the FIN after ``unsent``
    write_closed: bool
    #: what the transport would have called once the socket is closed (its listener's count): call it then
    on_close: Callable[[], None] | None


class SocketTransport(asyncio.Transport):
    """An asyncio transport over one connected, non-blocking stream socket, watched by a :class:`SocketWatcher`."""

    __slots__ = (
        "_buffer",
        "_buffered",
        "_closing",
        "_eof",
        "_fd",
        "_lost",
        "_mask",
        "_on_close",
        "_protocol",
        "_read_scheduled",
        "_read_size",
        "_reading",
        "_sock",
        "_waiting",
        "_watched",
        "_watcher",
        "_write_closed",
        "_writing_paused",
    )

    def __init__(self, sock: socket.socket, protocol: asyncio.Protocol, watcher: SocketWatcher) -> None:
        # no super().__init__(): the base keeps an ``extra`` dict per transport, and get_extra_info is ours
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._watcher = watcher
        #: what the kernel has not taken yet, in the chunks it was written in (no copy, no memmove as it
        #: drains); made when first needed, dropped once empty
        self._buffer: deque[memoryview] | None = None
        self._buffered = 0
        self._mask = 0  # what the watcher watches the socket for now
        self._watched = 0  # what the epoll set has for it (more than _mask while a stop of reading is lazy)
        #: input may wait in the kernel that the epoll set does not watch for: it came while paused (the lazy
        #: stop was applied then), or the last read filled the size asked. Meaningful while not watched for input
        self._waiting = False
        self._read_scheduled = False  # _read_waiting is scheduled
        self._reading = True  # not paused by the protocol
        self._eof = False  # the peer's FIN arrived: nothing more to read
        self._write_closed = False  # write_eof() was called: FIN once the buffer is empty
        self._closing = False
        self._writing_paused = False  # the protocol was told pause_writing()
        self._lost = False
        self._on_close: Callable[[], None] | None = None  # called once the socket is closed
        self._read_size: Callable[[], int] | None = None  # the protocol's budget per read (None: READ_SIZE)

    # ------------------------------------------------------------------ asyncio.BaseTransport
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sock = self._sock
        if name == "socket":
            return sock
        try:
            if name == "peername":
                return sock.getpeername()
            if name == "sockname":
                return sock.getsockname()
        except OSError:
            return default
        return default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; send what is buffered, then close (``connection_lost(None)`` follows)."""
        if self._closing:
            return
        self._closing = True
        if self._buffered:
            self._update()  # keeps watching for room until the buffer is gone
        else:
            self._lose(None)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    # ------------------------------------------------------------------ asyncio.ReadTransport
    def is_reading(self) -> bool:
        return self._reading and not self._closing

    def pause_reading(self) -> None:
        if self._closing or not self._reading:
            return
        self._reading = False
        self._update()

    def resume_reading(self) -> None:
        if self._closing or self._reading:
            return
        self._reading = True
        self._update()

    def limit_reads(self, size: Callable[[], int] | None) -> None:
        """Ask ``size()`` before each read for the most bytes the protocol takes now (at least 1, at most
        :data:`READ_SIZE`; ``None``: :data:`READ_SIZE`). A relay reads no further ahead than its other end can
        send: what is read stays in the kernel's receive buffer, and TCP's window holds the peer back."""
        self._read_size = size

    # ------------------------------------------------------------------ asyncio.WriteTransport
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._write_closed or not data:
            return
        if not isinstance(data, bytes):
            data = bytes(data)  # the caller may reuse its buffer: keep our own copy
        buf = self._buffer
        if buf is None:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fail(exc)
                return
            if sent == len(data):
                return
            buf = self._buffer = deque()
            buf.append(memoryview(data)[sent:])
            self._buffered = len(data) - sent
            self._update()
        else:
            buf.append(memoryview(data))
            self._buffered += len(data)
        self._check_high_water()

    def writelines(self, pieces: Sequence[bytes | memoryview]) -> None:  # type: ignore[override]
        """:meth:`write` of the pieces in order with one ``sendmsg`` (scatter-gather, no join). The pieces are
        kept, not copied, until sent: they must not change (``bytes``, or views of ``bytes``)."""
        if self._closing or self._write_closed:
            return
        pieces = [piece for piece in pieces if len(piece)]  # (an empty one would stay at the buffer's head)
        if not pieces:
            return
        buf = self._buffer
        if buf is None:
            try:
                sent = self._sock.sendmsg(pieces) if len(pieces) <= SEND_VECTOR else 0
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fail(exc)
                return
            rest: deque[memoryview] = deque()
            left = 0
            for piece in pieces:
                size = len(piece)
                if sent >= size:
                    sent -= size
                    continue
                view = memoryview(piece)[sent:] if sent else memoryview(piece)
                sent = 0
                rest.append(view)
                left += len(view)
            if not rest:
                return
            self._buffer = rest
            self._buffered = left
            self._update()
        else:
            for piece in pieces:
                buf.append(memoryview(piece))
                self._buffered += len(piece)
        self._check_high_water()

    def write_eof(self) -> None:
        if self._closing or self._write_closed:
            return
        self._write_closed = True
        if not self._buffered:
            self._sock.shutdown(socket.SHUT_WR)

    def can_write_eof(self) -> bool:
        return True

    def abort(self) -> None:
        """Close at once; what is buffered is dropped."""
        self._drop_buffer()
        self._closing = True
        self._lose(None)

    def detach(self) -> DetachedSocket | None:
        """Give the socket up (for a kernel relay, ``io.splice``): it is no longer watched, the protocol is not
        called again and the socket is not closed by this transport. ``None`` when it is closing or lost."""
        if self._closing or self._lost:
            return None
        unsent = b"".join(self._buffer) if self._buffer else b""
        self._drop_buffer()
        self._lost = True
        self._closing = True
        old, self._mask = self._mask, 0
        self._watcher._remove(self._fd, self, old)
        on_close, self._on_close = self._on_close, None
        return DetachedSocket(self._sock, unsent, self._eof, self._write_closed, on_close)

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return LOW_WATER, HIGH_WATER

    # ------------------------------------------------------------------ readiness (called by the watcher)
    def _read_ready(self) -> None:
        view = self._watcher._read_view
        limit = self._read_size
        asked = READ_SIZE if limit is None else min(max(limit(), 1), READ_SIZE)
        try:
            size = self._sock.recv_into(view, asked)
        except (BlockingIOError, InterruptedError):
            self._waiting = False
            return
        except OSError as exc:
            self._fail(exc)
            return
        self._waiting = size == asked  # a full read may have left more behind
        try:
            if size:
                self._protocol.data_received(view[:size].tobytes())
                return
            self._eof = True
            self._update()
            if not self._protocol.eof_received():
                self.close()
        except Exception as exc:
            log.error("relay protocol failed", error=repr(exc), exc_info=True)
            self._fail(exc)

    def _read_waiting(self) -> None:
        """Read what came while the socket was paused (in the watcher's next pass of resumed sockets, asked by
        :meth:`_update` at the resume instead of a new registration): a read that empties the socket registers it
        for input then, if reading goes on; a paused socket stays unregistered, its input waiting for the next
        resume."""
        self._read_scheduled = False
        if self._lost or not self._mask & _IN or self._watched & _IN:
            return  # closed, paused again, or registered meanwhile (epoll reports the input)
        self._read_ready()
        if self._lost or not self._mask & _IN or self._watched & _IN:
            return
        if self._waiting:  # the read filled its size: read again in the next pass
            self._read_scheduled = True
            self._watcher._read_soon(self)
        else:
            self._watcher._watch(self._fd, self, self._mask)

    def _write_ready(self) -> None:
        buf = self._buffer
        if buf:
            try:
                sent = self._sock.sendmsg(islice(buf, SEND_VECTOR))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(exc)
                return
            self._buffered -= sent
            while sent:
                head = buf[0]
                if len(head) <= sent:
                    sent -= len(head)
                    buf.popleft()
                else:
                    buf[0] = head[sent:]
                    sent = 0
            if buf:
                if self._buffered <= LOW_WATER:
                    self._resume_protocol()  # as asyncio: at the low mark, not only once all is gone
                return
        self._drop_buffer()  # an idle connection keeps no buffer
        self._update()
        if not self._resume_protocol():
            return
        if self._closing:
            self._lose(None)
        elif self._write_closed:
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self._fail(exc)

    def _resume_protocol(self) -> bool:
        """Tell a paused protocol it may write again; ``False`` when that failed (the transport is closing)."""
        if self._writing_paused:
            self._writing_paused = False
            try:
                self._protocol.resume_writing()
            except Exception as exc:
                log.error("relay protocol failed", error=repr(exc), exc_info=True)
                self._fail(exc)
                return False
        return True

    def _check_high_water(self) -> None:
        if not self._writing_paused and self._buffered > HIGH_WATER:
            self._writing_paused = True
            try:
                self._protocol.pause_writing()
            except Exception as exc:
                log.error("relay protocol failed", error=repr(exc), exc_info=True)
                self._fail(exc)

    # ------------------------------------------------------------------ state
    def _start(self) -> None:
        self._watcher._add(self._fd, self)
        self._update()

    def _update(self) -> None:
        """Watch for what is wanted now: readable while reading, writable while bytes wait."""
        if self._lost:
            return
        mask = 0
        if self._reading and not self._eof and not self._closing:
            mask |= _IN
        if self._buffered:
            mask |= _OUT
        old = self._mask
        if mask != old:
            self._mask = mask
            if mask & ~old & _IN and self._waiting and not self._watched & _IN and self._watcher.uses_epoll:
                # a resume, with input waiting that the set no longer watches for (it came while paused): it is
                # read soon, and the socket is registered for input only if reading goes on after that
                self._watcher._set(self._fd, self, old & ~_IN, mask & ~_IN)
                if not self._read_scheduled:
                    self._read_scheduled = True
                    self._watcher._read_soon(self)
                return
            self._watcher._set(self._fd, self, old, mask)

    def _drop_buffer(self) -> None:
        self._buffer = None
        self._buffered = 0

    def _fail(self, exc: BaseException) -> None:
        self._drop_buffer()
        self._closing = True
        self._lose(exc if isinstance(exc, Exception) else None)

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        old, self._mask = self._mask, 0
        self._watcher._remove(self._fd, self, old)
        self._watcher._loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._sock.close()
            if self._on_close is not None:
                self._on_close()


def attach_socket(
    sock: socket.socket, protocol: asyncio.Protocol, watcher: SocketWatcher | None = None
) -> SocketTransport:
    """Drive ``protocol`` from the connected socket ``sock`` (made non-blocking if it is not); ``connection_made``
    is called now. The socket's options are the caller's: the listeners and connects of this module have set
    them (:func:`~vtunnel.io.tuning.tune_tcp`) already, once per socket."""
    watcher = watcher if watcher is not None else watcher_for()  # an empty watcher is falsy (len 0)
    if sock.gettimeout() != 0.0:  # (a Python-side flag: no system call for a socket that is non-blocking)
        sock.setblocking(False)
    transport = SocketTransport(sock, protocol, watcher)
    transport._start()
    try:
        protocol.connection_made(transport)
    except BaseException:
        transport.abort()
        raise
    return transport


class LeanSocketStream(ByteStream, asyncio.Protocol):
    """An anyio byte stream over a :class:`SocketTransport` (it is the transport's protocol), for fronts that read
    a header first and then hand the socket to a relay's end with :meth:`hand_off`: no task and no buffer stay
    behind.

    Reads are buffered up to ``READ_LIMIT`` bytes, then the socket is not read until the buffer is taken; a send
    waits while the transport's write buffer is over its high-water mark.
    """

    READ_LIMIT: Final = 64 * 1024

    __slots__ = (
        "_buffered",
        "_chunks",
        "_closed",
        "_drain",
        "_eof",
        "_error",
        "_lost",
        "_reader",
        "_transport",
        "_write_paused",
    )

    def __init__(self) -> None:
        self._transport: SocketTransport | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._eof = False
        self._lost = False
        self._error: Exception | None = None
        self._reader: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._closed = False  # closed, or handed off (then without a transport)

    # ------------------------------------------------------------------ anyio ByteStream
    async def receive(self, max_bytes: int = 65536) -> bytes:
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            chunks = self._chunks
            if chunks:
                chunk = chunks[0]
                if len(chunk) <= max_bytes:
                    del chunks[0]
                else:
                    chunks[0] = chunk[max_bytes:]
                    chunk = chunk[:max_bytes]
                self._buffered -= len(chunk)
                t = self._transport
                if t is not None and not t.is_reading() and self._buffered < self.READ_LIMIT:
                    t.resume_reading()
                return chunk
            if self._error is not None:
                raise anyio.BrokenResourceError(str(self._error)) from self._error
            if self._eof:
                raise anyio.EndOfStream
            if self._lost:
                raise anyio.BrokenResourceError("connection lost")
            waiter = self._reader = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._reader = None

    async def send(self, item: bytes) -> None:
        t = self._transport
        if self._closed or t is None:
            raise anyio.ClosedResourceError
        if self._error is not None or self._lost or t.is_closing():
            raise anyio.BrokenResourceError(str(self._error or "connection lost"))
        t.write(item)
        while self._write_paused and not self._lost:
            drain = self._drain = asyncio.get_running_loop().create_future()
            try:
                await drain
            finally:
                self._drain = None
        if self._error is not None:
            raise anyio.BrokenResourceError(str(self._error)) from self._error
        await anyio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        t = self._transport
        if self._closed or t is None:
            raise anyio.ClosedResourceError
        try:
            t.write_eof()
        except OSError as exc:
            raise anyio.BrokenResourceError(str(exc)) from exc

    async def aclose(self) -> None:
        """Close the socket (what was written still goes out); a no-op once the socket was handed off."""
        if not self._closed:
            self._closed = True
            self._chunks = []
            if self._transport is not None:
                self._transport.close()
            self._wake()
        await anyio.lowlevel.checkpoint()

    def abort(self) -> None:
        """Close the socket at once, dropping what was not sent yet."""
        self._closed = True
        self._chunks = []
        if self._transport is not None:
            self._transport.abort()
        self._wake()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        t = self._transport
        if t is None:
            return {}
        sock: socket.socket = t.get_extra_info("socket")
        return {
            SocketAttribute.raw_socket: lambda: sock,
            SocketAttribute.family: lambda: sock.family,
            SocketAttribute.local_address: lambda: tuple(sock.getsockname()[:2]),
            SocketAttribute.remote_address: lambda: tuple(sock.getpeername()[:2]),
            SocketAttribute.local_port: lambda: sock.getsockname()[1],
            SocketAttribute.remote_port: lambda: sock.getpeername()[1],
        }

    # ------------------------------------------------------------------ hand-off
    def hand_off(self, protocol: asyncio.Protocol) -> None:
        """Make ``protocol`` the socket's protocol from now on. It is told what this stream knows and did not
        return yet, as the transport would have told it: ``connection_made``, then the bytes read but not
        received, the peer's end of stream, a full write buffer, a lost connection.  This stream is then done:
        receiving and sending raise ``ClosedResourceError`` and :meth:`aclose` leaves the socket alone."""
        t = self._transport
        if self._closed or t is None:
            raise anyio.ClosedResourceError
        self._closed = True
        self._transport = None
        early = b"".join(self._chunks)
        self._chunks = []
        self._buffered = 0
        self._wake()
        t.set_protocol(protocol)
        protocol.connection_made(t)
        if early:
            protocol.data_received(early)
        if self._eof:
            protocol.eof_received()
        if self._write_paused:
            protocol.pause_writing()
        if self._lost:
            protocol.connection_lost(self._error)

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, SocketTransport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= self.READ_LIMIT and self._transport is not None:
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return True  # the other direction stays open

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if exc is not None and self._error is None:
            self._error = exc
        self._write_paused = False
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    def _wake(self) -> None:
        for waiter in (self._reader, self._drain):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)


class RelayListener(Generic[P]):
    """Listening sockets whose accepted connections each get a protocol from ``factory`` and a lean transport
    (tuned with large buffers); ``on_accept(protocol)`` is called once the protocol has its transport, and
    ``on_close()`` once that connection's socket is closed."""

    def __init__(
        self,
        sockets: list[socket.socket],
        factory: Callable[[], P],
        loop: asyncio.AbstractEventLoop,
        watcher: SocketWatcher,
        *,
        on_accept: Callable[[P], None] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.sockets = sockets
        self._factory = factory
        self._on_accept = on_accept
        self._on_close = on_close
        self._on_exhausted: Callable[[], bool] | None = None
        self._loop = loop
        self._watcher = watcher
        self._closed = False
        self._started = False
        self._retry: dict[int, asyncio.TimerHandle] = {}
        self._warn_exhausted = ThrottledWarning(log, "cannot accept connections for now: out of resources")
        self._backoff = AcceptBackoff()

    def set_on_accept(self, on_accept: Callable[[P], None]) -> None:
        """Call ``on_accept(protocol)`` for each connection accepted from now on."""
        self._on_accept = on_accept

    def set_on_exhausted(self, on_exhausted: Callable[[], bool]) -> None:
        """Call ``on_exhausted()`` when an accept fails for want of descriptors or memory: it returns whether it
        closed a connection to make room (accepting is then tried again almost at once)."""
        self._on_exhausted = on_exhausted

    def start(self) -> None:
        """Begin accepting (until then connections wait in the backlog)."""
        if self._started or self._closed:
            return
        self._started = True
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop accepting and close the listening sockets (open connections go on)."""
        if self._closed:
            return
        self._closed = True
        for handle in self._retry.values():
            handle.cancel()
        for sock in self.sockets:
            if self._started:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(sock.fileno())
            sock.close()

    def _accept(self, lsock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if is_out_of_resources(exc):
                    # the backlog keeps the waiting connections; look again once something may have closed (at
                    # once, nearly, when the owner closed one to make room)
                    freed = self._on_exhausted is not None and self._on_exhausted()
                    if freed:
                        self._backoff.reset()
                    delay = FREED_RETRY if freed else self._backoff.next()
                    self._warn_exhausted(
                        error=exc.strerror, retry_in=delay, closed_oldest=freed, limit=open_file_limit()
                    )
                    fd = lsock.fileno()
                    self._loop.remove_reader(fd)
                    self._retry[fd] = self._loop.call_later(delay, self._resume, lsock)
                else:
                    log.warning("accept failed", error=exc.strerror or repr(exc))
                return
            self._backoff.reset()
            protocol = self._factory()
            tune_tcp(conn)  # buffers set on the listening socket would change the handshake's window scaling
            try:
                attach_socket(conn, protocol, self._watcher)._on_close = self._on_close
            except Exception as exc:
                log.error("relay protocol failed", error=repr(exc), exc_info=True)
                conn.close()
                continue
            if self._on_accept is not None:
                self._on_accept(protocol)

    def _resume(self, lsock: socket.socket) -> None:
        self._retry.pop(lsock.fileno(), None)
        if not self._closed:
            self._loop.add_reader(lsock.fileno(), self._accept, lsock)


async def open_relay_listener(
    host: str | None,
    port: int,
    factory: Callable[[], P],
    *,
    on_accept: Callable[[P], None] | None = None,
    on_close: Callable[[], None] | None = None,
    backlog: int = 1024,
    start: bool = True,
) -> RelayListener[P]:
    """Listen on every address ``host`` resolves to (all interfaces for ``None`` or ""), as ``create_server``
    (:func:`~vtunnel.io.listening.bind_stream_sockets`: a worker's given sockets); with ``start=False`` accepting begins at :meth:`RelayListener.start`. See :class:`RelayListener` for the
    callbacks."""
    loop = asyncio.get_running_loop()
    sockets = await bind_stream_sockets(host, port, backlog=backlog)
    listener = RelayListener(
        sockets, factory, loop, watcher_for(loop), on_accept=on_accept, on_close=on_close
    )
    if start:
        listener.start()
    return listener


class LeanStreamListener(anyio.abc.Listener[ByteStream]):
    """An anyio listener of :class:`LeanSocketStream` connections over a :class:`RelayListener` (accepting with
    its backoff when out of descriptors): each connection's handler runs in a task of ``serve``'s task group."""

    def __init__(self, relay: RelayListener[LeanSocketStream]) -> None:
        self._relay = relay

    @property
    def relay(self) -> RelayListener[LeanSocketStream]:
        return self._relay

    async def serve(
        self, handler: Callable[[ByteStream], Any], task_group: anyio.abc.TaskGroup | None = None
    ) -> None:
        async with contextlib.AsyncExitStack() as stack:
            if task_group is None:
                task_group = await stack.enter_async_context(anyio.create_task_group())
            tg = task_group

            def accepted(stream: LeanSocketStream) -> None:
                tg.start_soon(handler, stream)

            self._relay.set_on_accept(accepted)
            self._relay.start()
            try:
                await anyio.sleep_forever()
            finally:
                self._relay.close()

    async def aclose(self) -> None:
        self._relay.close()
        await anyio.lowlevel.checkpoint()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        sock = self._relay.sockets[0]
        return {
            SocketAttribute.raw_socket: lambda: sock,
            SocketAttribute.family: lambda: sock.family,
            SocketAttribute.local_address: lambda: tuple(sock.getsockname()[:2]),
            SocketAttribute.local_port: lambda: sock.getsockname()[1],
        }


#: a tunnel listener's accept queue, as anyio's: the kernel caps it at ``net.core.somaxconn``; connections a
#: server out of descriptors cannot take yet wait there
TUNNEL_BACKLOG: Final = 65535


async def open_lean_listener(host: str | None, port: int) -> LeanStreamListener:
    """Listen like :func:`open_relay_listener`, for handlers that take each connection as a lean byte stream."""
    listener = await open_relay_listener(host, port, LeanSocketStream, backlog=TUNNEL_BACKLOG, start=False)
    return LeanStreamListener(listener)


def adopt_socket_listener(listener: anyio.abc.Listener[Any]) -> LeanStreamListener | None:
    """``listener`` as a :class:`LeanStreamListener`: itself if it is one; anyio's TCP listener (or a multi-listener
    of them, as ``anyio.create_tcp_listener`` makes for several addresses) gives up its listening sockets, which
    are then accepted from with the relay listener's backoff (a listener that was never served: the anyio object
    is left with nothing to close); ``None`` for any other listener (one over UDP that makes its own
    connections), which keeps accepting its own way."""
    if isinstance(listener, LeanStreamListener):
        return listener
    members = listener.listeners if isinstance(listener, anyio.streams.stapled.MultiListener) else [listener]
    if not members or not all(isinstance(m, anyio.abc.SocketListener) for m in members):
        return None
    sockets: list[socket.socket] = []
    for member in members:
        raw: socket.socket = member.extra(SocketAttribute.raw_socket)
        sock = socket.socket(raw.family, raw.type, raw.proto, fileno=raw.detach())
        sock.setblocking(False)
        sockets.append(sock)
    loop = asyncio.get_running_loop()
    return LeanStreamListener(RelayListener(sockets, LeanSocketStream, loop, watcher_for(loop)))


def _established(sock: socket.socket) -> bool:
    """Whether a non-blocking connect in progress is already made (a socket still connecting has no peer)."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def start_tcp_connect(
    family: socket.AddressFamily, address: tuple[Any, ...], *, buffers: bool = False
) -> tuple[socket.socket, bool]:
    """Begin connecting a non-blocking TCP socket to one resolved ``address``, tuned as :func:`connect_tcp` does:
    the socket, and whether the connection is made already (a loopback connect often is, within the call: then
    no wait and no wake-up), else :func:`finish_tcp_connect` waits for it. Raises OSError when it fails at once."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        tune_tcp(sock, buffers=buffers)
        try:
            sock.connect(address)
        except BlockingIOError:
            return sock, _established(sock)
        return sock, True
    except BaseException:
        sock.close()
        raise


async def finish_tcp_connect(sock: socket.socket, address: tuple[Any, ...]) -> socket.socket:
    """Wait until the connection :func:`start_tcp_connect` began to ``address`` is made. Raises OSError naming
    the address when it failed; the socket is closed on any failure or cancellation."""
    try:
        await anyio.wait_writable(sock)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            where = f"{address[0]}:{address[1]}"
            raise OSError(err, f"connect to {where}: {errno.errorcode.get(err, err)}") from None
        return sock
    except BaseException:
        sock.close()
        raise


async def connect_tcp(
    family: socket.AddressFamily, address: tuple[Any, ...], *, buffers: bool = False
) -> socket.socket:
    """A non-blocking TCP socket connected to one resolved ``address`` (no name lookup, no thread hop), tuned by
    :func:`~vtunnel.io.tuning.tune_tcp` (``buffers``: with the large kernel buffers). Raises OSError naming the
    address when the connection fails; the socket is closed on any failure or cancellation."""
    sock, made = start_tcp_connect(family, address, buffers=buffers)
    return sock if made else await finish_tcp_connect(sock, address)


async def connect_lean(host: str, port: int) -> LeanSocketStream:
    """Connect to ``host:port`` (each address it resolves to in turn) and drive the socket with a lean stream."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, _kind, _proto, _canon, addr in infos:
        try:
            sock = await connect_tcp(family, addr, buffers=True)
        except OSError as exc:
            error = exc
            continue
        stream = LeanSocketStream()
        attach_socket(sock, stream)
        return stream
    raise error if error is not None else OSError(f"no address for {host}")
