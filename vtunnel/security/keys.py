"""Pre-shared keys: generation and parsing (of a key, of a key file's text, of a file of named keys), and the key
set of a server's users.

A key is 32 random bytes, written as URL-safe base64 without padding (43 characters). Standard base64 (with
``+/`` and ``=`` padding) and 64 hex digits are accepted as well when reading one.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .errors import SecurityError

__all__ = [
    "DEFAULT_USER",
    "KEY_LEN",
    "MAX_USERS",
    "KeySet",
    "UserKey",
    "check_user_name",
    "decode_key",
    "decode_key_file",
    "decode_user_keys",
    "generate_key",
]

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


# --- the keys of a server's users -----------------------------------------------------------------------------

#: A user name: what logs and metrics show of whoever holds a key (a file name in a key directory).
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
#: The most keys one server holds: a stranger's first message is tried against each (docs/security.md).
MAX_USERS = 256
#: The user of a server's one key (``--psk-file``, ``VTUNNEL_PSK``).
DEFAULT_USER = "default"


def check_user_name(name: str, *, source: str = "a user name") -> str:
    """``name`` if it is a valid user name (1 to 64 of letters, digits, ``.``, ``_``, ``@``, ``-``, not starting
    with a punctuation mark); else :class:`SecurityError`."""
    if not isinstance(name, str) or _USER_NAME.fullmatch(name) is None:
        raise SecurityError(
            f"{source}: a user name is 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a letter or "
            f"digit, not {name!r}"
        )
    return name


@dataclass(frozen=True, slots=True)
class UserKey:
    """One user's key: what a server learns of a peer that authenticated (``user`` names it in logs and
    metrics; ``key`` is never shown)."""

    user: str
    key: bytes = field(repr=False)


class KeySet:
    """The keys a server accepts, each a user's (at most :data:`MAX_USERS`): no two users share a name or a key.

    Immutable; a server replaces its whole key set to add or revoke users. Iterating gives the entries in a fixed
    order (the order they were given in).
    """

    __slots__ = ("_by_user", "_entries")

    def __init__(self, entries: Iterable[UserKey]) -> None:
        found = tuple(entries)
        if not found:
            raise SecurityError("a key set holds at least one key")
        if len(found) > MAX_USERS:
            raise SecurityError(f"a server holds at most {MAX_USERS} keys, not {len(found)}")
        by_user: dict[str, UserKey] = {}
        seen: dict[bytes, str] = {}
        for entry in found:
            check_user_name(entry.user)
            if len(entry.key) != KEY_LEN:
                raise SecurityError(f"the key of user {entry.user!r} is not {KEY_LEN} bytes")
            if entry.user in by_user:
                raise SecurityError(f"user {entry.user!r} is named twice")
            other = seen.get(entry.key)
            if other is not None:
                raise SecurityError(
                    f"users {other!r} and {entry.user!r} have the same key: give each user its own"
                )
            by_user[entry.user] = entry
            seen[entry.key] = entry.user
        self._entries = found
        self._by_user = by_user

    @classmethod
    def single(cls, key: bytes, user: str = DEFAULT_USER) -> KeySet:
        """The key set of one key."""
        return cls([UserKey(user, bytes(key))])

    @classmethod
    def of(cls, keys: KeySet | bytes) -> KeySet:
        """``keys`` as a key set: a bare key is the key set of :data:`DEFAULT_USER` alone."""
        return keys if isinstance(keys, KeySet) else cls.single(keys)

    @property
    def users(self) -> tuple[str, ...]:
        return tuple(self._by_user)

    def __iter__(self) -> Iterator[UserKey]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry: object) -> bool:
        """Whether ``entry`` (a :class:`UserKey`) is in this set: its user, with that very key."""
        return isinstance(entry, UserKey) and self._by_user.get(entry.user) == entry

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeySet) and set(self._entries) == set(other._entries)

    def __hash__(self) -> int:
        return hash(frozenset(self._entries))

    def __repr__(self) -> str:  # names only: never key material
        return f"KeySet(users={list(self._by_user)!r})"


def decode_user_keys(text: str, *, source: str = "the user keys file") -> KeySet:
    """The key set written in ``text``: one ``NAME KEY`` per line (blank lines and ``#`` comments ignored).

    ``source`` names the file in errors, which give the line number and never repeat a key. Raises
    :class:`SecurityError`. Reading the file is the caller's: this layer does no I/O.
    """
    entries: list[UserKey] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise SecurityError(f"{source}, line {number}: expected NAME KEY")
        name, key = fields
        check_user_name(name, source=f"{source}, line {number}")
        try:
            entries.append(UserKey(name, decode_key(key)))
        except SecurityError as exc:
            raise SecurityError(f"{source}, line {number}: {exc}") from None
    if not entries:
        raise SecurityError(f"{source} holds no key")
    try:
        return KeySet(entries)
    except SecurityError as exc:
        raise SecurityError(f"{source}: {exc}") from None
