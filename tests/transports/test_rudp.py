"""rudp:// on real sockets: the URL options, byte-exact bulk through the impairment relay at 10% loss with
duplicates and reordering, a NAT rebinding mid-transfer (keyless and keyed), a spoofed-source flood that draws
no more than three times its bytes, and real ``vtunnel server`` and ``vtunnel agent`` processes moving bytes
through a forward."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from tests.conftest import Processes
from tests.e2e.test_cli import start_pair
from tests.linkutil import counting_loop_timers, stream_of
from tests.netutil import echo_roundtrip, echo_server, pattern
from tests.streams import wait_until
from tests.transports.test_kcp_impaired import transfer
from vtunnel.arq.rudp.connection import RudpConfig
from vtunnel.arq.rudp.wire import encode_header, encode_stream
from vtunnel.io.datagrams import Address, DatagramSocket, open_udp_socket
from vtunnel.testing import Impairment, ImpairmentRelay
from vtunnel.testing.conformance import KIT_KEY
from vtunnel.transports.base import Endpoint, SecurityConfig, TransportError, get_transport
from vtunnel.transports.rudp.link import RudpLink
from vtunnel.transports.rudp.listener import RudpListener
from vtunnel.transports.rudp.options import RudpOptions, parse_options
from vtunnel.transports.rudp.transport import RudpTransport

PLAIN = SecurityConfig()
#: the impairment of the bulk checks: 10% loss each way, with duplicates and reordering, on an Ethernet MTU
IMPAIRED = Impairment(loss=0.10, duplicate=0.05, reorder=0.05, delay=0.001, mtu=1472)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    """uvloop, the runtime's loop when installed."""
    return ("asyncio", {"use_uvloop": True})


# --- options ------------------------------------------------------------------------------------------------


def test_defaults_are_the_cores_with_bbr() -> None:
    assert parse_options({}) == RudpOptions()
    assert parse_options({}).config == RudpConfig(cc="bbr")


@pytest.mark.parametrize("cc", ["newreno", "cubic", "bbr", "CUBIC"])
def test_the_congestion_controller_is_chosen_in_the_url(cc: str) -> None:
    assert parse_options({"cc": cc}).config.cc == cc.lower()


def test_every_option_reaches_its_field() -> None:
    options = parse_options(
        {
            "cc": "newreno",
            "pacing": "off",
            "mtu": "1200",
            "rcvwnd": "8388608",
            "sndbuf": "1048576",
            "ackdelay": "0.01",
            "ackevery": "4",
            "initial_rtt": "0.1",
            "idle": "30",
            "timeout": "5",
            "sessions": "10",
            "sockbuf": "1048576",
            "connect_timeout": "3",
            "pmtud": "off",
            "maxmtu": "9000",
        }
    )
    assert options == RudpOptions(
        config=RudpConfig(
            cc="newreno",
            pacing=False,
            max_datagram_size=1200,
            receive_window=8 * 1024 * 1024,
            send_buffer=1024 * 1024,
            max_ack_delay=0.01,
            ack_eliciting_threshold=4,
            initial_rtt=0.1,
            idle_timeout=30.0,
        ),
        timeout=5.0,
        sessions=10,
        sockbuf=1024 * 1024,
        connect_timeout=3.0,
        pmtud=False,
        maxmtu=9000,
    )


def test_path_mtu_discovery_tries_the_common_link_mtus_up_to_maxmtu() -> None:
    """Probe sizes: 1420, 1492, 1500, 9000 and 65536 less the IP and UDP headers (28 bytes over IPv4, 48 over
    IPv6) and the seal's overhead, above the base and up to ``maxmtu`` (65000 by default)."""
    config = parse_options({}).packet_config(0)
    assert config.path_mtu_discovery
    assert config.max_datagram_size == 1350
    assert config.probe_sizes == (1392, 1464, 1472, 8972, 65000)
    sealed6 = parse_options({}).packet_config(29, family=socket.AF_INET6)
    assert sealed6.max_datagram_size == 1321
    assert sealed6.probe_sizes == (1343, 1415, 1423, 8923, 64971)
    # (the larger links' sizes are cut to maxmtu, which is then tried itself)
    assert parse_options({"maxmtu": "1500"}).packet_config(0).probe_sizes == (1392, 1464, 1472, 1500)
    assert parse_options({"mtu": "1472"}).packet_config(0).probe_sizes == (8972, 65000)
    off = parse_options({"pmtud": "off"}).packet_config(0)
    assert not off.path_mtu_discovery
    assert off.probe_sizes == ()


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"cc": "vegas"}, "cc"),
        ({"mode": "fast3"}, "mode"),
        ({"mtu": "100"}, "mtu"),
        ({"rcvwnd": "1000"}, "rcvwnd"),
        ({"ackdelay": "nan"}, "ackdelay"),
        ({"pacing": "maybe"}, "pacing"),
        ({"pmtud": "maybe"}, "pmtud"),
        ({"maxmtu": "65001"}, "maxmtu"),
    ],
)
def test_bad_options_name_the_option(params: dict[str, str], named: str) -> None:
    with pytest.raises(TransportError, match=f"rudp option '{named}'|unknown rudp option '{named}'"):
        parse_options(params)


@pytest.mark.anyio
async def test_registry_and_a_sealed_mtu_too_small_is_refused_before_anything_opens() -> None:
    transport = get_transport("rudp")
    assert isinstance(transport, RudpTransport)
    transport.check(Endpoint.parse("rudp://127.0.0.1:9000?cc=cubic"))
    with pytest.raises(TransportError, match="'mtu'"):
        await transport.listen(Endpoint.parse("rudp://127.0.0.1:0?mtu=256"), security=KIT_KEY)
    with pytest.raises(TransportError, match="'mtu'"):
        await transport.connect(Endpoint.parse("rudp://127.0.0.1:9?mtu=256"), security=KIT_KEY)


# --- through the impairment relay ---------------------------------------------------------------------------


async def listen(security: SecurityConfig = PLAIN, query: str = "") -> RudpListener[Any]:
    listener = await RudpTransport().listen(Endpoint.parse(f"rudp://127.0.0.1:0{query}"), security=security)
    assert isinstance(listener, RudpListener)
    return listener


async def impaired_bulk(size: int, security: SecurityConfig, limit: float) -> None:
    listener = await listen(security)
    async with ImpairmentRelay(listener.local_address, up=IMPAIRED, down=IMPAIRED, seed=11) as relay:
        link = await RudpTransport().connect(
            Endpoint.parse(f"rudp://127.0.0.1:{relay.address[1]}"), security=security
        )
        client = stream_of(link)
        sent, server, echo = await transfer(client, listener, size, limit=limit)
        assert sent == server == echo
        for stats in (relay.up_stats, relay.down_stats):
            assert stats.dropped > 0.05 * stats.received
            assert stats.duplicated > 0
            assert stats.reordered > 0
        await client.aclose()
    await listener.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("security", [PLAIN, KIT_KEY], ids=["keyless", "keyed"])
async def test_16_mib_at_ten_percent_loss_with_duplicates_and_reordering(security: SecurityConfig) -> None:
    await impaired_bulk(16 * 1024 * 1024, security, limit=110.0)


@pytest.mark.slow
@pytest.mark.anyio
async def test_64_mib_at_ten_percent_loss_with_duplicates_and_reordering() -> None:
    await impaired_bulk(64 * 1024 * 1024, KIT_KEY, limit=280.0)


@pytest.mark.anyio
@pytest.mark.parametrize("security", [PLAIN, KIT_KEY], ids=["keyless", "keyed"])
async def test_a_first_flight_lost_whole_still_opens_the_connection(security: SecurityConfig) -> None:
    """Every datagram of the client's first flight is lost, the stream's start among them: the server opens no
    connection without it, so the probe timeout sends the start again and the transfer completes (before, the
    probes carried new data, the server dropped them all, and the link died after its 15 s timeout)."""
    listener = await listen(security)
    async with ImpairmentRelay(listener.local_address, seed=5) as relay:
        link = await RudpTransport().connect(
            Endpoint.parse(f"rudp://127.0.0.1:{relay.address[1]}"), security=security
        )
        assert isinstance(link, RudpLink)
        relay.up = Impairment(loss=1.0)  # (after a keyed handshake: only the tunnel's data is lost)
        client = stream_of(link)

        async def heal() -> None:
            await wait_until(lambda: relay.up_stats.dropped >= 10)
            await anyio.sleep(0.2)
            relay.up = Impairment()

        async with anyio.create_task_group() as tg:
            tg.start_soon(heal)
            sent, server, echo = await transfer(client, listener, 4 * 1024 * 1024, limit=12.0)
        assert sent == server == echo
        assert int(link.connection.stats()["pto_count"]) >= 1
        await client.aclose()
    await listener.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("security", [PLAIN, KIT_KEY], ids=["keyless", "keyed"])
async def test_client_rebinding_mid_transfer_keeps_the_session(security: SecurityConfig) -> None:
    """The relay moves the client to a new source port twice mid-transfer; the server follows it (keyless: by
    rudp's connection ID, on a newer packet; keyed: by the sealed ID, once the new address echoed a challenge)."""
    size = 16 * 1024 * 1024
    listener = await listen(security)
    async with ImpairmentRelay(listener.local_address, seed=3) as relay:
        link = await RudpTransport().connect(
            Endpoint.parse(f"rudp://127.0.0.1:{relay.address[1]}"), security=security
        )
        client = stream_of(link)
        seen_ports: set[int] = set()

        async def rebind_twice() -> None:
            for _ in range(2):
                mark = size // 3 * (len(seen_ports) + 1)
                await wait_until(lambda: relay.up_stats.bytes >= mark, limit=60)  # noqa: B023
                seen_ports.update(port for _host, port in relay.upstream_addresses)
                relay.rebind()
            seen_ports.update(port for _host, port in relay.upstream_addresses)

        async with anyio.create_task_group() as tg:
            tg.start_soon(rebind_twice)
            sent, server, echo = await transfer(client, listener, size)
        assert sent == server == echo
        assert len(seen_ports) == 3
        assert listener.session_count == 1
        (server_link,) = listener.sessions.values()
        assert server_link.remote_address == relay.upstream_addresses[0]  # it followed the last move
        await client.aclose()
    await listener.aclose()


class Flooder:
    """A spoofed source: a socket on another loopback address that counts what it sends and what comes back."""

    def __init__(self, host: str) -> None:
        self.sent = 0
        self.received = 0
        self.socket = DatagramSocket(open_udp_socket(socket.AF_INET, bind=(host, 0)), self._answer)

    def _answer(self, batch: list[tuple[bytes, Address]]) -> None:
        self.received += sum(len(datagram) for datagram, _source in batch)

    def send(self, datagram: bytes, target: Address) -> None:
        self.sent += len(datagram)
        self.socket.sendto(datagram, target)


def forged(rng: random.Random, live: bytes, keyed: bool) -> bytes:
    """One datagram of the flood: garbage, a packet opening a connection under a new ID, or (keyed) one naming
    the live connection's sealed ID. Without a key nothing is authenticated, and a forged packet naming the live
    connection with a newer number moves it (docs/rudp.md): only a key protects a session from forgery."""
    kind = rng.randrange(3 if keyed else 2)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 1400))
    data = rng.randbytes(rng.randrange(16, 1200))
    if kind == 1:
        return encode_header(rng.randbytes(8), rng.randrange(4)) + encode_stream(0, data)
    return live + data


@pytest.mark.anyio
@pytest.mark.parametrize("security", [PLAIN, KIT_KEY], ids=["keyless", "keyed"])
async def test_a_spoofed_source_flood_draws_at_most_three_times_its_bytes(security: SecurityConfig) -> None:
    """While a client moves 4 MiB, eight sources on other loopback addresses flood the server with garbage,
    connection openings and packets naming the live connection: none of them is sent more than three times what
    it sent (RFC 9000's anti-amplification limit), and the transfer is byte-exact."""
    listener = await listen(security)
    link = await RudpTransport().connect(
        Endpoint.parse(f"rudp://127.0.0.1:{listener.local_address[1]}"), security=security
    )
    client = stream_of(link)
    flooders = [Flooder(f"127.0.0.{2 + i}") for i in range(8)]
    rng = random.Random(21)
    try:
        async with anyio.create_task_group() as tg:

            async def flood() -> None:
                await wait_until(lambda: listener.session_count == 1, limit=10)
                (live,) = listener.sessions  # the session's key: its connection ID, keyless or sealed
                assert isinstance(live, bytes)
                for _ in range(400):  # bounded: 400 rounds of 8 datagrams
                    for flooder in flooders:
                        flooder.send(forged(rng, live, security.psk is not None), listener.local_address)
                    await anyio.sleep(0.002)

            tg.start_soon(flood)
            sent, server, echo = await transfer(client, listener, 4 * 1024 * 1024, limit=60)
            assert sent == server == echo
        await anyio.sleep(0.5)  # answers still on their way
    finally:
        for flooder in flooders:
            flooder.socket.close()
        await client.aclose()
        await listener.aclose()
    for flooder in flooders:
        assert flooder.sent > 0
        assert flooder.received <= 3 * flooder.sent


# --- real processes -----------------------------------------------------------------------------------------


@pytest.fixture
def echo() -> Iterator[int]:
    with echo_server() as port:
        yield port


def test_server_and_agent_move_bytes_through_a_forward(procs: Processes, psk_file: Path, echo: int) -> None:
    _, _, front = start_pair(procs, "rudp", psk_file, target=echo, url_query="?cc=cubic")
    payload = pattern(8 * 1024 * 1024, seed=15)
    assert echo_roundtrip(front, payload, timeout=60) == payload


@pytest.mark.anyio
async def test_an_exchange_does_not_move_the_links_timers_for_each_message() -> None:
    """In request/response every message moves the connection's deadlines (the PTO after a send, the held ACK
    after a receipt, each later than the one before): a timer armed earlier stays and, firing, re-arms for what
    is due then, instead of a loop timer cancelled and made anew for each message on each side."""
    listener = await listen()
    url = Endpoint.parse(f"rudp://127.0.0.1:{listener.local_address[1]}")
    client = stream_of(await RudpTransport().connect(url, security=PLAIN))
    await client.send(b"hello")
    server = stream_of(await listener.accept())
    assert await server.receive() == b"hello"

    async def answer() -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            while True:
                await server.send((await server.receive()).upper())

    exchanges = 300
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(answer)
        with counting_loop_timers() as timers, anyio.fail_after(30):
            for _ in range(exchanges):
                await client.send(b"ping")
                assert await client.receive() == b"PING"
        tasks.cancel_scope.cancel()
    # about 0.03 per exchange here (a timer that fired early and re-armed); 3.7 when every message moved it
    assert timers.created <= 0.5 * exchanges
    await client.aclose()
    await server.aclose()
    await listener.aclose()


@pytest.mark.anyio
async def test_round_trips_are_measured_to_a_fraction_of_a_millisecond() -> None:
    """The connection's clock is not the loop's: uvloop's keeps whole milliseconds, read once a pass, and every
    round trip measured by it was a whole number of them (on loopback 0 or 1 ms), too coarse for a congestion
    controller that watches for a queue's few milliseconds."""
    listener = await listen()
    url = Endpoint.parse(f"rudp://127.0.0.1:{listener.local_address[1]}")
    with capture_logs() as logs:
        client = stream_of(await RudpTransport().connect(url, security=PLAIN))
        await client.send(b"hello")
        server = stream_of(await listener.accept())
        assert await server.receive() == b"hello"
        with anyio.fail_after(30):
            for _ in range(50):
                await client.send(b"ping")
                assert await server.receive() == b"ping"
                await server.send(b"pong")
                assert await client.receive() == b"pong"
        await client.aclose()
        await server.aclose()
        await listener.aclose()
    closed = [entry for entry in logs if entry["event"] == "rudp connection closed"]
    assert len(closed) == 2
    least = [entry["min_rtt_ms"] for entry in closed]
    assert all(0 < value < 50 for value in least), least
    # (in 3 decimals, each a whole number by a 1-in-1000 chance; both, one in a million)
    assert any(value != round(value) for value in least), least


# --- path MTU discovery on real links (a network namespace's loopback, its MTU set) -------------------------------


def run_in(netns: str, *args: str) -> dict[str, Any]:
    """``tests.transports.rudp_mtu_run ARGS`` inside ``netns``: its JSON result."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "tests.transports.rudp_mtu_run", *args],
        capture_output=True,
        timeout=120,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    result: dict[str, Any] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("key", [False, True], ids=["keyless", "sealed"])
def test_packets_grow_to_the_links_mtu_and_no_further(mtu_netns: str, key: bool) -> None:
    """A 9000-byte link: the client's packets reach 8972 bytes of UDP payload (less the seal's 29 with a key);
    65000 is refused by the link (the don't-fragment bit: not cut into fragments), three times, and lost."""
    result = run_in(mtu_netns, "--mtu", "9000", "--mib", "8", *(["--key"] if key else []))
    assert result["exact"]
    stats = result["stats"]
    assert stats["packet_size"] == 8972 - (29 if key else 0)
    assert stats["pmtu_probes_lost"] >= 3
    assert stats["pmtu_black_holes"] == 0


def test_a_link_mtu_lowered_mid_transfer_loses_no_byte(mtu_netns: str) -> None:
    """65536 -> 1400 bytes a quarter into the transfer: full packets vanish (a black hole), the client falls back
        to 1200-byte packets and climbs again to the largest size the link now carries: the base, 1350 (1420's
    1392 is more than the 1372 bytes of UDP payload 1400 leave)."""
    result = run_in(mtu_netns, "--mtu", "65536", "--shrink", "1400", "--mib", "16")
    assert result["exact"]
    stats = result["stats"]
    assert stats["pmtu_black_holes"] >= 1
    assert stats["packet_size"] == 1350
