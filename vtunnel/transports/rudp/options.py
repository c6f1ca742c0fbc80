"""``rudp://`` URL options: the core's tuning (:class:`~vtunnel.arq.rudp.RudpConfig`) and the transport's own.

``rudp://host:port?cc=cubic&rcvwnd=8388608`` — every option is optional. Unknown options and bad values raise
:class:`~vtunnel.transports.base.TransportError` naming the option. ``splice=PORT`` is checked here and read by the
applications (docs/lite-tls.md, splice mode: a keyless rudp:// conversation per spliced lite-tls stream).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Final

from vtunnel.arq.rudp.cc import CONTROLLERS
from vtunnel.arq.rudp.connection import INITIAL_MAX_DATA, RudpConfig
from vtunnel.io.datagrams import DONT_FRAGMENT
from vtunnel.transports.base import TransportError
from vtunnel.transports.urloptions import (
    OptionParser,
    bool_option,
    check_splice,
    choice_option,
    int_option,
    seconds_option,
)
from vtunnel.transports.urloptions import overrides as parse_overrides

__all__ = ["RudpOptions", "parse_options"]

#: the smallest rudp packet the core takes
_SMALLEST: Final = 256
#: the link MTUs path MTU discovery tries (WireGuard's, PPPoE's, Ethernet's, jumbo frames', loopback's): the
#: probe sizes are these less the IP and UDP headers, up to ``maxmtu``
LINK_MTUS: Final = (1420, 1492, 1500, 9000, 65536)
#: IPv4 + UDP and IPv6 + UDP header bytes
_HEADERS_V4: Final = 20 + 8
_HEADERS_V6: Final = 40 + 8


@dataclass(frozen=True, kw_only=True, slots=True)
class RudpOptions:
    """One ``rudp://`` endpoint's configuration: the core's, and the transport's around it."""

    #: the connection's tuning; its ``max_datagram_size`` is the UDP payload size (sealing's overhead is taken
    #: off it when sealed)
    config: RudpConfig = field(default_factory=RudpConfig)
    #: seconds without any datagram from the peer, while data is unacknowledged, before the link is dead
    timeout: float = 15.0
    #: server: the most sessions served at once (new ones beyond it are dropped silently)
    sessions: int = 4096
    #: SO_RCVBUF / SO_SNDBUF in bytes
    sockbuf: int = 4 * 1024 * 1024
    #: client: seconds to wait for the sealed handshake's answer (with a key only)
    connect_timeout: float = 10.0
    #: path MTU discovery: datagrams leave with the don't-fragment bit, and larger ones than ``mtu`` are tried
    pmtud: bool = True
    #: the largest UDP payload path MTU discovery tries
    maxmtu: int = 65000

    def packet_config(self, overhead: int, *, family: socket.AddressFamily = socket.AF_INET) -> RudpConfig:
        """The connection's configuration with packets ``overhead`` bytes (sealing's) smaller than ``mtu``,
        and, with path MTU discovery, the packet sizes to try on a socket of ``family``; raises
        :class:`TransportError` when what is left is too small."""
        base = self.config.max_datagram_size
        size = base - overhead
        if size < _SMALLEST:
            raise TransportError(f"rudp option 'mtu' is too small for sealed datagrams: {base}")
        if not self.pmtud or not DONT_FRAGMENT:
            return replace(self.config, max_datagram_size=size) if overhead else self.config
        headers = _HEADERS_V6 if family == socket.AF_INET6 else _HEADERS_V4
        payloads = {min(link - headers, self.maxmtu) for link in LINK_MTUS}
        probes = tuple(sorted(payload - overhead for payload in payloads if payload > base))
        return replace(self.config, max_datagram_size=size, path_mtu_discovery=True, probe_sizes=probes)


_int = partial(int_option, "rudp")
_seconds = partial(seconds_option, "rudp")

#: URL option -> the RudpConfig field it sets
_CONFIG: Final[Mapping[str, str]] = {
    "cc": "cc",
    "pacing": "pacing",
    "mtu": "max_datagram_size",
    "rcvwnd": "receive_window",
    "sndbuf": "send_buffer",
    "ackdelay": "max_ack_delay",
    "ackevery": "ack_eliciting_threshold",
    "initial_rtt": "initial_rtt",
    "idle": "idle_timeout",
}

_PARSERS: Final[Mapping[str, OptionParser]] = {
    "cc": choice_option("rudp", tuple(CONTROLLERS)),
    "pacing": bool_option("rudp"),
    "mtu": _int(256, 65000),
    "rcvwnd": _int(INITIAL_MAX_DATA, 1 << 30),
    "sndbuf": _int(64 * 1024, 1 << 30),
    "ackdelay": _seconds(0.001, 0.5),
    "ackevery": _int(1, 64),
    "initial_rtt": _seconds(0.001, 10.0),
    "idle": _seconds(0.1, 86400.0),
    "timeout": _seconds(0.1, 3600.0),
    "sessions": _int(1, 1_000_000),
    "sockbuf": _int(64 * 1024, 1 << 30),
    "connect_timeout": _seconds(0.1, 3600.0),
    "pmtud": bool_option("rudp"),
    "maxmtu": _int(_SMALLEST, 65000),
}


def parse_options(params: Mapping[str, str]) -> RudpOptions:
    """Build :class:`RudpOptions` from URL query parameters."""
    check_splice("rudp", params)
    values = parse_overrides("rudp", params, _PARSERS, skip=("splice",))
    config = RudpConfig(**{_CONFIG[name]: value for name, value in values.items() if name in _CONFIG})  # type: ignore[arg-type]
    rest = {name: value for name, value in values.items() if name not in _CONFIG}
    return RudpOptions(config=config, **rest)  # type: ignore[arg-type]
