"""A loopback TCP listener for the /metrics fetch tests: it reads each request, then lets a
handler answer (or not) on the connection; what a volume daemon, honest or hostile, does."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

Handler = Callable[[socket.socket, threading.Event], None]


def serve(handler: Handler) -> Iterator[int]:
    """Yields the port; on close, stops accepting and closes the listener. The handler gets
    the connection and a stop event to end long answers early."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.recv(4096)
                    handler(conn, stop)
                except OSError:
                    pass

    threading.Thread(target=run, daemon=True).start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        srv.close()


def answering(answer: bytes, *, drip: bool = False) -> Iterator[int]:
    """A server sending ``answer`` and closing; ``drip``: one byte every 50 ms."""

    def handler(conn: socket.socket, stop: threading.Event) -> None:
        if not drip:
            conn.sendall(answer)
            return
        for b in answer:
            if stop.wait(0.05):
                return
            conn.sendall(bytes([b]))

    return serve(handler)
