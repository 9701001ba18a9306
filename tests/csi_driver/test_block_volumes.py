"""Block volumes through the node core: real image files, loop devices, ext4/xfs, the block
daemon under the supervisor. The device is an image file below --block-image-root (the
operator/test flag); a block device takes the same path minus that flag."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pathlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from csi_driver import errors
from csi_driver.core.node import NodeCore, PublishRequest
from csi_driver.core.volcap import AccessType, Capability
from csi_driver.keys import derive_volume_password
from csi_driver.mounts import BUSY_WAIT
from csi_driver.volumes import blockdev
from csi_driver.volumes.block import StageRequest
from csi_driver.volumes.block_luks import CryptsetupOfflineLuks, UserspaceLuks
from fuse_crypt.luks2 import XtsSegment
from tests.fuse_crypt import luks2_helpers as lh
from tests.fuse_crypt.block_rig import block_skip_reason

from .conftest import KEY_RESOURCE, Keys, cleanup_mounts, make_node

MiB = 1 << 20
RW = Capability(AccessType.MOUNT, 1)
RO = Capability(AccessType.MOUNT, 2)
MARKER = b"block-csi-marker-d41c"
NAME = "block-csi-name-93aa"


@dataclass
class Rig:
    tmp: pathlib.Path
    core: NodeCore
    keys: Keys

    def image(self, name: str = "disk.img", size: int = 64 * MiB) -> pathlib.Path:
        path = self.tmp / "images" / name
        with path.open("wb") as f:
            f.truncate(size)
        return path

    def staging(self, name: str = "vol") -> str:
        p = self.tmp / "plugins" / name / "globalmount"
        p.parent.mkdir(parents=True, exist_ok=True)
        return str(p)

    def target(self, name: str) -> str:
        p = self.tmp / "pods" / name / "volumes"
        p.mkdir(parents=True, exist_ok=True)
        return str(p / "mount")

    def stage(self, image: pathlib.Path, *, vid: str = "blk-1", staging: str | None = None,
              source: str = "empty", cap: Capability = RW, **ctx: str) -> str:  # fmt: skip
        staging = staging or self.staging()
        context = {"devicePath": str(image), "sourceType": source, "keyResource": KEY_RESOURCE}
        context.update(ctx)
        self.core.stage(StageRequest(vid, staging, cap, {}, context, {}))
        return staging

    def restart(self, **kw: object) -> None:
        """A new plugin on the same state (its mounts and daemons stay up), which also
        rereads the KBS resources."""
        self.core.shutdown()
        self.core = make_node(self.tmp, self.keys, "gocryptfs",
                              block_image_roots=[str(self.tmp / "images")], **kw)  # fmt: skip

    def publish(self, staging: str, target: str, *, vid: str = "blk-1", ro: bool = False) -> None:
        ctx = {"devicePath": "x"}
        self.core.publish(PublishRequest(vid, target, RO if ro else RW, ro, {}, ctx, staging))


def _loops_of(path: pathlib.Path) -> list[str]:
    out = subprocess.run(["losetup", "-j", str(path)], capture_output=True, text=True).stdout
    return [line.split(":", 1)[0] for line in out.splitlines() if line]


@pytest.fixture
def rig(tmp_path: pathlib.Path, keys: Keys) -> Iterator[Rig]:
    reason = block_skip_reason()
    if reason:
        pytest.skip(reason)
    (tmp_path / "images").mkdir()
    core = make_node(tmp_path, keys, "gocryptfs", block_image_roots=[str(tmp_path / "images")])
    r = Rig(tmp_path, core, keys)
    try:
        yield r
    finally:
        r.core.shutdown(unmount=True)
        cleanup_mounts(str(tmp_path))
        for mnt in (tmp_path / "node-state" / "block").glob("*"):
            for loop in _loops_of(mnt / "disk"):
                subprocess.run(["losetup", "-d", loop], capture_output=True)
        cleanup_mounts(str(tmp_path))


def _sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_stage_publish_unstage_restage(rig: Rig) -> None:
    img = rig.image()
    staging = rig.stage(img)
    st = os.statvfs(staging)
    assert 40 * MiB < st.f_blocks * st.f_frsize < 48 * MiB  # 48 MiB segment, ext4
    rig.stage(img)  # idempotent
    t1, t2, t3 = rig.target("a"), rig.target("b"), rig.target("c")
    rig.publish(staging, t1)
    rig.publish(staging, t1)  # idempotent
    rig.publish(staging, t2)
    rig.publish(staging, t3, ro=True)
    (pathlib.Path(t1) / NAME).write_bytes(MARKER * 100)
    assert (pathlib.Path(t2) / NAME).read_bytes() == MARKER * 100
    assert (pathlib.Path(t3) / NAME).read_bytes() == MARKER * 100
    with pytest.raises(OSError) as exc:
        (pathlib.Path(t3) / "nope").write_bytes(b"x")
    assert exc.value.errno == errno.EROFS
    stats = rig.core.stats("blk-1", t1)
    assert stats.bytes_used > 0 and stats.inodes_used >= 12 and stats.inodes_total > 1000
    with pytest.raises(errors.FailedPrecondition, match="still published"):
        rig.core.unstage("blk-1", staging)
    for t in (t1, t2, t3):
        rig.core.unpublish("blk-1", t)
        rig.core.unpublish("blk-1", t)  # idempotent
        assert not os.path.exists(t)
    rig.core.unstage("blk-1", staging)
    rig.core.unstage("blk-1", staging)  # idempotent
    assert not os.path.ismount(staging)
    assert _loops_of(img) == [] and list((rig.tmp / "node-state" / "block").glob("*/disk")) == []
    raw = img.read_bytes()
    assert MARKER not in raw and NAME.encode() not in raw
    # cryptsetup 2.6 takes it for a LUKS2 container that opens with exactly the derived key,
    # and the volume key it prints decrypts our data sectors (the ext4 superblock magic).
    password = derive_volume_password(rig.keys.root_key, "blk-1")
    assert lh.cs_opens(img, password) and not lh.cs_opens(img, b"wrong")
    offset = int(lh.cs_json(img)["segments"]["0"]["offset"])
    first = XtsSegment(lh.cs_volume_key(img, password)).decrypt(0, raw[offset : offset + 4096])
    assert first[1080:1082] == b"\x53\xef"

    staging = rig.stage(img, source="encrypted")
    t4 = rig.target("d")
    rig.publish(staging, t4)
    assert (pathlib.Path(t4) / NAME).read_bytes() == MARKER * 100
    rig.core.unpublish("blk-1", t4)
    rig.core.unstage("blk-1", staging)


def _ext4(img: pathlib.Path) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)


def _xfs(img: pathlib.Path) -> None:
    subprocess.run(["mkfs.xfs", "-q", "-f", str(img)], check=True, capture_output=True)


def _gpt(img: pathlib.Path) -> None:
    subprocess.run(["sfdisk", "-q", str(img)], input=b"label: gpt\n,10M\n", check=True,
                   capture_output=True)  # fmt: skip


def _luks(img: pathlib.Path) -> None:
    lh.skip_without_cryptsetup()
    lh.cs_luks_format(img)


def _random_head(img: pathlib.Path) -> None:
    with img.open("r+b") as f:
        f.seek(5 * MiB)
        f.write(os.urandom(4096))


def _random_tail(img: pathlib.Path) -> None:
    with img.open("r+b") as f:
        f.seek(f.seek(0, os.SEEK_END) - 4096)
        f.write(os.urandom(100))


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (_ext4, "ext4"),
        (_xfs, "xfs"),
        (_gpt, "gpt partition table"),
        (_luks, "crypto_LUKS"),
        (_random_head, "non-zero data at byte 5242880"),
        (_random_tail, "non-zero data at byte"),
    ],
)
def test_empty_refuses_a_device_with_data(rig: Rig, make, named: str) -> None:  # type: ignore[no-untyped-def]
    img = rig.image(size=320 * MiB)  # sparse; xfs needs >= 300 MiB
    make(img)
    before = _sha(img)
    with pytest.raises(errors.FailedPrecondition, match=named) as exc:
        rig.stage(img)
    assert "nothing was written" in str(exc.value)
    assert _sha(img) == before
    assert rig.core.block.store.all() == []


def test_empty_pv_restages_its_own_container_and_nothing_else(rig: Rig) -> None:
    """A PV with sourceType empty is staged again after a reboot or a move: the container its
    first stage made (our binding token, this volume's key) is opened, never reformatted; a
    container another volume made stays refused, bit for bit unchanged."""
    img = rig.image()
    staging = rig.stage(img, vid="blk-own")
    target = rig.target("own")
    rig.publish(staging, target, vid="blk-own")
    (pathlib.Path(target) / NAME).write_bytes(MARKER)
    rig.core.unpublish("blk-own", target)
    rig.core.unstage("blk-own", staging)
    staging = rig.stage(img, vid="blk-own")  # sourceType empty again
    rig.publish(staging, target, vid="blk-own")
    assert (pathlib.Path(target) / NAME).read_bytes() == MARKER  # not reformatted
    rig.core.unpublish("blk-own", target)
    rig.core.unstage("blk-own", staging)
    before = _sha(img)
    with pytest.raises(errors.FailedPrecondition, match="LUKS") as exc:
        rig.stage(img, vid="blk-other")  # another volume's key: not its container
    assert "nothing was written" in str(exc.value)
    assert _sha(img) == before


def test_wrong_key_changes_nothing(rig: Rig) -> None:
    img = rig.image()
    staging = rig.stage(img, vid="blk-a")
    rig.core.unstage("blk-a", staging)
    before = _sha(img)
    with pytest.raises(errors.WrongVolumeKey):
        rig.stage(img, vid="blk-b", source="encrypted")  # another volume id: another key
    assert _sha(img) == before
    assert not os.path.ismount(staging)
    assert rig.core.block.store.all() == []


def _has_cap_sys_resource() -> bool:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


def test_cdh_made_disk_needs_the_operator_flag(rig: Rig, tmp_path: pathlib.Path) -> None:
    """A disk cryptsetup formatted with CDH's options (attached header, no binding token):
    refused by default, device unchanged; the operator flag opens it to the same key."""
    lh.skip_without_cryptsetup()
    img = rig.image()
    password = derive_volume_password(rig.keys.root_key, "blk-1")
    lh.cs_luks_format(img, password)
    before = _sha(img)
    with pytest.raises(errors.FailedPrecondition, match="header refused"):
        rig.stage(img, source="encrypted")
    assert _sha(img) == before
    u = UserspaceLuks(require_binding=False).unlock(str(img), password)
    assert u.volume_key == lh.cs_volume_key(img, password)
    assert (u.offset, u.size, u.sector_size, u.cipher) == (16 * MiB, None, 4096, "aes-xts-plain64")
    # the independent engine agrees
    assert CryptsetupOfflineLuks().unlock(str(img), password) == u
    assert _sha(img) == before


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_expand_grows_the_filesystem(rig: Rig, fs: str) -> None:
    img = rig.image(size=320 * MiB)
    staging = rig.stage(img, fsType=fs)
    target = rig.target("a")
    rig.publish(staging, target)
    before = os.statvfs(target).f_blocks * os.statvfs(target).f_frsize
    (pathlib.Path(target) / NAME).write_bytes(MARKER)
    with img.open("r+b") as f:
        f.truncate(640 * MiB)
    if fs == "ext4" and not _has_cap_sys_resource():
        # Online growth is an ioctl that needs CAP_SYS_RESOURCE (absent on these machines):
        # refused, with the device grown; the filesystem grows offline at the next stage.
        with pytest.raises(errors.FailedPrecondition, match="CAP_SYS_RESOURCE.*next staged"):
            rig.core.expand("blk-1", target, staging)
        loop = subprocess.run(["findmnt", "-n", "-o", "SOURCE", staging], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        assert _blockdev_size(loop) == 624 * MiB
        assert os.statvfs(target).f_blocks * os.statvfs(target).f_frsize == before
        rig.core.unpublish("blk-1", target)
        rig.core.unstage("blk-1", staging)
        staging = rig.stage(img, source="encrypted")
        rig.publish(staging, target)
    else:
        size = rig.core.expand("blk-1", target, staging)
        assert size == 624 * MiB
    after = os.statvfs(target).f_blocks * os.statvfs(target).f_frsize
    assert after > before + 250 * MiB
    assert rig.core.stats("blk-1", target).bytes_total == after
    assert (pathlib.Path(target) / NAME).read_bytes() == MARKER


def _blockdev_size(dev: str) -> int:
    out = subprocess.run(["blockdev", "--getsize64", dev], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    return int(out)


def test_xfs_and_mkfs_options(rig: Rig) -> None:
    if subprocess.run(["which", "mkfs.xfs"], capture_output=True).returncode:
        pytest.skip("xfsprogs missing")
    img = rig.image(size=400 * MiB)  # xfs wants >= 300 MiB
    staging = rig.stage(img, fsType="xfs", mkfsOpts="-L data")
    entry = rig.core.mounts.find(staging)
    assert entry is not None and entry.fstype == "xfs"
    img2 = rig.image("b.img")
    with pytest.raises(errors.InvalidArgument, match="not allowed"):
        rig.stage(img2, vid="blk-2", staging=rig.staging("v2"), mkfsOpts="-d /etc/passwd")
    with pytest.raises(errors.InvalidArgument, match="bad value"):
        rig.stage(img2, vid="blk-2", staging=rig.staging("v2"), mkfsOpts="-L ../../x")


def test_plugin_restart_adopts_and_cleans(rig: Rig) -> None:
    img = rig.image()
    staging = rig.stage(img)
    target = rig.target("a")
    rig.publish(staging, target)
    (pathlib.Path(target) / "f").write_bytes(b"survives")
    rig.restart()  # plugin stops; mounts and the daemon stay
    assert (pathlib.Path(target) / "f").read_bytes() == b"survives"
    rig.publish(staging, target)  # idempotent against the adopted state
    rig.core.unpublish("blk-1", target)
    rig.core.unstage("blk-1", staging)
    assert _loops_of(img) == []
    assert not any(os.path.ismount(p) for p in (staging, target))


def test_publish_needs_a_stage_and_directory_volumes_stage_as_noop(rig: Rig) -> None:
    with pytest.raises(errors.FailedPrecondition, match="not staged"):
        rig.publish(rig.staging(), rig.target("a"))
    # A gocryptfs directory volume (no device named): staging is a validated no-op.
    rig.core.stage(StageRequest("dir-1", rig.staging("d"), RW, {}, {"cipherDir": "/x"}, {}))
    rig.core.unstage("dir-1", rig.staging("d"))
    with pytest.raises(errors.InvalidArgument):
        rig.core.stage(StageRequest("dir-1", "/elsewhere/stage", RW, {}, {}, {}))


# -- device names (no root needed) ------------------------------------------------------------


def test_device_resolution_refusals(tmp_path: pathlib.Path) -> None:
    img = tmp_path / "img"
    img.write_bytes(b"")
    roots = [str(tmp_path)]
    for bad in ("/dev/../etc/passwd", "dev/sda", "/dev/./sda", "/dev//sda", ""):
        with pytest.raises(errors.InvalidArgument):
            blockdev.resolve_device({"devicePath": bad}, roots)
    with pytest.raises(errors.FailedPrecondition, match="not a block device"):
        blockdev.resolve_device({"devicePath": "/dev/null"})
    with pytest.raises(errors.InvalidArgument, match="block device under /dev"):
        blockdev.resolve_device({"devicePath": str(img)})  # no image root configured
    link = tmp_path / "link"
    link.symlink_to("/dev/null")
    with pytest.raises(errors.InvalidArgument):
        blockdev.resolve_device({"devicePath": str(link)}, roots)  # a link out of the root
    assert blockdev.resolve_device({"devicePath": str(img)}, roots).is_image
    for bad_id in ("8", "8:0:1", "a:b", "-1:0", "1" * 12 + ":0"):
        with pytest.raises(errors.InvalidArgument):
            blockdev.resolve_device({"deviceId": bad_id})
    with pytest.raises(errors.InvalidArgument, match="not both"):
        blockdev.resolve_device({"deviceId": "7:0", "devicePath": "/dev/loop0"})
    with contextlib.suppress(errors.NotFound):  # 7:0 is /dev/loop0 where loop exists
        dev = blockdev.resolve_device({"deviceId": "7:0"})
        assert dev.path == "/dev/loop0" and not dev.is_image
    with pytest.raises(errors.NotFound):
        blockdev.resolve_device({"deviceId": "4095:1048575"})


def test_mkfs_options_allow_list() -> None:
    assert blockdev.mkfs_options("ext4", "-b 4096 -m 1 -E lazy_itable_init=0 -j") == [
        "-b", "4096", "-m", "1", "-E", "lazy_itable_init=0", "-j",
    ]  # fmt: skip
    for bad in ("-d /root", "-b", "-b 3000", "-E root_owner=0:0", "-L a;b", "--", "-J device=x"):
        with pytest.raises(errors.InvalidArgument):
            blockdev.mkfs_options("ext4", bad)
    assert blockdev.mkfs_options("xfs", "-m crc=1,reflink=0") == ["-m", "crc=1,reflink=0"]
    with pytest.raises(errors.InvalidArgument):
        blockdev.fs_type({}, "btrfs")


def test_daemon_killed_mid_write_unstage_and_restage(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """The block daemon SIGKILLed under a writer: unstage still cleans everything (dead
    FUSE, loop device with I/O errors), the next stage opens the volume and the journal
    replay leaves a consistent filesystem with the committed data."""
    import signal
    import threading
    import time

    img = rig.image()
    staging = rig.stage(img)
    target = rig.target("a")
    rig.publish(staging, target)
    loop = rig.core.block._loop_of(rig.core.block.daemon_dir(staging))
    assert loop is not None
    backing = pathlib.Path(f"/sys/block/{loop.removeprefix('/dev/')}/loop/backing_file")
    (pathlib.Path(target) / "committed").write_bytes(b"before the crash")
    os.sync()
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            try:
                with open(pathlib.Path(target) / f"w{i % 20}", "wb") as f:
                    f.write(os.urandom(128 * 1024))
                    os.fsync(f.fileno())
            except OSError:
                return
            i += 1

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    time.sleep(0.8)
    pub = rig.core.block.store.get(staging)
    assert pub is not None and pub.pid > 0
    assert rig.core.stats("blk-1", target).abnormal is None
    os.kill(pub.pid, signal.SIGKILL)
    stop.set()
    t.join(30)
    # Reported through NodeGetVolumeStats (VolumeCondition) for the target and the stage,
    # and logged by the supervisor as not restartable (it keeps no key for block daemons).
    for path in (target, staging):
        why = rig.core.stats("blk-1", path).abnormal
        assert why is not None and "has exited" in why and "staged again" in why
    from fuse_crypt.daemon import wait_until

    assert wait_until(lambda: "not restartable" in caplog.text, 10)
    rig.core.unpublish("blk-1", target)
    rig.core.unstage("blk-1", staging)
    # (the loop is over the daemon's ``disk``, never over the image: _loops_of(img) is
    # always empty here, so the loop device itself is checked)
    assert not os.path.ismount(staging)
    assert not backing.exists(), f"{loop} is still attached"

    staging = rig.stage(img, source="encrypted")
    assert (pathlib.Path(staging) / "committed").read_bytes() == b"before the crash"
    loop = rig.core.block._loop_of(rig.core.block.daemon_dir(staging))
    assert loop is not None
    subprocess.run(["umount", staging], check=True)
    fsck = subprocess.run(["fsck.ext4", "-n", "-f", loop], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout.decode()


def test_unstage_after_the_supervisor_detached_the_dead_daemon(rig: Rig) -> None:
    """The daemon SIGKILLed and the supervisor's lazy detach done before unstage, with
    nothing looking up ``disk`` in between: the kernel then names the loop's backing file
    ``/disk``, without " (deleted)". unstage once took that loop for someone else's and
    returned OK with the staging mount and the loop device left behind (the intermittent
    failure of the mid-write test under load: its writer usually got the dentry
    invalidated first, which adds " (deleted)")."""
    import signal
    import time

    img = rig.image()
    staging = rig.stage(img)
    pub = rig.core.block.store.get(staging)
    assert pub is not None and pub.pid > 0
    mnt = rig.core.block.daemon_dir(staging)
    loop = rig.core.block._loop_of(mnt)
    assert loop is not None
    backing = pathlib.Path(f"/sys/block/{loop.removeprefix('/dev/')}/loop/backing_file")
    os.kill(pub.pid, signal.SIGKILL)
    for _ in range(400):  # the supervisor notices, detaches the dead FUSE mount lazily
        handle = rig.core.block.supervisor.get(mnt)
        if handle is not None and handle.dead:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the supervisor did not notice the dead daemon")
    assert backing.read_text().strip() in ("/disk", "/disk (deleted)")
    rig.core.unstage("blk-1", staging)
    assert not os.path.ismount(staging)
    assert not backing.exists(), f"{loop} is still attached"
    assert rig.core.block.store.get(staging) is None

    staging = rig.stage(img, source="encrypted")  # and the volume stages again
    assert os.path.ismount(staging)


def test_unstage_right_after_the_daemon_died_before_the_supervisor_noticed(rig: Rig) -> None:
    """The daemon SIGKILLed and unstage called before the supervisor has detached its dead
    FUSE mount (ENOTCONN: losetup -j cannot stat ``disk``): unstage must still unmount the
    staging path and detach the loop device (it once returned OK with both left behind)."""
    import signal
    import time

    img = rig.image()
    staging = rig.stage(img)
    pub = rig.core.block.store.get(staging)
    assert pub is not None and pub.pid > 0
    rig.core.block.supervisor.shutdown()  # nobody notices the death
    os.kill(pub.pid, signal.SIGKILL)
    disk = pathlib.Path(rig.core.block.daemon_dir(staging), "disk")
    for _ in range(200):  # the FUSE connection is gone: ENOTCONN or ECONNABORTED
        try:
            disk.stat()
        except OSError as exc:
            assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the killed daemon's mount still answers")
    rig.core.unstage("blk-1", staging)
    assert _loops_of(img) == [] and not os.path.ismount(staging)


def _mount_source(path: str) -> str | None:
    """The mount entry at exactly ``path`` (its source and fstype), None if not a mount."""
    for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == path:
            return fields[3] + " " + line.split(" - ", 1)[1]
    return None


def test_unpublish_of_a_busy_target_fails_clearly_and_changes_nothing(rig: Rig) -> None:
    """A pod target held by an open file: NodeUnpublishVolume waits a bounded time, then
    fails with FAILED_PRECONDITION naming the target, and leaves everything as it was (the
    target still mounted and recorded, the other target and the staging mount untouched,
    the open file still usable). Once the file is closed the same call succeeds. (The
    unpublish flake: "target is busy" right after the writer had ended.)"""
    import time

    img = rig.image()
    staging = rig.stage(img)
    busy, other = rig.target("busy"), rig.target("other")
    rig.publish(staging, busy)
    rig.publish(staging, other)
    before = {p: _mount_source(p) for p in (busy, other, staging)}
    assert all(before.values())
    f = open(pathlib.Path(busy) / "held", "wb")  # noqa: SIM115 (held across the call)
    try:
        f.write(b"first")
        f.flush()
        started = time.monotonic()
        with pytest.raises(errors.FailedPrecondition) as exc:
            rig.core.unpublish("blk-1", busy)
        took = time.monotonic() - started
        assert busy in str(exc.value) and "busy" in str(exc.value)
        assert BUSY_WAIT <= took < BUSY_WAIT + 10, took  # bounded, not instant
        assert {p: _mount_source(p) for p in (busy, other, staging)} == before
        assert rig.core.block.store.get(busy) is not None
        f.write(b" second")  # the pod's descriptor still works
        f.flush()
        assert (pathlib.Path(other) / "held").read_bytes() == b"first second"
    finally:
        f.close()
    rig.core.unpublish("blk-1", busy)
    assert not os.path.exists(busy) and rig.core.block.store.get(busy) is None
    assert _mount_source(other) == before[other] and _mount_source(staging) == before[staging]
    assert (pathlib.Path(other) / "held").read_bytes() == b"first second"
    rig.core.unpublish("blk-1", other)
    rig.core.unstage("blk-1", staging)
    assert not os.path.ismount(staging)


def test_unstage_of_a_busy_staging_path_fails_clearly_and_changes_nothing(rig: Rig) -> None:
    """A process holds a file in the staging mount itself (no pod target is published):
    NodeUnstageVolume waits BUSY_WAIT, then FAILED_PRECONDITION naming the staging path,
    with the mount, its loop device, the daemon and the record left as they were and the
    holder's descriptor still working. Once it is closed, the same call finishes."""
    img = rig.image()
    staging = rig.stage(img)
    before = _mount_source(staging)
    pub = rig.core.block.store.get(staging)
    assert before and pub is not None
    f = open(pathlib.Path(staging) / "held", "wb")  # noqa: SIM115 (held across the call)
    try:
        f.write(b"first")
        f.flush()
        with pytest.raises(errors.FailedPrecondition) as exc:
            rig.core.unstage("blk-1", staging)
        assert staging in str(exc.value) and "busy" in str(exc.value), exc.value
        assert _mount_source(staging) == before
        assert rig.core.block.store.get(staging) == pub
        f.write(b" second")
        f.flush()
        os.fsync(f.fileno())
    finally:
        f.close()
    assert (pathlib.Path(staging) / "held").read_bytes() == b"first second"
    rig.core.unstage("blk-1", staging)
    assert _mount_source(staging) is None and rig.core.block.store.get(staging) is None
    staging = rig.stage(img, source="encrypted")
    assert (pathlib.Path(staging) / "held").read_bytes() == b"first second"
    rig.core.unstage("blk-1", staging)


@pytest.mark.parametrize("holder", ["this process", "a child that exits"])
def test_unpublish_waits_out_a_holder_that_lets_go(rig: Rig, holder: str) -> None:
    """A file in the target let go of 0.3 s after NodeUnpublishVolume started: closed by
    this process, or held by a child that inherited the descriptor and then exits (as a
    ``fusermount3`` the supervisor forks while a pod writes holds a copy until its exec).
    The call succeeds instead of failing with "target is busy", as it did before the
    bounded wait on EBUSY."""
    import threading

    img = rig.image()
    staging = rig.stage(img)
    target = rig.target("a")
    rig.publish(staging, target)
    fd = os.open(pathlib.Path(target) / "f", os.O_CREAT | os.O_WRONLY, 0o600)
    child = None
    if holder == "this process":
        letgo = threading.Timer(0.3, os.close, (fd,))
        letgo.start()
    else:
        child = subprocess.Popen(["sleep", "0.3"], pass_fds=(fd,))
        os.close(fd)
    try:
        rig.core.unpublish("blk-1", target)
    finally:
        if child is None:
            letgo.join(5)
        else:
            child.wait(5)
    assert not os.path.exists(target) and rig.core.block.store.get(target) is None
    assert os.path.ismount(staging)


def _null_cipher(m: dict) -> None:  # type: ignore[type-arg]
    m["segments"]["0"]["encryption"] = "cipher_null-ecb"


def _small_sectors(m: dict) -> None:  # type: ignore[type-arg]
    m["segments"]["0"]["sector_size"] = 512


def _moved_offset(m: dict) -> None:  # type: ignore[type-arg]
    m["segments"]["0"]["offset"] = str(8 << 20)


def _huge_kdf(m: dict) -> None:  # type: ignore[type-arg]
    m["keyslots"]["0"]["kdf"]["iterations"] = 1 << 31


@pytest.mark.parametrize(
    ("edit", "secondary_only"),
    [
        (_null_cipher, False),
        (_small_sectors, False),
        (_moved_offset, False),
        (_huge_kdf, False),
        (_null_cipher, True),
    ],  # fmt: skip
)
def test_hostile_header_is_refused_at_stage(rig: Rig, edit, secondary_only: bool) -> None:  # type: ignore[no-untyped-def]
    """The host rewrites the header of a volume the node made (checksums recomputed, seqid
    bumped; or only a forged secondary with a higher seqid): staging refuses it and the
    device stays bit-for-bit what the host left."""

    img = rig.image()
    staging = rig.stage(img)
    rig.core.unstage("blk-1", staging)
    lh.forge(img, edit, primary=not secondary_only)
    before = _sha(img)
    with pytest.raises(errors.FailedPrecondition, match="header refused"):
        rig.stage(img, source="encrypted")
    assert _sha(img) == before
    assert rig.core.block.store.all() == [] and not os.path.ismount(staging)


def _volume_and_a_new_root_key(rig: Rig, keys: Keys) -> tuple[pathlib.Path, bytes]:
    """A staged-then-unstaged volume holding ``kept``, and a new root key in the KBS
    (KEY_RESOURCE + "-2") beside the old one, as a rotation starts; the node restarted."""
    from csi_driver.volume_key import new_volume_key_jwk

    img = rig.image()
    staging = rig.stage(img)
    (pathlib.Path(staging) / "kept").write_bytes(b"across the rotation")
    rig.core.unstage("blk-1", staging)
    new_jwk = new_volume_key_jwk().encode()
    _set_resource(keys, "default/coco-csi/volume-root-2", new_jwk)
    rig.restart()
    return img, new_jwk


def test_key_rotation_adds_the_new_slot_then_removes_the_old(rig: Rig, keys: Keys) -> None:
    from csi_driver.volume_key import parse_volume_key

    img, new_jwk = _volume_and_a_new_root_key(rig, keys)
    new_res = KEY_RESOURCE + "-2"
    before = _sha(img)
    with pytest.raises(errors.WrongVolumeKey):
        rig.stage(img, source="encrypted", keyResource=new_res)
    assert _sha(img) == before

    staging = rig.stage(img, source="encrypted", keyResource=new_res,
                        previousKeyResource=KEY_RESOURCE)  # fmt: skip
    assert (pathlib.Path(staging) / "kept").read_bytes() == b"across the rotation"
    rig.core.unstage("blk-1", staging)
    old_pw = derive_volume_password(keys.root_key, "blk-1")
    new_pw = derive_volume_password(parse_volume_key(new_jwk), "blk-1")
    assert lh.cs_opens(img, new_pw) and not lh.cs_opens(img, old_pw)
    # From now on the new key alone opens it; a previous key outside the allowed
    # prefixes is refused before anything is tried.
    staging = rig.stage(img, source="encrypted", keyResource=new_res)
    rig.core.unstage("blk-1", staging)
    before = _sha(img)
    with pytest.raises(errors.PermissionDenied):
        rig.stage(img, source="encrypted", keyResource=KEY_RESOURCE,
                  previousKeyResource="kbs:///other/repo/key")  # fmt: skip
    assert _sha(img) == before


def _head_sha(path: pathlib.Path) -> str:
    """The LUKS2 header and keyslots area (the first 16 MiB): what a key change writes."""
    with path.open("rb") as f:
        return hashlib.sha256(f.read(16 * MiB)).hexdigest()


def test_a_rotation_cut_off_after_the_new_slot_is_finished_at_the_next_stage(
    rig: Rig, keys: Keys
) -> None:
    """A crash between a rotation's two steps leaves the old slot too. The next stage that
    names the previous key must remove it, or the old (revoked) key opens the volume for
    good; once it is gone, naming it again writes nothing, and a previous key the KBS no
    longer has does not stop the volume opening with its current key."""
    from csi_driver.volume_key import parse_volume_key
    from fuse_crypt.luks2 import add_passphrase

    img, new_jwk = _volume_and_a_new_root_key(rig, keys)
    old_pw = derive_volume_password(keys.root_key, "blk-1")
    new_pw = derive_volume_password(parse_volume_key(new_jwk), "blk-1")
    # The plugin died right after step 1 (the new slot is committed, the old one kept).
    fd = os.open(img, os.O_RDWR)
    try:
        add_passphrase(fd, old_pw, new_pw, kdf="pbkdf2")
    finally:
        os.close(fd)
    assert lh.cs_opens(img, new_pw) and lh.cs_opens(img, old_pw)

    new_res = KEY_RESOURCE + "-2"
    staging = rig.stage(img, source="encrypted", keyResource=new_res,
                        previousKeyResource=KEY_RESOURCE)  # fmt: skip
    assert (pathlib.Path(staging) / "kept").read_bytes() == b"across the rotation"
    rig.core.unstage("blk-1", staging)
    assert lh.cs_opens(img, new_pw) and not lh.cs_opens(img, old_pw)
    assert len(lh.cs_json(img)["keyslots"]) == 1

    before = _head_sha(img)
    staging = rig.stage(img, source="encrypted", keyResource=new_res,
                        previousKeyResource=KEY_RESOURCE)  # fmt: skip
    rig.core.unstage("blk-1", staging)
    assert _head_sha(img) == before  # nothing left to remove: the header is not rewritten

    _set_resource(keys, "default/coco-csi/volume-root", None)
    rig.restart()
    staging = rig.stage(img, source="encrypted", keyResource=new_res,
                        previousKeyResource=KEY_RESOURCE)  # fmt: skip
    assert (pathlib.Path(staging) / "kept").read_bytes() == b"across the rotation"
    rig.core.unstage("blk-1", staging)
    assert _head_sha(img) == before
    # A previous key the node would never accept is still a bad request.
    with pytest.raises(errors.PermissionDenied):
        rig.stage(img, source="encrypted", keyResource=new_res,
                  previousKeyResource="kbs:///other/repo/key")  # fmt: skip


def test_real_block_device_by_path_and_by_dev_id(rig: Rig) -> None:
    """A loop device stands in for a cloud disk: no --block-image-root needed. Staged by
    devicePath, then by deviceId MAJ:MIN; a second staging of the same disk is refused."""
    img = rig.image()
    loop = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    try:
        staging = rig.stage(img, devicePath=loop)
        (pathlib.Path(staging) / "f").write_bytes(b"on a block device")
        with pytest.raises(errors.CsiError) as exc:
            rig.stage(img, vid="blk-1", staging=rig.staging("second"), source="encrypted",
                      devicePath=loop)  # fmt: skip
        assert "in use" in str(exc.value)
        assert len(rig.core.block.store.all()) == 1
        rig.core.unstage("blk-1", staging)
        st = os.stat(loop)
        dev_id = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        ctx = {"sourceType": "encrypted", "deviceId": dev_id, "keyResource": KEY_RESOURCE}
        rig.core.stage(StageRequest("blk-1", staging, RW, {}, ctx, {}))
        assert (pathlib.Path(staging) / "f").read_bytes() == b"on a block device"
        rig.core.unstage("blk-1", staging)
    finally:
        rig.core.block.shutdown()
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def test_read_only_stage_and_no_secrets_in_logs(rig: Rig) -> None:
    img = rig.image()
    staging = rig.stage(img)
    (pathlib.Path(staging) / "f").write_bytes(b"read me")
    rig.core.unstage("blk-1", staging)
    staging = rig.stage(img, source="encrypted", cap=RO)
    entry = rig.core.mounts.find(staging)
    assert entry is not None
    assert (pathlib.Path(staging) / "f").read_bytes() == b"read me"
    with pytest.raises(OSError) as exc:
        (pathlib.Path(staging) / "g").write_bytes(b"x")
    assert exc.value.errno == errno.EROFS
    target = rig.target("a")
    rig.publish(staging, target, ro=True)
    assert (pathlib.Path(target) / "f").read_bytes() == b"read me"
    pub = rig.core.block.store.get(staging)
    assert pub is not None and pub.readonly
    cmdline = pathlib.Path(f"/proc/{pub.pid}/cmdline").read_bytes().split(b"\0")
    assert b"--ro" in cmdline and b"--masterkey" in cmdline
    password = derive_volume_password(rig.keys.root_key, "blk-1")
    vk = UserspaceLuks().unlock(str(img), password).volume_key
    secrets = (vk.hex().encode(), password, vk)
    assert not any(s in arg for s in secrets for arg in cmdline)
    for path in (rig.tmp / "node-state").rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            assert not any(s in data for s in secrets), path
    rig.core.unpublish("blk-1", target)
    rig.core.unstage("blk-1", staging)


# -- key sources, mkfsOpts and device names at stage --------------------------------------------


def _set_resource(keys: Keys, name: str, value: bytes | None) -> None:
    """Store ``value`` as the KBS resource ``name`` (None: delete it). Restart the node
    (Rig.restart) to reload the resources."""
    import base64
    import json

    resources = pathlib.Path(keys.resources_file)
    doc = json.loads(resources.read_text())
    if value is None:
        del doc[name]
    else:
        doc[name] = base64.b64encode(value).decode()
    resources.write_text(json.dumps(doc))


def _sealed_resource(keys: Keys, name: str, value: bytes) -> str:
    """Store ``value`` as the KBS resource ``name`` and return a sealed reference to it
    (CoCo's vault form: the node fetches the bytes when it unseals)."""
    from sealed_secrets.seal import seal_vault

    from .conftest import SIGNING_KID

    _set_resource(keys, name, value)
    return seal_vault(f"kbs:///{name}", "kbs", signing_key=keys.signing_key,
                      signing_kid=SIGNING_KID)  # fmt: skip


def _keyslot_kdfs(img: pathlib.Path) -> list[str]:
    """The KDF type of every keyslot, as cryptsetup reads the header."""
    return [slot["kdf"]["type"] for slot in lh.cs_json(img)["keyslots"].values()]


def _staged_loop(staging: str) -> str:
    """The plaintext loop device mounted at ``staging``, by findmnt (not the node's view)."""
    out = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "--mountpoint", staging],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return out.strip()


def test_sealed_passphrase_is_the_block_volume_key(rig: Rig, keys: Keys) -> None:
    """A sealed ``passphrase`` in NodeStage secrets (no keyResource) is the LUKS2 passphrase
    itself: cryptsetup opens the container with the unsealed bytes, in an Argon2id keyslot (a
    human passphrase, low entropy). The volume restages as ``encrypted`` with it and keeps its
    data; another sealed passphrase, one byte apart, is WrongVolumeKey with the image unchanged."""
    from .conftest import PASSPHRASE

    lh.skip_without_cryptsetup()
    other = PASSPHRASE[:-1] + b"E"  # differs in the last byte only
    wrong = _sealed_resource(keys, "default/passphrases/other", other)
    rig.restart()
    img = rig.image()
    staging = rig.staging()
    secrets = {"passphrase": keys.seal_passphrase()}
    ctx = {"devicePath": str(img), "sourceType": "empty"}
    rig.core.stage(StageRequest("blk-pp", staging, RW, secrets, ctx, {}))
    (pathlib.Path(staging) / NAME).write_bytes(MARKER)
    rig.core.unstage("blk-pp", staging)
    assert not os.path.ismount(staging)
    assert lh.cs_opens(img, PASSPHRASE)
    assert not lh.cs_opens(img, other)
    assert not lh.cs_opens(img, derive_volume_password(keys.root_key, "blk-pp"))
    assert _keyslot_kdfs(img) == ["argon2id"]
    assert MARKER not in img.read_bytes()

    ctx["sourceType"] = "encrypted"
    rig.core.stage(StageRequest("blk-pp", staging, RW, secrets, ctx, {}))
    assert (pathlib.Path(staging) / NAME).read_bytes() == MARKER
    rig.core.unstage("blk-pp", staging)

    before = _sha(img)
    with pytest.raises(errors.WrongVolumeKey):
        rig.core.stage(StageRequest("blk-pp", staging, RW, {"passphrase": wrong}, ctx, {}))
    assert _sha(img) == before
    assert not os.path.ismount(staging) and rig.core.block.store.all() == []


def test_ephemeral_block_volume_key_dies_with_its_stage(rig: Rig, keys: Keys) -> None:
    """``sourceType: empty`` with no key source at all (no keyResource, no passphrase): CDH's
    ephemeral volume, a random key. It formats, mounts and holds data while staged; after
    unstage nothing opens it again: a restage as ``encrypted`` without a key is
    INVALID_ARGUMENT (no key source) before the device is touched, a second ephemeral stage
    meets the old LUKS header and refuses to format over it, and neither the KBS resource's
    key for this volume nor the root key opens it (WrongVolumeKey); the image never changes."""
    lh.skip_without_cryptsetup()
    img = rig.image()
    staging = rig.staging()
    ctx = {"devicePath": str(img), "sourceType": "empty"}
    rig.core.stage(StageRequest("blk-eph", staging, RW, {}, ctx, {}))
    entry = rig.core.mounts.find(staging)
    assert entry is not None and entry.fstype == "ext4"
    (pathlib.Path(staging) / NAME).write_bytes(MARKER)
    assert (pathlib.Path(staging) / NAME).read_bytes() == MARKER
    rig.core.unstage("blk-eph", staging)
    assert not os.path.ismount(staging) and rig.core.block.store.all() == []
    assert _keyslot_kdfs(img) == ["pbkdf2"]  # a random key: no Argon2id cost
    raw = img.read_bytes()
    assert MARKER not in raw and NAME.encode() not in raw
    before = _sha(img)

    encrypted = {**ctx, "sourceType": "encrypted"}
    with pytest.raises(errors.InvalidArgument, match="no key source"):
        rig.core.stage(StageRequest("blk-eph", staging, RW, {}, encrypted, {}))
    assert _sha(img) == before
    with pytest.raises(errors.FailedPrecondition, match="LUKS") as exc:
        rig.core.stage(StageRequest("blk-eph", staging, RW, {}, ctx, {}))
    assert "nothing was written" in str(exc.value)
    assert _sha(img) == before

    derived = derive_volume_password(keys.root_key, "blk-eph")
    for candidate in (derived, keys.root_key.hex().encode(), keys.root_key):
        assert not lh.cs_opens(img, candidate)
    with pytest.raises(errors.WrongVolumeKey):
        rig.stage(img, vid="blk-eph", staging=staging, source="encrypted")  # keyResource
    assert _sha(img) == before
    assert not os.path.ismount(staging) and rig.core.block.store.all() == []


@pytest.mark.parametrize(("fs", "opts"), [("ext4", "-L data -m 0"), ("xfs", "-L data")])
def test_mkfs_options_shape_the_new_filesystem(rig: Rig, fs: str, opts: str) -> None:
    """``mkfsOpts`` reach mkfs: the label reads back from the plaintext loop device mounted
    at the staging path (blkid's low-level probe), and for ext4 ``-m 0`` (the option after
    the label) leaves a reserved block count of 0 in the superblock, not the default 5 %."""
    import re
    import shutil

    if fs == "xfs" and shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed (xfsprogs): the xfs label cannot be checked")
    img = rig.image(size=(400 if fs == "xfs" else 64) * MiB)  # xfs wants >= 300 MiB
    staging = rig.stage(img, fsType=fs, mkfsOpts=opts)
    loop = _staged_loop(staging)
    assert loop.startswith("/dev/loop")
    assert loop == rig.core.block._loop_of(rig.core.block.daemon_dir(staging))

    def probe(tag: str) -> str:
        return subprocess.run(["blkid", "-p", "-o", "value", "-s", tag, loop],
                              capture_output=True, text=True).stdout.strip()  # fmt: skip

    assert probe("TYPE") == fs
    assert probe("LABEL") == "data"
    if fs == "ext4":
        head = subprocess.run(["dumpe2fs", "-h", loop], capture_output=True, text=True).stdout
        assert re.search(r"^Reserved block count:\s+0$", head, re.M), head  # default: 5 %
    rig.core.unstage("blk-1", staging)
    assert _loops_of(img) == [] and not os.path.ismount(staging)


def test_device_named_only_in_publish_context(rig: Rig) -> None:
    """The device may be named in publish_context (what ControllerPublishVolume returned)
    rather than in volumeAttributes: ``devicePath`` there alone stages the volume, new and again as
    ``encrypted``, on that very image (the stage record names it; the data reads back)."""
    img = rig.image()
    staging = rig.staging()
    vctx = {"sourceType": "empty", "keyResource": KEY_RESOURCE}
    pctx = {"devicePath": str(img)}
    rig.core.stage(StageRequest("blk-1", staging, RW, {}, vctx, pctx))
    pub = rig.core.block.store.get(staging)
    assert pub is not None and pub.cipher_dir == str(img)
    assert _staged_loop(staging).startswith("/dev/loop")
    (pathlib.Path(staging) / NAME).write_bytes(MARKER)
    rig.core.unstage("blk-1", staging)
    assert not os.path.ismount(staging) and MARKER not in img.read_bytes()
    assert lh.cs_opens(img, derive_volume_password(rig.keys.root_key, "blk-1"))

    vctx["sourceType"] = "encrypted"
    rig.core.stage(StageRequest("blk-1", staging, RW, {}, vctx, pctx))
    assert (pathlib.Path(staging) / NAME).read_bytes() == MARKER
    rig.core.unstage("blk-1", staging)
    assert _loops_of(img) == [] and rig.core.block.store.all() == []


def test_device_by_id_link(rig: Rig) -> None:
    """A ``/dev/disk/by-id`` name (a link into /dev, as udev makes for cloud disks) stages:
    resolved once, so the record and the block daemon hold the loop device itself, never the
    link; the same disk under its kernel name cannot be staged a second time beside it; it
    restages by the link as ``encrypted`` and reads back."""
    img = rig.image()
    loop = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    by_id = pathlib.Path("/dev/disk/by-id")
    made = [p for p in (by_id.parent, by_id) if not p.exists()]
    link = by_id / f"coco-csi-test-{os.urandom(6).hex()}"
    try:
        for p in made:
            p.mkdir(mode=0o755)
        link.symlink_to(f"../../{os.path.basename(loop)}")
        assert os.path.realpath(link) == loop
        staging = rig.stage(img, devicePath=str(link))
        (pathlib.Path(staging) / "f").write_bytes(b"by id")
        pub = rig.core.block.store.get(staging)
        assert pub is not None and pub.cipher_dir == loop
        cmdline = pathlib.Path(f"/proc/{pub.pid}/cmdline").read_bytes().split(b"\0")
        assert loop.encode() in cmdline and not any(str(link).encode() in a for a in cmdline)
        with pytest.raises(errors.CsiError) as exc:
            rig.stage(img, staging=rig.staging("second"), source="encrypted", devicePath=loop)
        assert "in use" in str(exc.value)
        assert len(rig.core.block.store.all()) == 1
        rig.core.unstage("blk-1", staging)
        staging = rig.stage(img, source="encrypted", devicePath=str(link))
        assert (pathlib.Path(staging) / "f").read_bytes() == b"by id"
        rig.core.unstage("blk-1", staging)
        assert not os.path.ismount(staging) and rig.core.block.store.all() == []
    finally:
        rig.core.block.shutdown()
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def test_a_cdh_disk_keyed_with_bytes_that_end_in_a_newline_opens_through_the_node(
    rig: Rig, keys: Keys
) -> None:
    """CDH hands a LUKS2 key to cryptsetup byte for byte (``-d -``); a KBS resource made
    with ``echo`` ends in a newline, and that newline is part of the key. A disk cryptsetup
    formatted that way, with CDH's options and no binding token, stages through the node
    (raw block, with the operator's --block-accept-unbound-header) from a sealed reference
    to the same resource; what the node writes decrypts under the volume key cryptsetup
    dumps for those bytes, with nothing written to the header."""
    from .test_block_raw import BLK

    lh.skip_without_cryptsetup()
    cdh_key = b"tenant disk key\n"
    sealed = _sealed_resource(keys, "default/passphrases/cdh", cdh_key)
    img = rig.image()
    lh.cs_luks_format(img, cdh_key)
    assert not lh.cs_opens(img, cdh_key[:-1])  # the first line alone is not the key
    head = _head_sha(img)
    rig.restart(block_require_binding=False)
    staging = rig.staging()
    ctx = {"devicePath": str(img), "sourceType": "encrypted"}
    rig.core.stage(StageRequest("blk-cdh", staging, BLK, {"passphrase": sealed}, ctx, {}))
    loop = rig.core.block._loop_of(rig.core.block.daemon_dir(staging))
    assert loop is not None
    data = MARKER * (4096 // len(MARKER)) + bytes(4096 % len(MARKER))
    fd = os.open(loop, os.O_RDWR)
    try:
        os.pwrite(fd, data, 3 * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    rig.core.unstage("blk-cdh", staging)
    assert _head_sha(img) == head
    seg = XtsSegment(lh.cs_volume_key(img, cdh_key))
    with img.open("rb") as f:
        f.seek(16 * MiB + 3 * 4096)
        assert seg.decrypt(3 * 4096, f.read(4096)) == data


def test_a_volume_keyed_with_the_first_line_of_its_passphrase_still_opens(
    rig: Rig, keys: Keys
) -> None:
    """Before block volumes used whole passphrases, a sealed passphrase that spans lines
    keyed the volume with its first line. Such a volume still stages with the same sealed
    value, as ``encrypted`` and as its own ``empty`` PV, and its header is not rewritten."""
    from .test_block_raw import BLK

    sealed = _sealed_resource(keys, "default/passphrases/legacy", b"legacy pass\n")
    img = rig.image()
    UserspaceLuks().format(str(img), b"legacy pass", high_entropy=False)
    head = _head_sha(img)
    rig.restart()
    staging = rig.staging()
    for source in ("encrypted", "empty"):
        ctx = {"devicePath": str(img), "sourceType": source}
        rig.core.stage(StageRequest("blk-old", staging, BLK, {"passphrase": sealed}, ctx, {}))
        rig.core.unstage("blk-old", staging)
    assert _head_sha(img) == head
    other = _sealed_resource(keys, "default/passphrases/legacy2", b"legacy pass2\n")
    rig.restart()
    with pytest.raises(errors.WrongVolumeKey):
        ctx = {"devicePath": str(img), "sourceType": "encrypted"}
        rig.core.stage(StageRequest("blk-old", staging, BLK, {"passphrase": other}, ctx, {}))
    assert _head_sha(img) == head
    # Rotated away from: the previous passphrase's first line is what opens the old slot.
    ctx = {"devicePath": str(img), "sourceType": "encrypted", "keyResource": KEY_RESOURCE,
           "previousPassphrase": sealed}  # fmt: skip
    rig.core.stage(StageRequest("blk-old", staging, BLK, {}, ctx, {}))
    rig.core.unstage("blk-old", staging)
    new_pw = derive_volume_password(keys.root_key, "blk-old")
    assert lh.cs_opens(img, new_pw) and not lh.cs_opens(img, b"legacy pass")


def test_a_stage_killed_before_its_mount_is_undone_by_the_next_plugin(rig: Rig) -> None:
    """kill -9 of the plugin after the block daemon started and its loop device was
    attached, before the filesystem was mounted (the stage record still says INTENT, with
    no pid yet): the next plugin undoes it at start (daemon stopped, loop detached, record
    gone), and the retried stage succeeds with the data of an earlier stage intact."""
    from csi_driver.core.store import INTENT

    class Killed(BaseException):
        pass

    img = rig.image()
    staging = rig.stage(img)
    (pathlib.Path(staging) / NAME).write_bytes(MARKER)
    rig.core.unstage("blk-1", staging)
    block = rig.core.block

    def killed(*args: object) -> None:
        raise Killed

    block._mount_staging = killed  # type: ignore[method-assign]
    block._teardown = lambda pub: None  # type: ignore[method-assign]  # no cleanup runs
    with pytest.raises(Killed):
        rig.stage(img, source="encrypted")
    rec = block.store.get(staging)
    assert rec is not None and rec.phase == INTENT
    mnt = block.daemon_dir(staging)
    loop = block._loop_of(mnt)
    assert loop is not None and os.path.ismount(mnt)
    assert _processes_naming(mnt)  # the daemon serves it
    rig.restart()
    assert rig.core.block.store.get(staging) is None
    assert rig.core.block._loop_of(mnt) is None and not os.path.ismount(mnt)
    assert not pathlib.Path(f"/sys/block/{loop.removeprefix('/dev/')}/loop").exists()
    from fuse_crypt.daemon import wait_until

    assert wait_until(lambda: not _processes_naming(mnt), 10)
    staging = rig.stage(img, source="encrypted")
    assert (pathlib.Path(staging) / NAME).read_bytes() == MARKER


def _processes_naming(path: str) -> list[int]:
    """Live processes whose command line names ``path`` (a daemon serving it)."""
    found = []
    for d in pathlib.Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if path.encode() in (d / "cmdline").read_bytes().split(b"\0"):
                found.append(int(d.name))
    return found
