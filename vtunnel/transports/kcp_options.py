"""``kcp://`` URL options: presets by name and validated overrides.

``kcp://host:port?mode=fast3&sndwnd=1024&rcvwnd=1024&mtu=1350`` — every option is optional. Unknown options
and bad values raise :class:`~vtunnel.transports.base.TransportError` naming the option.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Final

from vtunnel.transports.base import TransportError

__all__ = ["DEFAULT_MODE", "PRESETS", "KCPOptions", "NoDelay", "parse_options"]


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
    #: send at the measured delivery rate with about two round trips in flight (see kcp_pacing), instead of a
    #: whole window at once; off: ikcp's own behaviour, as in kcptun
    pacing: bool = True
    #: send each ACK twice, the second time in the next datagram of ACKs (see KCPEngine); off: once, as ikcp
    ackrepeat: bool = True

    @property
    def nodelay_args(self) -> NoDelay:
        return NoDelay(nodelay=self.nodelay, interval=self.interval, resend=self.resend, nc=self.nc)


def _int(lo: int, hi: int) -> Callable[[str, str], int]:
    def parse(name: str, text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise TransportError(f"kcp option {name!r} must be an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise TransportError(f"kcp option {name!r} must be between {lo} and {hi}, got {value}")
        return value

    return parse


def _seconds(lo: float, hi: float) -> Callable[[str, str], float]:
    def parse(name: str, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise TransportError(f"kcp option {name!r} must be a number of seconds, got {text!r}") from None
        if not lo <= value <= hi:  # also rejects nan
            raise TransportError(f"kcp option {name!r} must be between {lo} and {hi} seconds, got {text!r}")
        return value

    return parse


def _bool(name: str, text: str) -> bool:
    value = text.lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise TransportError(f"kcp option {name!r} must be on or off, got {text!r}")


def _conv(name: str, text: str) -> int | None:
    if text == "random":
        return None
    return _int(0, 0xFFFFFFFF)(name, text)


_PARSERS: Final[Mapping[str, Callable[[str, str], object]]] = {
    "nodelay": _int(0, 2),
    "interval": _int(1, 5000),
    "resend": _int(0, 100),
    "nc": _int(0, 1),
    "sndwnd": _int(16, 65535),
    "rcvwnd": _int(128, 65535),  # ikcp refuses a receive window under 128
    "mtu": _int(256, 65000),
    "conv": _conv,
    "timeout": _seconds(0.1, 3600.0),
    "idle": _seconds(0.1, 86400.0),
    "sessions": _int(1, 1_000_000),
    "sockbuf": _int(64 * 1024, 1 << 30),
    "connect_timeout": _seconds(0.1, 3600.0),
    "pacing": _bool,
    "ackrepeat": _bool,
}


def parse_options(params: Mapping[str, str]) -> KCPOptions:
    """Build :class:`KCPOptions` from URL query parameters: the ``mode`` preset, then single overrides."""
    mode = params.get("mode", DEFAULT_MODE).lower()
    preset = PRESETS.get(mode)
    if preset is None:
        raise TransportError(f"kcp option 'mode' must be one of {', '.join(PRESETS)}, got {mode!r}")
    opts = KCPOptions(
        mode=mode, nodelay=preset.nodelay, interval=preset.interval, resend=preset.resend, nc=preset.nc
    )
    overrides: dict[str, object] = {}
    for name, text in params.items():
        if name == "mode":
            continue
        parser = _PARSERS.get(name)
        if parser is None:
            known = ", ".join(["mode", *sorted(_PARSERS)])
            raise TransportError(f"unknown kcp option {name!r} (known: {known})")
        overrides[name] = parser(name, text.strip())
    opts = replace(opts, **overrides)  # type: ignore[arg-type]
    if not opts.pacing and "sndwnd" not in overrides:
        # unpaced, ikcp puts a whole send window on the wire at once: 4096 segments overrun any shallow
        # queue and the session collapses (0.3 MB/s in kcpsim's 50 MB/s model), so keep kcptun's 1024
        opts = replace(opts, sndwnd=UNPACED_SNDWND)
    return opts
