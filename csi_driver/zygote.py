"""A pre-forking launcher for `fuse-crypt mount` daemons.

Why: a `fuse-crypt` daemon spends ~300 ms importing Python modules (mfusepy, cryptography,
fuse_crypt) before it mounts anything; gocryptfs, a Go binary, mounts in ~30 ms. The zygote
imports all of that once and keeps one child forked ahead; each mount is then that child
running exactly ``fuse_crypt.cli.main(["mount", "--foreground", "--masterkey", "stdin", ...])``
— the same CLI code path as the exec mounter, minus interpreter start-up and fork.

Protocol (a private socketpair between the node plugin and its zygote, inside the guest):
one JSON request per datagram ``{"argv": [...], "log": PATH, "stdin": HEX}`` → reply
``{"pid": N}`` or ``{"error": "..."}``. The key travels only over that socketpair and a pipe
into the daemon's stdin. Daemons get their own session, so they outlive the zygote and the
plugin (they are re-parented when the zygote exits); the zygote reaps those that exit.

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

MAX_MSG = 64 * 1024


def _warm_up() -> None:
    """Import everything `fuse-crypt mount` needs, without starting threads."""
    import fuse_crypt.backend.local  # noqa: F401
    import fuse_crypt.cli
    import fuse_crypt.cli.commands  # noqa: F401
    import fuse_crypt.cli.keycheck  # noqa: F401
    import fuse_crypt.cli.mountrun  # noqa: F401
    import fuse_crypt.configfile  # noqa: F401
    import fuse_crypt.fusefrontend  # noqa: F401

    fuse_crypt.cli.build_parser()


def _daemon(argv: list[str], log_path: str, stdin_data: bytes) -> None:
    """In the grandchild: wire fds, run the CLI, never return."""
    code = 1
    try:
        r, w = os.pipe()
        os.write(w, stdin_data)
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


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, MAX_MSG):
        chunks.append(chunk)
    return b"".join(chunks)


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
            try:
                conn.close()
                os.close(self.wr)
                data = _read_all(rd)
                os.close(rd)
                if data:
                    req = json.loads(data)
                    os.setsid()  # own session: outlives the zygote and the plugin
                    _daemon([str(a) for a in req["argv"]], req["log"], bytes.fromhex(req["stdin"]))
            except BaseException:
                code = 1
            os._exit(code)
        os.close(rd)

    def launch(self, msg: bytes) -> int:
        os.write(self.wr, msg)
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
    conn = socket.socket(fileno=fd)
    _warm_up()
    spare = _Spare(conn)
    conn.send(b'{"ready": true}')
    conn.settimeout(1.0)
    while True:
        _reap()
        try:
            msg = conn.recv(MAX_MSG)
        except TimeoutError:
            continue
        if not msg:
            return 0
        try:
            json.loads(msg)  # reject garbage here rather than in the child
            reply: dict[str, Any] = {"pid": spare.launch(msg)}
        except Exception as exc:  # reply, never die: the plugin decides
            reply = {"error": f"{type(exc).__name__}"}
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

    def spawn(self, argv: list[str], log_path: str, stdin_data: bytes) -> int:
        """Fork a daemon running ``fuse_crypt.cli.main(argv)``; returns its pid."""
        req = json.dumps({"argv": argv, "log": log_path, "stdin": stdin_data.hex()}).encode()
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
