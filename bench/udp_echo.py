"""UDP echo round trips through SOCKS5 UDP ASSOCIATE, an agent and a server over a lossy path.

    python -m bench.udp_echo [--loss 0.05] [--count 400] [--interval 0.005] [--schemes rudp rudp-reliable kcp]

For each scheme, in one process: a UDP echo target, a server listening on ``SCHEME://127.0.0.1:0`` with a key,
the impairment relay in front of it (the same loss each way), and an agent connected through the relay with a
SOCKS5 front. ``--associations`` clients each open a UDP association and send ``--count`` tagged datagrams,
one every ``--interval`` seconds, not waiting for the answers. It prints, per scheme, how many came back and
the percentiles of the round trips of those that did.

Over ``rudp://`` the datagrams of ``udp`` streams travel as unreliable datagrams (the ``datagrams`` extension):
a lost one is gone and delays nothing after it. Over ``kcp://`` they are in the tunnel's ordered byte stream: a
lost packet is retransmitted and every datagram behind it waits for it. ``rudp-reliable`` is rudp:// with the
extension turned off at the agent (``TunnelConfig(datagrams=False)``): the same ARQ, the ordered path.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
from anyio.abc import SocketAttribute

from vtunnel.apps.agent import Agent, AgentSettings
from vtunnel.apps.policy import ExitPolicy
from vtunnel.apps.server import Server, ServerSettings
from vtunnel.apps.socks5 import Command, Reply, encode_address, encode_request, parse_reply
from vtunnel.logging import configure_logging
from vtunnel.protocol import TunnelConfig
from vtunnel.testing.relay import Impairment, ImpairmentRelay
from vtunnel.transports.base import Endpoint, SecurityConfig

__all__ = ["Association", "EchoRun", "main", "run_echo"]

#: what each datagram carries after the SOCKS5 header: the association's tag, the sequence number, padding
_TAG = struct.Struct(">HI")


@dataclass(slots=True)
class Association:
    """What one client saw: the round trip of each answered datagram, and what should not happen."""

    tag: int
    sent: int = 0
    rtts: dict[int, float] = field(default_factory=dict)
    duplicates: int = 0
    foreign: int = 0  # answers of another association, or changed on the way

    @property
    def lost(self) -> int:
        return self.sent - len(self.rtts)


@dataclass(slots=True)
class EchoRun:
    scheme: str
    associations: list[Association]
    relay: dict[str, dict[str, int]]
    #: over all the server's tunnels: unreliable datagrams received and dropped by the tunnel core
    server_datagrams: int = 0
    server_datagrams_dropped: int = 0

    @property
    def rtts(self) -> list[float]:
        return sorted(rtt for a in self.associations for rtt in a.rtts.values())

    def percentile(self, q: float) -> float:
        rtts = self.rtts
        return rtts[min(len(rtts) - 1, int(q * len(rtts)))] if rtts else float("nan")


async def _echo_target(sock: anyio.abc.UDPSocket) -> None:
    async for data, (host, port, *_) in sock:
        await sock.sendto(data, host, port)


async def _associate(socks_port: int) -> tuple[anyio.abc.SocketStream, tuple[str, int]]:
    control = await anyio.connect_tcp("127.0.0.1", socks_port)
    await control.send(b"\x05\x01\x00" + encode_request(Command.UDP_ASSOCIATE, "0.0.0.0", 0))
    data = b""
    while (reply := parse_reply(data[2:])) is None:
        data += await control.receive()
    code, host, port = reply[0]
    if code != Reply.SUCCEEDED:
        raise RuntimeError(f"UDP ASSOCIATE refused: {code}")
    return control, (host, port)


async def _client(
    association: Association,
    socks_port: int,
    target_port: int,
    *,
    count: int,
    interval: float,
    size: int,
    settle: float,
) -> None:
    control, (relay_host, relay_port) = await _associate(socks_port)
    header = b"\x00\x00\x00" + encode_address("127.0.0.1", target_port)
    sent_at: dict[int, float] = {}
    async with control, await anyio.create_udp_socket(family=socket.AF_INET, local_host="127.0.0.1") as udp:

        async def receive() -> None:
            async for data, _ in udp:
                now = time.monotonic()
                body = data[len(header) :]
                if not data.startswith(header) or len(body) < _TAG.size:
                    association.foreign += 1
                    continue
                tag, seq = _TAG.unpack_from(body)
                if tag != association.tag or seq not in sent_at or body != _payload(tag, seq, size):
                    association.foreign += 1
                elif seq in association.rtts:
                    association.duplicates += 1
                else:
                    association.rtts[seq] = now - sent_at[seq]

        async with anyio.create_task_group() as tg:
            tg.start_soon(receive)
            for seq in range(count):
                sent_at[seq] = time.monotonic()
                await udp.sendto(header + _payload(association.tag, seq, size), relay_host, relay_port)
                association.sent += 1
                await anyio.sleep(interval)
            # the answers still on the way: all of them, or until the path has been quiet for ``settle``
            with anyio.move_on_after(settle):
                while len(association.rtts) < count:
                    seen = len(association.rtts)
                    with anyio.move_on_after(settle / 4) as quiet:
                        while len(association.rtts) == seen:  # noqa: ASYNC110
                            await anyio.sleep(0.01)
                    if quiet.cancelled_caught:
                        break
            tg.cancel_scope.cancel()


def _payload(tag: int, seq: int, size: int) -> bytes:
    head = _TAG.pack(tag, seq)
    return head + bytes((seq + i) & 0xFF for i in range(max(0, size - len(head))))


async def run_echo(
    scheme: str,
    *,
    loss: float,
    count: int,
    interval: float,
    associations: int = 1,
    size: int = 100,
    settle: float = 3.0,
    seed: int = 1,
) -> EchoRun:
    """One run over ``scheme`` (``rudp``, ``rudp-reliable`` or ``kcp``) with ``loss`` each way between agent
    and server."""
    name = scheme
    reliable = scheme.endswith("-reliable")
    scheme = scheme.removesuffix("-reliable")
    security = SecurityConfig(psk=os.urandom(32))
    impairment = Impairment(loss=loss)
    server = Server(
        ServerSettings(
            listen=[Endpoint.parse(f"{scheme}://127.0.0.1:0")],
            security=security,
            policy=ExitPolicy(allow_private=True),
            drain_timeout=1.0,
        )
    )
    async with (
        await anyio.create_udp_socket(family=socket.AF_INET, local_host="127.0.0.1") as target,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(_echo_target, target)
        target_port = int(target.extra(SocketAttribute.local_port))
        # the server and the agent are shut down, and their serve() awaited, not cancelled: they close
        # what they opened
        async with anyio.create_task_group() as serving:
            addresses = await serving.start(server.serve)
            server_port = int(addresses[0].rsplit(":", 1)[1])
            relay = ImpairmentRelay(("127.0.0.1", server_port), up=impairment, down=impairment, seed=seed)
            async with relay, anyio.create_task_group() as agent_serving:
                agent = Agent(
                    AgentSettings(
                        servers=[Endpoint.parse(f"{scheme}://127.0.0.1:{relay.address[1]}")],
                        security=security,
                        socks=("127.0.0.1", 0),
                        tunnel=TunnelConfig(datagrams=not reliable),
                        drain_timeout=1.0,
                    )
                )
                fronts = await agent_serving.start(agent.serve)
                socks_port = int(fronts["socks"].rsplit(":", 1)[1])
                run = EchoRun(name, [Association(tag) for tag in range(associations)], {})
                async with anyio.create_task_group() as clients:
                    for association in run.associations:
                        clients.start_soon(
                            lambda a=association: _client(  # type: ignore[misc]
                                a,
                                socks_port,
                                target_port,
                                count=count,
                                interval=interval,
                                size=size,
                                settle=settle,
                            )
                        )
                run.relay = relay.stats()
                run.server_datagrams = sum(t.tunnel.datagrams_received for t in server.tunnels)
                run.server_datagrams_dropped = sum(t.tunnel.datagrams_dropped for t in server.tunnels)
                agent.shutdown()
            server.shutdown()
        tg.cancel_scope.cancel()
    return run


def _report(run: EchoRun) -> str:
    sent = sum(a.sent for a in run.associations)
    lost = sum(a.lost for a in run.associations)
    cells = " ".join(f"p{int(q * 100)}={run.percentile(q) * 1000:7.2f}" for q in (0.5, 0.9, 0.95, 0.99))
    return (
        f"{run.scheme:<13} answered {sent - lost}/{sent} (lost {lost}, duplicates "
        f"{sum(a.duplicates for a in run.associations)}, foreign {sum(a.foreign for a in run.associations)})  "
        f"round trip ms: {cells} max={run.rtts[-1] * 1000 if run.rtts else float('nan'):7.2f}  "
        f"server datagrams {run.server_datagrams} (dropped {run.server_datagrams_dropped})"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.udp_echo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", type=float, default=0.05)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--interval", type=float, default=0.005)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--associations", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="alternated rounds of every scheme")
    parser.add_argument("--schemes", nargs="+", default=["rudp", "rudp-reliable", "kcp"])
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    configure_logging(level=args.log_level)
    for round_ in range(args.rounds):
        for scheme in args.schemes:
            run = anyio.run(
                lambda s=scheme, r=round_: run_echo(  # type: ignore[misc]
                    s,
                    loss=args.loss,
                    count=args.count,
                    interval=args.interval,
                    associations=args.associations,
                    size=args.size,
                    seed=r + 1,
                )
            )
            print(_report(run), flush=True)


if __name__ == "__main__":
    main()
