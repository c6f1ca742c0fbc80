"""What a quic:// server answers without a connection: stateless resets (RFC 9000 section 10.3) and Retry tokens
(section 8.1.2).

**Stateless reset.** A server that restarted has forgotten its connections; a client that goes on sending to one
would hear nothing until its keep-alive or idle timeout gave up. So every connection ID the server issues carries
the reset token :func:`reset_token` computes from a *reset key* and the ID, and a server that gets a short-header
packet for an ID it does not know answers with :func:`reset_datagram`: random bytes shaped like a short-header
packet, shorter than what it answers, ending in that token. The client that recognises the token of the ID it
sends to (:func:`is_reset`) ends the connection at once and reconnects. The reset key comes from the server's keys
(:func:`reset_key`), so every server instance holding them, a restarted one included, computes the same tokens,
and nothing without them can; a server without a key draws a random one (its resets help only while it runs).

**Retry.** With ``retry=1`` a server validates a client's address before it keeps any state for it: the first
Initial is answered with a Retry packet carrying a token (:class:`RetryTokens`, sealed with a key of the
listener's own, bound to the client's address and valid for :data:`RETRY_LIFETIME` seconds), and only an Initial
that brings a valid token back starts a connection. It costs the client one round trip.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct
from collections.abc import Callable
from typing import Final

from aioquic.quic.connection import NetworkAddress
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "MAX_RESET_DATAGRAM",
    "MIN_RESET_DATAGRAM",
    "RESET_TOKEN_SIZE",
    "RETRY_LIFETIME",
    "ResetBudget",
    "RetryTokens",
    "is_reset",
    "keys_secret",
    "reset_datagram",
    "reset_key",
    "reset_token",
]

RESET_TOKEN_SIZE: Final = 16
#: the shortest reset sent: a short header's first byte, at least 24 unpredictable bytes, the token (a datagram
#: of this length or less is never answered, so two endpoints cannot reset each other back and forth for long)
MIN_RESET_DATAGRAM: Final = 41
#: the longest: one is enough, and a short answer keeps what a forged source receives small
MAX_RESET_DATAGRAM: Final = 64
#: how long a Retry token is accepted (the client sends it back one round trip after getting it)
RETRY_LIFETIME: Final = 10.0
_RESET_LABEL: Final = b"vtunnel-quic stateless reset"
_NONCE: Final = 12


def reset_key(secret: bytes | None) -> bytes:
    """The reset key of a server whose keys are ``secret`` (their bytes, in a fixed order), or a random one."""
    if secret is None:
        return os.urandom(32)
    return hmac.digest(_RESET_LABEL, secret, "sha256")


def reset_token(key: bytes, connection_id: bytes) -> bytes:
    """The stateless reset token of ``connection_id``: 16 bytes of HMAC-SHA256 under the reset ``key``."""
    return hmac.digest(key, connection_id, "sha256")[:RESET_TOKEN_SIZE]


def reset_datagram(key: bytes, connection_id: bytes, answered: int) -> bytes | None:
    """The stateless reset answering a datagram of ``answered`` bytes sent to ``connection_id``; ``None`` when
    that datagram is too short to be answered by a shorter one."""
    size = min(answered - 1, MAX_RESET_DATAGRAM)
    if size < MIN_RESET_DATAGRAM:
        return None
    filler = bytearray(os.urandom(size - RESET_TOKEN_SIZE))
    filler[0] = 0x40 | (filler[0] & 0x3F)  # a short header: form bit clear, fixed bit set
    return bytes(filler) + reset_token(key, connection_id)


def is_reset(datagram: bytes, token: bytes | None) -> bool:
    """Whether ``datagram`` is a stateless reset with ``token`` (the token of the ID the client sends to)."""
    return (
        token is not None
        and len(datagram) >= MIN_RESET_DATAGRAM
        and not datagram[0] & 0x80
        and hmac.compare_digest(datagram[-RESET_TOKEN_SIZE:], token)
    )


class ResetBudget:
    """At most ``rate`` resets a second (a burst of ``burst``), whoever asks: a flood of packets for unknown IDs
    from forged sources gets no more than that out of the server."""

    def __init__(self, rate: float = 100.0, burst: int = 100) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at: float | None = None

    def take(self, now: float) -> bool:
        if self._at is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


def _address(address: NetworkAddress) -> bytes:
    """A client's address as the bytes a token is bound to."""
    try:
        host = ipaddress.ip_address(address[0]).packed
    except ValueError:
        host = str(address[0]).encode()
    return host + struct.pack("!H", address[1])


class RetryTokens:
    """Retry tokens: AES-GCM under a key of this listener's, over when the token was made and the two connection
    IDs the server needs back (the client's original destination ID and the Retry's source ID), bound to the
    client's address as associated data."""

    def __init__(self, clock: Callable[[], float], lifetime: float = RETRY_LIFETIME) -> None:
        self._aead = AESGCM(AESGCM.generate_key(bit_length=128))
        self._clock = clock
        self._lifetime = lifetime

    def create(self, address: NetworkAddress, original_cid: bytes, retry_cid: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        body = struct.pack("!dB", self._clock(), len(original_cid)) + original_cid + retry_cid
        return nonce + self._aead.encrypt(nonce, body, _address(address))

    def validate(self, address: NetworkAddress, token: bytes) -> tuple[bytes, bytes]:
        """``(original destination ID, Retry source ID)`` of a token this listener made for ``address`` and
        that has not expired; :class:`ValueError` otherwise."""
        try:
            body = self._aead.decrypt(token[:_NONCE], token[_NONCE:], _address(address))
        except (InvalidTag, ValueError):
            raise ValueError("not a Retry token of this server for this address") from None
        made, length = struct.unpack_from("!dB", body)
        if not 0.0 <= self._clock() - made <= self._lifetime:
            raise ValueError("an expired Retry token")
        start = struct.calcsize("!dB")
        return body[start : start + length], body[start + length :]


def keys_secret(keys: list[bytes]) -> bytes | None:
    """The bytes of a server's keys in a fixed order (``None`` without any), the input of :func:`reset_key`."""
    if not keys:
        return None
    return hashlib.sha256(b"".join(sorted(keys))).digest()
