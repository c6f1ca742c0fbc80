"""Pre-shared keys: generation and parsing (of a key, and of a key file's text).

A key is 32 random bytes, written as URL-safe base64 without padding (43 characters). Standard base64 (with
``+/`` and ``=`` padding) and 64 hex digits are accepted as well when reading one.
"""

from __future__ import annotations

import base64
import binascii
import secrets

from .errors import SecurityError

__all__ = ["KEY_LEN", "decode_key", "decode_key_file", "generate_key"]

KEY_LEN = 32
_NOT_A_KEY = "not a vtunnel key: expected 32 bytes in base64 (as printed by `vtunnel keygen`)"


def generate_key() -> str:
    """A fresh random key, printable: URL-safe base64 of 32 random bytes, no padding."""
    return base64.urlsafe_b64encode(secrets.token_bytes(KEY_LEN)).rstrip(b"=").decode("ascii")


def decode_key(text: str) -> bytes:
    """The 32 key bytes written in ``text`` (base64, URL-safe base64 or hex; surrounding whitespace ignored).

    Raises :class:`SecurityError` if ``text`` is not such a key. The message never repeats the text.
    """
    if not isinstance(text, str):
        raise SecurityError("a key must be given as text")
    s = text.strip()
    if len(s) == 2 * KEY_LEN and all(c in "0123456789abcdefABCDEF" for c in s):
        return bytes.fromhex(s)
    if not s or any(c.isspace() for c in s):
        raise SecurityError(_NOT_A_KEY)
    std = s.replace("-", "+").replace("_", "/").rstrip("=")
    try:
        raw = base64.b64decode(std + "=" * (-len(std) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SecurityError(_NOT_A_KEY) from None
    if len(raw) != KEY_LEN:
        raise SecurityError(f"a vtunnel key is {KEY_LEN} bytes; this one decodes to {len(raw)}")
    return raw


def decode_key_file(text: str, *, source: str = "the key file") -> bytes:
    """The key in a key file's ``text``: its first line that is neither empty nor a ``#`` comment.

    ``source`` names the file in errors. Raises :class:`SecurityError`; the message never repeats the text.
    Reading the file is the caller's (:func:`vtunnel.config.load_psk_file`): this layer does no I/O.
    """
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            try:
                return decode_key(line)
            except SecurityError as exc:
                raise SecurityError(f"{source} holds no valid key: {exc}") from None
    raise SecurityError(f"{source} is empty")
