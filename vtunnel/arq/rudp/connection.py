"""The rudp connection: one reliable, ordered byte stream and unreliable datagrams over one UDP path, sans-IO.

The caller (a transport, or the simulator) feeds datagrams and the time in, and takes datagrams, bytes, events
and a deadline out::

    conn = Connection(role=Role.CLIENT, local_cid=b"...", peer_cid=b"...", config=RudpConfig(cc="cubic"), now=now)
    events = conn.receive_datagram(datagram, now)   # -> StreamReadable, StreamEnded, DatagramReceived,
                                                    #    SendRoomAvailable, ConnectionClosed
    events = conn.receive_datagrams(datagrams, now) #    (a run of them at once)
    out = conn.datagrams_to_send(now)               # packets to put on the wire, now
    conn.next_deadline()                            # when handle_timer must run (None: only input can matter)
    events = conn.handle_timer(now)
    taken = conn.send(data)                         # stream bytes; takes at most send_room()
    data = conn.receive(max_bytes)                  # in-order stream bytes (b"" when none are ready)
    conn.send_datagram(data)                        # unreliable: never retransmitted, dropped when late
    conn.end_stream(); conn.close(code, reason)

Connection IDs are opaque bytes the caller chooses (0..20 bytes): every packet carries the receiver's
(``peer_cid`` on the way out, ``local_cid`` checked on the way in). Routing by them, minting routable ones,
sealing, path validation and rotation belong to the datagram layer under this one
(:mod:`vtunnel.security.datagram`); the seam is :meth:`Connection.set_connection_ids` (rotate), and for a
server whose client address is not yet validated, ``address_validated=False`` with
:meth:`Connection.address_validated`: until then it sends at most three times the bytes it received.

Errors: only our own misuse raises (:class:`RudpLocalError`). Whatever the peer sends is dropped when it does
not parse (counted in :meth:`stats`), and a well-formed packet that breaks the protocol (data past the window,
an ACK of a packet never sent, a changed final size) closes the connection with a CLOSE frame naming the fault
and a :class:`ConnectionClosed` event.
"""

from __future__ import annotations

import enum
import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from .cc import CongestionController, Pacer, make_controller
from .pmtu import PathMtu
from .ranges import RangeSet
from .recovery import MAX_ACK_RANGES, PACKET_THRESHOLD, AckTracker, LossDetector, RttEstimator, SentPacket
from .sendbuf import SendBuffer
from .wire import (
    MAX_CID_LEN,
    Ack,
    Close,
    DataBlocked,
    Datagram,
    Padding,
    Ping,
    Stream,
    WireError,
    decode_packet,
    encode_ack,
    encode_close,
    encode_data_blocked,
    encode_datagram,
    encode_header,
    encode_varints,
    header_size,
    stream_head,
    stream_packet,
    varint_packer,
    varint_size,
)

__all__ = [
    "INITIAL_MAX_DATA",
    "Connection",
    "ConnectionClosed",
    "ConnectionState",
    "DatagramReceived",
    "ErrorCode",
    "Event",
    "Role",
    "RudpConfig",
    "RudpError",
    "RudpLocalError",
    "SendRoomAvailable",
    "StreamEnded",
    "StreamReadable",
]

#: the stream bytes a sender may send before the peer's first ACK tells it the real window: every receiver
#: accepts at least this much
INITIAL_MAX_DATA: Final = 256 * 1024
#: a server not yet sure of its client's address sends at most this many times what it received from it
AMPLIFICATION_FACTOR: Final = 3
#: the most packets one call of datagrams_to_send builds (the deadline then says "now" again)
_BURST_LIMIT: Final = 512
#: how often a closing connection answers packets with its CLOSE again, at most
_CLOSE_REPEATS: Final = 16
#: an unvalidated server whose amplification budget is below this sends nothing until it receives more
_SMALLEST_PACKET: Final = 64
#: the longest ACK frame: type, four varints, and each further range's gap and length
_ACK_MAX: Final = 1 + 4 * 8 + 8 + 32 * 16
_NEVER: Final = float("inf")
#: a black hole's losses span at least this many probe timeouts (RFC 9002's persistent congestion's period)
_BLACK_HOLE_PTOS: Final = 3


class RudpError(Exception):
    """Base of rudp's errors."""


class RudpLocalError(RudpError):
    """Our own misuse of a connection (sending after the end of the stream, a datagram too large...)."""


class ErrorCode(enum.IntEnum):
    """CLOSE frame codes; 0x100 and above are the application's."""

    NO_ERROR = 0x0
    INTERNAL_ERROR = 0x1
    FLOW_CONTROL_ERROR = 0x2
    FINAL_SIZE_ERROR = 0x3
    PROTOCOL_VIOLATION = 0x4
    #: never on the wire: the peer went silent for ``idle_timeout``
    IDLE_TIMEOUT = 0xA


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class ConnectionState(enum.Enum):
    OPEN = "open"
    #: we closed (or found the peer at fault): CLOSE is sent, and repeated to packets that still arrive
    CLOSING = "closing"
    #: the peer closed: we send nothing more, and wait for its last packets to drain
    DRAINING = "draining"
    CLOSED = "closed"


# --- events -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamReadable:
    """New in-order stream bytes wait for :meth:`Connection.receive`."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamEnded:
    """The peer ended its stream: after what :meth:`Connection.receive` still holds, nothing more comes."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DatagramReceived:
    data: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class SendRoomAvailable:
    """The send buffer, full at the last :meth:`Connection.send`, has room again."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ConnectionClosed:
    code: int
    reason: str
    by_peer: bool


Event = StreamReadable | StreamEnded | DatagramReceived | SendRoomAvailable | ConnectionClosed

#: the events without fields, made once (values: nothing tells one instance from another; a receiver reports
#: one per packet that brought in-order bytes)
_READABLE: Final = StreamReadable()
_ROOM: Final = SendRoomAvailable()


@dataclass(frozen=True, kw_only=True, slots=True)
class RudpConfig:
    """One connection's tuning (both ends may differ)."""

    #: the largest rudp packet (a sealing layer's overhead comes on top of it); with path MTU discovery, the
    #: first size, which the path is assumed to carry
    max_datagram_size: int = 1350
    #: search for larger packets the path carries (:mod:`.pmtu`; the transport sets the don't-fragment bit), and
    #: fall back to smaller ones when full packets vanish (a black hole)
    path_mtu_discovery: bool = False
    #: the packet sizes to try above ``max_datagram_size`` (the transport's: the common link MTUs less headers)
    probe_sizes: tuple[int, ...] = ()
    #: the congestion controller: ``bbr`` (delivery rate), ``cubic`` or ``newreno``
    cc: str = "bbr"
    #: spread packets over the round trip at the controller's rate; off: send what the window allows at once
    pacing: bool = True
    #: the round trip assumed before the first sample (RFC 9002's 333 ms)
    initial_rtt: float = 0.333
    #: the longest we hold an ACK for an ack-eliciting packet, and what we assume of the peer
    max_ack_delay: float = 0.025
    #: acknowledge at once after this many ack-eliciting packets
    ack_eliciting_threshold: int = 2
    #: stream bytes received and not yet read that we accept (the window advertised in every ACK)
    receive_window: int = 8 * 1024 * 1024
    #: stream bytes written and not yet acknowledged that ``send`` accepts
    send_buffer: int = 8 * 1024 * 1024
    #: unreliable datagrams waiting to be sent; the oldest is dropped beyond this
    datagram_queue: int = 256
    #: seconds without any packet from the peer before the connection is dropped (None: never)
    idle_timeout: float | None = 60.0

    def __post_init__(self) -> None:
        if not 256 <= self.max_datagram_size <= 65527:
            raise ValueError("max_datagram_size must be between 256 and 65527")
        if any(not 256 <= size <= 65527 for size in self.probe_sizes):
            raise ValueError("probe_sizes must be between 256 and 65527")
        if self.receive_window < INITIAL_MAX_DATA:
            raise ValueError(f"receive_window must be at least {INITIAL_MAX_DATA}")
        if self.send_buffer < 1 or self.datagram_queue < 1 or self.ack_eliciting_threshold < 1:
            raise ValueError("send_buffer, datagram_queue and ack_eliciting_threshold must be positive")
        make_controller(self.cc, max_datagram_size=self.max_datagram_size, now=0.0)  # the name is known


class Connection:
    """One rudp connection (see the module's docstring for the calls a transport makes)."""

    def __init__(
        self,
        *,
        role: Role,
        local_cid: bytes,
        peer_cid: bytes,
        config: RudpConfig | None = None,
        now: float,
        address_validated: bool = True,
    ) -> None:
        cfg = config or RudpConfig()
        self.config = cfg
        self.role = role
        self.state = ConnectionState.OPEN
        self.local_cid = b""
        self.peer_cid = b""
        self.set_connection_ids(local_cid, peer_cid)
        self._mds = cfg.max_datagram_size
        self._now = now
        # recovery and congestion control
        self.rtt = RttEstimator(initial_rtt=cfg.initial_rtt, max_ack_delay=cfg.max_ack_delay)
        self._loss = LossDetector(self.rtt)
        self._acks = AckTracker(max_ack_delay=cfg.max_ack_delay, threshold=cfg.ack_eliciting_threshold)
        self.cc: CongestionController = make_controller(cfg.cc, max_datagram_size=self._mds, now=now)
        self._pacer = Pacer(max_datagram_size=self._mds, initial_burst=self.cc.congestion_window)
        self._pacing_wake: float | None = None
        self._app_limited = True
        #: path MTU discovery (None: packets stay ``max_datagram_size``), the number of its probe in flight (-1:
        #: none), and when a probe may be due (inf: not before the one in flight is settled)
        self._pmtu = (
            PathMtu(base=self._mds, candidates=cfg.probe_sizes, now=now) if cfg.path_mtu_discovery else None
        )
        self._pmtu_probe = -1
        self._pmtu_after = now if self._pmtu is not None else _NEVER
        #: the congestion window's room the probe due waits for (0: not known): a probe larger than the window
        #: allows is not asked for again at every send, only once the window may hold it
        self._pmtu_room = 0
        #: the sender itself fell behind its pacing since the last ACK (see datagrams_to_send)
        self._fell_behind = False
        self._probes = 0
        #: ACK-only packets still to carry a PING after the last packet with content, while it is in flight (see
        #: _build), and that packet's number
        self._pings_owed = 0
        self._content_number = -1
        self._next_number = 0
        #: varint_packer of a recent packet number (new stream data packs its numbers with it)
        self._number_packer = varint_packer(0)
        # path
        self._validated = address_validated
        self._heard_from_peer = role is Role.CLIENT
        self._bytes_sent = 0  # (stats' bytes_sent and bytes_received)
        self._bytes_received = 0
        #: the counters every packet moves (the rest, rarer, are in _stats)
        self._packets_sent = 0
        self._packets_received = 0
        self._stream_bytes_sent = 0
        self._last_received = now
        # sending stream
        self._send_buf = SendBuffer()  # written and not yet acknowledged
        self._send_base = 0  # everything below is acknowledged
        self._send_next = 0  # the first offset never sent
        self._acked = RangeSet()  # acknowledged offsets above _send_base
        self._retransmit: deque[tuple[int, int, bool]] = deque()  # (start, end, fin) to send again
        self._fin_offset: int | None = None
        self._fin_sent = False
        self._fin_acked = False
        self._peer_max_data = INITIAL_MAX_DATA
        self._blocked_reported = -1
        self._writer_waiting = False
        # receiving stream
        #: in-order bytes not yet read, as the chunks they arrived in (joined once, when read), and their length
        self._ready: deque[bytes] = deque()
        #: stream bytes :meth:`receive` would return now
        self.readable = 0
        self._read_offset = 0  # bytes the reader took
        self._contiguous = 0  # offset up to which everything arrived
        self._pending: list[tuple[int, bytes]] = []  # a heap of out-of-order (offset, data)
        self._pending_ranges = RangeSet()
        self._final_size: int | None = None
        self._end_reported = False
        self._max_data = cfg.receive_window  # the offset we advertise
        # datagrams
        self._datagrams: deque[bytes] = deque()
        # closing
        self._close_frame = b""
        self._close_pending = False
        self._close_repeats = 0
        self._close_deadline: float | None = None
        self._stats: dict[str, int] = dict.fromkeys(
            (
                "packets_lost",
                "packets_dropped",
                "packets_duplicate",
                "stream_bytes_retransmitted",
                "stream_bytes_duplicate",
                "spurious_losses",
                "pto_count",
                "datagrams_sent",
                "datagrams_received",
                "datagrams_dropped",
                "datagrams_lost",
                "pmtu_probes",
                "pmtu_probes_lost",
                "pmtu_black_holes",
            ),
            0,
        )

    # --- connection IDs and the path (the seam to the datagram layer) ----------------------------------------

    def set_connection_ids(self, local_cid: bytes, peer_cid: bytes) -> None:
        """Use new connection IDs from now on (rotation on migration is decided below this layer)."""
        if len(local_cid) > MAX_CID_LEN or len(peer_cid) > MAX_CID_LEN:
            raise RudpLocalError(f"a connection ID is at most {MAX_CID_LEN} bytes")
        self.local_cid = bytes(local_cid)
        self.peer_cid = bytes(peer_cid)
        self._header = encode_header(self.peer_cid, 0)[:-1]  # all of a header but the packet number

    def address_validated(self) -> None:
        """The peer's address is proven (a handshake or a path challenge): lift the amplification limit."""
        self._validated = True

    # --- the application's side ------------------------------------------------------------------------------

    def send_room(self) -> int:
        """Stream bytes :meth:`send` takes now."""
        if self.state is not ConnectionState.OPEN or self._fin_offset is not None:
            return 0
        room = self.config.send_buffer - (self._send_buf.end - self._send_base)
        return room if room > 0 else 0

    def send(self, data: bytes | memoryview) -> int:
        """Queue stream bytes; returns how many were taken (at most :meth:`send_room`)."""
        if self.state is not ConnectionState.OPEN:
            raise RudpLocalError("the connection is closed")
        if self._fin_offset is not None:
            raise RudpLocalError("the stream was ended")
        buf = self._send_buf
        room = self.config.send_buffer - (buf.end - self._send_base)  # (send_room, the state checked)
        size = len(data)
        if size < room:
            if size:
                buf.append(data)
            return size
        # (the buffer is full with this write, or cannot take all of it)
        take = room if room > 0 else 0
        if take:
            buf.append(data[:take] if take < size else data)
        self._writer_waiting = True
        return take

    def end_stream(self) -> None:
        """No more stream bytes: the peer gets :class:`StreamEnded` after the last of them."""
        if self.state is not ConnectionState.OPEN:
            raise RudpLocalError("the connection is closed")
        if self._fin_offset is None:
            self._fin_offset = self._send_buf.end

    def receive(self, max_bytes: int = -1) -> bytes:
        """In-order stream bytes (``b""`` when none are ready)."""
        ready = self._ready
        if not ready:
            return b""
        if max_bytes < 0 or max_bytes >= self.readable:
            data = ready[0] if len(ready) == 1 else b"".join(ready)
            ready.clear()
        else:
            parts: list[bytes] = []
            need = max_bytes
            while need:
                chunk = ready[0]
                if len(chunk) <= need:
                    parts.append(ready.popleft())
                    need -= len(chunk)
                else:
                    parts.append(chunk[:need])
                    ready[0] = chunk[need:]
                    need = 0
            data = b"".join(parts)
        self.readable -= len(data)
        self._read_offset += len(data)
        window = self.config.receive_window
        if self._max_data - self._read_offset <= window // 2 and self._final_size is None:
            # half the window was read: advertise the new one at once (every ACK carries it)
            self._max_data = self._read_offset + window
            self._acks.request_immediate()
        return data

    @property
    def stream_ended(self) -> bool:
        """The peer's stream ended and every byte of it was read."""
        return self._final_size is not None and self._read_offset >= self._final_size

    @property
    def all_acknowledged(self) -> bool:
        """Every stream byte written (and the end of the stream, once ended) was acknowledged by the peer."""
        written = self._send_buf.end
        return self._send_base >= written and (self._fin_offset is None or self._fin_acked)

    @property
    def bytes_in_flight(self) -> int:
        """Bytes of ack-eliciting packets sent and neither acknowledged nor declared lost."""
        return self._loss.bytes_in_flight

    def max_datagram_payload(self) -> int:
        """The largest datagram :meth:`send_datagram` takes: what a packet of the configured size holds, whatever
        size path MTU discovery finds (the layer above is told this once); while a black hole keeps packets
        smaller, a datagram that no longer fits one is dropped (``datagrams_dropped``)."""
        room = self.config.max_datagram_size - header_size(len(self.peer_cid), 2**62 - 1) - 1
        return room - varint_size(room)

    def send_datagram(self, data: bytes) -> None:
        """Queue an unreliable datagram: sent once, when the congestion window allows, never retransmitted."""
        if self.state is not ConnectionState.OPEN:
            raise RudpLocalError("the connection is closed")
        if len(data) > self.max_datagram_payload():
            raise RudpLocalError(f"a datagram carries at most {self.max_datagram_payload()} bytes")
        queue = self._datagrams
        if len(queue) >= self.config.datagram_queue:
            queue.popleft()
            self._stats["datagrams_dropped"] += 1
        queue.append(bytes(data))

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Close now: CLOSE goes out with the next datagrams; the connection lingers 3 PTOs for stragglers."""
        if self.state is not ConnectionState.OPEN:
            return
        self._enter_closing(int(code), reason)

    @property
    def closed(self) -> bool:
        return self.state is ConnectionState.CLOSED

    # --- input -----------------------------------------------------------------------------------------------

    def receive_datagram(self, data: bytes | memoryview, now: float) -> list[Event]:
        """One datagram from the peer; returns what it brought. Never raises for what the peer sends."""
        self._now = now
        events: list[Event] = []
        state = self.state
        if state is ConnectionState.OPEN:
            lone = stream_packet(data, self.local_cid)
            if lone is not None:
                self._receive_stream_packet(data, lone, now, events)
                return events
        elif state is ConnectionState.CLOSED:
            return events
        self._receive_packet(data, now, events)
        return events

    def receive_datagrams(self, datagrams: Sequence[bytes | memoryview], now: float) -> list[Event]:
        """Datagrams from the peer that arrived together, in order; returns what they brought. Never raises for
        what the peer sends.

        A run of them that continues the stream in order (the bulk of a transfer: each packet's one frame is
        STREAM data starting where the previous one ended, the numbers consecutive after the largest so far) is
        recorded once: the numbers as one range, the ACK state, the bytes and the counters, as
        :meth:`receive_datagram` for each of them would. Any other packet goes alone, as it does there, after
        what came before it."""
        self._now = now
        events: list[Event] = []
        cid = self.local_cid
        chunks: list[bytes] = []  # the run's data, and its packets' bytes on the wire
        run_bytes = 0
        number_next = offset_next = -1  # what continues the run
        for data in datagrams:
            state = self.state
            if state is ConnectionState.CLOSED:
                break
            lone = stream_packet(data, cid) if state is ConnectionState.OPEN else None
            if lone is not None and lone[3] is None:
                number, offset, start, _ack = lone
                if chunks:
                    continues = number == number_next and offset == offset_next
                else:  # a run starts where the stream and the numbers stand, with nothing held
                    continues = (
                        number == self._acks.largest + 1
                        and offset == self._contiguous
                        and not self._pending
                        and self._final_size is None
                    )
                if continues:
                    end = offset + len(data) - start
                    if end <= self._max_data:
                        chunks.append(bytes(data[start:]))
                        run_bytes += len(data)
                        number_next, offset_next = number + 1, end
                        continue
            if chunks:
                self._take_run(chunks, number_next, run_bytes, now, events)
                chunks = []
                run_bytes = 0
            if lone is not None:
                self._receive_stream_packet(data, lone, now, events)
            else:
                self._receive_packet(data, now, events)
        if chunks:
            self._take_run(chunks, number_next, run_bytes, now, events)
        return events

    def _take_run(
        self, chunks: list[bytes], number_next: int, size: int, now: float, events: list[Event]
    ) -> None:
        """Record a run of in-order STREAM packets (see :meth:`receive_datagrams`): ``chunks``, their data, the
        last of them numbered ``number_next - 1``, ``size`` bytes on the wire in all."""
        count = len(chunks)
        self._packets_received += count
        self._bytes_received += size
        self._last_received = now
        self._heard_from_peer = True
        length = 0
        for chunk in chunks:
            length += len(chunk)
        self._ready.extend(chunks)
        self._contiguous += length
        self.readable += length
        self._acks.on_run(number_next - count, number_next - 1, now)
        if length:
            events.append(_READABLE)

    def _receive_packet(self, data: bytes | memoryview, now: float, events: list[Event]) -> None:
        """One packet of any other kind: parsed whole, its frames applied in order."""
        try:
            packet = decode_packet(data)
        except WireError:
            self._stats["packets_dropped"] += 1
            return
        if packet.dcid != self.local_cid:
            self._stats["packets_dropped"] += 1
            return
        if self._acks.is_duplicate(packet.number):
            self._stats["packets_duplicate"] += 1
            return
        self._count_received(len(data), now)
        if self.state is ConnectionState.DRAINING:
            return
        if self.state is ConnectionState.CLOSING:
            if self._close_repeats < _CLOSE_REPEATS:
                self._close_pending = True
            return
        ack_eliciting = False
        readable_before = self.readable
        immediate = False
        for frame in packet.frames:
            if isinstance(frame, Stream):
                ack_eliciting = True
                fault = self._on_stream(frame.offset, frame.data, frame.fin)
                if fault is not None:
                    self._fail(events, *fault)
                    return
            elif isinstance(frame, Ack):
                fault = self._on_ack(frame.ranges, frame.delay, frame.max_data, now, events)
                if fault is not None:
                    self._fail(events, *fault)
                    return
            elif isinstance(frame, Datagram):
                ack_eliciting = True
                self._stats["datagrams_received"] += 1
                events.append(DatagramReceived(data=frame.data))
            elif isinstance(frame, Ping):
                ack_eliciting = True
            elif isinstance(frame, DataBlocked):
                ack_eliciting = True
                immediate = True  # the peer waits for our window: tell it at once
            elif isinstance(frame, Close):
                self.state = ConnectionState.DRAINING
                self._close_deadline = now + 3 * self.rtt.pto_period
                events.append(ConnectionClosed(code=frame.code, reason=frame.reason, by_peer=True))
                return
            elif isinstance(frame, Padding):
                pass
        self._acks.on_packet(packet.number, ack_eliciting, now)
        if immediate:
            self._acks.request_immediate()
        if self.readable > readable_before:
            events.append(_READABLE)
        if self._final_size is not None and self._contiguous >= self._final_size and not self._end_reported:
            self._end_reported = True
            events.append(StreamEnded())

    def _receive_stream_packet(
        self,
        data: bytes | memoryview,
        lone: tuple[int, int, int, tuple[tuple[tuple[int, int], ...], int, int] | None],
        now: float,
        events: list[Event],
    ) -> None:
        """A packet of an optional ACK and STREAM data without FIN (``lone``: its number, offset, where its data
        starts, and the ACK's fields): what :meth:`_receive_packet` does with it, without building the packet's
        frame objects."""
        number, offset, start, ack = lone
        acks = self._acks
        if number <= acks.largest and acks.is_duplicate(number):  # (the next number is never one)
            self._stats["packets_duplicate"] += 1
            return
        size = len(data)  # (what _count_received does, inline: a conversation's every packet comes here)
        self._packets_received += 1
        self._bytes_received += size
        self._last_received = now
        self._heard_from_peer = True
        if ack is not None:
            fault = self._on_ack(ack[0], ack[1], ack[2], now, events)
            if fault is not None:
                self._fail(events, *fault)
                return
        readable_before = self.readable
        fault = self._on_stream(offset, bytes(data[start:]), False)
        if fault is not None:
            self._fail(events, *fault)
            return
        acks.on_packet(number, True, now)
        if self.readable > readable_before:
            events.append(_READABLE)
            final = self._final_size
            if final is not None and self._contiguous >= final and not self._end_reported:
                # the data that completes a stream whose FIN came before it (a repaired hole)
                self._end_reported = True
                events.append(StreamEnded())

    def _count_received(self, size: int, now: float) -> None:
        """A new packet of ``size`` bytes arrived from the peer (both receive paths)."""
        self._packets_received += 1
        self._bytes_received += size
        self._last_received = now
        self._heard_from_peer = True

    def _fail(self, events: list[Event], code: int, reason: str) -> list[Event]:
        self._enter_closing(code, reason)
        events.append(ConnectionClosed(code=code, reason=reason, by_peer=False))
        return events

    def _enter_closing(self, code: int, reason: str) -> None:
        self.state = ConnectionState.CLOSING
        self._close_frame = encode_close(code, reason[:200])
        self._close_pending = True
        self._close_deadline = self._now + 3 * self.rtt.pto_period
        self._datagrams.clear()

    def _on_stream(self, start: int, data: bytes, fin: bool) -> tuple[int, str] | None:
        end = start + len(data)
        if end > self._max_data:
            return ErrorCode.FLOW_CONTROL_ERROR, f"stream data up to {end} past the window {self._max_data}"
        final = self._final_size
        if fin:
            if final is not None and final != end:
                return ErrorCode.FINAL_SIZE_ERROR, "the final size changed"
            if end < max(self._contiguous, self._pending_ranges.last[1] if self._pending_ranges else 0):
                return ErrorCode.FINAL_SIZE_ERROR, "data past the final size"
            self._final_size = final = end
        elif final is not None and end > final:
            return ErrorCode.FINAL_SIZE_ERROR, "data past the final size"
        contiguous = self._contiguous
        if end <= contiguous:
            self._stats["stream_bytes_duplicate"] += len(data)
            return None
        if start > contiguous:
            held = self._pending_ranges
            if not held or start >= held.last[1]:
                # beyond all that waits: the usual case behind a hole (at 2% loss and a long round trip, most
                # packets arrive while one before them is being repaired)
                heapq.heappush(self._pending, (start, data))
                held.add(start, end)
                return None
            if held.covers(start, end):
                self._stats["stream_bytes_duplicate"] += len(data)
                return None
            # keep only the parts not held yet, so that overlapping copies never pile up
            missing = held.missing(start, end)
            self._stats["stream_bytes_duplicate"] += (end - start) - sum(b - a for a, b in missing)
            for piece_start, piece_end in missing:
                heapq.heappush(self._pending, (piece_start, data[piece_start - start : piece_end - start]))
            held.add(start, end)
            return None
        if start < contiguous:  # (pending data all lies above contiguous: none of it covers this)
            self._stats["stream_bytes_duplicate"] += contiguous - start
            data = data[contiguous - start :]
            start = contiguous
        ready = self._ready
        if data:
            ready.append(data)
        contiguous = end
        pending = self._pending
        if pending:  # (empty, so are its ranges)
            while pending and pending[0][0] <= contiguous:
                offset, chunk = heapq.heappop(pending)
                tail = offset + len(chunk)
                if tail > contiguous:
                    ready.append(chunk[contiguous - offset :] if offset < contiguous else chunk)
                    contiguous = tail
            self._pending_ranges.remove_below(contiguous)
        self.readable += contiguous - self._contiguous
        self._contiguous = contiguous
        return None

    def _on_ack(
        self, ranges: tuple[tuple[int, int], ...], delay: int, max_data: int, now: float, events: list[Event]
    ) -> tuple[int, str] | None:
        """An ACK frame's ``ranges`` (as :class:`~.wire.Ack` has them), ``delay`` (us) and ``max_data``."""
        largest = ranges[0][1]
        loss = self._loss
        if largest > loss.largest_sent:
            return ErrorCode.PROTOCOL_VIOLATION, f"ACK of packet {largest}, never sent"
        if max_data > self._peer_max_data:
            self._peer_max_data = max_data
        unanswered = loss.pto_count > 0 and loss.largest_acked < 0
        result = loss.on_ack(ranges, delay / 1e6, now)
        acked = result.acked
        late = result.late
        if unanswered and acked:
            # the first ACK, after probe timeouts: the first flight went unanswered (lost, or the peer not yet
            # there). What the controller measured over it is no rate of the path (bbr would take one packet in
            # a second for it), and its losses no congestion: it starts over from this round trip
            self._restart_controller(now)
        pmtu = self._pmtu
        if pmtu is not None and acked and (self._pmtu_probe >= 0 or pmtu.suspicious):
            acked = self._pmtu_acked(acked, now)
        if late:
            self._stats["spurious_losses"] += len(late)
            self._stream_acked(late)  # (before or after the rest: the acknowledged prefix is their union)
        if acked:
            self._stream_acked(acked)
            reported = (
                -1
            )  # the largest number an acknowledged ACK of ours reported (only the largest matters)
            for packet in acked:
                if packet.ack_largest > reported:
                    reported = packet.ack_largest
            if reported >= 0:
                self._acks.on_ack_acknowledged(reported)
            limited = self._app_limited or self._fell_behind
            self._fell_behind = False
            self.cc.on_packets_acked(now, acked, self.rtt, app_limited=limited)
        if result.lost:
            self._on_lost(
                result.lost, now, persistent=result.persistent_congestion, congestion=not unanswered
            )
        self._send_buf.release(self._send_base)
        if (
            self._writer_waiting
            and self.config.send_buffer > self._send_buf.end - self._send_base
            and self._fin_offset is None
            and self.state is ConnectionState.OPEN
        ):  # (send_room() > 0)
            self._writer_waiting = False
            events.append(_ROOM)
        return None

    def _stream_acked(self, packets: Sequence[SentPacket]) -> None:
        """The stream data of ``packets`` arrived: move the acknowledged prefix, note what lies above it."""
        acked = self._acked
        base = self._send_base
        for packet in packets:
            for offset, length, fin in packet.stream:
                if fin:
                    self._fin_acked = True
                if not length:
                    continue
                end = offset + length
                if offset <= base:
                    # it touches the acknowledged prefix (the usual case): the prefix grows
                    if end > base:
                        base = end
                else:
                    acked.add(offset, end)
        if acked:  # the pieces above the prefix it now reaches join it
            while acked and acked.first[0] <= base:
                _, end = acked.pop_first()
                if end > base:
                    base = end
        self._send_base = base

    def _on_lost(
        self, lost: Sequence[SentPacket], now: float, *, persistent: bool, congestion: bool = True
    ) -> None:
        """``lost`` were declared lost: their data goes out again; ``congestion``: the controller hears of it."""
        if self._pmtu is not None:
            lost = self._pmtu_lost(lost, now)
            if not lost:
                return
        self._stats["packets_lost"] += len(lost)
        for packet in lost:
            for offset, length, fin in packet.stream:
                self._retransmit.append((offset, offset + length, fin))
            if packet.blocked:
                self._blocked_reported = -1
            self._stats["datagrams_lost"] += packet.datagrams
        if congestion:
            self.cc.on_packets_lost(now, lost, persistent=persistent)

    # --- path MTU discovery ---------------------------------------------------------------------------------

    def _pmtu_acked(self, acked: list[SentPacket], now: float) -> list[SentPacket]:
        """An ACK's packets, the probe in flight taken out of them (it proves its size); a pending black-hole
        suspicion ends with a large packet acknowledged."""
        pmtu = self._pmtu
        assert pmtu is not None
        probe = self._pmtu_probe
        if probe >= 0 and acked[0].number <= probe <= acked[-1].number:
            for index, packet in enumerate(acked):
                if packet.number == probe:
                    acked = acked[:index] + acked[index + 1 :]
                    self._pmtu_probe = -1
                    self._pmtu_next(now)
                    self._resize(pmtu.on_probe_acked(now))
                    break
        if pmtu.suspicious and acked:
            pmtu.on_acked(max(packet.size for packet in acked))
        return acked

    def _pmtu_lost(self, lost: Sequence[SentPacket], now: float) -> Sequence[SentPacket]:
        """Lost packets, the probe in flight taken out of them (a probe's loss is no congestion); a loss of only
        large packets counts towards a black hole."""
        pmtu = self._pmtu
        assert pmtu is not None
        probe = self._pmtu_probe
        if probe >= 0:
            kept = [packet for packet in lost if packet.number != probe]
            if len(kept) < len(lost):
                self._pmtu_probe = -1
                self._pmtu_next(now)
                self._stats["pmtu_probes_lost"] += 1
                pmtu.on_probe_lost(now)
                lost = kept
        if lost and pmtu.size > pmtu.floor:
            self._pmtu_loss_event(min(packet.size for packet in lost), now)
        return lost

    def _pmtu_next(self, now: float) -> None:
        """The search moved on (a probe settled, a black hole): the next probe is asked for at the next send."""
        self._pmtu_after = now
        self._pmtu_room = 0

    def _pmtu_timeout(self, now: float) -> None:
        """A probe timeout: nothing was acknowledged for a while; if all that waits is large, it may be a
        black hole (see :mod:`.pmtu`)."""
        pmtu = self._pmtu
        assert pmtu is not None
        if pmtu.size <= pmtu.floor:
            return
        probe = self._pmtu_probe
        sizes = [packet.size for number, packet in self._loss.sent.items() if number != probe]
        if sizes:
            self._pmtu_loss_event(min(sizes), now)

    def _pmtu_loss_event(self, smallest: int, now: float) -> None:
        """Packets down to ``smallest`` bytes were lost together (or waited through a probe timeout): towards a
        black hole, whose losses span at least :data:`_BLACK_HOLE_PTOS` probe timeouts."""
        assert self._pmtu is not None
        if self._pmtu.on_lost(smallest, now, _BLACK_HOLE_PTOS * self.rtt.pto_period):
            self._black_hole(now)

    def _black_hole(self, now: float) -> None:
        """Full packets vanished and the size fell back to the floor: the controller starts over, since what it
        learnt (rates measured while every full packet was lost) was the packet size's doing, not the path's."""
        pmtu = self._pmtu
        assert pmtu is not None
        self._stats["pmtu_black_holes"] += 1
        self._mds = pmtu.size
        self._pmtu_probe = -1  # (a probe in flight is forgotten: the search starts again, now)
        self._pmtu_next(now)
        self._restart_controller(now)

    def _restart_controller(self, now: float) -> None:
        """A new congestion controller and pacer, for packets of the size in use."""
        self.cc = make_controller(self.config.cc, max_datagram_size=self._mds, now=now)
        self._pacer = Pacer(max_datagram_size=self._mds, initial_burst=self.cc.congestion_window)

    def _resize(self, size: int) -> None:
        """Packets are ``size`` bytes from now on."""
        if size == self._mds:
            return
        self._mds = size
        self.cc.set_max_datagram_size(size)
        self._pacer.min_burst = 10 * size

    def _send_pmtu_probe(self, now: float, out: list[bytes]) -> None:
        """Send the path MTU probe due now, if one is and the congestion window has room for it."""
        pmtu = self._pmtu
        assert pmtu is not None
        size = pmtu.probe_due(now)
        if not size:
            after = pmtu.next_search()
            self._pmtu_after = _NEVER if after is None else after
            return
        if self._loss.bytes_in_flight + size > self.cc.congestion_window:
            self._pmtu_room = size  # (asked again once the window holds it: see datagrams_to_send)
            return
        number = self._next_number
        number_bytes = encode_varints(number)
        pad = size - len(self._header) - len(number_bytes) - 1
        if pad < 0:
            return
        packet = SentPacket(number, now, 0, True)
        pmtu.on_probe_sent(size)
        self._pmtu_probe = number
        self._pmtu_after = _NEVER
        self._pmtu_room = 0
        self._stats["pmtu_probes"] += 1
        # a PING, padded out to the size tried (PADDING: zero bytes)
        out.append(self._finish_packet(number, number_bytes, [b"\x01", bytes(pad)], now, packet))

    # --- timers ----------------------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must run next; ``None`` when only input or a send can change anything."""
        state = self.state
        if state is ConnectionState.CLOSED:
            return None
        if state is not ConnectionState.OPEN:
            return self._close_deadline
        due = self._loss.deadline()
        if self._validated or self._amplification_limit() >= _SMALLEST_PACKET:  # (else only input lets out)
            if self._probes and (due is None or self._now < due):
                due = self._now
            ack = self._acks.ack_deadline if not self._acks.immediate else None
            if ack is not None and (due is None or ack < due):
                due = ack
            wake = self._pacing_wake
            if wake is not None and (due is None or wake < due):
                due = wake
        idle = self.config.idle_timeout
        if idle is not None and (due is None or self._last_received + idle < due):
            due = self._last_received + idle
        return due

    def handle_timer(self, now: float) -> list[Event]:
        """Run what is due: the loss detection timer or PTO, the idle timeout, the end of closing."""
        self._now = now
        state = self.state
        if state is ConnectionState.CLOSED:
            return []
        if state is not ConnectionState.OPEN:
            if self._close_deadline is not None and now >= self._close_deadline:
                self.state = ConnectionState.CLOSED
            return []
        idle = self.config.idle_timeout
        if idle is not None and now >= self._last_received + idle:
            self.state = ConnectionState.CLOSED
            return [ConnectionClosed(code=ErrorCode.IDLE_TIMEOUT, reason="idle timeout", by_peer=False)]
        deadline = self._loss.deadline()
        if deadline is not None and now >= deadline:
            lost, probe = self._loss.on_timeout(now)
            if lost:
                self._on_lost(lost, now, persistent=False)
            if probe:
                self._stats["pto_count"] += 1
                self._probes = 1 if self._loss.pto_count <= 1 else 2
                if self._pmtu is not None:
                    self._pmtu_timeout(now)
        return []

    # --- output ----------------------------------------------------------------------------------------------

    def _clean_retransmit(self) -> None:
        """Drop queued retransmissions whose bytes were all acknowledged since."""
        queue = self._retransmit
        while queue:
            start, end, fin = queue[0]
            if fin and not self._fin_acked:
                return
            if end > self._send_base and not self._acked.covers(max(start, self._send_base), end):
                return
            queue.popleft()

    def _retransmission_due(self) -> bool:
        """Whether queued retransmissions still hold bytes the peer lacks (the rest are dropped)."""
        self._clean_retransmit()
        return bool(self._retransmit)

    def _queued(self) -> int:
        """About how many bytes wait to be sent (new stream data the window allows, retransmissions, datagrams)."""
        queued = max(0, min(self._send_buf.end, self._peer_max_data) - self._send_next)
        if self._retransmit or self._datagrams:
            queued += self._mds * (len(self._retransmit) + len(self._datagrams))
        return queued

    def _blocked(self) -> bool:
        """Stream bytes wait for the peer's window and it was not told so at this limit yet."""
        return (
            self._send_next >= self._peer_max_data
            and self._send_buf.end > self._send_next
            and self._blocked_reported != self._peer_max_data
        )

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """The packets to send now (ACKs, data within the congestion window and pacing, probes, CLOSE)."""
        self._now = now
        state = self.state
        if state is ConnectionState.CLOSED or state is ConnectionState.DRAINING:
            return []
        if state is ConnectionState.CLOSING:
            if not self._close_pending or not self._amplification_room(len(self._close_frame) + 32):
                return []
            self._close_pending = False
            self._close_repeats += 1
            number = self._next_number
            return [self._finish_packet(number, encode_varints(number), [self._close_frame], now, None)]
        if not self._heard_from_peer:
            return []  # a server speaks only after the client did
        out: list[bytes] = []
        wake = self._pacing_wake
        if wake is not None and now - wake > Pacer.BURST_TIME:
            # called later after a pacing wake than the token bucket holds (a descheduled process): the rate it
            # paced at was not reached, by the sender's fault, so the rounds measured now are no lower bound of
            # the path's rate, as when the application has nothing to send
            self._fell_behind = True
        self._pacing_wake = None
        if (
            now >= self._pmtu_after
            and self._validated
            and self.rtt.has_sample
            and self._send_buf.end > self._send_base
            and self._loss.bytes_in_flight + self._pmtu_room <= self.cc.congestion_window
        ):
            self._send_pmtu_probe(now, out)
        mds = self._mds
        acks = self._acks
        buf = self._send_buf
        rate = -1.0  # the pacing rate, read once (only an ACK changes it)
        tokens = 0.0  # what the pacer lets out now, read with the rate
        while len(out) < _BURST_LIMIT:
            probe = self._probes > 0
            # (acks.ack_due(now) and self._has_data(), asked once per packet from the state they read)
            deadline = acks.ack_deadline
            ack = acks.immediate or (deadline is not None and now >= deadline)
            send_next = self._send_next
            if self._datagrams or (self._retransmit and self._retransmission_due()):
                has_data = True
            elif send_next < buf.end:
                has_data = send_next < self._peer_max_data or self._blocked()
            else:  # (the FIN alone is due)
                fin = self._fin_offset
                has_data = fin is not None and not self._fin_sent and send_next >= fin
            send_data = probe
            if has_data and not probe:
                if rate < 0:
                    loss = self._loss
                    cc = self.cc
                    pacer = self._pacer
                    rate = cc.pacing_rate(self.rtt) if self.config.pacing else 0.0
                if loss.bytes_in_flight + mds > cc.congestion_window:
                    self._app_limited = False  # the window holds data back
                elif rate > 0 and now + (mds - (tokens := pacer.tokens(now, rate))) / rate > now:
                    # pacing holds the next packet back (Pacer.release_time's rule: a shortfall too small to move
                    # the clock holds nothing): come back when the bucket holds a batch
                    self._pacing_wake = pacer.wake_time(now, rate, mds, self._queued())
                    self._app_limited = False
                else:
                    send_data = True
            elif not has_data:
                # nothing to send: the application's fault only if the send buffer has room (a buffer full of
                # unacknowledged data is the path's doing, and says the window was used)
                self._app_limited = (
                    self.config.send_buffer > buf.end - self._send_base and self._fin_offset is None
                )  # (send_room() > 0: the state is OPEN here)
            if not send_data and not ack:
                break
            if (
                send_data
                and not probe
                and not self._retransmit
                and not self._datagrams
                and self._fin_offset is None
                and self._validated
                and self._data_run(now, out, tokens if rate > 0 else float(_BURST_LIMIT * mds))
            ):
                continue
            size = mds if self._validated else self._amplification_limit()
            if size < _SMALLEST_PACKET:
                break
            datagram = self._build(now, send_data=send_data, probe=probe, size=size)
            if datagram is None:
                break
            out.append(datagram)
        return out

    def _data_run(self, now: float, out: list[bytes], tokens: float) -> int:
        """Packets of new stream data, the first of them with the ACK owed if one is, as many as the congestion
        window, the pacer (``tokens``: the bytes it lets out now) and the peer's window allow, up to the burst
        limit; returns how many were added to ``out``.

        The bulk of a transfer, and a conversation's message with the ACK of the one it answers: what
        :meth:`_build` would make of each of them (an ACK frame if one is owed, then one STREAM frame, as much
        as the packet holds), without asking again for each packet what else might be due. The caller has
        checked that nothing else is (no probe, no retransmission, no datagram, no end of stream, a validated
        path); the window and the pacer's tokens do not change while it runs (no ACK arrives)."""
        buf = self._send_buf
        end_written = buf.end
        limit = self._peer_max_data
        start = self._send_next
        # the packet that reaches the peer's window with more data waiting also says DATA_BLOCKED: _build's
        if limit < end_written:
            blocked_at = limit
        else:
            limit = end_written
            blocked_at = -1
        if start >= limit:
            return 0
        loss = self._loss
        cc = self.cc
        mds = self._mds
        head = self._header
        head_room = mds - len(head)
        acks = self._acks
        ack_frame = (
            b""  # the ACK owed, in the first packet (_build's rule: an ACK rides in what leaves anyway)
        )
        ack_largest = -1
        if acks.immediate or acks.ack_deadline is not None:
            ranges = acks.received.descending(acks.report_floor, MAX_ACK_RANGES)  # (acks.ranges())
            if ranges:
                ack_largest = ranges[0][1]
                delay = int((now - acks.largest_time) * 1e6)
                ack_frame = encode_ack(ranges, delay if delay > 0 else 0, self._max_data)
        room = head_room - len(ack_frame)  # (for the stream frame and its packet number)
        number = self._next_number
        # (what varint_packer gave for an earlier number: refreshed below once the numbers outgrow it)
        pack_number, number_bits, numbers_below = self._number_packer
        first_number = number
        first_start = start
        sent = 0
        append = out.append
        packets: list[SentPacket] = []
        keep = packets.append
        room_in_window = cc.congestion_window - loss.bytes_in_flight
        last_number = number + _BURST_LIMIT - len(out)  # (the burst limit, counted in packet numbers)
        chunk = b""  # the send buffer's chunk the last packet's data came from, and its offset
        base = chunk_end = 0
        while start < limit and tokens >= mds and sent + mds <= room_in_window and number < last_number:
            if number >= numbers_below:
                pack_number, number_bits, numbers_below = varint_packer(number)
            number_bytes = pack_number(number | number_bits)
            frame = stream_head(start, limit - start, room - len(number_bytes), -1)
            if frame is None:
                break
            header, take = frame
            end = start + take
            if end == blocked_at:
                break
            if end > chunk_end:
                chunk, base = buf.chunk_at(start)
                chunk_end = base + len(chunk)
            data = chunk[start - base : end - base] if end <= chunk_end else buf.slice(start, end)
            if ack_frame:  # (the first packet)
                datagram = b"".join((head, number_bytes, ack_frame, header, data))
                size = len(datagram)
                keep(SentPacket(number, now, size, True, [(start, take, False)], ack_largest))
                ack_frame = b""
                room = head_room
                acks.on_ack_sent()
            else:
                datagram = b"".join((head, number_bytes, header, data))
                size = len(datagram)
                keep(SentPacket(number, now, size, True, [(start, take, False)]))
            append(datagram)
            tokens -= size
            sent += size
            start = end
            number += 1
        count = number - first_number
        if numbers_below != self._number_packer[2]:
            self._number_packer = (pack_number, number_bits, numbers_below)
        if count:
            loss.on_sent_run(packets, sent)
            cc.on_packets_sent(now, packets)
            self._next_number = number
            self._send_next = start
            self._pings_owed = PACKET_THRESHOLD
            self._content_number = number - 1
            self._pacer.on_sent(sent)
            self._bytes_sent += sent
            self._packets_sent += count
            self._stream_bytes_sent += start - first_start
        return count

    def _amplification_room(self, size: int) -> bool:
        return self._validated or self._bytes_sent + size <= AMPLIFICATION_FACTOR * self._bytes_received

    def _amplification_limit(self) -> int:
        """The largest packet the amplification limit lets us send now (a full one once validated)."""
        if self._validated:
            return self._mds
        return min(self._mds, AMPLIFICATION_FACTOR * self._bytes_received - self._bytes_sent)

    def _build(self, now: float, *, send_data: bool, probe: bool, size: int) -> bytes | None:
        """One packet of at most ``size`` bytes (None: nothing to put in it)."""
        number = self._next_number
        number_bytes = encode_varints(number)
        room = size - len(self._header) - len(number_bytes)
        frames: list[bytes] = []
        packet = SentPacket(number, now, 0, False)
        acks = self._acks
        gaps = False  # the ACK reports gaps (more than one range)
        if acks.immediate or acks.ack_deadline is not None:  # (pending: ack_due(now) is no more)
            ranges = acks.ranges()
            if ranges:
                delay = max(0, int((now - self._acks.largest_time) * 1e6))
                frame = encode_ack(ranges, delay, self._max_data)
                if len(frame) <= room:  # (only an unvalidated server's small budget may not hold it)
                    frames.append(frame)
                    room -= len(frame)
                    packet.ack_largest = ranges[0][1]
                    gaps = len(ranges) > 1
                    self._acks.on_ack_sent()
        if send_data:
            if probe and self._loss.largest_acked < 0:
                # nothing of ours was acknowledged yet: the peer may lack the stream's start, and a server opens
                # no connection without it (new data would never be acknowledged, and never show the loss), so
                # the probe carries the oldest data again first
                self._resend_oldest()
            if self._datagrams:
                room = self._add_datagrams(frames, room, packet)
            if self._retransmit:
                room = self._add_retransmissions(frames, room, packet)
            room = self._add_new_data(frames, room, packet)
            if room > 0 and self._send_buf.end > self._send_next and self._blocked():
                frame = encode_data_blocked(self._peer_max_data)
                if len(frame) <= room:
                    frames.append(frame)
                    room -= len(frame)
                    packet.blocked = True
                    packet.ack_eliciting = True
                    self._blocked_reported = self._peer_max_data
            if probe:
                self._probes -= 1
                if not packet.ack_eliciting and self._resend_oldest():
                    room = self._add_retransmissions(frames, room, packet)
                if not packet.ack_eliciting:
                    frames.append(b"\x01")  # PING
                    packet.ack_eliciting = True
        if not frames:
            return None
        if not packet.ack_eliciting and self._pings_owed and self._content_number in self._loss.sent:
            # an ACK after a packet with content still in flight makes itself acknowledged (PING), so that the loss
            # of that packet shows by the thresholds within a round trip: a lone packet (a window update to a bulk
            # sender) would otherwise wait for the probe timeout, while its peer perhaps waits for it. Once it
            # was acknowledged (an answer acknowledges a request) nothing is owed: no PINGs back and forth
            self._pings_owed -= 1
            frames.append(b"\x01")
            packet.ack_eliciting = True
        elif gaps and not packet.ack_eliciting and not self._loss.ack_eliciting_in_flight and room > 0:
            # a receiver that only acknowledges is never acknowledged itself, so it would go on reporting every
            # gap it ever saw (up to MAX_ACK_RANGES ranges, some 60 bytes, in each ACK after the loss of one
            # packet: RFC 9000 section 13.2.4). An ACK with gaps, while nothing of ours is in flight (about once
            # a round trip), asks for an acknowledgement (PING): once it comes, the ranges below what that ACK
            # reported are no longer sent
            frames.append(b"\x01")
            packet.ack_eliciting = True
        return self._finish_packet(number, number_bytes, frames, now, packet)

    def _resend_oldest(self) -> bool:
        """Queue the oldest data still unacknowledged to go first again (a probe's), without declaring it lost:
        if the original arrives after all, the receiver counts a duplicate. False when there is none."""
        oldest = self._loss.oldest_unacked()
        if oldest is None:
            return False
        for offset, length, fin in reversed(oldest.stream):
            self._retransmit.appendleft((offset, offset + length, fin))
        return True

    def _finish_packet(
        self, number: int, number_bytes: bytes, frames: list[bytes], now: float, packet: SentPacket | None
    ) -> bytes:
        frames.insert(0, self._header + number_bytes)
        datagram = b"".join(frames)
        self._next_number = number + 1
        size = len(datagram)
        self._bytes_sent += size
        self._packets_sent += 1
        if packet is None:
            packet = SentPacket(number=number, sent_time=now, size=size, ack_eliciting=False)
        packet.size = size
        self._loss.on_sent(packet)
        if packet.ack_eliciting:
            self.cc.on_packet_sent(now, packet)
            self._pacer.on_sent(size)
            if packet.stream or packet.datagrams or packet.blocked:
                self._pings_owed = PACKET_THRESHOLD
                self._content_number = number
        return datagram

    def _add_datagrams(self, frames: list[bytes], room: int, packet: SentPacket) -> int:
        queue = self._datagrams
        while queue:
            frame = encode_datagram(queue[0])
            if len(frame) > room:
                if len(frame) > self._mds - header_size(len(self.peer_cid), packet.number):
                    # the connection IDs grew, or the packets shrank, since it was queued: it fits no packet
                    queue.popleft()
                    self._stats["datagrams_dropped"] += 1
                    continue
                break
            queue.popleft()
            frames.append(frame)
            room -= len(frame)
            packet.ack_eliciting = True
            packet.datagrams += 1
            self._stats["datagrams_sent"] += 1
        return room

    def _stream_frame(self, frames: list[bytes], room: int, packet: SentPacket, start: int, end: int) -> int:
        """Add a STREAM frame for as much of ``[start, end)`` as fits; returns the room left (``room`` itself
        when nothing fitted)."""
        frame = stream_head(start, end - start, room, -1 if self._fin_offset is None else self._fin_offset)
        if frame is None:
            return room
        header, take = frame
        fin = self._fin_offset is not None and start + take == self._fin_offset
        frames.append(header)
        if take:
            frames.append(self._send_buf.slice(start, start + take))
        packet.stream.append((start, take, fin))
        packet.ack_eliciting = True
        if fin:
            self._fin_sent = True
        return room - len(header) - take

    def _add_retransmissions(self, frames: list[bytes], room: int, packet: SentPacket) -> int:
        queue = self._retransmit
        while queue and room > 8:
            start, end, fin = queue.popleft()
            pieces = self._acked.missing(max(start, self._send_base), end) if end > self._send_base else []
            if fin and not self._fin_acked and not pieces:
                pieces = [(end, end)]
            for index, (piece_start, piece_end) in enumerate(pieces):
                count = len(frames)
                room = self._stream_frame(frames, room, packet, piece_start, piece_end)
                reached = piece_start
                if len(frames) > count:
                    reached += packet.stream[-1][1]
                    packet.retransmission = True
                    self._stats["stream_bytes_retransmitted"] += reached - piece_start
                if reached < piece_end or len(frames) == count:
                    # no room for the rest: put it back for the next packet
                    rest = [(reached, piece_end), *pieces[index + 1 :]]
                    for rest_start, rest_end in reversed(rest):
                        queue.appendleft((rest_start, rest_end, fin and rest_end == end))
                    return room
        return room

    def _add_new_data(self, frames: list[bytes], room: int, packet: SentPacket) -> int:
        limit = min(self._send_buf.end, self._peer_max_data)
        start = self._send_next
        fin_due = self._fin_offset is not None and not self._fin_sent and start >= self._fin_offset
        if (start >= limit and not fin_due) or room <= 8:
            return room
        count = len(frames)
        room = self._stream_frame(frames, room, packet, start, max(start, limit))
        if len(frames) > count:
            sent = packet.stream[-1][1]
            self._stream_bytes_sent += sent
            self._send_next = start + sent
        return room

    # --- reporting -------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, float | int | str]:
        """Counters and the state of recovery and congestion control."""
        out: dict[str, float | int | str] = {
            "packets_sent": self._packets_sent,
            "packets_received": self._packets_received,
        }
        out.update(self._stats)
        out["bytes_sent"] = self._bytes_sent
        out["bytes_received"] = self._bytes_received
        out["stream_bytes_sent"] = self._stream_bytes_sent
        out.update(self.cc.stats())
        out["srtt_ms"] = round(self.rtt.smoothed * 1000, 3)
        out["min_rtt_ms"] = round(self.rtt.min * 1000, 3)
        out["bytes_in_flight"] = self.bytes_in_flight
        out["packet_size"] = self._mds
        return out
