"""NodePublishVolume latency and memory of the coco-csi node plugin, side by side with
Debian's gocryptfs mounting the same volumes on its own.

For each mounter (gocryptfs, fuse-crypt) a real `coco-csi node` process is started and
driven over its unix socket like kubelet: N volumes are published one after another (the
clock runs from the request until the mount is usable: the call returned and a listdir of
the mount succeeded), their RSS is taken with all N mounted, then all are unpublished.
The baseline is `gocryptfs -passfile /dev/stdin CIPHERDIR MNT` (it returns once the mount
is ready) for the same, already initialised volumes, plus the same for `fuse-crypt mount`.

Targets: publish p50 <= 1.5x the gocryptfs-alone mount p50; <= 40 MiB RSS per mounted volume.

Run: .venv/bin/python bench/csi_publish.py [--volumes 50]
         [--mounters gocryptfs,fuse-crypt,fuse-crypt-prefork]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coco_proto import csi_pb2  # noqa: E402
from csi_driver import convert  # noqa: E402
from csi_driver.client import CsiClient, mount_capability  # noqa: E402
from csi_driver.core.controller import LocalBackend  # noqa: E402
from csi_driver.keys import derive_volume_password  # noqa: E402

KEY = "kbs:///default/coco-csi/volume-root"
MiB = 1024 * 1024


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def mem_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB; PSS splits shared pages (libraries) fairly between processes."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def daemons_of(state_dir: str) -> list[int]:
    """Mount daemons (pids from the plugin's state file) plus its zygote, if any."""
    with open(os.path.join(state_dir, "node-state.json"), encoding="utf-8") as f:
        pids = [p["pid"] for p in json.load(f)["publications"]]
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if b"csi_driver.zygote" in f.read():
                        pids.append(int(d))
            except OSError:
                continue
    return sorted(set(pids))  # zygote-forked daemons carry the zygote's cmdline too


def baseline(tool: str, vols: list[tuple[str, str]], root: bytes, work: str) -> list[float]:
    """Mount time of the tool alone (returns once mounted), for each volume."""
    times = []
    for vid, cipher in vols:
        mnt = os.path.join(work, "base", vid)
        os.makedirs(mnt, exist_ok=True)
        pw = derive_volume_password(root, vid)
        if tool == "gocryptfs":
            argv = ["gocryptfs", "-q", "-nosyslog", "-passfile", "/dev/stdin", cipher, mnt]
        else:
            exe = os.path.join(os.path.dirname(sys.executable), "fuse-crypt")
            argv = [exe, "-q", "mount", "--passfile", "/dev/stdin", cipher, mnt]
        t0 = time.perf_counter()
        # stderr dropped: go-fuse logs a harmless RELEASEDIR race on the quick unmount below
        subprocess.run(argv, input=pw, check=True, stderr=subprocess.DEVNULL)
        os.listdir(mnt)
        times.append(time.perf_counter() - t0)
        subprocess.run(["fusermount3", "-u", mnt], check=True)
    return times


def run_plugin(mounter: str, vols, ctxs, work: str, res: str, root: bytes) -> dict[str, float]:
    sock = os.path.join(work, f"{mounter}.sock")
    state = os.path.join(work, f"state-{mounter}")
    log = open(os.path.join(work, f"{mounter}.log"), "ab")  # noqa: SIM115
    plugin = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "csi_driver.cli",
            "node",
            "--endpoint",
            f"unix://{sock}",
            "--node-id",
            "bench",
            "--resolver",
            f"offline-fs:{res}",
            "--state-dir",
            state,
            "--mounter",
            mounter,
            "--log-level",
            "warning",
        ],
        stdout=log,
        stderr=log,
    )
    log.close()
    while not os.path.exists(sock):
        if plugin.poll() is not None:
            raise SystemExit(f"node plugin ({mounter}) failed to start; see {work}/{mounter}.log")
        time.sleep(0.05)
    targets = [os.path.join(work, "pods", mounter, vid, "mount") for vid, _ in vols]
    lat: list[float] = []
    unlat: list[float] = []
    side: list[float] = []
    try:
        with CsiClient(f"unix://{sock}") as c:
            for (vid, cipher), ctx, target in zip(vols, ctxs, targets, strict=True):
                # Interleaved baseline: gocryptfs alone on the same volume right before, so
                # both see the same machine load (this VM is shared and noisy).
                side.extend(baseline("gocryptfs", [(vid, cipher)], root, work))
                time.sleep(0.05)  # let the baseline daemon exit before the timed publish
                os.makedirs(os.path.dirname(target), exist_ok=True)
                req = csi_pb2.NodePublishVolumeRequest(
                    volume_id=vid,
                    target_path=target,
                    volume_capability=mount_capability(),
                    volume_context=ctx,
                )
                t0 = time.perf_counter()
                c.node.NodePublishVolume(req)
                os.listdir(target)
                lat.append(time.perf_counter() - t0)
            plugin_rss, plugin_pss = mem_kib(plugin.pid)
            daemons = daemons_of(state)
            d_mem = [mem_kib(p) for p in daemons]
            for (vid, _), target in zip(vols, targets, strict=True):
                t0 = time.perf_counter()
                c.node.NodeUnpublishVolume(
                    csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target)
                )
                unlat.append(time.perf_counter() - t0)
    finally:
        plugin.terminate()
        plugin.wait(timeout=30)
    n = len(vols)
    total_rss = plugin_rss + sum(r for r, _ in d_mem)
    total_pss = plugin_pss + sum(p for _, p in d_mem)
    return {
        "gocryptfs_alone_p50": statistics.median(side),
        "gocryptfs_alone_p99": pct(side, 99),
        "ratio_p50": statistics.median(lat) / statistics.median(side),
        "first": lat[0],
        "p50": statistics.median(lat),
        "p99": pct(lat, 99),
        "max": max(lat),
        "unpublish_p50": statistics.median(unlat),
        "daemons": len(daemons),
        "plugin_rss_mib": plugin_rss / 1024,
        "total_rss_mib": total_rss / 1024,
        "total_pss_mib": total_pss / 1024,
        "rss_per_volume_mib": total_rss / 1024 / n,
        "pss_per_volume_mib": total_pss / 1024 / n,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volumes", type=int, default=50)
    ap.add_argument("--mounters", default="gocryptfs,fuse-crypt,fuse-crypt-prefork")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("csi_publish: needs root and /dev/fuse", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="csi-bench-", dir="/tmp")
    try:
        root = os.urandom(32)
        res = os.path.join(work, "res.json")
        with open(res, "w", encoding="utf-8") as f:
            json.dump({"default/coco-csi/volume-root": base64.b64encode(root).decode()}, f)
        backend = LocalBackend(os.path.join(work, "backend"))
        vols, ctxs = [], []
        for i in range(args.volumes):
            rec, ctx = backend.create(
                f"pvc-{i}", [convert.capability(mount_capability())], {"keyResource": KEY}
            )
            vols.append((rec.volume_id, ctx["cipherDir"]))
            ctxs.append(ctx)
            # Initialise the way the node would on first publish (gocryptfs format, logN 10).
            subprocess.run(
                [
                    "gocryptfs",
                    "-init",
                    "-q",
                    "-scryptn",
                    "10",
                    "-passfile",
                    "/dev/stdin",
                    ctx["cipherDir"],
                ],
                input=derive_volume_password(root, rec.volume_id),
                check=True,
            )
        base = {"gocryptfs": baseline("gocryptfs", vols, root, work)}
        mounters = [m for m in args.mounters.split(",") if m]
        if any(m.startswith("fuse-crypt") for m in mounters):
            base["fuse-crypt"] = baseline("fuse-crypt", vols, root, work)
        results = {m: run_plugin(m, vols, ctxs, work, res, root) for m in mounters}
        g50 = statistics.median(base["gocryptfs"])
        print(
            f"csi_publish: {args.volumes} volumes, host {os.uname().nodename}, "
            f"{os.cpu_count()} CPUs"
        )
        for tool, times in base.items():
            print(
                f"  {tool + ' alone (mount)':40s} p50 {statistics.median(times) * 1e3:7.1f} ms"
                f"  p99 {pct(times, 99) * 1e3:7.1f} ms"
            )
        for m, r in results.items():
            print(
                f"  {'NodePublishVolume [' + m + ']':40s} p50 {r['p50'] * 1e3:7.1f} ms"
                f"  p99 {r['p99'] * 1e3:7.1f} ms  (unpublish p50 "
                f"{r['unpublish_p50'] * 1e3:.1f} ms)"
            )
        print("  ratios (target: publish p50 <= 1.5x gocryptfs-alone p50; <= 40 MiB/volume):")
        for m, r in results.items():
            tool = "fuse-crypt" if m.startswith("fuse-crypt") else "gocryptfs"
            own = statistics.median(base[tool])
            print(
                f"    [{m}] publish p50 / interleaved gocryptfs-alone p50 "
                f"({r['gocryptfs_alone_p50'] * 1e3:.1f} ms) = {r['ratio_p50']:.2f}x"
                f"   (vs up-front gocryptfs {r['p50'] / g50:.2f}x, {tool}-alone "
                f"{r['p50'] / own:.2f}x)"
            )
            print(
                f"    [{m}] plugin RSS {r['plugin_rss_mib']:.1f} MiB; with {r['daemons']} "
                f"daemons RSS {r['total_rss_mib']:.1f} MiB = {r['rss_per_volume_mib']:.1f} "
                f"MiB/volume (PSS {r['pss_per_volume_mib']:.1f} MiB/volume)"
            )
        if args.json:
            print(
                json.dumps(
                    {
                        "baseline_p50": {k: statistics.median(v) for k, v in base.items()},
                        "plugins": results,
                    },
                    indent=1,
                )
            )
        return 0
    finally:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            stale = [ln.split()[4] for ln in f if ln.split()[4].startswith(work)]
        for mp in stale:
            subprocess.run(["fusermount3", "-uz", mp], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
