"""The transport ciphers a handshake can agree on, and how the two ends agree.

The handshake itself is always Noise's ChaChaPoly (the server must read the first message before anything is
known). What follows it, stream records and sealed datagrams, uses the cipher the server chose from the client's
offer: ChaCha20-Poly1305, or AES-256-GCM, which costs less than half as much per datagram on a CPU with AES
instructions and much more on one without. So each end ranks AES-256-GCM first only when its own CPU has them
(the caller decides; nothing here reads the machine), and the server's choice honours the client's ranking of
ChaCha20-Poly1305 first (see :func:`choose`).

Wire codes (one byte each)::

    offer   (first message, after the token)   count u8 (1..8) | count cipher codes
    choice  (reply, first byte of its payload)  one cipher code

Unknown codes in an offer are skipped, so a later version can offer more; a duplicated code or a count out of
range is malformed. A choice the client did not offer fails the handshake.

Keys are Noise's ``Split()`` outputs either way; the nonce of counter ``n`` is Noise's for the cipher: 32 zero
bits then ``n`` as 64 bits, little endian for ChaChaPoly and big endian for AESGCM.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from enum import IntEnum
from functools import lru_cache

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .errors import AuthenticationFailed, SecurityError

__all__ = [
    "AEAD",
    "ALL_CIPHERS",
    "CIPHER_CHOICES",
    "DEFAULT_CIPHERS",
    "MAX_OFFER",
    "Cipher",
    "check_ciphers",
    "choose",
    "cipher_name",
    "decode_choice",
    "decode_offer",
    "encode_offer",
    "make_aead",
    "nonce_function",
    "nonce_run",
    "preference",
]


class Cipher(IntEnum):
    """Transport cipher codes on the wire (0 is never used)."""

    CHACHA20_POLY1305 = 0x01
    AES_256_GCM = 0x02


AEAD = ChaCha20Poly1305 | AESGCM

_NAMES = {Cipher.CHACHA20_POLY1305: "chacha20-poly1305", Cipher.AES_256_GCM: "aes-256-gcm"}
ALL_CIPHERS = (Cipher.AES_256_GCM, Cipher.CHACHA20_POLY1305)
#: What a user may write to pin the cipher; ``auto`` ranks by the CPU's AES instructions.
CIPHER_CHOICES = ("auto", *(_NAMES[c] for c in ALL_CIPHERS))
#: The sans-IO default when the caller says nothing: the portable ranking (no AES instructions assumed).
DEFAULT_CIPHERS = (Cipher.CHACHA20_POLY1305, Cipher.AES_256_GCM)
#: The most cipher codes an offer may hold.
MAX_OFFER = 8

_KNOWN = frozenset(int(c) for c in Cipher)
_LITTLE = struct.Struct("<4xQ")  # Noise's ChaChaPoly nonce
_BIG = struct.Struct(">4xQ")  # Noise's AESGCM nonce


def cipher_name(cipher: Cipher) -> str:
    return _NAMES[cipher]


def preference(choice: str, *, aes_instructions: bool) -> tuple[Cipher, ...]:
    """The ciphers one end offers (client) or accepts (server), best first.

    ``choice`` is ``auto`` (both, AES-256-GCM first only with ``aes_instructions``) or one cipher's name, which
    pins it: only that one is offered or accepted. Raises :class:`SecurityError` for any other name.
    """
    if choice == "auto":
        return ALL_CIPHERS if aes_instructions else DEFAULT_CIPHERS
    for cipher, name in _NAMES.items():
        if name == choice:
            return (cipher,)
    raise SecurityError(f"unknown cipher {choice!r} (expected one of: {', '.join(CIPHER_CHOICES)})")


def check_ciphers(ciphers: Sequence[Cipher]) -> tuple[Cipher, ...]:
    """``ciphers`` as a tuple, refusing an empty, duplicated or non-:class:`Cipher` list (our own misuse)."""
    out = tuple(ciphers)
    if (
        not out
        or len(out) > MAX_OFFER
        or len(set(out)) != len(out)
        or not all(isinstance(c, Cipher) for c in out)
    ):
        raise SecurityError("a cipher preference is 1 to 8 distinct Cipher values")
    return out


def encode_offer(ciphers: Sequence[Cipher]) -> bytes:
    out = check_ciphers(ciphers)
    return bytes((len(out), *out))


def decode_offer(data: bytes | memoryview, offset: int) -> tuple[tuple[Cipher, ...], int]:
    """The known ciphers of the offer at ``offset``, in the client's order, and the offset after it.

    Raises :class:`AuthenticationFailed` for a malformed offer (it came inside an authenticated message, so only
    a peer holding the key can send one: a broken or hostile client, refused like any other failure).
    """
    if offset >= len(data):
        raise AuthenticationFailed("first handshake payload has no cipher offer")
    count = data[offset]
    end = offset + 1 + count
    if not 1 <= count <= MAX_OFFER or end > len(data):
        raise AuthenticationFailed("malformed cipher offer")
    codes = bytes(data[offset + 1 : end])
    if len(set(codes)) != count:
        raise AuthenticationFailed("malformed cipher offer")
    known = tuple(Cipher(code) for code in codes if code in _KNOWN)
    return known, end


def choose(offered: Sequence[Cipher], accepted: Sequence[Cipher]) -> Cipher | None:
    """The server's choice: its own ranking among what the client offered, except that a client ranking
    ChaCha20-Poly1305 first (it lacks AES instructions, or pinned it) gets ChaCha20-Poly1305 when the server
    accepts it. So AES-256-GCM is chosen by default only when both ends rank it first. None: nothing in common.
    """
    common = [c for c in accepted if c in offered]
    if not common:
        return None
    if offered[0] == Cipher.CHACHA20_POLY1305 and Cipher.CHACHA20_POLY1305 in common:
        return Cipher.CHACHA20_POLY1305
    return common[0]


def decode_choice(code: int, offered: Sequence[Cipher]) -> Cipher:
    """The server's choice, which must be one the client offered; else :class:`AuthenticationFailed`."""
    for cipher in offered:
        if cipher == code:
            return cipher
    raise AuthenticationFailed("the server chose a cipher this client did not offer")


def make_aead(cipher: Cipher, key: bytes) -> AEAD:
    """The AEAD object of ``cipher`` under a 32-byte transport key."""
    if cipher == Cipher.AES_256_GCM:
        return AESGCM(key)
    return ChaCha20Poly1305(key)


def nonce_function(cipher: Cipher) -> Callable[[int], bytes]:
    """The nonce of counter ``n`` as Noise builds it for ``cipher`` (a bound ``struct.pack``: it runs per record)."""
    return _BIG.pack if cipher == Cipher.AES_256_GCM else _LITTLE.pack


#: bytes of a nonce (both ciphers)
_NONCE_LEN = 12


@lru_cache(maxsize=128)
def _nonce_blocks(count: int, big: bool) -> tuple[int, int, Callable[[bytes], tuple[bytes, ...]]]:
    """For ``count`` nonces read as one integer of 12-byte blocks (big endian: the first block at the high end;
    little endian: at the low end): ``step`` and ``ramp`` such that ``first * step + ramp`` holds the counters
    from ``first`` (each one more than the one before) where the blocks' counters go, and the reader that cuts the
    integer's bytes into the nonces."""
    base = 1 << (8 * _NONCE_LEN)
    step = (base**count - 1) // (base - 1)  # one in every block
    # block i holds i: counted from the high end (big endian) or from the low end (little endian)
    ramp = (step - count) // (base - 1) if big else sum(i * base**i for i in range(count))
    return step, ramp, struct.Struct(f"{_NONCE_LEN}s" * count).unpack


def nonce_run(cipher: Cipher) -> Callable[[int, int], Sequence[bytes]]:
    """``run(first, count)``: the nonces of counters ``first`` .. ``first + count - 1``, each what
    :func:`nonce_function` gives, built together in a few calls (a batch's nonces: every counter is below
    2**64)."""
    if cipher == Cipher.AES_256_GCM:

        def big(first: int, count: int) -> Sequence[bytes]:
            step, ramp, cut = _nonce_blocks(count, True)
            return cut((first * step + ramp).to_bytes(_NONCE_LEN * count, "big"))

        return big

    def little(first: int, count: int) -> Sequence[bytes]:
        step, ramp, cut = _nonce_blocks(count, False)
        # the counter in the high 8 bytes of each block: 4 zero bytes first on the wire, as Noise's ChaChaPoly
        return cut(((first * step + ramp) << 32).to_bytes(_NONCE_LEN * count, "little"))

    return little
