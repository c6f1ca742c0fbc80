"""Scenarios, systems and links as data.

Each :class:`Scenario` names a workload kind, its parameters for a full run and for ``--quick``, the link it
runs on and how its rounds are scheduled. ``ROUNDS`` scenarios alternate the systems within every round (A B C
A B C ...), so slow drifts of a shared machine hit every system alike; ``ONCE`` scenarios (memory, idle CPU)
run one fresh stack per system. Add a transport by adding it to :data:`VTUNNEL_TRANSPORTS`; what is not
installed is skipped and the report says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from bench.systems import FEC_SHARDS, KCPTUN_PEER, PYTHON_FLOOR, SystemSpec

__all__ = [
    "LOSS_LEVELS",
    "NOT_AUTOMATIC",
    "RELAY_PROFILE",
    "ROUNDS",
    "RUDP_FAIR_RATE",
    "RUDP_LOSS_LEVELS",
    "RUDP_VETH_RATE",
    "SCENARIOS",
    "VTUNNEL_TRANSPORTS",
    "Scenario",
    "all_systems",
    "scenario_names",
]

MiB = 1024 * 1024

#: vtunnel transports to measure, in report order (a scheme that is not installed is skipped).
VTUNNEL_TRANSPORTS: tuple[str, ...] = ("tcp", "kcp", "rudp")

#: Rounds per run (systems alternate inside every round).
ROUNDS = {"full": 5, "quick": 2}

#: Loss levels of the goodput-vs-loss sweep (fraction of packets dropped in each direction).
LOSS_LEVELS = {"full": (0.0, 0.005, 0.01, 0.02, 0.05), "quick": (0.0, 0.01, 0.02, 0.05)}


#: The largest datagram the relay's links carry: Ethernet's MTU less IPv4's and UDP's headers (a transport that
#: discovers the path's MTU finds this, not loopback's 65536)
RELAY_MTU = "1472"


def relay_link(*knobs: str) -> tuple[str, ...]:
    """The relay's options: ``knobs``, then what every relay link of the bench has: 50 MB/s each way, an
    Ethernet MTU, the counters printed every second."""
    return (*knobs, "--rate", "50m", "--mtu", RELAY_MTU, "--stats-interval", "1")


#: The impaired UDP link of the relay scenarios, both directions: 5 ms +-1 ms one-way delay, 2% loss, 0.5%
#: reordered, 0.5% duplicated, 50 MB/s, an Ethernet MTU. Scenarios on the relay share one stack, so they share
#: this profile.
RELAY_PROFILE: tuple[str, ...] = relay_link(
    "--delay", "5", "--jitter", "1", "--loss", "0.02", "--reorder", "0.005", "--duplicate", "0.005"
)


#: Loss levels (percent each way) of the rudp comparison: rudp:// against kcp:// and kcptun at 20 ms RTT.
RUDP_LOSS_LEVELS: tuple[float, ...] = (0, 1, 2, 5, 10)


#: The veth link's rate each way in the rudp comparison (bytes per second): below what every one of the three
#: moves on loopback, so the link, not the processor, is the limit, and a sender that ignores congestion fills
#: its queue
RUDP_VETH_RATE = 25e6

#: The one bottleneck two rudp:// flows share in ``rudp-fair`` (bytes per second)
RUDP_FAIR_RATE = 12.5e6


def rudp_relay_profile(loss: float) -> tuple[str, ...]:
    """The relay's link of the rudp comparison: 10 ms one-way delay (20 ms RTT), ``loss`` each way, 50 MB/s, an
    Ethernet MTU."""
    return relay_link("--delay", "10", "--loss", f"{loss:g}")


def relay_profile(loss: float) -> tuple[str, ...]:
    """The relay's link of the FEC comparison: 5 ms +-1 ms one-way delay, ``loss`` each way, 50 MB/s, an Ethernet
    MTU."""
    return relay_link("--delay", "5", "--jitter", "1", "--loss", f"{loss:g}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Scenario:
    """One measurement, run for every applicable system.

    ``kind`` selects the workload: ``bulk``, ``rr``, ``ttfb``, ``idle_streams``, ``tunnels``, ``idle_cpu``,
    ``bulk_loss`` (bulk on a lossy namespace link, one sample per loss level), ``fairness`` (two tunnels'
    bulk transfers through one bottleneck: their shares and Jain's index), ``scaling`` (1 against 2 server
    workers, :mod:`bench.scaling`), ``bulk_wire`` (bulk through the
    relay, with the bytes on the wire per payload byte), ``rr_impaired``
    (request/response through the UDP impairment relay), ``stalled`` (one stream's goodput while others of
    its tunnel stall) or ``https_lite`` (a TLS download through a lite-tls stream, muxed and spliced, through an
    ordinary one and directly).
    ``params`` are for a full run; ``quick`` overrides some for ``--quick``. ``own_stack``
    scenarios get a fresh stack per system and round instead of sharing one with the others of their link.
    ``fec`` scenarios compare kcp:// with and without FEC: they run the kcp systems only, and only they run the
    ``+fec`` ones. ``kcptun_peer`` scenarios also run ``vtunnel-kcptun`` (a vtunnel agent against kcptun-server,
    beside kcptun's own pair); only they do.
    """

    name: str
    kind: str
    description: str
    params: Mapping[str, float] = field(default_factory=dict)
    quick: Mapping[str, float] = field(default_factory=dict)
    schedule: str = "rounds"  # "rounds" | "once"
    link: str = "loopback"  # "loopback" | "netns" | "relay"
    tunnels_only: bool = False  # the direct connection has nothing to measure
    vtunnel_only: bool = False  # needs more than one destination in one tunnel (kcptun has one target)
    udp_only: bool = False
    own_stack: bool = False
    relay_options: tuple[str, ...] = ()
    quick_rounds: int | None = None  # fewer rounds under --quick (None: the run's rounds)
    fec: bool = False
    only: tuple[str, ...] = ()  # the systems (base names) it applies to; empty: all
    #: clients reach the destination through the client side's SOCKS5 proxy (vtunnel's ``--socks`` front,
    #: shadowsocks' ss-local); only these scenarios run the ``shadowsocks`` system, and they need their own stack
    socks: bool = False
    kcptun_peer: bool = False
    #: ``netns`` scenarios: the one loss level it runs at (``None``: every level of the run's sweep) and the
    #: rate limit of each direction (bytes per second, ``None``: none)
    netns_loss: float | None = None
    netns_rate: float | None = None

    def netns_levels(self, sweep: tuple[float, ...]) -> tuple[float, ...]:
        """The loss levels a ``netns`` scenario is measured at."""
        return sweep if self.netns_loss is None else (self.netns_loss,)

    def settings(self, *, quick: bool) -> dict[str, float]:
        merged = dict(self.params)
        if quick:
            merged.update(self.quick)
        return merged

    def applies_to(self, system: SystemSpec) -> bool:
        if system.kind == "shadowsocks" and not self.socks:
            return False
        if system.kind == PYTHON_FLOOR and not (self.kind == "rr" and self.link == "loopback"):
            return False  # a latency floor: request/response on loopback only
        if self.socks and system.kind not in ("shadowsocks", "vtunnel"):
            return False
        if system.fec and not self.fec:
            return False
        if system.kind == KCPTUN_PEER and not self.kcptun_peer:
            return False
        if self.fec and system.transport != "kcp":
            return False
        if self.tunnels_only and not system.tunnel:
            return False
        if self.vtunnel_only and system.kind != "vtunnel":
            return False
        if self.only and system.base_name not in self.only:
            return False
        return not (self.udp_only and not system.udp)


def _https_lite_over(transport: str) -> Scenario:
    """``https-lite-kcp`` / ``https-lite-rudp``: lite-tls over a datagram transport with the key, where only splice
    mode (a keyless conversation per stream) takes the tunnel's cipher off the TLS bytes."""
    return Scenario(
        name=f"https-lite-{transport}",
        kind="https_lite",
        description=f"the same HTTPS-like bulk download over {transport}:// with the key: the stack's agent without "
        f"splice ({transport}:// then does not offer lite-tls: nothing leaves, every byte sealed), lite-tls spliced (a "
        f"second agent in splice mode: a keyless {transport}:// conversation per stream) against lite-tls off (an "
        "agent with --no-lite-tls to the same server) and direct; CPU s/GB of agent and server",
        params={"bytes": 256 * MiB, "timeout": 180},
        quick={"bytes": 64 * MiB, "timeout": 90},
        vtunnel_only=True,
        own_stack=True,
        only=(f"vtunnel-{transport}+psk",),
    )


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        name="bulk-1",
        kind="bulk",
        description="bulk goodput, 1 stream (validated by the sink)",
        params={"streams": 1, "bytes": 256 * MiB, "timeout": 120},
        quick={"bytes": 64 * MiB, "timeout": 60},
        kcptun_peer=True,
    ),
    Scenario(
        name="bulk-16",
        kind="bulk",
        description="bulk goodput, 16 parallel streams in one tunnel",
        params={"streams": 16, "bytes": 256 * MiB, "timeout": 120},
        quick={"bytes": 64 * MiB, "timeout": 60},
        kcptun_peer=True,
    ),
    Scenario(
        name="bulk-1024",
        kind="bulk",
        description="bulk goodput, 1,024 concurrent streams in one tunnel (aggregate; each connects, sends its "
        "share and is validated)",
        params={"streams": 1024, "bytes": 256 * MiB, "timeout": 180},
        # quick too: 256 KiB a stream. At 64 KiB a stream the load generator's own 1,024 connects and accepts
        # weigh more than the bytes: without any tunnel 1,024 streams then reach 0.3x the goodput of 16
        # (bench/results/many-streams-3.md), so the ratio measured the harness, not bulk streams
        quick={"timeout": 120},
        tunnels_only=True,
    ),
    Scenario(
        name="socks5-bulk",
        kind="bulk",
        description="bulk goodput, 1 stream through the client side's SOCKS5 proxy, and the CPU both ends spend "
        "per GB: vtunnel's --socks front over tcp:// vs shadowsocks-libev (aes-256-gcm)",
        params={"streams": 1, "bytes": 256 * MiB, "timeout": 120},
        quick={"bytes": 64 * MiB, "timeout": 60},
        socks=True,
        own_stack=True,
        only=("shadowsocks", "vtunnel-tcp", "vtunnel-tcp+psk"),
    ),
    Scenario(
        name="rr-64",
        kind="rr",
        description="64-byte request/response latency on one stream",
        params={"count": 20000, "timeout": 120},
        quick={"count": 2000, "timeout": 60},
        kcptun_peer=True,
    ),
    Scenario(
        name="ttfb",
        kind="ttfb",
        description="time to first byte: new connection, 64-byte request, whole answer",
        params={"count": 500, "timeout": 120},
        quick={"count": 100, "timeout": 60},
    ),
    Scenario(
        name="stalled",
        kind="stalled",
        description="goodput of 1 stream while 32 streams of its tunnel stall (destination never reads), "
        "vs the same transfer with none stalled; RSS growth of agent and server",
        # each stalled stream is pushed until it takes nothing for `quiet` s (at most `max_push` bytes); the
        # stalled sink's sockets have SO_RCVBUF `rcvbuf` (Linux doubles it)
        params={
            "stalled": 32,
            "bytes": 64 * MiB,
            "timeout": 120,
            "quiet": 1.0,
            "max_push": 64 * MiB,
            "rcvbuf": 4096,
        },
        # a tunnel whose other streams freeze (as before stalled streams stopped holding the tunnel window) fails
        # the transfer within `timeout`, reported as such
        quick={"bytes": 16 * MiB, "timeout": 15},
        vtunnel_only=True,
        own_stack=True,
    ),
    Scenario(
        name="ttfb-spliced",
        kind="ttfb_spliced",
        description="time to first byte of a plain (not TLS) connection through an agent in lite-tls splice mode "
        "(a second agent, forwarding to the workload server), beside the stack's own agent (muxed); CPU ms of "
        "the spliced agent and the server per connection",
        params={"count": 500, "timeout": 120},
        quick={"count": 100, "timeout": 60},
        vtunnel_only=True,
        own_stack=True,
        only=("vtunnel-tcp+psk",),
    ),
    Scenario(
        name="https-lite",
        kind="https_lite",
        description="HTTPS-like bulk download goodput (1 stream, TLS 1.3 from a TLS source) through lite-tls "
        "muxed, lite-tls spliced (a second agent in splice mode), lite-tls off (an ordinary stream of the same "
        "tunnel) and direct, side by side; CPU s/GB of agent and server",
        params={"bytes": 256 * MiB, "timeout": 120},
        quick={"bytes": 64 * MiB, "timeout": 60},
        vtunnel_only=True,
        own_stack=True,
        only=("vtunnel-tcp+psk",),
    ),
    *(_https_lite_over(transport) for transport in ("kcp", "rudp")),
    Scenario(
        name="idle-cpu",
        kind="idle_cpu",
        description="CPU of a quiet tunnel with one open idle stream (agent and server, /proc/PID/stat)",
        params={"seconds": 30},
        quick={"seconds": 10},
        schedule="once",
        tunnels_only=True,
    ),
    Scenario(
        name="idle-streams",
        kind="idle_streams",
        description="memory per idle stream: RSS delta of agent + server over N open streams in one tunnel",
        params={"streams": 10000, "timeout": 180, "concurrency": 16},
        quick={"streams": 1000, "timeout": 90},
        schedule="once",
        tunnels_only=True,
    ),
    Scenario(
        name="tunnels",
        kind="tunnels",
        description="memory per tunnel: server RSS delta over N tunnels from one client, one idle stream each",
        params={"tunnels": 1000, "timeout": 180},
        quick={"tunnels": 100, "timeout": 90},
        schedule="once",
        tunnels_only=True,
    ),
    Scenario(
        name="scaling",
        kind="scaling",
        description="aggregate bulk goodput of 4 agents (1 stream each) through a server of 1 and of 2 worker "
        "processes (--workers), alternated; the server's CPU seconds per GB (supervisor and workers)",
        params={"bytes": 128 * MiB, "timeout": 120, "rounds": 3},
        quick={"bytes": 32 * MiB, "timeout": 60, "rounds": 1},
        schedule="once",
        vtunnel_only=True,
        only=("vtunnel-tcp+psk", "vtunnel-kcp+psk"),
    ),
    Scenario(
        name="bulk-loss",
        kind="bulk_loss",
        description="bulk goodput (1 stream) vs packet loss on a veth link between two namespaces, "
        "nftables drop",
        params={"streams": 1, "bytes": 32 * MiB, "timeout": 60},
        quick={"bytes": 16 * MiB, "timeout": 30},
        link="netns",
        quick_rounds=1,
    ),
    Scenario(
        name="bulk-impaired",
        kind="bulk",
        description="bulk goodput (1 stream) through the UDP relay's impaired link (see Link)",
        # bulk throughput is the sustained rate, as bulk-1 measures it with 256 MiB: kcp:// paces, so it spends
        # about 0.1 s finding the link's rate (kcptun sends its whole window at once); with 128 MiB that is a few
        # percent of the transfer, with 32 MiB about a sixth. The quick run keeps 32 MiB
        params={"streams": 1, "bytes": 128 * MiB, "timeout": 120},
        quick={"bytes": 32 * MiB, "timeout": 60},
        link="relay",
        quick_rounds=1,
        udp_only=True,
        relay_options=RELAY_PROFILE,
    ),
    *(
        Scenario(
            name=f"bulk-fec-{level}",
            kind="bulk_wire",
            description=f"bulk goodput (1 stream) over kcp:// with and without FEC ({FEC_SHARDS}) at {level}% "
            "loss each way through the relay; wire bytes (both directions, as sent) per payload byte",
            params={"streams": 1, "bytes": 64 * MiB, "timeout": 120},
            quick={"bytes": 16 * MiB, "timeout": 60},
            link="relay",
            quick_rounds=1,
            fec=True,
            relay_options=relay_profile(level / 100),
        )
        for level in (2, 5)
    ),
    *(
        Scenario(
            name=f"rudp-loss-{level:g}",
            kind="bulk_wire",
            description=f"bulk goodput (1 stream) at 20 ms RTT and {level:g}% loss each way through the relay, "
            "rudp:// against kcp:// and kcptun; wire bytes (both directions, as sent) per payload byte",
            params={"streams": 1, "bytes": 64 * MiB, "timeout": 120},
            quick={"bytes": 16 * MiB, "timeout": 60},
            link="relay",
            quick_rounds=1,
            udp_only=True,
            relay_options=rudp_relay_profile(level / 100),
            only=("kcptun", "vtunnel-kcp", "vtunnel-rudp"),
        )
        for level in RUDP_LOSS_LEVELS
    ),
    *(
        Scenario(
            name=f"rudp-veth-{level:g}",
            kind="bulk_wire",
            description=f"bulk goodput (1 stream) on the veth link at {RUDP_VETH_RATE / 1e6:g} MB/s each way "
            f"(tbf, 256 KiB queue) and {level:g}% nftables loss each way, rudp:// against kcp:// and kcptun; "
            "wire bytes (both directions, as sent) per payload byte",
            params={"streams": 1, "bytes": 128 * MiB, "timeout": 120},
            quick={"bytes": 64 * MiB, "timeout": 60},
            link="netns",
            udp_only=True,
            netns_loss=level / 100,
            netns_rate=RUDP_VETH_RATE,
            only=("kcptun", "vtunnel-kcp", "vtunnel-rudp"),
        )
        for level in RUDP_LOSS_LEVELS
    ),
    Scenario(
        name="rudp-fair",
        kind="fairness",
        description=f"two tunnels (two agents, one server), one bulk stream each, the second started 1 s "
        f"after the first, through one {RUDP_FAIR_RATE / 1e6:g} MB/s bottleneck (the veth link, tbf, 256 KiB "
        "queue): Jain's index of what each brought through it while both ran, from 3 s after the second began",
        params={"bytes": 128 * MiB, "timeout": 120, "delay": 1.0, "settle": 3.0},
        quick={"bytes": 64 * MiB, "timeout": 90},
        link="netns",
        netns_loss=0.0,
        netns_rate=RUDP_FAIR_RATE,
        only=("vtunnel-kcp", "vtunnel-rudp"),
    ),
    Scenario(
        name="rr-impaired",
        kind="rr",
        description="64-byte request/response through the UDP relay's impaired link (see Link)",
        params={"count": 3000, "timeout": 120},
        quick={"count": 300, "timeout": 60},
        link="relay",
        quick_rounds=1,
        udp_only=True,
        relay_options=RELAY_PROFILE,
    ),
)


def scenario_names() -> list[str]:
    return [s.name for s in SCENARIOS]


#: Installed transports the harness does not pick up by itself (``tls://`` and the ws:// plugin's ``wss://``
#: need certificates of their own; ``ws://`` is measured, and wss:// is it inside TLS).
NOT_AUTOMATIC: frozenset[str] = frozenset({"tls", "wss"})


def all_systems(plugins: tuple[str, ...] = ()) -> list[SystemSpec]:
    """Every system in report order: direct, kcptun, vtunnel-kcptun, shadowsocks, python-floor, then vtunnel per transport
    (``plugins`` last), without and with the key (kcp also with FEC, for the ``fec`` scenarios)."""
    systems = [
        SystemSpec(kind="direct"),
        SystemSpec(kind="kcptun"),
        SystemSpec(kind=KCPTUN_PEER),
        SystemSpec(kind="shadowsocks"),
        SystemSpec(kind=PYTHON_FLOOR),
    ]
    for transport in (*VTUNNEL_TRANSPORTS, *plugins):
        systems.append(SystemSpec(kind="vtunnel", transport=transport, keyed=False))
        systems.append(SystemSpec(kind="vtunnel", transport=transport, keyed=True))
        if transport == "kcp":
            systems.append(SystemSpec(kind="vtunnel", transport=transport, keyed=False, fec=True))
            systems.append(SystemSpec(kind="vtunnel", transport=transport, keyed=True, fec=True))
    return systems
