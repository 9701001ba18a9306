"""A protocol-level ttrpc server on a unix socket, behaving like ttrpc-rust 0.9 (AA, CDH).

Serves the same servicers as the gRPC peers: the generated ``add_*_to_server`` functions
register their method handlers here (``add_registered_method_handlers``), so each CoCo
component's behaviour has one implementation and two transports. Framing is written here
from containerd/ttrpc PROTOCOL.md (reference/ttrpc.md), independently of the product client:

- 10-byte header (length u32, stream id u32, type u8, flags u8), at most 4 MiB of data;
- Request → one Response on the same stream, handled concurrently (replies may overtake);
- success is ``status{code: 0}`` + payload, as ttrpc-rust sends it (Go omits the status);
- unknown service → 3 INVALID_ARGUMENT, unknown method → 12 UNIMPLEMENTED, even stream id
  → 3, oversized request → 3 "message length … exceed maximum message size …" (Rust);
- ``timeout_nano`` honoured: a handler still running at the deadline answers 4 "timeout".

Wire faults (queued with ``peer.inject(rpc, "<name>")``), for the client's error paths:
``oversized`` (reply header announcing 4 MiB + 1), ``close-mid-reply`` (half a reply, then
close), ``garbage`` (a Response that is not protobuf), ``wrong-stream`` (reply on another
stream id, then the real one), ``data-frame`` (a data frame instead of a Response),
``no-reply`` (never answer).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import socket
import struct
import threading
from typing import Any

import grpc

from coco_proto import ttrpc_pb2
from tests.peers.grpc_unix import WireFault

MAX = 4 << 20
HDR = struct.Struct(">IIBB")
REQUEST, RESPONSE, DATA = 1, 2, 3
WIRE_FAULTS = ("oversized", "close-mid-reply", "garbage", "wrong-stream", "data-frame", "no-reply")


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Context:
    """The part of grpc.ServicerContext the peers' servicers use."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Abort(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 16))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class TtrpcServer:
    """Serve registered services on ``socket_path``; ``start()``/``stop()``."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.services: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[int, str, str, int]] = []  # stream id, service, method, ns
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._stopped = threading.Event()

    # the grpc.Server surface the generated add_*_to_server functions call
    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.services[service] = dict(handlers)

    def start(self) -> TtrpcServer:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def stop(self, grace: float | None = None) -> threading.Event:
        self._stopped.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        done = threading.Event()
        done.set()
        return done

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        write_lock = threading.Lock()

        def send(data: bytes) -> None:
            with write_lock, contextlib.suppress(OSError):
                conn.sendall(data)

        def reply(sid: int, code: int = 0, message: str = "", payload: bytes = b"") -> None:
            body = ttrpc_pb2.Response(
                status=ttrpc_pb2.Status(code=code, message=message), payload=payload
            ).SerializeToString()
            send(HDR.pack(len(body), sid, RESPONSE, 0) + body)

        try:
            while True:
                header = _recv_exact(conn, HDR.size)
                if header is None:
                    return
                length, sid, mtype, _flags = HDR.unpack(header)
                if length > MAX:  # discard the body, answer on that stream (ttrpc-rust)
                    left = length
                    while left:
                        chunk = conn.recv(min(left, 1 << 16))
                        if not chunk:
                            return
                        left -= len(chunk)
                    reply(sid, 3, f"message length {length} exceed maximum message size of {MAX}")
                    continue
                body = _recv_exact(conn, length)
                if body is None:
                    return
                if mtype != REQUEST:
                    continue
                if sid % 2 == 0:
                    reply(sid, 3, "StreamID must be odd for client initiated streams")
                    continue
                self._pool.submit(self._handle, sid, body, send, reply, conn)
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _handle(self, sid: int, body: bytes, send: Any, reply: Any, conn: socket.socket) -> None:
        try:
            req = ttrpc_pb2.Request.FromString(body)
        except Exception:
            reply(sid, 3, "unmarshal request error")
            return
        with self._lock:
            self.requests.append((sid, req.service, req.method, req.timeout_nano))
        service = self.services.get(req.service)
        if service is None:
            reply(sid, 3, f"{req.service} service does not exist")
            return
        handler = service.get(req.method)
        if handler is None:
            reply(sid, 12, f"{req.method} method")
            return
        timeout = req.timeout_nano / 1e9 if req.timeout_nano > 0 else None
        future = concurrent.futures.Future()
        threading.Thread(target=self._run, args=(handler, req.payload, future), daemon=True).start()
        try:
            outcome = future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            reply(sid, 4, "timeout")
            return
        kind, value = outcome
        if kind == "ok":
            reply(sid, 0, "", value)
        elif kind == "status":
            reply(sid, value[0], value[1])
        else:
            self._wire_fault(value, sid, send, reply, conn)

    @staticmethod
    def _run(handler: Any, payload: bytes, future: concurrent.futures.Future) -> None:
        context = _Context()
        try:
            request = handler.request_deserializer(payload)
            response = handler.unary_unary(request, context)
            result: tuple[str, Any] = ("ok", handler.response_serializer(response))
        except _Abort as exc:
            result = ("status", (exc.code.value[0], exc.message))
        except WireFault as exc:
            result = ("wire", exc.kind)
        except Exception as exc:  # like ttrpc-rust: other errors are UNKNOWN with their text
            code = context.code.value[0] if context.code else 2
            result = ("status", (code, context.details or type(exc).__name__))
        future.set_result(result)

    @staticmethod
    def _wire_fault(kind: str, sid: int, send: Any, reply: Any, conn: socket.socket) -> None:
        if kind == "oversized":
            send(HDR.pack(MAX + 1, sid, RESPONSE, 0) + b"\0" * 64)
        elif kind == "close-mid-reply":
            body = ttrpc_pb2.Response(payload=b"x" * 100).SerializeToString()
            send(HDR.pack(len(body), sid, RESPONSE, 0) + body[:20])
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        elif kind == "garbage":
            send(HDR.pack(3, sid, RESPONSE, 0) + b"\xff\xff\xff")
        elif kind == "wrong-stream":
            reply(sid + 1000, 13, "reply to a stream that was never opened")
            reply(sid, 0, "", b"")
        elif kind == "data-frame":
            send(HDR.pack(0, sid, DATA, 0x05))
        elif kind == "no-reply":
            return
        else:
            reply(sid, 13, f"unknown wire fault {kind}")
