"""Bundle-layer fixtures: `fill_schema` completes a manifest with a small consistent schema."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from recship.protos.v1 import manifest_pb2

QUERY = manifest_pb2.FEATURE_SIDE_QUERY
ITEM = manifest_pb2.FEATURE_SIDE_ITEM
RETRIEVAL = manifest_pb2.MODEL_ROLE_RETRIEVAL
RANKING = manifest_pb2.MODEL_ROLE_RANKING


def fill_schema(manifest: manifest_pb2.BundleManifest, num_items: int, dim: int) -> None:
    """A user feature and the item id feature, one table each per model, both entry points,
    and counts that agree everywhere the manifest states them (`schema_problems`)."""
    schema = manifest.schema
    schema.num_items, schema.retrieval_dim, schema.item_id_feature = num_items, dim, "item_id"
    schema.sparse_features.add(
        name="user_id", side=QUERY, cardinality=10, used_by=[RETRIEVAL, RANKING]
    )
    schema.sparse_features.add(name="item_id", side=ITEM, cardinality=num_items, used_by=[RANKING])
    for model in (RETRIEVAL, RANKING):
        schema.tables.add(
            name="t_user",
            model=model,
            num_embeddings=10,
            embedding_dim=4,
            feature_names=["user_id"],
        )
    schema.tables.add(
        name="t_item",
        model=RANKING,
        num_embeddings=num_items,
        embedding_dim=4,
        feature_names=["item_id"],
    )
    orders = {"query_tower": ["user_id"], "ranker": ["user_id", "item_id"]}
    for entry in manifest.entry_points:
        entry.sparse_feature_order[:] = orders[entry.name]
    manifest.index.num_vectors = num_items
    manifest.item_features.num_items = num_items
    manifest.item_features.sparse_features[:] = ["item_id"]
    manifest.golden.examples = 4
    manifest.resources.host_bytes = sum(entry.size_bytes for entry in manifest.files)


@pytest.fixture(scope="session")
def schema_filler() -> Callable[[manifest_pb2.BundleManifest, int, int], None]:
    """`fill(manifest, num_items, dim)`: see `fill_schema`."""
    return fill_schema
