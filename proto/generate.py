"""The one code-generation entry point (``make proto``).

Compiles every .proto under proto/ into client/src, where the generated
modules import each other by their proto paths (``aotiserve.v1...``), so they
need no patching. ``--check`` regenerates into a temporary folder and fails
if the committed code differs (a test runs it).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
OUT_ROOT = PROTO_ROOT.parent / "client" / "src"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: Path) -> None:
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    for proto in proto_files():
        rel = proto.relative_to(PROTO_ROOT)
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(rel),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {rel}")


def generated_files(root: Path) -> list[Path]:
    return sorted(
        p.relative_to(root)
        for p in root.rglob("*")
        if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
    )


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh, committed = generated_files(Path(tmp)), generated_files(OUT_ROOT)
        stale = [
            str(p)
            for p in fresh
            if p not in committed or not filecmp.cmp(Path(tmp) / p, OUT_ROOT / p, shallow=False)
        ]
        extra = [str(p) for p in committed if p not in fresh]
    if stale or extra:
        print(f"generated code is stale: {stale + extra}; run `make proto`", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args()
    if args.check:
        return check()
    generate(OUT_ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
