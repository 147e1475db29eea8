"""item_features.npz and user_features.npz: the entity tables a bundle stores.

The item table holds the features the runtime joins onto any candidate (row r = item index r);
the user table the features stored per user (row r = user index r: the position of the user's
key in the user key vocabulary), so a request may carry just the user key. Both use one
layout, listed in `bundle/FORMAT.md` (item_features.npz); uncompressed, so it loads fast; read
without pickle.

Reading checks the archive before numpy allocates anything (`check_archive`: every member
stored uncompressed, each array's declared shape and dtype no larger than the bytes it
occupies, no object arrays) and, given the manifest, every array against it
(`read_item_features`): the feature names, one row per item, offsets that index the values,
ids inside each feature's cardinality and bags no longer than `MAX_BAG_IDS`.

With `mmap=True` the arrays are read-only views of the file mapped into memory instead of
copies: every member is stored (never compressed), so each array's bytes lie contiguous in the
archive at an offset the zip headers give. Pages are then the page cache's, shared by every
process and version that maps the file and evictable, not private memory per version; the
format is unchanged.
"""

from __future__ import annotations

import mmap as mmap_module
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recship.base.errors import InvalidInput, clip, untrusted
from recship.base.files import atomic_output
from recship.base.jagged import EntityTable, JaggedColumn
from recship.protos.v1 import manifest_pb2

# The most ids one item's bag of one feature may hold: a ranking row joins every candidate's
# bags, so a longer bag would multiply a request's cost by its length.
MAX_BAG_IDS = 4096
# Arrays the archive may hold: the names, the dense block and two per sparse feature.
_MAX_MEMBERS = 1024


def write_item_features(
    path: Path, items: EntityTable, sparse_features: Sequence[str], dense_features: Sequence[str]
) -> None:
    """Writes the item table atomically (temp file + rename).

    Args:
        path: destination file.
        items: every item's features, row = item id.
        sparse_features: item-side sparse features to store (all must be in `items`).
        dense_features: names of the columns of `items.dense`, in order.

    Raises:
        InvalidInput: a named feature is missing or the dense width disagrees.
    """
    missing = [name for name in sparse_features if name not in items.sparse]
    if missing:
        raise InvalidInput(f"item features {', '.join(missing)} are not in the item table")
    if items.dense.shape[1] != len(dense_features):
        raise InvalidInput(
            f"item table has {items.dense.shape[1]} dense columns, names given for "
            f"{len(dense_features)}"
        )
    arrays: dict[str, np.ndarray] = {
        "sparse_names": np.array(list(sparse_features), dtype=np.str_),
        "dense_names": np.array(list(dense_features), dtype=np.str_),
        "dense": items.dense.astype(np.float32),
    }
    for name in sparse_features:
        arrays[f"sparse.{name}.values"] = items.sparse[name].values
        arrays[f"sparse.{name}.offsets"] = items.sparse[name].offsets
    with atomic_output(path, ".npz") as temp, open(temp, "wb") as handle:
        np.savez(handle, **arrays)


def check_archive(path: Path) -> None:
    """Checks the structure of the `.npz` archive without loading an array.

    Every member must be a `.npy` file stored uncompressed (so its size on disk is its size in
    memory: no zip bomb), and its header must declare a non-object dtype and a shape whose
    bytes fit in the member. Reads only the zip directory and each member's header.

    Raises:
        InvalidInput: naming the member and the problem.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > _MAX_MEMBERS:
                raise InvalidInput(f"{path}: {len(members)} arrays, at most {_MAX_MEMBERS}")
            for member in members:
                _check_member(path, archive, member)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise InvalidInput(f"{path}: not a valid .npz archive: {clip(str(error), 120)}") from None


def _check_member(path: Path, archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> None:
    name = untrusted(member.filename)
    if member.compress_type != zipfile.ZIP_STORED:
        raise InvalidInput(f"{path}: array {name} is compressed; item tables are stored")
    if not member.filename.endswith(".npy"):
        raise InvalidInput(f"{path}: member {name} is not a .npy array")
    with archive.open(member) as handle:
        try:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"unknown .npy version {version}")
        except ValueError as error:
            raise InvalidInput(f"{path}: array {name}: {clip(str(error), 120)}") from None
        header_bytes = handle.tell()
    if dtype.hasobject:
        raise InvalidInput(f"{path}: array {name} holds Python objects (pickle); refused")
    if any(int(extent) < 0 for extent in shape):
        raise InvalidInput(f"{path}: array {name} declares a negative extent {tuple(shape)}")
    count = 1
    for extent in shape:
        count *= int(extent)
    if count * dtype.itemsize + header_bytes > member.file_size:
        raise InvalidInput(
            f"{path}: array {name} declares shape {tuple(shape)} of {dtype}, more than its "
            f"{member.file_size} bytes hold"
        )


def _read_header(handle, path: Path, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the .npy header at the handle's position."""
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(handle)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(handle)
        raise ValueError(f"unknown .npy version {version}")
    except ValueError as error:
        raise InvalidInput(f"{path}: array {name}: {clip(str(error), 120)}") from None


def _mapped_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a checked archive (`check_archive`: stored members whose headers fit
    their bytes) as a read-only view of the file mapped into memory, by member name."""
    arrays: dict[str, np.ndarray] = {}
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        mapped = mmap_module.mmap(handle.fileno(), 0, access=mmap_module.ACCESS_READ)
        with zipfile.ZipFile(handle) as archive:
            members = archive.infolist()
        for member in members:
            name = untrusted(member.filename)
            handle.seek(member.header_offset)
            local = handle.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise InvalidInput(f"{path}: array {name}: bad local zip header")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            start = member.header_offset + 30 + name_length + extra_length
            handle.seek(start)
            shape, fortran, dtype = _read_header(handle, path, name)
            offset = handle.tell()
            count = 1
            for extent in shape:
                count *= int(extent)
            end = offset + count * dtype.itemsize
            if end > start + member.compress_size or end > size:
                raise InvalidInput(f"{path}: array {name} runs past its member")
            flat = np.frombuffer(mapped, dtype=dtype, count=count, offset=offset)
            arrays[member.filename[: -len(".npy")]] = flat.reshape(
                shape, order="F" if fortran else "C"
            )
    return arrays


def read_user_features(
    path: Path, manifest: manifest_pb2.BundleManifest, *, mmap: bool = False
) -> tuple[EntityTable, list[str], list[str]]:
    """Loads the user table (same layout as the item table), checked against the manifest;
    `mmap` as in `read_item_features`."""
    table, sparse_names, dense_names = read_item_features(path, mmap=mmap)
    declared = manifest.user_features
    check_entity_table(
        path,
        table,
        sparse_names,
        dense_names,
        Declared(
            "user_features",
            int(declared.num_users),
            tuple(declared.sparse_features),
            tuple(declared.dense_features),
        ),
        manifest,
    )
    return table, sparse_names, dense_names


def read_item_features(
    path: Path, manifest: manifest_pb2.BundleManifest | None = None, *, mmap: bool = False
) -> tuple[EntityTable, list[str], list[str]]:
    """Loads the item table written by `write_item_features`.

    The archive's structure is checked first (`check_archive`); with `manifest`, every array is
    checked against it too (`check_item_table`). With `mmap`, the arrays are read-only views
    of the mapped file (see the module docstring); the file must not change while they are in
    use (published versions never do).

    Returns:
        (items, sparse feature names, dense feature names).

    Raises:
        InvalidInput: the file is not a valid item feature table, or not the one the manifest
            describes.
    """
    check_archive(path)
    try:
        with _open_arrays(path, mmap) as data:
            sparse_names = [str(name) for name in data["sparse_names"]]
            dense_names = [str(name) for name in data["dense_names"]]
            dense = data["dense"]
            sparse = {
                name: JaggedColumn(data[f"sparse.{name}.values"], data[f"sparse.{name}.offsets"])
                for name in sparse_names
            }
    except (OSError, KeyError, ValueError, MemoryError) as error:
        raise InvalidInput(
            f"{path}: not a valid item feature table ({clip(str(error), 160)})"
        ) from None
    if dense.ndim != 2:
        raise InvalidInput(f"{path}: dense must be a [items, features] array, found {dense.shape}")
    items = EntityTable(num_rows=dense.shape[0], sparse=sparse, dense=dense)
    if manifest is not None:
        check_item_table(path, items, sparse_names, dense_names, manifest)
    return items, sparse_names, dense_names


class _MappedArchive(dict):
    """`np.load`'s context-manager interface over `_mapped_arrays`."""

    def __enter__(self) -> _MappedArchive:
        return self

    def __exit__(self, *_: object) -> None:
        return None


def _open_arrays(path: Path, mmap: bool):
    """The archive's arrays by name: `np.load` (copies), or mapped views with `mmap`."""
    if mmap:
        return _MappedArchive(_mapped_arrays(path))
    return np.load(path, allow_pickle=False)


@dataclass(frozen=True)
class Declared:
    """What the manifest declares of one entity table: its field, rows and feature names."""

    field: str
    rows: int
    sparse: tuple[str, ...]
    dense: tuple[str, ...]


def check_item_table(
    path: Path,
    items: EntityTable,
    sparse_names: Sequence[str],
    dense_names: Sequence[str],
    manifest: manifest_pb2.BundleManifest,
) -> None:
    """Checks a loaded item table against the manifest (`check_entity_table`)."""
    declared = manifest.item_features
    check_entity_table(
        path,
        items,
        sparse_names,
        dense_names,
        Declared(
            "item_features",
            int(manifest.schema.num_items),
            tuple(declared.sparse_features),
            tuple(declared.dense_features),
        ),
        manifest,
    )


def check_entity_table(
    path: Path,
    items: EntityTable,
    sparse_names: Sequence[str],
    dense_names: Sequence[str],
    declared: Declared,
    manifest: manifest_pb2.BundleManifest,
) -> None:
    """Checks a loaded entity table against the manifest, so that gathering any valid row
    into a model batch can neither fail nor read outside an array.

    Raises:
        InvalidInput: naming the first array that disagrees.
    """
    schema = manifest.schema
    num_items = declared.rows
    if list(sparse_names) != list(declared.sparse):
        raise InvalidInput(f"{path}: sparse features differ from the manifest's {declared.field}")
    if list(dense_names) != list(declared.dense):
        raise InvalidInput(f"{path}: dense features differ from the manifest's {declared.field}")
    if items.dense.shape != (num_items, len(dense_names)) or items.dense.dtype != np.float32:
        raise InvalidInput(
            f"{path}: dense is {items.dense.dtype} {items.dense.shape}, the manifest declares "
            f"float32 ({num_items}, {len(dense_names)})"
        )
    if not np.isfinite(items.dense).all():
        raise InvalidInput(f"{path}: dense holds NaN or infinite values")
    cardinality = {f.name: int(f.cardinality) for f in schema.sparse_features}
    for name in sparse_names:
        column = items.sparse[name]
        values, offsets = column.values, column.offsets
        label = untrusted(name)
        if values.dtype != np.int64 or offsets.dtype != np.int64 or values.ndim != 1:
            raise InvalidInput(f"{path}: feature {label}: values and offsets must be int64 vectors")
        if offsets.shape != (num_items + 1,):
            raise InvalidInput(
                f"{path}: feature {label}: {offsets.size} offsets, {num_items + 1} expected"
            )
        lengths = np.diff(offsets)
        if offsets[0] != 0 or offsets[-1] != values.size or (lengths < 0).any():
            raise InvalidInput(f"{path}: feature {label}: offsets do not index its values")
        if lengths.size and lengths.max() > MAX_BAG_IDS:
            raise InvalidInput(
                f"{path}: feature {label}: an item holds {lengths.max()} ids, at most {MAX_BAG_IDS}"
            )
        if values.size and (values.min() < 0 or values.max() >= cardinality[name]):
            raise InvalidInput(
                f"{path}: feature {label}: ids outside its cardinality [0, {cardinality[name]})"
            )
