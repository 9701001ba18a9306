"""The suite tests the tree it sits in: in-process imports and the spawned console scripts.

Seen before: a copy of the repository ran the original's code, because ``tests/fuse_crypt``
and ``tests/csi_driver`` (packages named like the product) put ``tests/`` first on the path and
``import fuse_crypt`` fell through to the checkout installed with ``pip install -e``. The suite
now imports in pytest's importlib mode and subprocesses get this tree on ``PYTHONPATH``
(tests/conftest.py); these tests fail if either stops holding.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.console_scripts import PACKAGES, ROOT, SCRIPTS, console_script

_INIT = re.compile(r"(/[^\s'\"]+)/(" + "|".join(PACKAGES) + r")/__init__\.py\b")


def _under_root(path: str | Path) -> bool:
    return Path(path).resolve().is_relative_to(ROOT)


@pytest.mark.parametrize("name", PACKAGES)
def test_product_packages_come_from_the_tree_under_test(name: str) -> None:
    mod = importlib.import_module(name)
    assert mod.__file__ is not None and _under_root(mod.__file__), (
        f"{name} imported from {mod.__file__}, not from the tree under test {ROOT}"
    )
    assert Path(mod.__file__).resolve().parent == ROOT / name, mod.__file__


def test_test_packages_do_not_shadow_the_product() -> None:
    """``tests/fuse_crypt`` and ``tests/csi_driver`` are known as ``tests.*``, never bare."""
    for name in ("fuse_crypt", "csi_driver"):
        assert Path(importlib.import_module(name).__file__).resolve().parent == ROOT / name
    assert str(ROOT / "tests") not in [os.path.abspath(p) for p in sys.path if p]


def _imported_packages(cmd: list[str], cwd: Path) -> dict[str, set[str]]:
    """Which directories ``cmd`` imported the product packages from (``python -v`` log)."""
    env = {**os.environ, "PYTHONVERBOSE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    assert proc.returncode == 0, (cmd, proc.returncode, proc.stderr[-2000:])
    found: dict[str, set[str]] = {}
    for m in _INIT.finditer(proc.stderr):
        found.setdefault(m.group(2), set()).add(m.group(1))
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_spawned_console_scripts_run_the_tree_under_test(script: str, tmp_path: Path) -> None:
    """Run from an unrelated directory, as the tests do: every product import is this tree."""
    found = _imported_packages([console_script(script), "--help"], tmp_path)
    assert found, f"{script} --help imported none of {PACKAGES}"
    stray = {pkg: dirs for pkg, dirs in found.items() if dirs != {str(ROOT)}}
    assert not stray, f"{script} ran code from outside {ROOT}: {stray}"


@pytest.mark.parametrize("module", ["fuse_crypt.cli", "sealed_secrets.cli", "csi_driver.cli"])
def test_python_dash_m_from_elsewhere_runs_the_tree_under_test(module: str, tmp_path: Path) -> None:
    found = _imported_packages([sys.executable, "-m", module, "--help"], tmp_path)
    assert found and all(dirs == {str(ROOT)} for dirs in found.values()), found


def test_collecting_the_test_packages_does_not_shadow_the_product(tmp_path: Path) -> None:
    """Shadowing happens while pytest collects ``tests/fuse_crypt`` and ``tests/csi_driver``
    (seen under mutmut, and in importlib mode without ``consider_namespace_packages``): collect
    them in a fresh pytest, then run the import checks above in that same session."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/fuse_crypt/test_contentenc.py",
            "tests/csi_driver/test_controller.py",
            "tests/test_tree_under_test.py",
            "-k",
            "product_packages_come_from or test_packages_do_not_shadow",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "5 passed" in proc.stdout, proc.stdout[-2000:]
