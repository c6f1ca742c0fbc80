"""KCP segment headers: just enough parsing to vet a datagram before ikcp sees it, and to tell a keyless peer's
newer datagrams from copies of old ones (:class:`NewestMarks`).

A KCP datagram is one or more segments, each a 24-byte little-endian header ``conv u32 | cmd u8 | frg u8 | wnd
u16 | ts u32 | sn u32 | una u32 | len u32`` followed by ``len`` bytes of data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from typing import Final

__all__ = [
    "HEADER_LEN",
    "MAX_DATA",
    "Command",
    "NewestMarks",
    "RunVerdict",
    "SegmentHeader",
    "conv_of",
    "first_header",
    "is_new_session",
    "valid_datagram",
    "vet_run",
]

HEADER_LEN: Final = 24
#: the largest data length a segment can claim inside one UDP datagram
MAX_DATA: Final = 65535 - HEADER_LEN
_HEADER = struct.Struct("<IBBHIIII")
_VET = struct.Struct("<IB15xI")  # conv, cmd, len: the fields vetting needs
_CONV = struct.Struct("<I")


class Command(IntEnum):
    PUSH = 81
    ACK = 82
    WASK = 83
    WINS = 84


_PUSH: Final = int(Command.PUSH)
_ACK: Final = int(Command.ACK)
_WINS: Final = int(Command.WINS)


class RunVerdict(IntEnum):
    """What :func:`vet_run` found in a run of datagrams."""

    INVALID = 0  # at least one datagram is not valid: vet them one by one
    NO_ACKS = 1  # every datagram is valid and none carries an ACK segment
    ACKS = 2  # every datagram is valid; some carry ACK segments


def conv_of(datagram: bytes | memoryview) -> int:
    """The first segment's conv (the datagram must be at least :data:`HEADER_LEN` long)."""
    return int(_CONV.unpack_from(datagram)[0])


@dataclass(frozen=True, kw_only=True, slots=True)
class SegmentHeader:
    conv: int
    cmd: int
    frg: int
    wnd: int
    ts: int
    sn: int
    una: int
    length: int


def first_header(datagram: bytes | memoryview) -> SegmentHeader | None:
    """The first segment's header, or ``None`` when the datagram is shorter than one header."""
    if len(datagram) < HEADER_LEN:
        return None
    conv, cmd, frg, wnd, ts, sn, una, length = _HEADER.unpack_from(datagram, 0)
    return SegmentHeader(conv=conv, cmd=cmd, frg=frg, wnd=wnd, ts=ts, sn=sn, una=una, length=length)


@lru_cache(maxsize=256)
def _bare_headers(count: int) -> struct.Struct:
    """``count`` back-to-back headers, read as (conv, cmd, len) each."""
    return struct.Struct("<" + "IB15xI" * count)


def _bare_datagram(datagram: bytes | memoryview, conv: int, count: int) -> bool:
    """Whether ``datagram`` is ``count`` data-less segments of ``conv`` with known commands (e.g. only ACKs)."""
    fields = _bare_headers(count).unpack_from(datagram)
    commands = fields[1::3]
    return (
        fields[2::3].count(0) == count
        and fields[0::3].count(conv) == count
        and min(commands) >= _PUSH
        and max(commands) <= _WINS
    )


def valid_datagram(datagram: bytes | memoryview, conv: int, *, max_data: int = MAX_DATA) -> bool:
    """Whether every segment has session ``conv``, a known command, and a length that fits exactly.

    ``max_data`` bounds one segment's data (a peer may use a larger MTU than ours: default the UDP limit).
    """
    size = len(datagram)
    if size < HEADER_LEN:
        return False
    if size % HEADER_LEN == 0 and size > HEADER_LEN and _bare_datagram(datagram, conv, size // HEADER_LEN):
        return True  # a datagram of ACKs: checked in one unpack (otherwise the walk below decides)
    offset = 0
    unpack = _VET.unpack_from
    while offset < size:
        if size - offset < HEADER_LEN:
            return False
        seg_conv, cmd, length = unpack(datagram, offset)
        if seg_conv != conv:
            return False
        if cmd != _PUSH and (length or not _PUSH < cmd <= _WINS):
            return False
        offset += HEADER_LEN
        if length > max_data or length > size - offset:
            return False
        offset += length
    return True


def is_new_session(datagram: bytes | memoryview, *, max_data: int = MAX_DATA) -> bool:
    """A sane first datagram of a session: valid, and its first segment is a PUSH of sequence number 0.

    A client that has been talking for a while and lost its server sends PUSH segments with higher numbers;
    those are not taken for a new session (the client's dead-link detection makes it reconnect).
    """
    header = first_header(datagram)
    if header is None or header.cmd != Command.PUSH or header.sn != 0 or header.una != 0:
        return False
    return valid_datagram(datagram, header.conv, max_data=max_data)


@lru_cache(maxsize=128)
def _push_run(step: int, count: int) -> tuple[struct.Struct, tuple[int, ...]]:
    """``count`` datagrams of ``step`` bytes that are one PUSH segment each: the struct reading each one's
    (conv, cmd, len), and the lengths they must have."""
    return struct.Struct("<" + f"IB15xI{step - HEADER_LEN}x" * count), (step - HEADER_LEN,) * count


def _vet_run_at_once(buffer: bytes | memoryview, step: int, conv: int, max_data: int) -> RunVerdict | None:
    """The verdict on the two runs a bulk transfer is made of, read without a walk: datagrams that are one PUSH
    segment each (its data: one unpack), and datagrams of data-less segments only (its ACKs: each header field
    read across the run as one byte string); None for any other run (the walk decides)."""
    size = len(buffer)
    count = -(-size // step)
    last = size - (count - 1) * step
    if last >= HEADER_LEN and step - HEADER_LEN <= max_data:
        reader, lengths = _push_run(step, count - 1)
        fields = reader.unpack_from(buffer)
        if (
            fields[2::3] == lengths
            and fields[1::3].count(_PUSH) == count - 1
            and fields[0::3].count(conv) == count - 1
            and _VET.unpack_from(buffer, size - last) == (conv, _PUSH, last - HEADER_LEN)
        ):
            return RunVerdict.NO_ACKS
    if size % HEADER_LEN == 0 and step % HEADER_LEN == 0:
        headers = size // HEADER_LEN
        data = buffer if isinstance(buffer, bytes) else bytes(buffer)  # (a strided slice of a view is a view)
        commands = data[4::HEADER_LEN]
        if (
            data[0::HEADER_LEN] == _conv_bytes(conv, 0) * headers
            and data[1::HEADER_LEN] == _conv_bytes(conv, 1) * headers
            and data[2::HEADER_LEN] == _conv_bytes(conv, 2) * headers
            and data[3::HEADER_LEN] == _conv_bytes(conv, 3) * headers
            and min(commands) >= _PUSH
            and max(commands) <= _WINS
            and not any(data[20 + i :: HEADER_LEN] != bytes(headers) for i in range(4))
        ):
            return RunVerdict.ACKS if _ACK in commands else RunVerdict.NO_ACKS
    return None


def _conv_bytes(conv: int, index: int) -> bytes:
    """Byte ``index`` of ``conv`` as it lies in a header (little-endian), as a one-byte string."""
    return bytes(((conv >> (8 * index)) & 0xFF,))


def vet_run(buffer: bytes | memoryview, segment: int, conv: int, *, max_data: int = MAX_DATA) -> RunVerdict:
    """Vet a run of datagrams (``segment`` bytes each, the last possibly shorter) in one pass.

    Each datagram must be valid on its own (:func:`valid_datagram`): no segment may cross a datagram boundary.
    The verdict also says whether any ACK segment was seen, because ikcp counts fast-retransmit evidence once
    per input call: only a run without ACKs may be given to ikcp as one input.
    """
    size = len(buffer)
    if size < HEADER_LEN:
        return RunVerdict.INVALID
    step = segment if 0 < segment < size else size
    if step < size:
        quick = _vet_run_at_once(buffer, step, conv, max_data)
        if quick is not None:
            return quick
    boundary = step
    offset = 0
    acks = False
    unpack = _VET.unpack_from
    while offset < size:
        if boundary - offset < HEADER_LEN:
            return RunVerdict.INVALID
        seg_conv, cmd, length = unpack(buffer, offset)
        if seg_conv != conv:
            return RunVerdict.INVALID
        if cmd != _PUSH:
            if length or not _PUSH < cmd <= _WINS:
                return RunVerdict.INVALID
            if cmd == _ACK:
                acks = True
        offset += HEADER_LEN
        if length > max_data or length > boundary - offset:
            return RunVerdict.INVALID
        offset += length
        if offset == boundary:
            boundary = min(boundary + step, size)
    return RunVerdict.ACKS if acks else RunVerdict.NO_ACKS


#: what a datagram's first segment says about its age: cmd, ts, una (conv, frg, wnd, sn and len skipped)
_MARKS = struct.Struct("<4xB3xI4xI")
_SERIAL_MASK = 0xFFFFFFFF
_SERIAL_HALF = 1 << 31


class NewestMarks:
    """The newest marks a keyless session's peer has shown, from the first segment of each datagram it took.

    A KCP peer's datagrams carry three marks that only grow as it goes on: ``una`` (the peer's next expected
    sequence number, in every segment), the ``ts`` of a PUSH (the peer's clock when it sent, retransmissions
    included) and the ``ts`` of an ACK (the echo of our own segment's time). A datagram is newer when one of its
    marks is beyond the highest of that mark seen; a copy of any datagram the session already took never is
    (while the marks seen span less than half the 32-bit serial space: 24 days of ``ts``). Only the first
    segment is read, for the record and for the test alike, so the rule holds exactly.
    """

    __slots__ = ("ack_ts", "push_ts", "una")

    def __init__(self) -> None:
        self.una: int | None = None  # (no mark is seen before the first datagram: not even una 0)
        self.push_ts: int | None = None
        self.ack_ts: int | None = None

    def note(self, datagram: bytes | memoryview, offset: int = 0) -> bool:
        """Take the marks of the datagram at ``offset``; whether any was beyond what was seen (it is newer)."""
        cmd, ts, una = _MARKS.unpack_from(datagram, offset)
        newer = False
        # each mark is newer when it comes after the highest seen in 32-bit serial arithmetic (KCP's ts and una
        # wrap): 0 < (mark - seen) mod 2^32 < 2^31, written out in each test (this runs for every datagram)
        if self.una is None or 0 < ((una - self.una) & _SERIAL_MASK) < _SERIAL_HALF:
            self.una = una
            newer = True
        if cmd == _PUSH:
            if self.push_ts is None or 0 < ((ts - self.push_ts) & _SERIAL_MASK) < _SERIAL_HALF:
                self.push_ts = ts
                newer = True
        elif cmd == _ACK and (self.ack_ts is None or 0 < ((ts - self.ack_ts) & _SERIAL_MASK) < _SERIAL_HALF):
            self.ack_ts = ts
            newer = True
        return newer
