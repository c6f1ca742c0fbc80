"""The byte-stream adapter's end of stream: whatever a stream raises when it cannot send its end becomes the
link's documented ``BrokenResourceError`` (a tunnel closing over tls:// once crashed a whole server when anyio's
TLS stream, its connection already shut, raised TypeError from ``send_eof``)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from anyio.abc import ByteStream

from vtunnel.transports.link import StreamLink

pytestmark = pytest.mark.anyio


class _FailingEnd(ByteStream):
    """A stream that takes bytes but fails its own way at the end of stream."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.sent: list[bytes] = []

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.sleep_forever()
        raise AssertionError

    async def send(self, item: bytes) -> None:
        self.sent.append(item)

    async def send_eof(self) -> None:
        raise self.error

    async def aclose(self) -> None:
        pass

    @property
    def extra_attributes(self) -> Any:
        return {}


@pytest.mark.parametrize("error", [TypeError("expected string, got NoneType"), ValueError("x")])
async def test_a_streams_own_failure_at_the_end_is_a_broken_link(error: Exception) -> None:
    stream = _FailingEnd(error)
    link = StreamLink(stream)
    link.send_nowait(b"last words")
    with pytest.raises(anyio.BrokenResourceError) as caught:
        await link.send_eof()
    assert caught.value.__cause__ is error
    assert stream.sent == [b"last words"]  # what was queued went first


async def test_a_stream_that_cannot_half_close_still_says_so() -> None:
    link = StreamLink(_FailingEnd(NotImplementedError()))
    with pytest.raises(NotImplementedError):
        await link.send_eof()
