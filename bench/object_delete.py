"""DeleteVolume's bucket work on a moto server: how fast ``abort_uploads`` and
``delete_prefix`` empty a prefix, one request at a time against the bounded concurrency
DeleteVolume uses (``ABORT_PARALLEL`` aborts, ``BATCHES_IN_FLIGHT`` DeleteObjects batches
beside the listing), side by side in one run on the same server.

For each mode: fills ``pvcs/coco-1/`` with N one-byte objects and U unfinished multipart
uploads plus a sibling ``pvcs/coco-1-sibling/x`` object and upload that must survive
(bench/objectfill.py, 16 parallel requests, not timed), then times ``abort_uploads`` and
``delete_prefix`` through the retrying S3 transport.  ``--latency-ms`` puts the fault proxy
(tests/peers/fault_proxy.py) between the client and moto, holding every answer back that
long: a cloud endpoint's round trip, which loopback does not have.

    .venv/bin/python bench/object_delete.py [N] [--uploads U] [--latency-ms L] [--rounds R]
    # defaults: N=5000 objects, U=1000 uploads, L=0, R=1 (rounds alternate which mode is first)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.objectfill import (  # noqa: E402
    PREFIX,
    SIBLING,
    fill_objects,
    moto_bucket,
    start_uploads,
    upload_keys,
)
from csi_driver.deadline import Deadline  # noqa: E402
from csi_driver.volumes.objectdelete import (  # noqa: E402
    ABORT_PARALLEL,
    BATCHES_IN_FLIGHT,
    abort_uploads,
    delete_prefix,
)
from fuse_crypt.backend.retrying import RetryingTransport  # noqa: E402
from fuse_crypt.backend.s3 import S3Transport  # noqa: E402
from tests.peers.fault_proxy import Fault, FaultProxy  # noqa: E402
from tests.peers.moto_s3 import ACCESS_KEY, SECRET_KEY, MotoS3  # noqa: E402


@contextlib.contextmanager
def endpoint(moto: MotoS3, latency: float) -> Iterator[str]:
    """moto's URL, or a fault proxy's in front of it that delays every answer."""
    if latency <= 0:
        yield moto.url
        return
    with FaultProxy(("127.0.0.1", moto.port)) as proxy:
        proxy.always = Fault.slow(latency)
        yield proxy.endpoint


def main(n: int, uploads: int, latency_ms: float, rounds: int) -> None:
    modes = (("one at a time", 1, 1), ("bounded", ABORT_PARALLEL, BATCHES_IN_FLIGHT))
    # ABBA: whichever mode runs first meets a fresher server; alternate who goes first.
    order = [m for r in range(rounds) for m in (modes if r % 2 == 0 else modes[::-1])]
    with moto_bucket() as (moto, bucket, client), endpoint(moto, latency_ms / 1000) as url:
        s3 = S3Transport(
            bucket,
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            endpoint_url=url,
            allow_insecure_http=True,
        )
        transport = RetryingTransport(s3)
        print(f"{n} objects, {uploads} uploads, +{latency_ms:g} ms per request")
        for name, parallel, in_flight in order:
            fill_objects(client, bucket, n)
            start_uploads(client, bucket, uploads)
            t0 = time.monotonic()
            aborted = abort_uploads(transport, PREFIX, Deadline(300), parallel)
            t1 = time.monotonic()
            deleted = delete_prefix(transport, PREFIX, Deadline(300), in_flight)
            t2 = time.monotonic()
            left = sorted(moto.objects(bucket))
            assert left == [SIBLING], left[:5]
            assert upload_keys(client, bucket) == [SIBLING]
            abort_s, delete_s = t1 - t0, t2 - t1
            print(
                f"{name:>14} ({parallel} aborts, {in_flight} batches): "
                f"aborted {aborted} uploads in {abort_s:.2f} s ({aborted / abort_s:.0f}/s), "
                f"deleted {deleted} objects in {delete_s:.2f} s ({deleted / delete_s:.0f}/s)"
            )
            client.abort_multipart_upload(  # the sibling's, so the next mode starts clean
                Bucket=bucket,
                Key=SIBLING,
                UploadId=client.list_multipart_uploads(Bucket=bucket)["Uploads"][0]["UploadId"],
            )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", nargs="?", type=int, default=5000, help="objects (default 5000)")
    ap.add_argument("--uploads", type=int, default=1000, help="unfinished uploads (1000)")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="added per request (0)")
    ap.add_argument("--rounds", type=int, default=1, help="ABBA rounds of both modes (1)")
    args = ap.parse_args()
    main(args.n, args.uploads, args.latency_ms, args.rounds)
