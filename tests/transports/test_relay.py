"""The impairment relay: each impairment, its counters, rebinding and the command line."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.conftest import BOTH_LOOPS
from tests.streams import wait_until
from vtunnel.io.datagrams import Address, DatagramSocket, open_udp_socket
from vtunnel.testing import Impairment, ImpairmentRelay
from vtunnel.testing.relay import RELEASE_AHEAD
from vtunnel.testing.relay import main as relay_main

pytestmark = pytest.mark.anyio


class Peer:
    """A UDP socket on loopback that records what it receives and can echo it back."""

    def __init__(self, *, echo: bool = False, bind: Address = ("127.0.0.1", 0)) -> None:
        self.received: list[tuple[bytes, Address]] = []
        self.echo = echo
        self.udp = DatagramSocket(open_udp_socket(socket.AF_INET, bind=bind), self._on_batch)

    def _on_batch(self, batch: list[tuple[bytes, Address]]) -> None:
        self.received.extend(batch)
        if self.echo:
            for datagram, source in batch:
                self.udp.sendto(datagram, source)

    @property
    def address(self) -> Address:
        return self.udp.local_address

    async def wait_for(self, count: int, limit: float = 10.0) -> None:
        await wait_until(lambda: len(self.received) >= count, limit)


@asynccontextmanager
async def setup(
    up: Impairment | None = None, down: Impairment | None = None, seed: int = 0
) -> AsyncIterator[tuple[ImpairmentRelay, Peer, Peer]]:
    target = Peer(echo=True)
    client = Peer()
    try:
        async with ImpairmentRelay(target.address, up=up, down=down, seed=seed) as relay:
            yield relay, client, target
    finally:
        client.udp.close()
        target.udp.close()


def numbered(n: int, size: int = 100) -> list[bytes]:
    return [i.to_bytes(4, "big") + b"\x00" * (size - 4) for i in range(n)]


async def send_paced(client: Peer, relay: ImpairmentRelay, datagrams: list[bytes]) -> None:
    for i, d in enumerate(datagrams):
        client.udp.sendto(d, relay.address)
        if i % 50 == 49:  # stay well inside the socket buffers
            await anyio.sleep(0.001)


async def test_transparent_relay_passes_everything_both_ways_in_order() -> None:
    async with setup() as (relay, client, target):
        data = numbered(500)
        await send_paced(client, relay, data)
        await client.wait_for(500)
        assert [d for d, _ in client.received] == data
        assert [d for d, _ in target.received] == data
        assert all(source == relay.address for _, source in client.received)
        assert relay.up_stats.passed == relay.down_stats.passed == 500
        assert relay.up_stats.bytes == 500 * 100
        assert relay.up_stats.dropped == relay.down_stats.dropped == 0


async def test_loss_is_seeded_and_counted() -> None:
    drops = []
    for _ in range(2):
        async with setup(up=Impairment(loss=0.3), seed=42) as (relay, client, target):
            await send_paced(client, relay, numbered(1000))
            await wait_until(lambda: relay.up_stats.received >= 1000)
            await target.wait_for(relay.up_stats.passed)
            assert relay.up_stats.passed + relay.up_stats.dropped == 1000
            assert 200 < relay.up_stats.dropped < 400
            drops.append([d for d, _ in target.received])
    assert drops[0] == drops[1]  # the same seed drops the same datagrams


async def test_total_loss_in_one_direction_only() -> None:
    async with setup(down=Impairment(loss=1.0)) as (relay, client, target):
        await send_paced(client, relay, numbered(100))
        await target.wait_for(100)
        await anyio.sleep(0.1)
        assert client.received == []
        assert relay.down_stats.dropped == 100


async def test_duplicates() -> None:
    async with setup(up=Impairment(duplicate=1.0)) as (relay, client, target):
        await send_paced(client, relay, numbered(50))
        await target.wait_for(100)
        assert sorted(d for d, _ in target.received) == sorted(numbered(50) * 2)
        assert relay.up_stats.duplicated == 50


async def test_datagrams_larger_than_the_links_mtu_are_dropped_and_counted() -> None:
    async with setup(up=Impairment(mtu=1472)) as (relay, client, target):
        data = [d for pair in zip(numbered(20, 1472), numbered(20, 1473), strict=True) for d in pair]
        await send_paced(client, relay, data)
        await target.wait_for(20)
        await wait_until(lambda: relay.up_stats.received >= 40)
        assert [d for d, _ in target.received] == numbered(20, 1472)
        assert relay.up_stats.too_large == 20
        assert relay.down_stats.too_large == 0  # (the answers are as large: the way back carries any size)
        await client.wait_for(20)


async def test_reordering_keeps_the_set_and_changes_the_order() -> None:
    async with setup(up=Impairment(reorder=0.2, reorder_delay=0.01), seed=1) as (relay, client, target):
        data = numbered(300)
        await send_paced(client, relay, data)
        await target.wait_for(300)
        got = [d for d, _ in target.received]
        assert sorted(got) == sorted(data)
        assert got != data
        assert relay.up_stats.reordered > 0


async def test_delay_and_jitter_deliver_everything_in_order() -> None:
    async with setup(up=Impairment(delay=0.01, jitter=0.005), down=Impairment(delay=0.01)) as (
        relay,
        client,
        _t,
    ):
        data = numbered(200)
        await send_paced(client, relay, data)
        await client.wait_for(200)
        # jitter varies the delay but, like one path's queues, never lets a datagram overtake an earlier one
        assert [d for d, _ in client.received] == data


async def test_rate_limit_queues_then_drops_a_burst() -> None:
    async with setup(up=Impairment(rate=100_000, queue=10_000)) as (relay, client, target):
        for d in numbered(300, size=1000):  # a 300 kB burst into a 10 kB queue
            client.udp.sendto(d, relay.address)
        await wait_until(lambda: relay.up_stats.received >= 300)
        assert relay.up_stats.queue_dropped > 200
        await target.wait_for(300 - relay.up_stats.queue_dropped)
        got = [d for d, _ in target.received]
        assert got == sorted(got)  # a rate limit alone never reorders


async def test_rate_limit_queues_by_arrival_not_by_when_the_relay_reads() -> None:
    """Datagrams that arrive spaced out while the relay's loop is busy are not a burst to its rate limiter."""
    async with setup(up=Impairment(rate=1_500_000, queue=5_000)) as (relay, _client, target):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        data = numbered(80, size=1000)

        def spaced() -> None:  # 1000 bytes per >= 1 ms: under 1 MB/s, well inside the 1.5 MB/s limit
            for d in data:
                sender.sendto(d, relay.address)
                time.sleep(0.001)

        thread = threading.Thread(target=spaced)
        thread.start()
        time.sleep(0.25)  # noqa: ASYNC251  (blocks the loop, so the relay, on purpose: one read gets them all)
        thread.join()
        sender.close()
        await wait_until(lambda: len(target.received) + relay.up_stats.queue_dropped >= 80)
        # read all at once and stamped with the time of the read they would overflow the 5 kB queue (~75 drops)
        assert relay.up_stats.queue_dropped <= 8


async def test_a_target_that_comes_up_late_is_reached_and_answers() -> None:
    """The first datagrams meet a closed port (ICMP port unreachable); the flow must keep working after."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    client = Peer()
    target: Peer | None = None
    try:
        async with ImpairmentRelay(("127.0.0.1", port)) as relay:
            client.udp.sendto(b"early", relay.address)  # nobody there yet
            await anyio.sleep(0.1)
            target = Peer(echo=True, bind=("127.0.0.1", port))
            await anyio.sleep(0.05)
            client.udp.sendto(b"late", relay.address)
            await client.wait_for(1, limit=5)
            assert client.received[0][0] == b"late"
    finally:
        client.udp.close()
        if target is not None:
            target.udp.close()


async def test_rebind_moves_the_flow_to_a_new_port() -> None:
    async with setup() as (relay, client, target):
        client.udp.sendto(b"one", relay.address)
        await target.wait_for(1)
        before = relay.upstream_addresses
        relay.rebind()
        after = relay.upstream_addresses
        assert before != after
        client.udp.sendto(b"two", relay.address)
        await target.wait_for(2)
        assert target.received[0][1] == before[0]
        assert target.received[1][1] == after[0]
        await client.wait_for(2)  # answers to the new port still reach the client
        assert [d for d, _ in client.received] == [b"one", b"two"]


async def test_each_client_gets_its_own_flow() -> None:
    async with setup() as (relay, client, _target):
        other = Peer()
        try:
            client.udp.sendto(b"a", relay.address)
            other.udp.sendto(b"b", relay.address)
            await client.wait_for(1)
            await other.wait_for(1)
            assert client.received[0][0] == b"a"
            assert other.received[0][0] == b"b"
            assert len(relay.upstream_addresses) == 2
        finally:
            other.udp.close()


def test_bad_impairments_are_rejected() -> None:
    for kwargs in (
        {"loss": 1.5},
        {"duplicate": -0.1},
        {"delay": -1.0},
        {"rate": 0.0},
        {"queue": -1},
        {"mtu": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            Impairment(**kwargs)
    assert Impairment().transparent
    assert not Impairment(rate=1e6).transparent
    assert not Impairment(mtu=1472).transparent


def test_cli_rejects_bad_values() -> None:
    assert relay_main(["--listen", "127.0.0.1:0", "--target", "127.0.0.1:9", "--loss", "2"]) == 2
    with pytest.raises(SystemExit):
        relay_main(["--listen", "nonsense", "--target", "127.0.0.1:9"])


async def test_cli_process_relays_and_reports_counters() -> None:
    target = Peer(echo=True)
    client = Peer()
    command = [
        sys.executable, "-m", "vtunnel.testing.relay",
        "--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{target.address[1]}",
        "--down-loss", "1.0", "--seed", "3", "--delay", "1",
    ]  # fmt: skip
    try:
        async with await anyio.open_process(command, stderr=None) as proc:
            assert proc.stdout is not None
            out = BufferedByteReceiveStream(proc.stdout)
            with anyio.fail_after(30):
                line = await out.receive_until(b"\n", 4096)
            host, port = json.loads(line)["listening"]
            for d in numbered(20):
                client.udp.sendto(d, (host, port))
            await target.wait_for(20, limit=20)
            proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                stats = json.loads(await out.receive_until(b"\n", 65536))
                assert await proc.wait() == 0
        assert stats["up"]["passed"] == 20
        assert stats["down"]["dropped"] == 20
        assert client.received == []
    finally:
        client.udp.close()
        target.udp.close()


@pytest.mark.parametrize("anyio_backend", BOTH_LOOPS)
async def test_what_is_due_within_the_clock_step_leaves_with_what_is_due_now() -> None:
    """An event loop's clock and timers may count whole milliseconds (uvloop's do): a release timer armed for
    less than that ahead fires at once and finds the clock unchanged, and a relay that re-armed it spun a core
    while delayed datagrams passed. What is due within ``RELEASE_AHEAD`` leaves at once, and a release takes
    along what is due within it after the first: no timer is ever armed for less."""
    target = Peer()
    try:
        async with ImpairmentRelay(target.address, up=Impairment(delay=RELEASE_AHEAD / 2)) as relay:
            pipe = relay.up_pipe
            sends: list[list[bytes]] = []
            pipe.push(b"soon", sends.append)
            assert sends == [[b"soon"]]  # not held for half a clock step
            assert pipe.timer is None
        async with ImpairmentRelay(target.address, up=Impairment(delay=0.005, rate=2.5e6)) as relay:
            # the rate limiter spaces the two by 0.4 ms, and a timer fires at most 0.5 ms early (uvloop rounds to the
            # millisecond): the second is due within the step of the release that sends the first
            pipe = relay.up_pipe
            sends = []
            pipe.push(b"a" * 1000, sends.append)
            pipe.push(b"b" * 1000, sends.append)
            assert sends == []
            await wait_until(lambda: bool(sends), 5)
            await anyio.sleep(0.01)
            assert sends == [[b"a" * 1000, b"b" * 1000]]  # one release, one send
    finally:
        target.udp.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_release_that_runs_early_still_takes_along_what_is_due_after_the_first() -> None:
    """A timer may fire almost a millisecond before the first datagram is due, by the clock that computed the dues
    (uvloop's timers count whole milliseconds from a clock read at the start of its pass). The release then sends
    the first and whatever is due within ``RELEASE_AHEAD`` after it, in one send: not the first alone."""
    target = Peer()
    try:
        async with ImpairmentRelay(target.address, up=Impairment(delay=0.005, rate=2.5e6)) as relay:
            pipe = relay.up_pipe
            sends: list[list[bytes]] = []
            pipe.push(b"a" * 1000, sends.append)
            pipe.push(b"b" * 1000, sends.append)  # due 0.4 ms after the first
            first = pipe.heap[0][0]
            loop = asyncio.get_running_loop()
            with anyio.fail_after(1):
                while loop.time() < first - 0.0009:  # (bounded: the first is due 5.4 ms from now)
                    await anyio.lowlevel.checkpoint()
            assert pipe.timer is not None
            pipe.timer.cancel()
            pipe._release()  # as an early timer would, 0.9 ms or less before the first is due
            assert sends == [[b"a" * 1000, b"b" * 1000]]
    finally:
        target.udp.close()
