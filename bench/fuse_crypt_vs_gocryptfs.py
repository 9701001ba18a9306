#!/usr/bin/env python3
"""fuse-crypt vs gocryptfs, side by side in one run on the same disk.

Both filesystems are mounted at the same time from cipher directories under one work
directory. Every workload runs in rounds with alternating order (gocryptfs first in even
rounds, fuse-crypt first in odd ones: ABBA), with `sync` before each measurement, and the
table reports the mean per filesystem. Whichever filesystem goes first on this kind of VM
creates files 2-3x faster (ext4 journal and writeback state), so a fixed order would measure
the order, not the filesystem.

Workloads (MB = 10^6 bytes):
  seq write   dd if=/dev/zero bs=1M count=SIZE conv=fsync
  seq read    the same file after `sync; echo 3 > /proc/sys/vm/drop_caches`
  small files create+write FILES 4 KiB files in nested dirs, read them all, rm -r the tree
  peak RSS    VmHWM of each daemon from /proc/PID/status at the end

Usage: .venv/bin/python bench/fuse_crypt_vs_gocryptfs.py [--size-mib 1024] [--files 5000]
       [--rounds 2]
Run as root (drop_caches). Needs gocryptfs and fusermount3 on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSWORD = b"bench password, not a secret\n"
TARGETS = {  # metric -> (min ratio fuse-crypt/gocryptfs, or None)
    "seq write": 0.8,
    "seq read": 1.0,
    "small: create": 0.5,
    "small: read": 0.5,
    "small: remove": 0.5,
    "small: all phases": 0.5,
}
RSS_TARGET_MIB = 64.0


@dataclass
class Fs:
    name: str
    cipher: str
    mnt: str
    proc: subprocess.Popen[bytes] | None = None
    results: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)

    def record(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.samples.setdefault(key, []).append(value)
            self.results[key] = sum(self.samples[key]) / len(self.samples[key])


def round_order(filesystems: list[Fs], rnd: int) -> list[Fs]:
    """ABBA: even rounds in the given order, odd rounds reversed."""
    return list(filesystems) if rnd % 2 == 0 else list(reversed(filesystems))


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, check=True, capture_output=True, **kw)  # type: ignore[call-overload]


def _is_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split(" ")[4] == path for line in f)


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        time.sleep(0.05)


def fuse_crypt_cmd() -> list[str]:
    return [sys.executable, "-m", "fuse_crypt.cli"]


def setup(work: str, passfile: str) -> list[Fs]:
    gc = Fs("gocryptfs", os.path.join(work, "gc.cipher"), os.path.join(work, "gc.mnt"))
    fc = Fs("fuse-crypt", os.path.join(work, "fc.cipher"), os.path.join(work, "fc.mnt"))
    for fs in (gc, fc):
        os.mkdir(fs.cipher)
        os.mkdir(fs.mnt)
    _run(["gocryptfs", "-q", "-init", "-scryptn", "10", "-passfile", passfile, gc.cipher])
    _run([*fuse_crypt_cmd(), "-q", "init", "--scryptn", "10", "--passfile", passfile, fc.cipher])
    # Foreground mounts so we hold each daemon's PID for VmHWM.
    gc.proc = subprocess.Popen(
        ["gocryptfs", "-q", "-fg", "-passfile", passfile, gc.cipher, gc.mnt],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    fc.proc = subprocess.Popen(
        [
            *fuse_crypt_cmd(),
            "-q",
            "mount",
            "--foreground",
            "--passfile",
            passfile,
            fc.cipher,
            fc.mnt,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    for fs in (gc, fc):
        _wait(lambda fs=fs: _is_mounted(fs.mnt), 60, f"{fs.name} mount")
    return [gc, fc]


def teardown(filesystems: list[Fs]) -> None:
    for fs in filesystems:
        if _is_mounted(fs.mnt):
            subprocess.run(["fusermount3", "-u", fs.mnt], check=False, capture_output=True)
        if fs.proc is not None:
            try:
                fs.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                fs.proc.kill()
                fs.proc.wait()


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        print(f"bench: warning: cannot drop caches ({e.strerror}); reads may be cached")


def vm_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def seq_write(fs: Fs, size_mib: int) -> float:
    path = os.path.join(fs.mnt, "big.bin")
    t0 = time.perf_counter()
    _run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={size_mib}", "conv=fsync"])
    dt = time.perf_counter() - t0
    return size_mib * 1048576 / dt / 1e6


def seq_read(fs: Fs, size_mib: int) -> float:
    path = os.path.join(fs.mnt, "big.bin")
    drop_caches()
    t0 = time.perf_counter()
    _run(["dd", f"if={path}", "of=/dev/null", "bs=1M"])
    dt = time.perf_counter() - t0
    if os.path.getsize(path) != size_mib * 1048576:
        raise SystemExit(f"bench: {fs.name}: file size mismatch after read")
    return size_mib * 1048576 / dt / 1e6


def _small_paths(root: str, n: int) -> list[str]:
    # 3 levels: 10 top dirs x 10 subdirs x up to n/100 files each.
    return [os.path.join(root, f"d{i % 10}", f"e{(i // 10) % 10}", f"f{i}") for i in range(n)]


def small_files(fs: Fs, n: int) -> dict[str, float]:
    root = os.path.join(fs.mnt, "small")
    paths = _small_paths(root, n)
    payload = os.urandom(4096)
    t0 = time.perf_counter()
    for p in paths:
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, payload)
        os.close(fd)
    t1 = time.perf_counter()
    drop_caches()
    t2 = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            if f.read() != payload:
                raise SystemExit(f"bench: {fs.name}: small file content mismatch")
    t3 = time.perf_counter()
    shutil.rmtree(root)
    t4 = time.perf_counter()
    return {
        "small: create": n / (t1 - t0),
        "small: read": n / (t3 - t2),
        "small: remove": n / (t4 - t3),
        "small: all phases": n / ((t1 - t0) + (t3 - t2) + (t4 - t3)),
    }


def print_table(gc: Fs, fc: Fs, size_mib: int, n_files: int) -> None:
    rows = [
        ("seq write", "MB/s", f"{size_mib} MiB, bs=1M, conv=fsync"),
        ("seq read", "MB/s", "caches dropped"),
        ("small: create", "files/s", f"{n_files} x 4 KiB, nested dirs"),
        ("small: read", "files/s", "caches dropped"),
        ("small: remove", "files/s", "rm -r"),
        ("small: all phases", "files/s", "files / (create + read + remove time)"),
    ]
    print()
    print("| workload | unit | gocryptfs | fuse-crypt | ratio | target | met |")
    print("|---|---|---:|---:|---:|---:|---|")
    for key, unit, _note in rows:
        g, f = gc.results[key], fc.results[key]
        ratio = f / g if g else float("nan")
        target = TARGETS[key]
        print(
            f"| {key} | {unit} | {g:,.0f} | {f:,.0f} | {ratio:.2f}x | >= {target:.1f}x | "
            f"{'yes' if ratio >= target else 'NO'} |"
        )
    g_rss, f_rss = gc.results["rss"], fc.results["rss"]
    print(
        f"| peak RSS (VmHWM) | MiB | {g_rss:.1f} | {f_rss:.1f} | {f_rss / g_rss:.2f}x | "
        f"<= {RSS_TARGET_MIB:.0f} MiB | {'yes' if f_rss <= RSS_TARGET_MIB else 'NO'} |"
    )
    print()
    for key, _unit, note in rows:
        print(f"  {key}: {note}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="sequential file size (1024)")
    ap.add_argument("--files", type=int, default=5000, help="number of 4 KiB files (5000)")
    ap.add_argument(
        "--workdir", default=None, help="parent directory for cipher dirs (default: /var/tmp)"
    )
    ap.add_argument(
        "--rounds", type=int, default=2, help="rounds in ABBA order, averaged (2; use even)"
    )
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    for tool in ("gocryptfs", "fusermount3", "dd"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found on PATH", file=sys.stderr)
            return 2
    parent = args.workdir or "/var/tmp"
    work = tempfile.mkdtemp(prefix="fc-bench-", dir=parent)
    passfile = os.path.join(work, "passfile")
    with open(passfile, "wb") as f:
        f.write(PASSWORD)
    filesystems: list[Fs] = []
    try:
        filesystems = setup(work, passfile)
        gc, fc = filesystems
        print(
            f"bench: work dir {work}; size {args.size_mib} MiB; {args.files} small files; "
            f"{args.rounds} rounds (ABBA order, mean reported)"
        )
        uname = os.uname()
        print(
            f"bench: {uname.sysname} {uname.release}, {os.cpu_count()} CPUs, "
            f"python {sys.version.split()[0]}"
        )
        gv = _run(["gocryptfs", "-version"]).stdout.decode().split(";")[0].strip()
        print(f"bench: peer {gv}")
        for rnd in range(args.rounds):
            print(f"bench: round {rnd + 1}/{args.rounds}", flush=True)
            for fs in round_order(filesystems, rnd):
                os.sync()
                fs.record({"seq write": seq_write(fs, args.size_mib)})
                print(
                    f"  {fs.name:10s} seq write {fs.samples['seq write'][-1]:8.1f} MB/s", flush=True
                )
            for fs in round_order(filesystems, rnd):
                fs.record({"seq read": seq_read(fs, args.size_mib)})
                print(
                    f"  {fs.name:10s} seq read  {fs.samples['seq read'][-1]:8.1f} MB/s", flush=True
                )
            for fs in filesystems:
                os.unlink(os.path.join(fs.mnt, "big.bin"))
            for fs in round_order(filesystems, rnd):
                os.sync()
                small = small_files(fs, args.files)
                fs.record(small)
                print(
                    f"  {fs.name:10s} small files create {small['small: create']:7.0f}/s, "
                    f"read {small['small: read']:7.0f}/s, "
                    f"remove {small['small: remove']:7.0f}/s",
                    flush=True,
                )
        for fs in (gc, fc):
            assert fs.proc is not None
            fs.results["rss"] = vm_hwm_mib(fs.proc.pid)
        print_table(gc, fc, args.size_mib, args.files)
    finally:
        teardown(filesystems)
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
