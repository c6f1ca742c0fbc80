"""The key on byte-stream transports over real TCP sockets on 127.0.0.1: handshakes, sealed links (records,
half-close), and silence towards everything that fails authentication (while other clients keep being served)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from anyio import BrokenResourceError, EndOfStream
from anyio.abc import ByteStream, SocketAttribute, SocketStream

from tests.linkutil import stream_of
from tests.streams import echo, read_exactly
from vtunnel.security.ciphers import Cipher
from vtunnel.security.errors import HandshakeTimeout, SecurityError
from vtunnel.security.records import SecureStreamClient
from vtunnel.security.replay import HandshakeLimiter, ReplayCache
from vtunnel.transports.base import Endpoint, SecurityConfig
from vtunnel.transports.link import Link, LinkStream, StreamLink
from vtunnel.transports.secure import (
    RECORD_TIMEOUT,
    SealedLink,
    cipher_preference,
    cpu_has_aes_instructions,
    secure_client,
    secure_server,
)
from vtunnel.transports.tcp import TCPTransport

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

PSK = bytes(range(32))
SILENCE = (0.3, 0.6)


@dataclass
class Server:
    port: int
    accepted: int = 0
    refused: int = 0
    ciphers: list[Cipher | None] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    failed: anyio.Event = field(default_factory=anyio.Event)


async def _echo(stream: ByteStream, server: Server) -> None:
    try:
        while True:
            data = await stream.receive()
            await stream.send(data)
    except EndOfStream:
        await stream.send(b"<bye>")
    except BrokenResourceError as exc:
        server.errors.append(exc)
        server.failed.set()
    finally:
        await stream.aclose()


@asynccontextmanager
async def running_server(
    limiter: HandshakeLimiter | None = None, cipher: str = "auto", record_timeout: float = RECORD_TIMEOUT
) -> AsyncIterator[Server]:
    replay = ReplayCache()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    server = Server(port=listener.extra(SocketAttribute.local_port))

    async def handle(raw: SocketStream) -> None:
        host = raw.extra(SocketAttribute.remote_address)[0]
        secured = await secure_server(
            raw,
            PSK,
            replay=replay,
            limiter=limiter,
            source=str(host),
            silence=SILENCE,
            cipher=cipher,
            record_timeout=record_timeout,
        )
        if secured is None:
            server.refused += 1
            return
        server.accepted += 1
        server.ciphers.append(secured.cipher)
        async with LinkStream(secured.link(StreamLink(secured.stream))) as stream:
            await _echo(stream, server)

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()
    await listener.aclose()


async def _connect(
    port: int, psk: bytes = PSK, cipher: str = "auto", timeout: float = 5.0
) -> LinkStream[SealedLink]:
    raw = await anyio.connect_tcp("127.0.0.1", port)
    channel = await secure_client(raw, psk, handshake_timeout=timeout, cipher=cipher)
    return stream_of(channel.link(StreamLink(channel.stream)))


async def _read_all(stream: ByteStream, limit: float = 10.0) -> bytes:
    out = bytearray()
    with anyio.fail_after(limit):
        try:
            while True:
                out += await stream.receive()
        except (EndOfStream, BrokenResourceError):
            pass
    return bytes(out)


async def test_echo_through_the_secure_channel() -> None:
    async with running_server() as server:
        stream = await _connect(server.port)
        payload = os.urandom(1_000_000)
        got = bytearray()

        async def reader() -> None:
            while len(got) < len(payload):
                got.extend(await stream.receive())

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            for i in range(0, len(payload), 50_000):
                await stream.send(payload[i : i + 50_000])
        assert bytes(got) == payload
        assert stream.extra(SocketAttribute.remote_port) == server.port  # attributes pass through
        await stream.send_eof()
        assert await _read_all(stream) == b"<bye>"
        await stream.aclose()
        assert server.accepted == 1


async def test_many_clients_at_once() -> None:
    async with running_server() as server:

        async def one(i: int) -> None:
            s = await _connect(server.port)
            msg = f"client {i} ".encode() * 100
            await s.send(msg)
            got = b""
            while len(got) < len(msg):
                got += await s.receive()
            assert got == msg
            await s.aclose()

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i)
        assert server.accepted == 20


async def _probe(port: int, data: bytes) -> tuple[bytes, float]:
    """Send ``data`` raw; return every byte the server sent back and how long until it closed."""
    raw = await anyio.connect_tcp("127.0.0.1", port)
    start = time.monotonic()
    if data:
        await raw.send(data)
    got = await _read_all(raw)
    elapsed = time.monotonic() - start
    await raw.aclose()
    return got, elapsed


@pytest.mark.parametrize(
    "probe",
    [
        bytes.fromhex("000000040000000000"),  # vproxy's empty SETTINGS
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8.0\r\n\r\n",
        os.urandom(64),
        os.urandom(3000),
        b"",  # connect and say nothing
    ],
    ids=["vproxy-settings", "http", "random-64", "random-3000", "nothing"],
)
async def test_probes_get_zero_bytes_and_a_late_close(probe: bytes) -> None:
    async with running_server() as server:
        got, elapsed = await _probe(server.port, probe)
        assert got == b""
        assert elapsed >= SILENCE[0] * 0.9  # it kept reading rather than hanging up at once
        # and it still serves a real client
        s = await _connect(server.port)
        await s.send(b"hi")
        assert await s.receive() == b"hi"
        await s.aclose()
        assert server.refused == 1


async def test_wrong_key_gets_nothing_while_others_are_served() -> None:
    async with running_server() as server:
        wrong = SecureStreamClient(bytes(32), now=time.time()).data_to_send()
        async with anyio.create_task_group() as tg:
            result: list[bytes] = []

            async def prober() -> None:
                result.append((await _probe(server.port, wrong))[0])

            tg.start_soon(prober)
            s = await _connect(server.port)
            for i in range(10):
                await s.send(b"%d" % i)
                assert await s.receive() == b"%d" % i
            await s.aclose()
        assert result == [b""]
        raw = await anyio.connect_tcp("127.0.0.1", server.port)
        with pytest.raises(SecurityError):  # a timeout, or the server's silent close
            await secure_client(raw, bytes(32), handshake_timeout=1.0)


async def test_a_captured_first_message_replayed_gets_silence() -> None:
    async with running_server() as server:
        # a real client handshake, captured on the way
        core = SecureStreamClient(PSK, now=time.time())
        first = core.data_to_send()
        raw = await anyio.connect_tcp("127.0.0.1", server.port)
        await raw.send(first)
        reply = await raw.receive()
        assert core.receive_data(reply, time.time()) == b""
        assert core.handshake_complete
        # the observer replays it on a new connection: nothing comes back
        got, _ = await _probe(server.port, first)
        assert got == b""
        await raw.aclose()
        assert server.accepted == 1
        assert server.refused == 1


async def test_truncated_connection_is_broken_not_a_clean_end() -> None:
    async with running_server() as server:
        core = SecureStreamClient(PSK, now=time.time())
        raw = await anyio.connect_tcp("127.0.0.1", server.port)
        await raw.send(core.data_to_send())
        core.receive_data(await raw.receive(), time.time())
        core.send(b"partial")
        await raw.send(core.data_to_send())
        assert core.receive_data(await raw.receive(), time.time()) == b"partial"
        await raw.aclose()  # cut: no authenticated end of stream
        with anyio.fail_after(10):
            await server.failed.wait()
        assert isinstance(server.errors[0], BrokenResourceError)


async def test_tampered_record_breaks_only_that_connection() -> None:
    async with running_server() as server:
        other = await _connect(server.port)
        core = SecureStreamClient(PSK, now=time.time())
        raw = await anyio.connect_tcp("127.0.0.1", server.port)
        await raw.send(core.data_to_send())
        core.receive_data(await raw.receive(), time.time())
        core.send(b"a" * 100)
        record = bytearray(core.data_to_send())
        record[50] ^= 1
        await raw.send(bytes(record))
        assert await _read_all(raw) == b""  # the server closes it without a word
        await raw.aclose()
        await other.send(b"unaffected")
        assert await other.receive() == b"unaffected"
        await other.aclose()
        assert len(server.errors) == 1


@pytest.mark.parametrize("forged", [False, True])
async def test_a_record_left_incomplete_breaks_the_stream_in_bounded_time(forged: bool) -> None:
    """A record cut short, or one whose length a forger grew (one flipped bit of the masked length flips the
    same bit of the length), then a connection that stalls: the server breaks and closes that stream after
    ``record_timeout`` instead of waiting for ever, and keeps serving the others."""
    async with running_server(record_timeout=0.5) as server:
        other = await _connect(server.port)
        core = SecureStreamClient(PSK, now=time.time())
        raw = await anyio.connect_tcp("127.0.0.1", server.port)
        await raw.send(core.data_to_send())
        core.receive_data(await raw.receive(), time.time())
        core.send(b"a" * 1000)
        record = bytearray(core.data_to_send())  # length 1016 = 0x03F8
        if forged:
            record[0] ^= 0x08  # now 0x0BF8 = 3064: in range, and more than will ever come
        else:
            del record[-10:]
        await raw.send(bytes(record))
        with anyio.fail_after(10):
            await server.failed.wait()
        assert isinstance(server.errors[0], BrokenResourceError)
        assert await _read_all(raw) == b""  # closed without a word
        await raw.aclose()
        await other.send(b"unaffected")
        assert await other.receive() == b"unaffected"
        await other.aclose()


async def test_half_close_both_ways() -> None:
    async with running_server() as server:
        s = await _connect(server.port)
        await s.send(b"last words")
        await s.send_eof()
        assert await _read_all(s) == b"last words<bye>"
        with pytest.raises(EndOfStream):
            await s.receive()
        await s.aclose()
        assert server.errors == []


async def test_limiter_silences_a_source_that_handshakes_too_often() -> None:
    async with running_server(limiter=HandshakeLimiter(rate=0.001, burst=2)) as server:
        for _ in range(2):
            s = await _connect(server.port)
            await s.aclose()
        raw = await anyio.connect_tcp("127.0.0.1", server.port)
        with pytest.raises(SecurityError):  # a timeout, or the server's silent close
            await secure_client(raw, PSK, handshake_timeout=1.0)
        assert server.refused == 1


async def test_logs_never_carry_key_material() -> None:
    import base64

    from structlog.testing import capture_logs

    with capture_logs() as logs:
        async with running_server() as server:
            s = await _connect(server.port)
            await s.send(b"x")
            assert await s.receive() == b"x"
            await s.aclose()
            await _probe(server.port, SecureStreamClient(bytes(32), now=time.time()).data_to_send())
    assert logs  # the refusal and the successful handshakes were logged
    text = repr(logs)
    for secret in (PSK.hex(), base64.b64encode(PSK).decode(), repr(PSK)):
        assert secret not in text


@pytest.mark.parametrize(
    ("client", "server_cipher", "expected"),
    [
        ("aes-256-gcm", "aes-256-gcm", Cipher.AES_256_GCM),
        ("chacha20-poly1305", "chacha20-poly1305", Cipher.CHACHA20_POLY1305),
        ("aes-256-gcm", "auto", Cipher.AES_256_GCM),
        ("chacha20-poly1305", "auto", Cipher.CHACHA20_POLY1305),
        ("auto", "chacha20-poly1305", Cipher.CHACHA20_POLY1305),
        ("auto", "aes-256-gcm", Cipher.AES_256_GCM),
    ],
)
async def test_each_cipher_moves_bytes_exactly(client: str, server_cipher: str, expected: Cipher) -> None:
    async with running_server(cipher=server_cipher) as server:
        stream = await _connect(server.port, cipher=client)
        assert stream.link.cipher is expected
        payload = os.urandom(600_000)
        got = bytearray()

        async def reader() -> None:
            while len(got) < len(payload):
                got.extend(await stream.receive())

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            for i in range(0, len(payload), 70_000):
                await stream.send(payload[i : i + 70_000])
        assert bytes(got) == payload
        await stream.aclose()
        assert server.ciphers == [expected]


async def test_no_cipher_in_common_is_a_timeout_and_silence() -> None:
    async with running_server(cipher="chacha20-poly1305") as server:
        raw = await anyio.connect_tcp("127.0.0.1", server.port)
        with pytest.raises(HandshakeTimeout, match="protocol version"):
            # shorter than the server's silence (SILENCE), which then closes without a byte
            await secure_client(raw, PSK, handshake_timeout=0.2, cipher="aes-256-gcm")
        with anyio.fail_after(5):
            while not server.refused:
                await anyio.sleep(0.01)
        assert server.accepted == 0
        # others are still served
        ok = await _connect(server.port)
        await ok.aclose()
        assert server.accepted == 1


async def test_the_process_cipher_setting_reaches_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the tcp:// transport: VTUNNEL_CIPHER pins the cipher of this process's ends."""
    key = SecurityConfig(psk=PSK)
    for name, expected in (
        ("aes-256-gcm", Cipher.AES_256_GCM),
        ("chacha20-poly1305", Cipher.CHACHA20_POLY1305),
    ):
        monkeypatch.setenv("VTUNNEL_CIPHER", name)
        listener = await TCPTransport().listen(Endpoint.parse("tcp://127.0.0.1:0"), security=key)
        port = listener.extra(SocketAttribute.local_port)

        async def echo_link(link: Link) -> None:
            await echo(stream_of(link))

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo_link)
            link = await TCPTransport().connect(Endpoint.parse(f"tcp://127.0.0.1:{port}"), security=key)
            assert isinstance(link, SealedLink)
            assert link.cipher is expected
            client = stream_of(link)
            await client.send(b"hello")
            with anyio.fail_after(10):
                assert await read_exactly(client, 5) == b"hello"
            await client.aclose()
            tg.cancel_scope.cancel()
        await listener.aclose()


def test_cipher_preference_reads_the_cpu_and_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 aes avx2 vaes\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd aes pmull sha1\n")
    none = tmp_path / "none"
    none.write_text("processor\t: 0\nflags\t\t: fpu sse2 aesx\n")
    assert cpu_has_aes_instructions(str(x86))
    assert cpu_has_aes_instructions(str(arm))
    assert not cpu_has_aes_instructions(str(none))
    assert not cpu_has_aes_instructions(str(tmp_path / "missing"))
    monkeypatch.delenv("VTUNNEL_CIPHER", raising=False)
    auto = cipher_preference()
    assert auto[0] == (Cipher.AES_256_GCM if cpu_has_aes_instructions() else Cipher.CHACHA20_POLY1305)
    assert set(auto) == {Cipher.AES_256_GCM, Cipher.CHACHA20_POLY1305}
    assert cipher_preference("chacha20-poly1305") == (Cipher.CHACHA20_POLY1305,)
    monkeypatch.setenv("VTUNNEL_CIPHER", "AES-256-GCM")
    assert cipher_preference() == (Cipher.AES_256_GCM,)
    assert cipher_preference("chacha20-poly1305") == (Cipher.CHACHA20_POLY1305,)  # a named one wins
    monkeypatch.setenv("VTUNNEL_CIPHER", "rot13")
    assert cipher_preference() == auto  # unknown: logged and ignored
    with pytest.raises(SecurityError, match="unknown cipher"):
        cipher_preference("rot13")


async def test_a_steady_transfer_longer_than_the_record_timeout_is_not_cut() -> None:
    """Reads end inside records all the time while data flows; the clock of an incomplete record restarts with
    every record that completes, so only a record that stops growing is timed out."""
    async with running_server(record_timeout=0.3) as server:
        stream = await _connect(server.port)
        piece = os.urandom(300_000)  # more than one read takes: reads end inside records
        sent, got = hashlib.sha256(), hashlib.sha256()

        async def reader() -> None:
            with anyio.fail_after(30):
                with contextlib.suppress(EndOfStream):
                    while True:
                        got.update(await stream.receive())

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            start = time.monotonic()
            for _ in range(2000):  # for four times the timeout, at most 600 MB
                if time.monotonic() - start > 1.2:
                    break
                await stream.send(piece)
                sent.update(piece)
            await stream.send_eof()
        sent.update(b"<bye>")
        assert got.digest() == sent.digest()
        await stream.aclose()
        assert server.errors == []
