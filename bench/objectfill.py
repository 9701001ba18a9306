"""What the object-store DeleteVolume and NodeGetVolumeStats benchmarks share: a moto server
with one volume prefix filled, and neighbours that must survive (or not be counted).

Why one place: ``object_delete.py`` and ``object_stats.py`` each started moto, filled
``pvcs/coco-1/`` with N one-byte objects by 16 parallel PUTs and planted the sibling
``pvcs/coco-1-sibling/x``, in two copies of the same twenty lines.  The moto peer itself is
the tests' (``tests/peers/moto_s3.py``), as in the other object-store benchmarks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.peers.moto_s3 import MotoS3

#: The volume's prefix (``<class path>/<volume_id>/``).
PREFIX = "pvcs/coco-1/"
#: A neighbour whose name extends the volume id: never deleted, never counted.
SIBLING = "pvcs/coco-1-sibling/x"
#: PUTs (and CreateMultipartUploads) in flight while filling: filling is not what is timed.
FILL_PARALLEL = 16


def fill_objects(client: Any, bucket: str, n: int, prefix: str = PREFIX) -> None:
    """``n`` one-byte objects ``<prefix>f000000``... and the sibling."""

    def put(i: int) -> None:
        client.put_object(Bucket=bucket, Key=f"{prefix}f{i:06d}", Body=b"x")

    with ThreadPoolExecutor(FILL_PARALLEL) as pool:
        list(pool.map(put, range(n)))
    client.put_object(Bucket=bucket, Key=SIBLING, Body=b"x")


def start_uploads(client: Any, bucket: str, n: int, prefix: str = PREFIX) -> None:
    """``n`` unfinished multipart uploads under ``prefix`` (no parts: an abort costs the
    same either way) and one of the sibling's."""

    def start(key: str) -> None:
        client.create_multipart_upload(Bucket=bucket, Key=key)

    with ThreadPoolExecutor(FILL_PARALLEL) as pool:
        list(pool.map(start, [f"{prefix}big{i:06d}" for i in range(n)]))
    start(SIBLING)


def upload_keys(client: Any, bucket: str) -> list[str]:
    """Keys of every unfinished upload in the bucket (paged)."""
    out: list[str] = []
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        out += [u["Key"] for u in page.get("Uploads", [])]
    return sorted(out)


@contextlib.contextmanager
def moto_bucket(stem: str = "bench") -> Iterator[tuple[MotoS3, str, Any]]:
    """A moto server (stopped on exit), a fresh bucket on it, and a boto3 client."""
    moto = MotoS3()
    try:
        bucket = moto.new_bucket(stem)
        yield moto, bucket, moto.client()
    finally:
        moto.stop()
