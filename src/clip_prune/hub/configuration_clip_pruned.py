"""Configurations of CLIP models whose vision encoder layers keep their own numbers of heads and neurons.

Part of the remote code of a pruned directory (see `clip_prune/hub/__init__.py`): imports no clip_prune.
"""

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

from .pruned_layers import PrunedFullConfig, PrunedWidths


@strict
class PrunedCLIPVisionConfig(PrunedWidths, CLIPVisionConfig):
    r"""
    Configuration of a CLIP vision tower whose encoder layers keep their own numbers of heads and neurons.

    Takes every argument of [`CLIPVisionConfig`], which describe the dense model the pruned one was cut
    from (`num_attention_heads` H and `intermediate_size` F stay the dense sizes, and the head size stays
    `hidden_size // num_attention_heads`), plus:

    Args:
        heads_per_layer (`list[int]`, *optional*, defaults to `num_attention_heads` for every layer):
            Number of attention heads kept by each of the `num_hidden_layers` encoder layers, from 0 to H.
        neurons_per_layer (`list[int]`, *optional*, defaults to `intermediate_size` for every layer):
            Number of MLP neurons kept by each encoder layer, from 0 to F.
    """

    model_type = "clip_pruned_vision_model"

    heads_per_layer: list[int] | None = None
    neurons_per_layer: list[int] | None = None


@strict
class PrunedCLIPConfig(PrunedFullConfig, CLIPConfig):
    r"""
    Configuration of a CLIP model whose vision tower is pruned: a [`CLIPConfig`] with a pruned vision config.

    Args:
        text_config (`dict` or `CLIPTextConfig`, *optional*):
            Options of the text tower, which pruning leaves untouched; CLIPTextConfig's defaults if None.
        vision_config (`dict` or `PrunedCLIPVisionConfig`, *optional*):
            Options of the vision tower, with its per-layer widths; a dense ViT-B/32 layout if None.
        projection_dim (`int`, *optional*, defaults to 512):
            Dimensionality of the text and vision projection layers.
        logit_scale_init_value (`float`, *optional*, defaults to 2.6592):
            Initial value of the *logit_scale* parameter.
        initializer_factor (`float`, *optional*, defaults to 1.0):
            Factor applied to all weight initialisations.
    """

    model_type = "clip_pruned"
    sub_configs_defaults = {"vision_config": PrunedCLIPVisionConfig, "text_config": CLIPTextConfig}
