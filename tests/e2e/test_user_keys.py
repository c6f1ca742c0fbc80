"""Per-user keys with real processes: a server with ``--user-keys``, agents with their own keys; removing a key
and SIGHUP cuts exactly that user's tunnels while the others' transfers finish byte-exact; an unknown key never
reaches the server's stream handler. Over tcp://, sealed kcp:// and sealed rudp://."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, VTUNNEL, Processes, free_port, wait_log
from tests.e2e.test_metrics import parse, scrape
from tests.netutil import pattern, threaded_server
from vtunnel.config import ConfigError, load_user_keys
from vtunnel.security.keys import generate_key

pytestmark = pytest.mark.timeout(180)

SIZE = 40 * 1024 * 1024  # more than the tunnel windows and socket buffers hold: the cut finds bytes in flight
BEFORE = 1024 * 1024  # read before the reload
DATA = pattern(SIZE, seed=5)


def send_data(conn: socket.socket) -> None:
    conn.sendall(DATA)


def keygen(path: Path) -> Path:
    subprocess.run([*VTUNNEL, "keygen", "-o", str(path)], check=True, capture_output=True, cwd=ROOT)
    return path


def read_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(262144, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def read_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything until the end, and how it ended: ``eof`` or ``reset``."""
    out = bytearray()
    try:
        while True:
            chunk = sock.recv(262144)
            if not chunk:
                return bytes(out), "eof"
            out += chunk
    except ConnectionResetError:
        return bytes(out), "reset"


@pytest.mark.parametrize("scheme", ["tcp", "kcp", "rudp"])
def test_sighup_after_removing_a_key_cuts_exactly_that_user(
    procs: Processes, tmp_path: Path, scheme: str
) -> None:
    users = tmp_path / "users"
    users.mkdir(mode=0o700)
    alice, bob = keygen(users / "alice"), keygen(users / "bob")
    carol = keygen(tmp_path / "carol")  # a key the server does not hold
    port = free_port(socket.SOCK_DGRAM if scheme in ("kcp", "rudp") else socket.SOCK_STREAM)
    metrics = free_port()
    url = f"{scheme}://127.0.0.1:{port}"
    with threaded_server(send_data) as (source, accepted):
        server = procs.start(
            "server", "--listen", url, "--user-keys", str(users), "--allow-private", "--metrics", str(metrics)
        )
        wait_log(procs, server, "listening")
        fronts: dict[str, int] = {}
        agents = []
        for name, key in (("alice", alice), ("bob", bob), ("carol", carol)):
            fronts[name] = free_port()
            config = tmp_path / f"{name}.toml"
            config.write_text(
                f'[agent]\nserver = "{url}"\npsk_file = "{key}"\nopen_timeout = 3.0\n'
                f'forward = ["127.0.0.1:{fronts[name]}=127.0.0.1:{source}"]\n'
            )
            agents.append(procs.start("agent", "--config", str(config)))
        for agent in agents:  # (not a probe connection: through a forward, it would reach the source)
            wait_log(procs, agent, "listening")

        # both users' transfers start
        conns = {
            name: socket.create_connection(("127.0.0.1", fronts[name]), timeout=60)
            for name in ("alice", "bob")
        }
        try:
            for name, conn in conns.items():
                assert read_exactly(conn, BEFORE) == DATA[:BEFORE], name
            assert accepted[0] == 2
            wait_log(procs, server, "user=alice")
            wait_log(procs, server, "user=bob")
            _, samples = parse(scrape(metrics))
            if scheme != "tcp":  # per-tunnel series name the user (tcp:// has no round trip to show)
                rtt_users = {s.labels["user"] for s in samples if s.name == "vtunnel_tunnel_rtt_seconds"}
                assert rtt_users == {"alice", "bob"}

            # bob's key goes; SIGHUP
            (users / "bob").unlink()
            server.send_signal(signal.SIGHUP)
            wait_log(procs, server, "keys reloaded")
            assert "cut_users=['bob']" in procs.output(server)

            got, how = read_to_end(conns["bob"])
            assert len(got) + BEFORE < SIZE, how  # cut: it never got the whole of it
            assert got == DATA[BEFORE : BEFORE + len(got)]  # and what came was right

            rest = read_exactly(conns["alice"], SIZE - BEFORE)
            assert hashlib.sha256(rest).digest() == hashlib.sha256(DATA[BEFORE:]).digest()
            assert conns["alice"].recv(1) == b""  # the source's end
        finally:
            for conn in conns.values():
                conn.close()

        # bob cannot come back; carol never got in; alice still can
        for name in ("bob", "carol"):
            with socket.create_connection(("127.0.0.1", fronts[name]), timeout=30) as conn:
                got, _ = read_to_end(conn)
                assert got == b"", name
        with socket.create_connection(("127.0.0.1", fronts["alice"]), timeout=60) as conn:
            assert read_exactly(conn, BEFORE) == DATA[:BEFORE]
        assert accepted[0] == 3  # alice's two connections and bob's first: the handler never saw carol
        out = procs.output(server)
        assert "user=carol" not in out
        assert "reason='key revoked'" in out or "reason=key revoked" in out
        assert server.poll() is None  # still serving


def test_a_bad_key_directory_on_sighup_changes_nothing(procs: Processes, tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.mkdir(mode=0o700)
    alice = keygen(users / "alice")
    port = free_port()
    server = procs.start("server", "--listen", f"tcp://127.0.0.1:{port}", "--user-keys", str(users))
    wait_log(procs, server, "listening")
    (users / "mallory").write_text("not a key\n")
    (users / "mallory").chmod(0o600)
    server.send_signal(signal.SIGHUP)
    wait_log(procs, server, "reload failed")
    assert "not a key" not in procs.output(server)
    assert server.poll() is None
    assert alice.exists()


# ------------------------------------------------------------------------------------------------ loading


def test_load_user_keys_from_a_directory_and_from_a_file(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.mkdir(mode=0o700)
    keygen(users / "alice")
    keygen(users / "bob")
    (users / ".alice.tmp").write_text("whatever")  # keygen --force's and editors' temporary files: skipped
    assert load_user_keys(users).users == ("alice", "bob")
    listing = tmp_path / "users.txt"
    listing.write_text(f"# team\nalice {generate_key()}\nbob {generate_key()}\n")
    listing.chmod(0o600)
    assert load_user_keys(listing).users == ("alice", "bob")


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        ("loose file", "readable by group and others"),
        ("loose listing", "readable by group and others"),
        ("open directory", "writable by group or others"),
        ("bad name", "user name"),
        ("same key", "same key"),
        ("empty", "holds no key"),
        ("subdirectory", "is not a file"),
    ],
)
def test_load_user_keys_refuses(tmp_path: Path, setup: str, words: str) -> None:
    users = tmp_path / "users"
    users.mkdir(mode=0o700)
    target = users
    key = generate_key()
    if setup == "loose file":
        (users / "alice").write_text(key)
        (users / "alice").chmod(0o644)
    elif setup == "loose listing":
        target = tmp_path / "users.txt"
        target.write_text(f"alice {key}\n")
        target.chmod(0o644)
    elif setup == "open directory":
        keygen(users / "alice")
        users.chmod(0o777)
    elif setup == "bad name":
        keygen(users / "alice")
        keygen(users / "al ice")
    elif setup == "same key":
        for name in ("alice", "bob"):
            (users / name).write_text(key)
            (users / name).chmod(0o600)
    elif setup == "subdirectory":
        keygen(users / "alice")
        (users / "sub").mkdir()
    with pytest.raises(ConfigError, match=words) as info:
        load_user_keys(target)
    assert key not in str(info.value)


def test_check_config_validates_the_user_keys(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.mkdir(mode=0o700)
    keygen(users / "alice")
    config = tmp_path / "server.toml"
    config.write_text(f'[server]\nlisten = ["tcp://127.0.0.1:1"]\nuser_keys = "{users}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("VTUNNEL_")}

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*VTUNNEL, "check-config", str(config)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=60,
        )

    ok = check()
    assert ok.returncode == 0, ok.stderr
    (users / "alice").chmod(0o644)
    bad = check()
    assert bad.returncode == 1
    assert "chmod 600" in bad.stderr
    (users / "alice").chmod(0o600)
    config.write_text(
        f'[server]\nlisten = ["tcp://127.0.0.1:1"]\nuser_keys = "{users}"\npsk_file = "{users / "alice"}"\n'
    )
    both = check()
    assert both.returncode == 1
    assert "replaces the server's one key" in both.stderr
