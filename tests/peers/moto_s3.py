"""A real third-party S3 implementation on loopback: ``moto`` in server mode.

Why a subprocess: FUSE daemons, s3fs and rclone (other processes) talk to it too, and
its request handling must not share the GIL with the test process.

``MotoS3(tls_dir=None)`` starts ``moto.server`` on a free 127.0.0.1 port (with a fresh
CA and server certificate when ``tls_dir`` is given); ``new_bucket()`` makes a bucket
with a unique name; ``client()`` is a boto3 client for assertions on raw objects.
moto does not verify signatures; any access key works.
"""

from __future__ import annotations

import contextlib
import itertools
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoS3:
    def __init__(self, tls_dir: str | None = None) -> None:
        self.port = _free_port()
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
                return
            if self.proc.poll() is not None:
                raise RuntimeError("moto server exited at start")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto server did not start")

    def client(self) -> Any:
        import boto3
        import botocore.config

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            verify=self.ca_path if self.ca_path else False,
            config=botocore.config.Config(s3={"addressing_style": "path"}),
        )

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
        return S3Transport(
            bucket, access_key=ACCESS_KEY, secret_key=SECRET_KEY, endpoint_url=self.url, **kw
        )

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
def moto_s3(tls_dir: str | None = None) -> Iterator[MotoS3]:
    server = MotoS3(tls_dir)
    try:
        yield server
    finally:
        server.stop()
