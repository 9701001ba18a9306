"""Plaintext paths → cipher paths: dir IVs, name encryption, long names, caches.

The kernel hands the high-level FUSE API full plaintext paths, so every operation
starts here.  Encrypting a name costs an EME call and every directory needs its IV
read from the backend, which would dominate small-file workloads; both results are
cached.  A name's cipher form depends only on its own directory's IV, so cached
entries stay correct until a directory is removed or renamed (its path may then
map to a different IV); those operations call :meth:`PathMapper.invalidate`.

The host can also swap directories behind our back.  A stale IV only hides names
from lookups (they fail to decrypt, nothing wrong is shown), but a name *written*
with a stale IV is lost for good on the next mount.  So every creation re-reads its
parent's IV from the backend (one small read per create, ~1-2% of a create's cost)
and drops all caches when it changed.  gocryptfs instead expires its IV cache after
a second, which leaves that window open.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading

from ..backend import StorageBackend
from ..errors import CorruptDataError, InvalidNameError
from ..nametransform import DIRIV_NAME, NameTransform

log = logging.getLogger("fuse_crypt.fusefrontend")

_CACHE_MAX = 8192
_ZERO_IV = bytes(16)


def join(cdir: str, name: str) -> str:
    """Join a cipher directory path and an on-disk name ("" is the root)."""
    return f"{cdir}/{name}" if cdir else name


def split_plain(path: str) -> tuple[str, str]:
    """'/a/b' -> ('/a', 'b'); '/b' -> ('/', 'b')."""
    parent, _, name = path.rpartition("/")
    return parent or "/", name


class PathMapper:
    """Maps plaintext FUSE paths to backend cipher paths for one volume.

    ``use_diriv`` is False for deterministic-name volumes (IV = 16 zero bytes).
    PlaintextNames volumes are refused by configfile, so names are always encrypted.
    """

    def __init__(
        self, backend: StorageBackend, nt: NameTransform, *, use_diriv: bool = True
    ) -> None:
        self.backend = backend
        self.nt = nt
        self.use_diriv = use_diriv
        self._ivs: dict[str, bytes] = {}
        self._paths: dict[str, str] = {"/": ""}
        self._gen = 0
        self._lock = threading.Lock()

    # -- caches -------------------------------------------------------------------

    def invalidate(self) -> None:
        """Forget all cached IVs and paths (after rmdir / directory rename)."""
        with self._lock:
            self._gen += 1
            self._ivs.clear()
            self._paths.clear()
            self._paths["/"] = ""

    def cached_cipher_path(self, plain: str | None) -> str | None:
        """Cipher path of ``plain`` if it is cached (no I/O, never raises): what log
        lines name instead of the plaintext path, which must not leave the TEE."""
        if plain is None:
            return None
        return self._paths.get(plain)

    def _remember(self, gen: int, plain: str, cpath: str) -> None:
        with self._lock:
            if gen != self._gen:
                return  # an invalidation raced with us; the result may be stale
            if len(self._paths) >= _CACHE_MAX:
                self._paths.clear()
                self._paths["/"] = ""
            self._paths[plain] = cpath

    def _read_dir_iv(self, cdir: str) -> bytes:
        try:
            data = self.backend.read_small_file(join(cdir, DIRIV_NAME), 64)
        except FileNotFoundError:
            log.warning("event=missing_diriv cdir=%s", cdir or "/")
            raise CorruptDataError("directory has no dir IV") from None
        return NameTransform.check_dir_iv(data)

    def dir_iv(self, cdir: str) -> bytes:
        """IV of cipher directory ``cdir`` (EIO-worthy CorruptDataError if bad)."""
        if not self.use_diriv:
            return _ZERO_IV
        iv = self._ivs.get(cdir)
        if iv is not None:
            return iv
        gen = self._gen
        iv = self._read_dir_iv(cdir)
        with self._lock:
            if gen == self._gen:
                if len(self._ivs) >= _CACHE_MAX:
                    self._ivs.clear()
                self._ivs[cdir] = iv
        return iv

    @property
    def generation(self) -> int:
        """Bumped by :meth:`invalidate`; read it before a change whose result is
        then handed to :meth:`seed_dir_iv`."""
        return self._gen

    def seed_dir_iv(self, cdir: str, iv: bytes, gen: int) -> None:
        """Remember the IV we just wrote for a new directory, so the first lookup
        inside it (right after mkdir, typically) does not read it back.  Skipped if
        an rmdir/rename invalidated the caches since ``gen`` was read."""
        if not self.use_diriv:
            return
        iv = NameTransform.check_dir_iv(iv)
        with self._lock:
            if gen != self._gen:
                return
            if len(self._ivs) >= _CACHE_MAX:
                self._ivs.clear()
            self._ivs[cdir] = iv

    # -- encryption -----------------------------------------------------------------

    def encrypt_name(self, cdir: str, name: str) -> tuple[str, str | None]:
        """(on-disk name, full cName for a ``.name`` file or None) of ``name`` in
        cipher directory ``cdir``."""
        return self.nt.disk_name(name, self.dir_iv(cdir))

    def cipher_path(self, plain: str | None) -> str:
        """Cipher path of an existing or to-be-created plaintext path."""
        c = self._paths.get(plain) if plain is not None else None
        if c is not None:
            return c
        if plain is None:  # nullpath_ok: an unlinked-but-open file has no path
            raise OSError(errno.ENOENT, "no path")
        gen = self._gen
        parent, name = split_plain(plain)
        cparent = self.cipher_path(parent)
        disk, _ = self.encrypt_name(cparent, name)
        c = join(cparent, disk)
        self._remember(gen, plain, c)
        return c

    def cipher_parent_and_name(self, plain: str) -> tuple[str, str, str | None]:
        """(cipher parent dir, on-disk name, long cName or None) for creating ``plain``,
        encrypted under the parent's IV as it is on disk now (see module docstring)."""
        self._check_parent_iv(plain)
        cached = self._paths.get(plain)
        if cached is not None and not cached.rpartition("/")[2].startswith("gocryptfs."):
            # The kernel looked the name up just before creating it: reuse that
            # (only long names need the full cName, so they take the slow path).
            cparent, _, disk = cached.rpartition("/")
            return cparent, disk, None
        gen = self._gen
        parent, name = split_plain(plain)
        cparent = self.cipher_path(parent)
        disk, long_cname = self.encrypt_name(cparent, name)
        self._remember(gen, plain, join(cparent, disk))
        return cparent, disk, long_cname

    def _check_parent_iv(self, plain: str) -> None:
        """Drop every cache if the parent's IV on disk is not the one cached."""
        if not self.use_diriv:
            return
        cparent = self.cipher_path(split_plain(plain)[0])
        cached = self._ivs.get(cparent)
        if cached is None:
            return  # the next dir_iv() reads it from disk anyway
        if self._read_dir_iv(cparent) != cached:
            log.warning("event=diriv_changed cdir=%s", cparent or "/")
            self.invalidate()

    # -- long-name side files ---------------------------------------------------------

    def remove_long_name(self, cpath: str) -> None:
        cdir, _, disk = cpath.rpartition("/")
        if NameTransform.is_long_name_file(disk):
            with contextlib.suppress(FileNotFoundError):
                self.backend.unlink(join(cdir, NameTransform.long_name_companion(disk)))

    # -- directory listings -------------------------------------------------------------

    def list_dir(self, plain_dir: str, cdir: str) -> list[tuple[str, str, int, int]]:
        """(plain name, on-disk name, inode, type bits) of the entries in ``cdir``;
        reserved files hidden, undecryptable names skipped with a log line (one bad
        entry must not hide the rest)."""
        entries = self.backend.scandir(cdir)
        nt = self.nt
        iv = self.dir_iv(cdir)
        out: list[tuple[str, str, int, int]] = []
        gen = self._gen
        prefix = plain_dir if plain_dir.endswith("/") else plain_dir + "/"
        remember: list[tuple[str, str]] = []
        for disk, ino, typ in entries:
            if disk.startswith("gocryptfs."):
                if not nt.is_long_name_file(disk):
                    continue  # diriv, conf, .name files, temporaries
                try:
                    content = self.backend.read_small_file(
                        join(cdir, NameTransform.long_name_companion(disk)), 4096
                    )
                    cname = nt.read_long_name(disk, content)
                except (OSError, InvalidNameError):
                    log.warning("event=bad_long_name cdir=%s entry=%s", cdir or "/", disk)
                    continue
            else:
                cname = disk
            try:
                plain = nt.decrypt_name(cname, iv)
            except InvalidNameError:
                log.warning("event=undecryptable_name cdir=%s entry=%s", cdir or "/", disk)
                continue
            out.append((plain, disk, ino, typ))
            remember.append((prefix + plain, join(cdir, disk)))
        with self._lock:
            if gen == self._gen and len(self._paths) + len(remember) < _CACHE_MAX:
                self._paths.update(remember)
        return out
