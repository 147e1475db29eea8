"""Where things are in a bundle repository: `<repo>/<name>/<version>/`, and the files of a version.

The names of a version's files are stated here once; the bundle format page
(`bundle/FORMAT.md`) says what each holds, who writes it and who reads it. A version exists only
once its numeric folder holds `MANIFEST.json` (the writer renames a complete folder into place),
so `published_versions` never lists a half-written one.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from recship.base.errors import InvalidInput

MANIFEST_FILENAME = "MANIFEST.json"
# The optional signature over the manifest and every file (bundle/signature.py). It is the one
# file besides MANIFEST.json that the manifest does not list: it is written after the manifest.
SIGNATURE_FILENAME = "MANIFEST.sig"
# Files of a version that the manifest's `files` list never names.
RESERVED_FILENAMES = frozenset({MANIFEST_FILENAME, SIGNATURE_FILENAME})
# The FAISS index of every candidate item (bundle/index.py).
INDEX_FILE = "items.faiss"
# The item table the runtime joins onto ranking candidates (bundle/item_features.py).
ITEM_FEATURES_FILE = "item_features.npz"
# The user table a request may carry only the user key for (bundle/item_features.py).
USER_FEATURES_FILE = "user_features.npz"
# How raw feature values become model inputs, and the vocabularies (bundle/transforms.py).
TRANSFORMS_FILE = "transforms.json"
VOCAB_DIR = "vocab"
# Recorded entry-point inputs and outputs for the load-time self-test (bundle/golden.py).
GOLDEN_FILE = "golden.pt"
# Entry point names; their files are `<name><format suffix>` (bundle/entrypoints.py).
QUERY_TOWER = "query_tower"
RANKER = "ranker"
# Prefix of the hidden folders the writer stages versions in; readers skip them.
STAGING_PREFIX = ".staging-"
# The per-bundle lock file publishers allocate version numbers under (bundle/writer.py).
LOCK_FILENAME = ".lock"

# The largest version number: 2**53 - 1, so that every reader (JSON doubles, JavaScript numbers,
# int64 fields) holds it exactly. A folder named by a larger number is not a version.
MAX_VERSION = 2**53 - 1
_MAX_VERSION_DIGITS = len(str(MAX_VERSION))

# Bundle names become folder names and appear in requests: keep them portable and unambiguous.
_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True, order=True)
class BundleRef:
    """One published bundle version, like TF Serving's ServableId.

    Attributes:
        name: Bundle name (the folder under the repository).
        version: Positive version number (the numeric folder under the bundle).
        path: The version directory, `<repo>/<name>/<version>`.
    """

    name: str
    version: int
    path: Path

    def __str__(self) -> str:
        return f"{self.name}/{self.version}"


def check_bundle_name(name: str) -> str:
    """Returns `name` if it is a valid bundle name, else raises InvalidInput.

    A name starts with a letter and holds only letters, digits, '.', '_' and '-' (at most 128),
    so it is a safe folder name everywhere and never mistaken for a version number.
    """
    if not _NAME_PATTERN.match(name):
        raise InvalidInput(
            f"invalid bundle name {name!r}: use a letter followed by letters, digits, '.', '_' "
            "or '-' (at most 128 characters)"
        )
    return name


def parse_version_name(folder_name: str) -> int | None:
    """The version number a folder name denotes ("3" -> 3), or None for any other name.

    Only canonical positive integers up to `MAX_VERSION` count: "03", "0", "-1", ".staging-..."
    and "99999999999999999999" (beyond int64) are not versions, so no folder name can make a
    listing fail.
    """
    if len(folder_name) > _MAX_VERSION_DIGITS or not folder_name.isascii():
        return None
    if not folder_name.isdigit():
        return None
    number = int(folder_name)
    if number <= 0 or number > MAX_VERSION or str(number) != folder_name:
        return None
    return number


def published_versions(bundle_dir: Path) -> list[int]:
    """Versions published under `bundle_dir`, ascending.

    A version is published when its numeric folder holds a regular `MANIFEST.json`: the writer
    renames a complete folder into place, so anything else (a staging folder, a folder a crashed
    writer claimed, a half-copied folder) is not a version. Returns [] when `bundle_dir` does not
    exist.
    """
    versions: list[int] = []
    try:
        entries = list(os.scandir(bundle_dir))
    except OSError:  # missing, not a folder, unreadable: no versions, never an error
        return []
    for entry in entries:
        number = parse_version_name(entry.name)
        try:
            if number is None or not entry.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        if _is_regular_file(Path(entry.path) / MANIFEST_FILENAME):
            versions.append(number)
    return sorted(versions)


def why_not_published(bundle_dir: Path, folder_name: str) -> str:
    """Why `<bundle_dir>/<folder_name>` is not a published version, in a few words."""
    if parse_version_name(folder_name) is None:
        return f"{folder_name[:40]!r} is not a version number (1 to {MAX_VERSION}, no leading 0)"
    folder = bundle_dir / folder_name
    try:
        mode = folder.lstat().st_mode
    except OSError:
        return "no such version folder"
    if stat.S_ISLNK(mode):
        return "the version folder is a symbolic link"
    if not stat.S_ISDIR(mode):
        return "not a folder"
    try:
        manifest_mode = (folder / MANIFEST_FILENAME).lstat().st_mode
    except OSError:
        return f"the folder holds no {MANIFEST_FILENAME}"
    if not stat.S_ISREG(manifest_mode):
        return f"its {MANIFEST_FILENAME} is not a regular file"
    return "not published"


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def is_bundle_name(name: str) -> bool:
    """True when `name` is a valid bundle name (see `check_bundle_name`)."""
    return bool(_NAME_PATTERN.match(name))
