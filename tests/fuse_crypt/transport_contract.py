"""The ObjectTransport contract, as one reusable test class.

Why one suite for every transport: the object backend is tested in-process against a fake,
so the fake must behave like S3 and OSS do, and both real clients must behave like each
other; the same assertions run against all of them.  Apply it with a few lines::

    import pytest
    from tests.fuse_crypt.transport_contract import TransportContract

    class TestMyTransport(TransportContract):
        @pytest.fixture
        def make_transport(self):
            return lambda max_body=None: MyTransport(..., max_body=max_body or 64 << 20)

``make_transport(max_body=None)`` returns a transport on one bucket that the tests share
(each test works under its own random prefix, so the bucket may be module-scoped).
``max_body=None`` means the transport's default bound.  Override ``part_size`` with the
store's minimum size of a non-last multipart part (S3 5 MiB, OSS 100 KB), and set
``bounds_bodies = False`` for a fake without a ``max_body``.

Semantics pinned here (the protocol's docstrings leave them open):

* ``get`` from ``start >= size`` (and from an empty object) is ``b""``, not an error; a
  range running past the end is answered short; ``length=0`` is ``b""``.
* An answer longer than ``max_body`` is :class:`BadResponse`, whatever ``length`` said
  (asking for more than ``max_body`` is not an error by itself: the answer may be short).
* ``copy`` with only one of ``metadata`` / ``content_type`` keeps the other from the
  source (a chmod of a directory marker keeps ``application/x-directory``).
* ``abort_multipart`` of an unknown upload succeeds; a part uploaded to an aborted upload
  and a complete of it fail typed (OSS/S3: ``ObjectNotFound``; moto 5.2.5 answers 500), and
  the key is not created.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import time
import uuid
from collections.abc import Callable

import pytest

from fuse_crypt.backend.transport import (
    BadResponse,
    ListPage,
    ObjectNotFound,
    ObjectStoreError,
    ObjectTransport,
    PreconditionFailed,
)

MiB = 1024 * 1024
META = {"mode": "33188", "uid": "1000", "gid": "1000", "mtime": "1700000000.000000001"}
ODD_NAMES = ["a b+c%20.txt", "q?x=1&y#z", "ünïcødé", "semi;colon,comma", "tilde~star*"]


def list_all(t: ObjectTransport, prefix: str, *, delimiter: str = "/", max_keys: int = 1000):
    """Every page of a listing: (object keys, common prefixes, pages)."""
    keys: list[str] = []
    prefixes: list[str] = []
    token: str | None = None
    pages = 0
    while True:
        page: ListPage = t.list(prefix, delimiter=delimiter, token=token, max_keys=max_keys)
        pages += 1
        assert len(page.objects) + len(page.common_prefixes) <= max_keys
        keys += [o.key for o in page.objects]
        prefixes += list(page.common_prefixes)
        token = page.next_token
        if token is None:
            return keys, prefixes, pages
        assert pages < 10_000


class TransportContract:
    """Mixin: subclasses provide the ``make_transport`` fixture (see the module docstring)."""

    part_size: int = 5 * MiB
    bounds_bodies: bool = True  # False: make_transport ignores max_body (an in-memory fake)

    @pytest.fixture
    def make_transport(self) -> Callable[..., ObjectTransport]:
        raise NotImplementedError("subclass and provide make_transport")

    @pytest.fixture
    def t(self, make_transport: Callable[..., ObjectTransport]) -> ObjectTransport:
        return make_transport()

    @pytest.fixture
    def p(self) -> str:
        return f"contract-{uuid.uuid4().hex[:12]}/"

    # -- put / head / get ------------------------------------------------------------------

    def test_put_head_get_round_trip(self, t: ObjectTransport, p: str) -> None:
        before = time.time_ns()
        etag = t.put(p + "f", b"hello world", metadata=META, content_type="text/plain")
        info = t.head(p + "f")
        assert info.key == p + "f"
        assert info.size == 11
        assert info.etag == etag and etag
        assert dict(info.metadata) == META
        assert info.content_type == "text/plain"
        assert abs(info.last_modified_ns - before) < 300 * 10**9
        assert t.get(p + "f") == b"hello world"

    def test_metadata_names_are_lower_case(self, t: ObjectTransport, p: str) -> None:
        t.put(p + "f", b"x", metadata={"Mode": "493"})
        assert dict(t.head(p + "f").metadata) == {"mode": "493"}

    def test_default_content_type(self, t: ObjectTransport, p: str) -> None:
        t.put(p + "f.txt", b"x", metadata={})
        assert t.head(p + "f.txt").content_type == "application/octet-stream"

    def test_put_replaces_whole_object_and_metadata(self, t: ObjectTransport, p: str) -> None:
        t.put(p + "f", b"first version, long", metadata={"mode": "1", "uid": "2"})
        t.put(p + "f", b"second", metadata={"mode": "3"})
        assert t.get(p + "f") == b"second"
        assert dict(t.head(p + "f").metadata) == {"mode": "3"}

    def test_missing_key(self, t: ObjectTransport, p: str) -> None:
        for call in (lambda: t.head(p + "nope"), lambda: t.get(p + "nope", 0, 10)):
            with pytest.raises(ObjectNotFound) as e:
                call()
            assert e.value.errno == errno.ENOENT
            assert isinstance(e.value, OSError)

    def test_ranged_get(self, t: ObjectTransport, p: str) -> None:
        data = bytes(range(256)) * 40  # 10,240 bytes
        t.put(p + "f", data, metadata={})
        assert t.get(p + "f", 0, 10) == data[:10]
        assert t.get(p + "f", 4096, 4096) == data[4096:8192]
        assert t.get(p + "f", 10_000) == data[10_000:]
        assert t.get(p + "f", 10_000, 1000) == data[10_000:]  # short at the end
        assert t.get(p + "f", 10_239, 1) == data[-1:]

    def test_ranged_get_past_end_is_empty(self, t: ObjectTransport, p: str) -> None:
        t.put(p + "f", b"0123456789", metadata={})
        assert t.get(p + "f", 10, 5) == b""
        assert t.get(p + "f", 11) == b""
        assert t.get(p + "f", 1 << 40, 4096) == b""
        assert t.get(p + "f", 3, 0) == b""

    def test_get_buffer_is_get_in_one_buffer(self, t: ObjectTransport, p: str) -> None:
        """``get_buffer`` (the read-ahead's GET, see docs "Daemon memory"): the same
        bytes, bounds and short answers as ``get``; through the retrying wrapper, which
        falls back to ``get`` for a transport without it."""
        from fuse_crypt.backend.retrying import RetryingTransport

        data = bytes(range(256)) * 40
        t.put(p + "f", data, metadata={})
        wrapped = RetryingTransport(t)
        for gb in (getattr(t, "get_buffer", None), wrapped.get_buffer):
            if gb is None:
                continue
            assert gb(p + "f", 4096, 4096) == data[4096:8192]
            assert gb(p + "f", 10_000, 1000) == data[10_000:]  # short at the end, not padded
            assert gb(p + "f", 10_240, 5) == b""  # past the end
            with pytest.raises(ObjectNotFound):
                gb(p + "nope", 0, 10)

    def test_get_buffer_over_max_body_is_bad_response(
        self, make_transport: Callable[..., ObjectTransport], p: str
    ) -> None:
        small = make_transport(max_body=1000)
        gb = getattr(small, "get_buffer", None)
        if gb is None or not self.bounds_bodies:
            return  # nothing to bound (the fake); the fallback is covered above
        small.put(p + "big", os.urandom(1001), metadata={})
        with pytest.raises(BadResponse):
            gb(p + "big", 0, 5000)
        assert len(gb(p + "big", 1, 1000)) == 1000

    def test_open_stream_reads_chunks_in_order(self, t: ObjectTransport, p: str) -> None:
        """``open_stream`` (sequential readers, issue 10): one GET ``[start, end)`` read
        in exact pieces; reading past the range is refused, a missing key is typed; the
        retrying wrapper hands the inner one out unretried (None when there is none)."""
        from fuse_crypt.backend.retrying import RetryingTransport

        data = os.urandom(3 * MiB + 5000)
        t.put(p + "f", data, metadata={})
        wrapped = RetryingTransport(t)
        for opener in (getattr(t, "open_stream", None), wrapped.open_stream):
            if opener is None:
                continue
            s = opener(p + "f", 1000, len(data))
            try:
                got = s.read_exact(MiB)
                assert isinstance(got, bytearray) and got == data[1000 : 1000 + MiB]
                with pytest.raises(ValueError):
                    s.read_exact(2 * MiB, bytearray(MiB))  # a reused buffer of another size
                mine = bytearray(b"x" * 2 * MiB)
                got = s.read_exact(2 * MiB, mine)  # filled in place (a reused buffer)
                assert got is mine and mine == data[1000 + MiB : 1000 + 3 * MiB]
                rest = len(data) - 1000 - 3 * MiB
                with pytest.raises(ObjectStoreError):
                    s.read_exact(rest + 1)  # past the requested range
            finally:
                s.close()
                s.close()  # idempotent
            s = opener(p + "f", 5, 10)
            assert s.read_exact(5) == data[5:10]
            s.close()
            with pytest.raises(ObjectNotFound):
                opener(p + "nope", 0, 10)
            with pytest.raises(ObjectStoreError):
                opener(p + "f", len(data) + 10, len(data) + 20)  # not satisfiable

    def test_empty_object(self, t: ObjectTransport, p: str) -> None:
        t.put(p + "e", b"", metadata={"mode": "33188"})
        assert t.head(p + "e").size == 0
        assert t.get(p + "e") == b""
        assert t.get(p + "e", 0, 4096) == b""

    def test_answer_over_max_body_is_bad_response(
        self, make_transport: Callable[..., ObjectTransport], p: str
    ) -> None:
        if not self.bounds_bodies:
            pytest.skip("this transport has no max_body")
        small = make_transport(max_body=1000)
        small.put(p + "big", os.urandom(1001), metadata={})
        with pytest.raises(BadResponse) as e:
            small.get(p + "big")
        assert e.value.errno == errno.EIO
        with pytest.raises(BadResponse):
            small.get(p + "big", 0, 5000)
        assert len(small.get(p + "big", 0, 1000)) == 1000
        assert len(small.get(p + "big", 1, 1000)) == 1000

    def test_odd_key_names(self, t: ObjectTransport, p: str) -> None:
        for i, name in enumerate(ODD_NAMES):
            t.put(p + name, name.encode(), metadata={"mode": str(i)})
        for i, name in enumerate(ODD_NAMES):
            assert t.get(p + name) == name.encode()
            assert t.head(p + name).metadata["mode"] == str(i)
        keys, _, _ = list_all(t, p)
        assert sorted(keys) == sorted(p + n for n in ODD_NAMES)

    # -- create-only -----------------------------------------------------------------------

    def test_create_only_put(self, t: ObjectTransport, p: str) -> None:
        t.put(p + "c", b"one", metadata={}, if_none_match=True)
        with pytest.raises(PreconditionFailed) as e:
            t.put(p + "c", b"two", metadata={}, if_none_match=True)
        assert e.value.errno == errno.EEXIST
        assert t.get(p + "c") == b"one"

    # -- copy ------------------------------------------------------------------------------

    def test_copy_keeps_metadata(self, t: ObjectTransport, p: str) -> None:
        t.put(p + "src", b"payload", metadata=META, content_type="text/plain")
        etag = t.copy(p + "src", p + "dst")
        info = t.head(p + "dst")
        assert etag and dict(info.metadata) == META and info.content_type == "text/plain"
        assert t.get(p + "dst") == b"payload"
        assert t.get(p + "src") == b"payload"

    def test_copy_with_replace_metadata(self, t: ObjectTransport, p: str) -> None:
        t.put(p + "src", b"payload", metadata=META)
        t.copy(p + "src", p + "dst", metadata={"mode": "33261"})
        assert dict(t.head(p + "dst").metadata) == {"mode": "33261"}
        assert dict(t.head(p + "src").metadata) == META

    def test_copy_onto_itself_replaces_metadata(self, t: ObjectTransport, p: str) -> None:
        """chmod/utimens the s3fs way: copy the object onto itself with new metadata."""
        t.put(p + "f", b"payload", metadata=META)
        t.copy(p + "f", p + "f", metadata={**META, "mode": "33152"}, content_type="text/x-a")
        info = t.head(p + "f")
        assert info.metadata["mode"] == "33152" and info.content_type == "text/x-a"
        assert t.get(p + "f") == b"payload"

    def test_copy_new_metadata_keeps_content_type(self, t: ObjectTransport, p: str) -> None:
        """chmod of a directory marker: new metadata, the same application/x-directory."""
        t.put(p + "d/", b"", metadata=META, content_type="application/x-directory")
        t.copy(p + "d/", p + "d/", metadata={**META, "mode": "16877"})
        info = t.head(p + "d/")
        assert info.content_type == "application/x-directory"
        assert info.metadata["mode"] == "16877"

    def test_copy_new_content_type_keeps_metadata(self, t: ObjectTransport, p: str) -> None:
        t.put(p + "src", b"payload", metadata=META)
        t.copy(p + "src", p + "dst", content_type="application/x-directory")
        info = t.head(p + "dst")
        assert info.content_type == "application/x-directory" and dict(info.metadata) == META

    def test_copy_missing_source(self, t: ObjectTransport, p: str) -> None:
        with pytest.raises(ObjectNotFound):
            t.copy(p + "nope", p + "dst")
        with pytest.raises(ObjectNotFound):
            t.head(p + "dst")

    # -- delete ----------------------------------------------------------------------------

    def test_delete(self, t: ObjectTransport, p: str) -> None:
        t.put(p + "f", b"x", metadata={})
        t.delete(p + "f")
        with pytest.raises(ObjectNotFound):
            t.head(p + "f")
        t.delete(p + "f")  # absent: still fine

    def test_delete_many(self, t: ObjectTransport, p: str) -> None:
        names = [p + f"k{i}" for i in range(5)]
        for n in names:
            t.put(n, b"x", metadata={})
        t.delete_many([*names, p + "never-existed"])
        assert list_all(t, p)[0] == []
        t.delete_many([])

    # -- list ------------------------------------------------------------------------------

    def test_list_shapes(self, t: ObjectTransport, p: str) -> None:
        t.put(p + "a", b"12345", metadata={})
        t.put(p + "d/", b"", metadata={}, content_type="application/x-directory")
        t.put(p + "d/x", b"", metadata={})
        t.put(p + "implicit/y", b"", metadata={})
        page = t.list(p)
        assert [o.key for o in page.objects] == [p + "a"]
        assert page.objects[0].size == 5
        assert page.objects[0].etag == t.head(p + "a").etag
        assert sorted(page.common_prefixes) == [p + "d/", p + "implicit/"]
        assert page.next_token is None
        inner = t.list(p + "d/")
        assert sorted(o.key for o in inner.objects) == [p + "d/", p + "d/x"]
        flat, prefixes, _ = list_all(t, p, delimiter="")
        assert sorted(flat) == [p + "a", p + "d/", p + "d/x", p + "implicit/y"]
        assert prefixes == []
        assert t.list(p + "nothing-here/") == ListPage((), (), None)

    def test_list_small_pages_match_one_page(self, t: ObjectTransport, p: str) -> None:
        for name in ["a", "b/", "b/1", "c", "d/e/f", "e", "f/", "g"]:
            t.put(p + name, b"", metadata={})
        one = list_all(t, p)
        small = list_all(t, p, max_keys=2)
        assert sorted(small[0]) == sorted(one[0]) == [p + "a", p + "c", p + "e", p + "g"]
        assert sorted(small[1]) == sorted(one[1]) == [p + "b/", p + "d/", p + "f/"]
        assert small[2] == 4 and one[2] == 1

    def test_list_pagination_past_1000_with_delimiter(self, t: ObjectTransport, p: str) -> None:
        files = [p + f"file-{i:05d}" for i in range(1010)]
        dirs = [p + f"dir-{i}/" for i in range(3)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: t.put(k, b"", metadata={}), files))
            list(pool.map(lambda d: t.put(d + "child", b"", metadata={}), dirs))
        first = t.list(p, max_keys=1000)
        assert len(first.objects) + len(first.common_prefixes) == 1000
        assert first.next_token is not None
        keys, prefixes, pages = list_all(t, p)
        assert pages == 2
        assert sorted(keys) == files
        assert sorted(prefixes) == dirs
        assert len(set(keys)) == len(keys)
        t.delete_many(files[:1000])
        t.delete_many(files[1000:] + [d + "child" for d in dirs])

    def test_list_page_size_is_bounded(self, t: ObjectTransport, p: str) -> None:
        """max_keys above 1,000 is refused (ObjectStoreError) or capped, never exceeded."""
        files = [p + f"f{i:04d}" for i in range(1001)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: t.put(k, b"", metadata={}), files))
        try:
            page = t.list(p, max_keys=1001)
        except ObjectStoreError:
            pass
        else:
            assert len(page.objects) <= 1000 and page.next_token is not None
        t.delete_many(files[:1000])
        t.delete_many(files[1000:])

    # -- multipart -------------------------------------------------------------------------

    def test_multipart_upload(self, t: ObjectTransport, p: str) -> None:
        part1, part2 = os.urandom(self.part_size), os.urandom(1234)
        uid = t.create_multipart(p + "mp", metadata=META, content_type="text/plain")
        e2 = t.upload_part(p + "mp", uid, 2, part2)  # any order
        e1 = t.upload_part(p + "mp", uid, 1, part1)
        etag = t.complete_multipart(p + "mp", uid, [(1, e1), (2, e2)])
        info = t.head(p + "mp")
        assert info.size == len(part1) + len(part2)
        assert info.etag == etag
        assert dict(info.metadata) == META and info.content_type == "text/plain"
        assert t.get(p + "mp", self.part_size - 10, 20) == (part1 + part2)[-1244:-1224]

    def test_multipart_with_upload_part_copy(self, t: ObjectTransport, p: str) -> None:
        """The s3fs small-overwrite: unchanged ranges copied server-side, one part sent."""
        n = self.part_size
        old = os.urandom(3 * n + 100)
        t.put(p + "big", old, metadata=META)
        uid = t.create_multipart(p + "big", metadata={**META, "mtime": "2"})
        new_middle = os.urandom(n)
        parts = [
            (1, t.upload_part_copy(p + "big", uid, 1, p + "big", 0, n)),
            (2, t.upload_part(p + "big", uid, 2, new_middle)),
            (3, t.upload_part_copy(p + "big", uid, 3, p + "big", 2 * n, n + 100)),
        ]
        assert t.get(p + "big", 0, 16) == old[:16]  # previous version until complete
        t.complete_multipart(p + "big", uid, parts)
        want = old[:n] + new_middle + old[2 * n :]
        assert t.head(p + "big").size == len(want)
        assert t.get(p + "big", n - 8, 16) == want[n - 8 : n + 8]
        assert t.get(p + "big", 2 * n - 8, 16) == want[2 * n - 8 : 2 * n + 8]
        assert t.get(p + "big", len(want) - 50) == want[-50:]
        assert t.head(p + "big").metadata["mtime"] == "2"

    def test_previous_version_readable_until_complete(self, t: ObjectTransport, p: str) -> None:
        t.put(p + "f", b"version one", metadata={"mode": "1"})
        uid = t.create_multipart(p + "f", metadata={"mode": "2"})
        e1 = t.upload_part(p + "f", uid, 1, b"version two")
        assert t.get(p + "f") == b"version one"
        assert t.head(p + "f").metadata["mode"] == "1"
        t.complete_multipart(p + "f", uid, [(1, e1)])
        assert t.get(p + "f") == b"version two"

    def test_abort(self, t: ObjectTransport, p: str) -> None:
        uid = t.create_multipart(p + "ab", metadata={})
        e1 = t.upload_part(p + "ab", uid, 1, b"data")
        t.abort_multipart(p + "ab", uid)
        # OSS and S3 answer 404 NoSuchUpload (ObjectNotFound) to both; moto 5.2.5 says 500.
        with pytest.raises(ObjectStoreError):
            t.upload_part(p + "ab", uid, 2, b"more")
        with pytest.raises(ObjectStoreError):
            t.complete_multipart(p + "ab", uid, [(1, e1)])
        with pytest.raises(ObjectNotFound):
            t.head(p + "ab")
        t.abort_multipart(p + "ab", uid)  # twice: fine

    def test_abort_unknown_upload(self, t: ObjectTransport, p: str) -> None:
        t.abort_multipart(p + "x", "0123456789ABCDEF0123456789ABCDEF")

    def test_complete_with_wrong_etag_fails_typed(self, t: ObjectTransport, p: str) -> None:
        t.put(p + "f", b"kept", metadata={})
        uid = t.create_multipart(p + "f", metadata={})
        t.upload_part(p + "f", uid, 1, b"data")
        with pytest.raises(ObjectStoreError) as e:
            t.complete_multipart(p + "f", uid, [(1, "0" * 32)])
        assert not isinstance(e.value, ObjectNotFound | PreconditionFailed)
        assert t.get(p + "f") == b"kept"
        t.abort_multipart(p + "f", uid)

    def test_errors_are_typed_oserrors(self, t: ObjectTransport, p: str) -> None:
        with pytest.raises(ObjectStoreError) as e:
            t.get(p + "nope")
        assert isinstance(e.value, OSError) and e.value.errno == errno.ENOENT
