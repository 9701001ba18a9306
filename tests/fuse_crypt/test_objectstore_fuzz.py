"""Property tests for what the bucket (the host) controls: metadata, content types, listing
entries and tokens, rename intents, and the credentials file.  Only typed errors (OSError
from the backend, CliError from the CLI) may escape."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from fuse_crypt.backend.objectstore import INTENT_PREFIX, ObjectStoreBackend, fmt_time, parse_time
from fuse_crypt.backend.transport import ListPage, ObjectInfo
from fuse_crypt.cli.exitcodes import CliError
from fuse_crypt.cli.objectloc import location_from_args
from tests.fuse_crypt.fake_transport import FakeTransport
from tests.fuzzing import fuzz, long_fuzz

_text = st.text(max_size=40) | st.from_regex(r"-?[0-9]{0,25}(\.[0-9]{0,12})?", fullmatch=True)
_meta = st.dictionaries(
    st.sampled_from(["mode", "uid", "gid", "mtime", "atime", "ctime", "xattr", "MODE"]),
    _text,
    max_size=6,
)
_ctype = st.sampled_from(
    ["", "application/x-directory", "httpd/unix-directory", "text/plain", "\x00"]
) | st.text(max_size=20)
_ALLOWED = {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK}


@long_fuzz
@fuzz(quick=200)
@given(meta=_meta, ctype=_ctype, body=st.binary(max_size=64), as_dir=st.booleans())
def test_fuzz_object_metadata(meta: dict[str, str], ctype: str, body: bytes, as_dir: bool) -> None:
    t = FakeTransport()
    t.put_raw("p/x/" if as_dir else "p/x", body, meta, ctype)
    be = ObjectStoreBackend(t, "p")
    try:
        s = be.lstat("x")
    except OSError:
        return
    finally:
        be.destroy()
    assert stat.S_IFMT(s.mode) in _ALLOWED
    assert 0 <= s.uid < 2**32 and 0 <= s.gid < 2**32 and s.size >= 0


class _HostileList(FakeTransport):
    def __init__(self, pages: list[tuple[list[str], list[str], str | None]]) -> None:
        super().__init__()
        self.pages = pages
        self.i = 0

    def list(
        self, prefix: str, *, delimiter: str = "/", token: str | None = None, max_keys: int = 1000
    ) -> ListPage:
        self.counts["list"] += 1
        if self.i >= len(self.pages):
            return ListPage((), (), None)
        keys, prefixes, nxt = self.pages[self.i]
        self.i += 1
        return ListPage(tuple(ObjectInfo(k, 0, "e", 0) for k in keys), tuple(prefixes), nxt)


_name = st.text(max_size=12) | st.sampled_from(["", ".", "..", "a/b", "ok", "\x00", "d/"])
_page = st.tuples(
    st.lists(st.builds(lambda n, p: ("p/d/" if p else "") + n, _name, st.booleans()), max_size=5),
    st.lists(st.builds(lambda n, p: ("p/d/" if p else "") + n, _name, st.booleans()), max_size=3),
    st.none() | st.sampled_from(["t1", "t2", "t1"]),
)


@long_fuzz
@fuzz(quick=200)
@given(pages=st.lists(_page, max_size=4))
def test_fuzz_listing(pages: list[tuple[list[str], list[str], str | None]]) -> None:
    t = _HostileList(pages)
    t.put_raw("p/d/", b"", {"mode": "493"}, "application/x-directory")
    be = ObjectStoreBackend(t, "p")
    try:
        names = be.listdir("d")
    except OSError:
        return
    finally:
        be.destroy()
    for n in names:
        assert "/" not in n and n not in ("", ".", "..") and "\x00" not in n


@long_fuzz
@fuzz(quick=200)
@given(
    body=st.binary(max_size=200)
    | st.builds(
        lambda a, b, v: f'{{"v":{v},"from":{a},"to":{b}}}'.encode(),
        st.sampled_from(['"a"', '"b/c"', '"../x"', '""', "1", "null", '"a/"', '"x"']),
        st.sampled_from(['"a"', '"b"', '"a/b"', '"/abs"', "[]", '"y"']),
        st.sampled_from(["1", "2", '"1"']),
    )
)
def test_fuzz_rename_intent(body: bytes) -> None:
    t = FakeTransport()
    t.put_raw("p/" + INTENT_PREFIX + "0", body)
    t.put_raw("p/x/f", b"data")
    be = ObjectStoreBackend(t, "p")
    try:
        done = be.recover_renames()
    except OSError:
        return
    finally:
        be.destroy()
    assert done in (0, 1)
    for k in t.objects:
        assert k.startswith("p/")


@long_fuzz
@fuzz(quick=100)
@given(content=st.binary(max_size=300))
def test_fuzz_credentials_file(content: bytes) -> None:
    path = Path(f"/tmp/.h10a-cred-{os.getpid()}")
    path.write_bytes(content)
    path.chmod(0o600)
    args = argparse.Namespace(
        endpoint=None,
        insecure_http=False,
        ca_bundle=None,
        credentials_file=str(path),
        region="us-east-1",
        spool_dir=None,
    )
    try:
        loc = location_from_args(args, "s3://bucket/pre")
    except CliError:
        return
    finally:
        path.unlink()
    assert loc.access_key and loc.secret_key
    assert "secret_key=" not in repr(loc) and "access_key=" not in repr(loc)


@long_fuzz
@fuzz(quick=200)
@given(ns=st.integers(-(10**18), 10**20))
def test_fuzz_time_roundtrip(ns: int) -> None:
    if ns < 0 and ns % 10**9:
        return  # negative fractional times are never written
    assert parse_time(fmt_time(ns)) == ns
