"""The sender's stream bytes, written and not yet acknowledged: kept as the chunks the application wrote.

One ``bytearray`` grown at its end and cut at its front copies the whole buffer (up to ``send_buffer``, 8 MiB)
each time its allocation runs out; chunks are never copied again once taken. A packet's STREAM data is a slice
of one chunk (or, at a chunk's end, a join of two), found by bisecting the chunks' stream offsets. Chunks are
dropped once every byte of them is acknowledged.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Final

__all__ = ["SendBuffer"]

#: released chunks are cut off the front of the lists once this many have gathered (not on every release)
_COMPACT: Final = 256


class SendBuffer:
    """Stream bytes from offset :attr:`start` (the oldest not released) to :attr:`end` (the next to write)."""

    __slots__ = ("_chunks", "_first", "_offsets", "end", "start")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        #: the stream offset of each chunk's first byte (ascending)
        self._offsets: list[int] = []
        #: the index of the first chunk still held
        self._first = 0
        self.start = 0
        self.end = 0

    def __len__(self) -> int:
        """Bytes held (written, not released)."""
        return self.end - self.start

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Take ``data`` (copied unless it is ``bytes``, which cannot change under us)."""
        if not data:
            return
        chunk = data if type(data) is bytes else bytes(data)
        self._chunks.append(chunk)
        self._offsets.append(self.end)
        self.end += len(chunk)

    def slice(self, start: int, end: int) -> bytes:
        """The bytes of ``[start, end)`` (held: ``self.start <= start <= end <= self.end``)."""
        offsets = self._offsets
        chunks = self._chunks
        i = bisect_right(offsets, start, self._first) - 1
        base = offsets[i]
        chunk = chunks[i]
        if end - base <= len(chunk):
            return chunk[start - base : end - base]
        parts = [chunk[start - base :]]
        position = base + len(chunk)
        while position < end:
            i += 1
            chunk = chunks[i]
            parts.append(chunk[: end - position])
            position += len(chunk)
        return b"".join(parts)

    def chunk_at(self, offset: int) -> tuple[bytes, int]:
        """The chunk holding the byte at ``offset`` (held), and the stream offset of its first byte: a sender
        cutting a burst of packets from one chunk slices it itself, without a search for each packet."""
        i = bisect_right(self._offsets, offset, self._first) - 1
        return self._chunks[i], self._offsets[i]

    def release(self, offset: int) -> None:
        """Forget the bytes below ``offset`` (acknowledged): whole chunks below it are dropped."""
        if offset <= self.start:
            return
        if offset > self.end:
            offset = self.end
        self.start = offset
        offsets = self._offsets
        chunks = self._chunks
        first = self._first
        last = len(chunks) - 1
        while first < last and offsets[first + 1] <= offset:
            chunks[first] = b""
            first += 1
        if first <= last and offsets[first] + len(chunks[first]) <= offset:
            chunks[first] = b""  # the last chunk, all released
            first += 1
        if first >= _COMPACT:
            del chunks[:first]
            del offsets[:first]
            first = 0
        self._first = first
