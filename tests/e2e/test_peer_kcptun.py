"""``--peer kcptun`` against Debian's kcptun binaries: real processes on 127.0.0.1, bytes checked end to end.

vtunnel agent -> ``kcptun-server`` -> a TCP echo, and ``kcptun-client`` -> vtunnel server -> a TCP echo, 64 MiB
each way through the impairment relay at 5% loss each way, with crypt none and aes, FEC 0/0 and 10/3 (and
kcptun's other defaults: fast, snappy, smux v1, or smux v2 and no compression); ``conn=N`` spreading streams
over N sessions of the real kcptun-server; a front that names a destination is refused at start. (kcptun's other
ciphers against the real binaries: ``tests/kcptun/``.)
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import random
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, VTUNNEL, Processes, free_port, wait_log, wait_port
from tests.kcptun.peers import KCPTUN_CLIENT, KCPTUN_SERVER, kcptun_process, needs_kcptun
from tests.netutil import echo_server
from vtunnel.kcptun import KcptunConfig
from vtunnel.testing.relay import Impairment, ImpairmentRelay

pytestmark = [needs_kcptun, pytest.mark.timeout(120)]

PASSPHRASE = "kcptun's key, verbatim: spaces and all "
MiB = 1024 * 1024
BASE = 64 * MiB
#: of the datagrams the impairment relay loses, each way
LOSS = 0.05

#: (id, kcp:// query, kcptun's options for the same): the wire options both ends must agree on
CASES = [
    pytest.param("crypt=none&datashard=0&parityshard=0", ["--crypt", "none", "--datashard", "0", "--parityshard", "0"], id="none-fec0.0"),
    pytest.param("crypt=none", ["--crypt", "none"], id="none-fec10.3"),
    pytest.param("datashard=0&parityshard=0&nocomp&smuxver=2", ["--datashard", "0", "--parityshard", "0", "--nocomp", "--smuxver", "2"], id="aes-fec0.0-nocomp-smux2"),
    pytest.param("", [], id="aes-fec10.3-kcptun-defaults"),
]  # fmt: skip


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "kcptun.key"
    path.write_text(PASSPHRASE + "\nthe second line is not part of it\n")
    path.chmod(0o600)
    return path


def kcptun_key_args(query: str) -> list[str]:
    """kcptun's ``--key`` unless the case has no crypt (kcptun ignores it then)."""
    return [] if "crypt=none" in query else ["--key", PASSPHRASE]


@contextlib.contextmanager
def impairment(target: int, loss: float) -> Iterator[int]:
    """An :class:`ImpairmentRelay` to ``127.0.0.1:target`` losing ``loss`` of the datagrams each way, on an event
    loop of its own in a thread (the peers are processes); yields its port."""
    ready: list[int] = []
    started = threading.Event()
    stop: list[asyncio.Event] = []

    async def run() -> None:
        lossy = Impairment(loss=loss)
        async with ImpairmentRelay(("127.0.0.1", target), up=lossy, down=lossy, seed=14) as relay:
            stop.append(asyncio.Event())
            ready.append(relay.address[1])
            started.set()
            await stop[0].wait()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert started.wait(10), "the impairment relay did not start"
    try:
        yield ready[0]
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(10)
        loop.close()


def roundtrip(port: int, size: int, *, seed: int = 14) -> float:
    """Echo ``size`` bytes through ``port`` and read them all back before closing (kcptun takes a half-close for
    the end of both directions, so the answer is read first); seconds taken."""
    data = random.Random(seed).randbytes(size)  # incompressible: snappy must not shrink the test
    got = bytearray()
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        writer = threading.Thread(target=s.sendall, args=(data,), daemon=True)
        writer.start()
        while len(got) < size:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        writer.join(10)
    took = time.monotonic() - began
    assert len(got) == len(data)
    assert got == data
    return took


def kcp_url(port: int, query: str) -> str:
    return f"kcp://127.0.0.1:{port}" + (f"?{query}" if query else "")


@contextlib.contextmanager
def lossy_path(port: int, loss: float) -> Iterator[int]:
    """The port to reach ``port`` at: itself, or an impairment relay's when ``loss`` is set."""
    if not loss:
        yield port
        return
    with impairment(port, loss) as relayed:
        yield relayed


@contextlib.contextmanager
def agent_to_kcptun_server(
    procs: Processes,
    key: Path,
    echo: int,
    query: str,
    options: list[str],
    loss: float = 0.0,
    *,
    quiet: bool = True,
) -> Iterator[int]:
    """A real kcptun-server to ``echo`` and a vtunnel agent in front of it; yields the agent's forward port.
    ``quiet=False``: kcptun-server logs every stream it opens, with the session's UDP address."""
    assert KCPTUN_SERVER is not None
    port = free_port(2)
    args = ["--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{echo}", *options]
    args += ["--quiet"] if quiet else []
    with (
        kcptun_process(KCPTUN_SERVER, args + kcptun_key_args(query), procs.tmp / "kcptun-server.log"),
        lossy_path(port, loss) as reach,
    ):
        front = free_port()
        forward = ["--forward", f"127.0.0.1:{front}"]
        procs.start(
            "agent", "--peer", "kcptun", "--psk-file", str(key), "--server", kcp_url(reach, query), *forward
        )
        wait_port(front)
        yield front


@contextlib.contextmanager
def kcptun_client_to_server(
    procs: Processes, key: Path, echo: int, query: str, options: list[str], loss: float = 0.0
) -> Iterator[int]:
    """A vtunnel server to ``echo`` and a real kcptun-client in front of it; yields the client's local port."""
    assert KCPTUN_CLIENT is not None
    port = free_port(2)
    target = ["--target", f"127.0.0.1:{echo}"]
    server = procs.start(
        "server", "--peer", "kcptun", "--psk-file", str(key), "--listen", kcp_url(port, query), *target
    )
    wait_log(procs, server, "listening")
    with lossy_path(port, loss) as reach:
        front = free_port()
        args = [
            "--localaddr",
            f"127.0.0.1:{front}",
            "--remoteaddr",
            f"127.0.0.1:{reach}",
            *options,
            "--quiet",
        ]
        with kcptun_process(KCPTUN_CLIENT, args + kcptun_key_args(query), procs.tmp / "kcptun-client.log"):
            wait_port(front)
            yield front


PAIRINGS = {
    "vtunnel-agent-to-kcptun-server": agent_to_kcptun_server,
    "kcptun-client-to-vtunnel-server": kcptun_client_to_server,
}


@pytest.mark.parametrize(("query", "options"), CASES)
@pytest.mark.parametrize("pairing", PAIRINGS)
def test_64_mib_each_way_at_5_percent_loss(
    procs: Processes, key: Path, pairing: str, query: str, options: list[str]
) -> None:
    """64 MiB each way, byte-exact, through the impairment relay losing 5% of the datagrams each way."""
    with echo_server() as echo, PAIRINGS[pairing](procs, key, echo, query, options, loss=LOSS) as front:
        took = roundtrip(front, BASE)
        assert roundtrip(front, 100_000, seed=2) < 10  # a second stream on the same session
    print(f"{pairing} [{query or 'defaults'}] at 5% loss: {BASE // MiB} MiB each way in {took:.1f} s")


def test_conn_spreads_the_streams_over_that_many_sessions(procs: Processes, key: Path) -> None:
    """``conn=3`` (kcptun-client's ``--conn``): three UDP sessions to the real kcptun-server, the connections given
    to them in turn; kcptun-server's log names each stream's session by its UDP address."""
    with (
        echo_server() as echo,
        agent_to_kcptun_server(procs, key, echo, "conn=3", [], quiet=False) as front,
        concurrent.futures.ThreadPoolExecutor(6) as pool,
    ):
        held = [socket.create_connection(("127.0.0.1", front), timeout=30) for _ in range(6)]
        try:
            for i, sock in enumerate(held):  # every stream is open (and named in the log) before any ends
                sock.sendall(b"%d" % i)
                assert sock.recv(16) == b"%d" % i
            took = list(pool.map(lambda i: roundtrip(front, 4 * MiB, seed=i), range(6)))
        finally:
            for sock in held:
                sock.close()
        log = (procs.tmp / "kcptun-server.log").read_text(errors="replace")
    sessions = collections.Counter(re.findall(r"stream opened in: (\S+)\(\d+\)", log))
    assert len(sessions) == 3, sessions
    assert min(sessions.values()) >= 4, sessions  # 12 streams (and wait_port's) in turn: 4 or 5 each
    print(
        f"conn=3: 6 x 4 MiB each way at once, {max(took):.1f} s; streams per session {sorted(sessions.values())}"
    )


def test_a_kcptun_client_with_conn_gets_a_session_per_connection(procs: Processes, key: Path) -> None:
    """kcptun-client ``--conn 3`` opens three UDP sessions: the vtunnel server takes each, and serves them all."""
    with (
        echo_server() as echo,
        kcptun_client_to_server(procs, key, echo, "", ["--conn", "3"]) as front,
        concurrent.futures.ThreadPoolExecutor(6) as pool,
    ):
        list(pool.map(lambda i: roundtrip(front, MiB, seed=i), range(6)))
        log = procs.output(procs.procs[0])
    opened = re.findall(r"kcptun session opened .*client='?([0-9.:]+)", log)
    assert len(set(opened)) == 3, opened


def test_both_ends_from_the_toml_config(procs: Processes, key: Path) -> None:
    """``peer = "kcptun"`` and ``psk_file`` in ``[agent]`` and ``[server]``, each against the real binary."""
    assert KCPTUN_SERVER is not None
    assert KCPTUN_CLIENT is not None
    with echo_server() as echo:
        port = free_port(2)
        args = ["--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{echo}", "--key", PASSPHRASE]
        with kcptun_process(KCPTUN_SERVER, [*args, "--quiet"], procs.tmp / "kcptun-server.log"):
            front = free_port()
            agent_toml = procs.tmp / "agent.toml"
            agent_toml.write_text(
                f'[agent]\npeer = "kcptun"\nserver = "kcp://127.0.0.1:{port}"\npsk_file = "{key}"\n'
                f'forward = ["127.0.0.1:{front}"]\n'
            )
            procs.start("agent", "--config", str(agent_toml))
            wait_port(front)
            roundtrip(front, MiB)
        port = free_port(2)
        server_toml = procs.tmp / "server.toml"
        server_toml.write_text(
            f'[server]\npeer = "kcptun"\nlisten = ["kcp://127.0.0.1:{port}"]\npsk_file = "{key}"\n'
            f'target = "127.0.0.1:{echo}"\n'
        )
        server = procs.start("server", "--config", str(server_toml))
        wait_log(procs, server, "listening")
        front = free_port()
        args = ["--localaddr", f"127.0.0.1:{front}", "--remoteaddr", f"127.0.0.1:{port}", "--key", PASSPHRASE]
        with kcptun_process(KCPTUN_CLIENT, [*args, "--quiet"], procs.tmp / "kcptun-client.log"):
            wait_port(front)
            roundtrip(front, MiB)


def test_conn_is_a_client_option(key: Path) -> None:
    done = run_cli(
        "server", "--peer", "kcptun", "--listen", "kcp://127.0.0.1:0?crypt=none&conn=2", "--target", "h:1"
    )
    assert done.returncode == 2
    assert "conn is kcptun-client's option (--conn)" in done.stderr
    done = run_cli(
        "agent",
        "--peer",
        "kcptun",
        "--server",
        "kcp://127.0.0.1:9?crypt=none&conn=0",
        "--forward",
        "127.0.0.1:0",
    )
    assert done.returncode == 2
    assert "conn 0 out of range" in done.stderr


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VTUNNEL, *args], capture_output=True, text=True, cwd=ROOT, timeout=30)


@pytest.mark.parametrize(
    ("front", "named"),
    [
        (["--socks", "127.0.0.1:0"], "--socks"),
        (["--http", "127.0.0.1:0"], "--http"),
        (["--forward", "127.0.0.1:0=example.org:80"], "--forward ...=example.org:80"),
    ],
)
def test_a_front_that_names_a_destination_is_refused_at_start(
    key: Path, front: list[str], named: str
) -> None:
    done = run_cli(
        "agent", "--peer", "kcptun", "--server", "kcp://127.0.0.1:9", "--psk-file", str(key), *front
    )
    assert done.returncode == 2, done
    assert f"--peer kcptun cannot carry a destination ({named})" in done.stderr
    assert "use --forward LISTEN (no destination)" in done.stderr


def test_kcptun_options_are_checked_by_name_and_need_a_passphrase(key: Path) -> None:
    base = ["--peer", "kcptun", "--forward", "127.0.0.1:0"]
    done = run_cli("agent", *base, "--server", "kcp://127.0.0.1:9?crypt=none&fec=10/3")
    assert done.returncode == 2
    assert "unknown kcptun option 'fec'" in done.stderr
    done = run_cli("agent", *base, "--server", "kcp://127.0.0.1:9?crypt=rot13", "--psk-file", str(key))
    assert done.returncode == 2
    assert "crypt 'rot13' is not supported" in done.stderr
    done = run_cli("agent", *base, "--server", "kcp://127.0.0.1:9?crypt=tea", "--psk-file", str(key))
    assert done.returncode == 2
    assert "kcptun's crypt 'tea' is not supported: kcp-go's TEA runs 16 rounds" in done.stderr
    done = run_cli("agent", *base, "--server", "kcp://127.0.0.1:9")
    assert done.returncode == 2
    assert "needs kcptun's passphrase" in done.stderr
    done = run_cli("server", "--peer", "kcptun", "--listen", "kcp://127.0.0.1:0?crypt=none")
    assert done.returncode == 2
    assert "needs --target" in done.stderr


def test_the_url_takes_kcptuns_defaults() -> None:
    """No option in the URL: kcptun's own defaults (aes, fast, 10/3, snappy, smux v1; the client's windows)."""
    config = KcptunConfig.from_options({}, client=True, key="k")
    assert (config.crypt, config.mode, config.datashard, config.parityshard) == ("aes", "fast", 10, 3)
    assert (config.nocomp, config.smuxver, config.sndwnd, config.rcvwnd) == (False, 1, 128, 512)
    server = KcptunConfig.from_options({"nocomp": "", "smuxver": "2"}, client=False, key="k")
    assert (server.nocomp, server.smuxver, server.sndwnd, server.rcvwnd) == (True, 2, 1024, 1024)
