"""The feature spec: one declarative TOML file naming a data set's tables, columns and features.

A team describes its own data instead of reshaping it into MovieLens: where the interactions,
users and items are (Parquet or CSV/TSV), which columns key them, and for every feature its
side, kind, source column and transform. `recship.trainer.data.tables` reads the tables and
fits the transforms; the built-in data sets (MovieLens in both layouts, the synthetic
generator, Criteo) are specs of the same mechanism (`recship.trainer.data.builtin`). The
format is documented in `trainer/data/SPEC.md`; this module parses and checks it, and every
error names the file and the field.

Example::

    spec = read_spec(Path("shop/spec.toml"))
    data = load_tables(spec)          # recship.trainer.data.tables
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from recship.base.errors import InvalidInput, NotFound

Format = Literal["csv", "tsv", "parquet"]
FORMATS: tuple[str, ...] = get_args(Format)
Kind = Literal["categorical", "hashed", "bucketized", "dense"]
KINDS: tuple[str, ...] = get_args(Kind)
Side = Literal["user", "item", "context"]
SIDES: tuple[str, ...] = get_args(Side)
Aggregate = Literal["count"]
Column = Literal["string", "int64", "float64"]
COLUMN_TYPES: tuple[str, ...] = get_args(Column)


def format_of(path: Path) -> str:
    """The table format a file's suffix names (".txt" reads as CSV); may be none of FORMATS."""
    suffix = path.suffix.lower().lstrip(".")
    return {"txt": "csv"}.get(suffix, suffix)


@dataclass(frozen=True)
class TableSpec:
    """One input table.

    Attributes:
        path: the file (relative paths are relative to the spec's folder).
        format: csv, tsv or parquet (default: from the suffix).
        header: csv/tsv: the first line names the columns.
        columns: csv/tsv without a header: the column names, in order.
        delimiter: csv/tsv field separator (default "," or tab).
        encoding: csv/tsv text encoding (e.g. "latin-1").
        types: column name -> "string", "int64" or "float64", overriding inference (e.g. zip
            codes that look like numbers).
        key: users/items: the column holding the entity's key.
        header_types: csv/tsv: header names carry RecBole-style ":type" suffixes to strip.
        title: items: a column of display names (shown by `recship demo`, not a feature).
    """

    path: Path
    format: Format
    header: bool = True
    columns: tuple[str, ...] = ()
    delimiter: str | None = None
    encoding: str = "utf8"
    types: Mapping[str, Column] = field(default_factory=dict)
    key: str | None = None
    header_types: bool = False
    title: str | None = None


@dataclass(frozen=True)
class LabelSpec:
    """The DLRM label of an interaction: a 0/1 column, or `column >= at_least`."""

    column: str
    at_least: float | None = None


@dataclass(frozen=True)
class InteractionsSpec:
    """Which columns of the interactions table key users and items and carry the label."""

    user: str | None
    item: str | None
    label: LabelSpec | None = None
    weight: str | None = None
    timestamp: str | None = None
    rating: str | None = None


@dataclass(frozen=True)
class FeatureSpec:
    """One feature: where its raw value comes from and how it is encoded.

    Attributes:
        name: the feature's name (in requests, models and the bundle).
        side: user, item or context (a column of the interactions, sent with each query).
        kind: categorical, hashed, bucketized or dense.
        column: the source column (default: the name).
        prefix: use the first `prefix` characters of the value's text.
        pattern: use the first group of this regular expression's match on the value's text
            (no match: missing).
        separator: the value is text listing several values (multi-valued).
        flags: the value is the list of these columns whose value is non-zero (multi-valued).
        aggregate: "count": the entity's number of training interactions (dense).
        vocabulary: categorical: a fixed vocabulary instead of a fitted one.
        min_count: categorical: values seen fewer times are out of vocabulary.
        oov: categorical: "bucket" (one extra id) or "error".
        buckets / seed: hashed.
        boundaries / quantiles / missing_bucket: bucketized (fixed boundaries, or this many
            quantile buckets fitted on training rows).
        log1p / clip / standardize: dense.
        default: the raw value a query that does not send it gets (else required).
        default_fit: fit the default on the training rows instead: "mode" (the most frequent
            value) or "median" (numbers).
        max_length: multi-valued: most values a query may send.
        description: what it means, for people.
    """

    name: str
    side: Side
    kind: Kind
    column: str
    prefix: int | None = None
    pattern: str | None = None
    separator: str | None = None
    flags: tuple[str, ...] = ()
    aggregate: Aggregate | None = None
    vocabulary: tuple[str, ...] | None = None
    min_count: int = 1
    oov: Literal["bucket", "error"] = "error"
    buckets: int = 0
    seed: int = 0
    boundaries: tuple[float, ...] = ()
    quantiles: int = 0
    missing_bucket: bool = False
    log1p: bool = False
    clip: tuple[float | None, float | None] = (None, None)
    standardize: bool = False
    default: Any = None
    default_fit: Literal["mode", "median"] | None = None
    max_length: int = 64
    description: str = ""

    @property
    def multi_valued(self) -> bool:
        return self.separator is not None or bool(self.flags)


@dataclass(frozen=True)
class DataSpec:
    """A whole data set: tables, interaction columns and features (user side first)."""

    name: str
    interactions: TableSpec
    columns: InteractionsSpec
    features: tuple[FeatureSpec, ...]
    users: TableSpec | None = None
    items: TableSpec | None = None
    user_key_feature: str | None = None
    item_key_feature: str | None = None
    source: str = ""

    def feature(self, name: str) -> FeatureSpec:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise InvalidInput(f"spec {self.name!r} has no feature {name!r}")

    def of_side(self, side: Side) -> tuple[FeatureSpec, ...]:
        return tuple(f for f in self.features if f.side == side)


def read_spec(path: Path) -> DataSpec:
    """Parses and checks a spec file.

    Raises:
        NotFound: the file does not exist.
        InvalidInput: naming the file and the first bad field.
    """
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFound(f"{path}: no such feature spec") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInput(f"{path}: cannot read the feature spec ({error})") from None
    except tomllib.TOMLDecodeError as error:
        raise InvalidInput(f"{path}: not valid TOML ({error})") from None
    return parse_spec(document, path.parent, str(path))


def parse_spec(document: Mapping[str, Any], root: Path, source: str) -> DataSpec:
    """A `DataSpec` from a parsed TOML document (built-in specs are documents too).

    Args:
        document: the TOML document as a mapping.
        root: the folder relative table paths are resolved against.
        source: what to call the document in error messages.

    Raises:
        InvalidInput: naming `source` and the first bad field.
    """
    reader = _Reader(source)
    known = {"name", "interactions", "users", "items", "features"}
    reader.unknown(document, known, "")
    tables = {
        role: reader.table(document[role], root, role, keyed=role != "interactions")
        for role in ("interactions", "users", "items")
        if role in document
    }
    if "interactions" not in tables:
        raise InvalidInput(f"{source}: [interactions] is required")
    interactions = reader.interactions(document["interactions"])
    raw_features = document.get("features") or []
    if not isinstance(raw_features, list) or not raw_features:
        raise InvalidInput(f"{source}: [[features]] lists no feature")
    features = tuple(
        reader.feature(entry, f"features[{i}]") for i, entry in enumerate(raw_features)
    )
    names = [f.name for f in features]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidInput(f"{source}: features {', '.join(repeated)} are declared twice")
    order = {side: index for index, side in enumerate(SIDES)}
    features = tuple(sorted(features, key=lambda f: order[f.side]))
    spec = DataSpec(
        name=str(document.get("name") or root.name),
        interactions=tables["interactions"],
        columns=interactions,
        features=features,
        users=tables.get("users"),
        items=tables.get("items"),
        source=source,
    )
    return _with_key_features(spec, source)


def _with_key_features(spec: DataSpec, source: str) -> DataSpec:
    """Finds the categorical feature of each side whose column keys that side's entities."""
    keys: dict[str, str | None] = {}
    for side, column, table in (
        ("user", spec.columns.user, spec.users),
        ("item", spec.columns.item, spec.items),
    ):
        key_column = table.key if table is not None else column
        if column is None:
            keys[side] = None
            continue
        found = [
            f
            for f in spec.of_side(side)  # type: ignore[arg-type]
            if f.kind == "categorical" and f.column == key_column and not f.multi_valued
        ]
        if not found:
            raise InvalidInput(
                f"{source}: no single-valued categorical {side} feature reads the {side} key "
                f"column {key_column!r}; declare one (it becomes the {side} id feature)"
            )
        keys[side] = found[0].name
    return DataSpec(**{**spec.__dict__, "user_key_feature": keys["user"],
                       "item_key_feature": keys["item"]})  # fmt: skip


class _Reader:
    """Typed access to a TOML document with errors that name the source and the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> InvalidInput:
        return InvalidInput(f"{self.source}: {where}: {problem}")

    def unknown(self, table: Mapping[str, Any], known: set[str], where: str) -> None:
        extra = sorted(set(table) - known)
        if extra:
            raise self.fail(where or "top level", f"unknown key(s) {', '.join(extra)}")

    def get(self, table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str,
            default: Any = None) -> Any:  # fmt: skip
        if key not in table:
            return default
        value = table[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind)):
            names = "/".join(t.__name__ for t in _tuple(kind))
            raise self.fail(f"{where}.{key}", f"expected {names}, got {value!r}")
        return value

    def table(self, raw: Any, root: Path, role: str, *, keyed: bool) -> TableSpec:
        if not isinstance(raw, Mapping):
            raise self.fail(role, "expected a table")
        known = {"path", "format", "header", "columns", "delimiter", "encoding", "types",
                 "header_types", "key", "title", "user", "item", "label", "weight", "timestamp",
                 "rating"}  # fmt: skip
        self.unknown(raw, known, role)
        path_text = self.get(raw, "path", str, role)
        if not path_text:
            raise self.fail(f"{role}.path", "required")
        path = Path(path_text)
        path = path if path.is_absolute() else root / path
        fmt = self.get(raw, "format", str, role, format_of(path))
        if fmt not in FORMATS:
            raise self.fail(f"{role}.format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
        columns = tuple(self.get(raw, "columns", list, role, []))
        header = self.get(raw, "header", bool, role, not columns)
        if fmt != "parquet" and not header and not columns:
            raise self.fail(role, "a file without a header needs `columns`")
        types = dict(self.get(raw, "types", dict, role, {}))
        for name, kind in types.items():
            if kind not in COLUMN_TYPES:
                raise self.fail(f"{role}.types.{name}", f"{kind!r} is not one of {COLUMN_TYPES}")
        key = self.get(raw, "key", str, role)
        if keyed and not key:
            raise self.fail(f"{role}.key", "required: the column keying each row")
        return TableSpec(
            path=path,
            format=fmt,  # type: ignore[arg-type]
            header=header,
            columns=tuple(str(c) for c in columns),
            delimiter=self.get(raw, "delimiter", str, role),
            encoding=self.get(raw, "encoding", str, role, "utf8"),
            types=types,
            key=key,
            header_types=self.get(raw, "header_types", bool, role, False),
            title=self.get(raw, "title", str, role),
        )

    def interactions(self, raw: Mapping[str, Any]) -> InteractionsSpec:
        where = "interactions"
        label = raw.get("label")
        if isinstance(label, str):
            parsed: LabelSpec | None = LabelSpec(label)
        elif isinstance(label, Mapping):
            self.unknown(label, {"column", "at_least"}, f"{where}.label")
            column = self.get(label, "column", str, f"{where}.label")
            if not column:
                raise self.fail(f"{where}.label.column", "required")
            parsed = LabelSpec(column, self.get(label, "at_least", (int, float), f"{where}.label"))
        elif label is None:
            parsed = None
        else:
            raise self.fail(f"{where}.label", f"expected a column name or a table, got {label!r}")
        return InteractionsSpec(
            user=self.get(raw, "user", str, where),
            item=self.get(raw, "item", str, where),
            label=parsed,
            weight=self.get(raw, "weight", str, where),
            timestamp=self.get(raw, "timestamp", str, where),
            rating=self.get(raw, "rating", str, where),
        )

    def feature(self, raw: Any, where: str) -> FeatureSpec:
        if not isinstance(raw, Mapping):
            raise self.fail(where, "expected a table")
        known = {"name", "side", "kind", "column", "prefix", "pattern", "separator", "flags",
                 "aggregate", "vocabulary", "min_count", "oov", "buckets", "seed", "boundaries",
                 "quantiles", "missing_bucket", "log1p", "clip", "standardize", "default",
                 "default_fit", "max_length", "description"}  # fmt: skip
        self.unknown(raw, known, where)
        name = self.get(raw, "name", str, where)
        if not name:
            raise self.fail(f"{where}.name", "required")
        where = f"{where} ({name})"
        side = self.get(raw, "side", str, where)
        if side not in SIDES:
            raise self.fail(f"{where}.side", f"{side!r} is not one of {', '.join(SIDES)}")
        kind = self.get(raw, "kind", str, where)
        if kind not in KINDS:
            raise self.fail(f"{where}.kind", f"{kind!r} is not one of {', '.join(KINDS)}")
        vocabulary = self.get(raw, "vocabulary", list, where)
        clip = self.get(raw, "clip", list, where, [None, None])
        if len(clip) != 2:
            raise self.fail(f"{where}.clip", "expected [low, high]")
        spec = FeatureSpec(
            name=name,
            side=side,  # type: ignore[arg-type]
            kind=kind,  # type: ignore[arg-type]
            column=self.get(raw, "column", str, where, name),
            prefix=self.get(raw, "prefix", int, where),
            pattern=self.get(raw, "pattern", str, where),
            separator=self.get(raw, "separator", str, where),
            flags=tuple(self.get(raw, "flags", list, where, [])),
            aggregate=self.get(raw, "aggregate", str, where),
            vocabulary=None if vocabulary is None else tuple(str(v) for v in vocabulary),
            min_count=self.get(raw, "min_count", int, where, 1),
            oov=self.get(raw, "oov", str, where, "error"),
            buckets=self.get(raw, "buckets", int, where, 0),
            seed=self.get(raw, "seed", int, where, 0),
            boundaries=tuple(float(b) for b in self.get(raw, "boundaries", list, where, [])),
            quantiles=self.get(raw, "quantiles", int, where, 0),
            missing_bucket=self.get(raw, "missing_bucket", bool, where, False),
            log1p=self.get(raw, "log1p", bool, where, False),
            clip=(clip[0], clip[1]),
            standardize=self.get(raw, "standardize", bool, where, False),
            default=raw.get("default"),
            default_fit=self.get(raw, "default_fit", str, where),
            max_length=self.get(raw, "max_length", int, where, 64),
            description=self.get(raw, "description", str, where, ""),
        )
        self.check_feature(spec, where)
        return spec

    def check_feature(self, spec: FeatureSpec, where: str) -> None:
        if spec.oov not in ("bucket", "error"):
            raise self.fail(f"{where}.oov", f"{spec.oov!r} is not bucket or error")
        if spec.aggregate not in (None, "count"):
            raise self.fail(f"{where}.aggregate", f"{spec.aggregate!r} is not count")
        if spec.aggregate and (spec.kind != "dense" or spec.side == "context"):
            raise self.fail(f"{where}.aggregate", "only user or item dense features aggregate")
        if spec.kind == "hashed" and spec.buckets < 1:
            raise self.fail(f"{where}.buckets", "a hashed feature needs buckets >= 1")
        if spec.kind == "bucketized":
            if bool(spec.boundaries) == bool(spec.quantiles):
                raise self.fail(where, "a bucketized feature needs boundaries or quantiles")
            if list(spec.boundaries) != sorted(set(spec.boundaries)):
                raise self.fail(f"{where}.boundaries", "must be strictly increasing")
        if spec.kind == "dense" and spec.multi_valued:
            raise self.fail(where, "a dense feature holds one number, not a list")
        if spec.separator is not None and spec.flags:
            raise self.fail(where, "give either separator or flags, not both")
        if spec.default_fit not in (None, "mode", "median"):
            raise self.fail(f"{where}.default_fit", f"{spec.default_fit!r} is not mode or median")
        if spec.default_fit is not None and spec.default is not None:
            raise self.fail(where, "give either default or default_fit, not both")
        if spec.max_length < 1:
            raise self.fail(f"{where}.max_length", "must be >= 1")
        if spec.min_count < 1:
            raise self.fail(f"{where}.min_count", "must be >= 1")


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
