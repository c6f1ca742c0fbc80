"""The harness's own namespaces and nftables loss rule (root only; skipped where namespaces are not permitted)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.netem import NetnsLink, netns_supported

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

REASON = netns_supported()


@pytest.mark.skipif(REASON is not None, reason=f"namespaces unavailable: {REASON}")
def test_link_drops_the_asked_fraction_and_is_removed() -> None:
    link = NetnsLink(tag=f"t{os.getpid() % 100000}")
    count = 300
    probe = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for i in range({count}): s.sendto(b'x', ('{link.server_addr}', 9))\n"
    )
    try:
        link.up()
        link.set_loss(0.0)
        run = [*link.placement.client_prefix, sys.executable, "-c", probe]
        subprocess.run(run, check=True, timeout=30)
        assert link.dropped() == 0
        link.set_loss(0.5)
        subprocess.run(run, check=True, timeout=30)
        dropped = link.dropped()
        # About half of the datagrams in (and of the ICMP answers out, which the kernel rate-limits).
        assert 0.3 * count < dropped < 0.9 * count
        with pytest.raises(Exception, match="loss must be"):
            link.set_loss(1.0)
    finally:
        link.down()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert link.client_ns not in listed
    assert link.server_ns not in listed


def _qdiscs(link: NetnsLink) -> str:
    argv = ["ip", "netns", "exec", link.client_ns, "tc", "qdisc", "show", "dev", link.client_veth]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(REASON is not None, reason=f"namespaces unavailable: {REASON}")
def test_link_counts_what_each_end_sends_and_each_flow_brings_and_limits_the_rate() -> None:
    link = NetnsLink(tag=f"w{os.getpid() % 100000}")
    count, size = 200, 1000
    probe = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.bind(('0.0.0.0', 40123))\n"
        f"for i in range({count}): s.sendto(b'x' * {size}, ('{link.server_addr}', 9))\n"
    )
    try:
        link.up()
        link.set_rate(25e6)
        shown = _qdiscs(link)
        assert "tbf" in shown
        assert "200Mbit" in shown
        link.set_loss(0.0)
        subprocess.run([*link.placement.client_prefix, sys.executable, "-c", probe], check=True, timeout=30)
        sent, packets = link.wire()
        # the client's datagrams (IP and UDP headers: 28 bytes each), and the ICMP port-unreachable answers
        # the server's kernel sends back (rate-limited)
        assert sent >= count * (size + 28)
        assert packets >= count
        assert link.flows() == {40123: count * (size + 28)}
        link.set_rate(None)
        shown = _qdiscs(link)
        assert "tbf" not in shown
    finally:
        link.down()


def test_jain_index() -> None:
    from bench.fairness import jain

    assert jain([5.0, 5.0]) == pytest.approx(1.0)
    assert jain([10.0, 0.0]) == pytest.approx(0.5)
    assert jain([3.0, 1.0]) == pytest.approx(0.8)
