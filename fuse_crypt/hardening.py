"""Process hardening for everything that holds a master key or password.

Why: a crashing mount daemon (or the CSI plugin, or the zygote) would otherwise dump core
with the master key in it, and core files land on the host (``core_pattern`` is the
host's kernel setting, often a pipe to a host-side collector). Two independent locks:

* ``RLIMIT_CORE = 0`` (soft and hard): no core file, also after a later ``setuid``;
* ``prctl(PR_SET_DUMPABLE, 0)``: no core dump even through a ``core_pattern`` pipe (which
  ignores RLIMIT_CORE), and ``/proc/<pid>/mem``, ``environ`` and ptrace are closed to
  other unprivileged processes of the same user.

Both survive ``fork`` (the zygote's children inherit them); ``execve`` resets the
dumpable flag, so every process that execs calls :func:`disable_core_dumps` itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

__all__ = ["disable_core_dumps", "is_dumpable", "wipe"]

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def disable_core_dumps() -> None:
    """Make this process (and its future forks) undumpable; raises OSError if refused."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if _prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "prctl(PR_SET_DUMPABLE, 0) failed")


def is_dumpable() -> bool:
    """``prctl(PR_GET_DUMPABLE)`` of this process."""
    dumpable: int = _prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    return dumpable != 0


def wipe(buf: bytearray | memoryview) -> None:
    """Overwrite a mutable buffer holding key material with zeros, in place.

    Only mutable buffers can be wiped; that is why key material that crosses process
    boundaries is received into a ``bytearray`` (never ``bytes``, which are immutable and
    whose copies outlive any attempt to clear them)."""
    view = memoryview(buf).cast("B")
    if view.readonly:
        raise TypeError("cannot wipe a read-only buffer")
    view[:] = bytes(len(view))
