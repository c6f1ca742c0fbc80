"""`make run` runs `vtunnel demo`: a server and an agent on loopback, ready for curl."""

from __future__ import annotations

import shutil
import signal
import subprocess

import pytest

from tests.conftest import Processes, free_port, wait_port


@pytest.mark.parametrize("transport", ["kcp", "tcp"])
def test_demo_serves_curl_through_socks5_and_http(procs: Processes, transport: str) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed (.ci/run installs it)")
    socks, http, page, tunnel = free_port(), free_port(), free_port(), free_port()
    demo = procs.start(
        "demo",
        "--transport",
        transport,
        "--socks",
        f"127.0.0.1:{socks}",
        "--http",
        f"127.0.0.1:{http}",
        "--page-port",
        str(page),
        "--tunnel-port",
        str(tunnel),
    )
    wait_port(socks)
    wait_port(http)
    url = f"http://127.0.0.1:{page}/"
    for proxy in (["--socks5-hostname", f"127.0.0.1:{socks}"], ["-x", f"http://127.0.0.1:{http}"]):
        out = subprocess.run([curl, "-sS", "--max-time", "20", *proxy, url], capture_output=True, check=True)
        assert b"Hello through vtunnel" in out.stdout
    assert "curl --socks5-hostname" in procs.output(demo)
    demo.send_signal(signal.SIGINT)
    assert demo.wait(timeout=20) == 0
