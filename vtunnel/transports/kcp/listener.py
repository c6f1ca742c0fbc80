"""``kcp://``: tunnels over KCP (the C ikcp through ``siokcp``) on UDP, wire-compatible with other KCPs.

Client: one UDP socket per session, a random non-zero conv (``conv=0`` talks to vproxy). Server: one UDP
socket; sessions keyed by conv, so a client whose address changes (NAT rebinding) keeps its tunnel and the
server follows its new address; conv-0 sessions (vproxy) are keyed by source address instead. Datagrams that
are not valid KCP for a known session are dropped without an answer; a new session starts only from a PUSH
with sequence number 0.

Without a key nothing can be authenticated, but a session moves to a new address only on a datagram that is
newer than any the session has taken (:class:`NewestMarks`): a copy of one of its old datagrams, sent from
elsewhere, is dropped and does not move it.

With ``security.psk`` every datagram is sealed (see :mod:`vtunnel.transports.kcp.sealed`): sessions are then
keyed by the authenticated connection ID, and a datagram that fails authentication is dropped before KCP sees
it.

Runs on asyncio (or uvloop) only; trio is not supported for ``kcp://``.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from types import MappingProxyType
from typing import Any, TypeAlias

import anyio
import structlog
from anyio.abc import Listener, SocketAttribute, TaskGroup

from vtunnel.arq.kcp_engine import KCPEngine
from vtunnel.arq.kcp_options import KCPOptions
from vtunnel.arq.kcp_wire import (
    HEADER_LEN,
    Command,
    RunVerdict,
    conv_of,
    is_new_session,
    valid_datagram,
    vet_run,
)
from vtunnel.io.datagrams import (
    Address,
    CoalescingSocket,
    Run,
    split_run,
)
from vtunnel.transports.base import Endpoint, TransportError
from vtunnel.transports.kcp.link import KCPLink
from vtunnel.transports.link import Link

__all__ = ["KCPClient", "KCPLink", "KCPListener", "NewestMarks", "random_conv", "resolve_endpoint"]

log = structlog.get_logger("vtunnel.transports.kcp")

#: a server session's key: its conv, its source address when conv is 0, or (sealed) its connection ID
SessionKey: TypeAlias = int | Address | bytes


async def resolve_endpoint(endpoint: Endpoint) -> tuple[Any, Address]:
    import socket

    try:
        infos = await anyio.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise TransportError(f"cannot resolve {endpoint.hostport}: {exc}") from None
    family, _type, _proto, _name, sockaddr = infos[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


#: what a datagram's first segment says about its age: cmd, ts, una (conv, frg, wnd, sn and len skipped)
_MARKS = struct.Struct("<4xB3xI4xI")
_PUSH = int(Command.PUSH)
_ACK = int(Command.ACK)
_SERIAL_MASK = 0xFFFFFFFF
_SERIAL_HALF = 1 << 31


def _after(a: int, b: int) -> bool:
    """``a`` comes after ``b`` in 32-bit serial number arithmetic (KCP's ts and una wrap)."""
    return 0 < ((a - b) & _SERIAL_MASK) < _SERIAL_HALF


class NewestMarks:
    """The newest marks a keyless session's peer has shown, from the first segment of each datagram it took.

    A KCP peer's datagrams carry three marks that only grow as it goes on: ``una`` (the peer's next expected
    sequence number, in every segment), the ``ts`` of a PUSH (the peer's clock when it sent, retransmissions
    included) and the ``ts`` of an ACK (the echo of our own segment's time). A datagram is newer when one of its
    marks is beyond the highest of that mark seen; a copy of any datagram the session already took never is
    (while the marks seen span less than half the 32-bit serial space: 24 days of ``ts``). Only the first
    segment is read, for the record and for the test alike, so the rule holds exactly.
    """

    __slots__ = ("ack_ts", "push_ts", "una")

    def __init__(self) -> None:
        self.una: int | None = None
        self.push_ts: int | None = None
        self.ack_ts: int | None = None

    def note(self, datagram: bytes | memoryview, offset: int = 0) -> bool:
        """Take the marks of the datagram at ``offset``; whether any was beyond what was seen (it is newer)."""
        cmd, ts, una = _MARKS.unpack_from(datagram, offset)
        newer = False
        if self.una is None or _after(una, self.una):
            self.una = una
            newer = True
        if cmd == _PUSH:
            if self.push_ts is None or _after(ts, self.push_ts):
                self.push_ts = ts
                newer = True
        elif cmd == _ACK and (self.ack_ts is None or _after(ts, self.ack_ts)):
            self.ack_ts = ts
            newer = True
        return newer


def random_conv() -> int:
    return secrets.randbits(32) or 1


def _add_run(good: list[bytes | memoryview], buffer: bytes, segment: int, engine: KCPEngine) -> None:
    """Vet a run of datagrams for ``engine`` and add what may go to ikcp: the run, its datagrams, or the valid ones."""
    verdict = vet_run(buffer, segment, engine.conv)
    if verdict == RunVerdict.NO_ACKS and engine.whole_runs:
        good.append(buffer)
    elif verdict != RunVerdict.INVALID:
        good.extend(split_run(buffer, segment))
    else:
        good.extend(
            datagram for datagram in split_run(buffer, segment) if valid_datagram(datagram, engine.conv)
        )


class KCPClient:
    """The client side of one session: a UDP socket (answers from the server only) feeding one session."""

    def __init__(self, sock: Any, server: Address, options: KCPOptions, conv: int) -> None:
        self._server = server
        self._udp = CoalescingSocket(sock, self._on_runs)
        loop = asyncio.get_running_loop()
        engine = KCPEngine(conv=conv, options=options, mtu=options.mtu, now=loop.time())
        self.stream = KCPLink(
            engine=engine,
            options=options,
            transmit=self._transmit,
            local_address=self._udp.local_address,
            remote_address=server,
            on_close=self._on_close,
        )

    def _transmit(self, datagrams: list[bytes]) -> None:
        self._udp.sendto_many(datagrams, self._server)

    def _on_runs(self, runs: list[Run]) -> None:
        engine = self.stream.engine
        conv = engine.conv
        server = self._server
        good: list[bytes | memoryview] = []
        for buffer, segment, source in runs:
            if source != server:  # the socket is not connect()ed (see open_client_socket): only the server
                continue
            if segment >= len(buffer):
                if valid_datagram(buffer, conv):
                    good.append(buffer)
                continue
            _add_run(good, buffer, segment, engine)
        if good:
            self.stream.feed(good)

    def _on_close(self, _stream: KCPLink) -> None:
        self._udp.close()


class KCPListener(Listener[Link]):
    """Accepts KCP sessions on one UDP socket; each accepted session is one :class:`KCPLink`.

    Closing the listener closes its socket, so every session it accepted fails too.
    """

    def __init__(self, sock: Any, options: KCPOptions) -> None:
        self._options = options
        self._loop = asyncio.get_running_loop()
        self._udp = CoalescingSocket(sock, self._on_runs)
        self._sessions: dict[SessionKey, KCPLink] = {}
        #: keyless sessions: the newest marks each one's peer has shown (what may move it to a new address)
        self._newest: dict[KCPLink, NewestMarks] = {}
        self._tombstones: dict[SessionKey, float] = {}
        self._pending: list[KCPLink] = []
        self._acceptor: asyncio.Future[None] | None = None
        self._closed = False
        #: datagrams dropped unanswered: not KCP, not a known session, or over the session limit
        self.dropped = 0

    @property
    def local_address(self) -> Address:
        return self._udp.local_address

    @property
    def datagrams_sent(self) -> int:
        """Datagrams this listener's socket handed to the kernel (all sessions)."""
        return self._udp.sent

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    @property
    def sessions(self) -> Mapping[SessionKey, KCPLink]:
        """The live sessions by key (read-only)."""
        return MappingProxyType(self._sessions)

    # --- datagram path --------------------------------------------------------------------------------------

    def _on_runs(self, runs: list[Run]) -> None:
        groups: dict[KCPLink, list[bytes | memoryview]] = {}
        for buffer, segment, source in runs:
            if segment >= len(buffer):
                self._route(buffer, source, groups)
                continue
            stream = self._sessions.get(conv_of(buffer) or source) if len(buffer) >= HEADER_LEN else None
            if stream is not None and stream.remote_address == source:
                engine = stream.engine
                verdict = vet_run(buffer, segment, engine.conv)
                if verdict != RunVerdict.INVALID:
                    newest = self._newest.get(stream)
                    if newest is not None:
                        for offset in range(0, len(buffer), segment):
                            newest.note(buffer, offset)
                    group = groups.setdefault(stream, [])
                    if verdict == RunVerdict.NO_ACKS and engine.whole_runs:
                        group.append(buffer)
                    else:
                        group.extend(split_run(buffer, segment))
                    continue
            for datagram in split_run(
                buffer, segment
            ):  # a new session, a moved peer, or something to drop: one by one
                self._route(datagram, source, groups)
        for stream, group in groups.items():
            stream.feed(group)

    def _route(
        self, datagram: bytes | memoryview, source: Address, groups: dict[KCPLink, list[bytes | memoryview]]
    ) -> None:
        """Vet one datagram and add it to its session's group (a PUSH 0 may open a session)."""
        if len(datagram) < HEADER_LEN:
            self.dropped += 1
            return
        conv = conv_of(datagram)
        key: SessionKey = conv if conv else source
        stream = self._sessions.get(key)
        if stream is None:
            stream = self._new_session(key, conv, datagram, source)
            if stream is None:
                self.dropped += 1
                return
        elif not valid_datagram(datagram, conv):
            self.dropped += 1
            return
        newest = self._newest.get(stream)
        if stream.remote_address != source:
            if newest is None or not newest.note(datagram):
                # nothing newer than what the session took: a copy of an old datagram, or a late one
                self.dropped += 1
                return
            log.info("kcp peer moved", conv=conv, old=stream.remote_address, new=source)
            stream.remote_address = source
        elif newest is not None:
            newest.note(datagram)
        group = groups.get(stream)
        if group is None:
            groups[stream] = [datagram]
        else:
            group.append(datagram)

    def _new_session(
        self, key: SessionKey, conv: int, datagram: bytes | memoryview, source: Address
    ) -> KCPLink | None:
        if self._closed or not is_new_session(datagram):
            return None
        now = self._loop.time()
        if self._tombstones:
            expiry = self._tombstones.get(key)
            if expiry is not None:
                if expiry > now:
                    return None
                del self._tombstones[key]
        if not self._room_for_one_more():
            return None
        stream = self._create_stream(key, conv, source, mtu=self._options.mtu, seal=None)
        self._newest[stream] = NewestMarks()
        return stream

    def _room_for_one_more(self) -> bool:
        if len(self._sessions) < self._options.sessions:
            return True
        log.warning("kcp session limit reached; new session dropped", limit=self._options.sessions)
        return False

    def _create_stream(
        self,
        key: SessionKey,
        conv: int,
        source: Address,
        *,
        mtu: int,
        seal: Callable[[list[bytes]], list[bytes]] | None,
    ) -> KCPLink:
        """A new session in the table and the accept queue; ``seal`` wraps every batch of outgoing datagrams
        (one wire datagram for each, in order)."""
        engine = KCPEngine(conv=conv, options=self._options, mtu=mtu, now=self._loop.time())
        udp = self._udp
        stream: KCPLink

        if seal is None:

            def transmit(datagrams: list[bytes]) -> None:
                udp.sendto_many(datagrams, stream.remote_address)

        else:
            seal_many = seal

            def transmit(datagrams: list[bytes]) -> None:
                udp.sendto_many(seal_many(datagrams), stream.remote_address)

        stream = KCPLink(
            engine=engine,
            options=self._options,
            transmit=transmit,
            local_address=udp.local_address,
            remote_address=source,
            on_close=lambda s: self._forget(key, s),
        )
        self._sessions[key] = stream
        self._pending.append(stream)
        log.debug("kcp session opened", conv=conv, peer=source, sessions=len(self._sessions))
        fut = self._acceptor
        if fut is not None and not fut.done():
            fut.set_result(None)
        return stream

    def _forget(self, key: SessionKey, stream: KCPLink) -> None:
        if self._sessions.get(key) is stream:
            del self._sessions[key]
        self._newest.pop(stream, None)
        if stream in self._pending:
            self._pending.remove(stream)
        now = self._loop.time()
        if len(self._tombstones) >= 4 * self._options.sessions:
            self._tombstones = {k: t for k, t in self._tombstones.items() if t > now}
        if len(self._tombstones) < 4 * self._options.sessions:
            self._tombstones[key] = now + 2.0 * self._options.timeout

    # --- Listener -------------------------------------------------------------------------------------------

    async def accept(self) -> KCPLink:
        """The next new session."""
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._pending:
                return self._pending.pop(0)
            if self._acceptor is not None:
                raise anyio.BusyResourceError("accepting")
            fut = self._loop.create_future()
            self._acceptor = fut
            try:
                await fut
            finally:
                self._acceptor = None

    async def serve(self, handler: Callable[[Link], Any], task_group: TaskGroup | None = None) -> None:
        async with AsyncExitStack() as stack:
            if task_group is None:
                task_group = await stack.enter_async_context(anyio.create_task_group())
            while True:
                try:
                    stream = await self.accept()
                except anyio.ClosedResourceError:
                    if self._closed:
                        return  # closed by aclose(): serving ends quietly
                    raise
                task_group.start_soon(handler, stream)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for stream in list(self._sessions.values()):
            stream.fail("the listener was closed")
        self._sessions.clear()
        self._newest.clear()
        self._pending.clear()
        self._udp.close()
        fut = self._acceptor
        if fut is not None and not fut.done():
            fut.set_result(None)
        await anyio.lowlevel.checkpoint()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return {SocketAttribute.local_address: lambda: self.local_address}
