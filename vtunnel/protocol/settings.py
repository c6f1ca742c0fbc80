"""Configuration and the SETTINGS negotiation of vtunnel's extensions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from vtunnel.protocol.errors import ConfigError
from vtunnel.protocol.frames import MAX_FRAME_PAYLOAD, MAX_WINDOW

__all__ = [
    "PROTOCOL_VERSION",
    "VTUNNEL_MAGIC",
    "ExtensionBits",
    "Extensions",
    "PeerSettings",
    "SettingId",
    "TunnelConfig",
    "local_settings",
    "negotiate",
    "parse_peer_settings",
]

VTUNNEL_MAGIC = 0x76_74_75_6E  # "vtun"
PROTOCOL_VERSION = 1
MIN_FRAME_SIZE = 1024
#: the stream window of a peer whose SETTINGS leave the entry out
ABSENT_STREAM_WINDOW = 256 * 1024
#: the tunnel window of a peer whose SETTINGS leave the entry out (what vtunnel advertised before 64 MiB)
ABSENT_TUNNEL_WINDOW = 16 * 1024 * 1024


class SettingId(IntEnum):
    """Private SETTINGS ids (HTTP/2's experimental range); unknown ids are ignored."""

    MAGIC = 0xF000
    VERSION = 0xF001
    EXTENSIONS = 0xF002
    INITIAL_STREAM_WINDOW = 0xF003
    INITIAL_TUNNEL_WINDOW = 0xF004
    MAX_FRAME_SIZE = 0xF005
    #: the port of the sender's lite-tls splice listener, on the host the tunnel reached (TCP for tcp:// and
    #: tls://, UDP for kcp:// and rudp://): a server in splice mode announces it, so that an agent need not be told
    SPLICE_PORT = 0xF006


class ExtensionBits(IntFlag):
    FLOW_CONTROL = 0x1
    METADATA = 0x2
    GZIP = 0x4
    GRACEFUL_SHUTDOWN = 0x8
    LITE_TLS = 0x10
    DATAGRAMS = 0x20
    TUN = 0x40
    LITE_TLS_RUNS = 0x80
    #: lite-tls over a link that carries no passthrough records: streams leave only over dedicated connections
    #: (splice mode), and a stream that leaves muxed stays inside the link's own protection. Its own bit, so that
    #: an end that would send passthrough records on such a link (an older kcp:// ``passthrough=on``) never agrees
    LITE_TLS_SPLICED = 0x100


@dataclass(frozen=True, kw_only=True, slots=True)
class TunnelConfig:
    """Every knob of the tunnel core. ``extensions=False`` behaves exactly like vproxy."""

    extensions: bool = True
    keepalive_interval: float = 5.0
    keepalive_timeout: float = 5.0
    keepalive_max_missed: int = 2
    handshake_timeout: float = 5.0
    #: the window every stream has for certain, whatever the others hold: advertised to a vtunnel peer as
    #: INITIAL_STREAM_WINDOW (lowered to ``initial_stream_window`` if above it). 16 KiB: one full frame, so the
    #: largest datagram of a ``udp`` stream always fits, and 2,000 stalled streams hold 31 MiB beyond the budget.
    min_stream_window: int = 16 * 1024
    #: the window a new stream is granted (a WINDOW_UPDATE with its SYN or at the peer's SYN) as far as first
    #: grants, within half of ``receive_budget``, have room; it grows fourfold each time the application has read
    #: half of it, up to ``max_stream_window`` (raised to ``initial_stream_window`` if below it), as far as the
    #: budget has room for growth (all of it less the first grants, or less a quarter kept for them). 8 MiB: one
    #: stream's bytes in flight and those held behind a lost packet until it is sent again, at 50 MB/s and 20 ms,
    #: with half of the window still to be returned; beside one stream grown in full, another still grows to 4 MiB
    initial_stream_window: int = 64 * 1024
    max_stream_window: int = 8 * 1024 * 1024
    #: in flight only: tunnel credit returns as the bytes arrive, whether or not they are read. Above what the
    #: stream windows of a thousand streams hold together (``receive_budget`` + 1,024 floors: 32 MiB), so that it
    #: does not cut their own windows short: at 16 MiB, 1,024 busy streams over kcp:// found it spent (the half
    #: not yet announced, and the queues before a busy receiver) and each read only what it had left
    initial_tunnel_window: int = 64 * 1024 * 1024
    #: what the stream windows of one tunnel may hold together beyond ``min_stream_window`` each (first grants at
    #: most half, growth the rest): a window is granted or grown only while it fits. What one tunnel makes its
    #: receiver hold is at most this plus ``min_stream_window`` per open stream, however many streams stall
    #: (docs/protocol.md, "Flow control").
    receive_budget: int = 16 * 1024 * 1024
    max_frame_size: int = 16384
    gzip: bool = False
    #: offer the ``datagrams`` extension when the transport carries unreliable datagrams (rudp://): ``udp``
    #: streams' datagrams then skip the ordered byte stream; off keeps every datagram reliable and in order
    datagrams: bool = True
    #: offer the lite-tls extension (docs/lite-tls.md): ``lite-tls`` streams leave the tunnel's encryption once
    #: their own TLS is up. The runtime offers it only where its streams may leave: over a link that carries
    #: passthrough records (a byte stream with a key), or where they may leave over dedicated connections (splice
    #: mode, e.g. kcp:// with ``splice=``, offered as ``lite_tls_spliced``); ``False`` (config ``lite_tls = false``, ``--no-lite-tls``) never offers it.
    lite_tls: bool = True
    #: with lite-tls, offer ``lite-tls-runs``: a PASSTHROUGH frame (and its passthrough record) may carry a run of
    #: whole TLS application-data records, up to ``MAX_PASSTHROUGH_RUN`` bytes, instead of one (docs/lite-tls.md).
    #: The runtime offers it only over a link that carries such records (a byte stream with a key)
    lite_tls_runs: bool = True
    #: with lite-tls, offer it as ``lite-tls-spliced`` (``LITE_TLS_SPLICED``) instead of ``lite-tls``: set by the
    #: runtime over a link that carries no passthrough records where streams may leave over dedicated connections
    #: (kcp://, rudp:// in splice mode)
    lite_tls_spliced: bool = False
    #: the port of this end's lite-tls splice listener, announced as ``SPLICE_PORT`` with a lite-tls offer (a
    #: server in splice mode); None: none
    splice_port: int | None = None
    #: offer the ``tun`` extension: ``tun`` streams carry IP packets (IP mode, docs/tun.md). On only where the
    #: application serves them (``--tun`` on the server, or asks for them, on the agent)
    tun: bool = False
    drain_timeout: float = 10.0
    max_concurrent_streams: int = 100_000

    def __post_init__(self) -> None:
        for name in (
            "extensions",
            "gzip",
            "datagrams",
            "lite_tls",
            "lite_tls_runs",
            "lite_tls_spliced",
            "tun",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, not {getattr(self, name)!r}")
        for name in ("keepalive_interval", "keepalive_timeout", "handshake_timeout", "drain_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or math.isnan(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
        if not isinstance(self.keepalive_max_missed, int) or self.keepalive_max_missed < 1:
            raise ConfigError(f"keepalive_max_missed must be an int >= 1, not {self.keepalive_max_missed!r}")
        windows = ("min_stream_window", "initial_stream_window", "max_stream_window", "initial_tunnel_window")
        for name in (*windows, "receive_budget"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1024 <= value <= MAX_WINDOW:
                raise ConfigError(f"{name} must be an int in [1024, {MAX_WINDOW}], not {value!r}")
        if self.min_stream_window > self.initial_stream_window:  # a smaller first window is the floor itself
            object.__setattr__(self, "min_stream_window", self.initial_stream_window)
        if self.max_stream_window < self.initial_stream_window:  # a larger first window is never shrunk
            object.__setattr__(self, "max_stream_window", self.initial_stream_window)
        if not isinstance(self.max_frame_size, int) or not (
            MIN_FRAME_SIZE <= self.max_frame_size <= MAX_FRAME_PAYLOAD
        ):
            raise ConfigError(
                f"max_frame_size must be an int in [{MIN_FRAME_SIZE}, {MAX_FRAME_PAYLOAD}], "
                f"not {self.max_frame_size!r}"
            )
        if self.splice_port is not None and (
            not isinstance(self.splice_port, int) or not 1 <= self.splice_port <= 65535
        ):
            raise ConfigError(f"splice_port must be a port (1-65535) or None, not {self.splice_port!r}")
        if not isinstance(self.max_concurrent_streams, int) or self.max_concurrent_streams < 1:
            value = self.max_concurrent_streams
            raise ConfigError(f"max_concurrent_streams must be an int >= 1, not {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Extensions:
    """The extensions both sides agreed on (all off: plain vproxy)."""

    flow_control: bool = False
    metadata: bool = False
    gzip: bool = False
    graceful_shutdown: bool = False
    #: the datagrams of ``udp`` streams may travel as the transport's unreliable datagrams
    datagrams: bool = False
    lite_tls: bool = False
    #: PASSTHROUGH frames may carry runs of whole TLS records (only with ``lite_tls``)
    lite_tls_runs: bool = False
    #: ``tun`` streams (IP packets, one per datagram) may be opened
    tun: bool = False

    @property
    def names(self) -> frozenset[str]:
        pairs = (
            ("flow-control", self.flow_control),
            ("metadata", self.metadata),
            ("gzip", self.gzip),
            ("graceful-shutdown", self.graceful_shutdown),
            ("datagrams", self.datagrams),
            ("lite-tls", self.lite_tls),
            ("lite-tls-runs", self.lite_tls_runs),
            ("tun", self.tun),
        )
        return frozenset(name for name, on in pairs if on)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    @classmethod
    def from_bits(cls, bits: int) -> Extensions:
        return cls(
            flow_control=bool(bits & ExtensionBits.FLOW_CONTROL),
            metadata=bool(bits & ExtensionBits.METADATA),
            gzip=bool(bits & ExtensionBits.GZIP),
            graceful_shutdown=bool(bits & ExtensionBits.GRACEFUL_SHUTDOWN),
            datagrams=bool(bits & ExtensionBits.DATAGRAMS),
            lite_tls=bool(bits & (ExtensionBits.LITE_TLS | ExtensionBits.LITE_TLS_SPLICED)),
            lite_tls_runs=bits & (ExtensionBits.LITE_TLS | ExtensionBits.LITE_TLS_RUNS)
            == ExtensionBits.LITE_TLS | ExtensionBits.LITE_TLS_RUNS,
            tun=bool(bits & ExtensionBits.TUN),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerSettings:
    """What a vtunnel peer announced in its SETTINGS."""

    version: int
    extensions: int
    initial_stream_window: int
    initial_tunnel_window: int
    max_frame_size: int
    #: the port of the peer's lite-tls splice listener (``SPLICE_PORT``), or None
    splice_port: int | None = None


def offered_bits(config: TunnelConfig, *, datagrams: bool = False) -> int:
    """The extensions this side offers; ``datagrams``: its transport carries unreliable datagrams."""
    if not config.extensions:
        return 0
    bits = ExtensionBits.FLOW_CONTROL | ExtensionBits.METADATA | ExtensionBits.GRACEFUL_SHUTDOWN
    if config.gzip:
        bits |= ExtensionBits.GZIP
    if datagrams and config.datagrams:
        bits |= ExtensionBits.DATAGRAMS
    if config.lite_tls and config.lite_tls_spliced:
        bits |= ExtensionBits.LITE_TLS_SPLICED
    elif config.lite_tls:
        bits |= ExtensionBits.LITE_TLS
        if config.lite_tls_runs:
            bits |= ExtensionBits.LITE_TLS_RUNS
    if config.tun:
        bits |= ExtensionBits.TUN
    return int(bits)


def local_settings(config: TunnelConfig, *, datagrams: bool = False) -> list[tuple[int, int]]:
    """The SETTINGS entries a vtunnel endpoint sends (empty list: the vproxy handshake); ``datagrams``: its
    transport carries unreliable datagrams (the DATAGRAMS bit is offered)."""
    if not config.extensions:
        return []
    bits = offered_bits(config, datagrams=datagrams)
    entries: list[tuple[int, int]] = [
        (SettingId.MAGIC, VTUNNEL_MAGIC),
        (SettingId.VERSION, PROTOCOL_VERSION),
        (SettingId.EXTENSIONS, bits),
        (SettingId.INITIAL_STREAM_WINDOW, config.min_stream_window),
        (SettingId.INITIAL_TUNNEL_WINDOW, config.initial_tunnel_window),
        (SettingId.MAX_FRAME_SIZE, config.max_frame_size),
    ]
    if config.splice_port is not None and bits & (ExtensionBits.LITE_TLS | ExtensionBits.LITE_TLS_SPLICED):
        entries.append((SettingId.SPLICE_PORT, config.splice_port))
    return entries


def parse_peer_settings(entries: list[tuple[int, int]]) -> PeerSettings:
    """Validate a vtunnel SETTINGS payload; raises ValueError naming the bad entry."""
    values = dict(entries)
    if values.get(SettingId.MAGIC) != VTUNNEL_MAGIC:
        raise ValueError("SETTINGS parameters without the vtunnel magic")
    version = values.get(SettingId.VERSION, 0)
    if version < 1:
        raise ValueError(f"unsupported vtunnel version {version}")
    stream_window = values.get(SettingId.INITIAL_STREAM_WINDOW, ABSENT_STREAM_WINDOW)
    tunnel_window = values.get(SettingId.INITIAL_TUNNEL_WINDOW, ABSENT_TUNNEL_WINDOW)
    frame_size = values.get(SettingId.MAX_FRAME_SIZE, 16384)
    for name, value in (("stream window", stream_window), ("tunnel window", tunnel_window)):
        if not 1024 <= value <= MAX_WINDOW:
            raise ValueError(f"initial {name} {value} out of range")
    if not MIN_FRAME_SIZE <= frame_size <= MAX_FRAME_PAYLOAD:
        raise ValueError(f"max frame size {frame_size} out of range")
    splice_port = values.get(SettingId.SPLICE_PORT)
    if splice_port is not None and not 1 <= splice_port <= 65535:
        raise ValueError(f"splice port {splice_port} out of range")
    return PeerSettings(
        version=version,
        extensions=values.get(SettingId.EXTENSIONS, 0),
        initial_stream_window=stream_window,
        initial_tunnel_window=tunnel_window,
        max_frame_size=frame_size,
        splice_port=splice_port,
    )


def negotiate(config: TunnelConfig, peer: PeerSettings | None, *, datagrams: bool = False) -> Extensions:
    """Extensions are the intersection of what both sides offer."""
    if peer is None:
        return Extensions()
    return Extensions.from_bits(offered_bits(config, datagrams=datagrams) & peer.extensions)
