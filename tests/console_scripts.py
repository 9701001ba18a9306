"""Where the tests find the tree under test and its console scripts.

The suite must exercise the checkout it sits in, never another one that happens to be
installed (``pip install -e`` of a sibling copy, a stale venv): the console scripts are looked
up next to the interpreter running the tests (``sys.executable``), then on ``PATH``, and
``tests/conftest.py`` puts ``ROOT`` first on ``PYTHONPATH`` so whatever script is found imports
this tree's packages. ``tests/test_tree_under_test.py`` checks both.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fuse_crypt", "sealed_secrets", "csi_driver", "coco_proto")
SCRIPTS = ("fuse-crypt", "coco-csi", "sealed-secret", "kubectl-create-sealedsecret")


def console_script(name: str) -> str:
    """Path of console script ``name``; a test that needs a missing one fails, never skips."""
    beside = Path(sys.executable).parent / name  # not resolved: a venv's python is a symlink
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"console script {name!r} is neither next to {sys.executable} nor on PATH: "
            f"install the tree under test into this interpreter (`./run test`, or "
            f"`{sys.executable} -m pip install -e '{ROOT}[test]'`)",
            pytrace=False,
        )
    return found
