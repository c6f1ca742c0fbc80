"""The named errors of the kcptun wire layers.

Everything a peer (or anyone who can reach the UDP port) sends is parsed by code that raises only these, so a
caller can drop a bad datagram or close a bad session without catching anything broader. (:class:`FECError` is
:mod:`vtunnel.arq.fec`'s, which ``kcp://`` shares.)
"""

from __future__ import annotations

from vtunnel.arq.fec import FECError

__all__ = [
    "CompressionError",
    "ConfigError",
    "CryptError",
    "FECError",
    "KcptunError",
    "SmuxError",
    "SmuxProtocolError",
]


class KcptunError(Exception):
    """Base of every error raised by :mod:`vtunnel.kcptun`."""


class ConfigError(KcptunError):
    """An option value kcptun does not accept (unknown cipher or mode, shard counts out of range...)."""


class CryptError(KcptunError):
    """A datagram that is too short for the crypt header or whose CRC32 does not match after decryption."""


class CompressionError(KcptunError):
    """A snappy frame stream that is malformed or fails its checksum."""


class SmuxError(KcptunError):
    """Misuse of an smux session by its owner (writing to a closed stream, opening on a closed session)."""


class SmuxProtocolError(KcptunError):
    """The peer sent an smux frame that breaks the protocol (wrong version, unknown command, bad length)."""
