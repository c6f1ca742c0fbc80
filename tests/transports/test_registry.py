"""The transport registry: entry points, lazy loading, broken plugins, missing schemes, URL parsing."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import ROOT
from vtunnel.transports.base import (
    Endpoint,
    SecurityConfig,
    Transport,
    TransportError,
    TransportNotFound,
    available_transports,
    get_transport,
)


def test_builtins_are_registered_through_entry_points() -> None:
    found = available_transports()
    for scheme in ("tcp", "tls", "kcp"):
        cls = found[scheme]
        assert isinstance(cls, type), cls
        assert issubclass(cls, Transport)


def test_missing_scheme_names_the_package_to_install() -> None:
    with pytest.raises(TransportNotFound, match=r"pip install vtunnel-nosuch"):
        get_transport("nosuch")


def _fake_dist(tmp: Path, name: str, entry: str) -> None:
    dist = tmp / f"{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[vtunnel.transports]\n{entry}\n")


def test_broken_plugin_is_reported_and_skipped(tmp_path: Path) -> None:
    _fake_dist(tmp_path, "vtunnel_broken", "broken = vtunnel_no_such_module:Transport")
    (tmp_path / "vtunnel_notatransport.py").write_text("class X:\n    pass\n")
    _fake_dist(tmp_path, "vtunnel_wrong", "wrong = vtunnel_notatransport:X")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "vtunnel", "transports"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
    assert "BROKEN" in lines["broken"]
    assert "BROKEN" in lines["wrong"]
    assert "not a vtunnel Transport" in lines["wrong"]
    assert "BROKEN" not in lines["tcp"]
    # asking for the broken one by name fails with a clear error, the others still work
    code = (
        "from vtunnel.transports.base import get_transport, TransportError\n"
        "get_transport('tcp')\n"
        "try:\n    get_transport('broken')\nexcept TransportError as e:\n    print('ERR', e)\n"
    )
    out2 = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )
    assert "ERR the transport for 'broken'" in out2.stdout, out2.stdout + out2.stderr


@pytest.mark.parametrize(
    ("url", "host", "port", "params"),
    [
        ("tcp://127.0.0.1:9000", "127.0.0.1", 9000, {}),
        ("kcp://[::1]:4000?mode=fast3&mtu=1350", "::1", 4000, {"mode": "fast3", "mtu": "1350"}),
        ("TLS://example.com:443?ca=/x.pem", "example.com", 443, {"ca": "/x.pem"}),
    ],
)
def test_endpoint_parse(url: str, host: str, port: int, params: dict[str, str]) -> None:
    ep = Endpoint.parse(url)
    assert (ep.host, ep.port, dict(ep.params)) == (host, port, params)
    assert Endpoint.parse(str(ep)) == ep


@pytest.mark.parametrize(
    "url", ["127.0.0.1:9000", "tcp://:9000", "tcp://host", "tcp://host:99999", "kcp://h:1?mode=a&mode=b"]
)
def test_endpoint_parse_rejects(url: str) -> None:
    with pytest.raises(TransportError):
        Endpoint.parse(url)


@given(st.text(max_size=60))
def test_endpoint_parse_never_raises_anything_else(text: str) -> None:
    with contextlib.suppress(TransportError):
        Endpoint.parse(text)


def test_security_config_never_shows_the_key() -> None:
    cfg = SecurityConfig(psk=b"k" * 32)
    assert "kkkk" not in repr(cfg)
    with pytest.raises(TransportError):
        SecurityConfig(psk=b"short")


def test_tcp_rejects_options() -> None:
    with pytest.raises(TransportError, match="takes no options"):
        get_transport("tcp").check(Endpoint.parse("tcp://127.0.0.1:1?x=1"))
