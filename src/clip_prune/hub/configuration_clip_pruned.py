"""Configurations of CLIP models whose vision encoder layers keep their own numbers of heads and neurons.

Part of the remote code of a pruned directory (see `clip_prune/hub/__init__.py`): imports no clip_prune.
"""

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig


@strict
class PrunedCLIPVisionConfig(CLIPVisionConfig):
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

    def __post_init__(self, **kwargs: Any) -> None:
        if self.heads_per_layer is None:
            self.heads_per_layer = [self.num_attention_heads] * self.num_hidden_layers
        if self.neurons_per_layer is None:
            self.neurons_per_layer = [self.intermediate_size] * self.num_hidden_layers
        super().__post_init__(**kwargs)

    def validate_widths(self) -> None:
        """Part of `@strict` validation: one width per layer, each within the dense size."""
        for name, widths, dense in (("heads_per_layer", self.heads_per_layer, self.num_attention_heads),
                                    ("neurons_per_layer", self.neurons_per_layer, self.intermediate_size)):
            if len(widths) != self.num_hidden_layers:
                raise ValueError(
                    f"{name} has {len(widths)} entries but num_hidden_layers is {self.num_hidden_layers}"
                )
            if not all(0 <= width <= dense for width in widths):
                raise ValueError(f"{name} must lie in [0, {dense}], got {widths}")


@strict
class PrunedCLIPConfig(CLIPConfig):
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

    def validate_pruned_vision(self) -> None:
        """Part of `@strict` validation: the vision config must record the per-layer widths."""
        if not isinstance(self.vision_config, PrunedCLIPVisionConfig):
            raise TypeError(
                "vision_config must be a PrunedCLIPVisionConfig (or a dict), got "
                f"{type(self.vision_config).__name__}; build it with clip_prune's config_from_plan"
            )
