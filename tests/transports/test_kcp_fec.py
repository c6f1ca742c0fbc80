"""kcp:// with forward error correction (``fec=D/P``) on real sockets: the option, bulk through the impairment
relay plain and sealed, a NAT rebinding, garbage and short FEC packets, and ends that do not agree."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from tests.linkutil import stream_of
from tests.streams import echo, read_exactly, wait_until
from tests.transports.test_kcp_impaired import transfer
from vtunnel.arq.fec import FEC_OVERHEAD, TYPE_DATA, TYPE_PARITY, FECEncoder
from vtunnel.arq.kcp_engine import KCPEngine
from vtunnel.arq.kcp_options import KCPOptions
from vtunnel.arq.kcp_wire import HEADER_LEN
from vtunnel.testing import Impairment, ImpairmentRelay
from vtunnel.testing.conformance import KIT_KEY
from vtunnel.transports.base import Endpoint, SecurityConfig, TransportError
from vtunnel.transports.kcp.fec import FECLink, FECMarks, FECPlainListenerCodec, fec_kind
from vtunnel.transports.kcp.link import KCPLink
from vtunnel.transports.kcp.listener import KCPListener
from vtunnel.transports.kcp.options import parse_options
from vtunnel.transports.kcp.transport import KCPTransport
from vtunnel.transports.link import LinkStream

pytestmark = pytest.mark.anyio

PLAIN = SecurityConfig()
FEC = "?fec=10/3"
#: 5% loss each way
LOSSY = Impairment(loss=0.05)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    """uvloop, the runtime's loop when installed (test_kcp.py covers both loops)."""
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What the event loop's exception handler is given while the test runs (a datagram callback that raised)."""
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(previous)


async def listen(query: str = FEC, security: SecurityConfig = PLAIN) -> KCPListener[Any]:
    listener = await KCPTransport().listen(Endpoint.parse(f"kcp://127.0.0.1:0{query}"), security=security)
    assert isinstance(listener, KCPListener)
    return listener


async def connect(port: int, query: str = FEC, security: SecurityConfig = PLAIN) -> LinkStream[KCPLink]:
    link = await KCPTransport().connect(Endpoint.parse(f"kcp://127.0.0.1:{port}{query}"), security=security)
    assert isinstance(link, KCPLink)
    return stream_of(link)


# --- the option ---------------------------------------------------------------------------------------------


def test_fec_is_off_by_default_and_reads_data_slash_parity() -> None:
    assert parse_options({}).fec is None
    assert parse_options({"fec": "off"}).fec is None
    assert parse_options({"fec": "10/3"}).fec == (10, 3)
    assert parse_options({"fec": "1/1"}).fec == (1, 1)
    assert parse_options({"fec": "200/56"}).fec == (200, 56)


@pytest.mark.parametrize("text", ["10", "10/", "/3", "0/3", "10/0", "200/57", "a/b", "10/3/1", "-1/3", "on"])
def test_bad_fec_values_name_the_option(text: str) -> None:
    with pytest.raises(TransportError, match="kcp option 'fec'"):
        parse_options({"fec": text})


@pytest.mark.parametrize("security", [PLAIN, KIT_KEY], ids=["plain", "keyed"])
async def test_fec_sessions_are_fec_links_with_room_for_the_header(security: SecurityConfig) -> None:
    listener = await listen(security=security)
    if security.psk is None:
        assert isinstance(listener.codec, FECPlainListenerCodec)
    client = await connect(listener.local_address[1], security=security)
    with anyio.fail_after(20):
        await client.send(b"hello")
        server = stream_of(await listener.accept())
        assert await read_exactly(server, 5) == b"hello"
    for link in (client.link, server.link):
        assert isinstance(link, FECLink)
        # the KCP datagram, its FEC header and the codec's overhead fill the configured mtu exactly
        assert link.engine.max_data + HEADER_LEN + FEC_OVERHEAD + listener.codec.overhead == 1350
    await client.aclose()
    await server.aclose()
    await listener.aclose()


# --- through the impairment relay ---------------------------------------------------------------------------


async def lossy_bulk(size: int, security: SecurityConfig, limit: float) -> None:
    listener = await listen(FEC + "&sndwnd=1024&rcvwnd=1024", security)
    async with ImpairmentRelay(listener.local_address, up=LOSSY, down=LOSSY, seed=5) as relay:
        client = await connect(relay.address[1], FEC + "&sndwnd=1024&rcvwnd=1024", security)
        recovered: list[int] = []

        async def watch() -> None:  # the server's link, while it lives
            await wait_until(lambda: listener.session_count == 1, limit=30)
            (link,) = listener.sessions.values()
            assert isinstance(link, FECLink)
            while True:
                recovered[:] = [link.fec_recovered]
                await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            sent, server, echoed = await transfer(client, listener, size, limit=limit)
            tg.cancel_scope.cancel()
        assert sent == server == echoed
        assert relay.up_stats.dropped > 0.03 * relay.up_stats.received
        assert recovered[0] > 0  # the server rebuilt lost datagrams from parity
        assert isinstance(client.link, FECLink)
        assert not client.link.fec_mismatch
        await client.aclose()
    await listener.aclose()


@pytest.mark.parametrize("security", [PLAIN, KIT_KEY], ids=["plain", "keyed"])
async def test_8_mib_at_five_percent_loss_byte_exact(security: SecurityConfig) -> None:
    await lossy_bulk(8 * 1024 * 1024, security, limit=110.0)


@pytest.mark.slow
@pytest.mark.parametrize("security", [PLAIN, KIT_KEY], ids=["plain", "keyed"])
async def test_64_mib_at_five_percent_loss_byte_exact(security: SecurityConfig) -> None:
    await lossy_bulk(64 * 1024 * 1024, security, limit=280.0)


async def test_client_rebinding_mid_transfer_keeps_the_session_and_its_parity() -> None:
    """Keyless, the listener follows the client by the conv inside its data packets; parity packets, which carry
    none, go to the session at their source address: after each move they are the new address's."""
    size = 12 * 1024 * 1024
    lossy = Impairment(loss=0.02)
    listener = await listen()
    async with ImpairmentRelay(listener.local_address, up=lossy, down=lossy, seed=3) as relay:
        client = await connect(relay.address[1])
        seen_ports: set[int] = set()
        recovered: list[int] = []

        async def rebind_twice() -> None:
            for _ in range(2):
                mark = size // 3 * (len(seen_ports) + 1)
                await wait_until(lambda: relay.up_stats.bytes >= mark, limit=60)  # noqa: B023
                seen_ports.update(port for _host, port in relay.upstream_addresses)
                (link,) = listener.sessions.values()
                assert isinstance(link, FECLink)
                recovered.append(link.fec_recovered)
                relay.rebind()
            seen_ports.update(port for _host, port in relay.upstream_addresses)

        async with anyio.create_task_group() as tg:
            tg.start_soon(rebind_twice)
            sent, server, echoed = await transfer(client, listener, size)
        assert sent == server == echoed
        assert len(seen_ports) == 3
        assert listener.session_count == 1
        (link,) = listener.sessions.values()
        assert link.remote_address == relay.upstream_addresses[0]
        assert isinstance(link, FECLink)
        assert link.fec_recovered > recovered[-1]  # parity from the last address rebuilt datagrams too
        await client.aclose()
    await listener.aclose()


# --- bad input ----------------------------------------------------------------------------------------------


def test_marks_read_the_kcp_datagrams_inside_a_run_of_fec_packets() -> None:
    """A keyless session moves only on a newer datagram: its marks are read from each data packet of a run (as
    the codec notes them, at offsets into the run's buffer), and a parity packet is never newer."""
    encoder = FECEncoder(2, 1)
    segment = struct.Struct("<IBBHIIII")
    packets = [
        packet
        for una in (1, 2)
        for packet in encoder.encode(segment.pack(7, 82, 0, 0, 1000 + una, una, una, 0))  # ACKs
    ]
    assert [fec_kind(packet) for packet in packets] == [TYPE_DATA, TYPE_DATA, TYPE_PARITY]
    run = b"".join(packets)
    step = len(packets[0])
    marks = FECMarks()
    assert [marks.note(run, offset) for offset in range(0, len(run), step)] == [True, True, False]
    assert not marks.note(packets[0])  # a copy of an older one
    assert not marks.note(packets[1])


def first_packets(conv: int) -> list[bytes]:
    """A client's first FEC packets for session ``conv`` (a PUSH of sequence number 0), made by the sans-IO
    engine and encoder."""
    engine = KCPEngine(conv=conv, options=KCPOptions(fec=(10, 3)), mtu=1350 - FEC_OVERHEAD, now=0.0)
    engine.send(b"hello")
    engine.flush(0.0)
    encoder = FECEncoder(10, 3)
    return [packet for datagram in engine.datagrams_to_send() for packet in encoder.encode(datagram)]


def garbage(conv: int, rng: random.Random) -> list[bytes]:
    """Short, malformed and lying FEC packets, some for session ``conv``."""
    header = struct.Struct("<IHH")
    kcp = struct.pack("<IBBHIIII", conv, 81, 0, 0, 0, 1, 0, 5) + b"12345"
    out = [
        b"",
        b"\x00",
        b"\x00\x00\x00\x00\xf1\x00",  # a header without its size
        b"\x00\x00\x00\x00\xf2\x00",
        header.pack(0, TYPE_DATA, 2),  # a data packet of nothing
        header.pack(0, TYPE_DATA, 500) + kcp,  # its size lies
        header.pack(1, TYPE_DATA, 2 + len(kcp) - 3) + kcp[:-3],  # the KCP length lies
        header.pack(2, TYPE_DATA, 2 + len(kcp)) + bytes(4) + kcp[4:],  # another conv
        header.pack(10, TYPE_PARITY, 0) + os.urandom(3),
        header.pack(11, TYPE_PARITY, 0) + os.urandom(1400),
        header.pack(12, 0x1234, 0) + os.urandom(30),  # unknown flag
        kcp,  # bare KCP
    ]
    for _ in range(400):  # and packets with random seqids, flags and bodies, for the session's decoder
        flag = rng.choice([TYPE_DATA, TYPE_PARITY, rng.randrange(1 << 16)])
        body = rng.randbytes(rng.choice([0, 1, 2, 24, 100, 1342, rng.randrange(1500)]))
        out.append(header.pack(rng.randrange(1 << 32), flag, rng.randrange(1 << 16))[:6] + body)
    return out


async def test_garbage_and_short_fec_packets_never_crash_the_listener(
    loop_errors: list[dict[str, Any]],
) -> None:
    listener = await listen()
    rng = random.Random(7)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            raw.bind(("127.0.0.1", 0))
            raw.setblocking(False)
            conv = 0x5EED
            for packet in garbage(conv, rng):  # before the session exists
                raw.sendto(packet, listener.local_address)
            for packet in first_packets(conv):  # the raw socket's own session starts
                raw.sendto(packet, listener.local_address)
            await wait_until(lambda: listener.session_count == 1, limit=20)
            for _ in range(5):  # into its decoder (from its address), and to nobody's
                for packet in garbage(conv, rng):
                    raw.sendto(packet, listener.local_address)
                await anyio.sleep(0.01)
        # a real client still gets its session, and its bytes
        client = await connect(listener.local_address[1])
        with anyio.fail_after(30):
            payload = os.urandom(300_000)
            tg.start_soon(client.send, payload)
            assert await read_exactly(client, len(payload)) == payload
        assert listener.dropped > 0
        await client.aclose()
        tg.cancel_scope.cancel()
    await listener.aclose()
    assert loop_errors == []


# --- ends that do not agree ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "client", "security"),
    [(FEC, "", PLAIN), ("", FEC, PLAIN), (FEC, "", KIT_KEY), ("", FEC, KIT_KEY)],
    ids=["server-only-plain", "client-only-plain", "server-only-keyed", "client-only-keyed"],
)
async def test_fec_on_one_end_only_starts_no_session_and_the_client_link_fails(
    server: str, client: str, security: SecurityConfig
) -> None:
    """The listener refuses the other kind's first datagram and counts it; the client hears nothing, and its link
    fails by the dead-link timeout instead of hanging."""
    listener = await listen(server, security)
    stream = await connect(listener.local_address[1], (client or "?") + "&timeout=1", security)
    with anyio.fail_after(20):
        await stream.send(b"anyone?")
        with pytest.raises(anyio.BrokenResourceError):
            await stream.receive()
    assert listener.fec_mismatches >= 1
    assert listener.session_count == 0
    await stream.aclose()
    await listener.aclose()


async def test_other_shard_counts_stop_rebuilding_and_lose_nothing() -> None:
    """Both ends with FEC, grouped differently: each notices the other's packets out of place, rebuilds nothing
    more, and the bytes still arrive, exact (KCP resends what is lost)."""
    listener = await listen("?fec=10/3")
    async with ImpairmentRelay(listener.local_address, up=LOSSY, down=LOSSY, seed=9) as relay:
        client = await connect(relay.address[1], "?fec=4/2")
        server_links: list[KCPLink] = []

        async def keep_server_link() -> None:
            await wait_until(lambda: listener.session_count == 1, limit=30)
            server_links.extend(listener.sessions.values())  # type: ignore[arg-type]

        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_server_link)
            sent, server, echoed = await transfer(client, listener, 2 * 1024 * 1024, limit=60.0)
        assert sent == server == echoed
        for link in (client.link, *server_links):
            assert isinstance(link, FECLink)
            assert link.fec_mismatch
        await client.aclose()
    await listener.aclose()
