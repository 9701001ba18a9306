"""The type checker passes: mypy, strict on fuse_crypt, sealed_secrets and csi_driver.

Why a test: types are the cheapest check that a moved or renamed internal still fits its
callers, and it only stays at zero if any new error fails the suite. The settings (strict,
what counts as generated or untyped third-party code) live in pyproject's [tool.mypy].
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_strict_finds_no_errors() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "mypy"],  # files and flags: pyproject.toml [tool.mypy]
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
