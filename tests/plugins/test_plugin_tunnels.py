"""The plugins' transports end to end, installed through their entry points like any third party: `vtunnel server`
and `vtunnel agent` as real processes over quic:// and wss:// (TLS verified against a test CA, a path and a Host
header of its own) move 64 MiB byte-exact through a --forward and serve curl through the agent's SOCKS5 front."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Processes
from tests.netutil import echo_roundtrip, echo_server, pattern
from tests.plugins.tunnel import check_curl_through_socks5, plugin_urls, start_tunnel
from vtunnel.transports.base import available_transports

SCHEMES = ["quic", "wss"]


@pytest.mark.parametrize("scheme", ["quic", "ws", "wss"])
def test_the_plugin_is_found_through_its_entry_point(scheme: str, tmp_path: Path) -> None:
    plugin_urls(scheme, tmp_path)  # skips when the plugin is not installed
    cls = available_transports()[scheme]
    assert isinstance(cls, type), cls


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
def test_forward_moves_64_mib_byte_exact(
    procs: Processes, psk_file: Path, tmp_path: Path, scheme: str
) -> None:
    urls = plugin_urls(scheme, tmp_path)
    with echo_server() as echo:
        front = start_tunnel(procs, urls, psk_file, "--forward", "--target", f"127.0.0.1:{echo}")
        payload = pattern(64 * 1024 * 1024, seed=17)
        assert echo_roundtrip(front, payload, timeout=240) == payload
        assert echo_roundtrip(front, b"still serving") == b"still serving"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_curl_through_socks5(procs: Processes, psk_file: Path, tmp_path: Path, scheme: str) -> None:
    check_curl_through_socks5(procs, plugin_urls(scheme, tmp_path), psk_file)
