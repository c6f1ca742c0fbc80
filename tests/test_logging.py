"""Log lines from several processes sharing one pipe (a server's workers share their supervisor's stderr): each
line is written whole, so none is cut into by another process's, even with ``PYTHONUNBUFFERED`` set (as container
images often set it), where Python writes what it is given at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

_LINES = 3000

_WRITER = f"""
import structlog
from vtunnel.logging import configure_logging
configure_logging(fmt="json")
log = structlog.get_logger("test")
for n in range({_LINES}):
    log.info("line", n=n, padding="x" * 200)
"""


def test_json_lines_of_processes_sharing_stderr_are_never_interleaved() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    read, write = os.pipe()
    try:
        writers = [subprocess.Popen([sys.executable, "-c", _WRITER], stderr=write, env=env) for _ in range(3)]
    finally:
        os.close(write)
    with os.fdopen(read, "rb") as pipe:
        lines = pipe.read().decode().splitlines()
    for proc in writers:
        assert proc.wait(timeout=60) == 0
    events = [json.loads(line) for line in lines]  # a cut line is not JSON
    assert len(events) == 3 * _LINES
    assert sorted(e["n"] for e in events) == sorted(list(range(_LINES)) * 3)
