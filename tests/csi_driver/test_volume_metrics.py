"""The volume daemons' series on the node plugin's /metrics: the collector with fake daemons
at its fetch seam, the loopback fetch against real sockets, the flag and the argv. The
same through real daemons is test_volume_metrics_e2e.py."""

from __future__ import annotations

import argparse
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from csi_driver import loopscrape
from csi_driver.cli import _volume_metrics
from csi_driver.metrics import Metrics
from csi_driver.mounter import FuseCryptMounter, GocryptfsMounter
from csi_driver.supervisor import DaemonEndpoint
from csi_driver.volumemetrics import FetchError, VolumeMetricsCollector
from fuse_crypt import metricsserver
from tests.csi_driver.loopback_server import answering


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


def test_only_fuse_crypt_daemons_are_asked_for_metrics() -> None:
    argv = FuseCryptMounter.mount_args("/c", "/t", readonly=True, allow_other=False, capacity=0)
    assert FuseCryptMounter().with_metrics(argv, "127.0.0.1:0")[-4:] == [
        "--metrics-addr",
        "127.0.0.1:0",
        "/c",
        "/t",
    ]
    gargv = ["gocryptfs", "-fg", "--", "/c", "/t"]
    assert GocryptfsMounter().with_metrics(gargv, "127.0.0.1:0") == gargv
