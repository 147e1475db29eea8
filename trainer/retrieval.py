"""The retrieval checkpoint a ranker mines its hard negatives from, and its provenance.

A DLRM trained with `--retrieval <two-tower output folder>` learns to order that model's
candidates; served behind another retrieval model it would rank a distribution it never saw.
So the trainer records which checkpoint it mined from (`RetrievalProvenance`: the folder, the
sha256 of its model_config.json, the checkpoint step and a sha256 of the checkpoint's files:
two trainings with the same flags write byte-identical model_config.json files, so only the
last one tells them apart) in the ranker's model_config.json,
and the packager calls `check_provenance` to refuse a (retrieval, ranking) pair that does not
match.

The retrieval run must have been trained on the same data source, options and split as the
ranker: otherwise its candidates (and the end-to-end evaluation) would be shaped by the
ranker's held-out interactions.

Called by `recship.trainer.train` (every rank, before training) and by the packager; imports the
trainer's config, checkpoint and model modules only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recship.base.errors import InvalidInput
from recship.trainer.checkpoint import load_unsharded, resolve_checkpoint
from recship.trainer.config import MODEL_CONFIG_FILE, TrainConfig, read_model_config
from recship.trainer.models import TwoTower


@dataclass(frozen=True)
class RetrievalProvenance:
    """Which retrieval checkpoint a ranker's negatives were mined from.

    Attributes:
        path: the two-tower output folder, absolute.
        model_config_sha256: sha256 of its model_config.json when mined.
        step: the checkpoint step mined from.
        checkpoint_sha256: `checkpoint_sha256` of that checkpoint folder ("" when unknown).
    """

    path: str
    model_config_sha256: str
    step: int
    checkpoint_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The "retrieval" section of the ranker's model_config.json."""
        return {
            "path": self.path,
            "model_config_sha256": self.model_config_sha256,
            "step": self.step,
            "checkpoint_sha256": self.checkpoint_sha256,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetrievalProvenance:
        """Rebuilds it from `to_dict()` output.

        Raises:
            InvalidInput: a field is missing or malformed.
        """
        try:
            return cls(
                str(data["path"]),
                str(data["model_config_sha256"]),
                int(data["step"]),
                str(data.get("checkpoint_sha256", "")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidInput(f"retrieval provenance: malformed ({error!r})") from error


def config_sha256(out: Path) -> str:
    """sha256 (hex) of `<out>/model_config.json`."""
    return hashlib.sha256((Path(out) / MODEL_CONFIG_FILE).read_bytes()).hexdigest()


def checkpoint_sha256(folder: Path) -> str:
    """sha256 (hex) over the names and bytes of every file of a checkpoint folder, in name order.

    The shards hold the weights, so two trainings give different digests even when their
    model_config.json files are identical.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        digest.update(path.name.encode("utf-8") + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _same_source(left: str, right: str) -> bool:
    """Whether two --data values name the same source (paths compared resolved)."""
    if left == right:
        return True
    left_path, right_path = Path(left).expanduser(), Path(right).expanduser()
    return (
        left_path.exists() and right_path.exists() and left_path.resolve() == right_path.resolve()
    )


def retrieval_output_dim(path: Path | str) -> int:
    """The embedding dim D of a two-tower output folder (its last tower layer).

    Raises:
        NotFound: no model_config.json in `path`.
        InvalidInput: `path` holds another kind of model.
    """
    config, _ = read_model_config(Path(path).expanduser())
    if config.kind != "two-tower":
        raise InvalidInput(f"--retrieval {path}: holds a {config.kind} model, expected two-tower")
    return config.output_dim


def load_retrieval(path: Path | str, ranker: TrainConfig) -> tuple[RetrievalProvenance, TwoTower]:
    """Loads the newest checkpoint of a two-tower run for mining, after checking its data.

    Args:
        path: the two-tower output folder (`recship train two-tower --out`).
        ranker: the ranker's resolved run (its data source, options, seed and eval fraction).

    Returns:
        (provenance, the unsharded two-tower model on CPU in eval mode).

    Raises:
        NotFound: no model_config.json or no complete checkpoint in `path`.
        InvalidInput: `path` holds another kind of model, or was trained on other data or
            another split.
    """
    path = Path(path).expanduser().resolve()
    config, payload = read_model_config(path)
    where = f"--retrieval {path}"
    if config.kind != "two-tower":
        raise InvalidInput(f"{where}: holds a {config.kind} model, expected two-tower")
    data = payload.get("data") or {}
    split = data.get("split") or {}
    differences = []
    if not _same_source(str(data.get("source")), ranker.data):
        differences.append(f"data {data.get('source')!r} vs {ranker.data!r}")
    if dict(data.get("options") or {}) != dict(ranker.data_options):
        differences.append(f"data options {data.get('options')} vs {ranker.data_options}")
    if split.get("seed") != ranker.seed:
        differences.append(f"seed {split.get('seed')} vs {ranker.seed}")
    if split.get("eval_fraction") != ranker.eval_fraction:
        differences.append(f"eval fraction {split.get('eval_fraction')} vs {ranker.eval_fraction}")
    if differences:
        raise InvalidInput(
            f"{where}: trained on other data or another split than this ranker "
            f"({'; '.join(differences)}); its candidates would reflect the ranker's held-out "
            "interactions. Train both on the same --data, --seed and --eval-fraction"
        )
    step, folder = resolve_checkpoint(path)
    digest = config_sha256(path)
    _, model = load_unsharded(path, step)
    if not isinstance(model, TwoTower):
        raise InvalidInput(f"{where}: did not load as a two-tower model")
    return RetrievalProvenance(str(path), digest, step, checkpoint_sha256(folder)), model


def check_provenance(
    ranking_payload: dict[str, Any],
    retrieval_sha256: str,
    retrieval_step: int,
    where: str,
    retrieval_checkpoint_sha256: str | None = None,
) -> None:
    """Checks that a ranker was mined from this retrieval checkpoint (the packager's pair check).

    A ranker trained without --retrieval (no "retrieval" section: labelled examples, or
    catalogue negatives only) passes: it was shaped by no retrieval model in particular.

    Args:
        ranking_payload: the ranker's parsed model_config.json.
        retrieval_sha256: sha256 of the retrieval run's model_config.json.
        retrieval_step: the retrieval checkpoint step being packaged.
        where: names the pair in the message.
        retrieval_checkpoint_sha256: `checkpoint_sha256` of that checkpoint folder; compared
            when given and recorded (it tells apart two trainings with the same flags).

    Raises:
        InvalidInput: the ranker was mined from another retrieval run, step or training.
    """
    section = ranking_payload.get("retrieval")
    if section is None:
        return
    mined = RetrievalProvenance.from_dict(section)
    if mined.model_config_sha256 != retrieval_sha256 or mined.step != retrieval_step:
        raise InvalidInput(
            f"{where}: the ranker's negatives were mined from {mined.path} step {mined.step} "
            f"(model_config sha256 {mined.model_config_sha256[:12]}), not from this retrieval "
            f"model (step {retrieval_step}, sha256 {retrieval_sha256[:12]}); retrain the "
            "ranker with --retrieval pointing at it"
        )
    if (
        retrieval_checkpoint_sha256 is not None
        and mined.checkpoint_sha256
        and mined.checkpoint_sha256 != retrieval_checkpoint_sha256
    ):
        raise InvalidInput(
            f"{where}: the ranker's negatives were mined from other weights of {mined.path} "
            f"step {mined.step} (checkpoint sha256 {mined.checkpoint_sha256[:12]}, now "
            f"{retrieval_checkpoint_sha256[:12]}): it was retrained since; retrain the ranker"
        )
