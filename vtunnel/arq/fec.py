"""kcp-go's forward error correction: Reed-Solomon parity datagrams after every group of data datagrams.

With FEC on (``--datashard D --parityshard P``, both above 0), every KCP datagram gets an FEC header:

    seqid u32 | flag u16 (0xf1 data, 0xf2 parity) | size u16 | KCP datagram        (little endian)

``size`` counts itself plus the KCP bytes. Sequence numbers count every FEC packet, data and parity alike, so
a group is ``D`` data packets followed by ``P`` parity packets, and ``seqid % (D + P)`` is a packet's place in
its group. The sender wraps seqid back to 0 (after a parity packet) at the largest multiple of ``D + P`` below
2^32, so groups never straddle the wrap.

Parity is computed over the data packets' ``size | KCP datagram`` part, each padded with zeros to the longest
one of the group; a parity packet is ``seqid | 0xf2 | parity bytes``, as long as that longest part. The
receiver feeds data packets to KCP at once, keeps the packets of incomplete groups, and once any ``D`` packets
of a group are in while a data packet is still missing, rebuilds the missing ones (padding what it has to the
longest packet it holds) and reads each rebuilt packet's KCP datagram through its ``size``.

The 0xf1 / 0xf2 flags sit where a bare KCP segment has its cmd (81..84) and frg bytes, so a receiver can tell
FEC packets from bare KCP datagrams by those two bytes alone; kcp-go accepts both whatever it was configured
with, and so does the kcptun session (:mod:`vtunnel.kcptun.session`). ``kcp://`` with ``fec=D/P`` uses the same
packets (:mod:`vtunnel.transports.kcp.fec`), and takes only FEC packets.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Final

from vtunnel.arq.reedsolomon import MAX_SHARDS, FECError, ReedSolomon

__all__ = [
    "FEC_HEADER_SIZE",
    "FEC_OVERHEAD",
    "MAX_SHARDS",
    "TYPE_DATA",
    "TYPE_PARITY",
    "FECDecoder",
    "FECEncoder",
    "FECError",
    "FECPacket",
    "is_fec_packet",
    "parse_fec_packet",
]

TYPE_DATA: Final = 0xF1
TYPE_PARITY: Final = 0xF2
#: seqid + flag
FEC_HEADER_SIZE: Final = 6
#: what FEC adds in front of each KCP datagram: the header and the size field
FEC_OVERHEAD: Final = FEC_HEADER_SIZE + 2
#: a receiver keeps the packets of this many groups' worth (kcp-go's bound: three groups of packets)
_RX_GROUPS: Final = 3
#: completed groups remembered, so that their late packets start nothing
_DONE_REMEMBERED: Final = 64
_HEADER: Final = struct.Struct("<IH")
_SIZE: Final = struct.Struct("<H")
_MASK32: Final = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class FECPacket:
    seqid: int
    flag: int
    #: everything after the 6-byte header: ``size | KCP`` for data, parity bytes for parity
    body: bytes

    @property
    def is_data(self) -> bool:
        return self.flag == TYPE_DATA


def is_fec_packet(payload: bytes | memoryview) -> bool:
    """Whether a (deciphered) payload carries an FEC header rather than a bare KCP datagram."""
    return len(payload) >= FEC_HEADER_SIZE and payload[4] in (TYPE_DATA, TYPE_PARITY) and payload[5] == 0


def parse_fec_packet(payload: bytes | memoryview) -> FECPacket:
    """An FEC packet; :class:`FECError` when it is too short or not one."""
    if len(payload) < FEC_OVERHEAD:
        raise FECError(f"FEC packet of {len(payload)} bytes is shorter than its header")
    seqid, flag = _HEADER.unpack_from(payload, 0)
    if flag not in (TYPE_DATA, TYPE_PARITY):
        raise FECError(f"unknown FEC type flag {flag:#06x}")
    return FECPacket(seqid, flag, bytes(payload[FEC_HEADER_SIZE:]))


def _kcp_of_shard(shard: bytes) -> bytes | None:
    """The KCP datagram inside a data shard (``size | KCP | zero padding``), ``None`` when ``size`` is absurd."""
    if len(shard) < 2:
        return None
    size = _SIZE.unpack_from(shard, 0)[0]
    if size < 2 or size > len(shard):
        return None
    return shard[2:size]


def _check_shards(data_shards: int, parity_shards: int) -> None:
    if data_shards < 1 or parity_shards < 1 or data_shards + parity_shards > 256:
        raise FECError(f"invalid shard counts {data_shards}/{parity_shards}")


class FECEncoder:
    """Wraps KCP datagrams into data packets and adds a group's parity packets after its last data packet."""

    __slots__ = ("_codec", "_group", "_next", "_paws", "data_shards", "parity_shards")

    def __init__(self, data_shards: int, parity_shards: int) -> None:
        _check_shards(data_shards, parity_shards)
        self.data_shards = data_shards
        self.parity_shards = parity_shards
        total = data_shards + parity_shards
        self._paws = _MASK32 // total * total
        self._next = 0
        self._group: list[bytes] = []
        self._codec = ReedSolomon(data_shards, parity_shards)

    def encode(self, kcp_datagram: bytes) -> list[bytes]:
        """The FEC packets to send for one KCP datagram: its data packet, then parity packets if it closed a group."""
        if len(kcp_datagram) > 0xFFFF - 2:
            raise FECError("KCP datagram too long for the FEC size field")
        shard = _SIZE.pack(len(kcp_datagram) + 2) + kcp_datagram
        out = [_HEADER.pack(self._next, TYPE_DATA) + shard]
        self._next = (self._next + 1) & _MASK32
        group = self._group
        group.append(shard)
        if len(group) == self.data_shards:
            longest = max(map(len, group))
            padded = [s.ljust(longest, b"\0") for s in group]
            for parity in self._codec.encode(padded):
                out.append(_HEADER.pack(self._next, TYPE_PARITY) + parity)
                self._next = (self._next + 1) % self._paws
            group.clear()
        return out


class _Group:
    __slots__ = ("data_seen", "shards")

    def __init__(self, total: int) -> None:
        self.shards: list[bytes | None] = [None] * total
        self.data_seen = 0


class FECDecoder:
    """Collects FEC packets by group and rebuilds lost data packets from parity.

    :meth:`decode` returns the KCP datagrams an FEC packet makes available: a data packet's own one first, then
    any that its arrival let the decoder rebuild. Duplicates and packets of finished groups add nothing.
    """

    __slots__ = (
        "_codec",
        "_done",
        "_done_order",
        "_groups",
        "data_shards",
        "misplaced",
        "parity_shards",
        "recovered",
    )

    def __init__(self, data_shards: int, parity_shards: int) -> None:
        _check_shards(data_shards, parity_shards)
        self.data_shards = data_shards
        self.parity_shards = parity_shards
        self._codec = ReedSolomon(data_shards, parity_shards)
        self._groups: OrderedDict[int, _Group] = OrderedDict()
        self._done: set[int] = set()
        self._done_order: deque[int] = deque()
        #: data packets rebuilt so far
        self.recovered = 0
        #: packets out of place for this decoder's layout (data where it expects parity, or parity where it
        #: expects data): the peer groups differently, and they are not used for rebuilding
        self.misplaced = 0

    def decode(self, packet: FECPacket) -> list[bytes]:
        out: list[bytes] = []
        if packet.is_data:
            out.append(packet.body[2:])
        total = self.data_shards + self.parity_shards
        index = packet.seqid % total
        if (index < self.data_shards) != packet.is_data:
            self.misplaced += 1
            return out  # the peer groups differently (other shard counts): nothing to rebuild with
        begin = packet.seqid - index
        if begin in self._done:
            return out
        group = self._groups.get(begin)
        if group is None:
            group = self._groups[begin] = _Group(total)
            while len(self._groups) > _RX_GROUPS:
                self._groups.popitem(last=False)
        if group.shards[index] is not None:
            return out
        group.shards[index] = packet.body
        if packet.is_data:
            group.data_seen += 1
        if group.data_seen == self.data_shards:
            self._finish(begin)
            return out
        present = [s for s in group.shards if s is not None]
        if len(present) < self.data_shards:
            return out
        longest = max(map(len, present))
        padded = [None if s is None else s.ljust(longest, b"\0") for s in group.shards]
        rebuilt = self._codec.reconstruct_data(padded)
        for i in range(self.data_shards):
            if group.shards[i] is None:
                kcp = _kcp_of_shard(rebuilt[i])
                if kcp is not None:
                    out.append(kcp)
                    self.recovered += 1
        self._finish(begin)
        return out

    def _finish(self, begin: int) -> None:
        self._groups.pop(begin, None)
        self._done.add(begin)
        self._done_order.append(begin)
        if len(self._done_order) > _DONE_REMEMBERED:
            self._done.discard(self._done_order.popleft())
