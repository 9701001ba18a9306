"""Suite-wide setup: every subprocess a test starts imports the tree under test.

Tests run ``python -m fuse_crypt.cli`` with other working directories and the installed
console scripts (``sealed-secret``, ``coco-csi``, ...); without this, those would import
whichever checkout was installed into the venv (``pip install -e``), not this one.
"""

from __future__ import annotations

import os

import pytest

from tests.console_scripts import ROOT


def pytest_configure() -> None:
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *[p for p in rest if p != str(ROOT)]])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``./run mutate``: a module's test files in the order tools/mutation.py lists
    them (``COCO_MUTATION_TEST_ORDER``), the fast in-process file first.

    mutmut hands pytest a mutant's tests as an unordered set, so without this a mutant that
    the fast file kills in milliseconds may first wait for a peer or fuzz test of half a
    minute.  Unset (every other run) the order is pytest's own.
    """
    order = os.environ.get("COCO_MUTATION_TEST_ORDER")
    if not order:
        return
    rank = {path: i for i, path in enumerate(order.split(os.pathsep))}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
