"""Errors the runtime raises to the applications above it."""

from __future__ import annotations

import anyio

__all__ = ["DestinationNotCarried", "StreamRefused", "TunnelUnavailable"]


class TunnelUnavailable(Exception):
    """No tunnel to the server could be used (not connected, reconnecting, or shut down)."""


class StreamRefused(anyio.BrokenResourceError):
    """The server answered a stream's SYN with an RST (a kind of broken stream, so relays treat it as one).

    ``error`` is the server's reason when the peer sends one (``"refused"``, ``"unreachable"``, ``"forbidden"``,
    ``"timeout"``, ``"failed"``), or ``None`` for a plain vproxy RST.
    """

    def __init__(self, error: str | None = None) -> None:
        super().__init__(f"stream refused by the server: {error or 'reset'}")
        self.error = error


class DestinationNotCarried(StreamRefused):
    """Refused before anything was sent: the tunnel cannot name this stream's destination (or kind) to the server,
    which did not agree to the ``metadata`` extension (a vproxy server). Without it the server would send the
    stream to its own default target, so the stream is never opened. ``error`` is ``"unsupported"``."""

    def __init__(self, reason: str) -> None:
        super().__init__("unsupported")
        self.args = (f"stream not opened: {reason}",)
        self.reason = reason
