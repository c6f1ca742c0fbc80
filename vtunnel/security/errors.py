"""Errors of the security layer. No third-party exception (cryptography's, hashlib's) escapes this package."""

from __future__ import annotations

__all__ = ["AuthenticationFailed", "HandshakeTimeout", "SecurityError"]


class SecurityError(Exception):
    """A security-layer failure: a bad key, a misuse of the API, a handshake that could not complete."""


class AuthenticationFailed(SecurityError):
    """The peer's bytes failed authentication (wrong key, tampering, replay, garbage, a stale timestamp).

    The caller must send nothing back to that peer. The message says why, for local logs only: it never
    contains key material or the peer's bytes.
    """


class HandshakeTimeout(SecurityError, TimeoutError):
    """No valid handshake reply arrived in time (a wrong key looks like this: the server stays silent)."""
