"""The one frame codec: HTTP/2 framing (9-byte header) as vproxy's tunnel uses it.

Two paths, one module:

* **DATA and the frame header** are ``struct``: ``frame_header``/``encode_frame`` build them and ``FrameDecoder``
  splits any byte stream into frames without allocating frame objects (the DATA path runs for every 16 KiB of
  payload; hyperframe costs microseconds a frame there). The raw flags byte is handed out as is, so vproxy's
  private DATA flag ``0x4`` (gzip payload, which generic HTTP/2 parsers drop) survives.
* **Control frames** (SETTINGS, PING, HEADERS for SYN/SYN-ACK/RST, WINDOW_UPDATE, GOAWAY) are built and their
  payloads parsed with hyperframe's frame classes (``encode_*``/``decode_*``). hyperframe's exceptions never leave
  this module: a malformed payload becomes a ``FrameError`` (``frame_size`` when its length is impossible for its
  type), which the tunnel turns into a GOAWAY. The two that come once per stream or per window's worth of data,
  WINDOW_UPDATE and HEADERS without a header block (a SYN, SYN-ACK or RST to a vproxy peer or without a reason),
  are ``struct`` too, both ways: a thousand streams' opens and credit cost hyperframe about 5 us a frame.

Where vproxy's bytes differ from what hyperframe 6.1 writes, the codec keeps vproxy's bytes:

* SETTINGS ids are 16 bits (vtunnel's extension ids are ``0xF000..``); hyperframe 6.1 truncates ids above 0xFF
  when it serializes, so ``_Settings`` packs the whole id (parsing needs no change).
* A shutdown GOAWAY carries last-stream-id ``0xFFFFFFFF`` (reserved bit set); hyperframe clears that bit when it
  serializes, so ``_GoAway`` writes the field whole. Parsing reads all 32 bits already.
* The reserved bit of a WINDOW_UPDATE increment is ignored on receipt (RFC 9113 section 6.9) and a zero
  increment is returned for the tunnel to refuse; hyperframe refuses both as invalid data.
* HEADERS are SYN/SYN-ACK (flags 0) and RST (``END_STREAM``), never with END_HEADERS; only ``END_STREAM`` is read
  from the flags byte (other bits are ignored, so a stray PADDED or PRIORITY bit cannot reinterpret the block).
* A PING longer than 8 bytes counts by its first 8 (the extra bytes are ignored).

The tests check both paths against hyperframe: every frame the codec builds parses identically with it and
the other way round, and the DATA fast path writes the same bytes as hyperframe's ``DataFrame``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterable
from enum import IntEnum
from typing import Any, NamedTuple, TypeVar

from hyperframe.exceptions import HyperframeError, InvalidFrameError
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, PingFrame, SettingsFrame

__all__ = [
    "ACK",
    "DATAGRAM_HEADER_SIZE",
    "END_STREAM",
    "FRAME_HEADER_SIZE",
    "GZIP",
    "MAX_FRAME_PAYLOAD",
    "MAX_PASSTHROUGH_PAYLOAD",
    "MAX_PASSTHROUGH_RUN",
    "MAX_RUN_RECORDS",
    "MAX_WINDOW",
    "PASSTHROUGH",
    "STREAM_DATAGRAM",
    "VPROXY_GOAWAY_ID",
    "FrameDecoder",
    "FrameError",
    "FrameType",
    "FrameView",
    "RawFrame",
    "byte_view",
    "decode_goaway",
    "decode_headers",
    "decode_ping",
    "decode_settings",
    "decode_stream_datagram",
    "decode_window_update",
    "encode_frame",
    "encode_goaway",
    "encode_headers",
    "encode_ping",
    "encode_settings",
    "encode_stream_datagram",
    "encode_window_update",
    "frame_header",
    "gzip_compress",
    "gzip_decompress",
]


class FrameType(IntEnum):
    DATA = 0x0
    HEADERS = 0x1
    SETTINGS = 0x4
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8


END_STREAM = 0x1
ACK = 0x1
GZIP = 0x4
#: DATA flag of the lite-tls extension: the payload is one whole TLS application-data record of a lite-tls stream
#: that has left the tunnel (with ``lite-tls-runs``: a run of them, up to ``MAX_PASSTHROUGH_RUN`` bytes;
#: docs/security.md, "lite-tls passthrough records"); never with GZIP or END_STREAM
PASSTHROUGH = 0x10

FRAME_HEADER_SIZE = 9
MAX_FRAME_PAYLOAD = (1 << 24) - 1
MAX_WINDOW = (1 << 31) - 1
#: the largest PASSTHROUGH payload: a TLS record's 5-byte header and its largest body (2^14 + 2048)
MAX_PASSTHROUGH_PAYLOAD = 5 + 2**14 + 2048
#: the largest PASSTHROUGH payload with ``lite-tls-runs``: a run of whole TLS records of at most this many bytes
#: (one record may always go alone, whatever its size), and of at most ``MAX_RUN_RECORDS`` records
MAX_PASSTHROUGH_RUN = 128 * 1024
MAX_RUN_RECORDS = 256
VPROXY_GOAWAY_ID = 0xFFFFFFFF

_HEADER = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id
_WINDOW_UPDATE = struct.Struct(">IBII")  # the frame header, then the increment
_WINDOW_UPDATE_LT = (4 << 8) | 0x8  # (length << 8 | type) of every WINDOW_UPDATE
_INCREMENT = struct.Struct(">I")
_GOAWAY = struct.Struct(">II")
_SETTING = struct.Struct(">HI")
_DATAGRAM = struct.Struct(">BI")  # kind, stream id
#: an unreliable datagram's header: kind (``STREAM_DATAGRAM``), stream id
DATAGRAM_HEADER_SIZE = _DATAGRAM.size
#: the one kind of unreliable datagram: one datagram of a ``udp`` stream (docs/protocol.md, "Unreliable datagrams")
STREAM_DATAGRAM = 0x00
_PING_ACK = ("ACK",)
_RST = ("END_STREAM",)


class FrameError(Exception):
    """A frame that cannot be decoded (internal; the tunnel turns it into a GOAWAY)."""

    def __init__(self, reason: str, *, frame_size: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.frame_size = frame_size


class RawFrame(NamedTuple):
    type: int
    flags: int
    stream_id: int
    payload: bytes


class FrameView(NamedTuple):
    """A frame whose payload may be a view of the decoder's input (see ``FrameDecoder.feed_views``)."""

    type: int
    flags: int
    stream_id: int
    payload: bytes | memoryview


_Frames = list[Any]  # RawFrame from ``feed``, FrameView from ``feed_views``
#: a FrameView from a tuple of its four fields without the named tuple's ``__new__`` (a Python function call per
#: frame)
_new_view: Callable[[type[FrameView], tuple[int, int, int, bytes | memoryview]], FrameView] = tuple.__new__
_UNPACK_HEADER = _HEADER.unpack_from


def frame_header(ftype: int, flags: int, stream_id: int, length: int) -> bytes:
    return _HEADER.pack((length << 8) | ftype, flags, stream_id)


def encode_frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack((len(payload) << 8) | ftype, flags, stream_id) + payload


class _Settings(SettingsFrame):
    """hyperframe's SETTINGS frame, serializing 16-bit ids (hyperframe 6.1 keeps only their low byte)."""

    def serialize_body(self) -> bytes:
        return b"".join(_SETTING.pack(k, v) for k, v in self.settings.items())


class _GoAway(GoAwayFrame):
    """hyperframe's GOAWAY frame, writing all 32 bits of last-stream-id (vproxy sends ``0xFFFFFFFF``)."""

    def serialize_body(self) -> bytes:
        return _GOAWAY.pack(self.last_stream_id, self.error_code) + self.additional_data


_F = TypeVar("_F", bound=Frame)


def _parse(frame: _F, payload: bytes | memoryview, name: str, size_problem: str) -> _F:
    """Parse ``payload`` into ``frame``; hyperframe's errors become ``FrameError`` naming the frame type."""
    try:
        frame.parse_body(memoryview(payload))
    except InvalidFrameError:  # a length this frame type cannot have
        raise FrameError(f"{name} {size_problem}", frame_size=True) from None
    except HyperframeError as exc:  # InvalidDataError, InvalidPaddingError: the body's content is wrong
        raise FrameError(f"{name}: {exc}") from None
    return frame


def encode_settings(entries: Iterable[tuple[int, int]]) -> bytes:
    """A SETTINGS frame (stream 0, no flags) with ``entries`` in order; an id given twice keeps its last value."""
    return _Settings(0, settings=dict(entries)).serialize()


def decode_settings(payload: bytes | memoryview) -> list[tuple[int, int]]:
    """The entries of a SETTINGS payload in order; an id given twice has its last value (RFC 9113 section 6.5.3)."""
    frame = _parse(SettingsFrame(0), payload, "SETTINGS", "payload is not a multiple of 6 bytes")
    return list(frame.settings.items())


def encode_ping(counter: int, *, ack: bool = False) -> bytes:
    """A keepalive PING (or its ack) carrying ``counter`` as its 8 bytes."""
    return PingFrame(0, counter.to_bytes(8, "big"), flags=_PING_ACK if ack else ()).serialize()


def decode_ping(payload: bytes | memoryview) -> int:
    """The counter in a PING payload's first 8 bytes (later bytes are ignored)."""
    if len(payload) < 8:
        raise FrameError("PING shorter than 8 bytes", frame_size=True)
    frame = _parse(PingFrame(0), payload[:8], "PING", "payload is not 8 bytes")
    return int.from_bytes(frame.opaque_data, "big")


def encode_headers(stream_id: int, block: bytes = b"", *, end_stream: bool = False) -> bytes:
    """HEADERS: SYN/SYN-ACK (flags 0) or RST (``end_stream``), with an optional header block and no END_HEADERS."""
    if not 0 < stream_id <= 0x7FFFFFFF:
        raise ValueError(f"HEADERS need a stream id in 1..2^31-1, not {stream_id}")
    if not block:  # the same bytes as hyperframe's (the tests check it), without its frame object
        return _HEADER.pack(0x1, END_STREAM if end_stream else 0, stream_id)
    return HeadersFrame(stream_id, block, flags=_RST if end_stream else ()).serialize()


def decode_headers(stream_id: int, flags: int, payload: bytes | memoryview) -> tuple[bool, bytes]:
    """``(end_stream, header block)`` of a HEADERS frame. Only END_STREAM is read from ``flags``."""
    if not stream_id:
        raise FrameError("HEADERS on stream 0")
    if not payload:  # nothing to parse: no padding or priority is read (flags other than END_STREAM are not)
        return bool(flags & END_STREAM), b""
    frame = HeadersFrame(stream_id)
    frame.parse_flags(flags & END_STREAM)
    _parse(frame, payload, "HEADERS", "payload is malformed")
    return "END_STREAM" in frame.flags, frame.data


def encode_goaway(reason: str, *, last_stream_id: int = VPROXY_GOAWAY_ID, code: int = 0xFFFFFFFF) -> bytes:
    """GOAWAY on stream 0; the defaults are vproxy's shutdown (``ff ff ff ff`` twice, then the UTF-8 reason)."""
    body = reason.encode("utf-8", "replace")
    return _GoAway(0, last_stream_id=last_stream_id, error_code=code, additional_data=body).serialize()


def decode_goaway(payload: bytes | memoryview) -> tuple[int, int, str]:
    """``(last stream id, error code, reason)``; the last stream id keeps all 32 bits."""
    frame = _parse(GoAwayFrame(0), payload, "GOAWAY", "shorter than 8 bytes")
    return frame.last_stream_id, frame.error_code, frame.additional_data.decode("utf-8", "replace")


def encode_window_update(stream_id: int, increment: int) -> bytes:
    """WINDOW_UPDATE (``struct``: the bytes of hyperframe's ``WindowUpdateFrame``, reserved bits clear)."""
    return _WINDOW_UPDATE.pack(_WINDOW_UPDATE_LT, 0, stream_id & MAX_WINDOW, increment & MAX_WINDOW)


def decode_window_update(payload: bytes | memoryview) -> int:
    """The increment, reserved bit ignored. 0 is returned as is: refusing it is the tunnel's job."""
    if len(payload) != 4:
        raise FrameError("WINDOW_UPDATE payload is not 4 bytes", frame_size=True)
    increment: int = _INCREMENT.unpack(payload)[0]
    return increment & MAX_WINDOW


def encode_stream_datagram(stream_id: int, payload: bytes | memoryview) -> bytes:
    """One unreliable datagram of a ``udp`` stream: kind 0, the stream id (u32, top bit 0), the payload."""
    return _DATAGRAM.pack(STREAM_DATAGRAM, stream_id) + payload


def decode_stream_datagram(datagram: bytes | bytearray | memoryview) -> tuple[int, memoryview]:
    """The stream id and payload (a view of ``datagram``) of an unreliable datagram; ``FrameError`` when it is
    shorter than its header, of another kind, or names a stream id with the top bit set or 0."""
    if len(datagram) < DATAGRAM_HEADER_SIZE:
        raise FrameError(f"datagram of {len(datagram)} bytes is shorter than its header", frame_size=True)
    kind, stream_id = _DATAGRAM.unpack_from(datagram)
    if kind != STREAM_DATAGRAM:
        raise FrameError(f"unknown datagram kind 0x{kind:02x}")
    if stream_id == 0 or stream_id & 0x80000000:
        raise FrameError(f"datagram for stream id 0x{stream_id:08x}")
    return stream_id, memoryview(datagram)[DATAGRAM_HEADER_SIZE:]


def gzip_compress(data: bytes | memoryview) -> bytes:
    """gzip-wrap ``data`` (fast level: the tunnel is latency- and CPU-bound, not link-bound)."""
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def gzip_decompress(data: bytes | memoryview, limit: int) -> bytes:
    """Inflate a gzip payload, refusing to produce more than ``limit`` bytes (a gzip bomb stops here)."""
    d = zlib.decompressobj(47)
    try:
        out = d.decompress(data, limit)
        if d.unconsumed_tail:
            raise FrameError(f"gzip payload inflates past {limit} bytes")
        out += d.flush()
    except zlib.error as exc:
        raise FrameError(f"bad gzip payload: {exc}") from None
    if len(out) > limit:
        raise FrameError(f"gzip payload inflates past {limit} bytes")
    if not d.eof or d.unused_data:
        raise FrameError("truncated or trailing gzip payload")
    return out


def byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat byte view of ``data`` (a copy only for a non-contiguous view). Read-only when ``data`` is."""
    view = memoryview(data)
    if view.format == "B" and view.ndim == 1 and view.c_contiguous:
        return view
    if view.c_contiguous:
        return view.cast("B")
    return memoryview(view.tobytes())


class FrameDecoder:
    """Incremental frame parser: feed it bytes in any chunking, get whole frames back.

    ``feed`` copies each payload exactly once (into the ``bytes`` it hands out). ``feed_views`` copies nothing
    for frames that lie whole in the input: their payloads are ``memoryview`` slices of it, valid as long as the
    input is not modified (the tunnel uses them before it returns). Only a frame split across inputs is
    assembled in one ``bytearray``, and only its own bytes are copied there (``feed_views`` then hands that
    buffer out as the payload's view and starts a new one). A header announcing more than
    ``max_payload`` bytes is an error as soon as its 9 bytes are in.
    """

    __slots__ = ("_buf", "max_payload")

    def __init__(self, max_payload: int = MAX_FRAME_PAYLOAD) -> None:
        self._buf = bytearray()
        self.max_payload = max_payload

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> tuple[list[RawFrame], FrameError | None]:
        """Parse what is complete. On a bad header, return the frames before it and the error."""
        frames: list[RawFrame] = []
        error = self._feed(data, frames, copy=True)
        return frames, error

    def feed_views(self, data: bytes | bytearray | memoryview) -> tuple[list[FrameView], FrameError | None]:
        """Like ``feed``, but payloads of frames found whole in ``data`` are views of it (no copy)."""
        if not self._buf and type(data) is bytes and len(data) >= FRAME_HEADER_SIZE:
            # the input is exactly one frame (a small message of an exchange): no loop, no buffer
            lt, flags, sid = _UNPACK_HEADER(data)
            length = lt >> 8
            if length + FRAME_HEADER_SIZE == len(data) and length <= self.max_payload:
                return [
                    _new_view(FrameView, (lt & 0xFF, flags, sid, memoryview(data)[FRAME_HEADER_SIZE:]))
                ], None
        frames: list[FrameView] = []
        error = self._feed(data, frames, copy=False)
        return frames, error

    def _feed(
        self, data: bytes | bytearray | memoryview, frames: _Frames, *, copy: bool
    ) -> FrameError | None:
        view = byte_view(data)
        off = 0
        if self._buf:
            off, error = self._complete(view, frames, RawFrame if copy else FrameView)
            if error is not None or self._buf:
                return error
        used, error = self._parse(view, off, frames, copy)
        if used < len(view):
            self._buf += view[used:]
        return error

    def _complete(
        self, view: memoryview, frames: _Frames, make: Callable[..., Any]
    ) -> tuple[int, FrameError | None]:
        """Finish the frame waiting in the buffer with the head of ``view``; return the bytes taken."""
        buf = self._buf
        off = 0
        need = FRAME_HEADER_SIZE - len(buf)
        if need > 0:
            buf += view[:need]
            off = min(need, len(view))
            if len(buf) < FRAME_HEADER_SIZE:
                return off, None
        lt, flags, sid = _HEADER.unpack_from(buf)
        length = lt >> 8
        if length > self.max_payload:
            return off, FrameError(f"frame of {length} bytes exceeds {self.max_payload}", frame_size=True)
        missing = FRAME_HEADER_SIZE + length - len(buf)
        if missing > 0:
            buf += view[off : off + missing]
            off = min(off + missing, len(view))
            if len(buf) < FRAME_HEADER_SIZE + length:
                return off, None
        if make is FrameView:  # hand the assembled buffer itself out; the next partial frame gets a new one
            self._buf = bytearray()
            frames.append(FrameView(lt & 0xFF, flags, sid, memoryview(buf)[FRAME_HEADER_SIZE:]))
        else:
            with memoryview(buf) as whole:
                payload = whole[FRAME_HEADER_SIZE:].tobytes()
            buf.clear()
            frames.append(RawFrame(lt & 0xFF, flags, sid, payload))
        return off, None

    def _parse(
        self, view: memoryview, off: int, frames: _Frames, copy: bool
    ) -> tuple[int, FrameError | None]:
        size = len(view)
        unpack = _HEADER.unpack_from
        limit = self.max_payload
        append = frames.append
        while size - off >= FRAME_HEADER_SIZE:
            lt, flags, sid = unpack(view, off)
            length = lt >> 8
            if length > limit:
                return off, FrameError(f"frame of {length} bytes exceeds {limit}", frame_size=True)
            end = off + FRAME_HEADER_SIZE + length
            if end > size:
                break
            payload = view[off + FRAME_HEADER_SIZE : end]
            append(
                RawFrame(lt & 0xFF, flags, sid, payload.tobytes())
                if copy
                else _new_view(FrameView, (lt & 0xFF, flags, sid, payload))
            )
            off = end
        return off, None
