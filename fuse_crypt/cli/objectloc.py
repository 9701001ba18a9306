"""Object-store volume locations for ``fuse-crypt init`` and ``mount``:
``s3://BUCKET/PREFIX`` (boto3) and ``oss://BUCKET/PREFIX`` (oss2), the one parser of both.

Why credentials never come from argv: the command line of every process is readable by
every user of the guest (``/proc/<pid>/cmdline``) and lands in process listings and logs.
They come from stdin (``--credentials-stdin``: what the CSI node plugin uses, so they touch
neither argv, nor a long-lived environment, nor a file), from a file
(``--credentials-file``, which must be a regular file, not a symlink, owned by us and not
readable by group or others: mode 0600 or 0400), or, when neither is given, from the
environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``; for
``oss://`` also oss2's ``OSS_ACCESS_KEY_ID``, ``OSS_ACCESS_KEY_SECRET``,
``OSS_SESSION_TOKEN``).  The environment of a process is visible to its own user and root
for its whole life; stdin is read once and gone.  The mount daemon re-reads a credentials
file about once a minute, so expiring STS credentials rewritten into it are picked up
without a remount (if it disappears, the last keys are used until they are due, then
requests fail with EACCES).  A mount daemon given ``--control-socket`` takes newer
credentials over that root-only socket instead (fuse_crypt/cli/credsocket.py: what the CSI
node plugin uses to refresh expiring STS keys on kubelet's republish).

Formats (at most 4 KiB): s3fs/ossfs ``passwd_file`` lines (``AKID:SECRET`` or
``BUCKET:AKID:SECRET``), or ``KEY=VALUE`` lines with the variable names above.  On stdin
the credentials end at the first empty line (or EOF); a password or master key read from
stdin follows them.

Every transport is wrapped in :class:`~fuse_crypt.backend.retrying.RetryingTransport`, so
5xx, throttling, timeouts and dropped connections are retried with backoff and jitter.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import stat as stat_mod
import sys
from typing import Any
from urllib.parse import urlsplit

from fuse_crypt.cli.exitcodes import CIPHERDIR, USAGE, CliError

__all__ = [
    "ObjectLocation",
    "add_location_args",
    "is_object_url",
    "location_from_args",
    "parse_credentials",
]

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_CRED_MAX = 4096
_CRED_RE = re.compile(r"[\x21-\x7e]{1,2048}")


SCHEMES = ("s3", "oss")
_ENV_NAMES = {
    "AWS_ACCESS_KEY_ID": "id",
    "AWS_SECRET_ACCESS_KEY": "secret",
    "AWS_SESSION_TOKEN": "token",
    "OSS_ACCESS_KEY_ID": "id",
    "OSS_ACCESS_KEY_SECRET": "secret",
    "OSS_SESSION_TOKEN": "token",
}
_OSS_REGION_FROM_HOST = re.compile(
    r"(?:[a-z0-9-]+\.)?oss-([a-z0-9-]+?)(?:-internal)?\.aliyuncs\.com"
)


def is_object_url(text: str) -> bool:
    return any(text.startswith(f"{scheme}://") for scheme in SCHEMES)


@dataclasses.dataclass
class ObjectLocation:
    """Where a volume lives in a bucket, and how to reach it (no secrets in repr)."""

    bucket: str
    prefix: str
    endpoint: str | None
    region: str
    ca_bundle: str | None
    insecure_http: bool
    access_key: str = dataclasses.field(repr=False)
    secret_key: str = dataclasses.field(repr=False)
    session_token: str | None = dataclasses.field(default=None, repr=False)
    spool_dir: str | None = None
    kind: str = "s3"  # "s3" | "oss"
    #: Re-read by the daemon about once a minute, so rotated (STS) keys are picked up.
    credentials_file: str | None = None
    #: The mount daemon's credential control socket (fuse_crypt/cli/credsocket.py).
    control_socket: str | None = None
    #: How long a request refused for its credentials waits for newer ones (then EIO).
    credentials_wait: float = 30.0
    #: Set in the mount daemon once its control socket serves: only then does a request
    #: refused for its credentials wait for new ones (init and the parent never wait).
    serving: bool = dataclasses.field(default=False, compare=False)
    _box: Any = dataclasses.field(default=None, repr=False, compare=False)

    def credential_box(self) -> Any:
        """The daemon's swappable credentials (one per location object, made on first use)."""
        if self._box is None:
            from fuse_crypt.backend.credentials import CredentialBox

            self._box = CredentialBox(self.access_key, self.secret_key, self.session_token)
        return self._box

    @property
    def display(self) -> str:
        return f"{self.kind}://{self.bucket}/{self.prefix}"

    def transport(self, retry_budget: float = 60.0) -> Any:
        """A fresh transport wrapped for retries (create it in the process that uses it:
        after a fork). Raises ValueError for an endpoint the client refuses."""
        from fuse_crypt.backend.retrying import RetryingTransport

        if self.control_socket is None or not self.serving:
            return RetryingTransport(self._raw_transport(), budget=retry_budget)
        return RetryingTransport(
            self._raw_transport(),
            budget=retry_budget,
            credentials=self.credential_box(),
            refresh_wait=self.credentials_wait,
        )

    def _raw_transport(self) -> Any:
        if self.kind == "oss":
            from fuse_crypt.backend.oss import OssCredentials, OssTransport
            from fuse_crypt.backend.transport import ObjectStoreError

            assert self.endpoint is not None  # location_from_args requires one for oss://
            creds: Any = OssCredentials(self.access_key, self.secret_key, self.session_token)
            if self.control_socket is not None:
                creds = self.credential_box().oss_source()
            elif self.credentials_file is not None:
                creds = _RereadOssCredentials(self.credentials_file, self.bucket, creds)
            try:
                return OssTransport(
                    self.endpoint,
                    self.bucket,
                    region=self.region,
                    credentials=creds,
                    ca_file=self.ca_bundle,
                    allow_insecure_http=self.insecure_http,
                )
            except ObjectStoreError as e:
                raise ValueError(e.strerror) from None
        from fuse_crypt.backend.s3 import S3Transport

        source = None
        if self.credentials_file is not None:
            path, bucket = self.credentials_file, self.bucket

            def source() -> tuple[str, str, str | None]:
                return _read_credentials_file(path, bucket)

        return S3Transport(
            self.bucket,
            access_key=self.access_key,
            secret_key=self.secret_key,
            session_token=self.session_token,
            credential_source=source,
            credential_box=self.credential_box() if self.control_socket is not None else None,
            endpoint_url=self.endpoint,
            region=self.region,
            ca_bundle=self.ca_bundle,
            allow_insecure_http=self.insecure_http,
        )

    def backend(self) -> Any:
        from fuse_crypt.backend import ObjectStoreBackend

        return ObjectStoreBackend(self.transport(), self.prefix, spool_dir=self.spool_dir)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name


class _RereadOssCredentials:
    """OssTransport's credential source for ``--credentials-file``: the file re-read at
    most once a minute (rotated STS keys apply without a remount); while it is unreadable
    the last good keys are used (the store answers EACCES once they expire)."""

    INTERVAL = 60.0

    def __init__(self, path: str, bucket: str, first: Any) -> None:
        import threading
        import time

        self._path, self._bucket, self._creds = path, bucket, first
        self._lock = threading.Lock()
        self._clock = time.monotonic
        self._next = self._clock() + self.INTERVAL

    def __call__(self) -> Any:
        from fuse_crypt.backend.oss import OssCredentials

        with self._lock:
            if self._clock() >= self._next:
                self._next = self._clock() + self.INTERVAL
                # Unreadable or malformed: keep the last good keys; never log the text.
                with contextlib.suppress(CliError, OSError):
                    self._creds = OssCredentials(*_read_credentials_file(self._path, self._bucket))
            return self._creds


def add_location_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "object-store volumes (CIPHERDIR given as s3://BUCKET/PREFIX or oss://BUCKET/PREFIX)"
    )
    g.add_argument(
        "--endpoint", metavar="URL", help="S3 endpoint (default: AWS); OSS endpoint (required)"
    )
    g.add_argument(
        "--region",
        metavar="REGION",
        help="signing region (S3 default us-east-1; OSS default: from oss-REGION.aliyuncs.com)",
    )
    g.add_argument("--ca-bundle", metavar="FILE", help="trust only these CAs for the endpoint")
    g.add_argument(
        "--insecure-http",
        action="store_true",
        help="allow a plain-http endpoint (loopback tests only: no transport security)",
    )
    g.add_argument(
        "--credentials-file",
        metavar="FILE",
        help="access key file (0600; AKID:SECRET or AWS_* KEY=VALUE lines); "
        "default: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from the environment",
    )
    g.add_argument(
        "--credentials-stdin",
        action="store_true",
        help="read the credentials (same formats) from stdin, up to an empty line, "
        "before any password or master key",
    )
    g.add_argument("--spool-dir", metavar="DIR", help="where write spools (ciphertext) live")
    g.add_argument(
        "--control-socket",
        metavar="PATH",
        help="mount: serve a unix socket (root only) that takes new credentials "
        "(expiring STS keys) without a remount; its directory must be ours, mode 0700",
    )
    g.add_argument(
        "--credentials-wait",
        metavar="SECONDS",
        type=float,
        default=30.0,
        help="with --control-socket: how long a request refused for expired credentials "
        "waits for new ones before it fails with EIO (default 30)",
    )


def _parse_url(url: str) -> tuple[str, str, str]:
    kind, _, rest = url.partition("://")
    if kind not in SCHEMES:
        raise CliError("object-store location must be s3:// or oss://", USAGE)
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise CliError("object-store location: invalid bucket name", USAGE)
    if prefix:
        parts = prefix.split("/")
        if any(p in ("", ".", "..") or not p.isprintable() for p in parts) or len(prefix) > 512:
            raise CliError("object-store location: invalid prefix", USAGE)
    if kind == "oss" and "." in bucket:
        raise CliError("object-store location: invalid bucket name", USAGE)
    return kind, bucket, prefix


def _read_credentials_file(path: str, bucket: str) -> tuple[str, str, str | None]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise CliError(f"credentials file {path}: {e.strerror}", USAGE) from None
    try:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            raise CliError(f"credentials file {path} is not a regular file", USAGE)
        if st.st_mode & 0o077 or st.st_uid != os.geteuid():
            raise CliError(f"credentials file {path} must be ours and mode 0600 or 0400", USAGE)
        data = os.read(fd, _CRED_MAX + 1)
    finally:
        os.close(fd)
    return parse_credentials(data, bucket, f"credentials file {path}")


def _read_credentials_stdin(bucket: str) -> tuple[str, str, str | None]:
    """Lines of stdin up to the first empty one (or EOF), 4 KiB at most, read line by
    line so a password or master key after them stays in the stream."""
    stream = sys.stdin.buffer
    data = b""
    while True:
        line = stream.readline(_CRED_MAX + 1 - len(data))
        if not line or line in (b"\n", b"\r\n"):
            break
        data += line
        if len(data) > _CRED_MAX:
            break
    return parse_credentials(data, bucket, "credentials on stdin")


def parse_credentials(data: bytes, bucket: str, where: str) -> tuple[str, str, str | None]:
    if len(data) > _CRED_MAX:
        raise CliError(f"{where}: too large", USAGE)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise CliError(f"{where}: not ASCII", USAGE) from None
    env: dict[str, str] = {}
    s3fs: tuple[str, str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "=" in line and line.split("=", 1)[0] in _ENV_NAMES:
            k, v = line.split("=", 1)
            env[_ENV_NAMES[k]] = v
            continue
        fields = line.split(":")
        if len(fields) == 3 and fields[0] == bucket:
            s3fs = (fields[1], fields[2])
        elif len(fields) == 2 and s3fs is None:
            s3fs = (fields[0], fields[1])
    if s3fs is not None:
        ak, sk, tok = s3fs[0], s3fs[1], env.get("token")
    else:
        ak, sk, tok = env.get("id", ""), env.get("secret", ""), env.get("token")
    return _check_creds(ak, sk, tok, where)


def _check_creds(ak: str, sk: str, tok: str | None, where: str) -> tuple[str, str, str | None]:
    if not _CRED_RE.fullmatch(ak) or not _CRED_RE.fullmatch(sk):
        raise CliError(f"{where}: no usable access key id and secret", USAGE)
    if tok is not None and not re.fullmatch(r"[\x21-\x7e]{1,8192}", tok):
        raise CliError(f"{where}: malformed session token", USAGE)
    return ak, sk, tok


def _region(kind: str, given: str | None, endpoint: str | None) -> str:
    if given:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", given):
            raise CliError("--region is not a valid region name", USAGE)
        return given
    if kind == "s3":
        return "us-east-1"
    host = (urlsplit(endpoint or "").hostname or "").lower()
    m = _OSS_REGION_FROM_HOST.fullmatch(host)
    if m is None:
        raise CliError(
            "--region is required when the OSS endpoint is not oss-REGION.aliyuncs.com", USAGE
        )
    return m.group(1)


def location_from_args(args: argparse.Namespace, url: str) -> ObjectLocation:
    kind, bucket, prefix = _parse_url(url)
    if args.endpoint and args.endpoint.startswith("http://") and not args.insecure_http:
        raise CliError("--endpoint is plain http: add --insecure-http to allow that", USAGE)
    if kind == "oss" and not args.endpoint:
        raise CliError("oss:// needs --endpoint (e.g. https://oss-cn-hangzhou.aliyuncs.com)", USAGE)
    if args.ca_bundle and not os.path.isfile(args.ca_bundle):
        raise CliError(f"--ca-bundle {args.ca_bundle}: no such file", USAGE)
    region = _region(kind, getattr(args, "region", None), args.endpoint)
    from_stdin = getattr(args, "credentials_stdin", False)
    control = getattr(args, "control_socket", None)
    wait = float(getattr(args, "credentials_wait", 30.0) or 0.0)
    if not 0.0 <= wait <= 3600.0:
        raise CliError("--credentials-wait must be between 0 and 3600 seconds", USAGE)
    if control is not None and args.credentials_file:
        raise CliError("give --control-socket or --credentials-file, not both", USAGE)
    if from_stdin and args.credentials_file:
        raise CliError("give --credentials-file or --credentials-stdin, not both", USAGE)
    if from_stdin:
        ak, sk, tok = _read_credentials_stdin(bucket)
    elif args.credentials_file:
        ak, sk, tok = _read_credentials_file(args.credentials_file, bucket)
    else:
        env = {
            field: os.environ[name]
            for name, field in _ENV_NAMES.items()
            if name in os.environ and (kind == "oss" or name.startswith("AWS_"))
        }
        ak, sk, tok = _check_creds(
            env.get("id", ""), env.get("secret", ""), env.get("token"), "environment"
        )
    return ObjectLocation(
        kind=kind,
        bucket=bucket,
        prefix=prefix,
        endpoint=args.endpoint,
        region=region,
        ca_bundle=args.ca_bundle,
        insecure_http=bool(args.insecure_http),
        access_key=ak,
        secret_key=sk,
        session_token=tok,
        spool_dir=getattr(args, "spool_dir", None),
        credentials_file=os.path.abspath(args.credentials_file) if args.credentials_file else None,
        control_socket=os.path.abspath(control) if control else None,
        credentials_wait=wait,
    )


def store_error(loc: ObjectLocation, e: OSError) -> CliError:
    """One readable line for a failed request (the typed transport errors carry the
    operation and the status, never a credential)."""
    return CliError(f"object store {loc.display}: {e.strerror or e}", CIPHERDIR)
