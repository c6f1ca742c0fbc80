"""``kcp://`` URL options: presets by name and validated overrides.

``kcp://host:port?mode=fast3&sndwnd=1024&rcvwnd=1024&mtu=1350&fec=10/3`` — every option is optional. Unknown options
and bad values raise :class:`~vtunnel.transports.base.TransportError` naming the option. ``splice=PORT`` is checked
here and read by the applications (docs/lite-tls.md, splice mode: the UDP port of a keyless KCP conversation per
spliced lite-tls stream); it changes nothing in the session itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from typing import Final

from vtunnel.arq.fec import MAX_SHARDS
from vtunnel.arq.kcp_options import DEFAULT_MODE, PRESETS, UNPACED_SNDWND, KCPOptions
from vtunnel.transports.base import TransportError
from vtunnel.transports.urloptions import OptionParser, bool_option, check_splice, int_option, seconds_option
from vtunnel.transports.urloptions import overrides as parse_overrides

__all__ = ["parse_options"]


_int = partial(int_option, "kcp")
_seconds = partial(seconds_option, "kcp")


def _fec(name: str, text: str) -> tuple[int, int] | None:
    """``off`` or ``DATA/PARITY`` shards (each at least 1, together at most 256, as Reed-Solomon over GF(2^8))."""
    if text.lower() in ("off", "0", "0/0"):
        return None
    data, slash, parity = text.partition("/")
    if slash and data.isdigit() and parity.isdigit():
        shards = int(data), int(parity)
        if min(shards) >= 1 and sum(shards) <= MAX_SHARDS:
            return shards
    raise TransportError(
        f"kcp option {name!r} must be off or DATA/PARITY shards (e.g. 10/3; each at least 1, together at most "
        f"{MAX_SHARDS}), got {text!r}"
    )


def _conv(name: str, text: str) -> int | None:
    if text == "random":
        return None
    return _int(0, 0xFFFFFFFF)(name, text)


_PARSERS: Final[Mapping[str, OptionParser]] = {
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
    "pacing": bool_option("kcp"),
    "ackrepeat": bool_option("kcp"),
    "fec": _fec,
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
    if "passthrough" in params:  # (lite-tls muxed over clear runs of sealed datagrams: splice replaced it)
        raise TransportError(
            "kcp option 'passthrough' was removed: lite-tls streams leave over splice=PORT (docs/lite-tls.md)"
        )
    check_splice("kcp", params)
    overrides = parse_overrides("kcp", params, _PARSERS, skip=("mode", "splice"))
    opts = replace(opts, **overrides)  # type: ignore[arg-type]
    if not opts.pacing and "sndwnd" not in overrides:
        # unpaced, ikcp puts a whole send window on the wire at once: 4096 segments overrun any shallow
        # queue and the session collapses (0.3 MB/s in kcpsim's 50 MB/s model), so keep kcptun's 1024
        opts = replace(opts, sndwnd=UNPACED_SNDWND)
    return opts
