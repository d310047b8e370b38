"""Resuming an interrupted `prune` run: reuse the Fisher statistics it left behind when they fit this run.

A run works in a hidden staging directory (`outputs.RunDirectory`); an interrupted one leaves it,
with `fisher.safetensors` once the gradient pass is done (864 MB at ViT-B/16 size). The file's
metadata records what the statistics depend on (`statistics_provenance`); a rerun into the same
output directory reuses them when all of it matches, and otherwise says why not and removes them.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from safetensors import SafetensorError

from clip_prune.core.file_names import FISHER_FILE
from clip_prune.core.pruning.fisher import fisher_metadata
from clip_prune.core.pruning.provenance import resolve_model_path
from clip_prune.core.run.outputs import RunDirectory
from clip_prune.lightning.data import CocoDataModule
from clip_prune.lightning.module import MaskedCLIPModule

FISHER_FILE = FISHER_FILE

_DIFFERENCES = {
    "model_path": "it was gathered on another model ({recorded}, this run: {expected})",
    "loss": "it was gathered with --model.loss={recorded} (this run: {expected})",
    "calibration_sha256": "its calibration sample differs (other images, captions, --data.seed or --data.num_samples)",
    "global_batch": "its contrastive loss had {recorded} samples per global batch (this run: {expected})",
    "noise_seed": "its distill loss used --model.noise_seed={recorded} (this run: {expected})",
}


def statistics_provenance(module: MaskedCLIPModule, datamodule: CocoDataModule, world_size: int) -> dict[str, str]:
    """What Fisher statistics depend on besides the model's shapes, as recorded in their file's metadata.

    Args:
        module: the masked model (checkpoint and loss).
        datamodule: the calibration data, set up (the hash of its sampled images and captions).
        world_size: processes taking part: with the contrastive loss the global batch sets the negatives.
    """
    assert datamodule.calibration_digest is not None, "set up the data module first"
    hparams = module.hparams
    provenance = {"model_path": resolve_model_path(hparams.pretrained), "loss": hparams.loss,
                  "calibration_sha256": datamodule.calibration_digest}
    match hparams.loss:
        case "contrastive":
            provenance["global_batch"] = str(datamodule.hparams.batch_size * world_size)
        case "distill":
            provenance["noise_seed"] = str(hparams.noise_seed)
    return provenance


def _reasons_not_to_reuse(statistics: Path, expected: dict[str, str]) -> list[str]:
    """Why the statistics in `statistics` do not fit a run with provenance `expected` (empty: they fit)."""
    try:
        recorded = fisher_metadata(statistics)
    except (SafetensorError, OSError) as error:
        return [f"its {FISHER_FILE} cannot be read ({error})"]
    reasons = []
    for key, value in expected.items():
        if key not in recorded:
            reasons.append(f"it does not record its {key} (an older clip-prune wrote it)")
        elif recorded[key] != value:
            reasons.append(_DIFFERENCES[key].format(recorded=recorded[key], expected=value))
    return reasons


def find_reusable_statistics(run: RunDirectory, expected: dict[str, str], rank_zero: bool) -> Path | None:
    """The statistics file of an interrupted run into `run.path` that fits `expected`, or None.

    Rank zero says what it found and removes the interrupted runs it cannot use; the other DDP
    ranks only look (they start later, and see what rank zero kept).
    """
    reusable = None
    for staging in run.interrupted_runs():
        statistics = staging / FISHER_FILE
        if not statistics.is_file():
            message = f"found the interrupted run {staging}, which had not finished its Fisher pass"
        elif reusable is not None:
            message = f"found an older interrupted run {staging}"
        elif reasons := _reasons_not_to_reuse(statistics, expected):
            message = f"found the interrupted run {staging}, but cannot reuse its statistics: {'; '.join(reasons)}"
        else:
            reusable = statistics
            if rank_zero:
                print(f"clip-prune: resuming the interrupted run {staging}: its Fisher statistics fit this model, "
                      "data and sampling, so the gradient pass is skipped", file=sys.stderr)
            continue
        if rank_zero:
            print(f"clip-prune: {message}; removing it", file=sys.stderr)
            shutil.rmtree(staging, ignore_errors=True)
    return reusable
