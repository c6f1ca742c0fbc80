"""IP mode end to end, in network namespaces this test makes: a server in one, two agents in two others, each agent
joined to the server by a veth pair of its own; vtunnel processes as a user runs them (``server --tun``,
``agent --tun``), over rudp:// (packets as unreliable datagrams), kcp:// and tcp:// (packets in DATA frames).

Shown: ping between the agents through the server, curl from an agent to an HTTP server in the server's namespace
by its tunnel address, 64 MiB byte-exact over TCP through the TUN path, a spoofed source dropped by the server, the
exit policy and ``--tun-nat`` for traffic to the outside, and the devices, routes and nftables table gone after
SIGTERM and after SIGKILL (a restart works and cleans up).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.conftest import ROOT, VTUNNEL

pytestmark = pytest.mark.netns

POOL = "10.77.0.0/24"
POOL6 = "fd77::/64"
SERVER_TUN = "10.77.0.1"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces and TUN devices need root"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    for tool in ("ip", "nft", "ping", "curl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


if (_reason := _why_not()) is not None:
    pytest.skip(_reason, allow_module_level=True)


def run(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)}: {done.returncode} {done.stderr.strip() or done.stdout.strip()}"
        )
    return done


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not within {timeout} s")


class Net:
    """Three namespaces (s: server, a and b: agents), a veth pair from s to each agent; vtunnel processes in them."""

    def __init__(self, tmp: Path, tag: str) -> None:
        self.tmp = tmp
        self.ns = {side: f"vtt-tun-{tag}-{side}" for side in "sab"}
        self.veth = {side: (f"vtt{tag}s{side}", f"vtt{tag}{side}s") for side in "ab"}
        self.procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
        self.key = tmp / "key"

    def up(self) -> None:
        for ns in self.ns.values():
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        for n, side in enumerate("ab", start=1):
            outer, inner = self.veth[side]
            run("ip", "link", "add", outer, "netns", self.ns["s"], "type", "veth", "peer", "name", inner, "netns",
                self.ns[side])  # fmt: skip
            run("ip", "-n", self.ns["s"], "addr", "add", f"10.231.{n}.1/24", "dev", outer)
            run("ip", "-n", self.ns[side], "addr", "add", f"10.231.{n}.2/24", "dev", inner)
            run("ip", "-n", self.ns["s"], "link", "set", outer, "up")
            run("ip", "-n", self.ns[side], "link", "set", inner, "up")
        subprocess.run([*VTUNNEL, "keygen", "-o", str(self.key)], capture_output=True, check=True, cwd=ROOT)

    def down(self) -> None:
        for proc, _log in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for _proc, log in self.procs:
            log.close()
        for ns in self.ns.values():
            run("ip", "netns", "del", ns, check=False)

    def exec(
        self, side: str, *argv: str, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.ns[side], *argv, timeout=timeout, check=check)

    def spawn(self, side: str, *argv: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{side}{len(self.procs)}.log", "wb")  # noqa: SIM115 - closed in down
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[side], *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=ROOT,
            start_new_session=True,
        )
        self.procs.append((proc, log))
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        index = [p for p, _ in self.procs].index(proc)
        side = next(s for s in "sab" if (self.tmp / f"{s}{index}.log").exists())
        return (self.tmp / f"{side}{index}.log").read_text(errors="replace")

    def vtunnel(self, side: str, *args: str) -> subprocess.Popen[bytes]:
        return self.spawn(side, *VTUNNEL, *args)

    def server(self, scheme: str, *extra: str) -> subprocess.Popen[bytes]:
        proc = self.vtunnel(
            "s",
            "server",
            "--listen",
            f"{scheme}://0.0.0.0:4000",
            "--psk-file",
            str(self.key),
            "--tun",
            POOL,
            "--tun",
            POOL6,
            *extra,
        )
        wait_for("the server's device", lambda: self.addresses("s") == [SERVER_TUN])
        return proc

    def agent(self, side: str, scheme: str, *extra: str) -> subprocess.Popen[bytes]:
        n = "ab".index(side) + 1
        return self.vtunnel(
            side,
            "agent",
            "--server",
            f"{scheme}://10.231.{n}.1:4000",
            "--psk-file",
            str(self.key),
            "--tun",
            *extra,
        )

    def addresses(self, side: str, device: str = "vtun0", family: str = "-4") -> list[str]:
        done = self.exec(
            side, "ip", "-j", family, "addr", "show", "dev", device, "scope", "global", check=False
        )
        if done.returncode != 0 or not done.stdout.strip():
            return []
        return [
            a["local"] for link in json.loads(done.stdout) for a in link.get("addr_info", []) if "local" in a
        ]

    def wait_address(self, side: str) -> str:
        wait_for(f"agent {side}'s device", lambda: bool(self.addresses(side)))
        return self.addresses(side)[0]

    def has_device(self, side: str, device: str = "vtun0") -> bool:
        return self.exec(side, "ip", "link", "show", "dev", device, check=False).returncode == 0

    def routes(self, side: str) -> str:
        return self.exec(side, "ip", "route", "show").stdout


@pytest.fixture(scope="module", params=["rudp", "kcp", "tcp"])
def vpn(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Net, str, str]]:
    """A server and two agents over the parametrized transport: the net and the agents' tunnel addresses."""
    scheme: str = request.param
    net = Net(tmp_path_factory.mktemp(f"tun-{scheme}"), f"{os.getpid() % 1000}{scheme[0]}")
    try:
        net.up()
        net.server(scheme)
        net.agent("a", scheme)
        net.agent("b", scheme)
        yield net, net.wait_address("a"), net.wait_address("b")
    finally:
        net.down()


def test_ping_between_agents_through_the_server(vpn: tuple[Net, str, str]) -> None:
    net, a, b = vpn
    assert a != b
    assert {a, b} <= {f"10.77.0.{n}" for n in range(2, 255)}
    done = net.exec("a", "ping", "-c", "3", "-i", "0.2", "-W", "5", b, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " 0% packet loss" in done.stdout
    done = net.exec("b", "ping", "-c", "2", "-i", "0.2", "-W", "5", SERVER_TUN)
    assert " 0% packet loss" in done.stdout


def test_ipv6_between_agents_and_to_the_server(vpn: tuple[Net, str, str]) -> None:
    net, _a, _b = vpn
    b6 = net.addresses("b", family="-6")
    assert len(b6) == 1, (b6, net.exec("b", "ip", "addr").stdout)
    assert b6[0].startswith("fd77::")
    assert net.addresses("s", family="-6") == ["fd77::1"]
    for target in (b6[0], "fd77::1"):
        done = net.exec("a", "ping", "-6", "-c", "2", "-i", "0.2", "-W", "5", target, check=False)
        assert done.returncode == 0, done.stdout + done.stderr


def test_curl_and_64_mib_byte_exact_to_the_server_namespace(
    vpn: tuple[Net, str, str], tmp_path: Path
) -> None:
    net, _a, _b = vpn
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("hello through the tunnel\n")
    blob = os.urandom(64 * 1024 * 1024)
    (root / "blob").write_bytes(blob)
    http = net.spawn(
        "s", sys.executable, "-m", "http.server", "8080", "--bind", "0.0.0.0", "--directory", str(root)
    )
    try:
        wait_for(
            "the HTTP server", lambda: net.exec("s", "ss", "-ltn", check=False).stdout.count(":8080") > 0
        )
        page = net.exec("a", "curl", "-sS", "--max-time", "20", f"http://{SERVER_TUN}:8080/index.html")
        assert page.stdout == "hello through the tunnel\n"
        out = tmp_path / "got"
        net.exec(
            "b",
            "curl",
            "-sS",
            "--max-time",
            "240",
            "-o",
            str(out),
            f"http://{SERVER_TUN}:8080/blob",
            timeout=250,
        )
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(blob).digest()
    finally:
        http.kill()


_LISTENER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
s.settimeout(0.5)
print("ready", flush=True)
deadline, legit = time.monotonic() + 30, None
while time.monotonic() < deadline and (legit is None or time.monotonic() < legit + 1.0):
    try:
        data, peer = s.recvfrom(2048)
    except TimeoutError:
        continue
    print(data.decode(), peer[0], flush=True)
    if data == b"legit" and legit is None:
        legit = time.monotonic()
"""

_SENDER = """
import socket, sys, time
for source, text in ((sys.argv[2], b"spoofed"), (sys.argv[3], b"legit")):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((source, 0))
    for _ in range(3):
        s.sendto(text, (sys.argv[1], 9999))
        time.sleep(0.05)
"""


def test_a_spoofed_source_is_dropped_by_the_server(vpn: tuple[Net, str, str]) -> None:
    net, a, b = vpn
    spoofed = "10.77.0.250"
    net.exec("a", "ip", "addr", "add", f"{spoofed}/32", "dev", "vtun0")
    try:
        listener = net.spawn("b", sys.executable, "-c", _LISTENER)
        wait_for("the listener", lambda: "ready" in net.output(listener))
        net.exec("a", sys.executable, "-c", _SENDER, b, spoofed, a)
        listener.wait(timeout=40)
        heard = net.output(listener)
        assert f"legit {a}" in heard
        assert "spoofed" not in heard
        server = net.procs[0][0]
        wait_for(
            "the server's warning", lambda: "its source is not the agent's address" in net.output(server)
        )
        assert spoofed in net.output(server)
    finally:
        net.exec("a", "ip", "addr", "del", f"{spoofed}/32", "dev", "vtun0", check=False)


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    n = Net(tmp_path, f"{os.getpid() % 1000}x")
    try:
        n.up()
        yield n
    finally:
        n.down()


@pytest.mark.parametrize("scheme", ["rudp", "kcp"])
def test_devices_and_routes_gone_after_sigterm_and_sigkill(net: Net, scheme: str) -> None:
    net.server(scheme)
    route = "10.231.9.0/24"
    agent = net.agent("a", scheme, "--tun-route", route)
    first = net.wait_address("a")
    assert route in net.routes("a")
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=30) == 0
    assert not net.has_device("a")
    assert route not in net.routes("a")
    assert "10.77.0." not in net.routes("a")

    agent = net.agent("a", scheme, "--tun-route", route)
    net.wait_address("a")
    os.killpg(agent.pid, signal.SIGKILL)
    agent.wait(timeout=10)
    wait_for("the device's removal", lambda: not net.has_device("a"), timeout=10)
    assert route not in net.routes("a")

    net.agent("a", scheme, "--tun-route", route)  # a restart: a device of the same name, working
    again = net.wait_address("a")
    assert again.startswith("10.77.0.")
    assert first.startswith("10.77.0.")
    done = net.exec("a", "ping", "-c", "2", "-i", "0.2", "-W", "5", SERVER_TUN, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_nat_through_the_exit_policy_and_its_table_removed(net: Net) -> None:
    """Agent a reaches agent b's veth address (outside the tunnel) through the server's masquerade only when the
    exit policy allows private addresses; the nftables table goes with the server, also after a SIGKILL."""
    outside = "10.231.2.2"
    server = net.server("rudp", "--tun-nat")
    net.agent("a", "rudp", "--tun-route", "10.231.2.0/24")
    net.wait_address("a")
    table = ("nft", "list", "table", "inet", "vtunnel-vtun0")
    assert net.exec("s", *table).returncode == 0
    refused = net.exec("a", "ping", "-c", "2", "-i", "0.2", "-W", "2", outside, check=False)
    assert refused.returncode != 0  # a private address: the exit policy refuses it

    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=10)
    assert net.exec("s", *table, check=False).returncode == 0  # left behind by the kill
    server = net.server("rudp", "--tun-nat", "--allow-private")  # replaces it
    wait_for(
        "a's tunnel again",
        lambda: net.exec("a", "ping", "-c", "1", "-W", "1", SERVER_TUN, check=False).returncode == 0,
    )
    done = net.exec("a", "ping", "-c", "2", "-i", "0.2", "-W", "5", outside, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0
    assert net.exec("s", *table, check=False).returncode != 0
    assert not net.has_device("s")
