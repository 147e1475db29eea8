"""Sharded, atomic training checkpoints and the single-process loader the packager uses.

Layout of a training output folder::

    <out>/model_config.json              how to rebuild the unsharded model (config.py)
    <out>/metrics.json                   training and evaluation metrics
    <out>/checkpoints/step_<n>/          one complete checkpoint:
        .metadata, __<rank>_0.distcp       torch.distributed.checkpoint shards, one file per rank
        progress.json                      step, epoch, batch position, world size, RNG state
        COMPLETE                           written last
    <out>/checkpoints/.tmp_step_<n>/     a checkpoint being written (ignored, swept on start)

Every rank writes its shards into the temporary folder; after a barrier rank 0 writes
progress.json and the COMPLETE marker, fsyncs, and renames the folder to `step_<n>`. A folder
counts as a checkpoint only when its name is `step_<n>` and it holds COMPLETE, so a crash at any
point leaves either the previous checkpoint or the new one, never one that looks complete but is
not. On several nodes `<out>` must be a shared file system (every rank writes into it).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from recship.base.errors import InvalidInput, NotFound
from recship.trainer.config import ModelConfig, read_model_config, write_json_atomic
from recship.trainer.models import build_model, build_train_module

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
PROGRESS_FILE = "progress.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp_step_"


@dataclass(frozen=True)
class Progress:
    """Where training stood when a checkpoint was taken.

    Attributes:
        step: optimizer steps taken in total (every rank takes the same number).
        epoch: the epoch in progress (or the next one, when `batch_in_epoch` is 0).
        batch_in_epoch: batches of `epoch` already consumed per rank.
        examples_in_epoch: training examples of `epoch` consumed over all ranks
            (`batch_in_epoch * batch_size * world_size`); a resume with another world size or
            batch size restarts at the global step holding this example.
        world_size: ranks that wrote the checkpoint.
        batch_size: examples per rank per step when it was written.
        rng_state: base64 of rank 0's torch CPU RNG state (restored on every rank on resume).
    """

    step: int
    epoch: int
    batch_in_epoch: int
    examples_in_epoch: int
    world_size: int
    batch_size: int
    rng_state: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Returns the JSON-able form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        """Rebuilds `Progress` from `to_dict()` output."""
        return cls(**data)


def encode_rng_state() -> str:
    """Returns the torch CPU RNG state as base64 text."""
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")


def restore_rng_state(encoded: str) -> None:
    """Restores a torch CPU RNG state saved by `encode_rng_state` (no-op for "")."""
    if encoded:
        raw = bytearray(base64.b64decode(encoded))
        torch.set_rng_state(torch.frombuffer(raw, dtype=torch.uint8).clone())


def checkpoints_root(out: Path) -> Path:
    """Returns `<out>/checkpoints`."""
    return out / CHECKPOINTS_DIR


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Returns the complete checkpoints in `out` as (step, folder), oldest first."""
    root = checkpoints_root(out)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(out: Path) -> tuple[int, Path] | None:
    """Returns (step, folder) of the newest complete checkpoint in `out`, or None."""
    found = list_checkpoints(out)
    return found[-1] if found else None


def sweep_incomplete(out: Path) -> list[Path]:
    """Removes checkpoint folders a crash left half-written; returns what was removed.

    Call on one rank only, while no checkpoint is being written.
    """
    root = checkpoints_root(out)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for child in root.iterdir():
        incomplete = child.name.startswith(_TMP_PREFIX) or (
            _STEP_DIR.match(child.name) is not None and not (child / COMPLETE_MARKER).is_file()
        )
        if incomplete and child.is_dir():
            shutil.rmtree(child)
            removed.append(child)
    return removed


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    out: Path,
    state: dict[str, Any],
    progress: Progress,
    *,
    rank: int,
    keep_last: int = 0,
) -> Path:
    """Writes one sharded checkpoint atomically. Collective: every rank must call it.

    Args:
        out: the training output folder.
        state: {"model": model.state_dict(), "optim": optimizer.state_dict()} of the sharded
            model (ShardedTensors are written by the ranks that hold them).
        progress: the position to resume from.
        rank: this rank (rank 0 finalises).
        keep_last: keep only this many newest complete checkpoints (0: keep all).

    Returns:
        The final `step_<n>` folder.
    """
    root = checkpoints_root(out)
    final = root / f"step_{progress.step}"
    tmp = root / f"{_TMP_PREFIX}{progress.step}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(state, checkpoint_id=tmp)
    _barrier()
    if rank == 0:
        write_json_atomic(tmp / PROGRESS_FILE, progress.to_dict())
        marker = tmp / COMPLETE_MARKER
        with marker.open("w") as handle:
            handle.write(f"step {progress.step}\n")
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(tmp)
        if final.exists():
            # Only a checkpoint of this very step can be here (a resumed run re-saving it).
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        if keep_last > 0:
            for _, old in list_checkpoints(out)[:-keep_last]:
                shutil.rmtree(old)
    _barrier()
    return final


def read_progress(checkpoint: Path) -> Progress:
    """Reads `progress.json` of a complete checkpoint."""
    path = checkpoint / PROGRESS_FILE
    try:
        return Progress.from_dict(json.loads(path.read_text()))
    except FileNotFoundError as error:
        raise NotFound(f"{path}: missing (not a complete checkpoint)") from error
    except (json.JSONDecodeError, TypeError) as error:
        raise InvalidInput(f"{path}: malformed progress file: {error}") from error


def load_checkpoint(checkpoint: Path, state: dict[str, Any]) -> Progress:
    """Loads a checkpoint in place into `state` (same layout as saved). Collective.

    The checkpoint may have been written by a different number of ranks or sharding: DCP
    reshards on load.
    """
    dcp.load(state, checkpoint_id=checkpoint)
    return read_progress(checkpoint)


def resolve_checkpoint(out: Path, step: int | None = None) -> tuple[int, Path]:
    """Returns (step, folder) of checkpoint `step` in `out`, or of the newest when None.

    Raises:
        NotFound: no such complete checkpoint.
    """
    found = list_checkpoints(out)
    if not found:
        raise NotFound(f"{checkpoints_root(out)}: no complete checkpoint")
    if step is None:
        return found[-1]
    for candidate_step, folder in found:
        if candidate_step == step:
            return candidate_step, folder
    steps = ", ".join(str(s) for s, _ in found)
    raise NotFound(f"{checkpoints_root(out)}: no complete checkpoint of step {step} (have {steps})")


def load_unsharded(out: Path, step: int | None = None) -> tuple[ModelConfig, nn.Module]:
    """Loads a training checkpoint into the unsharded model, in one process, no process group.

    Works for checkpoints written by any number of ranks with any sharding.

    Args:
        out: a `recship train` output folder.
        step: which checkpoint; the newest complete one when None.

    Returns:
        The model config and the model (`TwoTower` or torchrec `DLRM`) on CPU in eval mode.

    Raises:
        NotFound: no model_config.json or no complete checkpoint.

    Example::

        config, model = load_unsharded(Path("runs/ml100k"))
        user_vectors = model.query_tower(kjt)
    """
    out = Path(out)
    config, _ = read_model_config(out)
    _, folder = resolve_checkpoint(out, step)
    model = build_model(config, torch.device("cpu"))
    wrapper = build_train_module(config, model)
    state = wrapper.state_dict()
    with warnings.catch_warnings():
        # "torch.distributed is ... uninitialized, assuming ... a single process": intended.
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        dcp.load({"model": state}, checkpoint_id=folder, no_dist=True)
    wrapper.load_state_dict(state)
    model.eval()
    return config, model
