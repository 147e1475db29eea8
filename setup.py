"""Build hooks: map the top-level folders under the `recship` namespace and generate protos.

The Python modules for `protos/recship/v1/*.proto` are generated here (never committed) so that
`pip install .`, `pip install -e .` and wheel builds all ship code that matches the .proto files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
# Top-level folder -> `recship.<name>`: the layers of DESIGN.md, lowest first.
FOLDERS = {
    name: name for name in ("base", "protos", "bundle", "trainer", "packager", "runtime", "cli")
}
PROTO_SOURCES = ROOT / "protos" / "recship" / "v1"
GENERATED = ROOT / "protos" / "v1"


def generate_protos() -> None:
    """Compile the .proto files into `protos/v1/` as the `recship.protos.v1` package.

    The import root is mapped (`recship/protos/v1=protos/recship/v1`) so the generated modules
    import each other as `recship.protos.v1.*`; the wire names stay `recship.v1.*`.
    """
    from grpc_tools import protoc

    proto_files = sorted(PROTO_SOURCES.glob("*.proto"))
    well_known = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory(dir=ROOT / "protos") as out:
        args = [
            "grpc_tools.protoc",
            f"-I{well_known}",
            f"-Irecship/protos/v1={PROTO_SOURCES}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *(str(p) for p in proto_files),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(p.name for p in proto_files)}")
        produced = Path(out) / "recship" / "protos" / "v1"
        (produced / "__init__.py").write_text(
            '"""Generated from protos/recship/v1; do not edit."""\n'
        )
        staged = ROOT / "protos" / f".v1-{os.getpid()}"
        shutil.move(str(produced), staged)
    if GENERATED.exists():
        shutil.rmtree(GENERATED)
    os.replace(staged, GENERATED)


class BuildPyWithProtos(build_py):
    """`build_py` that regenerates the protobuf modules first (also runs for editable installs)."""

    def run(self) -> None:
        generate_protos()
        super().run()


def subpackages(folder: str) -> list[str]:
    """Dotted package names under `recship.<folder>` for every folder holding an __init__.py."""
    base = ROOT / folder
    names = []
    for init in sorted(base.rglob("__init__.py")):
        relative = init.parent.relative_to(base)
        if any(part.startswith((".", "_")) or part == "recship" for part in relative.parts):
            continue
        names.append(".".join(("recship", folder, *relative.parts)))
    return names


if not GENERATED.exists():
    # setuptools lists packages before build_py runs; generate now so recship.protos.v1 exists.
    generate_protos()

packages = [name for folder in FOLDERS for name in subpackages(folder)]
package_dir = {f"recship.{name}": folder for name, folder in FOLDERS.items()}

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={
        "recship.protos": ["recship/v1/*.proto"],
        "recship.trainer": ["data/specs/*.toml"],
        "recship.runtime": ["native/*.cc"],
    },
    include_package_data=False,
    cmdclass={"build_py": BuildPyWithProtos},
)
