"""The rudp wire format: one packet per UDP datagram, a short header and a run of frames (``docs/rudp.md``).

Integers are QUIC variable-length integers (RFC 9000 section 16): the two high bits of the first byte give the
length (1, 2, 4 or 8 bytes), the rest is the value, big endian, up to 2**62 - 1.

Packet::

    flags (1)  0b01 | reserved 0 | DCID length (5 bits, 0..20)
    DCID       the receiver's connection ID (opaque bytes the receiver chose)
    number     varint: the packet number, never reused in one direction (a retransmission is a new packet)
    frames     one or more, up to the end of the datagram

Frames (the type is one byte)::

    0x00 PADDING        nothing (a run of zero bytes is a run of PADDING frames)
    0x01 PING           nothing: asks for an ACK
    0x02 ACK            largest | ack delay (us) | max data | range count | first range | (gap | length) * count
    0x04 DATA_BLOCKED   limit: the sender has stream data it may not send past ``limit``
    0x08..0x0b STREAM   bit 0x02: a length follows the offset; bit 0x01: FIN.  offset | [length] | data
    0x1c CLOSE          error code | reason length | reason (UTF-8)
    0x30, 0x31 DATAGRAM 0x31: a length precedes the data; 0x30: the data runs to the end of the packet

Parsing never raises anything but :class:`WireError`, whatever the bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_CID_LEN",
    "MAX_VARINT",
    "Ack",
    "Close",
    "DataBlocked",
    "Datagram",
    "Frame",
    "FrameType",
    "Packet",
    "Padding",
    "Ping",
    "Stream",
    "WireError",
    "ack_ranges",
    "decode_packet",
    "encode_ack",
    "encode_close",
    "encode_data_blocked",
    "encode_datagram",
    "encode_header",
    "encode_stream",
    "encode_varint",
    "encode_varints",
    "header_size",
    "peek_dcid",
    "peek_number",
    "stream_head",
    "stream_header",
    "stream_overhead",
    "stream_packet",
    "varint_packer",
    "varint_size",
]

MAX_VARINT: Final = (1 << 62) - 1
MAX_CID_LEN: Final = 20
#: the two fixed bits of the flags byte (0b01), and the mask that must read them
_FIXED: Final = 0x40
_FIXED_MASK: Final = 0xE0
_CID_MASK: Final = 0x1F


class FrameType:
    """Frame type bytes."""

    PADDING: Final = 0x00
    PING: Final = 0x01
    ACK: Final = 0x02
    DATA_BLOCKED: Final = 0x04
    STREAM: Final = 0x08  # | 0x02 (LEN) | 0x01 (FIN)
    STREAM_LEN: Final = 0x02
    STREAM_FIN: Final = 0x01
    CLOSE: Final = 0x1C
    DATAGRAM: Final = 0x30  # | 0x01 (LEN)
    DATAGRAM_LEN: Final = 0x01


_STREAM_LEN: Final = FrameType.STREAM | FrameType.STREAM_LEN
_STREAM_LEN_FIN: Final = _STREAM_LEN | FrameType.STREAM_FIN

#: a STREAM header's type, offset and length packed at once, by the sizes of the two varints (1, 2 or 4 bytes)
_PACK_B_B_B: Final = struct.Struct(">BBB").pack
_PACK_B_B_H: Final = struct.Struct(">BBH").pack
_PACK_B_H_B: Final = struct.Struct(">BHB").pack
_PACK_B_H_H: Final = struct.Struct(">BHH").pack
_PACK_B_I_B: Final = struct.Struct(">BIB").pack
_PACK_B_I_H: Final = struct.Struct(">BIH").pack


class WireError(ValueError):
    """A datagram that is not a well-formed rudp packet (the only exception parsing raises)."""


# --- frames, as parsed ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Padding:
    length: int


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Ack:
    """``ranges``: acknowledged packet numbers as inclusive ``(first, last)`` pairs, highest first, disjoint and
    not adjacent. ``delay``: microseconds between receiving the largest and sending this ACK. ``max_data``: the
    stream offset the sender of the ACK will accept data up to (its connection-level receive window)."""

    ranges: tuple[tuple[int, int], ...]
    delay: int
    max_data: int

    @property
    def largest(self) -> int:
        return self.ranges[0][1]


@dataclass(frozen=True, slots=True)
class DataBlocked:
    limit: int


@dataclass(frozen=True, slots=True)
class Stream:
    offset: int
    data: bytes
    fin: bool = False


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Datagram:
    data: bytes


Frame = Padding | Ping | Ack | DataBlocked | Stream | Close | Datagram


@dataclass(frozen=True, slots=True)
class Packet:
    dcid: bytes
    number: int
    frames: tuple[Frame, ...]


# --- variable-length integers -----------------------------------------------------------------------------


def varint_size(value: int) -> int:
    if value < 0x40:
        return 1
    if value < 0x4000:
        return 2
    if value < 0x4000_0000:
        return 4
    if value <= MAX_VARINT:
        return 8
    raise ValueError(f"{value} does not fit a varint")


def encode_varint(value: int) -> bytes:
    return encode_varints(value)


def encode_varints(*values: int) -> bytes:
    """Varints one after another, in one call (an ACK frame's fields, a packet number)."""
    out = bytearray()
    for value in values:
        if value < 0x40:
            if value < 0:
                raise ValueError("a varint is never negative")
            out.append(value)
        elif value < 0x4000:
            out += (value | 0x4000).to_bytes(2, "big")
        elif value < 0x4000_0000:
            out += (value | 0x8000_0000).to_bytes(4, "big")
        elif value <= MAX_VARINT:
            out += (value | 0xC000_0000_0000_0000).to_bytes(8, "big")
        else:
            raise ValueError(f"{value} does not fit a varint")
    return bytes(out)


#: the value bits of a varint of each length prefix (0b00..0b11: 1, 2, 4, 8 bytes)
_VARINT_MASKS: Final = (0x3F, 0x3FFF, 0x3FFF_FFFF, MAX_VARINT)
#: what reads a varint of each length prefix, its length bits still set (the 1-byte one is read as a byte)
_VARINT_UNPACKS: Final = (
    struct.Struct(">B").unpack_from,
    struct.Struct(">H").unpack_from,
    struct.Struct(">I").unpack_from,
    struct.Struct(">Q").unpack_from,
)


_PACK_B: Final = struct.Struct(">B").pack
_PACK_H: Final = struct.Struct(">H").pack
_PACK_I: Final = struct.Struct(">I").pack
_PACK_Q: Final = struct.Struct(">Q").pack


def varint_packer(value: int) -> tuple[Callable[[int], bytes], int, int]:
    """``(pack, bits, below)``: ``pack(v | bits)`` is the varint of any ``v`` from ``value`` up to ``below``
    (exclusive), all of one length (a sender numbering a burst of packets encodes each number with one C call)."""
    if value < 0x40:
        return _PACK_B, 0, 0x40
    if value < 0x4000:
        return _PACK_H, 0x4000, 0x4000
    if value < 0x4000_0000:
        return _PACK_I, 0x8000_0000, 0x4000_0000
    varint_size(value)  # (raises past the largest)
    return _PACK_Q, 0xC000_0000_0000_0000, MAX_VARINT + 1


def _varints(buf: bytes | memoryview, pos: int, count: int) -> tuple[list[int], int]:
    """``count`` varints from ``buf[pos]`` on, and the position after them (one call for all the fields of a
    frame: the decoder runs for every packet received)."""
    values: list[int] = []
    size = len(buf)
    for _ in range(count):
        if pos >= size:
            raise WireError("truncated")
        first = buf[pos]
        prefix = first >> 6
        if prefix:
            end = pos + (1 << prefix)
            if end > size:
                raise WireError("truncated varint")
            values.append(_VARINT_UNPACKS[prefix](buf, pos)[0] & _VARINT_MASKS[prefix])
            pos = end
        else:
            values.append(first)
            pos += 1
    return values, pos


# --- header -----------------------------------------------------------------------------------------------


def header_size(dcid_len: int, number: int) -> int:
    return 1 + dcid_len + varint_size(number)


def encode_header(dcid: bytes, number: int) -> bytes:
    if len(dcid) > MAX_CID_LEN:
        raise ValueError(f"a connection ID is at most {MAX_CID_LEN} bytes")
    return bytes((_FIXED | len(dcid),)) + dcid + encode_varint(number)


def peek_dcid(datagram: bytes | memoryview) -> bytes:
    """The destination connection ID of a packet, without parsing the rest (what a demultiplexer reads)."""
    if not datagram:
        raise WireError("empty datagram")
    flags = datagram[0]
    if flags & _FIXED_MASK != _FIXED:
        raise WireError("not an rudp packet")
    length = flags & _CID_MASK
    if length > MAX_CID_LEN or len(datagram) < 1 + length:
        raise WireError("bad connection ID length")
    return bytes(datagram[1 : 1 + length])


def peek_number(datagram: bytes | memoryview, offset: int = 0) -> int:
    """The packet number of the packet at ``datagram[offset:]`` (one of a run read at once), without parsing its
    frames (what shows a datagram newer than another)."""
    size = len(datagram)
    if offset >= size:
        raise WireError("empty datagram")
    flags = datagram[offset]
    if flags & _FIXED_MASK != _FIXED or flags & _CID_MASK > MAX_CID_LEN:
        raise WireError("not an rudp packet")
    pos = offset + 1 + (flags & _CID_MASK)
    if pos >= size:
        raise WireError("truncated")
    length = 1 << (datagram[pos] >> 6)  # (read here: a listener peeks at every datagram of a run)
    if pos + length > size:
        raise WireError("truncated varint")
    number: int = _NUMBER_UNPACKS[length](datagram, pos)[0]
    return number & _MASKS[length]


def stream_packet(
    datagram: bytes | memoryview, dcid: bytes
) -> tuple[int, int, int, tuple[tuple[tuple[int, int], ...], int, int] | None] | None:
    """``(number, offset, start of the data, ack)`` of a packet to ``dcid`` made of an optional ACK frame and a
    STREAM frame without FIN running to the end of the datagram (the bulk of a transfer, and most of a
    conversation's packets); ``ack``: ``None``, or the ACK's ``(ranges, delay, max_data)`` as :class:`Ack` has
    them. ``None`` for any other packet, well formed or not (:func:`decode_packet` says which). A receiver takes
    such a packet without building frame objects, and copies its data once."""
    cid_len = len(dcid)
    size = len(datagram)
    pos = 1 + cid_len
    if size <= pos or datagram[0] != _FIXED | cid_len or (cid_len and datagram[1:pos] != dcid):
        return None
    number_size = 1 << (datagram[pos] >> 6)
    kind_at = pos + number_size
    if kind_at + 2 < size and datagram[kind_at] == _STREAM_LEN:
        # the bulk of a transfer: the number, the offset and the length read by one struct of their sizes
        offset_at = kind_at + 1
        offset_size = 1 << (datagram[offset_at] >> 6)
        length_at = offset_at + offset_size
        if length_at >= size:
            return None
        length_size = 1 << (datagram[length_at] >> 6)
        start = length_at + length_size
        if start > size:
            return None
        number, _, offset, length = _HEADS[number_size][offset_size][length_size](datagram, pos)
        length &= _MASKS[length_size]
        offset &= _MASKS[offset_size]
        if start + length != size or offset + length > MAX_VARINT:
            return None  # more frames after it, or truncated
        return number & _MASKS[number_size], offset, start, None
    if kind_at >= size:
        return None
    number = _NUMBER_UNPACKS[number_size](datagram, pos)[0] & _MASKS[number_size]
    pos = kind_at
    kind = datagram[pos]
    ack = None
    try:
        if kind == FrameType.ACK:
            ack, pos = _decode_ack(datagram, pos + 1)
            if pos >= size:
                return None
            kind = datagram[pos]
        if kind == _STREAM_LEN and pos + 2 < size:
            # (a conversation's packet: its ACK, then its data) the offset and the length by one struct
            offset_at = pos + 1
            offset_size = 1 << (datagram[offset_at] >> 6)
            length_at = offset_at + offset_size
            if length_at >= size:
                return None
            length_size = 1 << (datagram[length_at] >> 6)
            pos = length_at + length_size
            if pos > size:
                return None
            offset, length = _STREAM_HEADS[offset_size][length_size](datagram, offset_at)
            offset &= _MASKS[offset_size]
            length &= _MASKS[length_size]
            if pos + length != size:
                return None  # more frames after it, or truncated
        elif kind == FrameType.STREAM:
            (offset,), pos = _varints(datagram, pos + 1, 1)
        else:
            return None
    except WireError:
        return None
    if offset + (size - pos) > MAX_VARINT:
        return None
    return number, offset, pos, ack


#: by the sizes of the packet number, the offset and the length (1, 2, 4 or 8 bytes): the struct that reads a
#: packet number, a frame type and the two varints of a STREAM frame at once (their length bits still set)
_CODES: Final = {1: "B", 2: "H", 4: "I", 8: "Q"}
_HEADS: Final = {
    n: {
        o: {n2: struct.Struct(f">{_CODES[n]}B{_CODES[o]}{_CODES[n2]}").unpack_from for n2 in _CODES}
        for o in _CODES
    }
    for n in _CODES
}
#: the same for the offset and the length alone (after an ACK frame)
_STREAM_HEADS: Final = {
    o: {n: struct.Struct(f">{_CODES[o]}{_CODES[n]}").unpack_from for n in _CODES} for o in _CODES
}
#: what reads a varint of each size, its length bits still set
_NUMBER_UNPACKS: Final = {n: struct.Struct(">" + code).unpack_from for n, code in _CODES.items()}
#: the value bits of a varint of each size
_MASKS: Final = {1: 0x3F, 2: 0x3FFF, 4: 0x3FFF_FFFF, 8: MAX_VARINT}


# --- frames, encoded --------------------------------------------------------------------------------------


def stream_overhead(offset: int, length: int, *, with_length: bool = True) -> int:
    """Bytes a STREAM frame adds to its data."""
    return 1 + varint_size(offset) + (varint_size(length) if with_length else 0)


def stream_header(offset: int, length: int, *, fin: bool = False) -> bytes:
    """A STREAM frame with a length field, up to its data (a sender joins the data to it without a copy of
    the frame)."""
    return bytes((_STREAM_LEN_FIN if fin else _STREAM_LEN,)) + encode_varints(offset, length)


def stream_head(offset: int, available: int, room: int, fin_at: int) -> tuple[bytes, int] | None:
    """The header of the STREAM frame (with a length field) carrying as much of ``available`` bytes from
    ``offset`` as fits ``room`` bytes, and that length; FIN when the data reaches ``fin_at`` (-1: never).
    ``None`` when not even the header fits, or no byte does (unless ``available`` is 0: a FIN alone).

    One call for what a sender does for every packet of stream data (sizes, the length, the bytes)."""
    overhead = (
        (2 if offset < 0x40 else 3 if offset < 0x4000 else 5 if offset < 0x4000_0000 else 9)
        + (1 if available < 0x40 else 2 if available < 0x4000 else 4 if available < 0x4000_0000 else 8)
        if available <= MAX_VARINT
        else 1 + varint_size(offset) + varint_size(available)  # (raises)
    )
    take = room - overhead
    if take > available:
        take = available
    if take <= 0 and not (available == 0 and take == 0):
        return None
    kind = _STREAM_LEN_FIN if offset + take == fin_at else _STREAM_LEN
    if offset < 0x4000 and take < 0x4000:
        if offset < 0x40:
            head = (
                _PACK_B_B_B(kind, offset, take) if take < 0x40 else _PACK_B_B_H(kind, offset, take | 0x4000)
            )
        elif take < 0x40:
            head = _PACK_B_H_B(kind, offset | 0x4000, take)
        else:
            head = _PACK_B_H_H(kind, offset | 0x4000, take | 0x4000)
    elif offset < 0x4000_0000 and take < 0x4000:
        head = (
            _PACK_B_I_B(kind, offset | 0x8000_0000, take)
            if take < 0x40
            else _PACK_B_I_H(kind, offset | 0x8000_0000, take | 0x4000)
        )
    else:
        head = bytes((kind,)) + encode_varints(offset, take)
    return head, take


def encode_stream(
    offset: int, data: bytes | memoryview, *, fin: bool = False, with_length: bool = True
) -> bytes:
    if with_length:
        return stream_header(offset, len(data), fin=fin) + data
    kind = FrameType.STREAM | (FrameType.STREAM_FIN if fin else 0)
    return b"".join((bytes((kind,)), encode_varint(offset), data))


def encode_datagram(data: bytes | memoryview, *, with_length: bool = True) -> bytes:
    if with_length:
        return b"".join(
            (bytes((FrameType.DATAGRAM | FrameType.DATAGRAM_LEN,)), encode_varint(len(data)), data)
        )
    return bytes((FrameType.DATAGRAM,)) + bytes(data)


def encode_data_blocked(limit: int) -> bytes:
    return bytes((FrameType.DATA_BLOCKED,)) + encode_varint(limit)


def encode_close(code: int, reason: str = "") -> bytes:
    text = reason.encode("utf-8")
    return bytes((FrameType.CLOSE,)) + encode_varint(code) + encode_varint(len(text)) + text


def ack_ranges(numbers: Iterable[int]) -> list[tuple[int, int]]:
    """Packet numbers as ACK ranges: inclusive ``(first, last)`` pairs, highest first."""
    ranges: list[tuple[int, int]] = []
    for n in sorted(set(numbers), reverse=True):
        if ranges and ranges[-1][0] == n + 1:
            ranges[-1] = (n, ranges[-1][1])
        else:
            ranges.append((n, n))
    return ranges


def encode_ack(ranges: Sequence[tuple[int, int]], delay: int, max_data: int) -> bytes:
    """An ACK frame; ``ranges`` as :class:`Ack` has them (highest first, disjoint, not adjacent)."""
    if not ranges:
        raise ValueError("an ACK acknowledges at least one packet")
    first, largest = ranges[0]
    if (
        len(ranges) == 1
        and first >= 0
        and largest <= MAX_VARINT
        and 0 <= delay <= MAX_VARINT
        and 0 <= max_data <= MAX_VARINT
    ):
        # the usual ACK (every packet of a conversation carries one): its fields packed by one struct of their
        # sizes (the ACK type, largest, delay, max data, a range count of 0, the first range)
        span = largest - first
        a = 0 if largest < 0x40 else 1 if largest < 0x4000 else 2 if largest < 0x4000_0000 else 3
        b = 0 if delay < 0x40 else 1 if delay < 0x4000 else 2 if delay < 0x4000_0000 else 3
        c = 0 if max_data < 0x40 else 1 if max_data < 0x4000 else 2 if max_data < 0x4000_0000 else 3
        d = 0 if span < 0x40 else 1 if span < 0x4000 else 2 if span < 0x4000_0000 else 3
        return _ACK_PACKS[a << 6 | b << 4 | c << 2 | d](
            _ACK,
            largest | _LENGTH_BITS[a],
            delay | _LENGTH_BITS[b],
            max_data | _LENGTH_BITS[c],
            0,
            span | _LENGTH_BITS[d],
        )
    if len(ranges) == 1:
        return _ACK_TYPE + encode_varints(largest, delay, max_data, 0, largest - first)
    values = [largest, delay, max_data, len(ranges) - 1, largest - first]
    smallest = first
    for low, high in ranges[1:]:
        # gap: the unacknowledged numbers between the two ranges, less one; length: the range's size, less one
        values.append(smallest - high - 2)
        values.append(high - low)
        smallest = low
    return _ACK_TYPE + encode_varints(*values)


_ACK: Final = int(FrameType.ACK)
_ACK_TYPE: Final = bytes((_ACK,))
#: the struct reading an ACK frame's fields (after its type) with a range count below 64, by the length codes
#: of largest, delay, max data and the first range (as :data:`_ACK_PACKS`), their length bits still set
_ACK_HEADS: Final = tuple(
    struct.Struct(
        ">" + "BHIQ"[key >> 6] + "BHIQ"[key >> 4 & 3] + "BHIQ"[key >> 2 & 3] + "B" + "BHIQ"[key & 3]
    ).unpack_from
    for key in range(256)
)
#: a varint's length bits, by its length code (0..3: 1, 2, 4, 8 bytes)
_LENGTH_BITS: Final = (0, 0x4000, 0x8000_0000, 0xC000_0000_0000_0000)
#: the struct packing an ACK frame of one range, by the length codes of largest, delay, max data and the first
#: range (two bits each, in that order)
_ACK_PACKS: Final = tuple(
    struct.Struct(
        ">B" + "BHIQ"[key >> 6] + "BHIQ"[key >> 4 & 3] + "BHIQ"[key >> 2 & 3] + "B" + "BHIQ"[key & 3]
    ).pack
    for key in range(256)
)


# --- decoding ---------------------------------------------------------------------------------------------


def _decode_ack(
    buf: bytes | memoryview, pos: int
) -> tuple[tuple[tuple[tuple[int, int], ...], int, int], int]:
    """An ACK frame's ``(ranges, delay, max_data)`` from ``buf[pos]`` (after its type), and the position after it."""
    size = len(buf)
    if pos + 5 <= size:
        # the five fields by one struct of their sizes (the sizes read from their first bytes; a range count
        # below 64, one byte), as an ACK of one range is read for every packet of a conversation
        a = buf[pos] >> 6
        at = pos + (1 << a)
        b = buf[at] >> 6 if at < size else 0
        at += 1 << b
        c = buf[at] >> 6 if at < size else 0
        at += 1 << c
        if at + 1 < size and buf[at] < 0x40:
            d = buf[at + 1] >> 6
            end = at + 1 + (1 << d)
            if end <= size:
                largest, delay, max_data, count, first = _ACK_HEADS[a << 6 | b << 4 | c << 2 | d](buf, pos)
                largest &= _VARINT_MASKS[a]
                delay &= _VARINT_MASKS[b]
                max_data &= _VARINT_MASKS[c]
                first &= _VARINT_MASKS[d]
                pos = end
            else:
                (largest, delay, max_data, count, first), pos = _varints(buf, pos, 5)
        else:
            (largest, delay, max_data, count, first), pos = _varints(buf, pos, 5)
    else:
        (largest, delay, max_data, count, first), pos = _varints(buf, pos, 5)
    if first > largest:
        raise WireError("ACK range below packet number 0")
    low = largest - first
    if not count:
        return (((low, largest),), delay, max_data), pos
    if count > (len(buf) - pos) // 2:  # each further range takes at least two bytes
        raise WireError("ACK range count beyond the packet")
    ranges = [(low, largest)]
    values, pos = _varints(buf, pos, 2 * count)
    for i in range(0, 2 * count, 2):
        high = low - values[i] - 2
        low = high - values[i + 1]
        if low < 0:
            raise WireError("ACK range below packet number 0")
        ranges.append((low, high))
    return (tuple(ranges), delay, max_data), pos


def _take(buf: bytes, pos: int, length: int) -> tuple[bytes, int]:
    end = pos + length
    if end > len(buf):
        raise WireError("truncated field")
    return buf[pos:end], end


def decode_packet(datagram: bytes | memoryview) -> Packet:
    """Parse a whole packet; raises :class:`WireError` (and nothing else) when it is not well formed."""
    buf = bytes(datagram)
    dcid = peek_dcid(buf)
    (number,), pos = _varints(buf, 1 + len(dcid), 1)
    size = len(buf)
    frames: list[Frame] = []
    append = frames.append
    while pos < size:
        kind = buf[pos]
        pos += 1
        frame: Frame
        if kind & 0xFC == FrameType.STREAM:  # the most frequent first
            if kind & FrameType.STREAM_LEN:
                (offset, length), pos = _varints(buf, pos, 2)
                end = pos + length
                if end > size:
                    raise WireError("truncated field")
                data = buf[pos:end]
                pos = end
            else:
                (offset,), pos = _varints(buf, pos, 1)
                data, pos = buf[pos:], size
            if offset + len(data) > MAX_VARINT:
                raise WireError("STREAM frame past the largest offset")
            frame = Stream(offset, data, bool(kind & FrameType.STREAM_FIN))
        elif kind == FrameType.ACK:
            (ranges, delay, max_data), pos = _decode_ack(buf, pos)
            frame = Ack(ranges, delay, max_data)
        elif kind == FrameType.PADDING:
            start = pos - 1
            pos = size - len(buf[pos:].lstrip(b"\x00"))  # (a probe's thousands of zero bytes, in C)
            frame = Padding(pos - start)
        elif kind == FrameType.PING:
            frame = Ping()
        elif kind == FrameType.DATA_BLOCKED:
            (limit,), pos = _varints(buf, pos, 1)
            frame = DataBlocked(limit)
        elif kind == FrameType.CLOSE:
            (code, length), pos = _varints(buf, pos, 2)
            raw, pos = _take(buf, pos, length)
            try:
                frame = Close(code, raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise WireError("CLOSE reason is not UTF-8") from None
        elif kind == FrameType.DATAGRAM | FrameType.DATAGRAM_LEN:
            (length,), pos = _varints(buf, pos, 1)
            data, pos = _take(buf, pos, length)
            frame = Datagram(data)
        elif kind == FrameType.DATAGRAM:
            frame, pos = Datagram(buf[pos:]), size
        else:
            raise WireError(f"unknown frame type 0x{kind:02x}")
        append(frame)
    if not frames:
        raise WireError("a packet carries at least one frame")
    return Packet(dcid, number, tuple(frames))
