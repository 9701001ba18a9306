"""NodeGetVolumeStats of a bucket volume on a moto server: what the daemon's listing costs.

Fills ``pvcs/coco-1/`` with N objects of 1 byte (16 parallel PUTs) plus a sibling prefix
that must not be counted (bench/objectfill.py), then times ``ObjectStoreBackend.usage()``
(the daemon's side of STATS: ListObjectsV2 pages of 1,000 through the retrying S3
transport) with the default bounds (1,000,000 objects, 5 s), and once more through the
daemon's cache.

    .venv/bin/python bench/object_stats.py [N]   # default 10000
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.objectfill import PREFIX, fill_objects, moto_bucket  # noqa: E402
from fuse_crypt.backend import ObjectStoreBackend  # noqa: E402
from fuse_crypt.backend.retrying import RetryingTransport  # noqa: E402
from fuse_crypt.cli.usagecache import UsageCache  # noqa: E402


def main(n: int) -> None:
    with moto_bucket() as (moto, bucket, client):
        fill_objects(client, bucket, n)
        backend = ObjectStoreBackend(RetryingTransport(moto.transport(bucket)), PREFIX.rstrip("/"))
        try:
            cache = UsageCache(backend.usage, wait=60)
            t0 = time.monotonic()
            (stored, objects, _), _ = cache.get()
            first = time.monotonic() - t0
            t0 = time.monotonic()
            cache.get()
            cached = time.monotonic() - t0
            print(
                f"{objects} objects, {stored} bytes: listing {first:.2f} s "
                f"({objects / first:.0f} objects/s), cached answer {cached * 1e6:.0f} us"
            )
            assert (stored, objects) == (n, n)
        except OSError as e:
            print(f"{n} objects: refused: {e}")
        finally:
            backend.destroy()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10000)
