"""RudpLink's unreliable datagrams, driven by a real client connection's packets (no socket between them): the
bytes of an input reach the consumer before its datagrams, a paused link drops them, and what the link sends is
rudp's DATAGRAM frames."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import pytest

from vtunnel.arq.rudp.connection import Connection, DatagramReceived, Role
from vtunnel.transports.rudp.link import RudpLink

pytestmark = pytest.mark.anyio

CID = b"server01"
ADDRESS = ("127.0.0.1", 9)


class Calls:
    """The link's calls, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    def link_data(self, data: bytes) -> None:
        self.calls.append(("data", data))

    def link_writable(self) -> None:
        self.calls.append(("writable", b""))

    def link_ended(self, error: BaseException | None) -> None:
        self.calls.append(("ended", b""))

    def link_datagram(self, data: bytes) -> None:
        self.calls.append(("datagram", data))


@asynccontextmanager
async def server_link(consumer: Calls) -> AsyncIterator[tuple[RudpLink, Connection, list[bytes]]]:
    """A server link running for ``consumer``, its peer's connection, and what the link sent."""
    now = asyncio.get_running_loop().time()
    client = Connection(role=Role.CLIENT, local_cid=b"", peer_cid=CID, now=now)
    sent: list[bytes] = []
    link = RudpLink(
        connection=Connection(role=Role.SERVER, local_cid=CID, peer_cid=b"", now=now, address_validated=True),
        timeout=5.0,
        transmit=lambda datagrams, _address: sent.extend(datagrams),
        local_address=ADDRESS,
        remote_address=ADDRESS,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(link.run, consumer)
        await anyio.lowlevel.checkpoint()
        yield link, client, sent
        await link.aclose()
        tg.cancel_scope.cancel()


async def test_the_bytes_of_an_input_go_before_its_datagrams() -> None:
    calls = Calls()
    async with server_link(calls) as (link, client, _sent):
        now = asyncio.get_running_loop().time()
        client.send(b"the stream opens")
        client.send_datagram(b"and its first datagram")
        packets = client.datagrams_to_send(now)
        assert len(packets) == 1  # one packet: the DATAGRAM frame first, the STREAM frame after it
        link.feed(packets)
        assert calls.calls == [("data", b"the stream opens"), ("datagram", b"and its first datagram")]
        assert link.datagrams_received == 1


async def test_a_paused_link_drops_datagrams() -> None:
    calls = Calls()
    async with server_link(calls) as (link, client, _sent):
        now = asyncio.get_running_loop().time()
        link.pause_reading()
        client.send_datagram(b"dropped")
        link.feed(client.datagrams_to_send(now))
        link.resume_reading()
        assert calls.calls == []
        assert link.datagrams_dropped == 1


async def test_what_the_link_sends_arrives_as_datagrams_once() -> None:
    calls = Calls()
    async with server_link(calls) as (link, client, sent):
        now = asyncio.get_running_loop().time()
        client.send(b"hello")  # the server speaks only after its client did
        link.feed(client.datagrams_to_send(now))
        assert link.max_datagram == link.connection.max_datagram_payload() > 1200
        with pytest.raises(ValueError, match="exceeds"):
            link.send_datagram_nowait(b"x" * (link.max_datagram + 1))
        link.send_datagram_nowait(b"x" * link.max_datagram)
        link.send_datagram_nowait(b"")
        got = []
        for packet in sent + sent:  # every packet twice: the duplicates are discarded
            got += [e.data for e in client.receive_datagram(packet, now) if isinstance(e, DatagramReceived)]
        assert got == [b"x" * link.max_datagram, b""]
        await link.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            link.send_datagram_nowait(b"after the close")
