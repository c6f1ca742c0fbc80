"""One kcptun session, sans-IO: smux over (snappy over) KCP, in kcp-go datagrams (FEC, then the crypt header).

    send:     smux frames -> snappy chunks -> KCP stream -> FEC data + parity packets -> nonce|CRC32, cipher
    receive:  the same, backwards

Datagrams and ``now`` go in (:meth:`KcptunSession.receive_datagram`, :meth:`KcptunSession.handle_timer`);
datagrams (:meth:`KcptunSession.datagrams_to_send`), smux events and the next deadline come out. A datagram that
fails the CRC, is not a valid FEC packet or carries KCP segments of another conversation is dropped and
counted, as kcp-go does; a broken snappy or smux stream ends the session.

A client picks a random conversation id; a server learns it from the first datagram of an address
(:func:`first_conv`): kcp-go's listener starts a session for any datagram that carries KCP data of a new
address, and replaces an address's session when a datagram of another conversation comes with sequence
number 0 (a restarted client).
"""

from __future__ import annotations

import os
import struct
from typing import Final

from vtunnel.arq.fec import (
    FEC_OVERHEAD,
    TYPE_DATA,
    FECDecoder,
    FECEncoder,
    is_fec_packet,
    parse_fec_packet,
)
from vtunnel.arq.kcp_engine import KCPEngine
from vtunnel.arq.kcp_wire import HEADER_LEN, valid_datagram
from vtunnel.kcptun.config import KcptunConfig
from vtunnel.kcptun.crypt import Entropy, PacketCrypt
from vtunnel.kcptun.errors import CompressionError, CryptError, FECError
from vtunnel.kcptun.smux import Event, SessionClosed, SmuxSession
from vtunnel.kcptun.snappy import SnappyReader, SnappyWriter

__all__ = ["KcptunSession", "first_conv"]

_CONV_SN: Final = struct.Struct("<I8xI")  # a KCP segment's conv and sn
#: the most stream bytes taken from KCP in one read
_READ: Final = 1 << 20


def first_conv(crypt: PacketCrypt, datagram: bytes | memoryview) -> tuple[int, int] | None:
    """``(conv, sn)`` of the KCP data a datagram carries, or ``None`` (bad CRC, parity, too short)."""
    try:
        payload = crypt.open(datagram)
    except CryptError:
        return None
    if is_fec_packet(payload):
        if payload[4] != TYPE_DATA or len(payload) < FEC_OVERHEAD + HEADER_LEN:
            return None
        payload = payload[FEC_OVERHEAD:]
    elif len(payload) < HEADER_LEN:
        return None
    conv, sn = _CONV_SN.unpack_from(payload, 0)
    return int(conv), int(sn)


class KcptunSession:
    """A kcptun-compatible session over one UDP peer; the caller moves the datagrams and keeps the time."""

    __slots__ = (
        "_closed",
        "_crypt",
        "_decoder",
        "_encoder",
        "_engine",
        "_paused",
        "_reader",
        "_smux",
        "_writer",
        "config",
        "conv",
        "dropped",
    )

    def __init__(
        self,
        config: KcptunConfig,
        *,
        client: bool,
        conv: int,
        now: float,
        crypt: PacketCrypt | None = None,
    ) -> None:
        self.config = config
        self.conv = conv
        self._crypt = crypt if crypt is not None else config.packet_crypt()
        self._engine = KCPEngine(conv=conv, options=config.kcp_options(), mtu=config.engine_mtu, now=now)
        self._engine.whole_runs = False
        self._encoder = FECEncoder(config.datashard, config.parityshard) if config.fec else None
        self._decoder = FECDecoder(config.datashard, config.parityshard) if config.fec else None
        self._writer = None if config.nocomp else SnappyWriter()
        self._reader = None if config.nocomp else SnappyReader()
        self._smux = SmuxSession(client=client, config=config.smux_config(), now=now)
        self._closed: SessionClosed | None = None
        self._paused = False
        #: datagrams dropped: bad CRC, malformed FEC, foreign or malformed KCP
        self.dropped = 0

    @classmethod
    def client(
        cls,
        config: KcptunConfig,
        *,
        now: float,
        entropy: Entropy = os.urandom,
        crypt: PacketCrypt | None = None,
    ) -> KcptunSession:
        """A client session with a random conversation id (as kcp-go's dialer picks one)."""
        conv = int.from_bytes(entropy(4), "little")
        return cls(config, client=True, conv=conv, now=now, crypt=crypt or config.packet_crypt(entropy))

    # --- streams (smux) ----------------------------------------------------------------------------------

    @property
    def smux(self) -> SmuxSession:
        """The stream layer: ``open_stream``, ``send``, ``send_window``, ``end_stream``, ``acknowledge``."""
        return self._smux

    def open_stream(self) -> int:
        return self._smux.open_stream()

    def send(self, stream_id: int, data: bytes | memoryview) -> int:
        return self._smux.send(stream_id, data)

    def end_stream(self, stream_id: int) -> None:
        self._smux.end_stream(stream_id)

    def acknowledge(self, stream_id: int, count: int) -> None:
        self._smux.acknowledge(stream_id, count)

    def send_window(self, stream_id: int) -> int:
        return self._smux.send_window(stream_id)

    def writable(self) -> bool:
        """Whether KCP's send queue has room: a writer should wait (for ACKs) while it has none."""
        return self._closed is None and self._engine.writable()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def pause_reading(self) -> None:
        """Leave received stream bytes in KCP: its receive window fills and the peer stops sending (back-pressure
        for an owner whose streams buffer too much)."""
        self._paused = True

    def resume_reading(self, now: float) -> list[Event]:
        """Read KCP again: the events of what waited there (then call :meth:`datagrams_to_send`, which tells the
        peer the window reopened)."""
        if not self._paused:
            return []
        self._paused = False
        return [] if self._closed is not None else self._read_streams(now)

    @property
    def reading_paused(self) -> bool:
        return self._paused

    @property
    def fec_recovered(self) -> int:
        return 0 if self._decoder is None else self._decoder.recovered

    # --- datagrams ---------------------------------------------------------------------------------------

    def receive_datagram(self, datagram: bytes | memoryview, now: float) -> list[Event]:
        if self._closed is not None:
            return []
        try:
            payload = self._crypt.open(datagram)
            kcp_datagrams = self._kcp_datagrams(payload)
        except (CryptError, FECError):
            self.dropped += 1
            return []
        engine = self._engine
        for kcp in kcp_datagrams:
            if len(kcp) >= HEADER_LEN and valid_datagram(kcp, self.conv):
                engine.receive_datagram(kcp, now)
            else:
                self.dropped += 1
        return self._read_streams(now)

    def _kcp_datagrams(self, payload: bytes) -> list[bytes]:
        if not is_fec_packet(payload):
            return [payload]
        packet = parse_fec_packet(payload)
        if self._decoder is not None:
            return self._decoder.decode(packet)
        return [packet.body[2:]] if packet.is_data else []

    def _read_streams(self, now: float) -> list[Event]:
        if self._paused:
            return []
        engine = self._engine
        chunks = []
        while chunk := engine.receive(_READ):
            chunks.append(chunk)
        if not chunks:
            return []
        data = b"".join(chunks)
        if self._reader is not None:
            try:
                data = self._reader.feed(data)
            except CompressionError as exc:
                return self._close(f"bad snappy stream: {exc}")
        events = self._smux.receive_data(data, now)
        if events and isinstance(events[-1], SessionClosed):
            self._shut(events[-1])
        return events

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Move the queued smux frames into KCP, flush it, and seal what it sends."""
        if self._closed is not None:
            return []
        engine = self._engine
        data = self._smux.data_to_send()
        if data:
            if self._writer is not None:
                data = self._writer.compress(data)
            engine.send(data)
        engine.flush(now)
        out: list[bytes] = []
        seal = self._crypt.seal
        encoder = self._encoder
        for kcp in engine.datagrams_to_send():
            if encoder is None:
                out.append(seal(kcp))
            else:
                out.extend(map(seal, encoder.encode(kcp)))
        return out

    # --- time --------------------------------------------------------------------------------------------

    def next_deadline(self, now: float) -> float | None:
        if self._closed is not None:
            return None
        deadlines = [
            d for d in (self._engine.next_deadline(now), self._smux.next_deadline()) if d is not None
        ]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> list[Event]:
        """Run KCP's timer (retransmissions) and smux's keepalive; then call :meth:`datagrams_to_send`."""
        if self._closed is not None:
            return []
        self._engine.handle_timer(now)
        if self._engine.dead:
            return self._close("the KCP link is dead (a segment was never acknowledged)")
        events = self._smux.handle_timer(now)
        if events and isinstance(events[-1], SessionClosed):
            self._shut(events[-1])
        return events

    def close(self) -> None:
        self._close("closed")

    def _close(self, reason: str) -> list[Event]:
        if self._closed is not None:
            return []
        event = SessionClosed(reason=reason)
        self._smux.close(reason)
        self._shut(event)
        return [event]

    def _shut(self, event: SessionClosed) -> None:
        self._closed = event
        self._engine.close()
