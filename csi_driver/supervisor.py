"""Mount supervisor: one foreground daemon per published volume, watched and restarted.

Daemons run in their own session so they outlive the node plugin: a plugin upgrade or crash
must not take every pod's volume down with it. A restarted plugin re-adopts them by pid
(see core/node.py recovery). While the plugin holds a volume's key in memory (it does for
everything it mounted itself), a daemon that dies is cleaned up and restarted with backoff;
an adopted daemon that dies is only cleaned up (its key is gone with the old plugin), so
kubelet's next NodePublishVolume mounts it afresh instead of hitting ENOTCONN.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from csi_driver import errors, hostfile
from csi_driver.core.store import Publication, PublicationStore
from csi_driver.keys import VolumeKey
from csi_driver.mounter import Mounter
from csi_driver.mounts import MountBusy, MountTable
from csi_driver.proc import Proc, loopback_listen_port, tail

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
MAX_RESTARTS = 3
RESTART_WINDOW = 60.0
# What a daemon is told with --metrics-addr: loopback only, a port the kernel picks while
# the daemon binds it (found again from /proc: proc.loopback_listen_port).
DAEMON_METRICS_ADDR = "127.0.0.1:0"


@dataclass(frozen=True)
class DaemonEndpoint:
    """Where a live daemon serves its /metrics, and the volume it serves."""

    volume_id: str
    target_path: str  # as kubelet named it (a block volume's staging path: MountHandle)
    port: int


@dataclass
class MountHandle:
    """The live side of a supervised mount daemon serving ``target``: its process, and the
    key while we hold it (to restart it). What the mount *is* (cipher dir, mounter,
    readonly, pid) is the publication in the store, the one source of truth."""

    target: str
    proc: Proc
    key: VolumeKey | None = field(default=None, repr=False)
    stopping: bool = False
    dead: bool = False
    restarts: list[float] = field(default_factory=list)
    volume_id: str = ""
    # (pid, its /metrics port or None): looked up once per daemon process, not per scrape.
    metrics_port: tuple[int, int | None] = (0, None)
    # The path kubelet knows the volume by, when the daemon mounts somewhere else: a block
    # daemon mounts a private directory under <state-dir>/block/ and this is the volume's
    # staging path. Shown as the daemon's target_path label on /metrics (volumemetrics.py).
    kubelet_path: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid


class MountSupervisor:
    """Starts, stops, adopts and watches mount daemons."""

    def __init__(
        self,
        mounters: dict[str, Mounter],
        log_dir: str,
        store: PublicationStore,
        *,
        mounts: MountTable | None = None,
        allow_other: bool = True,
        on_change: Callable[[], None] | None = None,
        on_restart: Callable[[], None] | None = None,
        monitor_interval: float = 0.5,
        daemon_metrics: bool = False,
    ) -> None:
        self.mounters = mounters
        # Start daemons that can with --metrics-addr DAEMON_METRICS_ADDR (node --volume-metrics).
        self.daemon_metrics = daemon_metrics
        self.log_dir = log_dir
        self.store = store
        self.mounts = mounts or MountTable()
        self.allow_other = allow_other
        self.on_change = on_change or (lambda: None)
        self.on_restart = on_restart or (lambda: None)
        self._handles: dict[str, MountHandle] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        os.makedirs(log_dir, mode=0o700, exist_ok=True)
        self._thread = threading.Thread(
            target=self._monitor, args=(monitor_interval,), name="mount-monitor", daemon=True
        )
        self._thread.start()

    # -- queries -------------------------------------------------------------------------

    def get(self, target: str) -> MountHandle | None:
        with self._lock:
            return self._handles.get(target)

    def handles(self) -> list[MountHandle]:
        with self._lock:
            return list(self._handles.values())

    def metric_endpoints(self) -> list[DaemonEndpoint]:
        """The live daemons that serve /metrics on loopback, with their volume.

        A daemon the plugin is stopping, has given up on, or that is gone is left out (its
        port could by now be another process's). The port is the one the daemon's process
        holds (proc.loopback_listen_port), looked up once per daemon pid: restarted and
        adopted daemons are found the same way, and one without metrics (gocryptfs, or one
        started while the option was off) costs nothing after its first lookup. The path is
        the one kubelet gave (a block volume's staging path, not its daemon's directory)."""
        found = []
        for handle in self.handles():
            if handle.stopping or handle.dead or not self._alive(handle):
                continue
            pid = handle.pid
            cached_pid, port = handle.metrics_port
            if cached_pid != pid:
                port = loopback_listen_port(pid)
                handle.metrics_port = (pid, port)
            if port is not None:
                shown = handle.kubelet_path or handle.target
                found.append(DaemonEndpoint(handle.volume_id, shown, port))
        return found

    def log_path(self, target: str) -> str:
        digest = hashlib.sha256(target.encode()).hexdigest()[:16]
        return os.path.join(self.log_dir, f"mount-{digest}.log")

    # -- lifecycle -----------------------------------------------------------------------

    def start(
        self,
        pub: Publication,
        key: VolumeKey,
        *,
        timeout: float = READY_TIMEOUT,
        kubelet_path: str = "",
    ) -> MountHandle:
        """Spawn the daemon of ``pub`` (an intent) and return once the kernel mount is live
        (or raise). Recording it as mounted is the caller's step.

        ``pub.target_path`` must be the already-resolved path: it is compared with mountinfo
        exactly, never re-resolved, so a symlink cannot redirect the check or the unmount.
        ``kubelet_path``: see MountHandle (empty: ``pub.target_path`` is kubelet's path).
        """
        mounter = self.mounters[pub.mounter]
        proc = self._spawn(
            mounter, pub.target_path, pub.cipher_dir, key, pub.readonly, timeout, pub
        )
        handle = MountHandle(
            pub.target_path, proc, key=key, volume_id=pub.volume_id, kubelet_path=kubelet_path
        )
        with self._lock:
            self._handles[pub.target_path] = handle
        return handle

    def _spawn(
        self,
        mounter: Mounter,
        target: str,
        cipher_dir: str,
        key: VolumeKey,
        readonly: bool,
        timeout: float,
        pub: Publication,
    ) -> Proc:
        stdin_data = mounter.stdin_for(cipher_dir, key)
        addr = DAEMON_METRICS_ADDR if self.daemon_metrics else None
        argv = mounter.argv_for(pub, key, allow_other=self.allow_other, metrics_addr=addr)
        log_path = self.log_path(target)
        # The log dir is under the state dir, a hostPath: make sure a regular file is there
        # (a planted FIFO would block the daemon's open, a symlink would redirect its output).
        os.close(hostfile.open_append(log_path))
        start_offset = hostfile.regular_size(log_path)
        proc = mounter.spawn(argv, stdin_data, log_path)
        self._wait_ready(proc, mounter, target, cipher_dir, start_offset, timeout)
        return proc

    @staticmethod
    def _said_ready(log_path: str, offset: int, line: bytes) -> bool:
        return line in hostfile.read_from(log_path, offset, 256 * 1024)

    def _log_tail(self, target: str, offset: int) -> str:
        return tail(
            hostfile.read_from(self.log_path(target), offset, 64 * 1024).decode("utf-8", "replace")
        )

    def _wait_ready(
        self,
        proc: Proc,
        mounter: Mounter,
        target: str,
        cipher_dir: str,
        log_offset: int,
        timeout: float = READY_TIMEOUT,
    ) -> None:
        deadline = time.monotonic() + min(timeout, READY_TIMEOUT)
        delay = 0.001
        log_path = self.log_path(target)
        while True:
            if self._said_ready(log_path, log_offset, mounter.READY_LINE):
                entry = self.mounts.find(target)
                if entry is not None and entry.fstype.startswith("fuse"):
                    return
            rc = proc.poll()
            if rc is not None:
                raise mounter.failure(rc, self._log_tail(target, log_offset), cipher_dir)
            if time.monotonic() > deadline:
                self._kill(proc.pid)
                with contextlib.suppress(Exception):
                    proc.wait(timeout=STOP_TIMEOUT)
                if self.mounts.find(target) is not None:  # mounted, never said ready
                    with contextlib.suppress(OSError):
                        self.mounts.detach(target, lazy=True)
                if timeout < READY_TIMEOUT:
                    raise errors.DeadlineExceeded(
                        f"{mounter.name} did not mount {target} before the deadline"
                    )
                raise errors.MountError(
                    f"{mounter.name} did not mount {target} within {READY_TIMEOUT:.0f}s"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.002)

    def adopt(self, pub: Publication, *, kubelet_path: str = "") -> MountHandle:
        """Take over the daemon of ``pub``, started by a previous plugin instance (watched by
        pid + recorded start time; no key, so it is cleaned up, not restarted, if it dies).
        ``kubelet_path`` as for :meth:`start`."""
        target = pub.target_path
        proc = self.mounters[pub.mounter].attach(pub.pid, pub.pid_start)
        handle = MountHandle(target, proc, volume_id=pub.volume_id, kubelet_path=kubelet_path)
        with self._lock:
            self._handles[target] = handle
        return handle

    def forget(self, target: str) -> None:
        with self._lock:
            self._handles.pop(target, None)

    def stop(self, target: str, *, hung: bool = False, dead: bool = False) -> None:
        """Unmount ``target`` and make sure its daemon is gone; idempotent.

        ``target`` is the resolved path and is matched against mountinfo exactly: resolving
        it again here would let a symlink planted in between point the unmount at another
        volume. ``hung``: the daemon does not answer, so detach lazily (a plain unmount
        would wait on it) and kill it instead of waiting for it to exit. ``dead``: the
        daemon is gone (ENOTCONN), nothing is left to lose, so detach lazily too. A live
        mount still busy after mounts.BUSY_WAIT raises MountBusy with the mount and its
        daemon left serving (the supervisor keeps watching it).
        """
        with self._lock:
            handle = self._handles.get(target)
            if handle is not None:
                handle.stopping = True
        try:
            self.mounts.unmount(target, lazy=hung or dead)
        except MountBusy:
            if handle is not None:
                handle.stopping = False
            raise
        if handle is not None:
            if hung:
                self._kill(handle.pid)
            self._reap(handle)
        self.forget(target)

    def _reap(self, handle: MountHandle) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            if handle.proc.poll() is not None:
                return
            time.sleep(0.005)
        self._kill(handle.pid)
        handle.proc.wait(timeout=STOP_TIMEOUT)

    @staticmethod
    def _kill(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def shutdown(self, *, unmount: bool = False) -> None:
        """Stop watching; with ``unmount`` also stop every daemon (tests, demo)."""
        self._stop.set()
        self._thread.join(timeout=5)
        for mounter in self.mounters.values():
            mounter.close()
        if unmount:
            for handle in self.handles():
                try:
                    self.stop(handle.target)
                except OSError as exc:
                    log.error(
                        "unmount failed", extra={"fields": {"target": handle.target, "err": exc}}
                    )

    # -- monitoring ----------------------------------------------------------------------

    @staticmethod
    def _alive(handle: MountHandle) -> bool:
        return handle.proc.poll() is None

    def _monitor(self, interval: float) -> None:
        while not self._stop.wait(interval):
            for handle in self.handles():
                if handle.stopping or handle.dead or self._alive(handle):
                    continue
                try:
                    self._recover(handle)
                except Exception:  # never let the watcher die
                    log.exception(
                        "mount recovery failed", extra={"fields": {"target": handle.target}}
                    )

    def _recover(self, handle: MountHandle) -> None:
        fields = {"target": handle.target, "pid": handle.pid}
        log.warning("mount daemon exited unexpectedly", extra={"fields": fields})
        if self.mounts.find(handle.target) is not None:
            self.mounts.detach(handle.target, lazy=True)
        now = time.monotonic()
        handle.restarts = [t for t in handle.restarts if now - t < RESTART_WINDOW]
        if handle.key is None or len(handle.restarts) >= MAX_RESTARTS:
            handle.dead = True
            if handle.key is None:  # block daemons: their loop device holds the dead file
                log.error(
                    "mount left down: not restartable; unstage and stage the volume",
                    extra={"fields": fields},
                )
            else:
                log.error(
                    "mount left down; next NodePublishVolume remounts", extra={"fields": fields}
                )
            self.on_change()
            return
        with self._lock:
            if handle.stopping:
                return
        handle.restarts.append(now)
        time.sleep(min(0.2 * 2 ** len(handle.restarts), 5.0))
        pub = self.store.get(handle.target)
        if pub is None:  # unpublished meanwhile
            return
        mounter = self.mounters[pub.mounter]
        try:
            proc = self._spawn(
                mounter,
                pub.target_path,
                pub.cipher_dir,
                handle.key,
                pub.readonly,
                READY_TIMEOUT,
                pub,
            )
        except errors.CsiError as exc:
            log.error("mount restart failed", extra={"fields": {**fields, "err": exc}})
            return
        # Counted before the handle shows the new pid, so whoever sees the new daemon also
        # sees the restart in the metric (a test read them in that order and raced).
        self.on_restart()
        handle.proc = proc
        with self._lock:
            stopping = handle.stopping
        if stopping:  # unpublished while we were restarting: undo
            self.mounts.detach(handle.target, lazy=True)
            self._reap(handle)
            return
        # The store, not this handle, is what a restarted plugin reads: the new pid goes
        # there at once, or a later plugin could not adopt (and supervise) this daemon.
        self.store.update(handle.target, pid=proc.pid, pid_start=mounter.start_time(proc.pid))
        log.info(
            "mount daemon restarted", extra={"fields": {"target": handle.target, "pid": proc.pid}}
        )
        self.on_change()
