"""IP mode: a TUN-device VPN over any vtunnel transport (docs/tun.md).

The server (``--tun CIDR``) owns a TUN device with the first address of each pool and gives every agent the next
free one; the agent (``--tun``) owns a TUN device with the address it was given. Between them one ``tun`` stream
per agent carries the IP packets, one packet per datagram: unreliable datagrams where the transport has them
(rudp://), DATA frames elsewhere.

* The agent opens the stream with its identity (``vt-tun-id``, random per agent process, so a reconnecting agent
  gets its address back; a server with per-user keys leases by the tunnel's user instead, so a restarted agent
  gets its user's address back too) and learns its addresses and the server's packet size limit from the SYN-ACK's headers
  (``vt-tun-address``, once per pool, and ``vt-tun-mtu``).
* The server's :class:`TunSwitch` forwards what an agent sends: to another agent (unless client-to-client
  traffic is forbidden), to the server's own addresses, or (through the exit policy) to the kernel, which routes it
  on (``--tun-nat`` installs a masquerade for the pools). A packet whose source is not the address given to its
  agent is dropped: an agent cannot speak for another. What the device gives is sent to the agent whose address
  is the destination.

A packet that cannot go now (a full window, a congested tunnel, no stream) is dropped, as a router drops it:
TCP inside the tunnel resends it, and nothing waits.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import anyio.to_thread
import structlog

from vtunnel.apps.policy import ExitPolicy, PolicyDenied
from vtunnel.io.tun import IPInterface, IPNetwork, TunDevice, TunError, configure_device
from vtunnel.protocol import StreamMetadata
from vtunnel.runtime.connection import TunnelConnection
from vtunnel.runtime.errors import StreamRefused, TunnelUnavailable
from vtunnel.runtime.session import Backoff, TunnelPool
from vtunnel.runtime.tunnel_stream import TunnelStream

__all__ = [
    "AddressPool",
    "TunAgent",
    "TunAgentSettings",
    "TunServerSettings",
    "TunSwitch",
    "packet_addresses",
    "parse_pools",
]

log = structlog.get_logger("vtunnel.tun")

ID_HEADER = "vt-tun-id"
ADDRESS_HEADER = "vt-tun-address"
MTU_HEADER = "vt-tun-mtu"
#: the MTU over a transport without unreliable datagrams (packets ride DATA frames, which KCP or TCP segment)
RELIABLE_MTU = 1500
#: the smallest MTU IPv6 allows; a device carrying an IPv6 pool is never set below it
IPV6_MIN_MTU = 1280
#: seconds an agent's address stays reserved for it after its stream ended (it may be reconnecting)
LEASE_TIME = 600.0
_POLICY_CACHE = 4096


def parse_pools(texts: Sequence[str]) -> tuple[IPNetwork, ...]:
    """``--tun CIDR`` values: at most one IPv4 and one IPv6 network, each with room for the server and an agent."""
    pools: list[IPNetwork] = []
    for text in texts:
        try:
            net = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise ValueError(f"--tun {text!r}: not a network (CIDR, e.g. 10.77.0.0/24)") from None
        if net.num_addresses < 4:
            raise ValueError(f"--tun {net}: too small for the server and an agent")
        if any(p.version == net.version for p in pools):
            raise ValueError(f"--tun: one IPv{net.version} pool at most")
        pools.append(net)
    return tuple(pools)


def packet_addresses(packet: bytes) -> tuple[bytes, bytes] | None:
    """An IP packet's raw source and destination addresses, or ``None`` if it is neither IPv4 nor IPv6."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        return packet[12:16], packet[16:20]
    if version == 6 and len(packet) >= 40:
        return packet[8:24], packet[24:40]
    return None


# ---------------------------------------------------------------------------------------------------- the server
@dataclass(frozen=True, kw_only=True)
class TunServerSettings:
    """``vtunnel server --tun CIDR ...``."""

    pools: tuple[IPNetwork, ...]
    device: str = "vtun0"
    #: the server device's MTU (agents are told the smaller of it and what their tunnel carries)
    mtu: int = RELIABLE_MTU
    #: agents may reach each other through the server
    client_to_client: bool = True
    #: install an nftables masquerade for the pools (and turn on forwarding) while the server runs
    nat: bool = False
    lease_time: float = LEASE_TIME
    #: lease by the user whose key the agent's tunnel used (a server with per-user keys): an agent gets its user's
    #: addresses back on any tunnel, also after it restarted, and one agent per user holds them at a time
    by_user: bool = False

    def __post_init__(self) -> None:
        if not self.pools:
            raise ValueError("--tun needs at least one pool (CIDR)")
        low = IPV6_MIN_MTU if any(p.version == 6 for p in self.pools) else 576
        if not low <= self.mtu <= 65535:
            raise ValueError(f"--tun-mtu {self.mtu}: out of [{low}, 65535]")


class PoolExhausted(Exception):
    """Every address of a pool is given to a connected agent."""


class AddressPool:
    """One network's addresses: the first host is the server's, the others go to agents by identity, each kept
    for its agent ``lease_time`` seconds after it left (the newest of them is the first to be taken back)."""

    def __init__(self, network: IPNetwork, *, lease_time: float = LEASE_TIME) -> None:
        self.network = network
        self.lease_time = lease_time
        hosts = network.hosts()
        self.server = ipaddress.ip_interface(f"{next(hosts)}/{network.prefixlen}")
        self._hosts = hosts
        self._leases: dict[str, IPInterface] = {}
        #: identities whose agent is gone, with when their lease ends (insertion order: oldest first)
        self._idle: dict[str, float] = {}
        self._free: list[IPInterface] = []

    def lease(self, identity: str, now: float) -> IPInterface:
        """``identity``'s address: the one it had, else a free one, else one whose lease ran out."""
        address = self._leases.get(identity)
        if address is not None:
            self._idle.pop(identity, None)
            return address
        address = self._take(now)
        self._leases[identity] = address
        return address

    def _take(self, now: float) -> IPInterface:
        if self._free:
            return self._free.pop()
        for host in self._hosts:
            if host != self.network.broadcast_address:
                return ipaddress.ip_interface(f"{host}/{self.network.prefixlen}")
        for identity, until in self._idle.items():
            if until <= now:
                del self._idle[identity]
                return self._leases.pop(identity)
        raise PoolExhausted(f"every address of {self.network} is leased")

    def release(self, identity: str, now: float) -> None:
        """``identity``'s agent left: its address waits ``lease_time`` for it."""
        if identity in self._leases:
            self._idle[identity] = now + self.lease_time


class _Port:
    """One agent's ``tun`` stream on the switch: the stream's consumer, and where packets for it go."""

    __slots__ = ("_switch", "addresses", "identity", "sources", "stream", "warned")

    def __init__(
        self, switch: TunSwitch, stream: TunnelStream, identity: str, addresses: list[IPInterface]
    ) -> None:
        self._switch = switch
        self.stream = stream
        self.identity = identity
        self.addresses = addresses
        self.sources = frozenset(a.ip.packed for a in addresses)
        #: a spoofed source was logged once for this agent
        self.warned = False

    def send(self, packet: bytes) -> None:
        stream = self.stream
        try:
            if stream.has_room() and stream.write(packet):
                return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ValueError):
            pass
        self._switch.dropped_full += 1

    # StreamConsumer
    def stream_data(self, data: bytes) -> None:
        self.stream.acknowledge(len(data))
        self._switch.from_agent(self, data)

    def stream_eof(self) -> None:
        self._switch.port_ended(self)

    def stream_broken(self) -> None:
        self._switch.port_ended(self)

    def stream_writable(self) -> None:
        pass  # a packet that finds no room is dropped, never held

    def stream_spliced(self, dedicated: socket.socket, to_peer: bytes, ended: bool) -> bool:
        return False  # only a lite-tls stream is spliced


class TunSwitch:
    """The server's side of IP mode: its device, the address pools and the agents' ports."""

    def __init__(self, settings: TunServerSettings, policy: ExitPolicy) -> None:
        self.settings = settings
        self.policy = policy
        self.pools = [AddressPool(p, lease_time=settings.lease_time) for p in settings.pools]
        self.device: TunDevice | None = None
        self._nat: _Masquerade | None = None
        #: the ports by the raw addresses they were given
        self._routes: dict[bytes, _Port] = {}
        self._by_identity: dict[str, _Port] = {}
        #: the server's own addresses (raw): packets to them go to the device whatever the policy says
        self._own = frozenset(p.server.ip.packed for p in self.pools)
        self._verdicts: dict[bytes, bool] = {}
        #: packets dropped: a source not given to the agent, a destination nobody has, refused by the exit policy,
        #: client-to-client while forbidden, no room towards an agent
        self.dropped_spoofed = 0
        self.dropped_unrouted = 0
        self.dropped_policy = 0
        self.dropped_forbidden = 0
        self.dropped_full = 0
        self.forwarded = 0

    @property
    def agents(self) -> int:
        return len(self._by_identity)

    async def start(self) -> None:
        """Create and configure the device (and the masquerade); raises TunError (TunPermissionError)."""
        s = self.settings
        device = TunDevice.open(s.device)
        try:
            await anyio.to_thread.run_sync(
                lambda: configure_device(
                    device.name,
                    addresses=[p.server for p in self.pools],
                    mtu=s.mtu,
                    alias="vtunnel server",
                )
            )
            if s.nat:
                self._nat = _Masquerade(device.name, s.pools)
                await anyio.to_thread.run_sync(self._nat.install)
        except BaseException:
            device.close()
            raise
        device.start(self._from_device)
        self.device = device
        log.info(
            "tun device up",
            device=device.name,
            addresses=[str(p.server) for p in self.pools],
            mtu=s.mtu,
            nat=s.nat,
            client_to_client=s.client_to_client,
        )

    def close(self) -> None:
        """Remove the masquerade, close every port and the device (which takes its addresses and routes along)."""
        for port in list(self._by_identity.values()):
            port.stream.close()
        self._by_identity.clear()
        self._routes.clear()
        if self._nat is not None:
            self._nat.remove()
            self._nat = None
        if self.device is not None:
            self.device.close()
            log.info("tun device removed", device=self.device.name)

    def serve(self, stream: TunnelStream) -> None:
        """An agent's ``tun`` stream: give it its addresses (SYN-ACK) and switch its packets from now on."""
        headers = dict(stream.metadata.headers) if stream.metadata is not None else {}
        user = stream.tunnel_user
        if self.settings.by_user and user is not None:
            identity = f"user:{user}"  # the user's addresses, whatever the agent process calls itself
        else:
            identity = headers.get(ID_HEADER) or f"{stream.tunnel_name}/{stream.stream_id}"
        old = self._by_identity.get(identity)
        if old is not None:  # the same agent on a new tunnel: the old stream is stale (unplugged before the
            self._unplug(old)  # lease, which would otherwise count the live agent's address as waiting)
            old.stream.close()
        now = time.monotonic()
        try:
            addresses = [pool.lease(identity, now) for pool in self.pools]
        except PoolExhausted as exc:
            for pool in self.pools:  # what another pool leased waits like any left agent's
                pool.release(identity, now)
            log.warning("tun agent refused", tunnel=stream.tunnel_name, error=str(exc))
            stream.refuse("refused")
            return
        port = _Port(self, stream, identity, addresses)
        for address in addresses:
            self._routes[address.ip.packed] = port
        self._by_identity[identity] = port
        carried = min(self.settings.mtu, _path_mtu(stream))
        answer = [(ADDRESS_HEADER, str(a)) for a in addresses] + [(MTU_HEADER, str(carried))]
        try:
            stream.accept(tuple(answer))
        except anyio.BrokenResourceError:  # reset (or its tunnel gone) before the answer
            self.port_ended(port)
            return
        stream.attach(port)
        log.info(
            "tun agent up",
            tunnel=stream.tunnel_name,
            addresses=[str(a.ip) for a in addresses],
            mtu=carried,
            agents=len(self._by_identity),
        )

    def port_ended(self, port: _Port) -> None:
        if self._by_identity.get(port.identity) is port:
            self._unplug(port)
            log.info(
                "tun agent down",
                tunnel=port.stream.tunnel_name,
                addresses=[str(a.ip) for a in port.addresses],
            )
        port.stream.close()

    def _unplug(self, port: _Port) -> None:
        now = time.monotonic()
        for address in port.addresses:
            if self._routes.get(address.ip.packed) is port:
                del self._routes[address.ip.packed]
        del self._by_identity[port.identity]
        for pool in self.pools:
            pool.release(port.identity, now)

    # ------------------------------------------------------------------ the data path
    def from_agent(self, port: _Port, packet: bytes) -> None:
        addresses = packet_addresses(packet)
        if addresses is None or addresses[0] not in port.sources:
            self.dropped_spoofed += 1
            if not port.warned and addresses is not None and not _link_local(addresses[0]):
                port.warned = True  # (the kernel's own IPv6 chatter comes from link-local addresses: no news)
                log.warning(
                    "tun packet dropped: its source is not the agent's address",
                    tunnel=port.stream.tunnel_name,
                    source=str(ipaddress.ip_address(addresses[0])),
                    agent=[str(a.ip) for a in port.addresses],
                )
            return
        destination = addresses[1]
        peer = self._routes.get(destination)
        if peer is not None:
            if not self.settings.client_to_client and peer is not port:
                self.dropped_forbidden += 1
                return
            self.forwarded += 1
            peer.send(packet)
            return
        if destination not in self._own and not self._allowed(destination):
            self.dropped_policy += 1
            return
        device = self.device
        if device is not None:
            device.write(packet)

    def _allowed(self, destination: bytes) -> bool:
        verdict = self._verdicts.get(destination)
        if verdict is None:
            try:
                self.policy.check_address(ipaddress.ip_address(destination))
                verdict = True
            except PolicyDenied:
                verdict = False
            if len(self._verdicts) >= _POLICY_CACHE:
                self._verdicts.clear()
            self._verdicts[destination] = verdict
        return verdict

    def _from_device(self, packets: list[bytes]) -> None:
        routes = self._routes
        for packet in packets:
            addresses = packet_addresses(packet)
            port = routes.get(addresses[1]) if addresses is not None else None
            if port is None:
                self.dropped_unrouted += 1
            else:
                port.send(packet)


def _link_local(address: bytes) -> bool:
    """An IPv6 link-local or unspecified address (never routed: neighbour discovery, router solicitations)."""
    return len(address) == 16 and ((address[0] == 0xFE and address[1] & 0xC0 == 0x80) or not any(address))


def _path_mtu(stream: TunnelStream) -> int:
    """The largest packet this side sends on ``stream`` without it leaving its path (unreliable datagrams), or
    :data:`RELIABLE_MTU` where every packet rides DATA frames."""
    unreliable = stream.max_unreliable_payload
    return unreliable if unreliable > 0 else RELIABLE_MTU


class _Masquerade:
    """``--tun-nat``: an nftables table of its own that masquerades the pools' traffic leaving by another
    interface, and IP forwarding on; removed (the table) when the server stops, replaced if a killed server left
    it."""

    def __init__(self, device: str, pools: Sequence[IPNetwork]) -> None:
        self.table = f"vtunnel-{device}"
        self.device = device
        self.pools = pools

    def _nft(self, script: str, *, check: bool = True) -> None:
        try:
            done = subprocess.run(
                ["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=10
            )
        except FileNotFoundError:
            raise TunError(2, "--tun-nat needs nft (nftables)") from None
        if check and done.returncode != 0:
            raise TunError(1, f"--tun-nat: nft failed: {done.stderr.strip()}")

    def install(self) -> None:
        rules = "\n".join(
            f'    ip{"6" if p.version == 6 else ""} saddr {p} oifname != "{self.device}" masquerade'
            for p in self.pools
        )
        self._nft(f"table inet {self.table}\ndelete table inet {self.table}\n")
        self._nft(
            f"table inet {self.table} {{\n  chain postrouting {{\n"
            f"    type nat hook postrouting priority srcnat; policy accept;\n{rules}\n  }}\n}}\n"
        )
        for pool in self.pools:
            path = (
                "/proc/sys/net/ipv4/ip_forward"
                if pool.version == 4
                else "/proc/sys/net/ipv6/conf/all/forwarding"
            )
            with open(path, "w") as f:
                f.write("1\n")

    def remove(self) -> None:
        with contextlib.suppress(TunError, OSError):
            self._nft(f"delete table inet {self.table}\n", check=False)


# ---------------------------------------------------------------------------------------------------- the agent
@dataclass(frozen=True, kw_only=True)
class TunAgentSettings:
    """``vtunnel agent --tun [--tun-route CIDR ...]``."""

    device: str = "vtun0"
    routes: tuple[IPNetwork, ...] = ()
    #: at most this MTU (the path's own limit otherwise)
    mtu: int | None = None
    open_timeout: float = 10.0


class TunAgent:
    """The agent's side of IP mode: its device, and one ``tun`` stream at a time on the agent's tunnels."""

    def __init__(self, settings: TunAgentSettings, pool: TunnelPool) -> None:
        self.settings = settings
        self.pool = pool
        self.identity = secrets.token_hex(16)
        self.device: TunDevice | None = None
        self.addresses: list[IPInterface] = []
        self.mtu = 0
        self._stream: TunnelStream | None = None
        self._ended = anyio.Event()
        self._stopping = False
        self.dropped = 0
        #: set whenever the device is configured for a stream (tests and the bench wait for it)
        self.ready = anyio.Event()

    async def run(self) -> None:
        """Keep a ``tun`` stream open (reopened when its tunnel dies) until cancelled; remove the device then."""
        backoff = Backoff(cap=2.0)
        # the device first: a missing capability is said at start, not once the tunnel is up
        self.device = TunDevice.open(self.settings.device)
        self.device.start(self._from_device)
        try:
            while True:
                try:
                    stream, conn = await self._open()
                except (TunnelUnavailable, StreamRefused) as exc:
                    delay = backoff.next_delay()
                    log.warning(
                        "tun stream not opened", error=str(exc) or repr(exc), retry_in=round(delay, 2)
                    )
                    await anyio.sleep(delay)
                    continue
                backoff.reset()
                try:
                    await self._configure(stream, conn)
                except BaseException:
                    stream.close()
                    raise
                self._ended = anyio.Event()
                self._stream = stream
                stream.attach(_AgentPort(self, stream))
                self.ready.set()
                await self._ended.wait()
                self._stream = None
                stream.close()
                if self._stopping:
                    return
                log.warning("tun stream ended: reopening", reason=stream.reset_error or "tunnel closed")
        finally:
            self.close()

    async def _open(self) -> tuple[TunnelStream, TunnelConnection]:
        conn = await self.pool.wait_ready(self.settings.open_timeout)
        if not conn.tunnel.extensions.tun:
            raise TunnelUnavailable("the server does not carry IP packets: start it with --tun CIDR")
        metadata = StreamMetadata(kind="tun", headers=((ID_HEADER, self.identity),))
        return await conn.open_stream(metadata), conn

    async def _configure(self, stream: TunnelStream, conn: TunnelConnection) -> None:
        headers = stream.accept_headers
        addresses = [ipaddress.ip_interface(v) for k, v in headers if k == ADDRESS_HEADER]
        if not addresses:
            raise TunnelUnavailable("the server's SYN-ACK gave no address")
        mtus = [_path_mtu(stream)]
        mtus += [int(v) for k, v in headers if k == MTU_HEADER and v.isdigit()]
        if self.settings.mtu is not None:
            mtus.append(self.settings.mtu)
        mtu = min(mtus)
        if any(a.version == 6 for a in addresses):
            mtu = max(mtu, IPV6_MIN_MTU)
        device = self.device
        if device is None:
            raise TunnelUnavailable("the tun device is closed")
        if addresses == self.addresses and mtu == self.mtu:
            return
        await anyio.to_thread.run_sync(
            lambda: configure_device(
                device.name, addresses=addresses, mtu=mtu, routes=self.settings.routes, alias="vtunnel agent"
            )
        )
        self.addresses, self.mtu = addresses, mtu
        log.info(
            "tun device up",
            device=device.name,
            addresses=[str(a) for a in addresses],
            mtu=mtu,
            routes=[str(r) for r in self.settings.routes],
            tunnel=conn.name,
        )

    def stop(self) -> None:
        """The agent is shutting down: end the stream and remove the device (:meth:`run` returns)."""
        self._stopping = True
        self._ended.set()
        self.close()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self.device is not None:
            self.device.close()
            log.info("tun device removed", device=self.device.name)
            self.device = None

    def _from_device(self, packets: list[bytes]) -> None:
        stream = self._stream
        if stream is None:
            self.dropped += len(packets)
            return
        for packet in packets:
            try:
                if stream.has_room() and stream.write(packet):
                    continue
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, ValueError):
                pass
            self.dropped += 1

    def stream_ended(self) -> None:
        self._ended.set()

    def to_device(self, packet: bytes) -> None:
        if self.device is not None:
            self.device.write(packet)


class _AgentPort:
    __slots__ = ("_agent", "_stream")

    def __init__(self, agent: TunAgent, stream: TunnelStream) -> None:
        self._agent = agent
        self._stream = stream

    def stream_data(self, data: bytes) -> None:
        self._stream.acknowledge(len(data))
        self._agent.to_device(data)

    def stream_eof(self) -> None:
        self._agent.stream_ended()

    def stream_broken(self) -> None:
        self._agent.stream_ended()

    def stream_writable(self) -> None:
        pass  # a packet that finds no room is dropped, never held

    def stream_spliced(self, dedicated: socket.socket, to_peer: bytes, ended: bool) -> bool:
        return False  # only a lite-tls stream is spliced
