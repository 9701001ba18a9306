"""Build hooks: the gRPC stubs in coco_proto/ are generated from proto/ at build time, and
the XTS sector loop (fuse_crypt/luks2/xts_sectors.c) is compiled.

Why not commit them: they are build outputs of grpcio-tools (pinned in [build-system]
requires, so every build makes the same bytes), and a committed copy can drift from its
.proto. A wheel gets them in its build directory; an editable install (``./run`` uses
``pip install -e``) writes them into the source tree, where git ignores them.

The sector loop is a plain C shared library, not a Python extension module: segment.py
loads it through cffi's ABI mode, so building it needs gcc but no Python headers. Its file
name (``xts_sectors.so.0``) is deliberately not an importable module name. It links against
``libcrypto.so.3`` by soname, which needs no OpenSSL headers either. segment.py still works
without it (two Python calls into libcrypto per sector, ~2.5x slower); the tests check that
it was built.

The block daemon's request loop (fuse_crypt/blockfront/blockloop.c, ``blockloop.so.0``) is
built the same way, against libfuse3's headers (Debian's libfuse3-dev, which ``./run``
installs) and ``libfuse3.so.3``; the block daemon falls back to its Python loop without it,
and the tests check that it was built.
Everything else about the project is in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import pathlib

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
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


#: the sector loop's dotted name, and the file name it gets instead of an extension suffix
XTS_LOOP = "fuse_crypt.luks2.xts_sectors"
XTS_LOOP_FILE = "xts_sectors.so.0"
#: the block daemon's request loop (fuse_crypt/blockfront/native.py), likewise
BLOCK_LOOP = "fuse_crypt.blockfront.blockloop"
BLOCK_LOOP_FILE = "blockloop.so.0"
PLAIN_LIBRARIES = {XTS_LOOP: XTS_LOOP_FILE, BLOCK_LOOP: BLOCK_LOOP_FILE}


class BuildExtPlainLibrary(build_ext):
    """build_ext that names the two C libraries ``*.so.0`` (see the docstring above)."""

    def get_ext_filename(self, fullname: str) -> str:
        # setuptools asks with the dotted name, distutils' build step with its last part
        for dotted, file in PLAIN_LIBRARIES.items():
            if fullname in (dotted, dotted.rpartition(".")[2]):
                return str(pathlib.Path(*fullname.split(".")[:-1], file))
        return super().get_ext_filename(fullname)


setup(
    cmdclass={"build_py": BuildPyWithStubs, "build_ext": BuildExtPlainLibrary},
    ext_modules=[
        Extension(
            XTS_LOOP,
            sources=["fuse_crypt/luks2/xts_sectors.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
            extra_link_args=["-l:libcrypto.so.3"],
        ),
        Extension(
            BLOCK_LOOP,
            # the sector loop is compiled in too: one source, no second copy of it
            sources=["fuse_crypt/blockfront/blockloop.c", "fuse_crypt/luks2/xts_sectors.c"],
            include_dirs=["/usr/include/fuse3"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
            extra_link_args=["-l:libfuse3.so.3", "-l:libcrypto.so.3", "-lpthread"],
        ),
    ],
)
