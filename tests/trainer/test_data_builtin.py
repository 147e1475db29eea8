"""The built-in synthetic and Criteo specs, and `load_tables` over tables held in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from recship.base.errors import InvalidInput, NotFound
from recship.trainer.data.builtin import builtin_document, criteo_spec, synthetic_spec
from recship.trainer.data.criteo import DENSE_FEATURES, LABEL, NUM_COLUMNS, SPARSE_FEATURES
from recship.trainer.data.spec import parse_spec
from recship.trainer.data.tables import load_tables

_SHOP = {
    "name": "shop",
    "interactions": {"path": "events.parquet", "user": "customer", "item": "sku"},
    "features": [
        {"name": "customer", "side": "user", "kind": "categorical"},
        {"name": "sku", "side": "item", "kind": "categorical"},
        {"name": "shade", "side": "item", "kind": "categorical", "column": "colour"},
    ],
    "items": {"path": "items.csv", "key": "sku"},
}


def test_criteo_spec_declares_the_file_layout_and_the_features(tmp_path: Path) -> None:
    spec = criteo_spec(tmp_path / "day_1.tsv", 1234)
    assert spec.interactions.path == tmp_path / "day_1.tsv"
    assert (spec.interactions.format, spec.interactions.header) == ("tsv", False)
    assert len(spec.interactions.columns) == NUM_COLUMNS
    assert spec.columns.label is not None and spec.columns.label.column == LABEL
    assert spec.columns.user is None and spec.columns.item is None
    assert [f.name for f in spec.features] == [*DENSE_FEATURES, *SPARSE_FEATURES]
    assert {(f.kind, f.buckets) for f in spec.features if f.kind != "dense"} == {("hashed", 1234)}
    assert [f.seed for f in spec.features if f.kind == "hashed"] == list(range(26))
    dense = spec.feature("int_4")
    assert (dense.clip[0], dense.log1p, dense.default) == (0, True, 0)


def test_synthetic_spec_fixes_its_vocabularies() -> None:
    spec = synthetic_spec(["genre_0", "genre_1", "genre_2"])
    assert spec.name == "synthetic"
    assert spec.feature("item_genres").vocabulary == ("genre_0", "genre_1", "genre_2")
    assert spec.feature("user_gender").vocabulary == ("gender_0", "gender_1")
    assert len(spec.feature("user_occupation").vocabulary or ()) == 21
    assert (spec.user_key_feature, spec.item_key_feature) == ("user_id", "item_id")
    # A query may omit what MovieLens's specs let it omit, with defaults fitted the same way.
    movielens = builtin_document("grouplens")["features"]
    for feature in movielens:
        if feature["side"] == "user":
            mine = spec.feature(feature["name"])
            assert (mine.default_fit, mine.default) == (
                feature.get("default_fit"),
                feature.get("default"),
            ), feature["name"]


def test_tables_in_memory_replace_their_files_and_others_are_read(tmp_path: Path) -> None:
    spec = parse_spec(_SHOP, tmp_path, "shop.toml")
    events = pa.table({"customer": ["c1", "c2", "c1"], "sku": [7, 9, 9]})
    items = pa.table({"sku": [9, 7, 8], "colour": ["red", "blue", "red"]})
    data = load_tables(spec, tables={"interactions": events, "items": items})
    assert (data.num_users, data.num_items, len(data)) == (2, 3, 3)
    assert data.raw_item_ids.tolist() == ["7", "8", "9"]
    np.testing.assert_array_equal(data.item_ids, [0, 2, 2])
    assert data.vocabularies["shade"] == ["blue", "red"]
    # A role not given in memory is read from its file.
    with pytest.raises(NotFound, match=r"items\.csv: file not found"):
        load_tables(spec, tables={"interactions": events})
    (tmp_path / "items.csv").write_text("sku,colour\n7,blue\n9,red\n")
    assert load_tables(spec, tables={"interactions": events}).num_items == 2
    # Errors name the table as the spec does.
    unknown = pa.table({"customer": ["c1", "c2"], "sku": [7, 11]})
    with pytest.raises(InvalidInput, match=r"events\.parquet: row 2: sku '11' is not in the items"):
        load_tables(spec, tables={"interactions": unknown, "items": items})
