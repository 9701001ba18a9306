"""``csi_driver/loopscrape.fetch`` byte by byte: what mutation testing found untested.

The fetch is the node plugin's one read of another process's output, so each bound is pinned
at its edge: the exact size and head limits (one byte under passes), a stream that never
ends (cut by size, not by the clock), a silent or unaccepting listener (cut by the clock), a
body in many segments or holding a blank line (returned whole and unchanged), and a status
line that is malformed in each way.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from csi_driver import loopscrape
from csi_driver.volumemetrics import FetchError
from tests.csi_driver.loopback_server import serve as _serve

OK = b"HTTP/1.0 200 OK\r\n"


@pytest.fixture
def answer() -> Iterator[Callable[..., int]]:
    """answer(raw, segments=1): a server sending ``raw`` in that many pieces, then closing."""
    gens: list[Iterator[int]] = []

    def make(raw: bytes, segments: int = 1) -> int:
        def handler(conn: socket.socket, stop: threading.Event) -> None:
            step = -(-len(raw) // segments)
            for i in range(0, len(raw), step):
                conn.sendall(raw[i : i + step])
                if segments > 1:
                    time.sleep(0.002)  # separate segments, separate recv calls

        gen = _serve(handler)
        gens.append(gen)
        return next(gen)

    yield make
    for gen in gens:
        gen.close()


def _reason(call: Callable[[], object]) -> str:
    with pytest.raises(FetchError) as exc:
        call()
    return exc.value.reason


def test_a_body_in_many_segments_comes_back_whole(answer: Callable[..., int]) -> None:
    body = bytes(range(256)) * 800  # 200 KiB: several recv calls
    port = answer(OK + b"Content-Type: text/plain\r\n\r\n" + body, segments=40)
    assert loopscrape.fetch(port, 5.0, 1 << 20) == body


def test_a_blank_line_inside_the_body_stays_in_the_body(answer: Callable[..., int]) -> None:
    body = b"# HELP a\r\n\r\nfuse_crypt_a 1\n\r\n\r\n"
    assert loopscrape.fetch(answer(OK + b"\r\n" + body), 2.0, 1000) == body


def test_the_size_limits_at_their_edges(answer: Callable[..., int]) -> None:
    """Head and body at their largest pass; one byte more of either is refused. The
    streaming cut (max_bytes + 16 KiB in all) lets exactly those through."""
    head_max, body_max = 16 * 1024, 1000
    # a head of exactly 16 KiB (status line + one padding header), and a body filling the
    # rest of the streaming limit
    pad = head_max - len(OK) - len(b"X: ")
    head = OK + b"X: " + b"p" * pad
    assert len(head) == head_max
    body = b"b" * (body_max - 4)  # + the 4-byte separator: exactly the streaming limit
    assert loopscrape.fetch(answer(head + b"\r\n\r\n" + body), 2.0, body_max) == body
    assert _reason(lambda: loopscrape.fetch(answer(head + b"q\r\n\r\n"), 2.0, body_max)) == (
        "bad_response"
    )
    # a short head and a body of exactly max_bytes pass, one byte more is too large
    small = OK + b"\r\n"
    assert loopscrape.fetch(answer(small + b"c" * body_max), 2.0, body_max) == b"c" * body_max
    assert _reason(
        lambda: loopscrape.fetch(answer(small + b"c" * (body_max + 1)), 2.0, body_max)
    ) == ("too_large")
    # the total at exactly the streaming limit, with a head under 16 KiB
    head2 = OK + b"X: " + b"p" * (pad - 4)
    total = head_max + body_max
    body2 = b"d" * (total - len(head2) - 4)
    assert len(body2) <= body_max
    assert loopscrape.fetch(answer(head2 + b"\r\n\r\n" + body2), 2.0, body_max) == body2


def test_an_endless_stream_is_cut_by_size_long_before_the_deadline() -> None:
    """A daemon that never stops sending: refused as too large once the cap is passed, not
    read until the timeout (memory is what the cap protects)."""

    def flood(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(OK + b"\r\n")
        chunk = b"z" * 65536
        while not stop.is_set():
            conn.sendall(chunk)

    gen = _serve(flood)
    port = next(gen)
    try:
        t = time.monotonic()
        assert _reason(lambda: loopscrape.fetch(port, 10.0, 100_000)) == "too_large"
        assert time.monotonic() - t < 5.0
    finally:
        gen.close()


def test_a_silent_daemon_is_cut_at_the_deadline() -> None:
    """Accepts, reads the request, never answers, never closes."""

    def silent(conn: socket.socket, stop: threading.Event) -> None:
        stop.wait(30)

    gen = _serve(silent)
    port = next(gen)
    try:
        t = time.monotonic()
        with pytest.raises(TimeoutError) as exc:
            loopscrape.fetch(port, 0.5, 1000)
        assert 0.4 < time.monotonic() - t < 3.0
        assert str(exc.value) == f"no complete answer from 127.0.0.1:{port} in 0.5 s"
    finally:
        gen.close()


def test_a_listener_that_never_accepts_is_cut_at_the_deadline() -> None:
    """Its backlog full, the connect itself waits: the deadline covers it too (run in a
    thread, so a missing timeout fails the test instead of hanging it)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    result: list[BaseException | bytes] = []
    try:
        for _ in range(4):  # fill the accept queue; the kernel then drops new SYNs
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(("127.0.0.1", port))
            fillers.append(c)
        time.sleep(0.2)

        def run() -> None:
            try:
                result.append(loopscrape.fetch(port, 0.5, 1000))
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                result.append(exc)

        t = threading.Thread(target=run, daemon=True)
        start = time.monotonic()
        t.start()
        t.join(10)
        assert not t.is_alive(), "fetch kept waiting on a listener that never accepts"
        assert time.monotonic() - start < 3.0
        assert len(result) == 1 and isinstance(result[0], TimeoutError), result
        assert str(result[0]) == f"no complete answer from 127.0.0.1:{port} in 0.5 s"
    finally:
        for c in fillers:
            c.close()
        srv.close()


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.0\r\n200 OK",  # one token on the status line, "200" on the next
        b"HTTP/1.0\r\n200 OK\r\nX: y",  # the same with a header after it
        b"HTTP/1.0 500 Error\r\nX: 200",
        b"HTTPS/1.0 200 OK",
        b"HTTP/2 200 OK",
        b"",
    ],
)
def test_status_lines_that_are_refused(answer: Callable[..., int], head: bytes) -> None:
    port = answer(head + b"\r\n\r\nfuse_crypt_a 1\n")
    assert _reason(lambda: loopscrape.fetch(port, 2.0, 1000)) == "bad_response"


@pytest.mark.parametrize("head", [b"HTTP/1.0 200", b"HTTP/1.1 200 OK\r\nA: b\r\nC: d"])
def test_status_lines_that_pass(answer: Callable[..., int], head: bytes) -> None:
    assert loopscrape.fetch(answer(head + b"\r\n\r\nok"), 2.0, 1000) == b"ok"


def test_a_head_that_never_ends_is_refused(answer: Callable[..., int]) -> None:
    """No blank line before the close: not a response, whatever its status line says."""
    port = answer(OK + b"Content-Type: text/plain\r\n")
    assert _reason(lambda: loopscrape.fetch(port, 2.0, 1000)) == "bad_response"


def test_a_daemon_that_drips_is_cut_with_a_message_naming_the_port() -> None:
    """Each byte arrives within the per-read timeout; the overall deadline ends it, and the
    error names what was asked (no body, nothing from the daemon)."""

    def drip(conn: socket.socket, stop: threading.Event) -> None:
        for b in OK + b"\r\n" + b"x" * 1000:
            if stop.wait(0.05):
                return
            conn.sendall(bytes([b]))

    gen = _serve(drip)
    port = next(gen)
    try:
        with pytest.raises(TimeoutError) as exc:
            loopscrape.fetch(port, 0.5, 10_000)
        assert str(exc.value) == f"no complete answer from 127.0.0.1:{port} in 0.5 s"
    finally:
        gen.close()
