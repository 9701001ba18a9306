"""A pre-forking launcher for `fuse-crypt mount` daemons.

Why: a `fuse-crypt` daemon spends ~300 ms importing Python modules (mfusepy, cryptography,
fuse_crypt) before it mounts anything; gocryptfs, a Go binary, mounts in ~30 ms. The zygote
imports all of that once and keeps one child forked ahead; each mount is then that child
running exactly ``fuse_crypt.cli.main(["mount", "--foreground", "--masterkey", "stdin", ...])``
— the same CLI code path as the exec mounter, minus interpreter start-up and fork.

Protocol (a private socketpair between the node plugin and its zygote, inside the guest):
one request per datagram, ``{"argv": [...], "log": PATH}`` as JSON, a newline, then the
daemon's stdin bytes (the key) raw → reply ``{"pid": N}`` or ``{"error": "..."}``. The key
travels only over that socketpair and a pipe into the daemon's stdin. Daemons get their own
session, so they outlive the zygote and the plugin (they are re-parented when the zygote
exits); the zygote reaps those that exit.

Key residue (issue 7, finding 6): every daemon is a fork of the zygote, so whatever the
zygote's memory holds when it forks, the daemon inherits. Requests are therefore received
into one preallocated ``bytearray`` (``recvmsg_into``: no ``bytes`` copy is ever made), only
the JSON header is parsed (the key is not JSON, not hex, never a ``str``), the buffer is
handed to the spare by ``os.write`` of a memoryview, and it is zeroed before the reply is
sent and the next spare is forked. The spare reads its request into its own ``bytearray``
and zeroes it once the key is in its stdin pipe. The zygote and its children are also
undumpable (no core file with keys in it).

The zygote is single-threaded (forking is only safe that way) and exits when the plugin
closes its end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from typing import Any

from fuse_crypt.hardening import disable_core_dumps, wipe

MAX_MSG = 64 * 1024
_SEP = b"\n"


def _split(buf: bytearray, n: int) -> tuple[list[str], str, memoryview]:
    """(argv, log path, stdin view) of the request in ``buf[:n]``.

    Only the header before the first newline is copied (to parse it); the stdin part is a
    view into ``buf``, so wiping ``buf`` wipes it."""
    end = buf.find(_SEP, 0, n)
    if end < 0:
        raise ValueError("bad request")
    req = json.loads(bytes(buf[:end]))
    if not isinstance(req, dict) or not isinstance(req.get("argv"), list):
        raise ValueError("bad request")
    argv = [str(a) for a in req["argv"]]
    log = str(req["log"])
    return argv, log, memoryview(buf)[end + 1 : n]


def _warm_up() -> None:
    """Import everything `fuse-crypt mount` needs, without starting threads."""
    import fuse_crypt.backend  # noqa: F401  (LocalDirBackend)
    import fuse_crypt.cli
    import fuse_crypt.cli.commands  # noqa: F401
    import fuse_crypt.cli.keycheck  # noqa: F401
    import fuse_crypt.cli.mountrun  # noqa: F401
    import fuse_crypt.configfile  # noqa: F401
    import fuse_crypt.fusefrontend  # noqa: F401

    fuse_crypt.cli.build_parser()


def _daemon(argv: list[str], log_path: str, stdin_data: memoryview, buf: bytearray) -> None:
    """In the spare: wire fds, run the CLI, never return.  ``stdin_data`` (the key) is a
    view into ``buf``, which is wiped as soon as the key sits in the stdin pipe."""
    code = 1
    try:
        r, w = os.pipe()
        try:
            while stdin_data:
                stdin_data = stdin_data[os.write(w, stdin_data) :]
        finally:
            stdin_data.release()
            wipe(buf)
        os.close(w)
        os.dup2(r, 0)
        os.close(r)
        logfd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        os.close(logfd)
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False, buffering=1)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False, buffering=1)  # noqa: SIM115
        os.environ["PYTHONUNBUFFERED"] = "1"
        from fuse_crypt.cli import main

        code = int(main(argv) or 0)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _read_into(fd: int, buf: bytearray) -> int:
    """Read ``fd`` to EOF into ``buf`` (no intermediate ``bytes``); returns the length."""
    view = memoryview(buf)
    got = 0
    try:
        while got < len(buf):
            n = os.readv(fd, [view[got:]])
            if n == 0:
                break
            got += n
    finally:
        view.release()
    return got


class _Spare:
    """A child forked *ahead* of the next request, so forking is off the publish path.

    It blocks reading its request from a pipe; the zygote writes the request and closes the
    pipe. If the zygote goes away first, the read returns nothing and the spare just exits.
    """

    def __init__(self, conn: socket.socket) -> None:
        rd, self.wr = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            code = 0
            buf = bytearray(MAX_MSG)
            try:
                conn.close()
                os.close(self.wr)
                n = _read_into(rd, buf)
                os.close(rd)
                if n:
                    argv, log_path, stdin_view = _split(buf, n)
                    os.setsid()  # own session: outlives the zygote and the plugin
                    _daemon(argv, log_path, stdin_view, buf)
            except BaseException:
                code = 1
            wipe(buf)
            os._exit(code)
        os.close(rd)

    def launch(self, msg: memoryview) -> int:
        try:
            while msg:
                msg = msg[os.write(self.wr, msg) :]
        finally:
            os.close(self.wr)
        return self.pid


def _reap() -> None:
    """Collect exited daemons (they are our children until we exit)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def serve(fd: int) -> int:
    """Zygote main loop on an inherited SOCK_SEQPACKET fd."""
    disable_core_dumps()  # inherited by every spare and daemon
    conn = socket.socket(fileno=fd)
    _warm_up()
    spare = _Spare(conn)
    conn.send(b'{"ready": true}')
    conn.settimeout(1.0)
    buf = bytearray(MAX_MSG)  # the only place a request (and its key) ever lands
    while True:
        _reap()
        try:
            n, _, flags, _ = conn.recvmsg_into([buf])
        except TimeoutError:
            continue
        if n == 0:
            return 0
        try:
            if flags & socket.MSG_TRUNC:
                raise ValueError("request too large")
            _split(buf, n)  # reject garbage here rather than in the child
            view = memoryview(buf)[:n]
            try:
                reply: dict[str, Any] = {"pid": spare.launch(view)}
            finally:
                view.release()
        except Exception as exc:  # reply, never die: the plugin decides
            reply = {"error": f"{type(exc).__name__}"}
        finally:
            wipe(buf)  # before the next spare is forked: it must not inherit this key
        conn.send(json.dumps(reply).encode())
        spare = _Spare(conn)  # fork the next one while the daemon mounts


class ZygoteClient:
    """The plugin side: starts the zygote lazily, restarts it if it died."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "csi_driver.zygote", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        theirs.close()
        ours.settimeout(60)
        hello = ours.recv(MAX_MSG)
        if not hello:
            raise OSError("mount zygote failed to start")
        ours.settimeout(30)
        return ours

    def warm(self) -> None:
        """Start the zygote now rather than on the first mount (best effort)."""
        with self._lock:
            if self._sock is None and not self._closed:
                try:
                    self._sock = self._start()
                except OSError:
                    self._sock = None

    def spawn(self, argv: list[str], log_path: str, stdin_data: bytes | bytearray) -> int:
        """Fork a daemon running ``fuse_crypt.cli.main(argv)``; returns its pid.

        The request is assembled in a ``bytearray`` that is wiped once sent (the caller
        owns, and should wipe, ``stdin_data`` itself if it is a bytearray)."""
        header = json.dumps({"argv": argv, "log": log_path}).encode()
        if len(header) + 1 + len(stdin_data) > MAX_MSG:
            raise OSError("mount zygote: request too large")
        req = bytearray(header)
        req += _SEP
        req += stdin_data
        try:
            return self._send(req)
        finally:
            wipe(req)

    def _send(self, req: bytearray) -> int:
        with self._lock:
            for attempt in (1, 2):
                if self._sock is None or (self._proc is not None and self._proc.poll() is not None):
                    self._sock = self._start()
                try:
                    self._sock.send(req)
                    reply = self._sock.recv(MAX_MSG)
                except OSError:
                    reply = b""
                if reply:
                    break
                self._sock = None  # zygote died: start a fresh one and retry once
                if attempt == 2:
                    raise OSError("mount zygote is not answering")
        doc = json.loads(reply)
        if "pid" not in doc:
            raise OSError(f"mount zygote: {doc.get('error', 'unknown error')}")
        return int(doc["pid"])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                self._proc = None


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1])))
