"""ObjectStoreBackend in-process, under the real crypto frontend, over the strict fake.

What a real store adds (signatures, HTTP, moto's quirks) is in test_s3_transport.py and
the mount tests; here: the s3fs+gocryptfs layout object by object, request counts,
multipart planning, renames and their recovery, failures, and the hostile bucket.
"""

from __future__ import annotations

import errno
import os
import random
import stat

import pytest

from fuse_crypt.backend.objectstore import (
    DIR_CONTENT_TYPE,
    INTENT_PREFIX,
    ObjectStoreBackend,
    fmt_time,
    parse_time,
)
from fuse_crypt.backend.transport import TransientError
from fuse_crypt.contentenc import CIPHER_BS, HEADER_LEN
from fuse_crypt.cryptocore import CryptoCore
from fuse_crypt.fusefrontend.mount import build_operations
from fuse_crypt.fusefrontend.operations import CryptOperations
from fuse_crypt.nametransform import DIRIV_NAME, NameTransform
from tests.fuse_crypt.fake_transport import FakeTransport

KEY = bytes(range(32))
PRE = "vols/v1/"
MiB = 1 << 20


def _init(t: FakeTransport, prefix: str = PRE) -> None:
    t.put_raw(prefix + DIRIV_NAME, NameTransform.new_dir_iv(), {"mode": "33060"})


class FS:
    """The frontend's Operations over an object backend, used like FUSE would."""

    def __init__(self, t: FakeTransport, **kw: object) -> None:
        self.t = t
        self.backend = ObjectStoreBackend(t, PRE, **kw)  # type: ignore[arg-type]
        self.ops, self.core = build_operations(self.backend, KEY, None)

    def write(self, path: str, data: bytes, mode: int = 0o644) -> None:
        fh = self.ops.create(path, mode)
        try:
            if data:
                self.ops.write(path, data, 0, fh)
            self.ops.flush(path, fh)
        finally:
            self.ops.release(path, fh)

    def read(self, path: str, size: int = 1 << 30, offset: int = 0) -> bytes:
        fh = self.ops.open(path, os.O_RDONLY)
        try:
            out = b""
            while len(out) < size:
                chunk = self.ops.read(path, min(MiB, size - len(out)), offset + len(out), fh)
                if not chunk:
                    break
                out += chunk
            return out
        finally:
            self.ops.release(path, fh)

    def names(self, path: str) -> list[str]:
        fh = self.ops.opendir(path)
        try:
            return sorted(n for n, _, _ in self.ops.readdir_entries(path, fh))[2:]
        finally:
            self.ops.releasedir(path, fh)

    def cpath(self, path: str) -> str:
        return self.ops.paths.cipher_path(path)

    def close(self) -> None:
        self.ops.destroy("/")
        self.backend.destroy()


@pytest.fixture
def t() -> FakeTransport:
    t = FakeTransport()
    _init(t)
    return t


@pytest.fixture
def fs(t: FakeTransport) -> FS:
    f = FS(t)
    yield f
    f.close()


# -- layout ---------------------------------------------------------------------------


def test_layout_matches_s3fs_gocryptfs(fs: FS, t: FakeTransport) -> None:
    fs.ops.mkdir("/d", 0o755)
    fs.write("/d/hello", b"hello")
    fs.write("/empty", b"")
    fs.ops.symlink("/lnk", "target/x")
    cd = fs.cpath("/d")
    marker = t.objects[PRE + cd + "/"]
    assert marker.body == b"" and marker.content_type == DIR_CONTENT_TYPE
    assert marker.metadata["mode"] == "493"  # s3fs mkdir: permission bits only
    assert {"uid", "gid", "mtime", "atime", "ctime"} <= set(marker.metadata)
    diriv = t.objects[PRE + cd + "/" + DIRIV_NAME]
    assert len(diriv.body) == 16 and diriv.metadata["mode"] == "33060"
    f = t.objects[PRE + fs.cpath("/d/hello")]
    assert len(f.body) == HEADER_LEN + 5 + 32 and f.metadata["mode"] == "33188"
    assert len(t.objects[PRE + fs.cpath("/empty")].body) == 0
    ln = t.objects[PRE + fs.cpath("/lnk")]
    assert ln.metadata["mode"] == "41471"
    assert fs.ops.nt.decrypt_symlink(ln.body.decode()) == "target/x"
    assert fs.ops.readlink("/lnk") == "target/x"
    # Nothing else: no prefix/ object for the root, no temporaries.
    assert sorted(t.objects) == sorted(
        [
            PRE + DIRIV_NAME,
            PRE + cd + "/",
            PRE + cd + "/" + DIRIV_NAME,
            PRE + fs.cpath("/d/hello"),
            PRE + fs.cpath("/empty"),
            PRE + fs.cpath("/lnk"),
        ]
    )


def test_time_format_roundtrip() -> None:
    assert fmt_time(1_500_000_000 * 10**9) == "1500000000"
    assert fmt_time(1_500_000_000 * 10**9 + 5) == "1500000000.000000005"
    assert parse_time("1796179633.077739914") == 1796179633077739914
    assert parse_time("12") == 12 * 10**9
    for bad in ("", "x", "1e9", "1." + "9" * 20, "9" * 40, None):
        assert parse_time(bad) is None


def test_long_names_and_nested(fs: FS, t: FakeTransport) -> None:
    long = "L" * 200
    fs.ops.mkdir("/a", 0o755)
    fs.ops.mkdir("/a/b", 0o700)
    fs.write(f"/a/b/{long}", b"x" * 10000)
    assert fs.names("/a/b") == [long]
    disk = fs.cpath(f"/a/b/{long}").rpartition("/")[2]
    assert disk.startswith("gocryptfs.longname.")
    assert any(k.endswith(disk + ".name") for k in t.objects)
    fs2 = FS(t)
    assert fs2.read(f"/a/b/{long}") == b"x" * 10000
    fs2.close()


def test_posix_content_ops(fs: FS) -> None:
    data = os.urandom(3 * 4096 + 100)
    fs.write("/f", data)
    fh = fs.ops.open("/f", os.O_RDWR)
    fs.ops.write("/f", b"ABC", 4095, fh)  # across a block boundary
    fs.ops.write("/f", b"tail", len(data), fh)  # append
    fs.ops.truncate("/f", 20000, fh)  # grow (sparse)
    fs.ops.release("/f", fh)
    want = bytearray(data)
    want[4095:4098] = b"ABC"
    want += b"tail"
    want += bytes(20000 - len(want))
    assert fs.read("/f") == bytes(want)
    fs.ops.truncate("/f", 5000)
    assert FS(fs.t).read("/f") == bytes(want[:5000])
    fh = fs.ops.open("/f", os.O_WRONLY | os.O_TRUNC)
    fs.ops.release("/f", fh)
    assert fs.read("/f") == b""
    assert fs.ops.getattr("/f")["st_size"] == 0


def test_unlinked_open_file_stays_readable(fs: FS) -> None:
    fs.write("/u", b"keep me" * 1000)
    fh = fs.ops.open("/u", os.O_RDONLY)
    fs.ops.unlink("/u")
    assert fs.ops.read(None, 7, 0, fh) == b"keep me"
    fs.ops.release(None, fh)
    with pytest.raises(FileNotFoundError):
        fs.ops.getattr("/u")


# -- reads: request counts ------------------------------------------------------------------


def test_random_4k_read_is_one_get_of_at_most_two_blocks(fs: FS, t: FakeTransport) -> None:
    data = os.urandom(8 * MiB)
    fs.write("/big", data)
    cold = FS(t)
    fh = cold.ops.open("/big", os.O_RDONLY)
    rnd = random.Random(1)
    cold.ops.read(None, 1, 4096 * 7, fh)  # header known from here on
    for _ in range(20):
        off = rnd.randrange(0, len(data) - 4096)
        t.reset_counts()
        assert cold.ops.read(None, 4096, off, fh) == data[off : off + 4096]
        assert t.counts["get"] == 1, t.log
        assert t.log[0][2] <= 2 * CIPHER_BS
        assert sum(t.counts.values()) == 1
    cold.ops.release(None, fh)
    cold.close()


def test_sequential_read_uses_chunks_and_readahead(fs: FS, t: FakeTransport) -> None:
    data = os.urandom(6 * MiB)
    fs.write("/seq", data)
    cold = FS(t)
    t.reset_counts()
    assert cold.read("/seq") == data
    # ~1 MiB chunks: a handful of GETs, not one per 128 KiB request.
    assert t.counts["get"] <= 8
    assert cold.backend.cache_bytes_used() <= cold.backend.cache_bytes
    cold.close()
    assert cold.backend.cache_bytes_used() == 0  # dropped at unmount


# -- writes: multipart, part copy ---------------------------------------------------------


def test_large_file_multipart_and_small_overwrite_copies_the_rest(t: FakeTransport) -> None:
    fs = FS(t, part_size=5 * MiB, multipart_threshold=6 * MiB)
    data = os.urandom(24 * MiB)
    t.reset_counts()
    fs.write("/m", data)
    assert t.counts["complete_multipart"] == 1 and t.counts["upload_part"] >= 4
    assert fs.read("/m") == data
    t.reset_counts()
    fh = fs.ops.open("/m", os.O_RDWR)
    fs.ops.write("/m", b"Z", 12 * MiB, fh)
    fs.ops.release("/m", fh)
    uploaded = sum(n for op, _, n in t.log if op == "upload_part")
    assert t.counts["upload_part"] == 1 and uploaded <= 5 * MiB + CIPHER_BS
    assert t.counts["upload_part_copy"] >= 1
    data = data[: 12 * MiB] + b"Z" + data[12 * MiB + 1 :]
    assert FS(t).read("/m") == data
    fs.close()


def test_readers_never_see_half_written_objects(t: FakeTransport) -> None:
    fs = FS(t, part_size=5 * MiB, multipart_threshold=6 * MiB)
    old = os.urandom(12 * MiB)
    fs.write("/r", old)
    key = PRE + fs.cpath("/r")
    before = t.body(key)
    fh = fs.ops.open("/r", os.O_RDWR)
    fs.ops.write("/r", os.urandom(12 * MiB), 0, fh)
    t.fail_next("complete_multipart", 1, lambda: TransientError("cut"))
    with pytest.raises(OSError) as ei:
        fs.ops.fsync("/r", 0, fh)
    assert ei.value.errno == errno.EIO
    assert t.body(key) == before and not t.uploads  # aborted, old version intact
    fs.ops.fsync("/r", 0, fh)  # the spool was kept: the retry publishes
    fs.ops.release("/r", fh)
    assert t.body(key) != before
    fs.close()


def test_failed_close_keeps_data_and_retries(fs: FS, t: FakeTransport) -> None:
    fh = fs.ops.create("/p", 0o644)
    fs.ops.write("/p", b"precious", 0, fh)
    t.fail_next("put", 2)
    with pytest.raises(OSError) as ei:
        fs.ops.flush("/p", fh)
    assert ei.value.errno == errno.EIO
    fs.ops.release("/p", fh)  # fails too: kept as pending
    assert fs.backend.pending_uploads() == 1
    assert fs.backend.retry_pending() == 0
    assert FS(t).read("/p") == b"precious"


def test_spool_holds_ciphertext_only(fs: FS) -> None:
    marker = b"PLAINTEXT-MARKER-" * 300
    fh = fs.ops.create("/s", 0o644)
    fs.ops.write("/s", marker, 0, fh)
    st = fs.ops.files.get(fh).handle.state
    spooled = os.pread(st.spool, 1 << 20, 0)
    assert spooled and b"PLAINTEXT-MARKER" not in spooled
    fs.ops.release("/s", fh)


def test_leak_scan(fs: FS, t: FakeTransport) -> None:
    m = "SECRETMARK"
    fs.ops.mkdir(f"/{m}dir", 0o755)
    fs.write(f"/{m}dir/{m}file", m.encode() * 100)
    fs.ops.symlink(f"/{m}link", f"/{m}target")
    fs.ops.rename(f"/{m}dir/{m}file", f"/{m}dir/{m}moved")
    with pytest.raises(OSError):
        fs.ops.setxattr(f"/{m}link", f"user.{m}", m.encode(), 0)
    for k, o in t.objects.items():
        blob = (k + repr(o.metadata) + o.content_type).encode() + o.body
        assert m.encode() not in blob and m.lower().encode() not in blob


# -- namespace ----------------------------------------------------------------------------


def test_readdir_pages_past_1000(t: FakeTransport) -> None:
    t.max_keys_cap = 1000
    fs = FS(t)
    fs.ops.mkdir("/many", 0o755)
    names = [f"f{i:04d}" for i in range(1203)]
    for n in names:
        fs.write(f"/many/{n}", b"")
    assert FS(t).names("/many") == names
    t.reset_counts()
    cold = FS(t)
    assert cold.names("/many") == names
    assert t.counts["list"] >= 2
    fs.close()


def test_lookups_in_listed_or_new_dirs_cost_nothing(fs: FS, t: FakeTransport) -> None:
    fs.ops.mkdir("/new", 0o755)
    t.reset_counts()
    for i in range(10):
        with pytest.raises(FileNotFoundError):
            fs.ops.getattr(f"/new/x{i}")
        fs.write(f"/new/x{i}", b"1")
    assert t.counts["head"] == 0 and t.counts["list"] == 0
    assert t.counts["put"] == 20  # s3fs: empty object at create, body at close


def test_rename_file_and_dir(fs: FS, t: FakeTransport) -> None:
    fs.ops.mkdir("/d", 0o755)
    fs.ops.mkdir("/d/sub", 0o755)
    fs.write("/d/sub/f", b"data")
    fs.write("/d/g", b"gg")
    fs.ops.rename("/d/g", "/d/g2")
    assert fs.names("/d") == ["g2", "sub"]
    fs.ops.rename("/d", "/e")
    assert fs.names("/") == ["e"]
    assert fs.read("/e/sub/f") == b"data"
    assert not any(k.startswith(PRE + INTENT_PREFIX) for k in t.objects)
    cold = FS(t)
    assert cold.read("/e/sub/f") == b"data" and cold.read("/e/g2") == b"gg"
    with pytest.raises(OSError) as ei:
        fs.ops.link("/e/hard", "/e/g2")
    assert ei.value.errno == errno.EPERM


def test_dir_rename_interrupted_is_finished_by_recovery(fs: FS, t: FakeTransport) -> None:
    fs.ops.mkdir("/src", 0o755)
    for i in range(5):
        fs.write(f"/src/f{i}", str(i).encode())
    t.fail_next("delete_many", 1, lambda: TransientError("daemon died"))
    with pytest.raises(OSError):
        fs.ops.rename("/src", "/dst")
    assert any(k.startswith(PRE + INTENT_PREFIX) for k in t.objects)  # left behind
    fresh = ObjectStoreBackend(t, PRE)
    assert fresh.recover_renames() == 1
    cold = FS(t)
    assert cold.names("/") == ["dst"]
    assert [cold.read(f"/dst/f{i}") for i in range(5)] == [str(i).encode() for i in range(5)]
    assert not any(k.startswith(PRE + INTENT_PREFIX) for k in t.objects)


def test_hostile_intent_is_ignored(t: FakeTransport) -> None:
    for body in (b"{", b'{"v":1,"from":"../x","to":"y"}', b'{"v":1,"from":"a","to":"a/b"}'):
        t.put_raw(PRE + INTENT_PREFIX + os.urandom(4).hex(), body)
    assert ObjectStoreBackend(t, PRE).recover_renames() == 0


def test_metadata_ops_copy_onto_itself(fs: FS, t: FakeTransport) -> None:
    fs.write("/f", b"x")
    key = PRE + fs.cpath("/f")
    t.reset_counts()
    fs.ops.chmod("/f", 0o600)
    fs.ops.utimens("/f", (1_000_000_000 * 10**9, 1_500_000_000 * 10**9 + 7))
    fs.ops.chown("/f", 1234, 5678)
    assert t.counts["copy"] == 3 and t.counts["put"] == 0
    meta = t.objects[key].metadata
    assert meta["mode"] == str(stat.S_IFREG | 0o600)
    assert meta["mtime"] == "1500000000.000000007" and meta["atime"] == "1000000000"
    assert (meta["uid"], meta["gid"]) == ("1234", "5678")
    st = FS(t).ops.getattr("/f")
    assert st["st_mode"] == stat.S_IFREG | 0o600 and st["st_mtime"] == 1_500_000_000 * 10**9 + 7
    assert (st["st_uid"], st["st_gid"]) == (1234, 5678)
    assert fs.ops.statfs("/")["f_blocks"] > 0


def test_implicit_dirs_and_foreign_objects_readable(fs: FS, t: FakeTransport) -> None:
    fs.ops.mkdir("/imp", 0o755)
    fs.write("/imp/f", b"inside")
    cd = fs.cpath("/imp")
    del t.objects[PRE + cd + "/"]  # only a common prefix now
    cold = FS(t)
    assert cold.names("/") == ["imp"]
    assert cold.ops.getattr("/imp")["st_mode"] == stat.S_IFDIR | 0o750
    assert cold.read("/imp/f") == b"inside"
    cold.ops.chmod("/imp", 0o700)  # materialises the marker, as s3fs does
    assert t.objects[PRE + cd + "/"].metadata["mode"] == str(stat.S_IFDIR | 0o700)


def test_hostile_listing_entries_are_skipped(fs: FS, t: FakeTransport) -> None:
    fs.write("/ok", b"1")
    for k in ("..", ".", "a//b/", "bad\x00name", "x\nline"):
        t.put_raw(PRE + k, b"")
    assert fs.names("/") == ["ok"]


def test_bad_metadata_falls_back_like_s3fs(t: FakeTransport) -> None:
    b = ObjectStoreBackend(t, PRE)
    t.put_raw(PRE + "nometa", b"abc")
    t.put_raw(PRE + "dev", b"", {"mode": str(stat.S_IFCHR | 0o666), "uid": "-1", "mtime": "x"})
    t.put_raw(PRE + "huge", b"", {"mode": "9" * 30, "gid": "99999999999"})
    assert b.lstat("nometa").mode == stat.S_IFREG | 0o640
    assert stat.S_ISREG(b.lstat("dev").mode)  # never a device node
    assert b.lstat("huge").mode == stat.S_IFREG | 0o640


# -- tamper: the crypto layer above answers EIO ---------------------------------------------


@pytest.mark.parametrize("how", ["flip", "truncate", "header-swap", "block-swap"])
def test_tampered_objects_read_as_eio(fs: FS, t: FakeTransport, how: str) -> None:
    a, b = os.urandom(10000), os.urandom(10000)
    fs.write("/a", a)
    fs.write("/b", b)
    ka, kb = PRE + fs.cpath("/a"), PRE + fs.cpath("/b")
    body = bytearray(t.body(ka))
    if how == "flip":
        body[HEADER_LEN + 100] ^= 1
        t.put_raw(ka, bytes(body), t.objects[ka].metadata)
    elif how == "truncate":
        t.put_raw(ka, bytes(body[: HEADER_LEN + CIPHER_BS + 10]), t.objects[ka].metadata)
    elif how == "header-swap":  # (whole-file swaps are undetectable, as on local disk)
        t.put_raw(ka, t.body(kb)[:HEADER_LEN] + bytes(body[HEADER_LEN:]), t.objects[ka].metadata)
    else:
        b1 = slice(HEADER_LEN, HEADER_LEN + CIPHER_BS)
        b2 = slice(HEADER_LEN + CIPHER_BS, HEADER_LEN + 2 * CIPHER_BS)
        body[b1], body[b2] = body[b2], body[b1]
        t.put_raw(ka, bytes(body), t.objects[ka].metadata)
    cold = FS(t)
    with pytest.raises(OSError) as ei:
        cold.read("/a")
    assert ei.value.errno == errno.EIO


def test_no_symlink_follow_or_escape(fs: FS) -> None:
    for bad in ("../x", "/abs", "a/../b", "a//b"):
        with pytest.raises(OSError) as ei:
            fs.backend.lstat(bad)
        assert ei.value.errno == errno.EINVAL
    fs.ops.symlink("/l", "x")
    with pytest.raises(OSError) as ei:
        fs.backend.open(fs.cpath("/l"), os.O_RDONLY)
    assert ei.value.errno == errno.ELOOP


def test_core_unused() -> None:
    assert CryptOperations and CryptoCore  # imported for type context of FS


def test_stale_negative_cache_never_empties_a_file(t: FakeTransport) -> None:
    """O_CREAT on a name the cache believes absent (another writer made it meanwhile)
    opens the existing object instead of replacing it with an empty one."""
    be = ObjectStoreBackend(t, PRE)
    with pytest.raises(FileNotFoundError):
        be.lstat("x")  # cached: absent
    t.put_raw(PRE + "x", b"existing content", {"mode": "33188"})
    h = be.open("x", os.O_RDWR | os.O_CREAT, 0o644)
    assert be.pread(h, 100, 0) == b"existing content"
    be.close(h)
    assert t.body(PRE + "x") == b"existing content"
    with pytest.raises(FileExistsError):
        be.open("x", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    be.destroy()


def test_endless_listing_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that pages forever with fresh tokens and names ends in EIO, not in
    unbounded memory."""
    from fuse_crypt.backend import objectstore
    from fuse_crypt.backend.transport import ListPage, ObjectInfo

    class Endless(FakeTransport):
        n = 0

        def list(self, prefix: str, **kw: object) -> ListPage:  # type: ignore[override]
            self.n += 1
            keys = tuple(ObjectInfo(f"{prefix}n{self.n}-{i}", 0, "e", 0) for i in range(100))
            return ListPage(keys, (), f"tok{self.n}")

    monkeypatch.setattr(objectstore, "DIR_ENTRIES_MAX", 5000)
    t = Endless()
    be = ObjectStoreBackend(t, PRE)
    t.put_raw(PRE + "d/", b"", {"mode": "493"}, DIR_CONTENT_TYPE)
    with pytest.raises(OSError) as ei:
        be.listdir("d")
    assert ei.value.errno == errno.EIO and t.n <= 60


def test_background_retry_publishes_a_failed_close(fs: FS, t: FakeTransport) -> None:
    import time

    fh = fs.ops.create("/bg", 0o644)
    fs.ops.write("/bg", b"retry me", 0, fh)
    t.fail_next("put", 1)
    fs.ops.release("/bg", fh)  # the upload at close fails: kept, retried in the background
    deadline = time.monotonic() + 10
    while fs.backend.pending_uploads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fs.backend.pending_uploads() == 0
    assert FS(t).read("/bg") == b"retry me"


def test_creates_cost_one_put_each_once_the_dir_iv_is_known(fs: FS, t: FakeTransport) -> None:
    """The frontend re-reads the parent's dir IV on every create (against IV swaps on
    local disk); dir IVs are write-once, so the backend answers from its node cache."""
    fs.ops.mkdir("/c", 0o755)
    fs.write("/c/first", b"")
    t.reset_counts()
    for i in range(20):
        fs.write(f"/c/f{i}", b"")
    assert t.counts == {"put": 20}, t.counts


def test_rename_over_an_open_file(fs: FS, t: FakeTransport) -> None:
    """POSIX: a handle on the replaced file keeps reading its old content, and closing
    it never publishes that content over the file that replaced it."""
    fs.write("/a", b"A" * 5000)
    fs.write("/b", b"B" * 7000)
    fh = fs.ops.open("/b", os.O_RDWR)
    assert fs.ops.read(None, 10, 0, fh) == b"B" * 10
    fs.ops.rename("/a", "/b")
    assert fs.ops.read(None, 7000, 0, fh) == b"B" * 7000
    fs.ops.write(None, b"late", 0, fh)
    fs.ops.flush(None, fh)
    fs.ops.release(None, fh)
    assert fs.ops.getattr("/b")["st_size"] == 5000
    assert FS(t).read("/b") == b"A" * 5000


def test_chmod_while_dirty_keeps_the_write_mtime(fs: FS, t: FakeTransport) -> None:
    fs.write("/m", b"old")
    fs.ops.utimens("/m", (10**18, 10**18))
    fh = fs.ops.open("/m", os.O_RDWR)
    fs.ops.write(None, b"new", 0, fh)  # mtime := now
    fs.ops.chmod("/m", 0o600)
    fs.ops.release(None, fh)
    st = FS(t).ops.getattr("/m")
    assert st["st_mode"] & 0o777 == 0o600 and st["st_mtime"] != 10**18


def test_concurrent_open_write_close_of_shared_names(fs: FS, t: FakeTransport) -> None:
    """8 threads create, overwrite and close 3 shared files: no errors, and each file ends
    as one writer's payload, whole (a few seconds at most)."""
    import concurrent.futures

    payloads = [bytes([i]) * 9000 for i in range(8)]

    def worker(i: int) -> None:
        rnd = random.Random(i)
        for _ in range(25):
            name = f"/s{rnd.randrange(3)}"
            fh = fs.ops.create(name, 0o644)
            try:
                fs.ops.write(name, payloads[i], 0, fh)
                fs.ops.flush(name, fh)
            finally:
                fs.ops.release(name, fh)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    cold = FS(t)
    for n in range(3):
        assert cold.read(f"/s{n}") in payloads
    assert fs.backend.pending_uploads() == 0
