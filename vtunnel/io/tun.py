"""TUN devices: the one module that opens them and configures them (Linux).

A :class:`TunDevice` is a layer-3 TUN interface opened with the documented ``TUNSETIFF`` ioctl on
``/dev/net/tun`` (``IFF_TUN | IFF_NO_PI``: every read is one whole IP packet, every write injects one), its
descriptor non-blocking and read from the running asyncio loop's readiness callback (``add_reader``), a batch of
packets per wake-up handed to one callback, as :mod:`.datagrams` does for UDP. A write is one non-blocking
``write``; a packet the kernel does not take (its queue full, a malformed packet) is dropped and counted, as a
congested link drops it.

The device is not persistent: it exists while its descriptor is open, so when the process ends, however it ends
(SIGKILL included), the kernel removes the device and with it its addresses and routes. A device of the same name
left persistent by something else is taken over and its addresses are flushed before ours are set.

Addresses, MTU and routes are set over netlink with pyroute2 (:func:`configure_device`, a blocking call for a
worker thread: pyroute2's synchronous API runs an event loop of its own). Nothing here shells out to ``ip``.

Opening a device and configuring it needs CAP_NET_ADMIN (root has it); without it the error says so
(:class:`TunPermissionError`).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import ipaddress
import os
import struct
from collections.abc import Callable, Sequence
from typing import Final, TypeAlias

import structlog

__all__ = [
    "IPInterface",
    "IPNetwork",
    "PacketHandler",
    "TunDevice",
    "TunError",
    "TunPermissionError",
    "configure_device",
]

log = structlog.get_logger("vtunnel.io.tun")

IPInterface: TypeAlias = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
#: receives the packets one wake-up read, in order
PacketHandler: TypeAlias = Callable[[list[bytes]], None]

TUN_PATH: Final = "/dev/net/tun"
#: <linux/if_tun.h>: _IOW('T', 202, int)
TUNSETIFF: Final = 0x400454CA
IFF_TUN: Final = 0x0001
IFF_NO_PI: Final = 0x1000
IFNAMSIZ: Final = 16
#: packets read per wake-up at most (the loop's other callbacks run between batches)
READ_BATCH: Final = 64
#: the largest packet a read takes (a TUN device's MTU is at most 65535)
READ_SIZE: Final = 65535
_CAPABILITY = "CAP_NET_ADMIN"
_SOFT_WRITE_ERRORS: Final = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.ENOMEM})


class TunError(OSError):
    """A TUN device cannot be opened or configured; the message says what to do."""


class TunPermissionError(TunError):
    """The process lacks CAP_NET_ADMIN, which TUN devices and their configuration need."""


def _permission(what: str) -> TunPermissionError:
    return TunPermissionError(
        errno.EPERM,
        f"{what} needs the {_CAPABILITY} capability: run as root, or grant it "
        f"(setcap cap_net_admin+ep on the interpreter, or AmbientCapabilities={_CAPABILITY} in a systemd unit)",
    )


def _check_name(name: str) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or any(c in name for c in "/ \t\n:") or name in (".", ".."):
        raise ValueError(
            f"bad interface name {name!r}: 1 to {IFNAMSIZ - 1} characters, no '/', ':' or spaces"
        )
    return raw


class TunDevice:
    """One open TUN device. :meth:`start` begins reading it on the running loop; :meth:`close` removes it."""

    __slots__ = ("_fd", "_handler", "_loop", "dropped_writes", "name", "packets_in", "packets_out")

    def __init__(self, fd: int, name: str) -> None:
        self._fd = fd
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handler: PacketHandler | None = None
        #: packets read from the device, written to it, and dropped on the way in (queue full, refused)
        self.packets_in = 0
        self.packets_out = 0
        self.dropped_writes = 0

    @classmethod
    def open(cls, name: str) -> TunDevice:
        """Create (or attach to) the TUN device ``name``; ``%d`` in it lets the kernel number it (``vtun%d``)."""
        raw = _check_name(name)
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TunError(
                errno.ENOENT, f"{TUN_PATH} does not exist: load the tun module (modprobe tun)"
            ) from None
        except PermissionError:
            raise _permission(f"opening {TUN_PATH}") from None
        try:
            ifr = struct.pack("16sH22x", raw, IFF_TUN | IFF_NO_PI)
            try:
                answer = fcntl.ioctl(fd, TUNSETIFF, ifr)
            except PermissionError:
                raise _permission(f"creating the TUN device {name}") from None
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise TunError(
                        errno.EBUSY,
                        f"the interface {name} is in use by another process: choose another name (--tun-dev)",
                    ) from None
                if exc.errno == errno.EINVAL:
                    raise TunError(
                        errno.EINVAL,
                        f"{name} exists and is not a TUN device: choose another name (--tun-dev)",
                    ) from None
                raise TunError(exc.errno, f"creating the TUN device {name}: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        actual = answer[:IFNAMSIZ].split(b"\0", 1)[0].decode()
        return cls(fd, actual)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        return self._fd

    def start(self, handler: PacketHandler) -> None:
        """Hand every packet the device gives to ``handler``, a batch per wake-up, from the running loop."""
        if self._fd < 0:
            raise TunError(errno.EBADF, f"the TUN device {self.name} is closed")
        self._handler = handler
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        fd = self._fd
        packets: list[bytes] = []
        try:
            for _ in range(READ_BATCH):
                packets.append(os.read(fd, READ_SIZE))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:  # the device went away under us (deleted by an operator): stop watching it
            if fd >= 0:
                log.warning("tun read failed", device=self.name, error=repr(exc))
                self._stop_reading()
        if packets:
            self.packets_in += len(packets)
            handler = self._handler
            if handler is not None:
                handler(packets)

    def write(self, packet: bytes | memoryview) -> None:
        """Give one IP packet to the kernel, as if it arrived on the device; dropped (and counted) if not taken."""
        try:
            os.write(self._fd, packet)
        except OSError as exc:
            self.dropped_writes += 1
            if exc.errno not in _SOFT_WRITE_ERRORS and exc.errno != errno.EINVAL and self._fd >= 0:
                log.warning("tun write failed", device=self.name, error=repr(exc))
            return
        self.packets_out += 1

    def _stop_reading(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop = None

    def close(self) -> None:
        """Stop reading and close the descriptor: the kernel removes the device, its addresses and its routes."""
        if self._fd < 0:
            return
        self._stop_reading()
        fd, self._fd = self._fd, -1
        os.close(fd)


def _set_ipv6(name: str, *, on: bool) -> None:
    path = f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6"
    try:
        with open(path, "w") as f:
            f.write("0\n" if on else "1\n")
    except FileNotFoundError:  # a kernel without IPv6
        if on:
            raise TunError(errno.EAFNOSUPPORT, "IPv6 is not available in this kernel") from None
    except PermissionError:
        raise _permission(f"configuring the interface {name}") from None


def configure_device(
    name: str,
    *,
    addresses: Sequence[IPInterface],
    mtu: int,
    routes: Sequence[IPNetwork] = (),
    alias: str | None = None,
) -> None:
    """Set ``name``'s MTU, replace its addresses with ``addresses`` (each with its prefix, which gives the route to
    its network), add ``routes`` through it and bring it up. Blocking (netlink): run it in a worker thread.
    Without an IPv6 address IPv6 is turned off on the device, so the kernel sends no neighbour discovery over it.

    Raises :class:`TunPermissionError` without CAP_NET_ADMIN, :class:`TunError` for what the kernel refuses.
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                raise TunError(errno.ENODEV, f"no interface {name}")
            index = found[0]
            _set_ipv6(name, on=any(a.version == 6 for a in addresses))
            ipr.link("set", index=index, mtu=mtu)
            if alias is not None:
                ipr.link("set", index=index, ifalias=alias)
            for old in ipr.get_addr(index=index):
                ipr.addr("del", index=index, address=old.get("IFA_ADDRESS"), prefixlen=old["prefixlen"])
            ipr.link("set", index=index, state="up")
            for interface in addresses:
                ipr.addr("add", index=index, address=str(interface.ip), prefixlen=interface.network.prefixlen)
            for network in routes:
                ipr.route("replace", dst=str(network), oif=index)
    except NetlinkError as exc:
        if exc.code == errno.EPERM:
            raise _permission(f"configuring the interface {name}") from None
        raise TunError(exc.code, f"configuring the interface {name}: {os.strerror(exc.code)}") from None
