"""SOCKS5 front over real sockets: curl, python-socks, reply codes, UDP ASSOCIATE, garbage, parsers."""

from __future__ import annotations

import functools
import ipaddress
import shutil
import socket
import struct
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import pytest
from anyio.abc import ByteStream, SocketStream, UDPSocket
from hypothesis import given
from hypothesis import strategies as st
from python_socks import ProxyError, ProxyType
from python_socks.async_.anyio import Proxy

from vtunnel.apps.dialer import Dialer
from vtunnel.apps.pipe import Leg
from vtunnel.apps.policy import ExitPolicy
from vtunnel.apps.socks5 import (
    AddressType,
    Command,
    Reply,
    Socks5Error,
    Socks5Request,
    encode_address,
    encode_request,
    parse_greeting,
    parse_reply,
    parse_request,
    parse_userpass,
    reply_for_refusal,
    serve_socks5,
)
from vtunnel.protocol import StreamMetadata

from .conftest import (
    DirectExit,
    Origin,
    body_for,
    direct_exit,
    direct_opener,
    loopback_dialer,
    on_leg,
    serve_front,
)

pytestmark = pytest.mark.anyio

CURL = shutil.which("curl") or "/usr/bin/curl"


def socks_front(exit_: DirectExit, **options: Any) -> AbstractAsyncContextManager[int]:
    return serve_front(on_leg(functools.partial(serve_socks5, opener=exit_.open, **options)))


async def _udp_socket() -> UDPSocket:
    return await anyio.create_udp_socket(family=socket.AF_INET, local_host="127.0.0.1")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _recv_exactly(stream: ByteStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        data += await stream.receive(n - len(data))
    return data


async def _recv_all(stream: ByteStream) -> bytes:
    parts = []
    try:
        while True:
            parts.append(await stream.receive())
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return b"".join(parts)


async def _raw_request(port: int, request: bytes) -> tuple[int, str, int]:
    """Greeting + request on a fresh connection; return the parsed reply."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(b"\x05\x01\x00")
        assert await _recv_exactly(stream, 2) == b"\x05\x00"
        await stream.send(request)
        data = b""
        while True:
            parsed = parse_reply(data)
            if parsed is not None:
                return parsed[0]
            data += await stream.receive()


async def _http_get(stream: ByteStream, host: str, path: str) -> bytes:
    """One HTTP/1.1 request with Connection: close; returns the body (origin replies with Content-Length)."""
    await stream.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    response = await _recv_all(stream)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:100]
    return body


# ---------------------------------------------------------------------------------------------- real clients


async def test_curl_socks5_hostname_fetch(origin: Origin) -> None:
    async with (
        direct_exit() as exit_,
        socks_front(exit_) as port,
    ):
        with anyio.fail_after(60):
            url = f"http://localhost:{origin.port}/bytes/300000"
            result = await anyio.run_process(
                [CURL, "-sS", "--max-time", "30", "--socks5-hostname", f"127.0.0.1:{port}", url]
            )
    assert result.stdout == body_for("/bytes/300000", 300000)
    # the name went unresolved to the exit side
    assert exit_.opened[0].authority == f"localhost:{origin.port}"
    assert exit_.opened[0].kind == "tcp"


async def test_curl_socks5_local_resolution_and_chunked(origin: Origin) -> None:
    async with (
        direct_exit() as exit_,
        socks_front(exit_) as port,
    ):
        with anyio.fail_after(60):
            url = f"http://127.0.0.1:{origin.port}/chunked/100000"
            result = await anyio.run_process(
                [CURL, "-sS", "--max-time", "30", "--socks5", f"127.0.0.1:{port}", url]
            )
    assert result.stdout == body_for("/chunked/100000", 100000)
    assert exit_.opened[0].authority == f"127.0.0.1:{origin.port}"


async def test_python_socks_with_password(origin: Origin) -> None:
    users = {"alice": "s3cret"}
    async with (
        direct_exit() as exit_,
        serve_front(on_leg(functools.partial(serve_socks5, opener=exit_.open, users=users))) as port,
    ):
        with anyio.fail_after(30):
            proxy = Proxy(ProxyType.SOCKS5, "127.0.0.1", port, username="alice", password="s3cret", rdns=True)
            stream = await proxy.connect("localhost", origin.port)
            async with stream:
                assert await _http_get(stream, "localhost", "/bytes/5000") == body_for("/bytes/5000", 5000)
            bad = Proxy(ProxyType.SOCKS5, "127.0.0.1", port, username="alice", password="wrong", rdns=True)
            with pytest.raises(ProxyError):
                await bad.connect("localhost", origin.port)
            anonymous = Proxy(ProxyType.SOCKS5, "127.0.0.1", port)
            with pytest.raises(ProxyError):
                await anonymous.connect("127.0.0.1", origin.port)
            # the listener still serves after the failures
            stream = await proxy.connect("127.0.0.1", origin.port)
            async with stream:
                assert await _http_get(stream, "x", "/bytes/10") == body_for("/bytes/10", 10)


async def test_ipv6_destination() -> None:
    try:
        listener = await anyio.create_tcp_listener(local_host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")

    async def echo(stream: SocketStream) -> None:
        async with stream:
            await stream.send(await stream.receive())

    async with listener, direct_exit() as exit_:
        port6 = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo)
            async with socks_front(exit_) as port:
                with anyio.fail_after(30):
                    stream = await Proxy(ProxyType.SOCKS5, "127.0.0.1", port).connect("::1", port6)
                    async with stream:
                        await stream.send(b"six")
                        assert await stream.receive() == b"six"
            tg.cancel_scope.cancel()
    assert exit_.opened[0].authority == f"[::1]:{port6}"


async def test_200_parallel_fetches(origin: Origin) -> None:
    async with (
        direct_exit() as exit_,
        socks_front(exit_) as port,
    ):
        proxy = Proxy(ProxyType.SOCKS5, "127.0.0.1", port, rdns=True)
        results: dict[int, bool] = {}

        async def fetch(i: int) -> None:
            path = f"/bytes/{1000 + i * 517}"
            stream = await proxy.connect("localhost", origin.port, timeout=30)
            async with stream:
                results[i] = await _http_get(stream, "localhost", path) == body_for(path, 1000 + i * 517)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(fetch, i)
    assert len(results) == 200
    assert all(results.values())


async def test_early_data_after_request_is_kept(origin: Origin) -> None:
    """A client that pipelines greeting, request and payload without waiting loses nothing."""
    async with (
        direct_exit() as exit_,
        socks_front(exit_) as port,
    ):
        with anyio.fail_after(30):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                http = b"GET /bytes/777 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                await stream.send(
                    b"\x05\x01\x00" + encode_request(Command.CONNECT, "127.0.0.1", origin.port) + http
                )
                data = await _recv_all(stream)
    assert data[:2] == b"\x05\x00"
    reply = parse_reply(data[2:])
    assert reply is not None
    assert reply[0][0] == Reply.SUCCEEDED
    assert data[2 + reply[1] :].endswith(b"\r\n\r\n" + body_for("/bytes/777", 777))


# ---------------------------------------------------------------------------------------------- reply codes


async def test_closed_port_gives_connection_refused() -> None:
    async with (
        direct_exit() as exit_,
        socks_front(exit_) as port,
    ):
        with anyio.fail_after(30):
            code, _, _ = await _raw_request(
                port, encode_request(Command.CONNECT, "127.0.0.1", _closed_port())
            )
    assert code == Reply.CONNECTION_REFUSED


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::ffff:127.0.0.1", "10.0.0.1"])
async def test_policy_forbidden_gives_not_allowed(host: str) -> None:
    strict = Dialer(ExitPolicy(), connect_timeout=5)
    async with (
        direct_exit(strict) as exit_,
        socks_front(exit_) as port,
    ):
        with anyio.fail_after(30):
            code, _, _ = await _raw_request(port, encode_request(Command.CONNECT, host, 80))
    assert code == Reply.NOT_ALLOWED


async def test_unresolvable_name_gives_host_unreachable() -> None:
    async with (
        direct_exit() as exit_,
        socks_front(exit_) as port,
    ):
        with anyio.fail_after(30):
            code, _, _ = await _raw_request(port, encode_request(Command.CONNECT, "name.invalid", 80))
    assert code == Reply.HOST_UNREACHABLE


@pytest.mark.parametrize(
    ("error", "reply"),
    [
        ("refused", Reply.CONNECTION_REFUSED),
        ("unreachable", Reply.HOST_UNREACHABLE),
        ("forbidden", Reply.NOT_ALLOWED),
        ("timeout", Reply.HOST_UNREACHABLE),
        ("failed", Reply.GENERAL_FAILURE),
        (None, Reply.GENERAL_FAILURE),
    ],
)
def test_refusal_mapping(error: str | None, reply: Reply) -> None:
    assert reply_for_refusal(error) == reply


@pytest.mark.parametrize(
    ("request_bytes", "reply"),
    [
        (encode_request(Command.BIND, "127.0.0.1", 80), Reply.COMMAND_NOT_SUPPORTED),
        (encode_request(0x09, "127.0.0.1", 80), Reply.COMMAND_NOT_SUPPORTED),
        (b"\x05\x01\x00\x07" + b"\x00" * 6, Reply.ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x05\x01\x00\x03\x03a b\x00\x50", Reply.GENERAL_FAILURE),
        (b"\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50", Reply.GENERAL_FAILURE),
        (b"\x05\x01\x00\x03\x01a" + struct.pack("!H", 0), Reply.GENERAL_FAILURE),
    ],
)
async def test_bad_requests_get_reply_codes(request_bytes: bytes, reply: Reply) -> None:
    async with (
        direct_exit() as exit_,
        socks_front(exit_) as port,
    ):
        with anyio.fail_after(30):
            code, _, _ = await _raw_request(port, request_bytes)
    assert code == reply
    assert exit_.opened == []


# ---------------------------------------------------------------------------------------------- garbage


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00",
        b"\x05\x00",
        b"\x05\x01\x00\x04\x01\x00\x00",  # request with a wrong version byte after the greeting
        b"\x05" + bytes(range(255)) * 10,
    ],
)
async def test_garbage_is_closed_and_listener_keeps_serving(origin: Origin, garbage: bytes) -> None:
    async with (
        direct_exit() as exit_,
        socks_front(exit_) as port,
    ):
        with anyio.fail_after(30):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(garbage)
                answer = await _recv_all(stream)
            assert len(answer) <= 2 + 10  # at most a method choice and a failure reply, then close
            stream = await Proxy(ProxyType.SOCKS5, "127.0.0.1", port).connect("127.0.0.1", origin.port)
            async with stream:
                assert await _http_get(stream, "x", "/bytes/99") == body_for("/bytes/99", 99)


async def test_no_acceptable_method() -> None:
    async with (
        direct_exit() as exit_,
        serve_front(on_leg(functools.partial(serve_socks5, opener=exit_.open, users={"u": "p"}))) as port,
    ):
        with anyio.fail_after(30):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"\x05\x01\x00")
                assert await _recv_all(stream) == b"\x05\xff"


async def test_silent_client_times_out() -> None:
    async with (
        direct_exit() as exit_,
        serve_front(
            on_leg(functools.partial(serve_socks5, opener=exit_.open, handshake_timeout=0.3))
        ) as port,
    ):
        with anyio.fail_after(30):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"\x05\x01")
                assert await _recv_all(stream) == b""


# ---------------------------------------------------------------------------------------------- UDP ASSOCIATE


async def test_udp_associate_round_trip() -> None:
    async with await anyio.create_udp_socket(family=socket.AF_INET, local_host="127.0.0.1") as echo:
        echo_port = echo.extra(anyio.abc.SocketAttribute.local_port)

        async def serve_echo() -> None:
            async for data, (host, port) in echo:
                await echo.sendto(data.upper(), host, port)

        async with (
            direct_exit() as exit_,
            socks_front(exit_) as port,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(serve_echo)
            with anyio.fail_after(30):
                control = await anyio.connect_tcp("127.0.0.1", port)
                await control.send(b"\x05\x01\x00")
                assert await _recv_exactly(control, 2) == b"\x05\x00"
                await control.send(encode_request(Command.UDP_ASSOCIATE, "0.0.0.0", 0))
                data = b""
                while (reply := parse_reply(data)) is None:
                    data += await control.receive()
                code, relay_host, relay_port = reply[0]
                assert code == Reply.SUCCEEDED
                assert relay_host == "127.0.0.1"
                async with await anyio.create_udp_socket(
                    family=socket.AF_INET, local_host="127.0.0.1"
                ) as udp:
                    for i in range(5):
                        payload = b"hello %d" % i
                        header = b"\x00\x00\x00" + encode_address("127.0.0.1", echo_port)
                        await udp.sendto(header + payload, relay_host, relay_port)
                        # also by name: resolved on the exit side
                        named = b"\x00\x00\x00" + encode_address("localhost", echo_port)
                        await udp.sendto(named + payload, relay_host, relay_port)
                        for _ in range(2):
                            answer, _ = await udp.receive()
                            assert answer == header + payload.upper()
                    # a fragment (FRAG != 0) is dropped
                    await udp.sendto(b"\x00\x00\x01" + header[3:] + b"frag", relay_host, relay_port)
                    await udp.sendto(header + b"after", relay_host, relay_port)
                    answer, _ = await udp.receive()
                    assert answer == header + b"AFTER"
                await control.aclose()
            tg.cancel_scope.cancel()
    assert [m.kind for m in exit_.opened] == ["udp"]


async def test_udp_to_forbidden_destination_is_dropped() -> None:
    strict = Dialer(ExitPolicy(), connect_timeout=5)
    async with await anyio.create_udp_socket(family=socket.AF_INET, local_host="127.0.0.1") as echo:
        echo_port = echo.extra(anyio.abc.SocketAttribute.local_port)
        async with (
            direct_exit(strict) as exit_,
            socks_front(exit_) as port,
        ):
            with anyio.fail_after(30):
                control = await anyio.connect_tcp("127.0.0.1", port)
                await control.send(b"\x05\x01\x00" + encode_request(Command.UDP_ASSOCIATE, "0.0.0.0", 0))
                data = b""
                while (reply := parse_reply(data[2:])) is None:
                    data += await control.receive()
                _, relay_host, relay_port = reply[0]
                async with await anyio.create_udp_socket(
                    family=socket.AF_INET, local_host="127.0.0.1"
                ) as udp:
                    header = b"\x00\x00\x00" + encode_address("127.0.0.1", echo_port)
                    await udp.sendto(header + b"x", relay_host, relay_port)
                    with anyio.move_on_after(0.5) as scope:
                        await echo.receive()
                    assert scope.cancelled_caught  # the exit never sent it
                await control.aclose()


# ---------------------------------------------------------------------------------------------- parsers

_domains = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?(\.[a-z0-9]{1,10}){0,4}", fullmatch=True)
_hosts = st.one_of(
    _domains, st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(lambda a: str(ipaddress.ip_address(a)))
)


@given(st.sampled_from(list(Command)), _hosts, st.integers(1, 65535), st.binary(max_size=20))
def test_request_round_trip_byte_by_byte(command: Command, host: str, port: int, trailing: bytes) -> None:
    wire = encode_request(command, host, port)
    for i in range(len(wire)):
        assert parse_request(wire[:i]) is None
    parsed = parse_request(wire + trailing)
    assert parsed is not None
    request, consumed = parsed
    assert consumed == len(wire)
    assert request.command == command
    assert request.port == port
    assert request.host == host
    expected_type = (
        AddressType.DOMAIN
        if not _is_ip(host)
        else (AddressType.IPV4 if ipaddress.ip_address(host).version == 4 else AddressType.IPV6)
    )
    assert request.address_type == expected_type
    assert isinstance(request, Socks5Request)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@given(st.binary(max_size=300))
def test_request_parser_only_raises_socks5_error(data: bytes) -> None:
    try:
        result = parse_request(data)
    except Socks5Error:
        return
    if result is not None:
        request, consumed = result
        assert 0 < consumed <= len(data)
        assert 0 <= request.port <= 65535


@given(st.binary(max_size=300))
def test_greeting_and_userpass_parsers_only_raise_socks5_error(data: bytes) -> None:
    for parser in (parse_greeting, parse_userpass):
        try:
            result = parser(data)
        except Socks5Error:
            continue
        if result is not None:
            assert 0 < result[1] <= len(data)


@given(st.binary(max_size=255), st.binary(max_size=255))
def test_userpass_round_trip(user: bytes, password: bytes) -> None:
    wire = bytes([1, len(user)]) + user + bytes([len(password)]) + password
    for i in range(len(wire)):
        assert parse_userpass(wire[:i]) is None
    assert parse_userpass(wire + b"tail") == ((user, password), len(wire))


async def test_failing_opener_does_not_stop_the_listener(origin: Origin) -> None:
    calls = 0

    async def flaky(metadata: StreamMetadata) -> Leg:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("opener bug")
        return await direct_opener(loopback_dialer())(metadata)

    async with serve_front(on_leg(functools.partial(serve_socks5, opener=flaky))) as port:
        with anyio.fail_after(30):
            with pytest.raises(ProxyError):
                await Proxy(ProxyType.SOCKS5, "127.0.0.1", port).connect("127.0.0.1", origin.port)
            stream = await Proxy(ProxyType.SOCKS5, "127.0.0.1", port).connect("127.0.0.1", origin.port)
            async with stream:
                assert await _http_get(stream, "x", "/bytes/42") == body_for("/bytes/42", 42)


async def test_garbage_does_not_disturb_a_running_transfer(origin: Origin) -> None:
    async with direct_exit() as exit_, socks_front(exit_) as port:
        with anyio.fail_after(60):
            proxy = Proxy(ProxyType.SOCKS5, "127.0.0.1", port)
            stream = await proxy.connect("127.0.0.1", origin.port)
            async with stream, anyio.create_task_group() as tg:
                result: list[bytes] = []

                async def fetch() -> None:
                    result.append(await _http_get(stream, "x", "/bytes/2000000"))

                tg.start_soon(fetch)
                for garbage in (b"\x00" * 100, b"\x05\x01\x00\x05\x01\x00\x09", b"GET / HTTP/1.0\r\n\r\n"):
                    async with await anyio.connect_tcp("127.0.0.1", port) as bad:
                        await bad.send(garbage)
                        await _recv_all(bad)
            assert result == [body_for("/bytes/2000000", 2000000)]
