"""One tunnel over one transport link: the sans-IO tunnel driven by the link's input, one timer and its users.

A :class:`TunnelConnection` owns a sans-IO :class:`~vtunnel.protocol.Tunnel` and the
:class:`~vtunnel.transports.link.Link` that carries it, and is that link's consumer. It has one input path and
one output path, as aioquic's asyncio protocol does:

* **input**: the link pushes bytes (``link_data``) from its own callback or reader; they go to the tunnel at once
  and its events to the streams' consumers (``TunnelStream``), in the same step;
* **output**: after every input, every timer and every user call that queues frames, :meth:`TunnelConnection.transmit`
  asks the link's room (``send_room``), hands what the tunnel has queued, up to that room, to the link in
  ``send_nowait`` calls of at most :data:`LINK_WRITE` bytes each and re-arms the connection's one timer at the tunnel's ``next_deadline()`` (keepalive,
  handshake and drain timeouts). When the link is full (room 0) the bytes stay in the tunnel, not taken, not
  joined, until the link calls ``link_writable``; the timer is re-armed only when the deadline moves earlier (a
  deadline that moved later, the keepalive after every received chunk, is found when it fires).
* **unreliable datagrams** (a link whose ``max_datagram`` is not 0, and a peer that agreed to the ``datagrams``
  extension): ``transmit`` also hands the tunnel's queued datagrams to ``send_datagram_nowait``, and
  ``link_datagram`` feeds what arrives to the tunnel; the datagrams of ``udp`` streams then skip the ordered
  byte stream (docs/protocol.md, "Unreliable datagrams").

Back-pressure: a stream's writes take no more than its flow-control credit (when the peer negotiated it), and
its consumer stops while more than ``OUTBOUND_HIGH_WATER`` bytes wait for the link (``TunnelStream.has_room``;
the consumer is told when the output drained). What the streams' consumers hold is bounded by the stream windows;
with a vproxy peer (no flow control) the link is paused while any stream holds more than its limit
unacknowledged, which is exactly vproxy's own behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import Awaitable, Callable

import anyio
import structlog
from anyio.abc import TaskGroup

from vtunnel.io.allocator import MMAP_THRESHOLD
from vtunnel.io.stream_sockets import SocketWatcher, watcher_for
from vtunnel.protocol import Role, StreamMetadata, Tunnel, TunnelConfig, TunnelState, events
from vtunnel.protocol.errors import MetadataNotNegotiated, VTunnelError
from vtunnel.runtime.errors import DestinationNotCarried, StreamRefused, TunnelUnavailable
from vtunnel.runtime.tunnel_stream import TunnelStream
from vtunnel.transports.base import Endpoint
from vtunnel.transports.link import Link

__all__ = ["LINK_WRITE", "OUTBOUND_HIGH_WATER", "StreamHandler", "TunnelConnection"]

log = structlog.get_logger("vtunnel.runtime")

#: bytes queued for the link above which stream senders wait
OUTBOUND_HIGH_WATER = 1024 * 1024
#: the output a waiting stream is expected to add when told there is room: of the streams waiting, only as many
#: as the room below the high-water mark holds at this much each are told at once (the longest waiting first), so
#: that a tunnel with a thousand busy streams does not wake all of them for the room of a few
ROOM_PER_STREAM = 64 * 1024
#: how soon the next waiting streams are told when the ones told last added nothing
_ROOM_RETRY = 0.001
#: bytes a stream may hold unacknowledged when the peer has no flow control (vproxy) before the link pauses
UNCONTROLLED_BUFFER_LIMIT = 1024 * 1024
#: how long a closing tunnel waits for its last frames to leave and for the peer to end the link
CLOSE_LINGER = 2.0
#: while an input's events go to the streams, what they queue waits for the input's one transmit up to this much
#: (window updates, SYN-ACKs, FINs: small frames); more goes at once, so bulk data never waits on the high-water mark
_COALESCED_OUTPUT = 32 * 1024
#: while a pass of the socket watcher reads many relays' sockets, what their streams write waits for the pass's end
#: up to this much: one link write for the pass, not one per socket read
_PASS_OUTPUT = 256 * 1024
#: a timer due within this of the armed one is not re-armed
_TIMER_SLACK = 0.0005
#: the most handed to the link in one ``send_nowait``, however much its room takes: the tunnel's frames are joined
#: into one buffer of that size, and a buffer of the C library's mapping threshold or more (4 MiB,
#: :data:`vtunnel.io.allocator.MMAP_THRESHOLD`) is a fresh mapping each time, which the kernel faults in and zeroes
#: page by page and unmaps after. The queue grows that large when many streams write at once: a thousand bulk
#: streams over kcp:// each wrote their window before the output was over its high-water mark (1,024 streams of
#: 256 KiB: joins of 4 to 32 MiB, 140-200 page faults per MB sent)
LINK_WRITE = MMAP_THRESHOLD // 4

#: what a server does with each stream the peer opens, called in the input's own step (no task): a handler that
#: is done at once (it attached a consumer, or refused the stream) returns ``None``; one that must wait (a name to
#: resolve, a connection not yet made) returns an awaitable, which the connection runs in a task of its own. The
#: stream is closed once the handler is done unless a consumer was attached to it.
StreamHandler = Callable[[TunnelStream], Awaitable[None] | None]


_now = time.monotonic


class TunnelConnection:
    """One tunnel. Use :meth:`run` inside a task group; open streams with :meth:`open_stream` (client role).

    ``lite_tls_spliced``: this end's lite-tls streams may leave over dedicated connections (splice mode,
    docs/lite-tls.md), so lite-tls is offered even where the link carries no passthrough records.
    """

    def __init__(
        self,
        link: Link,
        *,
        role: Role,
        config: TunnelConfig | None = None,
        handler: StreamHandler | None = None,
        name: str = "",
        user: str | None = None,
        lite_tls_spliced: bool = False,
        server: Endpoint | None = None,
    ) -> None:
        self.link = link
        #: the server this tunnel goes to (an agent's), else None
        self.server = server
        self.role = role
        config = config or TunnelConfig()
        if config.lite_tls and not link.carry_passthrough_records():
            # lite-tls only where its streams leave to something cheaper: the link carries passthrough records (a
            # byte stream with a key), or they may leave over a dedicated connection (splice mode: offered as
            # lite-tls-spliced, and a stream that falls back to muxed is then sealed like any other)
            config = dataclasses.replace(config, lite_tls=lite_tls_spliced, lite_tls_spliced=True)
        elif config.lite_tls and config.lite_tls_runs and not link.carry_passthrough_runs():
            # runs of TLS records in one PASSTHROUGH frame only where the link seals their record headers
            config = dataclasses.replace(config, lite_tls_runs=False)
        self.tunnel = Tunnel(role=role, config=config, max_datagram=link.max_datagram)
        #: the link carries unreliable datagrams (else the tunnel never queues any)
        self._carries_datagrams = link.max_datagram > 0
        self.handler = handler
        self.name = name
        #: the peer's user (a server's tunnel under per-user keys): in every log line of the tunnel, and metrics
        self.user = user
        self.log = log.bind(tunnel=name, role=role.name.lower())
        if user is not None:
            self.log = self.log.bind(user=user)
        self.streams: dict[int, TunnelStream] = {}
        #: bytes the link refused (``WouldBlock``) although its room said it takes them: they go first when it has
        #: room again (a link keeping its contract never leaves any)
        self._held = b""
        self._unblocked = anyio.Event()  # set by link_writable (the closing linger waits for it)
        #: streams whose consumers are told (``deliver_room``) once the output is under its high-water mark, in
        #: the order they asked (a dict: ordered, and O(1) to remove from)
        self._room_wanted: dict[TunnelStream, None] = {}
        self._telling_room = False
        #: True while the events of one input (or timer) go to the streams: the small frames their consumers
        #: queue meanwhile (window updates, SYN-ACKs, FINs) leave in the one transmit that follows, not one each
        self._delivering = False
        #: a transmit_soon call is waiting for the end of the loop turn
        self._transmit_due = False
        #: this loop's socket watcher (set by run), and whether a transmit waits for the end of its pass under way
        self._watcher: SocketWatcher | None = None
        self._pass_transmit = False
        #: the open_stream calls waiting for their SYN-ACK (or RST), by stream id
        self._opening: dict[int, asyncio.Future[None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None
        self._input_ended = anyio.Event()
        self._link_failed = False
        #: streams holding more than UNCONTROLLED_BUFFER_LIMIT unacknowledged (only without flow control); the
        #: link is paused only while one is (resume_reading, called by an acknowledgement while any is)
        self.over_limit: set[int] = set()
        self._reading_paused = False
        #: the peer agreed to flow control (known at the handshake): without it (vproxy) the link pauses for a
        #: stream over UNCONTROLLED_BUFFER_LIMIT
        self._flow_control = False
        self._ready = anyio.Event()
        self._closed = anyio.Event()
        #: the tunnel is closed (``_closed`` set): a plain attribute, read for every message by its streams
        self.closed = False
        #: set once the tunnel takes no new streams: a GOAWAY either way, or its close
        self._retired = anyio.Event()
        self._close_reason = ""
        self._task_group: TaskGroup | None = None
        #: link writes (``send_nowait`` calls that took bytes), refusals (``WouldBlock``) and the times output
        #: waited for the link's room (``send_room`` 0, nothing built): statistics
        self.link_writes = 0
        self.link_refusals = 0
        self.link_full = 0
        #: tunnel bytes the link took and gave (frames, before the transport's own overhead): statistics
        self.bytes_out = 0
        self.bytes_in = 0
        #: kernel relays of this tunnel's spliced lite-tls streams still running (they outlive the tunnel and
        #: still count their bytes in ``bytes_out`` / ``bytes_in``)
        self.spliced_relays = 0
        #: the port of the peer's lite-tls splice listener, as its SETTINGS announced it (with lite-tls agreed)
        self.peer_splice_port: int | None = None

    # ------------------------------------------------------------------ state
    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self.closed

    @property
    def close_reason(self) -> str:
        return self._close_reason

    @property
    def reading_paused(self) -> bool:
        """The link is paused because a stream buffers past its limit (only without flow control: vproxy)."""
        return self._reading_paused

    @property
    def accepting_streams(self) -> bool:
        return self.ready and self.tunnel.state is TunnelState.READY

    async def wait_ready(self) -> None:
        """Wait for the handshake; raise :class:`TunnelUnavailable` if the tunnel closes first."""
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def watch_close() -> None:
                    await self._closed.wait()
                    scope.cancel()

                tg.start_soon(watch_close)
                await self._ready.wait()
                tg.cancel_scope.cancel()
        if not self._ready.is_set() or self.closed:
            raise TunnelUnavailable(f"tunnel closed before it was ready: {self._close_reason}")

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def wait_retired(self) -> None:
        """Wait until the tunnel takes no new streams: the peer's GOAWAY, our :meth:`shutdown`, or its close (the
        streams it has may still be finishing)."""
        await self._retired.wait()

    # ------------------------------------------------------------------ output
    def transmit(self) -> None:
        """The one output point: hand what the tunnel queued to the link, as much as its room takes (in writes of
        at most :data:`LINK_WRITE`), and re-arm the timer.

        Never blocks, cheap to call often: nothing is taken from the tunnel while the link has no room (the link
        calls ``link_writable`` when it has); the frames go to the link in the task or callback that produced them
        (a link that writes synchronously, such as KCP's, puts them on the wire in the same step). While an input's
        events go to the streams it waits for the input's own call (up to :data:`_COALESCED_OUTPUT`), so a
        thousand streams' window updates leave as one write. Likewise while the socket watcher's pass reads the
        sockets of many relays (up to :data:`_PASS_OUTPUT`): their streams' writes leave in one link write when
        the pass is over, in the same callback.
        """
        tunnel = self.tunnel
        if self._delivering and tunnel.bytes_to_send < _COALESCED_OUTPUT:
            return  # the input's own transmit follows its events
        if not self._pass_transmit:
            watcher = self._watcher
            if watcher is not None and watcher.at_pass_end(self._after_pass):
                self._pass_transmit = True
        if self._pass_transmit and tunnel.bytes_to_send < _PASS_OUTPUT:
            return  # the pass's transmit follows its reads
        more = not self._held and not self._link_failed and tunnel.has_data_to_send
        while more:
            room = self.link.send_room()
            if not room:  # the link calls link_writable when it has room
                self.link_full += 1
                break
            self._send(tunnel.data_to_send(room if room < LINK_WRITE else LINK_WRITE))
            more = not self._held and not self._link_failed and tunnel.has_data_to_send
        if self._carries_datagrams and tunnel.has_datagrams_to_send:
            self._send_datagrams(tunnel.datagrams_to_send())
        deadline = tunnel.next_deadline()
        if deadline is not None and deadline < self._timer_when - _TIMER_SLACK:
            self._arm(deadline)
        if self._room_wanted and self.outbound_bytes <= OUTBOUND_HIGH_WATER:
            self._room_returned()

    def _after_pass(self) -> None:
        self._pass_transmit = False
        self.transmit()

    def transmit_soon(self) -> None:
        """:meth:`transmit` at the end of this event-loop turn (or with the input being handled): for the small
        frames of stream opens and ends (SYN, SYN-ACK, FIN, RST), so that a thousand streams opened or ended in
        one turn leave in one link write and one KCP flush. Data does not wait for the loop: ``write`` transmits at
        once (or at the end of the socket watcher's pass it was read in), and the frames queued before it leave
        with it."""
        if self._delivering or self._transmit_due:
            return
        loop = self._loop
        if loop is None:
            self.transmit()
            return
        self._transmit_due = True
        loop.call_soon(self._transmit_now)

    def _transmit_now(self) -> None:
        self._transmit_due = False
        self.transmit()

    def _room_returned(self) -> None:
        """Tell the longest-waiting streams there is room, as many as the room holds, and none once the output is
        over its high-water mark again (a stream told may write at once); the rest when the output drains further,
        or at the connection's timer :data:`_ROOM_RETRY` later if those told added nothing. All of them once the
        tunnel is closed. Not re-entered: a write by a stream being told runs ``transmit``, which leaves the
        telling to this pass."""
        if self._telling_room:
            return
        self._telling_room = True
        try:
            waiting = self._room_wanted
            if self.closed:
                self._room_wanted = {}
                for stream in waiting:
                    stream.deliver_room()
                return
            budget = max(1, (OUTBOUND_HIGH_WATER - self.outbound_bytes) // ROOM_PER_STREAM)
            while waiting and budget > 0 and self.outbound_bytes <= OUTBOUND_HIGH_WATER:
                stream = next(iter(waiting))
                del waiting[stream]
                stream.deliver_room()
                budget -= 1
        finally:
            self._telling_room = False
        if self._room_wanted:  # the connection's one timer runs transmit, which tells the next ones
            retry = _now() + _ROOM_RETRY
            if retry < self._timer_when - _TIMER_SLACK:
                self._arm(retry)

    def _send(self, data: bytes) -> None:
        try:
            self.link.send_nowait(data)
        except anyio.WouldBlock:
            self.link_refusals += 1
            self._held = data
            return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._link_failed = True
            self._unblocked.set()
            self._mark_closed(f"transport write failed: {exc!r}")
            return
        self.link_writes += 1
        self.bytes_out += len(data)

    def _send_datagrams(self, datagrams: list[bytes]) -> None:
        """Unreliable datagrams to the link: one that cannot go is lost, as the network may lose it (a failed
        link is reported by its byte path; one the link no longer takes, its datagram size having shrunk since the
        tunnel started, is dropped)."""
        link = self.link
        for datagram in datagrams:
            try:
                link.send_datagram_nowait(datagram)
            except ValueError:
                continue
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                return

    def link_writable(self) -> None:
        """The link has room again (its consumer side): send what it refused, then whatever followed."""
        self._unblocked.set()
        data, self._held = self._held, b""
        if data:
            self._send(data)
        if not self._held:
            self.transmit()

    @property
    def outbound_bytes(self) -> int:
        """Bytes queued for the link (in the tunnel, or refused by the link and held here)."""
        return self.tunnel.bytes_to_send + len(self._held)

    @property
    def outbound_congested(self) -> bool:
        """More than :data:`OUTBOUND_HIGH_WATER` waits for the link (and the tunnel is open): stream consumers
        stop producing until they are told there is room (:meth:`notify_room`)."""
        return self.tunnel.bytes_to_send + len(self._held) > OUTBOUND_HIGH_WATER and not self.closed

    def notify_room(self, stream: TunnelStream) -> None:
        """Call ``stream.deliver_room()`` once the output is under :data:`OUTBOUND_HIGH_WATER` again (or the
        tunnel closed); asked while :attr:`outbound_congested`."""
        self._room_wanted[stream] = None

    # ------------------------------------------------------------------ timer
    def _arm(self, when: float) -> None:
        loop = self._loop
        if loop is None or self.closed:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_when = when
        # the tunnel's clock is time.monotonic(); the loop's may differ: arm by the delay
        self._timer = loop.call_at(loop.time() + max(0.0, when - _now()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = math.inf
        if self.closed:
            return
        try:
            evs = self.tunnel.handle_timer(_now())
        except VTunnelError as exc:
            self.transmit()
            self._fail(f"protocol error: {exc}")
            return
        self._handle_events(evs)
        self.transmit()

    # ------------------------------------------------------------------ run
    async def run(self) -> None:
        """Run the tunnel until it closes. Closes the link and every stream at the end."""
        self._loop = asyncio.get_running_loop()
        self._watcher = watcher_for(self._loop)
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                tg.start_soon(self.link.run, self)
                # client: the SETTINGS go out; server: the handshake timer starts, so a peer that never
                # completes the handshake is closed after handshake_timeout instead of holding its link forever
                self.tunnel.initiate(_now())
                self.transmit()
                await self._closed.wait()
                await self._linger()
                tg.cancel_scope.cancel()
        finally:
            self._mark_closed(self._close_reason or "tunnel ended")
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await self.link.aclose()

    async def _linger(self) -> None:
        """The last frames (GOAWAY, RST) leave, then end of stream, then wait for the peer to end the link too,
        for at most ``CLOSE_LINGER`` seconds.

        Closing a TCP socket while bytes it received are unread sends a reset, and a reset makes the peer's
        kernel drop what it has not yet handed to the peer: the last frames of a drained tunnel (the end of its
        streams, the closing GOAWAY) would be lost while they were still arriving. A link that failed ends the
        wait at once.
        """
        if self._link_failed:
            return
        with anyio.move_on_after(CLOSE_LINGER):
            self.transmit()
            while (self._held or self.tunnel.has_data_to_send) and not self._link_failed:
                self._unblocked = anyio.Event()
                await self._unblocked.wait()
            if self._link_failed:
                return
            try:
                await self.link.send_eof()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self.log.debug("link ended while closing", error=repr(exc))
                return
            await self._input_ended.wait()

    async def _run_handler(self, stream: TunnelStream, waiting: Awaitable[None]) -> None:
        """The rest of a stream handler that had to wait (what it returned), then the stream's close."""
        try:
            await waiting
        except Exception as exc:
            self.log.warning("stream handler failed", stream=stream.stream_id, error=repr(exc))
        finally:
            if not stream.attached:  # a consumer the handler attached closes the stream when it is done
                stream.close()

    # ------------------------------------------------------------------ input
    def link_data(self, data: bytes) -> None:
        """The link's input: feed it to the tunnel and act on its events, in the link's own step."""
        if self.closed:
            return  # closing: what the peer still sends is read and dropped
        self.bytes_in += len(data)
        try:
            evs = self.tunnel.receive_data(data, _now())
        except VTunnelError as exc:
            self.transmit()
            self.log.warning("peer protocol error", error=str(exc))
            self._fail(f"protocol error: {exc}")
            return
        except Exception as exc:  # a bug must not leave a tunnel half alive inside a link's callback
            self.log.error("tunnel input failed", error=repr(exc), exc_info=exc)
            self._fail(f"internal error: {exc!r}")
            return
        self._handle_events(evs)
        self.transmit()
        if self.over_limit and not self.tunnel.extensions.flow_control and not self._reading_paused:
            self._reading_paused = True
            self.link.pause_reading()

    def link_datagram(self, data: bytes) -> None:
        """An unreliable datagram from the link: to the tunnel (which drops what it cannot deliver), its events
        to the streams."""
        if self.closed:
            return
        self._handle_events(self.tunnel.receive_datagram(data, _now()))
        self.transmit()

    def link_ended(self, error: BaseException | None) -> None:
        """The link's input ended: the peer closed it, or it failed."""
        self._input_ended.set()
        if error is None:
            self._fail("transport closed by peer")
        else:
            self._link_failed = True
            self._fail(f"transport failed: {error!r}")

    def resume_reading(self, stream: TunnelStream | None = None) -> None:
        """A stream's consumer acknowledged bytes: resume the link if it was paused for it (only without flow
        control; called while :attr:`over_limit` holds a stream: the link is never paused otherwise)."""
        if self.over_limit and stream is not None and stream.unacknowledged <= UNCONTROLLED_BUFFER_LIMIT:
            self.over_limit.discard(stream.stream_id)
        if self._reading_paused and not self.over_limit:
            self._reading_paused = False
            self.link.resume_reading()

    def _fail(self, reason: str) -> None:
        self._mark_closed(reason)

    def _mark_closed(self, reason: str) -> None:
        if self.closed:
            return
        self._close_reason = reason
        self.log.info("tunnel closed", reason=reason, streams=len(self.streams))
        self.closed = True
        self._closed.set()
        self._retired.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for stream in list(self.streams.values()):
            stream.deliver_tunnel_closed()
        self._room_returned()
        for stream_id in list(self._opening):
            self._settle_open(stream_id)
        if self._reading_paused:
            self._reading_paused = False
            self.link.resume_reading()  # closing: what still arrives is read and dropped

    # ------------------------------------------------------------------ events
    def _handle_events(self, evs: list[events.Event]) -> None:
        """Hand one input's events to the streams; every caller transmits once afterwards (``_delivering``)."""
        self._delivering = True
        try:
            streams = self.streams
            for ev in evs:
                if type(ev) is events.DataReceived:
                    s = streams.get(ev.stream_id)
                    if s is not None:
                        s.deliver_data(ev.data, ev.passthrough)
                        if not self._flow_control and s.unacknowledged > UNCONTROLLED_BUFFER_LIMIT:
                            self.over_limit.add(ev.stream_id)
                    else:  # a stream we already closed: give the credit back
                        self.tunnel.acknowledge_received_data(ev.stream_id, len(ev.data))
                else:
                    self._deliver_event(ev)
        finally:
            self._delivering = False

    def _deliver_event(self, ev: events.Event) -> None:
        """One event other than data (those go straight to their stream in ``_handle_events``)."""
        streams = self.streams
        if isinstance(ev, events.WindowUpdated):  # (a tunnel-wide one names each stream it held back)
            s2 = streams.get(ev.stream_id)
            if s2 is not None:
                s2.deliver_window()
        elif isinstance(ev, events.StreamOpened):
            self._on_stream_opened(ev)
        elif isinstance(ev, events.StreamAccepted):
            s3 = streams.get(ev.stream_id)
            if s3 is not None:
                s3.deliver_accepted(ev.headers)
            if self._opening:
                self._settle_open(ev.stream_id)
        elif isinstance(ev, events.StreamEnded):
            s4 = streams.get(ev.stream_id)
            if s4 is not None:
                s4.deliver_eof()
        elif isinstance(ev, events.StreamReset):
            s5 = streams.get(ev.stream_id)
            if s5 is not None:
                s5.deliver_reset(ev.error)
            if self._opening:
                self._settle_open(ev.stream_id)
        elif isinstance(ev, events.HandshakeCompleted):
            self.log.debug("tunnel ready", extensions=str(ev.extensions))
            self._flow_control = ev.extensions.flow_control
            self.peer_splice_port = ev.splice_port
            self._ready.set()
        elif isinstance(ev, events.GoAwayReceived):
            self.log.info("peer is shutting down", reason=ev.reason, last_stream_id=ev.last_stream_id)
            self._retired.set()
            for sid, s6 in list(streams.items()):
                if sid > ev.last_stream_id:
                    s6.deliver_reset("refused")
                    self._settle_open(sid)
        elif isinstance(ev, events.TunnelClosed):
            self._mark_closed(ev.reason)

    def _on_stream_opened(self, ev: events.StreamOpened) -> None:
        tg = self._task_group
        if self.handler is None or tg is None or self.closed:
            self.tunnel.reset_stream(ev.stream_id, error="refused")
            return
        stream = TunnelStream(self, ev.stream_id, ev.metadata, accepted=False)
        self.streams[ev.stream_id] = stream
        try:  # straight from the reader: no queue, no extra hop, and no task unless the handler must wait
            waiting = self.handler(stream)
        except Exception as exc:
            self.log.warning("stream handler failed", stream=stream.stream_id, error=repr(exc))
            waiting = None
        if waiting is not None:
            tg.start_soon(self._run_handler, stream, waiting)
        elif not stream.attached:
            stream.close()

    def forget_stream(self, stream_id: int) -> None:
        """A stream of this connection was closed by its user: drop it (called by ``TunnelStream`` only)."""
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            self._room_wanted.pop(stream, None)
        self.over_limit.discard(stream_id)
        self.resume_reading()

    def _settle_open(self, stream_id: int) -> None:
        """The SYN-ACK or the RST of a stream came (or the tunnel closed): its ``open_stream`` call goes on."""
        waiter = self._opening.pop(stream_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait_accepted(self, stream: TunnelStream) -> None:
        if not stream.accepted and not stream.broken and not self.closed:
            waiter = self._opening[stream.stream_id] = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._opening.pop(stream.stream_id, None)
        if not stream.accepted:
            raise StreamRefused(stream.reset_error)

    # ------------------------------------------------------------------ API
    async def open_stream(
        self, metadata: StreamMetadata | None = None, *, wait_accepted: bool = True
    ) -> TunnelStream:
        """Open a stream (client role); attach its consumer next (what arrives until then waits for it).

        With ``wait_accepted`` the call returns once the server's SYN-ACK arrived and raises
        :class:`StreamRefused` if it answered with an RST; without it the stream is returned at once and the first
        bytes follow the SYN (0-RTT), a refusal then surfacing as the stream's breakage.
        """
        stream = self.start_stream(metadata)
        if wait_accepted:
            try:
                await self._wait_accepted(stream)
            except BaseException:
                stream.close()
                raise
        return stream

    def start_stream(self, metadata: StreamMetadata | None = None) -> TunnelStream:
        """:meth:`open_stream` without waiting (0-RTT), callable outside a task: the SYN leaves at the end of this
        loop turn, with the first bytes if they were written by then."""
        if not self.accepting_streams:
            raise TunnelUnavailable(
                f"tunnel not ready ({self._close_reason or self.tunnel.state.name.lower()})"
            )
        try:
            sid = self.tunnel.open_stream(metadata=metadata)
        except MetadataNotNegotiated as exc:
            self.log.warning("stream not opened: the server cannot be told its destination", reason=str(exc))
            raise DestinationNotCarried(str(exc)) from exc
        except VTunnelError as exc:
            raise TunnelUnavailable(str(exc)) from exc
        stream = TunnelStream(self, sid, metadata, accepted=False)
        self.streams[sid] = stream
        self.transmit_soon()
        return stream

    def shutdown(self, reason: str, *, graceful: bool = True) -> None:
        """Send GOAWAY. Graceful: open streams may finish; the tunnel closes when they have (or on timeout)."""
        if self.closed:
            return
        self._retired.set()
        with contextlib.suppress(VTunnelError):
            self.tunnel.shutdown(reason, graceful=graceful)
        self.transmit()
        if (not graceful or not self.streams) and not graceful:
            self._mark_closed(reason)
