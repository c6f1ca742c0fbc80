"""The anyio pump: one tunnel over one transport byte stream, its streams exposed as anyio byte streams.

A :class:`TunnelConnection` owns a sans-IO :class:`~vtunnel.protocol.Tunnel` and the transport stream that carries
it. Three tasks move everything:

* the reader feeds transport bytes to the tunnel and turns its events into stream buffers and wake-ups;
* the writer drains the tunnel's output to the transport, so no caller ever blocks the reader: it takes
  everything queued at once (one join, one transport write) each time the previous write finished. A transport
  with a synchronous ``send_nowait(data) -> bool`` (all or nothing, never raises, never waits) is written
  straight from :meth:`TunnelConnection.flush` while the writer is idle, so a small message goes from the
  sender's task to the wire in the same step; the writer only runs when the transport would make it wait;
* the timer calls ``handle_timer`` at the tunnel's next deadline (keepalive, handshake and drain timeouts). It
  is woken only when a deadline moves earlier than the one it sleeps until; a deadline that moved later (the
  keepalive after every received chunk) is found when it wakes.

Back-pressure: a stream's ``send`` waits for flow-control credit (when the peer negotiated it) and while more than
``OUTBOUND_HIGH_WATER`` bytes wait for the transport. Receive buffers are bounded by the stream windows; with a
vproxy peer (no flow control) the reader stops reading the transport while any stream buffer is over its limit,
which is exactly vproxy's own behaviour.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Awaitable, Callable

import anyio
import structlog
from anyio.abc import ByteStream, TaskGroup

from vtunnel.protocol import Role, StreamMetadata, Tunnel, TunnelConfig, TunnelState, events
from vtunnel.protocol.errors import MetadataNotNegotiated, VTunnelError
from vtunnel.runtime.errors import DestinationNotCarried, TunnelUnavailable
from vtunnel.runtime.tunnel_stream import TunnelStream

__all__ = ["OUTBOUND_HIGH_WATER", "StreamHandler", "TunnelConnection"]

log = structlog.get_logger("vtunnel.runtime")

#: bytes queued for the transport above which stream senders wait
OUTBOUND_HIGH_WATER = 1024 * 1024
#: per-stream receive buffer limit used when the peer has no flow control (vproxy)
UNCONTROLLED_BUFFER_LIMIT = 1024 * 1024
#: how long a closing tunnel waits for the peer to end the transport after our own end of stream
CLOSE_LINGER = 2.0
#: the most the reader asks the transport for: more than one event-loop read (256 KiB), so a transport that
#: decrypts or reassembles never has to split what it has into several reads
READ_SIZE = 1024 * 1024

StreamHandler = Callable[[TunnelStream], Awaitable[None]]


def _now() -> float:
    return time.monotonic()


class TunnelConnection:
    """One tunnel. Use :meth:`run` inside a task group; open streams with :meth:`open_stream` (client role)."""

    def __init__(
        self,
        transport: ByteStream,
        *,
        role: Role,
        config: TunnelConfig | None = None,
        handler: StreamHandler | None = None,
        name: str = "",
    ) -> None:
        self.transport = transport
        self.role = role
        self.tunnel = Tunnel(role=role, config=config or TunnelConfig())
        self.handler = handler
        self.name = name
        self.log = log.bind(tunnel=name, role=role.name.lower())
        self.streams: dict[int, TunnelStream] = {}
        self._sending = 0  # bytes the writer handed to the transport and is waiting on
        self._writer_wakeup = anyio.Event()
        self._writer_idle = False
        self._outbound_drained: anyio.Event | None = None
        self._timer_wakeup = anyio.Event()
        self._timer_deadline = -math.inf  # what the timer sleeps until (-inf: it is computing)
        self._reader_resume = anyio.Event()
        self._over_limit: set[int] = set()  # streams buffering more than UNCONTROLLED_BUFFER_LIMIT
        self._ready = anyio.Event()
        self._closed = anyio.Event()
        self._close_reason = ""
        self._task_group: TaskGroup | None = None
        #: the transport's synchronous write (``send_nowait(data) -> bool``, all or nothing), when it has one
        self._send_nowait: Callable[[bytes], bool] | None = getattr(transport, "send_nowait", None)
        #: bytes flush() drained but the transport could not take at once: the writer sends them first
        self._held = b""
        #: push-mode input: the transport's ``receive_nowait(max_bytes) -> bytes`` (``b""``: nothing yet; raises
        #: like ``receive`` once it ended) and ``set_on_readable(callback)`` (called when bytes wait or it ended)
        self._receive_nowait: Callable[[int], bytes] | None = getattr(transport, "receive_nowait", None)
        self._set_on_readable: Callable[[Callable[[], None] | None], None] | None = getattr(
            transport, "set_on_readable", None
        )
        self._draining = False
        self._drain_again = False
        self._push_paused = False
        #: transport writes made synchronously from :meth:`flush`, and by the writer task (statistics)
        self.direct_writes = 0
        self.writer_writes = 0

    # ------------------------------------------------------------------ state
    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._closed.is_set()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def close_reason(self) -> str:
        return self._close_reason

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
        if not self._ready.is_set() or self._closed.is_set():
            raise TunnelUnavailable(f"tunnel closed before it was ready: {self._close_reason}")

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # ------------------------------------------------------------------ output
    def flush(self) -> None:
        """Hand what the tunnel has queued to the transport, and let the timer see a new deadline.

        Never blocks, cheap to call often. When the writer is idle and the transport takes bytes synchronously
        (``send_nowait``), the frames are written right here, in the task that produced them: no writer wake-up,
        no loop iteration between a stream's ``send`` and the transport. Otherwise the writer task is woken.
        """
        tunnel = self.tunnel
        if self._writer_idle and tunnel.has_data_to_send:
            if self._send_nowait is None:  # the writer joins whatever is queued when it runs
                self._writer_idle = False
                self._writer_wakeup.set()
            else:
                data = tunnel.data_to_send()
                if self._write_now(data):
                    self.direct_writes += 1
                else:
                    self._held = data
                    self._sending = len(data)
                    self._writer_idle = False
                    self._writer_wakeup.set()
        deadline = self.tunnel.next_deadline()
        if deadline is not None and deadline < self._timer_deadline:
            self._timer_deadline = -math.inf
            self._timer_wakeup.set()

    @property
    def outbound_bytes(self) -> int:
        """Bytes queued for the transport or being written to it."""
        return self.tunnel.bytes_to_send + self._sending

    @property
    def outbound_congested(self) -> bool:
        """More than :data:`OUTBOUND_HIGH_WATER` waits for the transport (and the tunnel is open): relays stop
        reading their sources until :meth:`wait_outbound_room` returns."""
        return self.outbound_bytes > OUTBOUND_HIGH_WATER and not self.closed

    async def wait_outbound_room(self) -> None:
        while self.outbound_bytes > OUTBOUND_HIGH_WATER and not self._closed.is_set():
            drained = self._outbound_drained
            if drained is None or drained.is_set():
                drained = self._outbound_drained = anyio.Event()
            await drained.wait()

    def _write_now(self, data: bytes) -> bool:
        """Write ``data`` synchronously if the transport can take all of it now (it never takes part of it)."""
        send_nowait = self._send_nowait
        if send_nowait is None:
            return False
        try:
            return bool(send_nowait(data))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return False  # the writer's own send surfaces the failure and closes the tunnel

    async def _writer(self) -> None:
        tunnel = self.tunnel
        send = self.transport.send
        while True:
            data = self._held
            if data:
                self._held = b""
            else:
                data = tunnel.data_to_send()
            if not data:
                if self._closed.is_set():
                    return
                self._writer_wakeup = anyio.Event()
                self._writer_idle = True
                await self._writer_wakeup.wait()
                continue
            self._sending = len(data)
            self.writer_writes += 1
            await send(data)
            self._sending = 0
            if self._outbound_drained is not None:
                self._outbound_drained.set()

    # ------------------------------------------------------------------ run
    async def run(self) -> None:
        """Run the tunnel until it closes. Closes the transport and every stream at the end."""
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                # client: the SETTINGS go out; server: the handshake timer starts, so a peer that never
                # completes the handshake is closed after handshake_timeout instead of holding its socket forever
                self.tunnel.initiate(_now())
                self.flush()
                tg.start_soon(self._writer_task)
                tg.start_soon(self._timer)
                tg.start_soon(self._reader_task)
                await self._closed.wait()
                # closed: give the writer a bounded moment to flush the last frames (GOAWAY, RST)
                with anyio.move_on_after(2):
                    while self.outbound_bytes:
                        self._writer_wakeup.set()
                        await anyio.sleep(0.005)
                tg.cancel_scope.cancel()
        finally:
            self._mark_closed(self._close_reason or "tunnel ended")
            with anyio.CancelScope(shield=True):
                await self._close_transport()

    async def _close_transport(self) -> None:
        """End of stream first, then read (and drop) what the peer still sends until it ends too, for at most
        ``CLOSE_LINGER`` seconds; then close.

        Closing a TCP socket while bytes it received are unread sends a reset, and a reset makes the peer's
        kernel drop what it has not yet handed to the peer: the last frames of a drained tunnel (the end of its
        streams, the closing GOAWAY) would be lost while they were still arriving.  A transport that failed
        ends the wait at once.
        """
        transport = self.transport
        with anyio.move_on_after(CLOSE_LINGER):
            try:
                await transport.send_eof()
                while True:
                    await transport.receive(READ_SIZE)
            except (anyio.EndOfStream, NotImplementedError):
                pass
            except Exception as exc:  # a broken or closed transport: nothing more to wait for
                self.log.debug("transport ended while closing", error=repr(exc))
        await anyio.aclose_forcefully(transport)

    async def _writer_task(self) -> None:
        try:
            await self._writer()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._mark_closed(f"transport write failed: {exc!r}")
            if self._task_group is not None:
                self._task_group.cancel_scope.cancel()

    async def _run_handler(self, stream: TunnelStream) -> None:
        assert self.handler is not None
        try:
            await self.handler(stream)
        except Exception as exc:
            self.log.warning("stream handler failed", stream=stream.stream_id, error=repr(exc))
        finally:
            if not stream.handed_off:  # a consumer the handler attached closes the stream when it is done
                with anyio.CancelScope(shield=True):
                    await stream.aclose()

    async def _reader_task(self) -> None:
        try:
            await self._reader()
        finally:
            if not self._closed.is_set():
                self._mark_closed("reader stopped")

    def _fail_read(self, exc: BaseException) -> None:
        """The transport's receive ended the tunnel: the peer closed it, or it broke."""
        if isinstance(exc, anyio.EndOfStream):
            self._fail("transport closed by peer")
        else:
            self._fail(f"transport failed: {exc!r}")

    async def _reader(self) -> None:
        receive_nowait, set_on_readable = self._receive_nowait, self._set_on_readable
        if receive_nowait is not None and set_on_readable is not None:
            # push mode: the transport calls us when bytes arrive; this task only keeps the tunnel's lifetime
            set_on_readable(self._on_readable)
            try:
                self._on_readable()  # whatever arrived before we asked (a server session's first datagram)
                await self._closed.wait()
            finally:
                set_on_readable(None)
            return
        while not self._closed.is_set():
            try:
                data = await self.transport.receive(READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self._fail_read(exc)
                return
            if not self._take_input(data):
                return
            await self._maybe_pause_reading()

    def _take_input(self, data: bytes) -> bool:
        """Feed transport bytes to the tunnel and act on its events; ``False`` once the tunnel is closed."""
        try:
            evs = self.tunnel.receive_data(data, _now())
        except VTunnelError as exc:
            self.flush()
            self.log.warning("peer protocol error", error=str(exc))
            self._fail(f"protocol error: {exc}")
            return False
        self._handle_events(evs)
        self.flush()
        return not self._closed.is_set()

    def _paused(self) -> bool:
        """Whether reading stops for a full stream buffer (only without flow control: vproxy's behaviour)."""
        return bool(self._over_limit) and not self.tunnel.extensions.flow_control

    def _on_readable(self) -> None:
        """Push mode: the transport has bytes (or has ended). Take them now, in the transport's own callback.

        Runs the same steps as the reader task, without the task: no loop iteration between a datagram and the
        stream it carries. Re-entry (a stream consumer reading, and so resuming, from inside the events) only
        marks that another pass is due.
        """
        if self._draining:
            self._drain_again = True
            return
        receive_nowait = self._receive_nowait
        assert receive_nowait is not None
        self._draining = True
        try:
            while not self._closed.is_set():
                self._drain_again = False
                if self._paused():
                    self._push_paused = True  # resume_reading() calls back
                    return
                try:
                    data = receive_nowait(READ_SIZE)
                except (
                    anyio.EndOfStream,
                    anyio.BrokenResourceError,
                    anyio.ClosedResourceError,
                    OSError,
                ) as exc:
                    self._fail_read(exc)
                    return
                if not data:
                    if self._drain_again:
                        continue
                    return
                if not self._take_input(data):
                    return
        except Exception as exc:  # a bug must not leave a tunnel half alive inside a transport callback
            self.log.error("tunnel input failed", error=repr(exc))
            self._fail(f"internal error: {exc!r}")
        finally:
            self._draining = False

    def _resume_push(self) -> None:
        if self._push_paused and not self._paused():
            self._push_paused = False
            self._on_readable()

    async def _maybe_pause_reading(self) -> None:
        if self.tunnel.extensions.flow_control:
            return
        while not self._closed.is_set():
            if not self._over_limit:
                return
            self._reader_resume = anyio.Event()
            await self._reader_resume.wait()

    def resume_reading(self, stream: TunnelStream | None = None) -> None:
        """A stream's buffer shrank (or anything else the paused reader may be waiting for happened)."""
        if stream is not None and stream.buffered <= UNCONTROLLED_BUFFER_LIMIT:
            self._over_limit.discard(stream.stream_id)
        self._reader_resume.set()
        if self._push_paused:
            self._resume_push()

    async def _timer(self) -> None:
        while not self._closed.is_set():
            deadline = self.tunnel.next_deadline()
            delay = math.inf if deadline is None else max(0.0, deadline - _now())
            self._timer_wakeup = anyio.Event()
            self._timer_deadline = math.inf if deadline is None else deadline
            with anyio.move_on_after(delay):
                await self._timer_wakeup.wait()
                continue
            try:
                evs = self.tunnel.handle_timer(_now())
            except VTunnelError as exc:
                self.flush()
                self._fail(f"protocol error: {exc}")
                return
            self._handle_events(evs)
            self.flush()

    def _fail(self, reason: str) -> None:
        self._mark_closed(reason)

    def _mark_closed(self, reason: str) -> None:
        if self._closed.is_set():
            return
        self._close_reason = reason
        self.log.info("tunnel closed", reason=reason, streams=len(self.streams))
        self._closed.set()
        for stream in list(self.streams.values()):
            stream.deliver_tunnel_closed()
        self._writer_wakeup.set()
        if self._outbound_drained is not None:
            self._outbound_drained.set()
        self._reader_resume.set()
        self._timer_wakeup.set()

    # ------------------------------------------------------------------ events
    def _handle_events(self, evs: list[events.Event]) -> None:
        streams = self.streams
        for ev in evs:
            if isinstance(ev, events.DataReceived):
                s = streams.get(ev.stream_id)
                if s is not None:
                    s.deliver_data(ev.data)
                    if s.buffered > UNCONTROLLED_BUFFER_LIMIT:
                        self._over_limit.add(ev.stream_id)
                else:  # a stream we already closed: give the credit back
                    self.tunnel.acknowledge_received_data(ev.stream_id, len(ev.data))
            elif isinstance(ev, events.WindowUpdated):
                if ev.stream_id == 0:
                    for s in streams.values():
                        s.deliver_window()
                else:
                    s2 = streams.get(ev.stream_id)
                    if s2 is not None:
                        s2.deliver_window()
            elif isinstance(ev, events.StreamOpened):
                self._on_stream_opened(ev)
            elif isinstance(ev, events.StreamAccepted):
                s3 = streams.get(ev.stream_id)
                if s3 is not None:
                    s3.deliver_accepted()
            elif isinstance(ev, events.StreamEnded):
                s4 = streams.get(ev.stream_id)
                if s4 is not None:
                    s4.deliver_eof()
            elif isinstance(ev, events.StreamReset):
                s5 = streams.get(ev.stream_id)
                if s5 is not None:
                    s5.deliver_reset(ev.error)
            elif isinstance(ev, events.HandshakeCompleted):
                self.log.debug("tunnel ready", extensions=str(ev.extensions))
                self._ready.set()
            elif isinstance(ev, events.GoAwayReceived):
                self.log.info("peer is shutting down", reason=ev.reason, last_stream_id=ev.last_stream_id)
                for sid, s6 in list(streams.items()):
                    if sid > ev.last_stream_id:
                        s6.deliver_reset("refused")
            elif isinstance(ev, events.TunnelClosed):
                self._mark_closed(ev.reason)

    def _on_stream_opened(self, ev: events.StreamOpened) -> None:
        tg = self._task_group
        if self.handler is None or tg is None or self._closed.is_set():
            self.tunnel.reset_stream(ev.stream_id, error="refused")
            return
        stream = TunnelStream(self, ev.stream_id, ev.metadata, accepted=False)
        self.streams[ev.stream_id] = stream
        tg.start_soon(self._run_handler, stream)  # straight from the reader: no queue, no extra hop

    def forget_stream(self, stream_id: int) -> None:
        """A stream of this connection was closed by its user: drop it (called by ``TunnelStream`` only)."""
        self.streams.pop(stream_id, None)
        self._over_limit.discard(stream_id)
        self._reader_resume.set()
        if self._push_paused:
            self._resume_push()

    # ------------------------------------------------------------------ API
    async def open_stream(
        self, metadata: StreamMetadata | None = None, *, wait_accepted: bool = True
    ) -> TunnelStream:
        """Open a stream (client role).

        With ``wait_accepted`` the call returns once the server's SYN-ACK arrived and raises
        :class:`StreamRefused` if it answered with an RST; without it the stream is returned at once and the first
        bytes follow the SYN (0-RTT), a refusal then surfacing on the stream's first receive.
        """
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
        self.flush()
        if wait_accepted:
            try:
                await stream.wait_accepted()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
                raise
        return stream

    def shutdown(self, reason: str, *, graceful: bool = True) -> None:
        """Send GOAWAY. Graceful: open streams may finish; the tunnel closes when they have (or on timeout)."""
        if self._closed.is_set():
            return
        with contextlib.suppress(VTunnelError):
            self.tunnel.shutdown(reason, graceful=graceful)
        self.flush()
        if (not graceful or not self.streams) and not graceful:
            self._mark_closed(reason)
