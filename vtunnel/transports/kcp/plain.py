"""The plain codec: KCP datagrams as they are, wire-compatible with other KCPs.

A listener keys sessions by conv, so a client whose address changes (NAT rebinding) keeps its tunnel and the
server follows its new address; conv-0 sessions (vproxy) are keyed by source address instead. Datagrams that
are not valid KCP for a known session are dropped without an answer; a new session starts only from a PUSH
with sequence number 0 (the router asks the link's rule).

Without a key nothing can be authenticated, but a session moves to a new address only on a datagram that is
newer than any the session has taken (:class:`NewestMarks`): a copy of one of its old datagrams, sent from
elsewhere, is dropped and does not move it. A client takes datagrams from its server's address only.
"""

from __future__ import annotations

import struct
from typing import TypeAlias

from vtunnel.arq.kcp_wire import HEADER_LEN, Command, conv_of
from vtunnel.io.datagrams import Address, Run, split_run
from vtunnel.transports.kcp.codec import ClientCodec, Datagram, ListenerCodec, RoutedLink, Send, Stray

__all__ = ["NewestMarks", "PlainClientCodec", "PlainKey", "PlainListenerCodec"]

#: a plain session's key: its conv, or its source address when conv is 0
PlainKey: TypeAlias = int | Address

#: what a datagram's first segment says about its age: cmd, ts, una (conv, frg, wnd, sn and len skipped)
_MARKS = struct.Struct("<4xB3xI4xI")
_PUSH = int(Command.PUSH)
_ACK = int(Command.ACK)
_SERIAL_MASK = 0xFFFFFFFF
_SERIAL_HALF = 1 << 31


def _after(a: int, b: int) -> bool:
    """``a`` comes after ``b`` in 32-bit serial number arithmetic (KCP's ts and una wrap)."""
    return 0 < ((a - b) & _SERIAL_MASK) < _SERIAL_HALF


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
        self.una = 0
        self.push_ts: int | None = None
        self.ack_ts: int | None = None

    def note(self, datagram: bytes | memoryview, offset: int = 0) -> bool:
        """Take the marks of the datagram at ``offset``; whether any was beyond what was seen (it is newer)."""
        cmd, ts, una = _MARKS.unpack_from(datagram, offset)
        newer = False
        if _after(una, self.una):
            self.una = una
            newer = True
        if cmd == _PUSH:
            if self.push_ts is None or _after(ts, self.push_ts):
                self.push_ts = ts
                newer = True
        elif cmd == _ACK and (self.ack_ts is None or _after(ts, self.ack_ts)):
            self.ack_ts = ts
            newer = True
        return newer


class PlainListenerCodec(ListenerCodec[PlainKey]):
    """A listener's plain KCP datagrams: keyed by conv (or source address for conv 0), followed to a new address
    on a newer datagram (:class:`NewestMarks`), nothing answered."""

    def __init__(self) -> None:
        #: the newest marks each session's peer has shown (what may move it to a new address)
        self._marks: dict[PlainKey, NewestMarks] = {}

    def attach(self, send: Send, *, sessions: int) -> None:
        pass  # nothing is ever answered

    def key_of(self, datagram: Datagram, source: Address) -> PlainKey | None:
        if len(datagram) < HEADER_LEN:
            return None
        return conv_of(datagram) or source

    def open(
        self, key: PlainKey, link: RoutedLink | None, datagram: Datagram, source: Address, now: float
    ) -> tuple[Datagram | None, Address]:
        if link is None:
            return datagram, source
        address = link.remote_address
        if not link.accepts(datagram):
            return None, address
        newer = self._marks[key].note(datagram)
        if source == address or newer:
            return datagram, source
        return (
            None,
            address,
        )  # nothing newer than what the session took: a copy of an old datagram, or a late one

    def open_run(
        self,
        key: PlainKey,
        link: RoutedLink,
        runs: list[tuple[bytes, int]],
        into: list[Datagram],
        stray: Stray,
    ) -> int:
        note = self._marks[key].note
        for buffer, segment in runs:
            if link.take_run(buffer, segment, into):
                for offset in range(0, len(buffer), segment):
                    note(buffer, offset)
            else:
                for datagram in split_run(buffer, segment):
                    stray(datagram)
        return 0

    def stranger(self, datagram: Datagram, source: Address, now: float) -> bool:
        return False  # shorter than a KCP header: nothing to answer

    def session_started(self, key: PlainKey) -> None:
        self._marks[key] = NewestMarks()

    def forget(self, key: PlainKey) -> None:
        self._marks.pop(key, None)

    def close(self) -> None:
        self._marks.clear()


class PlainClientCodec(ClientCodec):
    """A client's plain KCP datagrams: no handshake; what comes from the server's address, vetted (the socket is
    not connected: see :func:`~vtunnel.io.datagrams.open_client_socket`)."""

    def __init__(self) -> None:
        self._server: Address | None = None

    def attach(self, send: Send, server: Address) -> None:
        self._server = server

    @property
    def established(self) -> bool:
        return True  # no handshake

    async def handshake(self, timeout: float) -> None:
        pass

    def receive_handshake(self, datagram: Datagram) -> None:
        pass

    def sealer(self) -> None:
        return None

    def open(self, runs: list[Run], link: RoutedLink, into: list[Datagram]) -> None:
        server = self._server
        for buffer, segment, source in runs:
            if source != server:
                continue
            if not link.take_run(buffer, segment, into) and segment < len(buffer):
                into.extend(datagram for datagram in split_run(buffer, segment) if link.accepts(datagram))
        return None
