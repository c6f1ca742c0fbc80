"""A tunnel stream as an anyio :class:`~anyio.abc.ByteStream`: the thin adapter for code that awaits.

:class:`TunnelByteStream` is a :class:`~vtunnel.runtime.tunnel_stream.StreamConsumer` built on the stream's public
callback API only: it keeps what arrives until a task receives it (the credit goes back to the peer as it is
received, so a reader that stops bounds what the peer may send), and wakes a task that waits to receive or to
send. It exists while such code runs (a header exchange, the UDP exit, a test); :meth:`TunnelByteStream.hand_off`
gives the stream back, with what was not received yet, to a consumer that needs no task (a relay's end).

``send`` waits for flow-control credit and for room in the tunnel's output; ``receive`` returns what arrived;
``send_eof`` is a FIN (the other direction keeps flowing); ``aclose`` frees the stream. A ``udp`` stream keeps
message boundaries: one ``send`` is one datagram, one ``receive`` returns one. Exceptions follow anyio:
``EndOfStream`` after the peer's FIN (once everything before it was received), ``BrokenResourceError`` after a
reset or a dead tunnel (``StreamRefused`` when the stream was never accepted; ``TunnelStream.reset_error`` says
why), ``ClosedResourceError`` after our own ``aclose`` (or ``hand_off``).
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final

import anyio
import anyio.lowlevel
from anyio.abc import ByteStream

from vtunnel.protocol import StreamMetadata
from vtunnel.runtime.tunnel_stream import TunnelStream

__all__ = ["JOIN_BELOW", "TunnelByteStream", "TunnelStreamAttribute"]

#: ``receive`` joins buffered chunks smaller than this into one (up to ``max_bytes``)
JOIN_BELOW: Final = 65536


class TunnelStreamAttribute(anyio.TypedAttributeSet):
    """Typed attributes for ``TunnelByteStream.extra()``."""

    metadata: StreamMetadata | None = anyio.typed_attribute()
    stream_id: int = anyio.typed_attribute()


class TunnelByteStream(ByteStream):
    """``stream`` as an anyio byte stream; it is the stream's consumer from now on (and closes it on ``aclose``)."""

    __slots__ = ("_broken", "_chunks", "_closed", "_eof", "_offset", "_reader", "_writer", "stream")

    def __init__(self, stream: TunnelStream) -> None:
        self.stream = stream
        self._chunks: deque[bytes] = deque()
        self._offset = 0  # bytes of ``_chunks[0]`` already received
        self._eof = False
        self._broken = False
        self._closed = False  # closed, or handed off
        self._reader: asyncio.Future[None] | None = None
        self._writer: asyncio.Future[None] | None = None
        stream.attach(self)

    # ---------------------------------------------------------------- StreamConsumer
    def stream_data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._wake(self._reader)

    def stream_eof(self) -> None:
        self._eof = True
        self._wake(self._reader)

    def stream_broken(self) -> None:
        self._broken = True
        self._wake(self._reader)
        self._wake(self._writer)

    def stream_writable(self) -> None:
        self._wake(self._writer)

    def stream_spliced(self, dedicated: socket.socket, to_peer: bytes, ended: bool) -> bool:
        return False  # a byte stream has no socket to relay in the kernel: the stream stays muxed or is reset

    @staticmethod
    def _wake(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---------------------------------------------------------------- ByteStream
    async def receive(self, max_bytes: int = 65536) -> bytes:
        while not self._chunks:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._eof:  # everything the peer sent arrived, whatever happened after its FIN
                raise anyio.EndOfStream
            if self._broken:
                raise self.stream.failure()
            waiter = self._reader = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._reader = None
        chunk = self._take(max_bytes)
        self.stream.acknowledge(len(chunk))
        return chunk

    def _take(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of what arrived (one datagram on a ``udp`` stream), copying as little as it can.

        A chunk that fits is handed out as it is; small chunks are joined (up to ``JOIN_BELOW`` bytes) so many
        small frames do not become many small writes; a chunk larger than ``max_bytes`` is read through an
        offset, so the rest of it is never copied.
        """
        chunks = self._chunks
        chunk = chunks[0]
        start = self._offset
        if self.stream.datagrams:
            chunks.popleft()
            return chunk
        size = len(chunk) - start
        if size > max_bytes:
            self._offset = start + max_bytes
            return chunk[start : start + max_bytes]
        chunks.popleft()
        if start:
            self._offset = 0
            chunk = chunk[start:]
        if size >= JOIN_BELOW or not chunks or size + len(chunks[0]) > max_bytes:
            return chunk
        parts = [chunk]
        total = size
        while chunks and total < JOIN_BELOW and total + len(chunks[0]) <= max_bytes:
            nxt = chunks.popleft()
            parts.append(nxt)
            total += len(nxt)
        return b"".join(parts)

    async def send(self, item: bytes) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        stream = self.stream
        sent = stream.write(item)  # the whole of it, mostly
        while sent < len(item):
            await self._wait_writable()  # until the send window opens
            sent += stream.write(memoryview(item)[sent:])
        while not stream.has_room() and not self._broken:  # the tunnel's output is over its high-water mark
            await self._wait_writable()
        await anyio.lowlevel.checkpoint()

    async def _wait_writable(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        waiter = self._writer = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._writer = None
        if self._closed:
            raise anyio.ClosedResourceError

    async def send_eof(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        self.stream.write_eof()

    async def aclose(self) -> None:
        """Close the stream (an RST if it is still open both ways); nothing once it was handed off."""
        if not self._closed:
            self._closed = True
            self._chunks.clear()
            self.stream.close()
            self._wake(self._reader)
            self._wake(self._writer)
        await anyio.lowlevel.checkpoint()

    def hand_off(self) -> TunnelStream:
        """Give the stream back, for a consumer that needs no task: what arrived and was not received goes to that
        consumer first. This byte stream is done then (``ClosedResourceError``; ``aclose`` does nothing)."""
        if self._closed:
            raise anyio.ClosedResourceError
        self._closed = True
        unread = list(self._chunks)
        if unread and self._offset:
            unread[0] = unread[0][self._offset :]
        self._chunks.clear()
        self._offset = 0
        self._wake(self._reader)
        self._wake(self._writer)
        self.stream.detach(unread)
        return self.stream

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        stream = self.stream
        return {
            TunnelStreamAttribute.metadata: lambda: stream.metadata,
            TunnelStreamAttribute.stream_id: lambda: stream.stream_id,
        }
