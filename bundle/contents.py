"""A version's data files read and checked together: what `recship serve` loads and what
`recship bundle verify` proves before anyone serves it.

One owner for the list: the index, the item and user tables, the transforms and the golden
record, each checked against the manifest as it is read, then against each other (the entry
points' features must have transforms, the ranker's item features must be in the item table,
the item key's vocabulary must name every item). A check added here holds for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recship.base.errors import InvalidInput
from recship.base.jagged import EntityTable
from recship.bundle.golden import GoldenSet, check_golden_shapes, read_golden
from recship.bundle.index import read_index
from recship.bundle.item_features import read_item_features, read_user_features
from recship.bundle.layout import QUERY_TOWER, RANKER
from recship.bundle.transforms import Transforms, Vocabulary, check_transforms, read_transforms
from recship.protos.v1 import manifest_pb2


@dataclass(frozen=True)
class VersionContents:
    """A version's data files, read and checked (`read_contents`).

    Attributes:
        index: the FAISS index of every item.
        items: the item table; `item_sparse` names its sparse features.
        users: the user table, or None when the bundle has none.
        transforms: every feature's raw-value transform.
        golden: the golden record the entry points must reproduce.
        query_tower_features: the query tower's sparse features, in its input order.
        ranker_query_features: the ranker's query-side sparse features (they come first).
        ranker_item_features: the ranker's item-side sparse features (the item table's).
        sparse_needed: the sparse features a query must give either entry point, each once.
        dense_needed: the query-side dense features, in the entry points' order.
        item_vocabulary: the item key's vocabulary, one entry per item.
    """

    index: Any
    items: EntityTable
    item_sparse: tuple[str, ...]
    users: EntityTable | None
    user_sparse: tuple[str, ...]
    user_dense: tuple[str, ...]
    transforms: Transforms
    golden: GoldenSet
    query_tower_features: tuple[str, ...]
    ranker_query_features: tuple[str, ...]
    ranker_item_features: tuple[str, ...]
    sparse_needed: tuple[str, ...]
    dense_needed: tuple[str, ...]
    item_vocabulary: Vocabulary


def read_contents(
    manifest: manifest_pb2.BundleManifest, version_dir: Path, *, mmap_index: bool = True
) -> VersionContents:
    """Reads a version's data files and checks them against its manifest and each other.

    The tables are mapped, not copied (their pages are shared with every other version and
    process that maps the file); `mmap_index` maps the index's vectors too.

    Raises:
        InvalidInput: a file disagrees with the manifest, or the files with each other (the
            message names the file or the features).
    """
    version_dir = Path(version_dir)
    schema = manifest.schema
    query_side = {
        f.name for f in schema.sparse_features if f.side == manifest_pb2.FEATURE_SIDE_QUERY
    }
    entry_points = {entry.name: entry for entry in manifest.entry_points}
    query_tower_features = tuple(entry_points[QUERY_TOWER].sparse_feature_order)
    ranker_order = tuple(entry_points[RANKER].sparse_feature_order)
    ranker_query = tuple(f for f in ranker_order if f in query_side)
    ranker_item = tuple(f for f in ranker_order if f not in query_side)
    if ranker_order != ranker_query + ranker_item:
        raise InvalidInput("bundle ranker must take query-side features before item-side ones")
    sparse_needed = tuple(dict.fromkeys(query_tower_features + ranker_query))
    dense_needed = tuple(schema.dense_features[: schema.query_dense_count])

    index = read_index(
        version_dir / manifest.index.file,
        manifest.index,
        mmap=mmap_index,
        num_items=schema.num_items,
    )
    # Checked as they load: one row per entity, offsets that index their values, ids inside
    # each feature's cardinality, bounded bags.
    items, item_sparse, _ = read_item_features(
        version_dir / manifest.item_features.file, manifest, mmap=True
    )
    absent = [name for name in ranker_item if name not in item_sparse]
    if absent:
        raise InvalidInput(f"bundle item features lack {', '.join(absent)}")
    users, user_sparse, user_dense = None, [], []
    if manifest.HasField("user_features"):
        users, user_sparse, user_dense = read_user_features(
            version_dir / manifest.user_features.file, manifest, mmap=True
        )

    transforms = read_transforms(version_dir)
    missing = [n for n in (*sparse_needed, *dense_needed) if n not in transforms.features]
    if missing:
        raise InvalidInput(f"bundle transforms lack {', '.join(missing)}")
    check_transforms(transforms, manifest)
    item_key = transforms.item_key
    vocabulary = transforms.features[item_key].vocabulary if item_key else None
    if vocabulary is None or len(vocabulary) != schema.num_items:
        raise InvalidInput(f"bundle item key vocabulary does not hold the {schema.num_items} items")

    golden = read_golden(version_dir / manifest.golden.file)
    check_golden_shapes(golden, manifest)
    return VersionContents(
        index=index,
        items=items,
        item_sparse=tuple(item_sparse),
        users=users,
        user_sparse=tuple(user_sparse),
        user_dense=tuple(user_dense),
        transforms=transforms,
        golden=golden,
        query_tower_features=query_tower_features,
        ranker_query_features=ranker_query,
        ranker_item_features=ranker_item,
        sparse_needed=sparse_needed,
        dense_needed=dense_needed,
        item_vocabulary=vocabulary,
    )
