"""rudp: vtunnel's own reliable-UDP ARQ, sans-IO (``docs/rudp.md`` has the wire format).

``wire`` (packets and frames), ``ranges`` (interval sets), ``recovery`` (RTT, loss detection, PTO, ACK
tracking: RFC 9002), ``cc`` (NewReno, CUBIC, a BBR-style delivery-rate model, the pacer), ``connection`` (the
connection a transport drives: datagrams and ``now`` in; datagrams, bytes, events and the next deadline out).
"""

from .connection import (
    INITIAL_MAX_DATA,
    Connection,
    ConnectionClosed,
    ConnectionState,
    DatagramReceived,
    ErrorCode,
    Event,
    Role,
    RudpConfig,
    RudpError,
    RudpLocalError,
    SendRoomAvailable,
    StreamEnded,
    StreamReadable,
)
from .wire import WireError

__all__ = [
    "INITIAL_MAX_DATA",
    "Connection",
    "ConnectionClosed",
    "ConnectionState",
    "DatagramReceived",
    "ErrorCode",
    "Event",
    "Role",
    "RudpConfig",
    "RudpError",
    "RudpLocalError",
    "SendRoomAvailable",
    "StreamEnded",
    "StreamReadable",
    "WireError",
]
