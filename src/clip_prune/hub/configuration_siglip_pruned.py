"""Configurations of SigLIP and SigLIP2 models whose vision encoder layers keep their own numbers of heads and neurons.

SigLIP2 differs from SigLIP by its inputs only (patchified images of their own aspect ratio), so both families'
classes share this file. Part of the remote code of a pruned directory (see `clip_prune/hub/__init__.py`): imports
no clip_prune.
"""

from huggingface_hub.dataclasses import strict
from transformers import (
    Siglip2Config,
    Siglip2TextConfig,
    Siglip2VisionConfig,
    SiglipConfig,
    SiglipTextConfig,
    SiglipVisionConfig,
)

from .pruned_layers import PrunedFullConfig, PrunedWidths


@strict
class PrunedSiglipVisionConfig(PrunedWidths, SiglipVisionConfig):
    r"""
    Configuration of a SigLIP vision tower whose encoder layers keep their own numbers of heads and neurons.

    Takes every argument of [`SiglipVisionConfig`], which describe the dense model the pruned one was cut
    from (`num_attention_heads` H and `intermediate_size` F stay the dense sizes, as do the pooling head's),
    plus:

    Args:
        heads_per_layer (`list[int]`, *optional*, defaults to `num_attention_heads` for every layer):
            Number of attention heads kept by each of the `num_hidden_layers` encoder layers, from 0 to H.
        neurons_per_layer (`list[int]`, *optional*, defaults to `intermediate_size` for every layer):
            Number of MLP neurons kept by each encoder layer, from 0 to F.
    """

    model_type = "siglip_pruned_vision_model"

    heads_per_layer: list[int] | None = None
    neurons_per_layer: list[int] | None = None


@strict
class PrunedSiglip2VisionConfig(PrunedWidths, Siglip2VisionConfig):
    r"""
    [`PrunedSiglipVisionConfig`] for a SigLIP2 vision tower: every argument of [`Siglip2VisionConfig`], plus
    `heads_per_layer` and `neurons_per_layer`.
    """

    model_type = "siglip2_pruned_vision_model"

    heads_per_layer: list[int] | None = None
    neurons_per_layer: list[int] | None = None


@strict
class PrunedSiglipConfig(PrunedFullConfig, SiglipConfig):
    r"""
    Configuration of a SigLIP model whose vision tower is pruned: a [`SiglipConfig`] with a pruned vision config.

    Args:
        text_config (`dict` or `SiglipTextConfig`, *optional*):
            Options of the text tower, which pruning leaves untouched; SiglipTextConfig's defaults if None.
        vision_config (`dict` or `PrunedSiglipVisionConfig`, *optional*):
            Options of the vision tower, with its per-layer widths; a dense base layout if None.
        initializer_factor (`float`, *optional*, defaults to 1.0):
            Factor applied to all weight initialisations.
    """

    model_type = "siglip_pruned"
    sub_configs_defaults = {"vision_config": PrunedSiglipVisionConfig, "text_config": SiglipTextConfig}


@strict
class PrunedSiglip2Config(PrunedFullConfig, Siglip2Config):
    r"""
    [`PrunedSiglipConfig`] for SigLIP2: a [`Siglip2Config`] with a [`PrunedSiglip2VisionConfig`].
    """

    model_type = "siglip2_pruned"
    sub_configs_defaults = {"vision_config": PrunedSiglip2VisionConfig, "text_config": Siglip2TextConfig}
