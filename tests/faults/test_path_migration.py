"""kcp:// and rudp:// with a key move a session to a new client address only once that address proved it receives (a
challenge echoed from there) and the client's newest datagrams come from there: copies of the client's
datagrams sent from elsewhere get no more than the anti-amplification allowance and move nothing; a real NAT
rebinding still moves the session."""

from __future__ import annotations

import os
import random
import socket
from typing import Any

import anyio
import pytest
from anyio.abc import ByteStream

from tests.linkutil import stream_of
from tests.streams import read_exactly
from vtunnel.io.datagrams import Address, DatagramSocket, open_udp_socket
from vtunnel.security.datagram import read_handshake_datagram
from vtunnel.testing import ImpairmentRelay
from vtunnel.transports.base import Endpoint, SecurityConfig
from vtunnel.transports.kcp.routing import DatagramListener
from vtunnel.transports.kcp.sealed import SealedListenerCodec
from vtunnel.transports.kcp.transport import DatagramTransport, KCPTransport
from vtunnel.transports.link import Link, LinkStream
from vtunnel.transports.rudp.transport import RudpTransport

pytestmark = pytest.mark.anyio

KEY = SecurityConfig(psk=bytes(range(32)))
DOWNLOAD = 2 * 1024 * 1024
#: what an address that has not proven it receives may be sent, in multiples of what came from it (RFC 9000)
ALLOWANCE = 3
#: copied datagrams the copying test wants in before it judges, and the downloads it may make to get them
MIN_COPIES = 40
COPY_ROUNDS = 16


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture(params=["kcp", "rudp"])
def scheme(request: pytest.FixtureRequest) -> str:
    """Both datagram transports share the sealed codec's path validation: each is checked."""
    return str(request.param)


def transport_of(scheme: str) -> DatagramTransport[Any]:
    return KCPTransport() if scheme == "kcp" else RudpTransport()


def is_first_datagram(datagram: bytes) -> bool:
    """Whether ``datagram`` frames a handshake's first message (only a key holder can tell)."""
    assert KEY.psk is not None
    return read_handshake_datagram(KEY.psk, datagram, from_client=True) is not None


class CopyingForwarder:
    """client <-> ``address`` | ``upstream`` <-> server, plus an injector on 127.0.0.2 that resends a copy of
    every client datagram after the first (DATA, control) to the server, ahead of the original or behind it
    (seeded). What the server sends the injector is counted and goes nowhere."""

    def __init__(self, server: Address, seed: int) -> None:
        self.server = server
        self.client: Address | None = None
        self.rng = random.Random(seed)
        self.injected = 0  # bytes the injector sent
        self.copies = 0  # datagrams the injector sent
        self.to_injector = 0  # bytes the server sent the injector
        self.down = DatagramSocket(open_udp_socket(socket.AF_INET, bind=("127.0.0.1", 0)), self._from_client)
        self.up = DatagramSocket(open_udp_socket(socket.AF_INET, bind=("127.0.0.1", 0)), self._from_server)
        self.injector = DatagramSocket(
            open_udp_socket(socket.AF_INET, bind=("127.0.0.2", 0)), self._at_injector
        )

    @property
    def address(self) -> Address:
        return self.down.local_address

    def _from_client(self, batch: list[tuple[bytes, Address]]) -> None:
        for datagram, source in batch:
            self.client = source
            if is_first_datagram(datagram):  # a racing copy of the first datagram only delays the handshake
                self.up.sendto(datagram, self.server)
                continue
            ahead = self.rng.random() < 0.5
            if ahead:
                self._inject(datagram)
            self.up.sendto(datagram, self.server)
            if not ahead:
                self._inject(datagram)

    def _inject(self, datagram: bytes) -> None:
        self.injected += len(datagram)
        self.copies += 1
        self.injector.sendto(datagram, self.server)

    def _from_server(self, batch: list[tuple[bytes, Address]]) -> None:
        for datagram, source in batch:
            if source == self.server and self.client is not None:
                self.down.sendto(datagram, self.client)

    def _at_injector(self, batch: list[tuple[bytes, Address]]) -> None:
        self.to_injector += sum(len(datagram) for datagram, _source in batch)

    def close(self) -> None:
        for sock in (self.down, self.up, self.injector):
            sock.close()


async def serve_download(link: Link) -> None:
    """Answer each 8-byte request with DOWNLOAD bytes derived from it, until the client's end."""
    stream = stream_of(link)
    try:
        while True:
            seed = await read_exactly(stream, 8)
            await stream.send(random.Random(seed).randbytes(DOWNLOAD))
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def listen(scheme: str) -> DatagramListener[SealedListenerCodec]:
    listener = await transport_of(scheme).listen(Endpoint.parse(f"{scheme}://127.0.0.1:0"), security=KEY)
    assert isinstance(listener, DatagramListener)
    assert isinstance(listener.codec, SealedListenerCodec)
    return listener


async def connect(scheme: str, address: Address) -> LinkStream[Link]:
    link = await transport_of(scheme).connect(
        Endpoint.parse(f"{scheme}://{address[0]}:{address[1]}"), security=KEY
    )
    return stream_of(link)


async def download(client: ByteStream) -> None:
    seed = os.urandom(8)
    await client.send(seed)
    assert await read_exactly(client, DOWNLOAD) == random.Random(seed).randbytes(DOWNLOAD)


@pytest.mark.parametrize("seed", [1, 2])
async def test_copies_from_another_address_get_the_allowance_at_most_and_move_nothing(
    scheme: str, seed: int
) -> None:
    listener = await listen(scheme)
    forwarder = CopyingForwarder(listener.local_address, seed)
    upstream = forwarder.up.local_address
    addresses: set[Address] = set()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, serve_download)
            with anyio.fail_after(10):
                client = await connect(scheme, forwarder.address)

            async def watch() -> None:
                for _ in range(20_000):  # bounded: 5 ms apart, the transfer ends long before
                    addresses.update(s.remote_address for s in listener.sessions.values())
                    await anyio.sleep(0.005)

            tg.start_soon(watch)
            # downloads until enough copies went in: how many ACKs one download takes depends on how the
            # receiver's reads were batched (rudp:// acknowledges a batch of packets at once)
            for _ in range(COPY_ROUNDS):
                with anyio.fail_after(60):
                    await download(client)
                if forwarder.copies >= MIN_COPIES:
                    break
            await client.aclose()
            tg.cancel_scope.cancel()
    finally:
        forwarder.close()
        await listener.aclose()
    # the copies went in (ACKs mostly: kcp:// acknowledges every segment, rudp:// a batch of packets at once)
    assert forwarder.copies >= MIN_COPIES
    assert forwarder.to_injector <= ALLOWANCE * forwarder.injected
    assert addresses == {upstream}  # the session never moved
    assert listener.codec.challenges_sent >= 1  # copies raced ahead of originals, and were challenged


async def test_a_real_rebinding_moves_the_session_after_its_new_address_answered(scheme: str) -> None:
    listener = await listen(scheme)
    async with ImpairmentRelay(listener.local_address, seed=7) as relay, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve_download)
        with anyio.fail_after(10):
            client = await connect(scheme, relay.address)
        for _ in range(2):
            with anyio.fail_after(60):
                await download(client)
            (first,) = relay.upstream_addresses
            relay.rebind()
            (moved,) = relay.upstream_addresses
            assert moved != first
            assert [s.remote_address for s in listener.sessions.values()] == [first]
            # the client's next datagrams come from the new port: after one challenge, the session follows
            with anyio.fail_after(60):
                await download(client)
            assert [s.remote_address for s in listener.sessions.values()] == [moved]
        assert listener.codec.challenges_sent >= 2
        await client.aclose()
        tg.cancel_scope.cancel()
    await listener.aclose()


class RebindingForwarder:
    """client <-> ``address`` | one upstream socket at a time <-> server, as a NAT whose mapping changes at
    :meth:`rebind`; records, per upstream socket (a path), the first 8 bytes (the clear connection ID) and the
    whole of every datagram, both ways, as a passive observer of that path would see them."""

    def __init__(self, server: Address) -> None:
        self.server = server
        self.client: Address | None = None
        self.paths: list[list[tuple[str, bytes]]] = []  # per path: (direction, datagram)
        self.down = DatagramSocket(open_udp_socket(socket.AF_INET, bind=("127.0.0.1", 0)), self._from_client)
        self.up = self._open()

    def _open(self) -> DatagramSocket:
        self.paths.append([])
        path = self.paths[-1]

        def from_server(batch: list[tuple[bytes, Address]]) -> None:
            for datagram, source in batch:
                if source == self.server and self.client is not None:
                    path.append(("down", datagram))
                    self.down.sendto(datagram, self.client)

        return DatagramSocket(open_udp_socket(socket.AF_INET, bind=("127.0.0.1", 0)), from_server)

    @property
    def address(self) -> Address:
        return self.down.local_address

    def _from_client(self, batch: list[tuple[bytes, Address]]) -> None:
        for datagram, source in batch:
            self.client = source
            self.paths[-1].append(("up", datagram))
            self.up.sendto(datagram, self.server)

    def rebind(self) -> None:
        old, self.up = self.up, self._open()
        old.close()

    def close(self) -> None:
        self.down.close()
        self.up.close()


async def test_connection_ids_rotate_with_the_path(scheme: str) -> None:
    """Two NAT rebindings mid-session: on each new path, once the client learnt of the move (its first datagrams
    there cannot know), no datagram either way carries a connection ID used on an earlier path; the server's
    datagrams there never do; the new path's ID never appeared in clear on an earlier path (it was announced
    sealed); each transfer is byte-exact."""
    listener = await listen(scheme)
    forwarder = RebindingForwarder(listener.local_address)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, serve_download)
            with anyio.fail_after(10):
                client = await connect(scheme, forwarder.address)
            with anyio.fail_after(60):
                await download(client)
            for _ in range(2):
                forwarder.rebind()
                with anyio.fail_after(60):
                    await download(client)
                    await download(client)
            await client.aclose()
            tg.cancel_scope.cancel()
    finally:
        forwarder.close()
        await listener.aclose()
    assert listener.codec.rotations >= 2
    earlier_ids: set[bytes] = set()
    earlier_bytes: list[bytes] = []
    for index, path in enumerate(forwarder.paths):
        ids = [datagram[:8] for _direction, datagram in path]
        assert ids, f"path {index} carried nothing"
        if index:
            # the client's first datagram under a new ID: it has learnt of the move
            new = [i for i, cid in enumerate(ids) if cid not in earlier_ids and path[i][0] == "up"]
            assert new, f"path {index}: the client used no new connection ID"
            first_new = new[0]
            assert not earlier_ids & set(ids[first_new:]), f"path {index} went back to an old ID"
            assert not any(d == "down" and cid in earlier_ids for (d, _), cid in zip(path, ids, strict=True))
            for cid in set(ids) - earlier_ids:
                assert not any(cid in datagram for datagram in earlier_bytes), "a new ID was seen in clear"
        earlier_ids.update(ids)
        earlier_bytes.extend(datagram for _direction, datagram in path)
