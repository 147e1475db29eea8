"""Raw golden queries: made from fitted transforms alone, encoded by the server's rule, recorded
in golden.pt, and checked by `recship verify`.

Most tests use hand-made transforms with one feature of every kind and derivation; the
`integration` ones use the session's packaged bundle (`bundle_repo`), whose golden.pt the
packager recorded raw queries in: the runtime's own `FeatureCodec` must encode those queries to
the recorded tensors, and `recship verify` must notice a version whose transforms changed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from recship.base.errors import InvalidInput
from recship.bundle.golden import (
    GoldenRecord,
    GoldenSet,
    check_golden_shapes,
    check_raw_output,
    read_golden,
    write_golden,
)
from recship.bundle.raw_queries import (
    DEFAULTED_QUERIES,
    RAW_QUERY_COUNT,
    encode_queries,
    make_queries,
    raw_golden_problems,
    record_raw_queries,
)
from recship.bundle.transforms import (
    Derivation,
    FeatureTransform,
    Transforms,
    Vocabulary,
    read_transforms,
    write_transforms,
)
from recship.protos.v1 import manifest_pb2

SPARSE = ("user_id", "country", "plan", "interests", "tags", "signup_year", "age", "city")
DENSE = ("spend", "score")
ATOL, RTOL = 1e-5, 1e-5


def _vocabulary(*values: str) -> Vocabulary:
    return Vocabulary(pa.array(values, pa.string()))


def _transforms() -> Transforms:
    """One query-side feature of every kind, derivation and default a spec can declare."""
    features = [
        FeatureTransform(
            "user_id", "user", "categorical", cardinality=50,
            vocabulary=_vocabulary(*(str(i) for i in range(1, 51))),
        ),
        FeatureTransform(
            "country", "user", "categorical", cardinality=4,
            vocabulary=_vocabulary("DE", "FR", "NL"), oov="bucket", default="DE",
            derivation=Derivation(prefix=2),
        ),
        FeatureTransform(
            "plan", "user", "categorical", cardinality=2,
            vocabulary=_vocabulary("free", "pro"), default="free",
        ),
        FeatureTransform(
            "interests", "user", "hashed", multi_valued=True, cardinality=64, seed=7,
            buckets=64, default="", max_length=4, derivation=Derivation(separator=","),
        ),
        FeatureTransform(
            "tags", "user", "categorical", multi_valued=True, cardinality=4,
            vocabulary=_vocabulary("red", "blue", "green"), oov="bucket", max_length=3,
            derivation=Derivation(separator="|"),
        ),
        FeatureTransform(
            "signup_year", "user", "bucketized", cardinality=4, boundaries=(2015.0, 2020.0),
            missing_bucket=True, default="unknown", derivation=Derivation(pattern=r"(\d{4})"),
        ),
        FeatureTransform(
            "age", "user", "bucketized", cardinality=4, boundaries=(18.0, 30.5, 65.0),
            default=30,
        ),
        FeatureTransform("city", "user", "hashed", cardinality=16, seed=3, buckets=16),
        FeatureTransform(
            "spend", "user", "dense", clip_min=0.0, clip_max=500.0, log1p=True, mean=3.0,
            std=1.5, default=0,
        ),
        FeatureTransform("score", "user", "dense", mean=10.0, std=2.0),
    ]  # fmt: skip
    return Transforms({f.name: f for f in features}, user_key="user_id", item_key=None)


def _fake_tower(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """A query tower stand-in: per query, each feature's id sum and bag length ([B, 2F])."""
    rows = lengths.numel() // len(SPARSE)
    bags = torch.split(values, lengths.tolist())
    sums = torch.tensor([float(bag.sum()) for bag in bags]).view(len(SPARSE), rows)
    return torch.cat([sums, lengths.view(len(SPARSE), rows).float()]).T.contiguous()


def _per_feature(transforms: Transforms, queries: Sequence[dict[str, Any]]) -> dict[str, list]:
    """Each sparse feature's bags (lists of ids), one per query."""
    encoded = encode_queries(transforms, queries, SPARSE, DENSE)
    bags = np.split(encoded.values, np.cumsum(encoded.lengths)[:-1])
    rows = len(queries)
    return {name: [bag.tolist() for bag in bags[f * rows : (f + 1) * rows]]
            for f, name in enumerate(SPARSE)}  # fmt: skip


def test_queries_are_deterministic_json_and_encodable() -> None:
    transforms = _transforms()
    queries = make_queries(transforms, SPARSE, DENSE)
    assert len(queries) == RAW_QUERY_COUNT
    assert make_queries(_transforms(), SPARSE, DENSE) == queries
    assert json.loads(json.dumps(queries, allow_nan=False)) == queries
    encoded = encode_queries(transforms, queries, SPARSE, DENSE)
    assert encoded.lengths.shape == (len(SPARSE) * RAW_QUERY_COUNT,)
    assert encoded.dense.shape == (RAW_QUERY_COUNT, len(DENSE))


def test_queries_exercise_every_rule() -> None:
    transforms = _transforms()
    queries = make_queries(transforms, SPARSE, DENSE)
    sent = queries[:-DEFAULTED_QUERIES]
    bags = _per_feature(transforms, queries)
    # Categorical: integers where the text is one, and the OOV bucket behind a derived prefix.
    assert {type(q["user_id"]) for q in sent} == {str, int}
    assert any(q["country"] != q["country"][:2] for q in sent)  # the prefix cuts something
    assert [3] in bags["country"]
    assert {tuple(bag) for bag in bags["plan"]} == {(0,), (1,)}
    # Bucketized: every bucket, the missing bucket through the pattern, ints and doubles.
    assert {bag[0] for bag in bags["age"]} == {0, 1, 2, 3}
    assert {type(q["age"]) for q in sent} == {int, float}
    assert {bag[0] for bag in bags["signup_year"]} == {0, 1, 2, 3}
    assert all(isinstance(q["signup_year"], str) for q in sent)
    # Dense: below, inside and above the clip range.
    spend = [q["spend"] for q in sent]
    assert min(spend) < 0 and max(spend) > 500 and any(0 < s < 500 for s in spend)
    # Multi-valued: empty and max_length-long bags, text and list forms, unknown tags.
    assert {len(bag) for bag in bags["interests"]} >= {0, 1, 4}
    assert {len(bag) for bag in bags["tags"]} >= {0, 3}
    forms = {type(q[name]) for q in sent for name in ("interests", "tags")}
    assert forms == {str, list}
    assert any(3 in bag for bag in bags["tags"])
    # Hashed: texts and integers.
    assert {type(q["city"]) for q in sent} == {str, int}
    # The last queries are cold starts on defaults.
    for query, key_bag in zip(queries[-DEFAULTED_QUERIES:], bags["user_id"][-2:], strict=True):
        assert key_bag == []
        assert set(query) == {"user_id", "tags", "city", "score"}


def test_cold_start_takes_the_defaults_through_the_same_rules() -> None:
    transforms = _transforms()
    query = {"user_id": "nobody", "tags": "red|x", "city": "Paris", "score": 12}
    encoded = encode_queries(transforms, [query], SPARSE, DENSE)
    bags = dict(zip(SPARSE, np.split(encoded.values, np.cumsum(encoded.lengths)[:-1]), strict=True))
    assert bags["user_id"].tolist() == []  # unknown key: no id, although its oov is "error"
    assert bags["country"].tolist() == [0]  # default "DE"
    assert bags["plan"].tolist() == [0]
    assert bags["interests"].tolist() == []  # default "": no values
    assert bags["tags"].tolist() == [0, 3]  # "x" goes to the OOV bucket
    assert bags["signup_year"].tolist() == [0]  # "unknown" has no year: the missing bucket
    assert bags["age"].tolist() == [1]  # default 30: one boundary (18) is <= 30
    assert encoded.dense.tolist() == [[pytest.approx((0.0 - 3.0) / 1.5), 1.0]]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"plan": "gold"}, r"plan: value 'gold' is not in its vocabulary"),
        ({"age": [20]}, r"age: takes one value, not a list"),
        ({"tags": ["red"] * 4}, r"tags: 4 values, at most 3"),
        ({"interests": "a,b,c,d,e"}, r"interests: 5 values, at most 4"),
        ({"age": "20"}, r"age: takes a finite number"),
        ({"plan": 1.5}, r"plan: takes text or an integer"),
        ({"score": math.nan}, r"score: needs one finite number"),
        ({"color": "red"}, r"unknown feature 'color'"),
        ({"user_id": 3.0}, r"the user key is one text or integer value"),
    ],
)
def test_encoding_refuses_what_the_server_refuses(change: dict[str, Any], message: str) -> None:
    transforms = _transforms()
    query = {**make_queries(transforms, SPARSE, DENSE)[0], **change}
    with pytest.raises(InvalidInput, match=r"raw query 0: .*" + message):
        encode_queries(transforms, [query], SPARSE, DENSE)


def test_missing_features_need_a_default_and_never_a_stored_user() -> None:
    transforms = _transforms()
    with pytest.raises(InvalidInput, match=r"score: missing, and the feature has no default"):
        encode_queries(transforms, [{"user_id": "nobody", "tags": [], "city": "x"}], SPARSE, DENSE)
    known = {k: v for k, v in make_queries(transforms, SPARSE, DENSE)[0].items() if k != "plan"}
    with pytest.raises(InvalidInput, match=r"plan: missing; the record holds no stored user"):
        encode_queries(transforms, [known], SPARSE, DENSE)
    texty = dataclasses.replace(transforms.features["score"], default="high")
    changed = Transforms({**transforms.features, "score": texty}, "user_id", None)
    with pytest.raises(InvalidInput, match=r"score: its default 'high' is no number"):
        encode_queries(changed, [{"user_id": "nobody", "tags": [], "city": "x"}], SPARSE, DENSE)


def test_a_pattern_that_gives_nothing_back_is_named() -> None:
    transforms = _transforms()
    odd = dataclasses.replace(
        transforms.features["age"], derivation=Derivation(pattern=r"^age=(\d+)$")
    )
    changed = Transforms({**transforms.features, "age": odd}, "user_id", None)
    with pytest.raises(InvalidInput, match=r"no text tried derives to a value of 'age'"):
        make_queries(changed, SPARSE, DENSE)


def _record(transforms: Transforms) -> GoldenSet:
    raw = record_raw_queries(transforms, _fake_tower, SPARSE, DENSE)
    return GoldenSet({}, ATOL, RTOL, raw)


def test_record_round_trips_through_golden_pt_and_reads_back_clean(tmp_path: Path) -> None:
    transforms = _transforms()
    record = _record(transforms)
    tower = GoldenRecord((record.raw.values, record.raw.lengths), record.raw.output)
    write_golden(tmp_path / "golden.pt", {"query_tower": tower}, ATOL, RTOL, record.raw)
    golden = read_golden(tmp_path / "golden.pt")
    assert golden.raw is not None
    assert golden.raw.queries == record.raw.queries
    assert (golden.raw.sparse_features, golden.raw.dense_features) == (SPARSE, DENSE)
    for name in ("values", "lengths", "dense", "output"):
        assert torch.equal(getattr(golden.raw, name), getattr(record.raw, name)), name
    # The transforms as a reader of the files sees them encode to the same tensors.
    write_transforms(tmp_path, transforms)
    assert raw_golden_problems(golden, read_transforms(tmp_path)) == []
    assert check_raw_output(_fake_tower, golden).passed
    assert not check_raw_output(lambda v, n: _fake_tower(v, n) + 1.0, golden).passed


def test_golden_files_without_raw_queries_still_read(tmp_path: Path) -> None:
    inputs = (torch.arange(4), torch.ones(4, dtype=torch.int32))
    write_golden(tmp_path / "golden.pt", {"query_tower": GoldenRecord(inputs, inputs[0])}, 0, 0)
    golden = read_golden(tmp_path / "golden.pt")
    assert golden.raw is None
    assert raw_golden_problems(golden, _transforms()) == []
    with pytest.raises(InvalidInput, match="records no raw queries"):
        check_raw_output(_fake_tower, golden)


def _swapped(vocabulary: Vocabulary | None, first: str, second: str) -> Vocabulary:
    """The vocabulary with two values' ids swapped, its hash index rebuilt to match."""
    assert vocabulary is not None
    values = vocabulary.values.to_pylist()
    i, j = values.index(first), values.index(second)
    values[i], values[j] = values[j], values[i]
    return _vocabulary(*values)


def _swap_tags(feature: FeatureTransform) -> FeatureTransform:
    return dataclasses.replace(feature, vocabulary=_swapped(feature.vocabulary, "red", "green"))


@pytest.mark.parametrize(
    ("feature", "change"),
    [
        ("spend", lambda f: dataclasses.replace(f, mean=f.mean + 0.5)),
        ("score", lambda f: dataclasses.replace(f, std=4.0)),
        ("tags", _swap_tags),
        ("city", lambda f: dataclasses.replace(f, seed=4)),
        ("age", lambda f: dataclasses.replace(f, boundaries=(18.0, 31.0, 65.0))),
        ("country", lambda f: dataclasses.replace(f, derivation=Derivation(prefix=1))),
    ],
)  # fmt: skip
def test_changed_transforms_are_named_by_the_check(
    feature: str, change: Callable[[FeatureTransform], FeatureTransform]
) -> None:
    transforms = _transforms()
    golden = _record(transforms)
    changed = Transforms(
        {**transforms.features, feature: change(transforms.features[feature])}, "user_id", None
    )
    problems = raw_golden_problems(golden, changed)
    assert problems
    assert all(f": {feature} encodes to" in line for line in problems), problems


def test_a_lowered_max_length_refuses_the_recorded_lists() -> None:
    transforms = _transforms()
    golden = _record(transforms)
    shorter = dataclasses.replace(transforms.features["interests"], max_length=3)
    changed = Transforms({**transforms.features, "interests": shorter}, "user_id", None)
    [problem] = raw_golden_problems(golden, changed)
    assert "interests: 4 values, at most 3" in problem


def _manifest(dense: Sequence[str] = DENSE) -> manifest_pb2.BundleManifest:
    manifest = manifest_pb2.BundleManifest()
    schema = manifest.schema
    for name in SPARSE:
        cardinality = _transforms().features[name].cardinality
        schema.sparse_features.add(
            name=name, side=manifest_pb2.FEATURE_SIDE_QUERY, cardinality=cardinality
        )
    schema.dense_features.extend([*dense, "item_popularity"])
    schema.query_dense_count = len(dense)
    schema.retrieval_dim = 2 * len(SPARSE)
    manifest.entry_points.add(name="query_tower", sparse_feature_order=SPARSE)
    manifest.golden.examples = RAW_QUERY_COUNT
    return manifest


def test_check_golden_shapes_checks_the_raw_record() -> None:
    golden = _record(_transforms())
    raw = golden.raw
    assert raw is not None
    tower = {"query_tower": GoldenRecord((raw.values, raw.lengths), raw.output)}
    check_golden_shapes(GoldenSet(tower, ATOL, RTOL, raw), _manifest())
    with pytest.raises(InvalidInput, match="the query side's dense features are"):
        check_golden_shapes(GoldenSet(tower, ATOL, RTOL, raw), _manifest(dense=("spend",)))
    bad_ids = dataclasses.replace(raw, values=raw.values + 1000)
    with pytest.raises(InvalidInput, match="golden raw queries: ids of 'user_id' outside"):
        check_golden_shapes(GoldenSet(tower, ATOL, RTOL, bad_ids), _manifest())
    bad_dense = dataclasses.replace(raw, dense=raw.dense[:, :1])
    with pytest.raises(InvalidInput, match="golden raw queries: dense"):
        check_golden_shapes(GoldenSet(tower, ATOL, RTOL, bad_dense), _manifest())


# -- the packaged bundle -----------------------------------------------------------------------
@pytest.mark.integration
def test_the_server_encodes_the_packaged_raw_queries_to_the_recorded_inputs(
    bundle_repo: Path,
) -> None:
    from recship.bundle.contents import read_contents
    from recship.bundle.manifest import read_manifest
    from recship.runtime.client import query_proto
    from recship.runtime.features import FeatureCodec

    version = bundle_repo / "movies" / "1"
    manifest = read_manifest(version / "MANIFEST.json")
    golden = read_golden(version / "golden.pt")
    raw = golden.raw
    assert raw is not None and len(raw.queries) == RAW_QUERY_COUNT
    check_golden_shapes(golden, manifest)
    codec = FeatureCodec(manifest, read_contents(manifest, version))
    paths = [f"queries[{i}]" for i in range(len(raw.queries))]
    tower, _, dense, cold = codec.encode_queries([query_proto(q) for q in raw.queries], paths)
    values, lengths = tower.feature_major()
    assert np.array_equal(values, raw.values.numpy())
    assert np.array_equal(lengths, raw.lengths.numpy())
    assert np.array_equal(dense, raw.dense.numpy())
    assert cold.tolist() == [False] * (RAW_QUERY_COUNT - 2) + [True, True]


def _verify(version: Path) -> subprocess.CompletedProcess[str]:
    recship = str(Path(sys.executable).with_name("recship"))
    return subprocess.run(
        [recship, "verify", str(version)], capture_output=True, text=True, timeout=300
    )


@pytest.mark.integration
def test_verify_checks_the_raw_queries_against_the_transforms(
    bundle_repo: Path, publish_copy: Callable[..., int], tmp_path: Path
) -> None:
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(bundle_repo / "movies" / "1", repo / "movies" / "1")
    ok = _verify(repo / "movies" / "1")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "query_tower from raw values" in ok.stdout
    assert f"raw golden queries: {RAW_QUERY_COUNT} encode to the recorded inputs" in ok.stdout

    def restandardize(folder: Path) -> None:
        document = json.loads((folder / "transforms.json").read_text())
        for entry in document["features"]:
            if entry["name"] == "user_log_activity":
                entry["mean"], entry["std"] = 1.0, 2.0
        (folder / "transforms.json").write_text(json.dumps(document))

    version = publish_copy(repo, edit=restandardize)
    bad = _verify(repo / "movies" / str(version))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "user_log_activity encodes to" in bad.stdout + bad.stderr
