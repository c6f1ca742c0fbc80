"""``--peer kcptun``: a vtunnel agent that is a kcptun-client, and a vtunnel server that is a kcptun-server.

kcptun is a port forwarder: its client turns every accepted TCP connection into an smux stream inside one KCP
session, and its server sends every stream to its one ``--target``. Nothing names a destination, so the agent
serves only ``--forward LISTEN`` ports and the server needs ``--target``.

The I/O is here; the wire is :class:`vtunnel.kcptun.KcptunSession` (sans-IO). A :class:`KcptunLink` drives one
session: a UDP socket's datagrams in, one timer for KCP's retransmissions and smux's keepalive, datagrams out once
per event-loop turn. Each smux stream is a relay end (:class:`SmuxEnd`), joined to a TCP socket by the one relay
engine (:class:`vtunnel.apps.pipe.Relay`). Back-pressure: a stream's writes wait while KCP's send queue is full
(and, smux v2, while the peer's window is); the session hands over all of KCP's received bytes at once, so a
stream whose relay is paused keeps them, and once one holds more than :data:`STREAM_BUFFER` the session stops
reading KCP until it drained: KCP's receive window fills and the peer stops sending, as kcptun's own receive
buffer makes it do.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Sequence
from typing import ClassVar, Final

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from vtunnel.apps.dialer import Dialer, DialError
from vtunnel.apps.pipe import Relay, SocketEnd
from vtunnel.apps.policy import ExitPolicy
from vtunnel.io.datagrams import Address, DatagramSocket, open_client_socket, open_udp_socket, resolve_udp
from vtunnel.io.stream_sockets import RelayListener, attach_socket, open_relay_listener
from vtunnel.kcptun import (
    DataReceived,
    Event,
    KcptunConfig,
    KcptunError,
    KcptunSession,
    PacketCrypt,
    SessionClosed,
    StreamEnded,
    StreamOpened,
    WindowUpdated,
    first_conv,
)
from vtunnel.transports.base import Endpoint

__all__ = ["STREAM_BUFFER", "KcptunAgent", "KcptunLink", "KcptunServer", "SmuxEnd"]

log = structlog.get_logger("vtunnel.kcptun")

#: received bytes one stream may hold for its paused relay before the session stops reading KCP
STREAM_BUFFER: Final = 512 * 1024
#: the most bytes one stream queues into the session per look at KCP's send queue
_WRITE_STEP: Final = 64 * 1024


class SmuxEnd:
    """A relay end on one smux stream of a :class:`KcptunLink`. A half-close is a FIN, which kcptun takes for the
    end of both directions (its copier closes the connection), as kcptun's own peers do; smux has no reset: a
    reset is a FIN too."""

    __slots__ = (
        "_broken",
        "_closing",
        "_fin_sent",
        "_full",
        "_held",
        "_held_bytes",
        "_link",
        "_peer_eof",
        "_pending",
        "_reading",
        "_relay",
        "stream_id",
    )
    serve: ClassVar[None] = None

    def __init__(self, link: KcptunLink, stream_id: int) -> None:
        self._link = link
        self.stream_id = stream_id
        self._relay: Relay | None = None
        self._reading = False
        self._held: list[bytes] = []  # received while the relay does not read this end
        self._held_bytes = 0
        self._peer_eof = False  # the peer's FIN came while not reading: reported at the resume
        self._broken = False
        self._pending: bytes | memoryview | None = None  # written, not yet taken by the session
        self._full = False
        self._closing = 0  # 1: close once the pending bytes went; 2: FIN once they went
        self._fin_sent = False

    @property
    def over_limit(self) -> bool:
        return self._held_bytes > STREAM_BUFFER

    # -------------------------------------------------------------------- from the link
    def data(self, data: bytes) -> None:
        if self._reading and self._relay is not None:
            self._relay.received(self, data)
            self._link.session.acknowledge(self.stream_id, len(data))
        else:
            self._held.append(data)
            self._held_bytes += len(data)

    def peer_ended(self) -> None:
        if self._reading and self._relay is not None:
            self._relay.ended(self)
        else:
            self._peer_eof = True

    def session_lost(self) -> None:
        self._fin_sent = True  # nothing can be sent any more
        self._pending = None
        if self._reading and self._relay is not None:
            self._relay.broken(self)
        else:
            self._broken = True

    def push(self) -> None:
        """Give the session what waits, as far as KCP's send queue and the stream's window take it."""
        data = self._pending
        if data is None:
            return
        session = self._link.session
        try:
            while data and session.writable():
                window = session.send_window(self.stream_id)
                if window <= 0:
                    break
                sent = session.send(self.stream_id, data[: min(window, _WRITE_STEP)])
                data = memoryview(data)[sent:]
        except KcptunError:
            self.session_lost()
            return
        self._link.schedule_flush()
        if data:
            self._pending = data
            self._link.waiting.add(self)
            if not self._full:
                self._full = True
                if self._relay is not None:
                    self._relay.full(self)
            return
        self._pending = None
        self._link.waiting.discard(self)
        if self._closing & 2:
            self._send_fin()
        if self._closing & 1:
            self._finish()
        elif self._full:
            self._full = False
            if self._relay is not None:
                self._relay.room(self)

    # -------------------------------------------------------------------- RelayEnd
    def start(self, relay: Relay) -> None:
        self._relay = relay

    def resume_reading(self) -> None:
        relay = self._relay
        assert relay is not None
        self._reading = True
        held, self._held, self._held_bytes = self._held, [], 0
        for data in held:
            relay.received(self, data)
            if self._fin_sent and self._broken:
                break
            self._link.session.acknowledge(self.stream_id, len(data))
        if self._broken:
            relay.broken(self)
        elif self._peer_eof:
            self._peer_eof = False
            relay.ended(self)
        self._link.check_reading()

    def pause_reading(self) -> None:
        self._reading = False

    def write(self, data: bytes) -> None:
        if self._fin_sent or self._closing:
            return
        if self._pending is None:
            self._pending = data
            self.push()
        else:
            self._pending = bytes(self._pending) + data

    def writable_size(self) -> int:
        if self._pending is not None or self._fin_sent or self._closing:
            return 0
        session = self._link.session
        try:
            return session.send_window(self.stream_id) if session.writable() else 0
        except KcptunError:
            return 0

    def write_eof(self) -> None:
        if self._pending is None:
            self._send_fin()
        else:
            self._closing |= 2

    def close(self) -> None:
        self._closing |= 1
        if self._pending is None:
            self._finish()

    def reset(self) -> None:
        self._pending = None
        self._finish()

    def _send_fin(self) -> None:
        if not self._fin_sent:
            self._fin_sent = True
            with contextlib.suppress(KcptunError):
                self._link.session.end_stream(self.stream_id)
            self._link.schedule_flush()

    def _finish(self) -> None:
        self._closing |= 1
        self._send_fin()
        self._held.clear()
        self._held_bytes = 0
        self._link.forget(self)


class KcptunLink:
    """One :class:`KcptunSession` on the event loop: ``receive`` datagrams, a timer, and its streams as ends.

    ``send(datagrams)`` puts datagrams on the wire; ``on_stream(end)`` takes each stream the peer opens (``None``:
    such streams are ended at once); ``on_closed(link)`` is told once when the session is over.
    """

    def __init__(
        self,
        session: KcptunSession,
        send: Callable[[list[bytes]], None],
        *,
        on_stream: Callable[[SmuxEnd], None] | None = None,
        on_closed: Callable[[KcptunLink], None] | None = None,
    ) -> None:
        self.session = session
        self._send = send
        self._on_stream = on_stream
        self._on_closed = on_closed
        self._loop = asyncio.get_running_loop()
        self.ends: dict[int, SmuxEnd] = {}
        #: ends with bytes the session did not take yet
        self.waiting: set[SmuxEnd] = set()
        self._flush_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.closed = False

    def open_end(self) -> SmuxEnd:
        """Open a stream (its SYN goes out with the next flush) and return its end."""
        end = SmuxEnd(self, self.session.open_stream())
        self.ends[end.stream_id] = end
        self.schedule_flush()
        return end

    def receive(self, datagrams: Sequence[bytes | memoryview]) -> None:
        """Feed a batch of the peer's datagrams; answers go out at once."""
        if self.closed:
            return
        now = self._loop.time()
        session = self.session
        events: list[Event] = []
        for datagram in datagrams:
            events += session.receive_datagram(datagram, now)
        self._dispatch(events)
        self._retry_writes()
        self.flush()

    def forget(self, end: SmuxEnd) -> None:
        if self.ends.get(end.stream_id) is end:
            del self.ends[end.stream_id]
        self.waiting.discard(end)
        self.check_reading()

    def check_reading(self) -> None:
        """Read KCP again once no stream holds more than :data:`STREAM_BUFFER`."""
        session = self.session
        if self.closed or not session.reading_paused:
            return
        if any(end.over_limit for end in self.ends.values()):
            return
        self._dispatch(session.resume_reading(self._loop.time()))
        self.schedule_flush()

    def schedule_flush(self) -> None:
        if self._flush_handle is None and not self.closed:
            self._flush_handle = self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send what the session has to send, and set the timer to its next deadline."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self.closed:
            return
        now = self._loop.time()
        datagrams = self.session.datagrams_to_send(now)
        if datagrams:
            self._send(datagrams)
        deadline = self.session.next_deadline(now)
        if deadline is None:
            return
        if self._timer is not None:
            if self._timer_at is not None and self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def close(self, reason: str = "closed") -> None:
        if not self.closed:
            self.session.close()
            self._lost(reason)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self.closed:
            return
        self._dispatch(self.session.handle_timer(self._loop.time()))
        self._retry_writes()
        self.flush()

    def _retry_writes(self) -> None:
        if self.waiting and self.session.writable():
            for end in list(self.waiting):
                end.push()

    def _dispatch(self, events: list[Event]) -> None:
        session = self.session
        for event in events:
            if isinstance(event, DataReceived):
                end = self.ends.get(event.stream_id)
                if end is None:  # a stream whose relay is over: its bytes go nowhere
                    session.acknowledge(event.stream_id, len(event.data))
                else:
                    end.data(event.data)
            elif isinstance(event, StreamOpened):
                end = SmuxEnd(self, event.stream_id)
                self.ends[event.stream_id] = end
                if self._on_stream is None:
                    end.reset()
                else:
                    self._on_stream(end)
            elif isinstance(event, StreamEnded):
                end = self.ends.get(event.stream_id)
                if end is not None:
                    end.peer_ended()
            elif isinstance(event, WindowUpdated):
                end = self.ends.get(event.stream_id)
                if end is not None:
                    end.push()
            elif isinstance(event, SessionClosed):
                self._lost(event.reason)
                return
        if not session.reading_paused and any(end.over_limit for end in self.ends.values()):
            session.pause_reading()

    def _lost(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        log.info("kcptun session closed", conv=self.session.conv, reason=reason, streams=len(self.ends))
        for handle in (self._flush_handle, self._timer):
            if handle is not None:
                handle.cancel()
        self._flush_handle = self._timer = None
        ends, self.ends = list(self.ends.values()), {}
        self.waiting.clear()
        for end in ends:
            end.session_lost()
        if self._on_closed is not None:
            self._on_closed(self)


# ------------------------------------------------------------------------------------------------ the agent


class KcptunAgent:
    """``vtunnel agent --peer kcptun``: every connection to a ``--forward`` port is a stream to a kcptun-server,
    which sends it to its ``--target``. ``conn`` sessions (kcptun-client's ``--conn``), each on a UDP socket of its
    own, the connections given to them in turn; a session is opened when its turn first comes, and again after
    it died."""

    def __init__(
        self,
        config: KcptunConfig,
        server: Endpoint,
        forwards: Sequence[tuple[str, int]],
        *,
        drain_timeout: float = 10.0,
    ) -> None:
        if not forwards:
            raise ValueError(
                "--peer kcptun needs --forward LISTEN (kcptun sends every stream to its --target)"
            )
        self.config = config
        self.server = server
        self.forwards = list(forwards)
        self.drain_timeout = drain_timeout
        self.local_addresses: dict[str, str] = {}
        self._crypt = config.packet_crypt()
        #: one per ``conn``: the slot's session and its socket, or ``None`` before its first turn
        self._slots: list[tuple[KcptunLink, DatagramSocket] | None] = [None] * config.conn
        self._turn = 0
        self._peer: Address | None = None
        self._stopping = anyio.Event()
        self._active = 0
        self._idle = anyio.Event()
        self._idle.set()

    async def serve(self, *, task_status: TaskStatus[dict[str, str]] = anyio.TASK_STATUS_IGNORED) -> None:
        loop = asyncio.get_running_loop()
        family, self._peer = await loop.run_in_executor(None, resolve_udp, self.server.host, self.server.port)
        self._family = family
        listeners: list[RelayListener[SocketEnd]] = []
        try:
            for address in self.forwards:
                srv = await open_relay_listener(
                    *address, SocketEnd, on_accept=self._accepted, on_close=self._closed_one
                )
                listeners.append(srv)
                name = srv.sockets[0].getsockname()
                shown = f"{name[0]}:{name[1]}"
                self.local_addresses[f"forward {shown}"] = shown
                log.info(
                    "listening",
                    front="forward target",
                    address=shown,
                    server=str(self.server),
                    peer="kcptun",
                    conn=self.config.conn,
                )
            task_status.started(self.local_addresses)
            await self._stopping.wait()
        finally:
            for srv in listeners:
                srv.close()
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.drain_timeout):
                await self._idle.wait()
            for slot in self._slots:
                if slot is not None:
                    slot[0].close("agent stopped")
                    slot[1].close()

    def shutdown(self) -> None:
        self._stopping.set()

    def _accepted(self, end: SocketEnd) -> None:
        self._active += 1
        if self._idle.is_set():
            self._idle = anyio.Event()
        try:
            link = self._session()
            Relay(end, link.open_end())
        except (OSError, KcptunError) as exc:
            log.warning("no kcptun session for a forwarded connection", error=str(exc) or repr(exc))
            end.reset()

    def _closed_one(self) -> None:
        self._active -= 1
        if not self._active:
            self._idle.set()

    def _session(self) -> KcptunLink:
        """The session whose turn it is (kcptun's round robin), opened anew if it is not there or died."""
        index = self._turn
        self._turn = (index + 1) % len(self._slots)
        slot = self._slots[index]
        if slot is not None:
            if not slot[0].closed:
                return slot[0]
            slot[1].close()
            self._slots[index] = None
        peer = self._peer
        assert peer is not None
        sock = open_client_socket(self._family, peer)
        loop = asyncio.get_running_loop()
        session = KcptunSession.client(self.config, now=loop.time(), crypt=self._crypt)

        def received(batch: list[tuple[bytes, Address]]) -> None:
            link.receive([datagram for datagram, source in batch if source == peer])

        udp = DatagramSocket(sock, received)
        link = KcptunLink(session, lambda datagrams: udp.sendto_many(datagrams, peer))
        self._slots[index] = (link, udp)
        log.info("kcptun session opened", conv=session.conv, server=str(self.server), slot=index)
        return link


# ------------------------------------------------------------------------------------------------ the server


class KcptunServer:
    """``vtunnel server --peer kcptun``: kcptun-clients' sessions on UDP listeners, every stream to ``target``.

    A session starts with the first datagram of an address that carries KCP data (:func:`first_conv`), and is
    replaced when that address sends a new conversation from its start (a restarted client), as kcp-go does.
    """

    def __init__(
        self,
        config: KcptunConfig,
        listen: Sequence[Endpoint],
        target: str,
        *,
        connect_timeout: float = 10.0,
        idle_timeout: float | None = None,
    ) -> None:
        if not listen:
            raise ValueError("the server needs at least one --listen URL")
        self.config = config
        self.listen = list(listen)
        self.target = target
        self.idle_timeout = idle_timeout
        # the operator's own --target is trusted: the exit policy governs what clients ask for, not it
        self.dialer = Dialer(ExitPolicy(allow_private=True), connect_timeout=connect_timeout)
        self.local_addresses: list[str] = []
        self.links: dict[Address, KcptunLink] = {}
        self._crypt = config.packet_crypt()
        self._sockets: list[DatagramSocket] = []
        self._stopping = anyio.Event()
        self._tg: TaskGroup | None = None

    async def serve(self, *, task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED) -> None:
        loop = asyncio.get_running_loop()
        try:
            for endpoint in self.listen:
                family, address = await loop.run_in_executor(None, resolve_udp, endpoint.host, endpoint.port)
                udp = self._bind(open_udp_socket(family, bind=address))
                self._sockets.append(udp)
                host, port = udp.local_address
                url = f"kcp://[{host}]:{port}" if ":" in host else f"kcp://{host}:{port}"
                self.local_addresses.append(url)
                log.info("listening", url=url, target=self.target, peer="kcptun", crypt=self.config.crypt)
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started(self.local_addresses)
                await self._stopping.wait()
                for link in list(self.links.values()):
                    link.close("server stopped")
                tg.cancel_scope.cancel()
        finally:
            for udp in self._sockets:
                udp.close()

    def shutdown(self) -> None:
        self._stopping.set()

    def _bind(self, sock: socket.socket) -> DatagramSocket:
        def received(batch: list[tuple[bytes, Address]]) -> None:
            by_source: dict[Address, list[bytes]] = {}
            for datagram, source in batch:
                by_source.setdefault(source, []).append(datagram)
            for source, datagrams in by_source.items():
                self._receive(udp, source, datagrams)

        udp = DatagramSocket(sock, received)
        return udp

    def _receive(self, udp: DatagramSocket, source: Address, datagrams: list[bytes]) -> None:
        link = self.links.get(source)
        if link is not None and not link.closed:
            session = link.session
            dropped = session.dropped
            link.receive(datagrams)
            if session.dropped == dropped or link.closed:
                return
            # a datagram of another conversation: a restarted client starts its new one at sequence number 0
            fresh = [d for d in datagrams if _new_conversation(self._crypt, d, session.conv)]
            if not fresh:
                return
            link.close("the client started a new session")
            datagrams = fresh
        found = next((c for c in (first_conv(self._crypt, d) for d in datagrams) if c is not None), None)
        if found is None:
            return  # not a kcptun datagram of ours (bad CRC or key): dropped, as kcp-go does
        loop = asyncio.get_running_loop()
        session = KcptunSession(self.config, client=False, conv=found[0], now=loop.time(), crypt=self._crypt)

        def closed(done: KcptunLink) -> None:
            if self.links.get(source) is done:
                del self.links[source]

        link = KcptunLink(
            session,
            lambda out: udp.sendto_many(out, source),
            on_stream=self._stream_opened,
            on_closed=closed,
        )
        self.links[source] = link
        log.info("kcptun session opened", conv=session.conv, client=f"{source[0]}:{source[1]}")
        link.receive(datagrams)

    def _stream_opened(self, end: SmuxEnd) -> None:
        if self._tg is None or self._stopping.is_set():
            end.reset()
            return
        self._tg.start_soon(self._connect, end)

    async def _connect(self, end: SmuxEnd) -> None:
        try:
            sock = await self.dialer.dial_socket(self.target)
        except DialError as exc:
            log.info("target refused", target=self.target, stream=end.stream_id, error=exc.error)
            end.reset()
            return
        except BaseException:
            end.reset()
            raise
        socket_end = SocketEnd()
        try:
            attach_socket(sock, socket_end)
        except BaseException:
            sock.close()
            end.reset()
            raise
        Relay(end, socket_end, idle_timeout=self.idle_timeout)


def _new_conversation(crypt: PacketCrypt, datagram: bytes, conv: int) -> bool:
    found = first_conv(crypt, datagram)
    return found is not None and found[0] != conv and found[1] == 0
