"""Links read and written by awaiting, for the transport tests."""

from __future__ import annotations

import asyncio

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
