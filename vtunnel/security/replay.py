"""Replay protection and handshake rate limits (sans-IO: every method takes ``now``).

- :class:`ReplayCache` remembers the anti-replay nonce of every accepted first handshake message for as long
  as its timestamp stays inside the acceptance window, so a replayed first message is refused.
- :class:`HandshakeLimiter` is a token bucket per source address.
- :class:`ResetLimiter` bounds stateless resets per source address and in total (a reset answers a stranger).
- :class:`ReplayWindow` is the sliding window of received datagram counters (RFC 6479's idea, as WireGuard
  uses it).

All three have bounded memory.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

__all__ = ["HandshakeLimiter", "ReplayCache", "ReplayWindow", "ResetLimiter"]


class ReplayCache:
    """Remembers handshake tokens for ``window`` seconds around their timestamps.

    A first handshake message is accepted only if its timestamp is within ``window`` seconds of ``now``
    (either side) and its token was not seen before. A token must be remembered until ``timestamp + window``:
    after that the timestamp check alone refuses the message. When ``max_entries`` live tokens are held, new
    ones are refused (fail closed: forgetting a live token would let its message be replayed). Only
    authenticated messages reach the cache, so only key holders can fill it.

    ``timestamp`` and ``now`` are wall-clock seconds (``time.time()``): they are compared across hosts.
    """

    __slots__ = ("_expiry", "_heap", "max_entries", "window")

    def __init__(self, window: float = 60.0, max_entries: int = 100_000) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.window = float(window)
        self.max_entries = int(max_entries)
        self._expiry: dict[bytes, float] = {}
        self._heap: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def _prune(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] < now:
            expiry, token = heapq.heappop(heap)
            if self._expiry.get(token) == expiry:
                del self._expiry[token]

    def fresh(self, timestamp: float, now: float) -> bool:
        """Whether ``timestamp`` is inside the acceptance window around ``now`` (remembers nothing)."""
        return now - self.window <= timestamp <= now + self.window

    def check_and_remember(self, token: bytes, timestamp: float, now: float) -> bool:
        """True (and remember ``token``) if the timestamp is fresh and the token new; False otherwise."""
        self._prune(now)
        if not self.fresh(timestamp, now):
            return False
        if token in self._expiry:
            return False
        if len(self._expiry) >= self.max_entries:
            return False
        expiry = timestamp + self.window
        self._expiry[token] = expiry
        heapq.heappush(self._heap, (expiry, token))
        return True

    def seen(self, token: bytes, now: float) -> bool:
        """Whether ``token`` is remembered (does not remember it)."""
        self._prune(now)
        return token in self._expiry


class HandshakeLimiter:
    """A token bucket per key (a source address): ``rate`` handshakes per second, bursts of ``burst``.

    A source address can be forged: charge a bucket only for work a stranger cannot make the server do (the
    datagram server charges it after the first message authenticated, see ``DatagramServer.accept``).

    At most ``max_keys`` buckets are kept; when full, the least recently used one is dropped (it has had the
    longest time to refill, so forgetting it changes the least). Each call is O(1).
    """

    __slots__ = ("_buckets", "burst", "max_keys", "rate")

    def __init__(self, rate: float, burst: int, *, max_keys: int = 65_536) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be positive, burst and max_keys at least 1")
        self.rate = float(rate)
        self.burst = int(burst)
        self.max_keys = int(max_keys)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, last update)

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return float(self.burst)
        tokens, last = entry
        return min(float(self.burst), tokens + max(0.0, now - last) * self.rate)

    def allow(self, key: str, now: float) -> bool:
        """Take one token from ``key``'s bucket: True if there was one."""
        tokens = self._tokens(key, now)
        if key not in self._buckets:
            while len(self._buckets) >= self.max_keys:  # O(1): the least recently used goes
                self._buckets.popitem(last=False)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        return allowed


class ResetLimiter:
    """How many stateless resets a server may send: ``rate`` per second per source address (bursts of
    ``burst``), and ``total_rate`` per second over all sources together (bursts of ``total_burst``).

    A reset answers a datagram nobody authenticated, and its source address may be forged: the per-source
    bucket bounds what a victim receives, the total bucket what the server spends. A source refused by its own
    bucket takes nothing from the total. Memory is bounded as for :class:`HandshakeLimiter` (``max_keys``).
    """

    __slots__ = ("_per_source", "_total")

    def __init__(
        self,
        rate: float = 8.0,
        burst: int = 16,
        *,
        total_rate: float = 1000.0,
        total_burst: int = 1000,
        max_keys: int = 65_536,
    ) -> None:
        self._per_source = HandshakeLimiter(rate, burst, max_keys=max_keys)
        self._total = HandshakeLimiter(total_rate, total_burst, max_keys=1)

    def __len__(self) -> int:
        return len(self._per_source)

    def allow(self, key: str, now: float) -> bool:
        """Take one reset from ``key``'s bucket and one from the total: True if both had one."""
        return self._per_source.allow(key, now) and self._total.allow("", now)


class ReplayWindow:
    """Which 64-bit counters were already received, within the last ``size`` counters.

    ``check(n)`` is the cheap test made before decrypting; ``update(n)`` records ``n`` and must be called only
    once the datagram carrying ``n`` has been authenticated (so forged counters cannot move the window).

    The bitmap is a ring of 64-bit words, as RFC 6479 lays it out: moving the window forward clears the words
    it enters (none for most datagrams, which land in the current word) instead of shifting the whole bitmap.
    One word more than ``size`` needs keeps exactly ``size`` counters behind the highest one.
    """

    __slots__ = ("_count", "_words", "highest", "size")

    def __init__(self, size: int = 4096) -> None:
        if size < 64:
            raise ValueError("the replay window must cover at least 64 counters")
        self.size = size
        self._count = (size + 63) // 64 + 1
        self._words = [0] * self._count  # bit (n & 63) of word (n >> 6) % count: counter n received
        self.highest = -1  # highest counter received so far; -1: none yet

    def check(self, n: int) -> bool:
        """True if counter ``n`` was not received yet and is not too old to tell."""
        highest = self.highest
        if n > highest:
            return True
        if highest - n >= self.size:
            return False
        return not (self._words[(n >> 6) % self._count] >> (n & 63)) & 1

    def update(self, n: int) -> None:
        """Record counter ``n`` as received (after :meth:`check` and authentication)."""
        words = self._words
        count = self._count
        highest = self.highest
        if n > highest:
            top = n >> 6
            current = highest >> 6
            if top != current:  # entering new words: forget what they held a lap ago
                if top - current >= count:
                    words[:] = [0] * count
                else:
                    for w in range(current + 1, top + 1):
                        words[w % count] = 0
            self.highest = n
        elif highest - n >= self.size:
            return  # too old to record (check() refuses it anyway)
        words[(n >> 6) % count] |= 1 << (n & 63)

    def update_above(self, first: int, last: int) -> None:
        """Record counters ``first`` to ``last`` (inclusive), all above the highest one received, as received:
        what :meth:`update` of each in turn gives, a word at a time (a run of datagrams in order)."""
        if not self.highest < first <= last:
            raise ValueError("update_above takes a range above the highest counter received")
        words = self._words
        count = self._count
        current = self.highest >> 6
        top = last >> 6
        if top - current >= count:
            words[:] = [0] * count
        else:
            for w in range(current + 1, top + 1):
                words[w % count] = 0
        low = max(first, last - self.size + 1)  # (what update() would keep of a range longer than the window)
        for w in range(low >> 6, top + 1):
            start = max(low, w << 6)
            end = min(last, (w << 6) | 63)
            words[w % count] |= ((1 << (end - start + 1)) - 1) << (start & 63)
        self.highest = last
