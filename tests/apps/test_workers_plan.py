"""What ``--workers`` shares, and what it refuses, before any socket is bound (``listen_plan``)."""

from __future__ import annotations

import pytest

from vtunnel.apps.workers import listen_plan
from vtunnel.transports.base import Endpoint


@pytest.mark.parametrize("scheme", ["tcp", "kcp"])
@pytest.mark.parametrize("option", ["splice=0", "splice=off"])
def test_workers_take_a_splice_port_each_worker_chooses(scheme: str, option: str) -> None:
    ((endpoint, shared, _steering),) = listen_plan(
        [Endpoint.parse(f"{scheme}://127.0.0.1:4000?{option}")], workers=2, keyed=True, server_id=b""
    )
    assert endpoint.params["splice"] == option.partition("=")[2]
    assert shared.datagram is (scheme == "kcp")


@pytest.mark.parametrize("scheme", ["tcp", "kcp"])
def test_workers_refuse_a_fixed_splice_port_and_say_what_to_give(scheme: str) -> None:
    """One port for every worker: the kernel would hand a dedicated connection to any of them, and only one holds
    its ticket."""
    with pytest.raises(ValueError, match="give splice=0"):
        listen_plan(
            [Endpoint.parse(f"{scheme}://127.0.0.1:4000?splice=4001")], workers=2, keyed=True, server_id=b""
        )
