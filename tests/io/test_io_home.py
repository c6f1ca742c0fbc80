"""vtunnel.io is the one home of file-descriptor I/O: no other shipped package sets socket options, waits on a
descriptor, or uses select / epoll / splice itself (import-linter cannot say this: it sees imports, not calls)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vtunnel

ROOT = Path(vtunnel.__file__).parent
#: the home itself, and the test kit (an impairment relay that reads kernel timestamps; never imported by shipped code)
EXEMPT = ("io", "testing")
#: modules only vtunnel.io may import
MODULES = frozenset({"select", "selectors", "fcntl"})
#: attributes only vtunnel.io may call (a socket's options, an event loop's or anyio's descriptor waits, the kernel relay)
CALLS = frozenset(
    {
        "setsockopt",
        "getsockopt",
        "add_reader",
        "add_writer",
        "remove_reader",
        "remove_writer",
        "wait_readable",
        "wait_writable",
        "wait_socket_readable",
        "wait_socket_writable",
    }
)
#: functions of ``os`` only vtunnel.io may call (the kernel relay and its pipes)
OS_CALLS = frozenset({"splice", "pipe2", "set_blocking"})


def offences(tree: ast.AST) -> list[str]:
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in CALLS:
            found.append(f"line {node.lineno}: .{node.func.attr}(...)")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "os"
            and node.func.attr in OS_CALLS
        ):
            found.append(f"line {node.lineno}: os.{node.func.attr}(...)")
    return found


def shipped_modules() -> list[Path]:
    return sorted(
        p
        for p in ROOT.rglob("*.py")
        if p.relative_to(ROOT).parts[0] not in EXEMPT or len(p.relative_to(ROOT).parts) == 1
    )


@pytest.mark.parametrize("path", shipped_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_descriptor_io_outside_vtunnel_io(path: Path) -> None:
    assert offences(ast.parse(path.read_text(), str(path))) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import select\n", ["import select"]),
        ("from fcntl import ioctl\n", ["from fcntl import ..."]),
        ("sock.setsockopt(1, 2, 3)\n", ["line 1: .setsockopt(...)"]),
        ("await anyio.wait_writable(sock)\n", ["line 1: .wait_writable(...)"]),
        ("loop.add_reader(fd, cb)\n", ["line 1: .add_reader(...)"]),
        ("os.splice(a, b, 4)\n", ["line 1: os.splice(...)"]),
        ("self._wait_writable()\nrelay.splice(end)\nimport selectorsx\n", []),
    ],
)
def test_the_check_sees_what_it_forbids(source: str, expected: list[str]) -> None:
    assert offences(ast.parse(source)) == expected
