"""A small readers-writer lock for per-inode content locking.

Reads of one file may run in parallel (FUSE sends them concurrently), but a write
does read-modify-write of whole cipher blocks, so it must exclude both readers (who
could see a half-rewritten block) and other writers (lost updates inside a shared
block).  Writers are preferred so a stream of readers cannot starve them.

One lock is made per opened inode, i.e. per created small file, so construction is
kept cheap: the ``threading.Condition`` (a pure-Python object, ~10x the cost of a
plain lock) is only built the first time a thread actually has to wait.
"""

from __future__ import annotations

import threading


class RWLock:
    __slots__ = ("_cond", "_mutex", "_readers", "_waiting_writers", "_writer")

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._cond: threading.Condition | None = None
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    def _wait(self) -> None:
        """Wait for a notify; caller holds ``_mutex``."""
        cond = self._cond
        if cond is None:
            cond = self._cond = threading.Condition(self._mutex)
        cond.wait()

    def _notify_all(self) -> None:
        # Waiters only exist once _cond was made (under the mutex we hold).
        if self._cond is not None:
            self._cond.notify_all()

    def acquire_read(self) -> None:
        with self._mutex:
            while self._writer or self._waiting_writers:
                self._wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._mutex:
            self._readers -= 1
            if self._readers == 0:
                self._notify_all()

    def acquire_write(self) -> None:
        with self._mutex:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    self._wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True

    def release_write(self) -> None:
        with self._mutex:
            self._writer = False
            self._notify_all()
