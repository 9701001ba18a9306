"""LUKS2 data-segment crypto alone: MB/s of 1 MiB decrypts (and encrypts), each XTS backend
in the same process, rounds alternated so that machine load hits them alike.

    .venv/bin/python bench/xts_decrypt.py [--rounds 9] [--mib 64] [--threads 1]

``cryptography`` is the path before issue 11's change (one `cryptography` context per
4 KiB sector), ``libcrypto-evp`` the new one (one keyed OpenSSL context, IV reset per
sector). Prints wall-clock and CPU-time MB/s per backend (min / median / max over rounds);
CPU time is the steadier figure on a shared machine. With ``--threads N`` N threads decrypt
concurrently on one segment (aggregate wall MB/s; CPU time is then not reported).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuse_crypt.luks2 import XtsSegment  # noqa: E402

MiB = 1 << 20


def make(backend: str, key: bytes) -> XtsSegment:
    seg = XtsSegment(key, backend=backend)
    assert seg.backend == backend, seg.backend
    return seg


def one_round(seg: XtsSegment, mib: int, threads: int, encrypt: bool) -> tuple[float, float]:
    """(wall s, CPU s of this thread) for ``mib`` 1 MiB operations per thread."""
    src = os.urandom(MiB)

    def work() -> None:
        out = bytearray(MiB)
        op = seg.encrypt_into if encrypt else seg.decrypt_into
        for i in range(mib):
            op(i * MiB, src, out)

    c, t = time.thread_time(), time.perf_counter()
    if threads == 1:
        work()
    else:
        ts = [threading.Thread(target=work) for _ in range(threads)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()
    return time.perf_counter() - t, time.thread_time() - c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--mib", type=int, default=64, help="MiB per round and thread")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    key = os.urandom(64)
    backends = ["cryptography", "libcrypto-evp"]
    segs = {b: make(b, key) for b in backends}
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for op in ("decrypt", "encrypt"):
            for b in backends:
                r = one_round(segs[b], args.mib, args.threads, op == "encrypt")
                rows.setdefault((op, b), []).append(r)
    total = args.mib * args.threads * MiB / 1e6
    print(f"{args.rounds} rounds x {args.mib} MiB x {args.threads} thread(s), 1 MiB calls, "
          f"4096-byte sectors, AES-256-XTS; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| op | backend | wall MB/s min / median / max | CPU-time MB/s min / median / max |")
    print("|---|---|---:|---:|")
    for (op, b), rs in rows.items():
        wall = sorted(total / w for w, _ in rs)
        cpu = sorted(total / c for _, c in rs if c > 0)
        w_s = f"{wall[0]:,.0f} / {statistics.median(wall):,.0f} / {wall[-1]:,.0f}"
        c_s = (
            "-"
            if args.threads > 1 or not cpu
            else f"{cpu[0]:,.0f} / {statistics.median(cpu):,.0f} / {cpu[-1]:,.0f}"
        )
        print(f"| {op} | {b} | {w_s} | {c_s} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
