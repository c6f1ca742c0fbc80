"""``vtunnel server``: accept tunnels on one or more transports and carry their streams to the destinations.

Per stream, by what the SYN says:

* metadata with a destination (``:authority``): kind ``tcp``/``lite-tls`` is dialed through the exit policy, kind
  ``udp`` becomes a UDP relay; the SYN-ACK (or an RST with the reason) reports whether the destination was reached;
* no metadata and a ``--target``: every stream goes to that one destination (vproxy's KcpTun, kcptun);
* no metadata and no target: the stream is served as WebSocks (vproxy's agent protocol inside the stream) when its
  first bytes are a WebSocks upgrade, otherwise reset.

A ``websocks://`` (or ``websockss://``, TLS) listener carries no tunnels: each connection is one WebSocks client
(vproxy's WebSocks agent), served as WebSocks inside a stream is, with the same users and exit policy.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import structlog
from anyio.abc import ByteStream, Listener, SocketAttribute, TaskStatus

from vtunnel.apps.dialer import Dialer, DialError
from vtunnel.apps.lite_tls_splice import TicketBook, offer_dedicated, serve_splice_port, splice_port
from vtunnel.apps.pipe import Relay, SocketEnd, StreamLeg, TunnelEnd, TunnelLeg
from vtunnel.apps.policy import ExitPolicy
from vtunnel.apps.websocks import (
    HANDSHAKE_TIMEOUT,
    WEBSOCKS_SCHEMES,
    carrier_endpoint,
    carrier_transport,
    classify_websocks,
    serve_websocks,
)
from vtunnel.io.stream_sockets import SocketWatcher, attach_socket, watcher_for
from vtunnel.protocol import Role, TunnelConfig
from vtunnel.runtime.byte_stream import TunnelByteStream
from vtunnel.runtime.connection import TunnelConnection
from vtunnel.runtime.tunnel_stream import TunnelStream
from vtunnel.security.keys import KeySet, UserKey
from vtunnel.transports.base import Endpoint, Link, ListenerAttribute, SecurityConfig, get_transport

if TYPE_CHECKING:
    from vtunnel.apps.stats import ProcessStats
    from vtunnel.apps.tun import TunServerSettings, TunSwitch

__all__ = ["Server", "ServerSettings"]

log = structlog.get_logger("vtunnel.server")

FIRST_BYTES_TIMEOUT = 10.0
#: seconds between two looks at where the live tunnels' peers are now (a keyless splice conversation from a host
#: no tunnel came from, :meth:`Server.admits_conversation_from`)
MOVED_LOOKUP = 1.0


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    listen: Sequence[Endpoint]
    security: SecurityConfig
    target: str | None = None
    policy: ExitPolicy = field(default_factory=ExitPolicy)
    websocks_users: Mapping[str, str] = field(default_factory=dict)
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    connect_timeout: float = 10.0
    drain_timeout: float = 10.0
    idle_timeout: float | None = None
    #: seconds a WebSocks client has for its upgrade and its SOCKS5 request
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    #: IP mode (``--tun CIDR``): agents' ``tun`` streams are switched through a TUN device (docs/tun.md)
    tun: TunServerSettings | None = None


def _address_text(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


class Server:
    def __init__(self, settings: ServerSettings, *, stats: ProcessStats | None = None) -> None:
        if not settings.listen:
            raise ValueError("the server needs at least one --listen URL")
        for endpoint in settings.listen:  # an unknown scheme or a bad option is an error now, not at serve
            if endpoint.scheme not in WEBSOCKS_SCHEMES:
                get_transport(endpoint.scheme).check(endpoint)
        self.settings = settings
        self.dialer = Dialer(settings.policy, connect_timeout=settings.connect_timeout)
        # the operator's own --target is trusted: the exit policy governs what clients ask for, not it
        self.target_dialer = Dialer(ExitPolicy(allow_private=True), connect_timeout=settings.connect_timeout)
        #: what the metrics read (``--metrics``), or None
        self.stats = stats
        if stats is not None:
            stats.watch_dialer(self.dialer)
            stats.watch_dialer(self.target_dialer)
        self.tunnels: set[TunnelConnection] = set()
        #: the key each tunnel's peer authenticated with (tunnels with a key)
        self._keys_used: dict[TunnelConnection, UserKey] = {}
        self.tun: TunSwitch | None = None
        self._config = settings.tunnel
        if settings.tun is not None:
            from vtunnel.apps.tun import TunSwitch

            self.tun = TunSwitch(settings.tun, settings.policy)
            self._config = dataclasses.replace(settings.tunnel, tun=True)
        #: tunnel listeners (yielding links) and WebSocks listeners (yielding byte streams)
        self.listeners: list[Listener[Link] | Listener[ByteStream]] = []
        self.local_addresses: list[str] = []
        #: lite-tls splice mode: where dedicated connections meet their streams (a listen URL with splice=PORT)
        self.tickets = TicketBook() if any(splice_port(e) is not None for e in settings.listen) else None
        #: where the splice ports listen (``host:port``), and the port of each listen URL's (its tunnels announce it)
        self.splice_addresses: list[str] = []
        self._splice_ports: dict[int, int] = {}
        #: the hosts the server's tunnels came from, with their number: a keyless conversation of splice mode
        #: (kcp://, rudp://) starts only from one of them, or from where a tunnel's peer is now
        #: (:meth:`admits_conversation_from`; docs/security.md, "lite-tls splice mode")
        self._tunnel_hosts: collections.Counter[str] = collections.Counter()
        #: the hosts the live tunnels' peers were at when last looked (a peer that moved since it came), and when
        self._moved_hosts: frozenset[str] = frozenset()
        self._moved_read = -math.inf
        self._serial = 0
        #: the event loop's socket watcher, looked up once when serving starts (not once per relayed stream)
        self._watcher: SocketWatcher | None = None
        self._stopping = anyio.Event()
        self._no_tunnels = anyio.Event()
        self._no_tunnels.set()

    async def serve(self, *, task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until :meth:`shutdown` finishes draining."""
        if self.tun is not None:
            await self.tun.start()
        try:
            await self._serve(task_status)
        finally:
            if self.tun is not None:
                self.tun.close()

    async def _serve(self, task_status: TaskStatus[list[str]]) -> None:
        self._watcher = watcher_for()
        handlers: list[Callable[[Any], Awaitable[None]]] = []
        for index, endpoint in enumerate(self.settings.listen):
            if endpoint.scheme in WEBSOCKS_SCHEMES:
                # WebSocks clients, no tunnel: the connections of a tcp:// or tls:// listener without a key
                carrier = carrier_endpoint(endpoint)
                listener: Listener[Link] | Listener[ByteStream] = await carrier_transport(
                    carrier
                ).serve_streams(carrier)
                handlers.append(self._handle_websocks)
            else:
                listener = await get_transport(endpoint.scheme).listen(
                    endpoint, security=self.settings.security
                )
                handlers.append(
                    functools.partial(
                        self._handle_tunnel,
                        endpoint.scheme,
                        splice=index if splice_port(endpoint) is not None else None,
                    )
                )
                if self.stats is not None:
                    self.stats.watch_listener(endpoint.scheme, listener)
            self.listeners.append(listener)
            local = _address_text(listener.extra(SocketAttribute.local_address, endpoint.hostport))
            self.local_addresses.append(f"{endpoint.scheme}://{local}")
            log.info(
                "listening",
                url=f"{endpoint.scheme}://{local}",
                target=self.settings.target,
                secure=not self.settings.security.insecure,
            )
        try:
            async with anyio.create_task_group() as tg:
                accepting: list[anyio.CancelScope] = []

                async def accept_on(
                    listener: Listener[Any], handler: Callable[[Any], Awaitable[None]]
                ) -> None:
                    with anyio.CancelScope() as scope:
                        accepting.append(scope)
                        await listener.serve(handler, tg)

                if self.tickets is not None:  # (before any tunnel: each announces its listener's splice port)
                    for index, endpoint in enumerate(self.settings.listen):
                        port = splice_port(endpoint)
                        if port is not None:
                            address = await tg.start(
                                functools.partial(
                                    serve_splice_port,
                                    endpoint,
                                    port,
                                    self.tickets,
                                    admit=self.admits_conversation_from,
                                )
                            )
                            self.splice_addresses.append(address)
                            self._splice_ports[index] = int(address.rpartition(":")[2])
                for listener, handler in zip(self.listeners, handlers, strict=True):
                    tg.start_soon(accept_on, listener, handler)
                task_status.started(self.local_addresses)
                await self._stopping.wait()
                for listener in self.listeners:  # a datagram listener answers no new handshake from now on
                    stop_accepting = listener.extra(ListenerAttribute.stop_accepting, None)
                    if stop_accepting is not None:
                        stop_accepting()
                for scope in accepting:
                    scope.cancel()
                await anyio.lowlevel.checkpoint()
                for conn in list(self.tunnels):
                    conn.shutdown("server shutting down", graceful=True)
                with anyio.move_on_after(self.settings.drain_timeout):
                    await self._no_tunnels.wait()
                if self.tunnels:
                    log.warning("drain timeout: closing remaining tunnels", tunnels=len(self.tunnels))
                # listeners close only now: a datagram transport's sessions live on its listener's socket
                for listener in self.listeners:
                    await listener.aclose()
                tg.cancel_scope.cancel()
        finally:  # cancelled rather than shut down: the listening sockets are closed all the same
            with anyio.CancelScope(shield=True):
                for listener in self.listeners:
                    with contextlib.suppress(Exception):
                        await listener.aclose()

    def shutdown(self) -> None:
        """Stop accepting, send GOAWAY on every tunnel and let open streams finish (bounded by drain_timeout)."""
        self._stopping.set()

    def reload_keys(self, keys: KeySet) -> list[str]:
        """Accept ``keys`` from now on, on every listener; cut the tunnels whose peer's key is not among them any
        more (a user removed, or given a new key): GOAWAY, then closed, their streams reset. Everyone else's
        tunnels go on. Returns the names of the users whose tunnels were cut.

        What SIGHUP calls (through the command's reload, which reads the key files). Raises ``ValueError`` for a
        server that holds no key ring (no key, or a ``psk`` of its own).
        """
        ring = self.settings.security.keys
        if ring is None:
            raise ValueError("this server has no key ring to reload")
        before = ring.current
        ring.replace(keys)
        cut = [(conn, used) for conn, used in self._keys_used.items() if used not in keys]
        for conn, _ in cut:
            conn.shutdown("key revoked", graceful=False)
        users = sorted({used.user for _, used in cut})
        log.info(
            "keys reloaded",
            users=len(keys),
            added=sorted(set(keys.users) - set(before.users)),
            removed=sorted(set(before.users) - set(keys.users)),
            tunnels_cut=len(cut),
            cut_users=users,
        )
        return users

    def admits_conversation_from(self, host: str) -> bool:
        """Whether a keyless conversation of splice mode (kcp://, rudp://) may start from ``host``: one of the live
        tunnels came from it, or a tunnel's peer is there now (it moved since: a NAT rebinding, rudp's migration).
        Where the peers are now is looked up at most once per :data:`MOVED_LOOKUP` seconds, so a flood from
        strangers costs one pass over the tunnels per period, not one per datagram."""
        if host in self._tunnel_hosts:
            return True
        if host in self._moved_hosts:
            return True
        now = time.monotonic()
        if now - self._moved_read < MOVED_LOOKUP:
            return False
        self._moved_read = now
        self._moved_hosts = _hosts_now(self.tunnels)
        return host in self._moved_hosts

    async def _handle_tunnel(self, transport: str, link: Link, *, splice: int | None = None) -> None:
        """Run the tunnel of ``link`` (a ``transport`` listener's); ``splice``: that listener's place in the listen
        URLs, when it has a splice port: its lite-tls streams may leave over dedicated connections, and the tunnel
        announces the port."""
        self._serial += 1
        used = link.user()
        ring = self.settings.security.keys
        if used is not None and ring is not None and used not in ring.current:
            # authenticated before a reload revoked the key, started after it
            log.info("tunnel of a revoked key refused", user=used.user, transport=transport)
            await link.aclose()
            return
        port = self._splice_ports.get(splice) if splice is not None else None
        conn = TunnelConnection(
            link,
            role=Role.SERVER,
            config=self._config if port is None else dataclasses.replace(self._config, splice_port=port),
            handler=self._handle_stream,
            name=f"t{self._serial}",
            user=used.user if used is not None else None,
            lite_tls_spliced=splice is not None,
        )
        if used is not None:
            self._keys_used[conn] = used
        conn.log.info("tunnel accepted", transport=transport)
        self.tunnels.add(conn)
        host = _host_of(link)
        if host is not None:
            self._tunnel_hosts[host] += 1
        if self._no_tunnels.is_set():
            self._no_tunnels = anyio.Event()
        if self.stats is not None:
            self.stats.tunnel_started(conn, transport)
        try:
            await conn.run()
        finally:
            if self.stats is not None:
                self.stats.tunnel_ended(conn)
            self._keys_used.pop(conn, None)
            self.tunnels.discard(conn)
            if host is not None:
                self._tunnel_hosts[host] -= 1
                if not self._tunnel_hosts[host]:
                    del self._tunnel_hosts[host]
            if not self.tunnels:
                self._no_tunnels.set()

    async def _handle_websocks(self, stream: ByteStream) -> None:
        """One connection of a WebSocks listener: one WebSocks client."""
        await serve_websocks(
            StreamLeg(stream),
            b"",
            users=self.settings.websocks_users,
            dialer=self.dialer,
            handshake_timeout=self.settings.handshake_timeout,
        )

    def _handle_stream(self, stream: TunnelStream) -> Awaitable[None] | None:
        """A stream the agent opened, in the tunnel's input step: a TCP stream to an address is dialed and relayed
        at once, without a task (unless the connection is not made within the call); what has to wait (a name to
        resolve, UDP, WebSocks) is returned for the connection to run in a task."""
        md = stream.metadata
        if self.stats is not None:  # (an agent with lite-tls on opens every TCP stream as a lite-tls one)
            self.stats.stream_opened(None if md is None else "tcp" if md.kind == "lite-tls" else md.kind)
        if md is not None and md.kind == "tun" and self.tun is not None:
            self.tun.serve(stream)
            return None
        if md is not None and md.authority:
            if md.kind == "udp":
                return self._serve_udp(stream)
            authority, dialer = md.authority, self.dialer
        elif self.settings.target:
            authority, dialer = self.settings.target, self.target_dialer
        else:
            return self._serve_websocks(stream)
        # A TCP destination: the socket's protocol does the copying and closes both ends when it is over, so an
        # open stream holds no task at all.
        try:
            started = dialer.start_dial(authority)
        except DialError as exc:
            self._refuse(stream, authority, exc)
            return None
        if started is None or not started[1]:
            return self._dial_and_relay(stream, authority, dialer, None if started is None else started[0])
        self._relay(stream, authority, started[0])
        return None

    async def _dial_and_relay(
        self, stream: TunnelStream, authority: str, dialer: Dialer, connecting: socket.socket | None
    ) -> None:
        """The rest of :meth:`_handle_stream` when the connection takes a wait: a name to resolve, or a connect
        in progress (``connecting``)."""
        try:
            if connecting is None:
                sock = await dialer.dial_socket(authority)
            else:
                sock = await dialer.finish_dial(connecting, authority)
        except DialError as exc:
            self._refuse(stream, authority, exc)
            return
        self._relay(stream, authority, sock)

    def _refuse(self, stream: TunnelStream, authority: str, exc: DialError) -> None:
        log.info(
            "destination refused",
            tunnel=stream.tunnel_name,
            stream=stream.stream_id,
            destination=authority,
            error=exc.error,
        )
        stream.refuse(exc.error)

    def _relay(self, stream: TunnelStream, authority: str, sock: socket.socket) -> None:
        """Accept ``stream`` and relay it to the connected ``sock``."""
        end = SocketEnd()
        try:
            attach_socket(sock, end, self._watcher)
        except BaseException:
            sock.close()
            raise
        try:
            if self.tickets is not None:
                offer_dedicated(self.tickets, stream)
            stream.accept()
        except BaseException:
            end.close()
            raise
        log.debug("relaying", tunnel=stream.tunnel_name, stream=stream.stream_id, destination=authority)
        Relay(TunnelEnd(stream), end, idle_timeout=self.settings.idle_timeout)

    async def _serve_udp(self, stream: TunnelStream) -> None:
        from vtunnel.apps.udprelay import serve_udp_stream

        stream.accept()
        await serve_udp_stream(TunnelByteStream(stream), self.dialer)

    async def _serve_websocks(self, stream: TunnelStream) -> None:
        stream.accept()
        async with TunnelByteStream(stream) as reader:  # closed on return, unless a relay has it
            await self._serve_websocks_on(reader)

    async def _serve_websocks_on(self, reader: TunnelByteStream) -> None:
        stream = reader.stream
        first = b""
        with anyio.move_on_after(FIRST_BYTES_TIMEOUT):
            while True:
                try:
                    first += await reader.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                verdict = classify_websocks(first)
                if verdict is None and len(first) < 16384:
                    continue
                if verdict:
                    await serve_websocks(
                        TunnelLeg(reader),
                        first,
                        users=self.settings.websocks_users,
                        dialer=self.dialer,
                        handshake_timeout=self.settings.handshake_timeout,
                    )
                else:
                    log.info(
                        "stream has no destination and is not WebSocks: reset",
                        tunnel=stream.tunnel_name,
                        stream=stream.stream_id,
                    )
                    stream.refuse("failed")
                return
        stream.refuse("timeout")


def _hosts_now(tunnels: Iterable[TunnelConnection]) -> frozenset[str]:
    return frozenset(host for conn in tunnels if (host := _host_of(conn.link)) is not None)


def _host_of(link: Link) -> str | None:
    """The IP address a link's peer is at (None where it has none: a memory link in tests, a Unix socket)."""
    address = link.extra(SocketAttribute.remote_address, None)
    return str(address[0]) if isinstance(address, tuple) and address else None
