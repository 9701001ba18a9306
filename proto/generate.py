"""Regenerate the Python gRPC stubs in coco_proto/ from the .proto files in proto/.

setup.py runs this at build time (grpcio-tools is a build requirement): into the wheel's
build directory, or into the source tree for an editable install. The stubs are not
committed; tests/test_proto_stubs.py regenerates them into a temporary directory and fails
if the installed copies differ (a .proto changed since the install).
Run: python proto/generate.py [OUTDIR]
"""

from __future__ import annotations

import pathlib
import sys

from grpc_tools import protoc

PROTO_DIR = pathlib.Path(__file__).resolve().parent
PACKAGE = "coco_proto"


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Compile every proto so that generated imports read ``from coco_proto import x_pb2``."""
    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(PROTO_DIR.glob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in protos:
        args = [
            "protoc",
            f"-I{PACKAGE}={PROTO_DIR}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"{PACKAGE}/{proto.name}",
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed for {proto.name}")
    return sorted((out_dir / PACKAGE).glob("*_pb2*.py*"))


if __name__ == "__main__":
    root = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR.parent
    for path in generate(root):
        print(path)
