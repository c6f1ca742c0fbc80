"""kcptun's compression: the snappy framing format around the whole smux byte stream (unless ``--nocomp``).

The stream opens with a stream-identifier chunk, ``ff 06 00 00`` then ``sNaPpY``, and goes on as chunks of

    type u8 | length u24 (little endian) | body

where the body of a data chunk is a masked CRC-32C of the uncompressed bytes (4 bytes) and then either a
snappy-compressed block (type 0x00) or the bytes as they are (type 0x01); a block holds at most 64 KiB
uncompressed. Types 0x80..0xfe are skippable (0xfe is padding), 0x02..0x7f are reserved and fatal. kcptun's
writer flushes after every write, so each write becomes one or more whole chunks.

The block codec and the checksums are cramjam's (a maintained binding of Rust's ``snap`` crate): this module
only cuts the stream at chunk boundaries, so that cramjam always sees whole chunks behind a stream identifier.
"""

from __future__ import annotations

from typing import Final

import cramjam

from vtunnel.kcptun.errors import CompressionError

__all__ = ["STREAM_IDENTIFIER", "SnappyReader", "SnappyWriter"]

STREAM_IDENTIFIER: Final = b"\xff\x06\x00\x00sNaPpY"
_MAX_BLOCK: Final = 65536
#: the longest chunk body a conforming writer produces: a checksum and the worst-case encoding of 64 KiB
_MAX_CHUNK_BODY: Final = 4 + 32 + _MAX_BLOCK + _MAX_BLOCK // 6
_IDENTIFIER_TYPE: Final = 0xFF
_CHUNK_HEADER: Final = 4


class SnappyWriter:
    """Frames bytes into snappy chunks; the first output starts with the stream identifier."""

    __slots__ = ("_started",)

    def __init__(self) -> None:
        self._started = False

    def compress(self, data: bytes | memoryview) -> bytes:
        if not data:
            return b""
        parts: list[bytes] = []
        if not self._started:
            parts.append(STREAM_IDENTIFIER)
            self._started = True
        view = memoryview(data)
        for start in range(0, len(view), _MAX_BLOCK):
            framed = bytes(cramjam.snappy.compress(bytes(view[start : start + _MAX_BLOCK])))
            parts.append(framed[len(STREAM_IDENTIFIER) :])
        return b"".join(parts)


class SnappyReader:
    """Takes the framed stream in pieces of any size and gives back the bytes of each whole chunk.

    Raises :class:`CompressionError` for a stream that does not open with the identifier, a reserved chunk
    type, a chunk longer than any writer makes, or a chunk that fails to decode or to match its checksum.
    After an error the reader stays broken: the stream cannot be resynchronised.
    """

    __slots__ = ("_buffer", "_error", "_started")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._started = False
        self._error: CompressionError | None = None

    def feed(self, data: bytes | memoryview) -> bytes:
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        buffer += data
        end = 0
        size = len(buffer)
        while size - end >= _CHUNK_HEADER:
            kind = buffer[end]
            length = int.from_bytes(buffer[end + 1 : end + 4], "little")
            if not self._started and kind != _IDENTIFIER_TYPE:
                return self._fail("the snappy stream does not start with its identifier")
            if 0x02 <= kind <= 0x7F:
                return self._fail(f"reserved snappy chunk type {kind:#04x}")
            if length > _MAX_CHUNK_BODY:
                return self._fail(f"snappy chunk of {length} bytes is longer than any writer makes")
            if size - end - _CHUNK_HEADER < length:
                break
            if (
                kind == _IDENTIFIER_TYPE
                and bytes(buffer[end : end + _CHUNK_HEADER + length]) != STREAM_IDENTIFIER
            ):
                return self._fail("bad snappy stream identifier")
            self._started = True
            end += _CHUNK_HEADER + length
        if end == 0:
            return b""
        chunks = bytes(buffer[:end])
        del buffer[:end]
        try:
            return bytes(cramjam.snappy.decompress(STREAM_IDENTIFIER + chunks))
        except cramjam.DecompressionError as exc:
            return self._fail(f"corrupt snappy chunk: {exc}")

    def _fail(self, reason: str) -> bytes:
        self._error = CompressionError(reason)
        self._buffer.clear()
        raise self._error
