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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, TypeVar
from urllib.parse import parse_qsl, urlsplit

import anyio
import structlog
from anyio.abc import ByteStream, Listener, SocketAttribute

from vtunnel.security.keys import KeySet
from vtunnel.transports.link import Link, LinkStats, ListenerAttribute, Refusals, StreamLink

if TYPE_CHECKING:
    from vtunnel.security.datagram import ConnectionIdLayout

__all__ = [
    "ENTRY_POINT_GROUP",
    "ByteStreamTransport",
    "Endpoint",
    "KeyRing",
    "Link",
    "LinkStats",
    "ListenerAttribute",
    "Refusals",
    "SecurityConfig",
    "SharedListening",
    "Transport",
    "TransportError",
    "TransportNotFound",
    "available_transports",
    "get_transport",
]

ENTRY_POINT_GROUP = "vtunnel.transports"
#: key handshakes a byte-stream listener takes from one source address: per second, and in a burst
HANDSHAKES_PER_SECOND = 50.0
HANDSHAKE_BURST = 100

log = structlog.get_logger("vtunnel.transports")
#: what a listener's connections become (links, or byte streams for WebSocks)
T = TypeVar("T")


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


class KeyRing:
    """A server's keys as they are now: every listener of the server reads :attr:`current` at each handshake,
    so :meth:`replace` (a reload) changes what new handshakes accept, on every transport at once. Tunnels
    already up are the server's business (it cuts those of users no longer in the set)."""

    __slots__ = ("_current",)

    def __init__(self, keys: KeySet) -> None:
        self._current = keys

    @property
    def current(self) -> KeySet:
        return self._current

    def replace(self, keys: KeySet) -> None:
        self._current = keys

    def __repr__(self) -> str:
        return f"KeyRing({self._current!r})"


@dataclass(frozen=True, kw_only=True, slots=True)
class SecurityConfig:
    """What a transport needs to protect a tunnel.

    ``psk`` is the 32-byte pre-shared key; ``None`` means plaintext (``--insecure``, vproxy-compatible). A
    server may hold its users' keys instead: ``keys``, a :class:`KeyRing` shared by its listeners (reloaded on
    SIGHUP); a client has one key, ``psk``. Byte-stream transports apply the PSK handshake and AEAD records on
    top of their stream; datagram transports seal every datagram (see ``docs/security.md``). ``cipher`` is the
    transport cipher setting with a key: ``auto`` (AES-256-GCM when both ends have AES instructions, else
    ChaCha20-Poly1305) or one cipher's name to pin it. ``connection_ids`` is what a server's sealed datagrams put
    in the connection IDs it assigns (its server id, its worker's slot: ``docs/security.md``, "Connection IDs");
    None: random ones.
    """

    psk: bytes | None = None
    cipher: str = "auto"
    connection_ids: ConnectionIdLayout | None = None
    keys: KeyRing | None = None
    #: without a key, on a datagram listener (kcp://, rudp://): a datagram starts a session only if this admits its
    #: source host (an IP address literal); None admits any. Byte-stream listeners ignore it
    admit: Callable[[str], bool] | None = None

    def __post_init__(self) -> None:
        from vtunnel.security.ciphers import CIPHER_CHOICES

        if self.psk is not None and len(self.psk) != 32:
            raise TransportError("the pre-shared key must be 32 bytes")
        if self.psk is not None and self.keys is not None:
            raise TransportError(
                "a security config has one key (psk) or a server's key ring (keys), not both"
            )
        if self.cipher not in CIPHER_CHOICES:
            raise TransportError(
                f"unknown cipher {self.cipher!r} (expected one of: {', '.join(CIPHER_CHOICES)})"
            )

    @property
    def insecure(self) -> bool:
        return self.psk is None and self.keys is None

    def server_keys(self) -> KeyRing | None:
        """What a listener accepts: :attr:`keys`, or the ring of the one key ``psk`` (None without a key)."""
        if self.keys is not None:
            return self.keys
        return None if self.psk is None else KeyRing(KeySet.single(self.psk))

    def __repr__(self) -> str:  # never print key material
        keys = f", keys={self.keys!r}" if self.keys is not None else ""
        return (
            f"SecurityConfig(psk={'<set>' if self.psk is not None else None}, cipher={self.cipher!r}{keys})"
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class SharedListening:
    """How several processes can share one listening address of a transport (``vtunnel server --workers``):
    ``datagram`` False, a TCP socket each (the kernel spreads connections); True, UDP sockets, the datagrams
    steered to the process that holds their session, with ``sockbuf`` bytes of socket buffers. ``session_bytes``
    (offset, length) are the bytes of a keyless datagram that name its session (a sum of them steers it); None:
    keyless sessions cannot be steered by their bytes. With a key the sealed connection ID steers."""

    datagram: bool
    sockbuf: int = 0
    session_bytes: tuple[int, int] | None = None


class Transport(abc.ABC):
    """A way to carry tunnels. Subclasses are constructed without arguments."""

    #: URL schemes this class serves (an entry point's name selects one of them).
    schemes: ClassVar[tuple[str, ...]] = ()
    #: One line shown by ``vtunnel transports``.
    description: ClassVar[str] = ""
    #: Its packets are UDP datagrams, so a network that blocks UDP blocks it (an agent given several servers
    #: tries these first and falls back to the others: docs/agent.md, "Several servers").
    over_udp: ClassVar[bool] = False

    def check(self, endpoint: Endpoint) -> None:  # noqa: B027 - optional hook
        """Validate ``endpoint``'s options; raise :class:`TransportError` naming the bad one."""

    @abc.abstractmethod
    async def connect(self, endpoint: Endpoint, *, security: SecurityConfig) -> Link:
        """Open one link to ``endpoint``."""

    @abc.abstractmethod
    async def listen(self, endpoint: Endpoint, *, security: SecurityConfig) -> Listener[Link]:
        """Listen on ``endpoint``; the listener yields one link per peer (one tunnel each)."""

    def shared_listening(self, endpoint: Endpoint) -> SharedListening | None:
        """How several worker processes share ``endpoint``'s listening sockets, or None (the default): they
        cannot, since this transport binds its own (its listener must take them from
        :func:`vtunnel.io.listening.given`)."""
        return None


class ByteStreamTransport(Transport):
    """A transport whose connections are anyio byte streams (TCP, TLS, WebSocket, ...): most plugins are one.

    Implement :meth:`connect_stream` (open a connection and run the transport's own handshake: TLS, an HTTP
    upgrade), :meth:`listen_streams` (a listener of raw socket connections) and, if the server side has a
    handshake of its own, :meth:`accept_stream`. The key is never the transport's job: this base runs the PSK
    handshake and AEAD records on top of the stream when ``security`` has a key, tunes the sockets, keeps
    unauthenticated connections under a cap (the oldest are shed, see
    :class:`~vtunnel.transports.secure.SecuredListener`), limits handshakes per source, and hands the result to
    the tunnel as links (:class:`~vtunnel.transports.link.StreamLink`).
    """

    #: how long a server-side :meth:`accept_stream` may take before the connection is dropped
    accept_timeout: ClassVar[float] = 10.0

    @abc.abstractmethod
    async def connect_stream(self, endpoint: Endpoint) -> ByteStream:
        """Connect to ``endpoint`` and run the transport's own handshake; the stream carries the tunnel."""

    @abc.abstractmethod
    async def listen_streams(self, endpoint: Endpoint) -> Listener[ByteStream]:
        """Listen on ``endpoint``: a listener of raw connections, anyio's TCP listener (the base takes its
        sockets over and accepts from them with vtunnel's own accept loop, which sheds unauthenticated connections
        when out of descriptors) or any anyio listener of byte streams (one over UDP hands over its connections
        through its ``serve``; see :class:`~vtunnel.transports.secure.SecuredListener`). It gives its address as
        ``SocketAttribute.local_address`` and each stream its peer's as ``SocketAttribute.remote_address`` (the
        handshake limiter's key)."""

    async def accept_stream(self, stream: ByteStream, endpoint: Endpoint) -> ByteStream | None:
        """The server's own handshake on one raw connection (TLS, an HTTP upgrade): the stream that carries the
        tunnel, or ``None`` to drop the connection (after answering it, e.g. HTTP 404). Runs before the key is
        checked, under the cap of unauthenticated connections and :attr:`accept_timeout`."""
        return stream

    def link_for(self, stream: ByteStream) -> Link:
        """The link that carries a tunnel over ``stream`` once its transport handshake is done (the key's
        records go on top of it): a :class:`~vtunnel.transports.link.StreamLink` unless the transport has a
        better one for the streams it makes."""
        return StreamLink(stream)

    async def open_stream(self, endpoint: Endpoint) -> ByteStream:
        """A connected stream, its transport handshake done and its socket tuned (no key: see :meth:`connect`)."""
        from vtunnel.io.tuning import tune_stream

        stream = await self.connect_stream(endpoint)
        tune_stream(stream)
        return stream

    async def connect(self, endpoint: Endpoint, *, security: SecurityConfig) -> Link:
        from vtunnel.transports.secure import secure_client

        stream = await self.open_stream(endpoint)
        if security.psk is None:
            return self.link_for(stream)
        channel = await secure_client(stream, security.psk, cipher=security.cipher)  # closes it on failure
        return channel.link(self.link_for(channel.stream))

    async def listen(self, endpoint: Endpoint, *, security: SecurityConfig) -> Listener[Link]:
        from vtunnel.security.replay import HandshakeLimiter, ReplayCache
        from vtunnel.transports.secure import secure_server

        ring, cipher, link_for = security.server_keys(), security.cipher, self.link_for
        replay = ReplayCache()  # of this listener's key handshakes (small until a key handshake comes)
        limiter = HandshakeLimiter(rate=HANDSHAKES_PER_SECOND, burst=HANDSHAKE_BURST)

        refusals = Refusals()

        async def finish(stream: ByteStream, source: str) -> Link | None:
            if ring is None:
                return link_for(stream)
            channel = await secure_server(
                stream,
                ring.current,
                replay=replay,
                limiter=limiter,
                source=source,
                cipher=cipher,
                refusals=refusals,
            )
            return None if channel is None else channel.link(link_for(channel.stream))

        return await self._accepting(endpoint, finish, refusals=refusals)

    async def serve_streams(self, endpoint: Endpoint) -> Listener[ByteStream]:
        """A listener of the streams that passed :meth:`accept_stream`, with no key and no tunnel (a WebSocks
        listener serves these), under the same cap of connections in their handshake."""

        async def finish(stream: ByteStream, source: str) -> ByteStream:
            return stream

        return await self._accepting(endpoint, finish)

    async def _accepting(
        self,
        endpoint: Endpoint,
        finish: Callable[[ByteStream, str], Awaitable[T | None]],
        *,
        refusals: Refusals | None = None,
    ) -> Listener[T]:
        """:meth:`listen_streams`, each connection through :meth:`accept_stream` (within :attr:`accept_timeout`)
        and then ``finish(stream, source)`` (the peer's address: the connection's, or with ``proxy=1`` the one
        its PROXY protocol header names), under the cap of :class:`~vtunnel.transports.secure.SecuredListener`,
        which gives ``refusals`` (counted by it, by ``finish`` and here) as ``ListenerAttribute.refusals``."""
        from vtunnel.io.stream_sockets import adopt_socket_listener
        from vtunnel.transports.secure import SecuredListener, local_name

        inner = await self.listen_streams(endpoint)
        local = local_name(inner)
        lean = adopt_socket_listener(inner)  # one accept loop for every listener of sockets
        accept, timeout = self.accept_stream, self.accept_timeout
        refused = Refusals() if refusals is None else refusals
        proxied = proxy_protocol(endpoint)

        async def prepare(raw: ByteStream) -> T | None:
            peer = raw.extra(SocketAttribute.remote_address, "")
            source = str(peer[0]) if isinstance(peer, tuple) else str(peer)
            with anyio.fail_after(timeout):
                if proxied:
                    from vtunnel.transports.proxied import read_proxy_header

                    named = await read_proxy_header(raw, peer=source, refusals=refused)
                    if named is None:
                        return None
                    source = named
                stream = await accept(raw, endpoint)
            if stream is None:  # the transport's own handshake turned it away (an HTTP 404, say)
                refused.probes["transport"] += 1
                return None
            return await finish(stream, source)

        secured = SecuredListener(inner if lean is None else lean, prepare, local=local, refusals=refused)
        if lean is not None:  # out of descriptors, the accept loop may close a pending connection
            lean.relay.set_on_exhausted(secured.shed_oldest)
        return secured


def proxy_protocol(endpoint: Endpoint) -> bool:
    """Whether a listen URL asks for a PROXY protocol header on every connection (``proxy=1``; ``proxy=0``, or
    none, is the default). Raises TransportError for another value."""
    value = endpoint.params.get("proxy", "0")
    if value not in ("0", "1"):
        raise TransportError(f"{endpoint.scheme}:// option 'proxy' is 1 or 0, not {value!r}")
    return value == "1"


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
