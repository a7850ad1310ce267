"""Regenerate service/rpc/descriptors.binpb: the compiled protocol definitions the gRPC server speaks.

    .venv/bin/python scripts/grpc_descriptors.py            # write it
    .venv/bin/python scripts/grpc_descriptors.py --check    # exit 1 if the committed file differs

The definitions are the published ones, as their own client packages ship them compiled: Triton's
`grpc_service.proto` and `model_config.proto` (package `inference`, from `tritonclient`) and TF Serving's
`tensorflow_serving/apis/*.proto` with the TensorFlow protos they import (from `tensorflow-serving-api`
and `tensorflow`), plus the Google well-known types. Each `_pb2.py` module holds its file's serialized
FileDescriptorProto; this script reads it from the source text (nothing is imported, so neither
TensorFlow nor a second protobuf runtime is loaded) and writes the dependency closure as one
FileDescriptorSet. The server loads it into a private descriptor pool (service/rpc/protos.py), so it
never imports TensorFlow or these client packages and never clashes with them in one process.
"""

from __future__ import annotations

import argparse
import ast
import sys
import sysconfig
from pathlib import Path

from google.protobuf import descriptor_pb2

OUT = Path(__file__).resolve().parent.parent / "service" / "rpc" / "descriptors.binpb"
ROOTS = ["grpc_service.proto", "tensorflow_serving/apis/prediction_service.proto",
         "tensorflow_serving/apis/model_service.proto"]
# the few files whose module is not named after the .proto
MODULES = {"grpc_service.proto": "tritonclient/grpc/service_pb2.py",
           "model_config.proto": "tritonclient/grpc/model_config_pb2.py"}


def serialized(module: Path) -> bytes:
    """The bytes passed to `AddSerializedFile(...)` in a generated module."""
    for node in ast.walk(ast.parse(module.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "AddSerializedFile" and isinstance(node.args[0], ast.Constant)):
            return bytes(node.args[0].value)
    raise SystemExit(f"{module}: no serialized descriptor found")


def module_for(name: str, site: Path) -> Path:
    rel = MODULES.get(name, name.removesuffix(".proto") + "_pb2.py")
    for path in (site / rel, site / "tensorflow" / "compiler" / rel):  # TensorFlow ships XLA's under its own
        if path.is_file():
            return path
    raise SystemExit(f"{name}: {site / rel} is missing (make install (the dev extra) installs its package)")


def closure(site: Path) -> descriptor_pb2.FileDescriptorSet:
    """Every file the roots need, dependencies before the files that import them."""
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def visit(name: str) -> None:
        if name in files:
            return
        f = descriptor_pb2.FileDescriptorProto.FromString(serialized(module_for(name, site)))
        for dep in f.dependency:
            visit(dep)
        files[name] = f

    for root in ROOTS:
        visit(root)
    return descriptor_pb2.FileDescriptorSet(file=list(files.values()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed file instead of writing it")
    args = ap.parse_args()
    site = Path(sysconfig.get_paths()["purelib"])
    data = closure(site).SerializeToString(deterministic=True)
    if args.check:
        same = OUT.is_file() and OUT.read_bytes() == data
        print(f"{OUT.name}: {'up to date' if same else 'differs from the installed packages; regenerate it'}")
        return 0 if same else 1
    OUT.write_bytes(data)
    print(f"wrote {OUT} ({len(data)} bytes, {len(closure(site).file)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
