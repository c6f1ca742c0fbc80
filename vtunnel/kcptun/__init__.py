"""vtunnel.kcptun: kcptun's wire, sans-IO, so that vtunnel can talk to kcptun-client and kcptun-server.

Same rules as ``protocol``, ``security`` and ``arq``: bytes and ``now`` in; bytes, events and deadlines out; no
sockets, clocks, sleeps or logging. The layers, bottom up:

- :mod:`~vtunnel.kcptun.crypt`: kcp-go's nonce + CRC32 header and ciphers, kcptun's key derivation
- :mod:`vtunnel.arq.fec` (with :mod:`vtunnel.arq.reedsolomon`): kcp-go's Reed-Solomon FEC, shared with ``kcp://``
- KCP itself: :class:`vtunnel.arq.kcp_engine.KCPEngine`, in stream mode with kcptun's mode presets
- :mod:`~vtunnel.kcptun.snappy`: kcptun's snappy-framed compression of the whole stream
- :mod:`~vtunnel.kcptun.smux`: xtaci/smux v1 and v2 streams
- :mod:`~vtunnel.kcptun.session`: all of them for one peer; :mod:`~vtunnel.kcptun.config`: kcptun's options
"""

from vtunnel.kcptun.config import DEFAULT_KEY, MODES, KcptunConfig
from vtunnel.kcptun.crypt import PacketCrypt
from vtunnel.kcptun.errors import (
    CompressionError,
    ConfigError,
    CryptError,
    FECError,
    KcptunError,
    SmuxError,
    SmuxProtocolError,
)
from vtunnel.kcptun.session import KcptunSession, first_conv
from vtunnel.kcptun.smux import (
    DataReceived,
    Event,
    SessionClosed,
    StreamEnded,
    StreamOpened,
    WindowUpdated,
)

__all__ = [
    "DEFAULT_KEY",
    "MODES",
    "CompressionError",
    "ConfigError",
    "CryptError",
    "DataReceived",
    "Event",
    "FECError",
    "KcptunConfig",
    "KcptunError",
    "KcptunSession",
    "PacketCrypt",
    "SessionClosed",
    "SmuxError",
    "SmuxProtocolError",
    "StreamEnded",
    "StreamOpened",
    "WindowUpdated",
    "first_conv",
]
