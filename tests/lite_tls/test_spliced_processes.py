"""lite-tls splice mode between real ``vtunnel server`` and ``vtunnel agent`` processes (their own event loop,
the command line's URL option): curl through the agent's SOCKS5 front to a local HTTPS origin, 64 MiB
byte-exact, and both processes' logs show the stream leaving the tunnel in splice mode."""

from __future__ import annotations

import functools
import json
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from tests.conftest import Processes, free_port, wait_log
from vtunnel.testing.ports import free_port_range

from .test_muxed import SPLICE_MARKS, body_for, ca_file, curl, origin

__all__ = ["ca_file"]

pytestmark = SPLICE_MARKS


def events(procs: Processes, proc: subprocess.Popen[bytes], name: str) -> list[dict[str, object]]:
    """The ``name`` events a process logged (``--log-format json``)."""
    lines = procs.output(proc).splitlines()
    return [e for e in (json.loads(line) for line in lines if line.startswith("{")) if e.get("event") == name]


def left(procs: Processes, proc: subprocess.Popen[bytes]) -> list[dict[str, object]]:
    return events(procs, proc, "lite_tls.left_tunnel")


async def test_curl_through_spliced_processes_is_byte_exact(
    procs: Processes, psk_file: Path, ca_file: str, tmp_path: Path
) -> None:
    size = 64 * 1024 * 1024
    port, splice, socks = free_port(), free_port(), free_port()
    common = ["--psk-file", str(psk_file), "--log-format", "json"]
    async with origin("1.3") as https:
        server = procs.start(
            "server", "--listen", f"tcp://127.0.0.1:{port}?splice={splice}", "--allow-private", *common
        )
        await anyio.to_thread.run_sync(wait_log, procs, server, "lite_tls.splice_listening")
        agent = procs.start(
            "agent",
            "--server",
            f"tcp://127.0.0.1:{port}?splice={splice}",
            "--socks",
            f"127.0.0.1:{socks}",
            *common,
        )
        await anyio.to_thread.run_sync(wait_log, procs, agent, "listening")
        out = tmp_path / "body"
        with anyio.fail_after(150):
            assert await curl(socks, f"https://127.0.0.1:{https}/bytes/{size}", out, ca=ca_file) == 0
        assert out.read_bytes() == body_for(size)
        with anyio.fail_after(10):
            while not (left(procs, server) and left(procs, agent)):
                await anyio.sleep(0.05)
    assert [e["mode"] for e in left(procs, server)] == ["spliced"]
    assert [e["mode"] for e in left(procs, agent)] == ["spliced"]
    assert {left(procs, server)[0]["role"], left(procs, agent)[0]["role"]} == {"active", "passive"}


async def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    with anyio.move_on_after(timeout):
        while not check():
            await anyio.sleep(0.05)
        return
    raise TimeoutError(f"{what}: not within {timeout:g} s")


def _splice_ports(procs: Processes, server: subprocess.Popen[bytes]) -> list[int]:
    return [
        int(str(e["address"]).rpartition(":")[2]) for e in events(procs, server, "lite_tls.splice_listening")
    ]


async def _download_all_spliced(
    procs: Processes,
    server: subprocess.Popen[bytes],
    agent: subprocess.Popen[bytes],
    *,
    socks: int,
    https: int,
    ca_file: str,
    tmp_path: Path,
    count: int,
) -> None:
    """``count`` HTTPS downloads through the agent, byte-exact, and each one left the tunnel spliced at both ends
    (on top of those before)."""
    size = 2 * 1024 * 1024
    before = len(left(procs, server)), len(left(procs, agent))
    for n in range(count):
        out = tmp_path / f"body{n}"
        with anyio.fail_after(60):
            assert await curl(socks, f"https://127.0.0.1:{https}/bytes/{size}", out, ca=ca_file) == 0
        assert out.read_bytes() == body_for(size)
    await _until(
        lambda: (len(left(procs, server)), len(left(procs, agent))) == (before[0] + count, before[1] + count),
        10,
        "every stream's left_tunnel",
    )
    assert [e["mode"] for e in left(procs, server)[before[0] :]] == ["spliced"] * count
    assert [e["mode"] for e in left(procs, agent)[before[1] :]] == ["spliced"] * count


@pytest.mark.parametrize("fixed", [False, True], ids=["splice=0", "splice=PORT"])
@pytest.mark.parametrize("scheme", ["tcp", "kcp"])
async def test_each_worker_announces_a_splice_port_of_its_own_and_every_stream_splices(
    scheme: str, fixed: bool, procs: Processes, psk_file: Path, ca_file: str, tmp_path: Path
) -> None:
    """``--workers 2``: each worker has a splice port of its own (``splice=0``: one it opens; ``splice=PORT``:
    PORT + its slot, bound by the supervisor) and announces it to its tunnels; the agent's 16 tunnels land on both
    workers (the kernel spreads them), and each stream's dedicated connection reaches the worker that holds its
    ticket, so every one leaves spliced at both ends. With a fixed port, a reload's workers take the other
    slots' ports and splice the same way."""
    count = 8
    port = free_port(socket.SOCK_DGRAM if scheme == "kcp" else socket.SOCK_STREAM)
    first = free_port_range(4) if fixed else 0
    socks = free_port()
    common = ["--psk-file", str(psk_file), "--log-format", "json"]
    async with origin("1.3") as https:
        server = procs.start(
            "server",
            "--listen",
            f"{scheme}://127.0.0.1:{port}?splice={first}",
            "--workers",
            "2",
            "--allow-private",
            *common,
        )
        await _until(lambda: len(_splice_ports(procs, server)) == 2, 60, "both workers' splice ports")
        if fixed:  # workers 0 and 1 on slots 0 and 1
            assert sorted(_splice_ports(procs, server)) == [first, first + 1]
        agent = procs.start(
            "agent",
            "--server",
            f"{scheme}://127.0.0.1:{port}",
            "--conn",
            "16",
            "--socks",
            f"127.0.0.1:{socks}",
            *common,
        )
        await _until(lambda: len(events(procs, agent, "tunnel up")) == 16, 60, "the agent's 16 tunnels")
        spliced = functools.partial(
            _download_all_spliced,
            procs,
            server,
            agent,
            socks=socks,
            https=https,
            ca_file=ca_file,
            tmp_path=tmp_path,
        )
        await spliced(count=count)
        assert {e["worker"] for e in left(procs, server)} == {0, 1}
        if not fixed:
            return
        # a reload: each worker's replacement runs on its other slot, with that slot's port
        server.send_signal(signal.SIGHUP)
        await _until(
            lambda: procs.output(server).count("worker replaced: the old one drains") == 2, 60, "the reload"
        )
        assert sorted(_splice_ports(procs, server)) == [first, first + 1, first + 2, first + 3]
        # the agent's tunnels to the old workers end as they drain: the new tunnels announce the new ports
        await _until(
            lambda: procs.output(server).count("replaced worker ended") == 2, 60, "the old workers' end"
        )
        await _until(lambda: len(events(procs, agent, "tunnel up")) >= 32, 60, "the agent's tunnels again")
        await spliced(count=4)


@pytest.mark.parametrize("scheme", ["tcp", "kcp"])
async def test_workers_bind_fixed_splice_ports_of_a_host_named_by_name(
    scheme: str, procs: Processes, psk_file: Path
) -> None:
    """``--listen tcp://localhost:...?splice=PORT --workers 2``: the supervisor binds the splice ports where the
    name resolves, as the tunnel's own listener, and each worker takes its own from them and answers there."""
    kind = socket.SOCK_DGRAM if scheme == "kcp" else socket.SOCK_STREAM
    port, first = free_port(kind), free_port_range(4)
    server = procs.start(
        "server",
        "--listen",
        f"{scheme}://localhost:{port}?splice={first}",
        "--workers",
        "2",
        "--psk-file",
        str(psk_file),
        "--log-format",
        "json",
    )
    await _until(lambda: len(_splice_ports(procs, server)) == 2, 60, "both workers' splice ports")
    assert sorted(_splice_ports(procs, server)) == [first, first + 1]
    if (
        scheme == "tcp"
    ):  # each worker accepts on its port (a connection without a ticket is parked, then closed)
        for splice in (first, first + 1):
            with socket.create_connection(("127.0.0.1", splice), timeout=5):
                pass
