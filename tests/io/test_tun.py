"""vtunnel.io.tun on real TUN devices, each in a network namespace of its own (``unshare -n``: the device, its
addresses and routes exist only there and vanish with the process): packets the kernel routes to the device are
read whole, packets written to it reach a local socket, the device is configured as asked, and without
CAP_NET_ADMIN the error names the capability."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT
from vtunnel.io.tun import TunDevice

pytestmark = pytest.mark.netns

if os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("unshare") is None:
    pytest.skip("TUN devices need root, /dev/net/tun and unshare", allow_module_level=True)


def in_own_netns(script: str, *prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, "unshare", "-n", sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


_ROUND_TRIP = """
import asyncio, ipaddress, json, os, socket, struct
from vtunnel.io.tun import TunDevice, configure_device

def checksum(data):
    if len(data) % 2:
        data += b"\\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF

def udp_packet(src, dst, sport, dport, payload):
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + udp

async def main():
    dev = TunDevice.open("vtt-tun-t%d")
    await asyncio.to_thread(
        configure_device, dev.name, addresses=[ipaddress.ip_interface("10.99.0.1/24")], mtu=1400,
        routes=[ipaddress.ip_network("10.98.0.0/16")], alias="vtunnel test",
    )
    got = asyncio.get_running_loop().create_future()
    def on_packets(packets):
        for p in packets:
            if p[0] >> 4 == 4 and p[9] == 17 and not got.done():
                got.set_result(p)
    dev.start(on_packets)
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.sendto(b"to the device", ("10.98.1.2", 9))
    packet = await asyncio.wait_for(got, 10)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("10.99.0.1", 7777))
    sock.setblocking(False)
    dev.write(udp_packet(socket.inet_aton("10.99.0.9"), socket.inet_aton("10.99.0.1"), 5555, 7777, b"from the device"))
    data, peer = await asyncio.wait_for(asyncio.get_running_loop().sock_recvfrom(sock, 100), 10)
    dev.write(b"")  # refused by the kernel: dropped and counted, never raised
    import fcntl
    ifr = fcntl.ioctl(sock, 0x8921, struct.pack("16sI12x", dev.name.encode(), 0))  # SIOCGIFMTU
    mtu = struct.unpack("16sI12x", ifr)[1]
    routes = open("/proc/net/route").read()
    print(json.dumps({
        "name": dev.name, "dst": socket.inet_ntoa(packet[16:20]), "tail": packet[-13:].decode(),
        "data": data.decode(), "peer": peer[0], "mtu": mtu, "route": "0000620A" in routes,
        "dropped": dev.dropped_writes, "in": dev.packets_in >= 1,
    }))
    name = dev.name
    dev.close()
    print(json.dumps({"gone": name not in [n for _, n in socket.if_nameindex()]}))

asyncio.run(main())
"""


def test_packets_both_ways_and_the_configuration() -> None:
    done = in_own_netns(_ROUND_TRIP)
    assert done.returncode == 0, done.stderr
    import json

    first, second = (json.loads(line) for line in done.stdout.splitlines())
    assert first["name"].startswith("vtt-tun-t")
    assert (first["dst"], first["tail"]) == ("10.98.1.2", "to the device")
    assert (first["data"], first["peer"]) == ("from the device", "10.99.0.9")
    assert first["mtu"] == 1400
    assert first["route"]  # 10.98.0.0/16 through the device
    assert first["dropped"] == 1
    assert first["in"]
    assert second["gone"]


def test_without_cap_net_admin_the_error_names_it() -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    script = """
    from vtunnel.io.tun import TunDevice, TunPermissionError
    try:
        TunDevice.open("vtt-tun-p0")
    except TunPermissionError as exc:
        print(exc)
    """
    done = in_own_netns(script, "setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin")
    assert done.returncode == 0, done.stderr
    assert "needs the CAP_NET_ADMIN capability" in done.stdout


@pytest.mark.parametrize("name", ["", "a" * 16, "has space", "a/b"])
def test_bad_names_are_refused_before_anything_is_opened(name: str) -> None:
    with pytest.raises(ValueError, match="interface name"):
        TunDevice.open(name)
