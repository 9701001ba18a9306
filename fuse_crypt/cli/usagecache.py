"""The mount daemon's cached answer to "how much does this volume hold?" (NodeGetVolumeStats).

Why a cache in the daemon: the only way to know a bucket prefix's size is to list it
(:meth:`fuse_crypt.backend.objectstore.ObjectStoreBackend.usage`), and a prefix of 1M
objects is 1,000 list requests.  kubelet asks about every volume once a minute, so the
answer is kept for ``max(min_ttl, ttl_factor x the listing's duration)``: a small volume
is fresh within 30 s, a slow listing costs the daemon at most ~1/30 of its time.

One listing at a time (single flight): callers that arrive while it runs wait for the
same result, at most ``wait`` seconds each; the listing goes on in its thread and the next
caller gets its answer.  A caller that gives up gets the last answer (stale: its age says
so) if there is one, else :class:`StillListing`.  Why: the listing's own bound (a minute,
objectstore.USAGE_BUDGET) is far longer than a stats call may take, since a store lists a
few thousand objects per second at best (moto on the test VM: ~550/s), so a large volume
is measured in the background and reported from the previous listing meanwhile.
Failures are not cached.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["StillListing", "Usage", "UsageCache"]

#: (bytes stored, objects, bytes written but not yet uploaded)
Usage = tuple[int, int, int]


class StillListing(Exception):
    """The listing did not finish within the caller's wait (not an OSError: a listing
    that ran out of its own budget is one, ETIMEDOUT, and must not be confused with it)."""


class _Run:
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Usage | None = None
        self.error: OSError | None = None


class UsageCache:
    """``get()`` -> (usage, age in seconds) from ``compute`` (see module docstring)."""

    def __init__(
        self,
        compute: Callable[[], Usage],
        *,
        min_ttl: float = 30.0,
        ttl_factor: float = 30.0,
        wait: float = 6.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._compute = compute
        self.min_ttl = min_ttl
        self.ttl_factor = ttl_factor
        self.wait = wait
        self._clock = clock
        self._lock = threading.Lock()
        self._value: Usage | None = None
        self._at = 0.0
        self._expires = 0.0
        self._running: _Run | None = None
        #: Listings run so far (tests and logs).
        self.listings = 0

    def get(self) -> tuple[Usage, float]:
        with self._lock:
            now = self._clock()
            if self._value is not None and now < self._expires:
                return self._value, now - self._at
            run = self._running
            if run is None:
                run = self._running = _Run()
                threading.Thread(
                    target=self._run, args=(run,), name="usage-listing", daemon=True
                ).start()
        if not run.done.wait(self.wait):
            with self._lock:
                if self._value is not None:  # stale, while the new listing runs
                    return self._value, max(0.0, self._clock() - self._at)
            raise StillListing("the listing is still running")
        if run.error is not None:
            raise run.error
        assert run.value is not None
        with self._lock:
            return run.value, max(0.0, self._clock() - self._at)

    def _run(self, run: _Run) -> None:
        start = self._clock()
        try:
            run.value = self._compute()
        except OSError as e:
            run.error = e
        except Exception as e:  # a bug or a library error: an answer, not a dead thread
            run.error = OSError(f"listing failed: {type(e).__name__}")
        finally:
            end = self._clock()
            with self._lock:
                self.listings += 1
                if run.value is not None:
                    self._value = run.value
                    self._at = end
                    self._expires = end + max(self.min_ttl, self.ttl_factor * (end - start))
                self._running = None
            run.done.set()
