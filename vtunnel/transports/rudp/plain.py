"""rudp's keyless datagrams: the shared keyless codec (:class:`~vtunnel.transports.kcp.plain.KeylessListenerCodec`)
keyed by rudp's own connection ID.

Without a key the client chooses the server's connection ID (8 random bytes, in every packet it sends) and
none for itself; the listener keys sessions by it, so a client whose address changes keeps its tunnel, and a
session moves to a new address only on a packet numbered above every one it took (a copy of an old packet, sent
from elsewhere, never moves it). Nothing is answered. The client side is the shared
:class:`~vtunnel.transports.kcp.plain.PlainClientCodec`.
"""

from __future__ import annotations

from collections.abc import Callable

from vtunnel.arq.rudp.wire import WireError, peek_dcid, peek_number
from vtunnel.io.datagrams import Address
from vtunnel.transports.kcp.codec import Datagram
from vtunnel.transports.kcp.plain import KeylessListenerCodec

__all__ = ["NewestNumber", "rudp_key", "rudp_plain_codec"]


def rudp_key(datagram: Datagram, source: Address) -> bytes | None:
    """A keyless rudp packet's session: its destination connection ID (None: none, or not an rudp packet)."""
    try:
        return peek_dcid(datagram) or None
    except WireError:
        return None


class NewestNumber:
    """The highest packet number a keyless session's peer has shown: a packet is newer when it is above it."""

    __slots__ = ("highest",)

    def __init__(self) -> None:
        self.highest = -1

    def note(self, datagram: Datagram, offset: int = 0) -> bool:
        try:
            number = peek_number(datagram, offset)
        except WireError:
            return False
        if number <= self.highest:
            return False
        self.highest = number
        return True


def rudp_plain_codec(admit: Callable[[str], bool] | None = None) -> KeylessListenerCodec[bytes]:
    """A listener's codec for keyless rudp (``admit``: :class:`KeylessListenerCodec`'s)."""
    return KeylessListenerCodec(rudp_key, NewestNumber, admit)
