"""Host-planted files at every small-file position (issue 7, finding 4).

The host controls the cipher directory. A FIFO where ``gocryptfs.conf``, a
``gocryptfs.diriv``, a ``.name`` file or a cipher file belongs used to block a reader
forever; a 3 GiB sparse conf was read into memory; a symlink was followed. Each case here
must fail fast (a time bound) with a clear, typed error, through the library, the CLI and
a real mount.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fuse_crypt.backend.local import LocalDirBackend
from fuse_crypt.configfile import MAX_CONF_BYTES, ConfFile
from fuse_crypt.errors import ConfigError
from fuse_crypt.nametransform import CONF_NAME, DIRIV_NAME
from tests.fuse_env import needs_fuse

from .cli_helpers import assert_one_line_error, fc, init_volume
from .conftest import CipherView, Mount, Volume, make_volume

FAST = 5.0  # seconds: "fails fast"; the blocking versions never returned at all
SPARSE = 3 * 1024**3


def plant(path: Path, kind: str, target: Path | None = None) -> None:
    """Replace ``path`` by a hostile object of ``kind``."""
    if path.exists() or path.is_symlink():
        if path.is_dir() and not path.is_symlink():
            os.rmdir(path)
        else:
            os.chmod(path, 0o600, follow_symlinks=False) if not path.is_symlink() else None
            path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        os.symlink(target or "/etc/hostname", path)
    elif kind == "sparse":
        with open(path, "wb") as f:
            f.truncate(SPARSE)
    elif kind == "dir":
        path.mkdir()
    else:  # pragma: no cover
        raise AssertionError(kind)


def timed(fn: Callable[[], object]) -> object:
    """Run ``fn`` in a thread and fail (instead of hanging the suite) if it blocks."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            result.append(e)

    t = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    t.start()
    t.join(FAST)
    assert not t.is_alive(), "blocked on a host-planted file"
    assert time.monotonic() - start < FAST
    return result[0]


KINDS = ["fifo", "symlink", "sparse", "dir"]


# --------------------------------------------------------------------------- library


@pytest.mark.parametrize("kind", KINDS)
def test_conf_reader_refuses_hostile_objects(tmp_path: Path, kind: str) -> None:
    vol = make_volume(tmp_path / "c")
    conf_path = vol.cipherdir / CONF_NAME
    good = conf_path.read_bytes()
    (tmp_path / "real.conf").write_bytes(good)
    plant(conf_path, kind, tmp_path / "real.conf")
    err = timed(lambda: ConfFile.read(str(conf_path)))
    assert isinstance(err, ConfigError), err
    words = {"fifo": "FIFO", "symlink": "symbolic link", "sparse": "too large", "dir": "directory"}
    assert words[kind] in str(err)


def test_conf_reader_missing_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ConfFile.read(str(tmp_path / CONF_NAME))


def test_conf_reader_cap(tmp_path: Path) -> None:
    vol = make_volume(tmp_path / "c")
    conf_path = vol.cipherdir / CONF_NAME
    data = conf_path.read_bytes()
    padded = data + b" " * (MAX_CONF_BYTES - len(data))
    assert len(padded) == MAX_CONF_BYTES
    os.chmod(conf_path, 0o600)
    conf_path.write_bytes(padded)  # exactly the cap: still read
    assert ConfFile.read(str(conf_path)).feature_flags
    conf_path.write_bytes(padded + b" ")
    with pytest.raises(ConfigError, match="too large"):
        ConfFile.read(str(conf_path))


@pytest.mark.parametrize(
    ("field", "value"),
    [("N", 2**20), ("N", 2**28), ("R", 16), ("R", 2**20), ("P", 2), ("P", 2**20)],
)
def test_scrypt_costs_are_bounded_before_running_scrypt(
    tmp_path: Path, field: str, value: int
) -> None:
    """A conf may not make an unlock cost seconds of CPU or GiBs of memory."""
    vol = make_volume(tmp_path / "c")
    obj = json.loads((vol.cipherdir / CONF_NAME).read_bytes())
    obj["ScryptObject"][field] = value
    start = time.monotonic()
    with pytest.raises(ConfigError, match="scrypt"):
        ConfFile.loads(json.dumps(obj).encode()).unlock(b"password")
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_backend_small_files_refuse_hostile_objects(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "real").write_bytes(bytes(16))
    plant(root / DIRIV_NAME, kind, root / "real")
    be = LocalDirBackend(str(root))
    try:
        err = timed(lambda: be.read_small_file(DIRIV_NAME, 64))
        want = {"fifo": errno.EIO, "symlink": errno.ELOOP, "sparse": errno.EFBIG}
        assert isinstance(err, OSError), err
        assert err.errno == want.get(kind, errno.EIO), err
    finally:
        be.destroy()


@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_RDWR])
def test_backend_data_file_open_refuses_fifo(tmp_path: Path, flags: int) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "cipherfile")
    be = LocalDirBackend(str(root))
    try:
        err = timed(lambda: be.open("cipherfile", flags))
        assert isinstance(err, OSError) and err.errno == errno.EIO, err
    finally:
        be.destroy()


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["info", "mount", "passwd"])
def test_cli_conf_positions(tmp_path: Path, passfile: Path, kind: str, command: str) -> None:
    cipher = init_volume(tmp_path / "c", passfile)
    (tmp_path / "real.conf").write_bytes((cipher / CONF_NAME).read_bytes())
    plant(cipher / CONF_NAME, kind, tmp_path / "real.conf")
    mnt = tmp_path / "m"
    mnt.mkdir()
    args: list[str | Path] = {
        "info": ["info", cipher],
        "mount": ["mount", "--passfile", passfile, cipher, mnt],
        "passwd": ["passwd", "--passfile", passfile, "--new-passfile", passfile, cipher],
    }[command]
    start = time.monotonic()
    proc = fc(*args, timeout=30)
    assert time.monotonic() - start < 2 * FAST  # interpreter start-up included
    line = assert_one_line_error(proc, 23)
    assert "config file" in line
    assert not (cipher / "gocryptfs.conf.tmp").exists()


def test_cli_scrypt_bomb_is_refused(tmp_path: Path, passfile: Path) -> None:
    cipher = init_volume(tmp_path / "c", passfile)
    conf = cipher / CONF_NAME
    obj = json.loads(conf.read_bytes())
    obj["ScryptObject"]["R"] = 4096
    os.chmod(conf, 0o600)
    conf.write_text(json.dumps(obj))
    before = conf.read_bytes()
    mnt = tmp_path / "m"
    mnt.mkdir()
    start = time.monotonic()
    line = assert_one_line_error(fc("mount", "--passfile", passfile, cipher, mnt), 23)
    assert time.monotonic() - start < 2 * FAST
    assert "scrypt" in line
    assert conf.read_bytes() == before


# --------------------------------------------------------------------------- real mount


@pytest.fixture
def filled(tmp_path: Path, mount_factory: Callable[..., Mount]) -> Iterator[tuple[Volume, Path]]:
    vol = make_volume(tmp_path / "cipher")
    m = mount_factory(vol)
    (m.path / "sub").mkdir()
    (m.path / "sub" / "inner").write_bytes(b"inner")
    (m.path / "other").mkdir()
    (m.path / "other" / "fine").write_bytes(b"fine")
    (m.path / ("L" * 200)).write_bytes(b"long")
    (m.path / "data").write_bytes(b"x" * 10000)
    assert m.unmount() == 0
    yield vol, tmp_path


def _still_serves(m: Mount) -> None:
    assert (m.path / "other" / "fine").read_bytes() == b"fine"


@needs_fuse
@pytest.mark.parametrize("kind", KINDS)
def test_mount_subdir_diriv(
    filled: tuple[Volume, Path], mount_factory: Callable[..., Mount], kind: str
) -> None:
    vol, tmp = filled
    cv = CipherView(vol)
    (tmp / "real").write_bytes(bytes(16))
    plant(cv.cpath("sub") / DIRIV_NAME, kind, tmp / "real")
    m = mount_factory(vol)
    err = timed(lambda: os.listdir(m.path / "sub"))
    assert isinstance(err, OSError) and err.errno in (errno.EIO, errno.ELOOP, errno.EFBIG), err
    _still_serves(m)
    # fsyncdir opens the diriv too: it must not block either (a sparse one can be fsynced)
    err = timed(lambda: _fsync_dir(m.path / "sub"))
    assert err is None or isinstance(err, OSError), err
    _still_serves(m)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@needs_fuse
@pytest.mark.parametrize("kind", KINDS)
def test_mount_long_name_file(
    filled: tuple[Volume, Path], mount_factory: Callable[..., Mount], kind: str
) -> None:
    vol, tmp = filled
    names = [n for n in os.listdir(vol.cipherdir) if n.endswith(".name")]
    assert len(names) == 1
    (tmp / "real").write_bytes((vol.cipherdir / names[0]).read_bytes())
    plant(vol.cipherdir / names[0], kind, tmp / "real")
    m = mount_factory(vol)
    listing = timed(lambda: sorted(os.listdir(m.path)))
    assert listing == ["data", "other", "sub"], listing  # the long name is skipped
    _still_serves(m)
    assert "bad_long_name" in m.log()


@needs_fuse
@pytest.mark.parametrize("kind", ["fifo", "sparse"])
def test_mount_data_file(
    filled: tuple[Volume, Path], mount_factory: Callable[..., Mount], kind: str
) -> None:
    """A cipher file swapped for a FIFO (while the kernel still caches it as a regular
    file) or a 3 GiB sparse file: EIO, fast, and the daemon keeps serving."""
    vol, _ = filled
    m = mount_factory(vol)
    target = m.path / "data"
    assert target.stat().st_size == 10000  # cached as a regular file for a second
    plant(CipherView(vol).cpath("data"), kind)
    err = timed(lambda: target.read_bytes())
    assert isinstance(err, OSError) and err.errno == errno.EIO, err
    _still_serves(m)
