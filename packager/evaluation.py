"""What the packager's gate measures on: validation users and their relevant items.

The validation source is the checkpoint's own held-out split, or a team's `--eval-data` table
(raw user and item keys, mapped through the fitted vocabularies). Never training rows: without
either source the gate has nothing to measure and the packager refuses (or, asked to, publishes
the bundle marked UNGATED).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recship.base.errors import InvalidInput
from recship.trainer.data.dataset import InteractionDataset
from recship.trainer.data.spec import FORMATS, TableSpec, format_of
from recship.trainer.data.tables import read_table
from recship.trainer.evaluate import positives_by_user


@dataclass(frozen=True)
class EvalSplit:
    """Validation (user, item) pairs and where they came from.

    Kept as two arrays: per-user targets are built only for the users a gate measures (a
    dict of 10M held-out users' arrays alone took gigabytes and minutes).

    Attributes:
        user_ids: int64 [P] the users of the relevant (held-out) pairs.
        item_ids: int64 [P] their items.
        source: "held-out split of <training output>" or "--eval-data <path>".
        dropped: eval-data rows not measured (unknown key, or a training interaction).
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    source: str
    dropped: int = 0

    def sample(self, max_users: int, rng: np.random.Generator) -> np.ndarray:
        """Sorted user ids to measure: every validation user, or `max_users` drawn from them."""
        users = np.unique(self.user_ids)
        if users.size <= max_users:
            return users
        return np.sort(rng.choice(users, size=max_users, replace=False))

    def targets(self, users: np.ndarray) -> dict[int, np.ndarray]:
        """Validation user of `users` -> its sorted relevant item ids (each non-empty)."""
        return positives_by_user(self.user_ids, self.item_ids, users)


def held_out_split(held_out: InteractionDataset, where: Path) -> EvalSplit | None:
    """The checkpoint's held-out interactions as validation targets; None when it has none."""
    if len(held_out) == 0:
        return None
    return EvalSplit(held_out.user_ids, held_out.item_ids, f"held-out split of {where}")


def read_eval_data(path: Path, train: InteractionDataset) -> EvalSplit:
    """Validation interactions from a table of raw keys (`--eval-data`).

    The table (CSV/TSV with a header, or Parquet, by suffix) has one row per relevant
    (user, item) pair, in columns named by the user and item key features (the names clients
    send). Keys the vocabularies do not know and pairs that are training interactions are
    dropped and counted: the former cannot be scored, the latter are excluded from every list.

    Raises:
        NotFound: no such file.
        InvalidInput: an unreadable table, a key column missing, or no usable row left.
    """
    transforms = train.transforms
    if transforms is None or transforms.user_key is None or transforms.item_key is None:
        raise InvalidInput("--eval-data needs a data source with user and item keys")
    fmt = format_of(path)
    if fmt not in FORMATS:
        raise InvalidInput(f"--eval-data {path}: suffix {path.suffix!r} is not one of {FORMATS}")
    table = read_table(TableSpec(path=path, format=fmt), "evaluation")  # type: ignore[arg-type]
    ids = []
    for key in (transforms.user_key, transforms.item_key):
        if key not in table.column_names:
            raise InvalidInput(
                f"--eval-data {path}: no column {key!r} (columns: {', '.join(table.column_names)})"
            )
        vocabulary = transforms.features[key].vocabulary
        assert vocabulary is not None  # keys are categorical
        ids.append(vocabulary.lookup(table.column(key)))
    users, items = ids
    known = (users >= 0) & (items >= 0)
    pair = users * train.num_items + items
    fresh = ~np.isin(pair, train.user_ids * train.num_items + train.item_ids)
    kept = known & fresh
    if not kept.any():
        raise InvalidInput(
            f"--eval-data {path}: none of its {len(table)} rows is a known user and item "
            "outside the training interactions"
        )
    return EvalSplit(users[kept], items[kept], f"--eval-data {path}", dropped=int((~kept).sum()))
