"""Pruned models that load with `from_pretrained`, and saving, loading and reading their inputs.

docs/design.md, "Physical pruning and the saved model": a Hugging Face-style directory with
safetensors weights, a config recording each layer's head and neuron counts, the
processor files and the plan (`plan.json`). transformers 5 cannot load per-layer widths
into `CLIPModel` (nor SigLIP's classes), so each family's config and model classes in `clip_prune.hub`
record them, and travel with the directory as remote code (`core/deploy/sharing.py`).
"""

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from clip_prune.core.deploy.sharing import write_remote_code
from clip_prune.core.deploy.slicing import LayerPlan, plan_from_masks, slice_vision_tower, write_plan
from clip_prune.core.file_names import HEAD_MASK_FILE, NEURON_MASK_FILE, PLAN_FILE
from clip_prune.core.pruning.masks import check_masks, mask_shapes
from clip_prune.core.pruning.refit import RefitWeights, write_refit
from clip_prune.files import atomic_directory
from clip_prune.towers import FAMILIES, tower_of


def cut_pruned_model(model: PreTrainedModel, head_mask: torch.Tensor, neuron_mask: torch.Tensor,
                refit: RefitWeights | None = None) -> PreTrainedModel:
    """A physically pruned copy of `model`, which saves and reloads with `from_pretrained`.

    `model` itself is left unchanged.

    Args:
        model: a dense model of a supported family (`clip_prune.towers`), full or vision-only.
        head_mask: [L, H] head scales, 0 = pruned.
        neuron_mask: [L, F] neuron scales, 0 = pruned.
        refit: refit out_proj/fc2 columns of the kept units (`core.refit`), written in before slicing.
    """
    tower = tower_of(model)
    if model.config.model_type not in tower.pruned_classes:
        raise TypeError(f"cut_pruned_model needs a dense model, got a {model.config.model_type!r} one")
    check_masks(head_mask, neuron_mask, mask_shapes(tower.config))
    plan = plan_from_masks(head_mask, neuron_mask)
    config = tower.pruned_config(model.config, [len(layer.heads) for layer in plan],
                                 [len(layer.neurons) for layer in plan])
    dense = copy.deepcopy(model)
    if refit:
        write_refit(dense, head_mask, neuron_mask, refit)
    sliced = slice_vision_tower(dense, head_mask, neuron_mask)
    parameter = next(model.parameters())
    # The weights come from `sliced`: skip initialising them.
    with no_init_weights():
        pruned = tower.pruned_class()._from_config(config, attn_implementation=model.config._attn_implementation,
                                                   dtype=parameter.dtype)
    pruned.load_state_dict(sliced.state_dict(), strict=True, assign=True)
    return pruned.to(parameter.device).train(model.training)


def is_pruned(model: nn.Module) -> bool:
    """Whether `model` is one of clip-prune's pruned classes (its config records per-layer widths)."""
    return any(type(model) is pruned for family in FAMILIES for pruned in family.pruned_classes.values())


def save_pruned(model: PreTrainedModel, output_dir: str | Path, plan: list[LayerPlan],
                processor: Any = None, overwrite: bool = False) -> Path:
    """Write `model` (safetensors + config), `plan.json` and the processor files to `output_dir`, atomically.

    Everything is written to a hidden sibling directory first, which then takes the place of
    `output_dir`, so an interrupted save leaves no half-written model behind.

    Args:
        model: the pruned model (`cut_pruned_model`'s output or a loaded one).
        output_dir: directory to create; its parents are created as needed.
        plan: the pruning plan the model was cut with (`plan_from_masks`).
        processor: a processor, image processor or tokenizer to save alongside, or None.
        overwrite: replace an existing non-empty `output_dir` instead of refusing.

    Returns:
        The output directory.
    """
    output = Path(output_dir).resolve()
    with atomic_directory(output, overwrite) as staging:
        write_pruned_files(model, staging, plan, processor)  # checks the plan first: a mismatch leaves nothing behind
    return output


def write_pruned_files(model: PreTrainedModel, folder: Path, plan: list[LayerPlan], processor: Any = None) -> None:
    """Write `model`, its remote code, `plan.json` and the processor files into the existing `folder` (not
    atomically: `save_pruned` stages it, a run directory stages the whole run)."""
    _check_plan(model, plan)
    model.save_pretrained(folder)
    write_remote_code(folder, model)
    write_plan(plan, folder / PLAN_FILE)
    if processor is not None:
        processor.save_pretrained(folder)


def _check_plan(model: PreTrainedModel, plan: list[LayerPlan]) -> None:
    """Refuse a dense model, or a plan other than the one `model` was cut with."""
    if not is_pruned(model):
        raise TypeError(f"saving needs a pruned model from cut_pruned_model, got {type(model).__name__}")
    config = tower_of(model).vision.config
    if ([len(layer.heads) for layer in plan] != list(config.heads_per_layer)
            or [len(layer.neurons) for layer in plan] != list(config.neurons_per_layer)):
        raise ValueError(
            f"the plan does not match the model: it keeps {[len(layer.heads) for layer in plan]} heads and "
            f"{[len(layer.neurons) for layer in plan]} neurons per layer, the model has "
            f"{config.heads_per_layer} and {config.neurons_per_layer}"
        )


def load_pruned(path: str | Path, **kwargs: Any) -> PreTrainedModel:
    """Load a directory written by `save_pruned`; `kwargs` go to `from_pretrained` (e.g. `dtype`)."""
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{directory} has no config.json, so it is not a pruned model directory; point it at the output "
            "directory of clip-prune prune/apply (save_pruned)"
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    classes = {pruned.config_class.model_type: pruned for family in FAMILIES
               for pruned in family.pruned_classes.values()}
    if model_type not in classes:
        raise ValueError(
            f"{directory} holds a model of type {model_type!r}, not a pruned model "
            f"({', '.join(sorted(classes))}); load a dense checkpoint with transformers' AutoModel.from_pretrained, "
            "or prune it first"
        )
    return classes[model_type].from_pretrained(directory, **kwargs)


def _read_mask(path: Path) -> torch.Tensor:
    """A float32 mask tensor read from `path` without unpickling arbitrary objects."""
    try:
        mask = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"could not read {path} as a tensor with torch.load(weights_only=True): {error}"
        ) from error
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"{path} holds a {type(mask).__name__}, expected a tensor (the original tool's format)"
        )
    return mask.float()


def read_masks(location: str | Path,
               vision_config: PretrainedConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read `head_mask.pt` [L, H] and `neuron_mask.pt` [L, F], the original tool's mask files.

    Args:
        location: folder holding the masks, or one head-mask file (e.g. a sensitivity run's
            `head_mask_3.pt`) whose folder holds the `neuron_mask.pt`.
        vision_config: the dense model's vision config: the masks are checked against its shapes,
            and a missing `neuron_mask.pt` means every neuron is kept (all ones). Without it,
            `neuron_mask.pt` is required.

    Returns:
        (head_mask, neuron_mask) as float32 CPU tensors.
    """
    path = Path(location)
    if path.suffix == ".pt":
        if not path.is_file():
            raise FileNotFoundError(f"mask file {path} does not exist")
        folder, head_path = path.parent, path
    else:
        if not path.is_dir():
            raise FileNotFoundError(f"mask directory {path} does not exist")
        folder, head_path = path, path / HEAD_MASK_FILE
    neuron_path = folder / NEURON_MASK_FILE
    if not head_path.is_file():
        present = sorted(path.name for path in folder.iterdir())
        raise FileNotFoundError(f"{folder} has no head_mask.pt (found: {present or 'nothing'})")
    head_mask = _read_mask(head_path)
    if neuron_path.is_file():
        neuron_mask = _read_mask(neuron_path)
    elif vision_config is not None:
        neuron_mask = torch.ones(mask_shapes(vision_config)[1])
    else:
        raise FileNotFoundError(
            f"{folder} has no neuron_mask.pt; pass the model's vision_config to keep all neurons"
        )
    check_masks(head_mask, neuron_mask, None if vision_config is None else mask_shapes(vision_config))
    return head_mask, neuron_mask
