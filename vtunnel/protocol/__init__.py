"""vtunnel.protocol: the sans-IO tunnel core (vproxy's streamed-ARQ protocol plus negotiated extensions)."""

from vtunnel.protocol import events
from vtunnel.protocol.errors import (
    ConfigError,
    ErrorCode,
    FlowControlError,
    LocalProtocolError,
    MetadataNotNegotiated,
    RemoteProtocolError,
    StreamClosedError,
    VTunnelError,
)
from vtunnel.protocol.metadata import StreamMetadata
from vtunnel.protocol.settings import Extensions, TunnelConfig
from vtunnel.protocol.stream_machine import StreamState
from vtunnel.protocol.tunnel import Role, Tunnel
from vtunnel.protocol.tunnel_machine import TunnelState

__all__ = [
    "ConfigError",
    "ErrorCode",
    "Extensions",
    "FlowControlError",
    "LocalProtocolError",
    "MetadataNotNegotiated",
    "RemoteProtocolError",
    "Role",
    "StreamClosedError",
    "StreamMetadata",
    "StreamState",
    "Tunnel",
    "TunnelConfig",
    "TunnelState",
    "VTunnelError",
    "events",
]
