"""Block volumes, side by side on one loop device: plain ext4, fuse-crypt over ext4, and the
userspace LUKS2 engine (block-serve + loop + ext4), then NodeStageVolume latency.

Run as root (loop devices, mounts, drop_caches):

    .venv/bin/python bench/block_vs_ext4.py                       # 1 GiB, 5000 files
    .venv/bin/python bench/block_vs_ext4.py --size-mib 128 --files 1000   # quick

One image file under --workdir is attached once as /dev/loopN (buffered: the image file's
page cache sits under the device; ``--backing-direct-io`` attaches it with
``--direct-io=on``, nearer a cloud disk, which has no guest page cache under it); each
configuration makes its filesystem on that same device in turn. Then ``--pairs`` ABBA
pairs of small-file passes run with plain ext4 and the engine mounted at once, each on one
half of the same image file, so both sides of each ratio see the same second of the host.
``--workdir /dev/shm`` puts the image in RAM: a device faster than any cloud disk, so the
ratios show the crypt stack's CPU cost alone, the hardest case for them (docs/block.md
"Figures"). Prints one table with ratios against plain ext4 (targets from issue 11: seq
read >= 0.6x, seq write >= 0.5x, small files >= 0.8x, stage p50 <= 1 s) and `NO` next to
a missed target.

``--guest-halt-poll-ns N`` sets the guest's cpuidle-haltpoll window for the run (restored
after): a vCPU that goes idle polls for up to N ns before it halts. Small-file I/O here is
a chain of wake-ups (a thread blocks, another CPU wakes it); waking a halted vCPU costs a
VM exit and entry, and the userspace engine has one more such hand-off per request than
plain ext4 (the FUSE round trip). This VM's kernel command line sets the window to 0 where
the driver's own default is 200000 (docs/block.md "Figures").
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

MiB = 1 << 20
Config = contextlib.AbstractContextManager[tuple[Path, int]]
FUSE_CRYPT = str(Path(sys.executable).with_name("fuse-crypt"))
HALT_POLL = "/sys/module/haltpoll/parameters/guest_halt_poll_ns"


def sh(*argv: str, stdin: bytes | None = None) -> str:
    res = subprocess.run(argv, input=stdin, capture_output=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"{argv}: {res.stderr.decode(errors='replace')}")
    return res.stdout.decode()


def drop_caches() -> None:
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs so far, from /proc/stat. Steal is time the
    hypervisor gave our vCPUs to someone else: on this VM it comes in bursts of seconds,
    and the userspace engine, with more context switches per file, loses more to it than
    plain ext4 does (docs/block.md "Figures"), so each phase prints its share."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return f[7], sum(f)


def steal_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The host's share of the vCPUs between two :func:`cpu_ticks` readings, in %."""
    return 100 * (after[0] - before[0]) / max(1, after[1] - before[1])


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_ready(proc: subprocess.Popen[bytes], mnt: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if os.path.ismount(mnt):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        time.sleep(0.01)
    raise RuntimeError("daemon not ready")


def workloads(mnt: Path, size_mib: int, files: int, reads: int = 3) -> dict[str, float]:
    out: dict[str, float] = {}
    big = mnt / "big.bin"
    os.sync()
    t = time.perf_counter()
    sh("dd", "if=/dev/zero", f"of={big}", "bs=1M", f"count={size_mib}", "conv=fsync")
    out["seq write MB/s"] = size_mib * MiB / 1e6 / (time.perf_counter() - t)
    # Best of `reads` cold reads: on a shared machine one read swings 3x either way.
    best = 0.0
    for _ in range(reads):
        drop_caches()
        t = time.perf_counter()
        sh("dd", f"if={big}", "of=/dev/null", "bs=1M")
        best = max(best, size_mib * MiB / 1e6 / (time.perf_counter() - t))
    out["seq read MB/s"] = best
    big.unlink()
    # The small-file passes are best of `reads` too: one pass is 5,000 synchronous round
    # trips, and on this VM plain ext4's own figure moved 2,090-7,077 files/s between
    # minutes (docs/block.md "Figures").
    data = os.urandom(4096)
    best_create = best_read = 0.0
    for _ in range(reads):
        create, read = small_file_pass(mnt, files, data)
        best_create, best_read = max(best_create, create), max(best_read, read)
    out["small create+sync files/s"] = best_create
    out["small read files/s"] = best_read
    return out


def small_file_pass(mnt: Path, files: int, data: bytes) -> tuple[float, float]:
    """(create+sync, cold read) files/s of one pass. Each pass uses fresh names and is
    removed and synced after, so every pass starts from the same filesystem, and with cold
    caches: a pass right after one on the same filesystem would otherwise find its
    bitmaps, inode tables and directories cached, and in ABBA pairs that is the first pass
    of every pair (it made create+sync 1.3x faster for whichever went first)."""
    drop_caches()
    t = time.perf_counter()
    for i in range(files):
        d = mnt / f"d{i % 10}" / f"e{i // 10 % 10}"
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
    os.sync()
    create = files / (time.perf_counter() - t)
    drop_caches()
    t = time.perf_counter()
    for i in range(files):
        assert (mnt / f"d{i % 10}" / f"e{i // 10 % 10}" / f"f{i}").read_bytes() == data
    read = files / (time.perf_counter() - t)
    for i in range(10):
        shutil.rmtree(mnt / f"d{i}", ignore_errors=True)
    os.sync()
    return create, read


def interleaved_small_files(
    img: Path, work: Path, files: int, pairs: int, dio: list[str]
) -> list[dict[str, float]]:
    """Plain ext4 and the userspace engine mounted at once, on the two halves of the same
    image file (two loop devices), taking turns pass by pass in ABBA order.

    The per-config phases above run the two minutes apart, and this VM's host steals CPU
    in bursts of seconds that hit one of them and not the other (docs/block.md
    "Figures"); here the two passes of a pair lie about a second apart, and whichever
    goes first alternates, so drift and order cancel out of the per-pair ratios. Halfway
    through, the two swap halves (made anew), so neither keeps the better end of the
    image."""
    if pairs <= 0:
        return []
    half = img.stat().st_size // 2 // MiB * MiB
    loops: list[str] = []
    out: list[dict[str, float]] = []
    data = os.urandom(4096)
    try:
        for i in range(2):
            loops.append(sh("losetup", *dio, "--offset", str(i * half), "--sizelimit",
                            str(half), "--find", "--show", str(img)).strip())  # fmt: skip
        sides = 2 if pairs > 1 else 1  # the two swap halves after the first half of the pairs
        for side in range(sides):
            ks = range(side * pairs // sides, (side + 1) * pairs // sides)
            with (
                plain_ext4(loops[side], work) as (plain, _),
                userspace_luks(loops[1 - side], work) as (luks, _),
            ):
                for k in ks:
                    order = [("plain", plain), ("luks", luks)]
                    if k % 2:
                        order.reverse()
                    r: dict[str, float] = {}
                    for name, mnt in order:
                        s0 = cpu_ticks()
                        r[f"{name} create"], r[f"{name} read"] = small_file_pass(mnt, files, data)
                        s1 = cpu_ticks()
                        r[f"{name} steal"] = steal_percent(s0, s1)
                    out.append(r)
                    print(f"[pair {k + 1}, {order[0][0]} first, plain on half {side + 1}] "
                          f"create+sync files/s plain {r['plain create']:,.0f} LUKS2 "
                          f"{r['luks create']:,.0f}, read plain {r['plain read']:,.0f} LUKS2 "
                          f"{r['luks read']:,.0f}, host CPU steal {r['plain steal']:.1f}% / "
                          f"{r['luks steal']:.1f}%", flush=True)  # fmt: skip
    finally:
        for loop in loops:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
    return out


@contextlib.contextmanager
def plain_ext4(dev: str, work: Path) -> Iterator[tuple[Path, int]]:
    sh("mkfs.ext4", "-q", "-F", dev)
    mnt = work / "plain"
    mnt.mkdir(exist_ok=True)
    sh("mount", dev, str(mnt))
    try:
        yield mnt, 0
    finally:
        sh("umount", str(mnt))


@contextlib.contextmanager
def fuse_crypt_over_ext4(dev: str, work: Path) -> Iterator[tuple[Path, int]]:
    sh("mkfs.ext4", "-q", "-F", dev)
    lower, mnt = work / "lower", work / "fc"
    lower.mkdir(exist_ok=True)
    mnt.mkdir(exist_ok=True)
    sh("mount", dev, str(lower))
    cipher = lower / "cipher"
    cipher.mkdir()
    sh(FUSE_CRYPT, "-q", "init", "--passfile", "/dev/stdin", "--scryptn", "10", str(cipher),
       stdin=b"bench password\n")  # fmt: skip
    proc = subprocess.Popen(
        [FUSE_CRYPT, "mount", "--foreground", "--passfile", "/dev/stdin", str(cipher), str(mnt)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(b"bench password\n")
    proc.stdin.close()
    try:
        wait_ready(proc, mnt)
        yield mnt, proc.pid
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        proc.wait(30)
        sh("umount", str(lower))


@contextlib.contextmanager
def userspace_luks(
    dev: str, work: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[Path, int]]:
    from fuse_crypt.luks2 import KdfCost, format_volume

    fd = os.open(dev, os.O_RDWR)
    try:
        format_volume(fd, b"bench passphrase", kdf="pbkdf2", kdf_cost=KdfCost(iterations=1000))
    finally:
        os.close(fd)
    daemon_mnt, mnt = work / "blk", work / "luks"
    daemon_mnt.mkdir(exist_ok=True)
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [FUSE_CRYPT, "block-serve", "--passphrase", "stdin", dev, str(daemon_mnt)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=None if env is None else {**os.environ, **env},
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(b"bench passphrase")
    proc.stdin.close()
    loop = ""
    try:
        wait_ready(proc, daemon_mnt)
        loop = sh("losetup", "--direct-io=on", "--sector-size", "4096", "--find", "--show",
                  str(daemon_mnt / "disk")).strip()  # fmt: skip
        sh("mkfs.ext4", "-q", "-F", loop)
        sh("mount", loop, str(mnt))
        yield mnt, proc.pid
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        subprocess.run(["fusermount3", "-u", str(daemon_mnt)], capture_output=True)
        proc.wait(30)


def userspace_luks_python_loop(dev: str, work: Path) -> Config:
    """The same engine with the block daemon's request loop in Python (the fallback)."""
    return userspace_luks(dev, work, {"FUSE_CRYPT_BLOCK_LOOP": "python"})


def stage_latency(
    dev: str, img: Path, work: Path, rounds: int
) -> tuple[list[float], list[float], list[float]]:
    """NodeStageVolume of a new volume (sourceType empty on a blank device: the emptiness
    proof, LUKS2 format and mkfs), NodeStageVolume of the existing one (sourceType
    encrypted) and NodePublishVolume, through the node core, on the same loop device;
    seconds per call."""
    from csi_driver.core.node import NodeCore, PublishRequest, StageRequest
    from csi_driver.core.volcap import AccessType, Capability
    from sealed_secrets.resolver import build_resolver

    res = work / "resources.json"
    jwk = sh(str(Path(sys.executable).with_name("coco-csi")), "volume-key", "new").encode()
    res.write_text(json.dumps({"default/bench/root": base64.b64encode(jwk).decode()}))
    kube = work / "kubelet"
    (kube / "pods" / "p").mkdir(parents=True)
    (kube / "plugins").mkdir(parents=True)
    core = NodeCore("bench", str(work / "state"), build_resolver(f"offline-fs:{res}"),
                    mounter="gocryptfs", kubelet_dir=str(kube),
                    allowed_key_resources=["kbs:///default/bench/"])  # fmt: skip
    cap = Capability(AccessType.MOUNT, 1)
    ctx = {"devicePath": dev, "keyResource": "kbs:///default/bench/root"}
    staging, target = str(kube / "plugins" / "stage"), str(kube / "pods" / "p" / "mount")
    news: list[float] = []
    stages: list[float] = []
    publishes: list[float] = []
    try:
        for _ in range(rounds):
            # sourceType empty formats only a provably empty device: give it one (the image
            # file is cut to zero length and back, then the loop device's cache is dropped).
            size = img.stat().st_size
            with img.open("r+b") as f:
                f.truncate(0)
                f.truncate(size)
            sh("blockdev", "--flushbufs", dev)
            drop_caches()
            t = time.perf_counter()
            core.stage(StageRequest("bench-vol", staging, cap, {},
                                    {**ctx, "sourceType": "empty"}, {}))  # fmt: skip
            news.append(time.perf_counter() - t)
            core.unstage("bench-vol", staging)
        for _ in range(rounds):
            t = time.perf_counter()
            core.stage(StageRequest("bench-vol", staging, cap, {},
                                    {**ctx, "sourceType": "encrypted"}, {}))  # fmt: skip
            stages.append(time.perf_counter() - t)
            t = time.perf_counter()
            core.publish(PublishRequest("bench-vol", target, cap, False, {}, ctx, staging))
            publishes.append(time.perf_counter() - t)
            core.unpublish("bench-vol", target)
            core.unstage("bench-vol", staging)
    finally:
        core.shutdown(unmount=True)
    return news, stages, publishes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5, help="stage/publish repetitions")
    ap.add_argument(
        "--reads", type=int, default=3,
        help="passes of the cold sequential read and of the small-file create and read (best kept)",
    )  # fmt: skip
    ap.add_argument(
        "--pairs", type=int, default=10,
        help="ABBA pairs of small-file passes with plain ext4 and the engine mounted at once "
        "(0: skip)",
    )  # fmt: skip
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--cycles", type=int, default=1, help="repeat the configurations")
    ap.add_argument(
        "--python-loop",
        action="store_true",
        help="add a column: the userspace engine with its request loop in Python "
        "(FUSE_CRYPT_BLOCK_LOOP=python); the two loops take turns going first",
    )
    ap.add_argument(
        "--backing-direct-io",
        action="store_true",
        help="attach the image with losetup --direct-io=on: no guest page cache of the image "
        "file under the device, as with a cloud disk",
    )
    ap.add_argument(
        "--guest-halt-poll-ns",
        type=int,
        help=f"set {HALT_POLL} for the run (restored after); the driver's default is 200000",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("block_vs_ext4: run as root (loop devices, mounts)", file=sys.stderr)
        return 2
    halt_poll = Path(HALT_POLL)
    if args.guest_halt_poll_ns is not None and not halt_poll.exists():
        print(f"block_vs_ext4: no {HALT_POLL} (not a haltpoll guest)", file=sys.stderr)
        return 2
    old_halt_poll = halt_poll.read_text().strip() if halt_poll.exists() else "-"
    if args.guest_halt_poll_ns is not None:
        halt_poll.write_text(str(args.guest_halt_poll_ns))
    polling = str(args.guest_halt_poll_ns) if args.guest_halt_poll_ns is not None else old_halt_poll
    try:
        return _run(args, polling)
    finally:
        if args.guest_halt_poll_ns is not None:
            halt_poll.write_text(old_halt_poll)


def _run(args: argparse.Namespace, polling: str) -> int:
    """The run itself; ``polling`` is the guest_halt_poll_ns in effect, for the table."""
    work = Path(tempfile.mkdtemp(prefix="blkbench", dir=args.workdir))
    img = work / "device.img"
    with img.open("wb") as f:
        f.truncate((2 * args.size_mib + args.files * 8 // 1024 + 128) * MiB)
    dio = ["--direct-io=on"] if args.backing_direct_io else []
    dev = sh("losetup", *dio, "--find", "--show", str(img)).strip()
    runs: dict[str, list[dict[str, float]]] = {}
    steals: dict[str, list[float]] = {}
    # LUKS2 right after plain ext4: the two compared phases lie close in time (this VM's
    # disk changes speed from one minute to the next; docs/block.md "Figures").
    configs: list[tuple[str, Callable[[str, Path], Config]]] = [
        ("plain ext4", plain_ext4),
        ("LUKS2 userspace", userspace_luks),
        *([("LUKS2 python loop", userspace_luks_python_loop)] if args.python_loop else []),
        ("fuse-crypt/ext4", fuse_crypt_over_ext4),
    ]  # fmt: skip
    try:
        for cycle in range(args.cycles):
            drop_caches()
            t = time.perf_counter()
            sh("dd", f"if={dev}", "of=/dev/null", "bs=1M", f"count={args.size_mib}")
            raw = args.size_mib * MiB / 1e6 / (time.perf_counter() - t)
            print(f"[cycle {cycle + 1}] device cold read MB/s {raw:,.1f}", flush=True)
            order = list(configs)
            if args.python_loop and cycle % 2:  # the two loops take turns going first
                order[1], order[2] = order[2], order[1]
            for name, cfg in order:
                s0 = cpu_ticks()
                with cfg(dev, work) as (mnt, pid):
                    r = workloads(mnt, args.size_mib, args.files, args.reads)
                    if pid:
                        r["daemon peak RSS MiB"] = peak_rss_mib(pid)
                s1 = cpu_ticks()
                steal = steal_percent(s0, s1)
                runs.setdefault(name, []).append(r)
                steals.setdefault(name, []).append(steal)
                print(f"[{name}] " + ", ".join(f"{k} {v:,.1f}" for k, v in r.items())
                      + f", host CPU steal {steal:.1f}%", flush=True)  # fmt: skip
        pair_runs = interleaved_small_files(img, work, args.files, args.pairs, dio)
        news, stages, publishes = stage_latency(dev, img, work, args.rounds)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    targets = {"seq write MB/s": 0.5, "seq read MB/s": 0.6, "small create+sync files/s": 0.8,
               "small read files/s": 0.8}  # fmt: skip

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    base = runs["plain ext4"][0]
    n = args.cycles
    print(f"\n{args.size_mib} MiB sequential, {args.files} x 4 KiB files, device {dev}"
          + (" (--direct-io=on)" if args.backing_direct_io else "")
          + f", guest_halt_poll_ns {polling}"
          + (f"; medians of {n} cycles, ratio = median of the per-cycle ratios (min-max)"
             if n > 1 else ""))  # fmt: skip
    py = "LUKS2 python loop" if "LUKS2 python loop" in runs else None
    engines = ["LUKS2 userspace", *([py] if py else [])]
    head = ["workload", "plain ext4", "fuse-crypt/ext4", "LUKS2 userspace"]
    head += [py, "LUKS2/ext4", "python loop/ext4"] if py else ["LUKS2/ext4"]
    print("| " + " | ".join([*head, "target"]) + " |")
    print("|---" + "|---:" * (len(head) - 1) + "|---|")

    def ratio(name: str, key: str) -> tuple[float, str]:
        rs = sorted(e[key] / p[key] for p, e in zip(runs["plain ext4"], runs[name], strict=True))
        return statistics.median(rs), (f" ({rs[0]:.2f}-{rs[-1]:.2f})" if n > 1 else "")

    for key in base:
        rat, spread = ratio("LUKS2 userspace", key)
        tgt = targets.get(key)
        mark = "" if tgt is None else (f">= {tgt}x" + ("" if rat >= tgt else " NO"))
        cells = [f"{med(c, key):,.1f}" for c in ("plain ext4", "fuse-crypt/ext4", *engines)]
        cells.append(f"{rat:.2f}x{spread}")
        if py:
            pr, pspread = ratio(py, key)
            cells.append(f"{pr:.2f}x{pspread}")
        print(f"| {key} | " + " | ".join(cells) + f" | {mark} |")
    for key, label in (("create", "small create+sync files/s"), ("read", "small read files/s")):
        if not pair_runs:
            break
        tgt = targets[label]
        rs = sorted(r[f"luks {key}"] / r[f"plain {key}"] for r in pair_runs)
        rat, met = statistics.median(rs), sum(x >= tgt for x in rs)
        cells = [f"{statistics.median(r[f'plain {key}'] for r in pair_runs):,.1f}", "-",
                 f"{statistics.median(r[f'luks {key}'] for r in pair_runs):,.1f}",
                 *(["-"] if py else []), f"{rat:.2f}x ({rs[0]:.2f}-{rs[-1]:.2f})",
                 *(["-"] if py else [])]  # fmt: skip
        print(f"| {label}, {len(rs)} ABBA pairs | " + " | ".join(cells)
              + f" | >= {tgt}x{'' if rat >= tgt else ' NO'} ({met}/{len(rs)} pairs) |")  # fmt: skip
    for key in ("daemon peak RSS MiB",):
        cells = ["-", *(f"{med(c, key):.1f}" for c in ("fuse-crypt/ext4", *engines))]
        print(f"| {key} | " + " | ".join(cells) + " |" + " |" * (len(head) - len(cells)))
    cells = [f"{statistics.median(steals[c]):.1f} ({max(steals[c]):.1f})"
             for c in ("plain ext4", "fuse-crypt/ext4", *engines)]  # fmt: skip
    print("| host CPU steal %, median (max) | " + " | ".join(cells) + " |"
          + " |" * (len(head) - len(cells)))  # fmt: skip
    p50s, p50p = statistics.median(stages), statistics.median(publishes)
    print(
        f"| NodeStageVolume p50 s ({len(stages)} runs) | | | {p50s:.3f} | | <= 1 s"
        + ("" if p50s <= 1.0 else " NO")
        + " |"
    )
    print(f"| NodeStageVolume p50 s, new volume (format + mkfs) | | | "
          f"{statistics.median(news):.3f} | | |")  # fmt: skip
    print(f"| NodePublishVolume p50 s | | | {p50p:.3f} | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
