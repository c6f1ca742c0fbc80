"""A plugin whose module raises when imported is installed beside the working transports: `vtunnel server` and
`vtunnel agent` start and carry a tunnel over tcp:// as if it were not there, and asking either for its scheme
fails at once with an error naming the scheme, its entry point and what the import raised. Real processes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, VTUNNEL, Processes, free_port
from tests.netutil import echo_roundtrip, echo_server
from tests.plugins.tunnel import PluginUrls, start_tunnel

FAILURE = "this plugin fails on import"


@pytest.fixture
def broken_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a Python that finds an installed distribution registering ``explodes://``, whose
    module raises on import."""
    site = tmp_path / "site"
    dist = site / "vtunnel_explodes-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vtunnel-explodes\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[vtunnel.transports]\nexplodes = vtunnel_explodes:Transport\n")
    (site / "vtunnel_explodes.py").write_text(f"raise RuntimeError({FAILURE!r})\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def _vtunnel(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``vtunnel ARGS`` run to its end, with ``env`` added to this environment."""
    return subprocess.run(
        [*VTUNNEL, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=60,
        check=False,
    )


def test_vtunnel_serves_over_the_other_transports(
    procs: Processes, psk_file: Path, broken_env: dict[str, str]
) -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    with echo_server() as echo:
        front = start_tunnel(
            procs,
            PluginUrls(server=url, agent=url),
            psk_file,
            "--forward",
            "--target",
            f"127.0.0.1:{echo}",
            env=broken_env,
        )
        assert echo_roundtrip(front, b"the others still work") == b"the others still work"
    listing = _vtunnel(broken_env, "transports")
    assert listing.returncode == 0, listing.stderr
    lines = {line.split()[0]: line for line in listing.stdout.splitlines() if line.strip()}
    assert "BROKEN" in lines["explodes"]
    assert FAILURE in lines["explodes"]
    assert "BROKEN" not in lines["tcp"]


@pytest.mark.parametrize("side", ["server", "agent"])
def test_asking_for_its_scheme_names_it(psk_file: Path, broken_env: dict[str, str], side: str) -> None:
    url = f"explodes://127.0.0.1:{free_port()}"
    args = (
        ["--listen", url, "--target", "127.0.0.1:9"]
        if side == "server"
        else ["--server", url, "--forward", "127.0.0.1:0"]
    )
    out = _vtunnel(broken_env, side, *args, "--psk-file", str(psk_file))
    assert out.returncode != 0
    assert "the transport for 'explodes' (vtunnel_explodes:Transport) failed to load" in out.stderr, (
        out.stderr
    )
    assert FAILURE in out.stderr
