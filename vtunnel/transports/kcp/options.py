"""``kcp://`` URL options: presets by name and validated overrides.

``kcp://host:port?mode=fast3&sndwnd=1024&rcvwnd=1024&mtu=1350`` — every option is optional. Unknown options
and bad values raise :class:`~vtunnel.transports.base.TransportError` naming the option.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Final

from vtunnel.arq.kcp_options import DEFAULT_MODE, PRESETS, UNPACED_SNDWND, KCPOptions
from vtunnel.transports.base import TransportError

__all__ = ["parse_options"]


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
