"""Sans-IO secure channel for ordered byte streams (TCP, TLS, any reliable transport).

Wire format (every integer big endian), see ``docs/security.md``::

    client -> server   u16 length | Noise message 1   (e, payload: timestamp, token, cipher offer, padding; tag)
    server -> client   u16 length | Noise message 2   (e, payload: chosen cipher, padding; tag)
    both ways          u16 length | AEAD(plaintext) under the chosen cipher, nonce = implicit counter,
                                    ad = the length

A record's plaintext is 1 to 16384 bytes; a record with an empty plaintext means "the sender has finished
sending" (an authenticated end of stream, so a connection cut by a third party is told apart from a clean
close).

Both classes take and return bytes only. ``now`` is wall-clock seconds (``time.time()``): the client's
timestamp is compared with the server's clock. Any failure raises :class:`AuthenticationFailed`; the object is
then dead and the caller must send nothing more to that peer.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

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
from .noise import TAGLEN, Initiator, Responder, check_psk
from .replay import HandshakeLimiter, ReplayCache

__all__ = [
    "MAX_HANDSHAKE_LEN",
    "MAX_RECORD_PLAINTEXT",
    "RECORD_OVERHEAD",
    "STREAM_PROLOGUE",
    "SecureStreamClient",
    "SecureStreamServer",
]

#: v2: the first message offers transport ciphers and the reply names the chosen one. A v1 peer fails the
#: other's first message (different prologue): the server stays silent and the client times out.
STREAM_PROLOGUE = b"vtunnel stream v2"
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


def _buffer(size: int) -> bytearray:
    return bytearray(size)


class _Records:
    """Both directions of the record layer once the keys exist.

    Noise's transport cipher (the negotiated AEAD; nonce = 32 zero bits then the record counter as 64 bits,
    little endian for ChaCha20-Poly1305 and big endian for AES-256-GCM, as Noise has it) applied straight into
    two work buffers that live as long as the channel: allocating and zeroing a fresh buffer of a few hundred
    KiB costs more than encrypting it. Each call hands out one ``bytes`` copy of its result. A work buffer grows
    to the largest call up to :data:`WORK_BUFFER_MAX` and is kept; a larger call uses a temporary one.
    """

    __slots__ = (
        "_in",
        "_in_n",
        "_nonce",
        "_open_work",
        "_out",
        "_out_n",
        "_seal_work",
        "cipher",
        "eof_received",
        "eof_sent",
    )

    def __init__(self, send_key: bytes, receive_key: bytes, cipher: Cipher) -> None:
        self.cipher = cipher
        self._out = make_aead(cipher, send_key)
        self._in = make_aead(cipher, receive_key)
        self._nonce = nonce_function(cipher)
        self._out_n = 0
        self._in_n = 0
        self._seal_work = bytearray()
        self._open_work = bytearray()
        self.eof_sent = False
        self.eof_received = False

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
        with memoryview(buf) as out, memoryview(data) as src:
            pos = 0
            for start in range(0, size, MAX_RECORD_PLAINTEXT):
                chunk = src[start : start + MAX_RECORD_PLAINTEXT]
                length = len(chunk) + TAGLEN
                body = pos + 2
                buf[pos] = length >> 8
                buf[pos + 1] = length & 0xFF
                encrypt_into(nonce(n), chunk, out[pos:body], out[body : body + length])
                n += 1
                pos = body + length
            return bytes(out[:pos])

    def seal_eof(self) -> bytes:
        """The end-of-stream record (``b""`` if it was already made)."""
        if self.eof_sent:
            return b""
        header = _LEN.pack(TAGLEN)
        record = header + self._out.encrypt(self._nonce(self._reserve(1)), b"", header)
        self.eof_sent = True
        return record

    def open_all(self, buf: bytes | bytearray) -> tuple[bytes, int]:
        """Decrypt every complete record at the front of ``buf``: ``(plaintext, bytes used)``; a partial
        record at the end is left for the caller to keep.
        """
        # Find the complete records first, checking every length, then decrypt them into the work buffer.
        spans: list[int] = []
        pos = 0
        end = len(buf)
        plain_size = 0
        eof_at = -1
        while end - pos >= 2:
            length = (buf[pos] << 8) | buf[pos + 1]
            if length < TAGLEN or length > MAX_RECORD_PLAINTEXT + TAGLEN:
                raise AuthenticationFailed("record length out of range")
            if end - pos - 2 < length:
                break
            if self.eof_received or eof_at >= 0:
                raise AuthenticationFailed("record after the end of stream")
            if length == TAGLEN:
                eof_at = len(spans)
            spans.append(pos)
            plain_size += length - TAGLEN
            pos += 2 + length
        if not spans:
            return b"", 0
        n = self._in_n
        if n + len(spans) > MAX_NONCE:
            raise SecurityError("the cipher's nonce space is exhausted; start a new connection")
        plain = self._open_work
        if len(plain) < plain_size:
            plain = _buffer(plain_size)
            if plain_size <= WORK_BUFFER_MAX:
                self._open_work = plain
        decrypt_into = self._in.decrypt_into
        nonce = self._nonce
        at = 0
        with memoryview(buf) as view, memoryview(plain) as out:
            for start in spans:
                length = (buf[start] << 8) | buf[start + 1]
                body = start + 2
                size = length - TAGLEN
                try:
                    decrypt_into(nonce(n), view[body : body + length], view[start:body], out[at : at + size])
                except InvalidTag:
                    raise AuthenticationFailed("record failed authentication") from None
                n += 1
                at += size
            result = bytes(out[:at])
        self._in_n = n
        if eof_at >= 0:
            self.eof_received = True
        return result, pos


class _SecureStream:
    __slots__ = ("_failed", "_inbuf", "_out", "_pending", "_records")

    def __init__(self) -> None:
        self._inbuf = bytearray()
        self._out: list[bytes | bytearray] = []  # wire bytes to send, in order
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

    def send(self, data: bytes) -> None:
        """Queue ``data`` as records (held until the handshake completes). Empty ``data`` queues nothing."""
        if self._failed:
            raise SecurityError("the secure channel has failed")
        if self._records is None:
            self._pending += data
        elif data:
            self._out.append(self._records.seal(data))

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

    def _fail(self, exc: AuthenticationFailed) -> AuthenticationFailed:
        self._failed = True
        self._inbuf = bytearray()  # rebind, not resize: a view of the old buffer may still be alive
        self._out = []
        self._pending.clear()
        self._records = None
        return exc

    def _established(self, records: _Records) -> None:
        self._records = records
        if self._pending:
            self._out.append(records.seal(self._pending))
            self._pending.clear()

    def _take_frame(self, low: int, high: int) -> bytes | None:
        buf = self._inbuf
        if len(buf) < 2:
            return None
        (length,) = _LEN.unpack_from(buf)
        if not low <= length <= high:
            raise AuthenticationFailed("handshake message length out of range")
        if len(buf) < 2 + length:
            return None
        frame = bytes(buf[2 : 2 + length])
        del buf[: 2 + length]
        return frame

    def _handshake_step(self, now: float) -> bool:
        raise NotImplementedError

    def receive_data(self, data: bytes, now: float) -> bytes:
        """Feed bytes from the transport; return the application bytes they complete.

        Raises :class:`AuthenticationFailed` on any failure (then and on every later call).
        """
        if self._failed:
            raise AuthenticationFailed("the secure channel has already failed")
        try:
            records = self._records
            if records is not None and not self._inbuf:
                # the usual case: whole records straight from ``data``; only a partial one is kept
                plain, used = records.open_all(data)
                if used < len(data):
                    self._inbuf += memoryview(data)[used:]
                return plain
            self._inbuf += data
            if records is None:
                if not self._handshake_step(now):
                    return b""
                records = self._records
                assert records is not None
            plain, used = records.open_all(self._inbuf)
            del self._inbuf[:used]
            return plain
        except AuthenticationFailed as exc:
            raise self._fail(exc) from None


class SecureStreamClient(_SecureStream):
    """The initiator. Message 1 is queued at construction: call :meth:`data_to_send` and write it.

    ``now`` is wall-clock seconds (``time.time()``); it becomes the first message's timestamp. Data given to
    :meth:`send` before the reply arrived is held and sent, encrypted, right after it. ``ciphers`` is the offer,
    best first; a reply choosing anything else fails the handshake.
    """

    __slots__ = ("_hs", "_offer")

    def __init__(self, psk: bytes, *, now: float, ciphers: Sequence[Cipher] = DEFAULT_CIPHERS) -> None:
        super().__init__()
        check_wall_clock(now)
        self._offer = check_ciphers(ciphers)
        self._hs = Initiator(psk, prologue=STREAM_PROLOGUE)
        token = padding(TOKEN_LEN)
        payload = encode_init_payload(now, token, self._offer, random_between(*INIT_PADDING))
        message = self._hs.write_message1(payload)
        self._out.append(_LEN.pack(len(message)) + message)

    def _handshake_step(self, now: float) -> bool:
        frame = self._take_frame(MIN_REPLY_LEN, MIN_REPLY_LEN + REPLY_PADDING_MAX)
        if frame is None:
            return False
        payload = self._hs.read_message2(frame)
        if not payload:
            raise AuthenticationFailed("handshake reply names no cipher")
        cipher = decode_choice(payload[0], self._offer)
        keys = self._hs.keys
        assert keys is not None
        self._established(_Records(keys.send, keys.receive, cipher))
        return True


class SecureStreamServer(_SecureStream):
    """The responder. Feed the client's bytes to :meth:`receive_data`; once the first message authenticates
    (right key, timestamp within the replay window, token never seen) the reply is queued and the channel is
    up.

    ``ciphers`` are the transport ciphers this server accepts, best first; the reply names the one chosen
    from the client's offer (:func:`~vtunnel.security.ciphers.choose`). A client offering none of them fails
    like any other. The reply is never larger than the client's first message. Nothing is ever queued for a
    peer that fails.
    """

    __slots__ = ("_accepted", "_limiter", "_psk", "_replay", "_source")

    def __init__(
        self,
        psk: bytes,
        *,
        replay: ReplayCache,
        ciphers: Sequence[Cipher] = DEFAULT_CIPHERS,
        limiter: HandshakeLimiter | None = None,
        source: str = "",
    ) -> None:
        super().__init__()
        check_psk(psk)
        self._psk = bytes(psk)
        self._replay = replay
        self._accepted = check_ciphers(ciphers)
        self._limiter = limiter
        self._source = source

    def _handshake_step(self, now: float) -> bool:
        frame = self._take_frame(MIN_INIT_LEN, MAX_HANDSHAKE_LEN)
        if frame is None:
            return False
        check_wall_clock(now)
        hs = Responder(self._psk, prologue=STREAM_PROLOGUE)
        init = decode_init_payload(hs.read_message1(frame))
        cipher = choose(init.ciphers, self._accepted)
        if cipher is None:
            raise AuthenticationFailed("the client offers no cipher this server accepts")
        if not self._replay.check_and_remember(init.token, init.timestamp, now):
            raise AuthenticationFailed("first handshake message replayed or outside the time window")
        # Only now, with the first message authenticated (no DH so far), is the source's budget charged: the
        # reply's DH is the work it protects, and a peer without the key can never spend it for others.
        if self._limiter is not None and not self._limiter.allow(self._source, now):
            raise AuthenticationFailed("too many handshakes from this source")
        room = len(frame) - MIN_REPLY_LEN
        pad = padding(random_between(0, min(REPLY_PADDING_MAX, room)))
        reply = hs.write_message2(bytes((cipher,)) + pad)
        self._out.append(_LEN.pack(len(reply)) + reply)
        keys = hs.keys
        assert keys is not None
        self._established(_Records(keys.send, keys.receive, cipher))
        return True
