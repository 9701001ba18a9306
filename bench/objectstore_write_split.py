"""Where a sequential write to an object-store volume spends its time: the write phase
(writes into the mount) against the fsync phase (what is left to upload, then
CompleteMultipartUpload), with the CPU seconds the daemon and the moto server used in
each, and their peak RSS.  coco-csi only, one moto server (the counting one of
objectstore_vs_s3fs.py).

Why: issue 10's sequential-write target; with a CPU-bound peer on a 2-core VM, whether
an upload overlaps the writes shows in these two columns, not in one MiB/s figure.

Run: .venv/bin/python bench/objectstore_write_split.py [--size-mib 256] [--tree DIR]
(``--tree`` runs another checkout's daemon, e.g. an export of main, with this venv.)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from types import ModuleType


def _bench(tree: str) -> ModuleType:
    path = os.path.join(tree, "bench", "objectstore_vs_s3fs.py")
    spec = importlib.util.spec_from_file_location("objectstore_vs_s3fs_split", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _hwm_mib(pid: int) -> float:
    """Peak RSS (VmHWM) of ``pid`` in MiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _daemons(needle: str) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            out.append(int(p))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = ap.parse_args()
    b = _bench(args.tree)
    moto = b.Moto()
    try:
        moto.client().create_bucket(Bucket="split-bench")
        with tempfile.TemporaryDirectory() as work:
            stack = b.Ours(moto, "split-bench", work)
            stack.init()
            with stack.mount() as (mnt, _):
                time.sleep(0.5)  # the mount command's parent has exited
                pids = [*_daemons("fuse_crypt.cli mount"), moto.proc.pid]
                data = os.urandom(b.MiB)
                c0 = {p: _cpu(p) for p in pids}
                t0 = time.perf_counter()
                with open(os.path.join(mnt, "big"), "wb") as f:
                    for _ in range(args.size_mib):
                        f.write(data)
                    f.flush()
                    t1 = time.perf_counter()
                    c1 = {p: _cpu(p) for p in pids}
                    os.fsync(f.fileno())
                    t2 = time.perf_counter()
                    c2 = {p: _cpu(p) for p in pids}
                hwm = {p: _hwm_mib(p) for p in pids}
        load = os.getloadavg()
    finally:
        moto.stop()
    print(
        f"{args.size_mib} MiB: write {t1 - t0:.2f} s, fsync {t2 - t1:.2f} s, "
        f"{args.size_mib / (t2 - t0):.1f} MiB/s (load {load[0]:.1f})"
    )
    for p in pids:
        who = "moto" if p == moto.proc.pid else "daemon"
        print(
            f"  {who} cpu: write {c1[p] - c0[p]:.2f} s, fsync {c2[p] - c1[p]:.2f} s, "
            f"peak RSS {hwm[p]:.1f} MiB"
        )


if __name__ == "__main__":
    sys.exit(main())
