"""``vtunnel check-config FILE`` and ``vtunnel --version``: real processes, nothing started."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, VTUNNEL, free_port
from vtunnel import __version__
from vtunnel.config import write_key_file
from vtunnel.security.keys import generate_key


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VTUNNEL, *args], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
    )


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    write_key_file(path, generate_key() + "\n")
    return path


def test_version() -> None:
    out = run("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"vtunnel, version {__version__}"


def test_a_good_config_is_ok_and_starts_nothing(tmp_path: Path, key: Path) -> None:
    port = free_port()
    config = tmp_path / "good.toml"
    config.write_text(
        f'[server]\nlisten = ["tcp://127.0.0.1:{port}", "kcp://127.0.0.1:{port}"]\npsk_file = "{key}"\n'
        f'allow = ["10.1.2.0/24"]\nmetrics = "127.0.0.1:{free_port()}"\n'
        f'[agent]\nserver = "kcp://127.0.0.1:{port}"\npsk_file = "{key}"\nsocks = "127.0.0.1:{free_port()}"\n'
        'forward = ["127.0.0.1:9000=example.com:22"]\nmetrics = "9100"\n'
        '[tunnel]\nkeepalive_interval = 2.0\n[log]\nlevel = "warning"\n'
    )
    out = run("check-config", str(config))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{config}: ok ([server], [agent])"
    with socket.socket() as probe:  # nothing was bound: the port is still free
        probe.bind(("127.0.0.1", port))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server\n", "is not valid TOML"),
        ("[servr]\n", "unknown section [servr]"),
        (
            '[server]\nlisten = ["tcp://127.0.0.1:1"]\nlisten_on = 1\n',
            "unknown setting(s) in [server]: listen_on",
        ),
        ("[tunnel]\nkeepalive_interval = -1\n", "[tunnel]"),
        (
            '[server]\nlisten = ["nosuch://127.0.0.1:1"]\ninsecure = true\n',
            "[server]: no transport for scheme",
        ),
        ('[server]\nlisten = ["tcp://127.0.0.1:1"]\n', "[server]: no pre-shared key"),
        (
            '[server]\nlisten = ["tcp://127.0.0.1:1"]\ninsecure = true\nmetrics = "example.com:1"\n',
            "not a host name",
        ),
        (
            '[server]\nlisten = ["tcp://127.0.0.1:1"]\npsk_file = "/nonexistent/key"\n',
            "cannot read the key file",
        ),
        (
            '[agent]\nserver = "tcp://127.0.0.1:1"\ninsecure = true\nsocks = "nope"\n',
            "[agent]: expected HOST:PORT",
        ),
        ("[agent]\ninsecure = true\n", "[agent]: give --server URL"),
        ("[agent]\nserver = 5\ninsecure = true\n", "[agent] server must be a URL or a list of URLs"),
        (
            '[agent]\nserver = ["tcp://127.0.0.1:1", "nosuch://127.0.0.1:1"]\ninsecure = true\n',
            "[agent]: no transport for scheme",
        ),
    ],
)
def test_a_bad_config_is_named_with_its_error(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    out = run("check-config", str(config))
    assert out.returncode == 1
    assert message in out.stderr, out.stderr
    assert str(config) in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout == ""


def test_an_agent_with_several_servers_is_ok(tmp_path: Path, key: Path) -> None:
    config = tmp_path / "several.toml"
    config.write_text(
        f'[agent]\nserver = ["kcp://127.0.0.1:1", "tls://127.0.0.1:2", "tcp://127.0.0.1:3"]\npsk_file = "{key}"\n'
    )
    out = run("check-config", str(config))
    assert out.returncode == 0, out.stderr


def test_a_websocks_server_is_given_alone(tmp_path: Path) -> None:
    config = tmp_path / "websocks.toml"
    config.write_text(
        '[agent]\nserver = ["websocks://127.0.0.1:1", "tcp://127.0.0.1:1"]\nwebsocks_users = { a = "b" }\n'
    )
    config.chmod(0o600)
    out = run("check-config", str(config))
    assert out.returncode == 1
    assert "a WebSocks server is given alone" in out.stderr, out.stderr


def test_both_sections_are_checked_and_each_error_is_shown(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        '[server]\nlisten = ["tcp://127.0.0.1:1"]\n[agent]\nserver = "tcp://127.0.0.1:1"\ninsecure = true\nhttp = "x"\n'
    )
    out = run("check-config", str(config))
    assert out.returncode == 1
    assert "[server]: no pre-shared key" in out.stderr
    assert "[agent]: expected HOST:PORT" in out.stderr


def test_a_secret_config_readable_by_others_is_refused_unless_allowed(tmp_path: Path, key: Path) -> None:
    config = tmp_path / "open.toml"
    config.write_text(f'[agent]\nserver = "tcp://127.0.0.1:1"\npsk = "{key.read_text().strip()}"\n')
    config.chmod(0o644)
    out = run("check-config", str(config))
    assert out.returncode == 1
    assert "chmod 600" in out.stderr
    assert key.read_text().strip() not in out.stderr + out.stdout
    allowed = run("check-config", "--insecure-key-permissions", str(config))
    assert allowed.returncode == 0, allowed.stderr


def test_a_missing_file() -> None:
    out = run("check-config", "/nonexistent/vtunnel.toml")
    assert out.returncode == 1
    assert "cannot read config file" in out.stderr
