"""Sealed kcp:// (a pre-shared key): handshake retransmission, silence towards strangers, stateless resets,
rebinding."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import ByteStream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.linkutil import stream_of
from tests.streams import echo, read_exactly, wait_until
from vtunnel.arq.kcp_engine import KCPEngine
from vtunnel.io.datagrams import GSO_MAX_BYTES, GSO_MAX_SEGMENTS, DatagramSocket, open_udp_socket, split_run
from vtunnel.security.ciphers import Cipher
from vtunnel.security.datagram import (
    CID_LEN,
    DATAGRAM_OVERHEAD,
    DATAGRAM_PROLOGUE,
    MIN_RESET_DATAGRAM,
    RESET_TOKEN_LEN,
    DatagramClient,
    DatagramServer,
    DatagramSession,
    StatelessReset,
    is_minted,
    mint_connection_id,
    read_handshake_datagram,
    reset_keys,
    reset_token,
    write_handshake_datagram,
)
from vtunnel.security.errors import AuthenticationFailed, HandshakeTimeout
from vtunnel.security.noise import Responder
from vtunnel.security.replay import ReplayCache, ResetLimiter
from vtunnel.testing import Impairment, ImpairmentRelay
from vtunnel.transports.base import Endpoint, SecurityConfig
from vtunnel.transports.kcp.link import KCPLink
from vtunnel.transports.kcp.listener import KCPListener
from vtunnel.transports.kcp.options import parse_options
from vtunnel.transports.kcp.sealed import RESET_REASON, SealedClientCodec, SealedListenerCodec
from vtunnel.transports.kcp.transport import KCPTransport
from vtunnel.transports.link import LinkStream, ListenerAttribute

pytestmark = pytest.mark.anyio

kcp_connect = KCPTransport().dial


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    """uvloop, the runtime's loop when installed (test_kcp.py covers both loops)."""
    return ("asyncio", {"use_uvloop": True})


KEY = SecurityConfig(psk=bytes(range(32)))
OTHER_KEY = SecurityConfig(psk=bytes(32))
PLAIN = SecurityConfig()


async def sealed_listener(query: str = "") -> KCPListener[SealedListenerCodec]:
    listener = await KCPTransport().listen(Endpoint.parse(f"kcp://127.0.0.1:0{query}"), security=KEY)
    assert isinstance(listener, KCPListener)
    assert isinstance(listener.codec, SealedListenerCodec)
    return listener


async def sealed_stream(*args: Any, **kwargs: Any) -> LinkStream[KCPLink]:
    """``kcp_connect`` as a byte stream."""
    return stream_of(await kcp_connect(*args, **kwargs))


async def connect(port: int, security: SecurityConfig = KEY, query: str = "") -> LinkStream[KCPLink]:
    link = await KCPTransport().connect(Endpoint.parse(f"kcp://127.0.0.1:{port}{query}"), security=security)
    assert isinstance(link, KCPLink)
    return stream_of(link)


async def test_sealed_echo_through_loss_and_a_lost_handshake() -> None:
    listener = await sealed_listener()
    relay = ImpairmentRelay(listener.local_address, up=Impairment(loss=1.0), seed=2)
    async with relay, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)

        async def heal() -> None:  # the first handshake datagrams are lost; then the path recovers
            await wait_until(lambda: relay.up_stats.dropped >= 2)
            relay.up = relay.down = Impairment(loss=0.05, duplicate=0.05, reorder=0.05)

        tg.start_soon(heal)
        with anyio.fail_after(30):
            client = await connect(relay.address[1])
        assert isinstance(client.link, KCPLink)
        # the KCP MTU leaves room for the sealing overhead
        assert client.link.engine.max_data < 1350 - 24
        payload = os.urandom(2 * 1024 * 1024)
        with anyio.fail_after(60):
            tg.start_soon(client.send, payload)
            assert await read_exactly(client, len(payload)) == payload
        await client.aclose()
        tg.cancel_scope.cancel()
    assert relay.up_stats.dropped >= 2
    await listener.aclose()


async def test_wrong_key_times_out_and_gets_no_answer() -> None:
    listener = await sealed_listener()
    with pytest.raises(HandshakeTimeout):
        await connect(listener.local_address[1], OTHER_KEY, "?connect_timeout=1")
    assert listener.session_count == 0
    assert listener.dropped >= 1
    await listener.aclose()


async def test_plain_client_to_sealed_server_and_sealed_client_to_plain_server() -> None:
    listener = await sealed_listener()
    plain = await connect(listener.local_address[1], PLAIN, "?timeout=0.5")
    await plain.send(b"hello")
    with anyio.fail_after(20), pytest.raises(anyio.BrokenResourceError):
        await plain.receive()
    assert listener.session_count == 0
    await plain.aclose()
    await listener.aclose()

    plain_listener = await KCPTransport().listen(Endpoint.parse("kcp://127.0.0.1:0"), security=PLAIN)
    assert isinstance(plain_listener, KCPListener)
    with pytest.raises(HandshakeTimeout):
        await connect(plain_listener.local_address[1], KEY, "?connect_timeout=1")
    assert plain_listener.session_count == 0
    await plain_listener.aclose()


async def test_unauthenticated_datagrams_are_dropped_silently() -> None:
    listener = await sealed_listener()
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        client = await connect(listener.local_address[1])
        assert isinstance(client.link, KCPLink)
        with anyio.fail_after(20):
            await client.send(b"first")
            assert await read_exactly(client, 5) == b"first"
        cid = next(k for k in listener.sessions if isinstance(k, bytes))
        forged_data = cid + os.urandom(205)  # right CID, bad tag
        plain_push = struct.pack("<IBBHIIII", 5, 81, 0, 128, 0, 0, 0, 1) + b"x"  # plain KCP PUSH sn 0
        bogus_init = os.urandom(129)  # the size of a first datagram
        dropped = listener.dropped
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            raw.bind(("127.0.0.1", 0))
            raw.setblocking(False)
            # (a DATA datagram for an unknown connection ID would get a stateless reset: see below)
            stranger = b"\x7f" + os.urandom(49)
            for datagram in [forged_data, plain_push, bogus_init, stranger, b"\x03" * 40] * 10:
                raw.sendto(datagram, listener.local_address)
            await wait_until(lambda: listener.dropped >= dropped + 50)
            await anyio.sleep(0.2)
            with pytest.raises(BlockingIOError):
                raw.recv(4096)
        assert listener.session_count == 1
        with anyio.fail_after(20):
            payload = os.urandom(300_000)
            tg.start_soon(client.send, payload)
            assert await read_exactly(client, len(payload)) == payload
        await client.aclose()
        tg.cancel_scope.cancel()
    await listener.aclose()


async def test_sealed_session_survives_rebinding() -> None:
    listener = await sealed_listener()
    async with ImpairmentRelay(listener.local_address, seed=4) as relay, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        client = await connect(relay.address[1])
        with anyio.fail_after(30):
            for round_ in range(3):
                payload = os.urandom(500_000)
                tg.start_soon(client.send, payload)
                assert await read_exactly(client, len(payload)) == payload
                if round_ < 2:
                    relay.rebind()
        assert listener.session_count == 1
        await client.aclose()
        tg.cancel_scope.cancel()
    await listener.aclose()


async def test_closing_a_sealed_session_forgets_its_keys() -> None:
    listener = await sealed_listener()
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        client = await connect(listener.local_address[1])
        with anyio.fail_after(20):
            await client.send(b"x")
            assert await read_exactly(client, 1) == b"x"
        server_side = next(iter(listener.sessions.values()))
        await server_side.aclose()
        assert listener.session_count == 0
        assert len(listener.codec.paths) == 0
        await client.aclose()
        tg.cancel_scope.cancel()
    await listener.aclose()


@asynccontextmanager
async def raw_sealed_session(
    conv: int,
) -> AsyncIterator[
    tuple[KCPListener[SealedListenerCodec], tuple[DatagramSocket, DatagramSession, bytes], list[bytes]]
]:
    """A sealed listener, a client socket that completed the handshake with it by hand, and 16 full datagrams of
    the first flush of a KCP engine of ``conv`` (unsealed), which carry ``payload``: the listener, the client's
    ``(udp, session, payload)``, and the datagrams."""
    listener = await sealed_listener()
    assert KEY.psk is not None
    options = parse_options({"mode": "fast3"})
    replies: list[bytes] = []
    udp = DatagramSocket(
        open_udp_socket(socket.AF_INET, bind=("127.0.0.1", 0)),
        lambda batch: replies.extend(d for d, _ in batch),
    )
    loop_time = asyncio.get_running_loop().time
    engine = KCPEngine(conv=conv, options=options, mtu=options.mtu - DATAGRAM_OVERHEAD, now=loop_time())
    try:
        handshake = DatagramClient(KEY.psk, now=time.time())
        udp.sendto(handshake.initial_datagram(time.time()), listener.local_address)
        await wait_until(lambda: bool(replies))
        handshake.receive(replies[0], time.time())
        session = handshake.session
        assert session is not None
        payload = os.urandom(engine.max_data * 16)  # within what the first flush sends, paced or not
        engine.send(payload)
        engine.flush(loop_time())
        datagrams = engine.datagrams_to_send()
        assert len(datagrams) == 16
        assert len({len(d) for d in datagrams}) == 1
        yield listener, (udp, session, payload), datagrams
    finally:
        engine.close()
        udp.close()
        await listener.aclose()


async def test_a_forged_datagram_inside_a_coalesced_run_is_dropped_alone() -> None:
    """Sealed runs (sent with segmentation offload) that are not in order are opened datagram by datagram."""
    async with raw_sealed_session(555) as (listener, (udp, session, payload), datagrams):
        sealed = [session.seal(d) for d in datagrams]

        def forged(datagram: bytes) -> bytes:
            return datagram[:-1] + bytes([datagram[-1] ^ 1])  # a broken tag

        first, second = sealed[:8], sealed[8:]
        udp.sendto_many([*first[:6], forged(first[6]), *first[6:]], listener.local_address)
        with anyio.fail_after(10):
            stream = stream_of(await listener.accept())
        # the session is known now: the next run takes the one-pass path around the forged datagram
        udp.sendto_many([*second[:3], forged(second[3]), *second[3:]], listener.local_address)
        with anyio.fail_after(10):
            assert await read_exactly(stream, len(payload)) == payload
        assert listener.dropped == 2
        assert listener.session_count == 1
        await stream.aclose()


async def test_an_authentic_datagram_that_is_no_kcp_inside_a_run_in_order_is_dropped_alone() -> None:
    """A run of sealed datagrams in order is opened at once and taken whole; when one of them is authentic but
    carries no valid KCP datagram (a peer with the key sending garbage), only that one is dropped."""
    async with raw_sealed_session(556) as (listener, (udp, session, payload), datagrams):
        udp.sendto_many([session.seal(d) for d in datagrams[:8]], listener.local_address)
        with anyio.fail_after(10):
            stream = stream_of(await listener.accept())
        garbage = bytes(len(datagrams[0]))  # conversation 0: not this session's KCP
        run = [*datagrams[8:11], garbage, *datagrams[11:]]
        udp.sendto_many(session.seal_many(run), listener.local_address)  # one run, counters in order
        with anyio.fail_after(10):
            assert await read_exactly(stream, len(payload)) == payload
        assert listener.dropped == 1
        assert listener.session_count == 1
        await stream.aclose()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batches=st.lists(
        st.lists(st.sampled_from([24, 100, 700, 1321]), min_size=1, max_size=90),
        min_size=1,
        max_size=4,
    )
)
def test_a_sessions_sealing_output_is_runs_for_segmented_sends_of_its_datagrams_in_order(
    batches: list[list[int]],
) -> None:
    """What seals a session's output (the codec's Sealer) gives runs that one segmented send each takes (equal
    sizes but a shorter last one, within the kernel's limits), holding a sealed datagram for each of the ARQ's,
    in order, on consecutive counters: the peer opens them to the datagrams given."""

    async def main() -> None:
        async with raw_sealed_session(557) as (listener, (udp, session, _payload), datagrams):
            cid = session.connection_id
            seal = listener.codec.session_started(cid, datagrams[0], udp.local_address)
            for k, batch in enumerate(batches):
                payloads = [bytes([(i + k) % 251]) * size for i, size in enumerate(batch)]
                runs = seal(payloads)
                for buffer, segment in runs:
                    sizes = [len(d) for d in split_run(buffer, segment)]
                    assert len(sizes) <= GSO_MAX_SEGMENTS
                    assert len(sizes) == 1 or len(buffer) <= GSO_MAX_BYTES
                    assert all(size == segment for size in sizes[:-1])
                    assert sizes[-1] <= segment
                wire = [bytes(d) for buffer, segment in runs for d in split_run(buffer, segment)]
                assert [len(d) for d in wire] == [len(p) + DATAGRAM_OVERHEAD for p in payloads]
                assert session.open_many(wire) == payloads

    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})


async def _sealed_pair_listener(cipher: str, query: str = "") -> KCPListener[SealedListenerCodec]:
    options = parse_options(dict(p.split("=") for p in query.split("&") if p))
    sock = open_udp_socket(socket.AF_INET, bind=("127.0.0.1", 0), sockbuf=options.sockbuf)
    assert KEY.psk is not None
    return KCPListener(sock, options, SealedListenerCodec(KEY.psk, cipher=cipher))


@pytest.mark.parametrize(
    ("client", "server", "expected"),
    [
        ("aes-256-gcm", "aes-256-gcm", Cipher.AES_256_GCM),
        ("chacha20-poly1305", "chacha20-poly1305", Cipher.CHACHA20_POLY1305),
        ("aes-256-gcm", "auto", Cipher.AES_256_GCM),
        ("chacha20-poly1305", "auto", Cipher.CHACHA20_POLY1305),
    ],
)
async def test_sealed_tunnel_moves_bytes_exactly_with_each_cipher(
    client: str, server: str, expected: Cipher
) -> None:
    listener = await _sealed_pair_listener(server, "mode=fast3")
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        assert KEY.psk is not None
        with anyio.fail_after(20):
            stream = await sealed_stream(
                socket.AF_INET,
                listener.local_address,
                parse_options({"mode": "fast3"}),
                SealedClientCodec(KEY.psk, cipher=client),
            )
        assert [p.session.cipher for p in listener.codec.paths.values()] == [expected]
        payload = os.urandom(1024 * 1024)
        with anyio.fail_after(60):
            tg.start_soon(stream.send, payload)
            assert await read_exactly(stream, len(payload)) == payload
        await stream.aclose()
        tg.cancel_scope.cancel()
    await listener.aclose()


async def test_sealed_ciphers_with_nothing_in_common_time_out_silently() -> None:
    listener = await _sealed_pair_listener("chacha20-poly1305")
    assert KEY.psk is not None
    with pytest.raises(HandshakeTimeout, match="protocol version"):
        await kcp_connect(
            socket.AF_INET,
            listener.local_address,
            parse_options({"connect_timeout": "1"}),
            SealedClientCodec(KEY.psk, cipher="aes-256-gcm"),
        )
    assert len(listener.codec.paths) == 0
    assert listener.dropped >= 1
    await listener.aclose()


async def test_the_process_cipher_setting_reaches_kcp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the transport: VTUNNEL_CIPHER pins the cipher of both ends of this process."""
    for name, expected in (
        ("aes-256-gcm", Cipher.AES_256_GCM),
        ("chacha20-poly1305", Cipher.CHACHA20_POLY1305),
    ):
        monkeypatch.setenv("VTUNNEL_CIPHER", name)
        listener = await sealed_listener()
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo)
            with anyio.fail_after(20):
                stream = await connect(listener.local_address[1])
            await stream.send(b"hello")
            with anyio.fail_after(20):
                assert await read_exactly(stream, 5) == b"hello"
            assert [p.session.cipher for p in listener.codec.paths.values()] == [expected]
            await stream.aclose()
            tg.cancel_scope.cancel()
        await listener.aclose()


async def test_a_reply_choosing_a_cipher_not_offered_fails_the_client_at_once() -> None:
    """A peer holding the key (a broken or newer server) answers with a cipher the client did not offer: the
    client stops retransmitting and fails with the reason instead of waiting for its timeout."""
    assert KEY.psk is not None
    psk = KEY.psk
    answered: list[int] = []

    def answer(batch: list[tuple[bytes, tuple[str, int]]]) -> None:
        for init, source in batch:
            framed = read_handshake_datagram(psk, init, from_client=True)
            assert framed is not None
            initial_cid, message1 = framed
            responder = Responder(psk, prologue=DATAGRAM_PROLOGUE + initial_cid)
            responder.read_message1(message1)
            body = responder.write_message2(bytes(8) + bytes([Cipher.AES_256_GCM]))
            fake.sendto(
                write_handshake_datagram(psk, initial_cid, body, from_client=False, salt=bytes(16)), source
            )
            answered.append(len(init))

    fake = DatagramSocket(open_udp_socket(socket.AF_INET, bind=("127.0.0.1", 0)), answer)
    try:
        with pytest.raises(AuthenticationFailed, match="did not offer"):
            await kcp_connect(
                socket.AF_INET,
                fake.local_address,
                parse_options({"connect_timeout": "60"}),
                SealedClientCodec(psk, cipher="chacha20-poly1305"),
            )
        assert answered
    finally:
        fake.close()


# --- stateless reset --------------------------------------------------------------------------------------------

GENEROUS = ResetLimiter(1e6, 1_000_000, total_rate=1e6, total_burst=1_000_000)


async def sealed_listener_at(
    port: int = 0, reset_limiter: ResetLimiter | None = None
) -> KCPListener[SealedListenerCodec]:
    options = parse_options({})
    sock = open_udp_socket(socket.AF_INET, bind=("127.0.0.1", port), sockbuf=options.sockbuf)
    assert KEY.psk is not None
    return KCPListener(sock, options, SealedListenerCodec(KEY.psk, reset_limiter=reset_limiter))


CID_KEY = reset_keys(KEY.psk or b"")[1]


def stranger(size: int = 100) -> bytes:
    """A DATA datagram for a connection ID a server holding the key could have assigned, but no server knows."""
    return mint_connection_id(CID_KEY) + os.urandom(size - CID_LEN)


async def receive_one(sock: socket.socket, limit: float = 10.0) -> bytes:
    with anyio.fail_after(limit):
        while True:
            try:
                return sock.recv(4096)
            except BlockingIOError:
                await anyio.sleep(0.002)


def raw_socket() -> socket.socket:
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind(("127.0.0.1", 0))
    raw.setblocking(False)
    return raw


async def test_a_restarted_server_resets_the_client_at_once() -> None:
    """The server's process is gone, for a moment nothing listens, then a new one holds the port and the key:
    the client's next datagram gets a stateless reset and its stream fails with that reason (not after its 15 s
    watchdog). Run on uvloop, whose poll stops watching a socket that reports an error."""
    listener = await sealed_listener_at()
    port = listener.local_address[1]
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        client = await connect(port)
        with anyio.fail_after(20):
            await client.send(b"before")
            assert await read_exactly(client, 6) == b"before"
        tg.cancel_scope.cancel()
    await listener.aclose()
    # while nothing listens the client's datagrams draw ICMP port unreachable errors: it must not go deaf
    await client.send(b"into the void")
    await anyio.sleep(0.3)
    restarted = await sealed_listener_at(port)
    try:
        await client.send(b"anyone there?")
        with anyio.fail_after(10), pytest.raises(anyio.BrokenResourceError, match=RESET_REASON):
            await client.receive()
        with pytest.raises(anyio.BrokenResourceError):
            await client.send(b"x")
        assert restarted.codec.resets_sent >= 1
        assert restarted.session_count == 0
        assert len(restarted.codec.paths) == 0
    finally:
        await client.aclose()
        await restarted.aclose()


async def test_only_the_servers_own_reset_fails_the_client() -> None:
    """A reset with a wrong token, or the right one from another address (another server instance with the
    same key answering a replayed datagram to the forged source), changes nothing; the server's real reset
    fails the stream at once."""
    assert KEY.psk is not None
    sessions: list[DatagramSession] = []
    received: list[bytes] = []
    handshakes = DatagramServer(KEY.psk, replay=ReplayCache())

    def serve(batch: list[tuple[bytes, tuple[str, int]]]) -> None:
        for datagram, source in batch:
            got = handshakes.accept(datagram, source, time.time())
            if got is not None:
                sessions.append(got[0])
                fake.sendto(got[1], source)
            elif sessions and sessions[-1].open(datagram) is not None:
                received.append(datagram)

    fake = DatagramSocket(open_udp_socket(socket.AF_INET, bind=("127.0.0.1", 0)), serve)
    impostor = DatagramSocket(open_udp_socket(socket.AF_INET, bind=("127.0.0.1", 0)), lambda _b: None)
    client: ByteStream | None = None
    try:
        client = await connect(fake.local_address[1])
        assert isinstance(client.link, KCPLink)
        await client.send(b"hi")
        await wait_until(lambda: bool(received))  # the client's first KCP datagram
        cid = sessions[-1].connection_id
        client_address = client.link.local_address
        right = StatelessReset(KEY.psk).answer(cid + os.urandom(200), ("127.0.0.1", 1), 0.0)
        other_key = cid + os.urandom(60) + reset_token(reset_keys(bytes(32))[0], cid)
        assert right is not None
        wrong_token = right[:-1] + bytes([right[-1] ^ 0x80])
        fake.sendto(wrong_token, client_address)
        fake.sendto(other_key, client_address)
        impostor.sendto(right, client_address)
        await anyio.sleep(0.3)  # time for the client to read and judge them
        before = len(received)
        await client.send(b"still here")  # raises if the stream failed
        await wait_until(lambda: len(received) > before)
        fake.sendto(right, client_address)
        with anyio.fail_after(10), pytest.raises(anyio.BrokenResourceError, match=RESET_REASON):
            await client.receive()
    finally:
        if client is not None:
            await client.aclose()
        fake.close()
        impostor.close()


async def test_strangers_get_short_resets_within_the_rate_limit_and_nothing_else_is_answered() -> None:
    listener = await sealed_listener_at(
        reset_limiter=ResetLimiter(0.001, 5, total_rate=1e6, total_burst=1000)
    )
    assert KEY.psk is not None
    tokens = StatelessReset(KEY.psk)
    with raw_socket() as raw:
        silent = [
            stranger(MIN_RESET_DATAGRAM),  # no longer than a reset: could be one
            b"\x03" * CID_LEN + os.urandom(200),  # an ID no key holder minted: a probe
            b"\x02" * CID_LEN + os.urandom(100),
            b"\x01" * CID_LEN + os.urandom(400),  # the size of a first datagram
        ]
        for datagram in silent:
            raw.sendto(datagram, listener.local_address)
        triggers = [stranger(60 + 20 * i) for i in range(8)]
        for datagram in triggers:
            raw.sendto(datagram, listener.local_address)
        answers = [await receive_one(raw) for _ in range(5)]
        for trigger, reset in zip(
            triggers[:5], answers, strict=True
        ):  # in order: the silent ones got nothing
            assert reset[:CID_LEN] == trigger[:CID_LEN]
            assert MIN_RESET_DATAGRAM <= len(reset) < len(trigger)
            assert reset[-RESET_TOKEN_LEN:] == tokens.token(trigger[:CID_LEN])
        await wait_until(lambda: listener.dropped >= len(silent) + len(triggers))
        await anyio.sleep(0.2)
        with pytest.raises(BlockingIOError):  # the source's burst of 5 is spent
            raw.recv(4096)
    assert listener.codec.resets_sent == 5
    await listener.aclose()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    datagrams=st.lists(
        st.tuples(st.binary(min_size=0, max_size=1400), st.sampled_from(["own", "raw", "mutated"])),
        min_size=1,
        max_size=12,
    )
)
async def test_a_known_session_is_never_reset_and_the_listener_never_falls(
    datagrams: list[tuple[bytes, str]],
) -> None:
    """Random datagrams, many naming the live session's connection ID, some mutations of its real datagrams:
    none gets a reset (a probe for an unknown ID right after each is the first answer), and the session goes on."""
    listener = await sealed_listener_at(reset_limiter=GENEROUS)
    assert KEY.psk is not None
    tokens = StatelessReset(KEY.psk)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        client = await connect(listener.local_address[1])
        with anyio.fail_after(20):
            await client.send(b"hello")
            assert await read_exactly(client, 5) == b"hello"
        cid = next(k for k in listener.sessions if isinstance(k, bytes))
        crypto = listener.codec.paths[cid].session
        with raw_socket() as raw:
            for body, kind in datagrams:
                if kind == "own":
                    datagram = cid + body
                elif kind == "mutated":
                    sealed = bytearray(crypto.seal(body[:200]))  # a datagram of the server's own session
                    sealed[CID_LEN + (len(body) % (len(sealed) - CID_LEN))] ^= 0x01
                    datagram = bytes(sealed)
                else:
                    datagram = body
                raw.sendto(datagram, listener.local_address)
                probe = stranger(90)
                raw.sendto(probe, listener.local_address)
                answer = await receive_one(raw)
                if (
                    datagram[:CID_LEN] != cid
                    and len(datagram) > MIN_RESET_DATAGRAM
                    and is_minted(CID_KEY, datagram[:CID_LEN])
                ):
                    assert answer[:CID_LEN] == datagram[:CID_LEN]  # a stranger's: its reset first
                    answer = await receive_one(raw)
                assert answer[:CID_LEN] == probe[:CID_LEN]
                assert answer[-RESET_TOKEN_LEN:] == tokens.token(probe[:CID_LEN])
        assert listener.session_count == 1
        with anyio.fail_after(20):
            payload = os.urandom(50_000)
            tg.start_soon(client.send, payload)
            assert await read_exactly(client, len(payload)) == payload
        await client.aclose()
        tg.cancel_scope.cancel()
    await listener.aclose()


async def test_a_listener_that_stopped_accepting_answers_no_handshake_and_its_sessions_go_on() -> None:
    """What a draining server (a replaced worker) does: its tunnels finish, a new client's handshake gets
    nothing (it is sent again, and a supervisor's steering takes it to another worker)."""
    listener = await sealed_listener()
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        with anyio.fail_after(30):
            live = await connect(listener.local_address[1])
            await live.send(b"up")
            assert await read_exactly(live, 2) == b"up"
        stop = listener.extra(ListenerAttribute.stop_accepting)
        stop()
        with pytest.raises(HandshakeTimeout):
            await connect(listener.local_address[1], KEY, "?connect_timeout=1")
        payload = os.urandom(512 * 1024)
        with anyio.fail_after(60):
            tg.start_soon(live.send, payload)
            assert await read_exactly(live, len(payload)) == payload
        assert listener.session_count == 1  # the client that was refused started none
        await live.aclose()
        tg.cancel_scope.cancel()
    await listener.aclose()
