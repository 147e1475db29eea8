"""Whether a bundle's recorded library versions fit the libraries installed here.

The manifest records the versions that built the bundle (`LibraryVersions`); the store checks
them before a version may load, because exported graphs call fbgemm operators by schema and
approximate search results differ between FAISS releases.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass

from recship.base.libraries import LIBRARY_DISTRIBUTIONS, installed_version
from recship.protos.v1 import manifest_pb2


@dataclass(frozen=True)
class Compatibility:
    """Whether a bundle's recorded library versions fit the libraries installed here.

    Attributes:
        errors: Mismatches that make the bundle unsafe to load (e.g. a different torch minor).
        warnings: Mismatches that may change results slightly (e.g. another faiss release).
    """

    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


def current_library_versions() -> manifest_pb2.LibraryVersions:
    """Versions of python, torch, torchrec, fbgemm_gpu, faiss, numpy and recship installed here.

    A library that is not installed is recorded as "".
    """
    versions = manifest_pb2.LibraryVersions(python=platform.python_version())
    for library in LIBRARY_DISTRIBUTIONS:
        setattr(versions, library, installed_version(library))
    return versions


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"^(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _public(version: str) -> str:
    """The version without its local build tag ("2.13.0+cpu" -> "2.13.0")."""
    return version.split("+", 1)[0]


# Libraries whose major.minor must match: the scripted graphs call their operators by schema.
_STRICT_LIBRARIES = ("torch", "fbgemm_gpu")


def check_compatible(
    built_with: manifest_pb2.LibraryVersions, current: manifest_pb2.LibraryVersions
) -> Compatibility:
    """Compares the library versions a bundle was built with to the ones installed here.

    Rules: torch and fbgemm_gpu must agree on major.minor (exported graphs and the fbgemm
    operators they call change between minors); a different torchrec minor, or any different
    faiss release (HNSW search differs between versions), is a warning. A library the bundle
    did not record is not checked. The CPU/CUDA build tag ("+cpu") is ignored.

    Returns:
        The errors and warnings, each one line naming the library and both versions.
    """
    errors: list[str] = []
    warnings: list[str] = []
    for library in _STRICT_LIBRARIES:
        built, here = getattr(built_with, library), getattr(current, library)
        if not built:
            continue
        if not here:
            errors.append(f"{library} {built} built this bundle but is not installed here")
        elif _major_minor(built) != _major_minor(here):
            errors.append(
                f"{library} {here} is installed but the bundle was built with {built}; "
                "major.minor must match"
            )
    if built_with.torchrec and current.torchrec:
        if _major_minor(built_with.torchrec) != _major_minor(current.torchrec):
            warnings.append(
                f"torchrec {current.torchrec} is installed, the bundle was built with "
                f"{built_with.torchrec}"
            )
    elif built_with.torchrec:
        warnings.append(f"torchrec {built_with.torchrec} built this bundle but is not installed")
    if built_with.faiss:
        if not current.faiss:
            errors.append(f"faiss {built_with.faiss} built this bundle but is not installed here")
        elif _public(built_with.faiss) != _public(current.faiss):
            warnings.append(
                f"faiss {current.faiss} is installed, the index was built with "
                f"{built_with.faiss}; approximate search results may differ slightly"
            )
    return Compatibility(errors=tuple(errors), warnings=tuple(warnings))
