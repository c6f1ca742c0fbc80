"""The sealed codec: every UDP datagram is a sealed datagram of :mod:`vtunnel.security.datagram`.

The sealer sits between UDP and the ARQ. The client sends the handshake's first datagram and retransmits it
with backoff until the server's reply arrives (``connect_timeout``); then its link starts, its MTU reduced by
the sealing overhead. The listener keys sessions by the authenticated connection ID (not the source address,
not the conv), follows a client's new address only once that address echoed a sealed path challenge and the
client's newest datagrams come from it (:class:`~vtunnel.security.datagram.PeerPath`; the client echoes every
challenge), and drops anything that fails authentication before the ARQ sees it, without answering. No
datagram carries a type in clear: one whose first 8 bytes name a session is that session's (DATA or CONTROL);
any other is tried as a handshake's first datagram, whose masked length rejects nearly all garbage before any
Noise work. The one exception to the silence: a datagram that is no handshake, for a connection ID the server
does not know (it restarted, or the session ended) but a holder of the key assigned, gets a stateless reset
(rate limited; see :class:`~vtunnel.security.datagram.StatelessReset`), and a client that receives the reset for
its own session fails its link at once, so the agent reconnects within its backoff instead of waiting for the
keepalive to time out.

Connection IDs rotate when a client's path changes: once a session's link starts, the server mints a spare ID
(:meth:`~vtunnel.security.datagram.DatagramServer.free_connection_id`, with the server id, as every ID it
mints) and announces it in a sealed CONTROL datagram until the client confirms it; the spare routes to the same
session. The challenge to a client's new address goes under the spare, and the session moves to it with the
address (:class:`~vtunnel.security.datagram.PeerPath`); the client follows the newest ID the server uses, and a
new spare is issued. A passive observer sees nothing on the new path that was on the old one but what the client
sent before it learnt of the move.

The handshake compares timestamps across hosts, so it is given wall-clock time; the ARQ's timers use the loop
clock. The transport cipher is negotiated in the handshake (``cipher``: see
:func:`~vtunnel.transports.secure.cipher_preference`). Nothing here reads the ARQ's datagrams: the link vets the
payloads (:class:`~vtunnel.transports.kcp.codec.RoutedLink`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

import anyio
import structlog

from vtunnel.io.datagrams import Address, Run, Segments, segment_runs, split_run
from vtunnel.security.ciphers import cipher_name
from vtunnel.security.datagram import (
    CID_LEN,
    DATAGRAM_OVERHEAD,
    RETRANSMIT_PERIOD,
    ConnectionIdLayout,
    ConnectionIdSeen,
    ControlMessage,
    DatagramClient,
    DatagramServer,
    DatagramSession,
    NewConnectionId,
    PathChallenge,
    PathResponse,
    PeerPath,
    StatelessReset,
    peek_connection_id,
)
from vtunnel.security.errors import AuthenticationFailed, HandshakeTimeout, SecurityError
from vtunnel.security.keys import KeySet, UserKey
from vtunnel.security.replay import HandshakeLimiter, ReplayCache, ResetLimiter
from vtunnel.transports.base import KeyRing
from vtunnel.transports.kcp.codec import (
    ClientCodec,
    Datagram,
    ListenerCodec,
    RoutedLink,
    Runs,
    Sealer,
    Send,
    Stray,
)
from vtunnel.transports.link import Refusals
from vtunnel.transports.secure import cipher_preference

__all__ = ["RESET_REASON", "SealedClientCodec", "SealedListenerCodec"]

log = structlog.get_logger("vtunnel.transports.kcp")

#: first and longest wait between retransmissions of the client's handshake datagram (seconds)
FIRST_RETRANSMIT: Final = 0.25
LONGEST_RETRANSMIT: Final = 2.0
#: handshakes per second (and burst) one source address may start
HANDSHAKE_RATE: Final = 20.0
HANDSHAKE_BURST: Final = 40
#: stateless resets per second (and burst) towards one source address, and for all sources together
RESET_RATE: Final = 8.0
RESET_BURST: Final = 16
RESET_TOTAL_RATE: Final = 1000.0
RESET_TOTAL_BURST: Final = 1000
#: why a client's link fails when the server's stateless reset arrives
RESET_REASON: Final = "server lost the session: reset"


def _unattached(_datagram: bytes, _address: Address) -> None:
    raise RuntimeError("the codec is not attached to a socket")


class _InUse:
    """The connection IDs of some mappings' keys, as one container."""

    __slots__ = ("_maps",)

    def __init__(self, *maps: Mapping[bytes, object]) -> None:
        self._maps = maps

    def __contains__(self, cid: object) -> bool:
        return any(cid in m for m in self._maps)


def _sealer(session: DatagramSession) -> Sealer:
    """What seals ``session``'s output: a batch cut into runs of one segmented send each (:func:`segment_runs`
    of the sealed sizes), each run sealed into one buffer (:meth:`DatagramSession.seal_run`)."""
    seal_run = session.seal_run

    def seal(datagrams: list[bytes]) -> list[Segments]:
        if len(datagrams) == 1:  # (an ACK, a message: one datagram, no runs to cut)
            one = seal_run(datagrams)
            return [(one, len(one))]
        sizes = list(map(len, datagrams))
        cuts = segment_runs(sizes, DATAGRAM_OVERHEAD)
        if len(cuts) == 1:  # (the common batch: one run)
            return [(seal_run(datagrams), sizes[0] + DATAGRAM_OVERHEAD)]
        return [(seal_run(datagrams[start:end]), sizes[start] + DATAGRAM_OVERHEAD) for start, end in cuts]

    return seal


def _take_payloads(link: RoutedLink, payloads: list[bytes], segment: int, into: list[Datagram]) -> int:
    """Hand ``link`` the payloads a run of sealed datagrams (``segment`` bytes each, the last possibly shorter)
    opened to at once, as the run of plaintext datagrams they are (so the ARQ vets and takes them as it takes a
    plain run); each on its own when the run is refused. Returns how many were dropped."""
    if link.take_run(b"".join(payloads), segment - DATAGRAM_OVERHEAD, into):
        return 0
    valid = [payload for payload in payloads if link.accepts(payload)]
    into.extend(valid)
    return len(payloads) - len(valid)


class SealedListenerCodec(ListenerCodec[bytes]):
    """A listener's sealed datagrams: sessions by connection ID, handshakes answered, new addresses validated,
    strangers reset.

    ``keys`` are the keys accepted: a server's :class:`~vtunnel.transports.base.KeyRing` (read again before each
    stranger's datagram, so a reload takes effect on the next handshake), or one key. ``cipher`` is the cipher
    setting: the transport ciphers accepted (see :func:`~vtunnel.transports.secure.cipher_preference`);
    ``layout`` what the connection IDs it assigns carry (server id, worker slot), None: random.
    """

    overhead = DATAGRAM_OVERHEAD
    #: the handshake proves the client's first address (its first DATA is sealed with keys only the server's
    #: reply gives), and :class:`PeerPath` moves a session only to an address that echoed a challenge
    validates_paths = True

    def __init__(
        self,
        keys: KeyRing | bytes,
        *,
        cipher: str = "auto",
        reset_limiter: ResetLimiter | None = None,
        layout: ConnectionIdLayout | None = None,
    ) -> None:
        ring = keys if isinstance(keys, KeyRing) else KeyRing(KeySet.single(keys))
        self._ring = ring
        self._server = DatagramServer(
            ring.current,
            replay=ReplayCache(),
            limiter=HandshakeLimiter(HANDSHAKE_RATE, HANDSHAKE_BURST),
            layout=layout,
            ciphers=cipher_preference(cipher),
        )
        if reset_limiter is None:
            reset_limiter = ResetLimiter(
                RESET_RATE, RESET_BURST, total_rate=RESET_TOTAL_RATE, total_burst=RESET_TOTAL_BURST
            )
        self._reset = StatelessReset(ring.current, limiter=reset_limiter)
        self._send: Send = _unattached
        self._sessions = 0
        #: every authenticated session (with its peer's address), with or without a link yet
        self._paths: dict[bytes, PeerPath] = {}
        #: the spare and rotated connection IDs of sessions, to the session's first ID (its key) ...
        self._aliases: dict[bytes, bytes] = {}
        #: ... and the other way
        self._aliases_of: dict[bytes, list[bytes]] = {}
        #: every connection ID in use, first or not (what a new one must not be)
        self._in_use = _InUse(self._paths, self._aliases)
        #: sessions whose handshake completed but whose link has not started: expiry time
        self._half_open: dict[bytes, float] = {}
        #: stateless resets sent (each also counts as dropped)
        self.resets_sent = 0
        #: challenges sent to new addresses of peers (each to validate the address before moving there)
        self.challenges_sent = 0
        #: sessions moved to a spare connection ID with a new address
        self.rotations = 0
        self._refusals = Refusals()

    @property
    def refusals(self) -> Refusals:
        """Strangers' datagrams that started nothing: ``reset`` (answered with a stateless reset) or ``dropped``
        (answered with nothing), as probes. A failed handshake looks like any other stranger's datagram here."""
        return self._refusals

    @property
    def paths(self) -> Mapping[bytes, PeerPath]:
        """Every authenticated session by connection ID, with its peer's address and validation state
        (read-only)."""
        return MappingProxyType(self._paths)

    def attach(self, send: Send, *, sessions: int) -> None:
        self._send = send
        self._sessions = sessions

    def key_of(self, datagram: Datagram, source: Address) -> bytes | None:
        cid = peek_connection_id(datagram)
        if cid is None:
            return None
        return cid if cid in self._paths else self._aliases.get(cid)

    def open(
        self, key: bytes, link: RoutedLink | None, datagram: Datagram, source: Address, now: float
    ) -> tuple[Datagram | None, Address]:
        path = self._paths[key]
        before = path.session.connection_id
        payload = path.receive(datagram, source, now)
        address = path.address
        if source != address or (link is not None and link.remote_address != address):
            for challenge, to in path.datagrams_to_send():
                self.challenges_sent += 1
                log.debug("kcp path challenge sent", connection_id=key.hex(), address=to)
                self._send(challenge, to)
        if path.session.connection_id != before:
            log.debug("connection ID rotated", connection_id=key.hex(), address=address)
            self.rotations += 1
        if link is not None:
            self._rotation(key, path)
        if payload is not None and link is not None and not link.accepts(payload):
            payload = None
        return payload, address

    def open_run(self, key: bytes, link: RoutedLink, runs: Runs, into: list[Datagram], stray: Stray) -> int:
        dropped = 0
        accepts, take = link.accepts, into.append
        path = self._paths[key]
        session = path.session
        for buffer, segment in runs:
            payloads = session.open_run(buffer, segment) if segment < len(buffer) else None
            if payloads is not None:
                dropped += _take_payloads(link, payloads, segment, into)
                continue
            datagrams = split_run(buffer, segment)
            for datagram, payload in zip(datagrams, session.open_many(datagrams), strict=True):
                if isinstance(payload, bytes):
                    if accepts(payload):
                        take(payload)
                    else:
                        dropped += 1
                elif payload is None:  # not this session's: whatever it is, it is handled on its own
                    stray(datagram)
                else:  # a control message from the current address has nothing to validate
                    path.control(payload)
                    dropped += 1
        self._rotation(key, path)
        return dropped

    def _rotation(self, key: bytes, path: PeerPath) -> None:
        """Keep a spare connection ID issued and announced, and route only the IDs the session still opens."""
        user = path.session.user
        if path.needs_spare and user is not None:
            cid = self._server.free_connection_id(user, self._in_use)
            if cid is not None:
                path.issue(cid)
                self._aliases[cid] = key
                mine = self._aliases_of.setdefault(key, [])
                mine.append(cid)
                if len(mine) > 2:  # rotated: route no more what the session no longer opens
                    held = path.session.connection_ids
                    for old in [c for c in mine if c not in held]:
                        mine.remove(old)
                        del self._aliases[old]
        for announcement, to in path.announcements(time.monotonic()):
            self._send(announcement, to)

    def stranger(self, datagram: Datagram, source: Address, now: float) -> bool:
        """A handshake's first datagram gets its reply; any other whose connection ID a key holder minted gets
        a stateless reset (if the limits allow), so its client learns at once that its session is gone; the
        rest gets nothing."""
        keys = self._ring.current
        if keys is not self._server.keys:  # reloaded: new handshakes and resets follow the new keys
            self._server.keys = keys
            self._reset.keys = keys
        expired = [cid for cid, until in self._half_open.items() if until <= now]
        for cid in expired:
            del self._half_open[cid]
            self._paths.pop(cid, None)
        if len(self._half_open) < self._sessions and self._handshake(datagram, source, now):
            return True
        reset = self._reset.answer(datagram, source, now)
        if reset is not None:
            self.resets_sent += 1
            self._refusals.probes["reset"] += 1
            log.debug("stateless reset sent", connection_id=bytes(datagram[:CID_LEN]).hex(), peer=source)
            self._send(reset, source)
        else:
            self._refusals.probes["dropped"] += 1
        return False

    def _handshake(self, datagram: Datagram, source: Address, now: float) -> bool:
        """Answer ``datagram`` if it is a valid first datagram of a handshake (or a retransmission of one)."""
        try:
            result = self._server.accept(datagram, source, time.time(), in_use=self._in_use)
        except SecurityError:  # e.g. an unusable wall clock: answer nothing
            result = None
        if result is None:
            return False
        session, reply = result
        cid = session.connection_id
        if cid not in self._paths:
            self._paths[cid] = PeerPath(session, source)
            self._half_open[cid] = now + 2 * RETRANSMIT_PERIOD
            log.debug("sealed session up", role="server", source=source, cipher=cipher_name(session.cipher))
        self._send(reply, source)
        return True

    def user_of(self, key: bytes) -> UserKey | None:
        return self._paths[key].session.user

    def session_started(self, key: bytes, first: Datagram, address: Address) -> Sealer:
        self._half_open.pop(key, None)
        path = self._paths[key]
        self._rotation(key, path)
        return _sealer(path.session)

    def forget(self, key: bytes) -> None:
        self._paths.pop(key, None)
        self._half_open.pop(key, None)
        for cid in self._aliases_of.pop(key, ()):
            self._aliases.pop(cid, None)

    def close(self) -> None:
        self._paths.clear()
        self._half_open.clear()
        self._aliases.clear()
        self._aliases_of.clear()


class SealedClientCodec(ClientCodec):
    """A client's sealed datagrams: the handshake, then sessions' DATA; path challenges are echoed, and the
    server's stateless reset ends the session.

    ``cipher`` is the cipher setting: the ciphers offered (see
    :func:`~vtunnel.transports.secure.cipher_preference`).
    """

    overhead = DATAGRAM_OVERHEAD

    def __init__(self, psk: bytes, *, cipher: str = "auto") -> None:
        self._client = DatagramClient(psk, now=time.time(), ciphers=cipher_preference(cipher))
        self._done = anyio.Event()  # the handshake is over: established, or refused
        self._send: Send = _unattached
        self._server: Address = ("", 0)

    def attach(self, send: Send, server: Address) -> None:
        self._send = send
        self._server = server

    async def handshake(self, timeout: float) -> Sealer:
        """Send the first datagram, retransmitting with backoff, until the reply arrives."""
        client, server = self._client, self._server
        wait = FIRST_RETRANSMIT
        with anyio.move_on_after(timeout):
            while client.session is None and client.failure is None:
                self._send(client.initial_datagram(time.time()), server)
                with anyio.move_on_after(wait):
                    await self._done.wait()
                wait = min(wait * 2, LONGEST_RETRANSMIT)
        if client.session is None:
            where = f"{server[0]}:{server[1]}"
            if client.failure is not None:
                raise AuthenticationFailed(f"the handshake with {where} failed: {client.failure}")
            raise HandshakeTimeout(
                f"no valid handshake reply from {where} in {timeout:g} s (is the server up, is the key the same, "
                "does it speak the same vtunnel protocol version and accept one of the ciphers offered?)"
            )
        log.debug("sealed session up", role="client", cipher=cipher_name(client.session.cipher))
        return _sealer(client.session)

    def open(self, runs: list[Run], link: RoutedLink | None, into: list[Datagram]) -> str | None:
        client = self._client
        session = client.session
        if session is None:  # the handshake's reply: one at a time
            for datagram in [
                datagram for buffer, segment, _ in runs for datagram in split_run(buffer, segment)
            ]:
                client.receive(datagram, time.time())
                if client.session is not None or client.failure is not None:  # (a reply we cannot use: stop)
                    self._done.set()
                    break
            return None
        reset = False
        for buffer, segment, source in runs:
            payloads = session.open_run(buffer, segment) if segment < len(buffer) else None
            if payloads is not None:
                if link is not None:
                    _take_payloads(link, payloads, segment, into)
                continue
            datagrams = split_run(buffer, segment)
            for datagram, payload in zip(datagrams, session.open_many(datagrams), strict=True):
                reset = self._opened(session, datagram, source, payload, link, into) or reset
        if session.follow_newest():
            log.debug("connection ID rotated", role="client")
        return RESET_REASON if reset else None

    def _opened(
        self,
        session: DatagramSession,
        datagram: Datagram,
        source: Address,
        payload: bytes | ControlMessage | None,
        link: RoutedLink | None,
        into: list[Datagram],
    ) -> bool:
        """Act on what one datagram opened to; whether it is a stateless reset from the server."""
        if isinstance(payload, bytes):
            if link is not None and link.accepts(payload):
                into.append(payload)
        elif payload is None:
            # only the server's own address may end the session (the socket is not connected)
            return source == self._server and self._client.is_reset(datagram)
        elif isinstance(payload, PathChallenge):
            # the server checks a new address of ours: echo its challenge (from wherever it came: only the
            # server can seal one) to the server, from our socket, so the answer leaves from the address
            # being checked, under the ID the challenge came with (the new path's)
            session.follow_newest()
            self._send(session.seal_control(PathResponse(payload.data)), self._server)
        elif isinstance(payload, NewConnectionId):
            # a spare ID for the session's next path: hold it, and say so (the server repeats it until then)
            session.add_connection_id(payload.data)
            self._send(session.seal_control(ConnectionIdSeen(payload.data)), self._server)
        return False
