"""The agent's choice of lite-tls streams: by destination port, with a switch to widen or turn it off."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from vtunnel.apps.agent import DEFAULT_LITE_TLS_PORTS, Agent, AgentSettings
from vtunnel.cli import main, parse_ports
from vtunnel.protocol import StreamMetadata
from vtunnel.transports.base import Endpoint, SecurityConfig


def agent(ports: frozenset[int] = DEFAULT_LITE_TLS_PORTS) -> Agent:
    return Agent(
        AgentSettings(
            servers=[Endpoint.parse("tcp://127.0.0.1:9")],
            security=SecurityConfig(psk=bytes(32)),
            socks=("127.0.0.1", 0),
            lite_tls_ports=ports,
        )
    )


@pytest.mark.parametrize(
    ("authority", "kind", "ports", "expected"),
    [
        ("example.com:443", "tcp", DEFAULT_LITE_TLS_PORTS, "lite-tls"),
        ("[2001:db8::1]:443", "tcp", DEFAULT_LITE_TLS_PORTS, "lite-tls"),
        ("example.com:80", "tcp", DEFAULT_LITE_TLS_PORTS, "tcp"),
        ("example.com:8443", "tcp", frozenset({443, 8443}), "lite-tls"),
        ("example.com:443", "tcp", frozenset(), "tcp"),
        ("example.com:443", "udp", DEFAULT_LITE_TLS_PORTS, "udp"),
    ],
)
def test_streams_to_the_ports_where_tls_is_expected_are_lite_tls(
    authority: str, kind: str, ports: frozenset[int], expected: str
) -> None:
    md = agent(ports).choose_kind(StreamMetadata(authority=authority, kind=kind))
    assert md.kind == expected
    assert md.authority == authority


def test_parse_ports() -> None:
    assert parse_ports("443") == {443}
    assert parse_ports(" 443,8443 ") == {443, 8443}
    assert parse_ports("none") == frozenset()
    assert parse_ports("") == frozenset()
    for bad in ("https", "0", "70000", "443;8443"):
        with pytest.raises(click.UsageError):
            parse_ports(bad)


def test_the_cli_names_a_bad_port_list() -> None:
    result = CliRunner().invoke(
        main, ["agent", "--server", "tcp://127.0.0.1:9", "--insecure", "--lite-tls-ports", "https"]
    )
    assert result.exit_code == 2
    assert "--lite-tls-ports" in result.output


def test_splice_mode_takes_one_server() -> None:
    """A spliced stream's dedicated connection goes to the server of the tunnel that carried its ticket, which is
    the one server only when there is one."""
    one = AgentSettings(
        servers=[Endpoint.parse("tcp://127.0.0.1:9?splice=10")],
        security=SecurityConfig(psk=bytes(32)),
        socks=("127.0.0.1", 0),
    )
    assert one.server.params["splice"] == "10"
    with pytest.raises(ValueError, match="one --server"):
        AgentSettings(
            servers=[Endpoint.parse("tcp://127.0.0.1:9?splice=10"), Endpoint.parse("tls://127.0.0.1:11")],
            security=SecurityConfig(psk=bytes(32)),
            socks=("127.0.0.1", 0),
        )
