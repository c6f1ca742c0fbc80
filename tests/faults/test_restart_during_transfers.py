"""The server restarts while 50 transfers run through one agent: nothing is lost, and the agent carries on.

Real processes and sockets on 127.0.0.1: `vtunnel server` (kcp:// and tcp://, with a key) whose ``--target`` is an
echo server in this process, and one `vtunnel agent` with a ``--forward`` that is never restarted. Every transfer
uploads its own pattern, half-closes and reads the echo back. The echo target holds back all but the first bytes
of every answer behind a gate, so each transfer is provably in flight (its upload done, the head of its answer
back, the rest still to come) when the server is signalled:

* SIGTERM: the server drains (GOAWAY; open streams finish). All 50 answers arrive whole; the server exits by
  itself; a new server on the same port serves the agent's next 50 transfers.
* SIGKILL: the tunnel dies under all 50. Each client must see its connection reset (not a clean end of stream
  that would pass a short answer off as a whole one), and what it received must be a byte-exact prefix of its own
  pattern. A new server on the same port then serves the agent's next 50 transfers.

Every wait is bounded; nothing is timed for speed.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import Processes, free_port, wait_log, wait_port
from tests.netutil import first_echo_after, pattern

TRANSFERS = 50
#: bytes of each answer the target sends before it waits for the gate
HEAD = 64 * 1024
#: transfer sizes (bytes), drawn per transfer
SIZES = (1024 * 1024, 2 * 1024 * 1024)
#: the bound on every wait of the test (a hang fails it; a slow machine does not)
WAIT = 120.0
#: both ends' drain timeouts, far above what draining 50 transfers takes even on a loaded machine
DRAIN = 90.0


class GatedEcho:
    """An echo server that sends the first ``HEAD`` bytes of every answer at once and the rest once ``gate`` is
    set (the gate a connection waits on is the one in place when it was accepted)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self._srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(512)
        self.port: int = self._srv.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    def _accept_loop(self) -> None:
        self._srv.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, self.gate), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket, gate: threading.Event) -> None:
        conn.settimeout(WAIT)
        lock = threading.Condition()
        got = bytearray()
        ended = [False]

        def read() -> None:
            try:
                while True:
                    data = conn.recv(262144)
                    with lock:
                        if not data:
                            ended[0] = True
                        got.extend(data)
                        lock.notify()
                    if not data:
                        return
            except OSError:
                with lock:
                    ended[0] = True
                    lock.notify()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        sent = 0

        def more() -> bool:
            return len(got) > sent or ended[0]

        try:
            while True:
                with lock:
                    lock.wait_for(more, timeout=WAIT)
                    chunk = bytes(got[sent:])
                    done = ended[0] and not chunk
                if done:
                    conn.shutdown(socket.SHUT_WR)
                    break
                if sent >= HEAD:
                    gate.wait(WAIT)
                elif sent + len(chunk) > HEAD:
                    chunk = chunk[: HEAD - sent]
                conn.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        finally:
            reader.join(timeout=WAIT)
            conn.close()

    def __enter__(self) -> GatedEcho:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self._stop.set()
        self._srv.close()
        self._thread.join(timeout=2)


@dataclass
class Transfer:
    """One client: uploads ``pattern(size, seed)``, half-closes, reads the echo until the connection ends."""

    port: int
    size: int
    seed: int
    uploaded: threading.Event = field(default_factory=threading.Event)
    head_back: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)
    received: bytearray = field(default_factory=bytearray)
    #: how the answer ended: "eof" (a clean end of stream), "reset", or another error's name
    outcome: str = ""
    upload_error: str = ""

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        payload = pattern(self.size, seed=self.seed)
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)
        except OSError as exc:
            self.outcome = type(exc).__name__
            self.ended.set()
            return

        def upload() -> None:
            try:
                view = memoryview(payload)
                for i in range(0, len(view), 65536):
                    sock.sendall(view[i : i + 65536])
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self.upload_error = type(exc).__name__
            self.uploaded.set()

        writer = threading.Thread(target=upload, daemon=True)
        writer.start()
        try:
            while True:
                chunk = sock.recv(262144)
                if not chunk:
                    self.outcome = "eof"
                    break
                self.received += chunk
                if len(self.received) >= HEAD:
                    self.head_back.set()
        except ConnectionResetError:
            self.outcome = "reset"
        except OSError as exc:
            self.outcome = type(exc).__name__
        finally:
            writer.join(timeout=WAIT)
            sock.close()
            self.ended.set()

    @property
    def whole(self) -> bool:
        return self.outcome == "eof" and bytes(self.received) == pattern(self.size, seed=self.seed)

    @property
    def prefix(self) -> bool:
        return bytes(self.received) == pattern(self.size, seed=self.seed)[: len(self.received)]


def start_transfers(front: int, batch: int) -> list[Transfer]:
    rng = random.Random(batch)
    transfers = [Transfer(front, rng.randint(*SIZES), seed=batch * 1000 + i) for i in range(TRANSFERS)]
    for t in transfers:
        t.start()
    return transfers


def wait_all(transfers: list[Transfer], what: str) -> None:
    deadline = time.monotonic() + WAIT
    for i, t in enumerate(transfers):
        event = getattr(t, what)
        if not event.wait(max(0.0, deadline - time.monotonic())):
            pytest.fail(f"transfer {i} not {what.replace('_', ' ')} within {WAIT} s (outcome {t.outcome!r})")


def describe(transfers: list[Transfer]) -> str:
    return ", ".join(
        f"#{i}: {t.outcome or 'running'} {len(t.received)}/{t.size}{' upload ' + t.upload_error if t.upload_error else ''}"
        for i, t in enumerate(transfers)
    )


def assert_all_whole(transfers: list[Transfer]) -> None:
    wait_all(transfers, "ended")
    broken = [t for t in transfers if not t.whole]
    assert not broken, describe(broken)


@pytest.fixture
def echo() -> Iterator[GatedEcho]:
    with GatedEcho() as target:
        yield target


@pytest.fixture(params=["kcp", "tcp"])
def url(request: pytest.FixtureRequest) -> str:
    port = free_port(socket.SOCK_DGRAM if request.param == "kcp" else socket.SOCK_STREAM)
    return f"{request.param}://127.0.0.1:{port}"


def write_config(path: Path, section: str) -> Path:
    path.write_text(f"[{section}]\ndrain_timeout = {DRAIN}\n[tunnel]\ndrain_timeout = {DRAIN}\n")
    return path


def start_server(procs: Processes, url: str, key: Path, echo: GatedEcho) -> subprocess.Popen[bytes]:
    config = write_config(procs.tmp / "server.toml", "server")
    server = procs.start(
        "server",
        "--config",
        str(config),
        "--listen",
        url,
        "--psk-file",
        str(key),
        "--target",
        f"127.0.0.1:{echo.port}",
    )
    wait_log(procs, server, "listening")
    return server


def start_agent(procs: Processes, url: str, key: Path) -> tuple[subprocess.Popen[bytes], int]:
    config = write_config(procs.tmp / "agent.toml", "agent")
    front = free_port()
    agent = procs.start(
        "agent",
        "--config",
        str(config),
        "--server",
        url,
        "--psk-file",
        str(key),
        "--forward",
        f"127.0.0.1:{front}",
    )
    wait_port(front)
    return agent, front


def in_flight(front: int, echo: GatedEcho, batch: int) -> list[Transfer]:
    """50 transfers whose uploads are done and whose answers are past their first ``HEAD`` bytes, held there."""
    echo.gate = threading.Event()
    transfers = start_transfers(front, batch)
    wait_all(transfers, "uploaded")
    wait_all(transfers, "head_back")
    assert not any(t.ended.is_set() for t in transfers), describe(transfers)
    return transfers


def next_batch_is_whole(front: int, echo: GatedEcho, agent: subprocess.Popen[bytes]) -> None:
    first_echo_after(front, time.monotonic(), 30.0)
    echo.gate = threading.Event()
    echo.gate.set()
    assert_all_whole(start_transfers(front, batch=2))
    assert agent.poll() is None


def test_sigterm_drains_every_transfer_and_the_agent_reconnects(
    procs: Processes, psk_file: Path, echo: GatedEcho, url: str
) -> None:
    server = start_server(procs, url, psk_file, echo)
    agent, front = start_agent(procs, url, psk_file)
    transfers = in_flight(front, echo, batch=1)

    server.send_signal(signal.SIGTERM)
    wait_log(procs, server, "draining")
    echo.gate.set()
    assert_all_whole(transfers)
    assert server.wait(timeout=WAIT) == 0, procs.output(server)

    start_server(procs, url, psk_file, echo)
    next_batch_is_whole(front, echo, agent)


def test_sigkill_resets_every_transfer_in_flight_and_the_agent_reconnects(
    procs: Processes, psk_file: Path, echo: GatedEcho, url: str
) -> None:
    server = start_server(procs, url, psk_file, echo)
    agent, front = start_agent(procs, url, psk_file)
    transfers = in_flight(front, echo, batch=1)

    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=WAIT)
    echo.gate.set()
    start_server(procs, url, psk_file, echo)
    wait_all(transfers, "ended")
    # nothing corrupted, nothing from another stream, and no short answer passed off as a whole one
    assert all(t.prefix for t in transfers), describe([t for t in transfers if not t.prefix])
    silent = [t for t in transfers if t.outcome != "reset" and not t.whole]
    assert not silent, describe(silent)
    next_batch_is_whole(front, echo, agent)
