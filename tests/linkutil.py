"""Links read and written by awaiting, for the transport tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from vtunnel.transports.link import LinkStream, LinkT

#: the tasks running the links of the streams made here (kept so they are not collected while they run)
_running: set[asyncio.Task[None]] = set()


def stream_of(link: LinkT) -> LinkStream[LinkT]:
    """``link`` as an anyio byte stream, running (its ``run`` task ends when the stream is closed)."""
    stream: LinkStream[LinkT] = LinkStream(link)
    task = asyncio.get_running_loop().create_task(link.run(stream))
    _running.add(task)
    task.add_done_callback(_running.discard)
    return stream


@dataclass
class TimerCount:
    #: loop timers made (``call_at``) while counting
    created: int = 0


@contextmanager
def counting_loop_timers() -> Iterator[TimerCount]:
    """Count the timers the running asyncio loop makes (its ``call_at``) inside the block."""
    loop = asyncio.get_running_loop()
    count = TimerCount()
    call_at = loop.call_at

    def counting_call_at(when: float, callback: Callable[..., object], *args: Any) -> asyncio.TimerHandle:
        count.created += 1
        return call_at(when, callback, *args)

    loop.call_at = counting_call_at  # type: ignore[method-assign, assignment]
    try:
        yield count
    finally:
        del loop.call_at
