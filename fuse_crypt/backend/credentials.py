"""``CredentialBox``: the one place a mount daemon holds its object-store credentials.

Why a box: expiring STS credentials are replaced while the volume stays mounted (the CSI
node plugin hands new ones over the daemon's control socket, fuse_crypt/cli/credsocket.py).
Every request asks the box for the current triple when it is signed (oss2's credentials
provider, botocore's credentials object), so a swap applies atomically to the *next*
request while requests already signed finish with the old one.  A request that the store
refuses because its credentials expired waits, bounded, for a newer version
(:meth:`wait_newer`) and is then sent again (fuse_crypt/backend/retrying.py).

Nothing here logs, and ``repr`` never shows a credential.
"""

from __future__ import annotations

import hmac
import threading
import time
from typing import Any

__all__ = ["CredentialBox"]


class CredentialBox:
    """Access key id, secret and optional session token, swapped atomically; ``version``
    counts the swaps that changed something."""

    def __init__(self, access_key: str, secret_key: str, token: str | None = None) -> None:
        self._cond = threading.Condition()
        self._value: tuple[str, str, str | None] = (access_key, secret_key, token)
        self._version = 0

    def __repr__(self) -> str:
        return f"CredentialBox(version={self._version})"

    @property
    def version(self) -> int:
        with self._cond:
            return self._version

    def get(self) -> tuple[str, str, str | None]:
        with self._cond:
            return self._value

    def snapshot(self) -> tuple[int, tuple[str, str, str | None]]:
        """(version, credentials) read together, so a caller can tell later whether the
        credentials it used are still the current ones."""
        with self._cond:
            return self._version, self._value

    def set(self, access_key: str, secret_key: str, token: str | None) -> bool:
        """Install new credentials; False (and no new version) when they equal the
        current ones, so an idempotent republish wakes nobody."""
        new = (access_key, secret_key, token)
        with self._cond:
            if _same(self._value, new):
                return False
            self._value = new
            self._version += 1
            self._cond.notify_all()
            return True

    def wait_newer(self, version: int, timeout: float) -> bool:
        """Block until the box holds a version newer than ``version`` (True) or
        ``timeout`` seconds pass (False)."""
        end = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while self._version <= version:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    # -- adapters for the two clients ------------------------------------------------------

    def oss_source(self) -> Any:
        """A zero-argument callable for OssTransport's ``credentials`` (asked per request)."""
        from fuse_crypt.backend.oss import OssCredentials

        def current() -> OssCredentials:
            ak, sk, tok = self.get()
            return OssCredentials(ak, sk, tok)

        return current

    def botocore_credentials(self) -> Any:
        """A botocore credentials object whose frozen value is read from the box for every
        request botocore signs (its signer calls ``get_frozen_credentials`` per request)."""
        import botocore.credentials

        box = self

        class _BoxCredentials(botocore.credentials.Credentials):  # type: ignore[misc]
            def __init__(self) -> None:
                ak, sk, tok = box.get()
                super().__init__(ak, sk, tok, method="coco-credential-box")

            def get_frozen_credentials(self) -> Any:
                ak, sk, tok = box.get()
                return botocore.credentials.ReadOnlyCredentials(ak, sk, tok)

            @property
            def access_key(self) -> str:
                return box.get()[0]

            @access_key.setter
            def access_key(self, value: str) -> None:
                pass

            @property
            def secret_key(self) -> str:
                return box.get()[1]

            @secret_key.setter
            def secret_key(self, value: str) -> None:
                pass

            @property
            def token(self) -> str | None:
                return box.get()[2]

            @token.setter
            def token(self, value: str | None) -> None:
                pass

        return _BoxCredentials()


def _same(a: tuple[str, str, str | None], b: tuple[str, str, str | None]) -> bool:
    """Constant-time comparison of two credential triples, element by element: joined with
    separators, a NUL moved from one field to the next (or a token ``"\\x01"`` against no
    token) would compare equal and a real swap would be skipped as unchanged."""
    keys = (
        hmac.compare_digest(a[0].encode(), b[0].encode()),
        hmac.compare_digest(a[1].encode(), b[1].encode()),
    )
    if a[2] is None or b[2] is None:
        return all(keys) and a[2] is None and b[2] is None
    return all(keys) and hmac.compare_digest(a[2].encode(), b[2].encode())
