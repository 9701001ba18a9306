"""A small readers-writer lock for per-inode content locking.

Reads of one file may run in parallel (FUSE sends them concurrently), but a write
does read-modify-write of whole cipher blocks, so it must exclude both readers (who
could see a half-rewritten block) and other writers (lost updates inside a shared
block).  Writers are preferred so a stream of readers cannot starve them.
"""

from __future__ import annotations

import threading


class RWLock:
    __slots__ = ("_cond", "_readers", "_writer", "_waiting_writers")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()
