"""Refit output columns (docs/design.md, "Weight refit"): what weight reconstruction changes in a model.

Weight reconstruction keeps binary masks and replaces the attention output projection's columns of the kept heads
and the MLP output projection's columns of the kept neurons (and, optionally, their biases). These tensors are stored
beside `head_mask.pt` / `neuron_mask.pt` in `refit.safetensors`, keyed like the vision encoder's state dict (CLIP's
`layers.3.mlp.fc2.weight` holds the [D, K] columns of layer 3's K kept neurons, in ascending neuron order), so that
the masks plus this file rebuild exactly the saved model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from clip_prune.core.pruning.masks import head_columns
from clip_prune.core.pruning.provenance import made_on_another_model, model_record
from clip_prune.towers import VisionTower, tower_of

RefitWeights = dict[str, torch.Tensor]
"""State-dict key of a layer's attention or MLP output projection's weight or bias (`VisionTower.part_path`: CLIP's
`layers.3.mlp.fc2.weight`) → refit tensor."""

REFIT_PARTS = ("attention_output", "mlp_output")
"""The parts (`VisionTower.part_paths`) whose columns weight reconstruction refits."""


def _refit_keys(tower: VisionTower) -> dict[str, tuple[int, str, str]]:
    """Every refit key of `tower`'s family and layers → (layer, part, `weight` or `bias`)."""
    return {f"{tower.part_path(index, part)}.{kind}": (index, part, kind)
            for index in range(len(tower.layers)) for part in REFIT_PARTS for kind in ("weight", "bias")}


def _targets(model: nn.Module, head_mask: torch.Tensor, neuron_mask: torch.Tensor,
             refit: RefitWeights) -> list[tuple[nn.Parameter, torch.Tensor | None, torch.Tensor]]:
    """(parameter, kept columns or None for a bias, refit value) for every entry of `refit`, shapes checked."""
    tower = tower_of(model)
    keys = _refit_keys(tower)
    targets = []
    for key, value in refit.items():
        parsed = keys.get(key)
        if parsed is None:
            raise ValueError(f"refit entry {key!r} names no encoder layer output of this model "
                             f"({len(tower.layers)} layers); was it written for another model?")
        index, part, kind = parsed
        linear = tower.part(tower.layers[index], part)
        if part == "attention_output":
            kept = head_mask[index].to(linear.weight.device).nonzero().flatten()
            columns = head_columns(kept, tower.head_dim)
        else:
            columns = neuron_mask[index].to(linear.weight.device).nonzero().flatten()
        parameter = getattr(linear, kind)
        expected = (parameter.shape[0], len(columns)) if kind == "weight" else tuple(parameter.shape)
        if tuple(value.shape) != expected:
            raise ValueError(f"refit entry {key!r} has shape {list(value.shape)}, but the masks keep "
                             f"{list(expected)} there: the refit columns and the masks come from different runs")
        targets.append((parameter, columns if kind == "weight" else None, value))
    return targets


@torch.no_grad()
def write_refit(model: nn.Module, head_mask: torch.Tensor, neuron_mask: torch.Tensor, refit: RefitWeights) -> None:
    """Write the refit columns into the dense `model`'s attention and MLP output weights, in place."""
    for parameter, columns, value in _targets(model, head_mask, neuron_mask, refit):
        value = value.to(parameter)
        if columns is None:
            parameter.copy_(value)
        else:
            parameter[:, columns] = value


@contextmanager
def refit_applied(model: nn.Module, head_mask: torch.Tensor, neuron_mask: torch.Tensor,
                  refit: RefitWeights) -> Iterator[None]:
    """Within the block, `model` carries the refit columns; its own weights come back afterwards."""
    saved = [(parameter, parameter.detach().clone())
             for parameter, _, _ in _targets(model, head_mask, neuron_mask, refit)]
    write_refit(model, head_mask, neuron_mask, refit)
    try:
        yield
    finally:
        with torch.no_grad():
            for parameter, original in saved:
                parameter.copy_(original)


def save_refit(path: str | Path, refit: RefitWeights, model_name: str | None = None) -> None:
    """Write the refit columns as safetensors (float32 on the CPU), with the checkpoint they were fitted on."""
    metadata = {"format": "clip-prune-refit-v1", **(model_record(model_name) if model_name is not None else {})}
    save_file({key: value.detach().float().cpu().contiguous() for key, value in refit.items()}, str(path),
              metadata=metadata)


def load_refit(path: str | Path, model: nn.Module, head_mask: torch.Tensor, neuron_mask: torch.Tensor,
               model_name: str | None = None) -> RefitWeights:
    """Read `refit.safetensors` and check it against `model`'s encoder and the masks it goes with.

    The columns were fitted to one checkpoint's weights: spliced into another of the same shapes they give a
    wrong model that still passes the masked-equals-saved check, so a different checkpoint (`model_name`) is
    warned about.
    """
    try:
        with safe_open(str(path), framework="pt") as file:  # tensors and metadata in one read
            refit = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (safe_open is no mapping)
            metadata = file.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable refit file ({error}); rerun clip-prune prune") from error
    _targets(model, head_mask, neuron_mask, refit)
    if made_on_another_model(metadata, model_name):
        warnings.warn(f"{path} was fitted on the checkpoint {metadata['model']!r}, not {model_name!r}: its columns "
                      "replace the kept weights, so unless the two are copies of one checkpoint the saved model is "
                      "wrong; apply the masks to the checkpoint they were made on", stacklevel=2)
    return refit
