"""The feature schema of a data set: which sparse and dense features exist, their sizes and sides.

The schema is the contract between the data sources, the models (one embedding table per sparse
feature, sized by its cardinality) and the serving bundle (user-side features come with each
query, item-side features are joined by the server). It is stored as JSON in `model_config.json`,
so `to_dict` / `from_dict` round-trip it exactly.

Example::

    schema = DatasetSchema(
        name="toy",
        sparse=(SparseFeatureSpec("user_id", 10, "user"), SparseFeatureSpec("item_id", 5, "item")),
        dense=(),
        user_id_feature="user_id",
        item_id_feature="item_id",
    )
    assert DatasetSchema.from_dict(schema.to_dict()) == schema
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from recship.base.errors import InvalidInput

Side = Literal["user", "item"]
SIDES: tuple[str, ...] = get_args(Side)


@dataclass(frozen=True)
class SparseFeatureSpec:
    """One categorical feature, looked up in its own embedding table.

    Attributes:
        name: Feature name, e.g. "user_id", "item_genres"; also the KJT key.
        cardinality: Number of valid ids: every id is in [0, cardinality).
        side: "user" for query-side features (sent by the client; for Criteo every feature),
            "item" for candidate-side features (joined per item by the server).
        multi_valued: True when one row may hold several ids (a jagged bag, e.g. genres).
        description: Human-readable meaning, e.g. "age bucket (7 buckets)".
    """

    name: str
    cardinality: int
    side: Side
    multi_valued: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidInput("sparse feature: name must not be empty")
        if self.cardinality < 1:
            raise InvalidInput(
                f"sparse feature {self.name!r}: cardinality must be >= 1, got {self.cardinality}"
            )
        if self.side not in SIDES:
            raise InvalidInput(
                f"sparse feature {self.name!r}: side must be one of {SIDES}, got {self.side!r}"
            )


@dataclass(frozen=True)
class DenseFeatureSpec:
    """One real-valued feature (a DLRM dense input column).

    Attributes:
        name: Feature name, e.g. "user_log_activity".
        side: "user" (query-side) or "item" (joined per item).
        description: Human-readable meaning, including its transform (e.g. "log1p of count").
        aggregate: "count" when the value is the entity's number of training interactions
            (recomputed on the training split, so held-out interactions never leak into it).
    """

    name: str
    side: Side
    description: str = ""
    aggregate: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidInput("dense feature: name must not be empty")
        if self.side not in SIDES:
            raise InvalidInput(
                f"dense feature {self.name!r}: side must be one of {SIDES}, got {self.side!r}"
            )


@dataclass(frozen=True)
class DatasetSchema:
    """All features of a data set, user-side first, then item-side (the input order of models).

    Attributes:
        name: Data set name: "movielens-100k", "synthetic", "criteo", or a directory name.
        sparse: Sparse features, user-side first, then item-side.
        dense: Dense features, user-side first, then item-side.
        user_id_feature: The sparse feature holding the user id (None without users: Criteo).
        item_id_feature: The sparse feature holding the item id (None without items: Criteo).

    Raises:
        InvalidInput: on duplicate names, side order violations, or id features that are
            missing or on the wrong side.
    """

    name: str
    sparse: tuple[SparseFeatureSpec, ...]
    dense: tuple[DenseFeatureSpec, ...]
    user_id_feature: str | None
    item_id_feature: str | None

    def __post_init__(self) -> None:
        names = [f.name for f in self.sparse] + [f.name for f in self.dense]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidInput(f"schema {self.name!r}: duplicate feature names {duplicates}")
        for kind, features in (("sparse", self.sparse), ("dense", self.dense)):
            sides = [f.side for f in features]
            if sides != sorted(sides, key=SIDES.index):
                raise InvalidInput(
                    f"schema {self.name!r}: {kind} features must list user-side features "
                    "before item-side ones"
                )
        by_name = {f.name: f for f in self.sparse}
        for side, feature in (("user", self.user_id_feature), ("item", self.item_id_feature)):
            if feature is None:
                continue
            spec = by_name.get(feature)
            if spec is None or spec.side != side or spec.multi_valued:
                raise InvalidInput(
                    f"schema {self.name!r}: {side} id feature {feature!r} must be a "
                    f"single-valued {side}-side sparse feature"
                )

    def user_sparse(self) -> tuple[SparseFeatureSpec, ...]:
        """User-side (query) sparse features, in schema order."""
        return tuple(f for f in self.sparse if f.side == "user")

    def item_sparse(self) -> tuple[SparseFeatureSpec, ...]:
        """Item-side (candidate) sparse features, in schema order."""
        return tuple(f for f in self.sparse if f.side == "item")

    def user_dense(self) -> tuple[DenseFeatureSpec, ...]:
        """User-side dense features, in schema order."""
        return tuple(f for f in self.dense if f.side == "user")

    def item_dense(self) -> tuple[DenseFeatureSpec, ...]:
        """Item-side dense features, in schema order."""
        return tuple(f for f in self.dense if f.side == "item")

    def sparse_feature(self, name: str) -> SparseFeatureSpec:
        """The sparse feature called `name`.

        Raises:
            InvalidInput: if the schema has no such sparse feature.
        """
        for feature in self.sparse:
            if feature.name == name:
                return feature
        raise InvalidInput(f"schema {self.name!r} has no sparse feature {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (plain str/int/bool/list values) that `from_dict` turns back."""
        return {
            "name": self.name,
            "sparse": [
                {
                    "name": f.name,
                    "cardinality": f.cardinality,
                    "side": f.side,
                    "multi_valued": f.multi_valued,
                    "description": f.description,
                }
                for f in self.sparse
            ],
            "dense": [
                {
                    "name": f.name,
                    "side": f.side,
                    "description": f.description,
                    "aggregate": f.aggregate,
                }
                for f in self.dense
            ],
            "user_id_feature": self.user_id_feature,
            "item_id_feature": self.item_id_feature,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetSchema:
        """Rebuild a schema written by `to_dict` (e.g. read back from model_config.json).

        Raises:
            InvalidInput: naming the missing or malformed field.
        """
        try:
            return cls(
                name=str(d["name"]),
                sparse=tuple(
                    SparseFeatureSpec(
                        name=str(f["name"]),
                        cardinality=int(f["cardinality"]),
                        side=f["side"],
                        multi_valued=bool(f.get("multi_valued", False)),
                        description=str(f.get("description", "")),
                    )
                    for f in d["sparse"]
                ),
                dense=tuple(
                    DenseFeatureSpec(
                        name=str(f["name"]),
                        side=f["side"],
                        description=str(f.get("description", "")),
                        aggregate=f.get("aggregate"),
                    )
                    for f in d["dense"]
                ),
                user_id_feature=d["user_id_feature"],
                item_id_feature=d["item_id_feature"],
            )
        except KeyError as error:
            raise InvalidInput(f"dataset schema: missing field {error.args[0]!r}") from None
        except (TypeError, ValueError) as error:
            raise InvalidInput(f"dataset schema: malformed field ({error})") from None
