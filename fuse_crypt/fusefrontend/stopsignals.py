"""SIGINT/SIGTERM/SIGHUP always end ``serve()``, whenever they arrive.

libfuse's own handling loses stop signals (issue 8, "stop signals always stop"):

* it installs its handlers only after ``mount(2)``, so a signal in between killed the
  daemon by default action and left a dead mount (ENOTCONN) behind, and mfusepy
  resets SIGINT to the default just before, so even SIGINT could do that;
* its handler only sets the session's "exited" flag.  The loop notices when the
  main loop thread's ``sem_wait`` is interrupted, which needs the signal to land on
  that very thread: delivered to any other thread without the signals blocked (the
  readiness watcher, a metrics server) or just before ``sem_wait`` starts, it was
  noticed only when the next FUSE request arrived, i.e. possibly never, and pod
  teardown hung;
* a handler that is not the default (an inherited one, or Python's SIGINT) made
  libfuse skip installing its own, so the signal did nothing at all.

Here the signals belong to us for the whole of ``serve()``: Python handlers installed
from the main thread, plus ``signal.set_wakeup_fd`` so a signal landing on *any*
thread wakes the main thread.  The libfuse loop runs in a helper thread (mfusepy then
cannot reset SIGINT, and libfuse sees handlers that are not the default and leaves
them alone), and the main thread only waits.  On a stop request it does what
libfuse's handler meant to do, reliably: ``fuse_exit`` on the session (pointer taken
in ``init``), then interrupt the loop thread's wait, repeated until the loop is over,
so no wake-up can be lost.  A request that comes before ``init`` is held until
``init`` ran (the kernel sends INIT right after the mount) or the loop ended; one
that comes before the loop started means the loop is never started.  libfuse then
unmounts (lazily, as on its own signal path) and ``serve()`` returns normally.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _libfuse  # noqa: F401  (selects libfuse3 before mfusepy loads)

import mfusepy  # isort: skip

log = logging.getLogger("fuse_crypt.fusefrontend")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_STOP_BYTES = frozenset(int(s) for s in STOP_SIGNALS)
#: How often a pending stop re-interrupts the loop thread (a wake-up that arrives
#: just before libfuse's ``sem_wait`` starts would otherwise be lost).
_REWAKE_SECONDS = 0.2


class StopSignals:
    """Owns the stop signals while a FUSE loop runs; see the module docstring."""

    def __init__(self) -> None:
        #: A plain flag, not an Event: the handler runs in the main thread between
        #: any two bytecodes, possibly inside Event.set()'s non-reentrant lock.
        self.requested = False
        #: ends the running session (``fuse_exit`` on mfusepy's, or the C block loop's
        #: own); None before ``init`` and after ``destroy``
        self._exit: Callable[[], None] | None = None
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._old: dict[int, Any] = {}
        self._old_wakeup = -1
        self._installed = False
        self._signum = 0
        #: Guards ``_exit``: libfuse frees the session right after ``destroy``.
        self._ptr_lock = threading.Lock()

    # -- setup (main thread) ------------------------------------------------------------

    @classmethod
    def install(cls) -> StopSignals | None:
        """Take over the stop signals; None when not called from the main thread
        (signal handlers can only be set there: the caller keeps its own)."""
        if threading.current_thread() is not threading.main_thread():
            return None
        self = cls()
        try:
            self._old_wakeup = signal.set_wakeup_fd(self._wfd, warn_on_full_buffer=False)
            self._installed = True
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._on_signal)
        except BaseException:
            self.restore()
            raise
        global _active
        _active = self
        return self

    def restore(self) -> None:
        global _active
        if _active is self:
            _active = None
        for sig, old in self._old.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old.clear()
        if self._installed:
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(self._old_wakeup)
        self._installed = False
        for fd in (self._rfd, self._wfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._rfd = self._wfd = -1

    def _on_signal(self, signum: int, frame: Any) -> None:
        # No logging here: the handler may interrupt the main thread anywhere.
        self._signum = signum
        self.requested = True

    # -- the loop ------------------------------------------------------------------------

    def on_init(self, fuse_ptr: int | None) -> None:
        """mfusepy's session started: a stop calls ``fuse_exit`` on it."""

        def exit_session() -> None:
            mfusepy._libfuse.fuse_exit(ctypes.c_void_p(fuse_ptr))

        self.on_session(None if fuse_ptr is None else exit_session)

    def on_session(self, exit_call: Callable[[], None] | None) -> None:
        """A session started that ``exit_call`` ends (None: no session)."""
        with self._ptr_lock:
            self._exit = exit_call

    def on_destroy(self) -> None:
        self.on_session(None)

    def run(self, loop: Callable[[], None], on_stop: Callable[[], None]) -> None:
        """Run ``loop`` (the blocking libfuse call) in a helper thread and wait for it,
        ending it on a stop signal (``on_stop`` is called once, first); re-raises
        whatever ``loop`` raised."""
        if self._drain():
            on_stop()
            return  # stopped before anything was mounted
        failure: list[BaseException] = []
        finished = threading.Event()

        def body() -> None:
            try:
                loop()
            except BaseException as e:  # handed to the main thread
                failure.append(e)
            finally:
                finished.set()
                with contextlib.suppress(OSError):
                    os.write(self._wfd, b"\0")  # wake the main thread now

        t = threading.Thread(target=body, name="fuse-crypt-loop", daemon=True)
        t.start()
        next_wake = 0.0
        stopping = False
        while not finished.is_set():
            if not self.requested:
                self._wait(None)
                continue
            if not stopping:
                stopping = True
                log.info("event=stop_requested signal=%s", _name(self._signum))
                on_stop()
            now = time.monotonic()
            if now >= next_wake:
                self._stop(t)  # a no-op until init ran (the kernel sends INIT first)
                next_wake = now + _REWAKE_SECONDS
            self._wait(0.02)
        t.join()
        if failure:
            raise failure[0]

    def _drain(self) -> bool:
        """Consume queued wake-up bytes; True once a stop was requested.  Reads the
        signal numbers too, as the Python-level handler may not have run yet."""
        with contextlib.suppress(OSError):
            while data := os.read(self._rfd, 512):
                for b in data:
                    if b in _STOP_BYTES:
                        self._signum = self._signum or b
                        self.requested = True
        return self.requested

    def _wait(self, timeout: float | None) -> None:
        """Sleep until a signal (on any thread), the loop's end, or ``timeout``."""
        select.select([self._rfd], [], [], timeout)
        self._drain()

    def _stop(self, loop_thread: threading.Thread) -> None:
        """Mark the session exited and interrupt the loop thread's ``sem_wait``
        (its SIGHUP handler is ours, so this only wakes it)."""
        with self._ptr_lock:
            if self._exit is None:
                return  # destroyed: the loop is already over
            self._exit()
        ident = loop_thread.ident
        if ident is not None and loop_thread.is_alive():
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pthread_kill(ident, signal.SIGHUP)


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


_active: StopSignals | None = None


def note_init() -> None:
    """From the FUSE ``init`` callback: the session a stop request must end."""
    if _active is not None:
        _active.on_init(mfusepy._libfuse.fuse_get_context().contents.fuse)


def note_destroy() -> None:
    """From the FUSE ``destroy`` callback: libfuse frees the session next."""
    if _active is not None:
        _active.on_destroy()
