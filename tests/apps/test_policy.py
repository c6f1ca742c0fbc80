"""Exit policy: private ranges, embedded IPv4, allow/deny lists."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtunnel.apps.policy import ExitPolicy, PolicyDenied, is_public_address, normalize_address

NON_PUBLIC = [
    "127.0.0.1",
    "127.255.255.254",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "100.64.0.1",
    "169.254.169.254",
    "0.0.0.0",
    "0.1.2.3",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.1",
    "198.18.0.1",
    "::",
    "::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:192.168.0.1",
    "::127.0.0.1",
    "64:ff9b::7f00:1",
    "2002:7f00:1::1",
    "2002:a00:1::1",
    "fe80::1",
    "fc00::1",
    "fd12:3456::1",
    "ff02::1",
    "2001:db8::1",
    "fec0::1",
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_non_public_addresses_refused_by_default(address: str) -> None:
    assert not is_public_address(address)
    with pytest.raises(PolicyDenied):
        ExitPolicy().check_address(address)
    with pytest.raises(PolicyDenied):
        ExitPolicy().check_host(address if ":" not in address else f"[{address}]")
    ExitPolicy(allow_private=True).check_address(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_allowed(address: str) -> None:
    assert is_public_address(address)
    ExitPolicy().check_address(address)
    ExitPolicy().check_host(address)


def test_ipv4_mapped_is_unwrapped() -> None:
    assert normalize_address("::ffff:127.0.0.1") == ipaddress.IPv4Address("127.0.0.1")
    with pytest.raises(PolicyDenied):
        ExitPolicy(deny=["8.8.8.0/24"]).check_address("::ffff:8.8.8.8")


def test_scoped_address_is_refused() -> None:
    with pytest.raises(PolicyDenied):
        ExitPolicy(allow_private=True).check_address("fe80::1%lo")


@pytest.mark.parametrize("name", ["localhost", "LOCALHOST", "localhost.", "a.b.localhost"])
def test_localhost_names_refused_before_resolution(name: str) -> None:
    with pytest.raises(PolicyDenied):
        ExitPolicy().check_host(name)
    ExitPolicy(allow_private=True).check_host(name)


def test_deny_wins_over_allow() -> None:
    policy = ExitPolicy(allow_private=True, allow=["*.example.com", "10.0.0.0/8"], deny=["bad.example.com"])
    policy.check_host("good.example.com")
    policy.check_host("example.com")
    with pytest.raises(PolicyDenied):
        policy.check_host("bad.example.com")
    policy = ExitPolicy(allow=["10.0.0.0/8"], deny=["10.1.0.0/16"])
    policy.check_address("10.2.3.4")
    with pytest.raises(PolicyDenied):
        policy.check_address("10.1.3.4")


def test_allow_list_is_exclusive() -> None:
    policy = ExitPolicy(allow=["*.example.com"])
    policy.check_host("www.example.com")
    with pytest.raises(PolicyDenied):
        policy.check_host("example.org")
    policy.check_address("93.184.216.34", host="www.example.com")
    with pytest.raises(PolicyDenied):
        policy.check_address("93.184.216.34", host="other.org")
    with pytest.raises(PolicyDenied):
        policy.check_address("93.184.216.34")


def test_allowed_name_does_not_lift_private_block() -> None:
    policy = ExitPolicy(allow=["*.example.com"])
    with pytest.raises(PolicyDenied):
        policy.check_address("127.0.0.1", host="rebind.example.com")


def test_allowed_network_lifts_private_block() -> None:
    policy = ExitPolicy(allow=["127.0.0.0/8", "::ffff:10.0.0.0/104"])
    policy.check_address("127.0.0.1")
    policy.check_address("::ffff:127.0.0.2")
    policy.check_address("10.9.9.9")
    with pytest.raises(PolicyDenied):
        policy.check_address("::1")
    with pytest.raises(PolicyDenied):
        policy.check_address("8.8.8.8")


def test_suffix_pattern_is_label_aligned() -> None:
    policy = ExitPolicy(deny=["*.example.com"])
    policy.check_host("notexample.com")
    with pytest.raises(PolicyDenied):
        policy.check_host("a.Example.COM.")


@pytest.mark.parametrize("entry", ["", "*.", "bad host", "-x.com", "a..b"])
def test_invalid_entries_rejected(entry: str) -> None:
    with pytest.raises(ValueError, match="invalid host name pattern"):
        ExitPolicy(deny=[entry])


def test_string_instead_of_sequence_rejected() -> None:
    with pytest.raises(TypeError):
        ExitPolicy(allow="10.0.0.0/8")


@pytest.mark.parametrize("host", ["", "bad host", "a/b", "x" * 300])
def test_invalid_host_names_refused(host: str) -> None:
    with pytest.raises(PolicyDenied):
        ExitPolicy().check_host(host)


@given(st.ip_addresses())
def test_default_policy_agrees_with_is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    policy = ExitPolicy()
    if is_public_address(address):
        policy.check_address(address)
    else:
        with pytest.raises(PolicyDenied):
            policy.check_address(address)
    ExitPolicy(allow_private=True).check_address(address)


@given(st.ip_addresses(v=4))
def test_mapped_form_gets_the_same_verdict(address: ipaddress.IPv4Address) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    assert is_public_address(mapped) == is_public_address(address)
