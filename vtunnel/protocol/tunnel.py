"""The sans-IO tunnel: vproxy's streamed-ARQ protocol plus vtunnel's negotiated extensions.

Bytes in (``receive_data``), bytes out (``data_to_send``), events out, deadlines out; time only as ``now``.
The tunnel's rules live in ``machine.TUNNEL_TRANSITIONS``, the streams' in ``stream.STREAM_TRANSITIONS``.
"""

from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import Callable
from enum import Enum
from typing import Final, NoReturn

from vtunnel.protocol import frames as fr
from vtunnel.protocol.errors import (
    ConfigError,
    ErrorCode,
    FlowControlError,
    LocalProtocolError,
    MetadataNotNegotiated,
    RemoteProtocolError,
    StreamClosedError,
)
from vtunnel.protocol.events import (
    DataReceived,
    Event,
    GoAwayReceived,
    HandshakeCompleted,
    PingAcknowledged,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    TunnelClosed,
    WindowUpdated,
)
from vtunnel.protocol.keepalive import Keepalive, KeepaliveAction
from vtunnel.protocol.metadata import (
    DATAGRAM_KINDS,
    HeaderBlockError,
    MetadataCodec,
    StreamMetadata,
    error_of,
    parse_metadata,
)
from vtunnel.protocol.settings import (
    Extensions,
    PeerSettings,
    TunnelConfig,
    local_settings,
    negotiate,
    parse_peer_settings,
)
from vtunnel.protocol.stream_machine import (
    LIVE_STATES,
    STREAM_TRANSITIONS,
    Stream,
    StreamEffect,
    StreamInput,
    StreamState,
    StreamTransitionError,
)
from vtunnel.protocol.tunnel_machine import TUNNEL_TRANSITIONS, TunnelEffect, TunnelInput, TunnelState

__all__ = ["Role", "Tunnel"]

EMPTY_SETTINGS = fr.encode_settings(())
GZIP_THRESHOLD = 1024
#: how much of a DATA payload :func:`_looks_like_text` reads
TEXT_SAMPLE = 512
#: the bytes text is made of: printable ASCII, tab, CR, LF (UTF-8 text beyond ASCII counts as not text: it
#: compresses less, and the check only has to keep gzip off what cannot shrink: TLS records, media, archives)
_TEXT_BYTES = bytes(range(32, 127)) + b"\t\r\n"


def _looks_like_text(data: bytes | memoryview) -> bool:
    """Whether ``data`` starts like text (at least 90% text bytes in its first :data:`TEXT_SAMPLE`): only then is
    gzip tried. Encrypted or already compressed payloads never shrink, and compressing them costs a deflate each."""
    sample = bytes(data[:TEXT_SAMPLE])
    return len(sample.translate(None, _TEXT_BYTES)) * 10 <= len(sample)


VPROXY_INFLATE_LIMIT = 1 << 20
MAX_STREAM_ID = (1 << 31) - 1
_SENDING_STATES = frozenset({StreamState.SYN_SENT, StreamState.ESTABLISHED, StreamState.FIN_RECV})
_PEER_SENDING_STATES = frozenset({StreamState.SYN_SENT, StreamState.ESTABLISHED, StreamState.FIN_SENT})
_KNOWN_TYPES = frozenset(int(t) for t in fr.FrameType)
#: a stream window that is read grows by this many times itself at each WINDOW_UPDATE (fourfold): from the first
#: grant to the largest window in four updates, each a round trip or, behind a lost packet, two or three, so a
#: transfer that starts on a lossy path is held by its window for a few round trips, not a dozen
_WINDOW_GROWTH: Final = 3
# plain ints on the per-frame path (enum attribute lookups cost more than the work they name)
_DATA = int(fr.FrameType.DATA)
_HEADERS = int(fr.FrameType.HEADERS)
_SETTINGS = int(fr.FrameType.SETTINGS)
_PING = int(fr.FrameType.PING)
_GOAWAY = int(fr.FrameType.GOAWAY)
_WINDOW_UPDATE = int(fr.FrameType.WINDOW_UPDATE)
_END_STREAM = fr.END_STREAM
_PACK_HEADER = struct.Struct(">IBI").pack  # DATA header: (length << 8 | type 0), flags, stream id
_GZIP = fr.GZIP
_PASSTHROUGH = fr.PASSTHROUGH
DEFAULT_CONFIG = TunnelConfig()
# DATA fast paths: states where the tables map the input back to the same state with the plain effect, so
# skipping the lookup is exactly the table's transition (derived from the tables, never listed by hand)
_DISPATCHING = frozenset(
    s
    for s in TunnelState
    if TUNNEL_TRANSITIONS.get((s, TunnelInput.RECV_FRAME)) == (TunnelEffect.DISPATCH, s)
)
_RECV_DATA_LOOPS = frozenset(
    s for s in StreamState if STREAM_TRANSITIONS.get((s, StreamInput.RECV_DATA)) == (StreamEffect.PERFORM, s)
)
_SEND_DATA_LOOPS = frozenset(
    s for s in StreamState if STREAM_TRANSITIONS.get((s, StreamInput.SEND_DATA)) == (StreamEffect.PERFORM, s)
)


class Role(Enum):
    CLIENT = "client"
    SERVER = "server"


class _Closed(Exception):
    """Internal: the tunnel just closed; stop processing input."""


class Tunnel:
    """One tunnel endpoint (wire format: docs/protocol.md; contract: docs/architecture.md)."""

    def __init__(self, *, role: Role, config: TunnelConfig = DEFAULT_CONFIG, max_datagram: int = 0) -> None:
        """``max_datagram``: the largest unreliable datagram the transport carries (``Link.max_datagram``); 0, or
        too small for a datagram's header: none, and the ``datagrams`` extension is not offered."""
        if not isinstance(max_datagram, int) or max_datagram < 0:
            raise ConfigError(f"max_datagram must be an int >= 0, not {max_datagram!r}")
        self.role = role
        self.config = config
        #: the ``datagrams`` extension is offered: the transport has room for a header and a byte
        self._offers_datagrams = max_datagram > fr.DATAGRAM_HEADER_SIZE
        self._datagram_room = max_datagram - fr.DATAGRAM_HEADER_SIZE
        #: the largest datagram of a ``udp`` stream sent unreliably (-1: none, the extension is off)
        self._unreliable_max = -1
        self._datagrams_out: list[bytes] = []
        #: unreliable datagrams: queued for the transport, delivered, and dropped on arrival (unknown or closed
        #: stream, malformed, over the stream's window, before the handshake or without the extension)
        self.datagrams_sent = 0
        self.datagrams_received = 0
        self.datagrams_dropped = 0
        self._state = TunnelState.INIT
        self._streams: dict[int, Stream] = {}
        self._live = 0
        self._decoder = fr.FrameDecoder()
        self._out: list[bytes | memoryview] = []
        # bytes_to_send, kept as frames are queued: the size of _out[:_out_counted]
        self._out_counted = 0
        self._out_bytes = 0
        self._events: list[Event] = []
        # consecutive DATA payloads of one byte stream, delivered as one DataReceived (views of the input)
        self._run: list[bytes | memoryview] = []
        self._run_sid = 0
        self._run_passthrough = 0  # the run is of PASSTHROUGH frames (lite-tls): a run never mixes the kinds
        self._ext = Extensions()
        self._gzip_out = False  # DATA may go out gzipped (negotiated, or configured for a vproxy peer)
        self._send_frame_size = config.max_frame_size
        self._inflate_limit = max(config.max_frame_size, VPROXY_INFLATE_LIMIT)
        self._peer_stream_window = fr.MAX_WINDOW
        self._tunnel_send_window = fr.MAX_WINDOW
        #: the streams whose ``send_window`` the tunnel's window cut short since the last tunnel-wide WINDOW_UPDATE:
        #: the next one tells them (``WindowUpdated``), and no other (a thousand streams would be told each time)
        self._tunnel_limited: set[int] = set()
        self._tunnel_recv_remaining = config.initial_tunnel_window
        self._tunnel_recv_unannounced = 0
        #: tunnel credit is announced once this much is due: half the tunnel window
        self._tunnel_update_at = config.initial_tunnel_window // 2
        self._buffered = 0  # delivered, not yet acknowledged, over all streams
        # what the stream windows hold beyond min_stream_window, over all streams (together within receive_budget)
        self._granted = 0  # first windows (initial_stream_window) of new streams, within half the budget
        self._grown = 0  # growth of windows that are being read (up to max_stream_window), see _growth_room
        self._next_stream_id = 1
        self._highest_peer_stream = 0
        self._now = 0.0
        self._started = False
        self._handshake_deadline: float | None = None
        self._keepalive = Keepalive(
            interval=config.keepalive_interval,
            timeout=config.keepalive_timeout,
            max_missed=config.keepalive_max_missed,
        )
        self._drain_deadline: float | None = None
        self._drain_reason = ""
        self._drain_by_peer = False
        self._headers: MetadataCodec | None = None

    # ------------------------------------------------------------------ properties

    @property
    def state(self) -> TunnelState:
        return self._state

    @property
    def extensions(self) -> Extensions:
        return self._ext

    @property
    def max_frame_payload(self) -> int:
        """The largest DATA payload this side sends (and so the largest datagram of a ``udp`` stream)."""
        return self._send_frame_size

    @property
    def max_unreliable_payload(self) -> int:
        """The largest datagram of a ``udp`` or ``tun`` stream this side sends as an unreliable datagram (one
        larger goes as a DATA frame); 0 without the ``datagrams`` extension."""
        return max(self._unreliable_max, 0)

    @property
    def open_stream_count(self) -> int:
        """Streams not yet dead (syn_sent, established, fin_sent, fin_recv)."""
        return self._live

    def stream_state(self, stream_id: int) -> StreamState:
        """A stream's state; ``REAL_CLOSED`` once closed and freed, ``NONE`` for an id never seen."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream.state
        if self._is_past_id(stream_id):
            return StreamState.REAL_CLOSED
        return StreamState.NONE

    # ------------------------------------------------------------------ I/O surface

    def initiate(self, now: float) -> None:
        """Client: queue the SETTINGS handshake. Server: start the handshake timer."""
        self._start(now)
        if self.role is Role.SERVER:
            return
        self._tunnel_input(TunnelInput.INITIATE)
        self._out.append(fr.encode_settings(local_settings(self.config, datagrams=self._offers_datagrams)))

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """Bytes from the transport. Peer faults never raise: see ``errors`` for the rule."""
        self._now = now
        if not self._started:
            self._start(now)
        state = self._state
        if state is TunnelState.INIT and self.role is Role.CLIENT:
            raise LocalProtocolError("call initiate() before receive_data() on a client tunnel")
        if state is TunnelState.CLOSED or not data:
            return self._take_events()
        self._keepalive.last_recv = now  # the peer is alive (Keepalive.received, inline: once per input)
        frames, error = self._decoder.feed_views(data)
        try:
            on_data = self._on_data
            for frame in frames:
                ftype, flags, sid, payload = frame
                if ftype == _DATA and self._state in _DISPATCHING and not sid & 0x80000000:
                    on_data(flags, sid, payload)  # the table's (state, RECV_FRAME) -> (DISPATCH, state)
                else:
                    self._on_frame(ftype, flags, sid, bytes(payload))
            if error is not None:
                code = ErrorCode.FRAME_SIZE_ERROR if error.frame_size else ErrorCode.PROTOCOL_ERROR
                self._fail(error.reason, code)
            if self._state is TunnelState.DRAINING:
                self._check_drain()
        except _Closed:
            pass
        if self._run:  # (_take_events, inline: once per input)
            self._flush_run()
        events = self._events
        self._events = []
        return events

    def data_to_send(self, limit: int | None = None) -> bytes:
        """What is queued for the transport, all of it or its first ``limit`` bytes (drains what it returns;
        ``b""`` when empty). The output is one byte stream: a frame may be cut anywhere, its rest goes next."""
        if not self._out:
            return b""
        if limit is not None and limit < self.bytes_to_send:
            return self._take_out(limit)
        out = self._out
        self._out = []
        self._out_counted = self._out_bytes = 0
        if len(out) == 1:
            return bytes(out[0])
        return b"".join(out)

    def _take_out(self, limit: int) -> bytes:
        """The first ``limit`` bytes of the queue (fewer than it holds, all of it counted by ``bytes_to_send``)."""
        if limit <= 0:
            return b""
        out = self._out
        taken: list[bytes | memoryview] = []
        size = 0
        whole = 0
        for piece in out:
            n = len(piece)
            if size + n > limit:
                cut = limit - size
                if cut:
                    view = memoryview(piece)
                    taken.append(view[:cut])
                    out[whole] = view[cut:]
                break
            taken.append(piece)
            size += n
            whole += 1
        del out[:whole]
        self._out_bytes -= limit
        self._out_counted = len(out)
        return b"".join(taken)

    def datagrams_to_send(self) -> list[bytes]:
        """The unreliable datagrams queued for the transport (drains the queue): each goes as one datagram, in
        any order with the bytes of ``data_to_send``. Only with the ``datagrams`` extension."""
        out = self._datagrams_out
        if out:
            self._datagrams_out = []
        return out

    @property
    def has_datagrams_to_send(self) -> bool:
        return bool(self._datagrams_out)

    def receive_datagram(self, datagram: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """One unreliable datagram from the transport: a ``DataReceived`` for its ``udp`` stream, or nothing.

        Never fails the tunnel or a stream: what cannot be delivered (malformed, an unknown, closed or not yet
        open stream, a stream that is not ``udp``, past the stream's receive window, larger than our
        ``max_frame_size``, before the handshake or without the extension) is dropped and counted in
        ``datagrams_dropped``, as the network would have dropped it.
        """
        self._start(now)
        if not self._ext.datagrams or self._state not in _DISPATCHING:
            self.datagrams_dropped += 1
            return self._take_events()
        try:
            sid, payload = fr.decode_stream_datagram(datagram)
        except fr.FrameError:
            self.datagrams_dropped += 1
            return self._take_events()
        self._keepalive.received(now)  # the peer is alive
        stream = self._streams.get(sid)
        size = len(payload)
        if (
            stream is None
            or not stream.datagram
            or stream.state not in _RECV_DATA_LOOPS
            or (self.role is Role.CLIENT and not stream.accepted)
            or size > self.config.max_frame_size
            or stream.recv_unacked + size > stream.recv_window
        ):
            self.datagrams_dropped += 1
            return self._take_events()
        stream.recv_unacked += size
        stream.recv_unreliable += size
        self._buffered += size
        self.datagrams_received += 1
        self._emit(DataReceived(stream_id=sid, data=bytes(payload)))
        return self._take_events()

    @property
    def has_data_to_send(self) -> bool:
        """Whether ``data_to_send()`` would return bytes now (cheaper than ``bytes_to_send``)."""
        return bool(self._out)

    @property
    def bytes_to_send(self) -> int:
        """How many bytes ``data_to_send()`` would return now (counts only the frames queued since it was last
        asked: a queue of thousands of frames is not summed again on every call)."""
        out = self._out
        counted = self._out_counted
        if counted < len(out):
            self._out_bytes += sum(map(len, out[counted:]))
            self._out_counted = len(out)
        return self._out_bytes

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` must be called next (``None``: no timer needed)."""
        if self._events:
            return self._now
        state = self._state
        if state is TunnelState.CLOSED:
            return None
        if state is TunnelState.INIT or state is TunnelState.HANDSHAKE_SENT:
            return self._handshake_deadline
        keepalive = self._keepalive  # (keepalive.deadline() inline: asked after every input and write)
        sent_at = keepalive.sent_at
        deadline = (
            keepalive.last_recv + keepalive.interval if sent_at is None else sent_at + keepalive.timeout
        )
        drain = self._drain_deadline
        if drain is not None and drain < deadline:
            deadline = drain
        return deadline if deadline < math.inf else None

    def handle_timer(self, now: float) -> list[Event]:
        """Run the handshake timeout, keepalive and drain timeout for time ``now``."""
        self._start(now)
        with contextlib.suppress(_Closed):
            self._run_timers(now)
        return self._take_events()

    # ------------------------------------------------------------------ streams (local API)

    def open_stream(self, *, metadata: StreamMetadata | None = None) -> int:
        """Client: open a stream (queues the SYN; with the metadata extension, data may follow at once)."""
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only the client opens streams")
        self._tunnel_input(TunnelInput.OPEN_STREAM)
        # ready (the input above checked it), so the extensions are settled
        if (
            metadata is not None
            and self._headers is None
            and (metadata.authority is not None or metadata.kind != "tcp" or metadata.headers)
        ):
            raise MetadataNotNegotiated(
                "the peer did not agree to the metadata extension: a SYN cannot name "
                f"{metadata.authority or 'a destination'} (kind {metadata.kind})"
            )
        if metadata is not None and metadata.kind == "tun" and not self._ext.tun:
            raise MetadataNotNegotiated(
                "the peer did not agree to the tun extension: it carries no IP packets"
            )
        if self._live >= self.config.max_concurrent_streams:
            raise LocalProtocolError(f"already {self._live} open streams (max_concurrent_streams)")
        sid = self._next_stream_id
        if sid > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted: open a new tunnel")
        self._next_stream_id = sid + 2
        stream = self._new_stream(sid)
        stream.metadata = metadata
        stream.datagram = metadata is not None and metadata.kind in DATAGRAM_KINDS
        self._apply(stream, StreamInput.SEND_SYN)
        block = b""
        if metadata is not None and self._headers is not None:
            block = self._headers.encode_metadata(metadata)
        self._out.append(fr.encode_headers(sid, block))
        self._grant(stream)
        return sid

    def accept_stream(self, stream_id: int, *, headers: tuple[tuple[str, str], ...] = ()) -> None:
        """Server: answer the peer's SYN with a SYN-ACK (idempotent). ``headers`` ride in its header block (the
        metadata extension; without it they cannot be sent, and LocalProtocolError says so)."""
        if self.role is not Role.SERVER:
            raise LocalProtocolError("only the server accepts streams")
        stream = self._stream_for_local(stream_id)
        if stream.accepted:
            return
        if headers and self._headers is None:
            raise LocalProtocolError("a SYN-ACK carries headers only with the metadata extension")
        self._local(stream, StreamInput.SEND_SYN_ACK)
        stream.accepted = True
        block = self._headers.encode(list(headers)) if headers and self._headers is not None else b""
        self._out.append(fr.encode_headers(stream_id, block))

    @property
    def received_unread(self) -> int:
        """Bytes delivered on all streams that the application has not acknowledged yet."""
        return self._buffered

    def unacknowledged(self, stream_id: int) -> int:
        """Bytes delivered on ``stream_id`` that the application has not acknowledged yet (0 if it is gone)."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else stream.recv_unacked

    def send_window(self, stream_id: int) -> int:
        """Bytes ``send_data`` accepts now on this stream (0 when it can no longer send)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.state not in _SENDING_STATES:
            return 0
        if self._ext.flow_control:
            window = stream.send_window
            if self._tunnel_send_window < window:
                window = self._tunnel_send_window
                self._tunnel_limited.add(stream_id)
            return max(0, window)
        if self._holds(stream):
            return max(0, self.config.initial_stream_window - stream.pending_len)
        return fr.MAX_WINDOW

    def send_data(
        self,
        stream_id: int,
        data: bytes | bytearray | memoryview,
        *,
        end_stream: bool = False,
        passthrough: bool = False,
    ) -> None:
        """PSH (and FIN with ``end_stream``). Raises FlowControlError past ``send_window(stream_id)``.

        Data is split into frames of at most ``max_frame_payload`` bytes. On a ``udp`` stream each call is one
        datagram, sent as exactly one DATA frame (an empty datagram too); a larger one raises LocalProtocolError.
        ``passthrough`` (lite-tls negotiated; a byte stream): ``data`` is one or more whole TLS application-data
        records of a lite-tls stream that has left the tunnel, sent as PASSTHROUGH frames: one per record (of up
        to ``MAX_PASSTHROUGH_PAYLOAD`` bytes), or with ``lite-tls-runs`` one per run of consecutive records (up to
        ``MAX_PASSTHROUGH_RUN`` bytes and ``MAX_RUN_RECORDS`` records; a longer record alone); anything else
        raises LocalProtocolError and sends nothing.
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamClosedError(f"stream {stream_id} is unknown or closed")
        if type(data) is bytes:  # (bytes are immutable: queued as they are, no view)
            view: bytes | memoryview = data
            size = len(data)
        else:
            view = fr.byte_view(data)
            size = len(view)
        datagram = stream.datagram
        ends = self._passthrough_records(stream, view, end_stream) if passthrough else None
        if size or (datagram and not end_stream):
            fast = stream.state in _SEND_DATA_LOOPS and stream.accepted
            if datagram and fast and size <= self._unreliable_max and not end_stream:
                # both ends know the stream is open (ours accepted it, or its SYN-ACK came): an unreliable
                # datagram, outside the frame stream and its credit (docs/protocol.md, "Unreliable datagrams")
                self._datagrams_out.append(fr.encode_stream_datagram(stream_id, view))
                self.datagrams_sent += 1
                return
            if not fast:
                self._check_local(stream, StreamInput.SEND_DATA)
            if datagram and size > self._send_frame_size:
                raise LocalProtocolError(
                    f"a {size}-byte datagram exceeds the {self._send_frame_size}-byte frame payload"
                )
            if fast and self._ext.flow_control:  # send_window(stream_id) of an open stream, inline
                window = stream.send_window
                if self._tunnel_send_window < window:
                    window = self._tunnel_send_window
                    self._tunnel_limited.add(stream_id)
                window = max(window, 0)
            else:
                window = self.send_window(stream_id)
            if size > window:
                raise FlowControlError(f"{size} bytes exceed stream {stream_id}'s send window ({window})")
            if not fast:  # else the table's (state, SEND_DATA) -> (PERFORM, state), nothing to accept
                self._auto_accept(stream)
                self._apply(stream, StreamInput.SEND_DATA)
            if self._ext.flow_control:
                stream.send_window -= size
                self._tunnel_send_window -= size
            payload = view if isinstance(view, bytes) or view.readonly else view.tobytes()
            if ends is not None:
                append = self._out.append
                records = payload if isinstance(payload, memoryview) else memoryview(payload)
                start = 0
                for end in ends:
                    append(_PACK_HEADER((end - start) << 8, _PASSTHROUGH, stream.id))
                    append(records[start:end])
                    start = end
            else:  # (a mutable buffer the caller may reuse is copied)
                self._queue_data(stream, payload, size)
        if end_stream:
            self.end_stream(stream_id)

    def _passthrough_records(self, stream: Stream, view: bytes | memoryview, end_stream: bool) -> list[int]:
        """Where each PASSTHROUGH frame of ``view`` ends: after each whole TLS application-data record, or with
        ``lite-tls-runs`` after each run of them."""
        if not self._ext.lite_tls:
            raise LocalProtocolError("PASSTHROUGH DATA needs the lite-tls extension")
        if stream.datagram or end_stream or not view:
            raise LocalProtocolError(
                "PASSTHROUGH DATA is whole TLS records on a byte stream, without END_STREAM"
            )
        ends: list[int] = []
        pos = 0
        size = len(view)
        runs = self._ext.lite_tls_runs
        run_start = 0  # where the current frame begins, and its records so far
        count = 0
        while pos < size:
            end = pos + 5 + ((view[pos + 3] << 8) | view[pos + 4]) if pos + 5 <= size else size + 1
            if end > size or view[pos] != 0x17 or view[pos + 1] != 3 or view[pos + 2] != 3:
                raise LocalProtocolError(
                    "PASSTHROUGH DATA must be whole TLS application-data records (17 03 03)"
                )
            if end - pos > fr.MAX_PASSTHROUGH_PAYLOAD:
                raise LocalProtocolError(f"a TLS record longer than {fr.MAX_PASSTHROUGH_PAYLOAD} bytes")
            if runs:
                if count and (end - run_start > fr.MAX_PASSTHROUGH_RUN or count == fr.MAX_RUN_RECORDS):
                    ends.append(pos)
                    run_start = pos
                    count = 0
                count += 1
            else:
                ends.append(end)
            pos = end
        if runs:
            ends.append(size)
        return ends

    def end_stream(self, stream_id: int) -> None:
        """FIN: we send nothing more on this stream; the peer may go on sending."""
        stream = self._stream_for_local(stream_id)
        self._check_local(stream, StreamInput.SEND_FIN)
        self._auto_accept(stream)
        self._apply(stream, StreamInput.SEND_FIN)
        frame = fr.frame_header(fr.FrameType.DATA, fr.END_STREAM, stream_id, 0)
        if self._holds(stream):
            stream.pending.append(frame)
        else:
            self._out.append(frame)
        self._check_drain_later()

    def reset_stream(self, stream_id: int, *, error: str | None = None) -> None:
        """RST: abort the stream both ways. ``error`` travels only with the metadata extension."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        effect = self._local(stream, StreamInput.SEND_RST)
        if effect is StreamEffect.PERFORM:
            stream.pending.clear()
            stream.pending_len = 0
            self._out.append(self._rst_frame(stream_id, error))
            self._check_drain_later()

    def close_stream(self, stream_id: int) -> None:
        """The user is done with the stream: free it. A stream still live is aborted with an RST first."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        effect = self._local(stream, StreamInput.USER_CLOSE)
        if effect is StreamEffect.RESET:
            self._out.append(self._rst_frame(stream_id, None))
        del self._streams[stream_id]
        self._buffered -= stream.recv_unacked
        stream.recv_unacked = 0
        self._granted -= stream.recv_granted
        self._grown -= stream.recv_window - self.config.min_stream_window - stream.recv_granted
        self._check_drain_later()

    def acknowledge_received_data(self, stream_id: int, n: int) -> bool:
        """The application consumed ``n`` delivered bytes: return credit (WINDOW_UPDATE at half a window).
        True when that queued a WINDOW_UPDATE (there is something to send), else False."""
        if n < 0:
            raise LocalProtocolError("cannot acknowledge a negative amount")
        stream = self._streams.get(stream_id)
        if stream is None or n == 0:
            return False
        if n > stream.recv_unacked:
            raise LocalProtocolError(
                f"acknowledging {n} bytes but only {stream.recv_unacked} are unacknowledged on {stream_id}"
            )
        stream.recv_unacked -= n
        self._buffered -= n
        if stream.recv_unreliable:  # unreliable datagrams used no credit: none returns for them
            unreliable = min(n, stream.recv_unreliable)
            stream.recv_unreliable -= unreliable
            n -= unreliable
        if not self._ext.flow_control or self._state is TunnelState.CLOSED or n == 0:
            return False
        if stream.state in _PEER_SENDING_STATES:
            stream.recv_unannounced += n
            window = stream.recv_window
            if stream.recv_unannounced >= window // 2:
                increment = stream.recv_unannounced
                stream.recv_unannounced = 0
                # being read: the window grows fourfold, as far as the receive budget has room for growth
                growth = min(
                    _WINDOW_GROWTH * window, self.config.max_stream_window - window, self._growth_room()
                )
                if growth > 0:
                    stream.recv_window = window + growth
                    self._grown += growth
                    increment += growth
                stream.recv_remaining += increment
                self._out.append(fr.encode_window_update(stream_id, increment))
                return True
        return False

    def shutdown(self, reason: str, *, graceful: bool = True) -> None:
        """GOAWAY. Graceful: no new streams, open ones finish (at most ``drain_timeout``), then close."""
        event = TunnelInput.SEND_GOAWAY_GRACEFUL if graceful else TunnelInput.SEND_GOAWAY
        effect = self._tunnel_input(event)
        if effect is TunnelEffect.CLOSE:
            try:
                self._close(reason, by_peer=False, send_goaway=True)
            except _Closed:
                return
        elif effect is TunnelEffect.START_DRAIN:
            self._drain_reason = reason
            self._drain_by_peer = False
            self._drain_deadline = self._now + self.config.drain_timeout
            if self._ext.graceful_shutdown:
                last = self._highest_peer_stream
                self._out.append(fr.encode_goaway(reason, last_stream_id=last, code=ErrorCode.NO_ERROR))
            self._check_drain_later()

    # ------------------------------------------------------------------ receiving

    def _on_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if ftype not in _KNOWN_TYPES or (ftype == _WINDOW_UPDATE and not self._ext.flow_control):
            self._fail(f"unknown frame type 0x{ftype:02x}")
        if sid & 0x80000000:
            self._fail(f"stream id 0x{sid:08x} has the top bit set")
        if ftype == _SETTINGS:
            self._on_settings(flags, payload)
            return
        if ftype == _GOAWAY:
            self._on_goaway(payload)
            return
        effect = self._tunnel_input(TunnelInput.RECV_FRAME)
        if effect is TunnelEffect.IGNORE:
            return
        if ftype == _DATA:
            self._on_data(flags, sid, payload)
        elif ftype == _HEADERS:
            self._on_headers(flags, sid, payload)
        elif ftype == _PING:
            self._on_ping(flags, payload)
        else:
            self._on_window_update(sid, payload)

    def _on_settings(self, flags: int, payload: bytes) -> None:
        effect = self._tunnel_input(TunnelInput.RECV_HANDSHAKE)
        if effect is TunnelEffect.IGNORE:
            return
        if flags & fr.ACK:
            self._fail("handshake: SETTINGS with the ACK flag")
        peer: PeerSettings | None = None
        if payload:
            try:
                peer = parse_peer_settings(fr.decode_settings(payload))
            except fr.FrameError as exc:
                self._fail(f"handshake: {exc.reason}", ErrorCode.FRAME_SIZE_ERROR)
            except ValueError as exc:
                self._fail(f"handshake: {exc}")
        if effect is TunnelEffect.ANSWER_HANDSHAKE:
            if peer is not None and self.config.extensions:
                settings = local_settings(self.config, datagrams=self._offers_datagrams)
                self._out.append(fr.encode_settings(settings))
            else:
                peer = None
                self._out.append(EMPTY_SETTINGS)
        elif peer is not None and not self.config.extensions:
            self._fail("handshake: the answer is not the empty SETTINGS we sent")
        self._complete_handshake(peer)

    def _complete_handshake(self, peer: PeerSettings | None) -> None:
        self._ext = ext = negotiate(self.config, peer, datagrams=self._offers_datagrams)
        # a vproxy peer (empty SETTINGS) inflates the GZIP flag unasked, and vproxy itself sends it
        self._gzip_out = ext.gzip or (peer is None and self.config.gzip)
        self._handshake_deadline = None
        self._keepalive.received(self._now)
        if peer is not None:
            self._send_frame_size = min(self.config.max_frame_size, peer.max_frame_size)
            self._decoder.max_payload = self.config.max_frame_size
            self._inflate_limit = self.config.max_frame_size
        if ext.flow_control and peer is not None:
            self._tunnel_send_window = peer.initial_tunnel_window
            self._peer_stream_window = peer.initial_stream_window
        if ext.metadata:
            self._headers = MetadataCodec()
        if ext.datagrams:
            self._unreliable_max = min(self._datagram_room, self._send_frame_size)
        if (
            ext.lite_tls
        ):  # a PASSTHROUGH frame holds a whole TLS record (or a run), which may exceed max_frame_size
            longest = fr.MAX_PASSTHROUGH_RUN if ext.lite_tls_runs else fr.MAX_PASSTHROUGH_PAYLOAD
            self._decoder.max_payload = max(self.config.max_frame_size, longest, fr.MAX_PASSTHROUGH_PAYLOAD)
        splice_port = peer.splice_port if peer is not None and ext.lite_tls else None
        self._emit(HandshakeCompleted(extensions=ext, splice_port=splice_port))

    def _on_data(self, flags: int, sid: int, payload: bytes | memoryview) -> None:
        if sid == 0:
            self._fail("DATA on stream 0")
        data = payload
        passthrough = flags & _PASSTHROUGH
        if passthrough:
            if not self._ext.lite_tls:
                self._fail("PASSTHROUGH DATA without the lite-tls extension")
            if flags != _PASSTHROUGH or not payload:
                self._fail("a PASSTHROUGH frame is one non-empty TLS record, without other flags")
        elif (
            len(payload) > self.config.max_frame_size and self._ext.lite_tls
        ):  # (PASSTHROUGH's may be larger)
            self._fail("DATA frame larger than max_frame_size", ErrorCode.FRAME_SIZE_ERROR)
        if flags & _GZIP and payload:
            try:
                data = fr.gzip_decompress(payload, self._inflate_limit)
            except fr.FrameError as exc:
                self._fail(f"gzip: {exc.reason}", ErrorCode.COMPRESSION_ERROR)
        size = len(data)
        flow = self._ext.flow_control
        if flow and size:
            if size > self._tunnel_recv_remaining:
                self._fail("flow control: tunnel window exceeded", ErrorCode.FLOW_CONTROL_ERROR)
            # tunnel credit returns on arrival: the stream windows alone bound what piles up, so streams whose
            # reader stalled never take the tunnel window from the others
            self._tunnel_recv_remaining -= size
            self._tunnel_recv_unannounced += size
            if self._tunnel_recv_unannounced >= self._tunnel_update_at:
                self._announce_tunnel_credit()
        stream = self._streams.get(sid)
        if stream is None:
            return
        end = flags & _END_STREAM
        if size or not end:
            state = stream.state
            effect: StreamEffect | None
            if state is StreamState.FIN_SENT and not stream.accepted and self.role is Role.CLIENT:
                effect = None
                self._stream_error(stream, "DATA before SYN-ACK")
            elif state in _RECV_DATA_LOOPS:
                effect = StreamEffect.PERFORM  # the table's (state, RECV_DATA) -> (PERFORM, state)
            else:
                effect = self._remote(stream, StreamInput.RECV_DATA)
            if effect is not StreamEffect.PERFORM:
                return
            if size or stream.datagram:
                if flow:
                    if size > stream.recv_remaining:
                        self._stream_error(stream, "flow-control", ErrorCode.FLOW_CONTROL_ERROR)
                        return
                    stream.recv_remaining -= size
                self._buffered += size
                stream.recv_unacked += size
                if stream.datagram:
                    self._emit(DataReceived(stream_id=sid, data=bytes(data)))
                else:
                    if self._run and (self._run_sid != sid or self._run_passthrough != passthrough):
                        self._flush_run()
                    self._run_sid = sid
                    self._run_passthrough = passthrough
                    self._run.append(data)
        if end:
            effect = self._remote(stream, StreamInput.RECV_FIN)
            if effect is StreamEffect.PERFORM or effect is StreamEffect.ENDED:
                self._emit(StreamEnded(stream_id=sid))

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        try:
            end_stream, block = fr.decode_headers(sid, flags, payload)
        except fr.FrameError as exc:
            self._fail(exc.reason, ErrorCode.FRAME_SIZE_ERROR if exc.frame_size else ErrorCode.PROTOCOL_ERROR)
        headers: list[tuple[str, str]] = []
        if block:
            if not self._ext.metadata:
                self._fail("HEADERS with non-zero length")
            headers = self._decode_block(block)
        if end_stream:
            self._on_rst(sid, headers)
        elif self.role is Role.SERVER:
            self._on_syn(sid, headers)
        else:
            self._on_syn_ack(sid, headers)

    def _on_syn(self, sid: int, headers: list[tuple[str, str]]) -> None:
        stream = self._streams.get(sid)
        if stream is not None:
            self._remote(stream, StreamInput.RECV_SYN)
            return
        if sid % 2 == 0:
            self._fail(f"SYN with even stream id {sid}")
        if sid <= self._highest_peer_stream:
            self._out.append(self._rst_frame(sid, "refused"))
            return
        self._highest_peer_stream = sid
        metadata: StreamMetadata | None = None
        if self._ext.metadata and headers:
            try:
                metadata = parse_metadata(headers)
            except ValueError:
                self._out.append(self._rst_frame(sid, "unsupported"))
                return
            if metadata.kind == "tun" and not self._ext.tun:  # a kind only the tun extension allows
                self._out.append(self._rst_frame(sid, "unsupported"))
                return
        if self._state is TunnelState.DRAINING or self._live >= self.config.max_concurrent_streams:
            self._out.append(self._rst_frame(sid, "refused"))
            return
        stream = self._new_stream(sid)
        stream.metadata = metadata
        stream.datagram = metadata is not None and metadata.kind in DATAGRAM_KINDS
        self._apply(stream, StreamInput.RECV_SYN)
        self._emit(StreamOpened(stream_id=sid, metadata=metadata))
        self._grant(stream)

    def _on_syn_ack(self, sid: int, headers: list[tuple[str, str]]) -> None:
        stream = self._streams.get(sid)
        if stream is None:
            return
        effect = self._remote(stream, StreamInput.RECV_SYN_ACK)
        if effect is not StreamEffect.PERFORM or stream.accepted:
            return
        stream.accepted = True
        if stream.pending:
            self._out.extend(stream.pending)
            stream.pending = []
            stream.pending_len = 0
        self._emit(StreamAccepted(stream_id=sid, headers=tuple(headers)))

    def _on_rst(self, sid: int, headers: list[tuple[str, str]]) -> None:
        stream = self._streams.get(sid)
        if stream is None:
            return
        effect = self._remote(stream, StreamInput.RECV_RST)
        if effect is StreamEffect.ANSWER_RST:
            stream.pending.clear()
            stream.pending_len = 0
            self._out.append(fr.encode_headers(sid, end_stream=True))
            error = error_of(headers)
            self._emit(StreamReset(stream_id=sid, error=error, by_peer=True))

    def _on_ping(self, flags: int, payload: bytes) -> None:
        if len(payload) < 8:
            return
        counter = fr.decode_ping(payload)
        if flags & fr.ACK:
            if self._keepalive.acknowledged(counter):
                self._emit(PingAcknowledged(counter=counter))
            return
        self._out.append(fr.encode_ping(counter, ack=True))

    def _on_goaway(self, payload: bytes) -> None:
        try:
            last, code, reason = fr.decode_goaway(payload)
        except fr.FrameError as exc:
            self._tunnel_input(TunnelInput.RECV_GOAWAY)
            self._close(f"malformed GOAWAY: {exc.reason}", by_peer=True)
            return
        graceful = self._ext.graceful_shutdown and code == ErrorCode.NO_ERROR and last != fr.VPROXY_GOAWAY_ID
        effect = self._tunnel_input(TunnelInput.RECV_GOAWAY_GRACEFUL if graceful else TunnelInput.RECV_GOAWAY)
        if effect is TunnelEffect.PEER_CLOSED:
            self._close(reason, by_peer=True)
        elif effect is TunnelEffect.PEER_DRAIN:
            self._emit(GoAwayReceived(last_stream_id=last, reason=reason))
            if self._drain_deadline is None:
                self._drain_deadline = self._now + self.config.drain_timeout
                self._drain_reason = reason
                self._drain_by_peer = True
            if self.role is Role.CLIENT:
                for stream in list(self._streams.values()):
                    if stream.id > last and stream.state in LIVE_STATES:
                        self._kill(stream)
                        self._emit(StreamReset(stream_id=stream.id, error="refused", by_peer=True))

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        try:
            increment = fr.decode_window_update(payload)
        except fr.FrameError as exc:
            self._fail(exc.reason, ErrorCode.FRAME_SIZE_ERROR if exc.frame_size else ErrorCode.PROTOCOL_ERROR)
        if increment == 0:
            self._fail("WINDOW_UPDATE with a zero increment")
        if sid == 0:
            self._tunnel_send_window += increment
            if self._tunnel_send_window > fr.MAX_WINDOW:
                self._fail("flow control: tunnel window above 2^31-1", ErrorCode.FLOW_CONTROL_ERROR)
            limited = self._tunnel_limited
            if limited:
                self._tunnel_limited = set()
                for limited_id in sorted(limited):
                    limited_stream = self._streams.get(limited_id)
                    if limited_stream is not None and limited_stream.state in _SENDING_STATES:
                        self._emit(WindowUpdated(stream_id=limited_id))
            return
        stream = self._streams.get(sid)
        if stream is None or stream.state not in _SENDING_STATES:
            return
        stream.send_window += increment
        if stream.send_window > fr.MAX_WINDOW:
            self._stream_error(stream, "flow-control", ErrorCode.FLOW_CONTROL_ERROR)
            return
        self._emit(WindowUpdated(stream_id=sid))

    # ------------------------------------------------------------------ timers

    def _run_timers(self, now: float) -> None:
        state = self._state
        if state is TunnelState.CLOSED:
            return
        if state is TunnelState.INIT or state is TunnelState.HANDSHAKE_SENT:
            if self._handshake_deadline is not None and now >= self._handshake_deadline:
                self._tunnel_input(TunnelInput.HANDSHAKE_TIMEOUT)
                self._close("handshake timeout", by_peer=False, send_goaway=True)
            return
        action = self._keepalive.poll(now)
        if action is KeepaliveAction.SEND_PING:
            self._out.append(fr.encode_ping(self._keepalive.counter))
        elif action is KeepaliveAction.DEAD:
            self._tunnel_input(TunnelInput.KEEPALIVE_TIMEOUT)
            self._close("keepalive timeout", by_peer=False, send_goaway=True)
        if self._drain_deadline is not None and now >= self._drain_deadline:
            self._tunnel_input(TunnelInput.DRAIN_DONE)
            self._close(self._drain_reason, by_peer=self._drain_by_peer, send_goaway=True)

    # ------------------------------------------------------------------ helpers: state machines

    def _tunnel_input(self, event: TunnelInput) -> TunnelEffect:
        try:
            effect, new_state = TUNNEL_TRANSITIONS[self._state, event]
        except KeyError:
            what = f"{event.name.lower()} in state {self._state.value}"
            if event.is_local:
                raise LocalProtocolError(f"not allowed: {what}") from None
            if event is TunnelInput.RECV_FRAME:
                self._fail("expected the SETTINGS handshake first")
            if event is TunnelInput.RECV_HANDSHAKE:
                self._fail("SETTINGS after the handshake")
            self._fail(f"unexpected {what}")
        self._state = new_state
        return effect

    def _apply(self, stream: Stream, event: StreamInput) -> StreamEffect:
        was_live = stream.state in LIVE_STATES
        effect = stream.apply(event)
        is_live = stream.state in LIVE_STATES
        if was_live != is_live:
            self._live += 1 if is_live else -1
        return effect

    def _check_local(self, stream: Stream, event: StreamInput) -> None:
        if (stream.state, event) not in STREAM_TRANSITIONS:
            raise StreamClosedError(
                f"stream {stream.id}: {event.name.lower()} is not allowed in state {stream.state.value}"
            )

    def _local(self, stream: Stream, event: StreamInput) -> StreamEffect:
        try:
            return self._apply(stream, event)
        except StreamTransitionError as exc:
            raise StreamClosedError(f"stream {stream.id}: {exc}") from None

    def _remote(self, stream: Stream, event: StreamInput) -> StreamEffect | None:
        """Apply a peer's input; a pair not in the table resets the stream (returns None)."""
        try:
            return self._apply(stream, event)
        except StreamTransitionError as exc:
            self._stream_error(stream, f"protocol: {exc}")
            return None

    def _stream_error(self, stream: Stream, reason: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
        """The peer broke a stream's rules: RST it (tunnel and other streams go on)."""
        del code  # the wire RST carries no code; the reason names the fault
        if stream.state in LIVE_STATES:
            self._kill(stream)
            self._out.append(self._rst_frame(stream.id, reason))
            self._emit(StreamReset(stream_id=stream.id, error=reason, by_peer=False))

    def _kill(self, stream: Stream) -> None:
        if stream.state in LIVE_STATES:
            self._live -= 1
        stream.state = StreamState.DEAD
        stream.pending.clear()
        stream.pending_len = 0

    def _fail(self, reason: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> NoReturn:
        """The peer broke the tunnel's rules: GOAWAY naming the fault, every stream dead, stop."""
        self._close(reason, by_peer=False, send_goaway=True, error=RemoteProtocolError(reason, code))

    def _close(
        self,
        reason: str,
        *,
        by_peer: bool,
        send_goaway: bool = False,
        error: RemoteProtocolError | None = None,
    ) -> NoReturn:
        if send_goaway:
            self._out.append(fr.encode_goaway(reason))
        self._state = TunnelState.CLOSED
        self._datagrams_out = []  # the frames say the tunnel is over; datagrams behind them would be dropped
        for stream in self._streams.values():
            self._kill(stream)
        self._live = 0
        self._keepalive.stop()
        self._drain_deadline = None
        self._handshake_deadline = None
        self._emit(TunnelClosed(reason=reason, by_peer=by_peer, error=error))
        raise _Closed

    def _check_drain(self) -> None:
        if self._state is TunnelState.DRAINING and self._live == 0:
            self._tunnel_input(TunnelInput.DRAIN_DONE)
            self._close(self._drain_reason, by_peer=self._drain_by_peer, send_goaway=True)

    def _check_drain_later(self) -> None:
        """From a local call: finish a drain now; the TunnelClosed event comes with the next call."""
        with contextlib.suppress(_Closed):
            self._check_drain()

    # ------------------------------------------------------------------ helpers: streams and frames

    def _start(self, now: float) -> None:
        self._now = now
        if not self._started:
            self._started = True
            self._keepalive.received(now)
            self._handshake_deadline = now + self.config.handshake_timeout

    def _emit(self, event: Event) -> None:
        if self._run:
            self._flush_run()
        self._events.append(event)

    def _flush_run(self) -> None:
        """Turn the pending DATA payloads of one stream into one DataReceived (one copy out of the input)."""
        run = self._run
        data = bytes(run[0]) if len(run) == 1 else b"".join(run)
        self._run = []
        self._events.append(
            DataReceived(stream_id=self._run_sid, data=data, passthrough=bool(self._run_passthrough))
        )

    def _take_events(self) -> list[Event]:
        if self._run:
            self._flush_run()
        events = self._events
        self._events = []
        return events

    def _is_past_id(self, stream_id: int) -> bool:
        if stream_id <= 0 or stream_id % 2 == 0:
            return False
        if self.role is Role.CLIENT:
            return stream_id < self._next_stream_id
        return stream_id <= self._highest_peer_stream

    def _new_stream(self, sid: int) -> Stream:
        window = self.config.min_stream_window  # what the peer knows from our SETTINGS (or nothing counts)
        stream = Stream(sid, send_window=self._peer_stream_window, recv_window=window)
        self._streams[sid] = stream
        return stream

    def _stream_for_local(self, stream_id: int) -> Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamClosedError(f"stream {stream_id} is unknown or closed")
        return stream

    def _holds(self, stream: Stream) -> bool:
        """Client without 0-RTT: frames wait in the core until the SYN-ACK."""
        return self.role is Role.CLIENT and not stream.accepted and not self._ext.metadata

    def _auto_accept(self, stream: Stream) -> None:
        if self.role is Role.SERVER and not stream.accepted:
            self.accept_stream(stream.id)

    def _queue_data(self, stream: Stream, data: bytes | memoryview, size: int) -> None:
        """Queue DATA frames: a header, then a read-only slice of ``data`` (no copy until the join)."""
        step = self._send_frame_size
        sid = stream.id
        held = not stream.accepted and self._holds(stream)
        out = stream.pending if held else self._out
        append = out.append
        if held:
            stream.pending_len += size
        if self._gzip_out:
            self._queue_gzip(append, sid, data, size)
            return
        pack = _PACK_HEADER
        if size <= step:  # one frame (an empty datagram too)
            append(pack(size << 8, 0, sid))
            append(data)
            return
        view = data if isinstance(data, memoryview) else memoryview(data)
        full = pack(step << 8, 0, sid)
        last = size - step
        offset = 0
        while offset < last:
            append(full)
            append(view[offset : offset + step])
            offset += step
        append(pack((size - offset) << 8, 0, sid))
        append(view[offset:])

    def _queue_gzip(
        self, append: Callable[[bytes | memoryview], None], sid: int, data: bytes | memoryview, size: int
    ) -> None:
        view = memoryview(data)
        step = self._send_frame_size
        if not size:
            append(fr.frame_header(fr.FrameType.DATA, 0, sid, 0))
        for offset in range(0, size, step):
            chunk: bytes | memoryview = view[offset : offset + step]
            flags = 0
            if len(chunk) > GZIP_THRESHOLD and _looks_like_text(chunk):
                packed = fr.gzip_compress(chunk)
                if len(packed) < len(chunk):
                    chunk = packed
                    flags = fr.GZIP
            append(fr.frame_header(fr.FrameType.DATA, flags, sid, len(chunk)))
            append(chunk)

    def _growth_room(self) -> int:
        """What windows being read may still grow by: the receive budget less what they grew already and what
        first grants hold, and less a quarter of the budget kept for the first grants of streams still to come
        (those grants use at most half). So moving streams are lent the part of the first grants' half that new
        streams do not hold, as when a burst of streams opened at once ended its first flights, and the grants
        and growth together stay within the budget."""
        budget = self.config.receive_budget
        return budget - self._grown - max(self._granted, budget // 4)

    def _grant(self, stream: Stream) -> None:
        """A new stream's window beyond the floor, queued right after its SYN (ours or the peer's): as much of
        ``initial_stream_window`` as the budget has room for, first grants holding at most half of it."""
        if not self._ext.flow_control:
            return
        config = self.config
        grant = min(
            config.initial_stream_window - config.min_stream_window,
            config.receive_budget // 2 - self._granted,
            config.receive_budget - self._granted - self._grown,
        )
        if grant > 0:
            stream.recv_window += grant
            stream.recv_remaining += grant
            stream.recv_granted = grant
            self._granted += grant
            self._out.append(fr.encode_window_update(stream.id, grant))

    def _announce_tunnel_credit(self) -> None:
        """The tunnel credit of what arrived since the last announcement goes back (one WINDOW_UPDATE once half
        the tunnel window is due: ``_on_data`` counts it)."""
        increment = self._tunnel_recv_unannounced
        self._tunnel_recv_unannounced = 0
        self._tunnel_recv_remaining += increment
        self._out.append(fr.encode_window_update(0, increment))

    def _rst_frame(self, sid: int, error: str | None) -> bytes:
        block = b""
        if error and self._headers is not None:
            block = self._headers.encode_error(error)
        return fr.encode_headers(sid, block, end_stream=True)

    def _decode_block(self, payload: bytes) -> list[tuple[str, str]]:
        if self._headers is None:
            return []
        try:
            return self._headers.decode(payload)
        except HeaderBlockError as exc:
            self._fail(str(exc), ErrorCode.COMPRESSION_ERROR)
