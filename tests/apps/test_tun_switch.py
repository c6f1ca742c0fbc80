"""The server's IP-mode switch between real tunnels (tcp on 127.0.0.1), without a device: agents' addresses in the
SYN-ACK, packets between agents, a spoofed source dropped, --tun-isolate, the exit policy, and an agent that comes
back on a new tunnel getting its address (and its old stream closed)."""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.abc import ByteStream

from vtunnel.apps.policy import ExitPolicy
from vtunnel.apps.tun import ADDRESS_HEADER, ID_HEADER, MTU_HEADER, TunServerSettings, TunSwitch, parse_pools
from vtunnel.protocol import Role, StreamMetadata, TunnelConfig
from vtunnel.runtime.byte_stream import TunnelByteStream
from vtunnel.runtime.connection import TunnelConnection
from vtunnel.runtime.tunnel_stream import TunnelStream
from vtunnel.transports.link import StreamLink

pytestmark = pytest.mark.anyio

TUN = TunnelConfig(tun=True)


def packet(src: str, dst: str, payload: bytes = b"x") -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0,
                         ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)  # fmt: skip
    return header + payload


class Agents:
    """Tunnels to one switch; each :meth:`join` is a new tunnel and a ``tun`` stream naming ``identity``."""

    def __init__(self, switch: TunSwitch, port: int, tg: anyio.abc.TaskGroup) -> None:
        self.switch = switch
        self.port = port
        self.tg = tg

    async def join(self, identity: str) -> tuple[TunnelByteStream, str]:
        raw = await anyio.connect_tcp("127.0.0.1", self.port)
        conn = TunnelConnection(StreamLink(raw), role=Role.CLIENT, config=TUN, name=identity)
        self.tg.start_soon(conn.run)
        await conn.wait_ready()
        stream = await conn.open_stream(StreamMetadata(kind="tun", headers=((ID_HEADER, identity),)))
        headers = dict(stream.accept_headers)
        assert int(headers[MTU_HEADER]) == 1500  # a byte stream: the reliable path's MTU
        return TunnelByteStream(stream), headers[ADDRESS_HEADER].split("/")[0]


@asynccontextmanager
async def switch_of(
    settings: TunServerSettings, policy: ExitPolicy | None = None, *, user: str | None = None
) -> AsyncIterator[Agents]:
    """The switch behind a server that accepts tunnels on 127.0.0.1 (each one's peer having used ``user``'s key)."""
    switch = TunSwitch(settings, policy or ExitPolicy())
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def handler(stream: TunnelStream) -> None:
        switch.serve(stream)

    async with anyio.create_task_group() as tg:

        async def on_accept(stream: ByteStream) -> None:
            await TunnelConnection(
                StreamLink(stream), role=Role.SERVER, config=TUN, handler=handler, user=user
            ).run()

        tg.start_soon(listener.serve, on_accept)
        with anyio.fail_after(20):
            yield Agents(switch, port, tg)
        switch.close()
        tg.cancel_scope.cancel()
    await listener.aclose()


SETTINGS = TunServerSettings(pools=parse_pools(["10.77.0.0/24"]))


async def test_packets_between_agents_and_a_spoofed_source_dropped() -> None:
    async with switch_of(SETTINGS) as agents:
        a, a_addr = await agents.join("a")
        b, b_addr = await agents.join("b")
        assert {a_addr, b_addr} == {"10.77.0.2", "10.77.0.3"}
        await a.send(packet("10.77.0.99", b_addr, b"spoofed"))
        await a.send(packet(a_addr, b_addr, b"legit"))
        assert await b.receive() == packet(a_addr, b_addr, b"legit")  # whole, and only it
        await b.send(packet(b_addr, a_addr, b"back"))
        assert await a.receive() == packet(b_addr, a_addr, b"back")
        assert agents.switch.dropped_spoofed == 1
        assert agents.switch.forwarded == 2


async def test_isolated_agents_do_not_reach_each_other() -> None:
    isolated = TunServerSettings(pools=SETTINGS.pools, client_to_client=False)
    async with switch_of(isolated) as agents:
        a, a_addr = await agents.join("a")
        _b, b_addr = await agents.join("b")
        await a.send(packet(a_addr, b_addr))
        while not agents.switch.dropped_forbidden:
            await anyio.sleep(0.01)
        assert agents.switch.forwarded == 0


async def test_the_exit_policy_applies_to_the_outside_not_to_the_server() -> None:
    policy = ExitPolicy(deny=["203.0.113.0/24"])
    async with switch_of(SETTINGS, policy) as agents:
        a, a_addr = await agents.join("a")
        for destination in ("10.77.0.1", "192.168.1.1", "203.0.113.5"):
            await a.send(packet(a_addr, destination))
        while agents.switch.dropped_policy < 2:  # private and denied; the server's own address passes
            await anyio.sleep(0.01)
        await anyio.sleep(0.05)
        assert agents.switch.dropped_policy == 2


async def test_an_agent_back_on_a_new_tunnel_gets_its_address() -> None:
    async with switch_of(SETTINGS) as agents:
        first, address = await agents.join("a")
        _other, other_addr = await agents.join("b")
        again, address2 = await agents.join("a")
        assert address2 == address
        with pytest.raises(anyio.BrokenResourceError):
            await first.receive()  # the stale stream was closed
        await _other.send(packet(other_addr, address))
        assert await again.receive() == packet(other_addr, address)
        assert agents.switch.agents == 2


async def test_under_per_user_keys_an_agent_gets_its_users_address_whatever_it_calls_itself() -> None:
    """A restarted agent names a new identity; under per-user keys it still gets its user's address (and the
    stale stream of its old process is closed); without, each identity has its own."""
    async with switch_of(dataclasses.replace(SETTINGS, by_user=True), user="alice") as agents:
        old, address = await agents.join("process-1")
        _new, address2 = await agents.join("process-2")
        assert address2 == address
        with pytest.raises(anyio.BrokenResourceError):
            await old.receive()
        assert agents.switch.agents == 1
    async with switch_of(SETTINGS, user="alice") as agents:
        _, a = await agents.join("process-1")
        _, b = await agents.join("process-2")
        assert a != b
        assert agents.switch.agents == 2
