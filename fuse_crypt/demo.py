"""``fuse-crypt demo``: one short, honest end-to-end run on a throw-away volume.

Why it goes through the real command (``python -m fuse_crypt.cli``) rather than calling
``serve()``: the demo should prove what an operator would run works, including the
daemon fork, the readiness pipe and ``unmount``. It then inspects the backing directory
to show that storage holds only ciphertext, and fails loudly if any plaintext leaks.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

from fuse_crypt.daemon import find_mount, unmount, wait_until

LONG_NAME = "a-file-name-longer-than-175-bytes-" + "x" * 170 + ".txt"  # hashed on disk
MARKER = "PLAINTEXT-MARKER-4b1d"


class DemoFailure(Exception):
    """A demo step did not do what it claims."""


def _cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "fuse_crypt.cli", "-q", *args],
        input=stdin,
        capture_output=True,
        check=False,
        timeout=120,
    )


def _checked(step: str, proc: subprocess.CompletedProcess[bytes]) -> None:
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise DemoFailure(f"{step}: exit {proc.returncode}: {err[-1] if err else 'no message'}")


def _plain_files() -> dict[str, bytes]:
    return {
        "hello.txt": f"Hello from inside the TEE! {MARKER}-hello\n".encode(),
        "projects/year-2026/fourth-quarter/quarterly-plan.md": f"# Plan\n{MARKER}-nested\n".encode()
        * 3,
        f"projects/{LONG_NAME}": f"long name content {MARKER}-long\n".encode(),
        "blocks.bin": (f"{MARKER}-blocks ".encode() * 800)[:10000],  # 3 blocks, last short
        "empty-file": b"",
    }


def _walk_backing(root: str) -> Iterator[tuple[str, os.stat_result]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames) + [
            d for d in dirnames if os.path.islink(os.path.join(dirpath, d))
        ]:
            full = os.path.join(dirpath, name)
            yield os.path.relpath(full, root), os.lstat(full)


def _short(name: str, width: int = 46) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def _hexdump(data: bytes, n: int = 32) -> str:
    return " ".join(f"{b:02x}" for b in data[:n])


def _step(no: int, total: int, title: str, text: str) -> None:
    print(f"[{no}/{total}] {title:<8} {text}", flush=True)


def _write_tree(mnt: str, files: dict[str, bytes], link_target: str) -> None:
    for rel, data in files.items():
        path = os.path.join(mnt, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    os.symlink(link_target, os.path.join(mnt, "latest-plan"))


def _verify_tree(mnt: str, files: dict[str, bytes], link_target: str) -> None:
    for rel, data in files.items():
        with open(os.path.join(mnt, rel), "rb") as f:
            got = f.read()
        if got != data:
            raise DemoFailure(f"read back {rel!r}: content differs")
    if os.readlink(os.path.join(mnt, "latest-plan")) != link_target:
        raise DemoFailure("symlink target differs")
    with open(os.path.join(mnt, "latest-plan"), "rb") as f:
        if f.read() != files["projects/year-2026/fourth-quarter/quarterly-plan.md"]:
            raise DemoFailure("reading through the symlink gives different content")
    if LONG_NAME not in os.listdir(os.path.join(mnt, "projects")):
        raise DemoFailure("long name missing from the directory listing")


def _check_no_plaintext(cipher: str, files: dict[str, bytes], link_target: str) -> int:
    needles = [MARKER.encode(), b"Hello from inside", link_target.encode()]
    # Every path component too; all are >= 8 bytes so random base64 cannot match by chance.
    needles += [part.encode() for rel in files for part in rel.split("/")]
    if any(len(n) < 8 for n in needles):
        raise DemoFailure("demo bug: plaintext markers must be at least 8 bytes")
    needles += [b"latest-plan"]
    scanned = 0
    for rel, st in _walk_backing(cipher):
        full = os.path.join(cipher, rel)
        blobs = [rel.encode()]
        if os.path.islink(full):
            blobs.append(os.readlink(full).encode())
        elif os.path.isfile(full):
            with open(full, "rb") as f:
                blobs.append(f.read())
        scanned += 1
        for blob in blobs:
            for needle in needles:
                if needle and needle in blob:
                    raise DemoFailure(f"plaintext {needle[:20]!r} found in backing file {rel}")
        del st
    return scanned


def _describe(name: str, full: str, st: os.stat_result) -> str:
    if os.path.islink(full):
        return "symlink, encrypted target"
    if os.path.isdir(full):
        return "directory"
    if name == "gocryptfs.conf":
        return f"{st.st_size} B  config: flags + password-wrapped master key"
    if name == "gocryptfs.diriv":
        return f"{st.st_size} B  this directory's name IV"
    if name.startswith("gocryptfs.longname.") and name.endswith(".name"):
        return f"{st.st_size} B  full encrypted long name"
    if name.startswith("gocryptfs.longname."):
        return f"{st.st_size} B  file with a hashed long name"
    return f"{st.st_size} B"


def _show_tree(cipher: str, rel: str = "", depth: int = 0) -> int:
    shown = 0
    here = os.path.join(cipher, rel)
    for name in sorted(os.listdir(here)):
        full = os.path.join(here, name)
        st = os.lstat(full)
        label = ("  " * depth) + _short(name, 40 - 2 * depth)
        print(f"           {label:<42} {_describe(name, full, st)}")
        shown += 1
        if os.path.isdir(full) and not os.path.islink(full):
            shown += _show_tree(cipher, os.path.join(rel, name), depth + 1)
    return shown


def _show_backing(cipher: str) -> None:
    print("         backing directory (all that storage ever sees):")
    _show_tree(cipher)
    with open(os.path.join(cipher, "gocryptfs.conf"), "rb") as f:
        conf_text = f.read()
    if b"EncryptedKey" not in conf_text:
        raise DemoFailure("gocryptfs.conf does not look like a gocryptfs config")
    biggest = max(
        (
            (st.st_size, rel)
            for rel, st in _walk_backing(cipher)
            if not os.path.basename(rel).startswith("gocryptfs.")
            and os.path.isfile(os.path.join(cipher, rel))
        ),
        default=None,
    )
    if biggest:
        with open(os.path.join(cipher, biggest[1]), "rb") as f:
            head = f.read(24)
        print(f"         first bytes of {_short(os.path.basename(biggest[1]), 30)}:")
        print(f"           {_hexdump(head, 24)}")
        print("           00 02 = format version, then a random 16-byte file ID, then")
        print("           per 4 KiB block: 16-byte nonce | AES-256-GCM ciphertext | 16-byte tag")


def _gocryptfs_crosscheck(cipher: str, passfile: str, work: str, data: bytes) -> str:
    if shutil.which("gocryptfs") is None:
        return "gocryptfs not installed; skipped"
    mnt = os.path.join(work, "gocryptfs-view")
    os.mkdir(mnt)
    proc = subprocess.run(
        ["gocryptfs", "-q", "-ro", "-passfile", passfile, "--", cipher, mnt],
        capture_output=True,
        check=False,
        timeout=60,
    )
    if proc.returncode != 0:
        raise DemoFailure(f"gocryptfs could not mount the volume (exit {proc.returncode})")
    try:
        with open(os.path.join(mnt, "hello.txt"), "rb") as f:
            if f.read() != data:
                raise DemoFailure("gocryptfs reads different content")
        version = subprocess.run(
            ["gocryptfs", "-version"], capture_output=True, check=False
        ).stdout.decode()
    finally:
        unmount(mnt)
    return f"{version.split(';')[0].strip()} mounts the same volume and reads hello.txt"


def run_demo(*, keep: bool = False) -> int:
    """Returns the process exit code; prints a short human report."""
    total = 7
    work = tempfile.mkdtemp(prefix="fuse-crypt-demo-")
    cipher, mnt = os.path.join(work, "cipher"), os.path.join(work, "plain")
    passfile = os.path.join(work, "passfile")
    os.mkdir(cipher)
    os.mkdir(mnt)
    fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, secrets.token_urlsafe(24).encode() + b"\n")
    os.close(fd)
    files = _plain_files()
    link_target = "projects/year-2026/fourth-quarter/quarterly-plan.md"
    print("fuse-crypt demo: a gocryptfs-compatible encrypted volume, end to end")
    print(f"  work dir {work}")
    try:
        _checked("init", _cli("init", "--scryptn", "10", "--passfile", passfile, cipher))
        _step(1, total, "init", "volume created (AES-256-GCM, EME names; scrypt logN 10)")

        _checked("mount", _cli("mount", "--passfile", passfile, cipher, mnt))
        if find_mount(mnt) is None:
            raise DemoFailure("mount returned 0 but nothing is mounted")
        _step(2, total, "mount", f"daemon forked, mount live at {mnt}")

        _write_tree(mnt, files, link_target)
        _step(
            3,
            total,
            "write",
            f"{len(files)} files (nested dirs, a {len(LONG_NAME)}-byte name, "
            "0-byte and 3-block files) + 1 symlink",
        )

        _verify_tree(mnt, files, link_target)
        _step(4, total, "read", "everything reads back byte-for-byte")

        _step(5, total, "inspect", "")
        _show_backing(cipher)
        scanned = _check_no_plaintext(cipher, files, link_target)
        print(f"         no plaintext name, content or link target in {scanned} backing entries")

        _checked("unmount", _cli("unmount", mnt))
        if not wait_until(lambda: find_mount(mnt) is None, 10):
            raise DemoFailure("still mounted after unmount")
        _step(6, total, "unmount", "clean")

        _step(
            7, total, "interop", _gocryptfs_crosscheck(cipher, passfile, work, files["hello.txt"])
        )
        print("demo OK")
        return 0
    except (DemoFailure, OSError, subprocess.SubprocessError) as e:
        print(f"demo FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        for m in (mnt, os.path.join(work, "gocryptfs-view")):
            if find_mount(m) is not None:
                with contextlib.suppress(Exception):
                    unmount(m)
        if keep:
            print(f"  kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
