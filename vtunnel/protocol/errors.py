"""Errors of the tunnel protocol core.

Rule (one for the whole core): a fault of the *peer* never raises out of ``receive_data``/``handle_timer``.
The core answers it on the wire (a GOAWAY naming the fault for tunnel faults, an RST for stream faults), and
reports it as an event: ``TunnelClosed(..., error=RemoteProtocolError)`` or ``StreamReset(..., error=...)``.
Everything it queued can still be flushed with ``data_to_send()``.  Our *own* misuse of the API raises
``LocalProtocolError`` (or one of its subclasses) and changes nothing.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "ConfigError",
    "ErrorCode",
    "FlowControlError",
    "LocalProtocolError",
    "MetadataNotNegotiated",
    "RemoteProtocolError",
    "StreamClosedError",
    "VTunnelError",
]


class ErrorCode(IntEnum):
    """Wire error codes (HTTP/2 numbering; vproxy's shutdown always carries ``VPROXY``)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    ENHANCE_YOUR_CALM = 0xB
    VPROXY = 0xFFFFFFFF


class VTunnelError(Exception):
    """Base class of every error the protocol core raises."""


class ConfigError(VTunnelError, ValueError):
    """A TunnelConfig or StreamMetadata value is out of range or of the wrong type."""


class LocalProtocolError(VTunnelError):
    """We used the API in a way the protocol does not allow; nothing was changed."""


class FlowControlError(LocalProtocolError):
    """Sending more than ``send_window(stream_id)`` allows."""


class StreamClosedError(LocalProtocolError):
    """Sending on a stream that is dead, closed or unknown."""


class MetadataNotNegotiated(LocalProtocolError):
    """Opening a stream whose metadata (a destination, a kind other than ``tcp``, extra headers) the SYN cannot
    carry, because the peer did not agree to the ``metadata`` extension (a vproxy peer). Sending the SYN without
    it would let the peer send the stream anywhere it likes (its default target), so nothing is sent."""


class RemoteProtocolError(VTunnelError):
    """The peer broke the protocol. The core has already queued its answer (GOAWAY or RST)."""

    def __init__(self, reason: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code

    def __repr__(self) -> str:
        return f"RemoteProtocolError({self.reason!r}, code={self.code.name})"
