"""Sans-IO sealed datagrams for UDP transports: every datagram, the ARQ header included, is encrypted, and no
byte but a session's connection ID reads as anything but random.

Layouts (integers big endian; full description in ``docs/security.md``)::

    INIT    (client -> server)  salt (16) | ChaCha20[K_c2s(salt)](u16 length | initial CID (8) | Noise message 1)
    REPLY   (server -> client)  salt (16) | ChaCha20[K_s2c(salt)](initial CID (8) | Noise message 2)
    DATA    (both ways)         CID (8) | HP(kind 03 | counter low 32 bits) | AEAD ciphertext + tag 16
    CONTROL (both ways)         CID (8) | HP(kind 04 | counter low 32 bits) | AEAD(kind 1 | data 8 | padding) + tag 16
    RESET   (server -> client)  CID (8) | random 13..219 | reset token 16   (DATA-shaped, see below)

Handshake datagrams. ``K(salt)`` is ``BLAKE2s(key=PSK, person=direction label, data=salt)``; the salt is
random per datagram, so INIT and REPLY are random bytes of random sizes (Noise message 1 carries 16..400 bytes
of padding, message 2 up to 256). The masked length is INIT's cheap check: a server unmasks 10 bytes and drops
anything whose length does not match before it runs the handshake. INIT's payload is the timestamp, the
anti-replay token, the cipher offer and padding (see :mod:`.handshake`); the initial connection ID is the Noise
prologue's tail, so it is authenticated. REPLY's payload is the connection ID the server assigns, the chosen
cipher's code, then padding; the client drops a reply whose unmasked initial CID is not its own before any
Diffie-Hellman.

Kind 05 (DATA-PT: DATA with clear runs of lite-tls passthrough bodies after the tag, added by v4) is retired:
it cost more CPU than it saved (``docs/security.md``). Nothing sends it, and a receiver drops it, as any kind it does
not know, before decrypting anything.

DATA and CONTROL. A datagram is sealed with the chosen cipher (:mod:`.ciphers`) under its direction's key;
its nonce is the full 64-bit counter and its associated data the 13 header bytes *before* header protection
(CID, kind, low 32 bits of the counter). Then, as QUIC protects its headers (RFC 9001 section 5.4), the 5
bytes after the CID are XORed with the first 5 bytes of AES-256-ECB(header key, the ciphertext's first 16
bytes); each direction's header key comes from the handshake (:data:`HEADER_KEY_LABEL`). The receiver
unmasks them, rebuilds the full counter from the highest one it authenticated (RFC 9000 appendix A.3) and
checks that one against its replay window. A batch (:meth:`DatagramSession.seal_many`,
:meth:`DatagramSession.seal_run`, :meth:`DatagramSession.open_many`) gets the masks of all its datagrams from
one AES call; a run in order (:meth:`DatagramSession.open_run`) is also unmasked and checked at once.
:data:`DATAGRAM_OVERHEAD` is 29 bytes. A CONTROL datagram's sealed payload is padded to a random size
(:data:`MIN_CONTROL_DATAGRAM` .. :data:`MAX_CONTROL_DATAGRAM` on the wire), so its size is no more telling than
DATA's.

The connection ID is the only clear field: a server finds the session by it, never by the source address, so
NAT rebinding keeps a session alive; a datagram whose first 8 bytes name no session is tried as an INIT
(:meth:`DatagramServer.accept`), then as a DATA datagram for a lost session (:class:`StatelessReset`). Where a
server sends is :class:`PeerPath`'s decision: a new client address is followed only after it echoed a path
challenge (a CONTROL datagram) and the client's newest datagrams come from it, as QUIC validates a path. The
server assigns the ID and may start it with a fixed server/worker id (``server_id``, visible: a load balancer
routes on it, QUIC-LB's idea); random bytes follow, then 3 bytes of a check computed from the rest under a key
derived from the PSK, so that a server which lost the session can tell a connection ID minted by a key holder
from a prober's guess. Without a server id the ID is 5 random bytes and 3 bytes of a MAC: random to anyone
without the key.

A session may hold more than one ID (:attr:`DatagramSession.connection_ids`): the server issues a spare one
ahead, sealed (:class:`NewConnectionId`, confirmed by :class:`ConnectionIdSeen`), and :class:`PeerPath` moves the
session to it together with a new client address, so the two paths share no clear byte; the client seals under
the newest ID the server used (:meth:`DatagramSession.follow_newest`). Every ID has its own reset token.

A server that receives a datagram for a connection ID it does not know (it restarted, or forgot the session)
and that is no INIT answers with a *stateless reset* (RFC 9000 section 10.3's idea): a datagram of DATA's
shape, shorter than the one it answers, whose last 16 bytes are the connection ID's reset token, a MAC under a
key derived from the PSK. Any server holding the PSK computes the same token, and only they can: the client,
seeing its own token, knows the server lost the session and reconnects at once instead of waiting for its
keepalive. Only connection IDs whose check is right are answered, so a prober's datagrams still get silence.

``now`` in the handshake calls is wall-clock seconds (``time.time()``): timestamps are compared across hosts.
``entropy`` (``os.urandom`` by default) is where every random byte comes from: ephemeral keys, tokens, salts,
connection IDs, padding and its length, challenge data, reset fillers; a seeded generator makes a run
reproducible in tests.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from itertools import repeat
from operator import itemgetter

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher as _BlockCipher
from cryptography.hazmat.primitives.ciphers import algorithms, modes

from .ciphers import (
    DEFAULT_CIPHERS,
    Cipher,
    check_ciphers,
    choose,
    decode_choice,
    make_aead,
    nonce_function,
    nonce_run,
)
from .errors import AuthenticationFailed, SecurityError
from .handshake import (
    INIT_PAYLOAD_LEN,
    MIN_INIT_PAYLOAD_LEN,
    NOISE_OVERHEAD,
    SALT_LEN,
    TOKEN_LEN,
    Entropy,
    check_wall_clock,
    decode_init_payload,
    encode_init_payload,
    random_between,
    salted_keystream,
)
from .keys import KeySet, UserKey
from .noise import DHLEN, TAGLEN, Initiator, Responder, TransportKeys, check_psk
from .replay import HandshakeLimiter, ReplayCache, ReplayWindow, ResetLimiter

__all__ = [
    "AMPLIFICATION_FACTOR",
    "CHALLENGE_INTERVAL",
    "CID_CHECK_LEN",
    "CID_LEN",
    "DATAGRAM_OVERHEAD",
    "DATAGRAM_PROLOGUE",
    "HEADER_KEY_LABEL",
    "MAX_CONTROL_DATAGRAM",
    "MAX_INIT_DATAGRAM",
    "MAX_REPLY_DATAGRAM",
    "MAX_RESET_DATAGRAM",
    "MAX_SERVER_ID",
    "MAX_SLOTS",
    "MIN_CONTROL_DATAGRAM",
    "MIN_INIT_DATAGRAM",
    "MIN_REPLY_DATAGRAM",
    "MIN_RESET_DATAGRAM",
    "REPLY_REPEAT_LIMIT",
    "RESET_TOKEN_LEN",
    "RETRANSMIT_PERIOD",
    "SALT_LEN",
    "ConnectionIdLayout",
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
    "connection_id_slot",
    "is_minted",
    "mint_connection_id",
    "peek_connection_id",
    "read_handshake_datagram",
    "reset_keys",
    "reset_token",
    "write_handshake_datagram",
]

CID_LEN = 8


class DatagramType(IntEnum):
    """The kind of a DATA-shaped datagram: the byte under header protection, in the associated data."""

    DATA = 0x03
    #: DATA's shape and keys; the sealed payload is a control message (path validation), not for the ARQ layer
    CONTROL = 0x04
    # 0x05 was DATA-PT (v4's clear runs of lite-tls passthrough bodies), retired: dropped as any unknown kind


class ControlKind(IntEnum):
    """The first byte of a CONTROL datagram's sealed payload."""

    PATH_CHALLENGE = 0x01
    PATH_RESPONSE = 0x02
    NEW_CONNECTION_ID = 0x03
    CONNECTION_ID_SEEN = 0x04


@dataclass(frozen=True, slots=True)
class PathChallenge:
    """The server asks the peer behind a new address to echo ``data`` (RFC 9000 section 8.2's PATH_CHALLENGE)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class PathResponse:
    """The echo of a :class:`PathChallenge`'s ``data``."""

    data: bytes


@dataclass(frozen=True, slots=True)
class NewConnectionId:
    """The server gives the client a spare connection ID of the session, ``data`` (RFC 9000 section 19.15's
    NEW_CONNECTION_ID, issued ahead): the server moves the session to it when the client's address changes, so
    the two paths share no clear byte. Its stateless reset token is :func:`reset_token` of it, which every key
    holder computes: nothing more travels."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ConnectionIdSeen:
    """The client's receipt of a :class:`NewConnectionId` (CONTROL datagrams are not retransmitted: the server
    repeats the announcement until this comes, and moves only to a spare the client knows)."""

    data: bytes


ControlMessage = PathChallenge | PathResponse | NewConnectionId | ConnectionIdSeen
#: v4 added DATA-PT datagrams (kind 05, clear runs of lite-tls passthrough bodies; retired since, the version kept so
#: that peers still complete a handshake). v3: nothing but the connection ID in clear
#: (masked handshake datagrams, header protection, padded CONTROL). v2 added the cipher offer and choice. Peers of
#: different versions never complete a handshake: the server stays silent and the client times out.
DATAGRAM_PROLOGUE = b"vtunnel datagram v4"
#: The label of the header protection keys (:meth:`TransportKeys.derive`).
HEADER_KEY_LABEL = b"vtunnel datagram v3 header protection"

_PROTECTED_LEN = 5  # kind (1) and the counter's low 32 bits, under the header mask
DATA_HEADER_LEN = CID_LEN + _PROTECTED_LEN  # 13
DATAGRAM_OVERHEAD = DATA_HEADER_LEN + TAGLEN  # 29
_SAMPLE_END = DATA_HEADER_LEN + 16  # the header mask's input: the ciphertext's first 16 bytes
_DATA_KIND = int(DatagramType.DATA)
_CONTROL_KIND = int(DatagramType.CONTROL)
#: A DATA or CONTROL header: CID, kind, counter low 32 bits. Clear, it is the associated data; masked, the wire's.
_HEADER = struct.Struct(">8sBI")
#: The protected part of a header as it reads on the wire (the CID skipped).
_PROTECTED = struct.Struct(">8xBI")
#: The protected part of a header: kind, counter low 32 bits.
_FIELD = struct.Struct(">BI")
#: One AES block of header mask: what the kind byte and the counter's low 32 bits are XORed with.
_MASK = struct.Struct(">BI11x")
_LOW32 = 0xFFFFFFFF
_HIGH = ~_LOW32
_WRAP = 1 << 32
_HALF_WRAP = 1 << 31
MAX_COUNTER = 2**64 - 1

#: The BLAKE2s personalisations (8 bytes) of a handshake datagram's two directions' keys.
_CLIENT_FRAMES = b"vtd3 c2s"
_SERVER_FRAMES = b"vtd3 s2c"
_LEN = struct.Struct(">H")
_INIT_HEAD = SALT_LEN + _LEN.size + CID_LEN  # 26
_REPLY_HEAD = SALT_LEN + CID_LEN  # 24

INIT_PADDING = (16, 400)
MIN_INIT_DATAGRAM = _INIT_HEAD + NOISE_OVERHEAD + MIN_INIT_PAYLOAD_LEN  # 100
MAX_INIT_DATAGRAM = _INIT_HEAD + NOISE_OVERHEAD + INIT_PAYLOAD_LEN + 1024  # 1122
MIN_REPLY_DATAGRAM = _REPLY_HEAD + NOISE_OVERHEAD + CID_LEN + 1  # the CID, then the chosen cipher's code: 81
REPLY_PADDING_MAX = 256
MAX_REPLY_DATAGRAM = MIN_REPLY_DATAGRAM + REPLY_PADDING_MAX
#: Seconds during which a client retransmits the same first datagram and the server answers such copies.
RETRANSMIT_PERIOD = 10.0
#: How many times the server re-sends a reply to retransmissions of one first message.
REPLY_REPEAT_LIMIT = 8

#: HKDF label of the stateless reset key: a key of its own, derived from the PSK, used for nothing else
_RESET_LABEL = b"vtunnel datagram v2 stateless reset"
RESET_TOKEN_LEN = 16
#: Bytes of a path challenge's random data (as QUIC's PATH_CHALLENGE)
CHALLENGE_LEN = 8
_CONTROL_MESSAGE = struct.Struct(">B8s")  # kind, challenge data; zero padding follows
#: The sizes of CONTROL datagrams on the wire: random in this range, like the small DATA datagrams (acks).
MIN_CONTROL_DATAGRAM = DATAGRAM_OVERHEAD + _CONTROL_MESSAGE.size  # 38
MAX_CONTROL_DATAGRAM = 160
#: Until a new address answered a challenge, it is sent at most this many times the bytes received from it
#: (RFC 9000 section 8's anti-amplification limit), and only challenges: everything else goes to the old address.
AMPLIFICATION_FACTOR = 3
#: Least seconds between two challenges to one new address.
CHALLENGE_INTERVAL = 0.1
#: Least seconds between two announcements of a spare connection ID the client has not confirmed.
ANNOUNCE_INTERVAL = 0.25
_NEVER = float("-inf")
#: Challenges whose answer is still accepted (a late answer to an earlier one counts).
_CHALLENGES_KEPT = 4
#: Addresses that answered a challenge and that a session moves back to without a new one (the current and
#: the one before it).
_VALIDATED_KEPT = 2

#: The shortest reset: a DATA header, 8 filler bytes (the shape of a DATA datagram with a small payload), the
#: token. A datagram of this length or less is never answered, and every reset is shorter than what it
#: answers, so resets cannot bounce between two servers for long, nor amplify.
MIN_RESET_DATAGRAM = DATA_HEADER_LEN + 8 + RESET_TOKEN_LEN  # 37
#: The longest reset: one is enough, and a short answer keeps what a forged source receives small.
MAX_RESET_DATAGRAM = 256
#: The last bytes of every connection ID a server mints: a MAC of the bytes before them (see :func:`is_minted`).
CID_CHECK_LEN = 3
#: The longest ``server_id``: at least 3 random bytes remain between it and the check.
MAX_SERVER_ID = CID_LEN - CID_CHECK_LEN - 3  # 2
#: How many times a server draws a connection ID that is not in use before it gives up on a handshake.
_CID_DRAWS = 16


def _header_mask(key: bytes) -> Callable[[bytes | memoryview], bytes]:
    """AES-256-ECB under ``key``: one 16-byte block in, 16 out; one context for the session's life."""
    return _BlockCipher(algorithms.AES(key), modes.ECB()).encryptor().update


def _frame_mask(psk: bytes, person: bytes, salt: bytes) -> Callable[[bytes], bytes]:
    return salted_keystream(psk, person, salt).update


def write_handshake_datagram(
    psk: bytes, initial_cid: bytes, message: bytes, *, from_client: bool, salt: bytes
) -> bytes:
    """The wire form of a Noise handshake message: INIT (``from_client``) or REPLY (see the layouts above)."""
    if len(salt) != SALT_LEN or len(initial_cid) != CID_LEN:
        raise SecurityError("a handshake datagram's salt is 16 bytes and its connection ID 8")
    if from_client:
        mask = _frame_mask(psk, _CLIENT_FRAMES, salt)
        return salt + mask(_LEN.pack(CID_LEN + len(message)) + initial_cid + message)
    return salt + _frame_mask(psk, _SERVER_FRAMES, salt)(initial_cid + message)


def read_handshake_datagram(
    psk: bytes, datagram: bytes | memoryview, *, from_client: bool
) -> tuple[bytes, bytes] | None:
    """``(initial CID, Noise message)`` of an INIT (``from_client``) or a REPLY, or None if ``datagram`` cannot
    be one: a size out of range or, for an INIT, a masked length that does not match (so garbage is dropped
    after one hash and 10 bytes of keystream). A non-None answer proves nothing: the message must authenticate.
    """
    n = len(datagram)
    datagram = bytes(datagram)
    if from_client:
        if n < MIN_INIT_DATAGRAM or n > MAX_INIT_DATAGRAM:
            return None
        mask = _frame_mask(psk, _CLIENT_FRAMES, datagram[:SALT_LEN])
        head = mask(datagram[SALT_LEN:_INIT_HEAD])
        if _LEN.unpack_from(head)[0] != n - SALT_LEN - _LEN.size:
            return None
        return head[_LEN.size :], mask(datagram[_INIT_HEAD:])
    if n < MIN_REPLY_DATAGRAM or n > MAX_REPLY_DATAGRAM:
        return None
    body = _frame_mask(psk, _SERVER_FRAMES, datagram[:SALT_LEN])(datagram[SALT_LEN:])
    return body[:CID_LEN], body[CID_LEN:]


def peek_connection_id(datagram: bytes | memoryview) -> bytes | None:
    """The connection ID a DATA or CONTROL datagram would carry: its first 8 bytes, or None if it is too short
    to be one. Cheap: no cryptography. A handshake datagram starts with random bytes instead; a non-None answer
    proves nothing, and the datagram must still be opened.
    """
    if len(datagram) < DATAGRAM_OVERHEAD:
        return None
    return bytes(datagram[:CID_LEN])


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


@dataclass(frozen=True, slots=True)
class ConnectionIdLayout:
    """What every connection ID a server mints says about where it leads: ``server_id`` (0 to
    :data:`MAX_SERVER_ID` bytes, in clear at its start: a load balancer in front of several servers routes on
    it) and ``slot`` of ``slots`` (a worker's socket in the server's ``SO_REUSEPORT`` group, see
    :func:`connection_id_slot`; ``slots`` 1: no steering). At most :data:`MAX_SLOTS` slots."""

    server_id: bytes = b""
    slot: int = 0
    slots: int = 1

    def __post_init__(self) -> None:
        if len(self.server_id) > MAX_SERVER_ID:
            raise SecurityError(
                f"a server id is at most {MAX_SERVER_ID} bytes (3 or more random bytes and a check follow it)"
            )
        if not 1 <= self.slots <= MAX_SLOTS or not 0 <= self.slot < self.slots:
            raise SecurityError(f"a connection ID slot is 0..slots-1 with 1..{MAX_SLOTS} slots")


#: the most slots a connection ID can steer between (a byte's worth: the slot is a sum of bytes modulo ``slots``)
MAX_SLOTS = 256


def connection_id_slot(connection_id: bytes | memoryview, server_id_len: int, slots: int) -> int:
    """The slot a connection ID (or any datagram's first 8 bytes) leads to: the sum of its random bytes (after
    the ``server_id_len`` bytes of server id, before the check) modulo ``slots``. This is what the kernel's
    steering program computes (:mod:`vtunnel.io.steering`), so it is written to be computable there."""
    return sum(bytes(connection_id[server_id_len : CID_LEN - CID_CHECK_LEN])) % slots


def mint_connection_id(
    key: bytes,
    server_id: bytes = b"",
    *,
    layout: ConnectionIdLayout | None = None,
    entropy: Entropy = os.urandom,
) -> bytes:
    """A new connection ID: ``server_id`` (or ``layout``'s), random bytes, then the check of both under the
    connection ID ``key`` (:func:`reset_keys`). With a ``layout`` of several slots the random bytes are drawn
    again until :func:`connection_id_slot` gives its slot: each of them is still uniform on its own."""
    if layout is None:
        layout = ConnectionIdLayout(server_id=bytes(server_id))
    sid, slot, slots = layout.server_id, layout.slot, layout.slots
    size = CID_LEN - CID_CHECK_LEN - len(sid)
    while True:
        random = entropy(size)
        if slots == 1 or sum(random) % slots == slot:
            break
    head = sid + random
    return head + _cid_check(key, head)


def is_minted(key: bytes, connection_id: bytes) -> bool:
    """Whether ``connection_id`` carries the right check under ``key``: minted by a holder of the PSK (or a
    guess that had a 1 in 2**24 chance). Constant time."""
    if len(connection_id) != CID_LEN:
        return False
    head = bytes(connection_id[: CID_LEN - CID_CHECK_LEN])
    return hmac.compare_digest(bytes(connection_id[CID_LEN - CID_CHECK_LEN :]), _cid_check(key, head))


_CONTROL_KINDS: dict[int, type[ControlMessage]] = {
    ControlKind.PATH_CHALLENGE: PathChallenge,
    ControlKind.PATH_RESPONSE: PathResponse,
    ControlKind.NEW_CONNECTION_ID: NewConnectionId,
    ControlKind.CONNECTION_ID_SEEN: ConnectionIdSeen,
}
_KIND_OF: dict[type[ControlMessage], int] = {message: kind for kind, message in _CONTROL_KINDS.items()}
#: the most connection IDs a session accepts at once: the one in use, the one before it, and spares
MAX_CONNECTION_IDS = 4


def _control_message(payload: bytes) -> ControlMessage | None:
    if len(payload) < _CONTROL_MESSAGE.size:
        return None
    kind, data = _CONTROL_MESSAGE.unpack_from(payload)
    message = _CONTROL_KINDS.get(kind)
    return None if message is None else message(data)


def _geometric(width: int, count: int) -> tuple[int, int]:
    """``step`` and ``ramp`` of ``count`` blocks of ``width`` bytes read as one big-endian integer: one in every
    block, and i in block i (the first block at the high end)."""
    base = 1 << (8 * width)
    step = (base**count - 1) // (base - 1)
    return step, (step - count) // (base - 1)


class _Run:
    """What a run of ``count`` datagrams on consecutive counters (whose low 32 bits do not wrap among them) is
    built and checked with, a few integer operations for the whole run (cached per ``count``).

    Protected fields: those of the run back to back (5 bytes each), as one big-endian integer, are
    ``field * step + ramp`` for the first one's ``field`` (kind and counter's low 32 bits, one 40-bit number);
    :attr:`masks` reads what masks them out of the run's AES-ECB output (the first 5 bytes of each 16-byte
    block), :attr:`fields` cuts them apart. Associated data: the 13 header bytes of every datagram back to back,
    ``header * aad_step + aad_ramp`` for the first one's ``header`` (as one integer), cut apart by :attr:`aads`.
    """

    __slots__ = ("aad_ramp", "aad_step", "aads", "fields", "masks", "ramp", "step")

    def __init__(self, count: int) -> None:
        self.step, self.ramp = _geometric(_PROTECTED_LEN, count)
        self.masks = struct.Struct(f"{_PROTECTED_LEN}s{16 - _PROTECTED_LEN}x" * count).unpack
        self.fields = struct.Struct(f"{_PROTECTED_LEN}s" * count).unpack
        self.aad_step, self.aad_ramp = _geometric(DATA_HEADER_LEN, count)
        self.aads = struct.Struct(f"{DATA_HEADER_LEN}s" * count).unpack


@lru_cache(maxsize=128)
def _run(count: int) -> _Run:
    return _Run(count)


@lru_cache(maxsize=256)
def _wire_run(segment: int, count: int, last: int) -> Callable[[bytes], tuple[bytes, ...]]:
    """Reads a run of ``count`` datagrams of ``segment`` bytes, the last ``last`` bytes, back to back (each at
    least :data:`DATAGRAM_OVERHEAD`): connection ID, protected field and sealed body of each, in one call."""
    body, last_body = segment - DATA_HEADER_LEN, last - DATA_HEADER_LEN
    each = f"{CID_LEN}s{_PROTECTED_LEN}s"
    return struct.Struct(f"{each}{body}s" * (count - 1) + f"{each}{last_body}s").unpack


#: the header mask's input of a sealed body: its first 16 bytes
_SAMPLE = itemgetter(slice(16))


class DatagramSession:
    """One authenticated session: seals and opens DATA and CONTROL datagrams.

    :meth:`open` returns None for anything forged, replayed (counter already seen or older than the replay
    window), garbled or for another connection ID. The caller may move the peer's address to the source of a
    datagram only after :meth:`open` accepted it. ``entropy`` gives the CONTROL datagrams' random sizes.
    """

    __slots__ = (
        "_decrypt",
        "_encrypt",
        "_entropy",
        "_nonce",
        "_nonces",
        "_open_aead",
        "_receive_mask",
        "_seal_aead",
        "_send_counter",
        "_send_mask",
        "_window",
        "cipher",
        "confirmed",
        "connection_id",
        "connection_ids",
        "newest_connection_id",
        "user",
    )

    def __init__(
        self,
        connection_id: bytes,
        keys: TransportKeys,
        *,
        cipher: Cipher,
        window: int = 4096,
        entropy: Entropy = os.urandom,
        user: UserKey | None = None,
    ) -> None:
        if len(connection_id) != CID_LEN:
            raise SecurityError("a connection ID is 8 bytes")
        #: the ID this end seals with
        self.connection_id = bytes(connection_id)
        #: every ID this session opens datagrams under, oldest first (the one in use among them)
        self.connection_ids: list[bytes] = [self.connection_id]
        #: the ID the newest authentic datagram from the peer carried
        self.newest_connection_id = self.connection_id
        self.cipher = Cipher(cipher)
        self._seal_aead = make_aead(self.cipher, keys.send)
        self._open_aead = make_aead(self.cipher, keys.receive)
        self._encrypt = self._seal_aead.encrypt  # bound once: these run for every datagram
        self._decrypt = self._open_aead.decrypt
        self._nonce = nonce_function(self.cipher)
        self._nonces = nonce_run(self.cipher)
        send_key, receive_key = keys.derive(HEADER_KEY_LABEL)
        self._send_mask = _header_mask(send_key)
        self._receive_mask = _header_mask(receive_key)
        self._send_counter = 0
        self._window = ReplayWindow(window)
        self._entropy = entropy
        #: True once a datagram from the peer was authenticated (both ends know the handshake completed).
        self.confirmed = False
        #: a server's session: whose key the client authenticated under
        self.user = user

    def __repr__(self) -> str:
        return f"DatagramSession(connection_id={self.connection_id.hex()}, sent={self._send_counter})"

    def add_connection_id(self, connection_id: bytes) -> None:
        """Open datagrams under ``connection_id`` too (a spare the server issued); the oldest that is not in use
        is forgotten beyond :data:`MAX_CONNECTION_IDS`."""
        if len(connection_id) != CID_LEN:
            raise SecurityError("a connection ID is 8 bytes")
        ids = self.connection_ids
        if connection_id in ids:
            return
        ids.append(bytes(connection_id))
        while len(ids) > MAX_CONNECTION_IDS:
            ids.remove(next(cid for cid in ids if cid != self.connection_id))

    def use_connection_id(self, connection_id: bytes) -> None:
        """Seal with ``connection_id`` from now on (one this session opens under); the ones issued before it
        are forgotten but the last one in use, for datagrams still on their way."""
        ids = self.connection_ids
        if connection_id not in ids:
            raise SecurityError("not a connection ID of this session")
        position = ids.index(connection_id)
        previous = self.connection_id
        self.connection_id = ids[position]
        del ids[:position]
        if previous != self.connection_id and previous not in ids:
            ids.insert(0, previous)

    def follow_newest(self) -> bool:
        """The client's rule: seal with the ID the server's newest datagram carried if the server issued it
        after the one in use (the server moved the session to a new path); True when it changed. An older ID
        (a datagram the server sent down the old path) never takes the session back."""
        newest, ids = self.newest_connection_id, self.connection_ids
        if newest == self.connection_id or newest not in ids:
            return False
        if ids.index(newest) < ids.index(self.connection_id):
            return False
        self.use_connection_id(newest)
        return True

    def _seal_with(
        self, cid: bytes, kind: int, payloads: Sequence[bytes]
    ) -> tuple[Sequence[bytes], list[bytes]]:
        """Seal each of ``payloads`` as a datagram of ``kind`` under ``cid``, in order, on consecutive counters:
        the masked protected fields (what follows ``cid``) and the sealed bodies (what follows the field)."""
        count = len(payloads)
        first = self._send_counter
        end = first + count
        if end > MAX_COUNTER:
            raise SecurityError("the session's counter is exhausted; start a new handshake")
        self._send_counter = end
        if count == 1:  # (an ack, a control message: in fewer steps)
            low = first & _LOW32
            body = self._encrypt(self._nonce(first), payloads[0], _HEADER.pack(cid, kind, low))
            kind_mask, low_mask = _MASK.unpack(self._send_mask(body[:16]))
            return (_FIELD.pack(kind ^ kind_mask, low ^ low_mask),), [body]
        split = _WRAP - (first & _LOW32)
        if split < count:  # the counters' low 32 bits wrap inside the batch: each side on its own
            fields, bodies = self._seal_run(cid, kind, first, payloads[:split])
            more_fields, more_bodies = self._seal_run(cid, kind, first + split, payloads[split:])
            return (*fields, *more_fields), bodies + more_bodies
        return self._seal_run(cid, kind, first, payloads)

    def _seal_run(
        self, cid: bytes, kind: int, first: int, payloads: Sequence[bytes]
    ) -> tuple[Sequence[bytes], list[bytes]]:
        """:meth:`_seal_with` for counters from ``first`` whose low 32 bits do not wrap among them.

        Every step per datagram is one C call mapped over the batch (AEAD, the sample of the header mask); the
        nonces, the associated data and the protected fields of the whole batch are each built as one integer
        (:class:`_Run`), the fields masked as :meth:`open_run` unmasks them."""
        count = len(payloads)
        low = first & _LOW32
        run = _run(count)
        head = (int.from_bytes(cid, "big") << (8 * _PROTECTED_LEN)) | (kind << 32) | low
        aads = run.aads((head * run.aad_step + run.aad_ramp).to_bytes(DATA_HEADER_LEN * count, "big"))
        bodies = list(map(self._encrypt, self._nonces(first, count), payloads, aads))
        masks = int.from_bytes(b"".join(run.masks(self._send_mask(b"".join(map(_SAMPLE, bodies))))), "big")
        fields = masks ^ (((kind << 32) | low) * run.step + run.ramp)
        return run.fields(fields.to_bytes(_PROTECTED_LEN * count, "big")), bodies

    def seal(self, payload: bytes) -> bytes:
        """A DATA datagram carrying ``payload`` (``len(payload) + DATAGRAM_OVERHEAD`` bytes)."""
        return self.seal_many((payload,))[0]

    def seal_run(self, payloads: Sequence[bytes]) -> bytes:
        """The DATA datagrams :meth:`seal_many` gives for ``payloads``, back to back in one buffer (what one
        segmented send, UDP GSO, takes): no datagram is a bytes object of its own."""
        cid = self.connection_id
        fields, bodies = self._seal_with(cid, _DATA_KIND, payloads)
        if len(bodies) == 1:  # (an ACK, a message: most batches of a conversation)
            return cid + fields[0] + bodies[0]
        parts = [cid] * (3 * len(bodies))  # each datagram: connection ID, masked field, sealed body
        parts[1::3] = fields
        parts[2::3] = bodies
        return b"".join(parts)

    def seal_many(self, payloads: Sequence[bytes]) -> list[bytes]:
        """A DATA datagram for each of ``payloads``, in order: what :meth:`seal` gives for each in turn, for
        less work per datagram."""
        cid = self.connection_id
        fields, wire = self._seal_with(cid, _DATA_KIND, payloads)
        return list(map(b"".join, zip(repeat(cid), fields, wire)))

    @property
    def highest_received(self) -> int:
        """The highest counter authenticated so far (-1: none yet)."""
        return self._window.highest

    def seal_control(
        self, message: ControlMessage, *, size: int | None = None, connection_id: bytes | None = None
    ) -> bytes:
        """A CONTROL datagram carrying ``message``, ``size`` bytes long (default: random between
        :data:`MIN_CONTROL_DATAGRAM` and :data:`MAX_CONTROL_DATAGRAM`); it takes the next counter, as a DATA
        datagram would. ``connection_id``: another of the session's IDs than the one in use (a challenge to a
        new path goes under the ID that path will use)."""
        cid = self.connection_id if connection_id is None else connection_id
        if cid not in self.connection_ids:
            raise SecurityError("not a connection ID of this session")
        if len(message.data) != CHALLENGE_LEN:
            raise SecurityError(f"a path challenge's data is {CHALLENGE_LEN} bytes")
        if size is None:
            size = random_between(self._entropy, MIN_CONTROL_DATAGRAM, MAX_CONTROL_DATAGRAM)
        elif not MIN_CONTROL_DATAGRAM <= size <= MAX_CONTROL_DATAGRAM:
            raise SecurityError(
                f"a CONTROL datagram is {MIN_CONTROL_DATAGRAM} to {MAX_CONTROL_DATAGRAM} bytes, not {size}"
            )
        kind = _KIND_OF[type(message)]
        padding = bytes(size - MIN_CONTROL_DATAGRAM)  # sealed: its content is never seen
        (field,), (body,) = self._seal_with(
            cid, _CONTROL_KIND, (_CONTROL_MESSAGE.pack(kind, message.data) + padding,)
        )
        return cid + field + body

    def open(self, datagram: bytes | memoryview) -> bytes | ControlMessage | None:
        """The payload of an authentic, new DATA datagram for this session, or the message of such a CONTROL
        datagram; None otherwise (including a well sealed CONTROL datagram whose content this version does not
        know: it is recorded as received all the same)."""
        return self.open_many((datagram,))[0]

    def open_many(self, datagrams: Sequence[bytes | memoryview]) -> list[bytes | ControlMessage | None]:
        """What :meth:`open` gives for each of ``datagrams`` in turn (one answer per datagram, in order), for
        less work per datagram: a datagram refused changes nothing for the others."""
        return self._open_many(datagrams)[0]

    def _open_many(
        self, datagrams: Sequence[bytes | memoryview]
    ) -> tuple[list[bytes | ControlMessage | None], int]:
        """What :meth:`open_many` gives, and how many of ``datagrams`` authenticated (a CONTROL datagram whose
        message this version does not know gives None, and counts).

        The header masks of all the datagrams that may be this session's come from one AES-ECB call; then each
        in turn is unmasked, its full counter rebuilt from the highest one authenticated so far and checked
        against the replay window, and it is opened (so a copy later in the same batch is a replay).
        """
        count = len(datagrams)
        opened: list[bytes | ControlMessage | None] = [None] * count
        cid = self.connection_id
        ids = self.connection_ids
        several = len(ids) > 1
        # (comprehensions, locals, one struct call per field: this runs for every datagram received)
        if count == 1:  # (an ack, a control message: no comprehension, whose call costs more than it saves)
            datagram = datagrams[0]
            if len(datagram) < DATAGRAM_OVERHEAD or (
                datagram[:CID_LEN] != cid and not (several and bytes(datagram[:CID_LEN]) in ids)
            ):
                return opened, 0
            candidates: Sequence[int] = (0,)
            samples = datagram[DATA_HEADER_LEN:_SAMPLE_END]
        else:
            candidates = [
                i
                for i, datagram in enumerate(datagrams)
                if len(datagram) >= DATAGRAM_OVERHEAD
                and (datagram[:CID_LEN] == cid or (several and bytes(datagram[:CID_LEN]) in ids))
            ]
            if not candidates:
                return opened, 0
            samples = b"".join(
                [datagram[DATA_HEADER_LEN:_SAMPLE_END] for datagram in datagrams]
                if len(candidates) == count
                else [datagrams[i][DATA_HEADER_LEN:_SAMPLE_END] for i in candidates]
            )
        mine = datagrams if len(candidates) == count else [datagrams[i] for i in candidates]
        masks = _MASK.iter_unpack(self._receive_mask(samples))
        window = self._window
        check, update, highest = window.check, window.update, window.highest
        decrypt, nonce, header, protected = self._decrypt, self._nonce, _HEADER.pack, _PROTECTED.unpack_from
        authentic = 0
        for i, datagram, (kind_mask, low_mask) in zip(candidates, mine, masks, strict=True):
            kind, low = protected(datagram)
            kind ^= kind_mask
            if kind != _DATA_KIND and kind != _CONTROL_KIND:  # (any other kind, retired or unknown: dropped)
                continue
            low ^= low_mask
            # the full counter nearest to the next one expected (RFC 9000 appendix A.3, 32-bit truncation)
            expected = highest + 1
            if low == expected & _LOW32 and expected < MAX_COUNTER:
                n = expected  # (in order, as most are: what the lines below give too, in fewer steps)
            else:
                n = (expected & _HIGH) | low
                if n + _HALF_WRAP <= expected and n < MAX_COUNTER - _WRAP:
                    n += _WRAP
                elif n > expected + _HALF_WRAP and n >= _WRAP:
                    n -= _WRAP
                if n >= MAX_COUNTER or (n <= highest and not check(n)):
                    continue
            named = bytes(datagram[:CID_LEN]) if several and datagram[:CID_LEN] != cid else cid
            if kind == _DATA_KIND:
                try:
                    payload: bytes | ControlMessage | None = decrypt(
                        nonce(n), datagram[DATA_HEADER_LEN:], header(named, kind, low)
                    )
                except InvalidTag:
                    continue
            else:
                try:
                    body = decrypt(nonce(n), datagram[DATA_HEADER_LEN:], header(named, kind, low))
                except InvalidTag:
                    continue
                payload = _control_message(body)
            update(n)
            if n > highest:
                highest = n
                self.newest_connection_id = named
            opened[i] = payload
            authentic += 1
        if authentic:
            self.confirmed = True
        return opened, authentic

    def open_run(self, buffer: bytes, segment: int) -> list[bytes] | None:
        """The payloads of the run of datagrams in ``buffer`` (``segment`` bytes each, back to back, the last
        possibly shorter: what one read with receive offload brings) when they are what a bulk transfer's read
        mostly brings: DATA datagrams under the connection ID in use, carrying the counters that follow the
        highest one authenticated, in order, each authentic; None, having changed nothing, for anything else
        (then :meth:`open_many` opens them one by one). Each payload is what :meth:`open` gives for its datagram,
        in less work per datagram.

        The run is read apart in one call (connection IDs, protected fields, sealed bodies); its protected
        fields are unmasked and checked at once, as one integer, against the fields such a run carries, built
        from two constants of its length (:class:`_Run`): nothing is decrypted for a run that is not in order.
        """
        size = len(buffer)
        if segment <= 0 or segment >= size:
            segment = size
        count = -(-size // segment) if size else 0
        if not count:
            return []
        last = size - (count - 1) * segment
        cid = self.connection_id
        window = self._window
        first = window.highest + 1
        low = first & _LOW32
        if low + count > _WRAP or first + count > MAX_COUNTER or last < DATAGRAM_OVERHEAD:
            return None
        parts = _wire_run(segment, count, last)(buffer)
        if parts[0::3].count(cid) != count:
            return None
        bodies = parts[2::3]
        run = _run(count)
        masks = b"".join(run.masks(self._receive_mask(b"".join(map(_SAMPLE, bodies)))))
        unmasked = int.from_bytes(b"".join(parts[1::3]), "big") ^ int.from_bytes(masks, "big")
        if unmasked != ((_DATA_KIND << 32) | low) * run.step + run.ramp:
            return None
        head = (int.from_bytes(cid, "big") << (8 * _PROTECTED_LEN)) | (_DATA_KIND << 32) | low
        aads = run.aads((head * run.aad_step + run.aad_ramp).to_bytes(DATA_HEADER_LEN * count, "big"))
        try:
            opened = list(map(self._decrypt, self._nonces(first, count), bodies, aads))
        except InvalidTag:
            return None
        window.update_above(first, first + count - 1)
        self.newest_connection_id = cid
        self.confirmed = True
        return opened


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
    ``now`` is any clock, used consistently. Challenge data and sizes come from the session's ``entropy``.
    """

    __slots__ = (
        "_announced",
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
        "spare",
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
        self._last_challenge = _NEVER
        self._outgoing: list[tuple[bytes, tuple[str, int]]] = []
        #: a spare connection ID the client confirmed it holds: the session moves to it with the next path
        self.spare: bytes | None = None
        #: spares issued and not yet confirmed, with when they were last announced
        self._announced: dict[bytes, float] = {}

    def __repr__(self) -> str:
        return f"PeerPath(address={self.address!r}, candidate={self._candidate!r})"

    # --- connection ID rotation ---------------------------------------------------------------------------

    @property
    def needs_spare(self) -> bool:
        """No spare is issued: the server should :meth:`issue` one (a new one after each rotation)."""
        return self.spare is None and not self._announced

    def issue(self, connection_id: bytes) -> None:
        """A new spare connection ID for this session (minted by the server, none of any session's): the session
        opens datagrams under it from now on, and :meth:`announcements` tells the client of it."""
        self.session.add_connection_id(connection_id)
        self._announced[bytes(connection_id)] = _NEVER

    def announcements(self, now: float) -> list[tuple[bytes, tuple[str, int]]]:
        """The :class:`NewConnectionId` datagrams due (each spare every :data:`ANNOUNCE_INTERVAL` seconds until
        the client confirms it), with their destination."""
        out = []
        for cid, last in self._announced.items():
            if now - last >= ANNOUNCE_INTERVAL:
                self._announced[cid] = now
                out.append((self.session.seal_control(NewConnectionId(cid)), self.address))
        return out

    def control(self, message: ControlMessage | None) -> None:
        """A control message the client sent from the current address (the codec's batch path)."""
        if isinstance(message, ConnectionIdSeen) and self._announced.pop(message.data, None) is not None:
            self.spare = message.data

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

    def receive(self, datagram: bytes | memoryview, source: tuple[str, int], now: float) -> bytes | None:
        """The payload of an authentic, new DATA datagram of this session; None for anything else (a control
        datagram included, which is handled here)."""
        session = self.session
        if source == self.address:
            here = session.open(datagram)  # a control message from here has nothing to validate
            if isinstance(here, bytes):
                return here
            self.control(here)
            return None
        before = session._window.highest
        opened, authentic = session._open_many((datagram,))
        if not authentic:
            return None
        message = opened[0]
        if isinstance(message, bytes):
            self._from_elsewhere(source, len(datagram), session._window.highest > before, None, now)
            return message
        self.control(message)
        self._from_elsewhere(source, len(datagram), session._window.highest > before, message, now)
        return None

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
            self._last_challenge = _NEVER  # (now - CHALLENGE_INTERVAL could round to less than the interval)
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
        allowance = AMPLIFICATION_FACTOR * self._received - self._sent
        if newest and now - self._last_challenge >= CHALLENGE_INTERVAL and allowance >= MIN_CONTROL_DATAGRAM:
            entropy = self.session._entropy
            size = random_between(entropy, MIN_CONTROL_DATAGRAM, min(MAX_CONTROL_DATAGRAM, allowance))
            data = entropy(CHALLENGE_LEN)
            self._sent += size
            self._last_challenge = now
            self._challenges.append(data)
            del self._challenges[:-_CHALLENGES_KEPT]
            # the challenge goes under the ID the new path will use: nothing on it repeats the old path's
            sealed = self.session.seal_control(PathChallenge(data), size=size, connection_id=self.spare)
            self._outgoing.append((sealed, source))

    def _move(self, source: tuple[str, int]) -> None:
        if self.spare is not None and source != self.address:
            # the new path gets the spare ID: the client follows once it sees it (the old ID stays open for the
            # datagrams still on their way, until the next rotation)
            self.session.use_connection_id(self.spare)
            self.spare = None
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
    :attr:`established`, :meth:`seal` payloads and :meth:`receive` returns what the server's datagrams carry.

    ``connection_id`` is a random initial ID until the reply arrives, then the ID the server assigned.
    ``ciphers`` is the offer, best first. An authentic reply that chooses a cipher not offered ends the attempt:
    :attr:`failure` says why, nothing more is accepted, and the caller can stop waiting for a reply.
    ``entropy`` gives the random bytes (see the module's description).
    """

    __slots__ = (
        "_created",
        "_entropy",
        "_hs",
        "_init",
        "_initial_cid",
        "_offer",
        "_psk",
        "_reset_key",
        "_session",
        "failure",
        "reset",
    )

    def __init__(
        self,
        psk: bytes,
        *,
        now: float,
        ciphers: Sequence[Cipher] = DEFAULT_CIPHERS,
        entropy: Entropy = os.urandom,
    ) -> None:
        check_psk(psk)
        self._psk = bytes(psk)
        self._offer = check_ciphers(ciphers)
        self._entropy = entropy
        self._session: DatagramSession | None = None
        #: Why an authentic reply was refused (for the caller's error message); None otherwise.
        self.failure: str | None = None
        #: True once :meth:`receive` saw the server's stateless reset for this session (see :meth:`is_reset`).
        self.reset = False
        self._reset_key = reset_keys(self._psk)[0]
        self._start(now)

    def _start(self, now: float) -> None:
        check_wall_clock(now)
        entropy = self._entropy
        self._created = now
        self._initial_cid = entropy(CID_LEN)
        self._hs = Initiator(
            self._psk, prologue=DATAGRAM_PROLOGUE + self._initial_cid, ephemeral=entropy(DHLEN)
        )
        token = entropy(TOKEN_LEN)
        pad = entropy(random_between(entropy, *INIT_PADDING))
        message = self._hs.write_message1(encode_init_payload(now, token, self._offer, pad))
        self._init = write_handshake_datagram(
            self._psk, self._initial_cid, message, from_client=True, salt=entropy(SALT_LEN)
        )

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
        first attempt, the handshake starts over: a fresh ephemeral key, timestamp, token, salt and initial
        connection ID.

        (Re-encrypting a new timestamp under the same ephemeral key would reuse the message's key and nonce,
        which ChaCha20-Poly1305 forbids; that is why a retransmission is byte-identical or entirely new.)
        """
        if self._session is not None:
            raise SecurityError("the handshake is already complete")
        if now is not None and now - self._created >= RETRANSMIT_PERIOD:
            self._start(now)
        return self._init

    def receive(self, datagram: bytes | memoryview, now: float) -> bytes | ControlMessage | None:
        """A handshake reply -> None (and :attr:`established` becomes True); a DATA datagram -> its payload; a
        CONTROL datagram -> its message (answer a :class:`PathChallenge`); anything invalid, duplicated or
        unexpected -> None, silently.
        """
        session = self._session
        if session is not None:
            payload = session.open(datagram)
            if payload is None and self.is_reset(datagram):
                self.reset = True
            return payload
        if self.failure is not None:
            return None
        framed = read_handshake_datagram(self._psk, datagram, from_client=False)
        if framed is None or not hmac.compare_digest(framed[0], self._initial_cid):
            return None
        try:
            payload = self._hs.read_message2(framed[1])
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
        self._session = DatagramSession(payload[:CID_LEN], keys, cipher=cipher, entropy=self._entropy)
        return None

    def is_reset(self, datagram: bytes | memoryview) -> bool:
        """Whether ``datagram`` is the server's stateless reset for this session: the server lost it.

        Only a holder of the PSK can make one. Call it for a datagram the session did not open (a reset never
        opens); the caller should also check that it came from the server's address. The token is compared in
        constant time; the connection ID, public anyway, as plain bytes.
        """
        session = self._session
        if session is None or len(datagram) < MIN_RESET_DATAGRAM:
            return False
        cid = bytes(datagram[:CID_LEN])
        if cid not in session.connection_ids:  # every ID of the session has its own token
            return False
        return hmac.compare_digest(bytes(datagram[-RESET_TOKEN_LEN:]), reset_token(self._reset_key, cid))

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


class _UsersKeys:
    """A server's key set, and each key's stateless reset keys ``(token key, connection ID key)``
    (:func:`reset_keys`), derived once per key set: what :class:`DatagramServer` and :class:`StatelessReset`
    share. :attr:`keys` may be replaced at any time."""

    __slots__ = ("_keys", "_reset_keys")

    def __init__(self, keys: KeySet | bytes) -> None:
        if not isinstance(keys, KeySet):
            check_psk(keys)
        self.keys = KeySet.of(keys)

    @property
    def keys(self) -> KeySet:
        """The keys accepted from now on."""
        return self._keys

    @keys.setter
    def keys(self, keys: KeySet) -> None:
        self._keys = keys
        self._reset_keys = {entry: reset_keys(entry.key) for entry in keys}


class DatagramServer(_UsersKeys):
    """Answers valid INIT datagrams with a new session; anything else gets None (send nothing).

    ``keys`` are the keys it accepts (a :class:`~vtunnel.security.keys.KeySet`, or one key; :attr:`keys` may be
    replaced at any time, which affects handshakes from then on). An INIT names no user: each key unmasks its
    length (one BLAKE2s and 10 bytes of ChaCha20 per key), and only a key whose length matches the datagram's
    (the right one, and 1 in 65,536 of the others) is tried by Noise's first message; the session's
    :attr:`~DatagramSession.user` says whose key it was. So a stranger's datagram of an INIT's size costs
    O(keys), at most :data:`~vtunnel.security.keys.MAX_USERS`.

    ``server_id`` (0 to :data:`MAX_SERVER_ID` bytes) starts every connection ID this server assigns; random
    bytes and a check (see :func:`mint_connection_id`) under the user's connection ID key follow. It is readable
    by anyone (a load balancer routes on it); without one, connection IDs are random to anyone without the key.
    ``layout`` says the same and more (the worker's slot the random bytes steer to: :class:`ConnectionIdLayout`);
    it replaces ``server_id``.
    ``max_pending`` bounds the retransmission memory (oldest forgotten first). ``ciphers`` are the transport
    ciphers accepted, best first; an INIT offering none of them gets nothing. ``entropy`` gives the random bytes
    (ephemeral keys, salts, connection IDs, padding), and the sessions' own.
    """

    __slots__ = (
        "_accepted",
        "_entropy",
        "_layout",
        "_limiter",
        "_max_pending",
        "_pending",
        "_replay",
    )

    def __init__(
        self,
        keys: KeySet | bytes,
        *,
        replay: ReplayCache,
        limiter: HandshakeLimiter | None = None,
        server_id: bytes = b"",
        layout: ConnectionIdLayout | None = None,
        max_pending: int = 4096,
        ciphers: Sequence[Cipher] = DEFAULT_CIPHERS,
        entropy: Entropy = os.urandom,
    ) -> None:
        super().__init__(keys)
        self._accepted = check_ciphers(ciphers)
        self._layout = ConnectionIdLayout(server_id=bytes(server_id)) if layout is None else layout
        self._replay = replay
        self._limiter = limiter
        self._max_pending = max_pending
        self._entropy = entropy
        self._pending: dict[bytes, _Pending] = {}  # token -> handshake answered recently

    def _prune(self, now: float) -> None:
        pending = self._pending
        for token in [t for t, p in pending.items() if p.until <= now or p.session.confirmed]:
            del pending[token]
        while len(pending) >= self._max_pending:
            del pending[next(iter(pending))]

    def accept(
        self,
        datagram: bytes | memoryview,
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

        Cheapest first: a size out of range or a masked length that does not match (all but 1 in 65,536 of
        random datagrams) costs one hash and 10 bytes of keystream; only the rest is read as Noise message 1 (no
        Diffie-Hellman yet). The ``limiter`` is charged only for an authentic INIT with a fresh timestamp and a
        new token, right before the Diffie-Hellman it pays for: garbage, other keys' INITs, replays and stale
        INITs spend nothing, so a stranger who forges a client's source address cannot use up that client's
        handshakes.
        """
        n = len(datagram)
        if n < MIN_INIT_DATAGRAM or n > MAX_INIT_DATAGRAM:
            return None
        datagram = bytes(datagram)
        found = self._first_message(datagram)
        if found is None:
            return None
        entry, initial_cid, hs, payload = found
        check_wall_clock(now)
        try:
            init = decode_init_payload(payload)
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
        cid = self.free_connection_id(entry, in_use)
        if cid is None or not self._replay.check_and_remember(init.token, init.timestamp, now):
            return None
        entropy = self._entropy
        room = len(datagram) - MIN_REPLY_DATAGRAM
        pad = entropy(random_between(entropy, 0, min(REPLY_PADDING_MAX, room)))
        try:
            message2 = hs.write_message2(cid + bytes((cipher,)) + pad)
        except AuthenticationFailed:
            return None
        reply = write_handshake_datagram(
            entry.key, initial_cid, message2, from_client=False, salt=entropy(SALT_LEN)
        )
        keys = hs.keys
        assert keys is not None
        session = DatagramSession(cid, keys, cipher=cipher, entropy=entropy, user=entry)
        self._pending[init.token] = _Pending(
            datagram=datagram, session=session, reply=reply, source=source, until=now + RETRANSMIT_PERIOD
        )
        return session, reply

    def _first_message(self, datagram: bytes) -> tuple[UserKey, bytes, Responder, bytes] | None:
        """The user, initial CID, Noise state and first payload of an INIT that authenticates under one of the
        keys (tried in order, each only if the length it unmasks matches); None if none does."""
        for entry in self._keys:
            framed = read_handshake_datagram(entry.key, datagram, from_client=True)
            if framed is None:
                continue
            initial_cid, message1 = framed
            hs = Responder(
                entry.key, prologue=DATAGRAM_PROLOGUE + initial_cid, ephemeral=self._entropy(DHLEN)
            )
            try:
                return entry, initial_cid, hs, hs.read_message1(message1)
            except AuthenticationFailed:
                continue
        return None

    def free_connection_id(self, user: UserKey, in_use: Container[bytes]) -> bytes | None:
        """A new connection ID none of ``in_use`` (for a session, or a spare of one), minted under ``user``'s
        connection ID key; None after :data:`_CID_DRAWS` draws that all collided, or when ``user``'s key is no
        longer in the key set (its sessions are being cut)."""
        keys = self._reset_keys.get(user)
        if keys is None:
            return None
        cid_key = keys[1]
        for _ in range(_CID_DRAWS):
            cid = mint_connection_id(cid_key, layout=self._layout, entropy=self._entropy)
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


class StatelessReset(_UsersKeys):
    """The server's stateless resets: the answer to a datagram for a connection ID it does not know.

    Call :meth:`answer` only for datagrams whose first 8 bytes name no session this server holds (restarted,
    expired, closed) and that :meth:`DatagramServer.accept` did not take: never for a known connection ID. It
    returns None (send nothing) for a datagram of :data:`MIN_RESET_DATAGRAM` bytes or fewer (it can only be a
    reset itself, or garbage), a connection ID that no holder of one of ``keys`` minted (:func:`is_minted`, under
    each key's connection ID key in turn: a probe gets the silence it always got), or a source over its
    ``limiter`` budget. A reset is DATA-shaped: the connection ID, random bytes (where the protected header and
    ciphertext would be) and the token under the key that minted the connection ID; its length is random, at
    most :data:`MAX_RESET_DATAGRAM` and always smaller than the datagram it answers. ``entropy`` gives the
    random bytes and lengths. :attr:`keys` may be replaced at any time (a revoked user's sessions get no reset).

    ``now`` only feeds the limiter: any clock, used consistently.
    """

    __slots__ = ("_entropy", "_limiter")

    def __init__(
        self, keys: KeySet | bytes, *, limiter: ResetLimiter | None = None, entropy: Entropy = os.urandom
    ) -> None:
        super().__init__(keys)
        self._limiter = limiter
        self._entropy = entropy

    def __repr__(self) -> str:
        return "StatelessReset()"

    def _token_key(self, connection_id: bytes) -> bytes | None:
        """The token key of the key that minted ``connection_id`` (None: no key did)."""
        minted = (token for token, cid_key in self._reset_keys.values() if is_minted(cid_key, connection_id))
        return next(minted, None)

    def token(self, connection_id: bytes) -> bytes | None:
        """The reset token of ``connection_id`` (what a client checks the reset against), under the key that
        minted it; None if none of the keys did."""
        token_key = self._token_key(connection_id)
        return None if token_key is None else reset_token(token_key, connection_id)

    def answer(self, datagram: bytes | memoryview, source: tuple[str, int], now: float) -> bytes | None:
        """The reset for ``datagram`` (to send to ``source``), or None: send nothing."""
        n = len(datagram)
        if n <= MIN_RESET_DATAGRAM:
            return None
        cid = bytes(datagram[:CID_LEN])
        token_key = self._token_key(cid)
        if token_key is None:
            return None
        if self._limiter is not None and not self._limiter.allow(source[0], now):
            return None
        entropy = self._entropy
        size = random_between(entropy, MIN_RESET_DATAGRAM, min(n - 1, MAX_RESET_DATAGRAM))
        return cid + entropy(size - CID_LEN - RESET_TOKEN_LEN) + reset_token(token_key, cid)
