"""Keepalive bookkeeping (vproxy's rule): PING after an idle interval, dead after N missed acks."""

from __future__ import annotations

from enum import Enum, auto

__all__ = ["Keepalive", "KeepaliveAction"]


class KeepaliveAction(Enum):
    NOTHING = auto()
    SEND_PING = auto()
    DEAD = auto()


class Keepalive:
    """Tracks the last received byte and the outstanding PING. Pure: time comes in as ``now``.

    Any frame from the peer proves it alive, so a late ack behind bulk data is not a miss.
    """

    __slots__ = ("counter", "interval", "last_recv", "max_missed", "missed", "sent_at", "timeout")

    def __init__(self, *, interval: float, timeout: float, max_missed: int) -> None:
        self.interval = interval
        self.timeout = timeout
        self.max_missed = max_missed
        self.last_recv = 0.0
        self.counter = 0  # the number of the last PING sent (the first is 1)
        self.sent_at: float | None = None  # when the outstanding PING went out
        self.missed = 0

    def received(self, now: float) -> None:
        self.last_recv = now

    def acknowledged(self, counter: int) -> bool:
        """A PING ack arrived; True if it answers the outstanding PING."""
        if self.sent_at is None or counter != self.counter:
            return False
        self.sent_at = None
        self.missed = 0
        return True

    def deadline(self) -> float:
        if self.sent_at is not None:
            return self.sent_at + self.timeout
        return self.last_recv + self.interval

    def poll(self, now: float) -> KeepaliveAction:
        if self.sent_at is not None:
            # a byte at the very instant of the PING counts: a receive before it, at that instant, would have
            # made the PING unnecessary (the interval or the previous PING's answer), so it came after
            if self.last_recv >= self.sent_at:
                self.sent_at = None  # the peer is talking: alive even if the ack is late
                self.missed = 0
            elif now >= self.sent_at + self.timeout:
                self.missed += 1
                if self.missed >= self.max_missed:
                    self.sent_at = None
                    return KeepaliveAction.DEAD
                return self._ping(now)
        if self.sent_at is None and now >= self.last_recv + self.interval:
            return self._ping(now)
        return KeepaliveAction.NOTHING

    def stop(self) -> None:
        self.sent_at = None

    def _ping(self, now: float) -> KeepaliveAction:
        self.counter += 1
        self.sent_at = now
        return KeepaliveAction.SEND_PING
