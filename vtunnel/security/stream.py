"""Sans-IO secure channel for ordered byte streams (TCP, TLS, any reliable transport).

Wire format (every integer big endian), see ``docs/security.md``::

    client -> server   u16 length | Noise message 1   (e, payload: timestamp, token, padding; tag)
    server -> client   u16 length | Noise message 2   (e, payload: padding; tag)
    both ways          u16 length | ChaCha20-Poly1305(plaintext), nonce = implicit counter, ad = the length

A record's plaintext is 1 to 16384 bytes; a record with an empty plaintext means "the sender has finished
sending" (an authenticated end of stream, so a connection cut by a third party is told apart from a clean
close).

Both classes take and return bytes only. ``now`` is wall-clock seconds (``time.time()``): the client's
timestamp is compared with the server's clock. Any failure raises :class:`AuthenticationFailed`; the object is
then dead and the caller must send nothing more to that peer.
"""

from __future__ import annotations

import struct

from .errors import AuthenticationFailed, SecurityError
from .handshake import (
    INIT_PAYLOAD_LEN,
    NOISE_OVERHEAD,
    TOKEN_LEN,
    check_wall_clock,
    decode_init_payload,
    encode_init_payload,
    padding,
    random_between,
)
from .noise import TAGLEN, CipherState, Initiator, Responder, check_psk
from .replay import ReplayCache

__all__ = [
    "MAX_HANDSHAKE_LEN",
    "MAX_RECORD_PLAINTEXT",
    "RECORD_OVERHEAD",
    "STREAM_PROLOGUE",
    "SecureStreamClient",
    "SecureStreamServer",
]

STREAM_PROLOGUE = b"vtunnel stream v1"
MAX_RECORD_PLAINTEXT = 16384
_LEN = struct.Struct(">H")
RECORD_OVERHEAD = _LEN.size + TAGLEN  # 18 bytes per record

#: Random padding in the first message (bytes of payload after timestamp and token).
INIT_PADDING = (16, 512)
#: Random padding in the reply, at most; never more than keeps the reply no larger than the first message.
REPLY_PADDING_MAX = 256
MIN_INIT_LEN = NOISE_OVERHEAD + INIT_PAYLOAD_LEN
MAX_HANDSHAKE_LEN = NOISE_OVERHEAD + INIT_PAYLOAD_LEN + 1024
MIN_REPLY_LEN = NOISE_OVERHEAD


class _Records:
    """Both directions of the record layer once the keys exist."""

    __slots__ = ("_in", "_out", "eof_received", "eof_sent")

    def __init__(self, send_key: bytes, receive_key: bytes) -> None:
        self._out = CipherState(send_key)
        self._in = CipherState(receive_key)
        self.eof_sent = False
        self.eof_received = False

    def seal(self, data: bytes | bytearray | memoryview, out: bytearray) -> None:
        if self.eof_sent:
            raise SecurityError("send() after send_eof()")
        view = memoryview(data)
        for start in range(0, len(view), MAX_RECORD_PLAINTEXT):
            chunk = view[start : start + MAX_RECORD_PLAINTEXT]
            header = _LEN.pack(len(chunk) + TAGLEN)
            out += header
            out += self._out.encrypt(bytes(chunk), header)

    def seal_eof(self, out: bytearray) -> None:
        if not self.eof_sent:
            header = _LEN.pack(TAGLEN)
            out += header
            out += self._out.encrypt(b"", header)
            self.eof_sent = True

    def open_all(self, buf: bytearray) -> bytes:
        """Decrypt every complete record at the front of ``buf`` (removing them); keep a partial one."""
        plain: list[bytes] = []
        pos = 0
        end = len(buf)
        with memoryview(buf) as view:
            while end - pos >= 2:
                length = (view[pos] << 8) | view[pos + 1]
                if length < TAGLEN or length > MAX_RECORD_PLAINTEXT + TAGLEN:
                    raise AuthenticationFailed("record length out of range")
                if end - pos - 2 < length:
                    break
                if self.eof_received:
                    raise AuthenticationFailed("record after the end of stream")
                data = self._in.decrypt(view[pos + 2 : pos + 2 + length], view[pos : pos + 2])
                pos += 2 + length
                if data:
                    plain.append(data)
                else:
                    self.eof_received = True
        del buf[:pos]
        return plain[0] if len(plain) == 1 else b"".join(plain)


class _SecureStream:
    __slots__ = ("_failed", "_inbuf", "_outbuf", "_pending", "_records")

    def __init__(self) -> None:
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._pending = bytearray()  # plaintext queued before the keys exist
        self._records: _Records | None = None
        self._failed = False

    @property
    def handshake_complete(self) -> bool:
        """True once the keys exist (records can flow)."""
        return self._records is not None

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
            self._records.seal(data, self._outbuf)

    def send_eof(self) -> None:
        """Queue the authenticated end-of-stream record (after any pending data)."""
        if self._failed:
            raise SecurityError("the secure channel has failed")
        if self._records is None:
            raise SecurityError("send_eof() before the handshake completed")
        self._records.seal_eof(self._outbuf)

    def data_to_send(self) -> bytes:
        """Bytes to write to the transport (drains the buffer; ``b""`` when nothing)."""
        out = bytes(self._outbuf)
        self._outbuf.clear()
        return out

    def _fail(self, exc: AuthenticationFailed) -> AuthenticationFailed:
        self._failed = True
        self._inbuf = bytearray()  # rebind, not resize: a view of the old buffer may still be alive
        self._outbuf.clear()
        self._pending.clear()
        self._records = None
        return exc

    def _established(self, records: _Records) -> None:
        self._records = records
        if self._pending:
            records.seal(self._pending, self._outbuf)
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
        self._inbuf += data
        try:
            if self._records is None and not self._handshake_step(now):
                return b""
            assert self._records is not None
            return self._records.open_all(self._inbuf)
        except AuthenticationFailed as exc:
            raise self._fail(exc) from None


class SecureStreamClient(_SecureStream):
    """The initiator. Message 1 is queued at construction: call :meth:`data_to_send` and write it.

    ``now`` is wall-clock seconds (``time.time()``); it becomes the first message's timestamp. Data given to
    :meth:`send` before the reply arrived is held and sent, encrypted, right after it.
    """

    __slots__ = ("_hs",)

    def __init__(self, psk: bytes, *, now: float) -> None:
        super().__init__()
        check_wall_clock(now)
        self._hs = Initiator(psk, prologue=STREAM_PROLOGUE)
        token = padding(TOKEN_LEN)
        payload = encode_init_payload(now, token, random_between(*INIT_PADDING))
        message = self._hs.write_message1(payload)
        self._outbuf += _LEN.pack(len(message)) + message

    def _handshake_step(self, now: float) -> bool:
        frame = self._take_frame(MIN_REPLY_LEN, MIN_REPLY_LEN + REPLY_PADDING_MAX)
        if frame is None:
            return False
        self._hs.read_message2(frame)
        keys = self._hs.keys
        assert keys is not None
        self._established(_Records(keys.send, keys.receive))
        return True


class SecureStreamServer(_SecureStream):
    """The responder. Feed the client's bytes to :meth:`receive_data`; once the first message authenticates
    (right key, timestamp within the replay window, token never seen) the reply is queued and the channel is
    up.

    The reply is never larger than the client's first message. Nothing is ever queued for a peer that fails.
    """

    __slots__ = ("_psk", "_replay")

    def __init__(self, psk: bytes, *, replay: ReplayCache) -> None:
        super().__init__()
        check_psk(psk)
        self._psk = bytes(psk)
        self._replay = replay

    def _handshake_step(self, now: float) -> bool:
        frame = self._take_frame(MIN_INIT_LEN, MAX_HANDSHAKE_LEN)
        if frame is None:
            return False
        check_wall_clock(now)
        hs = Responder(self._psk, prologue=STREAM_PROLOGUE)
        init = decode_init_payload(hs.read_message1(frame))
        if not self._replay.check_and_remember(init.token, init.timestamp, now):
            raise AuthenticationFailed("first handshake message replayed or outside the time window")
        room = len(frame) - MIN_REPLY_LEN
        reply = hs.write_message2(padding(random_between(0, min(REPLY_PADDING_MAX, room))))
        self._outbuf += _LEN.pack(len(reply)) + reply
        keys = hs.keys
        assert keys is not None
        self._established(_Records(keys.send, keys.receive))
        return True
