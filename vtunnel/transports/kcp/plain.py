"""The plain codec: KCP datagrams as they are, wire-compatible with other KCPs.

A listener keys sessions by conv, so a client whose address changes (NAT rebinding) keeps its tunnel and the
server follows its new address; conv-0 sessions (vproxy) are keyed by source address instead. Datagrams that
are not valid KCP for a known session are dropped without an answer. Without a key nothing can be
authenticated, but a session moves to a new address only on a datagram newer than any it has taken
(:class:`~vtunnel.arq.kcp_wire.NewestMarks`): a copy of one of its old datagrams, sent from elsewhere, is dropped
and does not move it. A client takes datagrams from its server's address only.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeAlias, TypeVar

from vtunnel.arq.kcp_wire import HEADER_LEN, NewestMarks, conv_of
from vtunnel.io.datagrams import Address, Run, split_run
from vtunnel.transports.kcp.codec import ClientCodec, Datagram, ListenerCodec, RoutedLink, Runs, Send, Stray

__all__ = ["KeylessListenerCodec", "Marks", "PlainClientCodec", "PlainKey", "PlainListenerCodec", "kcp_key"]

#: a plain KCP session's key: its conv, or its source address when conv is 0
PlainKey: TypeAlias = int | Address

K = TypeVar("K", bound=Hashable)


class Marks(Protocol):
    """What a keyless session's peer has shown so far: whether a datagram of it is newer than all it sent before
    (:class:`~vtunnel.arq.kcp_wire.NewestMarks` reads KCP's; rudp reads its packet number)."""

    def note(self, datagram: Datagram, offset: int = 0) -> bool:
        """Take the datagram at ``offset``; whether it is newer than any taken."""


def kcp_key(datagram: Datagram, source: Address) -> PlainKey | None:
    """A plain KCP datagram's session: its conv, or its source address for conv 0 (vproxy's)."""
    if len(datagram) < HEADER_LEN:
        return None
    return conv_of(datagram) or source


class KeylessListenerCodec(ListenerCodec[K], Generic[K]):
    """A listener's plain datagrams, for any ARQ: sessions keyed by ``key_of``, followed to a new address on a
    datagram newer than any the session took (a new ``marks()`` per session says which), nothing answered. With
    ``admit``, a datagram starts a session only from a source host it admits (the others are dropped)."""

    def __init__(
        self,
        key_of: Callable[[Datagram, Address], K | None],
        marks: Callable[[], Marks],
        admit: Callable[[str], bool] | None = None,
    ) -> None:
        self._key_of = key_of
        self._new_marks = marks
        self._admit = admit
        #: the newest marks each session's peer has shown (what may move it to a new address)
        self._marks: dict[K, Marks] = {}

    def attach(self, send: Send, *, sessions: int) -> None:
        pass  # nothing is ever answered

    def key_of(self, datagram: Datagram, source: Address) -> K | None:
        return self._key_of(datagram, source)

    def open(
        self, key: K, link: RoutedLink | None, datagram: Datagram, source: Address, now: float
    ) -> tuple[Datagram | None, Address]:
        if link is None:
            admit = self._admit
            return (datagram if admit is None or admit(source[0]) else None), source
        address = link.remote_address
        if not link.accepts(datagram):
            return None, address
        newer = self._marks[key].note(datagram)
        if source == address or newer:
            return datagram, source
        return None, address  # nothing newer than the session took: a copy of an old datagram, or a late one

    def open_run(self, key: K, link: RoutedLink, runs: Runs, into: list[Datagram], stray: Stray) -> int:
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
        return False  # no session's header: nothing to answer

    def session_started(self, key: K, first: Datagram, address: Address) -> None:
        marks = self._marks[key] = self._new_marks()
        marks.note(first)

    def forget(self, key: K) -> None:
        self._marks.pop(key, None)

    def close(self) -> None:
        self._marks.clear()


class PlainListenerCodec(KeylessListenerCodec[PlainKey]):
    """A listener's plain KCP datagrams: keyed by conv (or source address for conv 0), followed to a new address
    on a newer datagram (:class:`~vtunnel.arq.kcp_wire.NewestMarks`), nothing answered."""

    def __init__(self, admit: Callable[[str], bool] | None = None) -> None:
        super().__init__(kcp_key, NewestMarks, admit)

    key_of = staticmethod(kcp_key)  # (the same, one call less per datagram)


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
