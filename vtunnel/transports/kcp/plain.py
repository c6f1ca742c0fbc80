"""The plain codec: KCP datagrams as they are, wire-compatible with other KCPs.

A listener keys sessions by conv, so a client whose address changes (NAT rebinding) keeps its tunnel and the
server follows its new address; conv-0 sessions (vproxy) are keyed by source address instead. Datagrams that
are not valid KCP for a known session are dropped without an answer. Without a key nothing can be
authenticated, but a session moves to a new address only on a datagram newer than any it has taken
(:class:`~vtunnel.arq.kcp_wire.NewestMarks`): a copy of one of its old datagrams, sent from elsewhere, is dropped
and does not move it. A client takes datagrams from its server's address only.
"""

from __future__ import annotations

from typing import TypeAlias

from vtunnel.arq.kcp_wire import HEADER_LEN, NewestMarks, conv_of
from vtunnel.io.datagrams import Address, Run, split_run
from vtunnel.transports.kcp.codec import ClientCodec, Datagram, ListenerCodec, RoutedLink, Runs, Send, Stray

__all__ = ["PlainClientCodec", "PlainKey", "PlainListenerCodec"]

#: a plain session's key: its conv, or its source address when conv is 0
PlainKey: TypeAlias = int | Address


class PlainListenerCodec(ListenerCodec[PlainKey]):
    """A listener's plain KCP datagrams: keyed by conv (or source address for conv 0), followed to a new address
    on a newer datagram, nothing answered."""

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
        return None, address  # nothing newer than the session took: a copy of an old datagram, or a late one

    def open_run(
        self, key: PlainKey, link: RoutedLink, runs: Runs, into: list[Datagram], stray: Stray
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

    def session_started(self, key: PlainKey, first: Datagram) -> None:
        marks = self._marks[key] = NewestMarks()
        marks.note(first)

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

    async def handshake(self, timeout: float) -> None:
        return None  # no handshake, nothing sealed

    def open(self, runs: list[Run], link: RoutedLink | None, into: list[Datagram]) -> None:
        server = self._server
        for buffer, segment, source in runs:
            if source != server or link is None:
                continue
            if not link.take_run(buffer, segment, into) and segment < len(buffer):
                into.extend(datagram for datagram in split_run(buffer, segment) if link.accepts(datagram))
        return None
