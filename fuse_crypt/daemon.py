"""Mount daemon plumbing: fork-with-readiness, unmount with exit codes, stale-mount cleanup.

Why a readiness pipe: ``fuse-crypt mount`` must only return once the kernel mount is
live (or with the real reason it failed), so scripts and the CSI node plugin can use the
mount point right after the command returns. The parent unlocks the key, forks, and then
blocks on a pipe that the child writes exactly one line to: ``READY`` once ``serve()``
reports the mount live, or ``ERROR <code> <message>`` if anything failed first. If the
child dies without writing, the parent sees EOF and reports the exit status instead.

Why stale-mount cleanup: a FUSE daemon killed with SIGKILL leaves its mount point in the
kernel mount table; every access then fails with ENOTCONN ("Transport endpoint is not
connected") until someone unmounts it. Mounting again on top would fail, so ``mount``
and ``unmount`` clean such dead mounts first.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Callable

# Mount table queries live in mounttable (shared with the CSI driver); re-exported here
# because the CLI, the demo and tests have always imported them from the daemon module.
from fuse_crypt.mounttable import (
    MountEntry,
    UnmountError,
    detach,
    find_mount,
    is_dead_mount,
    is_live_mount,
    mount_entries,
)

__all__ = [
    "DaemonError",
    "MountEntry",
    "Notifier",
    "cleanup_stale_mount",
    "describe_exception",
    "find_mount",
    "is_dead_mount",
    "is_live_mount",
    "mount_entries",
    "run_daemonized",
    "unmount",
    "wait_until",
]

READY_MSG = b"READY\n"
_ERROR_PREFIX = b"ERROR "
_MAX_MSG = 4096

# Exit codes shared with the CLI (gocryptfs numbering where one exists).
EXIT_OTHER = 11
EXIT_FORK_CHILD = 17
EXIT_FUSE_MOUNT = 19
EXIT_MOUNTPOINT = 10


class DaemonError(Exception):
    """A mount daemon failed before it became ready; carries the exit code to use."""

    def __init__(self, message: str, code: int = EXIT_OTHER) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- unmount


def unmount(path: str, *, lazy_fallback: bool = True) -> None:
    """Unmount a FUSE mount point; dead or busy mounts fall back to a lazy detach.

    Raises DaemonError(code 10) if ``path`` is not mounted or every attempt failed.
    """
    mp = os.path.abspath(path)
    if find_mount(mp) is None:
        raise DaemonError(f"{mp} is not mounted", EXIT_MOUNTPOINT)
    last = ""
    for lazy in (False, True) if lazy_fallback else (False,):
        try:
            detach(mp, lazy=lazy)
        except UnmountError as e:
            last = e.reason
        if find_mount(mp) is None:
            return
        # Still there: it was busy, or stacked mounts lost only their top layer.
    raise DaemonError(f"cannot unmount {mp}: {last or 'mount point still in use'}", EXIT_MOUNTPOINT)


def cleanup_stale_mount(path: str) -> bool:
    """Lazily unmount ``path`` if it is a dead FUSE mount; True if something was cleaned."""
    if not is_dead_mount(path):
        return False
    mp = os.path.abspath(path)
    while find_mount(mp) is not None and is_dead_mount(mp):
        unmount(mp, lazy_fallback=True)
    return True


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# --------------------------------------------------------------------------- daemonize


class Notifier:
    """The child's end of the readiness pipe; each method is effective at most once."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    @property
    def pending(self) -> bool:
        return self._fd is not None

    def _send(self, data: bytes) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.write(fd, data[:_MAX_MSG])
        except OSError:
            pass  # parent already gone; nothing useful to do
        finally:
            os.close(fd)

    def ready(self) -> None:
        self._send(READY_MSG)

    def error(self, message: str, code: int) -> None:
        line = " ".join(message.split())  # one line, always
        self._send(_ERROR_PREFIX + f"{code} {line}\n".encode("utf-8", "replace"))


def _redirect_stdio_to_devnull() -> None:
    # Keeps `subprocess.run(..., capture_output=True)` callers of `fuse-crypt mount` from
    # hanging: they wait for EOF on stdout/stderr, which the long-lived child must not hold.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)


def _read_message(fd: int, pid: int, timeout: float | None) -> bytes:
    buf = b""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not buf.endswith(b"\n") and len(buf) < _MAX_MSG:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            _child_exit_reason(pid)  # reap it if it goes within a second
            raise DaemonError(
                f"mount did not become ready within {timeout:.0f}s; daemon stopped",
                EXIT_FUSE_MOUNT,
            )
        chunk = os.read(fd, _MAX_MSG)
        if not chunk:
            break
        buf += chunk
    return buf


def _child_exit_reason(pid: int) -> str:
    for _ in range(50):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                return f"killed by signal {os.WTERMSIG(status)}"
            return f"exited with status {os.WEXITSTATUS(status)}"
        time.sleep(0.02)
    return "closed the readiness pipe without reporting"


def run_daemonized(
    body: Callable[[Notifier], int | None], *, timeout: float | None = 120.0
) -> None:
    """Fork; run ``body(notifier)`` in a detached child; return once it says READY.

    ``body`` must call ``notifier.ready()`` once the mount is live (it is passed to
    serve() as on_ready) and return when the filesystem is unmounted. An exception in
    ``body`` before readiness is sent to the parent as an error line. In the parent this
    function returns normally on READY and raises DaemonError otherwise. It never returns
    in the child.
    """
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError as e:
        os.close(rfd)
        os.close(wfd)
        raise DaemonError(f"cannot fork mount daemon: {e.strerror}", EXIT_FORK_CHILD) from e

    if pid == 0:  # ---- child
        os.close(rfd)
        code = 0
        notifier = Notifier(wfd)
        try:
            os.setsid()
            os.chdir("/")
            _redirect_stdio_to_devnull()
            result = body(notifier)
            code = int(result or 0)
            if notifier.pending:
                notifier.error("filesystem exited before the mount became ready", EXIT_FUSE_MOUNT)
                code = code or EXIT_FUSE_MOUNT
        except DaemonError as e:
            notifier.error(str(e), e.code)
            code = e.code
        except BaseException as e:  # noqa: BLE001 - report anything, then leave
            exit_code = getattr(e, "code", None)
            code = exit_code if isinstance(exit_code, int) and exit_code != 0 else EXIT_FUSE_MOUNT
            notifier.error(describe_exception(e), code)
        finally:
            os._exit(code)

    # ---- parent
    os.close(wfd)
    try:
        msg = _read_message(rfd, pid, timeout)
    except KeyboardInterrupt:
        # The user gave up waiting: do not leave a mount appearing behind their back.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        _child_exit_reason(pid)
        raise
    finally:
        os.close(rfd)
    if msg == READY_MSG:
        return
    if msg.startswith(_ERROR_PREFIX):
        text = msg[len(_ERROR_PREFIX) :].decode("utf-8", "replace").strip()
        code_s, _, reason = text.partition(" ")
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        try:
            code = int(code_s)
        except ValueError:
            code = EXIT_FUSE_MOUNT
        raise DaemonError(reason or "mount daemon failed", code or EXIT_FUSE_MOUNT)
    raise DaemonError(f"mount daemon {_child_exit_reason(pid)}", EXIT_FUSE_MOUNT)


def describe_exception(e: BaseException) -> str:
    """One readable line for an unexpected exception (type + first line, no traceback)."""
    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
