"""Real daemons, real HTTP: I/O through a volume shows on the node plugin's /metrics with the
volume's labels, for daemons forked from the zygote and exec'd (``--mounter fuse-crypt``),
block daemons and object-store daemons (S3 on moto, OSS on the signature-checking peer);
a stopped daemon is skipped within the budget, a restarted one is found again; no key,
passphrase or credential in the body."""

from __future__ import annotations

import os
import pathlib
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import pytest
from prometheus_client.parser import text_string_to_metric_families

from csi_driver.core.controller import LocalBackend
from csi_driver.core.node import NodeCore, PublishRequest
from csi_driver.core.volcap import AccessType, Capability
from csi_driver.keys import derive_volume_password
from csi_driver.proc import loopback_listen_port
from csi_driver.volumes.block import StageRequest
from fuse_crypt.configfile import ConfFile
from fuse_crypt.daemon import wait_until
from tests.fuse_crypt.block_rig import block_skip_reason

from .conftest import KEY_RESOURCE, PASSPHRASE, Keys, cleanup_mounts, make_node
from .helpers import plain_capability
from .test_object_volumes import (
    OSS_AK,
    OSS_BUCKET,
    OSS_SK,
    RESOURCES,
    S3_AK,
    S3_SK,
    Node,
    object_node,
    publish,
    unpublish,
    volume,
)

SIZE = 256 * 1024
FAIL = "coco_csi_volume_metrics_failures_total"


@dataclass
class World:
    tmp: pathlib.Path
    core: NodeCore
    backend: LocalBackend
    keys: Keys
    port: int
    mounter: str

    def publish(self, name: str) -> tuple[str, str]:
        rec, ctx = self.backend.create(name, [plain_capability()], {"keyResource": KEY_RESOURCE})
        parent = self.tmp / "pods" / name
        parent.mkdir(parents=True)
        target = str(parent / "mount")
        self.core.publish(PublishRequest(rec.volume_id, target, plain_capability(), False, {}, ctx))
        return rec.volume_id, target

    def body(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()

    def scrape_while_stopped(self, pid: int) -> dict[tuple[str, str, str], float]:
        """A scrape while daemon ``pid`` is stopped (alive, port open, never answering): it
        ends within the daemon's timeout plus slack and counts that one daemon failed."""
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            got = self.scrape()
            assert time.monotonic() - t0 < 1.0 + 1.0
        finally:
            os.kill(pid, signal.SIGCONT)
        assert got[(f"{FAIL}{{reason=timeout}}", "", "")] == 1
        assert got[("coco_csi_volume_metrics_daemons{result=failed}", "", "")] == 1
        return got

    def scrape(self) -> dict[tuple[str, str, str], float]:
        """{(sample name, volume_id, target_path): value} of the daemons' summed-free series,
        plus the plugin's own under ("name{labels}", "", "")."""
        out: dict[tuple[str, str, str], float] = {}
        for fam in text_string_to_metric_families(self.body()):
            for s in fam.samples:
                if "volume_id" in s.labels:
                    if len(s.labels) == 2:
                        out[(s.name, s.labels["volume_id"], s.labels["target_path"])] = s.value
                else:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                    out[(f"{s.name}{{{labels}}}" if labels else s.name, "", "")] = s.value
        return out


def _plugin(tmp: pathlib.Path, keys: Keys, mounter: str) -> tuple[NodeCore, int]:
    """A node plugin (directory volumes by ``mounter``) with volume metrics on, serving
    /metrics on a loopback port; on a state dir already in use it adopts what a previous
    instance left running."""
    core = make_node(
        tmp,
        keys,
        mounter,
        daemon_metrics=True,
        block_image_roots=[str(tmp / "images")],
    )
    core.metrics.add_volume_daemons(core.supervisor.metric_endpoints, timeout=0.5, budget=1.0)
    _, port = core.metrics.serve("127.0.0.1:0")
    return core, port


@pytest.fixture
def world(request: pytest.FixtureRequest, tmp_path: pathlib.Path, keys: Keys) -> Iterator[World]:
    """The plugin; its directory mounter is the test's indirect parameter (default: the
    node's default, daemons forked from the zygote)."""
    mounter = getattr(request, "param", "fuse-crypt-prefork")
    (tmp_path / "images").mkdir()
    core, port = _plugin(tmp_path, keys, mounter)
    w = World(tmp_path, core, LocalBackend(str(tmp_path / "backend")), keys, port, mounter)
    try:
        yield w
    finally:
        for handle in w.core.supervisor.handles():  # a test that stopped one must not hang
            os.kill(handle.pid, signal.SIGCONT)
        w.core.metrics.close()
        w.core.shutdown(unmount=True)
        cleanup_mounts(str(tmp_path))


def _read_uncached(path: pathlib.Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return f.read()


@pytest.mark.parametrize("world", ["fuse-crypt-prefork", "fuse-crypt"], indirect=True)
def test_reads_and_writes_show_per_volume_on_the_plugin(world: World) -> None:
    v1, t1 = world.publish("pvc-read")
    v2, t2 = world.publish("pvc-write")
    if world.mounter == "fuse-crypt":  # an exec'd `fuse-crypt mount`, told on its argv
        for target in (t1, t2):
            handle, pub = world.core.supervisor.get(target), world.core.store.get(target)
            assert handle is not None and pub is not None
            argv = pathlib.Path(f"/proc/{handle.pid}/cmdline").read_bytes().split(b"\0")[:-1]
            assert os.path.basename(argv[1]) == b"fuse-crypt" and argv[2] == b"mount"
            tail = [b"--metrics-addr", b"127.0.0.1:0", pub.cipher_dir.encode(), target.encode()]
            assert argv[-4:] == tail
    data = os.urandom(SIZE)
    (pathlib.Path(t1) / "f").write_bytes(data)
    before = world.scrape()
    assert _read_uncached(pathlib.Path(t1) / "f") == data
    (pathlib.Path(t2) / "g").write_bytes(data)
    got = world.scrape()

    read = "fuse_crypt_plain_bytes_read_total"
    assert got[(read, v1, t1)] - before.get((read, v1, t1), 0) >= SIZE
    assert got[(read, v2, t2)] < SIZE  # the other volume did not read it
    assert got[("fuse_crypt_plain_bytes_written_total", v2, t2)] >= SIZE
    assert got[("fuse_crypt_uptime_seconds", v1, t1)] > 0
    assert got[("process_resident_memory_bytes", v2, t2)] > 0
    assert got[("coco_csi_volume_metrics_daemons{result=ok}", "", "")] == 2
    assert got[("coco_csi_mounted_volumes", "", "")] == 2

    # Nothing secret: the root key, the derived volume password, the volume's master key.
    body = world.body()
    password = derive_volume_password(world.keys.root_key, v1)
    conf = ConfFile.read(os.path.join(world.tmp / "backend", v1, "gocryptfs.conf"))
    master = conf.unlock(password)
    for secret in (world.keys.root_key, password, master, PASSPHRASE):
        for form in (secret.hex(), secret.hex().upper(), secret.decode("latin-1")):
            assert form not in body, "a key or passphrase is on /metrics"


def test_a_stopped_daemon_is_skipped_and_a_restarted_one_found_again(world: World) -> None:
    v1, t1 = world.publish("pvc-a")
    v2, t2 = world.publish("pvc-b")
    h1, h2 = world.core.supervisor.get(t1), world.core.supervisor.get(t2)
    assert h1 is not None and h2 is not None
    uptime = "fuse_crypt_uptime_seconds"

    got = world.scrape_while_stopped(h2.pid)
    assert (uptime, v1, t1) in got and (uptime, v2, t2) not in got

    old_pid = h1.pid
    os.kill(old_pid, signal.SIGKILL)  # the supervisor restarts it (it holds the key)
    assert wait_until(lambda: h1.pid != old_pid and world.core.mounts.find(t1), timeout=20)
    got = world.scrape()
    assert got[(uptime, v1, t1)] < got[(uptime, v2, t2)]  # the new daemon's series
    # The port was looked up again for the new pid (it may be the old number by chance).
    assert h1.metrics_port[0] == h1.pid
    assert got[("coco_csi_volume_metrics_daemons{result=ok}", "", "")] == 2


def test_a_block_volume_shows_by_its_staging_path_also_after_a_restart(world: World) -> None:
    """A block daemon mounts a private directory under <state-dir>/block/: its series carry
    the staging path kubelet gave NodeStageVolume instead, and still do once a restarted
    plugin has adopted the daemon. A stopped one is skipped within the budget. (A killed
    block daemon is not restarted, as its loop device still holds the dead daemon's file:
    unstage and stage again is the way back, so there is no restart to show here.)"""
    reason = block_skip_reason()
    if reason:
        pytest.skip(reason)
    img = world.tmp / "images" / "disk.img"
    with img.open("wb") as f:
        f.truncate(64 << 20)
    staging = world.tmp / "plugins" / "blk" / "globalmount"
    staging.parent.mkdir(parents=True)
    context = {"devicePath": str(img), "sourceType": "empty", "keyResource": KEY_RESOURCE}
    rw = Capability(AccessType.MOUNT, 1)
    world.core.stage(StageRequest("blk-1", str(staging), rw, {}, context, {}))
    try:
        (staging / "f").write_bytes(os.urandom(SIZE))
        os.sync()
        got = world.scrape()
        assert {t for (_, v, t) in got if v == "blk-1"} == {str(staging)}
        reads = got[("fuse_crypt_block_plain_bytes_read_total", "blk-1", str(staging))]
        assert reads > 0  # mkfs and the mount read the disk through the daemon
        assert got[("fuse_crypt_block_plain_bytes_written_total", "blk-1", str(staging))] >= SIZE
        key = derive_volume_password(world.keys.root_key, "blk-1")
        assert key.hex() not in world.body()

        # A stopped block daemon (its port open, never answering) is skipped within the
        # budget like any other, and found again once it runs.
        (handle,) = [h for h in world.core.supervisor.handles() if h.volume_id == "blk-1"]
        stopped = world.scrape_while_stopped(handle.pid)
        assert not [k for k in stopped if k[1] == "blk-1"]
        got = world.scrape()
        assert got[("fuse_crypt_block_plain_bytes_written_total", "blk-1", str(staging))] >= SIZE

        world.core.metrics.close()
        world.core.shutdown()  # the plugin stops; the staged volume and its daemon stay
        world.core, world.port = _plugin(world.tmp, world.keys, world.mounter)
        got = world.scrape()
        assert {t for (_, v, t) in got if v == "blk-1"} == {str(staging)}
        assert got[("fuse_crypt_block_plain_bytes_written_total", "blk-1", str(staging))] >= SIZE
    finally:
        world.core.unstage("blk-1", str(staging))


# -- an object-store volume: a real ``coco-csi node --metrics-addr`` over an S3 bucket --------


@pytest.fixture(scope="module")
def object_plugin() -> Iterator[tuple[Node, int]]:
    """The object-store tests' plugin process with ``--metrics-addr 127.0.0.1:0`` (volume
    metrics on by default), and the port it bound, found as the plugin finds its daemons'."""
    with object_node("--metrics-addr", "127.0.0.1:0") as n:
        pid = n.procs[-1].pid
        assert wait_until(lambda: loopback_listen_port(pid) is not None, timeout=10)
        port = loopback_listen_port(pid)
        assert port is not None
        yield n, port


Families = dict[str, list[tuple[dict[str, str], float]]]


def _families(port: int) -> tuple[str, Families]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body = r.read().decode()
    out: Families = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return body, out


def _of(got: Families, name: str, vid: str) -> float:
    """The value of ``name`` for volume ``vid``, summed over the daemon's own labels."""
    return sum(v for labels, v in got.get(name, []) if labels.get("volume_id") == vid)


def _write_read_and_scrape(port: int, target: str, vid: str) -> tuple[str, Families, Families]:
    """Write and read back SIZE bytes through ``target``; the plugin's /metrics body and
    families after, and the families before. Checks the volume's labels and plaintext
    counters, which every volume kind shares."""
    data = os.urandom(SIZE)
    _, before = _families(port)
    (pathlib.Path(target) / "f").write_bytes(data)
    assert _read_uncached(pathlib.Path(target) / "f") == data
    body, got = _families(port)
    ours = [labels for labels, _ in got["fuse_crypt_uptime_seconds"]]
    assert {"volume_id": vid, "target_path": target} in ours
    assert _of(got, "fuse_crypt_plain_bytes_written_total", vid) >= SIZE
    assert _of(got, "fuse_crypt_plain_bytes_read_total", vid) >= SIZE
    return body, got, before


def _bucket_traffic(
    got: Families, before: Families, vid: str, cipherdir: str
) -> list[dict[str, str]]:
    """What went to the bucket (the object store's own traffic) rose, and the daemon says
    which bucket prefix it serves; returns the volume's mount-info labels."""
    sent = "fuse_crypt_cipher_bytes_written_total"
    assert _of(got, sent, vid) - _of(before, sent, vid) >= SIZE
    ops = "fuse_crypt_backend_ops_total"
    assert _of(got, ops, vid) > _of(before, ops, vid)
    info = [labels for labels, _ in got["fuse_crypt_mount_info"] if labels["volume_id"] == vid]
    assert [i["cipherdir"] for i in info] == [cipherdir]
    return info


def test_an_object_store_volume_shows_on_the_plugin_without_its_credentials(
    object_plugin: tuple[Node, int],
) -> None:
    node, port = object_plugin
    vid = "pvc-s3-metrics"
    ctx, secrets = volume(node, "s3", f"vols/{vid}")
    secrets["sessionToken"] = node.seal("sts-token")  # moto (no auth) accepts any token
    target = node.target("s3-metrics")
    publish(node, vid, target, ctx, secrets)
    try:
        body, got, before = _write_read_and_scrape(port, target, vid)
        _bucket_traffic(got, before, vid, f"s3://{ctx['bucket']}/vols/{vid}")
        assert ({"result": "ok"}, 1.0) in got["coco_csi_volume_metrics_daemons"]
        stored = node.moto.objects(ctx["bucket"], f"vols/{vid}/")
        assert sum(len(o["body"]) for o in stored.values()) >= SIZE  # it did reach moto

        plain = [S3_AK, S3_SK, RESOURCES["default/objcreds/sts-token"].decode()]
        plain += [secrets["accessKeyId"], secrets["secretAccessKey"], secrets["sessionToken"]]
        _assert_no_secrets(body, node, vid, stored[f"vols/{vid}/gocryptfs.conf"]["body"], plain)
    finally:
        unpublish(node, vid, target)


def test_an_oss_volume_shows_on_the_plugin_without_its_credentials(
    object_plugin: tuple[Node, int],
) -> None:
    """The same through the OSS peer, which checks every request's signature: STS
    credentials (key id, secret, security token, all sealed) sign the daemon's traffic."""
    node, port = object_plugin
    vid = "pvc-oss-metrics"
    ctx, _ = volume(node, "oss", f"vols/{vid}")
    secrets = {
        "akId": node.seal("sts-ak"),
        "akSecret": node.seal("sts-sk"),
        "securityToken": node.seal("sts-token"),
    }
    target = node.target("oss-metrics")
    publish(node, vid, target, ctx, secrets)
    try:
        body, got, before = _write_read_and_scrape(port, target, vid)
        info = _bucket_traffic(got, before, vid, f"oss://{OSS_BUCKET}/vols/{vid}")
        assert [i["target_path"] for i in info] == [target]
        stored = node.oss.objects(OSS_BUCKET)
        mine = [o for k, o in stored.items() if k.startswith(f"vols/{vid}/")]
        assert sum(len(o.data) for o in mine) >= SIZE  # it did reach the peer

        plain = [OSS_AK, OSS_SK, *secrets.values()]  # and the sealed refs the plugin got
        plain += [RESOURCES[f"default/objcreds/{n}"].decode() for n in ("sts-ak", "sts-sk")]
        plain.append(RESOURCES["default/objcreds/sts-token"].decode())
        _assert_no_secrets(body, node, vid, stored[f"vols/{vid}/gocryptfs.conf"].data, plain)
    finally:
        unpublish(node, vid, target)


def _assert_no_secrets(body: str, node: Node, vid: str, conf: bytes, plain: list[str]) -> None:
    """No credential (``plain``), sealed reference, key or password on the page, in any
    spelling: the root key, the volume's derived password and the master key its
    gocryptfs.conf (``conf``, as stored in the bucket) wraps."""
    assert plain and all(plain)
    for secret in plain:
        assert secret not in body and quote(secret) not in body, "a credential on /metrics"
    password = derive_volume_password(node.root_key, vid)
    master = ConfFile.loads(conf).unlock(password)
    for raw in (node.root_key, password, master):
        for form in (raw.hex(), raw.hex().upper(), raw.decode("latin-1")):
            assert form not in body, "key material on /metrics"
