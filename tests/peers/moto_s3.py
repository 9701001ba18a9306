"""A real third-party S3 implementation on loopback: ``moto`` in server mode.

Why a subprocess: FUSE daemons, s3fs and rclone (other processes) talk to it too, and
its request handling must not share the GIL with the test process.

``MotoS3(tls_dir=None)`` starts ``moto.server`` on a free 127.0.0.1 port (with a fresh
CA and server certificate when ``tls_dir`` is given); ``new_bucket()`` makes a bucket
with a unique name; ``client()`` is a boto3 client for assertions on raw objects.
By default moto does not verify signatures; any access key works.

``MotoS3(auth=True)`` (``moto_s3(auth=True)``) turns on moto's IAM authentication
(``POST /moto-api/reset-auth`` with 0: ``INITIAL_NO_AUTH_ACTION_COUNT``, checked by
``moto/core/authorization.py``) after making an all-powerful IAM user whose key the
fixture itself uses from then on.  What moto 5.2.5 then verifies for every S3 request
(``moto/iam/access_control.py``, read and observed, see docs/fuse_crypt.md "Credential
refresh over moto with IAM auth"): the access key id must be an IAM user's key or an
AssumeRole session's key (else 403 ``InvalidAccessKeyId``); the SigV4 signature must be
the one its secret gives (else 403 ``SignatureDoesNotMatch``); a session token must be the
session's own, and an IAM user's key must carry none (else 400 ``InvalidToken``); the
principal's IAM policies must allow the action.  It does **not** check a key's
``Inactive`` status, a session's expiry, the request date against its clock, or the body
against ``X-Amz-Content-SHA256``; GetSessionToken's credentials are a fixed example key
it does not know (``InvalidAccessKeyId``).  ``new_user()``, ``create_key()``,
``delete_key()`` and ``assume_role()`` drive IAM/STS through the authenticated API.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

ACCESS_KEY = "AKIDTESTTESTTEST"
SECRET_KEY = "test-secret-key-not-real"
_seq = itertools.count()
#: What the users and roles made by :meth:`MotoS3.new_user` / :meth:`MotoS3.assume_role`
#: may do: all of S3, nothing else.
S3_ONLY = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
)
_EVERYTHING = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)
_ANYONE_MAY_ASSUME = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
    }
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoS3:
    def __init__(self, tls_dir: str | None = None, *, auth: bool = False) -> None:
        self.port = _free_port()
        #: The key this fixture signs with (the admin user's once ``auth`` is on).
        self.access_key, self.secret_key = ACCESS_KEY, SECRET_KEY
        self.auth = auth
        self.ca_path: str | None = None
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        scheme = "http"
        if tls_dir is not None:
            from tests.peers.tls import make_server_tls

            self.ca_path, cert, key = make_server_tls(tls_dir, ca_cn="moto test CA")
            cmd += ["-c", cert, "-k", key]
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        env = dict(os.environ, MOTO_ALLOW_NONEXISTENT_REGION="true")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                break
            if self.proc.poll() is not None:
                raise RuntimeError("moto server exited at start")
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError("moto server did not start")
        if auth:
            try:
                self._turn_auth_on()
            except BaseException:
                self.stop()
                raise

    def _turn_auth_on(self) -> None:
        """An admin user (allowed everything) made while moto still lets anyone in, then
        every request authenticated: the fixture signs with the admin's key."""
        iam = self.client("iam")
        iam.create_user(UserName="coco-admin")
        iam.put_user_policy(UserName="coco-admin", PolicyName="all", PolicyDocument=_EVERYTHING)
        key = iam.create_access_key(UserName="coco-admin")["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        self._moto_api("/moto-api/reset-auth", b"0")
        # From here on an unknown key is refused: prove it, so a moto that ignored the
        # switch cannot pass the auth tests vacuously.
        import botocore.exceptions

        try:
            self.client(key=("AKIAUNKNOWNUNKNOWN00", "x")).list_buckets()
        except botocore.exceptions.ClientError as e:
            if e.response["Error"]["Code"] != "InvalidAccessKeyId":
                raise
        else:
            raise RuntimeError("moto accepted an unknown access key with auth on")

    def _moto_api(self, path: str, body: bytes) -> None:
        """POST to moto's own control API (text/plain: moto reads the raw body)."""
        import ssl

        conn: http.client.HTTPConnection
        if self.ca_path:
            ctx = ssl.create_default_context(cafile=self.ca_path)
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10, context=ctx)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "text/plain"})
            resp = conn.getresponse()
            answer = resp.read(4096)
            if resp.status != 200:
                raise RuntimeError(f"moto {path}: HTTP {resp.status} {answer[:200]!r}")
        finally:
            conn.close()

    def client(
        self,
        service: str = "s3",
        *,
        key: tuple[str, str] | tuple[str, str, str | None] | None = None,
    ) -> Any:
        """A boto3 client signing with ``key`` (access key id, secret[, token]); by
        default the fixture's own key."""
        import boto3
        import botocore.config

        ak, sk, tok = self.access_key, self.secret_key, None
        if key is not None:
            ak, sk = key[0], key[1]
            tok = key[2] if len(key) == 3 else None
        return boto3.client(
            service,
            endpoint_url=self.url,
            aws_access_key_id=ak,
            aws_secret_access_key=sk,
            aws_session_token=tok,
            region_name="us-east-1",
            verify=self.ca_path if self.ca_path else False,
            config=botocore.config.Config(s3={"addressing_style": "path"}),
        )

    # -- IAM and STS (meaningful with ``auth=True``) ---------------------------------------

    def new_user(self, stem: str = "user", policy: str = S3_ONLY) -> str:
        """An IAM user allowed ``policy`` (all of S3 by default), with no access key yet."""
        name = f"{stem}-{next(_seq)}"
        iam = self.client("iam")
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=policy)
        return name

    def create_key(self, user: str) -> tuple[str, str]:
        """A new access key of ``user``: (access key id, secret). IAM allows two per user."""
        k = self.client("iam").create_access_key(UserName=user)["AccessKey"]
        return k["AccessKeyId"], k["SecretAccessKey"]

    def delete_key(self, user: str, key_id: str) -> None:
        """Revoke a key: moto refuses it from the next request on (``InvalidAccessKeyId``)."""
        self.client("iam").delete_access_key(UserName=user, AccessKeyId=key_id)

    def deactivate_key(self, user: str, key_id: str) -> None:
        """Mark a key ``Inactive`` (moto 5.2.5 keeps accepting it: see the docstring)."""
        self.client("iam").update_access_key(UserName=user, AccessKeyId=key_id, Status="Inactive")

    def assume_role(self, role: str | None = None, seconds: int = 900) -> tuple[str, str, str]:
        """STS session credentials (id, secret, token) of ``role`` (made, allowed all of
        S3, when None)."""
        iam = self.client("iam")
        if role is None:
            role = f"role-{next(_seq)}"
            iam.create_role(RoleName=role, AssumeRolePolicyDocument=_ANYONE_MAY_ASSUME)
            iam.put_role_policy(RoleName=role, PolicyName="p", PolicyDocument=S3_ONLY)
        arn = iam.get_role(RoleName=role)["Role"]["Arn"]
        c = self.client("sts").assume_role(
            RoleArn=arn, RoleSessionName=f"s-{next(_seq)}", DurationSeconds=seconds
        )["Credentials"]
        return c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"]

    def new_bucket(self, stem: str = "vol") -> str:
        name = f"{stem}-{os.getpid()}-{next(_seq)}"
        self.client().create_bucket(Bucket=name)
        return name

    def transport(self, bucket: str, **kw: Any) -> Any:
        from fuse_crypt.backend.s3 import S3Transport

        if self.ca_path:
            kw.setdefault("ca_bundle", self.ca_path)
        else:
            kw.setdefault("allow_insecure_http", True)
        if "credential_box" not in kw:
            kw.setdefault("access_key", self.access_key)
            kw.setdefault("secret_key", self.secret_key)
        return S3Transport(bucket, endpoint_url=self.url, **kw)

    def objects(self, bucket: str, prefix: str = "") -> dict[str, dict[str, Any]]:
        """Every object under ``prefix``: key -> {body, meta, ctype}."""
        c = self.client()
        out: dict[str, dict[str, Any]] = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                r = c.get_object(Bucket=bucket, Key=o["Key"])
                out[o["Key"]] = {
                    "body": r["Body"].read(),
                    "meta": r.get("Metadata", {}),
                    "ctype": r.get("ContentType", ""),
                }
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def moto_s3(tls_dir: str | None = None, *, auth: bool = False) -> Iterator[MotoS3]:
    server = MotoS3(tls_dir, auth=auth)
    try:
        yield server
    finally:
        server.stop()
