"""``csi_driver/volumemetrics.py`` at its edges: what mutation testing found untested.

The plugin's own three families exactly as Prometheus reads them (names, help, the scrape
time), the scrape budget spent before a daemon's turn (that daemon is never asked), a body
of exactly ``max_bytes``, a family that two daemon versions type differently (the rest of
the second daemon's families still pass), the pool's thread names, and ``close`` during a
scrape (returns at once; daemons not yet asked are never asked).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from csi_driver.supervisor import DaemonEndpoint
from csi_driver.volumemetrics import FetchError, VolumeMetricsCollector
from tests.csi_driver.test_volume_metrics import EP1, EP2, FakeDaemons, daemon_body

EP3 = DaemonEndpoint("vol-3", "/k/pods/c/mount", 1003)


@pytest.fixture
def daemons() -> Iterator[FakeDaemons]:
    fake = FakeDaemons()
    yield fake
    fake.release.set()


def _exposition(collector: VolumeMetricsCollector) -> str:
    reg = CollectorRegistry()
    reg.register(collector)  # type: ignore[arg-type]
    return generate_latest(reg).decode()


def test_the_plugins_own_families_exactly(daemons: FakeDaemons) -> None:
    daemons.answers = {1001: daemon_body(5), 1002: FetchError("malformed")}

    def slow(port: int, timeout: float, max_bytes: int) -> bytes:
        time.sleep(0.05)
        return daemons(port, timeout, max_bytes)

    c = VolumeMetricsCollector(lambda: [EP1, EP2], slow)
    try:
        text = _exposition(c)
    finally:
        c.close()
    lines = text.splitlines()
    for line in (
        "# HELP coco_csi_volume_metrics_failures_total Volume daemons left out of a node "
        "plugin scrape, by reason",
        "# TYPE coco_csi_volume_metrics_failures_total counter",
        'coco_csi_volume_metrics_failures_total{reason="malformed"} 1.0',
        'coco_csi_volume_metrics_failures_total{reason="timeout"} 0.0',
        "# HELP coco_csi_volume_metrics_daemons Volume daemons serving metrics at this scrape, "
        "by whether their series are in it",
        "# TYPE coco_csi_volume_metrics_daemons gauge",
        'coco_csi_volume_metrics_daemons{result="ok"} 1.0',
        'coco_csi_volume_metrics_daemons{result="failed"} 1.0',
        "# HELP coco_csi_volume_metrics_scrape_seconds Time this scrape spent fetching the "
        "volume daemons' metrics",
        "# TYPE coco_csi_volume_metrics_scrape_seconds gauge",
    ):
        assert line in lines, line
    (value,) = [
        float(x.split()[1])
        for x in lines
        if x.startswith("coco_csi_volume_metrics_scrape_seconds ")
    ]
    assert 0.05 <= value < 2.0  # at least the one slow fetch, and not a clock reading


def test_a_daemon_whose_turn_comes_after_the_budget_is_never_asked(
    daemons: FakeDaemons,
) -> None:
    daemons.answers = {1001: daemon_body(1)}
    c = VolumeMetricsCollector(list, daemons)
    try:
        with pytest.raises(TimeoutError) as exc:
            c._one(EP1, time.monotonic() - 0.001)
        assert str(exc.value) == "the scrape budget is spent"
        assert daemons.calls == []
        # with budget left, the fetch gets the smaller of its timeout and what is left
        c._one(EP1, time.monotonic() + 0.25)
        ((port, timeout, max_bytes),) = daemons.calls
        assert (port, max_bytes) == (1001, c.max_bytes) and 0.1 < timeout <= 0.25
    finally:
        c.close()


def test_a_body_of_exactly_max_bytes_passes(daemons: FakeDaemons) -> None:
    body = daemon_body(3)
    daemons.answers = {1001: body}
    c = VolumeMetricsCollector(list, daemons, max_bytes=len(body))
    try:
        assert [f.name for f in c._one(EP1, time.monotonic() + 1)]
        c.max_bytes = len(body) - 1
        with pytest.raises(FetchError) as exc:
            c._one(EP1, time.monotonic() + 1)
        assert exc.value.reason == "too_large" and str(exc.value) == "too_large"
    finally:
        c.close()


def test_a_family_typed_differently_is_skipped_but_the_rest_passes(daemons: FakeDaemons) -> None:
    first = b"# TYPE fuse_crypt_a counter\nfuse_crypt_a_total 1\n"
    second = (
        b"# TYPE fuse_crypt_a gauge\nfuse_crypt_a 7\n# TYPE fuse_crypt_b gauge\nfuse_crypt_b 2\n"
    )
    daemons.answers = {1001: first, 1002: second}
    c = VolumeMetricsCollector(lambda: [EP1, EP2], daemons, workers=1)
    try:
        lines = _exposition(c).splitlines()
    finally:
        c.close()
    a = [x for x in lines if x.startswith("fuse_crypt_a")]
    assert a == ['fuse_crypt_a_total{target_path="/k/pods/a/mount",volume_id="vol-1"} 1.0']
    assert 'fuse_crypt_b{target_path="/k/pods/b/mount",volume_id="vol-2"} 2.0' in lines


def test_fetches_run_on_named_pool_threads(daemons: FakeDaemons) -> None:
    names: list[str] = []

    def fetch(port: int, timeout: float, max_bytes: int) -> bytes:
        names.append(threading.current_thread().name)
        return daemon_body(1)

    c = VolumeMetricsCollector(lambda: [EP1], fetch)
    try:
        list(c.collect())
    finally:
        c.close()
    assert len(names) == 1 and names[0].startswith("volume-metrics_"), names


def test_close_during_a_scrape_returns_at_once_and_asks_no_one_else(
    daemons: FakeDaemons,
) -> None:
    """One worker, three daemons, the first hangs: ``close`` neither waits for it nor lets
    the queued two be asked once it is released."""
    daemons.answers = {1001: "hang", 1002: daemon_body(1), 1003: daemon_body(1)}
    c = VolumeMetricsCollector(lambda: [EP1, EP2, EP3], daemons, workers=1, budget=3.0)
    raised: list[BaseException] = []

    def collect() -> None:
        try:
            list(c.collect())
        except BaseException as exc:  # the scrape must end quietly, not raise
            raised.append(exc)

    scrape = threading.Thread(target=collect, daemon=True)
    scrape.start()
    for _ in range(200):
        if daemons.calls:
            break
        time.sleep(0.01)
    assert [p for p, _, _ in daemons.calls] == [1001]
    t = time.monotonic()
    c.close()
    assert time.monotonic() - t < 0.5
    daemons.release.set()
    scrape.join(10)
    assert not scrape.is_alive() and raised == []
    time.sleep(0.1)
    assert [p for p, _, _ in daemons.calls] == [1001]
    # a scrape that starts after close asks no one and still answers with the plugin's own
    got = {m.name: m for m in c.collect()}
    failed = [
        s for s in got["coco_csi_volume_metrics_daemons"].samples if s.labels["result"] == "failed"
    ]
    assert [s.value for s in failed] == [3]
    assert [p for p, _, _ in daemons.calls] == [1001]
