"""Key files and other secrets: `vtunnel keygen -o` writes them private, the server and the agent refuse ones that
group or others may read or write (unless told to allow it), and passwords need not be on the command line."""

from __future__ import annotations

import contextlib
import os
import socket
import string
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.apps.websocks_client import WebSocksRejected, websocks_connect
from tests.conftest import ROOT, VTUNNEL, Processes, free_port, wait_log, wait_port
from tests.netutil import echo_server
from vtunnel.config import (
    ConfigError,
    load_config,
    load_psk_file,
    resolve_psk,
    resolve_websocks_users,
    write_key_file,
)
from vtunnel.security.errors import SecurityError
from vtunnel.security.keys import decode_key, generate_key

ENV = {k: v for k, v in os.environ.items() if not k.startswith("VTUNNEL_")}


def run(
    *args: str, env: dict[str, str] | None = None, umask: int = 0o022
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VTUNNEL, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        env={**ENV, **(env or {})},
        umask=umask,
    )


def mode_of(path: Path) -> int:
    return path.stat().st_mode & 0o777


def loose_key(tmp_path: Path, mode: int = 0o644) -> Path:
    """A key file as `vtunnel keygen > key` leaves it under the usual umask."""
    path = tmp_path / "key"
    path.write_text(generate_key() + "\n")
    path.chmod(mode)
    return path


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def echo() -> Iterator[int]:
    with echo_server() as port:
        yield port


# ------------------------------------------------------------------------------------------------ keygen -o


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_keygen_o_writes_a_key_only_its_owner_can_read_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    key = tmp_path / "key"
    out = run("keygen", "-o", str(key), umask=umask)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""  # the key is not printed as well
    assert mode_of(key) == 0o600
    assert len(decode_key(key.read_text())) == 32
    assert load_psk_file(key) == decode_key(key.read_text())


def test_keygen_o_never_overwrites_without_force(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("precious\n")
    out = run("keygen", "-o", str(key))
    assert out.returncode == 1
    assert "--force" in out.stderr
    assert key.read_text() == "precious\n"
    key.chmod(0o644)
    out = run("keygen", "-o", str(key), "--force")
    assert out.returncode == 0, out.stderr
    assert mode_of(key) == 0o600  # a new file, not the old one rewritten in place
    assert len(decode_key(key.read_text())) == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]  # no temporary file left behind


def test_keygen_without_o_prints_a_key_and_the_help_points_to_o() -> None:
    out = run("keygen")
    assert out.returncode == 0
    assert len(decode_key(out.stdout)) == 32
    assert "0600" in run("keygen", "--help").stdout
    assert run("keygen", "--force").returncode == 2


def test_write_key_file_creates_0600_even_with_an_open_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_key_file(tmp_path / "k", "x\n")
        write_key_file(tmp_path / "k", "y\n", replace=True)
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "k") == 0o600
    assert (tmp_path / "k").read_text() == "y\n"
    with pytest.raises(FileExistsError):
        write_key_file(tmp_path / "k", "z\n")


# ------------------------------------------------------------------------------------------------ the mode check


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        (0o644, "readable by group and others"),
        (0o640, "readable by group"),
        (0o604, "readable by others"),
        (0o620, "writable by group"),
        (0o602, "writable by others"),
    ],
)
def test_server_refuses_a_key_file_others_may_read_or_write(tmp_path: Path, mode: int, words: str) -> None:
    key = loose_key(tmp_path, mode)
    port = free_port()
    out = run("server", "--listen", f"tcp://127.0.0.1:{port}", "--psk-file", str(key))
    assert out.returncode != 0
    assert words in out.stderr
    assert f"(mode 0{mode:o})" in out.stderr
    assert f"chmod 600 {key}" in out.stderr
    assert "--insecure-key-permissions" in out.stderr
    assert key.read_text().strip() not in out.stderr + out.stdout
    assert refused(port)  # nothing was started


def test_agent_refuses_a_loose_key_file_from_its_config(tmp_path: Path) -> None:
    key = loose_key(tmp_path)
    front = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\nserver = "tcp://127.0.0.1:1"\nforward = ["127.0.0.1:{front}"]\npsk_file = "{key}"\n'
    )
    out = run("agent", "--config", str(config))
    assert out.returncode != 0
    assert f"chmod 600 {key}" in out.stderr
    assert refused(front)


@pytest.mark.parametrize("how", ["flag", "env", "config"])
def test_the_override_lets_a_loose_key_file_through_with_a_warning(
    procs: Processes, tmp_path: Path, echo: int, how: str
) -> None:
    key = loose_key(tmp_path)
    port = free_port()
    args = ["server", "--listen", f"tcp://127.0.0.1:{port}", "--target", f"127.0.0.1:{echo}"]
    env: dict[str, str] = {}
    if how == "flag":
        args += ["--psk-file", str(key), "--insecure-key-permissions"]
    elif how == "env":
        args += ["--psk-file", str(key)]
        env["VTUNNEL_INSECURE_KEY_PERMISSIONS"] = "1"
    else:
        config = tmp_path / "server.toml"
        config.write_text(f'[server]\npsk_file = "{key}"\ninsecure_key_permissions = true\n')
        args += ["--config", str(config)]
    server = procs.start(*args, env=env)
    wait_port(port)
    wait_log(procs, server, "insecure key permissions allowed")
    assert "mode=0644" in procs.output(server)


def test_a_private_key_file_starts_without_a_warning(procs: Processes, psk_file: Path) -> None:
    port = free_port()
    server = procs.start("server", "--listen", f"tcp://127.0.0.1:{port}", "--psk-file", str(psk_file))
    wait_port(port)
    wait_log(procs, server, "listening")
    assert "insecure key permissions" not in procs.output(server)


@settings(max_examples=60, deadline=None)
@given(mode=st.integers(0o400, 0o777))
def test_a_key_file_is_accepted_exactly_when_group_and_others_may_neither_read_nor_write(mode: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "key"
        path.write_text(generate_key())
        path.chmod(mode)
        if mode & 0o066:
            with pytest.raises(SecurityError, match=r"chmod 600"):
                load_psk_file(path)
            assert len(load_psk_file(path, allow_insecure_permissions=True)) == 32
        else:
            assert len(load_psk_file(path)) == 32


def test_the_override_variable_must_say_yes_or_no(tmp_path: Path) -> None:
    key = loose_key(tmp_path)
    for yes in ("1", "true", "YES", "on"):
        got = resolve_psk(
            psk_file=str(key), insecure=False, section={}, env={"VTUNNEL_INSECURE_KEY_PERMISSIONS": yes}
        )
        assert got == decode_key(key.read_text())
    for no in ("0", "false", "", "off"):
        with pytest.raises(ConfigError, match="chmod 600"):
            resolve_psk(
                psk_file=str(key), insecure=False, section={}, env={"VTUNNEL_INSECURE_KEY_PERMISSIONS": no}
            )
    with pytest.raises(ConfigError, match="VTUNNEL_INSECURE_KEY_PERMISSIONS must be 1 or 0"):
        resolve_psk(
            psk_file=str(key), insecure=False, section={}, env={"VTUNNEL_INSECURE_KEY_PERMISSIONS": "maybe"}
        )


# ------------------------------------------------------------------------------------------------ config files


def test_a_config_file_holding_secrets_must_be_private(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text(f'[server]\npsk = "{generate_key()}"\n')
    config.chmod(0o644)
    with pytest.raises(ConfigError, match=r"\[server\] psk.*readable by group and others.*chmod 600"):
        load_config(config, section="server", env={})
    assert load_config(config, section="server", allow_insecure_permissions=True, env={})["server"]["psk"]
    config.write_text(f'[server]\npsk = "{generate_key()}"\ninsecure_key_permissions = true\n')
    assert load_config(config, section="server", env={})["server"]["psk"]
    config.write_text('[agent.socks_users]\nbob = "pw"\n')
    with pytest.raises(ConfigError, match=r"\[agent\] socks_users"):
        load_config(config, section="agent", env={})
    config.chmod(0o600)
    assert load_config(config, section="agent", env={})["agent"]["socks_users"] == {"bob": "pw"}
    config.write_text('[server]\nlisten = ["tcp://127.0.0.1:1"]\n')
    config.chmod(0o644)  # no secrets: any mode
    assert load_config(config, section="server", env={})


def test_server_refuses_a_readable_config_with_an_inline_key(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "server.toml"
    config.write_text(f'[server]\nlisten = ["tcp://127.0.0.1:{port}"]\npsk = "{generate_key()}"\n')
    config.chmod(0o644)
    out = run("server", "--config", str(config))
    assert out.returncode != 0
    assert f"chmod 600 {config}" in out.stderr
    assert refused(port)


# ------------------------------------------------------------------------------------------------ WebSocks users


def _websocks_through(front: int, user: str, password: str, echo: int) -> bytes:
    async def go() -> bytes:
        with anyio.fail_after(30):
            async with await anyio.connect_tcp("127.0.0.1", front) as stream:
                rest = await websocks_connect(stream, user, password, "127.0.0.1", echo)
                await stream.send(b"through")
                data = rest
                while len(data) < 7:
                    data += await stream.receive()
                return data

    return anyio.run(go)


def _start_websocks_pair(
    procs: Processes, psk_file: Path, *server_args: str, env: dict[str, str] | None = None
) -> tuple[int, int]:
    """A server without --target (so streams without a destination are WebSocks) and a forwarding agent."""
    port, front = free_port(), free_port()
    url = f"tcp://127.0.0.1:{port}"
    server = procs.start(
        "server", "--listen", url, "--psk-file", str(psk_file), "--allow-private", *server_args, env=env
    )
    wait_port(port)
    procs.start("agent", "--server", url, "--psk-file", str(psk_file), "--forward", f"127.0.0.1:{front}")
    wait_port(front)
    return procs.procs.index(server), front


def test_websocks_users_from_a_private_file(
    procs: Processes, psk_file: Path, tmp_path: Path, echo: int
) -> None:
    users = tmp_path / "users"
    write_key_file(users, "# WebSocks users\n\nalice:s3cret:with:colons\nbob:pw\n")
    index, front = _start_websocks_pair(procs, psk_file, "--websocks-user-file", str(users))
    assert _websocks_through(front, "alice", "s3cret:with:colons", echo) == b"through"
    with pytest.raises(WebSocksRejected):
        _websocks_through(front, "bob", "wrong", echo)
    assert "visible to every local user" not in procs.output(procs.procs[index])


def test_websocks_users_from_the_environment(procs: Processes, psk_file: Path, echo: int) -> None:
    _, front = _start_websocks_pair(procs, psk_file, env={"VTUNNEL_WEBSOCKS_USER": "carol:env-pw\ndave:x"})
    assert _websocks_through(front, "carol", "env-pw", echo) == b"through"


def test_a_password_on_the_command_line_still_works_with_a_warning(
    procs: Processes, psk_file: Path, echo: int
) -> None:
    index, front = _start_websocks_pair(procs, psk_file, "--websocks-user", "erin:cli-pw")
    assert _websocks_through(front, "erin", "cli-pw", echo) == b"through"
    output = procs.output(procs.procs[index])
    assert "visible to every local user in `ps`" in output
    assert "cli-pw" not in output


def test_server_refuses_a_readable_users_file(tmp_path: Path, psk_file: Path) -> None:
    users = tmp_path / "users"
    users.write_text("alice:secret\n")
    users.chmod(0o640)
    port = free_port()
    out = run(
        "server", "--listen", f"tcp://127.0.0.1:{port}", "--psk-file", str(psk_file),
        "--websocks-user-file", str(users),
    )  # fmt: skip
    assert out.returncode != 0
    assert "WebSocks users file" in out.stderr
    assert f"chmod 600 {users}" in out.stderr
    assert "secret" not in out.stderr
    assert refused(port)


def test_websocks_user_sources_merge_in_order(tmp_path: Path) -> None:
    users = tmp_path / "users"
    write_key_file(users, "a:file\nb:file\n")
    got = resolve_websocks_users(
        specs=["c:cli"],
        user_file=str(users),
        section={"websocks_users": {"a": "config", "z": "config"}},
        env={"VTUNNEL_WEBSOCKS_USER": "b:env\nc:env"},
    )
    assert got == {"a": "file", "b": "env", "c": "cli", "z": "config"}
    config_file = resolve_websocks_users(
        specs=[], user_file=None, section={"websocks_user_file": str(users)}, env={}
    )
    assert config_file == {"a": "file", "b": "file"}
    for bad in ("no-colon-hunter2", ":hunter2"):
        with pytest.raises(ConfigError, match="expected USER:PASS") as info:
            resolve_websocks_users(specs=[bad], user_file=None, section={}, env={})
        assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError, match="VTUNNEL_WEBSOCKS_USER, line 2"):
        resolve_websocks_users(
            specs=[], user_file=None, section={}, env={"VTUNNEL_WEBSOCKS_USER": "a:b\nhunter2"}
        )


_NAME = st.text(alphabet=string.ascii_letters + string.digits + "._-@", min_size=1, max_size=20)
_PASSWORD = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"),
    max_size=40,
)


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(_NAME, _PASSWORD, max_size=8), st.sampled_from(["\n", "\r\n"]))
def test_a_users_file_gives_back_what_was_written(users: dict[str, str], newline: str) -> None:
    text = "# users\n" + "".join(f"{u}:{p}{newline}" for u, p in users.items())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "users"
        write_key_file(path, text)
        assert resolve_websocks_users(specs=[], user_file=str(path), section={}, env={}) == users


@given(st.text(max_size=200))
def test_any_users_text_gives_users_or_a_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        got = resolve_websocks_users(
            specs=[], user_file=None, section={}, env={"VTUNNEL_WEBSOCKS_USER": text}
        )
        assert all(user and ":" not in user for user in got)


def test_server_refuses_a_tls_private_key_others_may_read(procs: Processes, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    cert = trustme.CA().issue_cert("localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    key_file.chmod(0o644)
    port = free_port()
    url = f"tls://127.0.0.1:{port}?cert={cert_file}&key={key_file}"
    out = run("server", "--listen", url, "--insecure")
    assert out.returncode != 0
    assert "TLS private key" in out.stderr
    assert f"chmod 600 {key_file}" in out.stderr
    assert refused(port)
    key_file.chmod(0o600)  # private: it starts
    server = procs.start("server", "--listen", url, "--insecure")
    wait_log(procs, server, "listening")
