"""Datagram codecs, the typed interfaces: what a listener or a client does to the datagrams of its UDP socket
before its ARQ sees them. Two exist: :mod:`.plain` (KCP's datagrams as they are) and :mod:`.sealed` (sealed by
:mod:`vtunnel.security.datagram`).

A codec says how a datagram is opened (and authenticated), what keys a session, whether a session may follow its
peer to a new address now, and what a datagram for no session does (a handshake, a stateless reset). The session
table is not the codec's: :class:`~.routing.DatagramListener` finds, starts and forgets sessions, keeps the
tombstones and the session limit, and moves a session where its codec says the peer is, for every codec alike.
Neither the routing nor the sealed codec reads KCP: they see a session as a :class:`RoutedLink`, which vets its
ARQ's datagrams itself, so a second ARQ over UDP (``rudp://``) reuses both with a link of its own and writes only
its plain codec (what keys a session, what shows a datagram newer: read from its ARQ's header).
"""

from __future__ import annotations

import asyncio
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Final, Generic, TypeAlias, TypeVar

import anyio
from anyio.abc import SocketAttribute

from vtunnel.io.datagrams import Address, CoalescingSocket, Run, Segments, split_run
from vtunnel.security.keys import UserKey
from vtunnel.transports.link import Link, LinkConsumer, Refusals

__all__ = [
    "LINGER",
    "TIMER_SLACK",
    "ArqLink",
    "ClientCodec",
    "Datagram",
    "ListenerCodec",
    "RoutedLink",
    "Runs",
    "Sealer",
    "Send",
    "Stray",
    "Transmit",
    "take_each",
    "transmitter",
]

#: one datagram: a whole buffer, or a view of one datagram of a run
Datagram: TypeAlias = bytes | memoryview
#: seals a batch of the ARQ's datagrams: one wire datagram for each, in order, back to back in runs of one
#: segmented send each (:data:`~vtunnel.io.datagrams.Segments`)
Sealer: TypeAlias = Callable[[list[bytes]], list[Segments]]
#: sends one datagram to an address (what a codec answers with: handshake replies, challenges, resets)
Send: TypeAlias = Callable[[bytes, Address], None]
#: a session's output: sends a batch of its ARQ's datagrams to an address
Transmit: TypeAlias = Callable[[list[bytes], Address], None]
#: runs of one session's datagrams: ``(buffer, segment)`` (see :data:`~vtunnel.io.datagrams.Run`)
Runs: TypeAlias = list[tuple[bytes, int]]
#: where a datagram that a codec could not open in its batch goes (routed on its own)
Stray: TypeAlias = Callable[[Datagram], None]

K = TypeVar("K", bound=Hashable)


class RoutedLink(Link):
    """A link a datagram listener routes to: where its peer is, vetting of its ARQ's datagrams, input and
    failure."""

    #: where the session sends; the listener moves it when its codec says the peer moved
    remote_address: Address
    #: whose key the peer authenticated with (the listener sets it from its codec; None without a key)
    peer_user: UserKey | None = None

    def user(self) -> UserKey | None:
        return self.peer_user

    @abstractmethod
    def accepts(self, datagram: Datagram) -> bool:
        """Whether ``datagram`` is a valid datagram of this session's ARQ."""

    @abstractmethod
    def take_run(self, buffer: bytes, segment: int, into: list[Datagram]) -> bool:
        """Add a run of this session's datagrams (``segment`` bytes each) to ``into``, as the ARQ takes them;
        False, adding nothing, when some datagram of the run is not valid."""

    @abstractmethod
    def feed(self, datagrams: Sequence[Datagram]) -> None:
        """Input one batch of vetted datagrams."""

    @abstractmethod
    def fail(self, reason: str) -> None:
        """End the session: its consumer sees it broken."""


#: seconds ``aclose`` waits for what was sent to be acknowledged before a session is torn down
LINGER: Final = 1.0
#: a deadline within this of the armed one does not re-arm the timer
TIMER_SLACK: Final = 0.0005


class ArqLink(RoutedLink):
    """What the link of every ARQ session (KCP, rudp) shares: its loop and addresses, its one timer, the waiters
    of ``aclose``'s linger, the end of ``run``, the watchdog's clock, and the steps of tearing down.

    A subclass implements the ARQ's own part: ``feed``, ``send_nowait``, its output step, and ``_on_timer``.
    """

    def __init__(
        self,
        *,
        transmit: Transmit,
        local_address: Address,
        remote_address: Address,
        period: float,
        now: float,
    ) -> None:
        """``now``: the time on the clock the subclass gives its ARQ (the watchdog and ``last_receive`` read it)."""
        self._transmit = transmit
        self._loop = asyncio.get_running_loop()
        self.local_address = local_address
        self.remote_address = remote_address
        self._consumer: LinkConsumer | None = None
        self._paused = False
        self._delivering = False
        self._deliver_again = False
        self._blocked = False  # send_nowait raised WouldBlock: link_writable is owed
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = math.inf
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._ended: asyncio.Future[None] = self._loop.create_future()
        self._error: BaseException | None = None
        self._closed = False
        self.last_receive = now
        self._busy_since = now
        self._watchdog_period = period
        self._watchdog_due = now + period

    @abstractmethod
    def _on_timer(self) -> None:
        """The timer fired (clear ``_timer`` first)."""

    def pause_reading(self) -> None:
        self._paused = True

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return {
            SocketAttribute.local_address: lambda: self.local_address,
            SocketAttribute.remote_address: lambda: self.remote_address,
        }

    def _arm(self, due: float) -> None:
        """Have the timer fire at ``due``: it follows the deadline both ways (KCP's: ikcp's flush tick, which
        stays put over many messages; left at a deadline that moved later, it would wake the loop for nothing)."""
        timer = self._timer
        if timer is not None:
            if abs(due - self._timer_when) <= TIMER_SLACK:
                return
            timer.cancel()
        self._timer_when = due
        self._timer = self._loop.call_at(due, self._on_timer)

    async def _linger(self, done: Callable[[], bool]) -> None:
        """Wait (at most :data:`LINGER`) until ``done()``, woken by :meth:`_wake_drain_waiters`."""
        with anyio.move_on_after(LINGER, shield=True):
            while self._error is None and not done():
                fut = self._loop.create_future()
                self._drain_waiters.append(fut)
                await fut

    def _wake_drain_waiters(self) -> None:
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    def _check_usable(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._error is not None:
            raise anyio.BrokenResourceError(str(self._error)) from self._error

    def _stop(self) -> None:
        """The shared steps of a teardown: no timer, no waiter, ``run`` returns, an owed ``link_writable`` is given
        (its next ``send_nowait`` raises)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake_drain_waiters()
        if not self._ended.done():
            self._ended.set_result(None)
        consumer = self._consumer
        if consumer is not None and self._blocked:
            self._blocked = False
            consumer.link_writable()


def take_each(link: RoutedLink, buffer: bytes, segment: int, into: list[Datagram]) -> bool:
    """``take_run`` datagram by datagram: the run's datagrams added to ``into`` if ``link`` accepts each, else
    nothing (False)."""
    datagrams = split_run(buffer, segment)
    if not all(map(link.accepts, datagrams)):
        return False
    into.extend(datagrams)
    return True


def transmitter(udp: CoalescingSocket, seal: Sealer | None) -> Transmit:
    """A session's output on ``udp``: its ``sendto_many``, or, when there is a ``seal``, every batch sealed into
    runs of datagrams that ``send_runs`` sends as they are."""
    if seal is None:
        return udp.sendto_many
    send_runs = udp.send_runs

    def transmit(datagrams: list[bytes], address: Address) -> None:
        send_runs(seal(datagrams), address)

    return transmit


class ListenerCodec(ABC, Generic[K]):
    """A listener's codec: how the datagrams arriving on its one socket are read, sessions keyed by ``K``.

    The router calls, for each datagram it routes: :meth:`key_of`; for a key, :meth:`open` (or
    :meth:`open_run` for runs from the session's current address); for no key, :meth:`stranger`. When it
    creates a session it calls :meth:`session_started`, when it forgets one :meth:`forget`. Whatever a codec
    sends itself goes through the ``send`` given to :meth:`attach`.
    """

    #: bytes sealing adds to each datagram (the ARQ's MTU is reduced by as much)
    overhead: int = 0
    #: a session only ever sends to an address its peer proved it receives at (a handshake, then path
    #: challenges): an ARQ that limits what it sends to an unproven address (rudp's 3x) lifts its limit at once
    validates_paths: bool = False

    @abstractmethod
    def attach(self, send: Send, *, sessions: int) -> None:
        """The listener's socket is open: ``send`` reaches it; ``sessions`` is the session limit."""

    @property
    def refusals(self) -> Refusals | None:
        """What the codec turned away, by reason (``None``: it keeps no count); the listener gives it as
        ``ListenerAttribute.refusals``."""
        return None

    @abstractmethod
    def key_of(self, datagram: Datagram, source: Address) -> K | None:
        """The key of the session ``datagram`` belongs to, read without opening it; None when it names none the
        codec knows (then it is a stranger's)."""

    @abstractmethod
    def open(
        self, key: K, link: RoutedLink | None, datagram: Datagram, source: Address, now: float
    ) -> tuple[Datagram | None, Address]:
        """Open one datagram of session ``key`` from ``source`` (``link`` None: the session has no link yet).

        Returns what goes to the session (None: nothing, the datagram is dropped) and where the session's peer
        is now: the router moves the link there, whether or not anything goes to it. A payload for a session
        without a link is the link's first datagram (the router decides whether it starts one).
        """

    @abstractmethod
    def open_run(self, key: K, link: RoutedLink, runs: Runs, into: list[Datagram], stray: Stray) -> int:
        """Open runs of session ``key`` that came from its current address, in order: add what goes to the
        session to ``into``, give each datagram this could not open as a batch to ``stray`` (routed alone, in
        place); return how many datagrams were dropped."""

    @abstractmethod
    def stranger(self, datagram: Datagram, source: Address, now: float) -> bool:
        """A datagram that names no known session: answer it if there is something to answer; whether it was
        taken (a handshake), not dropped."""

    @abstractmethod
    def session_started(self, key: K, first: Datagram, address: Address) -> Sealer | None:
        """The router starts a link for ``key`` with payload ``first``, its peer at ``address``: what seals its
        output (None: sent as it is)."""

    def user_of(self, key: K) -> UserKey | None:
        """Whose key session ``key``'s peer authenticated with (None: the codec has no keys)."""
        return None

    @abstractmethod
    def forget(self, key: K) -> None:
        """Session ``key`` is gone."""

    @abstractmethod
    def close(self) -> None:
        """The listener is closed: forget everything."""


class ClientCodec(ABC):
    """A client's codec: the datagrams between one client socket and its server. The client awaits
    :meth:`handshake`, then starts its link and feeds it what :meth:`open` opens."""

    #: bytes sealing adds to each datagram (the ARQ's MTU is reduced by as much)
    overhead: int = 0

    @abstractmethod
    def attach(self, send: Send, server: Address) -> None:
        """The client's socket is open: ``send`` reaches it; ``server`` is the server's address."""

    @abstractmethod
    async def handshake(self, timeout: float) -> Sealer | None:
        """Run the handshake, if any; what seals the link's output (None: sent as it is). Raises a
        :class:`~vtunnel.security.errors.SecurityError` when there can be no session."""

    @abstractmethod
    def open(self, runs: list[Run], link: RoutedLink | None, into: list[Datagram]) -> str | None:
        """Open what arrived (``link`` None: during the handshake): add what goes to the link to ``into``;
        return why the server ended the session when it did (the link fails after taking ``into``)."""
