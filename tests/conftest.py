"""Suite-wide setup: every subprocess a test starts imports the tree under test.

Tests run ``python -m fuse_crypt.cli`` with other working directories and the installed
console scripts (``sealed-secret``, ``coco-csi``, ...); without this, those would import
whichever checkout was installed into the venv (``pip install -e``), not this one.
"""

from __future__ import annotations

import os

from tests.console_scripts import ROOT


def pytest_configure() -> None:
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *[p for p in rest if p != str(ROOT)]])
