"""The systems under test and how to start them.

A :class:`SystemSpec` is data: ``direct`` (the client talks to the workload server itself), ``kcptun``
(Debian's ``kcptun-client``/``kcptun-server`` in the reference configuration), ``vtunnel-kcptun`` (a vtunnel
agent with ``--peer kcptun`` in place of kcptun-client, against the same kcptun-server, the same configuration
given as ``kcp://`` options), ``shadowsocks`` (Debian's
shadowsocks-libev ``ss-local``/``ss-server`` with aes-256-gcm, a SOCKS5 proxy: SOCKS5 scenarios only) or
``vtunnel`` over one transport, with or without the pre-shared key. :func:`start_stack` starts the workload server and the system's
processes for one placement and returns a :class:`Stack` whose ``entry`` is where the workload clients
connect; readiness is proven by an echo through the whole path, never by sleeping. vtunnel processes start
through :mod:`bench.launch` and must report the package directory the system means to run (a ``--compare-ref``
twin: the exported tree of its commit, first on ``PYTHONPATH``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog

from bench.launch import CODE_MARKER
from bench.netem import Placement
from bench.procs import HarnessError, Proc, ProcessGroup, free_port, last_json_line, python_argv
from bench.refs import REPO_ROOT, RefTree

__all__ = [
    "FEC_SHARDS",
    "KCPTUN_ARGS",
    "KCPTUN_PEER",
    "SHADOWSOCKS_ARGS",
    "TRANSPORT_URLS",
    "UDP_TRANSPORTS",
    "Stack",
    "SystemSpec",
    "agent_argv",
    "code_env",
    "installed_transports",
    "kcptun_query",
    "kcptun_version",
    "make_psk_file",
    "run_client",
    "server_argv",
    "shadowsocks_version",
    "start_side_agent",
    "start_stack",
    "system_unavailable",
    "tunnel_url",
    "twin",
    "vtunnel_bin",
    "vtunnel_command",
    "vtunnel_version",
    "wait_log",
]

log = structlog.get_logger("bench.systems")

#: Transport URL templates, one per vtunnel transport the harness knows (a scheme not installed is skipped).
TRANSPORT_URLS: Mapping[str, str] = {
    "tcp": "tcp://{host}:{port}",
    "kcp": "kcp://{host}:{port}?mode=fast3&mtu=1350",  # vtunnel's own windows (4096 segments)
    "rudp": "rudp://{host}:{port}",
    "quic": "quic://{host}:{port}",  # the vtunnel-quic plugin; found like any installed plugin
    "ws": "ws://{host}:{port}?path=/t",  # the vtunnel-websocket plugin
}
#: Transports whose packets are UDP datagrams (they can run through the UDP impairment relay).
UDP_TRANSPORTS = frozenset({"kcp", "rudp", "quic"})
#: the FEC shards of a ``+fec`` system (kcp:// only)
FEC_SHARDS = "10/3"

#: kcptun's reference configuration (both sides).
KCPTUN_ARGS: tuple[str, ...] = (
    "--mode",
    "fast3",
    "--sndwnd",
    "1024",
    "--rcvwnd",
    "1024",
    "--crypt",
    "none",
    "--nocomp",
    "--datashard",
    "0",
    "--parityshard",
    "0",
    "--quiet",
    "--key",
    "vtunnel-bench",
)

#: the system of a vtunnel agent (``--peer kcptun``) against kcptun-server
KCPTUN_PEER = "vtunnel-kcptun"
#: two minimal Python relays (``bench.floor``) in the agent's and the server's places: the floor of latency
PYTHON_FLOOR = "python-floor"


def kcptun_query(args: Sequence[str] = KCPTUN_ARGS) -> tuple[str, str]:
    """kcptun's command-line options as the ``kcp://`` query of ``--peer kcptun`` (kcptun's own names) and the
    passphrase (``--key``, which goes in a file, never in a URL)."""
    options: list[str] = []
    key = ""
    rest = list(args)
    while rest:
        name = rest.pop(0).removeprefix("--")
        if name == "quiet":
            continue
        if name == "nocomp":
            options.append(name)
        elif name == "key":
            key = rest.pop(0)
        else:
            options.append(f"{name}={rest.pop(0)}")
    return "&".join(options), key


#: shadowsocks-libev's configuration (both sides): the AEAD cipher of the SOCKS5 comparison, TCP only.
SHADOWSOCKS_ARGS: tuple[str, ...] = ("-m", "aes-256-gcm", "-k", "vtunnel-bench")

READY_TIMEOUT = 25.0

#: Started with ``python -P`` by path: only ``PYTHONPATH`` decides which vtunnel it runs (see bench.launch).
LAUNCHER = Path(__file__).resolve().with_name("launch.py")


@dataclass(frozen=True, kw_only=True, slots=True)
class SystemSpec:
    """One system under test; a vtunnel system with ``ref`` runs the vtunnel package exported from that commit."""

    kind: str  # "direct" | "kcptun" | "vtunnel-kcptun" | "shadowsocks" | "python-floor" | "vtunnel"
    transport: str | None = None
    keyed: bool = False
    #: kcp:// with forward error correction (``fec=`` :data:`FEC_SHARDS`)
    fec: bool = False
    ref: RefTree | None = None

    @property
    def base_name(self) -> str:
        """The name without the ``@commit`` of a twin."""
        if self.kind != "vtunnel":
            return self.kind
        return f"vtunnel-{self.transport}" + ("+psk" if self.keyed else "") + ("+fec" if self.fec else "")

    @property
    def name(self) -> str:
        return self.base_name + (f"@{self.ref.short}" if self.ref is not None else "")

    @property
    def udp(self) -> bool:
        return self.kind in ("kcptun", KCPTUN_PEER) or (
            self.kind == "vtunnel" and self.transport in UDP_TRANSPORTS
        )

    @property
    def tunnel(self) -> bool:
        return self.kind != "direct"


@dataclass(kw_only=True, slots=True)
class Stack:
    """A running system: where clients connect, and the processes to watch."""

    system: SystemSpec
    placement: Placement
    entry_host: str
    entry_port: int
    procs: dict[str, Proc] = field(default_factory=dict)
    #: where a SOCKS5 stack's clients ask the proxy to connect (``None``: the entry forwards by itself)
    socks_target: str | None = None
    side_entries: dict[str, str] = field(default_factory=dict)  # more destinations: their local entry
    tunnel: str = ""  # host:port the agent dials (vtunnel)
    code: dict[str, str] = field(default_factory=dict)  # vtunnel package directory each vtunnel process runs
    target: str = ""  # the workload server (host:port)

    @property
    def entry(self) -> str:
        return f"{self.entry_host}:{self.entry_port}"

    def client_args(self) -> list[str]:
        """How a workload client reaches the destination: the entry, or the destination through the entry's
        SOCKS5 proxy."""
        if self.socks_target is None:
            return ["--connect", self.entry]
        return ["--socks5", self.entry, "--connect", self.socks_target]

    def pids(self) -> dict[str, int]:
        """The tunnel's own processes (agent and server sides); the workload server is not counted."""
        return {role: p.pid for role, p in self.procs.items() if role in ("agent", "server", "relay")}

    def check_alive(self) -> None:
        for role, proc in self.procs.items():
            if not proc.alive():
                raise HarnessError(f"{self.system.name} {role} exited early: {proc.last_words()}")


def twin(system: SystemSpec, ref: RefTree) -> SystemSpec:
    """The same vtunnel system running the code of ``ref``."""
    if system.kind != "vtunnel":
        raise HarnessError(f"{system.name} is not a vtunnel system: it has no twin at another commit")
    return SystemSpec(
        kind=system.kind, transport=system.transport, keyed=system.keyed, fec=system.fec, ref=ref
    )


def code_env(system: SystemSpec, *, with_bench: bool = False) -> dict[str, str]:
    """Environment of a process that runs ``system``'s vtunnel code: a twin's exported tree first on
    ``PYTHONPATH`` (and the harness's own directory after it when the process runs a ``bench`` module)."""
    if system.ref is None:
        return {}
    paths = [str(system.ref.path)]
    if with_bench:
        paths.append(str(REPO_ROOT))
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {"PYTHONPATH": os.pathsep.join(paths)}


def vtunnel_command() -> list[str]:
    """How the harness runs the ``vtunnel`` command: this interpreter, ``-P``, :mod:`bench.launch` by path."""
    return [sys.executable, "-P", str(LAUNCHER)]


def expected_code(system: SystemSpec) -> Path:
    """The vtunnel package directory ``system``'s processes must run."""
    if system.ref is not None:
        return system.ref.package.resolve()
    import vtunnel

    return Path(vtunnel.__file__).resolve().parent


def check_code(proc: Proc, system: SystemSpec) -> str:
    """The package directory ``proc`` reported it runs (``bench.launch``); an error unless it is the expected one."""
    for line in proc.log_tail(1 << 20).splitlines():
        if line.startswith(CODE_MARKER):
            ran = line[len(CODE_MARKER) :].strip()
            if Path(ran) != expected_code(system):
                raise HarnessError(f"{proc.name} runs vtunnel from {ran}, not from {expected_code(system)}")
            return ran
    raise HarnessError(f"{proc.name} did not say which vtunnel it runs")


def vtunnel_bin() -> str | None:
    """The ``vtunnel`` console script next to this interpreter, or on PATH."""
    local = Path(sys.executable).with_name("vtunnel")
    if local.exists():
        return str(local)
    return shutil.which("vtunnel")


def vtunnel_version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("vtunnel")
    except (ImportError, PackageNotFoundError):
        return None


def _package_version(package: str) -> str:
    """The installed Debian package's version, or an empty string (not installed that way, or no dpkg)."""
    try:
        return subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def kcptun_version() -> str | None:
    if shutil.which("kcptun-client") is None:
        return None
    out = _package_version("kcptun")
    if out:
        return out
    try:
        return subprocess.run(
            ["kcptun-client", "-v"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def shadowsocks_version() -> str | None:
    """shadowsocks-libev's Debian package version, ``unknown`` when installed another way, or None."""
    if shutil.which("ss-local") is None:
        return None
    return _package_version("shadowsocks-libev") or "unknown"


def installed_transports(ref: RefTree | None = None) -> set[str]:
    """Transport schemes vtunnel can load here (empty when vtunnel's registry is missing); with ``ref``, the
    schemes the exported tree of that commit loads (asked of ``vtunnel transports`` run from that tree)."""
    if ref is not None:
        probe = SystemSpec(kind="vtunnel", ref=ref)
        try:
            out = subprocess.run(
                [*vtunnel_command(), "transports"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                env={**os.environ, **code_env(probe)},
            )
        except (OSError, subprocess.TimeoutExpired):
            return set()
        if f"{CODE_MARKER}{expected_code(probe)}" not in out.stderr:
            return set()
        return {line.split()[0] for line in out.stdout.splitlines() if line.split() and "BROKEN" not in line}
    try:
        from vtunnel.transports.base import available_transports
    except ImportError:
        return set()
    return {name for name, cls in available_transports().items() if not isinstance(cls, Exception)}


def system_unavailable(system: SystemSpec, transports: set[str]) -> str | None:
    """Why ``system`` cannot run here, or ``None``."""
    if system.kind == "kcptun":
        if shutil.which("kcptun-client") is None or shutil.which("kcptun-server") is None:
            return "kcptun is not installed (run bench/setup.sh)"
        return None
    if system.kind == KCPTUN_PEER:
        if shutil.which("kcptun-server") is None:
            return "kcptun is not installed (run bench/setup.sh)"
        if vtunnel_bin() is None:
            return "the vtunnel command is not installed"
        return None
    if system.kind == "shadowsocks":
        if shutil.which("ss-local") is None or shutil.which("ss-server") is None:
            return "shadowsocks-libev is not installed (run bench/setup.sh)"
        return None
    if system.kind == "vtunnel":
        if vtunnel_bin() is None:
            return "the vtunnel command is not installed"
        if system.transport not in transports:
            return f"transport {system.transport}:// is not installed"
    return None


def run_client(placement: Placement, args: Sequence[str], *, timeout: float) -> dict[str, object]:
    """Run one workload client (``python -m bench.workload ARGS``) on the client side and return its JSON."""
    argv = [*placement.client_prefix, *python_argv("bench.workload", *args)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 15, check=False)
    except subprocess.TimeoutExpired:
        raise HarnessError(f"workload client {args[0]} overran its {timeout} s limit") from None
    result = last_json_line(proc.stdout)
    if not result.get("ok"):
        raise HarnessError(f"workload {args[0]} failed: {result.get('error', proc.stderr[-400:])}")
    return result


def wait_log(proc: Proc, marker: str, timeout: float) -> None:
    """Wait until ``marker`` appears in ``proc``'s log (both vtunnel and kcptun log "listening" when ready)."""
    deadline = time.monotonic() + timeout
    while marker not in proc.log_tail(1 << 20):
        if not proc.alive():
            raise HarnessError(f"{proc.name} exited: {proc.last_words()}")
        if time.monotonic() >= deadline:
            raise HarnessError(f"{proc.name} did not report {marker!r} within {timeout} s")
        time.sleep(0.05)


def _wait_ready(stack: Stack, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        stack.check_alive()
        left = deadline - time.monotonic()
        if left <= 0:
            raise HarnessError(f"{stack.system.name} did not carry an echo within {timeout} s")
        try:
            run_client(stack.placement, ["probe", *stack.client_args(), "--timeout", "2"], timeout=3)
            return
        except HarnessError:
            time.sleep(0.2)


def start_stack(
    system: SystemSpec,
    group: ProcessGroup,
    placement: Placement,
    *,
    psk_file: Path | None = None,
    relay: Sequence[str] | None = None,
    kcptun_conns: int = 1,
    side_targets: Sequence[str] = (),
    agent_extra: Sequence[str] = (),
    socks: bool = False,
    splice_port: int | None = None,
) -> Stack:
    """Start the workload server and ``system`` on ``placement``; return once an echo crosses the whole path.

    ``relay`` (UDP systems on loopback only): impairment relay options; the client side then dials the relay,
    which forwards to the server. ``side_targets`` (vtunnel only): more destinations the agent forwards to in
    the same tunnel (``--forward LOCAL=DEST``), each reachable at ``stack.side_entries[dest]``. ``agent_extra``:
    more options of the vtunnel agent. ``socks``: the entry is the client side's SOCKS5 proxy (vtunnel's
    ``--socks`` front, or ss-local), and clients name the workload server in their CONNECT. ``splice_port``: the server also listens there
    for the dedicated connections of spliced lite-tls streams (``splice=PORT``), and the stack's agent stays
    muxed (``splice=off``: vtunnel code from 28f2cf2 on; see :func:`start_side_agent`).
    """
    if socks and system.kind not in ("vtunnel", "shadowsocks"):
        raise HarnessError(f"{system.name} has no SOCKS5 front")
    if system.kind == "shadowsocks" and not socks:
        raise HarnessError(f"{system.name} is a SOCKS5 proxy: it runs SOCKS5 scenarios only")
    if side_targets and system.kind != "vtunnel":
        raise HarnessError(f"{system.name} forwards to one target only")
    host = placement.server_host
    target_port = free_port()
    sink = group.spawn(
        "workload",
        [
            *placement.server_prefix,
            *python_argv("bench.workload", "serve", "--listen", f"{host}:{target_port}"),
        ],
    )
    stack = Stack(
        system=system, placement=placement, entry_host=host, entry_port=target_port, procs={"sink": sink}
    )
    if system.kind == "direct":
        _wait_ready(stack, READY_TIMEOUT)
        return stack
    if system.kind == PYTHON_FLOOR:
        return _start_floor(stack, group, placement, f"{host}:{target_port}")

    tunnel_port = free_port()
    dial_port = tunnel_port
    if relay is not None:
        from bench.netem import relay_argv

        if not placement.loopback:
            raise HarnessError("the UDP relay runs on loopback placements only")
        dial_port = free_port(socket.SOCK_DGRAM)
        stack.procs["relay"] = group.spawn(
            "relay", relay_argv(f"127.0.0.1:{dial_port}", f"127.0.0.1:{tunnel_port}", relay)
        )
    if system.kind == KCPTUN_PEER:
        psk_file = _kcptun_key_file(group.log_dir)
    entry_port = free_port()
    stack.entry_host = "127.0.0.1"
    stack.entry_port = entry_port
    target = f"{host}:{target_port}"
    stack.target = target
    if socks:
        stack.socks_target = target
    env = code_env(system)
    server = server_argv(system, f"{host}:{tunnel_port}", target, psk_file)
    if splice_port is not None:
        at = server.index("--listen") + 1
        server[at] += ("&" if "?" in server[at] else "?") + f"splice={splice_port}"
    stack.procs["server"] = group.spawn(f"{system.name}-server", [*placement.server_prefix, *server], env=env)
    stack.tunnel = f"{host}:{dial_port}"
    # The agent starts once the server listens: a first handshake sent into the void costs a retry backoff.
    wait_log(stack.procs["server"], "listening", READY_TIMEOUT)
    forwards: list[str] = []
    for dest in side_targets:
        port = free_port()
        stack.side_entries[dest] = f"127.0.0.1:{port}"
        forwards += ["--forward", f"127.0.0.1:{port}={dest}"]
    forwards += agent_extra
    agent = agent_argv(
        system,
        f"{host}:{dial_port}",
        f"127.0.0.1:{entry_port}",
        psk_file,
        kcptun_conns,
        forwards,
        socks=socks,
    )
    if splice_port is not None:
        # the stack's agent stays muxed: told nothing, it would splice at the port its server announces
        at = agent.index("--server") + 1
        agent[at] += ("&" if "?" in agent[at] else "?") + "splice=off"
    stack.procs["agent"] = group.spawn(f"{system.name}-agent", [*placement.client_prefix, *agent], env=env)
    _wait_ready(stack, READY_TIMEOUT)
    if system.kind == "vtunnel":
        stack.code = {role: check_code(stack.procs[role], system) for role in ("server", "agent")}
    elif system.kind == KCPTUN_PEER:
        stack.code = {"agent": check_code(stack.procs["agent"], system)}
    return stack


def _start_floor(stack: Stack, group: ProcessGroup, placement: Placement, target: str) -> Stack:
    """Two ``bench.floor`` relays in a row, in the server's place (to ``target``) and the agent's."""
    if not placement.loopback:
        raise HarnessError("the python-floor relays run on loopback placements only")
    middle = f"127.0.0.1:{free_port()}"
    entry_port = free_port()
    for role, listen, to in (("server", middle, target), ("agent", f"127.0.0.1:{entry_port}", middle)):
        proc = group.spawn(
            f"{PYTHON_FLOOR}-{role}", python_argv("bench.floor", "--listen", listen, "--to", to)
        )
        stack.procs[role] = proc
        wait_log(proc, "listening", READY_TIMEOUT)
    stack.entry_host = "127.0.0.1"
    stack.entry_port = entry_port
    stack.tunnel = middle
    stack.target = target
    _wait_ready(stack, READY_TIMEOUT)
    return stack


def _kcptun_key_file(directory: Path) -> Path:
    """kcptun's passphrase of the reference configuration in a private file, for ``--peer kcptun``."""
    path = directory / "kcptun.key"
    path.write_text(kcptun_query()[1] + "\n")
    path.chmod(0o600)
    return path


def start_side_agent(
    stack: Stack,
    group: ProcessGroup,
    psk_file: Path | None,
    name: str,
    dest: str,
    *,
    splice_port: int | None = None,
    extra: Sequence[str] = (),
) -> str:
    """Another vtunnel agent of ``stack`` (process ``name``) to the same server, forwarding a local port to
    ``dest``: in lite-tls splice mode with ``splice_port`` (its server URL names the server's splice port), with
    ``extra`` arguments (``--no-lite-tls``); returns that local entry once the agent listens."""
    system = stack.system
    url = tunnel_url(system, stack.tunnel)
    if splice_port is not None:
        url += ("&" if "?" in url else "?") + f"splice={splice_port}"
    entry = f"127.0.0.1:{free_port()}"
    argv = [
        *vtunnel_command(),
        "agent",
        "--server",
        url,
        "--forward",
        f"{entry}={dest}",
        *extra,
        *_security(system, psk_file),
    ]
    proc = group.spawn(f"{system.name}-{name}", [*stack.placement.client_prefix, *argv], env=code_env(system))
    stack.procs[name] = proc
    wait_log(proc, "listening", READY_TIMEOUT)
    return entry


def start_keyless_twin(stack: Stack, group: ProcessGroup, name: str, dest: str) -> str:
    """A second server and agent of ``stack``'s system on the same transport with no key (``--insecure``), the
    agent forwarding a local port to ``dest``: the same code carrying the same bytes with no cipher anywhere.
    Processes ``server-NAME`` and ``agent-NAME``; returns the agent's local entry once it listens."""
    plain = replace(stack.system, keyed=False)
    host = stack.placement.server_host
    listen = f"{host}:{free_port()}"
    env = code_env(plain)
    server = group.spawn(
        f"{plain.name}-server-{name}",
        [*stack.placement.server_prefix, *server_argv(plain, listen, dest, None)],
        env=env,
    )
    stack.procs[f"server-{name}"] = server
    wait_log(server, "listening", READY_TIMEOUT)
    entry = f"127.0.0.1:{free_port()}"
    argv = [
        *vtunnel_command(),
        "agent",
        "--server",
        tunnel_url(plain, listen),
        "--forward",
        f"{entry}={dest}",
    ]
    agent = group.spawn(
        f"{plain.name}-agent-{name}",
        [*stack.placement.client_prefix, *argv, *_security(plain, None)],
        env=env,
    )
    stack.procs[f"agent-{name}"] = agent
    wait_log(agent, "listening", READY_TIMEOUT)
    return entry


def _security(system: SystemSpec, psk_file: Path | None) -> list[str]:
    if not system.keyed:
        return ["--insecure"]
    if psk_file is None:
        raise HarnessError(f"{system.name} needs a key file (vtunnel keygen failed)")
    return ["--psk-file", str(psk_file)]


def tunnel_url(system: SystemSpec, hostport: str) -> str:
    """The vtunnel transport URL of ``system`` at ``host:port``."""
    host, _, port = hostport.rpartition(":")
    if system.transport is None:
        raise HarnessError(f"{system.name} has no transport")
    template = TRANSPORT_URLS.get(system.transport, system.transport + "://{host}:{port}")
    url = template.format(host=host, port=port)
    if system.fec:
        url += ("&" if "?" in url else "?") + f"fec={FEC_SHARDS}"
    return url


def server_argv(
    system: SystemSpec, listen: str, target: str, psk_file: Path | None, extra: Sequence[str] = ()
) -> list[str]:
    """The tunnel server's command line (kcptun-server or ``vtunnel server``) listening on ``listen``; run a
    vtunnel one with :func:`code_env`."""
    if system.kind in ("kcptun", KCPTUN_PEER):
        return ["kcptun-server", "-l", listen, "-t", target, *KCPTUN_ARGS, *extra]
    if system.kind == "shadowsocks":
        host, _, port = listen.rpartition(":")
        return ["ss-server", "-s", host, "-p", port, *SHADOWSOCKS_ARGS, *extra]
    return [
        *vtunnel_command(),
        "server",
        "--listen",
        tunnel_url(system, listen),
        "--target",
        target,
        "--allow-private",
        *_security(system, psk_file),
        *extra,
    ]


def agent_argv(
    system: SystemSpec,
    server: str,
    entry: str,
    psk_file: Path | None,
    conns: int = 1,
    extra: Sequence[str] = (),
    *,
    socks: bool = False,
) -> list[str]:
    """The tunnel client's command line (kcptun-client, ss-local or ``vtunnel agent``) from ``entry`` to
    ``server``; run a vtunnel one with :func:`code_env`. ``socks``: ``entry`` is a SOCKS5 front, not a forward.
    ``vtunnel-kcptun``: ``psk_file`` holds kcptun's passphrase, and ``conns`` is kcptun's ``--conn``."""
    if system.kind == "kcptun":
        return ["kcptun-client", "-l", entry, "-r", server, "--conn", str(conns), *KCPTUN_ARGS, *extra]
    if system.kind == KCPTUN_PEER:
        if psk_file is None:
            raise HarnessError(f"{system.name} needs kcptun's passphrase in a file")
        query = kcptun_query()[0] + (f"&conn={conns}" if conns != 1 else "")
        return [
            *vtunnel_command(),
            "agent",
            "--peer",
            "kcptun",
            "--server",
            f"kcp://{server}?{query}",
            "--forward",
            entry,
            "--psk-file",
            str(psk_file),
            *extra,
        ]
    if system.kind == "shadowsocks":
        server_host, _, server_port = server.rpartition(":")
        entry_host, _, entry_port = entry.rpartition(":")
        return [
            "ss-local",
            "-s",
            server_host,
            "-p",
            server_port,
            "-b",
            entry_host,
            "-l",
            entry_port,
            *SHADOWSOCKS_ARGS,
            *extra,
        ]
    return [
        *vtunnel_command(),
        "agent",
        "--server",
        tunnel_url(system, server),
        "--socks" if socks else "--forward",
        entry,
        *_security(system, psk_file),
        *extra,
    ]


def make_psk_file(directory: Path) -> Path | None:
    """Write a fresh key file (mode 0600) with ``vtunnel keygen -o``; ``None`` when the command is not available."""
    exe = vtunnel_bin()
    if exe is None:
        return None
    path = directory / "bench.key"
    try:
        proc = subprocess.run(
            [exe, "keygen", "-o", str(path), "--force"], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0 or not path.is_file():
        return None
    return path
