"""Run inside a network namespace of a test's own (``ip netns exec NS python -m tests.transports.rudp_mtu_run``):
an rudp:// listener and client on its loopback, ``--mib`` MiB client -> server, the loopback's MTU set to
``--mtu`` before and, with ``--shrink``, lowered to that once a quarter was read; prints one JSON line: whether
the bytes arrived exactly, and the client connection's counters."""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
from typing import Any

import anyio

from tests.linkutil import stream_of
from vtunnel.testing.conformance import KIT_KEY
from vtunnel.transports.base import Endpoint, SecurityConfig
from vtunnel.transports.rudp.link import RudpLink
from vtunnel.transports.rudp.listener import RudpListener
from vtunnel.transports.rudp.transport import RudpTransport


def set_mtu(mtu: int) -> None:
    subprocess.run(["ip", "link", "set", "lo", "mtu", str(mtu)], check=True, timeout=10)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    set_mtu(args.mtu)
    security = KIT_KEY if args.key else SecurityConfig()
    transport = RudpTransport()
    listener = await transport.listen(Endpoint.parse("rudp://127.0.0.1:0"), security=security)
    assert isinstance(listener, RudpListener)
    port = listener.local_address[1]
    link = await transport.connect(Endpoint.parse(f"rudp://127.0.0.1:{port}"), security=security)
    assert isinstance(link, RudpLink)
    client = stream_of(link)
    size = int(args.mib * (1 << 20))
    block = random.Random(5).randbytes(1 << 16)
    sent = hashlib.sha256()
    got = hashlib.sha256()
    result: dict[str, Any] = {}

    async def sink() -> None:
        server = stream_of(await listener.accept())
        read = 0
        shrunk = False
        while read < size:
            chunk = await server.receive()
            got.update(chunk)
            read += len(chunk)
            if args.shrink and not shrunk and read >= size // 4:
                shrunk = True
                set_mtu(args.shrink)

    with anyio.fail_after(90):
        async with anyio.create_task_group() as tg:
            tg.start_soon(sink)
            offset = 0
            while offset < size:
                piece = bytes([offset >> 16 & 0xFF]) + block[1 : min(len(block), size - offset)]
                await client.send(piece)
                sent.update(piece)
                offset += len(piece)
    result["exact"] = sent.digest() == got.digest()
    result["stats"] = link.connection.stats()
    await client.aclose()
    await listener.aclose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mtu", type=int, required=True)
    parser.add_argument("--shrink", type=int, default=0)
    parser.add_argument("--mib", type=float, default=8.0)
    parser.add_argument("--key", action="store_true")
    args = parser.parse_args()
    print(json.dumps(anyio.run(run, args, backend="asyncio", backend_options={"use_uvloop": True})))


if __name__ == "__main__":
    main()
