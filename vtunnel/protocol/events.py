"""Events returned by :class:`vtunnel.protocol.Tunnel` (frozen, keyword-only, slotted)."""

from __future__ import annotations

from dataclasses import dataclass

from vtunnel.protocol.errors import RemoteProtocolError
from vtunnel.protocol.metadata import StreamMetadata
from vtunnel.protocol.settings import Extensions

__all__ = [
    "DataReceived",
    "Event",
    "GoAwayReceived",
    "HandshakeCompleted",
    "PingAcknowledged",
    "StreamAccepted",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "TunnelClosed",
    "WindowUpdated",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    """Base class of all events."""


@dataclass(frozen=True, kw_only=True, slots=True)
class HandshakeCompleted(Event):
    """The SETTINGS handshake finished; ``extensions`` is what both sides agreed on; ``splice_port``: the port
    of the peer's lite-tls splice listener, as it announced it (only with lite-tls agreed), or None."""

    extensions: Extensions
    splice_port: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamOpened(Event):
    """Server side: the peer opened a stream (SYN). Answer with ``accept_stream`` or ``reset_stream``."""

    stream_id: int
    metadata: StreamMetadata | None


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamAccepted(Event):
    """Client side: the server answered our SYN with a SYN-ACK (``headers``: what its header block said, with the
    metadata extension; a ``tun`` stream's addresses, for one)."""

    stream_id: int
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class DataReceived(Event):
    """Bytes for a stream. Acknowledge them once consumed.

    On a ``udp`` stream each event is one datagram. On a byte stream, consecutive DATA frames of the stream
    within one ``receive_data`` input arrive as one event (frame boundaries carry no meaning there); PASSTHROUGH
    frames (lite-tls) and ordinary ones are never joined: ``passthrough`` says which kind an event holds.
    """

    stream_id: int
    data: bytes
    passthrough: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamEnded(Event):
    """The peer sent FIN: nothing more will arrive on this stream (it may still be written to)."""

    stream_id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamReset(Event):
    """The stream is dead: the peer reset it, or the core did (``error`` says why when known)."""

    stream_id: int
    error: str | None = None
    by_peer: bool = True


@dataclass(frozen=True, kw_only=True, slots=True)
class WindowUpdated(Event):
    """More may be sent on ``stream_id``: its own window grew, or the tunnel's, which had cut the stream's
    ``send_window`` short (only the streams it held back are told of a tunnel-wide WINDOW_UPDATE)."""

    stream_id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class PingAcknowledged(Event):
    """The peer answered our keepalive PING number ``counter``."""

    counter: int


@dataclass(frozen=True, kw_only=True, slots=True)
class GoAwayReceived(Event):
    """The peer sent a graceful GOAWAY: streams up to ``last_stream_id`` go on, no new ones open."""

    last_stream_id: int
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class TunnelClosed(Event):
    """The tunnel is closed and every stream is dead. ``error`` is set when the peer broke the protocol."""

    reason: str
    by_peer: bool
    error: RemoteProtocolError | None = None
