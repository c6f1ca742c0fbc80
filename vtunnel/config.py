"""The one configuration model: a TOML file with the same settings as the command line.

```toml
[server]
listen = ["kcp://0.0.0.0:4000", "tcp://0.0.0.0:4000"]
target = "127.0.0.1:8388"          # optional: every stream without a destination goes here
psk_file = "/etc/vtunnel/key"      # or `insecure = true` for a plaintext, vproxy-compatible tunnel
cipher = "auto"                    # or "aes-256-gcm" / "chacha20-poly1305" to pin the transport cipher
allow_private = false
allow = ["10.1.2.0/24"]            # exit policy exceptions
deny = ["*.internal"]
[server.websocks_users]
alice = "secret"

[agent]
server = "kcp://203.0.113.7:4000"
socks = "127.0.0.1:1080"
http = "127.0.0.1:8118"
forward = ["127.0.0.1:9000", "127.0.0.1:2222=10.0.0.5:22"]
connections = 1
psk_file = "~/.config/vtunnel/key"
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
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from vtunnel.protocol import TunnelConfig

__all__ = ["ConfigError", "load_config", "load_psk_file", "resolve_cipher", "resolve_psk", "tunnel_config"]

SECTIONS = {
    "server": {
        "listen",
        "target",
        "psk_file",
        "psk",
        "insecure",
        "cipher",
        "allow_private",
        "allow",
        "deny",
        "websocks_users",
        "connect_timeout",
        "drain_timeout",
        "idle_timeout",
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
        "cipher",
        "socks_users",
        "drain_timeout",
        "open_timeout",
    },
    "tunnel": {f.name for f in fields(TunnelConfig)},
    "log": {"level", "format"},
}


class ConfigError(Exception):
    """The configuration is unusable; the message says which setting and why."""


def load_config(path: str | os.PathLike[str] | None) -> dict[str, dict[str, Any]]:
    """Read and check a TOML config file; ``None`` gives an empty config."""
    if path is None:
        return {}
    p = Path(path).expanduser()
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    for section, value in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{p}: unknown section [{section}] (known: {', '.join(sorted(SECTIONS))})")
        if not isinstance(value, dict):
            raise ConfigError(f"{p}: [{section}] must be a table")
        unknown = set(value) - SECTIONS[section]
        if unknown:
            raise ConfigError(f"{p}: unknown setting(s) in [{section}]: {', '.join(sorted(unknown))}")
    return data


def tunnel_config(section: Mapping[str, Any]) -> TunnelConfig:
    try:
        return TunnelConfig(**dict(section))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[tunnel]: {exc}") from None


def load_psk_file(path: str | os.PathLike[str]) -> bytes:
    """Read a key file (see :func:`vtunnel.security.keys.decode_key_file`). Raises ``SecurityError``."""
    from vtunnel.security.errors import SecurityError
    from vtunnel.security.keys import decode_key_file

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SecurityError(f"cannot read the key file {str(p)!r}: {exc.__class__.__name__}") from None
    return decode_key_file(text, source=f"the key file {str(p)!r}")


def resolve_psk(
    *, psk_file: str | None, insecure: bool, section: Mapping[str, Any], env: Mapping[str, str] = os.environ
) -> bytes | None:
    """The pre-shared key from ``--psk-file``, ``VTUNNEL_PSK``, or the config; ``None`` only with ``insecure``.

    Raises :class:`ConfigError` when there is no key and plaintext was not asked for explicitly.
    """
    from vtunnel.security.errors import SecurityError
    from vtunnel.security.keys import decode_key

    insecure = insecure or bool(section.get("insecure", False))
    try:
        if psk_file:
            return load_psk_file(psk_file)
        if env.get("VTUNNEL_PSK"):
            return decode_key(env["VTUNNEL_PSK"])
        if section.get("psk_file"):
            return load_psk_file(os.path.expanduser(str(section["psk_file"])))
        if section.get("psk"):
            return decode_key(str(section["psk"]))
    except SecurityError as exc:
        raise ConfigError(str(exc)) from None
    if insecure:
        return None
    raise ConfigError(
        "no pre-shared key: give --psk-file FILE (make one with `vtunnel keygen > FILE`), set VTUNNEL_PSK, "
        "or pass --insecure for a plaintext tunnel (vproxy-compatible, anyone can use it)"
    )


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
