"""CPU seconds the userspace LUKS2 daemon spends per GiB read, per XTS backend.

    .venv/bin/python bench/block_daemon_cpu.py [--size-mib 256] [--rounds 3] [--readers 1]

Wall-clock throughput on a shared machine says more about the other jobs than about us;
the daemon's own CPU time (utime + stime from /proc/PID/stat) per GiB is what the XTS change
should lower, and it is far less sensitive to load. One image file (LUKS2 made by
``format_volume``), ``fuse-crypt block-serve --allow-regular-file`` on it, and
``dd iflag=direct bs=1M`` of ``<mnt>/disk`` (what the loop device does, without loop and
ext4 in the way); the image is filled with random bytes first. Backends alternate, a fresh
daemon each time, each forced by FUSE_CRYPT_XTS_BACKEND (the default, libcrypto-evp-batch,
runs without it, and with it the C request loop); ``python-loop`` is the default backend
with ``FUSE_CRYPT_BLOCK_LOOP=python``, the request loop in Python.
``--readers N`` runs N such dd at once on N slices (parallel requests for the daemon's
worker threads, as the loop device sends them). As root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuse_crypt.luks2 import KdfCost, format_volume  # noqa: E402

BACKEND_ENV = "FUSE_CRYPT_XTS_BACKEND"  # fuse_crypt/luks2/segment.py
LOOP_ENV = "FUSE_CRYPT_BLOCK_LOOP"  # fuse_crypt/blockfront/native.py
# segment.BACKENDS, then the default backend with the request loop in Python: the first two
# run the Python loop anyway (the C loop needs the C sector loop), the third the C loop
CONFIGS = ("cryptography", "libcrypto-evp", "libcrypto-evp-batch", "python-loop")

MiB = 1 << 20
FUSE_CRYPT = str(Path(sys.executable).with_name("fuse-crypt"))
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def one(
    img: Path, mnt: Path, size_mib: int, backend: str, readers: int
) -> tuple[float, float, float]:
    """(wall s, daemon user CPU s, daemon system CPU s) of one cold read."""
    env = dict(os.environ)
    env.pop(BACKEND_ENV, None)
    env.pop(LOOP_ENV, None)
    if backend == "python-loop":
        env[LOOP_ENV] = "python"
    elif backend != "libcrypto-evp-batch":  # the default
        env[BACKEND_ENV] = backend
    proc = subprocess.Popen(
        [FUSE_CRYPT, "block-serve", "--passphrase", "stdin", "--allow-regular-file", str(img),
         str(mnt)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(b"bench passphrase")
    proc.stdin.close()
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("block-serve did not start")
            time.sleep(0.01)
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3")
        c0, t0 = cpu_seconds(proc.pid), time.perf_counter()
        part = size_mib // readers
        dds = []
        for i in range(readers):
            cmd = ["dd", f"if={mnt / 'disk'}", "of=/dev/null", "bs=1M", f"count={part}",
                   f"skip={i * part}", "iflag=direct"]  # fmt: skip
            dds.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if any(dd.wait() for dd in dds):
            raise RuntimeError("dd failed")
        wall, c1 = time.perf_counter() - t0, cpu_seconds(proc.pid)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        proc.wait(30)
    return wall, c1[0] - c0[0], c1[1] - c0[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--readers", type=int, default=1, help="concurrent dd readers")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    args = ap.parse_args()
    for b in args.configs.split(","):
        if b not in CONFIGS:
            ap.error(f"unknown configuration {b!r}")
    if args.readers < 1 or args.size_mib % args.readers:
        ap.error("--size-mib must be a multiple of --readers (>= 1)")
    if os.geteuid() != 0:
        print("block_daemon_cpu: run as root (drop_caches, FUSE)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="blkcpu", dir=args.workdir))
    img, mnt = work / "disk.img", work / "mnt"
    mnt.mkdir()
    try:
        with img.open("wb") as f:
            f.truncate((16 + args.size_mib) * MiB)
        fd = os.open(img, os.O_RDWR)
        try:
            format_volume(fd, b"bench passphrase", kdf="pbkdf2", kdf_cost=KdfCost(iterations=1000))
            # Real bytes on the disk: a sparse image's holes are read without any I/O, which
            # hides the device (and flattered a direct-read experiment 2x; docs/block.md).
            chunk = os.urandom(MiB)
            for i in range(args.size_mib):
                os.pwrite(fd, chunk, (16 + i) * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        res: dict[str, list[tuple[float, float, float]]] = {b: [] for b in args.configs.split(",")}
        for _ in range(args.rounds):
            for b in res:
                res[b].append(one(img, mnt, args.size_mib, b, args.readers))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gib = args.size_mib / 1024
    print(f"{args.rounds} rounds, {args.size_mib} MiB read by {args.readers} dd iflag=direct "
          f"bs=1M from <mnt>/disk; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| backend | daemon CPU s/GiB min / median / max | of which user (median) "
          "| wall MB/s min / median / max |")  # fmt: skip
    print("|---|---:|---:|---:|")
    for b, rs in res.items():
        cpu = sorted((u + s) / gib for _, u, s in rs)
        user = statistics.median(u / gib for _, u, _ in rs)
        mbs = sorted(args.size_mib * MiB / 1e6 / w for w, _, _ in rs)
        c_s = f"{cpu[0]:.2f} / {statistics.median(cpu):.2f} / {cpu[-1]:.2f}"
        m_s = f"{mbs[0]:,.0f} / {statistics.median(mbs):,.0f} / {mbs[-1]:,.0f}"
        print(f"| {b} | {c_s} | {user:.2f} | {m_s} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
