"""What ``--workers`` shares, and what it refuses, before any socket is bound (``listen_plan``)."""

from __future__ import annotations

import pytest

from vtunnel.apps.workers import Worker, listen_plan
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
def test_workers_take_a_fixed_splice_port_with_one_port_per_slot_after_it(scheme: str) -> None:
    ((endpoint, _shared, _steering),) = listen_plan(
        [Endpoint.parse(f"{scheme}://127.0.0.1:4000?splice=4001")], workers=2, keyed=True, server_id=b""
    )
    assert endpoint.params["splice"] == "4001"
    # worker k runs on slot k, and its replacement on slot workers + k: each has a port of its own
    ports = {
        Worker(index=i, workers=2, slot=slot, slots=4, ready_fd=-1).splice_endpoint(endpoint).params["splice"]
        for i in range(2)
        for slot in (i, 2 + i)
    }
    assert ports == {"4001", "4002", "4003", "4004"}


@pytest.mark.parametrize("option", ["", "?splice=0", "?splice=off", "?mode=fast3"])
def test_a_worker_keeps_a_url_without_a_fixed_splice_port(option: str) -> None:
    endpoint = Endpoint.parse(f"kcp://127.0.0.1:4000{option}")
    assert Worker(index=1, workers=2, slot=3, slots=4, ready_fd=-1).splice_endpoint(endpoint) == endpoint


@pytest.mark.parametrize("scheme", ["tcp", "kcp"])
def test_workers_refuse_splice_ports_past_the_last_port_and_say_what_to_give(scheme: str) -> None:
    """Four workers take eight ports from PORT on: 65530 leaves room for six."""
    listen_plan(
        [Endpoint.parse(f"{scheme}://127.0.0.1:4000?splice=65528")], workers=4, keyed=True, server_id=b""
    )
    with pytest.raises(ValueError, match=r"65530 to 65537 .* give a lower port, or splice=0"):
        listen_plan(
            [Endpoint.parse(f"{scheme}://127.0.0.1:4000?splice=65530")], workers=4, keyed=True, server_id=b""
        )
