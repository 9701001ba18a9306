"""The resolvers' resource cache: bounded in time, entry count and bytes.

One pod start may ask for the same signing key and volume key several times, and every KBS
round trip may cost an attestation, so resources are cached briefly; the bounds keep a rotated
resource from living on and a misbehaving caller from pinning secret material in memory.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from sealed_secrets.errors import ResolverError

DEFAULT_MAX_ENTRIES = 256
DEFAULT_MAX_BYTES = 4 * 1024 * 1024


class ResourceCache:
    """Thread-safe LRU cache bounded by TTL, entry count and total bytes.

    Bounded in time so a rotated or revoked resource is picked up; bounded in size so a
    misbehaving caller cannot pin unbounded secret material in memory.
    """

    def __init__(
        self,
        ttl: float,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 0 or max_entries < 0 or max_bytes < 0:
            raise ResolverError("cache bounds must be non-negative")
        self.ttl = float(ttl)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0

    @property
    def enabled(self) -> bool:
        return self.ttl > 0 and self.max_entries > 0 and self.max_bytes > 0

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._items)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def __repr__(self) -> str:  # keys are URIs (not secret) but keep reprs minimal anyway
        return f"ResourceCache(ttl={self.ttl}, entries={len(self._items)})"

    def _drop(self, key: str) -> None:
        _, value = self._items.pop(key)
        self._bytes -= len(value)

    def _expire(self, now: float) -> None:
        for key in [k for k, (exp, _) in self._items.items() if exp <= now]:
            self._drop(key)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if item[0] <= self._clock():
                self._drop(key)
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: str, value: bytes) -> None:
        if not self.enabled or len(value) > self.max_bytes:
            return
        with self._lock:
            now = self._clock()
            if key in self._items:
                self._drop(key)
            self._expire(now)
            while self._items and (
                len(self._items) >= self.max_entries or self._bytes + len(value) > self.max_bytes
            ):
                self._drop(next(iter(self._items)))
            self._items[key] = (now + self.ttl, value)
            self._bytes += len(value)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
