"""Dialer: authority parsing (property tests), policy-checked resolution, error codes, happy eyeballs."""

from __future__ import annotations

import ipaddress
import socket

import anyio
import pytest
from anyio.abc import SocketAttribute
from hypothesis import given
from hypothesis import strategies as st

from vtunnel.apps.dialer import Dialer, DialError, format_authority, interleave_families, parse_authority
from vtunnel.apps.policy import ExitPolicy, IPAddress

pytestmark = pytest.mark.anyio


# -- authority parsing --------------------------------------------------------------------------------------

hostnames = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True)
ports = st.integers(min_value=1, max_value=65535)


@given(hostnames, ports)
def test_name_authority_round_trip(host: str, port: int) -> None:
    assert parse_authority(format_authority(host, port)) == (host, port)


@given(st.ip_addresses(v=6), ports)
def test_ipv6_authority_round_trip(addr: ipaddress.IPv6Address, port: int) -> None:
    assert parse_authority(f"[{addr.exploded}]:{port}") == (str(addr), port)
    assert parse_authority(format_authority(str(addr), port)) == (str(addr), port)


@given(st.ip_addresses(v=4), ports)
def test_ipv4_authority_round_trip(addr: ipaddress.IPv4Address, port: int) -> None:
    assert parse_authority(f"{addr}:{port}") == (str(addr), port)


@given(st.text(max_size=40))
def test_parse_authority_only_raises_value_error(text: str) -> None:
    try:
        host, port = parse_authority(text)
    except ValueError:
        return
    assert 1 <= port <= 65535
    assert host
    assert not any(c.isspace() for c in host)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "example.com",
        "example.com:",
        ":80",
        "example.com:0",
        "example.com:65536",
        "example.com:+80",
        "example.com:\uff18\uff10",
        "::1:80",
        "[::1]",
        "[::1]80",
        "[not-v6]:80",
        "[fe80::1%eth0]:80",
        "a b:80",
        "user@host:80",
        "host/path:80",
        "host:80:80",
    ],
)
def test_invalid_authorities(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - every failure is a ValueError with its own message
        parse_authority(text)


def test_interleave_families() -> None:
    v4 = [ipaddress.ip_address(f"192.0.2.{i}") for i in range(1, 4)]
    v6 = [ipaddress.ip_address(f"2001:db8::{i}") for i in range(1, 3)]
    assert interleave_families([v6[0], v6[1], v4[0], v4[1], v4[2]]) == [v6[0], v4[0], v6[1], v4[1], v4[2]]
    assert interleave_families([v4[0], v6[0]]) == [v4[0], v6[0]]
    assert interleave_families([]) == []


# -- dialing ------------------------------------------------------------------------------------------------


async def test_dial_connects_with_nodelay() -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(SocketAttribute.local_port)

        async def serve() -> None:
            async def handle(stream: anyio.abc.SocketStream) -> None:
                async with stream:
                    await stream.send(await stream.receive())

            await listener.serve(handle)

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            dialer = Dialer(ExitPolicy(allow_private=True))
            with anyio.fail_after(10):
                stream = await dialer.dial(f"127.0.0.1:{port}")
                async with stream:
                    sock = stream.extra(SocketAttribute.raw_socket)
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                    await stream.send(b"ping")
                    assert await stream.receive() == b"ping"
            tg.cancel_scope.cancel()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_closed_port_is_refused() -> None:
    with pytest.raises(DialError) as info, anyio.fail_after(10):
        await Dialer(ExitPolicy(allow_private=True)).dial(f"127.0.0.1:{_closed_port()}")
    assert info.value.error == "refused"


@pytest.mark.parametrize("authority", ["127.0.0.1:80", "[::1]:80", "[::ffff:127.0.0.1]:80", "localhost:80"])
async def test_loopback_is_forbidden_by_default(authority: str) -> None:
    with pytest.raises(DialError) as info, anyio.fail_after(10):
        await Dialer(ExitPolicy()).dial(authority)
    assert info.value.error == "forbidden"


async def test_name_resolving_to_loopback_is_checked_after_resolution() -> None:
    # The pre-resolution name check is lifted by the allow list entry for the name; the resolved loopback
    # address is still refused, because a name never lifts the private-address rule.
    dialer = Dialer(ExitPolicy(allow=["localhost"]))
    with pytest.raises(DialError) as info, anyio.fail_after(10):
        await dialer.resolve("localhost", 80)
    assert info.value.error == "forbidden"
    addresses = await Dialer(ExitPolicy(allow_private=True)).resolve("localhost", 80)
    assert ipaddress.ip_address("127.0.0.1") in addresses


async def test_bad_authority_fails() -> None:
    with pytest.raises(DialError) as info:
        await Dialer(ExitPolicy()).dial("no-port")
    assert info.value.error == "failed"


async def test_unresolvable_name_is_unreachable() -> None:
    with pytest.raises(DialError) as info, anyio.fail_after(30):
        await Dialer(ExitPolicy()).dial("name.invalid:80")
    assert info.value.error == "unreachable"


class PinnedDialer(Dialer):
    """A dialer whose names resolve to ``addresses``, in that order (the race between them is what is tested)."""

    def __init__(self, addresses: list[IPAddress]) -> None:
        super().__init__(ExitPolicy(allow_private=True), connect_timeout=10)
        self._addresses = addresses

    async def resolve(self, host: str, port: int, *, udp: bool = False) -> list[IPAddress]:
        return self._addresses


async def test_happy_eyeballs_falls_back_past_a_refused_address() -> None:
    closed = _closed_port()
    async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=closed) as listener:
        del listener  # only the port number is used: ::1 refuses it and 127.0.0.1 accepts
        dialer = PinnedDialer([ipaddress.ip_address("::1"), ipaddress.ip_address("127.0.0.1")])
        with anyio.fail_after(10):
            try:
                stream = await dialer.dial(f"pinned.test:{closed}")
            except DialError:
                pytest.skip("::1 is bound to the same port here")
            async with stream:
                assert stream.extra(SocketAttribute.remote_address)[0] == "127.0.0.1"


def test_invalid_timeout() -> None:
    with pytest.raises(ValueError, match="connect_timeout"):
        Dialer(ExitPolicy(), connect_timeout=0)


async def test_happy_eyeballs_starts_the_next_attempt_while_one_hangs() -> None:
    """127.0.0.1 never answers the SYN (full accept queue); the staggered attempt to 127.0.0.2 wins."""
    with socket.socket() as stuck, socket.socket() as filler, socket.socket() as good:
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(0)
        port = stuck.getsockname()[1]
        filler.connect(("127.0.0.1", port))  # fills the accept queue: further SYNs are dropped
        try:
            good.bind(("127.0.0.2", port))
        except OSError:
            pytest.skip("127.0.0.2 is not usable here")
        good.listen(8)
        dialer = PinnedDialer([ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("127.0.0.2")])
        with anyio.fail_after(8):
            stream = await dialer.dial(f"pinned.test:{port}")
        async with stream:
            assert stream.extra(SocketAttribute.remote_address)[0] == "127.0.0.2"


async def test_connect_timeout_gives_timeout() -> None:
    with socket.socket() as stuck, socket.socket() as filler:
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(0)
        port = stuck.getsockname()[1]
        filler.connect(("127.0.0.1", port))
        dialer = Dialer(ExitPolicy(allow_private=True), connect_timeout=0.5)
        with anyio.fail_after(8), pytest.raises(DialError) as info:
            await dialer.dial(f"127.0.0.1:{port}")
    assert info.value.error == "timeout"
