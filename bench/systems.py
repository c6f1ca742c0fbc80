"""The systems under test and how to start them.

A :class:`SystemSpec` is data: ``direct`` (the client talks to the workload server itself), ``kcptun``
(Debian's ``kcptun-client``/``kcptun-server`` in the reference configuration) or ``vtunnel`` over one
transport, with or without the pre-shared key. :func:`start_stack` starts the workload server and the system's
processes for one placement and returns a :class:`Stack` whose ``entry`` is where the workload clients
connect; readiness is proven by an echo through the whole path, never by sleeping.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from bench.netem import Placement
from bench.procs import HarnessError, Proc, ProcessGroup, free_port, last_json_line, python_argv

__all__ = [
    "KCPTUN_ARGS",
    "TRANSPORT_URLS",
    "UDP_TRANSPORTS",
    "Stack",
    "SystemSpec",
    "agent_argv",
    "installed_transports",
    "kcptun_version",
    "make_psk_file",
    "run_client",
    "server_argv",
    "start_stack",
    "system_unavailable",
    "tunnel_url",
    "vtunnel_bin",
    "vtunnel_version",
    "wait_log",
]

log = structlog.get_logger("bench.systems")

#: Transport URL templates, one per vtunnel transport the harness knows (a scheme not installed is skipped).
TRANSPORT_URLS: Mapping[str, str] = {
    "tcp": "tcp://{host}:{port}",
    "kcp": "kcp://{host}:{port}?mode=fast3&mtu=1350",  # vtunnel's own windows (4096 segments)
    "rudp": "rudp://{host}:{port}",
}
#: Transports whose packets are UDP datagrams (they can run through the UDP impairment relay).
UDP_TRANSPORTS = frozenset({"kcp", "rudp"})

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

READY_TIMEOUT = 25.0


@dataclass(frozen=True, kw_only=True, slots=True)
class SystemSpec:
    """One system under test."""

    kind: str  # "direct" | "kcptun" | "vtunnel"
    transport: str | None = None
    keyed: bool = False

    @property
    def name(self) -> str:
        if self.kind != "vtunnel":
            return self.kind
        return f"vtunnel-{self.transport}" + ("+psk" if self.keyed else "")

    @property
    def udp(self) -> bool:
        return self.kind == "kcptun" or (self.kind == "vtunnel" and self.transport in UDP_TRANSPORTS)

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

    @property
    def entry(self) -> str:
        return f"{self.entry_host}:{self.entry_port}"

    def pids(self) -> dict[str, int]:
        """The tunnel's own processes (agent and server sides); the workload server is not counted."""
        return {role: p.pid for role, p in self.procs.items() if role in ("agent", "server", "relay")}

    def check_alive(self) -> None:
        for role, proc in self.procs.items():
            if not proc.alive():
                raise HarnessError(f"{self.system.name} {role} exited early: {proc.last_words()}")


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


def kcptun_version() -> str | None:
    if shutil.which("kcptun-client") is None:
        return None
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "kcptun"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    if out:
        return out
    try:
        return subprocess.run(
            ["kcptun-client", "-v"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def installed_transports() -> set[str]:
    """Transport schemes vtunnel can load here (empty when vtunnel's registry is missing)."""
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
            run_client(stack.placement, ["probe", "--connect", stack.entry, "--timeout", "2"], timeout=3)
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
) -> Stack:
    """Start the workload server and ``system`` on ``placement``; return once an echo crosses the whole path.

    ``relay`` (UDP systems on loopback only): impairment relay options; the client side then dials the relay,
    which forwards to the server.
    """
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
    entry_port = free_port()
    stack.entry_host = "127.0.0.1"
    stack.entry_port = entry_port
    target = f"{host}:{target_port}"
    stack.procs["server"] = group.spawn(
        f"{system.name}-server",
        [*placement.server_prefix, *server_argv(system, f"{host}:{tunnel_port}", target, psk_file)],
    )
    # The agent starts once the server listens: a first handshake sent into the void costs a retry backoff.
    wait_log(stack.procs["server"], "listening", READY_TIMEOUT)
    stack.procs["agent"] = group.spawn(
        f"{system.name}-agent",
        [
            *placement.client_prefix,
            *agent_argv(system, f"{host}:{dial_port}", f"127.0.0.1:{entry_port}", psk_file, kcptun_conns),
        ],
    )
    _wait_ready(stack, READY_TIMEOUT)
    return stack


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
    return template.format(host=host, port=port)


def server_argv(
    system: SystemSpec, listen: str, target: str, psk_file: Path | None, extra: Sequence[str] = ()
) -> list[str]:
    """The tunnel server's command line (kcptun-server or ``vtunnel server``) listening on ``listen``."""
    if system.kind == "kcptun":
        return ["kcptun-server", "-l", listen, "-t", target, *KCPTUN_ARGS, *extra]
    exe = vtunnel_bin()
    if exe is None:
        raise HarnessError("vtunnel is not installed")
    return [
        exe,
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
) -> list[str]:
    """The tunnel client's command line (kcptun-client or ``vtunnel agent``) from ``entry`` to ``server``."""
    if system.kind == "kcptun":
        return ["kcptun-client", "-l", entry, "-r", server, "--conn", str(conns), *KCPTUN_ARGS, *extra]
    exe = vtunnel_bin()
    if exe is None:
        raise HarnessError("vtunnel is not installed")
    return [
        exe,
        "agent",
        "--server",
        tunnel_url(system, server),
        "--forward",
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
