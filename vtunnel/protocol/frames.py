"""The one frame codec: HTTP/2 framing (9-byte header) as vproxy's tunnel uses it.

A ``struct`` codec rather than hyperframe's object model: the DATA path runs for every 16 KiB of payload and
must not allocate frame objects.  The bytes are standard HTTP/2 (tests check them against hyperframe), plus
vproxy's private DATA flag ``0x4`` (gzip payload).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterable
from enum import IntEnum
from typing import Any, NamedTuple

__all__ = [
    "ACK",
    "END_STREAM",
    "FRAME_HEADER_SIZE",
    "GZIP",
    "MAX_FRAME_PAYLOAD",
    "MAX_WINDOW",
    "VPROXY_GOAWAY_ID",
    "FrameDecoder",
    "FrameError",
    "FrameType",
    "FrameView",
    "RawFrame",
    "byte_view",
    "decode_goaway",
    "decode_ping",
    "decode_settings",
    "decode_window_update",
    "encode_frame",
    "encode_goaway",
    "encode_ping",
    "encode_settings",
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

FRAME_HEADER_SIZE = 9
MAX_FRAME_PAYLOAD = (1 << 24) - 1
MAX_WINDOW = (1 << 31) - 1
VPROXY_GOAWAY_ID = 0xFFFFFFFF

_HEADER = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_GOAWAY = struct.Struct(">II")
_SETTING = struct.Struct(">HI")


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


def frame_header(ftype: int, flags: int, stream_id: int, length: int) -> bytes:
    return _HEADER.pack((length << 8) | ftype, flags, stream_id)


def encode_frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack((len(payload) << 8) | ftype, flags, stream_id) + payload


def encode_settings(entries: Iterable[tuple[int, int]]) -> bytes:
    payload = b"".join(_SETTING.pack(k, v) for k, v in entries)
    return encode_frame(FrameType.SETTINGS, 0, 0, payload)


def decode_settings(payload: bytes) -> list[tuple[int, int]]:
    if len(payload) % 6:
        raise FrameError("SETTINGS payload is not a multiple of 6 bytes", frame_size=True)
    return [_SETTING.unpack_from(payload, i) for i in range(0, len(payload), 6)]


def encode_ping(counter: int, *, ack: bool = False) -> bytes:
    return encode_frame(FrameType.PING, ACK if ack else 0, 0, _U64.pack(counter))


def decode_ping(payload: bytes) -> int:
    value: int = _U64.unpack_from(payload)[0]
    return value


def encode_goaway(reason: str, *, last_stream_id: int = VPROXY_GOAWAY_ID, code: int = 0xFFFFFFFF) -> bytes:
    body = _GOAWAY.pack(last_stream_id, code) + reason.encode("utf-8", "replace")
    return encode_frame(FrameType.GOAWAY, 0, 0, body)


def decode_goaway(payload: bytes) -> tuple[int, int, str]:
    if len(payload) < 8:
        raise FrameError("GOAWAY shorter than 8 bytes", frame_size=True)
    last, code = _GOAWAY.unpack_from(payload)
    return last, code, payload[8:].decode("utf-8", "replace")


def encode_window_update(stream_id: int, increment: int) -> bytes:
    return encode_frame(FrameType.WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def decode_window_update(payload: bytes) -> int:
    if len(payload) != 4:
        raise FrameError("WINDOW_UPDATE payload is not 4 bytes", frame_size=True)
    value: int = _U32.unpack(payload)[0] & MAX_WINDOW
    return value


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
                else FrameView(lt & 0xFF, flags, sid, payload)
            )
            off = end
        return off, None
