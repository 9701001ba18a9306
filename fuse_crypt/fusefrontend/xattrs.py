"""Extended attributes: names and values encrypted like gocryptfs (§15 of the sheet).

Every attribute, whatever its namespace, is stored as ``user.gocryptfs.<EME(name)>``
with an AEAD-sealed value, so the storage learns neither names nor values.  POSIX
ACLs are the exception (stored as-is) because the backing kernel must interpret
them.  ``security.capability`` is answered locally: the kernel asks for it on every
write, and file capabilities make no sense on an encrypted volume (like ``nosuid``).
"""

from __future__ import annotations

import errno
import logging

from ..backend import StorageBackend
from ..errors import CorruptDataError, InvalidNameError
from ..nametransform import NameTransform

log = logging.getLogger("fuse_crypt.fusefrontend")

ACL_NAMES = frozenset({"system.posix_acl_access", "system.posix_acl_default"})
CAPABILITY = "security.capability"
STORED_PREFIX = "user.gocryptfs."


class XattrMapper:
    def __init__(self, backend: StorageBackend, nt: NameTransform) -> None:
        self.backend = backend
        self.nt = nt

    def _stored_name(self, name: str) -> str:
        try:
            return self.nt.encrypt_xattr_name(name)
        except InvalidNameError:
            raise OSError(errno.EINVAL, "invalid xattr name") from None

    def get(self, cpath: str, name: str) -> bytes:
        if name == CAPABILITY:
            raise OSError(errno.ENODATA, "no such attribute")
        if name in ACL_NAMES:
            return self.backend.getxattr(cpath, name)
        value = self.backend.getxattr(cpath, self._stored_name(name))
        try:
            return self.nt.decrypt_xattr_value(value)
        except CorruptDataError:
            log.warning("event=corrupt_xattr cpath=%s", cpath or "/")
            raise OSError(errno.EIO, "corrupt xattr value") from None

    def set(self, cpath: str, name: str, value: bytes, flags: int) -> None:
        if name == CAPABILITY:
            raise OSError(errno.EOPNOTSUPP, "file capabilities are not supported")
        if name in ACL_NAMES:
            self.backend.setxattr(cpath, name, value, flags)
            return
        self.backend.setxattr(
            cpath, self._stored_name(name), self.nt.encrypt_xattr_value(value), flags
        )

    def list(self, cpath: str) -> list[str]:
        out: list[str] = []
        for stored in self.backend.listxattr(cpath):
            if stored in ACL_NAMES:
                out.append(stored)
            elif stored.startswith(STORED_PREFIX):
                try:
                    out.append(self.nt.decrypt_xattr_name(stored))
                except InvalidNameError:
                    log.warning("event=undecryptable_xattr_name cpath=%s", cpath or "/")
        return out

    def remove(self, cpath: str, name: str) -> None:
        if name == CAPABILITY:
            raise OSError(errno.ENODATA, "no such attribute")
        if name in ACL_NAMES:
            self.backend.removexattr(cpath, name)
            return
        self.backend.removexattr(cpath, self._stored_name(name))
