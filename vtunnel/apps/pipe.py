"""Bidirectional copy between two byte streams, and the opener type the proxy fronts use.

``pipe(a, b)`` copies ``a -> b`` and ``b -> a`` at the same time until both directions have ended:

* an end of stream on one side is passed on as ``send_eof()`` on the other (a faithful half-close) while the
  other direction keeps flowing;
* a broken or reset side (``BrokenResourceError``, ``ClosedResourceError``, ``OSError``) ends both directions
  at once;
* an optional idle timeout ends both directions when no byte moved either way for that long;
* both streams are closed when it returns, whatever happened.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import anyio
import structlog
from anyio.abc import ByteStream

from vtunnel.runtime.errors import StreamRefused

if TYPE_CHECKING:
    from vtunnel.protocol import StreamMetadata

__all__ = ["CHUNK_SIZE", "HeaderTooLarge", "Opener", "StreamBuffer", "pipe"]

log = structlog.get_logger(__name__)

#: The largest read issued per step of the copy: anyio's socket streams hand out what the event loop read
#: (up to 256 KiB), and a smaller read would split, and so copy, those chunks.
CHUNK_SIZE = 256 * 1024

#: Opens one stream through the tunnel for the given metadata.  Raises
#: ``vtunnel.runtime.errors.StreamRefused`` when the server refused it and
#: ``vtunnel.runtime.errors.TunnelUnavailable`` when no tunnel can be used.
Opener = Callable[["StreamMetadata"], Awaitable[ByteStream]]


#: What a broken, reset or already closed side raises.
_BROKEN = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, StreamRefused)

T = TypeVar("T")


class HeaderTooLarge(Exception):
    """A peer sent more than the allowed number of bytes without completing a header."""


class StreamBuffer:
    """Reads a protocol header off a byte stream with an incremental parser, keeping what follows it.

    ``parser(buffer)`` returns ``None`` while it needs more bytes, or ``(value, consumed)``; it raises its own
    error for malformed input.  Bytes after the header stay in ``pending`` (for example data a 0-RTT client
    sent before our reply); ``take_pending()`` hands them over.
    """

    __slots__ = ("limit", "pending", "stream")

    def __init__(self, stream: ByteStream, *, limit: int = 65536, initial: bytes = b"") -> None:
        self.stream = stream
        self.limit = limit
        self.pending = bytearray(initial)

    async def parse(self, parser: Callable[[bytes], tuple[T, int] | None]) -> T:
        """Receive until ``parser`` completes; ``anyio.EndOfStream`` if the peer ends first."""
        while True:
            if self.pending:
                result = parser(bytes(self.pending))
                if result is not None:
                    value, consumed = result
                    del self.pending[:consumed]
                    return value
            if len(self.pending) >= self.limit:
                raise HeaderTooLarge(f"no complete header in {len(self.pending)} bytes")
            self.pending += await self.stream.receive()

    def take_pending(self) -> bytes:
        data = bytes(self.pending)
        self.pending.clear()
        return data


class _Progress:
    """Bytes moved per direction, shared with the idle watcher (no clock read per chunk)."""

    __slots__ = ("moved",)

    def __init__(self) -> None:
        self.moved = [0, 0]

    def total(self) -> int:
        return self.moved[0] + self.moved[1]


async def _copy(
    src: ByteStream, dst: ByteStream, progress: _Progress, index: int, scope: anyio.CancelScope
) -> None:
    """Copy ``src`` into ``dst`` until ``src`` ends; on a broken side cancel ``scope`` (both directions)."""
    moved = progress.moved
    try:
        while True:
            try:
                data = await src.receive(CHUNK_SIZE)
            except anyio.EndOfStream:
                break
            await dst.send(data)
            moved[index] += len(data)
    except _BROKEN as exc:
        log.debug("pipe.broken", error=type(exc).__name__)
        scope.cancel()
        return
    except Exception as exc:  # a stream implementation failing in its own way still ends both directions
        log.warning("pipe.failed", error=repr(exc))
        scope.cancel()
        return
    try:
        await dst.send_eof()
    except NotImplementedError:
        # The other side cannot half-close: the remaining direction ends the pipe.
        pass
    except _BROKEN as exc:
        log.debug("pipe.eof_failed", error=type(exc).__name__)
        scope.cancel()


async def _watch_idle(idle_timeout: float, progress: _Progress, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` once no chunk moved for ``idle_timeout`` seconds (checked four times per period)."""
    step = idle_timeout / 4
    seen = progress.total()
    idle_for = 0.0
    while True:
        await anyio.sleep(step)
        if progress.total() != seen:
            seen = progress.total()
            idle_for = 0.0
            continue
        idle_for += step
        if idle_for >= idle_timeout:
            log.debug("pipe.idle_timeout", idle_timeout=idle_timeout)
            scope.cancel()
            return


async def pipe(a: ByteStream, b: ByteStream, *, idle_timeout: float | None = None) -> tuple[int, int]:
    """Copy both ways between ``a`` and ``b`` until both directions ended; return ``(a_to_b, b_to_a)`` bytes.

    Both streams are closed on return.  Cancellation from outside propagates after the streams are closed.
    """
    if idle_timeout is not None and idle_timeout <= 0:
        raise ValueError("idle_timeout must be positive")
    progress = _Progress()
    if idle_timeout is None:
        # the common case: one extra task (the other direction runs in this one), one task group
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_copy, b, a, progress, 1, tg.cancel_scope)
                await _copy(a, b, progress, 0, tg.cancel_scope)
        finally:
            with anyio.CancelScope(shield=True):
                await _close_quietly(a)
                await _close_quietly(b)
        return progress.moved[0], progress.moved[1]
    try:
        with anyio.CancelScope() as outer:
            async with anyio.create_task_group() as tg:
                if idle_timeout is not None:
                    watcher = anyio.CancelScope()

                    async def watch() -> None:
                        with watcher:
                            await _watch_idle(idle_timeout, progress, outer)

                    tg.start_soon(watch)
                async with anyio.create_task_group() as copiers:
                    copiers.start_soon(_copy, a, b, progress, 0, outer)
                    copiers.start_soon(_copy, b, a, progress, 1, outer)
                if idle_timeout is not None:
                    watcher.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await _close_quietly(a)
            await _close_quietly(b)
    return progress.moved[0], progress.moved[1]


async def _close_quietly(stream: ByteStream) -> None:
    try:
        await stream.aclose()
    except _BROKEN as exc:
        log.debug("pipe.close_failed", error=type(exc).__name__)
