"""Sans-IO sealed datagrams for UDP transports: every datagram, the ARQ header included, is encrypted.

Layouts (integers big endian; full description in ``docs/security.md``)::

    INIT   (client -> server)  01 | initial CID (8) | Noise message 1 (e 32 | payload + tag 16)
    REPLY  (server -> client)  02 | initial CID (8) | Noise message 2 (e 32 | payload + tag 16)
    DATA   (both ways)         03 | CID (8) | counter u64 | AEAD ciphertext + tag 16
    CONTROL (both ways)        04 | CID (8) | counter u64 | AEAD(kind 1 | data 8) + tag 16   (path validation)
    RESET  (server -> client)  03 | CID (8) | random 16..231 | reset token 16   (DATA-shaped, see below)

INIT's payload is the timestamp, the anti-replay token, the cipher offer and padding (see :mod:`.handshake`);
INIT's first three fields are the Noise prologue, so they are authenticated. REPLY's payload is the connection
ID the server assigns, the chosen cipher's code, then padding. A DATA datagram is sealed with the chosen cipher
(:mod:`.ciphers`); its nonce is its counter and its associated data the 17 header bytes; each direction has
its own key. :data:`DATAGRAM_OVERHEAD` is 33 bytes.

The connection ID is the only clear field a server uses: it finds the session by it, never by the source
address, so NAT rebinding keeps a session alive. Where it sends is :class:`PeerPath`'s decision: a new client
address is followed only after it echoed a path challenge (a CONTROL datagram) and the client's newest
datagrams come from it, as QUIC validates a path. The server assigns it and may start it with a fixed
server/worker id (``server_id``) so that a load balancer can route by it (QUIC-LB's idea). Its last 3 bytes
are a check computed from the rest under a key derived from the PSK, so that a server which lost the session can
tell a connection ID minted by a key holder from a prober's guess.

A server that receives a DATA datagram for a connection ID it does not know (it restarted, or forgot the
session) answers with a *stateless reset* (RFC 9000 section 10.3's idea): a datagram of DATA's shape, shorter than
the one it answers, whose last 16 bytes are the connection ID's reset token, a MAC under a key derived from the
PSK. Any server holding the PSK computes the same token, and only they can: the client, seeing its own token,
knows the server lost the session and reconnects at once instead of waiting for its keepalive. Only connection
IDs whose check is right are answered, so a prober's datagrams still get silence.

``now`` in the handshake calls is wall-clock seconds (``time.time()``): timestamps are compared across hosts.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Container, Sequence
from dataclasses import dataclass
from enum import IntEnum

from cryptography.exceptions import InvalidTag

from .ciphers import DEFAULT_CIPHERS, Cipher, check_ciphers, choose, decode_choice, make_aead, nonce_function
from .errors import AuthenticationFailed, SecurityError
from .handshake import (
    INIT_PAYLOAD_LEN,
    MIN_INIT_PAYLOAD_LEN,
    NOISE_OVERHEAD,
    TOKEN_LEN,
    check_wall_clock,
    decode_init_payload,
    encode_init_payload,
    padding,
    random_between,
)
from .noise import TAGLEN, Initiator, Responder, TransportKeys, check_psk
from .replay import HandshakeLimiter, ReplayCache, ReplayWindow, ResetLimiter

__all__ = [
    "AMPLIFICATION_FACTOR",
    "CHALLENGE_DATAGRAM",
    "CHALLENGE_INTERVAL",
    "CID_CHECK_LEN",
    "CID_LEN",
    "DATAGRAM_OVERHEAD",
    "MAX_INIT_DATAGRAM",
    "MAX_RESET_DATAGRAM",
    "MAX_SERVER_ID",
    "MIN_RESET_DATAGRAM",
    "REPLY_REPEAT_LIMIT",
    "RESET_TOKEN_LEN",
    "RETRANSMIT_PERIOD",
    "ControlKind",
    "ControlMessage",
    "DatagramClient",
    "DatagramServer",
    "DatagramSession",
    "DatagramType",
    "PathChallenge",
    "PathResponse",
    "PeerPath",
    "StatelessReset",
    "is_minted",
    "mint_connection_id",
    "peek_connection_id",
    "reset_keys",
    "reset_token",
]

CID_LEN = 8


class DatagramType(IntEnum):
    INIT = 0x01
    REPLY = 0x02
    DATA = 0x03
    #: DATA's shape and keys; the sealed payload is a control message (path validation), not for the ARQ layer
    CONTROL = 0x04


class ControlKind(IntEnum):
    """The first byte of a CONTROL datagram's sealed payload."""

    PATH_CHALLENGE = 0x01
    PATH_RESPONSE = 0x02


@dataclass(frozen=True, slots=True)
class PathChallenge:
    """The server asks the peer behind a new address to echo ``data`` (RFC 9000 section 8.2's PATH_CHALLENGE)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class PathResponse:
    """The echo of a :class:`PathChallenge`'s ``data``."""

    data: bytes


ControlMessage = PathChallenge | PathResponse


_HEAD = struct.Struct(">B8s")  # type, connection ID
_DATA_HEAD = struct.Struct(">B8sQ")  # type, connection ID, counter
_COUNTER = struct.Struct(">Q")
DATA_HEADER_LEN = _DATA_HEAD.size  # 17
DATAGRAM_OVERHEAD = DATA_HEADER_LEN + TAGLEN  # 33
_DATA = int(DatagramType.DATA)
_CONTROL = int(DatagramType.CONTROL)
_CONTROL_BYTE = bytes((_CONTROL,))
#: v2: INIT offers transport ciphers and REPLY names the chosen one. A v1 peer's INIT fails authentication
#: under this prologue (and ours under its), so the server stays silent and the client times out.
_DATAGRAM_PROLOGUE = b"vtunnel datagram v2"

INIT_PADDING = (16, 400)
MIN_INIT_DATAGRAM = _HEAD.size + NOISE_OVERHEAD + MIN_INIT_PAYLOAD_LEN
MAX_INIT_DATAGRAM = _HEAD.size + NOISE_OVERHEAD + INIT_PAYLOAD_LEN + 1024
MIN_REPLY_DATAGRAM = _HEAD.size + NOISE_OVERHEAD + CID_LEN + 1  # the CID, then the chosen cipher's code
REPLY_PADDING_MAX = 256
#: Seconds during which a client retransmits the same first datagram and the server answers such copies.
RETRANSMIT_PERIOD = 10.0
#: How many times the server re-sends a reply to retransmissions of one first message.
REPLY_REPEAT_LIMIT = 8
MAX_COUNTER = 2**64 - 1

#: HKDF label of the stateless reset key: a key of its own, derived from the PSK, used for nothing else
_RESET_LABEL = b"vtunnel datagram v2 stateless reset"
RESET_TOKEN_LEN = 16
#: Bytes of a path challenge's random data (as QUIC's PATH_CHALLENGE)
CHALLENGE_LEN = 8
_CONTROL_MESSAGE = struct.Struct(">B8s")  # kind, challenge data
#: A challenge's (and a response's) size on the wire
CHALLENGE_DATAGRAM = DATAGRAM_OVERHEAD + _CONTROL_MESSAGE.size  # 42
#: Until a new address answered a challenge, it is sent at most this many times the bytes received from it
#: (RFC 9000 section 8's anti-amplification limit), and only challenges: everything else goes to the old address.
AMPLIFICATION_FACTOR = 3
#: Least seconds between two challenges to one new address.
CHALLENGE_INTERVAL = 0.1
#: Challenges whose answer is still accepted (a late answer to an earlier one counts).
_CHALLENGES_KEPT = 4
#: Addresses that answered a challenge and that a session moves back to without a new one (the current and
#: the one before it).
_VALIDATED_KEPT = 2

#: The shortest reset: a DATA header, 8 filler bytes (the shape of a DATA datagram with a small payload), the
#: token. A DATA-shaped datagram of this length or less is never answered, and every reset is shorter than what
#: it answers, so resets cannot bounce between two servers for long, nor amplify.
MIN_RESET_DATAGRAM = DATA_HEADER_LEN + 8 + RESET_TOKEN_LEN  # 41
#: The longest reset: one is enough, and a short answer keeps what a forged source receives small.
MAX_RESET_DATAGRAM = 256
#: The last bytes of every connection ID a server mints: a MAC of the bytes before them (see :func:`is_minted`).
CID_CHECK_LEN = 3
#: The longest ``server_id``: at least 3 random bytes remain between it and the check.
MAX_SERVER_ID = CID_LEN - CID_CHECK_LEN - 3  # 2
#: How many times a server draws a connection ID that is not in use before it gives up on a handshake.
_CID_DRAWS = 16


def peek_connection_id(datagram: bytes) -> bytes | None:
    """The clear connection ID at the front of ``datagram``, or None if it cannot be one of ours.

    For DATA it is the session's ID; for INIT and REPLY the client's initial ID (a new handshake). Cheap: no
    cryptography. A non-None answer proves nothing; the datagram must still be opened.
    """
    n = len(datagram)
    if n < DATAGRAM_OVERHEAD:
        return None
    kind = datagram[0]
    if kind in (_DATA, _CONTROL):
        return bytes(datagram[1 : 1 + CID_LEN])
    if (kind == DatagramType.INIT and MIN_INIT_DATAGRAM <= n <= MAX_INIT_DATAGRAM) or (
        kind == DatagramType.REPLY and n >= MIN_REPLY_DATAGRAM
    ):
        return bytes(datagram[1 : 1 + CID_LEN])
    return None


def reset_keys(psk: bytes) -> tuple[bytes, bytes]:
    """The two stateless reset keys of ``psk``: ``(token key, connection ID key)``, the two 32-byte halves of
    HKDF-SHA256 (RFC 5869) output with its own label as salt and info.

    The PSK never keys a MAC itself, so neither tokens nor connection IDs reveal anything usable against the
    handshake; the two keys are independent, so a connection ID's check says nothing about its token.
    """
    check_psk(psk)
    prk = hmac.digest(_RESET_LABEL, bytes(psk), "sha256")
    first = hmac.digest(prk, _RESET_LABEL + b"\x01", "sha256")
    return first, hmac.digest(prk, first + _RESET_LABEL + b"\x02", "sha256")


def reset_token(key: bytes, connection_id: bytes) -> bytes:
    """The reset token of ``connection_id`` under the token ``key`` (:func:`reset_keys`): 16 bytes of a MAC."""
    if len(connection_id) != CID_LEN:
        raise SecurityError("a connection ID is 8 bytes")
    return hmac.digest(key, bytes(connection_id), "sha256")[:RESET_TOKEN_LEN]


def _cid_check(key: bytes, head: bytes) -> bytes:
    return hmac.digest(key, head, "sha256")[:CID_CHECK_LEN]


def mint_connection_id(key: bytes, server_id: bytes = b"") -> bytes:
    """A new connection ID: ``server_id``, random bytes, then the check of both under the connection ID ``key``
    (:func:`reset_keys`)."""
    if len(server_id) > MAX_SERVER_ID:
        raise SecurityError(f"a server id is at most {MAX_SERVER_ID} bytes")
    head = bytes(server_id) + padding(CID_LEN - CID_CHECK_LEN - len(server_id))
    return head + _cid_check(key, head)


def is_minted(key: bytes, connection_id: bytes) -> bool:
    """Whether ``connection_id`` carries the right check under ``key``: minted by a holder of the PSK (or a
    guess that had a 1 in 2**24 chance). Constant time."""
    if len(connection_id) != CID_LEN:
        return False
    head = bytes(connection_id[: CID_LEN - CID_CHECK_LEN])
    return hmac.compare_digest(bytes(connection_id[CID_LEN - CID_CHECK_LEN :]), _cid_check(key, head))


def _prologue(kind: int, cid: bytes) -> bytes:
    return _DATAGRAM_PROLOGUE + _HEAD.pack(kind, cid)


def _control_message(payload: bytes) -> ControlMessage | None:
    if len(payload) < _CONTROL_MESSAGE.size:
        return None
    kind, data = _CONTROL_MESSAGE.unpack_from(payload)
    if kind == ControlKind.PATH_CHALLENGE:
        return PathChallenge(data)
    if kind == ControlKind.PATH_RESPONSE:
        return PathResponse(data)
    return None


class DatagramSession:
    """One authenticated session: seals and opens DATA datagrams.

    :meth:`open` returns None for anything forged, replayed (counter already seen or older than the replay
    window), garbled or for another connection ID. The caller may move the peer's address to the source of a
    datagram only after :meth:`open` accepted it.
    """

    __slots__ = (
        "_control_prefix",
        "_decrypt",
        "_encrypt",
        "_nonce",
        "_open_aead",
        "_prefix",
        "_seal_aead",
        "_send_counter",
        "_window",
        "cipher",
        "confirmed",
        "connection_id",
    )

    def __init__(
        self, connection_id: bytes, keys: TransportKeys, *, cipher: Cipher, window: int = 4096
    ) -> None:
        if len(connection_id) != CID_LEN:
            raise SecurityError("a connection ID is 8 bytes")
        self.connection_id = bytes(connection_id)
        self.cipher = Cipher(cipher)
        self._prefix = _HEAD.pack(_DATA, self.connection_id)  # the first 9 header bytes never change
        self._control_prefix = _HEAD.pack(_CONTROL, self.connection_id)
        self._seal_aead = make_aead(self.cipher, keys.send)
        self._open_aead = make_aead(self.cipher, keys.receive)
        self._encrypt = self._seal_aead.encrypt  # bound once: these run for every datagram
        self._decrypt = self._open_aead.decrypt
        self._nonce = nonce_function(self.cipher)
        self._send_counter = 0
        self._window = ReplayWindow(window)
        #: True once a datagram from the peer was authenticated (both ends know the handshake completed).
        self.confirmed = False

    def __repr__(self) -> str:
        return f"DatagramSession(connection_id={self.connection_id.hex()}, sent={self._send_counter})"

    def seal(self, payload: bytes) -> bytes:
        """A DATA datagram carrying ``payload`` (``len(payload) + DATAGRAM_OVERHEAD`` bytes)."""
        n = self._send_counter
        if n >= MAX_COUNTER:
            raise SecurityError("the session's counter is exhausted; start a new handshake")
        self._send_counter = n + 1
        header = self._prefix + _COUNTER.pack(n)
        return header + self._encrypt(self._nonce(n), payload, header)

    @property
    def highest_received(self) -> int:
        """The highest counter authenticated so far (-1: none yet)."""
        return self._window.highest

    def seal_control(self, message: ControlMessage) -> bytes:
        """A CONTROL datagram carrying ``message``; it takes the next counter, as a DATA datagram would."""
        if len(message.data) != CHALLENGE_LEN:
            raise SecurityError(f"a path challenge's data is {CHALLENGE_LEN} bytes")
        kind = ControlKind.PATH_CHALLENGE if isinstance(message, PathChallenge) else ControlKind.PATH_RESPONSE
        n = self._send_counter
        if n >= MAX_COUNTER:
            raise SecurityError("the session's counter is exhausted; start a new handshake")
        self._send_counter = n + 1
        header = self._control_prefix + _COUNTER.pack(n)
        return header + self._encrypt(self._nonce(n), _CONTROL_MESSAGE.pack(kind, message.data), header)

    def open_control(self, datagram: bytes) -> ControlMessage | None:
        """The message of an authentic, new CONTROL datagram for this session; None otherwise (including a
        well sealed one whose content this version does not know: it is recorded as received all the same)."""
        payload = self._open(datagram, _CONTROL)
        return None if payload is None else _control_message(payload)

    def open(self, datagram: bytes) -> bytes | None:
        """The payload of an authentic, new DATA datagram for this session; None otherwise."""
        return self._open(datagram, _DATA)

    def _open(self, datagram: bytes, expected: int) -> bytes | None:
        if len(datagram) < DATAGRAM_OVERHEAD:
            return None
        kind, cid, n = _DATA_HEAD.unpack_from(datagram)
        if kind != expected or cid != self.connection_id or n == MAX_COUNTER:
            return None
        window = self._window
        if n <= window.highest and not window.check(n):
            return None
        view = memoryview(datagram)
        try:
            payload = self._decrypt(self._nonce(n), view[DATA_HEADER_LEN:], view[:DATA_HEADER_LEN])
        except InvalidTag:
            return None
        window.update(n)
        self.confirmed = True
        return payload


class PeerPath:
    """Where a server session sends, and the validation of a new address its client seems to have moved to.

    Feed it every datagram of the session (:meth:`receive` returns the DATA payloads), send what
    :meth:`datagrams_to_send` gives, and send everything else to :attr:`address`. A datagram from the current
    address is opened and nothing more. An authentic one from another address moves nothing by itself (a copy
    of the client's datagram, resent by an on-path or racing attacker from elsewhere, opens too):

    - it counts only if its counter is the highest received so far (a replayed or reordered copy never does);
      such a datagram from an address that answered a challenge before moves the session back at once;
    - otherwise that address becomes the *candidate*: it is sent a :class:`PathChallenge` (random data, sealed,
      at most every :data:`CHALLENGE_INTERVAL` seconds) and never more than :data:`AMPLIFICATION_FACTOR` times
      the bytes received from it, and nothing else, until its :class:`PathResponse` comes back *from it*;
    - the session moves there once the answer came and the highest counter received came from there too (the
      client's datagrams, not copies of them, now arrive from the new address): RFC 9000 sections 8.2 and 9.

    The payloads of authentic DATA datagrams are returned whatever their source, so nothing is lost while an
    address is being validated. ``address`` and ``source`` are opaque hashable values (``(host, port)``);
    ``now`` is any clock, used consistently.
    """

    __slots__ = (
        "_candidate",
        "_challenges",
        "_highest_from_candidate",
        "_last_challenge",
        "_outgoing",
        "_received",
        "_sent",
        "_validated",
        "address",
        "session",
    )

    def __init__(self, session: DatagramSession, address: tuple[str, int]) -> None:
        self.session = session
        #: where everything but challenges goes: the last validated address
        self.address = address
        self._validated: list[tuple[str, int]] = [address]
        self._candidate: tuple[str, int] | None = None
        self._received = 0
        self._sent = 0
        self._highest_from_candidate = -1
        self._challenges: list[bytes] = []
        self._last_challenge = 0.0
        self._outgoing: list[tuple[bytes, tuple[str, int]]] = []

    def __repr__(self) -> str:
        return f"PeerPath(address={self.address!r}, candidate={self._candidate!r})"

    @property
    def candidate(self) -> tuple[str, int] | None:
        """The address being validated, if any."""
        return self._candidate

    def datagrams_to_send(self) -> list[tuple[bytes, tuple[str, int]]]:
        """Challenges to send, each with its destination (drains)."""
        out = self._outgoing
        if out:
            self._outgoing = []
        return out

    def receive(self, datagram: bytes, source: tuple[str, int], now: float) -> bytes | None:
        """The payload of an authentic, new DATA datagram of this session; None for anything else (a control
        datagram included, which is handled here)."""
        session = self.session
        if source == self.address:
            payload = session.open(datagram)
            if payload is None and datagram[:1] == _CONTROL_BYTE:
                session.open_control(datagram)  # nothing to do for one from the current address
            return payload
        before = session._window.highest
        message: ControlMessage | None = None
        if datagram[:1] == _CONTROL_BYTE:
            control = session._open(datagram, _CONTROL)
            if control is None:
                return None
            message = _control_message(control)
            payload = None
        else:
            payload = session.open(datagram)
            if payload is None:
                return None
        self._from_elsewhere(source, len(datagram), session._window.highest > before, message, now)
        return payload

    def _from_elsewhere(
        self, source: tuple[str, int], size: int, newest: bool, message: ControlMessage | None, now: float
    ) -> None:
        if newest and source in self._validated:
            self._move(source)
            return
        if source != self._candidate:
            if not newest:
                return  # an old copy from an unknown address starts nothing
            self._candidate = source
            self._received = self._sent = 0
            self._challenges = []
            self._last_challenge = now - CHALLENGE_INTERVAL
        self._received += size
        if newest:
            self._highest_from_candidate = self.session._window.highest
        if isinstance(message, PathResponse) and any(
            hmac.compare_digest(message.data, sent) for sent in self._challenges
        ):
            validated = self._validated
            validated.append(source)
            del validated[:-_VALIDATED_KEPT]
            if self._highest_from_candidate == self.session._window.highest:
                self._move(source)
            else:  # answered, but the client's newest datagrams come from elsewhere: stay
                self._candidate = None
            return
        if (
            newest
            and now - self._last_challenge >= CHALLENGE_INTERVAL
            and self._sent + CHALLENGE_DATAGRAM <= AMPLIFICATION_FACTOR * self._received
        ):
            data = padding(CHALLENGE_LEN)
            self._sent += CHALLENGE_DATAGRAM
            self._last_challenge = now
            self._challenges.append(data)
            del self._challenges[:-_CHALLENGES_KEPT]
            self._outgoing.append((self.session.seal_control(PathChallenge(data)), source))

    def _move(self, source: tuple[str, int]) -> None:
        self.address = source
        self._candidate = None
        self._challenges = []
        validated = self._validated
        if source in validated:
            validated.remove(source)
        validated.append(source)


class DatagramClient:
    """The client end of a sealed-datagram session.

    Send :meth:`initial_datagram`, feed every datagram from the server to :meth:`receive`; once
    :attr:`established`, :meth:`seal` payloads and :meth:`receive` returns the server's payloads.

    ``connection_id`` is a random initial ID until the reply arrives, then the ID the server assigned.
    ``ciphers`` is the offer, best first. An authentic reply that chooses a cipher not offered ends the attempt:
    :attr:`failure` says why, nothing more is accepted, and the caller can stop waiting for a reply.
    """

    __slots__ = (
        "_created",
        "_hs",
        "_init",
        "_initial_cid",
        "_offer",
        "_psk",
        "_reset_token",
        "_session",
        "failure",
        "reset",
    )

    def __init__(self, psk: bytes, *, now: float, ciphers: Sequence[Cipher] = DEFAULT_CIPHERS) -> None:
        check_psk(psk)
        self._psk = bytes(psk)
        self._offer = check_ciphers(ciphers)
        self._session: DatagramSession | None = None
        #: Why an authentic reply was refused (for the caller's error message); None otherwise.
        self.failure: str | None = None
        #: True once :meth:`receive` saw the server's stateless reset for this session (see :meth:`is_reset`).
        self.reset = False
        self._reset_token: bytes | None = None
        self._start(now)

    def _start(self, now: float) -> None:
        check_wall_clock(now)
        self._created = now
        self._initial_cid = padding(CID_LEN)
        self._hs = Initiator(self._psk, prologue=_prologue(DatagramType.INIT, self._initial_cid))
        payload = encode_init_payload(now, padding(TOKEN_LEN), self._offer, random_between(*INIT_PADDING))
        self._init = _HEAD.pack(DatagramType.INIT, self._initial_cid) + self._hs.write_message1(payload)

    @property
    def connection_id(self) -> bytes:
        return self._session.connection_id if self._session is not None else self._initial_cid

    @property
    def established(self) -> bool:
        return self._session is not None

    @property
    def session(self) -> DatagramSession | None:
        """The session once established."""
        return self._session

    def initial_datagram(self, now: float | None = None) -> bytes:
        """The handshake's first datagram (INIT, randomly padded).

        Retransmission: call again after a timeout with no reply. Without ``now``, or with a ``now`` less than
        :data:`RETRANSMIT_PERIOD` seconds after the first attempt, this returns the *same bytes*: the server
        recognises a byte-identical retransmission from the same source address and re-sends its reply (the
        one session it created), at most :data:`REPLY_REPEAT_LIMIT` times, until the session is confirmed by
        the client's first DATA datagram. Any other copy of the message (another source, later, after
        confirmation) is a replay and gets nothing. With a ``now`` :data:`RETRANSMIT_PERIOD` or more after the
        first attempt, the handshake starts over: a fresh ephemeral key, timestamp, token and initial
        connection ID.

        (Re-encrypting a new timestamp under the same ephemeral key would reuse the message's key and nonce,
        which ChaCha20-Poly1305 forbids; that is why a retransmission is byte-identical or entirely new.)
        """
        if self._session is not None:
            raise SecurityError("the handshake is already complete")
        if now is not None and now - self._created >= RETRANSMIT_PERIOD:
            self._start(now)
        return self._init

    def receive(self, datagram: bytes, now: float) -> bytes | None:
        """A handshake reply -> None (and :attr:`established` becomes True); a DATA datagram -> its payload;
        anything invalid, duplicated or unexpected -> None, silently.
        """
        session = self._session
        if session is not None:
            payload = session.open(datagram)
            if payload is None and self.is_reset(datagram):
                self.reset = True
            return payload
        if self.failure is not None:
            return None
        if len(datagram) < MIN_REPLY_DATAGRAM or datagram[0] != DatagramType.REPLY:
            return None
        if not hmac.compare_digest(bytes(datagram[1 : 1 + CID_LEN]), self._initial_cid):
            return None
        try:
            payload = self._hs.read_message2(bytes(datagram[_HEAD.size :]))
            # the reply authenticated, so the handshake is spent: a bad payload ends this attempt
            if len(payload) <= CID_LEN:
                raise AuthenticationFailed("handshake reply too short")
            cipher = decode_choice(payload[CID_LEN], self._offer)
        except AuthenticationFailed as exc:
            if self._hs.keys is not None:
                self.failure = str(exc)
            return None
        keys = self._hs.keys
        assert keys is not None
        self._session = DatagramSession(payload[:CID_LEN], keys, cipher=cipher)
        self._reset_token = reset_token(reset_keys(self._psk)[0], self._session.connection_id)
        return None

    def is_reset(self, datagram: bytes) -> bool:
        """Whether ``datagram`` is the server's stateless reset for this session: the server lost it.

        Only a holder of the PSK can make one. Call it for a datagram the session did not open (a reset never
        opens); the caller should also check that it came from the server's address. The token is compared in
        constant time; the connection ID, public anyway, as plain bytes.
        """
        token = self._reset_token
        session = self._session
        if token is None or session is None:
            return False
        if len(datagram) < MIN_RESET_DATAGRAM or datagram[0] != _DATA:
            return False
        if bytes(datagram[1 : 1 + CID_LEN]) != session.connection_id:
            return False
        return hmac.compare_digest(bytes(datagram[-RESET_TOKEN_LEN:]), token)

    def seal(self, payload: bytes) -> bytes:
        """A DATA datagram for the server. Only once :attr:`established`."""
        if self._session is None:
            raise SecurityError("seal() before the handshake completed")
        return self._session.seal(payload)


@dataclass(kw_only=True, slots=True)
class _Pending:
    datagram: bytes
    session: DatagramSession
    reply: bytes
    source: tuple[str, int]
    until: float
    repeats: int = REPLY_REPEAT_LIMIT


class DatagramServer:
    """Answers valid INIT datagrams with a new session; anything else gets None (send nothing).

    ``server_id`` (0 to :data:`MAX_SERVER_ID` bytes) starts every connection ID this server assigns; random
    bytes and a check (see :func:`mint_connection_id`) follow.
    ``max_pending`` bounds the retransmission memory (oldest forgotten first). ``ciphers`` are the transport
    ciphers accepted, best first; an INIT offering none of them gets nothing.
    """

    __slots__ = (
        "_accepted",
        "_cid_key",
        "_limiter",
        "_max_pending",
        "_pending",
        "_psk",
        "_replay",
        "_server_id",
    )

    def __init__(
        self,
        psk: bytes,
        *,
        replay: ReplayCache,
        limiter: HandshakeLimiter | None = None,
        server_id: bytes = b"",
        max_pending: int = 4096,
        ciphers: Sequence[Cipher] = DEFAULT_CIPHERS,
    ) -> None:
        check_psk(psk)
        self._accepted = check_ciphers(ciphers)
        if len(server_id) > MAX_SERVER_ID:
            raise SecurityError(
                f"a server id is at most {MAX_SERVER_ID} bytes (3 or more random bytes and a check follow it)"
            )
        self._psk = bytes(psk)
        self._replay = replay
        self._limiter = limiter
        self._server_id = bytes(server_id)
        self._cid_key = reset_keys(psk)[1]
        self._max_pending = max_pending
        self._pending: dict[bytes, _Pending] = {}  # token -> handshake answered recently

    def _prune(self, now: float) -> None:
        pending = self._pending
        for token in [t for t, p in pending.items() if p.until <= now or p.session.confirmed]:
            del pending[token]
        while len(pending) >= self._max_pending:
            del pending[next(iter(pending))]

    def accept(
        self,
        datagram: bytes,
        source: tuple[str, int],
        now: float,
        *,
        in_use: Container[bytes] = (),
    ) -> tuple[DatagramSession, bytes] | None:
        """A valid INIT -> ``(session, reply)``: store the session under ``session.connection_id`` and send
        ``reply`` to ``source``. Anything else -> None: send nothing.

        A byte-identical retransmission of an INIT answered less than :data:`RETRANSMIT_PERIOD` ago, from the
        same source, before the session saw any DATA from the client, returns the *same* session object and
        reply again (store idempotently; do not make a second session). The reply is never larger than
        ``datagram``. A new session's connection ID is none of ``in_use`` (the caller's sessions).

        The ``limiter`` is charged only for an authentic INIT with a fresh timestamp and a new token, right
        before the Diffie-Hellman it pays for: garbage, other keys' INITs, replays and stale INITs spend nothing,
        so a stranger who forges a client's source address cannot use up that client's handshakes.
        """
        n = len(datagram)
        if n < MIN_INIT_DATAGRAM or n > MAX_INIT_DATAGRAM or datagram[0] != DatagramType.INIT:
            return None
        check_wall_clock(now)
        datagram = bytes(datagram)
        initial_cid = datagram[1 : 1 + CID_LEN]
        hs = Responder(self._psk, prologue=_prologue(DatagramType.INIT, initial_cid))
        try:
            init = decode_init_payload(hs.read_message1(datagram[_HEAD.size :]))
        except AuthenticationFailed:
            return None
        cipher = choose(init.ciphers, self._accepted)
        if cipher is None:
            return None
        self._prune(now)
        if self._replay.seen(init.token, now):
            return self._repeat(init.token, datagram, source, now)
        if not self._replay.fresh(init.timestamp, now):
            return None
        # Only now, for an authentic, fresh, new first message (which only a key holder can make), is the
        # source charged: what follows costs the Diffie-Hellman. Nothing a stranger sends from a client's
        # address, nor a replay, can spend that client's budget.
        if self._limiter is not None and not self._limiter.allow(source[0], now):
            return None
        cid = self._free_connection_id(in_use)
        if cid is None or not self._replay.check_and_remember(init.token, init.timestamp, now):
            return None
        room = n - MIN_REPLY_DATAGRAM
        pad = padding(random_between(0, min(REPLY_PADDING_MAX, room)))
        try:
            message = hs.write_message2(cid + bytes((cipher,)) + pad)
        except AuthenticationFailed:
            return None
        reply = _HEAD.pack(DatagramType.REPLY, initial_cid) + message
        keys = hs.keys
        assert keys is not None
        session = DatagramSession(cid, keys, cipher=cipher)
        self._pending[init.token] = _Pending(
            datagram=datagram, session=session, reply=reply, source=source, until=now + RETRANSMIT_PERIOD
        )
        return session, reply

    def _free_connection_id(self, in_use: Container[bytes]) -> bytes | None:
        for _ in range(_CID_DRAWS):
            cid = mint_connection_id(self._cid_key, self._server_id)
            if cid not in in_use:
                return cid
        return None

    def _repeat(
        self, token: bytes, datagram: bytes, source: tuple[str, int], now: float
    ) -> tuple[DatagramSession, bytes] | None:
        p = self._pending.get(token)
        if (
            p is None
            or p.repeats <= 0
            or p.source != source
            or now >= p.until
            or p.session.confirmed
            or not hmac.compare_digest(p.datagram, datagram)
        ):
            return None
        p.repeats -= 1
        return p.session, p.reply


class StatelessReset:
    """The server's stateless resets: the answer to a DATA datagram for a connection ID it does not know.

    Call :meth:`answer` only for DATA datagrams whose connection ID names no session this server holds
    (restarted, expired, closed): never for a known one, never for a handshake. It returns None (send nothing)
    for anything else: another type, a datagram of :data:`MIN_RESET_DATAGRAM` bytes or fewer (it can only be a
    reset itself, or garbage), a connection ID that no holder of the PSK minted (:func:`is_minted`: a probe gets
    the silence it always got), or a source over its ``limiter`` budget. A reset is DATA-shaped: the type byte,
    the connection ID, random bytes (where a counter and ciphertext would be) and the token; its length is random,
    at most :data:`MAX_RESET_DATAGRAM` and always smaller than the datagram it answers.

    ``now`` only feeds the limiter: any clock, used consistently.
    """

    __slots__ = ("_cid_key", "_key", "_limiter")

    def __init__(self, psk: bytes, *, limiter: ResetLimiter | None = None) -> None:
        self._key, self._cid_key = reset_keys(psk)
        self._limiter = limiter

    def __repr__(self) -> str:
        return "StatelessReset()"

    def token(self, connection_id: bytes) -> bytes:
        """The reset token of ``connection_id`` (what a client checks the reset against)."""
        return reset_token(self._key, connection_id)

    def answer(self, datagram: bytes, source: tuple[str, int], now: float) -> bytes | None:
        """The reset for ``datagram`` (to send to ``source``), or None: send nothing."""
        n = len(datagram)
        if n <= MIN_RESET_DATAGRAM or datagram[0] != _DATA:
            return None
        cid = bytes(datagram[1 : 1 + CID_LEN])
        if not is_minted(self._cid_key, cid):
            return None
        if self._limiter is not None and not self._limiter.allow(source[0], now):
            return None
        size = random_between(MIN_RESET_DATAGRAM, min(n - 1, MAX_RESET_DATAGRAM))
        filler = padding(size - _HEAD.size - RESET_TOKEN_LEN)
        return _HEAD.pack(_DATA, cid) + filler + reset_token(self._key, cid)
