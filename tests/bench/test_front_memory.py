"""python -m bench.front_memory as a user runs it, tiny: every front proves each of its connections by an echo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def test_every_front_is_measured_and_written(tmp_path: Path) -> None:
    out = tmp_path / "front-memory.json"
    argv = [
        sys.executable,
        "-m",
        "bench.front_memory",
        "--connections",
        "20",
        "--scheme",
        "tcp",
        "--out",
        str(out),
    ]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=100, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["connections"] == 20
    assert set(doc["per_connection_bytes"]) == {"forward", "socks5", "http-connect"}
    for front in ("forward", "socks5", "http-connect"):
        assert front in done.stdout


def test_a_count_out_of_range_is_refused() -> None:
    argv = [sys.executable, "-m", "bench.front_memory", "--connections", "0"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert "--connections must be between" in done.stderr
