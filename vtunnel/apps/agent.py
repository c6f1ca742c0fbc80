"""``vtunnel agent``: the user's local end. SOCKS5 and HTTP proxy fronts, and plain port forwards.

Every accepted local connection becomes one stream in a pooled tunnel to the server:

* ``--forward LISTEN`` sends the bytes to the server's ``--target`` (no metadata: vproxy KcpTun / kcptun style);
* ``--forward LISTEN=HOST:PORT`` asks the server for that destination in the SYN, and the first bytes follow the
  SYN without waiting (0-RTT);
* ``--socks`` and ``--http`` speak SOCKS5 (RFC 1928/1929) and HTTP proxy (CONNECT and absolute URIs) to local
  clients and put the requested destination in the SYN; the name is resolved by the server.

With a ``websocks://`` or ``websockss://`` server there is no tunnel: every local connection that names a
destination gets a TCP (or TLS) connection of its own to the server, which the WebSocks exchange leads to the
destination before the local client is told it succeeded (vproxy's WebSocks agent does the same).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.lowlevel
import structlog
from anyio.abc import TaskGroup, TaskStatus

from vtunnel.apps.lite_tls_splice import SpliceDialer, may_splice
from vtunnel.apps.pipe import (
    Leg,
    Relay,
    SocketEnd,
    SocketLeg,
    StreamLeg,
    TunnelEnd,
    TunnelLeg,
    join,
    reset_on_close,
)
from vtunnel.apps.websocks import WEBSOCKS_SCHEMES, carrier_endpoint, websocks_connect, websocks_dial
from vtunnel.io.stream_sockets import LeanSocketStream, RelayListener, open_relay_listener
from vtunnel.protocol import StreamMetadata, TunnelConfig
from vtunnel.runtime.byte_stream import TunnelByteStream
from vtunnel.runtime.errors import DestinationNotCarried, TunnelUnavailable
from vtunnel.runtime.session import TunnelPool
from vtunnel.runtime.tunnel_stream import TunnelStream
from vtunnel.transports.base import Endpoint, SecurityConfig

if TYPE_CHECKING:
    from vtunnel.apps.stats import ProcessStats
    from vtunnel.apps.tun import TunAgent, TunAgentSettings

__all__ = ["Agent", "AgentSettings", "Forward", "parse_hostport"]

log = structlog.get_logger("vtunnel.agent")

#: what a front's listener makes per connection: a relay's socket end, or a stream that reads a header first
P = TypeVar("P", SocketEnd, LeanSocketStream)


def parse_hostport(text: str, *, default_host: str | None = None) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or (with ``default_host``) a bare port."""
    text = text.strip()
    if text.isdigit() and default_host is not None:
        host, port_text = default_host, text
    elif text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"expected [IPv6]:PORT, got {text!r}")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected HOST:PORT, got {text!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port_text)


@dataclass(frozen=True, kw_only=True)
class Forward:
    listen: tuple[str, int]
    destination: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Forward:
        listen, sep, dest = spec.partition("=")
        if sep and dest:
            parse_hostport(dest)
        return cls(listen=parse_hostport(listen, default_host="127.0.0.1"), destination=dest or None)


@dataclass(frozen=True, kw_only=True)
class AgentSettings:
    #: the servers, in the order given: the pool's tunnels go to the UDP ones first and spread over a tier
    #: (:mod:`vtunnel.runtime.session`); a WebSocks server is given alone
    servers: Sequence[Endpoint]
    security: SecurityConfig
    forwards: Sequence[Forward] = ()
    socks: tuple[str, int] | None = None
    http: tuple[str, int] | None = None
    socks_users: Mapping[str, str] = field(default_factory=dict)
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    connections: int = 1
    drain_timeout: float = 10.0
    open_timeout: float = 10.0
    #: ``(user, password)``: carry each destination the way vproxy's agent does, WebSocks inside a stream that
    #: names nothing (a vproxy server cannot be told a destination in the SYN), or on a connection of its own
    #: to a ``websocks://`` / ``websockss://`` server; ``None``: in the SYN (metadata)
    websocks_login: tuple[str, str] | None = None
    #: IP mode (``--tun``): a TUN device whose packets ride a ``tun`` stream (docs/tun.md)
    tun: TunAgentSettings | None = None

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError("the agent needs a server")
        if len(self.servers) > 1 and any(s.scheme in WEBSOCKS_SCHEMES for s in self.servers):
            raise ValueError("a WebSocks server is given alone: it takes no other --server")

    @property
    def server(self) -> Endpoint:
        """The first server (a WebSocks server's only one)."""
        return self.servers[0]


class Agent:
    def __init__(self, settings: AgentSettings, *, stats: ProcessStats | None = None) -> None:
        if not (settings.forwards or settings.socks or settings.http or settings.tun):
            raise ValueError("the agent needs something to serve: --socks, --http, --forward or --tun")
        self.settings = settings
        #: what the metrics read (``--metrics``), or None
        self.stats = stats
        #: the tunnels to the server; ``None`` for a WebSocks server (a connection of its own per destination)
        self.pool: TunnelPool | None = None
        # lite-tls splice mode, per server: at the port its URL names, else at the one its tunnels announce (a
        # stream's dedicated connection goes to the server whose tunnel carries it: SpliceDialer)
        spliced = settings.tunnel.lite_tls and any(may_splice(server) for server in settings.servers)
        if settings.server.scheme in WEBSOCKS_SCHEMES:
            carrier_endpoint(settings.server)  # a bad option is an error now, not at the first connection
            if settings.websocks_login is None:
                raise ValueError(f"a {settings.server.scheme}:// server needs a WebSocks login (USER:PASS)")
            if any(fwd.destination is None for fwd in settings.forwards):
                raise ValueError(
                    "a WebSocks server has no target of its own: give every --forward a destination "
                    "(LISTEN=HOST:PORT)"
                )
        else:
            self.pool = TunnelPool(
                settings.servers,
                security=settings.security,
                config=dataclasses.replace(settings.tunnel, tun=True) if settings.tun else settings.tunnel,
                size=settings.connections,
                watch=stats,
                lite_tls_spliced=may_splice if spliced else None,
            )
            if stats is not None:
                stats.watch_pool(self.pool)
        #: lite-tls splice mode: opens lite-tls streams with a dedicated connection each
        self.splice = SpliceDialer() if spliced and self.pool is not None else None
        self.tun: TunAgent | None = None
        if settings.tun is not None:
            if self.pool is None:
                raise ValueError(f"--tun needs a tunnel: a {settings.server.scheme}:// server has none")
            from vtunnel.apps.tun import TunAgent

            self.tun = TunAgent(settings.tun, self.pool)
        self.local_addresses: dict[str, str] = {}
        self._stopping = anyio.Event()
        self._active = 0
        self._idle = anyio.Event()
        self._idle.set()
        self._task_group: TaskGroup | None = None

    async def open(self, metadata: StreamMetadata | None, *, wait_accepted: bool = True) -> TunnelStream:
        """A tunnel stream to ``metadata``'s destination (the server's target without one)."""
        if self.pool is None:
            raise TunnelUnavailable(f"a {self.settings.server.scheme}:// server has no tunnel")
        if self.stats is not None:
            self.stats.stream_opened(metadata.kind if metadata is not None else None)
        login = self.settings.websocks_login
        if login is None and metadata is not None:
            metadata = self.choose_kind(metadata)
        if self.splice is not None and login is None and metadata is not None and metadata.kind == "lite-tls":
            pool = self.pool
            if self.splice.dials(pool.connections):
                conn = await pool.wait_ready(self.settings.open_timeout)
                return await self.splice.open(metadata, conn, wait_accepted=wait_accepted)
        if login is None or metadata is None or metadata.authority is None:
            return await self.pool.open_stream(
                metadata, wait_accepted=wait_accepted, timeout=self.settings.open_timeout
            )
        if metadata.kind != "tcp":
            raise DestinationNotCarried(f"WebSocks carries TCP only, not a {metadata.kind!r} stream")
        # vproxy's way: a stream that names nothing, and the destination inside it (WebSocks, then SOCKS5)
        stream = TunnelByteStream(
            await self.pool.open_stream(None, wait_accepted=True, timeout=self.settings.open_timeout)
        )
        try:
            with anyio.fail_after(self.settings.open_timeout):
                await websocks_connect(stream, metadata.authority, user=login[0], password=login[1])
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise
        return stream.hand_off()  # with the destination's first bytes, if they came

    def open_now(self, metadata: StreamMetadata | None) -> TunnelStream | None:
        """:meth:`open` without waiting for its SYN-ACK, where nothing has to wait: a stream (0-RTT) of a tunnel
        that is up now, opened without a task. None when :meth:`open` must wait: no tunnel is up, a WebSocks
        login, a lite-tls stream that would splice. Raises what :meth:`open` raises."""
        pool = self.pool
        if pool is None or self.settings.websocks_login is not None:
            return None
        if metadata is not None:
            metadata = self.choose_kind(metadata)
            if (
                self.splice is not None
                and metadata.kind == "lite-tls"
                and self.splice.dials(pool.connections)
            ):
                return None
        stream = pool.start_stream(metadata)
        if stream is not None and self.stats is not None:
            self.stats.stream_opened(metadata.kind if metadata is not None else None)
        return stream

    def choose_kind(self, metadata: StreamMetadata) -> StreamMetadata:
        """Every TCP stream is a lite-tls stream while lite-tls is on (``--no-lite-tls`` turns it off): whether it
        leaves the tunnel is decided at both ends by its first bytes (a ClientHello record from the client;
        anything else, or the server speaking first, keeps it an ordinary stream for good). A server that did not
        agree to lite-tls relays it as a plain one (docs/lite-tls.md)."""
        if metadata.kind != "tcp" or not self.settings.tunnel.lite_tls:
            return metadata
        return dataclasses.replace(metadata, kind="lite-tls")

    async def _opener(self, metadata: StreamMetadata) -> Leg:
        """What a front's connection is carried by: a tunnel stream, or (a WebSocks server) a connection of its
        own, returned once the server reached the destination."""
        if self.pool is not None:
            return TunnelLeg(TunnelByteStream(await self.open(metadata)))
        login = self.settings.websocks_login
        if login is None or metadata.authority is None or metadata.kind != "tcp":
            raise DestinationNotCarried(
                f"a WebSocks server carries TCP to a named destination only, not a {metadata.kind!r} stream"
            )
        with anyio.fail_after(self.settings.open_timeout):
            return StreamLeg(
                await websocks_dial(
                    self.settings.server, metadata.authority, user=login[0], password=login[1]
                )
            )

    async def serve(self, *, task_status: TaskStatus[dict[str, str]] = anyio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        fronts: list[tuple[str, tuple[str, int], Callable[[Leg], Awaitable[None]]]] = []
        if s.socks:
            fronts.append(("socks", s.socks, self._socks_handler))
        if s.http:
            fronts.append(("http", s.http, self._http_handler))
        # every front is a listener whose connections are lean sockets (no loop transport each): a forward is a
        # relay's socket end from the start, a SOCKS5 / HTTP connection reads its header as a stream and then
        # hands its socket to a relay; they all begin accepting once the task group exists, and each accepted
        # connection counts as active until its socket is closed
        listeners: list[RelayListener[Any]] = []

        async def listen(
            name: str, address: tuple[str, int], factory: Callable[[], P], on_accept: Callable[[P], None]
        ) -> None:
            srv = await open_relay_listener(
                *address, factory, on_accept=on_accept, on_close=self._end, start=False
            )
            listeners.append(srv)
            self._show(name, srv.sockets[0].getsockname())

        try:
            for fwd in s.forwards:
                name = f"forward {fwd.destination or 'target'}"
                if self.pool is not None:  # a relay's socket end, joined to a tunnel stream once it is open
                    md = StreamMetadata(authority=fwd.destination, kind="tcp") if fwd.destination else None
                    await listen(name, fwd.listen, SocketEnd, functools.partial(self._forward_accepted, md))
                else:  # to a WebSocks server: a front whose task dials the server, then relays
                    run = functools.partial(
                        self._front_accepted, functools.partial(self._websocks_forward, fwd)
                    )
                    await listen(name, fwd.listen, LeanSocketStream, run)
            for name, address, handler in fronts:
                await listen(
                    name, address, LeanSocketStream, functools.partial(self._front_accepted, handler)
                )
        except BaseException:
            for srv in listeners:
                srv.close()
            raise
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            if self.pool is not None:
                await self.pool.run(tg)
            if self.tun is not None:
                tg.start_soon(self.tun.run)
            for srv in listeners:
                srv.start()
            task_status.started(self.local_addresses)
            try:
                await self._stopping.wait()
            finally:
                for srv in listeners:
                    srv.close()
            await anyio.lowlevel.checkpoint()
            with anyio.move_on_after(s.drain_timeout):
                await self._idle.wait()
            if self.tun is not None:
                self.tun.stop()
            if self.pool is not None:
                self.pool.shutdown()
                await anyio.sleep(0.1)  # let GOAWAY leave
            # relays still open end with their tunnels (cancelled below); ones still opening, with their task
            tg.cancel_scope.cancel()

    def _show(self, name: str, addr: Any) -> None:
        shown = f"[{addr[0]}]:{addr[1]}" if ":" in str(addr[0]) else f"{addr[0]}:{addr[1]}"
        self.local_addresses[name] = shown
        log.info("listening", front=name, address=shown, servers=[str(s) for s in self.settings.servers])

    def shutdown(self) -> None:
        self._stopping.set()

    def _begin(self) -> None:
        """A local connection was accepted: the drain waits for it until its socket is closed (:meth:`_end`)."""
        self._active += 1
        if self._idle.is_set():
            self._idle = anyio.Event()

    def _end(self) -> None:
        self._active -= 1
        if not self._active:
            self._idle.set()

    def _front_accepted(self, handler: Callable[[Leg], Awaitable[None]], client: LeanSocketStream) -> None:
        """A front's connection was accepted: serve it in a task (which ends at the hand-off to a relay, if any)."""
        self._begin()
        tg = self._task_group
        if tg is None or self._stopping.is_set():
            client.abort()
            return
        tg.start_soon(self._serve_front, handler, client)

    async def _serve_front(self, handler: Callable[[Leg], Awaitable[None]], client: LeanSocketStream) -> None:
        try:
            await handler(SocketLeg(client))
        except Exception as exc:
            log.info("local connection ended with an error", error=str(exc) or repr(exc))
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(client)  # nothing once the socket went to a relay

    def _forward_accepted(self, metadata: StreamMetadata | None, end: SocketEnd) -> None:
        """A forwarded connection was accepted: its stream opens at once (0-RTT, no wait, no task) when a tunnel
        is up, else in a short-lived task that waits for one."""
        self._begin()
        tg = self._task_group
        if tg is None or self._stopping.is_set():
            end.reset()  # not carried: reset, as when no tunnel comes
            return
        try:
            remote = self.open_now(metadata)
        except Exception as exc:
            _not_carried(end, exc)
            return
        if remote is None:
            tg.start_soon(self._open_for, metadata, end)
        else:
            Relay(end, TunnelEnd(remote))

    async def _open_for(self, metadata: StreamMetadata | None, end: SocketEnd) -> None:
        try:
            remote = await self.open(metadata, wait_accepted=False)
        except Exception as exc:
            _not_carried(end, exc)
            return
        except BaseException:
            end.reset()
            raise
        Relay(end, TunnelEnd(remote))

    async def _websocks_forward(self, fwd: Forward, client: Leg) -> None:
        """A ``--forward LISTEN=DEST`` connection to a WebSocks server: its own connection to DEST, then a relay."""
        assert fwd.destination is not None
        try:
            remote = await self._opener(StreamMetadata(authority=fwd.destination, kind="tcp"))
        except Exception as exc:
            # reset, not closed: a clean end of stream would look like an empty answer to the client
            log.info(
                "forwarded connection not carried", destination=fwd.destination, error=str(exc) or repr(exc)
            )
            reset_on_close(client.stream)
            return
        await join(client, remote).run()

    async def _socks_handler(self, client: Leg) -> None:
        from vtunnel.apps.socks5 import serve_socks5

        await serve_socks5(client, self._opener, users=self.settings.socks_users or None)

    async def _http_handler(self, client: Leg) -> None:
        from vtunnel.apps.httpproxy import serve_http_proxy

        await serve_http_proxy(client, self._opener)


def _not_carried(end: SocketEnd, exc: Exception) -> None:
    """A forwarded connection whose stream could not be opened: reset, not closed (a clean end of stream would
    look like an empty answer to the client)."""
    if isinstance(exc, TunnelUnavailable):
        log.warning("no tunnel for a forwarded connection", error=str(exc))
    else:
        log.info("local connection ended with an error", error=str(exc) or repr(exc))
    end.reset()
