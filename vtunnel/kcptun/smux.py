"""xtaci/smux, versions 1 and 2: the stream multiplexer kcptun runs over its KCP session, sans-IO.

Every frame has an 8-byte header, little endian:

    version u8 | cmd u8 | length u16 | stream id u32 | length bytes of data

Commands: SYN 0 (open a stream), FIN 1 (the sender closed the stream), PSH 2 (data), NOP 3 (keepalive, stream
0), and in version 2 only UPD 4, a window update whose 8 data bytes are ``consumed u32 | window u32``: the
receiver has read ``consumed`` bytes of the stream so far and buffers up to ``window``. SYN, FIN and NOP carry
no data. Both ends must use the same version: a frame of another version ends the session.

Stream ids: the client opens odd ids from 3 up (3, 5, 7, ...), the server even ids from 2; opening is just
sending SYN, there is no answer. Closing is FIN; smux has no reset and no session-level close (closing the
session is closing the connection under it). Keepalive: a NOP every interval; a session that received nothing
for the keepalive timeout is dead.

Version 2 flow control, per stream: a sender may have ``window - (written - consumed)`` bytes in flight,
starting from a guessed window of 256 KiB until the receiver's first update; the receiver sends an update on
its first read and then whenever it has read half its buffer since the last one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from vtunnel.kcptun.errors import SmuxError, SmuxProtocolError

__all__ = [
    "HEADER_SIZE",
    "INITIAL_PEER_WINDOW",
    "Command",
    "DataReceived",
    "Event",
    "Frame",
    "FrameParser",
    "SessionClosed",
    "SmuxConfig",
    "SmuxSession",
    "StreamEnded",
    "StreamOpened",
    "WindowUpdated",
    "encode_frame",
]

HEADER_SIZE: Final = 8
INITIAL_PEER_WINDOW: Final = 262144
_HEADER: Final = struct.Struct("<BBHI")
_UPD: Final = struct.Struct("<II")
_MASK32: Final = 0xFFFFFFFF


class Command(IntEnum):
    SYN = 0
    FIN = 1
    PSH = 2
    NOP = 3
    UPD = 4


@dataclass(frozen=True, slots=True)
class Frame:
    version: int
    cmd: Command
    stream_id: int
    data: bytes = b""


def encode_frame(version: int, cmd: Command, stream_id: int, data: bytes | memoryview = b"") -> bytes:
    if len(data) > 0xFFFF:
        raise SmuxError(f"frame data of {len(data)} bytes does not fit the length field")
    return _HEADER.pack(version, cmd, len(data), stream_id) + bytes(data)


class FrameParser:
    """Cuts a byte stream into frames of one version; :class:`SmuxProtocolError` on the first bad header."""

    __slots__ = ("_buffer", "version")

    def __init__(self, version: int) -> None:
        self.version = version
        self._buffer = bytearray()

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        offset = 0
        size = len(buffer)
        while size - offset >= HEADER_SIZE:
            version, cmd, length, sid = _HEADER.unpack_from(buffer, offset)
            if version != self.version:
                raise SmuxProtocolError(f"smux version {version} in a version {self.version} session")
            if cmd > Command.UPD or (cmd == Command.UPD and self.version < 2):
                raise SmuxProtocolError(f"unknown smux command {cmd}")
            if cmd == Command.UPD:
                if length != _UPD.size:
                    raise SmuxProtocolError(f"window update of {length} bytes")
            elif cmd != Command.PSH and length:
                raise SmuxProtocolError(f"smux command {Command(cmd).name} with {length} data bytes")
            end = offset + HEADER_SIZE + length
            if end > size:
                break
            frames.append(Frame(version, Command(cmd), sid, bytes(buffer[offset + HEADER_SIZE : end])))
            offset = end
        del buffer[:offset]
        return frames


@dataclass(frozen=True, kw_only=True, slots=True)
class SmuxConfig:
    """smux's session settings (defaults: kcptun's: version 1, keepalive 10 s, stream buffer 2 MiB)."""

    version: int = 1
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 30.0
    keepalive: bool = True
    max_frame_size: int = 32768
    #: the window announced to the peer for each stream (version 2): kcptun's ``--streambuf``
    max_stream_buffer: int = 2097152

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise SmuxError(f"unsupported smux version {self.version}")
        if not 0 < self.max_frame_size <= 0xFFFF:
            raise SmuxError(f"max frame size {self.max_frame_size} out of range")
        if not 0 < self.max_stream_buffer <= 0x7FFFFFFF:
            raise SmuxError(f"stream buffer {self.max_stream_buffer} out of range")
        if self.keepalive and not 0 < self.keepalive_interval <= self.keepalive_timeout:
            raise SmuxError("the keepalive timeout must be at least the (positive) interval")


# --- events ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamOpened:
    """The peer opened a stream (SYN)."""

    stream_id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class DataReceived:
    stream_id: int
    data: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamEnded:
    """The peer closed the stream (FIN): no more data will come on it."""

    stream_id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class WindowUpdated:
    """Version 2: the peer's window for the stream moved; :meth:`SmuxSession.send_window` may have grown."""

    stream_id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class SessionClosed:
    """The session is over: every stream with it. ``error`` is set when the peer broke the protocol."""

    reason: str
    error: SmuxProtocolError | None = None


Event = StreamOpened | DataReceived | StreamEnded | WindowUpdated | SessionClosed


@dataclass(slots=True)
class _Stream:
    local_fin: bool = False
    remote_fin: bool = False
    written: int = 0
    peer_consumed: int = 0
    peer_window: int = INITIAL_PEER_WINDOW
    consumed: int = 0
    unannounced: int = 0
    announced: bool = False


class SmuxSession:
    """One smux session: frames in through :meth:`receive_data`, frames out through :meth:`data_to_send`."""

    __slots__ = (
        "_closed",
        "_config",
        "_last_received",
        "_next_id",
        "_next_ping",
        "_out",
        "_parser",
        "_streams",
        "client",
    )

    def __init__(self, *, client: bool, config: SmuxConfig, now: float) -> None:
        self.client = client
        self._config = config
        self._parser = FrameParser(config.version)
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1 if client else 0
        self._out: list[bytes] = []
        self._closed: SessionClosed | None = None
        self._last_received = now
        self._next_ping = now + config.keepalive_interval

    @property
    def version(self) -> int:
        return self._config.version

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def streams(self) -> list[int]:
        return list(self._streams)

    # --- local actions -----------------------------------------------------------------------------------

    def open_stream(self) -> int:
        """Open a stream (queues its SYN) and return its id."""
        self._check_open()
        sid = (self._next_id + 2) & _MASK32
        if sid < 2:
            raise SmuxError("stream ids exhausted")
        self._next_id = sid
        self._streams[sid] = _Stream()
        self._out.append(encode_frame(self.version, Command.SYN, sid))
        return sid

    def send_window(self, stream_id: int) -> int:
        """Bytes :meth:`send` takes now on ``stream_id`` (version 1: no limit of its own)."""
        stream = self._writable(stream_id)
        if self.version < 2:
            return 1 << 62
        in_flight = (stream.written - stream.peer_consumed) & _MASK32
        if in_flight >= 0x80000000:  # the peer claims to have read more than was sent
            return 0
        return max(0, stream.peer_window - in_flight)

    def send(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue PSH frames for as much of ``data`` as the window takes; returns how many bytes that is."""
        stream = self._writable(stream_id)
        view = memoryview(data)
        take = min(len(view), self.send_window(stream_id))
        step = self._config.max_frame_size
        out = self._out
        for start in range(0, take, step):
            out.append(
                encode_frame(self.version, Command.PSH, stream_id, view[start : min(start + step, take)])
            )
        stream.written = (stream.written + take) & _MASK32
        return take

    def end_stream(self, stream_id: int) -> None:
        """Close the stream for sending (FIN). It is forgotten once the peer's FIN has come too."""
        stream = self._writable(stream_id)
        stream.local_fin = True
        self._out.append(encode_frame(self.version, Command.FIN, stream_id))
        if stream.remote_fin:
            del self._streams[stream_id]

    def acknowledge(self, stream_id: int, count: int) -> None:
        """The application consumed ``count`` bytes of the stream: version 2 may queue a window update."""
        stream = self._streams.get(stream_id)
        if stream is None or self.version < 2 or count <= 0 or self._closed is not None:
            return
        stream.consumed = (stream.consumed + count) & _MASK32
        stream.unannounced += count
        if not stream.announced or stream.unannounced >= self._config.max_stream_buffer // 2:
            stream.announced = True
            stream.unannounced = 0
            payload = _UPD.pack(stream.consumed, self._config.max_stream_buffer)
            self._out.append(encode_frame(self.version, Command.UPD, stream_id, payload))

    def close(self, reason: str = "closed") -> None:
        if self._closed is None:
            self._closed = SessionClosed(reason=reason)
            self._streams.clear()

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        self._out = []
        return b"".join(out)

    # --- timers ------------------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        if self._closed is not None or not self._config.keepalive:
            return None
        return min(self._next_ping, self._last_received + self._config.keepalive_timeout)

    def handle_timer(self, now: float) -> list[Event]:
        if self._closed is not None or not self._config.keepalive:
            return []
        if now >= self._last_received + self._config.keepalive_timeout:
            self.close("keepalive timeout: nothing received")
            return [self._closed] if self._closed else []
        if now >= self._next_ping:
            self._out.append(encode_frame(self.version, Command.NOP, 0))
            self._next_ping = now + self._config.keepalive_interval
        return []

    # --- input -------------------------------------------------------------------------------------------

    def receive_data(self, data: bytes | memoryview, now: float) -> list[Event]:
        """Parse the peer's bytes. A protocol fault ends the session: the events before it, then SessionClosed."""
        if self._closed is not None or not data:
            return []
        self._last_received = now
        events: list[Event] = []
        try:
            frames = self._parser.feed(data)
        except SmuxProtocolError as exc:
            frames = []
            fault: SmuxProtocolError | None = exc
        else:
            fault = None
        for frame in frames:
            self._apply(frame, events)
        if fault is not None:
            self._closed = SessionClosed(reason=str(fault), error=fault)
            self._streams.clear()
            events.append(self._closed)
        return events

    def _apply(self, frame: Frame, events: list[Event]) -> None:
        sid = frame.stream_id
        cmd = frame.cmd
        if cmd == Command.NOP:
            return
        stream = self._streams.get(sid)
        if cmd == Command.SYN:
            if stream is None:
                self._streams[sid] = _Stream()
                events.append(StreamOpened(stream_id=sid))
        elif stream is None:
            return  # frames of unknown or forgotten streams are dropped, as smux does
        elif cmd == Command.PSH:
            if frame.data and not stream.remote_fin:
                events.append(DataReceived(stream_id=sid, data=frame.data))
        elif cmd == Command.FIN:
            if not stream.remote_fin:
                stream.remote_fin = True
                events.append(StreamEnded(stream_id=sid))
                if stream.local_fin:
                    del self._streams[sid]
        else:  # UPD
            consumed, window = _UPD.unpack(frame.data)
            stream.peer_consumed = consumed
            stream.peer_window = window
            events.append(WindowUpdated(stream_id=sid))

    def _check_open(self) -> None:
        if self._closed is not None:
            raise SmuxError(f"the smux session is closed ({self._closed.reason})")

    def _writable(self, stream_id: int) -> _Stream:
        self._check_open()
        stream = self._streams.get(stream_id)
        if stream is None:
            raise SmuxError(f"no stream {stream_id}")
        if stream.local_fin:
            raise SmuxError(f"stream {stream_id} is closed for sending")
        return stream
