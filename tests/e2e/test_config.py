"""The TOML config file: the same settings as the command line, checked strictly; JSON logs."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, VTUNNEL, Processes, free_port, wait_log, wait_port
from tests.netutil import echo_roundtrip, echo_server
from vtunnel.config import (
    ConfigError,
    load_config,
    resolve_cipher,
    resolve_psk,
    tunnel_config,
    write_key_file,
)
from vtunnel.security.keys import generate_key
from vtunnel.transports.base import SecurityConfig, TransportError


def test_pair_from_config_files_with_json_logs(procs: Processes, tmp_path: Path) -> None:
    key = tmp_path / "key"
    write_key_file(key, generate_key())
    tport, front = free_port(), free_port()
    with echo_server() as echo:
        (tmp_path / "server.toml").write_text(
            f'[server]\nlisten = ["tcp://127.0.0.1:{tport}"]\ntarget = "127.0.0.1:{echo}"\npsk_file = "{key}"\n'
            '[tunnel]\nkeepalive_interval = 2.0\n[log]\nformat = "json"\n'
        )
        (tmp_path / "agent.toml").write_text(
            f'[agent]\nserver = "tcp://127.0.0.1:{tport}"\nforward = ["127.0.0.1:{front}"]\npsk_file = "{key}"\n'
        )
        server = procs.start("server", "--config", str(tmp_path / "server.toml"))
        wait_port(tport)
        procs.start("agent", "--config", str(tmp_path / "agent.toml"))
        wait_port(front)
        assert echo_roundtrip(front, b"configured") == b"configured"
    lines = [json.loads(line) for line in procs.output(server).splitlines() if line.startswith("{")]
    assert any(line.get("event") == "listening" for line in lines), lines
    assert key.read_text().strip() not in procs.output(server)  # key material never logged


def test_unknown_settings_are_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlisten = ["tcp://127.0.0.1:1"]\nlisten_port = 5\n')
    with pytest.raises(ConfigError, match="listen_port"):
        load_config(bad)
    bad.write_text("[sever]\n")
    with pytest.raises(ConfigError, match=r"unknown section \[sever\]"):
        load_config(bad)
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    out = subprocess.run(
        [*VTUNNEL, "server", "--config", str(bad)], capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert out.returncode == 2
    assert "not valid TOML" in out.stderr


def test_tunnel_section_is_validated() -> None:
    assert tunnel_config({"keepalive_interval": 3.0}).keepalive_interval == 3.0
    with pytest.raises(ConfigError, match=r"\[tunnel\]"):
        tunnel_config({"keepalive_interval": -1})


def test_key_sources_in_order(tmp_path: Path) -> None:
    key_a, key_b = generate_key(), generate_key()
    f = tmp_path / "k"
    write_key_file(f, key_a)
    assert resolve_psk(
        psk_file=str(f), insecure=False, section={}, env={"VTUNNEL_PSK": key_b}
    ) != resolve_psk(psk_file=None, insecure=False, section={}, env={"VTUNNEL_PSK": key_b})
    assert resolve_psk(psk_file=None, insecure=False, section={"psk": key_b}, env={}) == resolve_psk(
        psk_file=None, insecure=False, section={}, env={"VTUNNEL_PSK": key_b}
    )
    assert resolve_psk(psk_file=None, insecure=True, section={}, env={}) is None
    with pytest.raises(ConfigError, match="--insecure"):
        resolve_psk(psk_file=None, insecure=False, section={}, env={})
    with pytest.raises(ConfigError):
        resolve_psk(psk_file=None, insecure=False, section={"psk": "not a key"}, env={})


def test_cipher_sources_in_order_and_checked(tmp_path: Path) -> None:
    env = {"VTUNNEL_CIPHER": "chacha20-poly1305"}
    section = {"cipher": "aes-256-gcm"}
    assert resolve_cipher(cipher=None, section={}, env={}) == "auto"
    assert resolve_cipher(cipher=None, section=section, env={}) == "aes-256-gcm"
    assert resolve_cipher(cipher=None, section=section, env=env) == "chacha20-poly1305"
    assert resolve_cipher(cipher="AES-256-GCM", section={}, env=env) == "aes-256-gcm"
    with pytest.raises(ConfigError, match="cipher must be one of auto, aes-256-gcm, chacha20-poly1305"):
        resolve_cipher(cipher=None, section={"cipher": "des"}, env={})
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\ncipher = "aes-256-gcm"\n[agent]\ncipher = "auto"\n')
    assert load_config(cfg)["server"]["cipher"] == "aes-256-gcm"
    assert SecurityConfig(psk=bytes(32), cipher="aes-256-gcm").cipher == "aes-256-gcm"
    assert "cipher='auto'" in repr(SecurityConfig(psk=bytes(32)))
    with pytest.raises(TransportError, match="unknown cipher"):
        SecurityConfig(psk=bytes(32), cipher="aes")


def test_cli_refuses_an_unknown_cipher() -> None:
    proc = subprocess.run(
        [*VTUNNEL, "server", "--listen", "tcp://127.0.0.1:1", "--cipher", "des", "--insecure"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert "aes-256-gcm" in proc.stderr


def test_pinned_ciphers_over_kcp_from_the_command_line_and_the_config(
    procs: Processes, tmp_path: Path
) -> None:
    """The setting reaches the transport: the same pin on both ends carries data; different pins never connect
    (and --cipher wins over VTUNNEL_CIPHER)."""
    key = tmp_path / "key"
    write_key_file(key, generate_key())
    uport, front, other = free_port(socket.SOCK_DGRAM), free_port(), free_port()
    url = f"kcp://127.0.0.1:{uport}?connect_timeout=1"
    with echo_server() as echo:
        server = procs.start(
            "server", "--listen", url, "--target", f"127.0.0.1:{echo}", "--psk-file", str(key),
            "--cipher", "chacha20-poly1305", "--log-level", "debug",
        )  # fmt: skip
        wait_log(procs, server, "listening")
        (tmp_path / "agent.toml").write_text(f'[agent]\ncipher = "chacha20-poly1305"\npsk_file = "{key}"\n')
        agent = procs.start(
            "agent", "--server", url, "--forward", f"127.0.0.1:{front}", "--config", str(tmp_path / "agent.toml"),
            "--log-level", "debug",
        )  # fmt: skip
        wait_port(front)
        assert echo_roundtrip(front, b"pinned" * 1000) == b"pinned" * 1000
        wait_log(procs, agent, "cipher=chacha20-poly1305")
        wait_log(procs, server, "cipher=chacha20-poly1305")
        mismatched = procs.start(
            "agent", "--server", url, "--forward", f"127.0.0.1:{other}", "--psk-file", str(key),
            "--cipher", "aes-256-gcm",
            env={"VTUNNEL_CIPHER": "chacha20-poly1305"},
        )  # fmt: skip
        wait_log(procs, mismatched, "protocol version", timeout=30)
    assert "aes-256-gcm" not in procs.output(server)
