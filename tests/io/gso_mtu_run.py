"""Run inside a network namespace of a test's own (``ip netns exec NS python -m tests.io.gso_mtu_run``): its
loopback's MTU set to 1500, a socket that forbids fragmentation sends a batch whose first datagram is larger than
that (a path MTU probe) and whose others fit, then a batch that fits; prints one JSON line: what arrived, the
socket's counters, and whether it gave up segmentation offload."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from typing import Any

from structlog.testing import capture_logs

from vtunnel.io.datagrams import CoalescingSocket, Run, forbid_fragmentation, open_udp_socket


async def main() -> dict[str, Any]:
    got: list[int] = []

    def on_runs(runs: list[Run]) -> None:
        for buffer, segment, _source in runs:
            got.extend(len(buffer[i : i + segment]) for i in range(0, len(buffer), segment))

    receiver = CoalescingSocket(open_udp_socket(socket.AF_INET, bind=("127.0.0.1", 0)), on_runs)
    sock = open_udp_socket(socket.AF_INET, bind=("127.0.0.1", 0))
    forbid_fragmentation(sock)
    sender = CoalescingSocket(sock, lambda runs: None)
    with capture_logs() as logs:
        sender.sendto_many([bytes(8972), bytes(1472), bytes(1472)], receiver.local_address)
        sender.sendto_many([bytes(1472)] * 8, receiver.local_address)
        deadline = time.monotonic() + 5
        while len(got) < 10 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    sender.close()
    receiver.close()
    return {
        "received": got,
        "sent": sender.sent,
        "dropped": sender.dropped_sends,
        "gave_up_gso": any("segmentation offload unavailable" in entry["event"] for entry in logs),
    }


if __name__ == "__main__":
    subprocess.run(["ip", "link", "set", "lo", "mtu", "1500"], check=True, timeout=10)
    print(json.dumps(asyncio.run(main())))
