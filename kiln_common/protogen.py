"""Generate the gRPC/protobuf stubs from protos/ into ./kiln/v1 (run at set-up time, never committed)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(out_dir: Path = ROOT) -> None:
    """Run grpc_tools.protoc over protos/kiln/v1/*.proto so imports read `from kiln.v1 import x_pb2`."""
    from grpc_tools import protoc  # imported lazily: only set-up needs grpcio-tools

    proto_root = ROOT / "protos"
    protos = sorted(str(p.relative_to(proto_root)) for p in (proto_root / "kiln" / "v1").glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root / 'kiln' / 'v1'}")
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    # protoc writes modules only; the package markers make `kiln.v1` a regular importable package.
    for pkg in (out_dir / "kiln", out_dir / "kiln" / "v1"):
        (pkg / "__init__.py").touch()
    logging.getLogger(__name__).info("generated stubs for %s into %s", protos, out_dir / "kiln" / "v1")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    generate()
    sys.exit(0)
