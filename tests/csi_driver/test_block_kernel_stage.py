"""The kernel engine through the node core: dataIntegrity, NodeExpandVolume, raw block.

Device-mapper is absent on the build machines, so cryptsetup's dm steps are recorded by a
runner instead of run (luksFormat --integrity, open, resize, close), and so are mkfs, mount,
resize2fs and xfs_growfs. Everything around them is real: the image, the LUKS2 header the
node reads, validates, binds and copies, the keys, the stage records. The recorded
``luksFormat --integrity`` writes what cryptsetup would (luks2_helpers.integrity_image: the
header shape checked against cryptsetup 2.6 in test_luks2_integrity.py). For raw block
access, ``/dev/mapper/<name>`` is a link to a real loop device, so publish bind-mounts a
real device node.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from csi_driver import errors
from csi_driver.core.node import PublishRequest
from csi_driver.core.volcap import AccessType, Capability
from csi_driver.keys import derive_volume_password
from csi_driver.mounts import MountEntry
from csi_driver.volumes import block_kernel as bk
from fuse_crypt.luks2 import keyslot
from tests.fuse_crypt import luks2_helpers as lh

# `rig`: the block volume fixture of test_block_volumes (real images, loops, daemons).
from .test_block_volumes import RW, Rig, _sha, rig  # noqa: F401

MiB = 1 << 20
BLK = Capability(AccessType.BLOCK, 1)
BLK_RO = Capability(AccessType.BLOCK, 2)
NAME = bk.mapper_name("blk-1")


@dataclass
class Kernel:
    """The recorded cryptsetup, mkfs and mount of one rig."""

    rig: Rig
    mapper: pathlib.Path
    calls: list[tuple[list[str], bytes | None]] = field(default_factory=list)
    tools: list[list[str]] = field(default_factory=list)
    fail: dict[str, tuple[int, str]] = field(default_factory=dict)
    tool_fail: dict[str, str] = field(default_factory=dict)
    size: int = 40 * MiB
    loop: str | None = None  # what /dev/mapper/<name> links to on open (raw block tests)

    def runner(self, argv: list[str], stdin: bytes | None) -> bk.Result:
        self.calls.append((argv, stdin))
        action = argv[2]
        if action in self.fail:
            return bk.Result(*self.fail[action])
        if action == "luksFormat" and "--integrity" in argv:
            # What cryptsetup writes: an unbound integrity header, passphrase from stdin.
            assert stdin is not None
            dev = pathlib.Path(argv[-1])
            lh.integrity_image(dev, stdin, size=dev.stat().st_size)
        elif action == "luksFormat":
            raise AssertionError("the kernel engine formats only dataIntegrity volumes")
        if action == "open" and "--test-passphrase" not in argv and self.loop is not None:
            (self.mapper / argv[-1]).symlink_to(self.loop)
        if action == "close":
            (self.mapper / argv[-1]).unlink(missing_ok=True)
        return bk.Result(0, "")

    def tool(self, argv: list[str], what: str) -> str:
        self.tools.append(argv)
        if argv[0] in self.tool_fail:
            raise errors.Internal(f"{what} failed: {self.tool_fail[argv[0]]}")
        return f"{self.size}\n" if argv[0] == "blockdev" else ""

    def actions(self) -> list[str]:
        return [a[2] for a, _ in self.calls]


@pytest.fixture
def kern(rig: Rig, tmp_path: pathlib.Path) -> Iterator[Kernel]:  # noqa: F811 - the fixture
    k = Kernel(rig, tmp_path / "mapper")
    k.mapper.mkdir()
    block = rig.core.block
    block.kernel, block.tool = bk.KernelEngine(k.runner), k.tool
    block.header_dir = str(tmp_path / "run-headers")
    block.mapper_dir = str(k.mapper)
    yield k
    if k.loop is not None:
        subprocess.run(["losetup", "-d", k.loop], capture_output=True)


def _password(r: Rig) -> bytes:
    return derive_volume_password(r.keys.root_key, "blk-1")


def _copy(r: Rig) -> pathlib.Path:
    return pathlib.Path(r.core.block.header_copy_path("blk-1"))


def test_stage_flow_plain(kern: Kernel) -> None:
    """Stage writes the validated header copy (0600, 16 MiB) to the memory-backed dir,
    opens with the volume key on stdin and --disable-keyring, makes the filesystem on
    /dev/mapper/<name> and mounts it; unstage closes and removes the copy. A
    device-mapper failure undoes everything."""
    r = kern.rig
    img = r.image()
    staging = r.stage(img)
    copy = _copy(r)
    assert copy.stat().st_size == 16 * MiB and copy.stat().st_mode & 0o777 == 0o600
    assert copy.read_bytes()[: 32 << 10] == img.read_bytes()[: 32 << 10]
    assert kern.actions() == ["open"]  # the userspace library formatted it; no luksFormat
    ((open_argv, stdin),) = kern.calls
    assert open_argv == bk.open_argv(str(img), NAME, str(copy))
    assert "--disable-keyring" in open_argv and stdin == lh.cs_volume_key(img, _password(r))
    dev = str(kern.mapper / NAME)
    assert kern.tools == [
        ["mkfs.ext4", "-q", "-F", "--", dev],
        ["mount", "-o", "nosuid,nodev", dev, staging],
    ]
    pub = r.core.block.store.get(staging)
    assert pub is not None and pub.mounter == "dm-crypt" and pub.phase == "mounted"
    r.core.unstage("blk-1", staging)
    assert kern.calls[-1][0] == ["cryptsetup", "--batch-mode", "close", NAME]
    assert not copy.exists() and r.core.block.store.all() == []

    kern.fail["open"] = (1, "Cannot initialize device-mapper. Is dm_mod loaded?")
    with pytest.raises(errors.FailedPrecondition, match="device-mapper"):
        r.stage(img, source="encrypted")
    assert not copy.exists() and r.core.block.store.all() == []
    assert kern.actions()[-1] == "close"


def test_data_integrity_stage_flow(kern: Kernel) -> None:
    """dataIntegrity "true": cryptsetup luksFormat --integrity hmac-sha256 --integrity-no-wipe
    (passphrase on stdin, our KDF costs), our binding token added to the header it wrote,
    the header copy carries the integrity segment, open gets the 96-byte key, ext4 is made
    without lazy init (unwritten integrity sectors fail to read). Restaging (empty or
    encrypted, with dataIntegrity) opens the same volume; it cannot be grown."""
    r = kern.rig
    img = r.image()
    staging = r.stage(img, dataIntegrity="true")
    password = _password(r)
    assert kern.actions() == ["luksFormat", "open"]
    fmt, fmt_in = kern.calls[0]
    assert fmt == bk.format_argv(str(img), integrity=True, kdf=bk.KDF_HIGH_ENTROPY)
    assert fmt_in == password
    tokens = lh.cs_json(img)["tokens"]
    assert [t["type"] for t in tokens.values()] == ["coco-csi-binding-v1"]  # bound by us
    copy = _copy(r)
    header = copy.read_bytes()[: 32 << 10]
    assert header == img.read_bytes()[: 32 << 10]
    assert b'"integrity":{"type":"hmac(sha256)"' in header
    open_argv, vk = kern.calls[1]
    assert open_argv == bk.open_argv(str(img), NAME, str(copy))
    assert vk == lh.cs_volume_key(img, password) and vk is not None and len(vk) == 96
    dev = str(kern.mapper / NAME)
    lazy_off = ["-E", "lazy_itable_init=0,lazy_journal_init=0"]
    assert kern.tools[0] == ["mkfs.ext4", "-q", "-F", *lazy_off, "--", dev]
    before = _sha(img)
    with pytest.raises(errors.FailedPrecondition, match="dataIntegrity volume cannot be grown"):
        r.core.expand("blk-1", staging, staging)
    assert "resize" not in kern.actions() and len(kern.tools) == 2
    r.core.unstage("blk-1", staging)
    assert _sha(img) == before

    for source in ("empty", "encrypted"):
        kern.calls.clear()
        kern.tools.clear()
        staging = r.stage(img, source=source, dataIntegrity="true")
        assert kern.actions() == ["open"] and kern.calls[0][1] == vk
        assert [t[0] for t in kern.tools] == ["mount"]  # opened, never formatted again
        r.core.unstage("blk-1", staging)
    assert _sha(img) == before


def test_integrity_mismatch_is_refused_device_untouched(kern: Kernel) -> None:
    """A volume made with dataIntegrity and staged without it, or the other way round, is
    refused with a message that says so; nothing is run and the device is unchanged."""
    r = kern.rig
    with_int, plain = r.image("int.img"), r.image("plain.img")
    r.core.unstage("blk-1", r.stage(with_int, dataIntegrity="true"))
    r.core.unstage("blk-1", r.stage(plain))
    kern.calls.clear()
    kern.tools.clear()
    cases = [
        (with_int, "empty", "false", "made with dataIntegrity but is staged without"),
        (with_int, "encrypted", "false", "dm-integrity"),
        (plain, "empty", "true", "made without dataIntegrity but is staged with"),
        (plain, "encrypted", "true", "made without dataIntegrity but is staged with"),
    ]
    for img, source, integrity, match in cases:
        before = _sha(img)
        with pytest.raises(errors.FailedPrecondition, match=match):
            r.stage(img, source=source, dataIntegrity=integrity)
        assert _sha(img) == before, (img.name, source)
        assert kern.calls == [] and kern.tools == [] and r.core.block.store.all() == []
    with pytest.raises(errors.InvalidArgument, match="dataIntegrity"):
        r.stage(plain, source="encrypted", dataIntegrity="yes")


def test_userspace_engine_refuses_data_integrity(rig: Rig, tmp_path: pathlib.Path) -> None:  # noqa: F811
    """Without device-mapper (the rig's default: no kernel engine) dataIntegrity is
    FAILED_PRECONDITION before the device is touched, and an integrity container is never
    served as plain sectors: not by the node, not by ``fuse-crypt block-serve``."""
    assert rig.core.block.kernel is None
    img = rig.image()
    before = _sha(img)
    with pytest.raises(errors.FailedPrecondition, match="needs the kernel engine"):
        rig.stage(img, dataIntegrity="true")
    assert _sha(img) == before and rig.core.block.store.all() == []

    password = _password(rig)
    for bound in (False, True):
        lh.integrity_image(img, password, bound=bound, size=64 * MiB)
        before = _sha(img)
        for source in ("encrypted", "empty"):
            with pytest.raises(errors.FailedPrecondition, match="dm-integrity|dataIntegrity|holds"):
                rig.stage(img, source=source)
            assert _sha(img) == before and rig.core.block.store.all() == []
        mnt = tmp_path / f"mnt-{bound}"
        mnt.mkdir()
        res = subprocess.run(
            [".venv/bin/fuse-crypt", "block-serve", "--passphrase", "stdin",
             "--accept-unbound-header", "--allow-regular-file", str(img), str(mnt)],
            input=password, capture_output=True, timeout=60,
        )  # fmt: skip
        assert res.returncode == 23 and b"dm-integrity" in res.stderr, res.stderr
        assert not os.path.ismount(mnt) and _sha(img) == before


def test_restaging_an_empty_pv_unlocks_once(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """sourceType empty met again (reboot, move): the check that the device holds this
    volume's own container is the stage's unlock; the KDF runs once, not twice."""
    img = rig.image()
    rig.core.unstage("blk-1", rig.stage(img))
    runs: list[int] = []
    real = keyslot.derive_kek

    def counted(passphrase: bytes, kdf: keyslot.Kdf, length: int) -> bytes:
        runs.append(1)
        return real(passphrase, kdf, length)

    monkeypatch.setattr(keyslot, "derive_kek", counted)
    staging = rig.stage(img)
    assert len(runs) == 1
    rig.core.unstage("blk-1", staging)


def _statvfs_entry(fstype: str) -> MountEntry:
    return MountEntry("/x", fstype, "/dev/mapper/x", "rw")


def test_expand(kern: Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """cryptsetup resize (the guest's header copy, no secret) then resize2fs on the mapping
    or xfs_growfs on the mount point; returns the mapping's size. Errors: device-mapper
    failure stops before the filesystem; resize2fs without CAP_SYS_RESOURCE says so; a
    missing header copy stops before cryptsetup runs."""
    r = kern.rig
    img = r.image()
    staging = r.stage(img)
    kern.calls.clear()
    kern.tools.clear()
    copy = _copy(r)
    dev = str(kern.mapper / NAME)
    assert r.core.expand("blk-1", staging, staging) == 40 * MiB
    assert kern.calls == [(bk.resize_argv(NAME, str(copy)), None)]
    assert kern.tools == [["resize2fs", dev], ["blockdev", "--getsize64", dev]]

    kern.calls.clear()
    kern.tools.clear()
    block = r.core.block
    monkeypatch.setattr(block.mounts, "find", lambda path: _statvfs_entry("xfs"))
    assert r.core.expand("blk-1", staging, staging) == 40 * MiB
    assert kern.tools[0] == ["xfs_growfs", staging]
    monkeypatch.undo()

    kern.tools.clear()
    kern.fail["resize"] = (1, "Cannot initialize device-mapper.")
    with pytest.raises(errors.FailedPrecondition, match="device-mapper"):
        r.core.expand("blk-1", staging, staging)
    assert kern.tools == []
    del kern.fail["resize"]
    kern.tool_fail["resize2fs"] = "Permission denied to resize filesystem"
    with pytest.raises(errors.FailedPrecondition, match="CAP_SYS_RESOURCE"):
        r.core.expand("blk-1", staging, staging)
    kern.tool_fail.clear()

    kern.calls.clear()
    copy.unlink()
    with pytest.raises(errors.FailedPrecondition, match="header copy is gone"):
        r.core.expand("blk-1", staging, staging)
    assert kern.calls == []
    r.core.unstage("blk-1", staging)


def test_raw_block(kern: Kernel) -> None:
    """AccessType BLOCK in the kernel engine: open, no mkfs, no mount; publish bind-mounts
    /dev/mapper/<name> (here a link to a real loop device) onto a file at the target;
    stats and expand report the mapping's size; read-only needs a read-only stage."""
    r = kern.rig
    scratch = r.image("scratch.img", 8 * MiB)
    kern.loop = subprocess.run(
        ["losetup", "--find", "--show", str(scratch)], capture_output=True, text=True, check=True
    ).stdout.strip()
    img = r.image()
    staging = r.stage(img, cap=BLK)
    assert kern.actions() == ["open"] and kern.tools == [] and not os.path.ismount(staging)
    pub = r.core.block.store.get(staging)
    assert pub is not None and pub.mounter == "dm-crypt-raw"
    r.stage(img, cap=BLK)  # idempotent: the mapping is there
    assert kern.actions() == ["open"]
    with pytest.raises(errors.AlreadyExists, match="access type"):
        r.stage(img, cap=RW)
    target = r.target("a")
    req = PublishRequest("blk-1", target, BLK, False, {}, {"devicePath": "x"}, staging)
    r.core.publish(req)
    assert pathlib.Path(target).is_block_device() and os.path.ismount(target)
    marker = b"kernel-raw-marker".ljust(4096, b"\0")
    fd = os.open(target, os.O_RDWR)
    try:
        os.pwrite(fd, marker, 1 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(kern.loop, "rb") as f:  # the published node is the mapping's device
        f.seek(1 * MiB)
        assert f.read(4096) == marker
    with pytest.raises(errors.FailedPrecondition, match="read-only stage"):
        r.core.publish(PublishRequest("blk-1", r.target("b"), BLK_RO, True, {}, {}, staging))
    with pytest.raises(errors.FailedPrecondition, match="block access, not mount"):
        r.core.publish(PublishRequest("blk-1", r.target("c"), RW, False, {}, {}, staging))
    assert r.core.stats("blk-1", target).bytes_total == 40 * MiB
    kern.tools.clear()
    assert r.core.expand("blk-1", staging, staging) == 40 * MiB
    assert kern.actions()[-1] == "resize" and [t[0] for t in kern.tools] == ["blockdev"]
    with pytest.raises(errors.FailedPrecondition, match="still published"):
        r.core.unstage("blk-1", staging)
    r.core.unpublish("blk-1", target)
    assert not os.path.lexists(target)
    r.core.unstage("blk-1", staging)
    assert kern.actions()[-1] == "close" and not (kern.mapper / NAME).exists()
    assert not _copy(r).exists() and r.core.block.store.all() == []

    staging = r.stage(img, source="encrypted", cap=BLK_RO)
    assert "--readonly" in kern.calls[-1][0]
    r.core.publish(PublishRequest("blk-1", target, BLK_RO, True, {}, {}, staging))
    assert pathlib.Path(target).is_block_device()
    r.core.unpublish("blk-1", target)
    r.core.unstage("blk-1", staging)
