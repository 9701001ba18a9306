"""Object-store volumes side by side, on one moto server: coco-csi's one-hop mount
(`fuse-crypt mount s3://...`) against CDH's two-hop stack (s3fs, then gocryptfs on top)
and against `rclone mount` of an rclone `crypt` remote.

Per stack: sequential write and (after a remount, so no page cache helps) sequential read
of SIZE MiB, writing and reading FILES small files (4 KiB), the GET count and bytes fetched
for one 4 KiB read at a random offset of the big file (counted at the server, after the
file was opened and its first block read, with POSIX_FADV_RANDOM so kernel read-ahead does
not widen it), stored bytes over plaintext, and the daemons' RSS after the reads.

moto runs behind a WSGI middleware that counts requests and response bytes per method
(`/__stats`, `/__reset`), so all three stacks are measured the same way.

Targets (issue 10): sequential read >= 2x s3fs+gocryptfs and >= 1x rclone crypt; sequential
write >= 1.5x s3fs+gocryptfs; random 4 KiB read = 1 GET of <= 2 cipher blocks; stored bytes
< 1% over plaintext for large files; daemon RSS <= 64 MiB.

Run: .venv/bin/python bench/objectstore_vs_s3fs.py [--size-mib 256] [--files 1000]
         [--stacks ours,s3fs,rclone]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator

MiB = 1 << 20
AK, SK = "AKIDBENCHBENCH", "bench-secret-not-real"
PASSWORD = "bench password"
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FC = [sys.executable, "-m", "fuse_crypt.cli"]

_MOTO = r"""
import json, sys, threading
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server
app = DomainDispatcherApplication(create_backend_app)
lock = threading.Lock()
stats = {}
def counted(environ, start_response):
    m = environ["REQUEST_METHOD"]
    n = 0
    for chunk in app(environ, start_response):
        n += len(chunk)
        yield chunk
    with lock:
        s = stats.setdefault(m, [0, 0])
        s[0] += 1
        s[1] += n
def counting(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path in ("/__stats", "/__reset"):
        with lock:
            body = json.dumps(stats).encode()
            if path == "/__reset":
                stats.clear()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    return counted(environ, start_response)
make_server("127.0.0.1", int(sys.argv[1]), counting, threaded=True).serve_forever()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Moto:
    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _MOTO, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(300):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.1)
        raise RuntimeError("moto did not start")

    def stats(self, reset: bool = False) -> dict[str, list[int]]:
        with urllib.request.urlopen(f"{self.url}/__{'reset' if reset else 'stats'}") as r:
            return dict(json.loads(r.read()))

    def client(self, config=None):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=AK,
            aws_secret_access_key=SK,
            region_name="us-east-1",
            config=config,
        )

    def stored(self, bucket: str, prefix: str) -> int:
        total = 0
        for page in (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        ):
            total += sum(o["Size"] for o in page.get("Contents", []))
        return total

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == path for line in f)


def _wait_mount(path: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not _mounted(path):
        if time.monotonic() > end:
            raise RuntimeError(f"{path} did not mount")
        time.sleep(0.05)


def _umount(path: str) -> None:
    for argv in (["fusermount3", "-u", path], ["fusermount3", "-u", "-z", path]):
        if not _mounted(path):
            return
        subprocess.run(argv, capture_output=True, check=False)
        time.sleep(0.2)


def _rss_kib(needle: str) -> int:
    """Summed RSS of the processes whose command line mentions ``needle``."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            if needle not in cmd or "objectstore_vs_s3fs" in cmd:
                continue
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


class Stack:
    """mount() yields the plaintext directory and a needle for its daemons' RSS."""

    name = ""

    def __init__(self, moto: Moto, bucket: str, work: str) -> None:
        self.moto, self.bucket, self.work = moto, bucket, work
        self.creds = os.path.join(work, "creds")
        with open(self.creds, "w") as f:
            f.write(f"{AK}:{SK}\n")
        os.chmod(self.creds, 0o600)
        self.passfile = os.path.join(work, "pass")
        with open(self.passfile, "w") as f:
            f.write(PASSWORD + "\n")

    def init(self) -> None: ...

    @contextlib.contextmanager
    def mount(self) -> Iterator[tuple[str, str]]:
        yield "", ""


class Ours(Stack):
    name = "coco-csi (1 hop)"
    prefix = "ours"

    def _store(self) -> list[str]:
        return ["--endpoint", self.moto.url, "--insecure-http", "--credentials-file", self.creds]

    def init(self) -> None:
        url = f"s3://{self.bucket}/{self.prefix}"
        subprocess.run(
            [*FC, "init", "--scryptn", "10", "--passfile", self.passfile, *self._store(), url],
            check=True,
            capture_output=True,
            cwd=HERE,
        )

    @contextlib.contextmanager
    def mount(self) -> Iterator[tuple[str, str]]:
        mnt = os.path.join(self.work, "ours-mnt")
        os.makedirs(mnt, exist_ok=True)
        url = f"s3://{self.bucket}/{self.prefix}"
        subprocess.run(
            [*FC, "mount", "--passfile", self.passfile, *self._store(), url, mnt],
            check=True,
            capture_output=True,
            cwd=HERE,
        )
        try:
            yield mnt, mnt
        finally:
            subprocess.run([*FC, "unmount", mnt], capture_output=True, cwd=HERE)
            _umount(mnt)


class S3fsGocryptfs(Stack):
    name = "s3fs+gocryptfs (2 hops)"
    prefix = "cdh"

    def _s3fs(self, mnt: str) -> None:
        os.makedirs(mnt, exist_ok=True)
        subprocess.run(
            [
                "s3fs",
                f"{self.bucket}:/{self.prefix}",
                mnt,
                "-o",
                f"url={self.moto.url}",
                "-o",
                "use_path_request_style",
                "-o",
                f"passwd_file={self.creds}",
            ],
            check=True,
            capture_output=True,
        )
        _wait_mount(mnt)

    def init(self) -> None:
        c = os.path.join(self.work, "s3fs-init")
        self._s3fs(c)
        try:
            subprocess.run(
                ["gocryptfs", "-init", "-q", "-scryptn", "10", "-passfile", self.passfile, c],
                check=True,
                capture_output=True,
            )
        finally:
            _umount(c)

    @contextlib.contextmanager
    def mount(self) -> Iterator[tuple[str, str]]:
        c = os.path.join(self.work, "s3fs-c")
        p = os.path.join(self.work, "s3fs-p")
        self._s3fs(c)
        os.makedirs(p, exist_ok=True)
        subprocess.run(
            ["gocryptfs", "-q", "-passfile", self.passfile, c, p], check=True, capture_output=True
        )
        try:
            yield p, "s3fs-"
        finally:
            _umount(p)
            _umount(c)


class Rclone(Stack):
    name = "rclone crypt"
    prefix = "rc"

    def _env(self) -> dict[str, str]:
        obscured = subprocess.run(
            ["rclone", "obscure", PASSWORD], capture_output=True, text=True, check=True
        ).stdout.strip()
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        env.update(
            RCLONE_CONFIG_S3_TYPE="s3",
            RCLONE_CONFIG_S3_PROVIDER="Other",
            RCLONE_CONFIG_S3_ENDPOINT=self.moto.url,
            RCLONE_CONFIG_S3_ACCESS_KEY_ID=AK,
            RCLONE_CONFIG_S3_SECRET_ACCESS_KEY=SK,
            RCLONE_CONFIG_S3_FORCE_PATH_STYLE="true",
            RCLONE_CONFIG_SEC_TYPE="crypt",
            RCLONE_CONFIG_SEC_REMOTE=f"s3:{self.bucket}/{self.prefix}",
            RCLONE_CONFIG_SEC_PASSWORD=obscured,
        )
        return env

    @contextlib.contextmanager
    def mount(self) -> Iterator[tuple[str, str]]:
        mnt = os.path.join(self.work, "rclone-mnt")
        os.makedirs(mnt, exist_ok=True)
        proc = subprocess.Popen(
            [
                "rclone",
                "mount",
                "sec:",
                mnt,
                "--vfs-cache-mode",
                "writes",
                "--vfs-write-back",
                "0s",
                "--cache-dir",
                os.path.join(self.work, "rc-cache"),
            ],
            env=self._env(),
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.work, "..", "rclone-bench.log"), "ab"),  # noqa: SIM115
        )
        try:
            _wait_mount(mnt)
            yield mnt, "rclone-mnt"
        finally:
            _umount(mnt)
            proc.terminate()
            proc.wait(10)


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _wait_stored(stack: Stack, plain: int, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while stack.moto.stored(stack.bucket, stack.prefix + "/") < plain:
        if time.monotonic() > end:
            raise RuntimeError(f"{stack.name}: upload did not finish")
        time.sleep(0.5)


def run_stack(stack: Stack, size: int, files: int) -> dict[str, float]:
    out: dict[str, float] = {}
    data = os.urandom(MiB)
    stack.init()
    with stack.mount() as (mnt, _):
        big = os.path.join(mnt, "big")

        def write_big() -> None:
            with open(big, "wb") as f:
                for _ in range(size // MiB):
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())

        out["seq_write_MiBps"] = size / MiB / _timed(write_big)
        small = os.path.join(mnt, "small")
        os.mkdir(small)
        blob = os.urandom(4096)

        def write_small() -> None:
            for i in range(files):
                with open(os.path.join(small, f"f{i}"), "wb") as f:
                    f.write(blob)

        out["small_write_files_per_s"] = files / _timed(write_small)
        _wait_stored(stack, size + files * 4096)  # rclone uploads after close, async
    stack.moto.stats(reset=True)
    with stack.mount() as (mnt, needle):
        big = os.path.join(mnt, "big")

        def read_big() -> None:
            with open(big, "rb") as f:
                while f.read(MiB):
                    pass

        out["seq_read_MiBps"] = size / MiB / _timed(read_big)

        def read_small() -> None:
            for i in range(files):
                with open(os.path.join(mnt, "small", f"f{i}"), "rb") as f:
                    f.read()

        out["small_read_files_per_s"] = files / _timed(read_small)
        out["rss_MiB"] = _rss_kib(needle) / 1024
    with stack.mount() as (mnt, _):
        fd = os.open(os.path.join(mnt, "big"), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            os.pread(fd, 4096, 0)  # open + header/first block: not part of the random read
            time.sleep(0.5)  # let any read-ahead settle
            rnd = random.Random(7)
            gets, nbytes = [], []
            for _ in range(5):
                # past the first read's chunk and read-ahead; unaligned: 2 blocks
                off = rnd.randrange(size // 2, size - 8192) // 4096 * 4096 + 1000
                stack.moto.stats(reset=True)
                os.pread(fd, 4096, off)
                s = stack.moto.stats().get("GET", [0, 0])
                gets.append(s[0])
                nbytes.append(s[1])
        finally:
            os.close(fd)
        out["rand4k_GETs"] = sum(gets) / len(gets)
        out["rand4k_bytes"] = sum(nbytes) / len(nbytes)
    stored = stack.moto.stored(stack.bucket, stack.prefix + "/")
    out["stored_overhead_pct"] = 100.0 * (stored - size - files * 4096) / (size + files * 4096)
    return out


PEER = "moto alone (boto3, no FUSE, no crypto)"


def run_peer(moto: Moto, bucket: str, size: int) -> dict[str, float]:
    """The most any client could get from this moto server on this machine: the same
    bytes uploaded straight from memory by boto3 (multipart, 8 MiB parts, 4 at a time,
    as our daemon sends them) and read back by one streaming GET, with no FUSE, no
    encryption, no spool.  Why: on a 2-vCPU VM the server's own CPU (it copies every
    part again in CompleteMultipartUpload) bounds every stack; a target above this
    ceiling cannot be met on this peer, whatever the client does."""
    import concurrent.futures

    from botocore.config import Config

    client = moto.client(
        Config(
            max_pool_connections=8,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
    )
    data = os.urandom(size)
    part = 8 * MiB
    key = "peer/big"

    def write() -> None:
        up = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]

        def send(i: int) -> dict[str, object]:
            body = data[i * part : (i + 1) * part]
            r = client.upload_part(Bucket=bucket, Key=key, UploadId=up, PartNumber=i + 1, Body=body)
            return {"PartNumber": i + 1, "ETag": r["ETag"]}

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            parts = list(pool.map(send, range((size + part - 1) // part)))
        client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=up, MultipartUpload={"Parts": parts}
        )

    def read() -> None:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        got = 0
        while piece := body.read(MiB):
            got += len(piece)
        if got != size:
            raise RuntimeError("peer read: short")

    return {
        "seq_write_MiBps": size / MiB / _timed(write),
        "seq_read_MiBps": size / MiB / _timed(read),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--stacks", default="ours,s3fs,rclone,peer")
    args = ap.parse_args()
    size = args.size_mib * MiB
    classes = {"ours": Ours, "s3fs": S3fsGocryptfs, "rclone": Rclone}
    moto = Moto()
    results: dict[str, dict[str, float]] = {}
    peer: dict[str, float] = {}
    try:
        bucket = "bench-bucket"
        moto.client().create_bucket(Bucket=bucket)
        for key in args.stacks.split(","):
            if key == "peer":
                print(f"== {PEER}", flush=True)
                peer = run_peer(moto, bucket, size)
                print(json.dumps(peer, indent=1), flush=True)
                continue
            if key == "s3fs" and not (shutil.which("s3fs") and shutil.which("gocryptfs")):
                continue
            if key == "rclone" and not shutil.which("rclone"):
                continue
            with tempfile.TemporaryDirectory(prefix="objbench") as work:
                stack = classes[key](moto, bucket, work)
                print(f"== {stack.name}", flush=True)
                results[stack.name] = run_stack(stack, size, args.files)
                print(json.dumps(results[stack.name], indent=1), flush=True)
    finally:
        moto.stop()
    if not results:
        return 0
    names = list(results)
    metrics = list(next(iter(results.values())))
    print(f"\n{'metric':<26}" + "".join(f"{n:>26}" for n in names))
    for m in metrics:
        print(f"{m:<26}" + "".join(f"{results[n][m]:>26.2f}" for n in names))
    ours = results.get(Ours.name)
    if ours:
        for other in names[1:]:
            o = results[other]
            print(
                f"ours / {other}: seq read {ours['seq_read_MiBps'] / o['seq_read_MiBps']:.2f}x, "
                f"seq write {ours['seq_write_MiBps'] / o['seq_write_MiBps']:.2f}x, "
                f"small write {ours['small_write_files_per_s'] / o['small_write_files_per_s']:.2f}x"
            )
        if peer:
            print(
                f"ours / {PEER}: seq read "
                f"{ours['seq_read_MiBps'] / peer['seq_read_MiBps']:.2f}x, seq write "
                f"{ours['seq_write_MiBps'] / peer['seq_write_MiBps']:.2f}x"
            )
    if peer:
        print(
            f"{PEER}: seq write {peer['seq_write_MiBps']:.1f} MiB/s, "
            f"seq read {peer['seq_read_MiBps']:.1f} MiB/s (the ceiling on this server)"
        )
        s3 = results.get(S3fsGocryptfs.name)
        if s3:
            need = 1.5 * s3["seq_write_MiBps"]
            print(
                f"1.5x s3fs+gocryptfs write = {need:.1f} MiB/s = "
                f"{need / peer['seq_write_MiBps']:.2f}x the ceiling"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
