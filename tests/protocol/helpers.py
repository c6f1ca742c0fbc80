"""In-memory helpers for the protocol tests: a connected client/server pair and a byte pump."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TypeVar

from vtunnel.protocol import Role, Tunnel, TunnelConfig, TunnelState
from vtunnel.protocol import events as ev

E = TypeVar("E", bound=ev.Event)
VPROXY = TunnelConfig(extensions=False)
EXTENDED = TunnelConfig(extensions=True)


@dataclass
class Side:
    tunnel: Tunnel
    events: list[ev.Event] = field(default_factory=list)

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]

    def data(self, stream_id: int) -> bytes:
        return b"".join(
            e.data for e in self.events if isinstance(e, ev.DataReceived) and e.stream_id == stream_id
        )


def state_of(tunnel: Tunnel) -> TunnelState:
    """The tunnel's state, read through a call so that type narrowing does not carry across actions."""
    return tunnel.state


def handshake(
    client_config: TunnelConfig = EXTENDED, server_config: TunnelConfig | None = None, now: float = 0.0
) -> tuple[Side, Side]:
    client = Side(Tunnel(role=Role.CLIENT, config=client_config))
    server = Side(Tunnel(role=Role.SERVER, config=server_config or client_config))
    client.tunnel.initiate(now)
    server.tunnel.initiate(now)
    pump(client, server, now)
    assert [type(e) for e in client.events] == [ev.HandshakeCompleted]
    client.events.clear()
    server.events.clear()
    return client, server


def pump(
    a: Side,
    b: Side,
    now: float = 0.0,
    *,
    rng: random.Random | None = None,
    max_rounds: int = 10_000,
) -> None:
    """Move bytes both ways until neither side has anything to send (optionally in random chunks)."""
    for _ in range(max_rounds):
        moved = False
        for src, dst in ((a, b), (b, a)):
            data = src.tunnel.data_to_send()
            if not data:
                continue
            moved = True
            for chunk in chunks(data, rng):
                dst.events.extend(dst.tunnel.receive_data(chunk, now))
        if not moved:
            return
    raise AssertionError("pump did not settle")


def chunks(data: bytes, rng: random.Random | None) -> list[bytes]:
    if rng is None:
        return [data]
    out = []
    i = 0
    while i < len(data):
        n = rng.choice((1, 2, 7, 9, 10, 100, 1000, 20000))
        out.append(data[i : i + n])
        i += n
    return out
