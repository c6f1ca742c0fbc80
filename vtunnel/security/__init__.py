"""vtunnel.security: the sans-IO security layer between the transports and the tunnel protocol.

- :mod:`.stream`: Noise NNpsk0 handshake + AEAD records for ordered byte streams (TCP, TLS).
- :mod:`.datagram`: the same handshake + individually sealed datagrams with an explicit counter (UDP).
- :mod:`.replay`: the handshake replay cache, the per-source handshake limiter, the datagram replay window.
- :mod:`.ciphers`: the transport ciphers (ChaCha20-Poly1305, AES-256-GCM) and how the handshake picks one.
- :mod:`.keys`: pre-shared key generation and parsing.

Nothing here does I/O or reads a clock; see ``docs/security.md`` for the wire formats.
"""

from .ciphers import CIPHER_CHOICES, Cipher, preference
from .datagram import (
    CID_LEN,
    DATAGRAM_OVERHEAD,
    DatagramClient,
    DatagramServer,
    DatagramSession,
    StatelessReset,
    peek_connection_id,
)
from .errors import AuthenticationFailed, HandshakeTimeout, SecurityError
from .keys import decode_key, decode_key_file, generate_key
from .records import SecureStreamClient, SecureStreamServer
from .replay import HandshakeLimiter, ReplayCache, ReplayWindow, ResetLimiter

__all__ = [
    "CID_LEN",
    "CIPHER_CHOICES",
    "DATAGRAM_OVERHEAD",
    "AuthenticationFailed",
    "Cipher",
    "DatagramClient",
    "DatagramServer",
    "DatagramSession",
    "HandshakeLimiter",
    "HandshakeTimeout",
    "ReplayCache",
    "ReplayWindow",
    "ResetLimiter",
    "SecureStreamClient",
    "SecureStreamServer",
    "SecurityError",
    "StatelessReset",
    "decode_key",
    "decode_key_file",
    "generate_key",
    "peek_connection_id",
    "preference",
]
