"""Real block-engine plumbing for tests: the block-serve daemon, loop devices, mkfs, mounts.

``BlockRig`` remembers everything it made (daemons, loop devices, mounts) and undoes it all
in ``close()`` in reverse order, lazily where something hangs, so a failing test never
leaves a loop device or a mount behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

READY = b"Filesystem mounted and ready."


def block_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop devices, mounts)"
    for tool in ("losetup", "mkfs.ext4", "fusermount3", "fsck.ext4"):
        if shutil.which(tool) is None:
            return f"{tool} missing"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control"
    return None


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    res = subprocess.run(argv, capture_output=True, timeout=120, **kw)  # type: ignore[call-overload]
    assert res.returncode == 0, f"{argv}: {res.stderr.decode(errors='replace')}"
    return res  # type: ignore[no-any-return]


class BlockRig:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.daemons: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.loops: list[str] = []
        self.mounts: list[Path] = []

    # -- daemon --------------------------------------------------------------------------

    def serve(
        self,
        device: Path,
        mnt: Path,
        key: bytes,
        *,
        offset: int,
        size: str = "dynamic",
        extra: tuple[str, ...] = ("--allow-regular-file",),
        expect_ready: bool = True,
        passphrase: bytes | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """``env``: added to the daemon's environment (e.g. FUSE_CRYPT_BLOCK_LOOP)."""
        mnt.mkdir(parents=True, exist_ok=True)
        log = mnt.with_name(mnt.name + ".log")
        argv = [sys.executable, "-m", "fuse_crypt.cli", "block-serve"]
        if passphrase is None:
            argv += ["--masterkey", "stdin", "--offset", str(offset), "--size", size]
        else:
            argv += ["--passphrase", "stdin"]
        argv += [*extra, str(device), str(mnt)]
        with log.open("ab") as lf:
            start = lf.tell()
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=lf, stderr=lf, start_new_session=True,
                env=None if env is None else {**os.environ, **env},
            )  # fmt: skip
        assert proc.stdin is not None
        proc.stdin.write(key.hex().encode() + b"\n" if passphrase is None else passphrase)
        proc.stdin.close()
        self.daemons.append((proc, mnt))
        if not expect_ready:
            proc.wait(30)
            return proc
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if READY in log.read_bytes()[start:] and os.path.ismount(mnt):
                return proc
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"block-serve not ready: {log.read_text(errors='replace')}")

    def log(self, mnt: Path) -> str:
        return mnt.with_name(mnt.name + ".log").read_text(errors="replace")

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

    # -- loop + filesystem ---------------------------------------------------------------

    def attach(self, path: Path, *, read_only: bool = False) -> str:
        argv = ["losetup", "--direct-io=on", "--sector-size", "4096", "--find", "--show"]
        if read_only:
            argv.append("--read-only")
        loop = run([*argv, str(path)]).stdout.decode().strip()
        self.loops.append(loop)
        return loop

    def detach(self, loop: str) -> None:
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=30)
        if loop in self.loops:
            self.loops.remove(loop)

    def mount(self, dev: str, where: Path, *opts: str) -> None:
        where.mkdir(parents=True, exist_ok=True)
        argv = ["mount", *(["-o", ",".join(opts)] if opts else []), dev, str(where)]
        run(argv)
        self.mounts.append(where)

    def umount(self, where: Path, *, lazy: bool = False) -> None:
        subprocess.run(["umount", *(["-l"] if lazy else []), str(where)], capture_output=True)
        if where in self.mounts:
            self.mounts.remove(where)

    def stop(self, proc: subprocess.Popen[bytes], mnt: Path) -> int:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
        try:
            rc = proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            rc = -9
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        self.daemons = [(p, m) for p, m in self.daemons if p is not proc]
        return rc

    def close(self) -> None:
        for where in reversed(list(self.mounts)):
            self.umount(where, lazy=True)
        for loop in reversed(list(self.loops)):
            self.detach(loop)
        for proc, mnt in reversed(list(self.daemons)):
            if proc.poll() is None:
                self.stop(proc, mnt)
            elif os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
