"""What a KCP session is configured with: the ``ikcp_nodelay`` presets and :class:`KCPOptions` (pure data; the
``kcp://`` URL parser that builds them is :mod:`vtunnel.transports.kcp.options`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = ["DEFAULT_MODE", "PRESETS", "UNPACED_SNDWND", "KCPOptions", "NoDelay"]


@dataclass(frozen=True, kw_only=True, slots=True)
class NoDelay:
    """The four arguments of ``ikcp_nodelay``."""

    nodelay: int
    interval: int
    resend: int
    nc: int


#: kcptun's presets (normal, fast, fast2, fast3) and vproxy's most aggressive one (fast4).
PRESETS: Final[Mapping[str, NoDelay]] = {
    "normal": NoDelay(nodelay=0, interval=40, resend=2, nc=1),
    "fast": NoDelay(nodelay=0, interval=30, resend=2, nc=1),
    "fast2": NoDelay(nodelay=1, interval=20, resend=2, nc=1),
    "fast3": NoDelay(nodelay=1, interval=10, resend=2, nc=1),
    "fast4": NoDelay(nodelay=1, interval=5, resend=1, nc=1),
}
DEFAULT_MODE: Final = "fast3"
#: the send window when pacing is off and none is given (kcptun's reference configuration)
UNPACED_SNDWND: Final = 1024


@dataclass(frozen=True, kw_only=True, slots=True)
class KCPOptions:
    """Everything a KCP session is configured with (defaults: the ``fast3`` preset with big windows)."""

    mode: str = DEFAULT_MODE
    nodelay: int = 1
    interval: int = 10
    resend: int = 2
    nc: int = 1
    #: send / receive windows in segments
    sndwnd: int = 4096
    rcvwnd: int = 4096
    #: the UDP payload size KCP fills (the security layer's overhead is taken off it when sealing)
    mtu: int = 1350
    #: ``None``: a random non-zero conv per client session; ``0`` talks to vproxy (its KCP always uses conv 0)
    conv: int | None = None
    #: seconds without any datagram from the peer, while data is unacknowledged, before the link is dead
    timeout: float = 15.0
    #: seconds without any datagram from the peer before an (even idle) session is closed
    idle: float = 60.0
    #: server: the most sessions served at once (new ones beyond it are dropped silently)
    sessions: int = 4096
    #: SO_RCVBUF / SO_SNDBUF in bytes
    sockbuf: int = 4 * 1024 * 1024
    #: client: seconds to wait for the sealed handshake's answer (secure mode only)
    connect_timeout: float = 10.0
    #: send at the measured delivery rate with about two round trips in flight (see vtunnel.arq.pacing), instead of a
    #: whole window at once; off: ikcp's own behaviour, as in kcptun
    pacing: bool = True
    #: send each ACK twice, the second time in the next datagram of ACKs (see KCPEngine); off: once, as ikcp
    ackrepeat: bool = True
    #: forward error correction (data shards, parity shards): the session's datagrams travel as kcp-go's FEC
    #: packets (see vtunnel.arq.fec), both ends alike; None: bare KCP datagrams
    fec: tuple[int, int] | None = None

    @property
    def nodelay_args(self) -> NoDelay:
        return NoDelay(nodelay=self.nodelay, interval=self.interval, resend=self.resend, nc=self.nc)
