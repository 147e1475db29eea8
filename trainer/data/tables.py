"""Read a spec's tables with pyarrow and fit its transforms: raw columns in, model inputs out.

`load_tables(spec)` streams each table (Parquet, or CSV/TSV through pyarrow's block reader: no
Python parsing per line), fits every feature's transform (vocabularies, quantile boundaries,
dense statistics) and encodes the users, items and interactions into the `InteractionDataset`
the models train on, carrying the fitted `Transforms` the bundle will serve with.

What is fitted on what: a user or item feature on its entity table (the catalogue of users
and items, which is not split); aggregates (`aggregate = "count"`) and dense statistics of
aggregates on the training interactions only, when the data set is split
(`InteractionDataset.split` recomputes them). Held-out interactions never shape a transform.

Example::

    data = load_tables(read_spec(Path("shop/spec.toml")))
    train, held_out = data.split(0.1, seed=0)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recship.base.errors import InvalidInput, NotFound
from recship.base.jagged import EntityTable, JaggedColumn
from recship.bundle.transforms import (
    Derivation,
    FeatureTransform,
    Transforms,
    Vocabulary,
    unknown_rows,
)
from recship.trainer.data.dataset import InteractionDataset
from recship.trainer.data.schema import DatasetSchema, DenseFeatureSpec, SparseFeatureSpec
from recship.trainer.data.spec import DataSpec, FeatureSpec, TableSpec

_ARROW_TYPES = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64()}
# Rows per CSV block: large enough to amortise, small enough to stream big files.
_BLOCK_BYTES = 1 << 24


# -- reading -----------------------------------------------------------------------------------
def read_table(table: TableSpec, role: str, given: pa.Table | None = None) -> pa.Table:
    """Reads one table (CSV/TSV streamed in blocks, or Parquet) with the spec's column names.

    Args:
        table: the table's spec.
        role: "interactions", "users" or "items", for messages.
        given: the table already in memory (e.g. generated): used instead of reading the file.

    Raises:
        NotFound: the file does not exist.
        InvalidInput: the file cannot be parsed: one line naming the file, the line (CSV/TSV)
            and the problem.
    """
    if given is not None:
        result = given
    elif not table.path.is_file():
        raise NotFound(f"{table.path}: file not found")
    else:
        try:
            result = (
                pq.read_table(table.path) if table.format == "parquet" else _read_delimited(table)
            )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as error:
            reason = str(error).strip().splitlines()[0]
            raise InvalidInput(f"{table.path}: cannot read the {role} table: {reason}") from None
    if table.header_types:
        result = result.rename_columns([name.split(":", 1)[0] for name in result.column_names])
    if table.format == "parquet":
        for name, kind in table.types.items():
            if name in result.column_names:
                column = pc.cast(result.column(name), _ARROW_TYPES[kind])
                result = result.set_column(result.column_names.index(name), name, column)
    if len(result) == 0:
        raise InvalidInput(f"{table.path}: no {role}")
    return result


def _read_delimited(table: TableSpec) -> pa.Table:
    """CSV/TSV through pyarrow's streaming reader; encoding "auto" is UTF-8, else Latin-1."""
    if table.encoding != "auto":
        return _read_blocks(table, table.encoding)
    try:
        return _read_blocks(table, "utf8")
    except pa.ArrowInvalid as error:
        if not _is_encoding_error(error):
            raise
        return _read_blocks(table, "latin-1")


def _is_encoding_error(error: Exception) -> bool:
    return "invalid utf8" in str(error).lower().replace("-", "")


def _read_blocks(table: TableSpec, encoding: str) -> pa.Table:
    delimiter = table.delimiter or ("\t" if table.format == "tsv" else ",")
    header: list[str] = []
    if table.header:
        with open(table.path, encoding=encoding, newline="", errors="replace") as handle:
            header = handle.readline().rstrip("\r\n").split(delimiter)
    # Header names may carry RecBole's ":type": type and look up columns by their base name.
    full = {column.split(":", 1)[0]: column for column in header} if table.header_types else {}
    types = {full.get(n, n): _ARROW_TYPES[kind] for n, kind in table.types.items()}
    bad_rows: list[tuple[int, int, str]] = []

    def invalid(row: pacsv.InvalidRow) -> str:
        bad_rows.append((row.expected_columns, row.actual_columns, row.text or ""))
        return "error"

    try:
        reader = pacsv.open_csv(
            str(table.path),
            read_options=pacsv.ReadOptions(
                column_names=list(table.columns) or None,
                encoding=encoding,
                block_size=_BLOCK_BYTES,
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter, quote_char=False, invalid_row_handler=invalid
            ),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False),
        )
        return pa.Table.from_batches(list(reader), schema=reader.schema)
    except pa.ArrowInvalid as error:
        if _is_encoding_error(error):
            raise  # "auto" encoding retries as Latin-1
        names = list(table.columns) or [c.split(":", 1)[0] for c in header]
        raise InvalidInput(
            _located(table, encoding, delimiter, names, str(error), bad_rows)
        ) from None


def _located(
    table: TableSpec,
    encoding: str,
    delimiter: str,
    names: list[str],
    reason: str,
    bad_rows: list[tuple[int, int, str]],
) -> str:
    """pyarrow's reason for refusing a file, reworded to name the line (found by scanning)."""
    shown_delimiter = "tab" if delimiter == "\t" else repr(delimiter)
    with open(table.path, encoding=encoding, newline="", errors="replace") as handle:
        lines = [line.rstrip("\r\n") for line in handle]
    if bad_rows:
        expected, actual, text = bad_rows[0]
        number = next((n for n, line in enumerate(lines, 1) if line == text), 0)
        return (
            f"{table.path}:{number}: expected {expected} {shown_delimiter}-separated columns, "
            f"got {actual}"
        )
    conversion = re.search(
        r"column #(\d+).*conversion error to (\w+): invalid value '(.*)'", reason
    )
    if conversion:
        position, kind, value = int(conversion.group(1)), conversion.group(2), conversion.group(3)
        first = 2 if table.header else 1
        number = next(
            (
                n
                for n, line in enumerate(lines[first - 1 :], first)
                if position < len(fields := line.split(delimiter)) and fields[position] == value
            ),
            0,
        )
        name = names[position] if position < len(names) else f"#{position}"
        what = {"int64": "an integer", "double": "a number"}.get(kind, kind)
        return f"{table.path}:{number}: {name} {value!r} is not {what}"
    return f"{table.path}: {reason.splitlines()[0]}"


def _column(table: pa.Table, name: str, where: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise InvalidInput(f"{where}: no column {name!r} (has {', '.join(table.column_names)})")
    return table.column(name)


@dataclass(frozen=True)
class _Rows:
    """Names rows of a table as a person finds them: `file:line` for CSV/TSV, else the row."""

    table: TableSpec | None
    name: str
    order: np.ndarray | None = None  # row r of the data is row order[r] of the file

    def __str__(self) -> str:
        return str(self.table.path) if self.table is not None else self.name

    def label(self, row: int) -> str:
        """ "line N" of a CSV/TSV file, else "row N" (both 1-based)."""
        original = int(self.order[row]) if self.order is not None else row
        if self.table is not None and self.table.format != "parquet":
            return f"line {original + 1 + (1 if self.table.header else 0)}"
        return f"row {original + 1}"

    def at(self, row: int) -> str:
        """Where `row` is: "file:N" for CSV/TSV, "file: row N" otherwise."""
        label = self.label(row)
        if label.startswith("line "):
            return f"{self}:{label.removeprefix('line ')}"
        return f"{self}: {label}"


# -- raw values of one feature ------------------------------------------------------------------
def derivation(feature: FeatureSpec) -> Derivation:
    """The spec's single-column derivations of a feature, as the bundle records them."""
    return Derivation(feature.prefix, feature.pattern, feature.separator)


def raw_values(feature: FeatureSpec, table: pa.Table, where: str) -> pa.Array:
    """The feature's raw value of every row: its column after the spec's derivations."""
    if feature.flags:
        return _flag_lists(feature, table, where)
    values = _column(table, feature.column, where).combine_chunks()
    try:
        return derivation(feature).apply(values, numeric=feature.kind in ("bucketized", "dense"))
    except InvalidInput as error:
        raise InvalidInput(f"{where}: {feature.name}: {error}") from None


def _flag_lists(feature: FeatureSpec, table: pa.Table, where: str) -> pa.Array:
    """Per row, the names of the flag columns whose value is non-zero."""
    flags = np.stack(
        [
            pc.fill_null(_column(table, name, where), 0).to_numpy().astype(bool)
            for name in feature.flags
        ],
        axis=1,
    )
    names = np.array(feature.flags, dtype=object)
    counts = flags.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    values = np.broadcast_to(names, flags.shape)[flags]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.tolist(), pa.string()))


# -- fitting -----------------------------------------------------------------------------------
def fit_transform(feature: FeatureSpec, values: pa.Array) -> FeatureTransform:
    """The feature's transform fitted on `values` (its training rows).

    Raises:
        InvalidInput: the values do not fit the kind, naming the feature.
    """
    flat = pc.list_flatten(values) if feature.multi_valued else values
    if feature.default_fit is not None:
        feature = replace(feature, default=_fitted_default(feature, values))
    common = {
        "name": feature.name,
        "side": feature.side,
        "kind": feature.kind,
        "multi_valued": feature.multi_valued,
        "default": feature.default,
        "max_length": feature.max_length,
        # Values reach `fit_transform` derived already; the transform keeps the derivation for
        # the raw values requests send.
        "derivation": derivation(feature),
    }
    try:
        if feature.kind == "categorical":
            vocabulary = (
                Vocabulary(pa.array(list(feature.vocabulary), pa.string()))
                if feature.vocabulary is not None
                else Vocabulary.fit(flat, min_count=feature.min_count)
            )
            size = len(vocabulary) + (1 if feature.oov == "bucket" else 0)
            return FeatureTransform(
                **common, cardinality=max(size, 1), vocabulary=vocabulary, oov=feature.oov
            )
        if feature.kind == "hashed":
            return FeatureTransform(
                **common, cardinality=feature.buckets, seed=feature.seed, buckets=feature.buckets
            )
        if feature.kind == "bucketized":
            boundaries = feature.boundaries or _quantiles(feature, flat)
            size = len(boundaries) + 1 + (1 if feature.missing_bucket else 0)
            return FeatureTransform(
                **common,
                cardinality=size,
                boundaries=boundaries,
                missing_bucket=feature.missing_bucket,
            )
        low, high = feature.clip
        dense = FeatureTransform(**common, clip_min=low, clip_max=high, log1p=feature.log1p)
        if feature.standardize:
            encoded = dense.encode_dense(flat, derived=True)
            finite = encoded[np.isfinite(encoded)]
            std = float(finite.std()) if finite.size else 0.0
            dense = replace(dense, mean=float(finite.mean()) if finite.size else 0.0, std=std)
        return dense
    except InvalidInput as error:
        raise InvalidInput(f"feature {feature.name!r}: {error}") from None


def _fitted_default(feature: FeatureSpec, values: pa.Array) -> Any:
    """The training rows' most frequent value ("mode") or median ("median")."""
    present = pc.drop_null(values)
    if len(present) == 0:
        raise InvalidInput("no values to fit its default on")
    if feature.default_fit == "median":
        numbers = pc.cast(present, pa.float64()).to_numpy(zero_copy_only=False)
        return float(np.median(numbers))
    counts = pc.value_counts(present)
    best = int(np.argmax(counts.field("counts").to_numpy()))
    value = counts.field("values")[best].as_py()
    return list(value) if isinstance(value, list) else value


def _quantiles(feature: FeatureSpec, values: pa.Array) -> tuple[float, ...]:
    numbers = pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False)
    numbers = numbers[np.isfinite(numbers)]
    if numbers.size == 0:
        raise InvalidInput("no numbers to fit quantiles on")
    edges = np.quantile(numbers, np.linspace(0, 1, feature.quantiles + 1)[1:-1])
    return tuple(float(edge) for edge in np.unique(edges))


def encode_sparse(transform: FeatureTransform, values: pa.Array, rows: _Rows) -> JaggedColumn:
    """A sparse feature of every row, as a jagged column; unknown values name their row.

    Raises:
        InvalidInput: a value is unknown to a feature whose `oov` is "error", or missing
            without a default (or, bucketized, without a missing bucket).
    """
    if transform.default is not None:
        values = pc.fill_null(values, transform.default)
    ids, lengths = transform.encode_ids(values, derived=True)
    bad = unknown_rows(transform, ids, lengths)
    if transform.kind == "categorical" and not transform.multi_valued:
        missing = np.flatnonzero(~values.is_valid().to_numpy(zero_copy_only=False))
        bad = np.union1d(bad, missing) if transform.oov == "error" else bad
    if bad.size:
        row = int(bad[0])
        shown = values[row].as_py() if row < len(values) else None
        remedy = (
            "set missing_bucket = true or a default to give them a bucket"
            if transform.kind == "bucketized"
            else 'set oov = "bucket" to map such values to one id'
        )
        raise InvalidInput(
            f"{rows.at(row)}: {transform.name} {shown!r} {transform.unmapped} "
            f"({bad.size} rows like it); {remedy}"
        )
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return JaggedColumn(ids, offsets)


# -- the data set ------------------------------------------------------------------------------
def load_tables(spec: DataSpec, tables: Mapping[str, pa.Table] | None = None) -> InteractionDataset:
    """Reads, fits and encodes everything the spec names (see the module docstring).

    Args:
        spec: the data set's spec.
        tables: tables already in memory, by role ("interactions", "users", "items"): used
            instead of reading those files (the synthetic generator's tables).

    Raises:
        NotFound: a table's file is missing.
        InvalidInput: a malformed table, an unknown key or category, naming table and row.
    """
    if spec.of_side("context"):
        names = ", ".join(f.name for f in spec.of_side("context"))
        raise InvalidInput(
            f"{spec.source}: context features ({names}) are not supported by the trainer's "
            "models yet; declare them on the user side"
        )
    given = dict(tables or {})
    interactions = read_table(spec.interactions, "interactions", given.get("interactions"))
    transforms: dict[str, FeatureTransform] = {}
    entities: dict[str, EntityTable] = {}
    ordered: dict[str, pa.Table] = {}
    keys: dict[str, np.ndarray] = {}
    for side, key_column, table_spec, key_feature in (
        ("user", spec.columns.user, spec.users, spec.user_key_feature),
        ("item", spec.columns.item, spec.items, spec.item_key_feature),
    ):
        if key_column is None or key_feature is None:
            continue
        if table_spec is not None:
            table = read_table(table_spec, f"{side}s", given.get(f"{side}s"))
        else:  # entities are the distinct keys of the interactions
            column = _column(interactions, key_column, str(spec.interactions.path))
            table = pa.table({key_column: pc.unique(column)})
        entities[side], ordered[side], keys[side] = _entities(
            spec, side, table, key_feature, transforms, _Rows(table_spec, f"{side}s")
        )
    rows = _Rows(spec.interactions, "interactions")
    where = str(rows)
    user_ids = _key_ids(transforms, spec.user_key_feature, interactions, spec.columns.user, rows)
    item_ids = _key_ids(transforms, spec.item_key_feature, interactions, spec.columns.item, rows)
    if not len(interactions):
        raise InvalidInput(f"{where}: no interactions")
    labels = _labels(spec, interactions, where)
    ratings = (
        pc.cast(_column(interactions, spec.columns.rating, where), pa.float32()).to_numpy()
        if spec.columns.rating
        else None
    )
    timestamps = (
        pc.cast(_column(interactions, spec.columns.timestamp, where), pa.int64()).to_numpy()
        if spec.columns.timestamp
        else np.zeros(len(interactions), dtype=np.int64)
    )
    schema = _schema(spec, transforms)
    data = InteractionDataset(
        schema=schema,
        users=entities["user"],
        items=entities["item"],
        user_ids=user_ids,
        item_ids=item_ids,
        labels=labels,
        timestamps=timestamps,
        ratings=ratings,
        raw_user_ids=np.asarray(keys["user"], dtype=str),
        raw_item_ids=np.asarray(keys["item"], dtype=str),
        item_titles=_titles(spec, ordered.get("item")),
        vocabularies=_vocabularies(transforms),
        transforms=Transforms(transforms, spec.user_key_feature, spec.item_key_feature),
    )
    return data.with_activity_features()


def _entities(
    spec: DataSpec,
    side: str,
    table: pa.Table,
    key_feature: str,
    transforms: dict[str, FeatureTransform],
    rows: _Rows,
) -> tuple[EntityTable, pa.Table, np.ndarray]:
    """The side's entity table in key-vocabulary order, its features fitted and encoded; the
    raw table in that order; the raw keys in that order."""
    where = str(rows)
    key = spec.feature(key_feature)
    key_values = raw_values(key, table, where)
    missing = np.flatnonzero(~key_values.is_valid().to_numpy(zero_copy_only=False))
    if missing.size:
        raise InvalidInput(f"{rows.at(int(missing[0]))}: empty {key.column}")
    transform = fit_transform(replace(key, oov="error", vocabulary=None), key_values)
    assert transform.vocabulary is not None
    transforms[key.name] = transform
    positions = transform.vocabulary.lookup(key_values)
    if len(transform.vocabulary) != len(table):
        _, first, counts = np.unique(positions, return_index=True, return_counts=True)
        repeated = int(np.flatnonzero(positions == positions[first[counts > 1][0]])[1])
        raise InvalidInput(
            f"{rows.at(repeated)}: duplicate {key.column} {str(key_values[repeated].as_py())!r} "
            f"(first on {rows.label(int(first[counts > 1][0]))})"
        )
    order = np.argsort(positions, kind="stable")
    table = table.take(pa.array(order))
    rows = _Rows(rows.table, rows.name, order)
    sparse: dict[str, JaggedColumn] = {}
    dense_columns = []
    for feature in spec.of_side(side):  # type: ignore[arg-type]
        if feature.aggregate is not None:
            # Aggregates are computed on the training interactions (`with_activity_features`).
            transforms[feature.name] = fit_transform(feature, pa.array([0.0]))
            dense_columns.append(np.zeros(len(table), dtype=np.float32))
            continue
        values = raw_values(feature, table, where)
        if feature.name != key.name:
            transforms[feature.name] = fit_transform(feature, values)
        fitted = transforms[feature.name]
        if fitted.is_sparse:
            sparse[feature.name] = encode_sparse(fitted, values, rows)
        else:
            if feature.default is not None:
                values = pc.fill_null(values, feature.default)
            encoded = fitted.encode_dense(values, derived=True)
            bad = np.flatnonzero(~np.isfinite(encoded))
            if bad.size:
                raise InvalidInput(
                    f"{where}: feature {feature.name}: {bad.size} rows (first: row {bad[0]}) "
                    "are missing without a default or give no finite number after the "
                    "transform (e.g. log1p of a value <= -1: set clip_min)"
                )
            dense_columns.append(encoded)
    dense = (
        np.stack(dense_columns, axis=1)
        if dense_columns
        else np.zeros((len(table), 0), dtype=np.float32)
    )
    keys = np.asarray(transform.vocabulary.values.to_pylist(), dtype=object)
    return EntityTable(len(table), sparse, dense), table, keys


def _key_ids(
    transforms: Mapping[str, FeatureTransform],
    key_feature: str | None,
    interactions: pa.Table,
    column: str | None,
    rows: _Rows,
) -> np.ndarray:
    if key_feature is None or column is None:
        return np.zeros(len(interactions), dtype=np.int64)
    vocabulary = transforms[key_feature].vocabulary
    assert vocabulary is not None
    values = _column(interactions, column, str(rows)).combine_chunks()
    ids = vocabulary.lookup(values)
    bad = np.flatnonzero(ids < 0)
    if bad.size:
        row = int(bad[0])
        side = (
            "user"
            if key_feature == transforms[key_feature].name
            and (transforms[key_feature].side == "user")
            else "item"
        )
        raise InvalidInput(
            f"{rows.at(row)}: {column} {str(values[row].as_py())!r} is not in the {side}s table"
            + (f" ({bad.size} interactions like it)" if bad.size > 1 else "")
        )
    return ids


def _labels(spec: DataSpec, interactions: pa.Table, where: str) -> np.ndarray:
    label = spec.columns.label
    if label is None:
        return np.ones(len(interactions), dtype=np.float32)
    values = pc.cast(_column(interactions, label.column, where), pa.float64()).to_numpy()
    if label.at_least is not None:
        return (values >= label.at_least).astype(np.float32)
    if not np.isin(values, (0.0, 1.0)).all():
        raise InvalidInput(
            f"{where}: label column {label.column!r} holds values other than 0 and 1; "
            "give label = { column = ..., at_least = ... }"
        )
    return values.astype(np.float32)


def _vocabularies(transforms: Mapping[str, FeatureTransform]) -> dict[str, list[str]]:
    """What each id of a categorical feature means (the OOV bucket as "<other>")."""
    meanings = {}
    for name, transform in transforms.items():
        if transform.vocabulary is not None:
            values = [str(v) for v in transform.vocabulary.values.to_pylist()]
            meanings[name] = values + (["<other>"] if transform.oov == "bucket" else [])
    return meanings


def _titles(spec: DataSpec, items: pa.Table | None) -> list[str] | None:
    """Display names of the items in item-id order, when the items table declares a column."""
    if spec.items is None or spec.items.title is None or items is None:
        return None
    titles = _column(items, spec.items.title, f"{spec.source}: items table")
    return [str(t) if t is not None else "" for t in titles.to_pylist()]


def _schema(spec: DataSpec, transforms: Mapping[str, FeatureTransform]) -> DatasetSchema:
    sparse, dense = [], []
    for feature in spec.features:
        fitted = transforms[feature.name]
        side = "user" if feature.side == "user" else "item"
        if fitted.is_sparse:
            sparse.append(
                SparseFeatureSpec(
                    feature.name,
                    fitted.cardinality,
                    side,  # type: ignore[arg-type]
                    multi_valued=feature.multi_valued,
                    description=feature.description,
                )
            )
        else:
            dense.append(
                DenseFeatureSpec(
                    feature.name,
                    side,  # type: ignore[arg-type]
                    description=feature.description,
                    aggregate=feature.aggregate,
                )
            )
    return DatasetSchema(
        name=spec.name,
        sparse=tuple(sparse),
        dense=tuple(dense),
        user_id_feature=spec.user_key_feature,
        item_id_feature=spec.item_key_feature,
    )
