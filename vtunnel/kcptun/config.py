"""kcptun's options, by kcptun's own names and with its defaults, and what they mean for each layer.

The options that must agree on both ends are the wire ones: ``key``, ``crypt``, ``datashard``/``parityshard``,
``nocomp`` and ``smuxver`` (``mtu`` should). The rest (``mode``, windows, buffers, keepalive) are local tuning.
kcptun's client and server differ only in their window defaults (client 128/512, server 1024/1024).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Final, Self

from vtunnel.arq.fec import FEC_OVERHEAD
from vtunnel.arq.kcp_options import PRESETS, KCPOptions
from vtunnel.kcptun.crypt import (
    HEADER_SIZE,
    MTU_LIMIT,
    Entropy,
    PacketCrypt,
    check_cipher,
    make_block_crypt,
)
from vtunnel.kcptun.errors import ConfigError
from vtunnel.kcptun.smux import SmuxConfig

__all__ = ["DEFAULT_KEY", "MODES", "KcptunConfig"]

#: kcptun's built-in ``--key`` (spelled as kcptun spells it)
DEFAULT_KEY: Final = "it's a secrect"
#: ``--mode`` values; ``manual`` takes ``nodelay``, ``interval``, ``resend`` and ``nc`` as given
MODES: Final = ("normal", "fast", "fast2", "fast3", "manual")
#: the most UDP sessions ``conn`` opens (kcptun takes up to 65535; each is a socket and a KCP session)
_MAX_CONN: Final = 256
#: the smallest keepalive timeout smux is given (its default); a longer interval stretches it
_KEEPALIVE_TIMEOUT: Final = 30.0


@dataclass(frozen=True, kw_only=True, slots=True)
class KcptunConfig:
    """One end's kcptun options (defaults: ``kcptun-server``'s; :meth:`client` gives ``kcptun-client``'s)."""

    key: str = DEFAULT_KEY
    crypt: str = "aes"
    mode: str = "fast"
    mtu: int = 1350
    sndwnd: int = 1024
    rcvwnd: int = 1024
    datashard: int = 10
    parityshard: int = 3
    nocomp: bool = False
    smuxver: int = 1
    #: bytes one stream may buffer (smux v2 announces it as the stream's window)
    streambuf: int = 2097152
    #: seconds between smux keepalives
    keepalive: int = 10
    #: kcptun-client's ``--conn``: UDP sessions to the server, the streams spread over them in turn (client only)
    conn: int = 1
    #: ``mode manual`` only (kcptun's hidden defaults)
    nodelay: int = 0
    interval: int = 50
    resend: int = 0
    nc: int = 0

    def __post_init__(self) -> None:
        check_cipher(self.crypt)
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.smuxver not in (1, 2):
            raise ConfigError(f"smuxver {self.smuxver} is not 1 or 2")
        if not 0 <= self.datashard <= 255 or not 0 <= self.parityshard <= 255:
            raise ConfigError("datashard and parityshard must be within 0..255")
        if self.fec and self.datashard + self.parityshard > 256:
            raise ConfigError("datashard + parityshard must not pass 256")
        if self.engine_mtu < 50 or self.mtu > MTU_LIMIT:
            raise ConfigError(f"mtu {self.mtu} out of range (at most {MTU_LIMIT})")
        if self.sndwnd < 1 or self.rcvwnd < 1:
            raise ConfigError("sndwnd and rcvwnd must be positive")
        if self.keepalive < 1 or self.streambuf < 1:
            raise ConfigError("keepalive and streambuf must be positive")
        if not 1 <= self.conn <= _MAX_CONN:
            raise ConfigError(f"conn {self.conn} out of range (1..{_MAX_CONN})")

    @classmethod
    def client(cls, **options: object) -> Self:
        """``kcptun-client``'s defaults, with ``options`` over them."""
        merged: dict[str, object] = {"sndwnd": 128, "rcvwnd": 512}
        merged.update(options)
        return cls(**merged)  # type: ignore[arg-type]

    @classmethod
    def from_options(cls, options: Mapping[str, str], *, client: bool, key: str | None = None) -> Self:
        """A config from kcptun's option names given as text (a ``kcp://`` URL's query), over kcptun-client's
        (``client``) or kcptun-server's defaults. Flags take ``1``/``true``/``yes`` or nothing (``?nocomp``) for
        on, ``0``/``false``/``no`` for off. The passphrase is ``key``, never an option: a URL is not a secret."""
        types = {f.name: f.type for f in fields(cls) if f.name != "key"}
        values: dict[str, object] = {}
        for name, text in options.items():
            kind = types.get(name)
            if kind is None:
                raise ConfigError(
                    f"unknown kcptun option {name!r} (known: {', '.join(sorted(types))}; the passphrase is "
                    "not an option)"
                    if name != "key"
                    else "the kcptun passphrase (--key) is not a URL option: give it in a file"
                )
            if name == "conn" and not client:
                raise ConfigError(
                    "conn is kcptun-client's option (--conn): a server takes every session its clients open"
                )
            values[name] = _option_value(name, text, kind)
        if key is not None:
            values["key"] = key
        return cls.client(**values) if client else cls(**values)  # type: ignore[arg-type]

    @property
    def fec(self) -> bool:
        """kcp-go uses FEC only when both shard counts are positive."""
        return self.datashard > 0 and self.parityshard > 0

    @property
    def overhead(self) -> int:
        """What kcp-go puts in front of each KCP datagram: the crypt header, and FEC's when on."""
        return HEADER_SIZE + (FEC_OVERHEAD if self.fec else 0)

    @property
    def engine_mtu(self) -> int:
        """The MTU the KCP engine fills, so that whole datagrams stay within ``mtu`` (as kcp-go reserves)."""
        return self.mtu - self.overhead

    def kcp_options(self) -> KCPOptions:
        """The KCP engine's settings: kcptun's mode preset and windows, ikcp's own sending (no pacing)."""
        if self.mode == "manual":
            nodelay, interval, resend, nc = self.nodelay, self.interval, self.resend, self.nc
        else:
            preset = PRESETS[self.mode]
            nodelay, interval, resend, nc = preset.nodelay, preset.interval, preset.resend, preset.nc
        return KCPOptions(
            mode=self.mode,
            nodelay=nodelay,
            interval=interval,
            resend=resend,
            nc=nc,
            sndwnd=self.sndwnd,
            rcvwnd=self.rcvwnd,
            mtu=self.engine_mtu,
            pacing=False,
            ackrepeat=False,
        )

    def smux_config(self) -> SmuxConfig:
        interval = float(self.keepalive)
        return SmuxConfig(
            version=self.smuxver,
            keepalive_interval=interval,
            keepalive_timeout=max(_KEEPALIVE_TIMEOUT, interval),
            max_stream_buffer=min(self.streambuf, 0x7FFFFFFF),
        )

    def packet_crypt(self, entropy: Entropy | None = None) -> PacketCrypt:
        """The crypt layer (derives the key: PBKDF2, a few milliseconds; share it between sessions)."""
        block = make_block_crypt(self.crypt, self.key)
        return PacketCrypt(block) if entropy is None else PacketCrypt(block, entropy=entropy)


def _option_value(name: str, text: str, kind: object) -> object:
    value = text.strip()
    if kind in (bool, "bool"):
        flag = value.lower()
        if flag in ("", "1", "true", "yes", "on"):
            return True
        if flag in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"kcptun option {name} is a flag (1 or 0), not {text!r}")
    if kind in (int, "int"):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"kcptun option {name} takes a whole number, not {text!r}") from None
    return value
