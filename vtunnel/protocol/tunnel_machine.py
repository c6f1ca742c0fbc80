"""Tunnel state machine: ONE transition table.

Inputs starting with ``RECV_`` or ending in ``_TIMEOUT`` come from the peer or the clock; a pair missing
from the table for them is the peer's protocol error (the tunnel sends GOAWAY and closes). A missing pair for
a local input (``INITIATE``, ``OPEN_STREAM``) is our own misuse and raises ``LocalProtocolError``.
"""

from __future__ import annotations

from enum import Enum, auto

__all__ = ["TUNNEL_TRANSITIONS", "TunnelEffect", "TunnelInput", "TunnelState"]


class TunnelState(Enum):
    __hash__ = object.__hash__  # members are singletons: identity hashing is C-fast

    INIT = "init"
    HANDSHAKE_SENT = "handshake_sent"
    READY = "ready"
    DRAINING = "draining"
    CLOSED = "closed"


class TunnelInput(Enum):
    __hash__ = object.__hash__  # members are singletons: identity hashing is C-fast

    INITIATE = auto()  # client: send the SETTINGS handshake
    RECV_HANDSHAKE = auto()  # a SETTINGS frame arrived
    RECV_FRAME = auto()  # any other known frame arrived
    RECV_GOAWAY = auto()  # the peer shut the tunnel down
    RECV_GOAWAY_GRACEFUL = auto()  # the peer asks to drain
    SEND_GOAWAY = auto()  # we shut the tunnel down now
    SEND_GOAWAY_GRACEFUL = auto()  # we start draining
    OPEN_STREAM = auto()  # client: a new stream
    HANDSHAKE_TIMEOUT = auto()
    KEEPALIVE_TIMEOUT = auto()
    DRAIN_DONE = auto()  # the last live stream finished, or the drain timeout passed

    @property
    def is_local(self) -> bool:
        return self in (TunnelInput.INITIATE, TunnelInput.OPEN_STREAM)


class TunnelEffect(Enum):
    __hash__ = object.__hash__  # members are singletons: identity hashing is C-fast

    SEND_HANDSHAKE = auto()
    ANSWER_HANDSHAKE = auto()  # server: check the peer's SETTINGS and answer
    COMPLETE_HANDSHAKE = auto()  # client: check the server's SETTINGS
    DISPATCH = auto()  # hand the frame to the stream/keepalive/flow-control logic
    PEER_CLOSED = auto()
    PEER_DRAIN = auto()
    CLOSE = auto()  # send GOAWAY, every stream dead
    START_DRAIN = auto()
    FINISH_DRAIN = auto()
    ALLOW = auto()
    IGNORE = auto()


T = TunnelState
In = TunnelInput
Ef = TunnelEffect

TUNNEL_TRANSITIONS: dict[tuple[TunnelState, TunnelInput], tuple[TunnelEffect, TunnelState]] = {
    (T.INIT, In.INITIATE): (Ef.SEND_HANDSHAKE, T.HANDSHAKE_SENT),
    (T.INIT, In.RECV_HANDSHAKE): (Ef.ANSWER_HANDSHAKE, T.READY),
    (T.INIT, In.RECV_GOAWAY): (Ef.PEER_CLOSED, T.CLOSED),
    (T.INIT, In.RECV_GOAWAY_GRACEFUL): (Ef.PEER_CLOSED, T.CLOSED),
    (T.INIT, In.SEND_GOAWAY): (Ef.CLOSE, T.CLOSED),
    (T.INIT, In.SEND_GOAWAY_GRACEFUL): (Ef.CLOSE, T.CLOSED),
    (T.INIT, In.HANDSHAKE_TIMEOUT): (Ef.CLOSE, T.CLOSED),
    (T.HANDSHAKE_SENT, In.RECV_HANDSHAKE): (Ef.COMPLETE_HANDSHAKE, T.READY),
    (T.HANDSHAKE_SENT, In.RECV_GOAWAY): (Ef.PEER_CLOSED, T.CLOSED),
    (T.HANDSHAKE_SENT, In.RECV_GOAWAY_GRACEFUL): (Ef.PEER_CLOSED, T.CLOSED),
    (T.HANDSHAKE_SENT, In.SEND_GOAWAY): (Ef.CLOSE, T.CLOSED),
    (T.HANDSHAKE_SENT, In.SEND_GOAWAY_GRACEFUL): (Ef.CLOSE, T.CLOSED),
    (T.HANDSHAKE_SENT, In.HANDSHAKE_TIMEOUT): (Ef.CLOSE, T.CLOSED),
    (T.READY, In.RECV_FRAME): (Ef.DISPATCH, T.READY),
    (T.READY, In.RECV_GOAWAY): (Ef.PEER_CLOSED, T.CLOSED),
    (T.READY, In.RECV_GOAWAY_GRACEFUL): (Ef.PEER_DRAIN, T.DRAINING),
    (T.READY, In.SEND_GOAWAY): (Ef.CLOSE, T.CLOSED),
    (T.READY, In.SEND_GOAWAY_GRACEFUL): (Ef.START_DRAIN, T.DRAINING),
    (T.READY, In.OPEN_STREAM): (Ef.ALLOW, T.READY),
    (T.READY, In.KEEPALIVE_TIMEOUT): (Ef.CLOSE, T.CLOSED),
    (T.DRAINING, In.RECV_FRAME): (Ef.DISPATCH, T.DRAINING),
    (T.DRAINING, In.RECV_GOAWAY): (Ef.PEER_CLOSED, T.CLOSED),
    (T.DRAINING, In.RECV_GOAWAY_GRACEFUL): (Ef.PEER_DRAIN, T.DRAINING),
    (T.DRAINING, In.SEND_GOAWAY): (Ef.CLOSE, T.CLOSED),
    (T.DRAINING, In.SEND_GOAWAY_GRACEFUL): (Ef.IGNORE, T.DRAINING),
    (T.DRAINING, In.KEEPALIVE_TIMEOUT): (Ef.CLOSE, T.CLOSED),
    (T.DRAINING, In.DRAIN_DONE): (Ef.FINISH_DRAIN, T.CLOSED),
    (T.CLOSED, In.RECV_HANDSHAKE): (Ef.IGNORE, T.CLOSED),
    (T.CLOSED, In.RECV_FRAME): (Ef.IGNORE, T.CLOSED),
    (T.CLOSED, In.RECV_GOAWAY): (Ef.IGNORE, T.CLOSED),
    (T.CLOSED, In.RECV_GOAWAY_GRACEFUL): (Ef.IGNORE, T.CLOSED),
    (T.CLOSED, In.SEND_GOAWAY): (Ef.IGNORE, T.CLOSED),
    (T.CLOSED, In.SEND_GOAWAY_GRACEFUL): (Ef.IGNORE, T.CLOSED),
    (T.CLOSED, In.HANDSHAKE_TIMEOUT): (Ef.IGNORE, T.CLOSED),
    (T.CLOSED, In.KEEPALIVE_TIMEOUT): (Ef.IGNORE, T.CLOSED),
    (T.CLOSED, In.DRAIN_DONE): (Ef.IGNORE, T.CLOSED),
}
