"""Generate Python code and mypy stubs from protos/ into clients/python/.

The proto packages (vlmesh.v1, the public API; vlmesh.internal.v1, the stage and vision services
only the mesh calls) equal their Python import paths, so the generated imports are right as they
stand and nothing is rewritten afterwards. The client distribution (clients/python/pyproject.toml)
leaves vlmesh.internal out. google/rpc/*.proto come from googleapis-common-protos.

    python tools/gen_protos.py            # regenerate
    python tools/gen_protos.py --check    # exit 1 if the committed code is stale
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "clients" / "python"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_root: Path) -> list[Path]:
    from google.rpc import status_pb2
    from grpc_tools import protoc

    googleapis = Path(status_pb2.__file__).resolve().parent.parent.parent  # holds google/rpc/status.proto
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    bindir = Path(sys.executable).parent  # mypy-protobuf's plugins sit beside the interpreter
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{googleapis}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",  # google/protobuf/*.proto
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in out_root.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the committed code differs")
    args = parser.parse_args()
    if not args.check:
        for f in generate(OUT_ROOT):
            print(f.relative_to(ROOT))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.relative_to(tmp): p for p in generate(Path(tmp))}
        committed = {p.relative_to(OUT_ROOT): p for p in OUT_ROOT.rglob("*") if p.name.endswith(GENERATED_SUFFIXES)}
        stale = sorted(
            str(rel)
            for rel in fresh.keys() | committed.keys()
            if rel not in fresh or rel not in committed or not filecmp.cmp(fresh[rel], committed[rel], shallow=False)
        )
    if stale:
        print("stale generated code, run `python tools/gen_protos.py`:", *stale, sep="\n  ")
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
