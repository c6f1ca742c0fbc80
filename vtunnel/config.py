"""The one configuration model: a TOML file with the same settings as the command line.

```toml
[server]
listen = ["kcp://0.0.0.0:4000", "tcp://0.0.0.0:4000", "websocks://0.0.0.0:8443"]  # websocks: no tunnel
target = "127.0.0.1:8388"          # optional: every stream without a destination goes here
psk_file = "/etc/vtunnel/key"      # mode 0600 (`vtunnel keygen -o FILE`); or `insecure = true` for plaintext
# user_keys = "/etc/vtunnel/users" # instead of psk_file: one key per user, a directory of key files (file name =
                                   # user) or a file of NAME KEY lines; SIGHUP reloads it (docs/security.md)
cipher = "auto"                    # or "aes-256-gcm" / "chacha20-poly1305" to pin the transport cipher
allow_private = false
allow = ["10.1.2.0/24"]            # exit policy exceptions
deny = ["*.internal"]
websocks_user_file = "/etc/vtunnel/websocks-users"   # USER:PASS lines, mode 0600
handshake_timeout = 30.0           # seconds a WebSocks client has for its upgrade and SOCKS5 request
metrics = "127.0.0.1:9090"         # Prometheus metrics at http://127.0.0.1:9090/metrics (docs/operating.md)
tun = ["10.77.0.0/24", "fd77::/64"]  # IP mode (docs/tun.md); also tun_dev, tun_mtu, tun_nat, tun_isolate
[server.websocks_users]              # or inline: then this file must be mode 0600 too
alice = "secret"

[agent]
server = "kcp://203.0.113.7:4000"  # or several: ["kcp://203.0.113.7:4000", "tls://203.0.113.7:443", ...]
socks = "127.0.0.1:1080"
http = "127.0.0.1:8118"
forward = ["127.0.0.1:9000", "127.0.0.1:2222=10.0.0.5:22"]
connections = 1
psk_file = "~/.config/vtunnel/key"
tun = true                         # IP mode (docs/tun.md); also tun_route = ["CIDR", ...], tun_dev, tun_mtu
# or, no tunnel: server = "websockss://203.0.113.7:8443?ca=/etc/vtunnel/ca.pem" and
# websocks_user_file = "~/.config/vtunnel/websocks-login" (one USER:PASS line, mode 0600)
[agent.socks_users]
bob = "pw"

[tunnel]                             # both sides; defaults are vproxy-compatible timings
keepalive_interval = 5.0
keepalive_timeout = 5.0
keepalive_max_missed = 2
extensions = true
gzip = false
```

Command-line options override the file. Unknown keys are errors, so a typo never silently does nothing.

Files that hold secrets (key files, the WebSocks users file, and a config file holding `psk`, `websocks_users` or
`socks_users`) are opened once and their mode is checked on the open descriptor: one that group or others may read
or write is refused with the `chmod` that fixes it, unless insecure key permissions are allowed
(`--insecure-key-permissions`, `VTUNNEL_INSECURE_KEY_PERMISSIONS=1` or `insecure_key_permissions = true`), which
lets it through with a warning. :func:`write_key_file` writes such files 0600 from the start.
"""

from __future__ import annotations

import os
import shlex
import stat
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from vtunnel.protocol import TunnelConfig

if TYPE_CHECKING:
    from vtunnel.security.keys import KeySet

__all__ = [
    "INSECURE_KEY_PERMISSIONS_ENV",
    "WEBSOCKS_USER_ENV",
    "ConfigError",
    "check_private_file",
    "insecure_key_permissions",
    "load_config",
    "load_psk_file",
    "load_user_keys",
    "resolve_cipher",
    "resolve_psk",
    "resolve_websocks_users",
    "tunnel_config",
    "write_key_file",
]

log = structlog.get_logger("vtunnel.config")

#: set to 1 to use secret files that group or others may read or write (with a warning)
INSECURE_KEY_PERMISSIONS_ENV = "VTUNNEL_INSECURE_KEY_PERMISSIONS"
#: WebSocks users as USER:PASS, one per line
WEBSOCKS_USER_ENV = "VTUNNEL_WEBSOCKS_USER"
#: the mode bits a secret file must not have: read or write for group or others
_LOOSE_BITS = 0o066
#: the settings that make a config file a secret file
_SECRET_SETTINGS = ("psk", "websocks_users", "socks_users")

SECTIONS = {
    "server": {
        "listen",
        "target",
        "psk_file",
        "psk",
        "user_keys",
        "insecure",
        "insecure_key_permissions",
        "cipher",
        "allow_private",
        "allow",
        "deny",
        "websocks_users",
        "websocks_user_file",
        "peer",
        "connect_timeout",
        "drain_timeout",
        "idle_timeout",
        "handshake_timeout",
        "metrics",
        "workers",
        "server_id",
        "tun",
        "tun_dev",
        "tun_mtu",
        "tun_nat",
        "tun_isolate",
    },
    "agent": {
        "server",
        "socks",
        "http",
        "forward",
        "connections",
        "psk_file",
        "psk",
        "insecure",
        "insecure_key_permissions",
        "cipher",
        "socks_users",
        "drain_timeout",
        "open_timeout",
        "peer",
        "websocks_users",
        "websocks_user_file",
        "metrics",
        "tun",
        "tun_route",
        "tun_dev",
        "tun_mtu",
    },
    # tun is IP mode's, turned on by --tun ([server] / [agent] tun), never on its own
    "tunnel": {f.name for f in fields(TunnelConfig)} - {"tun"},
    "log": {"level", "format"},
}


class ConfigError(Exception):
    """The configuration is unusable; the message says which setting and why."""


def load_config(
    path: str | os.PathLike[str] | None,
    *,
    section: str | None = None,
    allow_insecure_permissions: bool = False,
    env: Mapping[str, str] = os.environ,
) -> dict[str, dict[str, Any]]:
    """Read and check a TOML config file; ``None`` gives an empty config.

    A file holding secrets (``psk``, ``websocks_users``, ``socks_users``) must be private like a key file, unless
    :func:`insecure_key_permissions` allows it (from ``allow_insecure_permissions``, ``env`` or the file's
    ``section``).
    """
    if path is None:
        return {}
    p = Path(path).expanduser()
    try:
        text, mode = _read_file(p)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    for name, value in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"{p}: unknown section [{name}] (known: {', '.join(sorted(SECTIONS))})")
        if not isinstance(value, dict):
            raise ConfigError(f"{p}: [{name}] must be a table")
        unknown = set(value) - SECTIONS[name]
        if unknown:
            raise ConfigError(f"{p}: unknown setting(s) in [{name}]: {', '.join(sorted(unknown))}")
    secrets = [
        f"[{name}] {key}"
        for name, value in data.items()
        for key in _SECRET_SETTINGS
        if isinstance(value, dict) and value.get(key)
    ]
    if secrets and mode & _LOOSE_BITS:
        allowed = insecure_key_permissions(
            flag=allow_insecure_permissions, section=data.get(section or "", {}), env=env
        )
        _check_mode(p, mode, "config file", allowed, ConfigError, why=f" (it holds {', '.join(secrets)})")
    return data


def tunnel_config(section: Mapping[str, Any]) -> TunnelConfig:
    try:
        return TunnelConfig(**dict(section))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[tunnel]: {exc}") from None


def insecure_key_permissions(
    *, flag: bool, section: Mapping[str, Any], env: Mapping[str, str] = os.environ
) -> bool:
    """Whether secret files that group or others may read or write are let through (with a warning).

    True when ``flag`` (``--insecure-key-permissions``) is set, ``VTUNNEL_INSECURE_KEY_PERMISSIONS`` is 1 (true,
    yes, on) or the section says ``insecure_key_permissions = true``. Raises :class:`ConfigError` for a value of
    the variable that is neither yes nor no.
    """
    if flag:
        return True
    raw = env.get(INSECURE_KEY_PERMISSIONS_ENV, "").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw not in ("", "0", "false", "no", "off"):
        raise ConfigError(f"{INSECURE_KEY_PERMISSIONS_ENV} must be 1 or 0, not {raw!r}")
    value = section.get("insecure_key_permissions", False)
    if not isinstance(value, bool):
        raise ConfigError("insecure_key_permissions must be true or false")
    return value


def _read_file(path: Path) -> tuple[str, int]:
    """The UTF-8 text of ``path`` and its permission bits, both from one open descriptor (no race between them)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        return f.read().decode("utf-8"), mode


def _check_mode(
    path: Path, mode: int, what: str, allowed: bool, error: type[Exception], *, why: str = ""
) -> None:
    """Refuse (``error``) a secret file that group or others may read or write, or warn when that is allowed."""
    if not mode & _LOOSE_BITS:
        return
    if allowed:
        log.warning(
            f"using a {what} that others may read or write (insecure key permissions allowed)",
            path=str(path),
            mode=f"{mode:04o}",
        )
        return
    who = {0o040: "group", 0o004: "others"}
    readers = [name for bit, name in who.items() if mode & bit]
    writers = [name for bit, name in who.items() if mode & (bit >> 1)]
    access = " and ".join(
        f"{verb} by {' and '.join(names)}"
        for verb, names in (("readable", readers), ("writable", writers))
        if names
    )
    raise error(
        f"{what} {str(path)!r}{why} is {access} (mode {mode:04o}); run: chmod 600 {shlex.quote(str(path))} "
        f"(to allow it anyway, as in a container: --insecure-key-permissions or {INSECURE_KEY_PERMISSIONS_ENV}=1)"
    )


def check_private_file(
    path: str | os.PathLike[str], what: str, *, allow_insecure_permissions: bool = False
) -> None:
    """Refuse (``ConfigError``) a secret file another library will read (a TLS private key) when group or others
    may read or write it, as :func:`load_psk_file` does for key files; a missing file is left to that library."""
    p = Path(path)
    try:
        mode = stat.S_IMODE(os.stat(p).st_mode)
    except OSError:
        return
    _check_mode(p, mode, what, allow_insecure_permissions, ConfigError)


def load_passphrase_file(
    path: str | os.PathLike[str], what: str, *, allow_insecure_permissions: bool = False
) -> str:
    """The first line of ``path``, verbatim but for its line ending: a passphrase another program takes as given
    (kcptun's ``--key``). The file must be private, as a key file. Raises :class:`ConfigError`."""
    p = Path(path)
    try:
        text, mode = _read_file(p)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the {what} {str(p)!r}: {exc.__class__.__name__}") from None
    _check_mode(p, mode, what, allow_insecure_permissions, ConfigError)
    line = text.splitlines()[0] if text else ""
    if not line:
        raise ConfigError(f"the {what} {str(p)!r} has an empty first line")
    return line


def load_psk_file(path: str | os.PathLike[str], *, allow_insecure_permissions: bool = False) -> bytes:
    """Read a key file (see :func:`vtunnel.security.keys.decode_key_file`). Raises ``SecurityError``.

    The file must be private: one that group or others may read or write is refused, with the ``chmod`` that
    fixes it, unless ``allow_insecure_permissions`` (then a warning is logged). The mode is checked on the
    descriptor the key is read from.
    """
    from vtunnel.security.errors import SecurityError
    from vtunnel.security.keys import decode_key_file

    p = Path(path)
    try:
        text, mode = _read_file(p)
    except (OSError, UnicodeDecodeError) as exc:
        raise SecurityError(f"cannot read the key file {str(p)!r}: {exc.__class__.__name__}") from None
    _check_mode(p, mode, "key file", allow_insecure_permissions, SecurityError)
    return decode_key_file(text, source=f"the key file {str(p)!r}")


def load_user_keys(path: str | os.PathLike[str], *, allow_insecure_permissions: bool = False) -> KeySet:
    """A server's users and their keys (``--user-keys``, ``user_keys``): ``path`` is a directory of key files,
    each file's name the user's (files whose names start with ``.`` are skipped: editors' and ``keygen
    --force``'s temporary files), or one file of ``NAME KEY`` lines (:func:`~vtunnel.security.keys.decode_user_keys`).

    Every file read must be private like a key file (unless ``allow_insecure_permissions``); a directory that
    group or others may write is refused (they could add a key). Raises :class:`ConfigError` naming the file,
    never a key.
    """
    from vtunnel.security.errors import SecurityError
    from vtunnel.security.keys import KeySet, UserKey, check_user_name, decode_key_file, decode_user_keys

    p = Path(path).expanduser()
    try:
        if not p.is_dir():
            text, mode = _read_file(p)
            _check_mode(p, mode, "user keys file", allow_insecure_permissions, ConfigError)
            return decode_user_keys(text, source=f"the user keys file {str(p)!r}")
        dir_mode = stat.S_IMODE(p.stat().st_mode)
        if dir_mode & 0o022 and not allow_insecure_permissions:
            raise ConfigError(
                f"user keys directory {str(p)!r} is writable by group or others (mode {dir_mode:04o}): anyone who "
                f"can add a file there adds a user; run: chmod go-w {shlex.quote(str(p))}"
            )
        entries = []
        for child in sorted(p.iterdir()):
            if child.name.startswith("."):
                continue
            name = check_user_name(child.name, source=f"user keys directory {str(p)!r}")
            if not child.is_file():
                raise ConfigError(f"user keys directory {str(p)!r}: {child.name!r} is not a file")
            text, mode = _read_file(child)
            _check_mode(child, mode, "key file", allow_insecure_permissions, ConfigError)
            entries.append(UserKey(name, decode_key_file(text, source=f"the key file {str(child)!r}")))
        if not entries:
            raise ConfigError(f"user keys directory {str(p)!r} holds no key file")
        return KeySet(entries)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the user keys {str(p)!r}: {exc.__class__.__name__}") from None
    except SecurityError as exc:
        raise ConfigError(str(exc) if str(p) in str(exc) else f"{str(p)!r}: {exc}") from None


def write_key_file(path: str | os.PathLike[str], text: str, *, replace: bool = False) -> None:
    """Write a secret file readable and writable by its owner only (0600) from the moment it exists.

    Without ``replace`` an existing file is an error (``FileExistsError``); with it the new file is written
    beside it and renamed over it, so the old one stays whole until the new one is complete.
    """
    p = Path(path)
    data = text.encode("utf-8")
    if not replace:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except BaseException:
            p.unlink(missing_ok=True)
            raise
        return
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")  # created 0600, O_EXCL
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_psk(
    *,
    psk_file: str | None,
    insecure: bool,
    section: Mapping[str, Any],
    env: Mapping[str, str] = os.environ,
    allow_insecure_permissions: bool = False,
) -> bytes | None:
    """The pre-shared key from ``--psk-file``, ``VTUNNEL_PSK``, or the config; ``None`` only with ``insecure``.

    A key file must be private unless :func:`insecure_key_permissions` allows otherwise (from
    ``allow_insecure_permissions``, ``env`` or ``section``). Raises :class:`ConfigError` when there is no key
    and plaintext was not asked for explicitly, or the key is unusable.
    """
    from vtunnel.security.errors import SecurityError
    from vtunnel.security.keys import decode_key

    insecure = insecure or bool(section.get("insecure", False))
    loose = insecure_key_permissions(flag=allow_insecure_permissions, section=section, env=env)
    try:
        if psk_file:
            return load_psk_file(psk_file, allow_insecure_permissions=loose)
        if env.get("VTUNNEL_PSK"):
            return decode_key(env["VTUNNEL_PSK"])
        if section.get("psk_file"):
            return load_psk_file(
                os.path.expanduser(str(section["psk_file"])), allow_insecure_permissions=loose
            )
        if section.get("psk"):
            return decode_key(str(section["psk"]))
    except SecurityError as exc:
        raise ConfigError(str(exc)) from None
    if insecure:
        return None
    raise ConfigError(
        "no pre-shared key: give --psk-file FILE (make one with `vtunnel keygen -o FILE`), set VTUNNEL_PSK, "
        "or pass --insecure for a plaintext tunnel (vproxy-compatible, anyone can use it)"
    )


def resolve_websocks_users(
    *,
    specs: Sequence[str],
    user_file: str | None,
    section: Mapping[str, Any],
    env: Mapping[str, str] = os.environ,
    allow_insecure_permissions: bool = False,
) -> dict[str, str]:
    """The server's WebSocks users: the config's ``websocks_users`` table, then its ``websocks_user_file`` (or
    ``--websocks-user-file``), then ``VTUNNEL_WEBSOCKS_USER``, then ``--websocks-user`` (``specs``); a user named
    again takes the later password.

    A users file holds one ``USER:PASS`` per line (blank lines and ``#`` comments ignored) and must be private
    like a key file; the variable holds one ``USER:PASS`` per line. Raises :class:`ConfigError` naming the source
    and line of a malformed entry (never its text).
    """
    users: dict[str, str] = {}
    table = section.get("websocks_users", {})
    if not isinstance(table, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in table.items()
    ):
        raise ConfigError('websocks_users must be a table of user = "password"')
    users.update(table)
    path = user_file or section.get("websocks_user_file")
    if path:
        p = Path(os.path.expanduser(str(path)))
        loose = insecure_key_permissions(flag=allow_insecure_permissions, section=section, env=env)
        try:
            text, mode = _read_file(p)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"cannot read the WebSocks users file {str(p)!r}: {exc.__class__.__name__}"
            ) from None
        _check_mode(p, mode, "WebSocks users file", loose, ConfigError)
        users.update(_user_lines(text, f"the WebSocks users file {str(p)!r}", comments=True))
    if env.get(WEBSOCKS_USER_ENV):
        users.update(_user_lines(env[WEBSOCKS_USER_ENV], WEBSOCKS_USER_ENV, comments=False))
    if specs:
        log.warning(
            "a password given with --websocks-user is visible to every local user in `ps`; "
            f"use --websocks-user-file FILE (chmod 600) or {WEBSOCKS_USER_ENV} instead"
        )
    for n, spec in enumerate(specs, 1):
        users.update(_user_lines(spec, f"--websocks-user number {n}", comments=False))
    return users


def _user_lines(text: str, source: str, *, comments: bool) -> dict[str, str]:
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or (comments and line.lstrip().startswith("#")):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user:
            raise ConfigError(f"{source}, line {number}: expected USER:PASS")
        users[user] = password
    return users


def resolve_cipher(
    *, cipher: str | None, section: Mapping[str, Any], env: Mapping[str, str] = os.environ
) -> str:
    """The transport cipher setting from ``--cipher``, ``VTUNNEL_CIPHER``, or the config; ``auto`` by default.

    Raises :class:`ConfigError` naming the choices when the setting is not one of them.
    """
    from vtunnel.security.ciphers import CIPHER_CHOICES

    value = cipher or env.get("VTUNNEL_CIPHER") or section.get("cipher") or "auto"
    name = str(value).strip().lower()
    if name not in CIPHER_CHOICES:
        raise ConfigError(f"cipher must be one of {', '.join(CIPHER_CHOICES)}, not {str(value)!r}")
    return name
