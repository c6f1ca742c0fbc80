"""The transport conformance kit: the checks every vtunnel transport passes, for plugin authors to run on theirs.

Subclass :class:`TransportConformance` in a test module, name the URL scheme (and, where the defaults do not fit,
the URLs, the key, and what the transport cannot do), and pytest collects every check as a test of that class::

    from vtunnel.testing.conformance import TransportConformance

    class TestMyTransport(TransportConformance):
        scheme = "my"

The checks run on real sockets on 127.0.0.1 and drive the transport only through the public contract
(:class:`~vtunnel.transports.link.Link`, from ``Transport.connect`` and ``Transport.listen``). Each failure is a
:class:`ContractBroken` whose message starts with the contract it broke. They need pytest with anyio's plugin and
an ``anyio_backend`` fixture giving ``"asyncio"`` (kcp:// and the lean socket layer run on asyncio and uvloop).

The contracts, one check each: connect and listen; ordered byte-exact delivery both ways (64 MiB by default);
half-close both ways; pause and resume; back-pressure (a peer that stops reading bounds what the writer queues:
``send_room`` says how much a write may be without a refusal, 0 when the next write is refused, and
``link_writable`` follows when it reads again); abort (closing one end ends the other's input or its writes); many
concurrent tunnels (200 by default); the security configuration (a peer with another key never reaches the
listener's handler); garbage input (random connections or datagrams never stop the listener); clean shutdown (no
task and no file descriptor left behind); and, for datagram transports, loss, duplication and reordering through
the impairment relay (:mod:`vtunnel.testing.relay`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import random
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import ClassVar

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import Listener, SocketAttribute

from vtunnel.testing.relay import Impairment, ImpairmentRelay
from vtunnel.transports.base import Endpoint, SecurityConfig, Transport, get_transport
from vtunnel.transports.link import Link

__all__ = ["ContractBroken", "Recorder", "TransportConformance"]

#: the key of the kit's tunnels, and another one a peer that must be refused holds (fixed: results repeat)
KIT_KEY = SecurityConfig(psk=hashlib.sha256(b"vtunnel conformance kit").digest())
OTHER_KEY = SecurityConfig(psk=hashlib.sha256(b"vtunnel conformance kit: another key").digest())


class ContractBroken(AssertionError):
    """A transport broke one of the contracts; the message starts with the contract's name."""

    def __init__(self, contract: str, detail: str) -> None:
        super().__init__(f"{contract}: {detail}")
        self.contract = contract


def _check(condition: bool, contract: str, detail: str) -> None:
    if not condition:
        raise ContractBroken(contract, detail)


class Recorder:
    """A link consumer that keeps what its link calls."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.digest = hashlib.sha256()
        self.received = 0
        self.keep = True  # keep the bytes (small transfers); else only count and hash them
        self.writable = 0
        self.ended: list[BaseException | None] = []
        self.datagrams: list[bytes] = []

    def link_data(self, data: bytes) -> None:
        self.received += len(data)
        if self.keep:
            self.data += data
        else:
            self.digest.update(data)

    def link_writable(self) -> None:
        self.writable += 1

    def link_ended(self, error: BaseException | None) -> None:
        self.ended.append(error)

    def link_datagram(self, data: bytes) -> None:
        self.datagrams.append(data)


async def _until(condition: Callable[[], bool], limit: float, contract: str, detail: str) -> None:
    with anyio.move_on_after(limit):
        # polled: the conditions are the transport's own state, with no event to wait on
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.005)
        return
    raise ContractBroken(contract, f"{detail} (waited {limit:g} s)")


class TransportConformance:
    """The checks, as test methods of a class to subclass (see the module docstring)."""

    pytestmark: ClassVar[pytest.MarkDecorator] = pytest.mark.anyio

    #: the URL scheme under test (the transport is found through the registry, as users find it)
    scheme: ClassVar[str] = ""
    #: the key the kit's tunnels use; ``SecurityConfig()`` for a transport tested without one
    security: ClassVar[SecurityConfig] = KIT_KEY
    #: a key a peer must be refused with (``None``: the transport is tested without a key, nothing to refuse)
    other_security: ClassVar[SecurityConfig | None] = OTHER_KEY
    #: the transport can end one direction and keep the other (``False``: ``send_eof`` closes, as KCP's does)
    half_close: ClassVar[bool] = True
    #: the transport carries tunnels in UDP datagrams (garbage is sent as datagrams; loss is tested)
    datagram: ClassVar[bool] = False
    #: the transport only learns of a closed peer from a timeout (KCP): the abort check waits this long
    abort_within: ClassVar[float] = 10.0
    bulk_bytes: ClassVar[int] = 64 * 1024 * 1024
    concurrent_tunnels: ClassVar[int] = 200
    #: handshakes per second and burst the listener takes from one source address with a key (vtunnel's keyed
    #: transports refuse a flood from one address): the kit opens its tunnels within them (``None``: no limit)
    handshake_rate: ClassVar[float | None] = None
    handshake_burst: ClassVar[int] = 0

    # ------------------------------------------------------------------ what a subclass may override
    def listen_url(self, directory: Path) -> str:
        """The URL to listen on (port 0: any free port). ``directory`` is a fresh temporary directory."""
        return f"{self.scheme}://127.0.0.1:0"

    def connect_url(self, port: int, directory: Path) -> str:
        """The URL a client connects to, given the port the listener got."""
        return f"{self.scheme}://127.0.0.1:{port}"

    def transport(self) -> Transport:
        """The transport under test: the registry's, for :attr:`scheme` (override for one not registered)."""
        return get_transport(self.scheme)

    # ------------------------------------------------------------------ the kit's plumbing
    @asynccontextmanager
    async def listening(
        self, directory: Path, handler: Callable[[Link], object] | None = None
    ) -> AsyncIterator[tuple[int, list[Link]]]:
        """A listener serving in the background; yields its port and the links it accepted (held open)."""
        transport = self.transport()
        listener: Listener[Link] = await transport.listen(
            Endpoint.parse(self.listen_url(directory)), security=self.security
        )
        address = listener.extra(SocketAttribute.local_address, None)
        _check(
            isinstance(address, tuple) and len(address) >= 2,
            "connect and listen",
            f"the listener does not give its local address as anyio's SocketAttribute.local_address: {address!r}",
        )
        assert isinstance(address, tuple)
        accepted: list[Link] = []
        release = anyio.Event()

        async def on_accept(link: Link) -> None:
            accepted.append(link)
            if handler is not None:
                handler(link)
            await release.wait()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, on_accept)
                try:
                    yield int(address[1]), accepted
                finally:
                    release.set()
                    for link in accepted:
                        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                            await link.aclose()
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()

    async def connect(self, port: int, directory: Path, security: SecurityConfig | None = None) -> Link:
        transport = self.transport()
        with anyio.fail_after(15):
            return await transport.connect(
                Endpoint.parse(self.connect_url(port, directory)),
                security=self.security if security is None else security,
            )

    @asynccontextmanager
    async def pair(self, directory: Path) -> AsyncIterator[tuple[Link, Link, Recorder, Recorder]]:
        """A connected client and server link, both running for recorders, the first byte through (a datagram
        transport's listener only learns of a session from its first datagram)."""
        async with self.listening(directory) as (port, accepted):
            client_link = await self.connect(port, directory)
            client, server = Recorder(), Recorder()
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(client_link.run, client)
                    client_link.send_nowait(b"\0")
                    await _until(lambda: bool(accepted), 15, "connect and listen", "no link was accepted")
                    server_link = accepted[0]
                    tg.start_soon(server_link.run, server)
                    await _until(
                        lambda: bytes(server.data) == b"\0",
                        15,
                        "connect and listen",
                        "the client's first byte did not arrive",
                    )
                    server.data.clear()
                    server.received = 0
                    yield client_link, server_link, client, server
                    tg.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await client_link.aclose()

    @staticmethod
    async def _push(link: Link, data: bytes, writer: Recorder) -> None:
        """Send ``data`` through ``link`` in chunks of at most what ``send_room`` says it takes (never refused),
        waiting for ``link_writable`` whenever it says 0."""
        view = memoryview(data)
        step = 256 * 1024
        start = 0
        while start < len(view):
            seen = writer.writable
            room = link.send_room()
            if room == 0:
                await _until(
                    lambda seen=seen: writer.writable > seen,  # type: ignore[misc]
                    30,
                    "back-pressure",
                    "send_room said 0 and link_writable never followed",
                )
                continue
            chunk = bytes(view[start : start + min(step, room)])
            try:
                link.send_nowait(chunk)
            except anyio.WouldBlock:
                raise ContractBroken(
                    "back-pressure", f"a {len(chunk)}-byte write was refused after send_room said {room}"
                ) from None
            start += len(chunk)
            await anyio.lowlevel.checkpoint()

    # ------------------------------------------------------------------ the checks
    async def test_connect_listen_and_deliver_in_order_both_ways(self, tmp_path: Path) -> None:
        """Ordered, byte-exact delivery of ``bulk_bytes`` up and half of it down, at the same time."""
        contract = "ordered byte-exact delivery"
        rng = random.Random(1)
        block = rng.randbytes(1 << 20)
        up = b"".join(bytes([i & 0xFF]) + block[1:] for i in range(max(1, self.bulk_bytes >> 20)))
        down = up[: len(up) // 2]
        async with self.pair(tmp_path) as (client_link, server_link, client, server):
            client.keep = server.keep = False
            with anyio.fail_after(max(60.0, self.bulk_bytes / 2e6)):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._push, client_link, up, client)
                    tg.start_soon(self._push, server_link, down, server)
                await _until(
                    lambda: server.received >= len(up) and client.received >= len(down),
                    120,
                    contract,
                    f"received {server.received} of {len(up)} up, {client.received} of {len(down)} down",
                )
        _check(server.received == len(up), contract, f"{server.received} bytes arrived for {len(up)} sent up")
        _check(server.digest.digest() == hashlib.sha256(up).digest(), contract, "the bytes sent up differ")
        _check(
            client.digest.digest() == hashlib.sha256(down).digest(), contract, "the bytes sent down differ"
        )

    async def test_half_close_both_ways(self, tmp_path: Path) -> None:
        """``send_eof`` after queued bytes: the peer gets them, then ``link_ended(None)``; the other direction
        still works, and then ends the same way."""
        if not self.half_close:
            pytest.skip(f"{self.scheme}:// cannot half-close (its send_eof closes the link)")
        contract = "half-close"
        async with self.pair(tmp_path) as (client_link, server_link, client, server):
            client_link.send_nowait(b"last words")
            await client_link.send_eof()
            await _until(lambda: server.ended == [None], 15, contract, "the peer's input never ended")
            _check(
                bytes(server.data) == b"last words", contract, f"got {bytes(server.data)!r} before the end"
            )
            server_link.send_nowait(b"the answer")
            await server_link.send_eof()
            await _until(lambda: client.ended == [None], 15, contract, "the other direction never ended")
            _check(
                bytes(client.data) == b"the answer", contract, "the other direction lost bytes after the end"
            )

    async def test_pause_and_resume(self, tmp_path: Path) -> None:
        contract = "pause and resume"
        async with self.pair(tmp_path) as (client_link, server_link, _client, server):
            server_link.pause_reading()
            client_link.send_nowait(b"held")
            await anyio.sleep(0.3)
            _check(server.received == 0, contract, "link_data was called while reading was paused")
            server_link.resume_reading()
            await _until(
                lambda: bytes(server.data) == b"held", 15, contract, "resume_reading delivered nothing"
            )

    async def test_back_pressure_bounds_the_writer(self, tmp_path: Path) -> None:
        """A peer that stops reading: ``send_room`` falls to 0 after a bounded amount, every write of at most the
        room it said is taken, the write at room 0 is refused (WouldBlock, nothing taken); once the peer reads,
        ``link_writable`` follows, the room is back and a write goes through."""
        contract = "back-pressure"
        chunk = os.urandom(64 * 1024)
        limit = 256 * 1024 * 1024
        async with self.pair(tmp_path) as (client_link, server_link, client, server):
            server.keep = False
            server_link.pause_reading()
            taken = 0
            with anyio.fail_after(60):
                while room := client_link.send_room():
                    _check(room > 0, contract, f"send_room said {room}")
                    data = chunk[: min(room, len(chunk))]
                    try:
                        client_link.send_nowait(data)
                    except anyio.WouldBlock:
                        raise ContractBroken(
                            contract, f"a {len(data)}-byte write was refused after send_room said {room}"
                        ) from None
                    taken += len(data)
                    await anyio.lowlevel.checkpoint()
                    _check(taken < limit, contract, f"{limit >> 20} MiB taken and send_room never said 0")
            try:
                client_link.send_nowait(b"x")
            except anyio.WouldBlock:
                pass
            else:
                raise ContractBroken(contract, "send_room said 0 and the next write was taken")
            _check(client.writable == 0, contract, "link_writable came before the peer read anything")
            server_link.resume_reading()
            await _until(lambda: server.received == taken, 60, contract, "what was taken did not all arrive")
            await _until(lambda: client.writable > 0, 30, contract, "link_writable never followed the 0")
            _check(client_link.send_room() > 0, contract, "no room after link_writable and a drained peer")
            client_link.send_nowait(b"after")
            await _until(lambda: server.received == taken + 5, 30, contract, "the write after room was lost")

    async def test_abort_ends_the_peer(self, tmp_path: Path) -> None:
        """Closing one end: the other's input ends, or its writes start failing, within ``abort_within``."""
        contract = "abort"
        async with self.pair(tmp_path) as (client_link, server_link, _client, server):
            await client_link.aclose()
            with pytest.raises(anyio.ClosedResourceError):
                client_link.send_nowait(b"late")
            failed = False
            with anyio.move_on_after(self.abort_within):
                while not server.ended and not failed:
                    try:
                        server_link.send_nowait(b"are you there?")
                    except anyio.WouldBlock:
                        pass
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        failed = True
                    await anyio.sleep(0.05)
            _check(bool(server.ended) or failed, contract, "the peer of a closed link never learned of it")

    async def test_many_concurrent_tunnels(self, tmp_path: Path) -> None:
        contract = "concurrent tunnels"
        count = self.concurrent_tunnels
        echoes: dict[int, Recorder] = {}

        def echo(link: Link) -> None:
            class Echo(Recorder):
                def link_data(self, data: bytes) -> None:
                    super().link_data(data)
                    link.send_nowait(data)

            recorder = Echo()
            echoes[id(link)] = recorder
            running.start_soon(link.run, recorder)

        async with anyio.create_task_group() as running, self.listening(tmp_path, echo) as (port, _accepted):
            links: list[tuple[Link, Recorder, bytes]] = []
            rate = self.handshake_rate if self.security.psk is not None else None
            try:
                for i in range(count):
                    if rate is not None and i >= self.handshake_burst // 2:
                        await anyio.sleep(1.25 / rate)  # within the listener's per-source handshake budget
                    link = await self.connect(port, tmp_path)
                    recorder = Recorder()
                    running.start_soon(link.run, recorder)
                    message = i.to_bytes(4, "big") * 256
                    link.send_nowait(message)
                    links.append((link, recorder, message))
                for i, (_link, recorder, message) in enumerate(links):
                    await _until(
                        lambda r=recorder, m=message: bytes(r.data) == m,  # type: ignore[misc]
                        60,
                        contract,
                        f"tunnel {i} of {count} did not get its own bytes back",
                    )
            finally:
                for link, _recorder, _message in links:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                        await link.aclose()
                running.cancel_scope.cancel()

    async def test_a_peer_with_another_key_never_reaches_the_handler(self, tmp_path: Path) -> None:
        if self.other_security is None:
            pytest.skip(f"{self.scheme}:// is tested without a key")
        contract = "security configuration"
        async with self.listening(tmp_path) as (port, accepted):
            link: Link | None = None
            with anyio.move_on_after(3):  # a refused handshake is often answered with silence
                try:
                    link = await self.connect(port, tmp_path, security=self.other_security)
                except Exception:  # refused while connecting: the expected outcome for most transports
                    link = None
            if link is not None:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(link.run, Recorder())
                    with contextlib.suppress(
                        anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError
                    ):
                        link.send_nowait(b"\0" * 64)
                    await anyio.sleep(1.0)
                    tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await link.aclose()
            _check(not accepted, contract, "a peer holding another key reached the listener's handler")

    async def test_unreliable_datagrams_or_none(self, tmp_path: Path) -> None:
        """A link that says ``max_datagram`` 0 refuses ``send_datagram_nowait`` with ``ValueError``; one that
        carries datagrams delivers them whole and at most once, each way, and refuses one a byte too large."""
        contract = "unreliable datagrams"
        async with self.pair(tmp_path) as (client_link, server_link, client, server):
            for link, sink in ((client_link, server), (server_link, client)):
                size = link.max_datagram
                _check(size >= 0, contract, f"max_datagram is {size}")
                if size == 0:
                    try:
                        link.send_datagram_nowait(b"x")
                    except ValueError:
                        continue
                    raise ContractBroken(contract, "a link without datagrams took one")
                try:
                    link.send_datagram_nowait(b"x" * (size + 1))
                except ValueError:
                    pass
                else:
                    raise ContractBroken(contract, f"a datagram larger than max_datagram ({size}) was taken")
                sent = {}
                for i in range(64):
                    datagram = i.to_bytes(2, "big") + random.Random(i).randbytes(
                        max(0, min(size, 40 * i) - 2)
                    )
                    sent[datagram[:2]] = datagram
                    link.send_datagram_nowait(datagram)
                    await anyio.sleep(0.002)
                await _until(lambda sink=sink: bool(sink.datagrams), 15, contract, "no datagram arrived")  # type: ignore[misc]
                await anyio.sleep(0.2)
                tags = [datagram[:2] for datagram in sink.datagrams]
                _check(len(tags) == len(set(tags)), contract, "a datagram arrived twice")
                _check(
                    all(sent.get(datagram[:2]) == datagram for datagram in sink.datagrams),
                    contract,
                    "a datagram arrived changed",
                )

    async def test_garbage_never_stops_the_listener(self, tmp_path: Path) -> None:
        contract = "garbage input"
        rng = random.Random(7)
        async with self.listening(tmp_path) as (port, accepted):
            if self.datagram:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    for _ in range(2000):
                        sock.sendto(rng.randbytes(rng.randrange(1, 1500)), ("127.0.0.1", port))
            else:
                for _ in range(20):
                    try:
                        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                            sock.sendall(rng.randbytes(rng.randrange(1, 8192)))
                    except OSError:
                        pass
                with socket.create_connection(("127.0.0.1", port), timeout=5):
                    pass  # and one that says nothing
            await anyio.sleep(0.2)
            before = len(accepted)
            link = await self.connect(port, tmp_path)
            recorder = Recorder()
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(link.run, recorder)
                    link.send_nowait(b"\0")
                    await _until(lambda: len(accepted) > before, 15, contract, "the listener stopped serving")
                    tg.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await link.aclose()

    async def test_clean_shutdown_leaves_nothing_behind(self, tmp_path: Path) -> None:
        contract = "clean shutdown"
        # one tunnel first: what an event loop opens once on first use (uvloop's reserve descriptor on
        # /dev/null, kept for when accept runs out of descriptors) is not a leak
        async with self.pair(tmp_path):
            pass
        await anyio.sleep(0.1)
        gc.collect()
        fds_before = _open_descriptors()
        tasks_before = len(asyncio.all_tasks())
        async with self.pair(tmp_path) as (client_link, _server_link, _client, server):
            client_link.send_nowait(b"hello")
            await _until(lambda: bytes(server.data) == b"hello", 15, contract, "the transfer failed")
        await anyio.sleep(0.3)
        gc.collect()
        await anyio.sleep(0.1)
        tasks_after = len(asyncio.all_tasks())
        _check(tasks_after <= tasks_before, contract, f"{tasks_after - tasks_before} task(s) left running")
        if fds_before is not None:
            fds_after = _open_descriptors()
            assert fds_after is not None
            left = fds_after - fds_before
            _check(not left, contract, f"{len(left)} file descriptor(s) left open: {_describe(left)}")

    async def test_loss_duplication_and_reordering(self, tmp_path: Path) -> None:
        if not self.datagram:
            pytest.skip(f"{self.scheme}:// is not carried in datagrams")
        contract = "loss, duplication and reordering"
        impairment = Impairment(loss=0.05, duplicate=0.05, reorder=0.05, delay=0.001)
        payload = random.Random(3).randbytes(4 * 1024 * 1024)
        async with (
            self.listening(tmp_path) as (port, accepted),
            ImpairmentRelay(("127.0.0.1", port), up=impairment, down=impairment, seed=5) as relay,
        ):
            link = await self.connect(relay.address[1], tmp_path)
            client, server = Recorder(), Recorder()
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(link.run, client)
                    link.send_nowait(b"\0")
                    await _until(lambda: bool(accepted), 30, contract, "no session through the relay")
                    tg.start_soon(accepted[0].run, server)
                    with anyio.fail_after(120):
                        await self._push(link, payload, client)
                    await _until(
                        lambda: server.received == len(payload) + 1,
                        120,
                        contract,
                        f"{server.received - 1} of {len(payload)} bytes arrived",
                    )
                    tg.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await link.aclose()
            _check(bytes(server.data[1:]) == payload, contract, "the bytes differ")
            _check(
                relay.up_stats.dropped > 0,
                contract,
                "the relay dropped nothing: the check proved nothing",
            )


def _describe(fds: set[int]) -> str:
    """Each descriptor with what it is (``socket:[inode]``, a path, ``anon_inode:[eventfd]``...)."""
    names = []
    for fd in sorted(fds):
        try:
            names.append(f"{fd} ({os.readlink(f'/proc/self/fd/{fd}')})")
        except OSError:
            names.append(str(fd))
    return ", ".join(names)


def _open_descriptors() -> set[int] | None:
    """This process's open file descriptors (Linux); ``None`` where that cannot be read."""
    if not sys.platform.startswith("linux"):
        return None
    return {int(name) for name in os.listdir("/proc/self/fd")} - {-1}
