"""Client side: keep tunnels to one server up, reconnect when they die, hand out streams round-robin.

A :class:`TunnelPool` holds ``size`` tunnels (kcptun's ``--conn``). Each slot connects, runs its tunnel until it
dies, then reconnects with capped exponential backoff (full jitter), so a server restart or a network change is
followed by a fresh tunnel within a couple of seconds rather than a session that never recovers.
"""

from __future__ import annotations

import random
import time
from typing import Protocol

import anyio
import structlog
from anyio.abc import TaskGroup

from vtunnel.protocol import Role, StreamMetadata, TunnelConfig
from vtunnel.runtime.connection import TunnelConnection
from vtunnel.runtime.errors import TunnelUnavailable
from vtunnel.runtime.tunnel_stream import TunnelStream
from vtunnel.transports.base import Endpoint, SecurityConfig, get_transport

__all__ = ["Backoff", "TunnelPool", "TunnelWatch"]

log = structlog.get_logger("vtunnel.session")


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


class TunnelPool:
    def __init__(
        self,
        server: Endpoint,
        *,
        security: SecurityConfig,
        config: TunnelConfig | None = None,
        size: int = 1,
        backoff_cap: float = 2.0,
        watch: TunnelWatch | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a tunnel pool needs at least one tunnel")
        self.server = server
        self.security = security
        self.config = config or TunnelConfig()
        self.size = size
        self.backoff_cap = backoff_cap
        self.watch = watch
        self.transport = get_transport(server.scheme)
        self.transport.check(server)
        self._slots: list[TunnelConnection | None] = [None] * size
        self._next = 0
        self._changed = anyio.Event()
        self._stopping = False

    @property
    def connections(self) -> list[TunnelConnection]:
        return [c for c in self._slots if c is not None and c.accepting_streams]

    async def run(self, task_group: TaskGroup) -> None:
        """Start the slots in ``task_group`` (returns at once)."""
        for i in range(self.size):
            task_group.start_soon(self._slot, i, name=f"tunnel-slot-{i}")

    async def _slot(self, index: int) -> None:
        backoff = Backoff(cap=self.backoff_cap)
        slog = log.bind(server=str(self.server), slot=index)
        while not self._stopping:
            started = time.monotonic()
            try:
                link = await self.transport.connect(self.server, security=self.security)
            except Exception as exc:
                delay = backoff.next_delay()
                slog.warning("connect failed", error=str(exc) or repr(exc), retry_in=round(delay, 2))
                await anyio.sleep(delay)
                continue
            conn = TunnelConnection(link, role=Role.CLIENT, config=self.config, name=f"{self.server}#{index}")
            if self.watch is not None:
                self.watch.tunnel_started(conn, self.server.scheme)
            async with anyio.create_task_group() as tg:
                tg.start_soon(conn.run)
                try:
                    with anyio.fail_after(self.config.handshake_timeout + 1):
                        await conn.wait_ready()
                except (TunnelUnavailable, TimeoutError) as exc:
                    slog.warning("tunnel handshake failed", error=str(exc) or "timeout")
                    conn.shutdown("handshake failed", graceful=False)
                    tg.cancel_scope.cancel()
                else:
                    slog.info("tunnel up", extensions=str(conn.tunnel.extensions))
                    self._slots[index] = conn
                    self._notify()
                    await conn.wait_closed()
                    slog.warning("tunnel down", reason=conn.close_reason)
                    self._slots[index] = None
                    self._notify()
            if self.watch is not None:
                self.watch.tunnel_ended(conn)
            if time.monotonic() - started > 10:
                backoff.reset()
            if not self._stopping:
                await anyio.sleep(backoff.next_delay())

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_ready(self, timeout: float) -> TunnelConnection:
        with anyio.move_on_after(timeout):
            while True:
                conns = self.connections
                if conns:
                    self._next = (self._next + 1) % len(conns)
                    return conns[self._next]
                await self._changed.wait()
        raise TunnelUnavailable(f"no tunnel to {self.server} within {timeout:g} s")

    async def open_stream(
        self, metadata: StreamMetadata | None = None, *, wait_accepted: bool = True, timeout: float = 10.0
    ) -> TunnelStream:
        conn = await self.wait_ready(timeout)
        return await conn.open_stream(metadata, wait_accepted=wait_accepted)

    def shutdown(self, reason: str = "agent shutting down") -> None:
        self._stopping = True
        for conn in self._slots:
            if conn is not None:
                conn.shutdown(reason, graceful=True)
