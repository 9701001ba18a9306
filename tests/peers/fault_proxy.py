"""A loopback HTTP/1.1 fault-injection proxy between an object-store client and its peer.

Test peer only.  The client is pointed at the proxy (plain http on 127.0.0.1) as if it
were the endpoint; each request is read whole, then either forwarded to the upstream peer
or hit by the next scripted :class:`Fault`:

* ``Fault.error(503, "SlowDown")``: answered here with an OSS-style error document
  (5xx bursts, throttling), the upstream never sees the request;
* ``Fault.slow(seconds)``: forwarded, the answer held back ``seconds`` before its head;
* ``Fault.trickle(seconds)``: forwarded, the body then sent one byte per ``seconds``;
* ``Fault.cut(after)``: forwarded, the answer's head and ``after`` body bytes are sent,
  then the connection is closed (a connection dropped mid-body); an answer with fewer
  body bytes is cut in the middle of its head instead, so a cut is always a cut;
* ``Fault.reset()``: the connection is closed without any answer;
* ``Fault.stall()``: no answer at all until the client gives up;
* ``Fault.rewrite(old, new)``: forwarded, the first ``old`` in the answer's body replaced by
  ``new`` (Content-Length fixed): a hostile store's answer made from a real one.

``queue(*faults)`` scripts the next requests (one fault each, in order; None forwards);
``always`` applies to every request once the queue is empty (None: forward untouched).
``log`` records ``(method, path, fault kind or "forward")`` per request.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
import socketserver
import threading
import time
from typing import Any


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    status: int = 503
    code: str = "SlowDown"
    seconds: float = 0.0
    after: int = 0
    old: bytes = b""
    new: bytes = b""

    @classmethod
    def error(cls, status: int = 503, code: str = "SlowDown") -> Fault:
        return cls("error", status=status, code=code)

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        return cls("slow", seconds=seconds)

    @classmethod
    def trickle(cls, seconds: float) -> Fault:
        return cls("trickle", seconds=seconds)

    @classmethod
    def cut(cls, after: int = 0) -> Fault:
        return cls("cut", after=after)

    @classmethod
    def reset(cls) -> Fault:
        return cls("reset")

    @classmethod
    def stall(cls) -> Fault:
        return cls("stall")

    @classmethod
    def rewrite(cls, old: bytes, new: bytes) -> Fault:
        return cls("rewrite", old=old, new=new)


MAX_HEAD = 64 * 1024


def _read_head(f: Any) -> bytes | None:
    lines = []
    total = 0
    while True:
        line = f.readline(MAX_HEAD)
        if not line:
            return None
        total += len(line)
        if total > MAX_HEAD:
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _is_chunked(head: bytes) -> bool:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            return True
    return False


def _read_chunked(f: Any) -> bytes:
    """The raw chunked body, framing included (forwarded as it came)."""
    out = []
    while True:
        size_line = f.readline(MAX_HEAD)
        out.append(size_line)
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while True:
                trailer = f.readline(MAX_HEAD)
                out.append(trailer)
                if trailer in (b"\r\n", b"\n", b""):
                    return b"".join(out)
        out.append(f.read(size + 2))


def _expects_continue(head: bytes) -> bool:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"expect" and value.strip().lower() == b"100-continue":
            return True
    return False


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        proxy = self.server.proxy
        while not proxy.closing.is_set():
            head = _read_head(self.rfile)
            if head is None:
                return
            if _expects_continue(head):
                # botocore sends every file-like PUT body (parts, put_object) after
                # "Expect: 100-continue"; answer it here so the body comes at once.
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.wfile.flush()
            if _is_chunked(head):  # oss2 sends an empty PUT body chunked
                body = _read_chunked(self.rfile)
            else:
                body = self.rfile.read(_content_length(head))
            method, path = (head.split(b" ", 2) + [b"", b""])[:2]
            fault = proxy.next_fault()
            proxy.log.append((method.decode(), path.decode(), fault.kind if fault else "forward"))
            if fault is not None and fault.kind == "reset":
                return
            if fault is not None and fault.kind == "stall":
                proxy.closing.wait(60)
                return
            if fault is not None and fault.kind == "error":
                self._error(method, fault)
                continue
            resp_head, resp_body = self._forward(method, head, body)
            if fault is not None and fault.kind == "rewrite" and fault.old in resp_body:
                n = len(resp_body)
                resp_body = resp_body.replace(fault.old, fault.new, 1)
                resp_head = resp_head.replace(
                    f"Content-Length: {n}\r\n".encode(),
                    f"Content-Length: {len(resp_body)}\r\n".encode(),
                ).replace(
                    f"content-length: {n}\r\n".encode(),
                    f"content-length: {len(resp_body)}\r\n".encode(),
                )
            if fault is not None and fault.kind == "slow":
                time.sleep(fault.seconds)
            if fault is not None and fault.kind == "cut":
                if fault.after < len(resp_body):
                    self.wfile.write(resp_head + resp_body[: fault.after])
                else:  # no body to cut into: cut the head instead
                    self.wfile.write(resp_head[: len(resp_head) // 2])
                self.wfile.flush()
                return
            self.wfile.write(resp_head)
            if fault is not None and fault.kind == "trickle":
                for i in range(len(resp_body)):
                    self.wfile.write(resp_body[i : i + 1])
                    self.wfile.flush()
                    if proxy.closing.wait(fault.seconds):
                        return
                continue
            self.wfile.write(resp_body)
            self.wfile.flush()

    def _error(self, method: bytes, fault: Fault) -> None:
        rid = os.urandom(12).hex().upper()
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error>'
            f"<Code>{fault.code}</Code><Message>Injected fault.</Message>"
            f"<RequestId>{rid}</RequestId><HostId>fault.proxy</HostId></Error>"
        ).encode()
        body = b"" if method == b"HEAD" else xml
        head = (
            f"HTTP/1.1 {fault.status} Injected\r\nServer: AliyunOSS\r\n"
            f"x-oss-request-id: {rid}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.wfile.write(head + body)
        self.wfile.flush()

    def _forward(self, method: bytes, head: bytes, body: bytes) -> tuple[bytes, bytes]:
        up = self.server.proxy.upstream
        with socket.create_connection(up, timeout=30) as s:
            s.sendall(head + body)
            f = s.makefile("rb")
            resp_head = _read_head(f) or b""
            status = int((resp_head.split(b" ", 2) + [b"0"])[1] or 0)
            while 100 <= status < 200:  # an interim answer (100 Continue): not the answer
                resp_head = _read_head(f) or b""
                status = int((resp_head.split(b" ", 2) + [b"0"])[1] or 0)
            n = 0 if method == b"HEAD" or status in (204, 304) else _content_length(resp_head)
            return resp_head, f.read(n)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hang up on purpose in these tests


class FaultProxy:
    """Listens on 127.0.0.1:<random>; forwards to ``upstream`` (host, port)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.faults: collections.deque[Fault | None] = collections.deque()
        self.always: Fault | None = None
        self.log: list[tuple[str, str, str]] = []
        self.closing = threading.Event()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )

    def queue(self, *faults: Fault | None) -> None:
        with self._lock:
            self.faults.extend(faults)

    def next_fault(self) -> Fault | None:
        with self._lock:
            return self.faults.popleft() if self.faults else self.always

    def reset(self) -> None:
        with self._lock:
            self.faults.clear()
            self.always = None
            self.log.clear()

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
