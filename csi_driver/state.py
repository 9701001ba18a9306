"""The node plugin's state file: what it published, so a restarted plugin can find it again.

Holds no secrets (keys are never persisted; a restarted plugin cannot restart a daemon that
dies, it can only clean up so kubelet's retry works). Written atomically (temp + rename) so a
plugin crash mid-write leaves the previous version. Deliberately not fsync'ed: the file only
matters across *plugin process* restarts, where the page cache survives; after a guest reboot
every FUSE mount is gone anyway, and an fsync per publish cost ~30 ms here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class Publication:
    """One NodePublishVolume that succeeded."""

    volume_id: str
    target_path: str
    cipher_dir: str
    mounter: str
    readonly: bool
    access_mode: int
    pid: int
    ephemeral: bool = False
    pid_start: int = 0  # /proc start time of pid: survives pid reuse checks


class StateStore:
    """JSON file ``<state_dir>/node-state.json`` keyed by target path."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, "node-state.json")

    def load(self) -> dict[str, Publication]:
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("state file unreadable; starting empty", extra={"fields": {"err": exc}})
            return {}
        out: dict[str, Publication] = {}
        for item in doc.get("publications", []):
            try:
                pub = Publication(**item)
            except TypeError:
                continue
            out[pub.target_path] = pub
        return out

    def save(self, pubs: dict[str, Publication]) -> None:
        doc = {"version": STATE_VERSION, "publications": [asdict(p) for p in pubs.values()]}
        d = os.path.dirname(self.path)
        fd, tmp = tempfile.mkstemp(prefix=".node-state.", dir=d)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
