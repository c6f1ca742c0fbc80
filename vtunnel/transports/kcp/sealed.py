"""Sealed ``kcp://``: every UDP datagram is a sealed datagram of :mod:`vtunnel.security.datagram`.

The sealer sits between UDP and KCP. The client sends the handshake's first datagram and retransmits it with
backoff until the server's reply arrives (``connect_timeout``); then KCP runs with its MTU reduced by the
sealing overhead. The server keys sessions by the authenticated connection ID (not the source address, not the
conv), follows a client's new address only once that address echoed a sealed path challenge and the client's
newest datagrams come from it (:class:`~vtunnel.security.datagram.PeerPath`; the client echoes every challenge),
and drops anything that fails authentication before KCP sees it, without answering. No datagram carries a type
in clear: one whose first 8 bytes name a session is that session's (DATA or CONTROL); any other is tried as a
handshake's first datagram, whose masked length rejects nearly all garbage before any Noise work. The one
exception to the silence: a datagram that is no handshake, for a connection ID the server does not know (it
restarted, or the session ended) but a holder of the key assigned, gets a stateless reset (rate limited; see
:class:`~vtunnel.security.datagram.StatelessReset`), and a client that receives the reset for its own session
fails its stream at once, so the agent reconnects within its backoff instead of waiting for the keepalive to
time out.

The handshake compares timestamps across hosts, so it is given wall-clock time; KCP timers use the loop clock.
The transport cipher is negotiated in the handshake (``cipher``: see :func:`~vtunnel.transports.secure.cipher_preference`).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any, Final

import anyio
import structlog

from vtunnel.arq.kcp_engine import KCPEngine, KCPEngineError
from vtunnel.arq.kcp_options import KCPOptions
from vtunnel.arq.kcp_wire import first_header, is_new_session, valid_datagram
from vtunnel.io.datagrams import Address, CoalescingSocket, Run, open_client_socket
from vtunnel.security.ciphers import cipher_name
from vtunnel.security.datagram import (
    CID_LEN,
    DATAGRAM_OVERHEAD,
    RETRANSMIT_PERIOD,
    DatagramClient,
    DatagramServer,
    DatagramSession,
    PathChallenge,
    PathResponse,
    PeerPath,
    StatelessReset,
    peek_connection_id,
)
from vtunnel.security.errors import AuthenticationFailed, HandshakeTimeout, SecurityError
from vtunnel.security.replay import HandshakeLimiter, ReplayCache, ResetLimiter
from vtunnel.transports.base import TransportError
from vtunnel.transports.kcp.link import KCPLink
from vtunnel.transports.kcp.listener import KCPListener, SessionKey
from vtunnel.transports.secure import cipher_preference

__all__ = ["SealedKCPListener", "connect_sealed"]

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
#: why a client's stream fails when the server's stateless reset arrives
RESET_REASON: Final = "server lost the session: reset"


def _kcp_mtu(options: KCPOptions) -> int:
    return options.mtu - DATAGRAM_OVERHEAD


def _datagrams(runs: list[Run]) -> Iterator[tuple[bytes, Address]]:
    """Every datagram of every run (a sealed datagram is opened on its own)."""
    for buffer, segment, source in runs:
        size = len(buffer)
        if segment >= size:
            yield buffer, source
            continue
        for offset in range(0, size, segment):
            yield buffer[offset : offset + segment], source


class _SealedKCPClient:
    def __init__(self, sock: Any, server: Address, options: KCPOptions, psk: bytes, cipher: str) -> None:
        self._server = server
        self._options = options
        self._conv = options.conv if options.conv is not None else (secrets.randbits(32) or 1)
        self._handshake = DatagramClient(psk, now=time.time(), ciphers=cipher_preference(cipher))
        self._ready = anyio.Event()
        self.stream: KCPLink | None = None
        self.udp = CoalescingSocket(sock, self._on_runs)

    def _on_runs(self, runs: list[Run]) -> None:
        handshake = self._handshake
        received = list(_datagrams(runs))
        while received and self.stream is None:  # the handshake's reply: one at a time
            handshake.receive(received.pop(0)[0], time.time())
            if handshake.session is not None:
                self._start_kcp(handshake.session)
            elif handshake.failure is not None:  # an authentic reply we cannot use: stop waiting
                self._ready.set()
        stream, session = self.stream, handshake.session
        if stream is None or session is None or not received:
            return
        good: list[bytes] = []
        reset = False
        opened = session.open_many([datagram for datagram, _ in received])  # one session: one batch
        for (datagram, source), payload in zip(received, opened, strict=True):
            if isinstance(payload, bytes):
                if valid_datagram(payload, self._conv):
                    good.append(payload)
            elif payload is None:
                # only the server's own address may end the session (the socket is not connected)
                reset = reset or (source == self._server and handshake.is_reset(datagram))
            elif isinstance(payload, PathChallenge):
                self._on_challenge(session, payload)
        if good:
            stream.feed(good)  # what arrived before the reset is delivered first
        if reset:
            stream.fail(RESET_REASON)

    def _on_challenge(self, session: DatagramSession, challenge: PathChallenge) -> None:
        """The server checks a new address of ours: echo its challenge (from wherever it came: only the server
        can seal one) to the server, from our socket, so the answer leaves from the address being checked."""
        self.udp.sendto(session.seal_control(PathResponse(challenge.data)), self._server)

    def _start_kcp(self, session: DatagramSession) -> None:
        loop = asyncio.get_running_loop()
        engine = KCPEngine(
            conv=self._conv, options=self._options, mtu=_kcp_mtu(self._options), now=loop.time()
        )
        udp, server, seal_many = self.udp, self._server, session.seal_many

        def transmit(datagrams: list[bytes]) -> None:
            udp.sendto_many(seal_many(datagrams), server)

        self.stream = KCPLink(
            engine=engine,
            options=self._options,
            transmit=transmit,
            local_address=udp.local_address,
            remote_address=server,
            on_close=lambda _s: udp.close(),
        )
        log.debug("sealed session up", role="client", cipher=cipher_name(session.cipher))
        self._ready.set()

    async def handshake(self) -> KCPLink:
        """Send the first datagram, retransmitting with backoff, until the reply arrives."""
        wait = FIRST_RETRANSMIT
        with anyio.move_on_after(self._options.connect_timeout):
            while self.stream is None and self._handshake.failure is None:
                self.udp.sendto(self._handshake.initial_datagram(time.time()), self._server)
                with anyio.move_on_after(wait):
                    await self._ready.wait()
                wait = min(wait * 2, LONGEST_RETRANSMIT)
        if self.stream is None:
            where = f"{self._server[0]}:{self._server[1]}"
            failure = self._handshake.failure
            if failure is not None:
                raise AuthenticationFailed(f"the handshake with {where} failed: {failure}")
            raise HandshakeTimeout(
                f"no valid handshake reply from {where} in {self._options.connect_timeout:g} s (is the server "
                "up, is the key the same, does it speak the same vtunnel protocol version and accept one of the "
                "ciphers offered?)"
            )
        return self.stream


async def connect_sealed(
    family: Any, server: Address, options: KCPOptions, psk: bytes, *, cipher: str = "auto"
) -> KCPLink:
    """A sealed KCP session to ``server``; raises :class:`HandshakeTimeout` if the server never answers and
    :class:`AuthenticationFailed` if it answers, authentically, with a cipher this client did not offer.

    ``cipher`` is the cipher setting (``auto`` or a cipher's name; see
    :func:`~vtunnel.transports.secure.cipher_preference`).
    """
    if _kcp_mtu(options) < 64:
        raise TransportError(f"kcp option 'mtu' is too small for sealed datagrams: {options.mtu}")
    try:
        # not connected (see open_client_socket): the kernel does not filter by source, the code below does;
        # replies and DATA authenticate, and a reset counts only from the server's address
        sock = open_client_socket(family, server, sockbuf=options.sockbuf)
    except OSError as exc:
        raise TransportError(f"cannot open a UDP socket to {server[0]}:{server[1]}: {exc}") from None
    client: _SealedKCPClient | None = None
    try:
        client = _SealedKCPClient(sock, server, options, psk, cipher)
        return await client.handshake()
    except KCPEngineError as exc:
        raise TransportError(str(exc)) from None
    except BaseException:
        if client is not None:
            client.udp.close()
        sock.close()
        raise


class SealedKCPListener(KCPListener):
    """A :class:`KCPListener` whose datagrams are sealed; sessions are keyed by connection ID.

    ``cipher`` is the cipher setting: the transport ciphers accepted (see
    :func:`~vtunnel.transports.secure.cipher_preference`).
    """

    def __init__(
        self,
        sock: Any,
        options: KCPOptions,
        psk: bytes,
        *,
        cipher: str = "auto",
        reset_limiter: ResetLimiter | None = None,
    ) -> None:
        super().__init__(sock, options)
        self._server = DatagramServer(
            psk,
            replay=ReplayCache(),
            limiter=HandshakeLimiter(HANDSHAKE_RATE, HANDSHAKE_BURST),
            ciphers=cipher_preference(cipher),
        )
        if reset_limiter is None:
            reset_limiter = ResetLimiter(
                RESET_RATE, RESET_BURST, total_rate=RESET_TOTAL_RATE, total_burst=RESET_TOTAL_BURST
            )
        self._reset = StatelessReset(psk, limiter=reset_limiter)
        #: stateless resets sent (each also counts in ``dropped``)
        self.resets_sent = 0
        #: every authenticated session (with its peer's address), with or without a KCP stream yet
        self._paths: dict[bytes, PeerPath] = {}
        #: challenges sent to new addresses of peers (each to validate the address before moving there)
        self.challenges_sent = 0
        #: sessions whose handshake completed but whose first KCP datagram has not arrived: expiry time
        self._half_open: dict[bytes, float] = {}

    @property
    def paths(self) -> Mapping[bytes, PeerPath]:
        """Every authenticated session by connection ID, with its peer's address and validation state
        (read-only)."""
        return MappingProxyType(self._paths)

    @property
    def authenticated_count(self) -> int:
        """Sessions whose handshake completed (with or without a KCP session yet)."""
        return len(self._paths)

    def _on_runs(self, runs: list[Run]) -> None:
        """Open what arrived: each live session's datagrams from its current address in one batch (the runs of
        a burst without UDP GRO included), everything else one by one. The batches are opened before any run
        that goes the one-by-one way, so nothing that arrived after a session's datagrams is handled before
        them; a datagram that does not open in its batch is then handled on its own."""
        groups: dict[KCPLink, list[bytes | memoryview]] = {}
        batches: dict[KCPLink, tuple[DatagramSession, Address, list[bytes]]] = {}
        for buffer, segment, source in runs:
            size = len(buffer)
            datagrams = (
                [buffer] if segment >= size else [buffer[o : o + segment] for o in range(0, size, segment)]
            )
            known = self._session_of_run(buffer, source)
            if known is None:  # a new session, a moved peer, or something to drop: one by one
                if batches:
                    self._open_batches(batches, groups)
                for datagram in datagrams:
                    self._route_sealed(datagram, source, groups)
                continue
            crypto, stream = known
            batch = batches.get(stream)
            if batch is None:
                batches[stream] = crypto, source, datagrams
            else:
                batch[2].extend(datagrams)
        if batches:
            self._open_batches(batches, groups)
        for stream, payloads in groups.items():
            if payloads:
                stream.feed(payloads)

    def _open_batches(
        self,
        batches: dict[KCPLink, tuple[DatagramSession, Address, list[bytes]]],
        groups: dict[KCPLink, list[bytes | memoryview]],
    ) -> None:
        """Open each session's batch (datagrams from its current address: nothing to validate) and empty
        ``batches``."""
        for stream, (crypto, source, datagrams) in batches.items():
            conv = stream.engine.conv
            group = groups.setdefault(stream, [])
            for datagram, payload in zip(datagrams, crypto.open_many(datagrams), strict=True):
                if isinstance(payload, bytes):
                    if valid_datagram(payload, conv):
                        group.append(payload)
                    else:
                        self.dropped += 1
                elif payload is None:  # not this session's: whatever it is, it is handled on its own
                    self._route_sealed(datagram, source, groups)
                else:  # a control message from the current address has nothing to validate
                    self.dropped += 1
        batches.clear()

    def _session_of_run(self, buffer: bytes, source: Address) -> tuple[DatagramSession, KCPLink] | None:
        """The live session a run's first datagram names, if the run comes from its current address."""
        cid = peek_connection_id(buffer)
        if cid is None:
            return None
        path = self._paths.get(cid)
        stream = self._sessions.get(cid)
        if path is None or stream is None or path.address != source:
            return None
        return path.session, stream

    def _route_sealed(
        self, datagram: bytes, source: Address, groups: dict[KCPLink, list[bytes | memoryview]]
    ) -> None:
        """Open and vet one datagram and add its payload to its session's group (or answer a handshake)."""
        cid = peek_connection_id(datagram)
        path = self._paths.get(cid) if cid is not None else None
        if path is None or cid is None:  # no session's: a handshake, a lost session's datagram, or garbage
            self._on_stranger(datagram, source)
            return
        payload = path.receive(datagram, source, self._loop.time())
        stream = self._sessions.get(cid)
        if source != path.address or (stream is not None and stream.remote_address != path.address):
            self._follow(cid, path, stream)
        if payload is None:  # a known session's: never answered (but for challenges), whatever it is
            self.dropped += 1
            return
        if stream is None:
            stream = self._first_kcp_datagram(cid, path, payload)
            if stream is None:
                self.dropped += 1
                return
        elif not valid_datagram(payload, stream.engine.conv):
            self.dropped += 1
            return
        groups.setdefault(stream, []).append(payload)

    def _follow(self, cid: bytes, path: PeerPath, stream: KCPLink | None) -> None:
        """Send the challenges a peer's new address gets, and move the session once one validated it."""
        if self._closed:
            return
        for challenge, address in path.datagrams_to_send():
            self.challenges_sent += 1
            log.debug("kcp path challenge sent", connection_id=cid.hex(), address=address)
            self._udp.sendto(challenge, address)
        if stream is not None and stream.remote_address != path.address:
            log.info("kcp peer moved", connection_id=cid.hex(), old=stream.remote_address, new=path.address)
            stream.remote_address = path.address

    def _on_stranger(self, datagram: bytes, source: Address) -> None:
        """A datagram for no session this server knows: a handshake's first datagram gets its reply; any
        other whose connection ID a key holder minted gets a stateless reset (if the limits allow), so its
        client learns at once that its session is gone; the rest gets nothing."""
        if self._closed:
            self.dropped += 1
            return
        now = self._loop.time()
        self._expire_half_open(now)
        if len(self._half_open) < self._options.sessions and self._on_handshake(datagram, source, now):
            return
        self.dropped += 1
        reset = self._reset.answer(datagram, source, now)
        if reset is not None:
            self.resets_sent += 1
            log.debug("stateless reset sent", connection_id=datagram[:CID_LEN].hex(), peer=source)
            self._udp.sendto(reset, source)

    def _on_handshake(self, datagram: bytes, source: Address, now: float) -> bool:
        """Answer ``datagram`` if it is a valid first datagram of a handshake (or a retransmission of one)."""
        try:
            result = self._server.accept(datagram, source, time.time(), in_use=self._paths)
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
        self._udp.sendto(reply, source)
        return True

    def _first_kcp_datagram(self, cid: bytes, path: PeerPath, payload: bytes) -> KCPLink | None:
        header = first_header(payload)
        if self._closed or header is None or not is_new_session(payload) or not self._room_for_one_more():
            return None
        self._half_open.pop(cid, None)
        seal_many = path.session.seal_many
        return self._create_stream(
            cid, header.conv, path.address, mtu=_kcp_mtu(self._options), seal=seal_many
        )

    def _expire_half_open(self, now: float) -> None:
        expired = [cid for cid, until in self._half_open.items() if until <= now]
        for cid in expired:
            del self._half_open[cid]
            if cid not in self._sessions:
                self._paths.pop(cid, None)

    def _forget(self, key: SessionKey, stream: KCPLink) -> None:
        super()._forget(key, stream)
        if isinstance(key, bytes):
            self._paths.pop(key, None)
            self._half_open.pop(key, None)

    async def aclose(self) -> None:
        await super().aclose()
        self._paths.clear()
        self._half_open.clear()
