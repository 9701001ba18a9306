"""The mount daemon's credential control socket (``fuse-crypt mount --control-socket PATH``).

Why a socket and not the stdin pipe: the CSI node plugin starts daemons through a prefork
zygote that writes the first credentials and the key into stdin and closes it, and a
daemon must outlive the plugin (upgrades, crashes).  A pipe held by the plugin would die
with it; a unix socket at a path derived from the volume's target is found again by a
restarted plugin.  It lives under ``/run`` (tmpfs: guest memory), never on host storage.

Rules, each one a check here:

* Only ``root`` (uid 0, checked with ``SO_PEERCRED``) may talk to it; the socket file is
  mode 0600 in a directory that must be ours and not writable by group or others.
* One request per connection, read with a 5 s deadline and at most 16 KiB; anything else
  is refused with one line, and nothing of it is logged.
* The request names the volume it is for (``LOCATION``, ``ENDPOINT``, ``REGION``): they
  must be exactly the daemon's own, so a republish can never point a mounted volume at
  another bucket or endpoint.  The credentials follow in the ``--credentials-stdin``
  format and pass the same validation as the first ones.
* The answer is ``OK changed``, ``OK unchanged`` or ``ERR <reason>``; the reason never
  contains request bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
import threading
import time

from fuse_crypt.backend.credentials import CredentialBox
from fuse_crypt.cli.exitcodes import USAGE, CliError

__all__ = ["MAX_REQUEST", "CredentialSocket", "send_credentials"]

log = logging.getLogger("fuse_crypt.credsocket")

MAX_REQUEST = 16 * 1024
READ_TIMEOUT = 5.0
_IDENTITY = ("LOCATION", "ENDPOINT", "REGION")


def _peer_uid(conn: socket.socket) -> int:
    data = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", data)
    return int(uid)


def _read_request(conn: socket.socket) -> bytes | None:
    """Up to MAX_REQUEST bytes, until the client shuts down its side; None if too big
    or too slow."""
    deadline = time.monotonic() + READ_TIMEOUT
    data = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        conn.settimeout(left)
        try:
            chunk = conn.recv(MAX_REQUEST + 1 - len(data))
        except TimeoutError:
            return None
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > MAX_REQUEST:
            return None


class CredentialSocket:
    """Serves ``path`` in a thread until :meth:`close`; swaps ``box`` on valid requests."""

    def __init__(
        self,
        path: str,
        box: CredentialBox,
        *,
        bucket: str,
        identity: tuple[str, str, str],
        allowed_uid: int = 0,
    ) -> None:
        self.path = path
        self.box = box
        self.bucket = bucket
        self.identity = dict(zip(_IDENTITY, identity, strict=True))
        self.allowed_uid = allowed_uid
        self._check_dir(os.path.dirname(path) or ".")
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise CliError(f"--control-socket {path} exists and is not a socket", USAGE)
            os.unlink(path)  # a stale socket of a previous daemon for this target
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self._sock.bind(path)
        except OSError as e:
            self._sock.close()
            # Some bind errors carry no strerror (a path longer than sun_path): their text.
            raise CliError(f"--control-socket {path}: {e.strerror or e}", USAGE) from None
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._sock.listen(4)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="credsocket", daemon=True)
        self._thread.start()

    @staticmethod
    def _check_dir(d: str) -> None:
        try:
            st = os.stat(d)
        except OSError as e:
            raise CliError(f"--control-socket directory {d}: {e.strerror}", USAGE) from None
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise CliError(
                f"--control-socket directory {d} must be ours and not writable by others",
                USAGE,
            )

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=READ_TIMEOUT + 1)
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(0.05)
                continue
            with conn:
                try:
                    answer = self._handle(conn)
                except OSError:
                    continue
                with contextlib.suppress(OSError):
                    conn.settimeout(READ_TIMEOUT)
                    conn.sendall(answer.encode("ascii") + b"\n")
                    conn.shutdown(socket.SHUT_WR)
                    # Drain (bounded) what a refused client still sends, so closing does
                    # not reset the connection and lose the answer.
                    conn.settimeout(1.0)
                    for _ in range(4):
                        if not conn.recv(MAX_REQUEST):
                            break

    def _handle(self, conn: socket.socket) -> str:
        if _peer_uid(conn) != self.allowed_uid:
            log.warning("event=credsocket_refused reason=peer-uid")
            return "ERR permission denied"
        data = _read_request(conn)
        if data is None:
            log.warning("event=credsocket_refused reason=too-large-or-slow")
            return "ERR request too large or too slow"
        try:
            creds = self._parse(data)
        except CliError as e:
            log.warning("event=credsocket_refused reason=invalid")
            return f"ERR {e}"
        changed = self.box.set(*creds)
        log.info("event=credentials_swapped changed=%s version=%d", changed, self.box.version)
        return "OK changed" if changed else "OK unchanged"

    def _parse(self, data: bytes) -> tuple[str, str, str | None]:
        from fuse_crypt.cli.objectloc import parse_credentials

        head, sep, body = data.partition(b"\n\n")
        if not sep:
            raise CliError("malformed request", USAGE)
        try:
            lines = head.decode("ascii").split("\n")
        except UnicodeDecodeError:
            raise CliError("malformed request", USAGE) from None
        given: dict[str, str] = {}
        for line in lines:
            name, eq, value = line.partition("=")
            if not eq or name not in _IDENTITY or name in given:
                raise CliError("malformed request", USAGE)
            given[name] = value
        if given != self.identity:
            raise CliError("the request is for another volume location or endpoint", USAGE)
        return parse_credentials(body.rstrip(b"\n") + b"\n", self.bucket, "new credentials")


def send_credentials(
    path: str,
    identity: tuple[str, str, str],
    credentials: bytes,
    *,
    timeout: float = READ_TIMEOUT + 1,
) -> str:
    """The client side (the CSI node plugin): one request, the daemon's one-line answer.
    ``credentials`` are ``--credentials-stdin`` lines (ending with an empty line).
    Raises OSError when the daemon cannot be reached or does not answer in time."""
    head = "".join(f"{k}={v}\n" for k, v in zip(_IDENTITY, identity, strict=True)) + "\n"
    req = bytearray(head.encode("ascii"))
    req += credentials
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(req)
            s.shutdown(socket.SHUT_WR)
            answer = bytearray()
            while len(answer) < 512:
                chunk = s.recv(512)
                if not chunk:
                    break
                answer += chunk
    finally:
        req[:] = bytes(len(req))
    return answer.decode("ascii", "replace").strip()
