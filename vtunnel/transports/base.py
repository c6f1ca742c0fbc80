"""Transport contracts and the transport registry.

A transport turns a URL such as ``tcp://127.0.0.1:9000`` or ``kcp://host:port?mode=fast3`` into links
(:class:`~vtunnel.transports.link.Link`: reliable, ordered, push-mode byte pipes): ``connect`` gives one, ``listen``
gives an anyio :class:`~anyio.abc.Listener` that yields one per accepted peer. Each link carries exactly one tunnel.
A transport built on anyio byte streams subclasses :class:`ByteStreamTransport` and returns those instead: one
adapter (:class:`~vtunnel.transports.link.StreamLink`) makes them links.

Transports are found through the entry-point group ``vtunnel.transports`` keyed by URL scheme. The built-in ones are
registered there exactly like third-party ones; loading is lazy, a plugin that fails to import is logged and skipped,
and a scheme the user names that no installed package provides fails with :class:`TransportNotFound`, whose message
says what to install.
"""

from __future__ import annotations

import abc
import importlib.metadata
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar
from urllib.parse import parse_qsl, urlsplit

import structlog
from anyio.abc import ByteStream, Listener

from vtunnel.transports.link import Link, StreamLink, StreamLinkListener

__all__ = [
    "ENTRY_POINT_GROUP",
    "ByteStreamTransport",
    "Endpoint",
    "Link",
    "SecurityConfig",
    "Transport",
    "TransportError",
    "TransportNotFound",
    "available_transports",
    "get_transport",
]

ENTRY_POINT_GROUP = "vtunnel.transports"

log = structlog.get_logger("vtunnel.transports")


class TransportError(Exception):
    """A transport could not be set up (bad URL, unknown scheme, bad option)."""


class TransportNotFound(TransportError):
    """No installed package provides the URL scheme the user named."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Endpoint:
    """A parsed transport URL: ``scheme://host:port?key=value&...``.

    IPv6 hosts are written in brackets (``tcp://[::1]:9000``) and stored without them.
    """

    scheme: str
    host: str
    port: int
    params: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        if "://" not in url:
            raise TransportError(f"not a transport URL (expected scheme://host:port): {url!r}")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        try:
            host = parts.hostname
            port = parts.port
        except ValueError as exc:
            raise TransportError(f"bad port in {url!r}: {exc}") from None
        if not host:
            raise TransportError(f"missing host in {url!r}")
        if port is None:
            raise TransportError(f"missing port in {url!r}")
        params: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in params:
                raise TransportError(f"option {key!r} given twice in {url!r}")
            params[key] = value
        return cls(scheme=scheme, host=host, port=port, params=params)

    @property
    def hostport(self) -> str:
        """``host:port`` with brackets around an IPv6 literal."""
        try:
            if ipaddress.ip_address(self.host).version == 6:
                return f"[{self.host}]:{self.port}"
        except ValueError:
            pass
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.scheme}://{self.hostport}" + (f"?{query}" if query else "")


@dataclass(frozen=True, kw_only=True, slots=True)
class SecurityConfig:
    """What a transport needs to protect a tunnel.

    ``psk`` is the 32-byte pre-shared key; ``None`` means plaintext (``--insecure``, vproxy-compatible).
    Byte-stream transports apply the PSK handshake and AEAD records on top of their stream; datagram transports seal
    every datagram (see ``docs/security.md``). ``cipher`` is the transport cipher setting with a key: ``auto``
    (AES-256-GCM when both ends have AES instructions, else ChaCha20-Poly1305) or one cipher's name to pin it.
    """

    psk: bytes | None = None
    cipher: str = "auto"

    def __post_init__(self) -> None:
        from vtunnel.security.ciphers import CIPHER_CHOICES

        if self.psk is not None and len(self.psk) != 32:
            raise TransportError("the pre-shared key must be 32 bytes")
        if self.cipher not in CIPHER_CHOICES:
            raise TransportError(
                f"unknown cipher {self.cipher!r} (expected one of: {', '.join(CIPHER_CHOICES)})"
            )

    @property
    def insecure(self) -> bool:
        return self.psk is None

    def __repr__(self) -> str:  # never print key material
        return f"SecurityConfig(psk={'<set>' if self.psk is not None else None}, cipher={self.cipher!r})"


class Transport(abc.ABC):
    """A way to carry tunnels. Subclasses are constructed without arguments."""

    #: URL schemes this class serves (an entry point's name selects one of them).
    schemes: ClassVar[tuple[str, ...]] = ()
    #: One line shown by ``vtunnel transports``.
    description: ClassVar[str] = ""

    def check(self, endpoint: Endpoint) -> None:  # noqa: B027 - optional hook
        """Validate ``endpoint``'s options; raise :class:`TransportError` naming the bad one."""

    @abc.abstractmethod
    async def connect(self, endpoint: Endpoint, *, security: SecurityConfig) -> Link:
        """Open one link to ``endpoint``."""

    @abc.abstractmethod
    async def listen(self, endpoint: Endpoint, *, security: SecurityConfig) -> Listener[Link]:
        """Listen on ``endpoint``; the listener yields one link per peer (one tunnel each)."""


class ByteStreamTransport(Transport):
    """A transport whose connections are anyio byte streams (TCP, TLS, WebSocket, ...).

    Implement :meth:`connect_stream` and :meth:`listen_streams`; ``connect`` and ``listen`` hand the streams to
    the tunnel as links through :class:`~vtunnel.transports.link.StreamLink`.
    """

    @abc.abstractmethod
    async def connect_stream(self, endpoint: Endpoint, *, security: SecurityConfig) -> ByteStream:
        """Open one reliable ordered byte stream to ``endpoint``."""

    @abc.abstractmethod
    async def listen_streams(self, endpoint: Endpoint, *, security: SecurityConfig) -> Listener[ByteStream]:
        """Listen on ``endpoint``; the listener yields one byte stream per peer."""

    async def connect(self, endpoint: Endpoint, *, security: SecurityConfig) -> Link:
        return StreamLink(await self.connect_stream(endpoint, security=security))

    async def listen(self, endpoint: Endpoint, *, security: SecurityConfig) -> Listener[Link]:
        return StreamLinkListener(await self.listen_streams(endpoint, security=security))


_loaded: dict[str, type[Transport]] = {}


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name.lower(), ep)
    return found


def _load(ep: importlib.metadata.EntryPoint) -> type[Transport]:
    obj = ep.load()
    if not (isinstance(obj, type) and issubclass(obj, Transport)):
        raise TransportError(f"entry point {ep.name}={ep.value} is not a vtunnel Transport subclass")
    return obj


def available_transports() -> dict[str, type[Transport] | Exception]:
    """Every installed scheme, with its class, or the exception that stopped it loading."""
    result: dict[str, type[Transport] | Exception] = {}
    for name, ep in sorted(_entry_points().items()):
        try:
            result[name] = _loaded[name] if name in _loaded else _load(ep)
        except Exception as exc:  # a broken plugin is reported, never fatal
            log.warning("transport plugin failed to load", scheme=name, entry_point=ep.value, error=repr(exc))
            result[name] = exc
    return result


def get_transport(scheme: str) -> Transport:
    """A fresh instance of the transport for ``scheme``."""
    scheme = scheme.lower()
    cls = _loaded.get(scheme)
    if cls is None:
        ep = _entry_points().get(scheme)
        if ep is None:
            raise TransportNotFound(
                f"no transport for scheme {scheme!r} is installed; "
                f"install the package that provides it (for example: pip install vtunnel-{scheme}), "
                "then check with `vtunnel transports`"
            )
        try:
            cls = _load(ep)
        except TransportError:
            raise
        except Exception as exc:
            raise TransportError(
                f"the transport for {scheme!r} ({ep.value}) failed to load: {exc!r}"
            ) from exc
        _loaded[scheme] = cls
    return cls()
