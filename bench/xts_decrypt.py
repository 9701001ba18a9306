"""LUKS2 data-segment crypto alone: MB/s of 1 MiB decrypts (and encrypts), each XTS backend
in the same process, rounds alternated so that machine load hits them alike.

    .venv/bin/python bench/xts_decrypt.py [--rounds 9] [--mib 64] [--threads 1]

``cryptography`` is the first path (one `cryptography` context per 4 KiB sector),
``libcrypto-evp`` the second (one keyed OpenSSL context, IV reset per sector, the loop in
Python), ``libcrypto-evp-batch`` the default (the same context, the sector loop in C: one
call per 1 MiB). Prints wall-clock and CPU-time MB/s per configuration (min / median / max over
rounds); CPU time is the steadier figure on a shared machine. With ``--threads N`` N
long-lived threads decrypt concurrently on one segment, serialised by a lock as the block
device's FUSE workers are (aggregate wall MB/s; CPU time is the whole process's).

Per-thread contexts without that lock were tried and measured slower (docs/block.md,
"Figures"); their code is commit 3e742ec, whose version of this script compares them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuse_crypt.luks2 import XtsSegment  # noqa: E402

MiB = 1 << 20


CONFIGS = ["cryptography", "libcrypto-evp", "libcrypto-evp-batch"]


def make(backend: str, key: bytes) -> XtsSegment:
    seg = XtsSegment(key, backend=backend)
    assert seg.backend == backend, seg.backend
    return seg


def one_round(
    seg: XtsSegment, mib: int, pool: ThreadPoolExecutor | None, threads: int, encrypt: bool
) -> tuple[float, float]:
    """(wall s, CPU s of the process) for ``mib`` 1 MiB operations per thread."""
    src = os.urandom(MiB)
    lock = threading.Lock()  # what CryptDevice does around each call (its ``_crypto``)

    def work() -> None:
        out = bytearray(MiB)
        op = seg.encrypt_into if encrypt else seg.decrypt_into
        for i in range(mib):
            with lock:
                op(i * MiB, src, out)

    c, t = time.process_time(), time.perf_counter()
    if pool is None:
        work()
    else:  # long-lived threads, like libfuse's workers (each keeps its contexts)
        for f in [pool.submit(work) for _ in range(threads)]:
            f.result()
    return time.perf_counter() - t, time.process_time() - c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--mib", type=int, default=64, help="MiB per round and thread")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    args = ap.parse_args()
    key = os.urandom(64)
    ap_configs = args.configs.split(",")
    for b in ap_configs:
        if b not in CONFIGS:
            ap.error(f"unknown configuration {b!r} (known: {', '.join(CONFIGS)})")
    backends = ap_configs
    segs = {b: make(b, key) for b in backends}
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    pool = ThreadPoolExecutor(args.threads) if args.threads > 1 else None
    for _ in range(args.rounds):
        for op in ("decrypt", "encrypt"):
            for b in backends:
                r = one_round(segs[b], args.mib, pool, args.threads, op == "encrypt")
                rows.setdefault((op, b), []).append(r)
    if pool is not None:
        pool.shutdown()
    total = args.mib * args.threads * MiB / 1e6
    print(f"{args.rounds} rounds x {args.mib} MiB x {args.threads} thread(s), 1 MiB calls, "
          f"4096-byte sectors, AES-256-XTS; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| op | configuration | wall MB/s min / median / max "
          "| CPU-time MB/s min / median / max |")  # fmt: skip
    print("|---|---|---:|---:|")
    for (op, b), rs in rows.items():
        wall = sorted(total / w for w, _ in rs)
        cpu = sorted(total / c for _, c in rs if c > 0)
        w_s = f"{wall[0]:,.0f} / {statistics.median(wall):,.0f} / {wall[-1]:,.0f}"
        c_s = "-" if not cpu else f"{cpu[0]:,.0f} / {statistics.median(cpu):,.0f} / {cpu[-1]:,.0f}"
        print(f"| {op} | {b} | {w_s} | {c_s} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
