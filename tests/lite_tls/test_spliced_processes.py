"""lite-tls splice mode between real ``vtunnel server`` and ``vtunnel agent`` processes (their own event loop,
the command line's URL option): curl through the agent's SOCKS5 front to a local HTTPS origin, 64 MiB
byte-exact, and both processes' logs show the stream leaving the tunnel in splice mode."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import anyio
import pytest

from tests.conftest import Processes, free_port, wait_log
from vtunnel.io.splice import SPLICE_AVAILABLE

from .test_muxed import body_for, ca_file, curl, origin

__all__ = ["ca_file"]

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not SPLICE_AVAILABLE, reason="no os.splice on this platform"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]


def left(procs: Processes, proc: subprocess.Popen[bytes]) -> list[dict[str, object]]:
    lines = procs.output(proc).splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    return [e for e in events if e.get("event") == "lite_tls.left_tunnel"]


async def test_curl_through_spliced_processes_is_byte_exact(
    procs: Processes, psk_file: Path, ca_file: str, tmp_path: Path
) -> None:
    size = 64 * 1024 * 1024
    port, splice, socks = free_port(), free_port(), free_port()
    common = ["--psk-file", str(psk_file), "--log-format", "json"]
    async with origin("1.3") as https:
        server = procs.start(
            "server", "--listen", f"tcp://127.0.0.1:{port}?splice={splice}", "--allow-private", *common
        )
        await anyio.to_thread.run_sync(wait_log, procs, server, "lite_tls.splice_listening")
        agent = procs.start(
            "agent",
            "--server",
            f"tcp://127.0.0.1:{port}?splice={splice}",
            "--socks",
            f"127.0.0.1:{socks}",
            *common,
        )
        await anyio.to_thread.run_sync(wait_log, procs, agent, "listening")
        out = tmp_path / "body"
        with anyio.fail_after(150):
            assert await curl(socks, f"https://127.0.0.1:{https}/bytes/{size}", out, ca=ca_file) == 0
        assert out.read_bytes() == body_for(size)
        with anyio.fail_after(10):
            while not (left(procs, server) and left(procs, agent)):
                await anyio.sleep(0.05)
    assert [e["mode"] for e in left(procs, server)] == ["spliced"]
    assert [e["mode"] for e in left(procs, agent)] == ["spliced"]
    assert {left(procs, server)[0]["role"], left(procs, agent)[0]["role"]} == {"active", "passive"}
