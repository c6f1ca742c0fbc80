"""IP mode's pieces that need no device: the address pools, the --tun options, and the packet header reader."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtunnel.apps.tun import AddressPool, PoolExhausted, TunServerSettings, packet_addresses, parse_pools
from vtunnel.cli_tun import agent_tun_settings, server_tun_settings


def test_the_server_takes_the_first_address_and_agents_the_next_ones() -> None:
    pool = AddressPool(ipaddress.ip_network("10.77.0.0/24"))
    assert str(pool.server) == "10.77.0.1/24"
    assert str(pool.lease("a", 0.0)) == "10.77.0.2/24"
    assert str(pool.lease("b", 0.0)) == "10.77.0.3/24"
    assert str(pool.lease("a", 1.0)) == "10.77.0.2/24"  # the same agent again: its address


def test_a_lease_waits_for_its_agent_then_goes_to_another() -> None:
    pool = AddressPool(ipaddress.ip_network("10.77.0.0/30"), lease_time=10.0)  # room for one agent
    assert str(pool.lease("a", 0.0)) == "10.77.0.2/30"
    with pytest.raises(PoolExhausted):
        pool.lease("b", 0.0)
    pool.release("a", 0.0)
    with pytest.raises(PoolExhausted):
        pool.lease("b", 5.0)  # still a's while it may be reconnecting
    assert str(pool.lease("a", 6.0)) == "10.77.0.2/30"  # a came back in time
    pool.release("a", 6.0)
    assert str(pool.lease("b", 17.0)) == "10.77.0.2/30"  # a's lease ran out
    with pytest.raises(PoolExhausted):
        pool.lease("a", 18.0)  # too late: b has it now


def test_an_ipv6_pool() -> None:
    pool = AddressPool(ipaddress.ip_network("fd77::/64"))
    assert str(pool.server) == "fd77::1/64"
    assert str(pool.lease("a", 0.0)) == "fd77::2/64"


@pytest.mark.parametrize(
    ("texts", "error"),
    [
        (["10.77.0.0/24", "10.78.0.0/24"], "one IPv4 pool"),
        (["10.77.0.0/31"], "too small"),
        (["nonsense"], "not a network"),
    ],
)
def test_bad_pools(texts: list[str], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_pools(texts)


def test_options() -> None:
    assert server_tun_settings({}) is None
    settings = server_tun_settings(
        {"tun_pools": ("10.77.0.5/24", "fd77::/64"), "tun_isolate": True, "tun_dev": "vt%d"}
    )
    assert settings is not None
    assert [str(p) for p in settings.pools] == ["10.77.0.0/24", "fd77::/64"]
    assert (settings.client_to_client, settings.nat, settings.device) == (False, False, "vt%d")
    with pytest.raises(ValueError, match="need --tun"):
        server_tun_settings({"tun_nat": True})
    with pytest.raises(ValueError, match="out of"):
        TunServerSettings(pools=parse_pools(["fd77::/64"]), mtu=1000)  # IPv6 needs 1280
    # the config file's settings, under the command line's
    from_file = server_tun_settings(
        {"tun_pools": ()}, {"tun": "10.9.0.0/24", "tun_nat": True, "tun_dev": "x%d"}
    )
    assert from_file is not None
    assert ([str(p) for p in from_file.pools], from_file.nat, from_file.device) == (
        ["10.9.0.0/24"],
        True,
        "x%d",
    )
    both = server_tun_settings(
        {"tun_pools": ("10.8.0.0/24",), "tun_dev": "y0"}, {"tun": ["10.9.0.0/24"], "tun_dev": "x0"}
    )
    assert both is not None
    assert ([str(p) for p in both.pools], both.device) == (["10.8.0.0/24"], "y0")
    agent_file = agent_tun_settings({"tun_on": False}, {"tun": True, "tun_route": ["10.1.0.0/16"]})
    assert agent_file is not None
    assert [str(r) for r in agent_file.routes] == ["10.1.0.0/16"]
    assert agent_tun_settings({"tun_on": False}) is None
    agent = agent_tun_settings({"tun_on": True, "tun_route": ("10.9.0.0/16",), "tun_mtu": 1400})
    assert agent is not None
    assert ([str(r) for r in agent.routes], agent.mtu) == (["10.9.0.0/16"], 1400)
    with pytest.raises(ValueError, match="needs --tun"):
        agent_tun_settings({"tun_route": ("10.9.0.0/16",)})


def _ipv4(src: str, dst: str) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20, 0, 0, 64, 17, 0, ipaddress.ip_address(src).packed,
                       ipaddress.ip_address(dst).packed)  # fmt: skip


def test_packet_addresses() -> None:
    assert packet_addresses(_ipv4("10.77.0.2", "10.77.0.3")) == (
        ipaddress.ip_address("10.77.0.2").packed,
        ipaddress.ip_address("10.77.0.3").packed,
    )
    v6 = (
        bytes([0x60])
        + bytes(7)
        + ipaddress.ip_address("fd77::2").packed
        + ipaddress.ip_address("fd77::1").packed
    )
    assert packet_addresses(v6) == (
        ipaddress.ip_address("fd77::2").packed,
        ipaddress.ip_address("fd77::1").packed,
    )
    assert packet_addresses(b"") is None
    assert packet_addresses(_ipv4("1.2.3.4", "5.6.7.8")[:19]) is None
    assert packet_addresses(v6[:39]) is None


@given(st.binary(max_size=64))
def test_packet_addresses_never_fails(data: bytes) -> None:
    got = packet_addresses(data)
    if got is not None:
        size = 4 if data[0] >> 4 == 4 else 16
        assert len(got[0]) == len(got[1]) == size


@given(
    st.lists(
        st.tuples(st.sampled_from(["lease", "release"]), st.integers(0, 7), st.floats(0, 5)),
        max_size=60,
    )
)
def test_a_pool_never_gives_one_address_to_two_present_agents(ops: list[tuple[str, int, float]]) -> None:
    """Any order of arrivals and departures: present agents hold distinct addresses, never the server's, and an
    agent keeps its address as long as nobody took it after its lease ran out."""
    pool = AddressPool(ipaddress.ip_network("10.77.0.0/29"), lease_time=3.0)  # room for 5 agents
    present: dict[int, ipaddress.IPv4Interface | ipaddress.IPv6Interface] = {}
    had: dict[int, ipaddress.IPv4Interface | ipaddress.IPv6Interface] = {}
    now = 0.0
    for op, agent, step in ops:
        now += step
        if op == "lease":
            try:
                address = pool.lease(str(agent), now)
            except PoolExhausted:
                assert len(had) >= 5  # only once five agents hold or wait for the five addresses
                continue
            if agent in present:
                assert address == present[agent]
            present[agent] = had[agent] = address
        elif agent in present:
            pool.release(str(agent), now)
            del present[agent]
        addresses = list(present.values())
        assert len(set(addresses)) == len(addresses)
        assert pool.server not in addresses
