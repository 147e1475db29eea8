"""A team's own data end to end: Parquet tables with their own column names and a feature spec,
trained, packaged, served, and queried by raw key with raw SKUs coming back.

The answer for a user sent by key alone must equal what the packaged entry points, index and
item table compute directly from the user's own raw row, encoded with the bundle's transforms.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recship.base.errors import InvalidInput
from recship.runtime.client import RecshipClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPEC = """
name = "shop"

[interactions]
path = "events.parquet"
user = "customer"
item = "sku"
label = "clicked"
timestamp = "ts"

[users]
path = "customers.parquet"
key = "customer"

[items]
path = "products.parquet"
key = "sku"
title = "name"

[[features]]
name = "customer_id"
side = "user"
kind = "categorical"
column = "customer"

[[features]]
name = "country"
side = "user"
kind = "categorical"
oov = "bucket"
default_fit = "mode"

[[features]]
name = "age_group"
side = "user"
kind = "bucketized"
column = "age"
quantiles = 4
default_fit = "median"

[[features]]
name = "interests"
side = "user"
kind = "hashed"
column = "interest_list"
separator = ","
buckets = 64
seed = 7
max_length = 8
default = ""

[[features]]
name = "orders"
side = "user"
kind = "dense"
aggregate = "count"
log1p = true
default = 0

[[features]]
name = "sku_id"
side = "item"
kind = "categorical"
column = "sku"

[[features]]
name = "tags"
side = "item"
kind = "categorical"
column = "tag_list"
separator = "|"

[[features]]
name = "price"
side = "item"
kind = "dense"
log1p = true
"""

NUM_USERS, NUM_ITEMS, PER_USER = 240, 120, 10
TAGS = ("red", "blue", "green", "wool", "silk", "sale")
COUNTRIES = ("DE", "FR", "NL", "SE")


def _write_tables(folder: Path) -> None:
    """Customers with a taste for 1-2 tags buy items carrying those tags: a learnable signal."""
    rng = np.random.default_rng(5)
    folder.mkdir(parents=True)
    item_tags = [sorted(rng.choice(len(TAGS), size=rng.integers(1, 3), replace=False))
                 for _ in range(NUM_ITEMS)]  # fmt: skip
    skus = [f"SKU-{i:04d}" for i in range(NUM_ITEMS)]
    pq.write_table(
        pa.table(
            {
                "sku": skus,
                "name": [f"Product {i}" for i in range(NUM_ITEMS)],
                "tag_list": ["|".join(TAGS[t] for t in tags) for tags in item_tags],
                "price": rng.gamma(2.0, 20.0, NUM_ITEMS),
            }
        ),
        folder / "products.parquet",
    )
    taste = [set(rng.choice(len(TAGS), size=rng.integers(1, 3), replace=False).tolist())
             for _ in range(NUM_USERS)]  # fmt: skip
    customers = [f"c-{u:03d}" for u in range(NUM_USERS)]
    pq.write_table(
        pa.table(
            {
                "customer": customers,
                "country": [COUNTRIES[u % len(COUNTRIES)] for u in range(NUM_USERS)],
                "age": rng.integers(18, 70, NUM_USERS),
                "interest_list": [",".join(TAGS[t] for t in sorted(tastes)) for tastes in taste],
            }
        ),
        folder / "customers.parquet",
    )
    rows = {"customer": [], "sku": [], "clicked": [], "ts": []}
    for u in range(NUM_USERS):
        weights = np.array([1.0 + 4.0 * len(taste[u] & set(tags)) for tags in item_tags])
        chosen = rng.choice(NUM_ITEMS, size=PER_USER, replace=False, p=weights / weights.sum())
        for i in chosen:
            rows["customer"].append(customers[u])
            rows["sku"].append(skus[i])
            rows["clicked"].append(int(rng.random() < 0.6))
            rows["ts"].append(1_700_000_000 + int(rng.integers(0, 86_400 * 30)))
    pq.write_table(pa.table(rows), folder / "events.parquet")
    (folder / "spec.toml").write_text(SPEC)


def _direct_recommend(version: Path, raw_user: dict, top_n: int, retrieve_k: int) -> list[str]:
    """Recommend computed from the bundle's files alone, the user's raw values encoded by hand."""
    from recship.bundle.entrypoints import load_entry_point
    from recship.bundle.index import read_index, search
    from recship.bundle.item_features import read_item_features
    from recship.bundle.manifest import read_manifest
    from recship.bundle.transforms import read_transforms

    manifest = read_manifest(version / "MANIFEST.json")
    transforms = read_transforms(version)
    entries = {e.name: e for e in manifest.entry_points}
    tower_order = list(entries["query_tower"].sparse_feature_order)
    ranker_order = list(entries["ranker"].sparse_feature_order)

    def encode(name: str) -> tuple[np.ndarray, np.ndarray]:
        transform = transforms.features[name]
        value = raw_user[name]
        if transform.multi_valued:
            value = [v for v in value.split(",") if v] if isinstance(value, str) else value
        column = pa.array([value]) if transform.kind != "categorical" else pa.array([str(value)])
        return transform.encode_ids(column)

    def jagged(names: list[str], repeat: int) -> tuple[torch.Tensor, torch.Tensor]:
        values, lengths = [], []
        for name in names:
            ids, length = encode(name)
            values.append(np.tile(ids, repeat))
            lengths.append(np.repeat(length, repeat))
        return torch.from_numpy(np.concatenate(values)), torch.from_numpy(
            np.concatenate(lengths).astype(np.int32)
        )

    tower = load_entry_point(version / entries["query_tower"].file)
    with torch.no_grad():
        query = tower(*jagged(tower_order, 1)).numpy()
    index = read_index(version / manifest.index.file, manifest.index)
    _, found = search(index, query, retrieve_k)
    candidates = found[0][found[0] >= 0]
    items, item_sparse, _ = read_item_features(version / manifest.item_features.file)
    user_side = [n for n in ranker_order if n not in item_sparse]
    values, lengths = jagged(user_side, candidates.size)
    item_values, item_lengths = [values], [lengths]
    for name in item_sparse:
        bags, bag_lengths = items.sparse[name].gather(candidates)
        item_values.append(torch.from_numpy(bags))
        item_lengths.append(torch.from_numpy(bag_lengths.astype(np.int32)))
    orders = transforms.features["orders"].encode_dense(pa.array([float(raw_user["orders"])]))
    dense = np.concatenate(
        [np.repeat(orders[None, :], candidates.size, axis=0), items.dense[candidates]], axis=1
    )
    ranker = load_entry_point(version / entries["ranker"].file)
    with torch.no_grad():
        logits = ranker(
            torch.from_numpy(dense.astype(np.float32)),
            torch.cat(item_values),
            torch.cat(item_lengths),
        ).numpy()
    best = candidates[np.argsort(-logits, kind="stable")[:top_n]]
    vocabulary = transforms.features[transforms.item_key].vocabulary
    return vocabulary.values.take(pa.array(best)).to_pylist()


def _check_raw_golden_queries(version: Path, manifest) -> None:
    """The raw golden queries the packager recorded (hashed interests as lists and as
    comma-separated text, quantile age buckets, an OOV country, cold starts on defaults) encode,
    by the server's own codec, to the inputs golden.pt records for them."""
    from recship.bundle.contents import read_contents
    from recship.bundle.golden import read_golden
    from recship.runtime.client import query_proto
    from recship.runtime.features import FeatureCodec

    raw = read_golden(version / "golden.pt").raw
    assert raw is not None
    assert any(isinstance(query.get("interests"), str) for query in raw.queries)
    paths = [f"queries[{i}]" for i in range(len(raw.queries))]
    codec = FeatureCodec(manifest, read_contents(manifest, version))
    tower, _, dense, cold = codec.encode_queries([query_proto(q) for q in raw.queries], paths)
    values, lengths = tower.feature_major()
    assert np.array_equal(values, raw.values.numpy())
    assert np.array_equal(lengths, raw.lengths.numpy())
    assert np.array_equal(dense, raw.dense.numpy())
    assert cold[-2:].tolist() == [True, True]


def test_own_parquet_data_trains_packages_serves_and_answers_in_skus(
    tmp_path: Path, server_factory
) -> None:
    from recship.cli.pipeline import SMOKE_GATE, package_runs, train_models
    from recship.trainer.data.spec import read_spec
    from recship.trainer.data.tables import load_tables

    data = tmp_path / "shop"
    _write_tables(data)
    runs = train_models(tmp_path / "runs", str(data / "spec.toml"), {}, epochs=2, embedding_dim=8)
    report = package_runs(runs, tmp_path / "repo", "shop", thresholds=SMOKE_GATE)
    version = report.ref.path
    for name in ("transforms.json", "vocab/customer_id.arrow", "vocab/tags.arrow"):
        assert (version / name).is_file(), name
    assert report.manifest.schema.user_id_feature == "customer_id"
    _check_raw_golden_queries(version, report.manifest)

    # The user's own raw row and training activity, as the data holds them.
    loaded = load_tables(read_spec(data / "spec.toml"))
    customers = pq.read_table(data / "customers.parquet").to_pylist()
    row = customers[7]
    train, _ = loaded.split(0.1, 0)  # the trainer's split (default eval fraction and seed)
    orders = int((train.user_ids == 7).sum())
    raw_user = {
        "customer_id": row["customer"],
        "country": row["country"],
        "age_group": row["age"],
        "interests": row["interest_list"],
        "orders": orders,
    }
    expected = _direct_recommend(version, raw_user, top_n=5, retrieve_k=30)

    server = server_factory(tmp_path / "repo", metrics_port=None)
    server.wait_ready()
    with RecshipClient(server.target, timeout=30) as client:
        by_key = client.recommend("shop", [{"customer_id": "c-007"}], 30, 5)
        assert by_key.cold_start == [False]
        got = [item.item_id for item in by_key.results[0]]
        assert got == expected
        assert all(sku.startswith("SKU-") for sku in got)
        # Raw values sent explicitly give the same answer as the stored ones.
        interests = row["interest_list"].split(",")
        explicit = client.recommend("shop", [{**raw_user, "interests": interests}], 30, 5).results[
            0
        ]
        assert [item.item_id for item in explicit] == expected
        # Unknown category of an `oov = "bucket"` feature: its own bucket, no error.
        assert client.retrieve("shop", [{"customer_id": "c-007", "country": "XX"}], 3).results[0]
        # An unknown customer: a cold start on the fitted defaults.
        cold = client.recommend("shop", [{"customer_id": "new-customer"}], 30, 5)
        assert cold.cold_start == [True] and len(cold.results[0]) == 5
        # An over-long list names the feature and its bound.
        with pytest.raises(InvalidInput, match=r'features\["interests"\]: 9 values, at most 8'):
            client.retrieve("shop", [{"customer_id": "c-007", "interests": ["a"] * 9}], 3)
        # Candidates and exclusions are SKUs.
        ranked = client.rank("shop", [{"customer_id": "c-007"}], [got[:2]])
        assert len(ranked.results[0]) == 2
        excluded = client.recommend("shop", [{"customer_id": "c-007"}], 30, 5, exclude=[got[:2]])
        assert not set(got[:2]) & {item.item_id for item in excluded.results[0]}
