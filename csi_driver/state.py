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
from dataclasses import asdict, dataclass, fields

from csi_driver.hostfile import read_bounded

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Thousands of publications fit easily; anything bigger is not ours.
MAX_STATE_BYTES = 8 << 20


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


_TYPES = {f.name: f.type for f in fields(Publication)}
_PY_TYPES = {"str": str, "bool": bool, "int": int}


def parse_publication(item: object) -> Publication | None:
    """One record with exactly the right field types, else None.

    Only the shape is checked here; what the values may be (ids, paths under the node's
    roots) is checked by the node core, which knows its configuration.
    """
    if not isinstance(item, dict) or not set(item) <= set(_TYPES):
        return None
    for name, typ in _TYPES.items():
        if name not in item:
            if name in ("ephemeral", "pid_start"):
                continue
            return None
        want = _PY_TYPES[str(typ)]
        value = item[name]
        # bool is an int subclass: keep them apart both ways.
        if type(value) is not want:
            return None
    return Publication(**item)


class StateStore:
    """JSON file ``<state_dir>/node-state.json`` keyed by target path."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, "node-state.json")

    def load(self) -> list[Publication]:
        """Well-formed records of the file (the state dir is host-controlled: bounded,
        non-blocking read; malformed records are dropped with a log line)."""
        try:
            doc = json.loads(read_bounded(self.path, MAX_STATE_BYTES))
        except FileNotFoundError:
            return []
        except (OSError, ValueError, RecursionError) as exc:
            log.error(
                "state file unreadable; starting empty",
                extra={"fields": {"err": type(exc).__name__}},
            )
            return []
        items = doc.get("publications") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            log.error("state file has no publication list; starting empty")
            return []
        out: list[Publication] = []
        for item in items:
            pub = parse_publication(item)
            if pub is None:
                log.warning("dropping malformed state record")
                continue
            out.append(pub)
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
