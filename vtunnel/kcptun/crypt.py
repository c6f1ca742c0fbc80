"""kcp-go's packet crypt: the nonce + CRC32 header and the block ciphers kcptun selects with ``--crypt``.

Every datagram kcptun sends, even with ``--crypt none``, starts with a 20-byte header:

    nonce (16 random bytes) | CRC32 (IEEE, little endian) of everything after it | payload

and the whole datagram, header included, then goes through the cipher. ``none`` leaves it as it is (the header
is still there: kcptun always installs a cipher, the "none" one merely copies). The receiver deciphers, skips
the nonce and drops the datagram unless the CRC matches; the CRC is all the integrity there is (no MAC, no
replay protection).

The block ciphers (aes, aes-128, aes-192, sm4 with 16-byte blocks; blowfish, cast5, 3des with 8-byte ones) run
in CFB mode (full-block feedback) over the whole datagram, with a fixed IV that kcp-go compiles in (its first 8
bytes for an 8-byte block). Because the random nonce is the first plaintext bytes, the first ciphertext block is
random and every later keystream block depends on it: the nonce does the work a per-datagram IV would.
``salsa20`` leaves the first 8 bytes (of the nonce) in clear and XORs the rest with Salsa20's keystream under
them as its nonce. ``xor`` XORs the datagram with a fixed 1500-byte table.

Keys: kcptun stretches the passphrase (``--key``) with PBKDF2-HMAC-SHA1, salt ``kcp-go``, 4096 iterations, to 32
bytes; aes, blowfish and salsa20 use all 32 bytes, aes-128, sm4 and cast5 the first 16, aes-192 and 3des the
first 24; xor stretches those 32 bytes again (PBKDF2-HMAC-SHA1, its own salt, 32 iterations) into its table.

Libraries: cryptography (OpenSSL) for the block ciphers, pycryptodome for Salsa20 (20 rounds, 8-byte nonce, as
golang.org/x/crypto/salsa20). kcptun's tea (kcp-go runs it with 16 rounds, not TEA's 64), xtea and twofish have
no well-kept Python implementation and are refused by name (:data:`UNSUPPORTED`).
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from Crypto.Cipher import Salsa20
from cryptography.hazmat.decrepit.ciphers import algorithms as decrepit
from cryptography.hazmat.primitives.ciphers import BlockCipherAlgorithm, Cipher, algorithms, modes

try:  # cryptography 47 moved CFB among the "decrepit" modes (and drops the old name in 49)
    from cryptography.hazmat.decrepit.ciphers import modes as _decrepit_modes

    _CFB: Callable[[bytes], modes.ModeWithInitializationVector] = _decrepit_modes.CFB
except ImportError:  # pragma: no cover - older cryptography
    _CFB = modes.CFB

from vtunnel.kcptun.errors import ConfigError, CryptError

__all__ = [
    "CIPHERS",
    "HEADER_SIZE",
    "NONCE_SIZE",
    "UNSUPPORTED",
    "BlockCrypt",
    "Entropy",
    "PacketCrypt",
    "check_cipher",
    "derive_key",
    "make_block_crypt",
]

Entropy = Callable[[int], bytes]

NONCE_SIZE: Final = 16
_CRC_SIZE: Final = 4
#: the bytes the crypt layer puts in front of each payload
HEADER_SIZE: Final = NONCE_SIZE + _CRC_SIZE
#: the longest datagram kcp-go handles; also the length of the xor table
MTU_LIMIT: Final = 1500

_KEY_SALT: Final = b"kcp-go"
_KEY_ITERATIONS: Final = 4096
_KEY_SIZE: Final = 32
_XOR_SALT: Final = b"sH3CIVoF#rWLtJo6"
_XOR_ITERATIONS: Final = 32
#: the IV kcp-go uses for every datagram (the nonce in the first block makes each datagram's stream unique)
_IV: Final = bytes((167, 115, 79, 156, 18, 172, 27, 1, 164, 21, 242, 193, 252, 120, 230, 107))
_CRC: Final = struct.Struct("<I")


def derive_key(passphrase: str | bytes) -> bytes:
    """kcptun's 32-byte key from ``--key`` (the passphrase's UTF-8 bytes, as Go sees a string)."""
    secret = passphrase.encode() if isinstance(passphrase, str) else passphrase
    return hashlib.pbkdf2_hmac("sha1", secret, _KEY_SALT, _KEY_ITERATIONS, _KEY_SIZE)


class BlockCrypt(Protocol):
    """A whole-datagram cipher: ``encrypt`` and ``decrypt`` keep the length."""

    name: str

    def encrypt(self, data: bytes) -> bytes: ...

    def decrypt(self, data: bytes) -> bytes: ...


class _NoneCrypt:
    name = "none"

    def encrypt(self, data: bytes) -> bytes:
        return data

    def decrypt(self, data: bytes) -> bytes:
        return data


class _CFBCrypt:
    """A block cipher in CFB mode under kcp-go's fixed IV (full-block feedback, the tail XORed with a part)."""

    __slots__ = ("_cipher", "name")

    def __init__(self, name: str, algorithm: BlockCipherAlgorithm) -> None:
        self.name = name
        self._cipher = Cipher(algorithm, _CFB(_IV[: algorithm.block_size // 8]))

    def encrypt(self, data: bytes) -> bytes:
        return self._cipher.encryptor().update(data)

    def decrypt(self, data: bytes) -> bytes:
        return self._cipher.decryptor().update(data)


class _XORCrypt:
    """XOR with a fixed table (as long as the longest datagram): obfuscation, not secrecy."""

    __slots__ = ("_table", "name")

    def __init__(self, key: bytes) -> None:
        self.name = "xor"
        self._table = int.from_bytes(
            hashlib.pbkdf2_hmac("sha1", key, _XOR_SALT, _XOR_ITERATIONS, MTU_LIMIT), "little"
        )

    def _apply(self, data: bytes) -> bytes:
        size = len(data)
        if size > MTU_LIMIT:  # kcp-go XORs only as far as its table reaches
            return self._apply(data[:MTU_LIMIT]) + data[MTU_LIMIT:]
        table = self._table & ((1 << (8 * size)) - 1)
        return (int.from_bytes(data, "little") ^ table).to_bytes(size, "little")

    def encrypt(self, data: bytes) -> bytes:
        return self._apply(data)

    def decrypt(self, data: bytes) -> bytes:
        return self._apply(data)


class _Salsa20Crypt:
    """kcp-go's salsa20: the first 8 bytes stay as they are and are the nonce of the rest's keystream."""

    __slots__ = ("_key", "name")

    def __init__(self, key: bytes) -> None:
        self.name = "salsa20"
        self._key = key

    def encrypt(self, data: bytes) -> bytes:
        if len(data) < 8:  # kcp-go leaves such a datagram alone (it never sends one: the header is 20 bytes)
            return data
        return data[:8] + Salsa20.new(key=self._key, nonce=data[:8]).encrypt(data[8:])

    def decrypt(self, data: bytes) -> bytes:
        return self.encrypt(data)


def _cfb(algorithm: Callable[[bytes], BlockCipherAlgorithm], size: int) -> Callable[[str, bytes], BlockCrypt]:
    """A CFB cipher keyed with the first ``size`` bytes of the derived key (kcptun's slices)."""
    return lambda name, key: _CFBCrypt(name, algorithm(key[:size]))


#: ``--crypt`` names this module implements, each with how it is built from the derived 32-byte key (the
#: slices kcptun's client and server take of it)
CIPHERS: Final[Mapping[str, Callable[[str, bytes], BlockCrypt]]] = {
    "aes": _cfb(algorithms.AES, 32),
    "aes-128": _cfb(algorithms.AES, 16),
    "aes-192": _cfb(algorithms.AES, 24),
    "sm4": _cfb(algorithms.SM4, 16),
    "blowfish": _cfb(decrepit.Blowfish, 32),
    "cast5": _cfb(decrepit.CAST5, 16),
    "3des": _cfb(decrepit.TripleDES, 24),
    "salsa20": lambda _name, key: _Salsa20Crypt(key),
    "xor": lambda _name, key: _XORCrypt(key),
    "none": lambda _name, _key: _NoneCrypt(),
}

#: kcptun's other ``--crypt`` names, with why they are not here
UNSUPPORTED: Final[Mapping[str, str]] = {
    "tea": "kcp-go's TEA runs 16 rounds, which no well-kept Python library offers",
    "xtea": "no well-kept Python library implements XTEA",
    "twofish": "no well-kept Python library implements Twofish",
}


def check_cipher(name: str) -> None:
    """:class:`ConfigError` naming ``name`` unless :data:`CIPHERS` has it. (kcptun itself takes a name it does not
    know for aes; here it is an error, so that a typo never silently picks another cipher than the peer's.)"""
    if name in CIPHERS:
        return
    why = UNSUPPORTED.get(name)
    reason = f"kcptun's crypt {name!r} is not supported: {why}" if why else f"crypt {name!r} is not supported"
    raise ConfigError(f"{reason} (supported: {', '.join(CIPHERS)})")


def make_block_crypt(name: str, passphrase: str | bytes) -> BlockCrypt:
    """The cipher kcptun's ``--crypt NAME --key PASSPHRASE`` selects; :class:`ConfigError` if not implemented."""
    check_cipher(name)
    return CIPHERS[name](name, derive_key(passphrase))


class PacketCrypt:
    """Seals payloads into kcp-go datagrams and opens them (the 20-byte header, then the cipher)."""

    __slots__ = ("_block", "_entropy")

    def __init__(self, block: BlockCrypt, *, entropy: Entropy = os.urandom) -> None:
        self._block = block
        self._entropy = entropy

    @property
    def name(self) -> str:
        return self._block.name

    def seal(self, payload: bytes) -> bytes:
        """A datagram carrying ``payload`` (a fresh nonce, its CRC32, then the cipher over all of it)."""
        header = self._entropy(NONCE_SIZE) + _CRC.pack(zlib.crc32(payload))
        return self._block.encrypt(header + payload)

    def open(self, datagram: bytes | memoryview) -> bytes:
        """The payload of ``datagram``; :class:`CryptError` when it is too short or its CRC32 does not match."""
        if len(datagram) < HEADER_SIZE:
            raise CryptError(f"datagram of {len(datagram)} bytes is shorter than the crypt header")
        plain = self._block.decrypt(bytes(datagram))
        payload = plain[HEADER_SIZE:]
        if _CRC.unpack_from(plain, NONCE_SIZE)[0] != zlib.crc32(payload):
            raise CryptError("CRC32 mismatch (wrong key or cipher, or a damaged datagram)")
        return payload
