"""Two LiteTlsSessions in splice mode connected in memory as the runtime connects them: the stream's DATA in a
tunnel queue each way (protected or passthrough) until an end leaves, then a dedicated queue each way that no
session sees (the kernel relay). The one harness of the splice-mode tests in memory; ``bind`` says when the
dedicated connection exists:

* ``"start"``: bound at both ends from the start (``splice()`` before any byte);
* ``"hello"``: dialed as the runtime dials it: both ends go pending at ``step.hello``; the connection reaches the
  server at any later moment, which binds it (``may_splice``) or refuses it; the agent learns the outcome at any
  moment after that (with ``ack_lost``, it may see no ACK in time although the server bound it: it settles
  muxed); the server's wait for it may run out first.

Each step is one action picked at random (local bytes, tunnel bytes cut at random, dedicated bytes, the dial's
events), so that a hypothesis seed covers an interleaving and a chunking."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from tests.lite_tls.tlsutil import Endpoint
from vtunnel.protocol import Role
from vtunnel.protocol.lite_tls import LiteTlsRole, LiteTlsSession, LiteTlsStep

REQUEST = b"GET /big HTTP/1.1\r\nHost: lite-tls.test\r\n\r\n"
HELLO = b"\x16\x03\x01\x00\x04\x01\x00\x00\x00"


def record(kind: int, n: int) -> bytes:
    return bytes([kind, 3, 3]) + n.to_bytes(2, "big") + b"A" * n


@dataclass
class End:
    name: str
    session: LiteTlsSession
    local: Endpoint
    #: the hand-over happened: local bytes go to the dedicated queue as they are, the peer's come from it
    switched: bool = False
    role: LiteTlsRole | None = None
    delivered: bytearray = field(default_factory=bytearray)
    hello: bool = False


@dataclass
class Dial:
    dialed: bool = False  # the agent connected and wrote its ticket
    arrived: bool = False  # the server took or refused it
    acked: bool | None = None  # what the server answered
    ack_lost: bool = False  # the agent's wait for the ACK ran out (the server may have bound it all the same)
    unbound: bool = False  # the server closed the connection it bound (the agent's marker said muxed)
    timed_out: bool = False  # the server's wait ran out


def run(
    user: Endpoint,
    target: Endpoint,
    rng: random.Random,
    *,
    max_chunk: int,
    bind: Literal["start", "hello"],
    ack_lost: bool = False,
) -> tuple[End, End, Dial]:
    agent = End("agent", LiteTlsSession(Role.CLIENT), user)
    server = End("server", LiteTlsSession(Role.SERVER), target)
    if bind == "start":
        for end in (agent, server):
            end.session.splice()
    tunnel: dict[str, deque[tuple[bytes, bool]]] = {"agent": deque(), "server": deque()}  # towards that end
    dedicated: dict[str, deque[bytes]] = {"agent": deque(), "server": deque()}
    peer = {"agent": server, "server": agent}
    dial = Dial()

    def act(end: End, step: LiteTlsStep) -> None:
        assert step.violation is None, (end.name, step.violation)
        if step.unbound:
            assert end is server, "only the server binds before the agent knows"
            dial.unbound = True
        if step.left is not None:
            end.role = step.left
        if step.hello and bind == "hello":
            assert not end.hello
            end.hello = True
            if end is agent:
                end.session.splice_pending()
                dial.dialed = True
            elif end.session.may_splice:  # (not when the connection came first and is bound already)
                end.session.splice_pending()
        other = peer[end.name].name
        for data, passthrough in step.send:
            if passthrough and end.session.spliced:
                dedicated[other].append(bytes(data))
            else:
                tunnel[other].append((bytes(data), passthrough))
        for data in step.deliver:
            end.delivered += data
            end.local.feed(data)
        if end.session.left and end.session.spliced and not end.switched:
            end.switched = True  # the hand-over: nothing may come in the tunnel to this end from here on
            assert not tunnel[end.name], (end.name, list(tunnel[end.name]))

    def from_local(end: End) -> bool:
        if end.session.holds_local:
            return False
        data = end.local.step()
        if not data:
            return False
        if end.switched:
            dedicated[peer[end.name].name].append(data)
        else:
            act(end, end.session.from_local(data))
        return True

    def from_tunnel(end: End) -> bool:
        queue = tunnel[end.name]
        if not queue:
            return False
        assert not end.switched, f"{end.name}: tunnel bytes after the switch"
        data, passthrough = queue.popleft()
        cut = rng.randint(1, min(max_chunk, len(data))) if not passthrough else len(data)
        if cut < len(data):
            queue.appendleft((data[cut:], passthrough))
        act(end, end.session.from_peer(data[:cut], passthrough))
        return True

    def from_dedicated(end: End) -> bool:
        queue = dedicated[end.name]
        if not queue or not end.switched:  # the kernel relay exists once this end switched
            return False
        data = queue.popleft()
        end.delivered += data
        end.local.feed(data)
        return True

    def arrive() -> bool:  # the agent's connection reaches the server, which binds it or refuses it
        if not dial.dialed or dial.arrived:
            return False
        dial.arrived = True
        session = server.session
        dial.acked = session.may_splice
        if not dial.acked:
            return True
        if session.splice_is_pending:
            act(server, session.splice_settled(True))
        else:
            session.splice()
        return True

    def answer() -> bool:  # the agent reads the ACK, or the end of the refused connection
        if dial.acked is None or not agent.session.splice_is_pending:
            return False
        act(agent, agent.session.splice_settled(dial.acked))
        return True

    def no_ack_in_time() -> bool:  # the agent's wait for the ACK runs out, whatever the server did
        if not ack_lost or not dial.dialed or not agent.session.splice_is_pending or rng.random() < 0.8:
            return False
        dial.ack_lost = True
        act(agent, agent.session.splice_settled(False))
        return True

    def server_wait_ends() -> bool:
        if not server.session.splice_is_pending or rng.random() < 0.9:
            return False
        dial.timed_out = True
        act(server, server.session.splice_settled(False))
        return True

    actions: list[Callable[[], bool]] = [
        lambda: from_local(agent),
        lambda: from_local(server),
        lambda: from_tunnel(agent),
        lambda: from_tunnel(server),
        lambda: from_dedicated(agent),
        lambda: from_dedicated(server),
        arrive,
        answer,
        no_ack_in_time,
        server_wait_ends,
    ]
    steps = idle = 0
    while not (
        user.done
        and target.done
        and not any(tunnel.values())
        and not any(dedicated.values())
        and not agent.session.splice_is_pending
    ):
        steps += 1
        assert steps < 200_000, "no progress"
        if rng.choice(actions)():
            idle = 0
            continue
        idle += 1
        if idle > 200:
            assert any(action() for action in actions), f"stuck: {agent} {server} {dial}"
            idle = 0
    return agent, server, dial
