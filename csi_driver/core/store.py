"""The node's publications: one store, the single source of truth, saved on every change.

A publication is recorded *before* its mount as an intent (``phase="intent"``), and turned
into ``phase="mounted"`` (with the daemon's pid and start time) once the mount is live. So
whatever moment the plugin is killed at, a restarted plugin finds either nothing (nothing was
mounted yet), an intent (a mount may or may not exist: recovery undoes it, kubelet's retry
publishes afresh) or a mounted record (adopt it). The supervisor writes here too when it
restarts a crashed daemon, so the file never keeps a dead pid.

The file ``<state_dir>/node-state.json`` lives on a hostPath, so records read back are
hostile input: the shape is checked here, and every record passes ``check`` (the node
core's request validation: ids, paths under its roots, known mounters) before it is used.

Holds no secrets (keys are never persisted). Written atomically (temp + rename,
csi_driver/hostfile.py) so a crash mid-write leaves the previous version. Deliberately not
fsync'ed: the file only matters across *plugin process* restarts, where the page cache
survives; after a guest reboot every FUSE mount is gone anyway.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from csi_driver import errors
from csi_driver.hostfile import read_json, write_json_atomic

log = logging.getLogger(__name__)

STATE_FILE = "node-state.json"
STATE_VERSION = 2
# Thousands of publications fit easily; anything bigger is not ours.
MAX_STATE_BYTES = 8 << 20

INTENT = "intent"
MOUNTED = "mounted"
PHASES = (INTENT, MOUNTED)


@dataclass(frozen=True)
class Publication:
    """One NodePublishVolume: an intent until its mount is live, then mounted."""

    volume_id: str
    target_path: str
    cipher_dir: str
    mounter: str
    readonly: bool
    access_mode: int
    pid: int = 0
    ephemeral: bool = False
    pid_start: int = 0  # /proc start time of pid: survives pid reuse checks
    phase: str = MOUNTED
    capacity_bytes: int = 0  # the volume's quota (0: none known)


_TYPES = {f.name: f.type for f in fields(Publication)}
_PY_TYPES = {"str": str, "bool": bool, "int": int}
_OPTIONAL = frozenset(f.name for f in fields(Publication) if f.default is not dataclasses.MISSING)


def parse_publication(item: object) -> Publication | None:
    """One record with exactly the right field types and a known phase, else None.

    Only the shape is checked here; what the values may be is the ``check`` of the store.
    """
    if not isinstance(item, dict) or not set(item) <= set(_TYPES):
        return None
    for name, typ in _TYPES.items():
        if name not in item:
            if name in _OPTIONAL:
                continue
            return None
        # bool is an int subclass: keep them apart both ways.
        if type(item[name]) is not _PY_TYPES[str(typ)]:
            return None
    if item.get("phase", MOUNTED) not in PHASES:
        return None
    return Publication(**item)


Check = Callable[[Publication], None]


class PublicationStore:
    """Publications keyed by (resolved) target path; every change is saved at once."""

    def __init__(self, state_dir: str, check: Check | None = None) -> None:
        self.path = os.path.join(state_dir, STATE_FILE)
        self._check = check or (lambda pub: None)
        self._lock = threading.Lock()
        self._pubs: dict[str, Publication] = {}

    # -- reading back --------------------------------------------------------------------

    def load(self) -> list[Publication]:
        """Replace the memory with the file's valid records and return them.

        The state dir is host-controlled: bounded, non-blocking read; malformed or invalid
        records are dropped with a log line (never their contents), an unreadable file
        starts empty.
        """
        loaded: dict[str, Publication] = {}
        for item in self._read():
            pub = parse_publication(item)
            if pub is None:
                log.warning("dropping malformed state record")
                continue
            try:
                self._check(pub)
            except errors.CsiError as exc:
                log.warning("dropping invalid state record", extra={"fields": {"reason": str(exc)}})
                continue
            loaded[pub.target_path] = pub
        with self._lock:
            self._pubs = loaded
            return list(loaded.values())

    def _read(self) -> list[object]:
        try:
            doc = read_json(self.path, MAX_STATE_BYTES)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.error(
                "state file unreadable; starting empty",
                extra={"fields": {"err": type(exc).__name__}},
            )
            return []
        items = doc.get("publications") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            log.error("state file has no publication list; starting empty")
            return []
        return items

    # -- queries -------------------------------------------------------------------------

    def get(self, target: str) -> Publication | None:
        with self._lock:
            return self._pubs.get(target)

    def all(self) -> list[Publication]:
        with self._lock:
            return list(self._pubs.values())

    def of_volume(self, volume_id: str) -> list[Publication]:
        with self._lock:
            return [p for p in self._pubs.values() if p.volume_id == volume_id]

    def __len__(self) -> int:
        with self._lock:
            return len(self._pubs)

    # -- changes (each one saved before it returns) --------------------------------------

    def put(self, pub: Publication) -> None:
        with self._lock:
            self._pubs[pub.target_path] = pub
            self._save()

    def update(self, target: str, **changes: Any) -> Publication | None:
        """Change fields of the record at ``target``; None (nothing saved) if there is none."""
        with self._lock:
            pub = self._pubs.get(target)
            if pub is None:
                return None
            pub = self._pubs[target] = dataclasses.replace(pub, **changes)
            self._save()
            return pub

    def remove(self, target: str) -> Publication | None:
        with self._lock:
            pub = self._pubs.pop(target, None)
            if pub is not None:
                self._save()
            return pub

    def save(self) -> None:
        """Write the memory as it is (after load: drops what load dropped)."""
        with self._lock:
            self._save()

    def _save(self) -> None:
        doc = {
            "version": STATE_VERSION,
            "publications": [asdict(p) for p in self._pubs.values()],
        }
        write_json_atomic(self.path, doc)
