"""stat/statfs of a FUSE mount point that cannot hang the caller.

A FUSE daemon whose backing storage stops answering (an NFS backend the host freezes) wedges
every request to its mount, and a thread doing ``os.stat`` on it blocks with no timeout. The
node plugin must still answer for other volumes, so such calls run on a helper thread and the
caller waits at most ``timeout``. At most one helper per path is ever stuck: while one is, the
next call for that path fails at once instead of starting another.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_DEAD_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)
_lock = threading.Lock()
_stuck: set[str] = set()


class MountHung(OSError):
    """The mount did not answer in time (its daemon or storage is wedged)."""


def call(path: str, fn: Callable[[str], T], timeout: float) -> T:
    """``fn(path)`` on a helper thread; MountHung if it takes longer than ``timeout``."""
    with _lock:
        if path in _stuck:
            raise MountHung(errno.ETIMEDOUT, f"{path} is not answering")
        _stuck.add(path)
    values: list[T] = []
    failures: list[BaseException] = []

    def run() -> None:
        try:
            values.append(fn(path))
        except BaseException as exc:  # handed to the caller
            failures.append(exc)
        finally:
            with _lock:
                _stuck.discard(path)

    t = threading.Thread(target=run, name="fsprobe", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise MountHung(errno.ETIMEDOUT, f"{path} did not answer within {timeout:.0f}s")
    if failures:
        raise failures[0]
    return values[0]


def state(path: str, timeout: float) -> str:
    """``"live"``, ``"dead"`` (ENOTCONN: daemon gone), ``"hung"`` or ``"error"``."""
    try:
        call(path, os.stat, timeout)
    except MountHung:
        return "hung"
    except OSError as exc:
        return "dead" if exc.errno in _DEAD_ERRNOS else "error"
    return "live"
