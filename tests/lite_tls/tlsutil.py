"""Real TLS endpoints in memory (ssl.SSLObject on MemoryBIOs, a trustme certificate) and two lite-tls trackers
connected to each other the way the runtime will connect them: each SendToPeer travels as one protected or
passthrough item, split into reads anywhere, in order per direction."""

from __future__ import annotations

import random
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trustme

from vtunnel.protocol import Role
from vtunnel.protocol.lite_tls import (
    DeliverToLocal,
    FellBack,
    LeftTunnel,
    LiteTlsEvent,
    LiteTlsState,
    LiteTlsTracker,
    PeerViolation,
    SendToPeer,
)

HOST = "lite-tls.test"
_CA = trustme.CA()
_CERT = _CA.issue_cert(HOST)
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def contexts(version: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(client, server) contexts pinned to one TLS version."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _CERT.configure_cert(server)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _CA.configure_trust(client)
    for ctx in (client, server):
        ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    return client, server


def ca_pem() -> bytes:
    return _CA.cert_pem.bytes()


def cert_files(tmp: object) -> tuple[str, str, str]:
    """(certificate chain, key, CA) written under the directory ``tmp`` (a pathlib.Path)."""
    from pathlib import Path

    base = Path(str(tmp))
    chain, key, ca = base / "cert.pem", base / "key.pem", base / "ca.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in _CERT.cert_chain_pems))
    key.write_bytes(_CERT.private_key_pem.bytes())
    ca.write_bytes(ca_pem())
    return str(chain), str(key), str(ca)


class Endpoint(Protocol):
    written: bytearray
    received: bytearray

    def feed(self, data: bytes) -> None: ...

    def step(self) -> bytes: ...

    @property
    def done(self) -> bool: ...


class TlsEnd:
    """One TLS endpoint: writes ``payloads`` once the handshake is done and it has read ``write_after`` bytes
    of application data; records every byte it writes."""

    def __init__(
        self, ctx: ssl.SSLContext, *, server: bool, payloads: list[bytes], write_after: int = 0
    ) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        hostname = None if server else HOST
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server, server_hostname=hostname)
        self.payloads = list(payloads)
        self.write_after = write_after
        self.expect = 0
        self.handshaken = False
        self.written = bytearray()
        self.received = bytearray()  # application data read
        self.flights: list[bytes] = []

    def feed(self, data: bytes) -> None:
        self.incoming.write(data)

    def step(self) -> bytes:
        if not self.handshaken:
            try:
                self.obj.do_handshake()
                self.handshaken = True
            except ssl.SSLWantReadError:
                pass
        if self.handshaken:
            try:
                while chunk := self.obj.read(1 << 20):
                    self.received += chunk
            except ssl.SSLWantReadError:
                pass
            if len(self.received) >= self.write_after:
                while self.payloads:
                    self.obj.write(self.payloads.pop(0))
        out = self.outgoing.read()
        if out:
            self.written += out
            self.flights.append(out)
        return out

    @property
    def done(self) -> bool:
        return self.handshaken and not self.payloads and len(self.received) >= self.expect


class ScriptEnd:
    """Not TLS at all, or TLS-looking bytes: writes each chunk once it has received ``after`` bytes."""

    def __init__(self, script: list[tuple[int, bytes]]) -> None:
        self.script = list(script)
        self.written = bytearray()
        self.received = bytearray()
        self.expect = 0

    def feed(self, data: bytes) -> None:
        self.received += data

    def step(self) -> bytes:
        out = bytearray()
        while self.script and len(self.received) >= self.script[0][0]:
            out += self.script.pop(0)[1]
        self.written += out
        return bytes(out)

    @property
    def done(self) -> bool:
        return not self.script and len(self.received) >= self.expect


def scripts(pieces: list[tuple[float, str, bytes]]) -> tuple[ScriptEnd, ScriptEnd]:
    """A user and a target that write their pieces ("user" | "target", bytes) in the order of the keys: each
    piece waits until everything the other side wrote before it has arrived, so the scripts never wait for each
    other and every interleaving of the tunnel is possible."""
    written = {"user": 0, "target": 0}
    plans: dict[str, list[tuple[int, bytes]]] = {"user": [], "target": []}
    for _, side, piece in sorted(pieces, key=lambda item: item[0]):
        other = "target" if side == "user" else "user"
        plans[side].append((written[other], piece))
        written[side] += len(piece)
    user, target = ScriptEnd(plans["user"]), ScriptEnd(plans["target"])
    user.expect, target.expect = written["target"], written["user"]
    return user, target


@dataclass
class End:
    """One vtunnel end of the stream: its tracker, its local TLS endpoint, and what the runtime would do."""

    name: str
    tracker: LiteTlsTracker
    local: Endpoint
    sending_passthrough: bool = False
    log: list[LiteTlsEvent] = field(default_factory=list)


@dataclass
class PairResult:
    agent: End
    server: End
    left: bool
    fell_back: bool
    steps: int


def connect(
    user: Endpoint, target: Endpoint, rng: random.Random, *, max_chunk: int = 64, max_steps: int = 200_000
) -> PairResult:
    """Run the user's and the target's TLS through an agent tracker and a server tracker until both ends have
    read everything they expect; every item in the tunnel is split into reads of 1..max_chunk bytes at random."""
    agent = End("agent", LiteTlsTracker(Role.CLIENT), user)
    server = End("server", LiteTlsTracker(Role.SERVER), target)
    to_server: deque[tuple[bytes, bool]] = deque()
    to_agent: deque[tuple[bytes, bool]] = deque()
    queue_from = {"agent": to_server, "server": to_agent}

    def handle(end: End, evs: list[LiteTlsEvent]) -> None:
        for ev in evs:
            end.log.append(ev)
            if isinstance(ev, SendToPeer):
                queue_from[end.name].append((ev.data, end.sending_passthrough))
            elif isinstance(ev, DeliverToLocal):
                end.local.feed(ev.data)
            elif isinstance(ev, LeftTunnel):
                assert not end.sending_passthrough
                end.sending_passthrough = True
            elif isinstance(ev, PeerViolation):
                raise AssertionError(f"{end.name}: {ev.reason}")
            else:
                assert isinstance(ev, FellBack)

    def from_local(end: End) -> bool:
        data = end.local.step()
        if not data:
            return False
        if end.tracker.transparent:
            handle(end, [SendToPeer(data=data)])
        else:
            handle(end, end.tracker.from_local(data))
        return True

    def from_peer(end: End, queue: deque[tuple[bytes, bool]]) -> bool:
        if not queue:
            return False
        data, passthrough = queue.popleft()
        # the muxed runtime can check this: passthrough DATA arrives exactly once this end has left
        assert passthrough == (end.tracker.state is LiteTlsState.LEFT), (end.name, end.tracker, passthrough)
        cut = rng.randint(1, min(max_chunk, len(data)))
        if cut < len(data):
            queue.appendleft((data[cut:], passthrough))
        if end.tracker.transparent:
            handle(end, [DeliverToLocal(data=data[:cut])])
        else:
            handle(end, end.tracker.from_peer(data[:cut]))
        return True

    actions: list[Callable[[], bool]] = [
        lambda: from_local(agent),
        lambda: from_local(server),
        lambda: from_peer(server, to_server),
        lambda: from_peer(agent, to_agent),
    ]
    steps = 0
    idle = 0
    while not (user.done and target.done and not to_server and not to_agent):
        steps += 1
        assert steps < max_steps, "no progress"
        if rng.choice(actions)():
            idle = 0
        else:
            idle += 1
            if idle > 200:  # every action is idle: nothing can move any more
                moved = any(action() for action in actions)
                assert moved, f"stuck: {agent.tracker!r} {server.tracker!r}"
                idle = 0
    return PairResult(
        agent=agent,
        server=server,
        left=agent.tracker.left and server.tracker.left,
        fell_back=agent.tracker.state is LiteTlsState.FALLBACK
        or server.tracker.state is LiteTlsState.FALLBACK,
        steps=steps,
    )


def tls_pair(
    version: str, request: bytes, response: bytes, *, server_waits: bool = True
) -> tuple[TlsEnd, TlsEnd]:
    """A client that sends ``request`` after its handshake and a server that answers with ``response`` once it
    has read the whole request (``server_waits=False``: as soon as its handshake is done, as a server that
    speaks first does)."""
    cctx, sctx = contexts(version)
    user = TlsEnd(cctx, server=False, payloads=[request])
    target = TlsEnd(sctx, server=True, payloads=[response], write_after=len(request) if server_waits else 0)
    user.expect = len(response)
    target.expect = len(request)
    return user, target


def record_flights(version: str, request: bytes, response: bytes) -> list[tuple[str, bytes]]:
    """The exact bytes each side writes in one TLS connection, in the order written: ("client" | "server", bytes)."""
    user, target = tls_pair(version, request, response)
    flights: list[tuple[str, bytes]] = []
    for _ in range(100):
        for name, end, other in (("client", user, target), ("server", target, user)):
            out = end.step()
            if out:
                flights.append((name, out))
                other.feed(out)
        if user.done and target.done:
            break
    assert user.done
    assert target.done
    assert bytes(user.received) == response
    assert bytes(target.received) == request
    return flights


def records(data: bytes) -> list[bytes]:
    """Split a byte string of whole TLS records into its records."""
    out = []
    pos = 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        out.append(data[pos : pos + 5 + length])
        pos += 5 + length
    assert pos == len(data)
    return out
