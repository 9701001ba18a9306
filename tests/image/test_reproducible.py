"""Two builds of one tree give one image digest (slow: a second full build).

Runs only with COCO_IMAGE_REPRO=1 (`COCO_IMAGE_REPRO=1 ./run test -m imagerepro`); the same
check as one command: `./run image --check-reproducible`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from .conftest import REPO, BuiltImage, build_image, load_image_tool

pytestmark = [
    pytest.mark.imagerepro,
    pytest.mark.skipif(
        os.environ.get("COCO_IMAGE_REPRO") != "1", reason="second image build: COCO_IMAGE_REPRO=1"
    ),
]


def _revision() -> str:
    return str(load_image_tool().source_info().revision)


def test_second_build_gives_the_same_digest(built_image: BuiltImage) -> None:
    with tempfile.TemporaryDirectory(prefix="coco-image-again-", dir=REPO / "build") as tmp:
        first = built_image
        if first.summary["revision"] != _revision():  # cached from another tree state
            first = build_image(Path(tmp) / "a")
        second = build_image(Path(tmp) / "b")
    assert second.summary["digest"] == first.summary["digest"]
