"""Forward error correction on ``kcp://`` (``fec=D/P``): kcp-go's Reed-Solomon packets (:mod:`vtunnel.arq.fec`)
between a KCP session and its datagram codec.

Every datagram the session's KCP emits becomes an FEC data packet (``seqid | 0xf1 | size | KCP``), and after each
``D`` of them ``P`` parity packets follow; the codec below sees FEC packets as it saw KCP datagrams, so sealed,
each FEC packet is sealed on its own (the FEC header is inside the seal) and parity is authenticated like data.
The receiving link hands a data packet's KCP datagram to KCP at once, and rebuilds the data packets of a group
that are still missing once any ``D`` of its packets are in; a rebuilt datagram is vetted like any other before
KCP sees it.

Both ends must use the same ``fec``. A listener starts no session from the other kind of first datagram (FEC
packets without ``fec``, bare KCP with it) and logs why; the client then hears nothing and its link fails by the
dead-link timeout. With both on but different ``D/P``, the first packet out of place for this end's layout (data
where it expects parity, or parity where it expects data) stops rebuilding for the session (logged): data and
ACKs go on as without FEC.

Without a key the listener keys sessions by the conv inside each data packet; a parity packet carries none, so
it goes to the session whose peer is at its source address (:class:`FECPlainListenerCodec`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Final

import structlog

from vtunnel.arq.fec import (
    FEC_HEADER_SIZE,
    FEC_OVERHEAD,
    TYPE_DATA,
    TYPE_PARITY,
    FECDecoder,
    FECEncoder,
    parse_fec_packet,
)
from vtunnel.arq.kcp_wire import HEADER_LEN, NewestMarks, is_new_session, valid_datagram
from vtunnel.io.datagrams import Address
from vtunnel.transports.kcp.codec import Datagram, RoutedLink, Transmit, take_each
from vtunnel.transports.kcp.link import KCPLink
from vtunnel.transports.kcp.plain import KeylessListenerCodec, PlainKey, kcp_key

__all__ = [
    "FECLink",
    "FECMarks",
    "FECPlainListenerCodec",
    "fec_kind",
    "fec_transmitter",
    "opens_fec_session",
]

log = structlog.get_logger("vtunnel.transports.kcp")

_FLAG_SIZE: Final = struct.Struct("<HH")  # an FEC packet's flag and (data) size, after its seqid
_CONV: Final = struct.Struct("<I")


def fec_kind(datagram: Datagram, offset: int = 0) -> int:
    """:data:`TYPE_DATA` or :data:`TYPE_PARITY` for an FEC packet at ``offset`` (a data packet's ``size`` must
    match its length), else 0."""
    if len(datagram) - offset < FEC_OVERHEAD:
        return 0
    flag, size = _FLAG_SIZE.unpack_from(datagram, offset + 4)
    if flag == TYPE_DATA:
        return TYPE_DATA if size == len(datagram) - offset - FEC_HEADER_SIZE else 0
    return TYPE_PARITY if flag == TYPE_PARITY else 0


def opens_fec_session(datagram: Datagram) -> bool:
    """Whether an FEC packet may start a session: a data packet whose KCP datagram would
    (:func:`~vtunnel.arq.kcp_wire.is_new_session`)."""
    return fec_kind(datagram) == TYPE_DATA and is_new_session(memoryview(datagram)[FEC_OVERHEAD:])


def fec_transmitter(transmit: Transmit, shards: tuple[int, int]) -> Transmit:
    """A session's output through an FEC encoder of ``shards``: each KCP datagram as a data packet, and a group's
    parity packets after its last one."""
    encode = FECEncoder(*shards).encode

    def send(datagrams: list[bytes], address: Address) -> None:
        transmit([packet for datagram in datagrams for packet in encode(datagram)], address)

    return send


class FECLink(KCPLink):
    """A KCP link whose datagrams arrive as FEC packets of ``options.fec`` (data shards, parity shards); its
    ``transmit`` is a :func:`fec_transmitter`'s."""

    #: the peer's packets are not laid out as this end's ``fec`` says: nothing is rebuilt any more
    fec_mismatch = False

    @cached_property
    def _decoder(self) -> FECDecoder:
        shards = self.options.fec
        if shards is None:
            raise ValueError("an FEC link needs options.fec")
        return FECDecoder(*shards)

    @property
    def fec_recovered(self) -> int:
        """KCP datagrams rebuilt from parity so far."""
        return self._decoder.recovered

    def accepts(self, datagram: Datagram) -> bool:
        """A parity packet, or a data packet carrying a valid KCP datagram of this session."""
        kind = fec_kind(datagram)
        if kind == TYPE_DATA:
            return valid_datagram(memoryview(datagram)[FEC_OVERHEAD:], self.engine.conv)
        return kind == TYPE_PARITY

    def take_run(self, buffer: bytes, segment: int, into: list[Datagram]) -> bool:
        return take_each(self, buffer, segment, into)

    def feed(self, datagrams: Sequence[Datagram]) -> None:
        """Input vetted FEC packets: the KCP datagrams they carry, and those they let the decoder rebuild."""
        decoder, conv = self._decoder, self.engine.conv
        kcp: list[Datagram] = []
        for datagram in datagrams:
            if self.fec_mismatch:
                if fec_kind(datagram) == TYPE_DATA:
                    kcp.append(memoryview(datagram)[FEC_OVERHEAD:])
                continue
            packet = parse_fec_packet(datagram)
            out = decoder.decode(packet)
            if packet.is_data:
                kcp.append(out[0])
                out = out[1:]
            kcp.extend(rebuilt for rebuilt in out if valid_datagram(rebuilt, conv))
            if decoder.misplaced:
                self.fec_mismatch = True
                log.warning(
                    "kcp peer's fec differs: no more rebuilding for this session",
                    fec=f"{decoder.data_shards}/{decoder.parity_shards}",
                    peer=self.remote_address,
                )
        if kcp:
            super().feed(kcp)


class FECMarks(NewestMarks):
    """:class:`~vtunnel.arq.kcp_wire.NewestMarks` of the KCP datagrams inside FEC data packets (a parity packet is
    never newer: it cannot move a session)."""

    __slots__ = ()

    def note(self, datagram: Datagram, offset: int = 0) -> bool:
        # (the packet at ``offset`` was vetted by the link; ``datagram`` may be a whole run's buffer, so only
        # the flag is read here, not the size against the buffer's length)
        if len(datagram) - offset < FEC_OVERHEAD + HEADER_LEN:
            return False
        if _FLAG_SIZE.unpack_from(datagram, offset + 4)[0] != TYPE_DATA:
            return False
        return super().note(datagram, offset + FEC_OVERHEAD)


class FECPlainListenerCodec(KeylessListenerCodec[PlainKey]):
    """A listener's plain FEC packets: a data packet is keyed by its KCP datagram's conv (or by its source address
    for conv 0), a parity packet by the session whose peer is at its source address; a session moves to a new
    address on a newer data packet (:class:`FECMarks`). Bare KCP datagrams are keyed as without FEC, so that the
    listener sees (and says) that the client has no ``fec``."""

    def __init__(self, admit: Callable[[str], bool] | None = None) -> None:
        super().__init__(self._key, FECMarks, admit)
        self._at: dict[Address, PlainKey] = {}
        self._where: dict[PlainKey, Address] = {}

    def _key(self, datagram: Datagram, source: Address) -> PlainKey | None:
        kind = fec_kind(datagram)
        if kind == TYPE_DATA:
            if len(datagram) < FEC_OVERHEAD + HEADER_LEN:
                return None
            return int(_CONV.unpack_from(datagram, FEC_OVERHEAD)[0]) or source
        if kind == TYPE_PARITY:
            return self._at.get(source)
        return kcp_key(datagram, source)

    def _place(self, key: PlainKey, address: Address) -> None:
        """Session ``key``'s peer is at ``address`` now."""
        old = self._where.get(key)
        if old == address:
            return
        if old is not None and self._at.get(old) == key:
            del self._at[old]
        self._where[key] = address
        self._at[address] = key

    def open(
        self, key: PlainKey, link: RoutedLink | None, datagram: Datagram, source: Address, now: float
    ) -> tuple[Datagram | None, Address]:
        payload, address = super().open(key, link, datagram, source, now)
        if link is not None:
            self._place(key, address)
        return payload, address

    def session_started(self, key: PlainKey, first: Datagram, address: Address) -> None:
        super().session_started(key, first, address)
        self._place(key, address)

    def forget(self, key: PlainKey) -> None:
        super().forget(key)
        address = self._where.pop(key, None)
        if address is not None and self._at.get(address) == key:
            del self._at[address]

    def close(self) -> None:
        super().close()
        self._at.clear()
        self._where.clear()
