"""What a listener does when the process runs out of descriptors, buffers or memory.

A server must never stop because the kernel refused it a resource: ``accept`` failing with EMFILE (this process is
at its descriptor limit), ENFILE (the whole system is), ENOBUFS or ENOMEM leaves the waiting connection in the
listen backlog, so the listener pauses, frees what it can (the oldest connections that have not authenticated
yet), says so at most once per :data:`WARN_INTERVAL` and tries again by itself.

:func:`raise_open_file_limit` lifts the soft descriptor limit to the hard one when a program starts, and
:func:`pending_limit` keeps the number of connections allowed to sit in their handshake well below whatever limit
is in force, so that unauthenticated peers alone can never use up the descriptors.
"""

from __future__ import annotations

import errno
import time
from typing import Any, Final

__all__ = [
    "OUT_OF_RESOURCES",
    "WARN_INTERVAL",
    "AcceptBackoff",
    "ThrottledWarning",
    "is_out_of_resources",
    "open_file_limit",
    "pending_limit",
    "raise_open_file_limit",
]

#: errors that mean "not now" rather than "never": the kernel is short of descriptors, buffers or memory
OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: seconds between two warnings about the same shortage
WARN_INTERVAL: Final = 10.0
#: the first and the longest pause of an accept loop that the kernel refuses resources (seconds)
ACCEPT_RETRY_MIN: Final = 0.05
ACCEPT_RETRY_MAX: Final = 1.0
#: the most connections that may be in their handshake at once, whatever the descriptor limit
DEFAULT_MAX_PENDING: Final = 1024


def is_out_of_resources(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in OUT_OF_RESOURCES


def _resource() -> Any:
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    return resource


def open_file_limit() -> int | None:
    """The soft limit on open descriptors, or ``None`` where there is none to read."""
    resource = _resource()
    if resource is None:
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def raise_open_file_limit() -> tuple[int, int] | None:
    """Lift the soft descriptor limit to the hard one (as far as the kernel allows); returns (before, after)."""
    resource = _resource()
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft, soft
    target = hard
    if hard == resource.RLIM_INFINITY:
        # an unlimited hard limit still cannot go past the kernel's per-process ceiling
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target


def pending_limit(requested: int = DEFAULT_MAX_PENDING) -> int:
    """How many connections may wait in their handshake: ``requested``, and at most a quarter of the descriptor
    limit, so that established tunnels and the connections they dial keep the rest."""
    soft = open_file_limit()
    if soft is None:
        return requested
    return max(8, min(requested, soft // 4))


class ThrottledWarning:
    """A warning logged at most once per ``interval`` seconds; the ones held back are counted in the next."""

    __slots__ = ("_event", "_interval", "_last", "_log", "_suppressed")

    def __init__(self, log: Any, event: str, *, interval: float = WARN_INTERVAL) -> None:
        self._log = log
        self._event = event
        self._interval = interval
        self._last = -float("inf")
        self._suppressed = 0

    def __call__(self, **fields: Any) -> bool:
        """Log now if the interval has passed since the last one (returns whether it did)."""
        now = time.monotonic()
        if now - self._last < self._interval:
            self._suppressed += 1
            return False
        self._last = now
        if self._suppressed:
            fields["suppressed"] = self._suppressed
            self._suppressed = 0
        self._log.warning(self._event, **fields)
        return True


class AcceptBackoff:
    """How long an accept loop that the kernel refuses resources waits before it looks again: from
    :data:`ACCEPT_RETRY_MIN`, doubling up to :data:`ACCEPT_RETRY_MAX`; back to the start once an accept works."""

    __slots__ = ("_delay",)

    def __init__(self) -> None:
        self._delay = ACCEPT_RETRY_MIN

    def next(self) -> float:
        delay = self._delay
        self._delay = min(delay * 2, ACCEPT_RETRY_MAX)
        return delay

    def reset(self) -> None:
        self._delay = ACCEPT_RETRY_MIN
