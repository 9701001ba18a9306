"""Where the object-store daemon's memory goes, stage by stage, for the S3 (boto3) and the
OSS (oss2) transport.

Each transport is measured in a fresh child process (so one's imports do not count for
the other) that goes through what the mount daemon does: import the frontend, import the
SDK, build the transport (the client), build the ``ObjectStoreBackend`` with the
daemon's defaults and the daemon's allocator set-up, then read a SIZE MiB object
sequentially through the backend (132 KiB block-aligned reads, as the FUSE frontend asks
for them). After each stage it prints ``Rss`` and ``Anonymous`` from
``/proc/self/smaps_rollup`` and ``VmHWM`` (the peak). With ``--tracemalloc`` it also
prints the Python-heap top packages at each stage (tracemalloc's own bookkeeping inflates
RSS, so the RSS figures come from a run without it).

The server (moto for S3, the protocol-level OSS peer from tests/peers) runs in another
process, so its memory is not counted.

Run: .venv/bin/python bench/objectstore_rss.py [--size-mib 256] [--transports s3,oss]
         [--tracemalloc]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
MiB = 1 << 20
KEY = "vol/big"
OSS_AK, OSS_SK = "LTAIbenchbenchbench", "bench-oss-secret-not-real"

_OSS_SERVER = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from tests.peers.oss_server import OssServer
srv = OssServer(max_object=1 << 30)
srv.add_credentials(sys.argv[2], sys.argv[3])
srv.create_bucket("bench-bucket")
with srv:
    print(srv.endpoint, flush=True)
    while True:
        time.sleep(3600)
"""


def _mem() -> dict[str, int]:
    """KiB: Rss and Anonymous of the whole process, and the peak (VmHWM)."""
    out: dict[str, int] = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("Rss", "Anonymous"):
                out[name] = int(rest.split()[0])
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                out["VmHWM"] = int(line.split()[1])
    return out


def _top(n: int = 6) -> list[tuple[str, float]]:
    import tracemalloc

    snap = tracemalloc.take_snapshot()
    per: dict[str, int] = {}
    for stat in snap.statistics("filename"):
        fn = stat.traceback[0].filename
        parts = fn.split(os.sep)
        pkg = next((parts[i + 1] for i, p in enumerate(parts) if p in ("site-packages", "lib")), fn)
        if "fuse_crypt" in parts:
            pkg = "fuse_crypt"
        per[pkg] = per.get(pkg, 0) + stat.size
    return sorted(((k, v / MiB) for k, v in per.items()), key=lambda kv: -kv[1])[:n]


def child(kind: str, endpoint: str, size: int, trace: bool) -> None:
    if trace:
        import tracemalloc

        tracemalloc.start(1)
    rows: list[dict[str, Any]] = []

    def stage(name: str) -> None:
        row: dict[str, Any] = {"stage": name, **_mem()}
        if trace:
            row["top_MiB"] = [(k, round(v, 1)) for k, v in _top()]
        rows.append(row)

    stage("python")
    import fuse_crypt.backend  # noqa: F401
    import fuse_crypt.cli.commands  # noqa: F401
    import fuse_crypt.fusefrontend  # noqa: F401

    stage("frontend imported")
    from fuse_crypt.cli.objectloc import ObjectLocation

    if kind == "s3":
        import fuse_crypt.backend.s3  # noqa: F401

        loc = ObjectLocation(
            kind="s3",
            bucket="bench-bucket",
            prefix="vol",
            endpoint=endpoint,
            region="us-east-1",
            ca_bundle=None,
            insecure_http=True,
            access_key="AKIDBENCHBENCH",
            secret_key="bench-secret-not-real",
        )
    else:
        import fuse_crypt.backend.oss  # noqa: F401

        loc = ObjectLocation(
            kind="oss",
            bucket="bench-bucket",
            prefix="vol",
            endpoint=endpoint,
            region="cn-hangzhou",
            ca_bundle=None,
            insecure_http=True,
            access_key=OSS_AK,
            secret_key=OSS_SK,
        )
    stage("SDK imported")
    backend = loc.backend()
    stage("client + backend built")
    # What the daemon does before serving an object store (fusefrontend/allocator.py's
    # bounded-heap profile, then one gc + malloc_trim), here through ctypes directly.
    import ctypes
    import gc

    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 4 << 20)  # M_TRIM_THRESHOLD
    libc.mallopt(-8, 2)  # M_ARENA_MAX
    gc.collect()
    libc.malloc_trim(0)
    stage("allocator set, heap trimmed")
    h = backend.open("big", os.O_RDONLY)
    step = 32 * 4128
    off = 0
    t0 = time.perf_counter()
    while True:
        got = backend.pread(h, step, off)
        off += len(got)
        if len(got) < step:
            break
    secs = time.perf_counter() - t0
    stage(f"after reading {off // MiB} MiB ({off / MiB / secs:.0f} MiB/s)")
    backend.close(h)
    print(json.dumps(rows), flush=True)
    backend.destroy()


def _upload_s3(url: str, size: int) -> None:
    import boto3

    c = boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="AKIDBENCHBENCH",
        aws_secret_access_key="bench-secret-not-real",
        region_name="us-east-1",
    )
    c.create_bucket(Bucket="bench-bucket")
    c.put_object(Bucket="bench-bucket", Key=KEY, Body=os.urandom(size))


def _upload_oss(endpoint: str, size: int) -> None:
    from fuse_crypt.backend.oss import OssCredentials, OssTransport

    t = OssTransport(
        endpoint,
        "bench-bucket",
        region="cn-hangzhou",
        credentials=OssCredentials(OSS_AK, OSS_SK),
        allow_insecure_http=True,
    )
    t.put(KEY, os.urandom(size), metadata={})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--transports", default="s3,oss")
    ap.add_argument("--tracemalloc", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "ENDPOINT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = args.size_mib * MiB
    if args.child:
        child(args.child[0], args.child[1], size, args.tracemalloc)
        return 0
    from tests.peers.moto_s3 import MotoS3

    for kind in args.transports.split(","):
        server: Any
        if kind == "s3":
            server = MotoS3()
            endpoint = server.url
            _upload_s3(endpoint, size)
        else:
            server = subprocess.Popen(
                [sys.executable, "-c", _OSS_SERVER, HERE, OSS_AK, OSS_SK],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert server.stdout is not None
            endpoint = server.stdout.readline().strip()
            _upload_oss(endpoint, size)
        try:
            cmd = [sys.executable, __file__, "--child", kind, endpoint]
            cmd += ["--size-mib", str(args.size_mib)]
            if args.tracemalloc:
                cmd.append("--tracemalloc")
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, check=False)
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return 1
            rows = json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            if kind == "s3":
                server.stop()
            else:
                server.terminate()
                server.wait(10)
        print(f"== {kind}")
        print(f"{'stage':<40}{'Rss MiB':>9}{'Anon MiB':>10}{'VmHWM MiB':>11}")
        for r in rows:
            print(
                f"{r['stage']:<40}{r['Rss'] / 1024:>9.1f}{r['Anonymous'] / 1024:>10.1f}"
                f"{r['VmHWM'] / 1024:>11.1f}"
            )
            if "top_MiB" in r:
                print("    python heap:", ", ".join(f"{k} {v}" for k, v in r["top_MiB"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
