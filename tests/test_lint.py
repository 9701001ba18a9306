"""The tree stays ruff-clean: CI fails on lint or formatting drift, not just on behaviour."""

from __future__ import annotations

import pathlib
import subprocess

import pytest

from tests.console_scripts import console_script

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff_clean(args: list[str]) -> None:
    result = subprocess.run(
        [console_script("ruff"), *args], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
