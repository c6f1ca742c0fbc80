"""The PROXY protocol header (HAProxy's ``send-proxy`` v1 and ``send-proxy-v2``), read by a server behind a balancer.

A balancer in front of ``tcp://`` or ``tls://`` servers hides the agents' addresses: every connection comes from
the balancer. With the PROXY protocol the balancer starts each connection with a header naming the client's
address, which the server then uses for what it does per source (the handshake limiter, its logs). A listener
that expects it (``?proxy=1``) refuses a connection whose first bytes are not a valid header: trusting a header
from anyone would let a client choose its own address, so only the balancer may reach such a listener.

:class:`ProxyHeaderReader` is sans-IO: the caller asks it how many bytes it may read next (:meth:`wanted`, never
past the header's end, so no byte of what follows is taken), feeds them, and gets the :class:`ProxyHeader` once it
is complete, or :class:`ProxyHeaderError`. Version 1 is the text line ``PROXY TCP4|TCP6|UNKNOWN ...\\r\\n`` (107
bytes at most), version 2 the binary header (a 12-byte signature, then version and command, family and protocol,
a length, the addresses and TLVs; TLVs are skipped). A v2 ``LOCAL`` header (the balancer's own health check), a
v1 ``UNKNOWN`` one and a v2 header of another family (UNIX, UNSPEC) name no client: :attr:`ProxyHeader.source` is
None, and the connection's own address stands.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Final

__all__ = ["V1_MAX", "V2_MAX", "V2_SIGNATURE", "ProxyHeader", "ProxyHeaderError", "ProxyHeaderReader"]

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
#: the longest v1 line (the specification's figure, CRLF included)
V1_MAX: Final = 107
#: the longest v2 header taken: 16 bytes and up to 2 KiB of addresses and TLVs (HAProxy sends a few dozen)
V2_MAX: Final = 16 + 2048
_V1_PREFIX: Final = b"PROXY "
#: the shortest v1 line: "PROXY UNKNOWN\r\n"; a v2 header is longer
_SHORTEST: Final = 15
_V2_FIXED: Final = 16


class ProxyHeaderError(ValueError):
    """Not a valid PROXY protocol header; the message says what is wrong."""


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete header: its version, and the client's and the destination's address as the balancer saw them
    (None: the header names none, a LOCAL or UNKNOWN one). ``length``: its size in bytes."""

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int


class ProxyHeaderReader:
    """Reads one PROXY header from the first bytes of a connection (see the module's description)."""

    __slots__ = ("_buffer", "header")

    def __init__(self) -> None:
        self._buffer = bytearray()
        #: the header, once complete
        self.header: ProxyHeader | None = None

    def wanted(self) -> int:
        """How many bytes to read next at most: never past the header's end (0 once it is complete)."""
        buf = self._buffer
        if self.header is not None:
            return 0
        if len(buf) < _SHORTEST:
            return _SHORTEST - len(buf)
        if buf.startswith(_V1_PREFIX):
            return 1  # the line ends at its CRLF: one byte at a time past the shortest line
        if len(buf) < _V2_FIXED:
            return _V2_FIXED - len(buf)
        return _V2_FIXED + int.from_bytes(buf[14:16], "big") - len(buf)

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Take ``data`` (at most :meth:`wanted` bytes): the header once it is complete, else None. Raises
        :class:`ProxyHeaderError` as soon as the bytes cannot begin a valid header."""
        if len(data) > self.wanted():
            raise ProxyHeaderError("more bytes fed than the header may have")
        self._buffer += data
        buf = self._buffer
        start = bytes(buf[: len(V2_SIGNATURE)])
        if not (_V1_PREFIX.startswith(start[:6]) or V2_SIGNATURE.startswith(start)):
            raise ProxyHeaderError("the connection does not begin with a PROXY protocol header")
        if buf.startswith(_V1_PREFIX):
            if buf.endswith(b"\r\n"):
                self.header = _v1(bytes(buf))
            elif len(buf) >= V1_MAX:
                raise ProxyHeaderError(f"a v1 PROXY line longer than {V1_MAX} bytes")
            return self.header
        if len(buf) >= _V2_FIXED:
            if not buf.startswith(V2_SIGNATURE):
                raise ProxyHeaderError("the connection does not begin with a PROXY protocol header")
            length = int.from_bytes(buf[14:16], "big")
            if _V2_FIXED + length > V2_MAX:
                raise ProxyHeaderError(f"a v2 PROXY header of {length} bytes: at most {V2_MAX - _V2_FIXED}")
            _v2_check(buf[12], buf[13], length)
            if len(buf) == _V2_FIXED + length:
                self.header = _v2(bytes(buf))
        return self.header


def _port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text.startswith(b"0")):
        raise ProxyHeaderError(f"not a port: {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"not a port: {port}")
    return port


def _v1(line: bytes) -> ProxyHeader:
    fields = line[:-2].split(b" ")
    if any(b"\r" in f or b"\n" in f for f in fields):
        raise ProxyHeaderError("a v1 PROXY line with a stray CR or LF")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return ProxyHeader(version=1, source=None, destination=None, length=len(line))
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("a v1 PROXY line is PROXY TCP4|TCP6 SRC DST SPORT DPORT, or PROXY UNKNOWN")
    version = 4 if fields[1] == b"TCP4" else 6
    addresses = []
    for raw in fields[2:4]:
        try:
            address = ipaddress.ip_address(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise ProxyHeaderError(f"not an IP address: {raw[:40]!r}") from None
        if address.version != version:
            raise ProxyHeaderError(f"an IPv{address.version} address in a TCP{version} line")
        addresses.append(str(address))
    source, destination = (addresses[0], _port(fields[4])), (addresses[1], _port(fields[5]))
    return ProxyHeader(version=1, source=source, destination=destination, length=len(line))


_LOCAL: Final = 0x0
_PROXY: Final = 0x1
_UNSPEC, _INET, _INET6, _UNIX = 0x0, 0x1, 0x2, 0x3
_ADDRESS_LENGTH: Final = {_INET: 12, _INET6: 36, _UNIX: 216}


def _v2_check(version_command: int, family_protocol: int, length: int) -> None:
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"PROXY header version {version_command >> 4}: only 2 has the binary form")
    if version_command & 0xF not in (_LOCAL, _PROXY):
        raise ProxyHeaderError(f"PROXY v2 command {version_command & 0xF}: LOCAL (0) or PROXY (1)")
    family, protocol = family_protocol >> 4, family_protocol & 0xF
    if family > _UNIX or protocol > 2:
        raise ProxyHeaderError(f"PROXY v2 family and protocol {family_protocol:#04x} are not defined")
    if version_command & 0xF == _PROXY and length < _ADDRESS_LENGTH.get(family, 0):
        raise ProxyHeaderError(f"PROXY v2 header of {length} bytes: too short for its addresses")


def _v2(header: bytes) -> ProxyHeader:
    command, family = header[12] & 0xF, header[13] >> 4
    body = header[_V2_FIXED:]
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    if command == _PROXY and family == _INET:
        source = (str(ipaddress.IPv4Address(body[0:4])), int.from_bytes(body[8:10], "big"))
        destination = (str(ipaddress.IPv4Address(body[4:8])), int.from_bytes(body[10:12], "big"))
    elif command == _PROXY and family == _INET6:
        source = (str(ipaddress.IPv6Address(body[0:16])), int.from_bytes(body[32:34], "big"))
        destination = (str(ipaddress.IPv6Address(body[16:32])), int.from_bytes(body[34:36], "big"))
    return ProxyHeader(version=2, source=source, destination=destination, length=len(header))
