"""The stalled-streams scenario: a sink that never reads, the client that stalls streams on it, the kernel's
queues, and a whole run over a real tunnel."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.procs import tcp_queues
from bench.report import validate_document
from bench.workload import StalledSink, WorkloadError, stall_streams

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def _fill(sock: socket.socket, limit: int) -> int:
    """Send on a non-blocking socket until the kernel takes no more (at most ``limit`` bytes)."""
    sent = 0
    chunk = bytes(16384)
    while sent < limit:
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            return sent
    return sent


def test_the_stalled_sink_never_reads() -> None:
    sink = StalledSink("127.0.0.1", 0, rcvbuf=4096)
    try:
        with socket.create_connection(("127.0.0.1", sink.port)) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            client.setblocking(False)
            first = _fill(client, 8 * 1024 * 1024)
            assert first < 8 * 1024 * 1024, "the sink took everything: it reads"
            status: dict[str, object] = {}
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                status = sink.status()
                if status["connections"] == 1:
                    break
                time.sleep(0.05)
            assert status["connections"] == 1
            queued = status["queued_bytes"]
            assert isinstance(queued, list)
            rcvbuf = status["rcvbuf"]
            assert isinstance(rcvbuf, int)
            assert rcvbuf <= 2 * 4096 + 4096  # Linux doubles the value asked for, with a small floor
            assert 0 < queued[0] <= rcvbuf  # unread bytes wait in the sink's kernel queue
            # half a second later the sink's queue has not shrunk (a reader would empty it), and what the kernel
            # takes now is at most what a queue of that socket's size can hold
            time.sleep(0.5)
            later = _fill(client, 1024 * 1024)
            assert later <= rcvbuf
            now = sink.status()["queued_bytes"]
            assert isinstance(now, list)
            assert now[0] >= queued[0]
    finally:
        sink.close()


def test_tcp_queues_see_unread_bytes() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            conn, _ = listener.accept()
            with conn:
                client.sendall(b"x" * 10000)
                deadline = time.monotonic() + 10
                received = -1
                while time.monotonic() < deadline:
                    received = sum(rx for local, _, _, rx in tcp_queues() if local == port)
                    if received == 10000:
                        break
                    time.sleep(0.05)
                assert received == 10000
                assert conn.recv(20000)  # read: the queue empties
                assert sum(rx for local, _, _, rx in tcp_queues() if local == port) < 10000


@pytest.mark.anyio
async def test_stall_streams_stops_each_stream_when_it_takes_no_more() -> None:
    sink = StalledSink("127.0.0.1", 0, rcvbuf=4096)
    try:
        writers, pushed = await stall_streams(
            "127.0.0.1", sink.port, streams=4, time_limit=30, quiet=0.3, max_bytes=8 * 1024 * 1024
        )
        assert len(writers) == 4
        # what a direct connection absorbs: this side's small send buffer and the sink's receive buffer
        assert all(0 < n < 1024 * 1024 for n in pushed), pushed
        for writer in writers:
            writer.transport.abort()
        await asyncio.sleep(0.1)  # the aborted transports close their sockets on the loop's next turns
    finally:
        sink.close()


@pytest.mark.anyio
async def test_a_destination_that_reads_is_an_error_not_a_stall() -> None:
    async def discard(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(1 << 16):
                pass
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(discard, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(WorkloadError, match="without stalling"):
            await stall_streams(
                "127.0.0.1", port, streams=2, time_limit=30, quiet=0.5, max_bytes=4 * 1024 * 1024
            )


def test_a_whole_stalled_run_over_a_tunnel(tmp_path: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "bench",
        "run",
        "--quick",
        "--scenario",
        "stalled",
        "--system",
        "vtunnel-tcp",
    ]
    argv += ["--rounds", "2", "--out", str(tmp_path), "--name", "stalled"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    doc = json.loads((tmp_path / "stalled.json").read_text())
    assert validate_document(doc) == []
    samples = doc["samples"]
    assert [(s["system"], s["round"]) for s in samples] == [("vtunnel-tcp", 0), ("vtunnel-tcp", 1)]
    assert all(s["ok"] for s in samples), [s["error"] for s in samples]
    assert [s["raw"]["stalled_first"] for s in samples] == [False, True]  # the two transfers alternate
    for s in samples:
        m = s["metrics"]
        assert m["stalled_streams"] == 32
        assert m["goodput_ratio"] == pytest.approx(m["goodput_MBps"] / m["clean_goodput_MBps"])
        kernel = s["raw"]["kernel_queues"]
        assert set(kernel) == {"client_send", "agent_receive", "server_send", "sink_receive"}
        assert s["raw"]["sink"]["connections"] == 32
        # the sink never read: the kernel holds at most its small receive buffer per connection
        assert 0 < kernel["sink_receive"] <= 32 * s["raw"]["sink"]["rcvbuf"]
        assert m["pushed_per_stream_bytes"] * 32 == pytest.approx(sum(s["raw"]["pushed_bytes"]))
        assert (
            m["server_rss_growth_bytes"] == s["raw"]["rss_peak"]["server"] - s["raw"]["rss_fresh"]["server"]
        )
    targets = {t["target"] for t in doc["targets"]}
    assert any("stall" in t for t in targets)
    assert "## stalled" in (tmp_path / "stalled.md").read_text()
