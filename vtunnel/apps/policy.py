"""Exit policy: which destinations the server's exit side may connect to.

Rules, in order:

1. ``deny`` wins: a host name matching a denied name pattern, or an address inside a denied
   network, is refused.
2. When ``allow`` is not empty it is an allow-list: a destination must match one of its entries
   (a name pattern for the requested host name, or a network for the address it resolved to).
3. Unless ``allow_private`` is set, addresses that are not public are refused: loopback, private
   (RFC 1918, unique local), carrier-grade NAT, link-local, multicast, unspecified, reserved,
   broadcast, documentation and benchmarking ranges, and the same ranges embedded in IPv6
   (IPv4-mapped, IPv4-compatible, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``, Teredo).  An address
   inside an explicitly allowed *network* is let through anyway (an operator who writes
   ``allow=["10.0.0.0/8"]`` means it); a name pattern never lifts this rule, so a public name
   resolving to a private address (DNS rebinding) stays refused.

Name patterns are either an exact name (``example.com``) or ``*.suffix`` (``*.example.com``),
which matches the suffix itself and every name below it.  Names compare case-insensitively,
ignoring a trailing dot.

``check_host`` runs on the requested host before any resolution; ``check_address`` runs on each
resolved address before connecting to it.  Both raise ``PolicyDenied``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["ExitPolicy", "PolicyDenied", "is_public_address", "normalize_address"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class PolicyDenied(Exception):
    """The exit policy refuses this destination."""

    def __init__(self, target: str, reason: str) -> None:
        super().__init__(f"destination {target!r} refused by the exit policy: {reason}")
        self.target = target
        self.reason = reason


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPAT = ipaddress.IPv6Network("::/96")
_EXTRA_NON_PUBLIC_V4 = (
    ipaddress.IPv4Network("0.0.0.0/8"),
    ipaddress.IPv4Network("100.64.0.0/10"),
    ipaddress.IPv4Network("192.0.0.0/24"),
    ipaddress.IPv4Network("192.0.2.0/24"),
    ipaddress.IPv4Network("198.18.0.0/15"),
    ipaddress.IPv4Network("198.51.100.0/24"),
    ipaddress.IPv4Network("203.0.113.0/24"),
    ipaddress.IPv4Network("240.0.0.0/4"),
    ipaddress.IPv4Network("255.255.255.255/32"),
)
_EXTRA_NON_PUBLIC_V6 = (
    ipaddress.IPv6Network("100::/64"),
    ipaddress.IPv6Network("2001:db8::/32"),
    ipaddress.IPv6Network("2001::/23"),
    ipaddress.IPv6Network("fc00::/7"),
    ipaddress.IPv6Network("fe80::/10"),
    ipaddress.IPv6Network("fec0::/10"),
    ipaddress.IPv6Network("ff00::/8"),
)


def normalize_address(ip: str | IPAddress) -> IPAddress:
    """Parse ``ip``; unwrap an IPv4-mapped IPv6 address (``::ffff:127.0.0.1`` -> ``127.0.0.1``).

    Raises ``ValueError`` for text that is not an IP address (zone ids such as ``fe80::1%eth0`` included).
    """
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None:
            raise ValueError(f"scoped IPv6 address not accepted: {addr}")
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return mapped
    return addr


def _embedded_v4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """An IPv4 address a packet to ``addr`` may end up at (NAT64, IPv4-compatible, 6to4, Teredo)."""
    if addr in _NAT64 or (addr in _IPV4_COMPAT and int(addr) > 1):
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    return None


def _v4_is_public(addr: ipaddress.IPv4Address) -> bool:
    if not addr.is_global or addr.is_multicast or addr.is_reserved or addr.is_loopback:
        return False
    return not any(addr in net for net in _EXTRA_NON_PUBLIC_V4)


def is_public_address(ip: str | IPAddress) -> bool:
    """True when ``ip`` is a globally routable unicast address (after unwrapping IPv4 embedded in IPv6)."""
    addr = normalize_address(ip)
    if isinstance(addr, ipaddress.IPv4Address):
        return _v4_is_public(addr)
    embedded = _embedded_v4(addr)
    if embedded is not None:
        return _v4_is_public(embedded)
    if addr in _IPV4_COMPAT:  # :: and ::1
        return False
    if not addr.is_global or addr.is_multicast or addr.is_reserved or addr.is_site_local:
        return False
    return not any(addr in net for net in _EXTRA_NON_PUBLIC_V6)


def _normalize_name(host: str) -> str:
    return host.rstrip(".").lower()


def _valid_name(name: str) -> bool:
    if not name or len(name) > 253:
        return False
    for label in name.split("."):
        if not label or len(label) > 63 or label.startswith("-") or label.endswith("-"):
            return False
        if not all(c.isalnum() or c in "-_" for c in label) or not label.isascii():
            return False
    return True


@dataclass(frozen=True, slots=True)
class _NamePattern:
    name: str
    subdomains: bool

    @classmethod
    def parse(cls, text: str) -> _NamePattern:
        subdomains = text.startswith("*.")
        name = _normalize_name(text[2:] if subdomains else text)
        if not _valid_name(name):
            raise ValueError(f"invalid host name pattern: {text!r}")
        return cls(name=name, subdomains=subdomains)

    def matches(self, host: str) -> bool:
        if host == self.name:
            return True
        return self.subdomains and host.endswith("." + self.name)


def _parse_rules(entries: Sequence[str]) -> tuple[tuple[IPNetwork, ...], tuple[_NamePattern, ...]]:
    if isinstance(entries, str):
        raise TypeError("policy entries must be a sequence of strings, not one string")
    networks: list[IPNetwork] = []
    names: list[_NamePattern] = []
    for entry in entries:
        text = entry.strip()
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            names.append(_NamePattern.parse(text))
            continue
        if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
            mapped = net.network_address.ipv4_mapped
            if mapped is not None:  # ::ffff:a.b.c.d/n is written for IPv4 peers: store it as IPv4
                net = ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}", strict=False)
        networks.append(net)
    return tuple(networks), tuple(names)


@dataclass(frozen=True, slots=True, init=False)
class ExitPolicy:
    """Which destinations the exit may reach; see the module documentation for the rules."""

    allow_private: bool
    allow: tuple[str, ...]
    deny: tuple[str, ...]
    _allow_nets: tuple[IPNetwork, ...] = field(repr=False, compare=False)
    _allow_names: tuple[_NamePattern, ...] = field(repr=False, compare=False)
    _deny_nets: tuple[IPNetwork, ...] = field(repr=False, compare=False)
    _deny_names: tuple[_NamePattern, ...] = field(repr=False, compare=False)

    def __init__(
        self, allow_private: bool = False, allow: Sequence[str] = (), deny: Sequence[str] = ()
    ) -> None:
        allow_nets, allow_names = _parse_rules(allow)
        deny_nets, deny_names = _parse_rules(deny)
        object.__setattr__(self, "allow_private", allow_private)
        object.__setattr__(self, "allow", tuple(allow))
        object.__setattr__(self, "deny", tuple(deny))
        object.__setattr__(self, "_allow_nets", allow_nets)
        object.__setattr__(self, "_allow_names", allow_names)
        object.__setattr__(self, "_deny_nets", deny_nets)
        object.__setattr__(self, "_deny_names", deny_names)

    def _name_allowed(self, host: str) -> bool:
        return any(p.matches(host) for p in self._allow_names)

    def check_host(self, host: str) -> None:
        """Check the requested host (name or IP literal) before resolving it."""
        try:
            addr = normalize_address(host.strip("[]"))
        except ValueError:
            pass
        else:
            self.check_address(addr)
            return
        name = _normalize_name(host)
        if not _valid_name(name):
            raise PolicyDenied(host, "not a valid host name")
        if any(p.matches(name) for p in self._deny_names):
            raise PolicyDenied(host, "denied name")
        if self.allow and not self._allow_nets and not self._name_allowed(name):
            raise PolicyDenied(host, "not in the allow list")
        if not self.allow_private and (name == "localhost" or name.endswith(".localhost")):
            raise PolicyDenied(host, "loopback name")

    def check_address(self, ip: str | IPAddress, *, host: str | None = None) -> None:
        """Check one address (resolved from ``host`` when given) before connecting to it."""
        try:
            addr = normalize_address(ip)
        except ValueError as exc:
            raise PolicyDenied(str(ip), "not an IP address") from exc
        target = str(addr) if host is None else f"{host} ({addr})"
        if any(addr in net for net in self._deny_nets if net.version == addr.version):
            raise PolicyDenied(target, "denied network")
        in_allowed_net = any(addr in net for net in self._allow_nets if net.version == addr.version)
        if self.allow and not in_allowed_net:
            name_ok = host is not None and self._name_allowed(_normalize_name(host))
            if not name_ok:
                raise PolicyDenied(target, "not in the allow list")
        if not self.allow_private and not in_allowed_net and not is_public_address(addr):
            raise PolicyDenied(target, "not a public address")
