"""Network emulation without kernel netem.

* :class:`Placement` says where the two sides of a system run and how the client side reaches the server side:
  :data:`LOOPBACK` (everything on 127.0.0.1) or a :class:`NetnsLink`.
* :class:`NetnsLink` makes two network namespaces of its own joined by a veth pair (private addresses exist
  only inside these two namespaces) and drops a given fraction of packets in both directions with an nftables
  ``numgen random`` rule in the server namespace. It works for TCP and UDP alike. It can also limit the rate
  of each direction (a ``tbf`` qdisc on each end of the veth, a bounded queue that drops what overflows it),
  count the bytes each end puts on the veth (nftables counters, before any drop) and the bytes each UDP flow
  brings into the server namespace (a dynamic set with a counter per source port). This kernel has no netem,
  so the link adds no delay. When namespaces or nftables are not permitted, :func:`netns_supported` says why
  and the harness skips these scenarios, saying so in the report.
* :func:`relay_argv` builds the command line of vtunnel's userspace UDP impairment relay (``python -m
  vtunnel.testing.relay``) when it is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from bench.procs import HarnessError

__all__ = [
    "IPV4_UDP_HEADER",
    "LOOPBACK",
    "NetnsLink",
    "Placement",
    "netns_supported",
    "relay_argv",
    "relay_available",
]

log = structlog.get_logger("bench.netem")

#: bytes of an IPv4 and a UDP header: what a veth counter sees beyond a datagram's payload
IPV4_UDP_HEADER = 28


@dataclass(frozen=True, kw_only=True, slots=True)
class Placement:
    """Where a system runs: command prefixes per side and the address the client side dials."""

    name: str
    client_prefix: tuple[str, ...] = ()
    server_prefix: tuple[str, ...] = ()
    server_host: str = "127.0.0.1"
    description: str = "loopback 127.0.0.1"

    @property
    def loopback(self) -> bool:
        return not self.client_prefix and not self.server_prefix


LOOPBACK = Placement(name="loopback")


def _run(argv: Sequence[str], *, stdin: str | None = None) -> None:
    try:
        proc = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HarnessError(f"{' '.join(argv)} failed: {exc}") from None
    if proc.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def netns_supported() -> str | None:
    """``None`` when namespaces + veth + nftables work here, else the reason they do not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed (run bench/setup.sh)"
    probe = NetnsLink(tag=f"p{os.getpid() % 100000}")
    try:
        probe.up()
        probe.set_loss(0.01)
    except HarnessError as exc:
        return f"network namespaces are not permitted here: {exc}"
    finally:
        probe.down()
    return None


@dataclass(kw_only=True, slots=True)
class NetnsLink:
    """Two namespaces ``vtb<tag>c`` (client) and ``vtb<tag>s`` (server) joined by a veth pair.

    The client side is 10.201.0.1/30 and the server side 10.201.0.2/30; those addresses exist only inside the
    two namespaces made here. ``loss`` is the drop probability applied to every packet entering and leaving
    the server namespace over the veth; ``rate`` (bytes per second, ``None``: none) the rate each end sends at
    most, through a queue of ``queue`` bytes.
    """

    tag: str
    client_addr: str = "10.201.0.1"
    server_addr: str = "10.201.0.2"
    loss: float = 0.0
    rate: float | None = None
    queue: int = 256 * 1024
    notes: list[str] = field(default_factory=list)
    _up: bool = field(default=False, init=False)

    @property
    def client_ns(self) -> str:
        return f"vtb{self.tag}c"

    @property
    def server_ns(self) -> str:
        return f"vtb{self.tag}s"

    @property
    def placement(self) -> Placement:
        return Placement(
            name="netns",
            client_prefix=("ip", "netns", "exec", self.client_ns),
            server_prefix=("ip", "netns", "exec", self.server_ns),
            server_host=self.server_addr,
            description=f"veth between two namespaces, nftables random drop {self.loss:.1%} each way"
            + ("" if self.rate is None else f", tbf {self.rate / 1e6:g} MB/s each way, {self.queue} B queue"),
        )

    @property
    def client_veth(self) -> str:
        return f"vtb{self.tag}a"

    @property
    def server_veth(self) -> str:
        return f"vtb{self.tag}b"

    def up(self) -> None:
        self._up = True
        c, s = self.client_ns, self.server_ns
        veth_c, veth_s = self.client_veth, self.server_veth
        _run(["ip", "netns", "add", c])
        _run(["ip", "netns", "add", s])
        _run(["ip", "link", "add", veth_c, "netns", c, "type", "veth", "peer", "name", veth_s, "netns", s])
        for ns, dev, addr in ((c, veth_c, self.client_addr), (s, veth_s, self.server_addr)):
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            self._packet_sized(ns, dev)
        self.set_loss(self.loss)
        self.set_rate(self.rate)

    def _packet_sized(self, ns: str, dev: str) -> None:
        """Turn segmentation offloads off so the drop rule sees wire-sized packets, not 64 KiB aggregates."""
        if shutil.which("ethtool") is None:
            self.notes.append(
                "ethtool is missing: offloads stay on, so TCP loss applies to aggregated segments"
            )
            return
        try:
            _run(["ip", "netns", "exec", ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off"])
        except HarnessError as exc:
            self.notes.append(f"could not turn offloads off on {dev}: {exc}")

    def set_loss(self, loss: float) -> None:
        """Replace the drop rule: each packet crossing the veth is dropped with probability ``loss``. The
        counters (:meth:`wire`, :meth:`flows`) start again from zero."""
        if not 0.0 <= loss < 1.0:
            raise HarnessError(f"loss must be within [0, 1), got {loss}")
        self.loss = loss
        per_million = round(loss * 1_000_000)
        veth_s = self.server_veth
        # the counters come before the drop: they count what was sent, as the relay does
        server = [
            "table inet vtbench {",
            "  counter wire_out {}",
            "  set flows_in { type inet_service; flags dynamic; size 4096; counter; }",
            "  chain ingress_drop { type filter hook input priority 0; policy accept;",
            f'    iifname "{veth_s}" udp sport 1-65535 update @flows_in {{ udp sport }}',
            f'    iifname "{veth_s}" numgen random mod 1000000 < {per_million} counter drop',
            "  }",
            "  chain egress_drop { type filter hook output priority 0; policy accept;",
            f'    oifname "{veth_s}" counter name "wire_out"',
            f'    oifname "{veth_s}" numgen random mod 1000000 < {per_million} counter drop',
            "  }",
            "}",
        ]
        client = [
            "table inet vtbench {",
            "  counter wire_out {}",
            "  chain egress { type filter hook output priority 0; policy accept;",
            f'    oifname "{self.client_veth}" counter name "wire_out"',
            "  }",
            "}",
        ]
        for ns, rules in ((self.server_ns, server), (self.client_ns, client)):
            # Delete-and-recreate in one transaction so the rule is never missing or doubled.
            _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], stdin="table inet vtbench {}\n")
            _run(
                ["ip", "netns", "exec", ns, "nft", "-f", "-"],
                stdin="delete table inet vtbench\n" + "\n".join(rules) + "\n",
            )

    def set_rate(self, rate: float | None) -> None:
        """Limit each direction to ``rate`` bytes per second (``None``: no limit): a token bucket on each end of
        the veth whose queue holds :attr:`queue` bytes and drops what overflows it, as a router's would."""
        self.rate = rate
        for ns, dev in ((self.client_ns, self.client_veth), (self.server_ns, self.server_veth)):
            if rate is None:
                subprocess.run(
                    ["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
                    capture_output=True,
                    timeout=20,
                    check=False,
                )
                continue
            bits = round(rate * 8)
            shape = ["tbf", "rate", f"{bits}bit", "burst", "64kb", "limit", str(self.queue)]
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", *shape])

    def _nft_json(self, ns: str, *what: str) -> list[dict[str, object]]:
        try:
            proc = subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "-j", "list", *what],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            items = json.loads(proc.stdout)["nftables"]
        except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
            return []
        return [item for item in items if isinstance(item, dict)]

    def wire(self) -> tuple[int, int]:
        """(bytes, packets) both ends put on the veth since the counters were last set, IP headers included,
        before any drop (the rule's or the rate limit's)."""
        total_bytes = total_packets = 0
        for ns in (self.client_ns, self.server_ns):
            for item in self._nft_json(ns, "counters", "table", "inet", "vtbench"):
                counter = item.get("counter")
                if isinstance(counter, dict) and counter.get("name") == "wire_out":
                    total_bytes += int(counter.get("bytes", 0))
                    total_packets += int(counter.get("packets", 0))
        return total_bytes, total_packets

    def flows(self) -> dict[int, int]:
        """Bytes that arrived in the server namespace over the veth per UDP source port, since the counters
        were last set (after the rate limit, before the drop rule)."""
        out: dict[int, int] = {}
        for item in self._nft_json(self.server_ns, "set", "inet", "vtbench", "flows_in"):
            found = item.get("set")
            if not isinstance(found, dict):
                continue
            for elem in found.get("elem", []):
                entry = elem.get("elem", {}) if isinstance(elem, dict) else {}
                counter = entry.get("counter", {})
                if isinstance(entry.get("val"), int) and isinstance(counter, dict):
                    out[entry["val"]] = int(counter.get("bytes", 0))
        return out

    def dropped(self) -> int:
        """Packets dropped by the rule since it was last set."""
        total = 0
        for item in self._nft_json(self.server_ns, "table", "inet", "vtbench"):
            rule = item.get("rule")
            if not isinstance(rule, dict):
                continue
            exprs = rule.get("expr", [])
            if not any(isinstance(e, dict) and "drop" in e for e in exprs):
                continue
            for e in exprs:
                if isinstance(e, dict) and isinstance(e.get("counter"), dict):
                    total += int(e["counter"].get("packets", 0))
        return total

    def down(self) -> None:
        if not self._up:
            return
        self._up = False
        for ns in (self.client_ns, self.server_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20, check=False)


def relay_available() -> bool:
    """True when vtunnel's userspace impairment relay is installed."""
    try:
        return importlib.util.find_spec("vtunnel.testing.relay") is not None
    except (ImportError, ValueError):
        return False


def relay_argv(listen: str, target: str, options: Sequence[str]) -> list[str]:
    """Command line of the UDP impairment relay from ``listen`` to ``target`` with extra ``options``."""
    return [sys.executable, "-m", "vtunnel.testing.relay", "--listen", listen, "--target", target, *options]
