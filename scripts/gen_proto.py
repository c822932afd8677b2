"""Regenerate fednode/v1/*_pb2*.py from proto/fednode/v1/*.proto.

Usage: python scripts/gen_proto.py [--check]
--check regenerates into a temporary directory and exits 1 when the committed code differs.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_DIR = PROTO_ROOT / "fednode" / "v1"


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency, pinned to the version the code was made with

    protos = sorted(PROTO_DIR.glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--pyi_out={out_root}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed: see the messages above")
    return sorted((out_root / "fednode" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed code is out of date")
    ns = parser.parse_args()
    target = ROOT / "fednode" / "v1"
    if not ns.check:
        for path in generate(ROOT):
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        fresh = generate(Path(tmp))
        for path in fresh:
            committed = target / path.name
            if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                stale.append(path.name)
        extra = {p.name for p in target.glob("*_pb2*.py*")} - {p.name for p in fresh}
        stale.extend(sorted(extra))
    if stale:
        print(f"generated code is out of date: {', '.join(stale)}; fix: python scripts/gen_proto.py")
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
