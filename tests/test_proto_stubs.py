"""The committed stubs in coco_proto/ must be exactly what proto/generate.py produces."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_regeneration(tmp_path: pathlib.Path) -> None:
    generated = _load_generator().generate(tmp_path)
    assert generated, "proto/ holds no .proto files"
    for path in generated:
        committed = ROOT / "coco_proto" / path.name
        assert committed.exists(), f"{path.name} is not committed; run python proto/generate.py"
        assert committed.read_bytes() == path.read_bytes(), f"{path.name} is stale"
    committed_names = {p.name for p in (ROOT / "coco_proto").glob("*_pb2*.py*")}
    assert committed_names == {p.name for p in generated}, "coco_proto holds stubs of no proto"
