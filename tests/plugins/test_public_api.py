"""The plugins (plugins/*) use only vtunnel's public plugin API, the modules and names docs/plugins.md gives a
transport author: where a plugin needed an internal, the API changed instead."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

#: the modules a plugin may import from vtunnel, and the names it may take from each (``None``: any public one)
PUBLIC: dict[str, frozenset[str] | None] = {
    "vtunnel.transports.base": None,  # Transport, ByteStreamTransport, Endpoint, SecurityConfig, TransportError
    "vtunnel.transports.link": frozenset(
        {"Link", "LinkStream", "LinkStats"}
    ),  # the contract a Transport returns
    "vtunnel.transports.tcp": frozenset({"tls_client_context", "tls_server_context"}),  # tls://'s options
    "vtunnel.io.datagrams": frozenset(
        {"Address", "open_udp_socket", "resolve_udp"}
    ),  # a UDP transport's socket
}

SOURCES = sorted(path for path in (ROOT / "plugins").glob("*/vtunnel_*/**/*.py"))


def _vtunnel_imports(path: Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` of every import of vtunnel in ``path`` (``name`` is ``None`` for ``import module``)."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vtunnel":
            found.extend((node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            found.extend((alias.name, None) for alias in node.names if alias.name.split(".")[0] == "vtunnel")
    return found


def test_both_plugins_are_checked() -> None:
    assert {path.parent.name for path in SOURCES} >= {"vtunnel_quic", "vtunnel_websocket"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_a_plugin_imports_only_the_public_api(path: Path) -> None:
    for module, name in _vtunnel_imports(path):
        assert module in PUBLIC, f"{path.name} imports {module}, not part of the plugin API"
        allowed = PUBLIC[module]
        assert name is not None, f"{path.name} imports the module {module} whole"
        assert not name.startswith("_"), f"{path.name} imports the private {module}.{name}"
        assert allowed is None or name in allowed, f"{path.name} imports {module}.{name}"
