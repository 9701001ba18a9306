"""One bounded HTTP GET of a volume daemon's /metrics on loopback (the collector's fetch).

Why not urllib or http.client: their timeout applies to each socket operation, so a daemon
that drips a byte a second keeps them reading for ever, and they read a body of any size.
Here the whole exchange (connect, request, headers and body) shares one deadline, the body
is cut at ``max_bytes`` and anything but a plain ``200`` is refused. The address is always
127.0.0.1: the port is all the caller chooses.
"""

from __future__ import annotations

import socket
import time

from csi_driver.volumemetrics import FetchError

__all__ = ["fetch"]

HOST = "127.0.0.1"
_REQUEST = b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\n\r\n"
_MAX_HEAD = 16 * 1024


def fetch(port: int, timeout: float, max_bytes: int) -> bytes:
    """The body of ``GET /metrics`` from 127.0.0.1:``port``. TimeoutError past ``timeout``
    seconds in total, OSError if nothing listens, FetchError("too_large") past
    ``max_bytes``, FetchError("bad_response") for anything but a 200 with a body."""
    deadline = time.monotonic() + timeout
    limit = max_bytes + _MAX_HEAD
    chunks: list[bytes] = []
    size = 0
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(_REQUEST)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise FetchError("too_large")
    except TimeoutError:  # the connect, a recv, or the deadline between two of them
        raise TimeoutError(f"no complete answer from 127.0.0.1:{port} in {timeout:g} s") from None
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep or len(head) > _MAX_HEAD:
        raise FetchError("bad_response")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or not status[0].startswith(b"HTTP/1.") or status[1] != b"200":
        raise FetchError("bad_response")
    if len(body) > max_bytes:
        raise FetchError("too_large")
    return body
