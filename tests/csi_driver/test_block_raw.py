"""Raw block access (CSI AccessType BLOCK) to block volumes: NodeStage attaches the
plaintext loop device without a filesystem, NodePublish bind-mounts that device node onto
a file at the target, as kubelet expects for ``volumeDevices``. Real loop devices."""

from __future__ import annotations

import mmap
import os
import pathlib

import pytest

from csi_driver import errors
from csi_driver.core.node import PublishRequest
from csi_driver.core.volcap import AccessType, Capability

# `rig`: the block volume fixture of test_block_volumes (real images, loops, daemons).
from .test_block_volumes import MARKER, RW, Rig, _loops_of, rig  # noqa: F401

BLK = Capability(AccessType.BLOCK, 1)  # SINGLE_NODE_WRITER
BLK_RO = Capability(AccessType.BLOCK, 2)  # SINGLE_NODE_READER_ONLY
MiB = 1 << 20


def _publish(r: Rig, staging: str, target: str, cap: Capability = BLK, ro: bool = False) -> None:
    r.core.publish(PublishRequest("blk-1", target, cap, ro, {}, {"devicePath": "x"}, staging))


def _pattern(n: int) -> bytes:
    return b"".join(MARKER + i.to_bytes(4, "big") + bytes(4096 - len(MARKER) - 4) for i in range(n))


def test_raw_block_round_trip(rig: Rig) -> None:  # noqa: F811 - the fixture
    img = rig.image()
    staging = rig.stage(img, cap=BLK)
    rig.stage(img, cap=BLK)  # idempotent
    assert not os.path.ismount(staging)  # no filesystem was made or mounted
    t1, t2 = rig.target("a"), rig.target("b")
    _publish(rig, staging, t1)
    _publish(rig, staging, t1)  # idempotent
    _publish(rig, staging, t2)
    assert pathlib.Path(t1).is_block_device() and os.path.ismount(t1)
    data = _pattern(64)
    fd = os.open(t1, os.O_RDWR)
    try:
        assert os.lseek(fd, 0, os.SEEK_END) == 48 * MiB  # the 64 MiB disk minus the header
        os.pwrite(fd, data, 5 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(t2, os.O_RDONLY | os.O_DIRECT)  # past the page cache: through the daemon
    try:
        buf = mmap.mmap(-1, len(data))  # O_DIRECT needs an aligned buffer
        assert os.preadv(fd, [buf], 5 * MiB) == len(data)
        got = bytes(buf)
    finally:
        os.close(fd)
    assert got == data
    assert rig.core.stats("blk-1", t1).bytes_total == 48 * MiB
    with pytest.raises(errors.FailedPrecondition, match="still published"):
        rig.core.unstage("blk-1", staging)
    for t in (t1, t2):
        rig.core.unpublish("blk-1", t)
        rig.core.unpublish("blk-1", t)  # idempotent
        assert not os.path.lexists(t)
    rig.core.unstage("blk-1", staging)
    rig.core.unstage("blk-1", staging)  # idempotent
    assert _loops_of(img) == [] and list((rig.tmp / "node-state" / "block").glob("*/disk")) == []
    assert MARKER not in img.read_bytes()  # only ciphertext reached the disk

    staging = rig.stage(img, source="encrypted", cap=BLK_RO)
    t3 = rig.target("c")
    _publish(rig, staging, t3, BLK_RO, ro=True)
    with open(t3, "rb") as f:
        f.seek(5 * MiB)
        assert f.read(len(data)) == data
    fd = os.open(t3, os.O_WRONLY)
    try:
        with pytest.raises(OSError):  # a read-only loop device
            os.pwrite(fd, b"x" * 4096, 0)
            os.fsync(fd)
    finally:
        os.close(fd)
    rig.core.unpublish("blk-1", t3)
    rig.core.unstage("blk-1", staging)


def test_raw_block_refusals(rig: Rig) -> None:  # noqa: F811 - the fixture
    img = rig.image()
    staging = rig.stage(img, cap=BLK)
    with pytest.raises(errors.AlreadyExists, match="another access type"):
        rig.stage(img, staging=staging, source="encrypted")  # the same staging, mount access
    with pytest.raises(errors.FailedPrecondition, match="staged for block access, not mount"):
        _publish(rig, staging, rig.target("m"), RW)
    with pytest.raises(errors.FailedPrecondition, match="needs a read-only stage"):
        _publish(rig, staging, rig.target("r"), BLK, ro=True)
    # A link planted at the target: never followed, never mounted over, left as it was.
    victim = rig.tmp / "victim"
    victim.write_bytes(b"keep")
    link = rig.target("l")
    os.symlink(victim, link)
    with pytest.raises(errors.InvalidArgument, match="symlink"):
        _publish(rig, staging, link, BLK)
    assert victim.read_bytes() == b"keep" and not os.path.ismount(str(victim))
    busy = rig.target("busy")
    os.mkdir(busy)
    (pathlib.Path(busy) / "f").write_bytes(b"x")  # something else lives there
    with pytest.raises(errors.Internal, match="not a regular file"):
        _publish(rig, staging, busy, BLK)
    assert not os.path.ismount(busy) and (pathlib.Path(busy) / "f").read_bytes() == b"x"
    rig.core.unstage("blk-1", staging)
    img2 = rig.image("fs.img")
    fs_staging = rig.stage(img2, vid="blk-2", staging=rig.staging("fs"))
    with pytest.raises(errors.FailedPrecondition, match="staged for mount access, not block"):
        req = PublishRequest("blk-2", rig.target("b"), BLK, False, {}, {}, fs_staging)
        rig.core.publish(req)
    rig.core.unstage("blk-2", fs_staging)
    # A directory volume has no device: block access stays refused there.
    with pytest.raises(errors.FailedPrecondition, match="block access is not supported"):
        rig.core.publish(PublishRequest("dir-1", rig.target("d"), BLK, False, {}, {}, ""))


def test_raw_block_survives_a_plugin_restart(rig: Rig) -> None:  # noqa: F811
    img = rig.image()
    staging = rig.stage(img, cap=BLK)
    target = rig.target("a")
    _publish(rig, staging, target)
    with open(target, "r+b") as f:
        f.write(MARKER)
    rig.restart()  # the plugin stops; the daemon, loop device and bind stay
    rig.stage(img, cap=BLK, source="encrypted")  # adopted: idempotent, not restaged
    _publish(rig, staging, target)  # idempotent against the adopted state
    with open(target, "rb") as f:
        assert f.read(len(MARKER)) == MARKER
    rig.core.unpublish("blk-1", target)
    rig.core.unstage("blk-1", staging)
    assert _loops_of(img) == [] and not os.path.lexists(target)
