"""/metrics: bound where told, bounded connections and time (issue 7, finding 12)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request

from csi_driver.metrics import Metrics


def _open_idle(port: int, n: int) -> list[socket.socket]:
    """``n`` connections that never send a byte (each connect waits for the accept queue)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(2.0)
        with contextlib.suppress(OSError):
            s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


def test_idle_connections_do_not_pin_threads() -> None:
    """1,500 idle connections used to pin 1,500 plugin threads."""
    m = Metrics()
    before = threading.active_count()
    host, port = m.serve("127.0.0.1:0")
    socks = _open_idle(port, 1500)
    try:
        time.sleep(1.0)
        grew = threading.active_count() - before
        assert grew <= 16 + 4, grew
    finally:
        for s in socks:
            s.close()
        close = getattr(m, "close", None)
        if close:
            close()


def test_idle_connections_are_cut_and_scrapes_work_again() -> None:
    m = Metrics()
    m.mounted.set(3)
    host, port = m.serve("127.0.0.1:0", max_connections=4, timeout=1.0)
    socks = _open_idle(port, 50)
    try:
        time.sleep(2.5)  # every idle connection has had its second
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b"coco_csi_mounted_volumes 3.0" in body
        # A client that drips a byte at a time is cut off after its total time too.
        drip = socket.create_connection(("127.0.0.1", port))
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 5:
                drip.send(b"G")
                time.sleep(0.3)
            raise AssertionError("dripping connection was never closed")
        except OSError:
            pass
        finally:
            drip.close()
        assert time.monotonic() - t0 < 4
    finally:
        for s in socks:
            s.close()
        m.close()


def test_empty_host_binds_loopback_only() -> None:
    m = Metrics()
    host, _port = m.serve(":0")
    try:
        assert host == "127.0.0.1"
    finally:
        m.close()
