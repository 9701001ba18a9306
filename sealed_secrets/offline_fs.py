"""CoCo offline-fs KBC: resources shipped as JSON files inside the guest image.

File format (GC ``offline_fs.rs``): one JSON object ``{"repo/type/tag": "<standard base64>"}``
per file. Several files may be given; a later file overrides an earlier one for the same key.
Like CoCo, a missing file is only a warning (an image may omit optional files), but a present
file that does not parse is an error: silently ignoring it would hide a broken image.

Files are re-read when their mtime/size changes, so rotating a resource needs no restart.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
from collections.abc import Sequence

from sealed_secrets.errors import ResolverError, ResourceNotFound
from sealed_secrets.resource_uri import DEFAULT_PLUGIN, parse_resource_uri

log = logging.getLogger(__name__)

DEFAULT_FILES = ("/etc/aa-offline_fs_kbc-keys.json", "/etc/aa-offline_fs_kbc-resources.json")
EXTRA_FILES_ENV = "OFFLINE_FS_KBC_EXTRA_FILE_PATH"
MAX_FILE_BYTES = 16 * 1024 * 1024

_Stamp = tuple[int, int] | None


def _load_file(path: str) -> dict[str, bytes]:
    """Parse one resource file; errors name the file and key, never a value."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ResolverError(f"offline-fs file unreadable: path={path} errno={exc.errno}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ResolverError(f"offline-fs file too large: path={path}")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResolverError(
            f"offline-fs file is not valid JSON: path={path} line={getattr(exc, 'lineno', '?')}"
        ) from None
    if not isinstance(doc, dict):
        raise ResolverError(f"offline-fs file must hold a JSON object: path={path}")
    out: dict[str, bytes] = {}
    for key, value in doc.items():
        if not isinstance(value, str):
            raise ResolverError(f"offline-fs value is not a string: path={path} key={key}")
        try:
            out[key] = base64.b64decode(value.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error, ValueError):
            raise ResolverError(
                f"offline-fs value is not standard base64: path={path} key={key}"
            ) from None
    return out


class OfflineFsKbc:
    """Resource source reading CoCo offline-fs KBC files."""

    def __init__(self, paths: Sequence[str]) -> None:
        if not paths:
            raise ResolverError("offline-fs needs at least one resource file")
        self._paths = tuple(paths)
        self._lock = threading.Lock()
        self._stamps: dict[str, _Stamp] = {}
        self._per_file: dict[str, dict[str, bytes]] = {}
        self._merged: dict[str, bytes] = {}
        self._warned_missing: set[str] = set()
        self._refresh()

    @classmethod
    def from_environment(cls) -> OfflineFsKbc:
        """The CoCo default file set plus ``OFFLINE_FS_KBC_EXTRA_FILE_PATH``."""
        extra = [p for p in os.environ.get(EXTRA_FILES_ENV, "").split(",") if p]
        return cls([*DEFAULT_FILES, *extra])

    @property
    def paths(self) -> tuple[str, ...]:
        return self._paths

    def __repr__(self) -> str:
        return f"OfflineFsKbc(paths={list(self._paths)!r})"

    def _stamp(self, path: str) -> _Stamp:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ResolverError(
                f"offline-fs file unreadable: path={path} errno={exc.errno}"
            ) from None
        return (st.st_mtime_ns, st.st_size)

    def _refresh(self) -> None:
        changed = False
        for path in self._paths:
            stamp = self._stamp(path)
            if path in self._stamps and self._stamps[path] == stamp:
                continue
            changed = True
            self._stamps[path] = stamp
            if stamp is None:
                self._per_file.pop(path, None)
                if path not in self._warned_missing:
                    self._warned_missing.add(path)
                    log.warning("offline-fs file missing path=%s", path)
                continue
            self._warned_missing.discard(path)
            try:
                self._per_file[path] = _load_file(path)
            except ResolverError:
                self._stamps.pop(path, None)  # retry the parse next time
                raise
            log.info("offline-fs file loaded path=%s resources=%d", path, len(self._per_file[path]))
        if changed:
            merged: dict[str, bytes] = {}
            for path in self._paths:
                merged.update(self._per_file.get(path, {}))
            self._merged = merged

    def keys(self) -> list[str]:
        """Resource paths available (names only, for diagnostics)."""
        with self._lock:
            self._refresh()
            return sorted(self._merged)

    def get_resource(self, uri: str) -> bytes:
        """Return the resource for ``kbs:///repo/type/tag``; ResourceNotFound if absent."""
        parsed = parse_resource_uri(uri)
        if parsed.plugin != DEFAULT_PLUGIN:
            raise ResolverError(
                f"offline-fs serves only kbs:/// resources, not plugin={parsed.plugin}"
            )
        with self._lock:
            self._refresh()
            value = self._merged.get(parsed.path)
        if value is None:
            log.info("offline-fs resource missing uri=%s", parsed)
            raise ResourceNotFound(f"resource not found in offline-fs files: {parsed}", status=404)
        log.debug("offline-fs resource served uri=%s", parsed)
        return value
