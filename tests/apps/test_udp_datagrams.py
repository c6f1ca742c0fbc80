"""SOCKS5 UDP ASSOCIATE through an agent and a server (in-process, with a key) at 5% loss each way, through the
impairment relay: over rudp:// the datagrams of ``udp`` streams are unreliable datagrams, over kcp:// they are in
the ordered byte stream.

What is asserted is behaviour that cannot be flaky: over rudp:// some datagrams are lost (the path drops one in
twenty and nothing resends them; the run sends hundreds) and the server's tunnel received datagrams outside the
byte stream; over kcp:// every one arrives. Neither path ever delivers a datagram twice, changed, or to another
association. The round-trip times, the point of it all, are measured by ``python -m bench.udp_echo``, not here.
"""

from __future__ import annotations

import pytest

from bench.udp_echo import EchoRun, run_echo

pytestmark = pytest.mark.anyio

LOSS = 0.05
COUNT = 150  # per association: with 5% loss each way, about 15 of them are lost over rudp://


def check_exact(run: EchoRun) -> None:
    """Nothing twice, nothing changed, nothing to the wrong association; the relay did drop datagrams."""
    for association in run.associations:
        assert association.sent == COUNT
        assert association.duplicates == 0
        assert association.foreign == 0
    assert run.relay["up"]["dropped"] > 0
    assert run.relay["down"]["dropped"] > 0


async def test_over_rudp_lost_datagrams_stay_lost() -> None:
    run = await run_echo("rudp", loss=LOSS, count=COUNT, interval=0.005, associations=2, settle=2.0, seed=3)
    check_exact(run)
    assert sum(a.lost for a in run.associations) > 0
    assert all(a.rtts for a in run.associations)  # and the rest came through
    assert run.server_datagrams > 0


async def test_over_kcp_every_datagram_arrives() -> None:
    run = await run_echo("kcp", loss=LOSS, count=COUNT, interval=0.005, associations=2, settle=20.0, seed=3)
    check_exact(run)
    assert [a.lost for a in run.associations] == [0, 0]
    assert run.server_datagrams == 0
