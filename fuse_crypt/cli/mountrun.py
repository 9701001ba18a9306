"""Running the FUSE frontend for ``fuse-crypt mount``, in the foreground or as a daemon.

The key is already unlocked when we get here (the parent did it before forking), so the
only failures left are mount-level ones: FUSE refusing the mount point, the metrics port
being taken, or the filesystem dying.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from fuse_crypt.cli.exitcodes import CONFIG, FUSE_MOUNT, CliError
from fuse_crypt.daemon import Notifier, find_mount


@dataclass
class MountSpec:
    cipherdir: str
    mountpoint: str
    master_key: bytes = field(repr=False)
    conf: Any | None
    read_only: bool = False
    allow_other: bool = False
    capacity: int = 0
    metrics_addr: str | None = None
    quiet: bool = False
    #: An object-store volume (``cipherdir`` is then its s3:// display form).
    objectstore: Any | None = None


def _serve(spec: MountSpec, on_ready: Any) -> None:
    """Serve the mount; an object volume with ``--control-socket`` also serves its
    credential socket (fuse_crypt/cli/credsocket.py) for as long as the mount lives."""
    control: Any = None
    if spec.objectstore is not None and spec.objectstore.control_socket is not None:
        from fuse_crypt.cli.credsocket import CredentialSocket

        loc = spec.objectstore
        control = CredentialSocket(
            loc.control_socket,
            loc.credential_box(),
            bucket=loc.bucket,
            identity=(loc.display, loc.endpoint or "", loc.region),
        )
        loc.serving = True
    try:
        _serve_store(spec, on_ready, control)
    finally:
        if control is not None:
            control.close()


def _serve_store(spec: MountSpec, on_ready: Any, control: Any = None) -> None:
    from fuse_crypt.backend import LocalDirBackend

    backend: Any
    store: Any = None
    if spec.objectstore is not None:
        # Built here, after the fork: boto3 clients and thread pools do not survive one.
        store = backend = spec.objectstore.backend()
        if not spec.read_only:
            try:
                store.recover_renames()
            except OSError as e:
                raise CliError(
                    f"cannot finish an interrupted directory rename: {e.strerror}", FUSE_MOUNT
                ) from None
        if control is not None:
            # NodeGetVolumeStats asks over the control socket (fuse_crypt/cli/credsocket.py).
            from fuse_crypt.cli.usagecache import UsageCache

            control.usage = UsageCache(store.usage)
    else:
        backend = LocalDirBackend(spec.cipherdir)
    counters = None
    if spec.metrics_addr:
        from fuse_crypt.cli import metrics

        metrics.start(
            spec.metrics_addr,
            metrics.MOUNT_INFO,
            metrics.MOUNT_METRICS,
            cipherdir=spec.cipherdir,
            mountpoint=spec.mountpoint,
            read_only=spec.read_only,
        )
        counters = metrics.BlockCounters()
        backend = metrics.InstrumentedBackend(backend)
    try:
        _serve_backend(spec, backend, on_ready, counters)
    finally:
        if store is not None:
            store.destroy()  # last try for failed uploads; spools and caches dropped


def _serve_backend(spec: MountSpec, backend: Any, ready: Any, counters: Any) -> None:
    from fuse_crypt.errors import ConfigError
    from fuse_crypt.fusefrontend import serve

    live = False

    def ready_once() -> None:
        nonlocal live
        live = True
        ready()

    try:
        serve(
            backend,
            spec.master_key,
            spec.conf,
            spec.mountpoint,
            read_only=spec.read_only,
            foreground=True,
            on_ready=ready_once,
            allow_other=spec.allow_other,
            capacity=spec.capacity,
            block_observer=counters,
        )
    except ConfigError as e:
        raise CliError(str(e), CONFIG) from None
    except OSError as e:
        if live and find_mount(spec.mountpoint) is None:
            # libfuse reports a loop ended by SIGINT/SIGTERM/SIGHUP (or fusermount -u
            # racing the loop) as a failure; the mount is gone, so this was a shutdown.
            return
        reason = e.strerror or str(e)
        raise CliError(f"cannot mount {spec.mountpoint}: {reason}", FUSE_MOUNT) from None


def _setup_logging(*, daemon: bool) -> None:
    """Where the frontend's log lines go: stderr in the foreground (the CSI node plugin
    captures it), syslog for a daemon (its stderr is /dev/null), like gocryptfs.

    FUSE_CRYPT_LOG_LEVEL (default WARNING) picks the level.
    """
    level = os.environ.get("FUSE_CRYPT_LOG_LEVEL", "WARNING").upper()
    root = logging.getLogger("fuse_crypt")
    root.setLevel(getattr(logging, level, logging.WARNING))
    handler: logging.Handler
    if daemon:
        if not os.path.exists("/dev/log"):
            root.addHandler(logging.NullHandler())
            return
        try:
            handler = logging.handlers.SysLogHandler(address="/dev/log")
        except OSError:
            root.addHandler(logging.NullHandler())
            return
        handler.setFormatter(logging.Formatter(f"fuse-crypt[{os.getpid()}]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("fuse-crypt: %(levelname)s %(message)s"))
    root.addHandler(handler)


def run_foreground(spec: MountSpec) -> int:
    def ready() -> None:
        if not spec.quiet:
            print("Filesystem mounted and ready.", flush=True)

    _setup_logging(daemon=False)
    try:
        _serve(spec, ready)
    except KeyboardInterrupt:
        return 0
    return 0


def run_in_daemon(spec: MountSpec, notifier: Notifier) -> int:
    _setup_logging(daemon=True)
    _serve(spec, notifier.ready)
    return 0


def print_ready(spec: MountSpec) -> None:
    if not spec.quiet:
        print("Filesystem mounted and ready.", file=sys.stdout, flush=True)
