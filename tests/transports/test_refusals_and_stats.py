"""What transports count for the metrics, on real loopback sockets: the peers a listener refused
(``ListenerAttribute.refusals``) and what a link knows of its path (``Link.stats``)."""

from __future__ import annotations

import os
import socket

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream

from tests.streams import echo, read_exactly, wait_until, wrong_key_hello
from tests.transports.test_kcp_sealed import KEY, OTHER_KEY, PLAIN, connect, sealed_listener
from vtunnel.security.errors import HandshakeTimeout
from vtunnel.security.replay import ReplayCache
from vtunnel.transports.base import Endpoint, LinkStats, ListenerAttribute, Refusals
from vtunnel.transports.kcp.transport import KCPTransport
from vtunnel.transports.secure import secure_server
from vtunnel.transports.tcp import TCPTransport

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def test_secure_server_counts_each_way_a_handshake_fails() -> None:
    refusals = Refusals()
    replay = ReplayCache()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(SocketAttribute.local_port)

    async def handle(raw: SocketStream) -> None:
        secured = await secure_server(
            raw, KEY.psk or b"", replay=replay, silence=(0.3, 0.3), refusals=refusals
        )
        assert secured is None

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        wrong = await anyio.connect_tcp("127.0.0.1", port)  # a wrong key: refused at once, then silence
        await wrong.send(wrong_key_hello(OTHER_KEY.psk or b""))
        silent = await anyio.connect_tcp("127.0.0.1", port)  # says nothing until the server gives up
        closing = await anyio.connect_tcp("127.0.0.1", port)
        await closing.aclose()  # a port scan: connects and goes
        with anyio.fail_after(10):
            await wait_until(
                lambda: sum(refusals.handshake_failures.values()) >= 2 and refusals.probes["closed"] >= 1
            )
        await silent.aclose()
        await wrong.aclose()
        tg.cancel_scope.cancel()
    await listener.aclose()
    assert refusals.handshake_failures == {"authentication": 1, "timeout": 1}
    assert refusals.probes == {"closed": 1}


async def test_a_byte_stream_listener_gives_its_refusals() -> None:
    listener = await TCPTransport().listen(Endpoint.parse("tcp://127.0.0.1:0"), security=KEY)
    refusals = listener.extra(ListenerAttribute.refusals)
    port = listener.extra(SocketAttribute.local_address)[1]
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)):
                pass
        with anyio.fail_after(10):
            await wait_until(lambda: refusals.probes["closed"] >= 3)
        tg.cancel_scope.cancel()
    await listener.aclose()
    assert not refusals.handshake_failures


async def test_a_sealed_datagram_listener_counts_strangers_and_a_plain_one_counts_nothing() -> None:
    listener = await sealed_listener()
    refusals = listener.extra(ListenerAttribute.refusals)
    with pytest.raises(HandshakeTimeout):
        await connect(listener.local_address[1], OTHER_KEY, "?connect_timeout=1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
        for _ in range(5):
            raw.sendto(os.urandom(64), listener.local_address)
    with anyio.fail_after(10):
        await wait_until(lambda: refusals.probes["dropped"] + refusals.probes["reset"] >= 6)
    assert set(refusals.probes) <= {"dropped", "reset"}
    await listener.aclose()
    plain = await KCPTransport().listen(Endpoint.parse("kcp://127.0.0.1:0"), security=PLAIN)
    assert plain.extra(ListenerAttribute.refusals, None) is None
    await plain.aclose()


async def test_a_kcp_link_knows_its_rtt_and_keeps_its_counts_after_closing() -> None:
    listener = await sealed_listener()
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        client = await connect(listener.local_address[1])
        payload = os.urandom(500_000)
        with anyio.fail_after(30):
            tg.start_soon(client.send, payload)
            assert await read_exactly(client, len(payload)) == payload
        stats = client.link.stats()
        assert stats.rtt is not None
        assert 0 <= stats.rtt < 5
        assert stats.retransmitted_packets is not None
        assert stats.retransmitted_packets >= 0
        assert stats.lost_packets is None  # ikcp does not tell loss from retransmission
        await client.aclose()
        assert client.link.stats().retransmitted_packets == stats.retransmitted_packets
        tg.cancel_scope.cancel()
    await listener.aclose()


async def test_a_byte_stream_link_knows_nothing_of_its_path() -> None:
    listener = await TCPTransport().listen(Endpoint.parse("tcp://127.0.0.1:0"), security=PLAIN)
    port = listener.extra(SocketAttribute.local_address)[1]
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        link = await TCPTransport().connect(Endpoint.parse(f"tcp://127.0.0.1:{port}"), security=PLAIN)
        assert link.stats() == LinkStats()
        await link.aclose()
        tg.cancel_scope.cancel()
    await listener.aclose()
