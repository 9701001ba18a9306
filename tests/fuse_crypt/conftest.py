"""Fixtures for real FUSE mounts of fuse_crypt volumes.

A mount runs ``serve()`` in a child Python process (not a thread of pytest): a bug
that wedges the daemon then cannot wedge the test runner, libfuse's signal handlers
stay out of pytest, and the child's stderr (structured log lines) can be asserted
on.  The master key reaches the child over stdin, as the CSI node plugin does it.

Usable from any test module under tests/fuse_crypt. One vocabulary: each fixture name
means one thing in every module (a module needing something else uses another name).

Volumes made in-process, mounted by a child running ``serve()``:

* ``make_volume(path, **create_kwargs) -> Volume``: a fresh cipher directory with a
  ``gocryptfs.conf`` (scrypt logN 10) and a root dir IV.
* ``volume`` fixture: one fresh volume in ``tmp_path``.
* ``mount_factory`` fixture: ``mount_factory(volume, read_only=False, use_conf=True,
  allow_other=False, mountpoint=None)`` returns a live :class:`Mount`; every mount
  is unmounted at teardown.
* ``mnt`` fixture: ``volume`` mounted read-write.
* ``CipherView(volume)``: cipher paths and decryption via the crypto layers only,
  for assertions on the ciphertext side.

For tests that drive the real ``fuse-crypt`` command (helpers in ``cli_helpers``):

* ``passfile`` fixture: a file holding ``PASSWORD``, the password of every test volume;
* ``cipherdir`` fixture: the path of a fresh volume made by ``fuse-crypt init``;
* ``mountpoint`` fixture: an empty directory; any daemon still serving it is stopped and
  it is unmounted at teardown.

For the block daemon (``fuse-crypt block-serve``):

* ``rig`` fixture: a :class:`~tests.fuse_crypt.block_rig.BlockRig` (daemons, loop devices,
  mounts, all undone at teardown); skips with the reason where root or a tool is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fuse_crypt.contentenc import ContentEnc
from fuse_crypt.cryptocore import CryptoCore
from tests.fuse_crypt.block_rig import BlockRig, block_skip_reason
from tests.fuse_crypt.cli_helpers import PASSWORD as CLI_PASSWORD
from tests.fuse_crypt.cli_helpers import init_volume, stop_and_unmount, write_passfile
from tests.fuse_env import fuse_skip_reason
from tests.peers.fault_proxy import FaultProxy
from tests.peers.oss_server import OssServer

PASSWORD = CLI_PASSWORD.encode()
MOUNT_TIMEOUT = 20.0

_SERVE_SCRIPT = r"""
import json, logging, os, sys
args = json.loads(sys.argv[1])
key = bytes.fromhex(sys.stdin.readline().strip())
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(levelname)s %(name)s %(message)s")
from fuse_crypt.backend import LocalDirBackend
from fuse_crypt.configfile import ConfFile
from fuse_crypt.fusefrontend import serve
conf_path = os.path.join(args["cipherdir"], "gocryptfs.conf")
conf = ConfFile.read(conf_path) if args["use_conf"] else None
def ready():
    print("READY", flush=True)
serve(LocalDirBackend(args["cipherdir"]), key, conf, args["mountpoint"],
      read_only=args["read_only"], allow_other=args["allow_other"], on_ready=ready)
"""


def fuse_available() -> str | None:
    """Reason FUSE mounts cannot run here, or None (``tests.fuse_env``'s one check)."""
    return fuse_skip_reason(None)


@dataclasses.dataclass
class Volume:
    cipherdir: Path
    master_key: bytes
    password: bytes = PASSWORD


@dataclasses.dataclass
class Mount:
    volume: Volume
    path: Path
    proc: subprocess.Popen[bytes]
    stderr_path: Path

    def log(self) -> str:
        """The daemon's log output so far."""
        return self.stderr_path.read_text(errors="replace")

    def unmount(self) -> int | None:
        """Unmount and wait for the daemon; returns its exit code."""
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


class CipherView:
    """Independent view of a volume through the pure crypto layers (not the FUSE
    frontend): where a plaintext path lives on disk and what a cipher file holds."""

    def __init__(self, vol: Volume) -> None:
        from fuse_crypt.configfile import ConfFile
        from fuse_crypt.contentenc import ContentEnc
        from fuse_crypt.nametransform import CONF_NAME

        conf = ConfFile.read(str(vol.cipherdir / CONF_NAME))
        core = conf.new_core(vol.master_key)
        self.nt = conf.name_transform(core)
        self.enc = ContentEnc(core)
        self.root = vol.cipherdir

    def cpath(self, rel: str) -> Path:
        """Cipher path of plaintext path ``rel`` (relative to the mount root)."""
        from fuse_crypt.nametransform import DIRIV_NAME

        cur = self.root
        for part in rel.split("/"):
            ivf = cur / DIRIV_NAME
            iv = ivf.read_bytes() if not self.nt.deterministic else bytes(16)
            disk, _ = self.nt.disk_name(part, iv)
            cur = cur / disk
        return cur

    def decrypt_file(self, cpath: Path) -> bytes:
        from fuse_crypt.contentenc import HEADER_LEN

        data = cpath.read_bytes()
        if len(data) <= HEADER_LEN:
            return b""
        fid = self.enc.parse_header(data[:HEADER_LEN])
        return self.enc.decrypt_blocks(0, data[HEADER_LEN:], fid)


def make_volume(path: Path, **create_kwargs: object) -> Volume:
    """Create a cipher directory like ``gocryptfs -init`` (logN 10 for speed)."""
    from fuse_crypt.configfile import ConfFile
    from fuse_crypt.nametransform import CONF_NAME, DIRIV_NAME, NameTransform

    path.mkdir(parents=True, exist_ok=True)
    create_kwargs.setdefault("scrypt_logn", 10)
    conf, key = ConfFile.create(PASSWORD, **create_kwargs)  # type: ignore[arg-type]
    conf.write(str(path / CONF_NAME))
    if conf.has("DirIV"):
        diriv = path / DIRIV_NAME
        diriv.write_bytes(NameTransform.new_dir_iv())
        diriv.chmod(0o444)
    return Volume(path, key)


#: The type of the ``mount_factory`` fixture.
MountFactory = Callable[..., Mount]


def start_mount(
    volume: Volume,
    mountpoint: Path,
    *,
    read_only: bool = False,
    use_conf: bool = True,
    allow_other: bool = False,
    log_dir: Path | None = None,
) -> Mount:
    """Start a daemon and wait until the mount is live (or fail with its log)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    stderr_path = (log_dir or mountpoint.parent) / f"{mountpoint.name}.log"
    args = {
        "cipherdir": str(volume.cipherdir),
        "mountpoint": str(mountpoint),
        "read_only": read_only,
        "use_conf": use_conf,
        "allow_other": allow_other,
    }
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _SERVE_SCRIPT, json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(volume.master_key.hex().encode() + b"\n")
    proc.stdin.close()
    m = Mount(volume, mountpoint, proc, stderr_path)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    os.set_blocking(proc.stdout.fileno(), False)
    buf = b""
    while time.monotonic() < deadline:
        chunk = proc.stdout.read()
        if chunk:
            buf += chunk
        if b"READY" in buf:
            assert os.path.ismount(mountpoint)
            return m
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    m.unmount()
    raise RuntimeError(f"mount did not become ready; daemon log:\n{m.log()}")


#: The master key of the ContentEnc tests (test_contentenc*.py).
CONTENT_MK = bytes(range(1, 33))


@pytest.fixture(params=[False, True], ids=["gcm", "siv"])
def ce(request: pytest.FixtureRequest) -> ContentEnc:
    """A ContentEnc over CONTENT_MK, once with AES-GCM and once with AES-SIV."""
    return ContentEnc(CryptoCore(CONTENT_MK, aessiv=request.param))


@pytest.fixture
def need_fuse() -> None:
    reason = fuse_skip_reason(None)
    if reason:
        pytest.skip(reason)


@pytest.fixture
def volume(tmp_path: Path) -> Volume:
    return make_volume(tmp_path / "cipher")


@pytest.fixture
def mount_factory(tmp_path: Path, need_fuse: None) -> Iterator[Callable[..., Mount]]:
    mounts: list[Mount] = []
    counter = [0]

    def factory(vol: Volume, mountpoint: Path | None = None, **kwargs: object) -> Mount:
        counter[0] += 1
        mp = mountpoint or tmp_path / f"mnt{counter[0]}"
        m = start_mount(vol, mp, log_dir=tmp_path, **kwargs)  # type: ignore[arg-type]
        mounts.append(m)
        return m

    yield factory
    for m in reversed(mounts):
        with contextlib.suppress(Exception):
            m.unmount()


@pytest.fixture
def mnt(volume: Volume, mount_factory: Callable[..., Mount]) -> Mount:
    return mount_factory(volume)


@pytest.fixture
def passfile(tmp_path: Path) -> Path:
    return write_passfile(tmp_path / "passfile", CLI_PASSWORD)


@pytest.fixture
def cipherdir(tmp_path: Path, passfile: Path) -> Path:
    return init_volume(tmp_path / "cipher", passfile)


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    stop_and_unmount(m)


#: The OSS peer of the over-the-wire backend tests (one per module, behind a fault proxy per
#: test): oss2's real signatures checked, faults injected on the wire.
OSS_AK, OSS_SK, OSS_BUCKET = "LTAI-retry", "retry-secret", "retry-bucket"


@pytest.fixture(scope="module")
def oss_peer() -> Iterator[OssServer]:
    with OssServer() as server:
        server.add_credentials(OSS_AK, OSS_SK)
        server.create_bucket(OSS_BUCKET)
        yield server


@pytest.fixture
def oss_proxy(oss_peer: OssServer) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", oss_peer.port)) as p:
        yield p


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[BlockRig]:
    reason = block_skip_reason()
    if reason:
        pytest.skip(reason)
    r = BlockRig(tmp_path)
    try:
        yield r
    finally:
        r.close()
