"""recship.protos: the wire and bundle contracts, generated from protos/recship/v1/*.proto.

The generated modules live in `recship.protos.v1` (built at install time, never committed).
"""

from pathlib import Path

if __name__ != "recship.protos":
    raise ImportError(f"import recship.protos, not {__name__!r}")

PROTO_ROOT = Path(__file__).parent
"""Include root of the .proto sources: files are at `recship/v1/<name>.proto` under it."""


def proto_files() -> list[Path]:
    """The recship .proto source files, for clients that load them at run time (e.g. Node.js)."""
    return sorted((PROTO_ROOT / "recship" / "v1").glob("*.proto"))
