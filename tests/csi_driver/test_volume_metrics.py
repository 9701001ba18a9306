"""The volume daemons' series on the node plugin's /metrics: the collector with fake daemons
at its fetch seam, the loopback fetch against real sockets, the flag and the argv. The
same through real daemons is test_volume_metrics_e2e.py."""

from __future__ import annotations

import argparse
import pathlib
import socket
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from csi_driver import loopscrape
from csi_driver import supervisor as supervisor_mod
from csi_driver.cli import _volume_metrics
from csi_driver.core.store import Publication, PublicationStore
from csi_driver.keys import VolumeKey
from csi_driver.metrics import Metrics
from csi_driver.mounter import FuseCryptMounter, FuseCryptPreforkMounter, GocryptfsMounter
from csi_driver.supervisor import DAEMON_METRICS_ADDR, DaemonEndpoint, MountSupervisor
from csi_driver.volumemetrics import FetchError, VolumeMetricsCollector
from csi_driver.volumes.block import BlockServeMounter
from csi_driver.volumes.block_luks import Unlocked
from csi_driver.volumes.objectmount import ObjectStoreMounter
from fuse_crypt import metricsserver
from tests.csi_driver.fakes import FakeMounter, FakeMountTable
from tests.csi_driver.loopback_server import answering
from tests.csi_driver.test_objectmount import resolve
from tests.csi_driver.test_objectstore_params import CDH_SPEC


def daemon_body(read: float, *, errors: float = 0.0) -> bytes:
    """What a mount daemon serves (the shape of fuse_crypt/cli/metrics.py's registry)."""
    reg = CollectorRegistry()
    Counter("fuse_crypt_plain_bytes_read", "Plaintext bytes decrypted", registry=reg).inc(read)
    ops = Counter("fuse_crypt_backend_errors", "errs", ["op"], registry=reg)
    ops.labels("pread").inc(errors)
    Gauge("process_resident_memory_bytes", "RSS", registry=reg).set(1e7)
    Gauge("python_gc_objects", "GC noise", registry=reg).set(5)
    return generate_latest(reg)


def scrape(metrics: Metrics) -> dict[str, float]:
    """The plugin registry as {name{sorted labels}: value}, and it must be valid text."""
    out: dict[str, float] = {}
    text = generate_latest(metrics.registry).decode()
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names)), "a family appears twice in one exposition"
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


EP1 = DaemonEndpoint("vol-1", "/k/pods/a/mount", 1001)
EP2 = DaemonEndpoint("vol-2", "/k/pods/b/mount", 1002)
L1 = 'target_path="/k/pods/a/mount",volume_id="vol-1"'
L2 = 'target_path="/k/pods/b/mount",volume_id="vol-2"'
FAIL = "coco_csi_volume_metrics_failures_total"


class FakeDaemons:
    """The fetch seam: port -> body, or an exception, or a hang until released."""

    def __init__(self) -> None:
        self.answers: dict[int, object] = {}
        self.release = threading.Event()
        self.calls: list[tuple[int, float, int]] = []

    def __call__(self, port: int, timeout: float, max_bytes: int) -> bytes:
        self.calls.append((port, timeout, max_bytes))
        answer = self.answers[port]
        if answer == "hang":
            self.release.wait(30)
            raise TimeoutError
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, bytes)
        return answer


@pytest.fixture
def daemons() -> Iterator[FakeDaemons]:
    fake = FakeDaemons()
    yield fake
    fake.release.set()


def _plugin(
    eps: list[DaemonEndpoint], fake: FakeDaemons, **limits: float
) -> tuple[Metrics, VolumeMetricsCollector]:
    m = Metrics()
    m.mounted.set(2)
    return m, m.add_volume_daemons(lambda: list(eps), fake, **limits)


def test_each_daemons_series_carry_its_volume(daemons: FakeDaemons) -> None:
    daemons.answers = {1001: daemon_body(4096), 1002: daemon_body(8192, errors=3)}
    m, _ = _plugin([EP1, EP2], daemons)
    got = scrape(m)
    assert got[f"fuse_crypt_plain_bytes_read_total{{{L1}}}"] == 4096
    assert got[f"fuse_crypt_plain_bytes_read_total{{{L2}}}"] == 8192
    assert got[f'fuse_crypt_backend_errors_total{{op="pread",{L2}}}'] == 3
    assert got[f"process_resident_memory_bytes{{{L1}}}"] == 1e7
    assert not [k for k in got if k.startswith("python_")], "GC noise passed"
    assert not [k for k in got if "_created" in k and "vol-" in k]
    assert got["coco_csi_mounted_volumes"] == 2  # the plugin's own are still there
    assert got['coco_csi_volume_metrics_daemons{result="ok"}'] == 2
    assert got['coco_csi_volume_metrics_daemons{result="failed"}'] == 0
    assert got[f'{FAIL}{{reason="timeout"}}'] == 0
    daemon_series = [k for k in got if k.startswith(("fuse_crypt_", "process_"))]
    assert all("volume_id=" in k and "target_path=" in k for k in daemon_series)


def test_a_volume_label_from_the_daemon_is_overridden_not_duplicated(
    daemons: FakeDaemons,
) -> None:
    reg = CollectorRegistry()
    Gauge("fuse_crypt_x", "x", ["volume_id"], registry=reg).labels("forged").set(1)
    daemons.answers = {1001: generate_latest(reg)}
    m, _ = _plugin([EP1], daemons)
    assert scrape(m)[f"fuse_crypt_x{{{L1}}}"] == 1


def test_a_hung_daemon_costs_at_most_the_timeout_and_is_counted(daemons: FakeDaemons) -> None:
    daemons.answers = {1001: "hang", 1002: daemon_body(1)}
    m, collector = _plugin([EP1, EP2], daemons, timeout=0.3, budget=0.6)
    t0 = time.monotonic()
    got = scrape(m)
    took = time.monotonic() - t0
    assert took < 0.6 + 0.5 + 0.3, took
    assert got[f"fuse_crypt_plain_bytes_read_total{{{L2}}}"] == 1
    assert not [k for k in got if "vol-1" in k]
    assert got[f'{FAIL}{{reason="timeout"}}'] == 1
    assert got['coco_csi_volume_metrics_daemons{result="failed"}'] == 1
    assert all(t <= 0.3 for _, t, _ in daemons.calls)
    collector.close()


def test_the_budget_bounds_a_scrape_of_many_slow_daemons(daemons: FakeDaemons) -> None:
    eps = [DaemonEndpoint(f"v{i}", f"/t/{i}", 2000 + i) for i in range(12)]

    def slow(port: int, timeout: float, max_bytes: int) -> bytes:
        time.sleep(min(timeout, 0.2))
        return daemon_body(port)

    m = Metrics()
    m.add_volume_daemons(lambda: eps, slow, timeout=1.0, budget=0.5, workers=2)
    t0 = time.monotonic()
    got = scrape(m)
    assert time.monotonic() - t0 < 0.5 + 0.5 + 0.3
    ok = got['coco_csi_volume_metrics_daemons{result="ok"}']
    assert 2 <= ok < 12
    assert got[f'{FAIL}{{reason="timeout"}}'] == 12 - ok


def test_failures_are_counted_by_reason_and_never_break_the_scrape(
    daemons: FakeDaemons,
) -> None:
    eps = [DaemonEndpoint(f"v{i}", f"/t/{i}", 3000 + i) for i in range(5)]
    daemons.answers = {
        3000: ConnectionRefusedError(),
        3001: FetchError("too_large"),
        3002: b"this { is not ( exposition",
        3003: b"\xff\xfe",
        3004: daemon_body(7),
    }
    m, _ = _plugin(eps, daemons, max_bytes=4096)
    for n in (1, 2):
        got = scrape(m)
        assert got[f'{FAIL}{{reason="unreachable"}}'] == n
        assert got[f'{FAIL}{{reason="too_large"}}'] == n
        assert got[f'{FAIL}{{reason="malformed"}}'] == 2 * n
        assert got['fuse_crypt_plain_bytes_read_total{target_path="/t/4",volume_id="v4"}'] == 7
    assert {c[2] for c in daemons.calls} == {4096}


def test_an_oversized_body_is_refused_even_if_the_fetch_did_not_cut_it(
    daemons: FakeDaemons,
) -> None:
    daemons.answers = {1001: daemon_body(1) + b"# " + b"x" * 5000 + b"\n"}
    m, _ = _plugin([EP1], daemons, max_bytes=4096)
    got = scrape(m)
    assert got[f'{FAIL}{{reason="too_large"}}'] == 1
    assert not [k for k in got if "vol-1" in k]


def test_no_daemons_no_series() -> None:
    m = Metrics()
    m.add_volume_daemons(list, lambda *a: b"")
    got = scrape(m)
    assert not [k for k in got if k.startswith("fuse_crypt_")]
    assert got['coco_csi_volume_metrics_daemons{result="ok"}'] == 0


# -- the loopback fetch against real sockets ------------------------------------------------


def test_fetch_reads_a_real_metricsanswering() -> None:
    reg = CollectorRegistry()
    Counter("fuse_crypt_y", "y", registry=reg).inc(2)
    server = metricsserver.serve("127.0.0.1:0", reg)
    try:
        body = loopscrape.fetch(server.server_address[1], 2.0, 1 << 20)
        assert b"fuse_crypt_y_total 2.0" in body and not body.startswith(b"HTTP")
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_refusals() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        loopscrape.fetch(free, 1.0, 1000)
    for answer in (b"HTTP/1.0 404 Not Found\r\n\r\nno", b"garbage without a head"):
        gen = answering(answer)
        port = next(gen)
        with pytest.raises(FetchError) as exc:
            loopscrape.fetch(port, 1.0, 1000)
        assert exc.value.reason == "bad_response"
        gen.close()
    gen = answering(b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 100_000)
    port = next(gen)
    with pytest.raises(FetchError) as exc:
        loopscrape.fetch(port, 2.0, 1000)
    assert exc.value.reason == "too_large"
    gen.close()


def test_a_dripping_daemon_is_cut_at_the_total_timeout() -> None:
    """One byte every 50 ms never trips a per-read timeout; the deadline still holds."""
    gen = answering(b"HTTP/1.0 200 OK\r\n\r\n" + b"y" * 1000, drip=True)
    port = next(gen)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        loopscrape.fetch(port, 0.5, 1 << 20)
    assert time.monotonic() - t0 < 0.9
    gen.close()


# -- the option and the daemon's command line ---------------------------------------------


def test_volume_metrics_follow_metrics_addr_unless_told() -> None:
    def ns(addr: str, flag: bool | None) -> argparse.Namespace:
        return argparse.Namespace(metrics_addr=addr, volume_metrics=flag)

    assert _volume_metrics(ns(":9810", None)) is True
    assert _volume_metrics(ns("", None)) is False
    assert _volume_metrics(ns(":9810", False)) is False
    with pytest.raises(ValueError, match="needs --metrics-addr"):
        _volume_metrics(ns("", True))


ADDR = "127.0.0.1:0"


def test_each_metrics_serving_builder_places_the_option_itself() -> None:
    """Every fuse-crypt command line (exec'd, zygote, block, object store) has
    ``--metrics-addr`` exactly where its own builder puts it when asked, and not otherwise;
    gocryptfs cannot serve metrics and its argv does not change."""
    fc = FuseCryptMounter(binary=sys.executable)
    argv = fc.command(
        "/c", "/t", readonly=True, allow_other=False, capacity=4096, metrics_addr=ADDR
    )
    assert argv == [sys.executable, "mount", "--foreground", "--masterkey", "stdin", "--ro"] + [
        "--capacity", "4096", "--metrics-addr", ADDR, "/c", "/t"
    ]  # fmt: skip
    plain = fc.command("/c", "/t", readonly=True, allow_other=False, capacity=4096)
    assert plain == [a for a in argv if a not in ("--metrics-addr", ADDR)]
    zygote = FuseCryptPreforkMounter()  # builds the argv only: no zygote starts
    zargv = zygote.command("/c", "/t", readonly=True, allow_other=False, metrics_addr=ADDR)
    assert zargv == argv[1:3] + ["--masterkey", "stdin", "--ro", "--metrics-addr", ADDR, "/c", "/t"]

    block = BlockServeMounter(binary="/bin/fuse-crypt")
    block.plan("/t", Unlocked(b"k" * 64, 4096, None, 512, "aes-xts-plain64"), True)
    bargv = block.command("/dev/c", "/t", readonly=False, allow_other=False, metrics_addr=ADDR)
    assert bargv[-5:] == ["--allow-regular-file", "--metrics-addr", ADDR, "/dev/c", "/t"]
    assert "--metrics-addr" not in block.command("/dev/c", "/t", readonly=False, allow_other=False)

    key = resolve(CDH_SPEC)
    obj = ObjectStoreMounter()
    obj.binary = sys.executable
    loc = "oss://tenant-models/datasets/v1"
    pub = Publication("vol-1", "/k/t", loc, obj.name, False, 1)
    oargv = obj.argv_for(pub, key, allow_other=True, metrics_addr=ADDR)
    assert oargv[-4:] == ["--metrics-addr", ADDR, loc, "/k/t"]
    assert "--metrics-addr" not in obj.argv_for(pub, key, allow_other=True)

    gc = GocryptfsMounter(binary=sys.executable)
    gargv = gc.command("/c", "/t", readonly=False, allow_other=False)
    assert gc.command("/c", "/t", readonly=False, allow_other=False, metrics_addr=ADDR) == gargv


# -- the supervisor: which daemons are asked, and where each is found ----------------------


class _Recording(FakeMounter):
    """The fake mounter, remembering the metrics address each daemon was started with."""

    def __init__(self, table: FakeMountTable) -> None:
        super().__init__(table)
        self.asked: list[str | None] = []

    def command(
        self,
        cipher_dir: str,
        target: str,
        *,
        readonly: bool,
        allow_other: bool,
        capacity: int = 0,
        metrics_addr: str | None = None,
    ) -> list[str]:
        self.asked.append(metrics_addr)
        return super().command(cipher_dir, target, readonly=readonly, allow_other=allow_other)


def _supervisor(
    tmp: pathlib.Path, *, daemon_metrics: bool = True
) -> tuple[MountSupervisor, _Recording, FakeMountTable]:
    table = FakeMountTable()
    mounter = _Recording(table)
    sup = MountSupervisor(
        {mounter.name: mounter},
        str(tmp / "logs"),
        PublicationStore(str(tmp)),
        mounts=table,
        monitor_interval=3600,  # no restarts behind the test's back
        daemon_metrics=daemon_metrics,
    )
    return sup, mounter, table


def _pub(vid: str, target: str) -> Publication:
    return Publication(vid, target, f"/c/{vid}", FakeMounter.name, False, 1)


KEY = VolumeKey(b"unit-volume-key", "kbs-derived", 10)


@pytest.mark.parametrize("on", [True, False])
def test_the_supervisor_asks_for_metrics_only_when_told(tmp_path: pathlib.Path, on: bool) -> None:
    sup, mounter, _ = _supervisor(tmp_path, daemon_metrics=on)
    try:
        sup.start(_pub("vol-1", "/k/pods/a/mount"), KEY)
        assert mounter.asked == [DAEMON_METRICS_ADDR if on else None]
    finally:
        sup.shutdown()


def test_endpoints_show_a_block_daemon_by_its_staging_path(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path on each endpoint is the one kubelet gave (a block volume's staging path, not
    the private directory its daemon mounts), for started and adopted daemons alike; a
    daemon's port is looked up once per pid; stopping, dead and port-less daemons are left
    out."""
    ports: dict[int, int | None] = {}
    lookups: list[int] = []

    def listen_port(pid: int) -> int | None:
        lookups.append(pid)
        return ports.get(pid)

    monkeypatch.setattr(supervisor_mod, "loopback_listen_port", listen_port)
    sup, _, table = _supervisor(tmp_path)
    private, staging = "/state/block/blk-1", "/k/plugins/csi/pv/blk-1/globalmount"
    try:
        h_dir = sup.start(_pub("vol-1", "/k/pods/a/mount"), KEY)
        h_blk = sup.start(_pub("blk-1", private), KEY, kubelet_path=staging)
        ports.update({h_dir.pid: 4001, h_blk.pid: 4002})
        want = {
            DaemonEndpoint("vol-1", "/k/pods/a/mount", 4001),
            DaemonEndpoint("blk-1", staging, 4002),
        }
        assert set(sup.metric_endpoints()) == want
        assert set(sup.metric_endpoints()) == want
        assert sorted(lookups) == sorted([h_dir.pid, h_blk.pid])  # cached per pid

        # A restarted plugin adopts the block daemon; it is still shown by its staging path.
        adopted_pid = table.mount("/state/block/blk-2", "/dev/x")
        ports[adopted_pid] = 4003
        adopted = Publication(
            "blk-2", "/state/block/blk-2", "/dev/x", "fake", False, 1, adopted_pid
        )
        sup.adopt(adopted, kubelet_path=staging + "2")
        assert DaemonEndpoint("blk-2", staging + "2", 4003) in sup.metric_endpoints()

        h_dir.stopping = True  # being unpublished: its port may soon be another's
        table.kill(h_blk.pid)  # gone
        nometrics = sup.start(_pub("vol-3", "/k/pods/c/mount"), KEY)  # no port: not listed
        assert sup.metric_endpoints() == [DaemonEndpoint("blk-2", staging + "2", 4003)]
        assert nometrics.metrics_port == (nometrics.pid, None)
    finally:
        sup.shutdown()
