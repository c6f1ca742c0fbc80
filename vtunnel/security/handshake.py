"""What the handshake messages carry, shared by the stream and the datagram modes.

The first message's payload (encrypted and authenticated under the pre-shared key)::

    timestamp  u64 big endian, milliseconds since the Unix epoch (the sender's wall clock)
    token      16 random bytes: the anti-replay nonce the server remembers
    ciphers    u8 count, then that many transport cipher codes, best first (see :mod:`.ciphers`)
    padding    random bytes, random length (ignored)

The reply's payload is mode specific; it carries the chosen cipher's code and ends with random padding too.
Padding is always "the rest of the payload", so it needs no length field.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher as _StreamCipher
from cryptography.hazmat.primitives.ciphers import CipherContext, algorithms

from .ciphers import Cipher, decode_offer, encode_offer
from .errors import AuthenticationFailed, SecurityError
from .noise import DHLEN, TAGLEN

__all__ = [
    "INIT_PAYLOAD_LEN",
    "MIN_INIT_PAYLOAD_LEN",
    "SALT_LEN",
    "Entropy",
    "InitPayload",
    "check_wall_clock",
    "decode_init_payload",
    "encode_init_payload",
    "keystream",
    "random_between",
    "salted_keystream",
]

#: A source of random bytes: ``entropy(n)`` returns ``n`` of them (``os.urandom``, or a seeded one in tests).
Entropy = Callable[[int], bytes]

TOKEN_LEN = 16
_INIT = struct.Struct(">Q16s")
INIT_PAYLOAD_LEN = _INIT.size  # 24, before the cipher offer and the padding
#: The shortest first payload: timestamp, token, and an offer of one cipher.
MIN_INIT_PAYLOAD_LEN = INIT_PAYLOAD_LEN + 2
#: A Noise message's fixed cost: the ephemeral key and the payload's tag.
NOISE_OVERHEAD = DHLEN + TAGLEN


@dataclass(frozen=True, kw_only=True, slots=True)
class InitPayload:
    timestamp: float  # seconds since the epoch
    token: bytes
    ciphers: tuple[Cipher, ...]  # the known ones the client offered, best first (may be empty)


def check_wall_clock(now: float) -> None:
    """Refuse a ``now`` that cannot be wall-clock time (a monotonic clock's reading, typically)."""
    if not now >= 1_000_000_000.0 or now >= 2.0**63 / 1000.0:
        raise SecurityError("the handshake needs wall-clock time: pass time.time(), not a monotonic clock")


def random_between(entropy: Entropy, low: int, high: int) -> int:
    """A random integer in ``[low, high]`` from ``entropy`` (the bias of 32 random bits modulo the few hundred
    values a size range here spans is below 2^-22)."""
    return low + int.from_bytes(entropy(4), "big") % (high - low + 1) if high > low else low


def keystream(key: bytes, nonce: bytes) -> CipherContext:
    """ChaCha20 under ``key`` from ``nonce`` (16 bytes: the block counter, then the nonce), for masking."""
    return _StreamCipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()


#: The random salt that starts every masked handshake message, stream or datagram.
SALT_LEN = 16
_ZERO_NONCE = bytes(16)


def salted_keystream(psk: bytes, person: bytes, salt: bytes | bytearray) -> CipherContext:
    """The keystream that masks one handshake message: ChaCha20 under ``BLAKE2s(key=psk, person=person,
    data=salt)``. ``person`` (8 bytes) names the mode and the direction, so no two share a key."""
    return keystream(hashlib.blake2s(salt, key=psk, person=person).digest(), _ZERO_NONCE)


def encode_init_payload(now: float, token: bytes, ciphers: tuple[Cipher, ...], padding: bytes = b"") -> bytes:
    """The first message's payload; ``padding`` is random bytes of a random length (the caller's entropy)."""
    check_wall_clock(now)
    if len(token) != TOKEN_LEN:
        raise SecurityError("the anti-replay token is 16 bytes")
    return _INIT.pack(int(now * 1000.0), token) + encode_offer(ciphers) + padding


def decode_init_payload(payload: bytes) -> InitPayload:
    if len(payload) < MIN_INIT_PAYLOAD_LEN:
        raise AuthenticationFailed("first handshake payload too short")
    millis, token = _INIT.unpack_from(payload)
    ciphers, _ = decode_offer(payload, INIT_PAYLOAD_LEN)
    return InitPayload(timestamp=millis / 1000.0, token=token, ciphers=ciphers)
