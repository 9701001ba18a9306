"""What a Prometheus scrape of the node plugin costs with N volume daemons (--volume-metrics).

A NodeCore with real `fuse-crypt mount` daemons (the default fuse-crypt-prefork mounter,
each started with --metrics-addr 127.0.0.1:0) publishes N directory volumes and reads a
file through each; then the plugin's /metrics is fetched over HTTP `--scrapes` times per N
and the wall time (median, max), the body size and the sample count are printed, plus the
plugin process's CPU seconds per scrape (the HTTP client here included). Last, one daemon is
SIGSTOPped (alive, port open, never answers) to show what a hung daemon costs a scrape.

Run (root, FUSE): .venv/bin/python bench/volume_metrics_scrape.py [--volumes 1,10,50]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from csi_driver import cli  # noqa: E402
from csi_driver.core.controller import LocalBackend  # noqa: E402
from csi_driver.core.node import NodeCore, PublishRequest  # noqa: E402
from csi_driver.core.volcap import AccessType, Capability  # noqa: E402
from sealed_secrets.resolver import build_resolver  # noqa: E402

KEY = "kbs:///default/coco-csi/volume-root"
CAP = Capability(AccessType.MOUNT, 1)


def scrape(port: int) -> tuple[float, float, bytes]:
    cpu0, t0 = time.process_time(), time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        body = r.read()
    return time.perf_counter() - t0, time.process_time() - cpu0, body


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--volumes", default="1,10,50")
    ap.add_argument("--scrapes", type=int, default=20)
    args = ap.parse_args()
    counts = sorted(int(n) for n in args.volumes.split(","))
    tmp = tempfile.mkdtemp(prefix="volmetrics-", dir="/var/tmp")
    res = os.path.join(tmp, "resources.json")
    cli.main(["volume-key", "new", "-o", os.path.join(tmp, "root.jwk")])
    with open(os.path.join(tmp, "root.jwk"), "rb") as f:
        jwk = f.read()
    with open(res, "w") as f:
        json.dump({"default/coco-csi/volume-root": base64.b64encode(jwk).decode()}, f)
    core = NodeCore(
        "bench",
        os.path.join(tmp, "state"),
        build_resolver(f"offline-fs:{res}"),
        kubelet_dir=tmp,
        cipher_roots=[os.path.join(tmp, "backend")],
        allowed_key_resources=["kbs:///default/coco-csi/"],
        daemon_metrics=True,
    )
    metrics = core.metrics
    metrics.add_volume_daemons(core.supervisor.metric_endpoints)
    _, port = metrics.serve("127.0.0.1:0")
    backend = LocalBackend(os.path.join(tmp, "backend"))
    targets: list[str] = []
    print("| daemons | scrape median ms | max ms | CPU ms/scrape | body KiB | samples |")
    print("|---|---|---|---|---|---|")
    try:
        for n in counts:
            while len(targets) < n:
                i = len(targets)
                rec, ctx = backend.create(f"pvc-{i}", [CAP], {"keyResource": KEY})
                target = os.path.join(tmp, "pods", str(i), "mount")
                os.makedirs(os.path.dirname(target))
                core.publish(PublishRequest(rec.volume_id, target, CAP, False, {}, ctx))
                with open(os.path.join(target, "f"), "wb") as f:
                    f.write(os.urandom(65536))
                with open(os.path.join(target, "f"), "rb") as f:
                    f.read()
                targets.append(target)
            scrape(port)  # first one finds the ports (/proc), not measured
            runs = [scrape(port) for _ in range(args.scrapes)]
            walls = [r[0] * 1000 for r in runs]
            cpu = statistics.mean(r[1] for r in runs) * 1000
            body = runs[-1][2]
            samples = sum(1 for ln in body.splitlines() if ln and not ln.startswith(b"#"))
            print(
                f"| {n} | {statistics.median(walls):.1f} | {max(walls):.1f} | {cpu:.1f} "
                f"| {len(body) / 1024:.0f} | {samples} |"
            )
        handle = core.supervisor.get(targets[0])
        assert handle is not None
        os.kill(handle.pid, signal.SIGSTOP)
        try:
            wall, _, body = scrape(port)
        finally:
            os.kill(handle.pid, signal.SIGCONT)
        failed = [ln for ln in body.splitlines() if ln.startswith(b"coco_csi_volume_metrics_")]
        print(f"\none of {len(targets)} daemons SIGSTOPped: scrape {wall * 1000:.0f} ms")
        print("\n".join(ln.decode() for ln in failed))
    finally:
        metrics.close()
        core.shutdown(unmount=True)


if __name__ == "__main__":
    main()
