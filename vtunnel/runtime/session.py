"""Client side: keep a pool of tunnels up over one or several servers, fail over, fall back, hand out streams.

A :class:`TunnelPool` holds ``size`` tunnels (kcptun's ``--conn``), each kept by a *slot*: the slot picks a server,
connects, runs the tunnel until it takes no more streams (it died, or a GOAWAY said the server is going), then
picks again. The servers' order and priority (docs/agent.md, "Several servers"):

* **Tiers.** Servers whose transport runs over UDP (``kcp://``, ``rudp://``: :attr:`Transport.over_udp`) come
  first, the others (``tls://``, ``tcp://``, plugins) are the fallback: a slot takes a fallback server only while
  no UDP server can be had, as when UDP is blocked and their handshakes time out.
* **In a tier**, a new tunnel goes to the server holding the fewest of the pool's tunnels (held or being made),
  ties to the one given first: one tunnel goes to the first server, ``size`` tunnels spread over the tier.
* **Health** is the tunnel's own: a server is good while its tunnels answer the keepalive PINGs, and a server
  without a tunnel is probed with the tunnel's handshake (connect, SETTINGS, GOAWAY) every ``probe_interval``.
  A server whose connect or handshake failed, or whose tunnel died without a GOAWAY, is left alone for a
  backoff delay (0.1 to 0.2 s, doubling up to ``backoff_cap``, with full jitter); the slot picks another at once,
  so new streams go to another server as soon as a tunnel there is up.
* **Back to the preferred tier.** A slot holding a fallback tunnel moves once a probe found a better server
  answering: it opens a tunnel there first, then retires the old one with a GOAWAY (its streams finish).

Streams are spread round-robin over the tunnels that take streams. One server behaves as before: reconnect with
backoff after a tunnel died.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import structlog
from anyio.abc import TaskGroup

from vtunnel.protocol import Role, StreamMetadata, TunnelConfig
from vtunnel.runtime.connection import TunnelConnection
from vtunnel.runtime.errors import TunnelUnavailable
from vtunnel.runtime.tunnel_stream import TunnelStream
from vtunnel.transports.base import Endpoint, SecurityConfig, Transport, get_transport

__all__ = ["Backoff", "ServerState", "TunnelPool", "TunnelWatch"]

log = structlog.get_logger("vtunnel.session")

#: a tunnel that lived this long resets its server's backoff when it ends
STABLE_AFTER = 10.0


class TunnelWatch(Protocol):
    """Told of every tunnel a pool (or a server) runs, from its start to its end (the metrics keep count)."""

    def tunnel_started(self, conn: TunnelConnection, transport: str) -> None:
        """``conn`` runs over a link of ``transport`` (its scheme)."""

    def tunnel_ended(self, conn: TunnelConnection) -> None:
        """``conn`` has closed (its counters are final)."""


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, *, initial: float = 0.2, cap: float = 2.0, factor: float = 2.0) -> None:
        if initial <= 0 or cap < initial or factor < 1:
            raise ValueError("backoff needs 0 < initial <= cap and factor >= 1")
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * self.factor**self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


@dataclass(eq=False, kw_only=True, slots=True)
class ServerState:
    """One of the pool's servers: what the slots and the prober know of it."""

    endpoint: Endpoint
    #: its place in the list the pool was given
    index: int
    transport: Transport
    #: 0: over UDP, tried first; 1: the fallback
    tier: int
    backoff: Backoff
    #: connects (slots' and probes') under way
    connecting: int = 0
    #: not tried again before this (monotonic seconds): set after a failure
    retry_at: float = 0.0
    #: failures in a row, the last one's reason
    failures: int = 0
    last_error: str = ""
    #: the last connect or handshake with it succeeded (None: never tried)
    answered: bool | None = None
    #: the prober's next look at it, while it holds no tunnel
    probe_at: float = 0.0
    #: tunnels to it that died without a GOAWAY, and connects or handshakes that failed
    failures_total: int = 0

    @property
    def name(self) -> str:
        return str(self.endpoint)


@dataclass(eq=False, slots=True)
class _Held:
    conn: TunnelConnection
    server: ServerState
    since: float = field(default_factory=time.monotonic)


class TunnelPool:
    def __init__(
        self,
        servers: Sequence[Endpoint],
        *,
        security: SecurityConfig,
        config: TunnelConfig | None = None,
        size: int = 1,
        backoff_cap: float = 2.0,
        connect_timeout: float = 15.0,
        probe_interval: float = 10.0,
        watch: TunnelWatch | None = None,
        lite_tls_spliced: Callable[[Endpoint], bool] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a tunnel pool needs at least one tunnel")
        if not servers:
            raise ValueError("a tunnel pool needs at least one server")
        if connect_timeout <= 0 or probe_interval <= 0:
            raise ValueError("connect_timeout and probe_interval must be positive")
        self.security = security
        self.config = config or TunnelConfig()
        self.size = size
        self.backoff_cap = backoff_cap
        self.connect_timeout = connect_timeout
        self.probe_interval = probe_interval
        self.watch = watch
        #: whether the lite-tls streams of a tunnel to a server may leave over dedicated connections
        #: (``TunnelConnection``'s ``lite_tls_spliced``); None: no server's
        self.lite_tls_spliced = lite_tls_spliced
        self.servers: list[ServerState] = []
        for index, endpoint in enumerate(servers):
            transport = get_transport(endpoint.scheme)
            transport.check(endpoint)
            self.servers.append(
                ServerState(
                    endpoint=endpoint,
                    index=index,
                    transport=transport,
                    tier=0 if transport.over_udp else 1,
                    backoff=Backoff(initial=min(0.2, backoff_cap), cap=backoff_cap),
                )
            )
        #: the best tier given: a slot on a worse one is on the fallback
        self._best_tier = min(s.tier for s in self.servers)
        self._slots: list[_Held | None] = [None] * size
        self._next = 0
        self._changed = anyio.Event()
        self._stopping = False
        self._task_group: TaskGroup | None = None

    @property
    def connections(self) -> list[TunnelConnection]:
        return [h.conn for h in self._slots if h is not None and h.conn.accepting_streams]

    async def run(self, task_group: TaskGroup) -> None:
        """Start the slots (and, with several servers, the prober) in ``task_group`` (returns at once)."""
        self._task_group = task_group
        for i in range(self.size):
            task_group.start_soon(self._slot, i, name=f"tunnel-slot-{i}")
        if len(self.servers) > 1:
            task_group.start_soon(self._probe_loop, name="tunnel-server-probes")

    # --- choosing ---------------------------------------------------------------------------------------------

    def tunnels_to(self, server: ServerState) -> int:
        """Tunnels the slots hold to ``server`` now."""
        return sum(1 for h in self._slots if h is not None and h.server is server)

    def _load(self, server: ServerState) -> int:
        return server.connecting + self.tunnels_to(server)

    def _pick(self, *, below_tier: int | None = None, answered: bool = False) -> ServerState | None:
        """The server a new tunnel goes to now: the best tier, the least loaded, the first given; only servers
        out of their backoff (and, with ``answered``, whose last handshake succeeded)."""
        now = time.monotonic()
        candidates = [
            s
            for s in self.servers
            if s.retry_at <= now
            and (below_tier is None or s.tier < below_tier)
            and (not answered or s.answered)
        ]
        return min(candidates, key=lambda s: (s.tier, self._load(s), s.index), default=None)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    # --- slots ------------------------------------------------------------------------------------------------

    async def _slot(self, index: int) -> None:
        while not self._stopping:
            server = self._pick()
            if server is None:
                await self._wait_for_retry()
                continue
            conn = await self._connect(server, f"{index}")
            if conn is not None:
                await self._hold(index, _Held(conn, server))

    async def _wait_for_retry(self) -> None:
        """Sleep until the first server is out of its backoff (or something changed)."""
        delay = min(s.retry_at for s in self.servers) - time.monotonic()
        with anyio.move_on_after(max(delay, 0.0)):
            await self._changed.wait()

    async def _connect(self, server: ServerState, label: str) -> TunnelConnection | None:
        """A ready tunnel to ``server``, or None (the server is left for its backoff delay, and the failure
        logged)."""
        slog = log.bind(server=server.name, slot=label)
        server.connecting += 1
        try:
            try:
                with anyio.fail_after(self.connect_timeout):
                    link = await server.transport.connect(server.endpoint, security=self.security)
            except Exception as exc:
                self._failed(server, f"connect failed: {_describe(exc)}", slog)
                return None
            conn = TunnelConnection(
                link,
                role=Role.CLIENT,
                config=self.config,
                name=f"{server.endpoint}#{label}",
                lite_tls_spliced=self.lite_tls_spliced is not None and self.lite_tls_spliced(server.endpoint),
                server=server.endpoint,
            )
            if self.watch is not None:
                self.watch.tunnel_started(conn, server.endpoint.scheme)
            assert self._task_group is not None
            self._task_group.start_soon(self._run_tunnel, conn, name=f"tunnel-{label}")
            try:
                with anyio.fail_after(self.config.handshake_timeout + 1):
                    await conn.wait_ready()
            except (TunnelUnavailable, TimeoutError) as exc:
                conn.shutdown("handshake failed", graceful=False)
                self._failed(server, f"tunnel handshake failed: {_describe(exc)}", slog)
                return None
        finally:
            server.connecting -= 1
        if server.failures:
            slog.info("server answers again", after_failures=server.failures)
        server.failures = 0
        server.answered = True
        return conn

    async def _run_tunnel(self, conn: TunnelConnection) -> None:
        try:
            await conn.run()
        finally:
            if self.watch is not None:
                self.watch.tunnel_ended(conn)

    def _failed(self, server: ServerState, reason: str, slog: Any) -> None:
        delay = server.backoff.next_delay()
        server.retry_at = time.monotonic() + delay
        server.failures += 1
        server.failures_total += 1
        server.last_error = reason
        server.answered = False
        after = self._pick()
        slog.warning(
            "server unavailable",
            reason=reason,
            retry_in=round(delay, 2),
            failures=server.failures,
            next=after.name if after is not None else None,
        )
        self._notify()

    async def _hold(self, index: int, held: _Held) -> None:
        """Keep ``held`` in slot ``index`` until it takes no more streams; on a fallback tier, move to a better
        server once one answers."""
        self._slots[index] = held
        self._announce(index, held)
        try:
            while True:
                if held.server.tier == self._best_tier:
                    await held.conn.wait_retired()
                else:
                    await _first_of(held.conn.wait_retired, self._changed.wait)
                if not held.conn.accepting_streams:
                    break
                better = self._pick(below_tier=held.server.tier, answered=True)
                if better is None:
                    continue
                conn = await self._connect(better, f"{index}")
                if conn is None:
                    continue
                old = held
                held = _Held(conn, better)
                self._slots[index] = held
                self._announce(index, held, replacing=old.server)
                old.conn.shutdown("a preferred server answers again", graceful=True)
        finally:
            if self._slots[index] is held:
                self._slots[index] = None
            self._notify()
        self._ended(index, held)

    def _announce(self, index: int, held: _Held, *, replacing: ServerState | None = None) -> None:
        fallback = held.server.tier > self._best_tier
        log.info(
            "tunnel up",
            server=held.server.name,
            slot=index,
            extensions=str(held.conn.tunnel.extensions),
            **({"fallback": True} if fallback else {}),
            **({"moved_from": replacing.name} if replacing is not None else {}),
        )
        if fallback:
            log.warning(
                "using a fallback server: no UDP server answers",
                server=held.server.name,
                slot=index,
                unanswered=[s.name for s in self.servers if s.tier < held.server.tier],
            )
        self._notify()

    def _ended(self, index: int, held: _Held) -> None:
        """The slot's tunnel takes no more streams. Its server is left for its backoff delay either way, so the
        next tunnel goes to another server if there is one: after a GOAWAY (the server is going away, or
        reloading) without counting a failure, after a tunnel that died as one."""
        if self._stopping:
            return
        server = held.server
        if time.monotonic() - held.since > STABLE_AFTER:
            server.backoff.reset()
        slog = log.bind(server=server.name, slot=index)
        if held.conn.closed:
            self._failed(server, f"tunnel down: {held.conn.close_reason}", slog)
            return
        delay = server.backoff.next_delay()
        server.retry_at = time.monotonic() + delay
        slog.info("tunnel retired: the server is going away", retry_in=round(delay, 2))
        self._notify()

    # --- probes -----------------------------------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        """Every ``probe_interval``, a handshake with each server no slot holds a tunnel to (nor is connecting
        to), so the slots know which answer: a fallback slot moves when a better one does."""
        now = time.monotonic()
        for server in self.servers:
            server.probe_at = now + self.probe_interval
        while not self._stopping:
            now = time.monotonic()
            due = [s for s in self.servers if s.probe_at <= now and s.retry_at <= now and self._load(s) == 0]
            for server in due:
                server.probe_at = now + self.probe_interval
                assert self._task_group is not None
                self._task_group.start_soon(self._probe, server, name="tunnel-server-probe")
            # a server a slot leaves is looked at within a second
            wake = min(
                (max(s.probe_at, s.retry_at) for s in self.servers if self._load(s) == 0), default=now + 1.0
            )
            await anyio.sleep(min(max(wake - time.monotonic(), 0.05), 1.0))

    async def _probe(self, server: ServerState) -> None:
        conn = await self._connect(server, "probe")
        if conn is None:
            return
        log.debug("server answers a probe", server=server.name)
        conn.shutdown("probe done", graceful=True)
        server.probe_at = time.monotonic() + self.probe_interval
        self._notify()

    # --- streams ----------------------------------------------------------------------------------------------

    def _next_connection(self) -> TunnelConnection | None:
        """The next tunnel taking streams, in turn (None: none is up now). Called for every stream opened: it
        walks the slots from the last one used and builds nothing."""
        slots = self._slots
        count = len(slots)
        at = self._next
        for _ in range(count):
            at = at + 1 if at + 1 < count else 0
            held = slots[at]
            if held is not None and held.conn.accepting_streams:
                self._next = at
                return held.conn
        return None

    async def wait_ready(self, timeout: float) -> TunnelConnection:
        conn = self._next_connection()
        if conn is not None:
            return conn
        with anyio.move_on_after(timeout):
            while True:
                conn = self._next_connection()
                if conn is not None:
                    return conn
                await self._changed.wait()
        names = ", ".join(s.name for s in self.servers)
        raise TunnelUnavailable(f"no tunnel to {names} within {timeout:g} s")

    async def open_stream(
        self, metadata: StreamMetadata | None = None, *, wait_accepted: bool = True, timeout: float = 10.0
    ) -> TunnelStream:
        conn = await self.wait_ready(timeout)
        return await conn.open_stream(metadata, wait_accepted=wait_accepted)

    def start_stream(self, metadata: StreamMetadata | None = None) -> TunnelStream | None:
        """A stream (0-RTT, not waiting for its SYN-ACK) of a tunnel that takes streams now, without a task; None
        when none does (:meth:`open_stream` waits for one)."""
        conn = self._next_connection()
        return None if conn is None else conn.start_stream(metadata)

    def shutdown(self, reason: str = "agent shutting down") -> None:
        self._stopping = True
        for held in self._slots:
            if held is not None:
                held.conn.shutdown(reason, graceful=True)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timeout"
    return str(exc) or repr(exc)


async def _first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return once the first of ``waits`` returns."""
    async with anyio.create_task_group() as tg:

        async def one(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            tg.cancel_scope.cancel()

        for wait in waits:
            tg.start_soon(one, wait)
