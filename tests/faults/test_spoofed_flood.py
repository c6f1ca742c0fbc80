"""A flood of datagrams that carry a kcp:// client's own source address but no key (random bytes, first
datagrams under another key, replayed first datagrams, DATA for made-up connection IDs) must not keep that
client from connecting, nor draw a single answer."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import anyio
import pytest

from tests.linkutil import stream_of
from tests.streams import echo, read_exactly
from vtunnel.io.datagrams import Address, DatagramSocket, open_udp_socket
from vtunnel.security.datagram import DatagramClient, is_minted, read_handshake_datagram, reset_keys
from vtunnel.transports.base import Endpoint, SecurityConfig
from vtunnel.transports.kcp.listener import KCPListener
from vtunnel.transports.kcp.sealed import SealedListenerCodec
from vtunnel.transports.kcp.transport import KCPTransport
from vtunnel.transports.link import Link, LinkStream

pytestmark = pytest.mark.anyio

KEY = SecurityConfig(psk=bytes(range(32)))
CID_KEY = reset_keys(KEY.psk or b"")[1]


def unminted(make: Callable[[], bytes]) -> bytes:
    """A forgery whose first 8 bytes are no connection ID a key holder could have minted (a random one is, 1
    time in 2**24, and would rightly draw a stateless reset)."""
    while True:
        datagram = make()
        if not is_minted(CID_KEY, datagram[:8]):
            return datagram


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": True})


class SpoofingForwarder:
    """client <-> ``address`` | one upstream socket <-> server. Everything the clients send leaves from the
    upstream socket, and so does what :meth:`inject` sends: to the server, the attacker's datagrams come from the
    very address and port its clients use. Answers go to the client that spoke last."""

    def __init__(self, server: Address) -> None:
        self.server = server
        self.client: Address | None = None
        #: datagrams to send ahead of each client's first datagram (a racing attacker), if set
        self.ahead_of_init: Callable[[], list[bytes]] | None = None
        self.first_datagrams: list[bytes] = []
        self.down = DatagramSocket(open_udp_socket(socket.AF_INET, bind=("127.0.0.1", 0)), self._from_client)
        self.up = DatagramSocket(open_udp_socket(socket.AF_INET, bind=("127.0.0.1", 0)), self._from_server)

    @property
    def address(self) -> Address:
        return self.down.local_address

    def _from_client(self, batch: list[tuple[bytes, Address]]) -> None:
        for datagram, source in batch:
            self.client = source
            assert KEY.psk is not None
            if read_handshake_datagram(KEY.psk, datagram, from_client=True) is not None:
                self.first_datagrams.append(datagram)
                if self.ahead_of_init is not None:
                    for forged in self.ahead_of_init():
                        self.inject(forged)
            self.up.sendto(datagram, self.server)

    def _from_server(self, batch: list[tuple[bytes, Address]]) -> None:
        for datagram, source in batch:
            if source == self.server and self.client is not None:
                self.down.sendto(datagram, self.client)

    def inject(self, datagram: bytes) -> None:
        self.up.sendto(datagram, self.server)

    def close(self) -> None:
        self.down.close()
        self.up.close()


async def connect(address: Address) -> LinkStream[Link]:
    link = await KCPTransport().connect(Endpoint.parse(f"kcp://{address[0]}:{address[1]}"), security=KEY)
    return stream_of(link)


async def test_a_keyless_flood_from_the_clients_own_address_does_not_lock_it_out() -> None:
    listener = await KCPTransport().listen(Endpoint.parse("kcp://127.0.0.1:0"), security=KEY)
    assert isinstance(listener, KCPListener)
    assert isinstance(listener.codec, SealedListenerCodec)
    forwarder = SpoofingForwarder(listener.local_address)
    flooded = 0
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo)
            with anyio.fail_after(10):
                first = await connect(forwarder.address)
                await first.send(b"hello")
                assert await read_exactly(first, 5) == b"hello"
            await first.aclose()  # the tunnel died; the client reconnects
            captured = list(forwarder.first_datagrams)
            assert captured
            init_size = len(captured[0])
            other_key = bytes(32)

            def volley() -> list[bytes]:
                return [
                    unminted(lambda: os.urandom(init_size)),
                    unminted(lambda: os.urandom(os.urandom(1)[0] + 100)),
                    unminted(DatagramClient(other_key, now=time.time()).initial_datagram),
                    *captured,
                    unminted(lambda: os.urandom(109)),  # DATA-sized, for a made-up connection ID
                    unminted(lambda: os.urandom(60)),
                ]

            flooding = anyio.Event()

            async def flood() -> None:
                nonlocal flooded
                deadline = time.monotonic() + 15.0
                for _ in range(1500):  # at most ~15 s of 10 volleys every 10 ms
                    for _ in range(10):
                        for datagram in volley():
                            forwarder.inject(datagram)
                            flooded += 1
                    flooding.set()
                    if time.monotonic() > deadline:
                        return
                    await anyio.sleep(0.01)

            def ahead() -> list[bytes]:
                nonlocal flooded
                flooded += 50 * 6
                return volley() * 50

            async with anyio.create_task_group() as attack:
                attack.start_soon(flood)
                # every first datagram of the client is also raced by a burst of forgeries sent ahead of it
                forwarder.ahead_of_init = ahead
                await flooding.wait()
                await anyio.sleep(0.5)  # well past any handshake budget a stranger could spend
                with anyio.fail_after(2):
                    client = await connect(forwarder.address)
                with anyio.fail_after(20):
                    payload = os.urandom(300_000)
                    tg.start_soon(client.send, payload)
                    assert await read_exactly(client, len(payload)) == payload
                attack.cancel_scope.cancel()
            forwarder.ahead_of_init = None
            assert flooded > 1000
            assert listener.codec.resets_sent == 0  # nothing was answered
            # the server kept serving: a client from elsewhere on the same host gets in too
            with anyio.fail_after(2):
                other = await connect(listener.local_address)
            with anyio.fail_after(10):
                await other.send(b"still up")
                assert await read_exactly(other, 8) == b"still up"
            await other.aclose()
            await client.aclose()
            tg.cancel_scope.cancel()
    finally:
        forwarder.close()
        await listener.aclose()
