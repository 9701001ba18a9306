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

A second request type serves NodeGetVolumeStats (a bucket has no size: only the daemon,
which holds the credentials and the listing code, can measure the volume):
``STATS\nLOCATION=<location>\n\n`` (the location must be the daemon's own) is answered
``OK bytes=N objects=N pending=N age=N`` from the daemon's
:class:`~fuse_crypt.cli.usagecache.UsageCache`, or ``ERR <reason>``.  A listing may take
seconds, so each connection is served in its own thread (at most ``MAX_CLIENTS`` at once,
more are answered ``ERR busy``): a credential refresh never waits behind a listing.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass

from fuse_crypt.backend.credentials import CredentialBox
from fuse_crypt.cli.exitcodes import USAGE, CliError
from fuse_crypt.cli.usagecache import StillListing, UsageCache

__all__ = [
    "MAX_REQUEST",
    "CredentialSocket",
    "UsageRefused",
    "VolumeUsage",
    "query_usage",
    "send_credentials",
]

log = logging.getLogger("fuse_crypt.credsocket")

MAX_REQUEST = 16 * 1024
READ_TIMEOUT = 5.0
_IDENTITY = ("LOCATION", "ENDPOINT", "REGION")
MAX_CLIENTS = 4
MAX_ANSWER = 512
_STATS = b"STATS\n"
#: How long the plugin waits for a stats answer: the daemon waits up to 6 s for its listing
#: (UsageCache.wait), then answers from its last listing or ERR.
USAGE_TIMEOUT = 8.0
_USAGE_ANSWER = re.compile(
    r"OK bytes=([0-9]{1,20}) objects=([0-9]{1,20}) pending=([0-9]{1,20}) age=([0-9]{1,10})"
)


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
        #: Set by the mount once its store exists (fuse_crypt/cli/mountrun.py); until then
        #: a STATS request is answered "ERR ... not available yet".
        self.usage: UsageCache | None = None
        self._clients = threading.BoundedSemaphore(MAX_CLIENTS)
        self._client_threads: set[threading.Thread] = set()
        self._client_lock = threading.Lock()
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
        # Requests being read or answered finish first (each is bounded in time), so no
        # credentials are swapped after close() returns.
        deadline = time.monotonic() + READ_TIMEOUT + 1
        with self._client_lock:
            clients = list(self._client_threads)
        for th in clients:
            th.join(timeout=max(0.0, deadline - time.monotonic()))
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
            if not self._clients.acquire(blocking=False):
                log.warning("event=credsocket_refused reason=busy")
                with conn:
                    self._answer(conn, "ERR busy")
                continue
            th = threading.Thread(
                target=self._serve_one, args=(conn,), name="credsocket-client", daemon=True
            )
            with self._client_lock:
                self._client_threads.add(th)
            th.start()

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            with conn:
                try:
                    answer = self._handle(conn)
                except OSError:
                    return
                self._answer(conn, answer)
        finally:
            with self._client_lock:
                self._client_threads.discard(threading.current_thread())
            self._clients.release()

    @staticmethod
    def _answer(conn: socket.socket, answer: str) -> None:
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
        if data.startswith(_STATS):
            return self._stats(data[len(_STATS) :])
        try:
            creds = self._parse(data)
        except CliError as e:
            log.warning("event=credsocket_refused reason=invalid")
            return f"ERR {e}"
        changed = self.box.set(*creds)
        log.info("event=credentials_swapped changed=%s version=%d", changed, self.box.version)
        return "OK changed" if changed else "OK unchanged"

    def _stats(self, data: bytes) -> str:
        """``LOCATION=<ours>\n\n`` and nothing else: the volume's usage, or ERR."""
        head, sep, rest = data.partition(b"\n\n")
        name, eq, value = head.partition(b"=")
        try:
            location = value.decode("utf-8")  # a prefix may be any printable text
        except UnicodeDecodeError:
            location = None
        if not sep or rest or name != b"LOCATION" or not eq or location is None:
            log.warning("event=credsocket_refused reason=invalid")
            return "ERR malformed request"
        if location != self.identity["LOCATION"]:
            log.warning("event=credsocket_refused reason=other-location")
            return "ERR the request is for another volume location or endpoint"
        cache = self.usage
        if cache is None:
            return "ERR volume usage not available yet"
        try:
            (stored, objects, pending), age = cache.get()
        except StillListing:
            log.warning("event=volume_usage_failed reason=listing-still-running")
            return "ERR the listing is still running"
        except OSError as e:
            reason = _usage_reason(e)
            log.warning("event=volume_usage_failed reason=%s", reason.replace(" ", "-"))
            return f"ERR {reason}"
        return f"OK bytes={stored} objects={objects} pending={pending} age={int(age)}"

    def _parse(self, data: bytes) -> tuple[str, str, str | None]:
        from fuse_crypt.cli.objectloc import parse_credentials

        head, sep, body = data.partition(b"\n\n")
        if not sep:
            raise CliError("malformed request", USAGE)
        try:
            lines = head.decode("utf-8").split("\n")  # a prefix may be any printable text
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


def _usage_reason(e: OSError) -> str:
    """A fixed phrase per failure: store error texts are hostile input, never echoed."""
    if e.errno == errno.E2BIG:
        return "too many objects to measure"
    if e.errno == errno.ETIMEDOUT:
        return "the listing took too long"
    return f"the object store failed ({type(e).__name__})"


@dataclass(frozen=True)
class VolumeUsage:
    """The daemon's answer to STATS: ciphertext bytes and objects under the prefix, bytes
    written and not yet uploaded, and how old (seconds) the listing behind it is."""

    stored_bytes: int
    objects: int
    pending_bytes: int
    age: int


class UsageRefused(Exception):
    """The daemon answered ERR (``reason``: its phrase, at most 200 printable characters)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _exchange(path: str, req: bytes | bytearray, timeout: float) -> str:
    """One request, the daemon's answer (at most MAX_ANSWER bytes), as text."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(req)
        s.shutdown(socket.SHUT_WR)
        answer = bytearray()
        while len(answer) < MAX_ANSWER:
            chunk = s.recv(MAX_ANSWER)
            if not chunk:
                break
            answer += chunk
    return answer.decode("ascii", "replace").strip()


def query_usage(path: str, location: str, *, timeout: float = USAGE_TIMEOUT) -> VolumeUsage:
    """The client side of STATS (the CSI node plugin).  Raises OSError when the daemon
    cannot be reached or does not answer in time, UsageRefused on an ERR answer (or
    one that is not well formed)."""
    if "\n" in location or "\r" in location:
        raise UsageRefused("malformed location")
    answer = _exchange(path, _STATS + f"LOCATION={location}\n\n".encode(), timeout)
    m = _USAGE_ANSWER.fullmatch(answer)
    if m is not None:
        return VolumeUsage(*(int(g) for g in m.groups()))
    if answer.startswith("ERR "):
        reason = answer[4:204]
        raise UsageRefused(reason if reason.isprintable() else "unprintable reason")
    raise UsageRefused("no answer" if not answer else "malformed answer")


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
    req = bytearray(head.encode("utf-8"))
    req += credentials
    try:
        return _exchange(path, req, timeout)
    finally:
        req[:] = bytes(len(req))
