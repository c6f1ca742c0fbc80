"""The PROXY protocol header reader (``vtunnel.security.proxy_header``): v1 and v2 as HAProxy writes them, fed in
every split the reader allows, never a byte past the header; anything else refused."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtunnel.security.proxy_header import (
    V1_MAX,
    V2_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
)


def v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    family = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    *,
    command: int = 1,
    tlvs: bytes = b"",
) -> bytes:
    if source is None or destination is None:
        body, family = b"", 0x00
    else:
        src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
        family = 0x11 if src.version == 4 else 0x21
        body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    body += tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def read(data: bytes, splits: list[int] | None = None) -> tuple[ProxyHeader | None, int]:
    """Feed ``data`` as the reader asks (the sizes it wants, cut further by ``splits``): the header and the bytes
    it took."""
    reader = ProxyHeaderReader()
    taken = 0
    cuts = iter(splits or [])
    while reader.header is None and taken < len(data):
        size = reader.wanted()
        assert size > 0
        size = min(size, max(1, next(cuts, size)))
        header = reader.feed(data[taken : taken + size])
        taken += len(data[taken : taken + size])
        if header is not None:
            return header, taken
    return reader.header, taken


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@given(
    st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)),
    ports,
    ports,
    st.binary(max_size=64),
    st.lists(st.integers(1, 40), max_size=20),
)
def test_v1_is_read_whole_and_not_a_byte_more(
    hosts: tuple[str, str], sport: int, dport: int, after: bytes, splits: list[int]
) -> None:
    header = v1((hosts[0], sport), (hosts[1], dport))
    parsed, taken = read(header + after, splits)
    assert parsed == ProxyHeader(
        version=1, source=(hosts[0], sport), destination=(hosts[1], dport), length=len(header)
    )
    assert taken == len(header)


@given(
    st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)),
    ports,
    ports,
    st.binary(max_size=200),
    st.binary(max_size=64),
    st.lists(st.integers(1, 40), max_size=20),
)
def test_v2_is_read_whole_with_its_tlvs_and_not_a_byte_more(
    hosts: tuple[str, str], sport: int, dport: int, tlvs: bytes, after: bytes, splits: list[int]
) -> None:
    header = v2((hosts[0], sport), (hosts[1], dport), tlvs=tlvs)
    parsed, taken = read(header + after, splits)
    assert parsed == ProxyHeader(
        version=2, source=(hosts[0], sport), destination=(hosts[1], dport), length=len(header)
    )
    assert taken == len(header)


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        v2(None, None, command=0),  # LOCAL: the balancer's own health check
        v2(("10.0.0.1", 1), ("10.0.0.2", 2), command=0),  # LOCAL with addresses: they are ignored
        V2_SIGNATURE + bytes([0x21, 0x31]) + struct.pack("!H", 216) + bytes(216),  # a UNIX socket's
    ],
)
def test_headers_that_name_no_client(header: bytes) -> None:
    parsed, taken = read(header + b"next")
    assert parsed is not None
    assert parsed.source is None
    assert taken == len(header)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "does not begin with a PROXY protocol header"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), "does not begin with a PROXY"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n" + bytes(100), "longer than 107"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "PROXY TCP4|TCP6"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "PROXY TCP4|TCP6"),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "PROXY TCP4|TCP6"),
        (b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n", "not an IP address"),
        (b"PROXY TCP4 ::1 ::2 1 2\r\n", "an IPv6 address in a TCP4 line"),
        (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "an IPv4 address in a TCP6 line"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "not a port"),
        (V2_SIGNATURE + bytes([0x10, 0x11, 0, 12]) + bytes(12), "version 1"),
        (V2_SIGNATURE + bytes([0x22, 0x11, 0, 12]) + bytes(12), "command 2"),
        (V2_SIGNATURE + bytes([0x21, 0x41, 0, 12]) + bytes(12), "are not defined"),
        (V2_SIGNATURE + bytes([0x21, 0x11, 0, 11]) + bytes(11), "too short for its addresses"),
        (V2_SIGNATURE + bytes([0x21, 0x21, 0, 12]) + bytes(12), "too short for its addresses"),
        (V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", V2_MAX), "at most"),
    ],
)
def test_what_is_not_a_header_is_refused(data: bytes, error: str) -> None:
    with pytest.raises(ProxyHeaderError, match=error):
        read(data)


@given(st.binary(min_size=1, max_size=300))
def test_any_bytes_give_a_header_an_error_or_a_wish_for_more_and_never_overread(data: bytes) -> None:
    reader = ProxyHeaderReader()
    taken = 0
    try:
        while reader.header is None and taken < len(data):
            size = reader.wanted()
            assert 0 < size <= V2_MAX
            piece = data[taken : taken + size]
            reader.feed(piece)
            taken += len(piece)
    except ProxyHeaderError:
        return
    assert taken <= max(V1_MAX, V2_MAX)
    if reader.header is not None:
        assert reader.header.length == taken
        assert reader.wanted() == 0


def test_feeding_more_than_wanted_is_refused() -> None:
    with pytest.raises(ProxyHeaderError, match="more bytes"):
        ProxyHeaderReader().feed(b"PROXY UNKNOWN\r\nX")
