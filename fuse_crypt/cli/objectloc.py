"""Object-store volume locations for ``fuse-crypt init`` and ``mount``: ``s3://BUCKET/PREFIX``.

Why credentials never come from argv: the command line of every process is readable by
every user of the guest (``/proc/<pid>/cmdline``) and lands in process listings and logs.
They come from a file (``--credentials-file``, which must be a regular file, not a
symlink, owned by us and not readable by group or others: mode 0600 or 0400), or, when
no file is given, from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``).  The file is the safer choice: the environment of a process is
visible to its own user and root for its whole life.  The mount daemon re-reads the file
about once a minute, so expiring STS credentials rewritten into it are picked up without
a remount (if it disappears, the last keys are used until they are due, then requests
fail with EACCES).

File formats (at most 4 KiB): s3fs/ossfs ``passwd_file`` lines (``AKID:SECRET`` or
``BUCKET:AKID:SECRET``), or ``KEY=VALUE`` lines with the three variable names above.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import stat as stat_mod
from typing import Any

from fuse_crypt.cli.exitcodes import CIPHERDIR, USAGE, CliError

__all__ = [
    "ObjectLocation",
    "add_location_args",
    "is_object_url",
    "location_from_args",
]

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_CRED_MAX = 4096
_CRED_RE = re.compile(r"[\x21-\x7e]{1,2048}")


def is_object_url(text: str) -> bool:
    return text.startswith("s3://")


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
    #: Re-read by the daemon about once a minute, so rotated (STS) keys are picked up.
    credentials_file: str | None = None

    @property
    def display(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def transport(self) -> Any:
        """A fresh S3 transport (create it in the process that uses it: after a fork)."""
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


def add_location_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("object-store volumes (CIPHERDIR given as s3://BUCKET/PREFIX)")
    g.add_argument("--endpoint", metavar="URL", help="S3 endpoint (default: AWS)")
    g.add_argument("--region", metavar="REGION", default="us-east-1", help="signing region")
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
    g.add_argument("--spool-dir", metavar="DIR", help="where write spools (ciphertext) live")


def _parse_url(url: str) -> tuple[str, str]:
    rest = url[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise CliError("object-store location: invalid bucket name", USAGE)
    if prefix:
        parts = prefix.split("/")
        if any(p in ("", ".", "..") or not p.isprintable() for p in parts) or len(prefix) > 512:
            raise CliError("object-store location: invalid prefix", USAGE)
    return bucket, prefix


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
    if len(data) > _CRED_MAX:
        raise CliError(f"credentials file {path} is too large", USAGE)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise CliError(f"credentials file {path} is not ASCII", USAGE) from None
    env: dict[str, str] = {}
    s3fs: tuple[str, str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "=" in line and line.split("=", 1)[0].startswith("AWS_"):
            k, v = line.split("=", 1)
            env[k] = v
            continue
        fields = line.split(":")
        if len(fields) == 3 and fields[0] == bucket:
            s3fs = (fields[1], fields[2])
        elif len(fields) == 2 and s3fs is None:
            s3fs = (fields[0], fields[1])
    if s3fs is not None:
        ak, sk, tok = s3fs[0], s3fs[1], env.get("AWS_SESSION_TOKEN")
    else:
        ak, sk = env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", "")
        tok = env.get("AWS_SESSION_TOKEN")
    return _check_creds(ak, sk, tok, f"credentials file {path}")


def _check_creds(ak: str, sk: str, tok: str | None, where: str) -> tuple[str, str, str | None]:
    if not _CRED_RE.fullmatch(ak) or not _CRED_RE.fullmatch(sk):
        raise CliError(f"{where}: no usable access key id and secret", USAGE)
    if tok is not None and not re.fullmatch(r"[\x21-\x7e]{1,8192}", tok):
        raise CliError(f"{where}: malformed session token", USAGE)
    return ak, sk, tok


def location_from_args(args: argparse.Namespace, url: str) -> ObjectLocation:
    bucket, prefix = _parse_url(url)
    if args.endpoint and args.endpoint.startswith("http://") and not args.insecure_http:
        raise CliError("--endpoint is plain http: add --insecure-http to allow that", USAGE)
    if args.ca_bundle and not os.path.isfile(args.ca_bundle):
        raise CliError(f"--ca-bundle {args.ca_bundle}: no such file", USAGE)
    if args.credentials_file:
        ak, sk, tok = _read_credentials_file(args.credentials_file, bucket)
    else:
        ak, sk, tok = _check_creds(
            os.environ.get("AWS_ACCESS_KEY_ID", ""),
            os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
            os.environ.get("AWS_SESSION_TOKEN"),
            "environment",
        )
    return ObjectLocation(
        bucket=bucket,
        prefix=prefix,
        endpoint=args.endpoint,
        region=args.region,
        ca_bundle=args.ca_bundle,
        insecure_http=bool(args.insecure_http),
        access_key=ak,
        secret_key=sk,
        session_token=tok,
        spool_dir=getattr(args, "spool_dir", None),
        credentials_file=os.path.abspath(args.credentials_file) if args.credentials_file else None,
    )


def store_error(loc: ObjectLocation, e: OSError) -> CliError:
    """One readable line for a failed request (the typed transport errors carry the
    operation and the status, never a credential)."""
    return CliError(f"object store {loc.display}: {e.strerror or e}", CIPHERDIR)
