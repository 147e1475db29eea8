"""The layers of DESIGN.md import in one direction only; a server host loads no training code.

Every module of every layer is parsed (imports inside functions and `if TYPE_CHECKING` blocks
count: they run sooner or later). Each `recship.<layer>` it imports is checked against the
layer's allowed dependencies, and each third-party package against the layer's forbidden ones.
The subprocess test checks the consequence that matters most: importing the server loads
neither the trainer nor the packager.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Layer -> the layers its modules may import (itself included). DESIGN.md, "Layers".
ALLOWED: dict[str, frozenset[str]] = {
    "base": frozenset({"base"}),
    "protos": frozenset({"protos"}),
    "bundle": frozenset({"base", "protos", "bundle"}),
    "trainer": frozenset({"base", "protos", "bundle", "trainer"}),
    "packager": frozenset({"base", "protos", "bundle", "trainer", "packager"}),
    "runtime": frozenset({"base", "protos", "bundle", "runtime"}),
    "cli": frozenset({"base", "protos", "bundle", "trainer", "packager", "runtime", "cli"}),
}


# Layer -> third-party packages its modules must not import. DESIGN.md: base holds "errors
# without grpc" (their gRPC status mapping is the runtime's).
FORBIDDEN_PACKAGES: dict[str, frozenset[str]] = {"base": frozenset({"grpc", "grpc_health"})}


def imported_modules(source: str, filename: str) -> list[tuple[int, str]]:
    """(line, imported module) of every absolute import in `source`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "recship":
                names = [f"recship.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names]
    return found


def imported_layers(source: str, filename: str) -> list[tuple[int, str, str]]:
    """(line, imported module, its layer) of every `recship.<layer>` import in `source`."""
    return [
        (line, name, name.split(".")[1])
        for line, name in imported_modules(source, filename)
        if name.startswith("recship.")
    ]


def violations(layer: str, source: str, filename: str) -> list[str]:
    """One line per import in `source` (a module of `layer`) that breaks the layering."""
    forbidden = FORBIDDEN_PACKAGES.get(layer, frozenset())
    return [
        f"{filename}:{line}: {layer} imports {module}"
        for line, module, target in imported_layers(source, filename)
        if target not in ALLOWED[layer]
    ] + [
        f"{filename}:{line}: {layer} imports {module}"
        for line, module in imported_modules(source, filename)
        if module.split(".")[0] in forbidden
    ]


def _modules(layer: str) -> list[Path]:
    folder = ROOT / layer
    generated = folder / "v1"  # protos/v1: generated at install time
    return sorted(
        path
        for path in folder.rglob("*.py")
        if generated not in path.parents and "node_modules" not in path.parts
    )


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    modules = _modules(layer)
    assert modules, f"no modules found under {layer}/"
    problems = [
        problem
        for path in modules
        for problem in violations(layer, path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("layer", "statement"),
    [
        ("runtime", "from recship.trainer.data.dataset import gather_bags"),
        ("runtime", "def load():\n    import recship.packager.golden\n"),
        ("bundle", "from recship.runtime.errors import InvalidInput"),
        ("base", "from recship import bundle"),
        ("base", "import grpc"),
        ("base", "def status():\n    from grpc import StatusCode\n"),
        ("trainer", "from recship.cli.main import main"),
    ],
)
def test_a_forbidden_import_is_caught(layer: str, statement: str) -> None:
    assert violations(layer, statement, "example.py")


def test_every_top_level_package_is_a_known_layer() -> None:
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    assert packages - {"tests", "benchmarks", "examples"} == set(ALLOWED)


def test_importing_the_server_loads_no_training_or_packaging_code() -> None:
    probe = (
        "import sys, recship.runtime.server, recship.runtime.client\n"
        "print(','.join(m for m in sys.modules "
        "if m.startswith(('recship.trainer', 'recship.packager'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd="/"
    )
    assert result.stdout.strip() == ""
