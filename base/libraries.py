"""Library facts: which libraries a bundle depends on and which versions are installed here.

Reads package metadata only, so nothing heavy (torch, faiss) is imported. The bundle records
these versions in its manifest and checks them on load (`recship.bundle.compat`); `recship
doctor` reports them.
"""

from __future__ import annotations

from importlib import metadata

# Distributions that may provide each library, CPU build first.
LIBRARY_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "torchrec": ("torchrec",),
    "fbgemm_gpu": ("fbgemm-gpu-cpu", "fbgemm-gpu"),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11"),
    "numpy": ("numpy",),
    "recship": ("recship",),
}


def installed_version(library: str) -> str:
    """Installed version of one of LIBRARY_DISTRIBUTIONS' libraries, or "" when absent.

    Reads package metadata only, so nothing heavy (torch, faiss) is imported.
    """
    for distribution in LIBRARY_DISTRIBUTIONS[library]:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return ""
