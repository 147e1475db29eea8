"""Load the two training outputs a bundle is built from, and check that they belong together.

Each output folder is reloaded in this one process into its unsharded model (any training world
size), and its data source is reopened and split exactly as the trainer split it, so the
packager's quality gate runs on the checkpoint's own held-out split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from recship.base.errors import InvalidInput
from recship.bundle.transforms import Transforms, Vocabulary, read_transforms
from recship.trainer.checkpoint import load_unsharded, resolve_checkpoint
from recship.trainer.config import (
    FITTED_TRANSFORMS_DIR,
    MODEL_CONFIG_FILE,
    ModelConfig,
    read_model_config,
)
from recship.trainer.data.dataset import InteractionDataset
from recship.trainer.data.sources import open_source
from recship.trainer.retrieval import check_provenance, checkpoint_sha256, config_sha256


@dataclass(frozen=True)
class LoadedCheckpoint:
    """One training output reloaded for packaging.

    Attributes:
        path: the training output folder.
        config: the model config.
        model: the unsharded model (`TwoTower` or `DLRM`) on CPU, eval mode.
        step: the checkpoint's training step.
        folder: the checkpoint's folder (its shards).
        payload: the whole model_config.json (data source, split, training section).
        config_sha256: sha256 of model_config.json.
        train / held_out: the data split the trainer used.
    """

    path: Path
    config: ModelConfig
    model: nn.Module
    step: int
    folder: Path
    payload: dict[str, Any]
    config_sha256: str
    train: InteractionDataset
    held_out: InteractionDataset

    @property
    def world_size(self) -> int:
        return int(self.payload.get("training", {}).get("nproc", 1))

    @property
    def metrics(self) -> dict[str, float]:
        """Training-time evaluation metrics from metrics.json (numbers only)."""
        path = self.path / "metrics.json"
        if not path.is_file():
            return {}
        data = json.loads(path.read_text())
        found = data.get("eval", data)
        return {k: float(v) for k, v in found.items() if isinstance(v, int | float)}


def reopen_split(
    payload: dict[str, Any], where: Path
) -> tuple[InteractionDataset, InteractionDataset]:
    """(train, held-out) of a run's data, split exactly as its model_config.json records."""
    data = payload.get("data") or {}
    if "source" not in data or "split" not in data:
        raise InvalidInput(f"{where / MODEL_CONFIG_FILE}: no data source or split recorded")
    source = open_source(data["source"], **dict(data.get("options") or {}))
    if not isinstance(source, InteractionDataset):
        raise InvalidInput(
            f"{where}: data source {data['source']!r} has no users and items to package"
        )
    split = data["split"]
    return source.split(float(split["eval_fraction"]), int(split["seed"]))


def load_checkpoint(
    path: Path, kind: str, step: int | None = None, same_data: LoadedCheckpoint | None = None
) -> LoadedCheckpoint:
    """Reloads one `recship train` output folder of the expected model kind.

    `same_data`: a checkpoint already reloaded; when both model_config.json record the same
    data source, options and split, its split is shared rather than reopened (a second copy
    of a 10M-user data set is gigabytes and minutes).

    Raises:
        NotFound: no model_config.json or no complete checkpoint.
        InvalidInput: the folder holds another kind of model, or its data cannot be reopened.
    """
    path = Path(path)
    config, payload = read_model_config(path)
    if config.kind != kind:
        raise InvalidInput(f"{path} holds a {config.kind} model, expected {kind}")
    found_step, folder = resolve_checkpoint(path, step)
    _, model = load_unsharded(path, found_step)
    if same_data is not None and same_data.payload.get("data") == payload.get("data"):
        train, held_out = same_data.train, same_data.held_out
    else:
        train, held_out = reopen_split(payload, path)
    _check_fitted_transforms(path, train.transforms)
    return LoadedCheckpoint(
        path, config, model, found_step, folder, payload, config_sha256(path), train, held_out
    )


def _same_vocabulary(left: Vocabulary | None, right: Vocabulary | None) -> bool:
    if left is None or right is None:
        return left is right
    return left.values.equals(right.values)


def _check_fitted_transforms(path: Path, refit: Transforms | None) -> None:
    """Checks that the data reopened now fit the transforms training wrote (if it wrote any).

    The packager refits the data source to rebuild the split; a source edited since training
    would otherwise be packaged with vocabularies, buckets or statistics the model never saw.

    Raises:
        InvalidInput: naming the first feature whose transform differs.
    """
    folder = path / FITTED_TRANSFORMS_DIR
    if not folder.is_dir():
        return  # a run of a recship that did not record them
    saved = read_transforms(folder)
    problem = None
    if refit is None:
        problem = "the data now has no feature transforms"
    elif (saved.user_key, saved.item_key) != (refit.user_key, refit.item_key):
        problem = "its user or item key feature differs"
    elif list(saved.features) != list(refit.features):
        problem = f"its features are {', '.join(refit.features)}, not {', '.join(saved.features)}"
    else:
        for name, fitted in saved.features.items():
            now = refit.features[name]
            if fitted != now or not _same_vocabulary(fitted.vocabulary, now.vocabulary):
                problem = f"feature {name!r} fits differently than at training"
                break
    if problem is not None:
        raise InvalidInput(
            f"{path}: the training data changed since this run was trained ({problem}; "
            f"{FITTED_TRANSFORMS_DIR}/ holds what training fitted): restore the data or retrain"
        )


def check_pair(retrieval: LoadedCheckpoint, ranking: LoadedCheckpoint) -> None:
    """Checks that the ranker was trained on this retrieval model's candidates, and that they
    are items the ranker knows, with the same features.

    A ranker mined from a retrieval run (`recship train dlrm --retrieval`) must be packaged
    with that run's checkpoint: its negatives and frozen id tables came from it. The two-tower
    candidate side and the DLRM must share the item id feature, its cardinality and every
    item-side sparse feature the DLRM uses, so that any retrieved id can be ranked with the
    features stored in the bundle.

    Raises:
        InvalidInput: naming the first mismatch.
    """
    left, right = retrieval.config.schema, ranking.config.schema
    where = f"{retrieval.path} and {ranking.path}"
    check_provenance(
        ranking.payload,
        retrieval.config_sha256,
        retrieval.step,
        where,
        checkpoint_sha256(retrieval.folder),
    )
    if left.item_id_feature != right.item_id_feature:
        raise InvalidInput(
            f"{where}: item id features differ ({left.item_id_feature!r} vs "
            f"{right.item_id_feature!r})"
        )
    retrieval_items = {f.name: f for f in left.item_sparse()}
    for feature in right.item_sparse():
        other = retrieval_items.get(feature.name)
        if other is None:
            raise InvalidInput(
                f"{where}: the ranker's item feature {feature.name!r} is not an item feature of "
                "the retrieval model's data"
            )
        if other.cardinality != feature.cardinality:
            raise InvalidInput(
                f"{where}: item feature {feature.name!r} has {other.cardinality} ids for "
                f"retrieval but {feature.cardinality} for ranking"
            )
    if retrieval.train.num_items != ranking.train.num_items:
        raise InvalidInput(
            f"{where}: {retrieval.train.num_items} items for retrieval but "
            f"{ranking.train.num_items} for ranking"
        )
