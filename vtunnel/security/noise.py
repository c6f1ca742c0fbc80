"""The Noise ``NNpsk0_25519_ChaChaPoly_BLAKE2s`` handshake, written from the Noise specification (revision 34).

Built only on standard primitives: X25519 and ChaCha20-Poly1305 from ``cryptography``, BLAKE2s and HMAC from
the standard library. The pattern::

    NNpsk0:
      -> psk, e
      <- e, ee

Each handshake object is single-use. Reading a message never changes the object unless the message
authenticates, so a forged or garbled message can simply be dropped and the handshake continues with the next
one.

After the two messages, :meth:`split` gives the two transport keys (initiator-to-responder,
responder-to-initiator) and the handshake hash; :meth:`TransportKeys.derive` gives more key pairs bound to the
same handshake (the byte-stream records' length masks). :class:`CipherState` is the Noise transport cipher (implicit
64-bit counter nonce); the datagram layer uses the keys with an explicit counter instead.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import AuthenticationFailed, SecurityError

__all__ = [
    "DHLEN",
    "PROTOCOL_NAME",
    "TAGLEN",
    "CipherState",
    "Initiator",
    "Responder",
    "TransportKeys",
    "chacha_nonce",
    "check_psk",
]

PROTOCOL_NAME = b"Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s"
DHLEN = 32
TAGLEN = 16
HASHLEN = 32
MAX_NONCE = 2**64 - 1  # reserved by the spec

_NONCE = struct.Struct("<4xQ")


def chacha_nonce(n: int) -> bytes:
    """The 96-bit ChaCha20-Poly1305 nonce for counter ``n``: 32 zero bits, then ``n`` little endian."""
    return _NONCE.pack(n)


def _hash(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, hashlib.blake2s)


def _hkdf(ck: bytes, ikm: bytes, n: int) -> tuple[bytes, ...]:
    temp = _hmac(ck, ikm)
    out1 = _hmac(temp, b"\x01")
    out2 = _hmac(temp, out1 + b"\x02")
    if n == 2:
        return out1, out2
    return out1, out2, _hmac(temp, out2 + b"\x03")


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # a low-order point gives an all-zero secret: refused
        raise AuthenticationFailed("invalid ephemeral public key") from None


def _private_key(ephemeral: bytes | None) -> X25519PrivateKey:
    if ephemeral is None:
        return X25519PrivateKey.generate()
    if len(ephemeral) != DHLEN:
        raise SecurityError("an X25519 private key is 32 bytes")
    return X25519PrivateKey.from_private_bytes(ephemeral)


class _Symmetric:
    """Noise's SymmetricState with its CipherState inlined (``k``, ``n``)."""

    __slots__ = ("ck", "h", "k", "n")

    def __init__(self, prologue: bytes) -> None:
        h = _hash(PROTOCOL_NAME) if len(PROTOCOL_NAME) > HASHLEN else PROTOCOL_NAME.ljust(HASHLEN, b"\0")
        self.ck = h
        self.h = h
        self.k: bytes | None = None
        self.n = 0
        self.mix_hash(prologue)

    def copy(self) -> _Symmetric:
        other = _Symmetric.__new__(_Symmetric)
        other.ck, other.h, other.k, other.n = self.ck, self.h, self.k, self.n
        return other

    def mix_hash(self, data: bytes) -> None:
        self.h = _hash(self.h + data)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, self.k = _hkdf(self.ck, ikm, 2)
        self.n = 0

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, self.k = _hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.n = 0

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        assert self.k is not None  # every NNpsk0 payload is sent after a key exists
        ct = ChaCha20Poly1305(self.k).encrypt(chacha_nonce(self.n), plaintext, self.h)
        self.n += 1
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        assert self.k is not None
        try:
            pt = ChaCha20Poly1305(self.k).decrypt(chacha_nonce(self.n), ciphertext, self.h)
        except InvalidTag:
            raise AuthenticationFailed("handshake message failed authentication") from None
        self.n += 1
        self.mix_hash(ciphertext)
        return pt

    def split(self) -> tuple[bytes, bytes]:
        k1, k2 = _hkdf(self.ck, b"", 2)
        return k1, k2


@dataclass(frozen=True, kw_only=True, slots=True)
class TransportKeys:
    """The result of a completed handshake. ``send``/``receive`` are from this side's point of view."""

    send: bytes
    receive: bytes
    handshake_hash: bytes
    chaining_key: bytes  # the final ck, secret: what :meth:`derive` starts from
    initiator: bool

    def __repr__(self) -> str:  # never print key material
        return "TransportKeys(<secret>)"

    def derive(self, label: bytes) -> tuple[bytes, bytes]:
        """Two more 32-byte keys bound to this handshake: ``(sending, receiving)`` from this side's view.

        They are Noise's ``HKDF(ck, label)`` outputs, as ``Split()`` computes the transport keys with an empty
        input: a non-empty ``label`` gives keys independent of the transport keys and of any other label's.
        """
        if not label:
            raise SecurityError("a derived key needs a non-empty label")
        k1, k2 = _hkdf(self.chaining_key, label, 2)
        return (k1, k2) if self.initiator else (k2, k1)


def check_psk(psk: bytes) -> None:
    if not isinstance(psk, bytes | bytearray) or len(psk) != 32:
        raise SecurityError("the pre-shared key must be 32 bytes")


class Initiator:
    """The client side: ``write_message1(payload)``, then ``read_message2(msg)``, then ``keys``."""

    __slots__ = ("_e", "_psk", "_s", "ephemeral_public", "keys")

    def __init__(self, psk: bytes, *, prologue: bytes = b"", ephemeral: bytes | None = None) -> None:
        check_psk(psk)
        self._psk = bytes(psk)
        self._s = _Symmetric(prologue)
        self._e = _private_key(ephemeral)
        self.ephemeral_public = _public_bytes(self._e)
        self.keys: TransportKeys | None = None

    def write_message1(self, payload: bytes) -> bytes:
        """``psk, e`` and the encrypted payload. May be called once."""
        s = self._s
        if s.k is not None:
            raise SecurityError("message 1 was already written")
        s.mix_key_and_hash(self._psk)
        s.mix_hash(self.ephemeral_public)
        s.mix_key(self.ephemeral_public)
        return self.ephemeral_public + s.encrypt_and_hash(payload)

    def read_message2(self, message: bytes) -> bytes:
        """Process ``e, ee`` and return the payload; raises :class:`AuthenticationFailed` and changes nothing."""
        if self._s.k is None or self.keys is not None:
            raise SecurityError("message 2 is read once, after message 1 was written")
        if len(message) < DHLEN + TAGLEN:
            raise AuthenticationFailed("handshake reply too short")
        s = self._s.copy()
        re = bytes(message[:DHLEN])
        s.mix_hash(re)
        s.mix_key(re)
        s.mix_key(_dh(self._e, re))
        payload = s.decrypt_and_hash(bytes(message[DHLEN:]))
        k1, k2 = s.split()
        self._s = s
        self.keys = TransportKeys(send=k1, receive=k2, handshake_hash=s.h, chaining_key=s.ck, initiator=True)
        return payload


class Responder:
    """The server side: ``read_message1(msg)``, then ``write_message2(payload)``, then ``keys``."""

    __slots__ = ("_e", "_ephemeral", "_psk", "_s", "keys", "remote_ephemeral")

    def __init__(self, psk: bytes, *, prologue: bytes = b"", ephemeral: bytes | None = None) -> None:
        check_psk(psk)
        self._psk = bytes(psk)
        self._s = _Symmetric(prologue)
        self._ephemeral = ephemeral
        self._e: X25519PrivateKey | None = None
        self.remote_ephemeral: bytes | None = None
        self.keys: TransportKeys | None = None

    def read_message1(self, message: bytes) -> bytes:
        """Process ``psk, e`` and return the payload; raises :class:`AuthenticationFailed` and changes nothing."""
        if self.remote_ephemeral is not None:
            raise SecurityError("message 1 was already read")
        if len(message) < DHLEN + TAGLEN:
            raise AuthenticationFailed("handshake message too short")
        s = self._s.copy()
        re = bytes(message[:DHLEN])
        s.mix_key_and_hash(self._psk)
        s.mix_hash(re)
        s.mix_key(re)
        payload = s.decrypt_and_hash(bytes(message[DHLEN:]))
        self._s = s
        self.remote_ephemeral = re
        return payload

    def write_message2(self, payload: bytes) -> bytes:
        """``e, ee`` and the encrypted payload; afterwards :attr:`keys` is set."""
        if self.remote_ephemeral is None or self.keys is not None:
            raise SecurityError("message 2 is written once, after message 1 was read")
        s = self._s
        self._e = _private_key(self._ephemeral)
        e_pub = _public_bytes(self._e)
        s.mix_hash(e_pub)
        s.mix_key(e_pub)
        s.mix_key(_dh(self._e, self.remote_ephemeral))
        message = e_pub + s.encrypt_and_hash(payload)
        k1, k2 = s.split()
        self.keys = TransportKeys(send=k2, receive=k1, handshake_hash=s.h, chaining_key=s.ck, initiator=False)
        return message


class CipherState:
    """A Noise transport cipher: ChaCha20-Poly1305 with an implicit counter nonce, for in-order byte streams."""

    __slots__ = ("_aead", "n")

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self.n = 0

    def __repr__(self) -> str:
        return f"CipherState(n={self.n})"

    def _next_nonce(self) -> bytes:
        if self.n >= MAX_NONCE:
            raise SecurityError("the cipher's nonce space is exhausted; start a new connection")
        nonce = chacha_nonce(self.n)
        self.n += 1
        return nonce

    def encrypt(self, plaintext: bytes | memoryview, ad: bytes | memoryview = b"") -> bytes:
        return self._aead.encrypt(self._next_nonce(), plaintext, ad)

    def decrypt(self, ciphertext: bytes | memoryview, ad: bytes | memoryview = b"") -> bytes:
        """Decrypt the next message; raises :class:`AuthenticationFailed` (the counter does not advance)."""
        if self.n >= MAX_NONCE:
            raise SecurityError("the cipher's nonce space is exhausted; start a new connection")
        try:
            pt = self._aead.decrypt(chacha_nonce(self.n), ciphertext, ad)
        except InvalidTag:
            raise AuthenticationFailed("record failed authentication") from None
        self.n += 1
        return pt
