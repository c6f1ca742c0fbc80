"""``kcp://``: tunnels over KCP (the C ikcp through ``siokcp``) on UDP, wire-compatible with other KCPs.

Client: one UDP socket per session, a random non-zero conv (``conv=0`` talks to vproxy). Server: one UDP
socket; sessions keyed by conv, so a client whose address changes (NAT rebinding) keeps its tunnel and the
server follows its new address; conv-0 sessions (vproxy) are keyed by source address instead. Datagrams that
are not valid KCP for a known session are dropped without an answer; a new session starts only from a PUSH
with sequence number 0.

With ``security.psk`` every datagram is sealed (see :mod:`vtunnel.transports.kcp_secure`): sessions are then
keyed by the authenticated connection ID, and a datagram that fails authentication is dropped before KCP sees
it.

Runs on asyncio (or uvloop) only; trio is not supported for ``kcp://``.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from types import MappingProxyType
from typing import Any, ClassVar, Final, TypeAlias

import anyio
import structlog
from anyio.abc import ByteStream, Listener, SocketAttribute, TaskGroup

from vtunnel.transports.base import Endpoint, SecurityConfig, Transport, TransportError
from vtunnel.transports.kcp_engine import KCPEngine, KCPEngineError
from vtunnel.transports.kcp_options import KCPOptions, parse_options
from vtunnel.transports.kcp_stream import KCPStream
from vtunnel.transports.kcp_wire import (
    HEADER_LEN,
    RunVerdict,
    conv_of,
    is_new_session,
    valid_datagram,
    vet_run,
)
from vtunnel.transports.udpio import (
    Address,
    CoalescingSocket,
    Run,
    open_client_socket,
    open_udp_socket,
    split_run,
)

__all__ = ["KCPListener", "KCPSession", "KCPStream", "KCPTransport"]

log = structlog.get_logger("vtunnel.transports.kcp")

#: a server session's key: its conv, its source address when conv is 0, or (sealed) its connection ID
SessionKey: TypeAlias = int | Address | bytes


async def _resolve(endpoint: Endpoint) -> tuple[Any, Address]:
    import socket

    try:
        infos = await anyio.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise TransportError(f"cannot resolve {endpoint.hostport}: {exc}") from None
    family, _type, _proto, _name, sockaddr = infos[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


#: push mode: the longest an ACK waits for an answer to ride on. Far below ikcp's smallest retransmission
#: timeout (30 ms with nodelay), so the peer never resends for it; kcp-go holds ACKs for up to its interval
ACK_DELAY: Final = 0.002
#: push mode: from this many segments' worth of input since the last ACK, the ACK goes out at once (a stream
#: of data is acknowledged as fast as before; only small exchanges wait)
ACK_NOW_SEGMENTS: Final = 2


def _random_conv() -> int:
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


class KCPSession(KCPStream):
    """A :class:`KCPStream` with a synchronous side: :meth:`send_nowait`, :meth:`receive_nowait` and
    :meth:`set_on_readable`.

    The tunnel pump writes a frame straight from the task (or callback) that produced it, and ikcp sends it in
    the same step; received bytes are pushed to the pump from the datagram callback that brought them. Through
    ``send`` and ``receive`` each message would wait for the pump's writer or reader task and for the stream's
    deferred flush: two or three event-loop iterations per message, each side.
    """

    _readable_callback: Callable[[], None] | None = None
    _ack_timer: asyncio.TimerHandle | None = None
    #: bytes fed since the last flush (so since the last ACK went out), in push mode
    _unacked = 0

    def set_on_readable(self, callback: Callable[[], None] | None) -> None:
        """Push mode: ``callback()`` runs when received bytes wait and when the session fails (``None``: off).

        The callback takes the bytes with :meth:`receive_nowait`, which raises once the session has failed.
        """
        self._readable_callback = callback

    def receive_nowait(self, max_bytes: int = 65536) -> bytes:
        """What ``receive`` would return now, without waiting: ``b""`` when no bytes wait.

        Raises like ``receive`` on a closed (:class:`anyio.ClosedResourceError`) or failed
        (:class:`anyio.BrokenResourceError`) session.
        """
        self._check_usable()
        engine = self.engine
        data = engine.receive(max_bytes)
        if data and engine.probe_pending:  # reading reopened a full receive window: tell the peer soon
            self._schedule_flush()
        return data

    def feed(self, datagrams: Sequence[bytes | memoryview]) -> None:
        """As :meth:`KCPStream.feed`; in push mode the bytes go up before the ACK goes out.

        The reader sees the data one ``sendto`` earlier, and whatever it answers at once (a window update, a
        reply) leaves in the same flush as the ACK.
        """
        callback = self._readable_callback
        if callback is None:
            super().feed(datagrams)
            return
        engine = self.engine
        if engine.closed:
            return
        now = self._loop.time()
        if not engine.receive_datagrams(datagrams, now):
            return
        self.last_receive = now
        for datagram in datagrams:
            self._unacked += len(datagram)
        if engine.readable():
            callback()
            if engine.closed:
                return
        if self._unacked and self._unacked < ACK_NOW_SEGMENTS * engine.max_data and not engine.waiting():
            # a small exchange with nothing of ours in flight: the answer, if one comes soon, carries the ACK
            if self._ack_timer is None:
                self._ack_timer = self._loop.call_later(ACK_DELAY, self._on_ack_delay)
        else:
            self._flush_now(now)
        self._pump(now)

    def _flush_now(self, now: float) -> None:
        """ikcp's flush: ACKs for everything input so far, new data, retransmissions (sent by ``_pump``)."""
        self._unacked = 0
        timer = self._ack_timer
        if timer is not None:
            self._ack_timer = None
            timer.cancel()
        self.engine.flush(now)

    def _on_ack_delay(self) -> None:
        self._ack_timer = None
        if self.engine.closed or not self._unacked:
            return
        now = self._loop.time()
        self._flush_now(now)
        self._pump(now)

    def fail(self, reason: str) -> None:
        super().fail(reason)
        timer = self._ack_timer
        if timer is not None:
            self._ack_timer = None
            timer.cancel()
        callback = self._readable_callback
        if callback is not None:
            callback()

    def send_nowait(self, data: bytes) -> bool:
        """Queue ``data`` into KCP and flush it now if the send window has room for all of it.

        ``False`` (nothing taken) when the session is closed or broken or the window is too full: the caller
        then uses ``send``, which waits for room and raises the session's error. Never raises, never waits.
        """
        engine = self.engine
        if self._closed or self._error is not None or engine.closed:
            return False
        waiting = engine.waiting()
        if (engine.send_window - waiting) * engine.max_data < len(data):
            return False
        now = self._loop.time()
        if waiting == 0:
            self._busy_since = now
        engine.send(data)
        self._flush_now(now)  # the ACKs still owed leave with the data
        self._pump(now)
        return True


class _KCPClient:
    """The client side of one session: a UDP socket (answers from the server only) feeding one session."""

    def __init__(self, sock: Any, server: Address, options: KCPOptions, conv: int) -> None:
        self._server = server
        self._udp = CoalescingSocket(sock, self._on_runs)
        loop = asyncio.get_running_loop()
        engine = KCPEngine(conv=conv, options=options, mtu=options.mtu, now=loop.time())
        self.stream = KCPSession(
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

    def _on_close(self, _stream: KCPStream) -> None:
        self._udp.close()


class KCPListener(Listener[ByteStream]):
    """Accepts KCP sessions on one UDP socket; each accepted session is one :class:`KCPStream`.

    Closing the listener closes its socket, so every session it accepted fails too.
    """

    def __init__(self, sock: Any, options: KCPOptions) -> None:
        self._options = options
        self._loop = asyncio.get_running_loop()
        self._udp = CoalescingSocket(sock, self._on_runs)
        self._sessions: dict[SessionKey, KCPStream] = {}
        self._tombstones: dict[SessionKey, float] = {}
        self._pending: list[KCPStream] = []
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
    def sessions(self) -> Mapping[SessionKey, KCPStream]:
        """The live sessions by key (read-only)."""
        return MappingProxyType(self._sessions)

    # --- datagram path --------------------------------------------------------------------------------------

    def _on_runs(self, runs: list[Run]) -> None:
        groups: dict[KCPStream, list[bytes | memoryview]] = {}
        for buffer, segment, source in runs:
            if segment >= len(buffer):
                self._route(buffer, source, groups)
                continue
            stream = self._sessions.get(conv_of(buffer) or source) if len(buffer) >= HEADER_LEN else None
            if stream is not None and stream.remote_address == source:
                engine = stream.engine
                verdict = vet_run(buffer, segment, engine.conv)
                if verdict != RunVerdict.INVALID:
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
        self, datagram: bytes | memoryview, source: Address, groups: dict[KCPStream, list[bytes | memoryview]]
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
        if stream.remote_address != source:
            log.info("kcp peer moved", conv=conv, old=stream.remote_address, new=source)
            stream.remote_address = source
        group = groups.get(stream)
        if group is None:
            groups[stream] = [datagram]
        else:
            group.append(datagram)

    def _new_session(
        self, key: SessionKey, conv: int, datagram: bytes | memoryview, source: Address
    ) -> KCPStream | None:
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
        return self._create_stream(key, conv, source, mtu=self._options.mtu, seal=None)

    def _room_for_one_more(self) -> bool:
        if len(self._sessions) < self._options.sessions:
            return True
        log.warning("kcp session limit reached; new session dropped", limit=self._options.sessions)
        return False

    def _create_stream(
        self, key: SessionKey, conv: int, source: Address, *, mtu: int, seal: Callable[[bytes], bytes] | None
    ) -> KCPStream:
        """A new session in the table and the accept queue; ``seal`` wraps every outgoing datagram."""
        engine = KCPEngine(conv=conv, options=self._options, mtu=mtu, now=self._loop.time())
        udp = self._udp
        stream: KCPStream

        if seal is None:

            def transmit(datagrams: list[bytes]) -> None:
                udp.sendto_many(datagrams, stream.remote_address)

        else:
            sealer = seal

            def transmit(datagrams: list[bytes]) -> None:
                udp.sendto_many([sealer(d) for d in datagrams], stream.remote_address)

        stream = KCPSession(
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

    def _forget(self, key: SessionKey, stream: KCPStream) -> None:
        if self._sessions.get(key) is stream:
            del self._sessions[key]
        if stream in self._pending:
            self._pending.remove(stream)
        now = self._loop.time()
        if len(self._tombstones) >= 4 * self._options.sessions:
            self._tombstones = {k: t for k, t in self._tombstones.items() if t > now}
        if len(self._tombstones) < 4 * self._options.sessions:
            self._tombstones[key] = now + 2.0 * self._options.timeout

    # --- Listener -------------------------------------------------------------------------------------------

    async def accept(self) -> KCPStream:
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

    async def serve(self, handler: Callable[[ByteStream], Any], task_group: TaskGroup | None = None) -> None:
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
        self._pending.clear()
        self._udp.close()
        fut = self._acceptor
        if fut is not None and not fut.done():
            fut.set_result(None)
        await anyio.lowlevel.checkpoint()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return {SocketAttribute.local_address: lambda: self.local_address}


class KCPTransport(Transport):
    """``kcp://host:port?mode=fast3&sndwnd=1024&rcvwnd=1024&mtu=1350`` (see ``docs/transports.md``)."""

    schemes: ClassVar[tuple[str, ...]] = ("kcp",)
    description: ClassVar[str] = "KCP (ikcp via siokcp) over UDP; presets normal, fast, fast2, fast3, fast4"

    def check(self, endpoint: Endpoint) -> None:
        parse_options(endpoint.params)

    async def connect(self, endpoint: Endpoint, *, security: SecurityConfig) -> ByteStream:
        options = parse_options(endpoint.params)
        family, server = await _resolve(endpoint)
        if security.psk is not None:
            from vtunnel.transports.kcp_secure import connect_sealed

            return await connect_sealed(family, server, options, security.psk)
        try:
            sock = open_client_socket(family, server, sockbuf=options.sockbuf)
        except OSError as exc:
            raise TransportError(f"cannot open a UDP socket to {endpoint.hostport}: {exc}") from None
        conv = options.conv if options.conv is not None else _random_conv()
        try:
            client = _KCPClient(sock, server, options, conv)
        except KCPEngineError as exc:
            sock.close()
            raise TransportError(str(exc)) from None
        return client.stream

    async def listen(self, endpoint: Endpoint, *, security: SecurityConfig) -> Listener[ByteStream]:
        options = parse_options(endpoint.params)
        family, address = await _resolve(endpoint)
        try:
            sock = open_udp_socket(family, bind=address, sockbuf=options.sockbuf)
        except OSError as exc:
            raise TransportError(f"cannot listen on udp {endpoint.hostport}: {exc}") from None
        if security.psk is not None:
            from vtunnel.transports.kcp_secure import SealedKCPListener

            return SealedKCPListener(sock, options, security.psk)
        return KCPListener(sock, options)
