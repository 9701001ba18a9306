"""Checks of every request-derived name and path, in one place.

Everything a CSI request carries (volume ids, target paths, volume_context values) comes
from the host and the Kubernetes control plane, both outside the TEE's trust boundary.
Every check here uses full-string matching (``re.fullmatch``: a ``$`` anchor would let a
trailing newline through) and fails with INVALID_ARGUMENT, never a crash further down.

Paths are resolved exactly once (``resolve_under``): callers use the returned, resolved
path for every later step, so a symlink swapped in between cannot redirect an unmount or a
removal to another volume.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Sequence

from csi_driver import errors
from fuse_crypt import mounttable

# CSI allows 128 bytes; kubelet and our controller use [A-Za-z0-9._-]. No path separators,
# so ``<root>/<volume_id>`` is always one component below root.
VOLUME_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PATH_MAX = 4095  # bytes, without the NUL (Linux PATH_MAX is 4096 with it)
NAME_MAX = 255


def volume_id(value: object, name: str = "volume_id") -> str:
    """A volume id that is safe as a path component and on a log line."""
    if not isinstance(value, str) or not value:
        raise errors.InvalidArgument(f"{name} is required")
    if not VOLUME_ID.fullmatch(value) or value in (".", ".."):
        raise errors.InvalidArgument(f"{name} has invalid characters or length")
    return value


def path_text(path: object, name: str) -> str:
    """Present, no NUL, valid UTF-8, at most PATH_MAX bytes (else INVALID_ARGUMENT)."""
    if not isinstance(path, str) or not path:
        raise errors.InvalidArgument(f"{name} is required")
    if "\0" in path:
        raise errors.InvalidArgument(f"{name} contains a NUL byte")
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.InvalidArgument(f"{name} is not valid UTF-8") from None
    if len(raw) > PATH_MAX:
        raise errors.InvalidArgument(f"{name} is longer than {PATH_MAX} bytes")
    return path


def absolute_path(path: object, name: str) -> str:
    """An absolute, normalised path: no ``.``/``..``/empty components, no NUL, bounded.

    Other control characters are legal in Linux paths (mountinfo escapes them); the log
    layer escapes them on output.
    """
    text = path_text(path, name)
    if not text.startswith("/"):
        raise errors.InvalidArgument(f"{name} must be absolute")
    parts = text.rstrip("/").split("/")[1:]
    if any(p in ("", ".", "..") for p in parts):
        raise errors.InvalidArgument(f"{name} must be normalised (no '.', '..' or '//')")
    if any(len(p.encode()) > NAME_MAX for p in parts):
        raise errors.InvalidArgument(f"{name} has a component longer than {NAME_MAX} bytes")
    return text.rstrip("/") or "/"


def is_below(path: str, root: str) -> bool:
    """True if ``path`` lies strictly below ``root`` (both absolute and normalised)."""
    root = root.rstrip("/")
    return path.startswith(root + "/") and len(path) > len(root) + 1


def resolve_under(path: object, roots: Sequence[str], name: str) -> str:
    """Validate ``path``, resolve it once and require it strictly below one of ``roots``.

    The parent is resolved with realpath (kubelet's root may itself be a symlink, e.g.
    /var/lib/kubelet → /data/kubelet); the last component must not be a symlink, so the
    path names the very directory it points at and nothing else. ``roots`` must already
    be resolved (see ``real_root``).
    """
    text = absolute_path(path, name)
    if text == "/":
        raise errors.InvalidArgument(f"{name} must not be /")
    parent, leaf = os.path.split(text)
    resolved = os.path.join(os.path.realpath(parent), leaf)
    # A mount point is never a symlink (mounting follows links), and lstat of a FUSE mount
    # root asks its daemon, which may be wedged: do not touch it.
    mounted = resolved in mounttable.mounts_by_point()
    st = None if mounted else _lstat(resolved, name)
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise errors.InvalidArgument(f"{name} {text} is a symlink; refusing to follow it")
    if len(resolved.encode()) > PATH_MAX:
        raise errors.InvalidArgument(f"{name} is too long")
    if not any(is_below(resolved, root) for root in roots):
        raise errors.InvalidArgument(
            f"{name} {text} is not below the directories this node serves "
            f"({', '.join(roots) or 'none configured'})"
        )
    return resolved


def _lstat(path: str, name: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:  # after resolution
            raise errors.InvalidArgument(f"{name} is too long") from None
        return None  # e.g. ENOTDIR: the path cannot be a symlink we would follow


def real_root(path: str) -> str:
    """A configured root directory as an absolute, symlink-free path (flags, at start)."""
    return os.path.realpath(os.path.abspath(path))
