"""Build hook: the gRPC stubs in coco_proto/ are generated from proto/ at build time.

Why not commit them: they are build outputs of grpcio-tools (pinned in [build-system]
requires, so every build makes the same bytes), and a committed copy can drift from its
.proto. A wheel gets them in its build directory; an editable install (``./run`` uses
``pip install -e``) writes them into the source tree, where git ignores them.
Everything else about the project is in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent


class BuildPyWithStubs(build_py):
    """build_py that first runs proto/generate.py into the tree being built."""

    def run(self) -> None:
        spec = importlib.util.spec_from_file_location(
            "proto_generate", ROOT / "proto" / "generate.py"
        )
        assert spec is not None and spec.loader is not None
        generator = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(generator)
        out = ROOT if self.editable_mode else pathlib.Path(self.build_lib)
        generator.generate(out)
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
