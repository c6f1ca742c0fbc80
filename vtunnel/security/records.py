"""Sans-IO secure channel for ordered byte streams (TCP, TLS, any reliable transport).

To an observer without the key a secured stream is random bytes from its first byte to its last: no clear
length, type or key. Wire format (see ``docs/security.md``)::

    client -> server   salt (16) | ChaCha20[hs key c2s](u16 length | Noise message 1)
    server -> client   salt (16) | ChaCha20[hs key s2c](u16 length | Noise message 2)
    both ways          u16 length XOR mask(n) | AEAD(plaintext) under the chosen cipher,
                                                nonce = record counter n, ad = the 2 length bytes as sent

Handshake frames. Each end draws a random 16-byte salt per message; the frame after it is XORed with the
ChaCha20 keystream (nonce 0) under ``BLAKE2s(key=PSK, person=direction label, data=salt)``, so the length, the
ephemeral key (an X25519 key is not uniform: its top bit is always 0) and everything else read as random. Noise
message 1 carries 16..512 random bytes of padding and message 2 up to 256 (never more than keeps it no larger
than message 1), so the sizes are not fixed either. A frame length outside the accepted range fails at once; a
wrong key or any tampering fails Noise's authentication.

Records. A record's length is masked with ``mask(n)``: bytes ``2n`` and ``2n + 1`` (big endian) of a ChaCha20
keystream under the sender's *length key*, which the handshake derives next to the transport keys
(:meth:`~vtunnel.security.noise.TransportKeys.derive`), one per direction. The keystream is computed 2048
masks at a time (chunk ``i``: nonce = 4 zero bytes, ``i`` as u64 little endian, 4 zero bytes), so a record
costs two integer operations more and no cipher call of its own. The masked length bytes are the record's
associated data: a flipped length bit fails that record's tag (or, if it asks for more bytes than follow and
the connection then stalls, leaves an incomplete record that :attr:`incomplete_record` reports and the I/O
layer bounds in time); a length outside 16..16400 fails at once. A record's plaintext is 1 to 16384 bytes; a
record with an empty plaintext means "the sender has finished sending" (an authenticated end of stream, so a
connection cut by a third party is told apart from a clean close).

Passthrough records (lite-tls, ``docs/security.md``)::

    u16 (0x8000 | (9 + 5k + 16)) XOR mask(n) | AEAD_n(tunnel frame header (9) | k TLS record headers (5 each)) + tag
                                             | body_1 | ... | body_k

carry one tunnel DATA frame flagged PASSTHROUGH whose payload is ``k`` whole TLS application-data records (``17 03
03``, lengths ``L_i``; ``k`` is 1, or up to :data:`MAX_RUN_RECORDS` with the lite-tls-runs extension, together at
most :data:`MAX_RUN_BYTES` when ``k`` > 1): only the frame header and the record headers are sealed, the bodies
(the user's own TLS ciphertext) follow in the clear, one after the other. With ``k`` = 1 it is the record of
peers without runs. The top bit of the masked length tells the kinds apart (a sealed record's length is below
2^15); its low bits give ``k``.
A sender makes them only after :meth:`_SecureStream.enable_passthrough` (the bytes it sends are then tunnel
frames); a receiver always accepts them and hands the frame on whole, so the plaintext stream is the same
whichever kind carried it. A flipped body byte reaches only that frame's payload (the user's TLS then fails that
connection); any change to the sealed part or the length fails the tag, as for a sealed record.

Both classes take and return bytes only. ``now`` is wall-clock seconds (``time.time()``): the client's
timestamp is compared with the server's clock. ``entropy`` is where their random bytes come from
(``os.urandom``; a seeded generator makes a run reproducible in tests). Any failure raises
:class:`AuthenticationFailed`; the object is then dead and the caller must send nothing more to that peer.
"""

from __future__ import annotations

import os
import struct
import sys
from array import array
from collections.abc import Sequence
from itertools import pairwise

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import CipherContext

from .ciphers import DEFAULT_CIPHERS, Cipher, check_ciphers, choose, decode_choice, make_aead, nonce_function
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
    keystream,
    random_between,
    salted_keystream,
)
from .keys import KeySet, UserKey
from .noise import DHLEN, TAGLEN, Initiator, Responder, TransportKeys, check_psk
from .replay import HandshakeLimiter, ReplayCache

__all__ = [
    "HANDSHAKE_FRAME_OVERHEAD",
    "LENGTH_KEY_LABEL",
    "MAX_HANDSHAKE_LEN",
    "MAX_RECORD_PLAINTEXT",
    "RECORD_OVERHEAD",
    "STREAM_PROLOGUE",
    "Entropy",
    "SecureStreamClient",
    "SecureStreamServer",
    "read_handshake_frame",
    "write_handshake_frame",
]

#: v3: handshake frames and record lengths are masked (nothing in clear). v2 added the cipher offer and choice.
#: Peers of different versions never complete a handshake: the server stays silent and the client times out.
#: v4: passthrough records (lite-tls).
STREAM_PROLOGUE = b"vtunnel stream v4"
MAX_RECORD_PLAINTEXT = 16384
_LEN = struct.Struct(">H")
RECORD_OVERHEAD = _LEN.size + TAGLEN  # 18 bytes per record
MAX_NONCE = 2**64 - 1  # reserved by Noise
#: The largest work buffer (bytes) a channel keeps between calls, per direction.
WORK_BUFFER_MAX = 1 << 20

#: Random padding in the first message (bytes of payload after timestamp and token).
INIT_PADDING = (16, 512)
#: Random padding in the reply, at most; never more than keeps the reply no larger than the first message.
REPLY_PADDING_MAX = 256
MIN_INIT_LEN = NOISE_OVERHEAD + MIN_INIT_PAYLOAD_LEN
MAX_HANDSHAKE_LEN = NOISE_OVERHEAD + INIT_PAYLOAD_LEN + 1024
MIN_REPLY_LEN = NOISE_OVERHEAD + 1  # the chosen cipher's code

#: What a handshake frame adds to its Noise message: the salt and the masked length.
HANDSHAKE_FRAME_OVERHEAD = SALT_LEN + _LEN.size
#: BLAKE2s personalisations (8 bytes) of the two directions' handshake frame keys.
_CLIENT_FRAMES = b"vts3 c2s"
_SERVER_FRAMES = b"vts3 s2c"
#: The label of the records' length keys (:meth:`TransportKeys.derive`).
LENGTH_KEY_LABEL = b"vtunnel stream v3 record lengths"
_MASKS_PER_CHUNK = 2048
_MASK_ZEROS = bytes(2 * _MASKS_PER_CHUNK)
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"
#: the masked length of a passthrough record: the kind bit and its sealed part's size (the tunnel frame's header,
#: one 5-byte TLS record header per record of the run, and the tag)
_PT_KIND = 0x8000
_PT_SEALED = 14
PASSTHROUGH_LENGTH = _PT_KIND | (_PT_SEALED + TAGLEN)  # a run of one record (the only kind before runs)
_PT_HEAD = 2 + _PT_SEALED + TAGLEN  # the bytes before the body of a passthrough record of one TLS record
_TLS_HEADER = 5
#: the most TLS records one passthrough record carries, and the largest run (bytes of the frame's payload) it
#: accepts beyond one record (vtunnel.protocol.frames.MAX_RUN_RECORDS and MAX_PASSTHROUGH_RUN)
MAX_RUN_RECORDS = 256
MAX_RUN_BYTES = 128 * 1024
#: a tunnel DATA frame's type and the PASSTHROUGH flag (vtunnel.protocol.frames; the layers share no code)
_DATA_TYPE = 0x0
_PASSTHROUGH_FLAG = 0x10
_FRAME_HEADER = 9
#: the largest TLS record body (2^14 + 2048)
_MAX_TLS_BODY = 2**14 + 2048


def _run_count(length: int) -> int:
    """The TLS records of the passthrough record whose (unmasked) length is ``length``: 0 if it is not one."""
    sealed = (length & 0x7FFF) - TAGLEN - _FRAME_HEADER
    if not length & _PT_KIND or sealed <= 0 or sealed % _TLS_HEADER:
        return 0
    count = sealed // _TLS_HEADER
    return count if count <= MAX_RUN_RECORDS else 0


def _frame_length(view: memoryview, pos: int) -> int:
    return (view[pos] << 16) | (view[pos + 1] << 8) | view[pos + 2]


def _tls_run(view: memoryview, pos: int, end: int) -> list[int]:
    """Where each body starts if ``view[pos:end]`` is whole TLS application-data records (``17 03 03``), at most
    :data:`MAX_RUN_RECORDS` of them and, beyond one, :data:`MAX_RUN_BYTES` together; else an empty list."""
    bodies: list[int] = []
    if end - pos > MAX_RUN_BYTES and end - pos > _TLS_HEADER + _MAX_TLS_BODY:
        return bodies
    while pos + _TLS_HEADER <= end:
        if view[pos] != 0x17 or view[pos + 1] != 3 or view[pos + 2] != 3:
            return []
        stop = pos + _TLS_HEADER + ((view[pos + 3] << 8) | view[pos + 4])
        if stop - pos - _TLS_HEADER > _MAX_TLS_BODY:
            return []
        bodies.append(pos + _TLS_HEADER)
        pos = stop
    if pos != end or not bodies or len(bodies) > MAX_RUN_RECORDS:
        return []
    if len(bodies) > 1 and end - bodies[0] + _TLS_HEADER > MAX_RUN_BYTES:
        return []
    return bodies


def _run_pieces(
    pieces: list[bytes | memoryview], view: memoryview, start: int, head: bytes, sizes: list[int]
) -> None:
    """Append the frame of the passthrough record at ``view[start:]`` (sealed part ``head``, bodies ``sizes``
    long) to ``pieces``: the frame header, then each TLS record header and its body (a view of ``view``)."""
    pieces.append(head[:_FRAME_HEADER])
    src = start + 2 + len(head) + TAGLEN
    h = _FRAME_HEADER
    for size in sizes:
        pieces.append(head[h : h + _TLS_HEADER])
        pieces.append(view[src : src + size])
        h += _TLS_HEADER
        src += size


def _buffer(size: int) -> bytearray:
    return bytearray(size)


def write_handshake_frame(psk: bytes, message: bytes, *, from_client: bool, salt: bytes) -> bytes:
    """The wire form of a Noise handshake message: ``salt | masked(u16 length | message)``."""
    if len(salt) != SALT_LEN:
        raise SecurityError("a handshake frame's salt is 16 bytes")
    mask = salted_keystream(psk, _CLIENT_FRAMES if from_client else _SERVER_FRAMES, salt)
    return salt + mask.update(_LEN.pack(len(message)) + message)


class _FrameReader:
    """Reads one masked handshake frame off the front of a buffer, keeping its keystream across calls."""

    __slots__ = ("_high", "_length", "_low", "_mask", "_person", "_psk")

    def __init__(self, psk: bytes, *, from_client: bool, low: int, high: int) -> None:
        self._psk = psk
        self._person = _CLIENT_FRAMES if from_client else _SERVER_FRAMES
        self._low = low
        self._high = high
        self._mask: CipherContext | None = None
        self._length = -1

    def take(self, buf: bytearray) -> bytes | None:
        """The frame's Noise message (and ``buf`` loses the frame), or None while it is incomplete."""
        if self._mask is None:
            if len(buf) < HANDSHAKE_FRAME_OVERHEAD:
                return None
            self._mask = salted_keystream(self._psk, self._person, buf[:SALT_LEN])
            (length,) = _LEN.unpack(self._mask.update(bytes(buf[SALT_LEN:HANDSHAKE_FRAME_OVERHEAD])))
            if not self._low <= length <= self._high:
                raise AuthenticationFailed("handshake message length out of range")
            self._length = length
        end = HANDSHAKE_FRAME_OVERHEAD + self._length
        if len(buf) < end:
            return None
        message = self._mask.update(bytes(buf[HANDSHAKE_FRAME_OVERHEAD:end]))
        del buf[:end]
        return message


def read_handshake_frame(psk: bytes, wire: bytes, *, from_client: bool) -> bytes:
    """The Noise message of a whole handshake frame at the start of ``wire`` (what follows it is ignored)."""
    reader = _FrameReader(psk, from_client=from_client, low=NOISE_OVERHEAD, high=0xFFFF)
    message = reader.take(bytearray(wire))
    if message is None:
        raise AuthenticationFailed("incomplete handshake frame")
    return message


class _LengthMasks:
    """The masks of one direction's record lengths: ``mask(n)`` is the keystream's bytes ``2n, 2n + 1``.

    The masks of 2048 records come from one ChaCha20 call (chunk ``n // 2048``); the current chunk is kept as
    an array of 16-bit values (4 KiB; a tuple of Python ints would hold ~70 KiB per direction and connection).
    """

    __slots__ = ("_key", "base", "masks")

    def __init__(self, key: bytes) -> None:
        self._key = key
        self.base = -_MASKS_PER_CHUNK  # the counter of ``masks[0]``
        self.masks: array[int] = array("H")

    def load(self, n: int) -> None:
        """Make ``masks`` the chunk holding counter ``n``."""
        chunk = n // _MASKS_PER_CHUNK
        nonce = bytes(4) + chunk.to_bytes(8, "little") + bytes(4)
        masks = array("H", keystream(self._key, nonce).update(_MASK_ZEROS))
        if _LITTLE_ENDIAN_HOST:  # the masks are the keystream's bytes read as big-endian 16-bit values
            masks.byteswap()
        self.masks = masks
        self.base = chunk * _MASKS_PER_CHUNK


class _Records:
    """Both directions of the record layer once the keys exist.

    Noise's transport cipher (the negotiated AEAD; nonce = 32 zero bits then the record counter as 64 bits,
    little endian for ChaCha20-Poly1305 and big endian for AES-256-GCM, as Noise has it) applied straight into
    two work buffers that live as long as the channel: allocating and zeroing a fresh buffer of a few hundred
    KiB costs more than encrypting it. Each call hands out one ``bytes`` copy of its result. A work buffer grows
    to the largest call up to :data:`WORK_BUFFER_MAX` and is kept; a larger call uses a temporary one. Record
    lengths are masked with :class:`_LengthMasks` of each direction.
    """

    __slots__ = (
        "_in",
        "_in_masks",
        "_in_n",
        "_nonce",
        "_open_work",
        "_out",
        "_out_masks",
        "_out_n",
        "_pt_opened",
        "_seal_work",
        "cipher",
        "eof_received",
        "eof_sent",
        "frame_head",
        "frame_skip",
        "passthrough",
    )

    def __init__(self, keys: TransportKeys, cipher: Cipher) -> None:
        self.cipher = cipher
        self._out = make_aead(cipher, keys.send)
        self._in = make_aead(cipher, keys.receive)
        send_lengths, receive_lengths = keys.derive(LENGTH_KEY_LABEL)
        self._out_masks = _LengthMasks(send_lengths)
        self._in_masks = _LengthMasks(receive_lengths)
        self._nonce = nonce_function(cipher)
        self._out_n = 0
        self._in_n = 0
        self._seal_work = bytearray()
        self._open_work = bytearray()
        self.eof_sent = False
        self.eof_received = False
        #: sending passthrough records (the plaintext is tunnel frames); where the frame stream stands: bytes of
        #: the current frame still to come, or the first bytes of a frame header
        self.passthrough = False
        #: the last sealed part opened: (its counter, the part, its records' body lengths)
        self._pt_opened: tuple[int, bytes, list[int]] | None = None
        self.frame_skip = 0
        self.frame_head = b""

    def _reserve(self, count: int) -> int:
        """Take ``count`` nonces for sending; the first one's counter."""
        n = self._out_n
        if n + count > MAX_NONCE:
            raise SecurityError("the cipher's nonce space is exhausted; start a new connection")
        self._out_n = n + count
        return n

    def seal(self, data: bytes | bytearray | memoryview) -> bytes:
        """The records carrying ``data`` (at most 16384 bytes each), as wire bytes."""
        if self.eof_sent:
            raise SecurityError("send() after send_eof()")
        size = len(data)
        count = -(-size // MAX_RECORD_PLAINTEXT)
        total = size + count * RECORD_OVERHEAD
        n = self._reserve(count)
        buf = self._seal_work
        if len(buf) < total:
            buf = _buffer(total)
            if total <= WORK_BUFFER_MAX:
                self._seal_work = buf
        encrypt_into = self._out.encrypt_into
        nonce = self._nonce
        lengths = self._out_masks
        masks = lengths.masks
        base = lengths.base
        with memoryview(buf) as out, memoryview(data) as src:
            pos = 0
            for start in range(0, size, MAX_RECORD_PLAINTEXT):
                chunk = src[start : start + MAX_RECORD_PLAINTEXT]
                length = len(chunk) + TAGLEN
                if n - base >= _MASKS_PER_CHUNK:
                    lengths.load(n)
                    masks = lengths.masks
                    base = lengths.base
                wire_length = length ^ masks[n - base]
                body = pos + 2
                buf[pos] = wire_length >> 8
                buf[pos + 1] = wire_length & 0xFF
                encrypt_into(nonce(n), chunk, out[pos:body], out[body : body + length])
                n += 1
                pos = body + length
            return bytes(out[:pos])

    def seal_frames(self, data: bytes) -> list[bytes | memoryview]:
        """``data``, a run of tunnel frames, as records: each DATA frame flagged PASSTHROUGH whose payload is whole
        TLS application-data records within the caps (and which lies whole in ``data``) as a passthrough record
        (its sealed part, then each body as a view of ``data``), the bytes between them as sealed records."""
        if self.eof_sent:
            raise SecurityError("send() after send_eof()")
        view = memoryview(data)
        size = len(view)
        pos = 0
        if self.frame_head:  # a header split by the previous call: that frame is sealed
            head = self.frame_head + bytes(view[: _FRAME_HEADER - len(self.frame_head)])
            if len(head) < _FRAME_HEADER:
                self.frame_head = head
                return [self.seal(data)]
            pos = _FRAME_HEADER + int.from_bytes(head[:3], "big") - len(self.frame_head)
            self.frame_head = b""
        else:
            pos = self.frame_skip
        pieces: list[bytes | memoryview] = []
        run = 0
        while pos + _FRAME_HEADER <= size:
            length = (view[pos] << 16) | (view[pos + 1] << 8) | view[pos + 2]
            end = pos + _FRAME_HEADER + length
            if view[pos + 4] == _PASSTHROUGH_FLAG and view[pos + 3] == _DATA_TYPE and end <= size:
                bodies = _tls_run(view, pos + _FRAME_HEADER, end)
                if bodies:
                    if pos > run:
                        pieces.append(self.seal(view[run:pos]))
                    self._seal_run(view, pos, bodies, pieces)
                    run = end
            pos = end
        if pos >= size:
            self.frame_skip = pos - size
        else:  # a header cut short: its frame's length comes with the next call
            self.frame_skip = 0
            self.frame_head = bytes(view[pos:])
        if run < size:
            pieces.append(self.seal(view[run:]))
        return pieces

    def _seal_run(
        self, view: memoryview, pos: int, bodies: list[int], pieces: list[bytes | memoryview]
    ) -> None:
        """Append the passthrough record of the PASSTHROUGH frame at ``view[pos:]``, whose payload is TLS
        records with the body starts ``bodies``: its sealed part (the frame header and every record header),
        then each body as a view (never copied)."""
        n = self._reserve(1)
        lengths = self._out_masks
        if n - lengths.base >= _MASKS_PER_CHUNK:
            lengths.load(n)
        count = len(bodies)
        sealed_size = _FRAME_HEADER + _TLS_HEADER * count
        header = _LEN.pack((_PT_KIND | (sealed_size + TAGLEN)) ^ lengths.masks[n - lengths.base])
        if count == 1:
            head = view[pos : pos + _PT_SEALED]
            pieces.append(header + self._out.encrypt(self._nonce(n), head, header))
            pieces.append(view[bodies[0] : pos + _FRAME_HEADER + _frame_length(view, pos)])
            return
        end = pos + _FRAME_HEADER + _frame_length(view, pos)
        heads = [view[pos : pos + _FRAME_HEADER]]
        heads.extend(view[start - _TLS_HEADER : start] for start in bodies)
        pieces.append(header + self._out.encrypt(self._nonce(n), b"".join(heads), header))
        for start, stop in pairwise(bodies):
            pieces.append(view[start : stop - _TLS_HEADER])
        pieces.append(view[bodies[-1] : end])

    def _open_passthrough(
        self, buf: bytes | bytearray | memoryview, pos: int, n: int, count: int
    ) -> tuple[bytes, list[int]]:
        """The sealed part of the passthrough record of ``count`` TLS records at ``buf[pos:]`` (all of it is
        there), counter ``n``: the frame header and the TLS record headers, checked, and the bodies' lengths."""
        opened = self._pt_opened
        if opened is not None and opened[0] == n:  # (its body was incomplete last time)
            return opened[1], opened[2]
        sealed_end = pos + 2 + _FRAME_HEADER + _TLS_HEADER * count + TAGLEN
        try:
            head = self._in.decrypt(
                self._nonce(n), bytes(buf[pos + 2 : sealed_end]), bytes(buf[pos : pos + 2])
            )
        except InvalidTag:
            raise AuthenticationFailed("record failed authentication") from None
        length = int.from_bytes(head[:3], "big")
        sizes = [(head[at + 3] << 8) | head[at + 4] for at in range(_FRAME_HEADER, len(head), _TLS_HEADER)]
        if (
            head[3] != _DATA_TYPE
            or head[4] != _PASSTHROUGH_FLAG
            or length != sum(sizes) + _TLS_HEADER * count
            or (count > 1 and length > MAX_RUN_BYTES)
            or max(sizes) > _MAX_TLS_BODY
            or any(
                head[at : at + 3] != b"\x17\x03\x03" for at in range(_FRAME_HEADER, len(head), _TLS_HEADER)
            )
        ):
            raise AuthenticationFailed(
                "a passthrough record that is not a run of whole TLS application-data records"
            )
        self._pt_opened = (n, head, sizes)
        return head, sizes

    def seal_eof(self) -> bytes:
        """The end-of-stream record (``b""`` if it was already made)."""
        if self.eof_sent:
            return b""
        n = self._reserve(1)
        lengths = self._out_masks
        if n - lengths.base >= _MASKS_PER_CHUNK:
            lengths.load(n)
        header = _LEN.pack(TAGLEN ^ lengths.masks[n - lengths.base])
        record = header + self._out.encrypt(self._nonce(n), b"", header)
        self.eof_sent = True
        return record

    def record_size(self, buf: bytes | bytearray | memoryview) -> int:
        """The wire size of the next record to open, whose first two bytes (at least) start ``buf``; raises
        :class:`AuthenticationFailed` for a length out of range. For a passthrough record whose sealed part is
        not all in ``buf`` yet, the size of that part (call again once it is)."""
        n = self._in_n
        lengths = self._in_masks
        if n - lengths.base >= _MASKS_PER_CHUNK:
            lengths.load(n)
        length = ((buf[0] << 8) | buf[1]) ^ lengths.masks[n - lengths.base]
        if length & _PT_KIND:
            count = _run_count(length)
            if not count:
                raise AuthenticationFailed("record length out of range")
            sealed_end = 2 + (length & 0x7FFF)
            if len(buf) < sealed_end:
                return sealed_end
            _, sizes = self._open_passthrough(buf, 0, n, count)
            return sealed_end + sum(sizes)
        if length < TAGLEN or length > MAX_RECORD_PLAINTEXT + TAGLEN:
            raise AuthenticationFailed("record length out of range")
        return 2 + length

    def _scan(
        self,
        buf: bytes | bytearray | memoryview,
        m: int,
        ended: bool,
        heads: dict[int, tuple[bytes, list[int]]],
    ) -> tuple[list[int], int, int, bool]:
        """Find the complete records at the front of ``buf``, the first with counter ``m``, checking every
        length: ``(spans, plaintext bytes, next counter, an end-of-stream record seen)``; ``spans`` holds where
        each record starts, then where the last one ends (empty: none is complete). A passthrough record's
        sealed part is opened here (its body's length is in it): ``heads`` gets it, by the record's start."""
        spans: list[int] = []
        pos = 0
        end = len(buf)
        plain_size = 0
        lengths = self._in_masks
        masks = lengths.masks
        base = lengths.base
        while end - pos >= 2:
            if m - base >= _MASKS_PER_CHUNK:
                lengths.load(m)
                masks = lengths.masks
                base = lengths.base
            length = ((buf[pos] << 8) | buf[pos + 1]) ^ masks[m - base]
            if length & _PT_KIND:
                count = _run_count(length)
                if not count:
                    raise AuthenticationFailed("record length out of range")
                sealed_end = 2 + (length & 0x7FFF)
                if end - pos < sealed_end:
                    break
                opened = self._open_passthrough(buf, pos, m, count)
                body = sum(opened[1])
                if end - pos - sealed_end < body:
                    break
                if self.eof_received or ended:
                    raise AuthenticationFailed("record after the end of stream")
                heads[pos] = opened
                spans.append(pos)
                plain_size += sealed_end - 2 - TAGLEN + body
                pos += sealed_end + body
                m += 1
                continue
            if length < TAGLEN or length > MAX_RECORD_PLAINTEXT + TAGLEN:
                raise AuthenticationFailed("record length out of range")
            if end - pos - 2 < length:
                break
            if self.eof_received or ended:
                raise AuthenticationFailed("record after the end of stream")
            ended = length == TAGLEN
            spans.append(pos)
            plain_size += length - TAGLEN
            pos += 2 + length
            m += 1
        if spans:
            spans.append(pos)
        return spans, plain_size, m, ended

    def open_all(
        self, buf: bytes | bytearray | memoryview, head: bytes | bytearray | None = None
    ) -> tuple[bytes, int]:
        """Decrypt every complete record at the front of ``buf``: ``(plaintext, bytes of buf used)``; a partial
        record at the end is left for the caller to keep. ``head``, when given, is one whole record that comes
        before ``buf`` (one that arrived split, which the caller completed): the plaintext is both, in order,
        in one copy.
        """
        # Find the complete records first, checking every length, then decrypt them into the work buffer.
        n = self._in_n
        parts: list[tuple[bytes | bytearray | memoryview, list[int], dict[int, tuple[bytes, list[int]]]]] = []
        plain_size = 0
        ended = False
        m = n
        if head is not None:
            head_heads: dict[int, tuple[bytes, list[int]]] = {}
            spans, size, m, ended = self._scan(head, m, ended, head_heads)
            if len(spans) != 2 or spans[1] != len(head):
                raise SecurityError("head must be exactly one whole record")
            parts.append((head, spans, head_heads))
            plain_size += size
        heads: dict[int, tuple[bytes, list[int]]] = {}
        spans, size, m, ended = self._scan(buf, m, ended, heads)
        used = spans[-1] if spans else 0
        if spans:
            parts.append((buf, spans, heads))
            plain_size += size
        if not parts:
            return b"", 0
        if m > MAX_NONCE:
            raise SecurityError("the cipher's nonce space is exhausted; start a new connection")
        plain = self._open_work
        if len(plain) < plain_size:
            plain = _buffer(plain_size)
            if plain_size <= WORK_BUFFER_MAX:
                self._open_work = plain
        decrypt_into = self._in.decrypt_into
        nonce = self._nonce
        at = 0
        # with passthrough records the result is joined from pieces: the sealed records' plaintext (decrypted
        # into the work buffer) and each passthrough record's headers and bodies, the bodies as views of the
        # input, so that they are copied once (into the result), not into the work buffer first
        pieces: list[bytes | memoryview] | None = None
        flushed = 0  # the work buffer's bytes before this are in ``pieces``
        out = memoryview(plain)
        for part, bounds, passthrough in parts:
            view = memoryview(part)
            for start, stop in pairwise(bounds):
                if passthrough:
                    opened = passthrough.get(start)
                    if opened is not None:  # opened by the scan
                        if pieces is None:
                            pieces = []
                        if at > flushed:
                            pieces.append(out[flushed:at])
                            flushed = at
                        _run_pieces(pieces, view, start, *opened)
                        n += 1
                        continue
                body = start + 2
                size = stop - body - TAGLEN
                try:
                    decrypt_into(nonce(n), view[body:stop], view[start:body], out[at : at + size])
                except InvalidTag:
                    raise AuthenticationFailed("record failed authentication") from None
                n += 1
                at += size
        if pieces is None:
            result = bytes(out[:at])
        else:
            if at > flushed:
                pieces.append(out[flushed:at])
            result = b"".join(pieces)
        self._in_n = n
        if ended:
            self.eof_received = True
        return result, used


class _SecureStream:
    __slots__ = ("_entropy", "_failed", "_frames", "_inbuf", "_out", "_pending", "_psk", "_records")

    def __init__(self, psk: bytes, entropy: Entropy, frames: _FrameReader | None) -> None:
        self._psk = psk
        self._entropy = entropy
        self._frames = frames
        self._inbuf = bytearray()
        self._out: list[bytes | memoryview] = []  # wire bytes to send, in order
        self._pending = bytearray()  # plaintext queued before the keys exist
        self._records: _Records | None = None
        self._failed = False

    @property
    def handshake_complete(self) -> bool:
        """True once the keys exist (records can flow)."""
        return self._records is not None

    @property
    def cipher(self) -> Cipher | None:
        """The transport cipher the handshake chose (None before it completed)."""
        return self._records.cipher if self._records is not None else None

    @property
    def eof_sent(self) -> bool:
        """The authenticated end of stream was queued by :meth:`send_eof`."""
        return self._records is not None and self._records.eof_sent

    @property
    def eof_received(self) -> bool:
        """The peer sent its authenticated end of stream: no more data will come."""
        return self._records is not None and self._records.eof_received

    @property
    def incomplete_record(self) -> bool:
        """Part of a record arrived and the rest has not: the caller bounds how long that may last (a length
        that a forger grew, then a stalled connection, would otherwise wait for ever)."""
        return self._records is not None and bool(self._inbuf)

    def enable_passthrough(self) -> None:
        """From the next :meth:`send` on, ``data`` is a stream of tunnel frames (the next byte starts a frame):
        PASSTHROUGH DATA frames that carry whole TLS records (one, or a run) go as passthrough records
        (lite-tls). Only after the handshake."""
        if self._records is None:
            raise SecurityError("enable_passthrough() before the handshake completed")
        self._records.passthrough = True

    def send(self, data: bytes) -> None:
        """Queue ``data`` as records (held until the handshake completes). Empty ``data`` queues nothing."""
        if self._failed:
            raise SecurityError("the secure channel has failed")
        records = self._records
        if records is None:
            self._pending += data
        elif data:
            if records.passthrough:
                self._out.extend(records.seal_frames(data))
            else:
                self._out.append(records.seal(data))

    def send_eof(self) -> None:
        """Queue the authenticated end-of-stream record (after any pending data)."""
        if self._failed:
            raise SecurityError("the secure channel has failed")
        if self._records is None:
            raise SecurityError("send_eof() before the handshake completed")
        record = self._records.seal_eof()
        if record:
            self._out.append(record)

    def data_to_send(self) -> bytes:
        """Bytes to write to the transport (drains the buffer; ``b""`` when nothing)."""
        out = self._out
        if not out:
            return b""
        self._out = []
        return bytes(out[0]) if len(out) == 1 else b"".join(out)

    def pieces_to_send(self) -> list[bytes | memoryview]:
        """:meth:`data_to_send` as the pieces, in order, not joined (for a scatter-gather write): sealed records
        and the bodies of passthrough records as views of what :meth:`send` was given (``bytes``: they never
        change). Drains the buffer; ``[]`` when nothing."""
        out = self._out
        if not out:
            return []
        self._out = []
        return out

    def _fail(self, exc: AuthenticationFailed) -> AuthenticationFailed:
        self._failed = True
        self._inbuf = bytearray()  # rebind, not resize: a view of the old buffer may still be alive
        self._out = []
        self._pending.clear()
        self._records = None
        return exc

    def _established(self, keys: TransportKeys, cipher: Cipher) -> None:
        records = _Records(keys, cipher)
        self._records = records
        if self._pending:
            self._out.append(records.seal(self._pending))
            self._pending.clear()

    def _send_frame(self, message: bytes, *, from_client: bool) -> None:
        salt = self._entropy(SALT_LEN)
        self._out.append(write_handshake_frame(self._psk, message, from_client=from_client, salt=salt))

    def _handshake_step(self, now: float) -> bool:
        raise NotImplementedError

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> bytes:
        """Feed bytes from the transport; return the application bytes they complete.

        Raises :class:`AuthenticationFailed` on any failure (then and on every later call).
        """
        if self._failed:
            raise AuthenticationFailed("the secure channel has already failed")
        try:
            records = self._records
            if records is None:
                self._inbuf += data
                if not self._handshake_step(now):
                    return b""
                records = self._records
                assert records is not None
                plain, used = records.open_all(self._inbuf)
                del self._inbuf[:used]
                return plain
            # whole records straight from ``data``; only a partial one is kept, and completed from the head of
            # the next ``data`` (copying no more of it than that record needs)
            with memoryview(data) as view:
                inbuf = self._inbuf
                head: bytearray | None = None
                taken = 0
                if inbuf:
                    if len(inbuf) < 2:
                        taken = min(2 - len(inbuf), len(view))
                        inbuf += view[:taken]
                        if len(inbuf) < 2:
                            return b""
                    while True:  # (twice for a passthrough record: its sealed part says how long it is)
                        missing = records.record_size(inbuf) - len(inbuf)
                        if missing <= 0:
                            break
                        more = min(missing, len(view) - taken)
                        inbuf += view[taken : taken + more]
                        taken += more
                        if more < missing:
                            return b""
                    head = inbuf
                    self._inbuf = bytearray()  # rebind, not resize: ``head`` is opened below
                plain, used = records.open_all(view[taken:], head)
                if taken + used < len(view):
                    self._inbuf = bytearray(view[taken + used :])
                return plain
        except AuthenticationFailed as exc:
            raise self._fail(exc) from None


class SecureStreamClient(_SecureStream):
    """The initiator. Message 1 is queued at construction: call :meth:`data_to_send` and write it.

    ``now`` is wall-clock seconds (``time.time()``); it becomes the first message's timestamp. Data given to
    :meth:`send` before the reply arrived is held and sent, encrypted, right after it. ``ciphers`` is the offer,
    best first; a reply choosing anything else fails the handshake. ``entropy`` gives the random bytes (the
    ephemeral key, the token, the salts, the padding and its length).
    """

    __slots__ = ("_hs", "_offer")

    def __init__(
        self,
        psk: bytes,
        *,
        now: float,
        ciphers: Sequence[Cipher] = DEFAULT_CIPHERS,
        entropy: Entropy = os.urandom,
    ) -> None:
        check_psk(psk)
        reader = _FrameReader(
            bytes(psk), from_client=False, low=MIN_REPLY_LEN, high=MIN_REPLY_LEN + REPLY_PADDING_MAX
        )
        super().__init__(bytes(psk), entropy, reader)
        check_wall_clock(now)
        self._offer = check_ciphers(ciphers)
        self._hs = Initiator(psk, prologue=STREAM_PROLOGUE, ephemeral=entropy(DHLEN))
        token = entropy(TOKEN_LEN)
        pad = entropy(random_between(entropy, *INIT_PADDING))
        message = self._hs.write_message1(encode_init_payload(now, token, self._offer, pad))
        self._send_frame(message, from_client=True)

    def _handshake_step(self, now: float) -> bool:
        assert self._frames is not None  # (the client's: it knows its one key)
        frame = self._frames.take(self._inbuf)
        if frame is None:
            return False
        payload = self._hs.read_message2(frame)
        if not payload:
            raise AuthenticationFailed("handshake reply names no cipher")
        cipher = decode_choice(payload[0], self._offer)
        keys = self._hs.keys
        assert keys is not None
        self._established(keys, cipher)
        return True


class SecureStreamServer(_SecureStream):
    """The responder. Feed the client's bytes to :meth:`receive_data`; once the first message authenticates
    under one of ``keys`` (a :class:`~vtunnel.security.keys.KeySet`, or one key) with a timestamp within the
    replay window and a token never seen, the reply is queued, :attr:`user` names whose key it was, and the
    channel is up.

    Which key: the first message names no user. Each key unmasks the frame's length from the salt (one BLAKE2s
    and 2 bytes of ChaCha20 per key); the keys whose length is in range (the right one and about 1 in 64 of the
    others) are tried, shortest frame first, as their frames complete, by Noise's first message (hashes and one
    AEAD attempt, no Diffie-Hellman): only the right key authenticates. So a first message costs O(keys), at most
    :data:`~vtunnel.security.keys.MAX_USERS`.

    ``ciphers`` are the transport ciphers this server accepts, best first; the reply names the one chosen
    from the client's offer (:func:`~vtunnel.security.ciphers.choose`). A client offering none of them fails
    like any other. The reply is never larger than the client's first message. Nothing is ever queued for a
    peer that fails. ``entropy`` gives the random bytes (the ephemeral key, the salt, the padding).
    """

    __slots__ = ("_accepted", "_candidates", "_keys", "_limiter", "_replay", "_source", "user")

    def __init__(
        self,
        keys: KeySet | bytes,
        *,
        replay: ReplayCache,
        ciphers: Sequence[Cipher] = DEFAULT_CIPHERS,
        limiter: HandshakeLimiter | None = None,
        source: str = "",
        entropy: Entropy = os.urandom,
    ) -> None:
        if not isinstance(keys, KeySet):
            check_psk(keys)
        super().__init__(b"", entropy, None)
        self._keys = KeySet.of(keys)
        self._replay = replay
        self._accepted = check_ciphers(ciphers)
        self._limiter = limiter
        self._source = source
        #: frames that may be the first message, by the key that unmasked a length in range: (end, user, mask)
        self._candidates: list[tuple[int, UserKey, CipherContext]] | None = None
        #: whose key the client's first message authenticated under (None until then)
        self.user: UserKey | None = None

    def _first_message(self) -> tuple[UserKey, Responder, bytes, int] | None:
        """The user, Noise state, payload and length of Noise message 1 once one key's frame completes and authenticates; None
        while frames are incomplete. Raises :class:`AuthenticationFailed` when no key can be the one."""
        buf = self._inbuf
        candidates = self._candidates
        if candidates is None:
            if len(buf) < HANDSHAKE_FRAME_OVERHEAD:
                return None
            salt, head = bytes(buf[:SALT_LEN]), bytes(buf[SALT_LEN:HANDSHAKE_FRAME_OVERHEAD])
            candidates = []
            for entry in self._keys:
                mask = salted_keystream(entry.key, _CLIENT_FRAMES, salt)
                (length,) = _LEN.unpack(mask.update(head))
                if MIN_INIT_LEN <= length <= MAX_HANDSHAKE_LEN:
                    candidates.append((HANDSHAKE_FRAME_OVERHEAD + length, entry, mask))
            if not candidates:
                raise AuthenticationFailed("handshake message length out of range")
            candidates.sort(key=lambda candidate: candidate[0])
            self._candidates = candidates
        while candidates and candidates[0][0] <= len(buf):
            end, entry, mask = candidates.pop(0)
            hs = Responder(entry.key, prologue=STREAM_PROLOGUE, ephemeral=self._entropy(DHLEN))
            try:
                payload = hs.read_message1(mask.update(bytes(buf[HANDSHAKE_FRAME_OVERHEAD:end])))
            except AuthenticationFailed:
                if candidates:
                    continue
                raise  # the last key that could be the one: its failure is the message's
            del buf[:end]
            return entry, hs, payload, end - HANDSHAKE_FRAME_OVERHEAD
        return None

    def _handshake_step(self, now: float) -> bool:
        found = self._first_message()
        if found is None:
            return False
        entry, hs, payload, message1_len = found
        check_wall_clock(now)
        init = decode_init_payload(payload)
        cipher = choose(init.ciphers, self._accepted)
        if cipher is None:
            raise AuthenticationFailed("the client offers no cipher this server accepts")
        if not self._replay.check_and_remember(init.token, init.timestamp, now):
            raise AuthenticationFailed("first handshake message replayed or outside the time window")
        # Only now, with the first message authenticated (no DH so far), is the source's budget charged: the
        # reply's DH is the work it protects, and a peer without the key can never spend it for others.
        if self._limiter is not None and not self._limiter.allow(self._source, now):
            raise AuthenticationFailed("too many handshakes from this source")
        self._psk = entry.key
        self.user = entry
        room = message1_len - MIN_REPLY_LEN
        pad = self._entropy(random_between(self._entropy, 0, min(REPLY_PADDING_MAX, room)))
        self._send_frame(hs.write_message2(bytes((cipher,)) + pad), from_client=False)
        keys = hs.keys
        assert keys is not None
        self._established(keys, cipher)
        return True
