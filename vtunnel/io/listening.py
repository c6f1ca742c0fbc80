"""Listening sockets: the ones a process binds, and the ones it was given.

A server run as several workers (``vtunnel server --workers N``, :mod:`vtunnel.apps.workers`) does not bind its
listening sockets: its supervisor binds every one of them, with ``SO_REUSEPORT``, in a fixed order, and each
worker inherits its own. The worker calls :func:`adopt` with them once, before it listens; from then on every
listener of the process takes its socket from them (:func:`given`) instead of binding one, matched by kind,
family and address (a port of 0 takes the next given socket of that address, in the order given). A listener
that finds none fails with a clear error: a worker never binds a listening socket of its own, since a socket
it bound would join the ``SO_REUSEPORT`` group at an index the kernel's steering does not expect; the one
exception is a listener that is the worker's alone, made within :func:`own_sockets`.

:func:`bind_stream_sockets` is the one place TCP listening sockets are made (the lean listener of ``tcp://``,
anyio's for ``tls://`` and the WebSocks listeners), :func:`~vtunnel.io.datagrams.open_udp_listener` the one for
UDP listeners (``kcp://``, ``rudp://``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import anyio
import anyio.abc
from anyio.streams.stapled import MultiListener

__all__ = [
    "adopt",
    "bind_stream_sockets",
    "given",
    "listening_stream_socket",
    "open_stream_listener",
    "own_sockets",
    "passive_addresses",
    "port_range_sockets",
    "reuseport_datagram_group",
    "reuseport_stream_groups",
    "unclaimed",
]

#: the sockets this process was given and has not used yet, in the order given; None: it binds its own
_given: list[socket.socket] | None = None
#: set within :func:`own_sockets`: the listeners made there bind their own sockets, given ones or not
_own: ContextVar[bool] = ContextVar("vtunnel_own_sockets", default=False)


def adopt(sockets: Sequence[socket.socket]) -> None:
    """From now on this process's listeners take their sockets from ``sockets`` and bind none."""
    global _given
    _given = list(sockets)


@contextlib.contextmanager
def own_sockets() -> Iterator[None]:
    """Listeners made within bind their own sockets even in a worker that was given its sockets: for a listener
    that is this process's alone, which no one reaches through the supervisor's addresses (a worker's lite-tls
    splice port: each worker opens one of its own and tells its tunnels where)."""
    token = _own.set(True)
    try:
        yield
    finally:
        _own.reset(token)


def unclaimed() -> list[socket.socket]:
    """The given sockets no listener took (empty when the process binds its own)."""
    return list(_given or ())


def _same_host(bound: str, wanted: str) -> bool:
    try:
        return ipaddress.ip_address(bound.split("%")[0]) == ipaddress.ip_address(wanted.split("%")[0])
    except ValueError:
        return bound == wanted


def given(kind: socket.SocketKind, family: socket.AddressFamily, address: Any) -> socket.socket | None:
    """The given socket of ``kind`` and ``family`` bound to ``address`` (``(host, port, ...)``; port 0: the next
    one of that host), taken out of the given ones; None when this process binds its own sockets. Raises
    OSError when the process was given sockets but none for ``address``."""
    if _given is None or _own.get():
        return None
    host, port = str(address[0]), int(address[1])
    for sock in _given:
        if sock.type != kind or sock.family != family:
            continue
        bound = sock.getsockname()
        if _same_host(str(bound[0]), host) and (port == 0 or int(bound[1]) == port):
            _given.remove(sock)
            return sock
    what = "tcp" if kind == socket.SOCK_STREAM else "udp"
    raise OSError(
        f"no {what} socket for {host}:{port} among the listening sockets this worker was given (the "
        "supervisor binds them all: every --listen URL of a worker must be one its supervisor listens on)"
    )


def passive_addresses(infos: Iterable[Sequence[Any]]) -> list[tuple[Any, Any, int, Any]]:
    """``(family, kind, proto, address)`` of each distinct address of ``getaddrinfo``'s answer, in its order."""
    seen: set[tuple[Any, ...]] = set()
    out: list[tuple[Any, Any, int, Any]] = []
    for family, kind, proto, _canon, addr in infos:
        if (family, addr) not in seen:
            seen.add((family, addr))
            out.append((family, kind, proto, addr))
    return out


def _stream_addresses(host: str, port: int) -> list[tuple[Any, Any, int, Any]]:
    """:func:`passive_addresses` of TCP on ``host:port`` (all interfaces for ""), resolved now (blocking)."""
    flags = socket.AI_PASSIVE
    return passive_addresses(
        socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, flags)
    )


def _datagram_address(host: str, port: int) -> tuple[socket.AddressFamily, Any]:
    """The family and address of UDP on ``host:port``: the first ``host`` resolves to, as a datagram transport
    resolves it."""
    family, _kind, _proto, _canon, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    return family, addr


def _close_all(*groups: Iterable[socket.socket]) -> None:
    """Close every socket of ``groups`` (what a bind that failed halfway had made)."""
    for group in groups:
        for sock in group:
            sock.close()


def _bind(sock: socket.socket, address: Any) -> None:
    """``sock.bind(address)``, its error naming the address."""
    try:
        sock.bind(address)
    except OSError as exc:
        raise OSError(
            exc.errno, f"error while attempting to bind on address {address!r}: {exc.strerror}"
        ) from None


def _udp_socket(family: socket.AddressFamily, sockbuf: int) -> socket.socket:
    """A UDP socket with ``sockbuf`` kernel buffers both ways (best effort)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, sockbuf)
    return sock


def listening_stream_socket(
    family: socket.AddressFamily,
    kind: socket.SocketKind,
    proto: int,
    address: Any,
    *,
    backlog: int,
    reuse_port: bool = False,
) -> socket.socket:
    """A TCP socket listening on ``address`` as ``loop.create_server`` makes one (``SO_REUSEADDR``, IPv6 v6-only),
    with ``SO_REUSEPORT`` too when asked (a supervisor's, shared by its workers)."""
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        _bind(sock, address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def reuseport_stream_groups(host: str, port: int, count: int, *, backlog: int) -> list[list[socket.socket]]:
    """``count`` listening TCP sockets sharing one ``SO_REUSEPORT`` group per address ``host`` resolves to (all
    interfaces for ""), all on one port (the first free one for 0), bound in order: a supervisor's, one per
    worker. Every socket made is closed again when one of them fails."""
    groups: list[list[socket.socket]] = []
    chosen = 0
    try:
        for family, kind, proto, addr in _stream_addresses(host, port):
            if chosen:
                addr = (addr[0], chosen, *addr[2:])
            group: list[socket.socket] = []
            groups.append(group)
            for _ in range(count):
                sock = listening_stream_socket(family, kind, proto, addr, backlog=backlog, reuse_port=True)
                group.append(sock)
                addr = sock.getsockname()
                chosen = addr[1]
    except BaseException:
        _close_all(*groups)
        raise
    return groups


def reuseport_datagram_group(host: str, port: int, count: int, *, sockbuf: int) -> list[socket.socket]:
    """``count`` UDP sockets bound to ``host:port`` (the first address it resolves to; the first free port for 0)
    in one ``SO_REUSEPORT`` group, in order, with ``sockbuf`` kernel buffers both ways (best effort)."""
    family, addr = _datagram_address(host, port)
    group: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = _udp_socket(family, sockbuf)
            group.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(addr)
            addr = sock.getsockname()
    except BaseException:
        _close_all(group)
        raise
    return group


def port_range_sockets(
    host: str, first: int, count: int, *, datagram: bool, backlog: int, sockbuf: int
) -> list[list[socket.socket]]:
    """A socket on each of the ``count`` ports of ``host`` from ``first`` on, ``[address][port - first]``: TCP
    sockets listening on every address ``host`` resolves to, as :func:`bind_stream_sockets` binds them, or UDP
    sockets on its first address, as a datagram transport resolves it, with ``sockbuf`` kernel buffers both ways
    (best effort). None shares its port (no ``SO_REUSEPORT``). Every socket made is closed again when one fails."""
    if datagram:
        family, addr = _datagram_address(host, first)
        addresses = [(family, socket.SOCK_DGRAM, 0, addr)]
    else:
        addresses = _stream_addresses(host, first)
    groups: list[list[socket.socket]] = []
    try:
        for family, kind, proto, addr in addresses:
            group: list[socket.socket] = []
            groups.append(group)
            for port in range(first, first + count):
                address = (addr[0], port, *addr[2:])
                if not datagram:
                    group.append(listening_stream_socket(family, kind, proto, address, backlog=backlog))
                    continue
                sock = _udp_socket(family, sockbuf)
                group.append(sock)
                _bind(sock, address)
    except BaseException:
        _close_all(*groups)
        raise
    return groups


async def bind_stream_sockets(host: str | None, port: int, *, backlog: int) -> list[socket.socket]:
    """Listening TCP sockets on every address ``host`` resolves to (all interfaces for None or ""), non-blocking,
    as ``loop.create_server`` binds them (``SO_REUSEADDR``, IPv6 sockets v6-only, one free port for all when
    ``port`` is 0); the given ones where the process was given its sockets (:func:`given`)."""
    infos = await anyio.getaddrinfo(
        host or None, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        chosen = 0
        for family, kind, proto, addr in passive_addresses(infos):
            if chosen:
                addr = (addr[0], chosen, *addr[2:])
            sock = given(socket.SOCK_STREAM, family, addr)
            if sock is None:
                sock = listening_stream_socket(family, kind, proto, addr, backlog=backlog)
            sockets.append(sock)
            sock.setblocking(False)
            if port == 0 and not chosen:
                chosen = sock.getsockname()[1]  # the same free port on every address
    except BaseException:
        _close_all(sockets)
        raise
    return sockets


async def open_stream_listener(
    host: str | None, port: int, *, backlog: int = 1024
) -> MultiListener[anyio.abc.SocketStream]:
    """anyio's TCP listener over :func:`bind_stream_sockets` (what ``anyio.create_tcp_listener`` gives, on the
    given sockets where there are some)."""
    sockets = await bind_stream_sockets(host, port, backlog=backlog)
    return MultiListener([await anyio.abc.SocketListener.from_socket(sock) for sock in sockets])
