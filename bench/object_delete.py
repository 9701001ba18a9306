"""DeleteVolume's bucket work on a moto server: how fast ``delete_prefix`` empties a prefix.

Fills ``pvcs/coco-1/`` with N one-byte objects (16 parallel PUTs) plus a sibling
``pvcs/coco-1-sibling/x`` that must survive, then times ``delete_prefix`` through the
retrying S3 transport (ListObjectsV2 pages of 1,000, one DeleteObjects per page).

    .venv/bin/python bench/object_delete.py [N]   # default 5000
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csi_driver.deadline import Deadline  # noqa: E402
from csi_driver.volumes.objectdelete import delete_prefix  # noqa: E402
from fuse_crypt.backend.retrying import RetryingTransport  # noqa: E402
from tests.peers.moto_s3 import MotoS3  # noqa: E402


def main(n: int) -> None:
    moto = MotoS3()
    try:
        bucket = moto.new_bucket("bench")
        client = moto.client()

        def put(i: int) -> None:
            client.put_object(Bucket=bucket, Key=f"pvcs/coco-1/f{i:06d}", Body=b"x")

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, range(n)))
        client.put_object(Bucket=bucket, Key="pvcs/coco-1-sibling/x", Body=b"x")
        transport = RetryingTransport(moto.transport(bucket))
        t0 = time.monotonic()
        deleted = delete_prefix(transport, "pvcs/coco-1/", Deadline(300))
        dt = time.monotonic() - t0
        left = sorted(moto.objects(bucket))
        print(f"deleted {deleted} objects in {dt:.2f} s ({deleted / dt:.0f}/s); left: {left}")
        assert left == ["pvcs/coco-1-sibling/x"]
    finally:
        moto.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
