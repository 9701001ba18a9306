"""core/store.py: one publication store, saved atomically on every change (no FUSE needed)."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_driver import errors
from csi_driver.core.store import INTENT, MOUNTED, Publication, PublicationStore, parse_publication
from csi_driver.hostfile import write_json_atomic
from tests.fuzzing import fuzz, long_fuzz


def _pub(target: str = "/k/t", **kw: object) -> Publication:
    base: dict[str, object] = {
        "volume_id": "v1",
        "target_path": target,
        "cipher_dir": "/b/v1",
        "mounter": "fake",
        "readonly": False,
        "access_mode": 1,
    }
    base.update(kw)
    return Publication(**base)  # type: ignore[arg-type]


def _fresh(path: pathlib.Path) -> list[Publication]:
    return PublicationStore(str(path)).load()


def test_every_change_is_on_disk_before_it_returns(tmp_path: pathlib.Path) -> None:
    store = PublicationStore(str(tmp_path))
    store.put(_pub(phase=INTENT))
    assert _fresh(tmp_path) == [_pub(phase=INTENT)]
    store.update("/k/t", phase=MOUNTED, pid=42, pid_start=7)
    assert _fresh(tmp_path) == [_pub(pid=42, pid_start=7)]
    assert store.update("/k/other", pid=1) is None
    store.remove("/k/t")
    assert _fresh(tmp_path) == []
    assert os.listdir(tmp_path) == ["node-state.json"]  # no temp files left


def test_records_failing_the_check_are_dropped_on_load_and_from_the_file(
    tmp_path: pathlib.Path,
) -> None:
    PublicationStore(str(tmp_path)).put(_pub("/k/good"))
    store = PublicationStore(str(tmp_path))
    store.load()
    store.put(_pub("/k/bad", volume_id="evil"))

    def check(pub: Publication) -> None:
        if pub.volume_id == "evil":
            raise errors.InvalidArgument("no")

    checked = PublicationStore(str(tmp_path), check)
    assert [p.target_path for p in checked.load()] == ["/k/good"]
    checked.save()
    assert [p.target_path for p in _fresh(tmp_path)] == ["/k/good"]


def test_version_1_records_read_as_mounted(tmp_path: pathlib.Path) -> None:
    rec = {k: v for k, v in vars(_pub(pid=5)).items() if k not in ("phase", "capacity_bytes")}
    (tmp_path / "node-state.json").write_text(json.dumps({"version": 1, "publications": [rec]}))
    assert _fresh(tmp_path) == [_pub(pid=5)]


@pytest.mark.parametrize(
    "doc", [b"", b"{", b"[]", b'{"publications": 1}', b"[" * 100000, b'{"publications": [1]}']
)
def test_unreadable_files_start_empty(tmp_path: pathlib.Path, doc: bytes) -> None:
    (tmp_path / "node-state.json").write_bytes(doc)
    assert _fresh(tmp_path) == []


def test_atomic_write_ignores_planted_temp_links(tmp_path: pathlib.Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    for name in (".doc.json.tmp", "doc.json.tmp"):
        (tmp_path / name).symlink_to(victim)
    write_json_atomic(str(tmp_path / "doc.json"), {"a": 1})
    assert victim.read_text() == "keep"
    assert json.loads((tmp_path / "doc.json").read_text()) == {"a": 1}


def test_atomic_write_failure_keeps_the_old_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "doc.json"
    write_json_atomic(str(path), {"old": True})
    with pytest.raises(TypeError):
        write_json_atomic(str(path), {"new": object()})
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(os.listdir(tmp_path)) == ["doc.json"]


_values = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20))


@long_fuzz
@fuzz(quick=200)
@given(st.one_of(_values, st.dictionaries(st.sampled_from(list(vars(_pub()))), _values)))
def test_parse_publication_never_fails(item: object) -> None:
    pub = parse_publication(item)
    assert pub is None or pub.phase in (INTENT, MOUNTED)
