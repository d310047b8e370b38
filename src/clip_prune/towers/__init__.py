"""Vision-tower adapters, one module per model family, found by `config.model_type`.

To add a family, write one module with a `VisionTower` subclass (see `clip.py`) and list it in `FAMILIES`.
This package imports transformers, `clip_prune.hub` and `clip_prune.errors` only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from clip_prune.errors import first_line
from clip_prune.towers.base import VisionInputs, VisionTower, as_inputs, inputs_to, normalize_pixels
from clip_prune.towers.clip import ClipTower
from clip_prune.towers.siglip import SiglipTower
from clip_prune.towers.siglip2 import Siglip2Tower

FAMILIES: tuple[type[VisionTower], ...] = (ClipTower, SiglipTower, Siglip2Tower)


def supported_model_types() -> list[str]:
    """The dense `model_type`s clip-prune can prune."""
    return sorted(model_type for family in FAMILIES for model_type in family.model_classes)


def tower_class(config: PretrainedConfig) -> type[VisionTower]:
    """The adapter class of the family that `config` (full, vision-only, dense or pruned) belongs to."""
    for family in FAMILIES:
        if config.model_type in family.model_types():
            return family
    raise TypeError(
        f"a {config.model_type!r} model is not a supported vision-language model; clip-prune prunes the vision "
        f"towers of {', '.join(supported_model_types())} checkpoints (e.g. openai/clip-vit-base-patch16)"
    )


def tower_of(model: nn.Module) -> VisionTower:
    """The adapter around `model`'s vision tower."""
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"expected a transformers model with a config, got {type(model).__name__}")
    return tower_class(config)(model)


def image_embeds(model: nn.Module, inputs: torch.Tensor | VisionInputs) -> torch.Tensor:
    """`model`'s image embeddings [B, E] of a pixel batch or of the tower's full inputs (SigLIP2's masks too;
    uint8 pixels with their `pixel_mean` and `pixel_std` are normalised where they are, `normalize_pixels`)."""
    return tower_of(model).image_embeds(normalize_pixels(as_inputs(inputs)))


def load_model(pretrained: str, attn_implementation: str = "sdpa") -> PreTrainedModel:
    """Load a dense checkpoint of a supported family (Hub name or local folder); refuse anything else."""
    try:
        config = AutoConfig.from_pretrained(pretrained)
    except (OSError, ValueError) as error:
        local = Path(pretrained).resolve()
        where = (f"the folder {local} has no usable config.json" if local.exists()
                 else f"no folder {local} exists, and the Hub lookup failed")
        raise OSError(
            f"cannot load a model config from --model.pretrained={pretrained!r}: {where} ({first_line(error)}). "
            "Give a Hub name such as openai/clip-vit-base-patch16 or a folder written by save_pretrained."
        ) from error
    family = tower_class(config)
    if config.model_type not in family.model_classes:
        raise TypeError(
            f"--model.pretrained={pretrained!r} is an already pruned {config.model_type!r} model; prune its dense "
            "checkpoint instead (combine the masks), or evaluate this one with clip-prune evaluate"
        )
    fix = ("Check that the folder holds the complete model.safetensors (or pytorch_model.bin) that save_pretrained "
           "wrote; download or copy it again")
    try:
        model = family.model_classes[config.model_type].from_pretrained(pretrained,
                                                                         attn_implementation=attn_implementation)
    except (OSError, ValueError, SafetensorError) as error:  # missing, truncated or corrupt weight files
        raise OSError(f"cannot load the weights of --model.pretrained={pretrained!r}: {first_line(error)}. "
                      f"{fix}") from error
    # Damage inside a tensor's bytes passes every format check; where it makes NaN or infinite values, say so
    # before they turn every statistic into NaN.
    broken = next((name for name, tensor in model.state_dict().items()
                   if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)
    if broken is not None:
        raise ValueError(f"the weights of --model.pretrained={pretrained!r} hold NaN or infinite values ({broken}): "
                         f"the file is damaged or the model diverged. {fix}")
    return model


__all__ = ["FAMILIES", "VisionInputs", "VisionTower", "as_inputs", "image_embeds", "inputs_to", "load_model",
           "normalize_pixels", "supported_model_types", "tower_class", "tower_of"]
